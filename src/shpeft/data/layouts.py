"""Native layouts of the paper's data sets, each read into a :class:`~shpeft.data.sources.Catalog`.

Every reader accepts the data set's own folder or a folder above it (the unzipped archive), finds
the data set's root, and lists the samples without decoding any image. Sample ids are paths
relative to that root, so a split record made from either folder replays on the other.

=========  ====================================================  ==============================
format     layout                                                 split
=========  ====================================================  ==============================
busi       ``Dataset_BUSI_with_GT/{benign,malignant,normal}/``    seeded, stratified
           (``name_mask.png`` / ``name_mask_1.png`` skipped)
chaoyang   ``train.json`` / ``test.json``: ``[{"name", "label"}]``  official train/test; val
           beside the image folders; labels 0-3 = normal,          carved from train
           serrated, adenocarcinoma, adenoma
covid-ct   ``Images-processed/CT_COVID``, ``.../CT_NonCOVID``;    official lists (425/118/203);
           ``Data-split/COVID/{train,val,test}CT_COVID.txt``,      without ``Data-split/``:
           ``Data-split/NonCOVID/{...}CT_NonCOVID.txt``            seeded, stratified
cxr3       ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/``;   official (val carved from train
           classes normal / bacterial / viral from the file name  by patient when absent)
oct        ``OCT2017/{train,val,test}/{CNV,DME,DRUSEN,NORMAL}/``  official (val carved from train
                                                                  by patient when absent)
limuc      ``Mayo 0/ .. Mayo 3/`` (patient id from the file name  seeded, stratified, grouped by
           ``<patient>_<n>.bmp``) or the published                 patient (plain stratified when
           ``<patient>/Mayo N/*.bmp`` tree                         no id can be parsed)
=========  ====================================================  ==============================

CXR3: a ``PNEUMONIA`` file whose name contains neither ``bacteria`` nor ``virus`` (or both) is an
error naming the files, never a silent skip: the three-class task has no label for it.

Patient ids (``Group.patients``) come from file names where the data set encodes them (Kermany
CXR ``person12_bacteria_45.jpeg`` -> ``person12``, ``IM-0115-0001.jpeg`` -> ``IM-0115``; OCT
``CNV-1016042-1.jpeg`` -> ``1016042``; LIMUC ``<patient>_<n>.bmp``); seeded splits made by
:mod:`shpeft.data.loading` keep each patient in one split.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from .catalog import (
    SPLIT_NAMES,
    SPLITS,
    Catalog,
    Group,
    loose_files,
    read_class_folders,
    scan_class_folder,
    visible_subdirs,
)
from .io import DataError

__all__ = [
    "BUSI_CLASSES",
    "CHAOYANG_CLASSES",
    "COVID_CT_CLASSES",
    "CXR3_CLASSES",
    "LIMUC_CLASSES",
    "OCT_CLASSES",
    "detect_layout",
    "read_layout",
]

BUSI_CLASSES = ["benign", "malignant", "normal"]
CHAOYANG_CLASSES = ["normal", "serrated", "adenocarcinoma", "adenoma"]  # label 0..3
COVID_CT_CLASSES = ["COVID", "NonCOVID"]
CXR3_CLASSES = ["normal", "bacterial", "viral"]
OCT_CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]
LIMUC_CLASSES = ["Mayo 0", "Mayo 1", "Mayo 2", "Mayo 3"]

_MAYO = re.compile(r"^mayo[ _-]?(\d)$", re.IGNORECASE)
# LIMUC-style "<patient>_<n>" (also "-" or space as separator); the patient part may be anything.
_LIMUC_PATIENT = re.compile(r"^(.+?)[_\- ]+\d+$")
# Kermany CXR: "person1_bacteria_1", "person1_virus_6"; "IM-0115-0001", "NORMAL2-IM-1427-0001".
_CXR_PATIENT = re.compile(r"^(person\d+)_|^((?:NORMAL2-)?IM-\d+)(?:-\d+)+$", re.IGNORECASE)
# Kermany OCT: "CNV-1016042-1": the number is the patient, shared across the disease classes.
_OCT_PATIENT = re.compile(r"^[A-Za-z]+-(\d+)-\d+$")
# Names of folders that wrap a data set's root in common downloads (compared lower-cased).
_WRAPPERS = {
    "busi": ("dataset_busi_with_gt",),
    "cxr3": ("chest_xray",),
    "oct": ("oct2017",),
    "chaoyang": ("chaoyang",),
    "covid-ct": ("covid-ct", "covid_ct"),
    "limuc": ("limuc", "patient_based_classified_images"),
}


def _norm(name: str) -> str:
    # Kaggle's OCT archive names its folder "OCT2017 " (trailing space); compare loosely.
    return name.strip().lower()


def _subdirs_by_name(folder: Path) -> dict[str, Path]:
    return {_norm(d.name): d for d in visible_subdirs(folder)}


def _has_files(folder: Path, *names: str) -> bool:
    return all((folder / n).is_file() for n in names)


def _find_root(path: Path, is_root: Callable[[Path], bool], fmt: str, expected: str) -> Path:
    """``path`` or the folder below it (through the data set's usual wrapper folders) that holds
    the layout; a DataError describing ``expected`` otherwise."""
    if not path.is_dir():
        raise DataError(f"{path} is not a folder (the {fmt} layout is a folder: {expected})")
    current = path
    for _ in range(4):  # e.g. chest_xray/chest_xray/train in the Kaggle archive
        if is_root(current):
            return current
        subdirs = _subdirs_by_name(current)
        wrapper = next((subdirs[w] for w in _WRAPPERS[fmt] if w in subdirs), None)
        if wrapper is None:
            break
        current = wrapper
    raise DataError(f"{path}: not a {fmt} folder; expected {expected}")


def _split_dirs(folder: Path) -> dict[str, Path]:
    """The train/val/test folders directly in ``folder`` (any accepted spelling)."""
    found: dict[str, Path] = {}
    for d in visible_subdirs(folder):
        key = SPLIT_NAMES.get(_norm(d.name))
        if key is not None:
            if key in found:
                raise DataError(f"{folder}: two folders name the {key!r} split ({found[key]}, {d})")
            found[key] = d
    return found


def _skipped() -> dict[str, int]:
    return {"masks": 0, "non_image": 0, "hidden": 0, "outside_class_folders": 0}


def _too_many(items: list[str], limit: int = 5) -> str:
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


# --------------------------------------------------------------------------------------------
# detection


def detect_layout(path: Path) -> str | None:
    """The native layout a folder unambiguously has, or None (then it is a plain ImageFolder).

    Markers, checked in this order on the folder and its direct subfolders: ``train.json`` and
    ``test.json`` (chaoyang); ``Data-split/`` or ``Images-processed/`` (covid-ct);
    ``Dataset_BUSI_with_GT`` (busi); ``chest_xray`` (cxr3); ``OCT2017`` (oct); ``Mayo 0``-style
    class folders or ``patient_based_classified_images`` (limuc).
    """
    own = _norm(path.name)
    subdirs = _subdirs_by_name(path)
    if _has_files(path, "train.json", "test.json"):
        return "chaoyang"
    if "data-split" in subdirs or "images-processed" in subdirs:
        return "covid-ct"
    names = {own, *subdirs}
    if "dataset_busi_with_gt" in names:
        return "busi"
    if "chest_xray" in names:
        return "cxr3"
    if "oct2017" in names:
        return "oct"
    if "patient_based_classified_images" in names or any(_MAYO.match(n) for n in subdirs):
        return "limuc"
    return None


def read_layout(path: Path, fmt: str) -> Catalog:
    """Read ``path`` as the native layout ``fmt`` (see the module docstring)."""
    readers = {
        "busi": _read_busi,
        "chaoyang": _read_chaoyang,
        "covid-ct": _read_covid_ct,
        "cxr3": _read_cxr3,
        "oct": _read_oct,
        "limuc": _read_limuc,
    }
    return readers[fmt](path)


# --------------------------------------------------------------------------------------------
# BUSI


def _read_busi(path: Path) -> Catalog:
    def is_root(d: Path) -> bool:
        return set(BUSI_CLASSES) <= set(_subdirs_by_name(d))

    root = _find_root(
        path, is_root, "busi", "Dataset_BUSI_with_GT/{benign,malignant,normal}/ with images"
    )
    extra = sorted(d.name for d in visible_subdirs(root) if _norm(d.name) not in BUSI_CLASSES)
    if extra:
        raise DataError(
            f"{root}: unexpected folder(s) {extra} beside benign/malignant/normal in a BUSI folder"
        )
    skipped = _skipped()
    group = read_class_folders(root, root, skipped)
    group.labels = [_norm(lab) for lab in group.labels]
    return Catalog(root, "busi", "flat", {"all": group}, list(BUSI_CLASSES), skipped)


# --------------------------------------------------------------------------------------------
# Chaoyang


def _read_chaoyang(path: Path) -> Catalog:
    root = _find_root(
        path,
        lambda d: _has_files(d, "train.json", "test.json"),
        "chaoyang",
        "train.json and test.json (lists of {name, label}) beside the image folders",
    )
    groups: dict[str, Group] = {}
    seen: dict[str, str] = {}
    for split in ("train", "test"):
        manifest = root / f"{split}.json"
        try:
            entries = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{manifest}: cannot read the JSON list ({e})") from e
        if not isinstance(entries, list) or not entries:
            raise DataError(f"{manifest}: expected a non-empty JSON list of {{name, label}}")
        group = Group(ids=[], labels=[], paths=[], origin=str(manifest))
        missing: list[str] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "name" not in entry or "label" not in entry:
                raise DataError(f"{manifest}, entry {i}: expected {{'name': ..., 'label': ...}}")
            name, label = str(entry["name"]).replace("\\", "/"), entry["label"]
            if isinstance(label, bool) or not isinstance(label, int):
                raise DataError(f"{manifest}, entry {i} ({name}): label {label!r} is not an int")
            if not 0 <= label < len(CHAOYANG_CLASSES):
                raise DataError(
                    f"{manifest}, entry {i} ({name}): label {label} out of range 0-3 "
                    f"({', '.join(CHAOYANG_CLASSES)})"
                )
            if name in seen:
                raise DataError(f"{manifest}, entry {i}: {name} is already listed in {seen[name]}")
            seen[name] = manifest.name
            file = root / name
            if not file.is_file():
                missing.append(f"entry {i}: {file}")
                continue
            group.ids.append(name)
            group.labels.append(CHAOYANG_CLASSES[label])
            group.paths.append(str(file))  # type: ignore[union-attr]
        if missing:
            raise DataError(
                f"{manifest}: {len(missing)} listed file(s) not found: {_too_many(missing)}"
            )
        groups[split] = group
    return Catalog(root, "chaoyang", "split", groups, list(CHAOYANG_CLASSES), {})


# --------------------------------------------------------------------------------------------
# COVID-CT (UCSD-AI4H)

# class name -> (image folder, Data-split subfolder, list-file suffix)
_COVID_PARTS = {
    "COVID": ("ct_covid", "covid", "CT_COVID"),
    "NonCOVID": ("ct_noncovid", "noncovid", "CT_NonCOVID"),
}


def _read_covid_ct(path: Path) -> Catalog:
    root = _find_root(
        path,
        lambda d: "images-processed" in _subdirs_by_name(d),
        "covid-ct",
        "Images-processed/{CT_COVID,CT_NonCOVID}/ (and Data-split/ with the official lists)",
    )
    images_dir = _subdirs_by_name(root)["images-processed"]
    class_dirs = _subdirs_by_name(images_dir)
    skipped = _skipped()
    files: dict[str, list[Path]] = {}
    for cls, (folder, _, _) in _COVID_PARTS.items():
        if folder not in class_dirs:
            raise DataError(f"{images_dir}: missing the class folder {_COVID_PARTS[cls][2]}/")
        files[cls] = scan_class_folder(class_dirs[folder], root, skipped)
        if not files[cls]:
            raise DataError(f"class folder {class_dirs[folder]} contains no images")

    split_dir = _subdirs_by_name(root).get("data-split")
    if split_dir is None:
        group = Group(ids=[], labels=[], paths=[], origin=str(images_dir))
        for cls, paths in files.items():
            for f in paths:
                group.ids.append(f.relative_to(root).as_posix())
                group.labels.append(cls)
                group.paths.append(str(f))  # type: ignore[union-attr]
        note = f"{root}: no Data-split/ folder, so no official split; a seeded split is made"
        return Catalog(
            root, "covid-ct", "flat", {"all": group}, list(COVID_CT_CLASSES), skipped, [note]
        )

    groups = {s: Group(ids=[], labels=[], paths=[], origin=str(split_dir)) for s in SPLITS}
    listed_in: dict[str, str] = {}
    fuzzy = 0
    problems: list[str] = []
    for cls, (_, sub, suffix) in _COVID_PARTS.items():
        lists_dir = _subdirs_by_name(split_dir).get(sub)
        by_name = {f.name: f for f in files[cls]}
        by_lower = {f.name.lower(): f for f in files[cls]}
        by_stem: dict[str, list[Path]] = {}
        for f in files[cls]:
            by_stem.setdefault(f.stem.lower(), []).append(f)
        for split in SPLITS:
            list_file = (lists_dir / f"{split}{suffix}.txt") if lists_dir else None
            if list_file is None or not list_file.is_file():
                raise DataError(
                    f"{split_dir}: missing the official list {_sub_name(sub)}/{split}{suffix}.txt"
                )
            lines = list_file.read_text(encoding="utf-8", errors="replace").splitlines()
            for line_no, line in enumerate(lines, 1):
                name = line.strip()
                if not name:
                    continue
                # Exact name first; then case-insensitive; then a unique same-stem file (the
                # lists and folders of the public repo disagree on a few extensions/cases).
                f = by_name.get(name) or by_lower.get(name.lower())
                if f is None and len(by_stem.get(Path(name).stem.lower(), [])) == 1:
                    f = by_stem[Path(name).stem.lower()][0]
                if f is not None and f.name != name:
                    fuzzy += 1
                if f is None:
                    problems.append(f"{list_file}, line {line_no}: {name} not in {suffix}/")
                    continue
                sample_id = f.relative_to(root).as_posix()
                where = f"{list_file.name}, line {line_no}"
                if sample_id in listed_in:
                    problems.append(f"{where}: {name} is also listed in {listed_in[sample_id]}")
                    continue
                listed_in[sample_id] = where
                groups[split].ids.append(sample_id)
                groups[split].labels.append(cls)
                groups[split].paths.append(str(f))  # type: ignore[union-attr]
    if problems:
        raise DataError(
            f"{split_dir}: {len(problems)} problem(s) in the official split lists: "
            + _too_many(problems)
        )
    notes = []
    unlisted = sum(len(v) for v in files.values()) - len(listed_in)
    if unlisted:
        skipped["unlisted"] = unlisted
        notes.append(f"{unlisted} image(s) under Images-processed/ are in no official list")
    if fuzzy:
        notes.append(f"{fuzzy} list entr(y/ies) matched a file by case or extension, not exactly")
    groups = {s: g for s, g in groups.items() if len(g)}
    return Catalog(root, "covid-ct", "split", groups, list(COVID_CT_CLASSES), skipped, notes)


def _sub_name(sub: str) -> str:
    """Spelling of a Data-split subfolder as the data set writes it (for messages)."""
    return {"covid": "COVID", "noncovid": "NonCOVID"}.get(sub, sub)


# --------------------------------------------------------------------------------------------
# Kermany CXR (3 classes) and OCT


def _kermany_root(path: Path, fmt: str, expected: str) -> tuple[Path, dict[str, Path]]:
    root = _find_root(path, lambda d: {"train", "test"} <= set(_split_dirs(d)), fmt, expected)
    return root, _split_dirs(root)


def _patients(group: Group, pattern: re.Pattern[str]) -> list[str] | None:
    """Patient id per sample from the file names, or None when some name does not match."""
    ids = []
    for path in group.paths or []:
        m = pattern.match(Path(path).stem)
        if m is None:
            return None
        ids.append(next(g for g in m.groups() if g))
    return ids


def _read_cxr3(path: Path) -> Catalog:
    root, splits = _kermany_root(
        path, "cxr3", "chest_xray/{train,test}[/val]/{NORMAL,PNEUMONIA}/ with images"
    )
    skipped = _skipped()
    skipped["other_folders"] = sum(
        1 for d in visible_subdirs(root) if SPLIT_NAMES.get(_norm(d.name)) is None
    )
    groups: dict[str, Group] = {}
    unknown: list[str] = []
    for split in SPLITS:
        if split not in splits:
            continue
        classes = {_norm(d.name) for d in visible_subdirs(splits[split])}
        if classes != {"normal", "pneumonia"}:
            raise DataError(
                f"{splits[split]}: expected the class folders NORMAL and PNEUMONIA, found "
                f"{sorted(d.name for d in visible_subdirs(splits[split]))}"
            )
        group = read_class_folders(splits[split], root, skipped)
        labels = []
        for sample_id, folder in zip(group.ids, group.labels, strict=True):
            if _norm(folder) == "normal":
                labels.append("normal")
                continue
            name = Path(sample_id).name.lower()
            bacterial, viral = "bacteria" in name, "virus" in name
            if bacterial == viral:
                unknown.append(sample_id)
            labels.append("bacterial" if bacterial else "viral")
        group.labels = labels
        group.patients = _patients(group, _CXR_PATIENT)
        groups[split] = group
    if unknown:
        raise DataError(
            f"{root}: {len(unknown)} PNEUMONIA file(s) name neither 'bacteria' nor 'virus' (or "
            f"both), so their cxr3 subtype is unknown: {_too_many(unknown)}; rename them, remove "
            "them, or use --data-format imagefolder for the two-class task"
        )
    return Catalog(root, "cxr3", "split", groups, list(CXR3_CLASSES), skipped)


def _read_oct(path: Path) -> Catalog:
    root, splits = _kermany_root(
        path, "oct", "OCT2017/{train,test}[/val]/{CNV,DME,DRUSEN,NORMAL}/ with images"
    )
    skipped = _skipped()
    skipped["other_folders"] = sum(
        1 for d in visible_subdirs(root) if SPLIT_NAMES.get(_norm(d.name)) is None
    )
    groups: dict[str, Group] = {}
    for split in SPLITS:
        if split not in splits:
            continue
        group = read_class_folders(splits[split], root, skipped)
        group.labels = [lab.strip().upper() for lab in group.labels]
        unexpected = sorted(set(group.labels) - set(OCT_CLASSES))
        if unexpected:
            raise DataError(
                f"{splits[split]}: unexpected class folder(s) {unexpected}; OCT2017 has "
                f"{OCT_CLASSES}"
            )
        group.patients = _patients(group, _OCT_PATIENT)
        groups[split] = group
    return Catalog(root, "oct", "split", groups, list(OCT_CLASSES), skipped)


# --------------------------------------------------------------------------------------------
# LIMUC


def _mayo_dirs(folder: Path) -> dict[str, Path]:
    """``{"Mayo N": folder}`` for the Mayo class folders directly in ``folder``."""
    found = {}
    for d in visible_subdirs(folder):
        m = _MAYO.match(_norm(d.name))
        if m:
            found[f"Mayo {m.group(1)}"] = d
    return found


def _read_limuc(path: Path) -> Catalog:
    def flat(d: Path) -> bool:
        return bool(_mayo_dirs(d))

    def per_patient(d: Path) -> bool:
        subdirs = visible_subdirs(d)
        return bool(subdirs) and all(_mayo_dirs(s) for s in subdirs)

    root = _find_root(
        path,
        lambda d: flat(d) or per_patient(d),
        "limuc",
        "'Mayo 0/' .. 'Mayo 3/' class folders (or patient_based_classified_images/<patient>/"
        "Mayo N/)",
    )
    skipped = _skipped()
    notes: list[str] = []
    group = Group(ids=[], labels=[], paths=[], origin=str(root))
    if flat(root):
        mayo = _mayo_dirs(root)
        extra = sorted(d.name for d in visible_subdirs(root) if d not in mayo.values())
        if extra:
            raise DataError(f"{root}: unexpected folder(s) {extra} beside the Mayo class folders")
        skipped["outside_class_folders"] += loose_files(root)
        for cls in sorted(mayo):
            files = scan_class_folder(mayo[cls], root, skipped)
            if not files:
                raise DataError(f"class folder {mayo[cls]} contains no images")
            for f in files:
                group.ids.append(f.relative_to(root).as_posix())
                group.labels.append(cls)
                group.paths.append(str(f))  # type: ignore[union-attr]
        group.patients = _patients(group, _LIMUC_PATIENT)
        if group.patients is None:
            bad = next(
                Path(p).name for p in group.paths or [] if not _LIMUC_PATIENT.match(Path(p).stem)
            )
            notes.append(
                f"no patient id could be parsed from the file names (e.g. {bad!r}; expected "
                "<patient>_<n>.bmp): plain stratified split, images of one patient may fall "
                "into different splits"
            )
    else:
        patients: list[str] = []
        for patient_dir in visible_subdirs(root):
            skipped["outside_class_folders"] += loose_files(patient_dir)
            for cls, folder in sorted(_mayo_dirs(patient_dir).items()):
                for f in scan_class_folder(folder, root, skipped):
                    group.ids.append(f.relative_to(root).as_posix())
                    group.labels.append(cls)
                    group.paths.append(str(f))  # type: ignore[union-attr]
                    patients.append(patient_dir.name)
        group.patients = patients
    if not group.ids:
        raise DataError(f"{root}: empty dataset, no images in the Mayo folders")
    classes = [c for c in LIMUC_CLASSES if c in set(group.labels)]
    classes += sorted(set(group.labels) - set(LIMUC_CLASSES))  # e.g. a "Mayo 4" typo folder
    counts = Counter(group.labels)
    for c in LIMUC_CLASSES:
        if c not in counts:
            notes.append(f"no {c!r} images found")
    return Catalog(root, "limuc", "flat", {"all": group}, classes, skipped, notes)
