import pytest
import torch
import torch.nn.functional as F

from shpeft import estimate_importance
from shpeft.importance import importance_scale
from tests.helpers import tiny_batches, tiny_vit


def brute_force(model, batches, strategy, lam):
    """Independent float64 computation of paper eq. 1 through .grad and loss.backward()."""
    model.eval()
    names = [n for n, _ in model.named_parameters() if not n.startswith("head")]
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n in names:
            g = params[n].grad.double()
            acc[n] += g * g if strategy == "l2" else g
    td = {n: acc[n] if strategy == "l2" else acc[n].abs() for n in names}
    ta = {
        n: params[n].detach().double() ** 2
        if strategy == "l2"
        else params[n].detach().double().abs()
        for n in names
    }
    s = sum(t.sum() for t in td.values()) / sum(t.sum() for t in ta.values())
    return {n: td[n] + lam * s * ta[n] for n in names}


@pytest.mark.parametrize("strategy", ["l1", "l2"])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 1.5])
def test_matches_brute_force(strategy, lam):
    model, batches = tiny_vit(), tiny_batches()
    got = estimate_importance(model, batches, strategy=strategy, lam=lam)
    want = brute_force(model, batches, strategy, lam)
    assert list(got) == list(want)  # every backbone parameter, in named_parameters order, no head
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-4, atol=1e-9)


def test_all_parameter_kinds_are_eligible_and_head_excluded():
    model = tiny_vit()
    scores = estimate_importance(model, tiny_batches(1))
    for n in (
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.bias",
        "norm.bias",
    ):
        assert n in scores
    assert not any(n.startswith("head") for n in scores)
    assert all(
        s.dtype == torch.float32 and s.shape == p.shape
        for (n, p) in tiny_vit().named_parameters()
        if n in scores
        for s in [scores[n]]
    )


def test_num_batches_caps_the_loader_and_is_deterministic():
    model, batches = tiny_vit(), tiny_batches(4)
    capped = estimate_importance(model, batches, num_batches=2)
    first_two = estimate_importance(model, batches[:2])
    again = estimate_importance(model, batches, num_batches=2)
    for n in capped:
        assert torch.equal(capped[n], first_two[n])
        assert torch.equal(capped[n], again[n])


def test_leaves_model_untouched():
    model = tiny_vit()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.head.weight.requires_grad_(False)
    estimate_importance(model, tiny_batches(2))
    assert model.training and not model.head.weight.requires_grad
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


def test_task_agnostic_and_task_dependent_only():
    model, batches = tiny_vit(), tiny_batches(2)
    ta = estimate_importance(model, batches, strategy="ta")
    for n, p in model.named_parameters():
        if n in ta:
            assert torch.equal(ta[n], p.detach().abs())
    td = estimate_importance(model, batches, strategy="td-l2")
    hybrid0 = estimate_importance(model, batches, strategy="l2", lam=0.0)
    for n in td:
        assert torch.equal(td[n], hybrid0[n])


def test_scale_balances_the_two_terms():
    # With s = sum(td)/sum(ta), both terms contribute the same total mass at lambda = 1.
    model, batches = tiny_vit(), tiny_batches(2)
    td = estimate_importance(model, batches, strategy="td-l2")
    hybrid = estimate_importance(model, batches, strategy="l2", lam=1.0)
    total_td = float(sum(t.double().sum() for t in td.values()))
    total = float(sum(t.double().sum() for t in hybrid.values()))
    assert total == pytest.approx(2 * total_td, rel=1e-5)
    ta = {n: p.detach() ** 2 for n, p in model.named_parameters() if n in td}
    assert importance_scale(td, ta) > 0


def test_bad_arguments():
    model = tiny_vit()
    with pytest.raises(ValueError, match="strategy"):
        estimate_importance(model, tiny_batches(1), strategy="l3")
    with pytest.raises(ValueError, match="no batches"):
        estimate_importance(model, [])
    with pytest.raises(ValueError, match="lam"):
        estimate_importance(model, tiny_batches(1), lam=-1)


# --- structural zeros and term mixing (issue: selection beyond the paper) -----------------


def test_key_biases_are_structural_zeros_and_nothing_else_is():
    """Adding a constant to every key shifts each query's logits by one constant, which softmax
    ignores: the key third of every qkv.bias gets a gradient that is zero in exact arithmetic,
    rounding noise in float32. The rule finds exactly those, from the gradients alone."""
    from shpeft.importance import importance_terms, structural_zeros

    model = tiny_vit()
    terms = importance_terms(model, tiny_batches(2), strategy="l2")
    zeros = structural_zeros(terms.grad_sq)
    dim = model.embed_dim
    for name, mask in zeros.items():
        if name.endswith("attn.qkv.bias"):
            want = torch.zeros(3 * dim, dtype=torch.bool)
            want[dim : 2 * dim] = True
            assert torch.equal(mask, want), name
            # rounding noise, not an exact zero, and far below the q/v parts
            g = terms.grad_sq[name].sqrt()
            assert g[dim : 2 * dim].max() < 1e-5 * g[2 * dim :].max()
        else:
            assert not mask.any(), name


def test_structural_zero_rule_is_the_same_under_l1():
    from shpeft.importance import importance_terms, structural_zeros

    model, batches = tiny_vit(), tiny_batches(2)
    a = structural_zeros(importance_terms(model, batches, strategy="l2").grad_sq)
    b = structural_zeros(importance_terms(model, batches, strategy="l1").grad_sq)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_unused_parameter_is_all_structural_zeros():
    from shpeft.importance import importance_terms, structural_zeros

    model = tiny_vit()
    model.unused = torch.nn.Parameter(torch.ones(5))  # registered, never used by forward
    zeros = structural_zeros(importance_terms(model, tiny_batches(1)).grad_sq)
    assert zeros["unused"].all()


@pytest.mark.parametrize("mix", ["paper", "tensor", "rank"])
def test_term_parts_add_up_and_paper_mix_is_eq1(mix):
    from shpeft.importance import combine_terms, importance_terms, term_parts

    model, batches = tiny_vit(), tiny_batches(2)
    terms = importance_terms(model, batches, strategy="l2")
    td, ta = term_parts(terms, "l2", 0.7, mix)
    scores = combine_terms(terms, "l2", 0.7, mix)
    for n in scores:
        torch.testing.assert_close(scores[n], td[n] + ta[n])
    if mix == "paper":
        want = estimate_importance(model, batches, strategy="l2", lam=0.7)
        for n in want:
            torch.testing.assert_close(scores[n], want[n])
    if mix == "tensor":  # every tensor's parts average 1 and lam
        for n in td:
            if terms.td[n].sum() > 0:
                assert abs(float(td[n].double().mean()) - 1) < 1e-4
            if terms.ta[n].sum() > 0:  # zero-initialised biases have no magnitude at all
                assert abs(float(ta[n].double().mean()) - 0.7) < 1e-4
    if mix == "rank":  # quantiles in [0, 1]; the largest td gets 1
        flat = torch.cat([t.reshape(-1) for t in td.values()])
        assert float(flat.min()) == 0.0 and float(flat.max()) == 1.0


def test_rank_quantiles_match_brute_force():
    from shpeft.importance import _quantiles

    t = {"a": torch.tensor([3.0, 1.0, 3.0]), "b": torch.tensor([[2.0, 0.0]])}
    q = _quantiles(t)
    # values 0,1,2,3,3: strictly-below counts 0,1,2,3,3 over N - 1 = 4
    assert q["a"].tolist() == [0.75, 0.25, 0.75]
    assert q["b"].tolist() == [[0.5, 0.0]]
