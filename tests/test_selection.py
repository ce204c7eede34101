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
