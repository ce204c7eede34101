"""Flat switch deltas: the same weights as ``apply_delta``, reverted bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

import shpeft.serve.switch as switch_mod
from shpeft.delta import Delta, apply_delta
from shpeft.serve.switch import FlatTensors, Switch
from tests.helpers import tiny_vit


def random_delta(model: torch.nn.Module, seed: int) -> Delta:
    """Sparse entries in every other tensor, whole tensors in the rest (small and large)."""
    g = torch.Generator().manual_seed(seed)
    delta = Delta()
    for i, (name, p) in enumerate(model.named_parameters()):
        if i % 2:
            delta.dense[name] = torch.randn(p.shape, generator=g)
        else:
            k = max(1, p.numel() // 7)
            idx = torch.randperm(p.numel(), generator=g)[:k].sort().values.to(torch.int32)
            delta.sparse[name] = (idx, torch.randn(k, generator=g))
    return delta


@pytest.mark.parametrize("dense_as_index", [0, 64, 1 << 16])  # slices, mixed, all ranges
def test_switch_writes_what_apply_delta_writes_and_reverts_exactly(monkeypatch, dense_as_index):
    monkeypatch.setattr(switch_mod, "DENSE_AS_INDEX", dense_as_index)
    model = tiny_vit()
    reference = copy.deepcopy(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    flat = FlatTensors(model)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())
    params = dict(model.named_parameters())
    switches = [Switch(random_delta(model, seed), params, flat) for seed in range(3)]
    x = torch.randn(2, 3, 16, 16)
    for turn in [0, 1, 2, 1, 0, 2, 2]:
        handle = switches[turn].apply()
        want = copy.deepcopy(reference)
        apply_delta(want, random_delta(reference, turn))
        for n, t in model.state_dict().items():
            assert torch.equal(t, want.state_dict()[n]), n
        with torch.no_grad():
            assert torch.equal(model(x), want(x))
        switches[turn].revert(handle)
        for n, t in model.state_dict().items():
            assert torch.equal(t, before[n]), n


def test_switch_costs_its_delta_bytes():
    model = tiny_vit()
    flat = FlatTensors(model)
    delta = random_delta(model, 0)
    switch = Switch(delta, dict(model.named_parameters()), flat)
    held = sum(t.nbytes for t in switch.tensors())
    stored = sum(t.nbytes for t in delta.tensors().values())
    per_range = 16  # one int64 start and one length per whole tensor
    assert held <= stored + per_range * len(delta.dense)
    assert switch.k == delta.num_sparse + delta.num_dense
