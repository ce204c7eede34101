"""AdaptFormer: generic invariants, zero-init identity, the parallel formula, config checks."""

import pytest
import torch

from shpeft.methods import PrepareContext, get_method
from shpeft.methods.adapter import AdapterConfig, AdaptFormerBlock
from tests.helpers import tiny_batches, tiny_vit
from tests.methods.common import check_method

D, DEPTH = 16, 2  # tiny_vit


def adapter_scalars(r: int) -> int:
    return DEPTH * (D * r + r + r * D + D)  # down (weight + bias) + up (weight + bias)


@pytest.mark.parametrize(
    "config",
    [AdapterConfig(), AdapterConfig(adapter_dim=3, adapter_input="residual", adapter_dropout=0.1)],
)
def test_adapter(tmp_path, config):
    check_method(
        "adapter", config, expected_backbone=adapter_scalars(config.adapter_dim), tmp_path=tmp_path
    )


def test_names_and_structure_are_stable():
    base = tiny_vit()
    base_keys = set(base.state_dict())
    prepared, built = tiny_vit(), tiny_vit()
    get_method("adapter")().prepare(prepared, PrepareContext())
    get_method("adapter")().build(built)
    shapes = {n: tuple(p.shape) for n, p in prepared.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in built.named_parameters()}
    added = set(prepared.state_dict()) - base_keys
    assert base_keys <= set(prepared.state_dict()), "base tensors must keep their names"
    assert added == {
        f"blocks.{i}.adapter.{lin}.{kind}"
        for i in range(DEPTH)
        for lin in ("down", "up")
        for kind in ("weight", "bias")
    }
    assert shapes["blocks.0.adapter.down.weight"] == (8, D)
    assert shapes["blocks.0.adapter.up.weight"] == (D, 8)
    assert all(isinstance(b, AdaptFormerBlock) for b in prepared.blocks)


@pytest.mark.parametrize("adapter_input", ["norm", "residual"])
def test_initial_function_is_the_pretrained_one(adapter_input):
    x, _ = tiny_batches(1, seed=3)[0]
    base, model = tiny_vit(), tiny_vit()
    get_method("adapter")(AdapterConfig(adapter_input=adapter_input)).prepare(
        model, PrepareContext()
    )
    base.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    for blk in model.blocks:
        assert torch.count_nonzero(blk.adapter.up.weight) == 0
        assert torch.count_nonzero(blk.adapter.down.weight) > 0


@pytest.mark.parametrize("adapter_input", ["norm", "residual"])
def test_block_computes_the_parallel_formula(adapter_input):
    cfg = AdapterConfig(adapter_dim=4, adapter_scale=0.3, adapter_input=adapter_input)
    model = tiny_vit()
    get_method("adapter")(cfg).build(model)
    blk = model.blocks[1]
    torch.manual_seed(1)
    with torch.no_grad():
        for p in blk.adapter.parameters():
            p.normal_()
    model.eval()
    x = torch.randn(2, 17, D)
    with torch.no_grad():
        h = x + blk.attn(blk.norm1(x))
        a_in = blk.norm2(h) if adapter_input == "norm" else h
        adapter = blk.adapter.up(torch.relu(blk.adapter.down(a_in)))
        want = h + blk.mlp(blk.norm2(h)) + 0.3 * adapter
        torch.testing.assert_close(blk(x), want)


def test_only_adapters_and_head_get_gradients():
    model = tiny_vit()
    trainable = get_method("adapter")().prepare(model, PrepareContext())
    x, y = tiny_batches(1)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None}
    assert names == {n for n, p in model.named_parameters() if ".adapter." in n or "head" in n}
    assert len(trainable) == 4 * DEPTH + 2


def test_refuses_twice_and_other_models():
    model = tiny_vit()
    method = get_method("adapter")()
    method.build(model)
    with pytest.raises(ValueError, match="already"):
        method.build(model)
    with pytest.raises(ValueError, match="VisionTransformer"):
        method.build(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"adapter_dim": 0}, "adapter_dim"),
        ({"adapter_dim": 2.5}, "adapter_dim"),
        ({"adapter_scale": float("nan")}, "adapter_scale"),
        ({"adapter_dropout": 1.0}, "adapter_dropout"),
        ({"adapter_dropout": -0.1}, "adapter_dropout"),
        ({"adapter_input": "ln"}, "adapter_input"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(**kwargs)
