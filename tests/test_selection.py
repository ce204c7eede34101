import pytest
import torch

from shpeft import estimate_importance, select_topk
from shpeft.selection import masks_to_indices
from tests.helpers import tiny_batches, tiny_vit


def brute_force_topk(scores, ratio):
    flat = [
        (float(v), i) for i, v in enumerate(torch.cat([s.reshape(-1) for s in scores.values()]))
    ]
    k = round(ratio * len(flat))
    chosen = {i for _, i in sorted(flat, key=lambda t: (-t[0], t[1]))[:k]}
    return chosen


def as_global(masks):
    return set(
        torch.nonzero(torch.cat([m.reshape(-1) for m in masks.values()])).squeeze(1).tolist()
    )


@pytest.mark.parametrize("strategy", ["l1", "l2"])
@pytest.mark.parametrize("lam", [0.5, 1.0, 1.2])
@pytest.mark.parametrize("ratio", [0.0001, 0.01, 0.1, 0.5])
def test_matches_brute_force(strategy, lam, ratio):
    scores = estimate_importance(tiny_vit(), tiny_batches(2), strategy=strategy, lam=lam)
    masks = select_topk(scores, ratio)
    n = sum(s.numel() for s in scores.values())
    # every ratio here selects at least one scalar (select_topk refuses k = 0)
    assert sum(int(m.sum()) for m in masks.values()) == round(ratio * n)
    assert as_global(masks) == brute_force_topk(scores, ratio)


def test_k_equals_round_ratio_n_and_spans_parameter_types():
    model = tiny_vit()
    scores = estimate_importance(model, tiny_batches(2))
    n = sum(s.numel() for s in scores.values())
    masks = select_topk(scores, 0.1)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * n)
    touched = {name for name, m in masks.items() if m.any()}
    assert any("norm" in t for t in touched)
    assert any(t.endswith("bias") for t in touched)
    assert touched & {"pos_embed", "cls_token", "patch_embed.proj.weight"}


def test_ties_break_by_lowest_global_index():
    scores = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    masks = select_topk(scores, 0.5)  # k = 5 of 10 equal scores: the first five
    assert as_global(masks) == {0, 1, 2, 3, 4}
    scores = {"a": torch.tensor([1.0, 3.0, 2.0, 2.0]), "b": torch.tensor([2.0, 0.0])}
    assert as_global(select_topk(scores, 0.5)) == {1, 2, 3}


def test_bad_ratio():
    scores = {"a": torch.rand(10)}
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            select_topk(scores, bad)
    with pytest.raises(ValueError, match="selects no weight"):
        select_topk(scores, 0.01)
    with pytest.raises(ValueError, match="non-finite"):
        select_topk({"a": torch.tensor([1.0, float("nan")])}, 0.5)


def test_masks_to_indices_sorted_and_drops_empty():
    masks = {
        "a": torch.tensor([[False, True], [True, False]]),
        "b": torch.zeros(3, dtype=torch.bool),
    }
    idx = masks_to_indices(masks)
    assert list(idx) == ["a"] and idx["a"].tolist() == [1, 2]


# --- selection options beyond the paper ----------------------------------------------------


def _random_scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.rand(8, 6, generator=g),
        "b": torch.rand(6, generator=g) * 3,
        "big": torch.rand(4, 10, generator=g) * 10,
    }


def test_forbidden_scalars_are_never_selected_and_k_stays_exact():
    scores = _random_scores()
    forbid = {n: torch.zeros_like(s, dtype=torch.bool) for n, s in scores.items()}
    forbid["big"][:2] = True  # the two best rows are off limits
    n = sum(s.numel() for s in scores.values())
    for ratio in (0.05, 0.2, 0.5):
        masks = select_topk(scores, ratio, forbid=forbid)
        assert sum(int(m.sum()) for m in masks.values()) == round(ratio * n)
        assert not (masks["big"] & forbid["big"]).any()
        # the same as the brute force over the allowed scalars
        masked = {k: torch.where(forbid[k], torch.full_like(s, -1.0), s) for k, s in scores.items()}
        assert as_global(masks) == brute_force_topk(masked, ratio)
    with pytest.raises(ValueError, match="cannot select"):
        select_topk(scores, 0.95, forbid=forbid)


def test_max_density_caps_each_tensor_and_fills_from_the_rest():
    scores = _random_scores()
    masks = select_topk(scores, 0.2, max_density=0.25)
    n = sum(s.numel() for s in scores.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * n)
    assert int(masks["big"].sum()) == 10  # the cap binds where the plain selection piles up
    for name, m in masks.items():
        assert int(m.sum()) <= int(0.25 * scores[name].numel())
    # the capped tensor keeps its own best entries
    big = masks["big"].reshape(-1)
    top = torch.argsort(-scores["big"].reshape(-1), stable=True)[: int(big.sum())]
    assert set(top.tolist()) == set(torch.nonzero(big).squeeze(1).tolist())
    # without a binding cap it is the plain selection
    assert as_global(select_topk(scores, 0.3, max_density=1.0)) == as_global(
        select_topk(scores, 0.3)
    )


def test_per_row_allocation_gives_every_row_its_share():
    from shpeft.selection import select_per_row

    scores = _random_scores()
    n = sum(s.numel() for s in scores.values())
    rows = 8 + 4  # "w" and "big" have rows; the 1-D "b" does not
    for ratio in (0.1, 0.3, 0.6):
        masks = select_per_row(scores, ratio)
        k = round(ratio * n)
        assert sum(int(m.sum()) for m in masks.values()) == k
        per = k // rows
        for name in ("w", "big"):
            counts = masks[name].sum(dim=1)
            assert (counts >= min(per, scores[name].shape[1])).all()
            for r in range(scores[name].shape[0]):  # each row's picks include its own best
                best = torch.argsort(-scores[name][r], stable=True)[: min(per, 6)]
                assert masks[name][r, best].all()
    masks = select_per_row(scores, 5 / n)  # k < rows: the rows with the best single scalar
    assert sum(int(m.sum()) for m in masks.values()) == 5
    assert int(masks["b"].sum()) == 0


def test_selection_options_are_deterministic():
    from shpeft.selection import select_per_row

    a, b = _random_scores(1), _random_scores(1)
    assert as_global(select_per_row(a, 0.2)) == as_global(select_per_row(b, 0.2))
    assert as_global(select_topk(a, 0.2, max_density=0.3)) == as_global(
        select_topk(b, 0.2, max_density=0.3)
    )
