"""Linear-probe warm start of the head: logistic regression on the frozen backbone's features.

The paper's head (L2-normalised feature, then a linear layer) starts random and is trained by SGD
with the backbone for 40k iterations. Its logits are bounded by the head's norm, so in a short
schedule plain SGD never fits it and every method is judged on an unfitted head. The warm start
fits the head first, for every method alike, as LP-FT does (Kumar et al., "Fine-Tuning can
Distort Pretrained Features and Underperform Out-of-Distribution", ICLR 2022): features of the
training split at the pretrained weights, scikit-learn's ``LogisticRegression`` for each C of a
grid, C chosen by validation macro F1 (the test split is never read), and its solution written
into the head. Methods then start from the linear probe's optimum.

Features depend only on the backbone, the input pipeline and the samples, so they can be cached
on disk and shared by every run of a benchmark grid (``feature_cache``); so does the fitted head,
which depends only on those features, the classes and the C grid (the fit over the C grid is the
larger cost on a big training split: minutes on CXR3's 4,708 images).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shpeft.progress import progress_bar

log = logging.getLogger("shpeft")

#: Inverse regularisation strengths tried (half-decade steps), for features scaled to unit RMS
#: per dimension (see :func:`fit_logistic`).
DEFAULT_CS: tuple[float, ...] = tuple(float(10**e) for e in np.arange(-4.0, 2.01, 0.5))
FEATURE_VERSION = 1  # bump when the feature definition changes (invalidates caches)
FIT_VERSION = 1  # bump when fit_logistic changes (invalidates the cached heads)


@torch.no_grad()
def head_features(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    amp: torch.dtype | None = None,
    normalize: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The head's input for every sample (``forward_head(..., pre_logits=True)``), in order.

    ``normalize`` L2-normalises them, as the paper's ``l2norm`` head does before its linear layer.
    Returns float32 ``(N, D)`` features and int64 ``(N,)`` labels.
    """
    from torch.utils.data import DataLoader

    was_training = model.training
    model.eval()
    feats, labels = [], []
    device = torch.device(device)
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for x, y in progress_bar(loader, desc="features", enabled=progress, leave=False):
            ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
            with ctx:
                f = model.forward_head(model.forward_features(x.to(device)), pre_logits=True)
            f = f.float()
            if normalize:
                f = torch.nn.functional.normalize(f, dim=-1, eps=1e-12)
            feats.append(f.cpu().numpy())
            labels.append(torch.as_tensor(y).reshape(-1).numpy().astype(np.int64))
    finally:
        model.train(was_training)
    return np.concatenate(feats), np.concatenate(labels)


