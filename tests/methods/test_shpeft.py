"""SH-PEFT: the paper's selection and the options beyond it, through the generic method checks."""

import json
from dataclasses import replace

import pytest
import torch

from shpeft.importance import importance_terms, structural_zeros
from shpeft.methods import PrepareContext, get_method
from shpeft.methods.shpeft import ShpeftConfig
from tests.helpers import tiny_batches, tiny_vit
from tests.methods.common import backbone_scalars, check_method


def test_shpeft(tmp_path):
    n = backbone_scalars(tiny_vit())
    for ratio in (0.0005, 0.01, 0.2):
        check_method(
            "shpeft",
            ShpeftConfig(ratio=ratio),
            expected_backbone=round(ratio * n),
            tmp_path=tmp_path,
        )


OPTIONS = [
    {"zero_grad": "skip"},
    {"zero_grad": "skip", "mix": "tensor"},
    {"zero_grad": "skip", "mix": "rank"},
    {"zero_grad": "skip", "allocation": "row"},
    {"zero_grad": "skip", "density_cap": 3},
    {"strategy": "ta", "zero_grad": "skip"},
    {"strategy": "td-l2", "zero_grad": "skip", "mix": "tensor"},
    {"zero_grad": "skip", "step_scale": "rms"},
]


@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
def test_every_selection_option_keeps_the_method_invariants(options, tmp_path):
    n = backbone_scalars(tiny_vit())
    check_method(
        "shpeft",
        ShpeftConfig(ratio=0.1, **options),
        expected_backbone=round(0.1 * n),  # k stays exact whatever the option
        tmp_path=tmp_path,
    )


def pretrained_like_vit():
    """tiny_vit with non-zero qkv biases, as a pretrained ViT has (timm initialises them to 0)."""
    model = tiny_vit()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.bias.copy_(torch.randn(block.attn.qkv.bias.shape, generator=g))
    return model


def _prepare(config: ShpeftConfig):
    model = pretrained_like_vit()
    ctx = PrepareContext(importance_loader=lambda: tiny_batches(2), device="cpu")
    method = get_method("shpeft")(config)
    method.prepare(model, ctx)
    indices = method.state(model)
    return model, ctx.artifacts["selection"], indices


def test_key_biases_are_never_selected_under_the_structural_zero_rule():
    """With a budget big enough to reach them, the paper's rule spends k on the key biases
    (large |b| makes the magnitude term pick them); the structural-zero rule never does."""
    zeros = structural_zeros(importance_terms(pretrained_like_vit(), tiny_batches(2)).grad_sq)
    dim = tiny_vit().embed_dim
    key = {n: m for n, m in zeros.items() if m.any()}
    assert key and all(n.endswith("attn.qkv.bias") for n in key)
    _, paper, _ = _prepare(ShpeftConfig(ratio=0.3))
    _, skip, skip_idx = _prepare(ShpeftConfig(ratio=0.3, zero_grad="skip"))
    assert paper["zero_grad_selected"] > 0 and skip["zero_grad_selected"] == 0
    for n in key:
        picked = skip_idx.get(n, torch.empty(0, dtype=torch.long))
        assert not ((picked >= dim) & (picked < 2 * dim)).any(), n
    assert skip["k"] == paper["k"] == round(0.3 * backbone_scalars(tiny_vit()))


def test_selection_is_deterministic_for_every_option():
    for options in OPTIONS:
        a = _prepare(ShpeftConfig(ratio=0.1, **options))[2]
        b = _prepare(ShpeftConfig(ratio=0.1, **options))[2]
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), options


def test_selection_summary_adds_up():
    model, summary, indices = _prepare(ShpeftConfig(ratio=0.1))
    k = summary["k"]
    assert k == sum(int(i.numel()) for i in indices.values())
    for group in ("per_kind", "per_block", "per_tensor"):
        assert sum(g["selected"] for g in summary[group].values()) == k, group
        assert sum(g["size"] for g in summary[group].values()) == summary["eligible"], group
    share = summary["term_share_selected"]
    assert share["td"] + share["ta"] == pytest.approx(1.0)
    json.dumps(summary)  # written to selection.json


def test_rms_step_scale_gives_each_selected_tensor_its_relative_lr():
    from shpeft.methods.shpeft import tensor_rms_scales
    from shpeft.sparse import iter_sparse

    model = pretrained_like_vit()
    want = tensor_rms_scales(model)
    method = get_method("shpeft")(ShpeftConfig(ratio=0.3, step_scale="rms"))
    method.prepare(model, PrepareContext(importance_loader=lambda: tiny_batches(2)))
    scales = method.lr_scales(model)
    updates = dict(iter_sparse(model))
    assert len(scales) == len(updates) > 3
    for name, u in updates.items():
        assert scales[id(u.values)] == want[name]
    # LayerNorm scales (weights ~1) get far larger steps than the matrix weights (~0.02)
    assert want["blocks.0.norm1.weight"] > 10 * want["blocks.0.mlp.fc1.weight"]
    assert min(want.values()) >= 0.1  # zero-initialised tensors still move
    plain = get_method("shpeft")(ShpeftConfig(ratio=0.3))
    plain.prepare(pretrained_like_vit(), PrepareContext(importance_loader=lambda: tiny_batches(2)))
    assert plain.lr_scales(model) == {}


def test_bad_option_values_are_refused():
    with pytest.raises(ValueError, match="zero_grad"):
        ShpeftConfig(zero_grad="drop")
    with pytest.raises(ValueError, match="mix"):
        ShpeftConfig(mix="bogus")
    with pytest.raises(ValueError, match="density_cap"):
        ShpeftConfig(density_cap=0.5)
    with pytest.raises(ValueError, match="allocation='global' only"):
        ShpeftConfig(allocation="row", density_cap=5)


def test_importance_on_augmented_batches_sees_what_the_augmentation_gives_it():
    """``importance_augment="train"`` estimates on the run's augmentation of each batch: with an
    augmentation that flips every image, the selection is the one made on flipped images."""
    cfg = ShpeftConfig(ratio=0.1, zero_grad="skip", mix="rank", importance_augment="train")
    plain_cfg = replace(cfg, importance_augment="none")
    calls = []

    def flip_all(x, i):
        calls.append(i)
        return x.flip(-1)

    def select(config, batches, augment=None):
        model, method = pretrained_like_vit(), get_method("shpeft")(config)
        method.prepare(model, PrepareContext(lambda: batches, importance_augment=augment))
        return method.state(model)

    got = select(cfg, tiny_batches(2), flip_all)
    assert calls == [0, 1]
    want = select(plain_cfg, [(x.flip(-1), y) for x, y in tiny_batches(2)])
    plain = select(plain_cfg, tiny_batches(2))
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)
    assert got.keys() != plain.keys() or any(not torch.equal(got[n], plain[n]) for n in got)
    with pytest.raises(ValueError, match="needs the run's augmentation"):
        select(cfg, tiny_batches(2))
    with pytest.raises(ValueError, match="importance_augment"):
        ShpeftConfig(importance_augment="mixup")
