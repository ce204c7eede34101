"""Calibration of a classifier's confidence: reliability bins and expected calibration error.

Confidence is the top-class probability; the ``n_bins`` equal-width bins are right-closed,
``((m-1)/M, m/M]`` (a confidence of exactly 0 falls in the first). Per bin, accuracy is the share
of its samples whose top class is the true one, and

    ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|

(Naeini, Cooper, Hauskrecht, AAAI 2015; the reliability diagram and binning of Guo, Pleiss, Sun,
Weinberger, "On Calibration of Modern Neural Networks", ICML 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_BINS = 10


@dataclass(frozen=True)
class Reliability:
    """Per-bin statistics of a reliability diagram (empty bins have count 0 and NaN means)."""

    edges: np.ndarray  # (M + 1,)
    count: np.ndarray  # (M,) int
    accuracy: np.ndarray  # (M,) mean correctness per bin
    confidence: np.ndarray  # (M,) mean confidence per bin
    ece: float

    @property
    def n_bins(self) -> int:
        return len(self.count)


def reliability(labels: np.ndarray, probs: np.ndarray, n_bins: int = DEFAULT_BINS) -> Reliability:
    """Bin the top-class confidence of ``probs`` (N, C) against ``labels`` (N,).

    Raises:
        ValueError: Empty input, mismatched shapes or ``n_bins < 1``.
    """
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if probs.ndim != 2 or probs.shape[0] != len(labels) or len(labels) == 0:
        raise ValueError(
            f"need probs (N, C) and labels (N,) with N > 0, got {probs.shape}, {labels.shape}"
        )
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right-closed bins (edges[m-1], edges[m]]: a confidence equal to an edge is in the bin below
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
    filled = count > 0
    ece = float(np.sum(count[filled] / len(labels) * np.abs(acc[filled] - mean_conf[filled])))
    return Reliability(edges, count, acc, mean_conf, ece)


def expected_calibration_error(
    labels: np.ndarray, probs: np.ndarray, n_bins: int = DEFAULT_BINS
) -> float:
    """ECE of top-class confidence with ``n_bins`` equal-width bins (see the module docstring)."""
    return reliability(labels, probs, n_bins).ece