def fit_logistic(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    num_classes: int,
    cs: Sequence[float] = DEFAULT_CS,
) -> dict[str, Any]:
    """Logistic regression for each C; the best validation macro F1 wins (ties: smaller C).

    Without a validation split the geometric middle of the grid is used.

    Returns:
        ``{"weight": (K, D) float32, "bias": (K,) float32, "C": float, "val_macro_f1": float
        | None, "candidates": [{"C", "val_macro_f1"}]}``: ``weight``/``bias`` give the same class
        probabilities as the fitted model, for two classes too (sklearn fits one logit there).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    x, y = train
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError("the linear probe needs at least two classes in the training split")
    # One global scale (not per-feature standardisation, which would change the model class of
    # the normalised head): unit RMS per dimension conditions L-BFGS far better than features
    # of norm 1; the fitted weights are scaled back below.
    scale = 1.0 / max(float(np.sqrt(np.mean(x.astype(np.float64) ** 2))), 1e-12)
    candidates: list[dict[str, Any]] = []
    best: tuple[np.ndarray, np.ndarray, np.ndarray, float | None, float] | None = None
    grid = sorted(cs) if val is not None else [float(np.sqrt(min(cs) * max(cs)))]
    # ascending C, each fit starting from the previous solution (a regularisation path)
    clf = LogisticRegression(max_iter=1000, tol=1e-5, warm_start=True)
    for c in grid:
        clf.set_params(C=float(c))
        with _quiet_convergence():
            clf.fit(x * scale, y)
        f1 = None
        if val is not None:
            pred = clf.predict(val[0] * scale)
            f1 = float(
                f1_score(val[1], pred, average="macro", labels=list(range(num_classes)),
                         zero_division=0)
            )  # fmt: skip
        candidates.append({"C": float(c), "val_macro_f1": f1})
        if best is None or (f1 is not None and best[3] is not None and f1 > best[3]):
            best = (clf.coef_.copy(), clf.intercept_.copy(), clf.classes_.copy(), f1, float(c))
    assert best is not None
    coef_raw, intercept, classes_, f1, c = best
    coef = coef_raw * scale
    weight = np.zeros((num_classes, x.shape[1]), dtype=np.float64)
    bias = np.zeros(num_classes, dtype=np.float64)
    if len(classes_) == 2:
        # one logit z for class_1 vs class_0: softmax([-z/2, z/2]) == sigmoid(z)
        a, b = (int(k) for k in classes_)
        weight[a], weight[b] = -coef[0] / 2, coef[0] / 2
        bias[a], bias[b] = -intercept[0] / 2, intercept[0] / 2
    else:
        for row, k in enumerate(classes_):
            weight[int(k)], bias[int(k)] = coef[row], intercept[row]
    missing = sorted(set(range(num_classes)) - {int(k) for k in classes_})
    for k in missing:  # a class absent from train can never win
        bias[k] = -1e4
    return {
        "weight": weight.astype(np.float32),
        "bias": bias.astype(np.float32),
        "C": c,
        "val_macro_f1": f1,
        "candidates": candidates,
    }


@contextlib.contextmanager
def _quiet_convergence():
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def feature_key(parts: dict[str, Any]) -> str:
    """A stable hash of what determines the features (see :func:`warm_start_head`)."""
    text = json.dumps({**parts, "feature_version": FEATURE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _load_cached(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path) as z:
            return z["features"], z["labels"]
    except (OSError, ValueError, KeyError):
        return None


def _save_cached(path: Path, feats: np.ndarray, labels: np.ndarray) -> None:
    from shpeft.io_utils import atomic_write

    atomic_write(path, lambda f: np.savez(f, features=feats, labels=labels))


def cached_features(
    model: nn.Module,
    dataset,
    key_parts: dict[str, Any],
    cache_dir: str | os.PathLike | None,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """:func:`head_features`, read from / written to ``cache_dir`` when given.

    Returns ``(features, labels, from_cache)``.
    """
    path = None
    if cache_dir:
        path = Path(cache_dir) / f"{feature_key(key_parts)}.npz"
        hit = _load_cached(path) if path.is_file() else None
        if hit is not None and len(hit[1]) == len(dataset):
            return hit[0], hit[1], True
    feats, labels = head_features(model, dataset, **kwargs)
    if path is not None:
        _save_cached(path, feats, labels)
    return feats, labels, False


def cached_fit(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    num_classes: int,
    cs: Sequence[float],
    key_parts: dict[str, Any],
    cache_dir: str | os.PathLike | None,
) -> tuple[dict[str, Any], bool]:
    """:func:`fit_logistic`, read from / written to ``cache_dir`` when given, keyed by what the
    features depend on plus the classes and the C grid. Returns ``(fit, from_cache)``."""
    path = None
    if cache_dir:
        key = feature_key(
            {**key_parts, "fit": FIT_VERSION, "cs": [float(c) for c in cs],
             "num_classes": num_classes, "val": val is not None,
             "n": [len(train[1]), len(val[1]) if val is not None else 0]}
        )  # fmt: skip
        path = Path(cache_dir) / f"{key}.fit.npz"
        try:
            with np.load(path) as z:
                record = json.loads(str(z["record"]))
                return {**record, "weight": z["weight"], "bias": z["bias"]}, True
        except (OSError, ValueError, KeyError):
            pass
    fit = fit_logistic(train, val, num_classes, cs)
    if path is not None:
        from shpeft.io_utils import atomic_write

        record = json.dumps({k: v for k, v in fit.items() if k not in ("weight", "bias")})
        atomic_write(
            path, lambda f: np.savez(f, weight=fit["weight"], bias=fit["bias"], record=record)
        )
    return fit, False


def warm_start_head(
    model: nn.Module,
    train_set,
    val_set,
    num_classes: int,
    *,
    normalize: bool,
    key_parts: dict[str, Any],
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    amp: torch.dtype | None = None,
    progress: bool = False,
    cs: Sequence[float] = DEFAULT_CS,
) -> dict[str, Any]:
    """Fit ``model.head`` by logistic regression on the frozen features (see the module doc).

    ``key_parts`` must identify everything the features depend on besides the split name (base
    weights hash, input spec, data source, sample ids, precision): it keys the cache.

    Returns a JSON-able record: chosen C, validation macro F1 per C, seconds, cache hits.
    """
    t0 = time.perf_counter()
    common = dict(batch_size=batch_size, device=device, amp=amp, normalize=normalize,
                  progress=progress)  # fmt: skip
    tr = cached_features(model, train_set, {**key_parts, "split": "train"}, cache_dir, **common)
    va = (
        cached_features(model, val_set, {**key_parts, "split": "val"}, cache_dir, **common)
        if val_set is not None
        else None
    )
    t_feat = time.perf_counter() - t0
    fit, fit_hit = cached_fit(tr[:2], va[:2] if va else None, num_classes, cs, key_parts, cache_dir)
    head = model.head
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(fit["weight"]))
        if head.bias is not None:
            head.bias.copy_(torch.from_numpy(fit["bias"]))
    record = {
        "head_init": "linear-probe",
        "C": fit["C"],
        "val_macro_f1": fit["val_macro_f1"],
        "candidates": fit["candidates"],
        "features_s": t_feat,
        "fit_s": time.perf_counter() - t0 - t_feat,
        "feature_cache_hits": int(tr[2]) + int(bool(va and va[2])),
        "fit_from_cache": fit_hit,
        "n_train": len(tr[1]),
        "n_val": len(va[1]) if va else 0,
    }
    log.info(
        "linear-probe head: C=%g, validation macro F1 %.4f (features %.1f s)",
        fit["C"], fit["val_macro_f1"] or float("nan"), t_feat,
    )  # fmt: skip
    return record
