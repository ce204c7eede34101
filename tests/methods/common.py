"""Generic invariants every PEFT method must satisfy (the peft test-matrix idea, on a tiny ViT).

A method's test file calls :func:`check_method` with its config and a hand count of the backbone
scalars it should train. The checks:

1. ``prepare`` returns exactly the trainable parameters (hand count; head counted apart);
2. a few SGD steps (momentum and weight decay on) change nothing outside what the method trains:
   every base tensor the delta does not name is bit-identical to the pretrained one;
3. the delta holds exactly what was trained (scalar count) and round-trips through a file bit for
   bit; re-building a fresh base + ``build`` + ``apply_delta`` reproduces the trained logits;
4. mergeable methods merge into a plain model with the base's state-dict keys and the same logits;
   the others refuse to merge with a clear ``ValueError``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shpeft.delta import Delta, apply_delta
from shpeft.methods import PrepareContext, get_method
from tests.helpers import tiny_batches, tiny_vit

HEAD_SCALARS = 16 * 3 + 3  # tiny_vit: embed 16, 3 classes


def backbone_scalars(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))


def _train_steps(model, params, steps: int = 3) -> None:
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
    model.train()
    for x, y in tiny_batches(steps, seed=11):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def check_method(
    name: str, config=None, *, expected_backbone: int | None, tmp_path, atol: float = 0.0
):
    cls = get_method(name)
    method = cls(config)
    model = tiny_vit()
    base = {n: t.detach().clone() for n, t in model.state_dict().items()}
    ctx = PrepareContext(importance_loader=lambda: tiny_batches(2), device="cpu")
    trainable = method.prepare(model, ctx)

    # 1. trainable parameters: exactly the ones with requires_grad, counted by hand
    assert len({id(p) for p in trainable}) == len(trainable), "a parameter is listed twice"
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters() if p.requires_grad}
    n_head = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("head.") and p.requires_grad
    )
    assert n_head == HEAD_SCALARS, "the head must always train"
    n_trainable = sum(p.numel() for p in trainable)
    if expected_backbone is not None:
        assert n_trainable - n_head == expected_backbone

    # 2. a few steps; 3. the delta is exactly what trains and reproduces the model
    _train_steps(model, trainable)
    delta = method.delta(model)
    assert delta.num_sparse + delta.num_dense == n_trainable
    delta.meta.update(method.meta())
    loaded = Delta.load(delta.save(tmp_path / f"{name}.safetensors"))
    for k, t in delta.tensors().items():
        assert torch.equal(loaded.tensors()[k], t), k

    x, _ = tiny_batches(1, seed=5)[0]
    model.eval()
    with torch.no_grad():
        want = model(x)
    fresh = tiny_vit()
    method2 = cls(config)
    method2.build(fresh)
    apply_delta(fresh, loaded)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=atol)

    # nothing outside the delta moved: compare the rebuilt model's base tensors with the base
    named = set(loaded.sparse) | set(loaded.dense)
    state = fresh.state_dict()
    for n, t in base.items():
        if n not in named and n in state:
            assert torch.equal(state[n], t), f"{n} changed but is not in the delta"

    # 4. merge
    if cls.mergeable:
        merged = method2.merge(fresh)
        assert set(merged.state_dict()) == set(base), "merged model must have the base's keys"
        plain = tiny_vit()
        plain.load_state_dict(merged.state_dict())
        plain.eval()
        with torch.no_grad():
            torch.testing.assert_close(
                plain(x), want, rtol=1e-5 if atol else 0, atol=max(atol, 1e-6) if atol else 0
            )
    else:
        with pytest.raises(ValueError, match="cannot be folded"):
            method2.merge(fresh)
    return model, trainable, delta
