"""SSF: generic invariants, identity init, exact folding, CLIP-style (bias-free) projection."""

import copy

import pytest
import torch

from shpeft.methods import PrepareContext, get_method
from shpeft.methods.ssf import ScaleShift, SsfConfig, attach_ssf, merge_ssf
from tests.helpers import tiny_batches, tiny_vit
from tests.methods.common import HEAD_SCALARS, check_method

# tiny_vit: embed D=16, depth 2, MLP hidden 4*D=64, patch 4, 3 input channels, no norm_pre
D, DEPTH, HIDDEN = 16, 2, 64
# channels followed by a scale and a shift: patch projection D; per block norm1 D, qkv 3D,
# proj D, norm2 D, fc1 HIDDEN, fc2 D; final norm D
SSF_CHANNELS = D + DEPTH * (D + 3 * D + D + D + HIDDEN + D) + D


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_ssf(tmp_path):
    check_method("ssf", expected_backbone=2 * SSF_CHANNELS, tmp_path=tmp_path, atol=1e-5)


def test_ssf_identity_init(tmp_path):
    check_method(
        "ssf",
        SsfConfig(ssf_init="identity"),
        expected_backbone=2 * SSF_CHANNELS,
        tmp_path=tmp_path,
        atol=1e-5,
    )


def test_identity_init_gives_base_logits_exactly():
    x, _ = tiny_batches(1, seed=3)[0]
    want = _logits(tiny_vit(), x)
    model = tiny_vit()
    get_method("ssf")(SsfConfig(ssf_init="identity")).prepare(model, PrepareContext())
    assert torch.equal(_logits(model, x), want)


def test_ssf_init_is_random_seeded_and_changes_logits():
    x, _ = tiny_batches(1, seed=3)[0]
    base = _logits(tiny_vit(), x)
    params = []
    for _ in range(2):
        model = tiny_vit()
        torch.manual_seed(123)
        params.append([p.detach().clone() for p in attach_ssf(model, "ssf")])
    assert all(torch.equal(a, b) for a, b in zip(*params, strict=True))
    scale = params[0][0]
    assert 0.9 < float(scale.mean()) < 1.1 and 0.005 < float(scale.std()) < 0.05
    assert not torch.allclose(_logits(model, x), base)


def test_merge_folds_a_linear_and_a_layernorm_by_the_formula():
    model = tiny_vit()
    torch.manual_seed(1)
    attach_ssf(model, "ssf")
    qkv, norm = model.blocks[0].attn.qkv, model.blocks[1].norm2
    w, b = qkv.weight.detach().clone(), qkv.bias.detach().clone()
    g, beta = qkv.ssf.scale.detach().clone(), qkv.ssf.shift.detach().clone()
    nw, nb = norm.weight.detach().clone(), norm.bias.detach().clone()
    ng, nbeta = norm.ssf.scale.detach().clone(), norm.ssf.shift.detach().clone()
    merge_ssf(model)
    torch.testing.assert_close(qkv.weight, torch.diag(g) @ w)
    torch.testing.assert_close(qkv.bias, g * b + beta)
    torch.testing.assert_close(norm.weight, ng * nw)
    torch.testing.assert_close(norm.bias, ng * nb + nbeta)


def test_merge_removes_every_hook_and_module():
    model = tiny_vit()
    keys = set(model.state_dict())
    torch.manual_seed(2)
    attach_ssf(model, "ssf")
    x, _ = tiny_batches(1, seed=3)[0]
    want = _logits(model, x)
    merged = merge_ssf(model)
    assert set(merged.state_dict()) == keys
    assert not any(isinstance(m, ScaleShift) for m in merged.modules())
    assert not any(m._forward_hooks for m in merged.modules())
    torch.testing.assert_close(_logits(merged, x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no SSF"):
        merge_ssf(merged)


def test_clip_style_model_scale_only_on_bias_free_projection():
    # pre_norm=True: CLIP layout, a bias-free patch projection followed by norm_pre
    model = tiny_vit(pre_norm=True)
    trainable = get_method("ssf")().prepare(model, PrepareContext())
    proj = model.patch_embed.proj
    assert proj.bias is None and proj.ssf.shift is None
    assert model.norm_pre.ssf.shift is not None
    # the projection gets a scale only; norm_pre a scale and a shift
    assert sum(p.numel() for p in trainable) == 2 * SSF_CHANNELS - D + 2 * D + HEAD_SCALARS
    with torch.no_grad():
        for p in trainable:
            p.add_(0.1 * torch.randn_like(p))
    x, _ = tiny_batches(1, seed=3)[0]
    want = _logits(model, x)
    torch.testing.assert_close(_logits(merge_ssf(model), x), want, rtol=1e-5, atol=1e-5)


def test_prepared_model_deep_copies():
    model = tiny_vit()
    torch.manual_seed(4)
    attach_ssf(model, "ssf")
    x, _ = tiny_batches(1, seed=3)[0]
    clone = copy.deepcopy(model)
    assert torch.equal(_logits(clone, x), _logits(model, x))
    merge_ssf(clone)  # merging the copy leaves the original's hooks alone
    assert isinstance(model.blocks[0].attn.qkv.ssf, ScaleShift)


def test_attach_twice_and_bad_config_refused():
    model = tiny_vit()
    attach_ssf(model)
    with pytest.raises(ValueError, match="already"):
        attach_ssf(model)
    with pytest.raises(ValueError, match="ssf_init"):
        SsfConfig(ssf_init="zeros")
