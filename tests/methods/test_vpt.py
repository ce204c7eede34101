"""VPT-deep / VPT-shallow: generic invariants, prompt placement, pooling, config checks."""

import math

import pytest
import torch

from shpeft.methods import PrepareContext, get_method
from shpeft.methods.vpt import PromptedVisionTransformer, VptConfig
from tests.helpers import tiny_batches, tiny_vit
from tests.methods.common import check_method

D, DEPTH, PATCHES = 16, 2, 16  # tiny_vit: embed 16, depth 2, 16x16 image / patch 4


@pytest.mark.parametrize("tokens", [10, 3])
def test_vpt_deep(tmp_path, tokens):
    check_method(
        "vpt-deep",
        VptConfig(vpt_tokens=tokens),
        expected_backbone=DEPTH * tokens * D,
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("tokens", [10, 3])
def test_vpt_shallow(tmp_path, tokens):
    check_method(
        "vpt-shallow",
        VptConfig(vpt_tokens=tokens),
        expected_backbone=tokens * D,
        tmp_path=tmp_path,
    )


def test_with_dropout(tmp_path):
    check_method(
        "vpt-deep",
        VptConfig(vpt_tokens=2, vpt_dropout=0.1),
        expected_backbone=DEPTH * 2 * D,
        tmp_path=tmp_path,
    )


def _prepared(name, tokens=4, **kw):
    model = tiny_vit(**kw)
    get_method(name)(VptConfig(vpt_tokens=tokens)).prepare(model, PrepareContext())
    model.eval()
    return model


@pytest.mark.parametrize("name, layers", [("vpt-deep", DEPTH), ("vpt-shallow", 1)])
def test_names_shapes_and_init(name, layers):
    base_keys = set(tiny_vit().state_dict())
    model = _prepared(name, tokens=5)
    built = tiny_vit()
    get_method(name)(VptConfig(vpt_tokens=5)).build(built)
    assert set(model.state_dict()) - base_keys == {"vpt.prompts"}
    assert set(built.state_dict()) == set(model.state_dict())
    assert base_keys <= set(model.state_dict())
    assert tuple(model.vpt.prompts.shape) == (layers, 5, D)
    # VPT's xavier bound on the patch dimension: sqrt(6 / (3 * 4 * 4 + 16))
    bound = math.sqrt(6 / (3 * 4 * 4 + D))
    assert float(model.vpt.prompts.detach().abs().max()) <= bound
    assert float(model.vpt.prompts.detach().abs().max()) > bound / 2
    assert isinstance(model, PromptedVisionTransformer)


@pytest.mark.parametrize("name", ["vpt-deep", "vpt-shallow"])
def test_sequence_inside_blocks_grows_by_the_prompts(name):
    model = _prepared(name, tokens=7)
    seen = []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    norm_in = []
    model.norm.register_forward_pre_hook(lambda m, args: norm_in.append(args[0].shape[1]))
    x, _ = tiny_batches(1)[0]
    with torch.no_grad():
        model(x)
    assert seen == [1 + 7 + PATCHES] * DEPTH
    assert norm_in == [1 + PATCHES], "prompts must be dropped before the final norm"


def _manual_features(model, x, deep):
    """VPT written out by hand: [cls, prompts, patches] into each block."""
    t = model.vpt.prompts.shape[1]
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for i, blk in enumerate(model.blocks):
        if i == 0 or deep:
            p = model.vpt.prompts[i if deep else 0].expand(x.shape[0], -1, -1)
            h = torch.cat([h[:, :1], p, h[:, 1 + (t if i else 0) :]], dim=1)
        h = blk(h)
    return h  # (B, 1 + t + patches, D), before the final norm


@pytest.mark.parametrize("name, deep", [("vpt-deep", True), ("vpt-shallow", False)])
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_pooling_matches_a_manual_computation(name, deep, pool):
    model = _prepared(name, tokens=3, global_pool=pool)
    x, _ = tiny_batches(1, seed=4)[0]
    with torch.no_grad():
        h = _manual_features(model, x, deep)
        if pool == "token":
            feat = model.norm(h)[:, 0]
        else:
            # 'avg': patch tokens only, no class token and no prompts (timm's avg-pool ViT uses
            # fc_norm after pooling and an identity norm)
            feat = model.fc_norm(model.norm(h[:, 1 + 3 :]).mean(dim=1))
        want = model.head(feat)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
        # the prompts do change the output (they are not ignored)
        assert not torch.allclose(model(x), tiny_vit(global_pool=pool).eval()(x))


def test_deep_replaces_prompts_at_every_block():
    model = _prepared("vpt-deep", tokens=2)
    second = []
    model.blocks[1].register_forward_pre_hook(lambda m, args: second.append(args[0]))
    x, _ = tiny_batches(1)[0]
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(second[0][:, 1:3], model.vpt.prompts[1].expand(x.shape[0], -1, -1))


def test_register_tokens_stay_in_front():
    model = _prepared("vpt-shallow", tokens=2, reg_tokens=2)
    first = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: first.append(args[0]))
    x, _ = tiny_batches(1)[0]
    with torch.no_grad():
        model(x)
    assert first[0].shape[1] == 1 + 2 + 2 + PATCHES
    torch.testing.assert_close(first[0][:, 3:5], model.vpt.prompts[0].expand(x.shape[0], -1, -1))


def test_refuses_twice_masks_and_other_models():
    model = tiny_vit()
    method = get_method("vpt-shallow")()
    method.build(model)
    with pytest.raises(ValueError, match="already"):
        method.build(model)
    x, _ = tiny_batches(1)[0]
    with pytest.raises(ValueError, match="mask"):
        model.forward_features(x, is_causal=True)
    with pytest.raises(NotImplementedError):
        model.forward_intermediates(x)
    with pytest.raises(ValueError, match="VisionTransformer"):
        method.build(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vpt_tokens": 0}, "vpt_tokens"),
        ({"vpt_tokens": 1.5}, "vpt_tokens"),
        ({"vpt_dropout": 1.0}, "vpt_dropout"),
        ({"vpt_dropout": -0.5}, "vpt_dropout"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VptConfig(**kwargs)
