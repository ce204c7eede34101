"""Native layouts (BUSI, Chaoyang, COVID-CT, CXR3, OCT, LIMUC, MedMNIST sizes), each rebuilt
in a temporary folder from tiny images of mixed modes and formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shpeft.data import DataConfig, DataError, load_data, read_catalog, read_image
from shpeft.data.sources import detect_format

SIZE = 16
MEAN = STD = (0.5, 0.5, 0.5)
MODES = ("RGB", "L", "RGBA")


def img(path: Path, seed: int, mode: str = "RGB", size: tuple[int, int] | None = None) -> Path:
    """A small smooth image (content depends on ``seed``) in ``mode``, format by extension."""
    rng = np.random.default_rng(seed)
    w, h = size or (int(rng.integers(8, 41)), int(rng.integers(8, 41)))
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    rgb = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb.convert(mode).save(path)
    return path


def load(path: Path | str, **cfg):
    cfg.setdefault("cache", "no")
    return load_data(DataConfig(str(path), **cfg), image_size=SIZE, mean=MEAN, std=STD)


def ids(bundle) -> dict[str, set[str]]:
    return {
        s: set(d.ids)
        for s, d in (("train", bundle.train), ("val", bundle.val), ("test", bundle.test))
        if d is not None
    }


# ---------------------------------------------------------------------------- BUSI


def make_busi(root: Path) -> Path:
    busi = root / "Dataset_BUSI_with_GT"
    seed = 0
    for cls, n in (("benign", 6), ("malignant", 5), ("normal", 4)):
        for i in range(1, n + 1):
            img(busi / cls / f"{cls} ({i}).png", seed, MODES[seed % 3])
            img(busi / cls / f"{cls} ({i})_mask.png", 1000 + seed, "L")
            seed += 1
    img(busi / "benign" / "benign (1)_mask_1.png", 999, "L")  # a second mask
    return root


def test_busi_native_layout_from_parent_or_folder(tmp_path: Path) -> None:
    root = make_busi(tmp_path / "archive")
    assert detect_format(root) == "busi"
    assert detect_format(root / "Dataset_BUSI_with_GT") == "busi"
    a, b = load(root), load(root / "Dataset_BUSI_with_GT")
    assert ids(a) == ids(b)
    rec = a.split_record
    assert rec["format"] == "busi" and a.classes == ["benign", "malignant", "normal"]
    assert rec["split_kind"] == dict.fromkeys(("train", "val", "test"), "seeded-stratified")
    assert rec["skipped"]["masks"] == 16
    assert sum(rec["sizes"].values()) == 15
    assert not any("_mask" in i for s in ids(a).values() for i in s)


def test_busi_rejects_other_folders(tmp_path: Path) -> None:
    root = make_busi(tmp_path / "x")
    img(root / "Dataset_BUSI_with_GT" / "extra" / "a.png", 1)
    with pytest.raises(DataError, match="extra"):
        read_catalog(root, "busi")


# ---------------------------------------------------------------------------- Chaoyang


def make_chaoyang(root: Path, train_labels: list[int], test_labels: list[int]) -> Path:
    for split, labels in (("train", train_labels), ("test", test_labels)):
        entries = []
        for i, label in enumerate(labels):
            name = f"{split}/{i}_{label}.JPG"
            img(root / name, hash((split, i)) % 10_000)
            entries.append({"name": name, "label": label})
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root


def test_chaoyang_official_train_test_and_carved_val(tmp_path: Path) -> None:
    root = make_chaoyang(tmp_path / "chaoyang", [0, 1, 2, 3] * 5, [0, 1, 2, 3, 3])
    assert detect_format(root) == "chaoyang"
    bundle = load(root)
    rec = bundle.split_record
    assert bundle.classes == ["normal", "serrated", "adenocarcinoma", "adenoma"]
    assert rec["split_kind"] == {
        "train": "official",
        "val": "seeded-stratified",
        "test": "official",
    }
    assert rec["counts"]["test"] == {"normal": 1, "serrated": 1, "adenocarcinoma": 1, "adenoma": 2}
    assert len(bundle.train) + len(bundle.val) == 20
    assert ids(bundle)["test"] == {f"test/{i}_{y}.JPG" for i, y in enumerate([0, 1, 2, 3, 3])}


def test_chaoyang_errors_name_the_entry(tmp_path: Path) -> None:
    root = make_chaoyang(tmp_path / "c", [0, 1, 4], [0, 1])
    with pytest.raises(DataError, match=r"train\.json, entry 2 .*label 4 out of range"):
        read_catalog(root)
    root = make_chaoyang(tmp_path / "d", [0, 1, 2], [0, 1])
    (root / "test" / "1_1.JPG").unlink()
    with pytest.raises(DataError, match=r"test\.json: 1 listed file.*1_1\.JPG"):
        read_catalog(root)


# ---------------------------------------------------------------------------- COVID-CT


def make_covid(root: Path, lists: bool = True) -> Path:
    names = {"CT_COVID": [], "CT_NonCOVID": []}
    for k, folder in enumerate(names):
        for i in range(10):
            ext = ".png" if (folder == "CT_COVID" or i % 2) else ".jpg"
            mode = MODES[i % 3] if ext == ".png" else "L"
            name = f"{folder.lower()}_{i}{ext}"
            img(root / "Images-processed" / folder / name, 100 * k + i, mode)
            names[folder].append(name)
    if lists:
        for folder, sub in (("CT_COVID", "COVID"), ("CT_NonCOVID", "NonCOVID")):
            files = names[folder][:9]  # the 10th is in no list
            for split, part in (("train", files[:5]), ("val", files[5:7]), ("test", files[7:])):
                path = root / "Data-split" / sub / f"{split}{folder}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("\n".join(part) + "\n\n")
    return root


def test_covid_ct_official_lists_are_honoured(tmp_path: Path) -> None:
    root = make_covid(tmp_path / "COVID-CT")
    assert detect_format(root) == "covid-ct"
    bundle = load(root)
    rec = bundle.split_record
    assert bundle.classes == ["COVID", "NonCOVID"]
    assert rec["sizes"] == {"train": 10, "val": 4, "test": 4}
    assert rec["split_kind"] == dict.fromkeys(("train", "val", "test"), "official")
    assert ids(bundle)["test"] == {
        "Images-processed/CT_COVID/ct_covid_7.png",
        "Images-processed/CT_COVID/ct_covid_8.png",
        "Images-processed/CT_NonCOVID/ct_noncovid_7.png",
        "Images-processed/CT_NonCOVID/ct_noncovid_8.jpg",
    }
    assert rec["skipped"]["unlisted"] == 2 and rec["notes"]


def test_covid_ct_missing_listed_file_and_no_lists(tmp_path: Path) -> None:
    root = make_covid(tmp_path / "a")
    (root / "Images-processed" / "CT_COVID" / "ct_covid_3.png").unlink()
    with pytest.raises(DataError, match=r"trainCT_COVID\.txt, line 4: ct_covid_3\.png"):
        read_catalog(root)
    flat = load(make_covid(tmp_path / "b", lists=False))
    assert flat.split_record["split_kind"]["test"] == "seeded-stratified"


# ---------------------------------------------------------------------------- CXR3


def make_cxr(root: Path, with_val: bool = False) -> Path:
    base = root / "chest_xray"
    seed = 0
    splits = (("train", 6), ("test", 2), *((("val", 1),) if with_val else ()))
    for s, (split, n_patients) in enumerate(splits):
        for p in range(100 * s, 100 * s + n_patients):
            for k in range(2):
                img(base / split / "NORMAL" / f"IM-{p:04d}-000{k}.jpeg", seed, "L")
                img(base / split / "PNEUMONIA" / f"person{p}_bacteria_{k}.jpeg", seed + 1)
                img(base / split / "PNEUMONIA" / f"person{p + 50}_virus_{k}.jpeg", seed + 2, "L")
                seed += 3
    return root


def test_cxr3_subtypes_official_test_and_patient_grouped_val(tmp_path: Path) -> None:
    root = make_cxr(tmp_path / "kermany")
    assert detect_format(root) == "cxr3"
    bundle = load(root, val_fraction=0.25)
    rec = bundle.split_record
    assert bundle.classes == ["normal", "bacterial", "viral"]
    assert rec["counts"]["test"] == {"normal": 4, "bacterial": 4, "viral": 4}
    assert rec["split_kind"] == {"train": "official", "val": "patient-grouped", "test": "official"}
    patient = read_catalog(root).groups["train"].patients
    assert patient is not None and len(set(patient)) == 18
    cat = read_catalog(root).groups["train"]
    of = dict(zip(cat.ids, patient, strict=True))
    train_p = {of[i] for i in bundle.train.ids}
    val_p = {of[i] for i in bundle.val.ids}
    assert val_p and not train_p & val_p


def test_cxr3_with_val_and_unknown_subtype(tmp_path: Path) -> None:
    root = make_cxr(tmp_path / "a", with_val=True)
    assert load(root).split_record["split_kind"]["val"] == "official"
    img(root / "chest_xray" / "train" / "PNEUMONIA" / "person99_unknown_1.jpeg", 5)
    with pytest.raises(DataError, match=r"neither 'bacteria' nor 'virus'.*person99_unknown_1"):
        read_catalog(root)


# ---------------------------------------------------------------------------- OCT


def test_oct_official_split(tmp_path: Path) -> None:
    base = tmp_path / "OCT2017 "  # the Kaggle archive's folder has a trailing space
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for c, cls in enumerate(("CNV", "DME", "DRUSEN", "NORMAL")):
            for i in range(n):
                img(base / split / cls / f"{cls}-{100 + i}-{c}.jpeg", 10 * c + i, "L")
    assert detect_format(tmp_path) == "oct"
    bundle = load(tmp_path)
    assert bundle.classes == ["CNV", "DME", "DRUSEN", "NORMAL"]
    assert bundle.split_record["sizes"] == {"train": 12, "val": 4, "test": 8}
    assert set(bundle.split_record["split_kind"].values()) == {"official"}
    assert read_catalog(tmp_path).groups["train"].patients[:3] == ["100", "101", "102"]


# ---------------------------------------------------------------------------- LIMUC


def make_limuc(root: Path, named: bool = True) -> Path:
    seed = 0
    for p in range(12):
        for k in range(3):
            mayo = (p + k) % 4
            name = f"{p}_{k}.bmp" if named else f"img{seed}x.bmp"
            img(root / f"Mayo {mayo}" / name, seed, size=(16, 12))
            seed += 1
    return root


def test_limuc_patient_grouped_split(tmp_path: Path) -> None:
    root = make_limuc(tmp_path / "limuc")
    assert detect_format(root) == "limuc"
    bundle = load(root, val_fraction=0.2, test_fraction=0.2)
    rec = bundle.split_record
    assert rec["split_kind"]["test"] == "patient-grouped" and rec["grouping"]["patients"] == 12
    assert bundle.classes == ["Mayo 0", "Mayo 1", "Mayo 2", "Mayo 3"]
    patients = {s: {Path(i).name.split("_")[0] for i in v} for s, v in ids(bundle).items()}
    assert patients["val"] and patients["test"]
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert sum(rec["sizes"].values()) == 36


def test_limuc_without_patient_ids_falls_back_and_says_so(tmp_path: Path) -> None:
    bundle = load(make_limuc(tmp_path / "l", named=False))
    rec = bundle.split_record
    assert rec["split_kind"]["train"] == "seeded-stratified"
    assert any("no patient id" in n for n in rec["notes"])


def test_limuc_patient_folders(tmp_path: Path) -> None:
    root = tmp_path / "patient_based_classified_images"
    for p in range(6):
        for k in range(2):
            img(root / f"{p}" / f"Mayo {(p + k) % 2}" / f"{k}.bmp", 10 * p + k)
    assert detect_format(tmp_path) == "limuc"
    cat = read_catalog(tmp_path)
    assert cat.groups["all"].patients == [str(p) for p in range(6) for _ in range(2)]


# ---------------------------------------------------------------------------- detection


def test_plain_folder_stays_imagefolder(tmp_path: Path) -> None:
    for cls in ("cats", "dogs"):
        img(tmp_path / "pets" / cls / "a.png", len(cls))
    assert detect_format(tmp_path / "pets") == "imagefolder"
    with pytest.raises(DataError, match="not a busi folder"):
        read_catalog(tmp_path / "pets", "busi")


# ---------------------------------------------------------------------------- MedMNIST sizes


@pytest.mark.parametrize(("side", "rgb"), [(28, False), (64, True), (128, False), (224, True)])
def test_medmnist_sizes(tmp_path: Path, side: int, rgb: bool) -> None:
    rng = np.random.default_rng(side)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        shape = (n, side, side, 3) if rgb else (n, side, side)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2)[:, None].astype(np.uint8)
    path = tmp_path / f"pneumoniamnist_{side}.npz"
    np.savez(path, **arrays)
    bundle = load(path, cache="yes")
    assert bundle.classes == ["normal", "pneumonia"]
    assert bundle.train[0][0].shape == (3, SIZE, SIZE)
    assert bundle.split_record["split_kind"]["test"] == "official"


# ---------------------------------------------------------------------------- formats


def test_bmp_and_sixteen_bit_tiff(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    np.testing.assert_array_equal(read_image(tmp_path / "a.bmp"), rgb)
    values = np.array([[0, 257, 65535], [1000, 30000, 60000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "b.tif")
    with Image.open(tmp_path / "b.tif") as im:
        assert im.mode.startswith("I;16")
    out = read_image(tmp_path / "b.tif")
    np.testing.assert_array_equal(out[..., 0], np.rint(values / 65535 * 255).astype(np.uint8))
