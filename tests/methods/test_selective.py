"""Selective baselines (FT-LN, BitFit, FT-Att): generic invariants with hand-counted sizes."""

import pytest

from shpeft.methods import PrepareContext, get_method
from tests.helpers import tiny_vit
from tests.methods.common import HEAD_SCALARS, check_method

# tiny_vit: embed D=16, depth 2, MLP hidden 4*D=64, patch 4, 3 input channels, 2 heads, no norm_pre
D, DEPTH, HIDDEN, HEADS = 16, 2, 64, 2


def _trained_names(name: str, model) -> set[str]:
    get_method(name)().prepare(model, PrepareContext())
    return {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")}


def test_ln(tmp_path):
    # norm1 and norm2 in each block plus the final norm, each with a weight and a bias of D
    check_method("ln", expected_backbone=(2 * DEPTH + 1) * 2 * D, tmp_path=tmp_path)


def test_bitfit(tmp_path):
    # patch projection bias D; per block: norm1 D, qkv 3D, proj D, norm2 D, fc1 HIDDEN, fc2 D;
    # final norm D
    per_block = D + 3 * D + D + D + HIDDEN + D
    check_method("bitfit", expected_backbone=D + DEPTH * per_block + D, tmp_path=tmp_path)


def test_attn(tmp_path):
    # per block: qkv weight 3D x D and bias 3D, proj weight D x D and bias D
    expected = DEPTH * (3 * D * D + 3 * D + D * D + D)
    check_method("attn", expected_backbone=expected, tmp_path=tmp_path)


def test_ln_finds_norm_pre_on_clip_style_model():
    names = _trained_names("ln", tiny_vit(pre_norm=True))
    assert {"norm_pre.weight", "norm_pre.bias", "norm.weight", "blocks.1.norm2.bias"} <= names
    assert len(names) == 2 * (2 * DEPTH + 2)  # + norm_pre


def test_ln_selects_by_type_fc_norm_and_qk_norm():
    # average pooling: fc_norm is the LayerNorm and norm is Identity; qk-norm adds two
    # LayerNorms over the head dimension inside each attention
    model = tiny_vit(global_pool="avg", qk_norm=True)
    method = get_method("ln")()
    trainable = method.prepare(model, PrepareContext())
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "fc_norm.weight" in names and "norm.weight" not in names
    assert "blocks.0.attn.q_norm.weight" in names and "blocks.1.attn.k_norm.bias" in names
    per_block = 2 * 2 * D + 2 * 2 * (D // HEADS)
    assert sum(p.numel() for p in trainable) == DEPTH * per_block + 2 * D + HEAD_SCALARS


def test_bitfit_includes_layernorm_biases_and_no_weights():
    names = _trained_names("bitfit", tiny_vit())
    assert "blocks.0.norm1.bias" in names and "norm.bias" in names
    assert "patch_embed.proj.bias" in names
    assert all(n.endswith(".bias") for n in names)


def test_attn_excludes_norm1():
    names = _trained_names("attn", tiny_vit())
    assert "blocks.0.attn.qkv.weight" in names and "blocks.1.attn.proj.bias" in names
    assert not any("norm" in n for n in names)
    assert all(n.startswith("blocks.") and ".attn." in n for n in names)


@pytest.mark.parametrize("name", ["ln", "bitfit", "attn"])
def test_selective_methods_merge_to_the_same_model(name):
    model = tiny_vit()
    method = get_method(name)()
    assert method.mergeable and method.merge(model) is model
