"""Tests for shpeft.backbones: building, weight conversion/loading, head, identity hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.testing import assert_close

from shpeft.backbones import (
    BackboneConfig,
    InputSpec,
    NormedLinear,
    base_state_dict,
    create_model,
    hash_backbone,
    hf_clip_vit_kwargs,
    load_weights,
    resolve_timm_name,
    to_timm_state_dict,
)

# A CLIP-like tiny tower: pre-norm, QuickGELU, LayerNorm eps 1e-5, CLS pooling.
TINY_CLIP = hf_clip_vit_kwargs(
    {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
        "hidden_act": "quick_gelu",
    }
)


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values everywhere (LayerNorms start at 1/0, which would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _tiny_clip_vit(num_classes: int = 0, **overrides) -> VisionTransformer:
    return VisionTransformer(**{**TINY_CLIP, "num_classes": num_classes, **overrides}).eval()


def _pooled(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"head": "cosine"}, "head must be one of l2norm, linear, got 'cosine'"),
        ({"image_size": 0}, "image_size must be a positive integer"),
        ({"image_size": -32}, "-32"),
        ({"model": ""}, "model must be"),
        ({"pretrained": "yes"}, "pretrained must be"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BackboneConfig(**kwargs)


def test_config_fields_have_help():
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(BackboneConfig))


def test_num_classes_must_be_positive():
    with pytest.raises(ValueError, match="num_classes"):
        create_model(BackboneConfig(model="vit_tiny_patch16_224", pretrained=False), 0)


# ------------------------------------------------------------------ shared test model


def test_vit_pico_loads_every_backbone_tensor(vit_pico_dir: Path):
    model, spec = create_model(BackboneConfig(model=str(vit_pico_dir)), num_classes=3)
    card = json.loads((vit_pico_dir / "card.json").read_text())
    file_sd = load_file(str(vit_pico_dir / card["file"]))

    assert isinstance(model, VisionTransformer)
    backbone = base_state_dict(model)
    assert set(backbone) == {k for k in file_sd if not k.startswith("head.")}
    for k, v in backbone.items():
        assert torch.equal(v, file_sd[k]), k
    # the CIFAR head is not loaded: fresh paper head with the requested classes
    assert isinstance(model.head, NormedLinear)
    assert model.head.weight.shape == (3, card["kwargs"]["embed_dim"])
    assert model.num_classes == 3
    assert spec == InputSpec(
        image_size=32,
        mean=tuple(card["input"]["mean"]),
        std=tuple(card["input"]["std"]),
        interpolation="bilinear",
    )
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_vit_pico_same_class_count_still_fresh_head(vit_pico_dir: Path):
    model, _ = create_model(BackboneConfig(model=str(vit_pico_dir), head="linear"), 10)
    file_head = load_file(str(vit_pico_dir / "model.safetensors"))["head.weight"]
    assert type(model.head) is nn.Linear
    assert not torch.equal(model.head.weight, file_head)


def test_vit_pico_image_size_override(vit_pico_dir: Path):
    model, spec = create_model(BackboneConfig(model=str(vit_pico_dir), image_size=64), 2)
    file_pos = load_file(str(vit_pico_dir / "model.safetensors"))["pos_embed"]
    assert spec.image_size == 64
    assert model.pos_embed.shape == (1, 1 + (64 // 4) ** 2, 64)
    # the class token's position is carried over; only the patch grid is resampled
    assert_close(model.pos_embed[:, :1], file_pos[:, :1])
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_vit_pico_not_pretrained_is_random(vit_pico_dir: Path):
    model, _ = create_model(BackboneConfig(model=str(vit_pico_dir), pretrained=False), 2)
    file_sd = load_file(str(vit_pico_dir / "model.safetensors"))
    assert not torch.equal(model.pos_embed, file_sd["pos_embed"])


def test_image_size_must_fit_patches(vit_pico_dir: Path):
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        create_model(BackboneConfig(model=str(vit_pico_dir), image_size=30), 2)


# ------------------------------------------------------------------ head


def test_normed_linear_matches_formula():
    head = NormedLinear(16, 5)
    with torch.no_grad():
        head.bias.normal_()
    f = torch.randn(4, 16)
    expected = (f / f.norm(dim=-1, keepdim=True)) @ head.weight.T + head.bias
    assert_close(head(f), expected)


@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e4])
def test_l2norm_head_ignores_feature_scale(scale):
    model, _ = create_model(
        BackboneConfig(model="vit_tiny_patch16_224", pretrained=False, image_size=32), 4
    )
    model.eval()
    feats = _pooled(model, torch.randn(3, 3, 32, 32))
    assert_close(model.head(feats * scale), model.head(feats))


def test_head_init_is_seeded_and_not_zero():
    cfg = BackboneConfig(model="vit_tiny_patch16_224", pretrained=False, image_size=32)
    torch.manual_seed(123)
    a, _ = create_model(cfg, 6)
    torch.manual_seed(123)
    b, _ = create_model(cfg, 6)
    assert torch.equal(a.head.weight, b.head.weight)
    assert a.head.weight.abs().max() <= 0.04 + 1e-7  # truncated at 2 std of 0.02
    assert a.head.weight.std() > 0.01
    assert torch.count_nonzero(a.head.bias) == 0


# ------------------------------------------------------------------ timm names


def test_timm_name_random_init_with_image_size():
    model, spec = create_model(
        BackboneConfig(model="vit_tiny_patch16_224", pretrained=False, image_size=32), 7
    )
    assert isinstance(model, VisionTransformer)
    assert model.pos_embed.shape[1] == 1 + 2 * 2
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert spec.image_size == 32 and spec.interpolation == "bicubic"
    assert len(spec.mean) == 3 and len(spec.std) == 3
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["cls_token", "pos_embed"] and names[-2:] == ["head.weight", "head.bias"]


def test_openai_clip_name_gets_quickgelu():
    name, extra = resolve_timm_name("vit_base_patch16_clip_224.openai")
    assert name == "vit_base_patch16_clip_quickgelu_224.openai" and extra == {}
    assert resolve_timm_name("vit_base_patch16_clip_224.laion2b") == (
        "vit_base_patch16_clip_224.laion2b",
        {},
    )
    assert resolve_timm_name("vit_tiny_patch16_224") == ("vit_tiny_patch16_224", {})


def test_default_clip_config_builds_quickgelu_model():
    model, spec = create_model(BackboneConfig(pretrained=False, image_size=32), 3)
    assert type(model.blocks[0].mlp.act).__name__ == "QuickGELU"
    assert spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        (
            "vit_tiny_patch16_22",
            ValueError,
            "unknown timm model.*did you mean vit_tiny_patch16_224",
        ),
        ("vit_tiny_patch16_224.nope", ValueError, "has no pretrained tag 'nope'"),
        ("resnet18", ValueError, "VisionTransformer models only"),
        ("./no/such/folder", FileNotFoundError, "model folder .* does not exist"),
    ],
)
def test_bad_model_names(name, error, match):
    with pytest.raises(error, match=match):
        create_model(BackboneConfig(model=name, pretrained=False), 2)


def test_download_failure_is_explained(monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ConnectionError, match="could not download .*pass --weights PATH"):
        create_model(BackboneConfig(model="vit_tiny_patch16_224", image_size=32), 2)


# ------------------------------------------------------------------ local weight files


def test_timm_name_with_local_weights_and_pth_container(tmp_path: Path):
    import timm

    src = _perturb(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=9))
    path = tmp_path / "ckpt.pth"
    # a training checkpoint: wrapped, DDP-prefixed, with non-tensor entries
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path
    )
    cfg = BackboneConfig(
        model="vit_tiny_patch16_224", weights=str(path), image_size=32, pretrained=True
    )
    model, _ = create_model(cfg, 2)  # weights given: the hub is never asked
    for k, v in base_state_dict(model).items():
        assert torch.equal(v, src.state_dict()[k]), k


def test_pth_with_python_objects_is_refused(tmp_path: Path):
    path = tmp_path / "pickled.pt"
    torch.save(nn.Linear(2, 2), path)  # a pickled module, not a state dict
    model = _tiny_clip_vit()
    with pytest.raises(ValueError, match="Python objects other than tensors"):
        load_weights(model, path)


def test_missing_and_unsupported_weight_files(tmp_path: Path):
    model = _tiny_clip_vit()
    with pytest.raises(FileNotFoundError, match="weights file .* does not exist"):
        load_weights(model, tmp_path / "absent.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported suffix '.npz'"):
        load_weights(model, tmp_path / "w.npz")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_weights(model, tmp_path / "bad.safetensors")
    cfg = BackboneConfig(model="vit_tiny_patch16_224", weights=str(tmp_path / "x.pth"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model(cfg, 2)


def _card_folder(folder: Path, **kwargs) -> Path:
    kwargs = {
        "img_size": 32,
        "patch_size": 4,
        "embed_dim": 64,
        "depth": 4,
        "num_heads": 2,
        **kwargs,
    }
    card = {"arch": "timm.models.vision_transformer.VisionTransformer", "kwargs": kwargs}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def test_weights_that_do_not_fit(tmp_path: Path):
    folder = _card_folder(tmp_path / "model")
    deeper = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=5, num_heads=2)
    path = tmp_path / "deeper.safetensors"
    save_file(deeper.state_dict(), str(path))
    cfg = BackboneConfig(model=str(folder), weights=str(path))
    with pytest.raises(ValueError, match=r"weights do not fit the model .*unexpected: blocks\.4\."):
        create_model(cfg, 2)
    wider = VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=2)
    save_file(wider.state_dict(), str(path))
    with pytest.raises(ValueError, match=r"weights do not fit .*shape: cls_token \(1, 1, 96\)"):
        create_model(cfg, 2)


def test_folder_without_description(tmp_path: Path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no card.json or config.json"):
        create_model(BackboneConfig(model=str(tmp_path)), 2)


def test_folder_without_weights(tmp_path: Path):
    folder = _card_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no weights file"):
        create_model(BackboneConfig(model=str(folder)), 2)
    model, spec = create_model(BackboneConfig(model=str(folder), pretrained=False), 2)
    assert spec.image_size == 32 and spec.interpolation == "bilinear"


def test_card_with_other_arch_is_refused(tmp_path: Path):
    (tmp_path / "card.json").write_text(json.dumps({"arch": "timm.models.resnet.ResNet"}))
    with pytest.raises(ValueError, match="arch 'timm.models.resnet.ResNet' is not supported"):
        create_model(BackboneConfig(model=str(tmp_path)), 2)


def test_timm_hub_layout_folder(tmp_path: Path):
    args = {"img_size": 32, "patch_size": 8, "depth": 2}
    src = _perturb(
        VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3)
    )
    save_file(src.state_dict(), str(tmp_path / "model.safetensors"))
    config = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": 1000,
        "model_args": args,
        "pretrained_cfg": {
            "mean": [0.1, 0.2, 0.3],
            "std": [0.4, 0.5, 0.6],
            "input_size": [3, 32, 32],
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, spec = create_model(BackboneConfig(model=str(tmp_path)), 4)
    assert spec.mean == (0.1, 0.2, 0.3) and spec.std == (0.4, 0.5, 0.6) and spec.image_size == 32
    for k, v in base_state_dict(model).items():
        assert torch.equal(v, src.state_dict()[k]), k


# ------------------------------------------------------------------ CLIP conversions


def _tiny_hf_clip_vision():
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        hidden_act="quick_gelu",
    )
    return _perturb(transformers.CLIPVisionModel(config)).eval()


def test_hf_clip_conversion_matches_transformers(tmp_path: Path):
    hf = _tiny_hf_clip_vision()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=x).pooler_output

    # CLIPVisionModel keys lost their "vision_model." prefix in transformers 5: test both layouts
    vision = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
    extras = {
        "visual_projection.weight": torch.randn(16, 32),
        "text_model.embeddings.token_embedding.weight": torch.randn(10, 32),
        "text_projection.weight": torch.randn(16, 32),
        "logit_scale": torch.tensor(2.0),
    }
    clip_model = {**{f"vision_model.{k}": v for k, v in vision.items()}, **extras}
    layouts = {
        "flat vision tower": vision,
        "flat with projection": {**vision, "visual_projection.weight": torch.randn(16, 32)},
        "CLIPModel": clip_model,
        "wrapped CLIPModel": {f"model.{k}": v for k, v in clip_model.items()},
    }
    for what, sd in layouts.items():
        vit = _tiny_clip_vit()
        vit.load_state_dict(to_timm_state_dict(sd, vit), strict=True)
        with torch.no_grad():
            assert_close(_pooled(vit, x), expected, msg=lambda m, w=what: f"{w}: {m}")

    # from an exported folder (config.json + model.safetensors) through create_model
    hf.save_pretrained(tmp_path)
    model, spec = create_model(BackboneConfig(model=str(tmp_path)), 3)
    model.eval()
    assert spec.image_size == 32 and spec.interpolation == "bicubic"
    with torch.no_grad():
        assert_close(_pooled(model, x), expected)


def _to_open_clip(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """timm -> OpenCLIP/OpenAI key layout (inverse of timm's converter), plus text-tower keys."""
    swaps = [
        ("patch_embed.proj", "conv1"),
        ("norm_pre", "ln_pre"),
        ("blocks.", "transformer.resblocks."),
        ("attn.qkv.", "attn.in_proj_"),
        ("attn.proj", "attn.out_proj"),
        ("norm1", "ln_1"),
        ("norm2", "ln_2"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
    ]
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("head."):
            continue
        if k == "cls_token":
            out["visual.class_embedding"] = v[0, 0]
        elif k == "pos_embed":
            out["visual.positional_embedding"] = v[0]
        elif k.startswith("norm."):
            out["visual.ln_post." + k.split(".", 1)[1]] = v
        else:
            for a, b in swaps:
                k = k.replace(a, b)
            out["visual." + k] = v
    out["visual.proj"] = torch.randn(model.embed_dim, 16)
    out["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(48, 16)
    out["token_embedding.weight"] = torch.randn(10, 16)
    out["text_projection"] = torch.randn(16, 16)
    out["logit_scale"] = torch.tensor(4.6)
    return out


def test_open_clip_conversion(tmp_path: Path):
    src = _perturb(_tiny_clip_vit())
    path = tmp_path / "open_clip_model.safetensors"
    save_file(_to_open_clip(src), str(path))
    model = _tiny_clip_vit(num_classes=5)
    load_weights(model, path)
    for k, v in base_state_dict(model).items():
        assert torch.equal(v, src.state_dict()[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(_pooled(model, x), _pooled(src, x))

    # a larger input: the 4x4 grid is resampled to 6x6
    bigger = _tiny_clip_vit(num_classes=5, img_size=48)
    load_weights(bigger, path)
    assert bigger.pos_embed.shape == (1, 1 + 36, 32)
    assert torch.equal(bigger.cls_token, src.cls_token)


# ------------------------------------------------------------------ identity


def test_base_state_dict_drops_only_the_head():
    model = _tiny_clip_vit(num_classes=3)
    keys = set(base_state_dict(model))
    assert keys == {k for k in model.state_dict() if not k.startswith("head.")}
    assert "head.weight" not in keys and "cls_token" in keys


def test_hash_backbone_identity():
    torch.manual_seed(0)
    a = _tiny_clip_vit(num_classes=3)
    b = _tiny_clip_vit(num_classes=7)
    b.load_state_dict(
        {**base_state_dict(a), **{k: v for k, v in b.state_dict().items() if k.startswith("head")}}
    )
    h = hash_backbone(a)
    assert len(h) == 64 and h == hash_backbone(a)
    assert hash_backbone(b) == h  # the head is not part of the backbone
    with torch.no_grad():
        a.head.weight.add_(1.0)
    assert hash_backbone(a) == h

    params = dict(a.named_parameters())
    for name, index in [("cls_token", 0), ("blocks.1.mlp.fc2.bias", -1), ("norm.weight", 5)]:
        flat = params[name].data.view(-1)
        old = flat[index].clone()
        flat[index] = torch.nextafter(old, old + 1)  # the smallest possible change
        assert hash_backbone(a) != h, name
        flat[index] = old
        assert hash_backbone(a) == h


def test_hash_sees_through_parametrizations():
    from torch.nn.utils import parametrize

    class AddOne(nn.Module):
        def forward(self, w):
            return w + 1

    model = _tiny_clip_vit()
    h = hash_backbone(model)
    parametrize.register_parametrization(model.blocks[0].attn.qkv, "weight", AddOne())
    assert set(base_state_dict(model)) == set(base_state_dict(_tiny_clip_vit()))
    assert hash_backbone(model) == h


@pytest.mark.slow
def test_dinov2_loads_runs_and_round_trips_a_delta(tmp_path: Path):
    """The realistic backbone of the benchmarks: DINOv2 ViT-S/14 in timm's hub layout."""
    from shpeft.delta import Delta, apply_delta, revert_delta
    from shpeft.methods import PrepareContext, get_method
    from shpeft.methods.configs import ShpeftConfig
    from tests.conftest import SHARED_MODELS

    folder = SHARED_MODELS / "dinov2_vits14"
    if not folder.exists():
        pytest.skip(f"{folder} is absent (it ships beside the project in CI, not in a clone)")
    torch.manual_seed(0)
    model, spec = create_model(BackboneConfig(model=str(folder), image_size=56), num_classes=3)
    assert spec.image_size == 56 and spec.mean == pytest.approx((0.485, 0.456, 0.406))
    assert model.patch_embed.grid_size == (4, 4)
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("head."))
    assert 21_000_000 < n < 22_100_000  # ViT-S/14 (position embedding resampled to 4x4)
    base_hash = hash_backbone(model)
    x = torch.randn(2, 3, 56, 56)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()

    # SH-PEFT at 0.01% on two tiny batches, a step, a delta file, and back onto a fresh base
    batches = [(torch.randn(2, 3, 56, 56), torch.tensor([0, 2])) for _ in range(2)]
    method = get_method("shpeft")(ShpeftConfig(ratio=0.0001))
    trainable = method.prepare(model, PrepareContext(importance_loader=lambda: batches))
    opt = torch.optim.SGD(trainable, lr=0.1)
    torch.nn.functional.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    opt.step()
    assert hash_backbone(model) == base_hash
    delta = method.delta(model)
    delta.meta.update({**method.meta(), "base_hash": base_hash})
    loaded = Delta.load(delta.save(tmp_path / "delta.safetensors"))
    assert loaded.num_sparse == round(0.0001 * n)
    model.eval()
    with torch.no_grad():
        want = model(x)
    fresh, _ = create_model(BackboneConfig(model=str(folder), image_size=56), num_classes=3)
    fresh.eval()
    handle = apply_delta(fresh, loaded, base_hash=hash_backbone(fresh))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=1e-5)
    revert_delta(fresh, loaded, handle)
    assert hash_backbone(fresh) == base_hash
