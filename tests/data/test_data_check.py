"""`shpeft data check` (check_dataset / run_check) and the cheap pre-training leakage check."""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from shpeft.data import (
    DataConfig,
    DataError,
    add_check_arguments,
    check_dataset,
    check_leakage_cheap,
    load_data,
    run_check,
)
from shpeft.data.check import centred_correlation, dhash, hamming_pairs, thumbnail

SIZE = 16
MEAN = STD = (0.5, 0.5, 0.5)


def smooth(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> Path:
    """A smooth image (so a perceptual hash is meaningful), content set by ``seed``."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    coarse.resize(size, Image.Resampling.BICUBIC).save(path)
    return path


def lookalike(seed: int, size: int = 64) -> np.ndarray:
    """One shared layout (a ramp with two dark ovals) plus a faint pattern set by ``seed``: a
    stand-in for chest X-rays, which all look alike at thumbnail size."""
    y, x = np.mgrid[0:size, 0:size] / size
    ovals = sum(np.exp(-((x - cx) ** 2 / 0.02 + (y - 0.5) ** 2 / 0.08)) for cx in (0.3, 0.7))
    rng = np.random.default_rng(seed)
    own = Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8))
    own = np.asarray(own.resize((size, size), Image.Resampling.BICUBIC), np.float32) - 128
    return np.clip(60 + 150 * x - 100 * ovals + 0.06 * own, 0, 255).astype(np.uint8)


def edited_copy(src: Path, dst: Path) -> Path:
    """``src`` brightened, shrunk to 3/4 and re-encoded as JPEG."""
    with Image.open(src) as im:
        w, h = im.size
        im = ImageEnhance.Brightness(im.convert("RGB")).enhance(1.15)
        im.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.BILINEAR).save(dst, quality=85)
    return dst


def folder(root: Path, counts: dict[str, int], start: int = 0) -> Path:
    seed = start
    for cls, n in counts.items():
        for i in range(n):
            smooth(root / cls / f"{cls}_{i}.png", seed)
            seed += 1
    return root


def check(path: Path, **kw):
    kw.setdefault("progress", False)
    return check_dataset(path, **kw)


def cli(path: Path, *extra: str) -> tuple[int, str]:
    args = add_check_arguments(argparse.ArgumentParser()).parse_args(
        [str(path), "--no-progress", *extra]
    )
    out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        code = run_check(args)
    return code, out.getvalue()


# ---------------------------------------------------------------------------- hashing


def test_dhash_is_robust_to_brightening_and_jpeg(tmp_path: Path) -> None:
    a = smooth(tmp_path / "a.png", 1, (64, 48))
    with Image.open(a) as im:
        ImageEnhance.Brightness(im).enhance(1.15).save(tmp_path / "b.jpg", quality=80)
    h = [dhash(np.asarray(Image.open(p).convert("RGB"))) for p in (a, tmp_path / "b.jpg")]
    other = dhash(np.asarray(Image.open(smooth(tmp_path / "c.png", 2, (64, 48))).convert("RGB")))
    assert bin(h[0] ^ h[1]).count("1") <= 4
    assert bin(h[0] ^ other).count("1") > 10


def test_hamming_pairs_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 50, dtype=np.uint64)
    hashes = np.concatenate([base, base[:10] ^ np.uint64(0b1011)])  # 3 bits flipped
    i, j, d = hamming_pairs(hashes, 3, block=7)
    brute = {
        (a, b)
        for a in range(len(hashes))
        for b in range(a + 1, len(hashes))
        if bin(int(hashes[a]) ^ int(hashes[b])).count("1") <= 3
    }
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == brute
    assert len(brute) >= 10 and d.max() <= 3


def test_centred_correlation_separates_lookalikes_from_copies(tmp_path: Path) -> None:
    images = [lookalike(seed) for seed in range(12)]
    thumbs = np.stack([thumbnail(im) for im in images])
    template = thumbs[2:].mean(0)
    raw = float(thumbs[0] @ thumbs[1])
    assert raw > 0.97  # two different images the plain correlation cannot tell apart
    assert centred_correlation(thumbs[0], thumbs[1], template) < 0.7
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    with Image.open(edited_copy(tmp_path / "a.png", tmp_path / "b.jpg")) as im:
        copy = thumbnail(np.asarray(im.convert("RGB")))
    assert centred_correlation(thumbs[0], copy, template) > 0.97
    # batched, and zero (not nan) where a deviation vanishes
    both = centred_correlation(
        np.stack([thumbs[0], template]), np.stack([copy, thumbs[1]]), template
    )
    assert both.shape == (2,) and both[1] == 0.0 and both[0] > 0.97


# ---------------------------------------------------------------------------- check_dataset


def test_clean_set_passes(tmp_path: Path) -> None:
    report = check(folder(tmp_path / "ds", {"a": 8, "b": 7}))
    assert report.ok and report.exit_code == 0, report.errors
    assert report.counts["train"]["a"] + report.counts["val"]["a"] + report.counts["test"]["a"] == 8
    assert report.sizes["width"] == {"min": 40, "median": 40.0, "max": 40}
    assert report.modes == {"RGB": 15} and report.file_types == {".png": 15}
    assert not report.exact_duplicates and not report.near_duplicates


def test_duplicates_unreadable_and_exit_codes(tmp_path: Path) -> None:
    root = folder(tmp_path / "ds", {"a": 8, "b": 8})
    shutil.copy(root / "a" / "a_0.png", root / "a" / "copy_of_a0.png")  # exact, within class
    with Image.open(root / "a" / "a_1.png") as im:  # near copy in the other class
        ImageEnhance.Brightness(im).enhance(1.1).save(root / "b" / "b_near.jpg", quality=85)
    (root / "a" / "broken.png").write_bytes((root / "a" / "a_2.png").read_bytes()[:60])

    report = check(root)
    assert [u["id"] for u in report.unreadable] == ["a/broken.png"]
    assert "broken.png" in report.unreadable[0]["error"]
    (group,) = report.exact_duplicates
    assert {m["id"] for m in group["members"]} == {"a/a_0.png", "a/copy_of_a0.png"}
    assert not group["label_conflict"] and not group["leakage"]
    near = [
        p
        for p in report.near_duplicates
        if {p["a"]["id"], p["b"]["id"]} == {"a/a_1.png", "b/b_near.jpg"}
    ]
    assert near and near[0]["label_conflict"]
    assert report.exit_code == 1 and any("unreadable" in e for e in report.errors)
    assert any("exact duplicate group(s) within a class" in w for w in report.warnings)
    assert any("near-duplicate" in w for w in report.warnings)
    text = report.format_text()
    assert "a/broken.png" in text and "LABEL CONFLICT" in text and "result: FAILED" in text

    (root / "a" / "broken.png").unlink()
    code, out = cli(root)
    assert code == 0 and "result: OK" in out


def test_lookalikes_are_not_near_duplicates_but_an_edited_copy_is(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for seed in range(20):
        cls = "a" if seed < 10 else "b"
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(lookalike(seed)).save(root / cls / f"{cls}_{seed}.png")
    edited_copy(root / "a" / "a_3.png", root / "b" / "copy_of_a3.jpg")

    old = check(root, near_centred_correlation=-1.0)  # the plain thumbnail correlation alone
    assert old.near_duplicate_pairs > 100
    report = check(root)
    (pair,) = report.near_duplicates
    assert {pair["a"]["id"], pair["b"]["id"]} == {"a/a_3.png", "b/copy_of_a3.jpg"}
    assert pair["label_conflict"] and pair["centred_correlation"] > 0.97
    assert report.near_rejected_pairs == old.near_duplicate_pairs - 1
    assert "rc=" in report.format_text() and "not flagged" in report.format_text()


def test_exact_label_conflict_is_an_error_unless_allowed(tmp_path: Path) -> None:
    root = folder(tmp_path / "ds", {"a": 6, "b": 6})
    shutil.copy(root / "a" / "a_0.png", root / "b" / "same_as_a0.png")
    report = check(root)
    assert report.exit_code == 1 and "label conflict" in report.errors[0]
    (group,) = report.exact_duplicates
    assert group["label_conflict"] and not group["leakage"]  # the split keeps them together
    assert len({m["split"] for m in group["members"]}) == 1
    assert check(root, allow_label_conflicts=True).exit_code == 0


def test_leakage_across_official_splits(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    folder(root / "train", {"a": 5, "b": 5})
    folder(root / "test", {"a": 2, "b": 2}, start=50)
    shutil.copy(root / "train" / "a" / "a_3.png", root / "test" / "a" / "leak.png")
    report = check(root)
    assert report.exit_code == 1 and "leakage" in report.errors[0]
    assert report.exact_duplicates[0]["leakage"]
    code, out = cli(root, "--allow-leakage")
    assert code == 0 and "[LEAKAGE]" in out


def test_imbalance_single_class_and_empty_class(tmp_path: Path) -> None:
    report = check(folder(tmp_path / "imb", {"big": 12, "small": 2}))
    assert report.imbalance["flagged"] and report.imbalance["ratio"] == 6.0
    assert any("imbalance" in w for w in report.warnings)
    assert any("fewer than 3" in w for w in report.warnings)

    single = check(folder(tmp_path / "one", {"only": 4}))
    assert single.exit_code == 1 and any("at least two" in e for e in single.errors)

    root = folder(tmp_path / "empty", {"a": 3, "b": 3})
    (root / "c").mkdir()
    empty = check(root)
    assert empty.exit_code == 1 and "class folder" in empty.errors[0] and "/c" in empty.errors[0]


def test_manifest_with_missing_files_is_one_clear_error(tmp_path: Path) -> None:
    smooth(tmp_path / "x.png", 0)
    (tmp_path / "m.csv").write_text("path,label\nx.png,a\nmissing.png,b\n")
    code, out = cli(tmp_path / "m.csv")
    assert code == 1 and "missing.png" in out and "line 3" in out


def test_json_report_is_written_atomically(tmp_path: Path) -> None:
    root = folder(tmp_path / "ds", {"a": 4, "b": 4})
    out = tmp_path / "reports" / "check.json"
    code, _ = cli(root, "--json", str(out))
    data = json.loads(out.read_text())
    assert code == 0 and data["ok"] and data["counts"] and data["settings"]["near_threshold"] == 6
    assert data["settings"]["near_centred_correlation"] == 0.93
    code, _ = cli(root, "--json", str(out), "--near-centred-correlation", "0.5")
    assert json.loads(out.read_text())["settings"]["near_centred_correlation"] == 0.5
    assert [p.name for p in out.parent.iterdir()] == ["check.json"]  # no temporary file left


def test_npz_check(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    test = np.concatenate([train[:1], rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)])
    path = tmp_path / "breastmnist.npz"
    np.savez(
        path,
        train_images=train,
        train_labels=np.array([0, 1] * 3)[:, None],
        test_images=test,
        test_labels=np.array([[1], [0], [1]]),
    )
    report = check(path)
    assert report.format == "medmnist" and report.modes == {"array-L": 9}
    assert report.exact_duplicates[0]["leakage"] and report.exact_duplicates[0]["label_conflict"]
    assert report.split_kind == {
        "train": "official",
        "val": "seeded-stratified",
        "test": "official",
    }


def test_real_busi_256_duplicate_is_found(shared_data: Path) -> None:
    report = check(shared_data / "busi_256")
    assert report.total == 780 and report.exit_code == 1
    conflict = [g for g in report.exact_duplicates if g["label_conflict"]]
    assert {m["id"] for m in conflict[0]["members"]} == {
        "benign/benign (433).png",
        "malignant/malignant (145).png",
    }
    # Frames of one scan under two labels, judged the same scene by eye (see
    # benchmarks/results/data_check/labels.csv), stay flagged as label conflicts.
    near = {frozenset((p["a"]["id"], p["b"]["id"])): p for p in report.near_duplicates}
    for a, b in [("benign (42)", "malignant (51)"), ("benign (406)", "malignant (94)")]:
        pair = near[frozenset((f"benign/{a}.png", f"malignant/{b}.png"))]
        assert pair["label_conflict"]
    assert report.near_duplicate_pairs > 150


CXR3 = "cxr3/chest_xray"
# Pairs the plain thumbnail correlation flagged (r >= 0.97, dHash <= 2) that are different
# children by eye: the example and two of the labelled sample.
CXR3_DIFFERENT = [
    ("train/PNEUMONIA/person1070_virus_1773.jpeg", "test/NORMAL/NORMAL2-IM-0232-0001.jpeg"),
    ("train/PNEUMONIA/person1399_bacteria_3549.jpeg", "test/NORMAL/NORMAL2-IM-0196-0001.jpeg"),
    ("train/PNEUMONIA/person1609_virus_2790.jpeg", "train/PNEUMONIA/person911_virus_1567.jpeg"),
]
CXR3_EXACT = [
    ("train/NORMAL/NORMAL2-IM-0587-0001-0001.jpeg", "train/NORMAL/NORMAL2-IM-0587-0001-0002.jpeg"),
    ("train/PNEUMONIA/person124_virus_246.jpeg", "train/PNEUMONIA/person124_virus_247.jpeg"),
]


def test_real_cxr3_lookalikes_are_not_flagged_copies_are(shared_data: Path, tmp_path: Path) -> None:
    """CXR3's official test split (624 images, the mean the centring needs) plus pairs from the
    train split, as a manifest: different children stay unflagged, copies are found."""
    root = shared_data / CXR3
    extra = {p for pair in CXR3_DIFFERENT + CXR3_EXACT for p in pair if p.startswith("train/")}
    files = sorted((root / "test").rglob("*.jpeg")) + [root / p for p in sorted(extra)]
    copy = edited_copy(root / "test/NORMAL/NORMAL2-IM-0232-0001.jpeg", tmp_path / "copy.jpg")
    rows = ["path,label,split"] + [
        f"{f},{f.parent.name},{f.relative_to(root).parts[0]}" for f in files
    ]
    rows.append(f"{copy},PNEUMONIA,train")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")

    report = check(tmp_path / "m.csv")
    assert report.total == len(files) + 1
    flagged = [{p["a"]["id"], p["b"]["id"]} for p in report.near_duplicates]
    for a, b in CXR3_DIFFERENT:
        assert {str(root / a), str(root / b)} not in flagged
    assert {str(root / "test/NORMAL/NORMAL2-IM-0232-0001.jpeg"), str(copy)} in flagged
    exact = [{m["id"] for m in g["members"]} for g in report.exact_duplicates]
    for a, b in CXR3_EXACT:
        assert {str(root / a), str(root / b)} in exact

    old = check(tmp_path / "m.csv", near_centred_correlation=-1.0)
    flagged_old = [{p["a"]["id"], p["b"]["id"]} for p in old.near_duplicates]
    assert all({str(root / a), str(root / b)} in flagged_old for a, b in CXR3_DIFFERENT)


@pytest.mark.slow
def test_real_cxr3_full_check(shared_data: Path) -> None:
    report = check(shared_data / "cxr3")
    assert report.total == 5856 and report.ok
    assert len(report.exact_duplicates) == 30  # all within a class and split
    assert report.near_duplicate_pairs == 0 and report.near_rejected_pairs > 400


# ---------------------------------------------------------------------------- cheap leakage check


def _load(path: Path, **cfg):
    return load_data(DataConfig(str(path), **cfg), image_size=SIZE, mean=MEAN, std=STD)


@pytest.mark.parametrize("cache", ["no", "yes"])
def test_cheap_check_refuses_leakage_unless_allowed(tmp_path: Path, cache: str) -> None:
    root = tmp_path / "ds"
    folder(root / "train", {"a": 5, "b": 5})
    folder(root / "val", {"a": 2, "b": 2}, start=50)
    folder(root / "test", {"a": 2, "b": 2}, start=60)
    shutil.copy(root / "train" / "b" / "b_1.png", root / "test" / "a" / "leak.png")
    bundle = _load(root, cache=cache)
    with pytest.raises(
        DataError, match=r"train 'train/b/b_1\.png' \(b\) = test 'test/a/leak\.png'"
    ):
        check_leakage_cheap(bundle)
    with pytest.warns(UserWarning, match="leakage allowed"):
        messages = check_leakage_cheap(bundle, allow_leakage=True)
    assert len(messages) == 1
    assert bundle.split_record["leakage_check"]["train_test_duplicates"] == 1


@pytest.mark.parametrize("cache", ["no", "yes"])
def test_seeded_split_keeps_duplicates_together(tmp_path: Path, cache: str) -> None:
    root = folder(tmp_path / "ds", {"a": 10, "b": 10})
    for k in range(3):  # several cross-class copies: at least one would straddle splits
        shutil.copy(root / "a" / f"a_{k}.png", root / "b" / f"copy_{k}.png")
    bundle = _load(root, cache=cache)
    assert check_leakage_cheap(bundle) == []
    grouping = bundle.split_record["grouping"]
    assert grouping["duplicate_groups"] == 3
    assert grouping["duplicates_by"] == ("resized pixels" if cache == "yes" else "file bytes")
    assert bundle.split_record["leakage_check"]["train_test_duplicates"] == 0


def test_real_busi_256_default_split_is_trainable(shared_data: Path) -> None:
    bundle = load_data(DataConfig(str(shared_data / "busi_256")), image_size=32, mean=MEAN, std=STD)
    assert bundle.train.cached  # cache built once over the pool, then sliced
    assert check_leakage_cheap(bundle) == []
    where = {
        i: s
        for s, d in (("train", bundle.train), ("val", bundle.val), ("test", bundle.test))
        for i in d.ids
    }
    assert where["benign/benign (433).png"] == where["malignant/malignant (145).png"]


def test_allow_leakage_config_field() -> None:
    assert DataConfig("x").allow_leakage is False
    with pytest.raises(ValueError, match="allow_leakage"):
        DataConfig("x", allow_leakage="yes")  # type: ignore[arg-type]
