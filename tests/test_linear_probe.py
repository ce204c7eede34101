"""The linear probe's fitted head is cached like its features: the same fit, read back bit for
bit, and a different C grid or class count is a different entry."""

from __future__ import annotations

import numpy as np

from shpeft.linear_probe import cached_fit


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = g.normal(size=(n, 8)).astype(np.float32) + y[:, None].astype(np.float32)
    return x, y


def test_cached_fit_reads_back_the_same_head(tmp_path):
    train, val = _split(60, 0), _split(30, 1)
    key = {"base_hash": "abc", "ids": "123"}
    cs = (0.01, 0.1, 1.0)
    first, hit = cached_fit(train, val, 3, cs, key, tmp_path)
    assert not hit and len(list(tmp_path.glob("*.fit.npz"))) == 1
    again, hit = cached_fit(train, val, 3, cs, key, tmp_path)
    assert hit
    assert np.array_equal(again["weight"], first["weight"])
    assert np.array_equal(again["bias"], first["bias"])
    assert {k: again[k] for k in ("C", "val_macro_f1", "candidates")} == {
        k: first[k] for k in ("C", "val_macro_f1", "candidates")
    }
    assert not cached_fit(train, val, 3, (0.1, 1.0), key, tmp_path)[1]  # another C grid
    assert not cached_fit(train, val, 4, cs, key, tmp_path)[1]  # another class count
    assert not cached_fit(train, val, 3, cs, {**key, "ids": "456"}, tmp_path)[1]
    assert not cached_fit(train, val, 3, cs, key, None)[1]  # no cache folder: always fitted
