import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from shpeft import estimate_importance, select_topk
from shpeft.selection import masks_to_indices
from shpeft.sparse import (
    SparseLinearFunction,
    _owner,
    attach_sparse,
    iter_sparse,
    merge_sparse,
    sparse_state,
)
from tests.helpers import tiny_batches, tiny_vit


def sparse_model(ratio=0.05, seed=0):
    model = tiny_vit(seed=seed)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = select_topk(estimate_importance(model, tiny_batches(2)), ratio)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head"))
    values = attach_sparse(model, masks_to_indices(masks))
    head = [model.head.weight, model.head.bias]
    return model, base, masks, values + head


def train_steps(model, params, steps=5, wd=0.1):
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=wd)
    model.train()
    for x, y in tiny_batches(steps, seed=1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def effective(model):
    return {n: t.detach().clone() for n, t in merge_sparse(model).state_dict().items()}


def test_only_selected_scalars_change_bit_exact():
    model, base, masks, params = sparse_model()
    train_steps(model, params)
    after = effective(model)
    for n, m in masks.items():
        changed = after[n] != base[n]
        assert not (changed & ~m).any(), f"unselected scalars of {n} moved"
        assert torch.equal(after[n][~m], base[n][~m])
    assert sum(int(((after[n] != base[n]) & m).sum()) for n, m in masks.items()) > 0.9 * sum(
        int(m.sum()) for m in masks.values()
    )
    assert not torch.equal(after["head.weight"], base["head.weight"])


def test_optimizer_state_is_o_k():
    model, _, masks, params = sparse_model(ratio=0.01)
    k = sum(int(m.sum()) for m in masks.values())
    head = model.head.weight.numel() + model.head.bias.numel()
    assert sum(p.numel() for p in params) == k + head
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    x, y = tiny_batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    state = sum(s["momentum_buffer"].numel() for s in opt.state.values())
    assert state == k + head
    # tensors without selected scalars get no gradient at all; frozen bases neither
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n


def test_merge_equals_unmerged_logits():
    model, _, _, params = sparse_model()
    train_steps(model, params, steps=3)
    model.eval()
    x, _ = tiny_batches(1, seed=7)[0]
    with torch.no_grad():
        before = model(x)
    state = sparse_state(model)
    merge_sparse(model)
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)
    assert not any("parametrizations" in n for n in model.state_dict())
    plain = tiny_vit()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(x), before)
    assert all(i.dtype == torch.long for i, _ in state.values())


# --- the sampled (SDDMM) backward of nn.Linear weights ----------------------------------------


def _pair(ratio, **kw):
    """The same tiny ViT twice: sampled Linear backward vs the naive dense-then-gather design."""
    fast, naive = tiny_vit(), tiny_vit()
    idx = masks_to_indices(select_topk(estimate_importance(fast, tiny_batches(2)), ratio))
    for m in (fast, naive):
        for n, p in m.named_parameters():
            p.requires_grad_(n.startswith("head"))
    vf = attach_sparse(fast, idx, **kw)
    vn = attach_sparse(naive, idx, sampled_linear=False)
    return fast, naive, vf, vn


@pytest.mark.parametrize("gather_cost", [None, 1e-3, 1e6])  # default / all gathered / all GEMM
@pytest.mark.parametrize("ratio", [0.05, 0.2])
def test_sampled_grads_equal_dense_then_gather(ratio, gather_cost):
    fast, naive, vf, vn = _pair(ratio, gather_cost=gather_cost)
    assert any(u.plan is not None for _, u in iter_sparse(fast))
    x, y = tiny_batches(1, seed=3)[0]
    F.cross_entropy(fast(x), y).backward()
    F.cross_entropy(naive(x), y).backward()
    for a, b in zip(vf, vn, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.head.weight.grad, naive.head.weight.grad)


