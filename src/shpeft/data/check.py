"""``shpeft data check PATH``: a report on a data set before anyone trains on it.

:func:`check_dataset` reads every image once (through :func:`~shpeft.data.read_image`, exactly as
training does) and reports:

* counts per class and split, where the split is the one training would use with the same
  ``split_seed`` / fractions (official where the source has one; see
  :func:`~shpeft.data.loading.plan_split`);
* image sizes (min / median / max of width and height), Pillow modes and file types;
* unreadable files, each with its error;
* exact duplicates: equal decoded pixels (a hash of the RGB array, not of the file bytes, so a
  PNG and its lossless re-encoding match);
* near duplicates, in two stages. Candidates: a 64-bit difference hash (dHash: the image in
  grayscale, box-filtered to 9x8, one bit per horizontal neighbour pair, "left brighter than
  right") within Hamming distance ``near_threshold`` (default 6 of 64). Confirmation, on 16x16
  grayscale thumbnails (zero mean, unit norm), both of:

  - the thumbnails correlate (Pearson) at least ``near_correlation`` (default 0.97);
  - their *centred* correlation (:func:`centred_correlation`) is at least
    ``near_centred_correlation`` (default 0.93): the correlation of the two thumbnails' deviations
    from the mean thumbnail of the other images of the data set, i.e. of what each image has that
    the data set as a whole does not.

  The centring is what makes the rule work on data sets whose images share one layout. All chest
  X-rays look alike at 16x16, and dHash cannot tell them apart: in CXR3 (5,856 images) 1.5 M pairs
  are within 6 bits and 476 of them correlate >= 0.97, all different children in a labelled
  sample of 60; their centred correlation is at most 0.915. Edited copies keep theirs above 0.96
  (JPEG re-encoded, shrunk to 3/4, brightened, gamma 0.8, annotated, noisy; 0.94 for a 28x28
  image shrunk to 21x21), and so do most other frames of one ultrasound sweep (BUSI: 193 of the
  195 pairs the plain correlation flags score >= 0.93; a labelled 60 of them are all the same
  scene). A higher-resolution comparison does not do this job: at 64x64, frames of one sweep
  correlate less (down to 0.91) than different children (up to 0.965). Measurements and eye
  labels: ``benchmarks/results/data_check/``. Subtracting a data set's mean image before
  comparing is the first step of eigenface matching (Turk and Pentland, "Eigenfaces for
  recognition", 1991), here without the projection. Neither stage survives crops (of more than a
  few percent), rotations or flips; repeat films of one patient are not the same image and are
  not found (seeded splits keep a patient together where the layout names patients); in a 28x28
  set (MedMNIST) a copy cannot always be told from a look-alike: there is too little in 28x28
  pixels.

  Candidates come from a vectorised XOR/popcount distance matrix computed in row blocks: exact,
  O(N^2) time and O(block x N) memory, about a second for 20k images; for far larger sets (the
  84k-image OCT2017) expect a minute or more. Confirmation runs on the candidates in chunks, so
  memory stays bounded however many there are;
* class imbalance: the ratio of the largest to the smallest class count, flagged above
  ``imbalance_threshold`` (default 5).

Duplicates are classified as *within a class*, *label conflict* (same image, different labels)
and *leakage* (in train and in val or test).

Severity (the exit status of :func:`run_check` is 1 when there is any error, else 0; argparse
usage errors exit 2):

==========================================================  ===========================
finding                                                       severity
==========================================================  ===========================
source cannot be listed (missing folder or manifest files,   error
an empty class folder, labels out of range, bad npz, ...)
unreadable image (corrupt, truncated, decompression bomb)    error
a class with no samples; fewer than two classes              error
a class in val/test but not in train                         error
exact duplicate across train and val/test (leakage)          error (warning with
                                                              ``allow_leakage``)
exact duplicate with different labels (label conflict)       error (warning with
                                                              ``allow_label_conflicts``)
exact duplicate within a class; only across val and test     warning
near duplicates (any kind; conflicts and leakage called out) warning
class imbalance above the threshold; a class under 3 images  warning
a val/test split missing a class                             warning
==========================================================  ===========================

Seeded splits keep exact duplicates together (as training does), so exact leakage can only be
reported for official splits (e.g. BreastMNIST's train/test share one image); near-duplicate
leakage can occur in any split.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shpeft.config import DataConfig
from shpeft.io_utils import write_text
from shpeft.progress import progress_bar

from .io import DICOM_EXTENSIONS, DataError, read_image
from .keys import array_key
from .sources import FORMATS, SPLITS, Catalog, read_catalog
from .splits import plan_split, pool_of

__all__ = [
    "DEFAULT_IMBALANCE_THRESHOLD",
    "DEFAULT_NEAR_CENTRED_CORRELATION",
    "DEFAULT_NEAR_CORRELATION",
    "DEFAULT_NEAR_THRESHOLD",
    "CheckReport",
    "add_check_arguments",
    "centred_correlation",
    "check_dataset",
    "dhash",
    "hamming_pairs",
    "thumbnail",
    "run_check",
]

DEFAULT_NEAR_THRESHOLD = 6
DEFAULT_NEAR_CORRELATION = 0.97
DEFAULT_NEAR_CENTRED_CORRELATION = 0.93
THUMB = 16  # side of the grayscale thumbnail used to confirm near duplicates
DEFAULT_IMBALANCE_THRESHOLD = 5.0
MAX_NEAR_PAIRS = 5000  # stored in the report; more are counted, not listed
HASH_NAME = "dHash-64 + 16x16 thumbnail correlation, plain and centred on the data set mean"
PAIR_CHUNK = 1 << 16  # candidate pairs confirmed at a time (memory: 2 x chunk x 1 KB)
_DEFAULTS = DataConfig(data=".")  # the training defaults for seed and fractions


# --------------------------------------------------------------------------------------------
# hashing


def _gray(image: np.ndarray) -> Image.Image:
    pil = Image.fromarray(image)
    return pil if pil.mode == "L" else pil.convert("L")


def dhash(image: np.ndarray) -> int:
    """64-bit difference hash of an ``(H, W, 3)`` or ``(H, W)`` uint8 image.

    The image is converted to grayscale and box-filtered to 9x8; bit ``8 * row + col`` is set
    when cell ``(row, col)`` is brighter than its right neighbour.
    """
    return _dhash(_gray(image))


def _dhash(gray: Image.Image) -> int:
    small = np.asarray(gray.resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (small[:, :-1] > small[:, 1:]).reshape(-1)
    return int(np.packbits(bits).view(">u8")[0])


def thumbnail(image: np.ndarray | Image.Image) -> np.ndarray:
    """Zero-mean, unit-norm 16x16 grayscale thumbnail (float32, flattened); the dot product of
    two is their Pearson correlation (a constant image gives zeros)."""
    gray = image if isinstance(image, Image.Image) else _gray(image)
    t = np.asarray(gray.resize((THUMB, THUMB), Image.Resampling.BOX), np.float32).reshape(-1)
    t = t - t.mean()
    norm = float(np.linalg.norm(t))
    return t / norm if norm > 0 else t


def centred_correlation(a: np.ndarray, b: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Correlation of thumbnails ``a`` and ``b`` after subtracting ``template`` from both.

    With ``template`` the mean thumbnail of the *other* images of a data set, this measures how
    much the two images agree in what sets them apart from the rest, not in what every image of
    the set shares (the layout of a chest X-ray, the dark lower half of an ultrasound frame).

    Args:
        a: Thumbnails, ``(..., D)`` (as :func:`thumbnail` makes them, flattened).
        b: Thumbnails of the same shape.
        template: ``(D,)`` or broadcastable to ``a``.

    Returns:
        ``(...)`` float array in [-1, 1]; 0 where a deviation is all zeros.
    """
    da, db = a - template, b - template
    norms = np.linalg.norm(da, axis=-1) * np.linalg.norm(db, axis=-1)
    dots = np.einsum("...i,...i->...", da, db)
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def hamming_pairs(
    hashes: np.ndarray, threshold: int, *, block: int = 1024
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` whose 64-bit hashes differ in at most ``threshold`` bits.

    Args:
        hashes: ``uint64`` array of N hashes.
        threshold: Maximum Hamming distance (inclusive).
        block: Rows per block of the distance matrix (memory is ``block x N`` bytes).

    Returns:
        ``(i, j, distance)`` int arrays, sorted by ``i`` then ``j``.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    found_i, found_j, found_d = [], [], []
    for start in range(0, len(hashes), block):
        rows = hashes[start : start + block]
        # Only columns after the block's first row; the per-row j > i mask removes the rest.
        cols = hashes[start:]
        dist = np.bitwise_count(rows[:, None] ^ cols[None, :])
        r, c = np.nonzero(dist <= threshold)
        keep = c > r
        r, c = r[keep], c[keep]
        found_i.append(r + start)
        found_j.append(c + start)
        found_d.append(dist[r, c].astype(np.int64))
    if not found_i:
        empty = np.zeros(0, np.int64)
        return empty, empty.copy(), empty.copy()
    return (
        np.concatenate(found_i).astype(np.int64),
        np.concatenate(found_j).astype(np.int64),
        np.concatenate(found_d),
    )


# --------------------------------------------------------------------------------------------
# report


@dataclass
class CheckReport:
    """Findings of :func:`check_dataset`; ``errors`` decide the exit status.

    Attributes:
        source: The path checked.
        format: Resolved format (``imagefolder``, ``busi``, ``medmnist``, ...); "" if unknown.
        layout: Catalog layout (``flat`` / ``split``).
        classes: Class names.
        split_kind: Per split, how it is made (``official``, ``seeded-stratified``, ...).
        counts: ``{split: {class: n}}``.
        total: Number of samples.
        sizes: ``{"width"|"height": {"min", "median", "max"}}`` of the readable images.
        modes: Pillow mode (``RGB``, ``L``, ``I;16``, ``DICOM``, ``array-L``...) -> count.
        file_types: File extension (or ``npz``) -> count.
        unreadable: ``[{id, split, label, error}]``.
        exact_duplicates: ``[{members: [{id, split, label}], label_conflict, leakage}]``.
        near_duplicates: ``[{a, b, distance, correlation, centred_correlation,
            label_conflict, leakage}]`` (at most
            ``MAX_NEAR_PAIRS`` listed; ``near_duplicate_pairs`` counts all).
        near_duplicate_pairs: Number of near-duplicate pairs found.
        near_rejected_pairs: Candidate pairs whose thumbnails correlate but whose centred
            correlation falls short (alike only in what the whole data set shares; not listed).
        imbalance: ``{ratio, largest, smallest, threshold, flagged}``.
        skipped: Files skipped while listing (masks, non-images, hidden, ...).
        notes: Remarks of the reader (e.g. no patient ids, unlisted files).
        errors: Problems that make the data unfit as is (non-zero exit).
        warnings: Problems worth a look.
        settings: Parameters of the check.
        seconds: Wall time of the check.
    """

    source: str
    format: str = ""
    layout: str = ""
    classes: list[str] = field(default_factory=list)
    split_kind: dict[str, str] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    total: int = 0
    sizes: dict[str, dict[str, float]] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    file_types: dict[str, int] = field(default_factory=dict)
    unreadable: list[dict[str, str]] = field(default_factory=list)
    exact_duplicates: list[dict[str, Any]] = field(default_factory=list)
    near_duplicates: list[dict[str, Any]] = field(default_factory=list)
    near_duplicate_pairs: int = 0
    near_rejected_pairs: int = 0
    imbalance: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when there is no error."""
        return not self.errors

    @property
    def exit_code(self) -> int:
        """1 when there are errors, else 0."""
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-able data (plus ``ok`` and ``exit_code``)."""
        return {**asdict(self), "ok": self.ok, "exit_code": self.exit_code}

    def to_json(self, indent: int = 2) -> str:
        """The report as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path`` durably (:func:`shpeft.io_utils.write_text`)."""
        return write_text(path, self.to_json() + "\n")

    def format_text(self, max_items: int = 10) -> str:
        """A readable multi-line report; lists are cut after ``max_items`` entries."""
        out = [f"shpeft data check: {self.source}"]
        if self.format:
            kinds = ", ".join(f"{s} {k}" for s, k in self.split_kind.items())
            out.append(
                f"format {self.format} ({self.layout}), {self.total} images, "
                f"{len(self.classes)} classes; split: {kinds or '-'}"
            )
        if self.counts:
            splits = [s for s in SPLITS if s in self.counts]
            width = max([len(c) for c in self.classes] + [5])
            out.append("")
            out.append(f"  {'class':<{width}}" + "".join(f"{s:>8}" for s in splits) + "   total")
            for c in self.classes:
                row = [self.counts[s].get(c, 0) for s in splits]
                out.append(f"  {c:<{width}}" + "".join(f"{n:>8}" for n in row) + f"{sum(row):>8}")
            col = [sum(self.counts[s].values()) for s in splits]
            out.append(f"  {'total':<{width}}" + "".join(f"{n:>8}" for n in col) + f"{sum(col):>8}")
            out.append("")
        if self.sizes:
            w, h = self.sizes["width"], self.sizes["height"]
            out.append(
                f"sizes (min/median/max): width {w['min']:g}/{w['median']:g}/{w['max']:g}, "
                f"height {h['min']:g}/{h['median']:g}/{h['max']:g}"
            )
        if self.modes:
            out.append("modes: " + ", ".join(f"{m} {n}" for m, n in self.modes.items()))
        if self.file_types:
            out.append("files: " + ", ".join(f"{t} {n}" for t, n in self.file_types.items()))
        skipped = {k: v for k, v in self.skipped.items() if v}
        if skipped:
            out.append("skipped: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
        for note in self.notes:
            out.append(f"note: {note}")
        if self.imbalance:
            im = self.imbalance
            out.append(
                f"imbalance: largest/smallest = {im['ratio']:.2f} ({im['largest']} / "
                f"{im['smallest']}), threshold {im['threshold']:g}"
                + (" -> FLAGGED" if im["flagged"] else "")
            )
        if self.format:
            out.append(f"unreadable files: {len(self.unreadable)}")
            for u in self.unreadable[:max_items]:
                out.append(f"  {u['id']}: {u['error']}")
            _more(out, self.unreadable, max_items)
            out.append(f"exact duplicates (decoded pixels): {len(self.exact_duplicates)} group(s)")
            for g in self.exact_duplicates[:max_items]:
                members = " = ".join(_member(m) for m in g["members"])
                out.append(f"  {_tags(g)}{members}")
            _more(out, self.exact_duplicates, max_items)
            s = self.settings
            out.append(
                f"near duplicates (dHash distance <= {s.get('near_threshold')}, thumbnail "
                f"correlation >= {s.get('near_correlation')}, centred correlation >= "
                f"{s.get('near_centred_correlation')}): {self.near_duplicate_pairs} pair(s)"
            )
            if self.near_rejected_pairs:
                out.append(
                    f"  ({self.near_rejected_pairs} more pair(s) correlate only in what the whole "
                    "data set shares: not flagged)"
                )
            for p in self.near_duplicates[:max_items]:
                out.append(
                    f"  d={p['distance']} r={p['correlation']:.3f} "
                    f"rc={p['centred_correlation']:.3f} {_tags(p)}{_member(p['a'])} ~ "
                    f"{_member(p['b'])}"
                )
            _more(out, self.near_duplicates, max_items, total=self.near_duplicate_pairs)
        out.append("")
        if self.errors:
            out.append(f"ERRORS ({len(self.errors)}):")
            out += [f"  - {e}" for e in self.errors]
        if self.warnings:
            out.append(f"WARNINGS ({len(self.warnings)}):")
            out += [f"  - {w}" for w in self.warnings]
        verdict = "FAILED" if self.errors else "OK"
        out.append(
            f"result: {verdict} ({len(self.errors)} error(s), {len(self.warnings)} warning(s); "
            f"{self.seconds:.1f} s)"
        )
        return "\n".join(out)


def _member(m: dict[str, str]) -> str:
    return f"{m['id']} ({m['label']}, {m['split']})"


def _tags(item: dict[str, Any]) -> str:
    tags = [
        t
        for t, on in (("LEAKAGE", item["leakage"]), ("LABEL CONFLICT", item["label_conflict"]))
        if on
    ]
    return "".join(f"[{t}] " for t in tags)


def _more(out: list[str], items: list, max_items: int, total: int | None = None) -> None:
    total = len(items) if total is None else total
    if total > max_items:
        out.append(f"  ... ({total - max_items} more; see the JSON report)")


# --------------------------------------------------------------------------------------------
# check


@dataclass
class _Sample:
    id: str
    split: str  # split the sample lands in (train/val/test)
    label: str
    path: str | None = None
    row: int | None = None  # row in the catalog group's array (npz)
    group: str = ""


@dataclass
class _Seen:
    width: int = 0
    height: int = 0
    mode: str = ""
    exact: str = ""
    near: int = 0
    thumb: np.ndarray | None = None
    error: str | None = None


def _inspect_file(path: str) -> _Seen:
    try:
        if Path(path).suffix.lower() in DICOM_EXTENSIONS:
            mode = "DICOM"
        else:
            try:
                with Image.open(path) as im:  # header only: cheap, gives the stored mode
                    mode = im.mode
            except Exception:
                mode = "?"  # read_image below raises the clear error
        image = read_image(path)
    except DataError as e:
        return _Seen(error=str(e))
    except Exception as e:  # anything else a broken file may trigger: report, don't crash
        return _Seen(error=f"{path}: {type(e).__name__}: {e}")
    gray = _gray(image)
    return _Seen(
        image.shape[1], image.shape[0], mode, array_key(image), _dhash(gray), thumbnail(gray)
    )


def _inspect_array(image: np.ndarray) -> _Seen:
    mode = "array-L" if image.ndim == 2 else "array-RGB"
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    # Key the RGB form, as read_image would return it, so gray and RGB copies compare equal.
    gray = _gray(image)
    return _Seen(
        image.shape[1], image.shape[0], mode, array_key(rgb), _dhash(gray), thumbnail(gray)
    )


def _samples(catalog: Catalog, split_of: dict[tuple[str, int], str]) -> list[_Sample]:
    samples = []
    for key, group in catalog.groups.items():
        for i, (sample_id, label) in enumerate(zip(group.ids, group.labels, strict=True)):
            samples.append(
                _Sample(
                    id=sample_id,
                    split=split_of.get((key, i), "unused"),
                    label=label,
                    path=group.paths[i] if group.paths is not None else None,
                    row=i if group.images is not None else None,
                    group=key,
                )
            )
    return samples


def check_dataset(
    path: str | os.PathLike[str],
    data_format: str = "auto",
    *,
    split_seed: int = _DEFAULTS.split_seed,
    val_fraction: float = _DEFAULTS.val_fraction,
    test_fraction: float = _DEFAULTS.test_fraction,
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    near_correlation: float = DEFAULT_NEAR_CORRELATION,
    near_centred_correlation: float = DEFAULT_NEAR_CENTRED_CORRELATION,
    imbalance_threshold: float = DEFAULT_IMBALANCE_THRESHOLD,
    allow_leakage: bool = False,
    allow_label_conflicts: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> CheckReport:
    """Check a data set (see the module docstring for what is reported and how severe).

    A source that cannot even be listed (missing folder, manifest naming missing files, an
    empty class folder, labels out of range, ...) gives a report whose only error is that
    message, not an exception.

    Args:
        path: Folder, CSV manifest or MedMNIST ``.npz``.
        data_format: ``auto`` or a format name (as ``DataConfig.data_format``).
        split_seed: Seed of the split training would make (for per-split counts and leakage).
        val_fraction: As ``DataConfig.val_fraction``.
        test_fraction: As ``DataConfig.test_fraction``.
        near_threshold: Maximum dHash Hamming distance (of 64 bits) of near-duplicate
            candidates; negative to skip the near-duplicate search.
        near_correlation: Minimum thumbnail correlation of a candidate.
        near_centred_correlation: Minimum centred thumbnail correlation (see
            :func:`centred_correlation`) that confirms a candidate.
        imbalance_threshold: Flag a largest/smallest class ratio above this.
        allow_leakage: Report exact train-val/test duplicates as warnings, not errors.
        allow_label_conflicts: Report exact duplicates with different labels as warnings.
        progress: Show progress over the images (a bar on a terminal, log lines otherwise).
        workers: Decoding threads (default: up to 4, bounded by the CPU count).

    Returns:
        The report; ``report.exit_code`` is 1 when it has errors.
    """
    start = time.perf_counter()
    report = CheckReport(source=str(path))
    report.settings = {
        "data_format": data_format,
        "split_seed": split_seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "hash": HASH_NAME,
        "near_threshold": near_threshold,
        "near_correlation": near_correlation,
        "near_centred_correlation": near_centred_correlation,
        "imbalance_threshold": imbalance_threshold,
        "allow_leakage": allow_leakage,
        "allow_label_conflicts": allow_label_conflicts,
    }
    try:
        catalog = read_catalog(path, data_format)
    except DataError as e:
        report.errors.append(str(e))
        report.seconds = time.perf_counter() - start
        return report
    report.format, report.layout = catalog.format, catalog.layout
    report.classes = list(catalog.classes)
    report.skipped = dict(catalog.skipped)
    report.notes = list(catalog.notes)

    # Decode everything once, in catalog order.
    flat: list[tuple[str, int]] = [(k, i) for k, g in catalog.groups.items() for i in range(len(g))]
    n_workers = workers or max(1, min(4, os.cpu_count() or 1))

    def inspect(item: tuple[str, int]) -> _Seen:
        key, i = item
        group = catalog.groups[key]
        if group.images is not None:
            return _inspect_array(group.images[i])
        return _inspect_file(group.paths[i])  # type: ignore[index]

    with progress_bar(
        total=len(flat), desc="checking images", enabled=progress, leave=False
    ) as bar:
        seen: list[_Seen] = []
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            for result in pool.map(inspect, flat, chunksize=16):
                seen.append(result)
                bar.update()
    where = {item: n for n, item in enumerate(flat)}

    # The split training would make, with exact duplicates kept together as training does.
    pool_key = pool_of(catalog)
    keys = None
    if pool_key is not None:
        keys = [
            seen[where[(pool_key, i)]].exact or f"unreadable:{i}"
            for i in range(len(catalog.groups[pool_key]))
        ]
    try:
        plan = plan_split(
            catalog,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=split_seed,
            duplicate_keys=keys,
            duplicates_by="pixels",
        )
    except (DataError, ValueError) as e:
        report.errors.append(str(e))
        report.seconds = time.perf_counter() - start
        return report
    split_of: dict[tuple[str, int], str] = {}
    for split, sel in plan.selections.items():
        for key, idx in sel:
            for i in idx.tolist():
                split_of[(key, i)] = split
    report.split_kind = {s: plan.kinds[s] for s in SPLITS if s in plan.selections}
    samples = _samples(catalog, split_of)  # same order as `flat`
    report.total = len(samples)

    _counts(report, samples)
    _sizes_and_modes(report, samples, seen)
    _unreadable(report, samples, seen)
    _exact(report, samples, seen, allow_leakage, allow_label_conflicts)
    if near_threshold >= 0:
        _near(report, samples, seen, near_threshold, near_correlation, near_centred_correlation)
    _classes(report, imbalance_threshold)
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _counts(report: CheckReport, samples: list[_Sample]) -> None:
    counts: dict[str, dict[str, int]] = {}
    for s in samples:
        counts.setdefault(s.split, dict.fromkeys(report.classes, 0))
        counts[s.split][s.label] = counts[s.split].get(s.label, 0) + 1
    report.counts = {s: counts[s] for s in (*SPLITS, "unused") if s in counts}


def _sizes_and_modes(report: CheckReport, samples: list[_Sample], seen: list[_Seen]) -> None:
    ok = [v for v in seen if v.error is None]
    if ok:
        for name, values in (("width", [v.width for v in ok]), ("height", [v.height for v in ok])):
            report.sizes[name] = {
                "min": int(np.min(values)),
                "median": float(np.median(values)),
                "max": int(np.max(values)),
            }
    report.modes = dict(Counter(v.mode for v in ok).most_common())
    types = Counter(Path(s.path).suffix.lower() or "(none)" if s.path else "npz" for s in samples)
    report.file_types = dict(types.most_common())


def _unreadable(report: CheckReport, samples: list[_Sample], seen: list[_Seen]) -> None:
    for s, v in zip(samples, seen, strict=True):
        if v.error is not None:
            report.unreadable.append(
                {"id": s.id, "split": s.split, "label": s.label, "error": v.error}
            )
    if report.unreadable:
        first = report.unreadable[0]["error"]
        report.errors.append(
            f"{len(report.unreadable)} unreadable image(s), e.g. {first}"
            + ("" if len(report.unreadable) == 1 else " (all listed under 'unreadable files')")
        )


def _describe(s: _Sample) -> dict[str, str]:
    return {"id": s.id, "split": s.split, "label": s.label}


def _leaks(splits: Iterable[str]) -> bool:
    splits = set(splits)
    return "train" in splits and bool(splits & {"val", "test"})


def _exact(
    report: CheckReport,
    samples: list[_Sample],
    seen: list[_Seen],
    allow_leakage: bool,
    allow_label_conflicts: bool,
) -> None:
    members: dict[str, list[int]] = {}
    for n, v in enumerate(seen):
        if v.error is None:
            members.setdefault(v.exact, []).append(n)
    conflicts = leaks = within = other = 0
    for rows in members.values():
        if len(rows) < 2:
            continue
        group = [samples[n] for n in rows]
        conflict = len({s.label for s in group}) > 1
        leak = _leaks(s.split for s in group)
        report.exact_duplicates.append(
            {"members": [_describe(s) for s in group], "label_conflict": conflict, "leakage": leak}
        )
        conflicts += conflict
        leaks += leak
        if not conflict and not leak:
            if len({s.split for s in group}) == 1:
                within += 1
            else:
                other += 1
    report.exact_duplicates.sort(key=lambda g: (not g["leakage"], not g["label_conflict"]))

    def example(pred) -> str:
        g = next(g for g in report.exact_duplicates if pred(g))
        return " = ".join(_member(m) for m in g["members"])

    if leaks:
        message = (
            f"{leaks} exact duplicate group(s) span train and val/test (leakage), e.g. "
            f"{example(lambda g: g['leakage'])}"
        )
        (report.warnings if allow_leakage else report.errors).append(message)
    if conflicts:
        message = (
            f"{conflicts} exact duplicate group(s) carry different labels (label conflict), e.g. "
            f"{example(lambda g: g['label_conflict'])}"
        )
        (report.warnings if allow_label_conflicts else report.errors).append(message)
    if within:
        report.warnings.append(
            f"{within} exact duplicate group(s) within a class and split, e.g. "
            f"{example(lambda g: not g['label_conflict'] and not g['leakage'])}"
        )
    if other:
        report.warnings.append(f"{other} exact duplicate group(s) span val and test")


def _near(
    report: CheckReport,
    samples: list[_Sample],
    seen: list[_Seen],
    threshold: int,
    min_correlation: float,
    min_centred: float,
) -> None:
    ok = [n for n, v in enumerate(seen) if v.error is None]
    if len(ok) < 2:
        return
    hashes = np.array([seen[n].near for n in ok], dtype=np.uint64)
    ii, jj, dd = hamming_pairs(hashes, threshold)
    thumbs = np.stack([seen[n].thumb for n in ok])  # type: ignore[misc]  # (N, 256)
    # Plain correlation first, in chunks: a data set of look-alikes (chest X-rays) gives millions
    # of dHash candidates, and gathering all their thumbnails at once would take gigabytes.
    keep = np.zeros(len(ii), dtype=bool)
    for start in range(0, len(ii), PAIR_CHUNK):
        i, j = ii[start : start + PAIR_CHUNK], jj[start : start + PAIR_CHUNK]
        corr = np.einsum("ij,ij->i", thumbs[i], thumbs[j])
        keep[start : start + PAIR_CHUNK] = corr >= min_correlation
    ii, jj, dd = ii[keep], jj[keep], dd[keep]
    exact = np.array([seen[n].exact for n in ok])
    distinct = exact[ii] != exact[jj]  # exact duplicates are reported as such
    ii, jj, dd = ii[distinct], jj[distinct], dd[distinct]
    a, b = thumbs[ii], thumbs[jj]
    corr = np.einsum("ij,ij->i", a, b)
    # Mean thumbnail of the other images (leave the pair out, so that a small set's mean is not
    # pulled towards the pair itself); with no other image, no template (plain correlation).
    n = len(ok)
    template = (thumbs.sum(0) - a - b) / (n - 2) if n > 2 else np.zeros_like(a)
    centred = centred_correlation(a, b, template)
    confirmed = centred >= min_centred
    report.near_rejected_pairs = int((~confirmed).sum())
    kinds = Counter()
    pairs = []
    for i, j, d, c, cc in zip(
        ii[confirmed].tolist(),
        jj[confirmed].tolist(),
        dd[confirmed].tolist(),
        corr[confirmed].tolist(),
        centred[confirmed].tolist(),
        strict=True,
    ):
        sa, sb = samples[ok[i]], samples[ok[j]]
        conflict, leak = sa.label != sb.label, _leaks((sa.split, sb.split))
        kinds["label_conflict"] += conflict
        kinds["leakage"] += leak
        kinds["total"] += 1
        if len(pairs) < MAX_NEAR_PAIRS:
            pairs.append(
                {
                    "a": _describe(sa),
                    "b": _describe(sb),
                    "distance": int(d),
                    "correlation": round(float(c), 4),
                    "centred_correlation": round(float(cc), 4),
                    "label_conflict": conflict,
                    "leakage": leak,
                }
            )
    pairs.sort(key=lambda p: (not p["leakage"], not p["label_conflict"], -p["centred_correlation"]))
    report.near_duplicates = pairs
    report.near_duplicate_pairs = kinds["total"]
    if kinds["total"]:
        report.warnings.append(
            f"{kinds['total']} near-duplicate pair(s) (dHash distance <= {threshold}, "
            f"correlation >= {min_correlation:g}, centred correlation >= {min_centred:g}): "
            f"{kinds['leakage']} across train and val/test, {kinds['label_conflict']} with "
            "different labels; look at them (they may be re-encoded or edited copies, or other "
            "frames of one acquisition)"
        )


def _classes(report: CheckReport, imbalance_threshold: float) -> None:
    totals = dict.fromkeys(report.classes, 0)
    for per_class in report.counts.values():
        for c, n in per_class.items():
            totals[c] = totals.get(c, 0) + n
    empty = [c for c, n in totals.items() if n == 0]
    if empty:
        report.errors.append(f"empty class(es) with no samples: {empty}")
    present = {c: n for c, n in totals.items() if n > 0}
    if len(present) < 2:
        report.errors.append(
            f"only {len(present)} class(es) with samples ({sorted(present)}); classification "
            "needs at least two"
        )
    if present:
        largest = max(present, key=lambda c: present[c])
        smallest = min(reversed(list(present)), key=lambda c: present[c])
        ratio = present[largest] / present[smallest]
        flagged = ratio > imbalance_threshold
        report.imbalance = {
            "ratio": round(ratio, 3),
            "largest": f"{largest} {present[largest]}",
            "smallest": f"{smallest} {present[smallest]}",
            "threshold": imbalance_threshold,
            "flagged": flagged,
        }
        if flagged:
            report.warnings.append(
                f"class imbalance: {largest} has {ratio:.1f}x the samples of {smallest} "
                f"({present[largest]} vs {present[smallest]}); consider class weights or "
                "balanced sampling and report macro metrics"
            )
    tiny = [c for c, n in present.items() if n < 3]
    if tiny:
        report.warnings.append(f"class(es) with fewer than 3 samples: {tiny}")
    train = report.counts.get("train", {})
    for split in ("val", "test"):
        counts = report.counts.get(split)
        if not counts:
            continue
        absent_train = [c for c, n in counts.items() if n and not train.get(c)]
        if absent_train:
            report.errors.append(f"class(es) {absent_train} are in {split} but not in train")
        missing = [c for c in present if not counts.get(c)]
        if missing:
            report.warnings.append(f"the {split} split has no samples of {missing}")


# --------------------------------------------------------------------------------------------
# CLI


def add_check_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``shpeft data check`` to ``parser`` (a subcommand parser)."""
    parser.add_argument("path", help="folder, CSV manifest or MedMNIST .npz to check")
    parser.add_argument(
        "--data-format",
        default="auto",
        choices=FORMATS,
        help="source format (default: auto-detect, as in training)",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    parser.add_argument(
        "--near-threshold",
        type=int,
        default=DEFAULT_NEAR_THRESHOLD,
        metavar="N",
        help="near-duplicate candidates: 64-bit dHash Hamming distance <= N (default "
        "%(default)s; -1 skips the search)",
    )
    parser.add_argument(
        "--near-correlation",
        type=float,
        default=DEFAULT_NEAR_CORRELATION,
        metavar="R",
        help="near duplicates: 16x16 grayscale thumbnails correlate >= R (default %(default)s)",
    )
    parser.add_argument(
        "--near-centred-correlation",
        type=float,
        default=DEFAULT_NEAR_CENTRED_CORRELATION,
        metavar="R",
        help="confirm a near duplicate when the thumbnails' deviations from the data set's mean "
        "thumbnail correlate >= R (default %(default)s; measured precision in "
        "benchmarks/results/data_check)",
    )
    parser.add_argument(
        "--imbalance-threshold",
        type=float,
        default=DEFAULT_IMBALANCE_THRESHOLD,
        help="warn when the largest class has more than this many times the samples of the "
        "smallest (default %(default)s)",
    )
    parser.add_argument(
        "--allow-leakage",
        action="store_true",
        help="report exact duplicates across train and val/test as warnings, not errors",
    )
    parser.add_argument(
        "--allow-label-conflicts",
        action="store_true",
        help="report exact duplicates with different labels as warnings, not errors",
    )
    parser.add_argument(
        "--split-seed", type=int, default=_DEFAULTS.split_seed, help="seed of the split to check"
    )
    parser.add_argument("--val-fraction", type=float, default=_DEFAULTS.val_fraction)
    parser.add_argument("--test-fraction", type=float, default=_DEFAULTS.test_fraction)
    parser.add_argument(
        "--max-items", type=int, default=10, help="entries listed per section of the text report"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run_check(args: argparse.Namespace) -> int:
    """Run ``shpeft data check`` with parsed arguments; prints the text report.

    Returns:
        The exit status: 1 when the report has errors, else 0.
    """
    report = check_dataset(
        args.path,
        args.data_format,
        split_seed=args.split_seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        near_threshold=args.near_threshold,
        near_correlation=args.near_correlation,
        near_centred_correlation=args.near_centred_correlation,
        imbalance_threshold=args.imbalance_threshold,
        allow_leakage=args.allow_leakage,
        allow_label_conflicts=args.allow_label_conflicts,
        progress=not args.no_progress,
    )
    print(report.format_text(max_items=args.max_items))
    if args.json:
        written = report.write_json(args.json)
        print(f"JSON report written to {written}")
    return report.exit_code


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m shpeft.data.check PATH ...``."""
    parser = add_check_arguments(
        argparse.ArgumentParser(prog="shpeft data check", description=__doc__.splitlines()[0])
    )
    return run_check(parser.parse_args(argv))
