"""load_data / load_eval_data / list_images over generated sources."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from shpeft.data import (
    DataBundle,
    DataConfig,
    DataError,
    ImageFileDataset,
    list_images,
    load_data,
    load_eval_data,
)

SIZE = 16
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def load(data: Path | str, **cfg) -> DataBundle:
    cfg.setdefault("cache", "no")
    return load_data(DataConfig(str(data), **cfg), image_size=SIZE, mean=MEAN, std=STD)


def split_ids(bundle: DataBundle) -> dict[str, list[str]]:
    return {
        name: list(ds.ids)
        for name, ds in (("train", bundle.train), ("val", bundle.val), ("test", bundle.test))
        if ds is not None
    }


def check_item(ds, index: int = 0) -> None:
    x, y = ds[index]
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y < len(ds.classes)


# ---------------------------------------------------------------------------- ImageFolder


def test_flat_folder_split_and_record(tmp_path: Path, make_folder) -> None:
    root = make_folder(tmp_path / "ds", {"b": 30, "a": 20, "c": 10})
    bundle = load(root)
    assert bundle.classes == ["a", "b", "c"] and bundle.num_classes == 3
    ids = split_ids(bundle)
    every = [i for part in ids.values() for i in part]
    assert len(every) == len(set(every)) == 60  # disjoint, covering
    assert all(i.count("/") == 1 for i in every)  # "<class>/<file>" relative ids
    for ds in (bundle.train, bundle.val, bundle.test):
        check_item(ds)
        # Each split holds every class (stratified; every class has >= 3 samples).
        assert set(ds.labels.tolist()) == {0, 1, 2}
        for sample_id, label in zip(ds.ids, ds.labels, strict=True):
            assert sample_id.split("/")[0] == bundle.classes[label]
    rec = bundle.split_record
    json.dumps(rec)  # serialisable
    assert rec["format"] == "imagefolder" and rec["seed"] == 0 and not rec["official_split"]
    assert rec["splits"]["test"]["ids"] == ids["test"]
    assert sum(rec["sizes"].values()) == 60


def test_split_is_deterministic_and_seed_dependent(tmp_path: Path, make_folder) -> None:
    root = make_folder(tmp_path / "ds", {"a": 25, "b": 25})
    first, again, other = load(root), load(root), load(root, split_seed=1)
    assert split_ids(first) == split_ids(again)
    assert split_ids(first) != split_ids(other)
    assert {k: len(v) for k, v in split_ids(first).items()} == {
        k: len(v) for k, v in split_ids(other).items()
    }


def test_record_replays_the_split(tmp_path: Path, make_folder) -> None:
    root = make_folder(tmp_path / "ds", {"a": 25, "b": 15})
    bundle = load(root, split_seed=5)
    record_file = tmp_path / "split.json"
    record_file.write_text(json.dumps(bundle.split_record))
    # A different seed and fractions: the record wins.
    replay = load(root, split_seed=9, test_fraction=0.5, split_file=str(record_file))
    assert split_ids(replay) == split_ids(bundle)
    assert replay.split_record["splits"] == bundle.split_record["splits"]

    # A file that has gone missing since the record was made is an error.
    gone = bundle.split_record["splits"]["test"]["ids"][0]
    (root / gone).unlink()
    with pytest.raises(DataError, match="absent"):
        load(root, split_file=str(record_file))


def test_masks_hidden_and_non_images_are_skipped(tmp_path: Path, make_folder, write_png) -> None:
    root = make_folder(tmp_path / "ds", {"a": 4, "b": 4})
    write_png(root / "a" / "a_000_mask.png", 99)
    write_png(root / "a" / "a_001_mask_1.png", 98)
    write_png(root / "a" / ".hidden.png", 97)
    write_png(root / "a" / "deeper" / "nested.png", 96)  # recursive: a sample of class a
    (root / "a" / "notes.txt").write_text("x")
    (root / "captions.csv").write_text("x")
    write_png(root / ".cache" / "z.png", 95)  # hidden folder: not a class
    bundle = load(root)
    every = [i for part in split_ids(bundle).values() for i in part]
    assert len(every) == 9 and "a/deeper/nested.png" in every
    assert not any("mask" in i or "hidden" in i for i in every)
    assert bundle.classes == ["a", "b"]
    skipped = bundle.split_record["skipped"]
    assert skipped["masks"] == 2 and skipped["non_image"] == 1 and skipped["hidden"] == 1
    assert skipped["outside_class_folders"] == 1


def test_split_folder_layout(tmp_path: Path, make_folder) -> None:
    root = tmp_path / "ds"
    make_folder(root / "train", {"x": 6, "y": 5})
    make_folder(root / "valid", {"x": 2, "y": 2}, start_seed=100)
    make_folder(root / "test", {"x": 3, "y": 1}, start_seed=200)
    bundle = load(root)
    assert [len(bundle.train), len(bundle.val), len(bundle.test)] == [11, 4, 4]
    assert all(i.startswith("train/") for i in bundle.train.ids)
    assert all(i.startswith("valid/") for i in bundle.val.ids)
    assert bundle.split_record["official_split"]
    assert set(bundle.split_record["methods"].values()) == {"official"}


def test_split_folder_without_val_carves_it_from_train(tmp_path: Path, make_folder) -> None:
    root = tmp_path / "ds"
    make_folder(root / "train", {"x": 20, "y": 20})
    make_folder(root / "test", {"x": 3, "y": 3}, start_seed=100)
    bundle = load(root, val_fraction=0.25)
    assert len(bundle.val) == 10 and len(bundle.train) == 30
    assert all(i.startswith("train/") for i in bundle.val.ids)
    assert not set(bundle.val.ids) & set(bundle.train.ids)
    assert set(bundle.val.labels.tolist()) == {0, 1}
    assert "carve" in bundle.split_record["methods"]["val"]

    no_test = tmp_path / "nt"
    make_folder(no_test / "train", {"x": 5, "y": 5})
    make_folder(no_test / "val", {"x": 2, "y": 2}, start_seed=50)
    assert load(no_test).test is None


def test_class_missing_from_train_is_an_error(tmp_path: Path, make_folder) -> None:
    root = tmp_path / "ds"
    make_folder(root / "train", {"x": 4, "y": 4})
    make_folder(root / "test", {"x": 2, "z": 2}, start_seed=100)
    with pytest.raises(DataError, match="z"):
        load(root)


def test_mixed_split_and_class_folders_is_an_error(tmp_path: Path, make_folder) -> None:
    root = make_folder(tmp_path / "ds", {"train": 3, "cats": 3})
    with pytest.raises(DataError, match="mixes"):
        load(root)


def test_empty_and_single_class_errors(tmp_path: Path, make_folder) -> None:
    root = make_folder(tmp_path / "ds", {"a": 3, "b": 3})
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match=r"empty.*contains no images"):
        load(root)

    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(DataError, match="bare"):
        load(bare)

    single = make_folder(tmp_path / "single", {"only": 5})
    with pytest.raises(DataError, match="one class"):
        load(single)

    with pytest.raises(DataError, match="not found"):
        load(tmp_path / "missing")


# ---------------------------------------------------------------------------- CSV


def test_csv_without_split(tmp_path: Path, make_csv, write_png) -> None:
    rows = []
    for i in range(24):
        name = f"img/{i}.png"
        write_png(tmp_path / name, i)
        rows.append((name, ["cat", "dog"][i % 2]))
    bundle = load(make_csv(tmp_path / "m.csv", rows))
    assert bundle.classes == ["cat", "dog"]
    every = sorted(i for part in split_ids(bundle).values() for i in part)
    assert every == sorted(r[0] for r in rows)
    check_item(bundle.train)
    assert bundle.split_record["format"] == "csv"


def test_csv_with_split_and_numeric_labels(tmp_path: Path, make_csv, write_png) -> None:
    rows = []
    for i in range(12):
        write_png(tmp_path / f"{i}.png", i)
        split = ["train", "train", "val", "test"][i % 4]
        rows.append((split, f"{i}.png", [2, 10][i % 2], "ignored"))
    path = make_csv(tmp_path / "m.csv", rows, header=("split", "path", "label", "extra"))
    bundle = load(path)
    assert bundle.classes == ["2", "10"]  # numeric order, not "10" < "2"
    assert [len(bundle.train), len(bundle.val), len(bundle.test)] == [6, 3, 3]
    for ds in (bundle.train, bundle.val, bundle.test):
        for sample_id, label in zip(ds.ids, ds.labels, strict=True):
            assert bundle.classes[label] == str([2, 10][int(sample_id.split(".")[0]) % 2])


def test_csv_missing_file_names_file_and_line(tmp_path: Path, make_csv, write_png) -> None:
    write_png(tmp_path / "ok.png", 0)
    path = make_csv(tmp_path / "m.csv", [("ok.png", "a"), ("ghost.png", "b")])
    with pytest.raises(DataError, match=r"line 3.*ghost\.png"):
        load(path)


@pytest.mark.parametrize(
    ("header", "rows", "match"),
    [
        (("file", "label"), [("a.png", "x")], "path"),
        (("path", "label", "split"), [("a.png", "x", "holdout")], "holdout"),
        (("path", "label"), [("a.png", "")], "empty label"),
        (("path", "label"), [("a.png", "x"), ("a.png", "y")], "twice"),
        (("path", "label"), [], "no samples"),
    ],
)
def test_csv_errors(tmp_path: Path, make_csv, header, rows, match, write_png) -> None:
    write_png(tmp_path / "a.png", 0)
    with pytest.raises(DataError, match=match):
        load(make_csv(tmp_path / "m.csv", rows, header=header))


# ---------------------------------------------------------------------------- npz


def test_npz_gray_column_labels(tmp_path: Path, make_npz) -> None:
    path = make_npz(
        tmp_path / "toy.npz", {"train": [0, 1, 2] * 4, "val": [0, 1, 2], "test": [2, 1]}
    )
    bundle = load(path)
    assert bundle.classes == ["0", "1", "2"]
    assert [len(bundle.train), len(bundle.val), len(bundle.test)] == [12, 3, 2]
    assert bundle.test.ids == ["test/0", "test/1"]
    assert bundle.test.labels.tolist() == [2, 1]
    check_item(bundle.train)
    with np.load(path) as npz:
        raw = npz["val_images"][1]
    # A constant-free check that the gray pixels went through: resize to the native size.
    same = load_data(
        DataConfig(str(path), cache="no"), image_size=raw.shape[0], mean=(0.0,), std=(1.0,)
    )
    x, _ = same.val[1]
    np.testing.assert_allclose(x[0].numpy() * 255, raw, atol=1e-3)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_npz_rgb_flat_labels_known_flag_and_carved_val(tmp_path: Path, make_npz) -> None:
    path = make_npz(
        tmp_path / "breastmnist_small.npz",
        {"train": [0, 1] * 10, "test": [0, 1]},
        rgb=True,
        column=False,
    )
    bundle = load(path, val_fraction=0.2)
    assert bundle.classes == ["malignant", "normal, benign"]
    assert len(bundle.val) == 4 and len(bundle.train) == 16
    assert all(i.startswith("train/") for i in bundle.val.ids)
    check_item(bundle.val)


def test_npz_class_names_key(tmp_path: Path) -> None:
    images = np.zeros((4, 5, 5), np.uint8)
    np.savez(
        tmp_path / "d.npz",
        train_images=images,
        train_labels=np.array([0, 1, 0, 1]),
        val_images=images[:2],
        val_labels=np.array([0, 1]),
        class_names=np.array(["five", "six"]),
    )
    assert load(tmp_path / "d.npz").classes == ["five", "six"]


def test_npz_errors(tmp_path: Path, make_npz) -> None:
    with pytest.raises(DataError, match="multi-label not supported"):
        load(make_npz(tmp_path / "chestmnist.npz", {"train": [0, 1]}))
    multi = tmp_path / "multi.npz"
    np.savez(multi, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.eye(2, 3))
    with pytest.raises(DataError, match="multi-label not supported"):
        load(multi)
    with pytest.raises(DataError, match="out of range"):
        load(make_npz(tmp_path / "pneumoniamnist.npz", {"train": [0, 1, 2]}))
    negative = tmp_path / "neg.npz"
    np.savez(negative, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([0, -1]))
    with pytest.raises(DataError, match="out of range"):
        load(negative)
    nokeys = tmp_path / "nokeys.npz"
    np.savez(nokeys, x=np.zeros(3))
    with pytest.raises(DataError, match="train_images"):
        load(nokeys)


# ---------------------------------------------------------------------------- datasets


def test_normalisation_and_flip_only_on_train(tmp_path: Path, make_folder) -> None:
    root = tmp_path / "ds"
    for k, cls in enumerate(("l", "r")):
        for i in range(6):
            img = np.zeros((SIZE, SIZE, 3), np.uint8)
            img[:, : SIZE // 2] = 200  # bright left half: a flip is visible
            # Distinct images: exact duplicates would be kept together in one split.
            img[SIZE // 2, SIZE // 4] = 100 + 6 * k + i
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / cls / f"{i}.png")
    bundle = load(root, augment="flip")
    x, _ = bundle.val[0]
    bright, dark = (200 / 255 - MEAN[0]) / STD[0], (0 - MEAN[0]) / STD[0]
    assert torch.allclose(x[:, :, 0], torch.full_like(x[:, :, 0], bright), atol=1e-5)
    assert torch.allclose(x[:, :, -1], torch.full_like(x[:, :, -1], dark), atol=1e-5)
    for ds in (bundle.val, bundle.test):
        first = ds[0][0]
        assert all(torch.equal(ds[0][0], first) for _ in range(10))  # never augmented
    torch.manual_seed(0)
    left_bright = {bool(bundle.train[0][0][0, 0, 0] > 0) for _ in range(40)}
    assert left_bright == {True, False}  # both orientations occur on train
    assert load(root, augment="none").train.augment == "none"


def test_cache_gives_identical_items(tmp_path: Path, make_folder) -> None:
    root = make_folder(tmp_path / "ds", {"a": 5, "b": 5})
    plain = load(root, cache="no", augment="none")
    cached = load(root, cache="yes", augment="none")
    assert cached.train.cached and not plain.train.cached
    for i in range(len(plain.train)):
        assert torch.equal(plain.train[i][0], cached.train[i][0])
    assert load(root, cache="auto").train.cached  # tiny: fits the auto budget
    threaded = load(root, cache="yes", augment="none", num_workers=2)
    for i in range(len(plain.train)):
        assert torch.equal(plain.train[i][0], threaded.train[i][0])


def test_datasets_pickle_and_work_in_workers(tmp_path: Path, make_folder) -> None:
    root = make_folder(tmp_path / "ds", {"a": 5, "b": 5})
    bundle = load(root, augment="none")
    clone = pickle.loads(pickle.dumps(bundle.train))
    assert torch.equal(clone[1][0], bundle.train[1][0])
    loader = DataLoader(bundle.train, batch_size=4, num_workers=1)
    xs, ys = next(iter(loader))
    assert xs.shape == (4, 3, SIZE, SIZE) and ys.dtype == torch.int64


@pytest.mark.parametrize(
    "bad",
    [
        {"data_format": "zip"},
        {"val_fraction": 1.5},
        {"val_fraction": 0.6, "test_fraction": 0.5},
        {"split_seed": -1},
        {"cache": "maybe"},
        {"num_workers": -2},
        {"augment": "rotate"},
        {"data": ""},
    ],
)
def test_config_validation_names_the_field(bad) -> None:
    kwargs = {"data": "x", **bad}
    field_name = next(iter(bad))
    with pytest.raises(ValueError, match=field_name):
        DataConfig(**kwargs)


def test_config_fields_have_help() -> None:
    import dataclasses

    for f in dataclasses.fields(DataConfig):
        assert f.metadata.get("help"), f.name


# ---------------------------------------------------------------------------- eval / predict


def test_eval_maps_labels_by_name(tmp_path: Path, make_folder) -> None:
    root = make_folder(tmp_path / "ds", {"a": 3, "b": 2})
    ds = load_eval_data(str(root), image_size=SIZE, mean=MEAN, std=STD, classes=["c", "b", "a"])
    assert len(ds) == 5 and ds.classes == ["c", "b", "a"]  # flat folder: every sample
    for sample_id, label in zip(ds.ids, ds.labels, strict=True):
        assert ds.classes[label] == sample_id.split("/")[0]
    assert ds.augment == "none" and not ds.cached
    with pytest.raises(DataError, match=r"\['b'\].*not among"):
        load_eval_data(str(root), image_size=SIZE, mean=MEAN, std=STD, classes=["a", "z"])


def test_eval_split_selection(tmp_path: Path, make_folder) -> None:
    root = tmp_path / "ds"
    make_folder(root / "train", {"x": 4, "y": 4})
    make_folder(root / "test", {"x": 2, "y": 1}, start_seed=100)
    kw = dict(image_size=SIZE, mean=MEAN, std=STD, classes=["x", "y"])
    assert len(load_eval_data(str(root), **kw)) == 3  # default: test
    assert len(load_eval_data(str(root), split="train", **kw)) == 8
    assert len(load_eval_data(str(root), split="all", **kw)) == 11
    with pytest.raises(DataError, match="no 'val' split"):
        load_eval_data(str(root), split="val", **kw)


def test_eval_with_split_record(tmp_path: Path, make_folder) -> None:
    root = make_folder(tmp_path / "ds", {"a": 10, "b": 10})
    bundle = load(root)
    ds = load_eval_data(
        str(root),
        image_size=SIZE,
        mean=MEAN,
        std=STD,
        classes=bundle.classes,
        split="test",
        split_record=bundle.split_record,
    )
    assert ds.ids == bundle.test.ids
    assert ds.labels.tolist() == bundle.test.labels.tolist()


def test_list_images_and_predict_dataset(tmp_path: Path, write_png) -> None:
    write_png(tmp_path / "b.png", 0)
    write_png(tmp_path / "sub" / "a.jpg", 1)
    write_png(tmp_path / "sub" / "a_mask.png", 2)
    write_png(tmp_path / ".hid" / "c.png", 3)
    (tmp_path / "notes.txt").write_text("x")
    paths = list_images(str(tmp_path))
    assert [Path(p).relative_to(tmp_path).as_posix() for p in paths] == ["b.png", "sub/a.jpg"]
    assert list_images(str(tmp_path / "b.png")) == [str(tmp_path / "b.png")]
    with pytest.raises(DataError):
        list_images(str(tmp_path / "notes.txt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no image"):
        list_images(str(tmp_path / "empty_dir"))
    ds = ImageFileDataset(paths, image_size=SIZE, mean=MEAN, std=STD)
    x, p = ds[1]
    assert x.shape == (3, SIZE, SIZE) and p == paths[1]
    batch_x, batch_p = next(iter(DataLoader(ds, batch_size=2)))
    assert batch_x.shape == (2, 3, SIZE, SIZE) and list(batch_p) == paths