def test_sampled_training_matches_naive_and_merges_bit_identical():
    fast, naive, vf, vn = _pair(0.05)
    train_steps(fast, vf + [fast.head.weight, fast.head.bias], steps=4)
    train_steps(naive, vn + [naive.head.weight, naive.head.bias], steps=4)
    for (n, (_, a)), (_, (_, b)) in zip(
        sparse_state(fast).items(), sparse_state(naive).items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    # the merged weights are the parametrized ones, bit for bit
    fast.eval()
    x, _ = tiny_batches(1, seed=9)[0]
    with torch.no_grad():
        before = fast(x)
        weights = {n: getattr(*_owner(fast, n)).detach().clone() for n, _ in iter_sparse(fast)}
    merge_sparse(fast)
    for n, w in weights.items():
        assert torch.equal(fast.get_parameter(n), w), n
    assert not any("forward" in m.__dict__ for m in fast.modules())
    with torch.no_grad():
        assert torch.equal(fast(x), before)


def _linear_with_sparse(gather_cost, dtype=torch.float64, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(6, 5, bias=bias).to(dtype)
    # row 1 full (GEMM by row), column 4 crowded (GEMM by column), and scattered entries
    rc = [(1, c) for c in range(6)] + [(r, 4) for r in (0, 2, 3, 4)] + [(0, 0), (3, 2), (4, 5)]
    idx = torch.tensor(sorted(r * 6 + c for r, c in rc))
    named = {"weight": idx}
    if bias:
        named["bias"] = torch.tensor([2])
    lin.requires_grad_(False)
    values = attach_sparse(lin, named, gather_cost=gather_cost)
    return lin, values


def test_plan_uses_rows_columns_and_gathers():
    lin, _ = _linear_with_sparse(gather_cost=4.0)
    plan = lin.parametrizations.weight[0].plan
    assert plan.rows_sel.tolist() == [1]
    assert plan.cols_sel.tolist() == [4]
    assert plan.rest_pos.numel() == 3
    assert plan.rows_pos.numel() + plan.cols_pos.numel() + plan.rest_pos.numel() == plan.k


@pytest.mark.parametrize("gather_cost", [1e-3, 4.0, 1e6])  # all gathered / mixed / all GEMM
def test_sparse_linear_gradcheck_float64(gather_cost):
    lin, values = _linear_with_sparse(gather_cost, bias=False)
    base = lin.parametrizations.weight.original
    update = lin.parametrizations.weight[0]
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    wv = values[0].detach().clone().requires_grad_(True)

    def f(x, wv):
        # W_eff must hold wv for the forward (SparseUpdate.sync_ writes it into the base; here a
        # fresh copy per call, since gradcheck evaluates perturbed inputs between backwards)
        w_eff = base.detach().clone()
        w_eff.view(-1)[update.indices] = wv.detach()
        return SparseLinearFunction.apply(x, w_eff, None, wv, update.plan)

    assert torch.autograd.gradcheck(f, (x, wv), eps=1e-6, atol=1e-6)


def test_sparse_linear_gradient_matches_autograd_of_formula():
    for cost in (1e-3, 4.0, 1e6):
        lin, values = _linear_with_sparse(cost)
        with torch.no_grad():
            for v in values:
                v.add_(torch.randn_like(v))
        x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
        lin(x).square().sum().backward()
        got = [v.grad.clone() for v in values] + [x.grad.clone()]
        # reference: the generic parametrization formula through plain autograd
        base_w = lin.parametrizations.weight.original
        base_b = lin.parametrizations.bias.original
        wv = values[0].detach().clone().requires_grad_(True)
        bv = values[1].detach().clone().requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        w = base_w.reshape(-1).index_put((lin.parametrizations.weight[0].indices,), wv)
        b = base_b.reshape(-1).index_put((lin.parametrizations.bias[0].indices,), bv)
        F.linear(x2, w.view(5, 6), b).square().sum().backward()
        for a, e in zip(got, [wv.grad, bv.grad, x2.grad], strict=True):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


class _DenseWeightGradSpy(TorchDispatchMode):
    """Records the shapes of every matmul output (to prove no dense dW is formed)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.shapes.append(tuple(out.shape))
        return out


def test_no_dense_weight_gradient_is_materialised():
    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    lin.requires_grad_(False)
    idx = torch.randperm(64 * 96)[:61].sort().values  # ~1%, scattered
    (values,) = attach_sparse(lin, {"weight": idx}, gather_cost=64.0)
    plan = lin.parametrizations.weight[0].plan
    # partial GEMMs over a few crowded rows / columns at most, never all of them
    assert plan.rows_sel.numel() < 96 and plan.cols_sel.numel() < 64 and plan.rest_pos.numel()
    x = torch.randn(32, 64, requires_grad=True)
    out = lin(x).sum()
    with _DenseWeightGradSpy() as spy:
        out.backward()
    assert (96, 64) not in spy.shapes and (64, 96) not in spy.shapes, spy.shapes
    assert values.grad is not None and lin.parametrizations.weight.original.grad is None
    want = (torch.ones(32, 96).t() @ x.detach()).reshape(-1)[idx]
    torch.testing.assert_close(values.grad, want)


def test_cache_tracks_value_and_base_changes():
    lin, values = _linear_with_sparse(4.0, dtype=torch.float32)
    x = torch.randn(3, 6)
    base = lin.parametrizations.weight.original
    with torch.no_grad():
        values[0].add_(1.0)  # an optimizer step
        got = lin(x)
        want = F.linear(x, lin.weight, lin.bias)  # generic formula
    assert torch.equal(got, want)
    # gradient accumulation: two forwards, one backward (the cache must not be rewritten)
    loss = lin(x).sum() + lin(x).sum()
    loss.backward()
    assert values[0].grad is not None
    # a state-dict load that resets the base tensor is picked up too
    with torch.no_grad():
        base.zero_()
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    # the frozen entries of the base are never touched by the cache writes
    mask = torch.zeros(base.numel(), dtype=torch.bool)
    mask[lin.parametrizations.weight[0].indices] = True
    assert torch.equal(base.view(-1)[~mask], torch.zeros(int((~mask).sum())))


def test_deepcopy_and_bf16_autocast():
    fast, naive, vf, vn = _pair(0.05)
    clone = copy.deepcopy(fast)
    qkv = clone.blocks[0].attn.qkv
    if "forward" in qkv.__dict__:
        assert qkv.forward.__self__ is qkv
    x, y = tiny_batches(1, seed=4)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_f = F.cross_entropy(fast(x), y)
        loss_n = F.cross_entropy(naive(x), y)
    loss_f.backward()
    loss_n.backward()
    for a, b in zip(vf, vn, strict=True):
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, b.grad, rtol=0.1, atol=2e-2)


@pytest.mark.parametrize("gather_cost", [1e-3, 4.0, 1e6])
def test_saves_only_the_input_columns_it_needs(gather_cost):
    torch.manual_seed(0)
    lin = nn.Linear(12, 5).double()
    lin.requires_grad_(False)
    rc = [(1, 1), (1, 4), (1, 9), (0, 4), (2, 4), (3, 4), (4, 4), (3, 9), (0, 1)]
    idx = torch.tensor(sorted(r * 12 + c for r, c in rc))
    (values,) = attach_sparse(lin, {"weight": idx}, gather_cost=gather_cost)
    plan = lin.parametrizations.weight[0].plan
    assert plan.subset and plan.x_cols.tolist() == [1, 4, 9]
    with torch.no_grad():
        values.add_(torch.randn_like(values))
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    out = lin(x)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    assert any(t.shape == (7, 3) for t in saved)  # 3 of 12 input columns kept for backward
    out.square().sum().backward()
    wv = values.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w = lin.parametrizations.weight.original.reshape(-1).index_put((idx,), wv).view(5, 12)
    F.linear(x2, w, lin.bias).square().sum().backward()
    torch.testing.assert_close(values.grad, wv.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)


def test_trained_attached_model_still_hashes_as_its_base():
    """Regression: the sampled Linear path caches W_eff in the base tensor; the base hash of a
    trained, still-attached model must remain the pretrained one (every kind of tensor)."""
    from shpeft.backbones import hash_backbone

    pretrained = hash_backbone(tiny_vit())
    model, base, masks, params = sparse_model(ratio=0.2)
    touched = {n for n, m in masks.items() if m.any()}
    # the selection reaches a sampled-path Linear weight and a top-level tensor
    assert any(n.endswith("qkv.weight") or n.endswith("fc1.weight") for n in touched)
    assert {"pos_embed", "cls_token"} & touched
    assert hash_backbone(model) == pretrained
    train_steps(model, params)
    model(tiny_batches(1)[0][0])  # a forward writes the trained values into the cache
    assert hash_backbone(model) == pretrained
    assert hash_backbone(merge_sparse(model)) != pretrained  # the merged model is not the base
