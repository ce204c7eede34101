import torch
import torch.nn.functional as F

from shpeft import estimate_importance, select_topk
from shpeft.selection import masks_to_indices
from shpeft.sparse import attach_sparse, merge_sparse, sparse_state
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
