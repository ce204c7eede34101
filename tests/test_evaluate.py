"""Tests for shpeft.evaluate: metrics against hand computations, prediction mode handling, PNGs."""

from __future__ import annotations

import json
from itertools import product

import numpy as np
import pytest
import torch
from PIL import Image

from shpeft.evaluate import (
    compute_metrics,
    evaluate,
    format_metrics,
    predict,
    save_confusion_matrix_png,
)


def _one_hot_probs(preds: list[int], n_classes: int, confidence: float = 0.8) -> np.ndarray:
    """Probabilities whose argmax is ``preds`` (rows sum to 1)."""
    p = np.full((len(preds), n_classes), (1.0 - confidence) / (n_classes - 1))
    p[np.arange(len(preds)), preds] = confidence
    return p


def _pairwise_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC as P(score_pos > score_neg) + 0.5 P(tie), counted over all pairs (Mann-Whitney)."""
    wins = sum((p > n) + 0.5 * (p == n) for p, n in product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_perfect_predictions_score_one():
    labels = np.array([0, 1, 2, 0, 1, 2])
    m = compute_metrics(labels, _one_hot_probs(labels.tolist(), 3), ["a", "b", "c"])
    assert m["macro_f1"] == pytest.approx(1.0)
    assert m["accuracy"] == pytest.approx(1.0)
    assert m["auc"] == pytest.approx(1.0)
    assert m["n"] == 6
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    for name in "abc":
        assert m["per_class"][name] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert "auc_note" not in m


def test_known_confusion_matrix_matches_hand_computation():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    m = compute_metrics(np.array(labels), _one_hot_probs(preds, 3), ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # By hand: a: P=1/2 R=1/2 F1=1/2; b: P=2/3 R=1 F1=4/5; c: P=1 R=1/2 F1=2/3.
    assert m["per_class"]["a"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["a"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert m["per_class"]["c"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert all(m["per_class"][c]["support"] == 2 for c in "abc")
    json.dumps(m)  # must be serialisable as is


def test_binary_auc_uses_positive_class_probability():
    labels = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    m = compute_metrics(labels, np.stack([1 - p1, p1], axis=1), ["neg", "pos"])
    # Pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4.
    assert m["auc"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx(_pairwise_auc(p1[labels == 1], p1[labels == 0]))


def test_three_class_auc_is_macro_one_vs_rest():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.3, 0.4, 0.3],
            [0.2, 0.5, 0.3],
            [0.5, 0.3, 0.2],
            [0.1, 0.1, 0.8],
            [0.3, 0.35, 0.35],
        ]
    )
    per_class = [_pairwise_auc(probs[labels == c, c], probs[labels != c, c]) for c in range(3)]
    m = compute_metrics(labels, probs, ["x", "y", "z"])
    assert m["auc"] == pytest.approx(np.mean(per_class))
    assert 0.5 < m["auc"] < 1.0


def test_float32_softmax_probabilities_are_accepted():
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(1))
    labels = np.arange(50) % 7
    m = compute_metrics(labels, torch.softmax(logits, 1).numpy(), [str(i) for i in range(7)])
    assert m["auc"] is not None


def test_absent_class_gives_auc_none_with_note():
    labels = np.array([0, 1, 0, 1])
    probs = _one_hot_probs([0, 1, 2, 1], 3)
    m = compute_metrics(labels, probs, ["a", "b", "c"])
    assert m["auc"] is None
    assert "absent" in m["auc_note"] and "[2]" in m["auc_note"]
    assert m["confusion_matrix"] == [[1, 0, 1], [0, 2, 0], [0, 0, 0]]
    assert m["per_class"]["c"]["support"] == 0
    assert m["per_class"]["c"]["f1"] == 0.0
    # The absent class still counts in the macro average (0 F1), it is not dropped.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    json.dumps(m)
    assert "n/a" in format_metrics(m)


def test_binary_with_single_class_present():
    m = compute_metrics(np.array([1, 1, 1]), _one_hot_probs([1, 0, 1], 2), ["neg", "pos"])
    assert m["auc"] is None and "auc_note" in m


def test_invalid_inputs_raise():
    with pytest.raises(ValueError):
        compute_metrics(np.array([0, 1]), np.ones((3, 2)) / 2, ["a", "b"])
    with pytest.raises(ValueError):
        compute_metrics(np.array([0, 5]), np.ones((2, 2)) / 2, ["a", "b"])
    with pytest.raises(ValueError):
        compute_metrics(np.array([], dtype=int), np.ones((0, 2)), ["a", "b"])


class _ModeRecorder(torch.nn.Module):
    """Linear classifier that records the train/eval mode it was called in."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.drop = torch.nn.Dropout(0.5)
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return self.fc(self.drop(x))


def _loader(n: int = 10, bs: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = torch.arange(n) % 3
    # MedMNIST-style (B, 1) labels must be flattened by predict.
    return [(x[i : i + bs], y[i : i + bs, None]) for i in range(0, n, bs)]


@pytest.mark.parametrize("start_training", [True, False])
def test_predict_runs_in_eval_and_restores_mode(start_training):
    model = _ModeRecorder().train(start_training)
    labels, probs = predict(model, _loader(), progress=False)
    assert model.training is start_training
    assert model.seen_training and not any(model.seen_training)
    assert labels.shape == (10,) and labels.dtype == np.int64
    assert probs.shape == (10, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(labels, np.arange(10) % 3)


def test_predict_restores_mode_on_error():
    model = _ModeRecorder().train()
    with pytest.raises(RuntimeError):
        predict(model, [(torch.randn(2, 5), torch.zeros(2))], progress=False)  # wrong width
    assert model.training


def test_predict_empty_loader_raises():
    with pytest.raises(ValueError):
        predict(_ModeRecorder(), [], progress=False)


def test_evaluate_end_to_end_and_format():
    model = _ModeRecorder()
    m = evaluate(model, _loader(), ["a", "b", "c"])
    assert m["n"] == 10 and len(m["confusion_matrix"]) == 3
    text = format_metrics(m)
    assert "macro-F1" in text and "acc" in text and "AUC" in text
    for name in "abc":
        assert any(line.startswith(name) for line in text.splitlines())


@pytest.mark.parametrize("normalize", [False, True])
def test_confusion_matrix_png_is_valid(tmp_path, normalize):
    classes = ["normal", "pneumonia", "a rather long class name", "x"]
    cm = np.array([[5, 1, 0, 0], [2, 7, 1, 0], [0, 0, 9, 1], [0, 0, 0, 0]])
    path = tmp_path / "sub" / "cm.png"
    save_confusion_matrix_png(cm, classes, path, title="test", normalize=normalize)
    assert path.stat().st_size > 5_000
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] > 300 and img.size[1] > 300
        # Not a blank canvas: the heat map and text give many distinct colours.
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10


def test_confusion_matrix_png_rejects_bad_shape(tmp_path):
    with pytest.raises(ValueError):
        save_confusion_matrix_png([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "cm.png")
