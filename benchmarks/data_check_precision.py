"""Near-duplicate precision and recall of ``shpeft data check`` on the shipped data, against eye labels.

For each data set under ``../shared/data`` this runs the check once with the centred-correlation
confirmation switched off (``near_centred_correlation=-1``: the rule before it existed, dHash
distance <= 6 and thumbnail correlation >= 0.97) and reads the new rule off the same pairs (each
carries its centred correlation), so both rules see the same candidates. It then scores both
rules on:

* the eye labels in ``benchmarks/results/data_check/labels.csv``: a seeded sample of the pairs the
  old rule flagged, stratified by kind (label conflict and leakage, leakage only, label conflict
  only, within a class and split), each pair judged *same* (one picture, edited or re-encoded, or
  another frame or film of one acquisition) or *different*. Precision and recall are stratified
  estimates: each stratum's sample rate is scaled to its size among the old rule's flags;
* the known true copies: BUSI's ``benign (433)`` = ``malignant (145)`` (an exact label conflict),
  its copy in BreastMNIST's train and test, and CXR3's 30 groups of exact duplicates;
* synthetic copies: 20 seeded images per data set, each re-encoded as JPEG, resized to 3/4,
  brightened and re-encoded, gamma-changed, annotated (a letter and a line burnt in) and given
  Gaussian noise, scored against the data set's mean thumbnail;
* the alternatives the new rule was chosen over (plain correlation at 16, 32 and 64 px, centred
  correlation at 32 and 64 px): for each, the lowest score of a pair labelled same and the highest
  of one labelled different, and how many of the old rule's pairs a few thresholds keep.

Usage: python benchmarks/data_check_precision.py [--out results.json] [--montages DIR]
(CPU; decodes each image once for the check, then the flagged pairs and a 420-image sample again:
a few minutes for the five sets, most of it CXR3). ``--montages DIR`` renders the labelled pairs
side by side, to check the labels by eye.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from shpeft.data.check import (
    DEFAULT_NEAR_CENTRED_CORRELATION,
    DEFAULT_NEAR_CORRELATION,
    DEFAULT_NEAR_THRESHOLD,
    centred_correlation,
    check_dataset,
    dhash,
    thumbnail,
)
from shpeft.data.io import read_image
from shpeft.data.sources import read_catalog

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "data_check"
DATASETS = {
    "cxr3": "cxr3",
    "busi_256": "busi_256",
    "breastmnist": "breastmnist/breastmnist.npz",
    "pneumoniamnist_reconstructed": "pneumoniamnist_reconstructed/pneumoniamnist_reconstructed.npz",
    "busi_original_sample": "busi_original_sample",
}
BUSI_PAIR = {"benign/benign (433).png", "malignant/malignant (145).png"}
# Rules compared on the old rule's pairs (each also needs dHash <= 6 and r16 >= 0.97);
# c16 is the check's own value (leave-pair-out mean of the whole set).
RULES = {
    "r16 >= 0.97 (old)": lambda p, m: True,
    "r16 >= 0.985": lambda p, m: m["r16"] >= 0.985,
    "r32 >= 0.97": lambda p, m: m["r32"] >= 0.97,
    "r64 >= 0.95": lambda p, m: m["r64"] >= 0.95,
    "r64 >= 0.97": lambda p, m: m["r64"] >= 0.97,
    "c16 >= 0.93 (new)": lambda p, m: m["c16"] >= 0.93,
    "c32 >= 0.90": lambda p, m: m["c32"] >= 0.90,
    "c64 >= 0.85": lambda p, m: m["c64"] >= 0.85,
}
EDITS = ("jpeg70", "resize0.75", "bright+jpeg", "gamma0.8", "annotated", "noise4")


def kind(pair: dict) -> str:
    return {(1, 1): "conflict+leakage", (1, 0): "conflict", (0, 1): "leakage", (0, 0): "within"}[
        (int(pair["label_conflict"]), int(pair["leakage"]))
    ]


def summary(pairs: list[dict]) -> dict:
    return {
        "pairs": len(pairs),
        "label_conflicts": sum(p["label_conflict"] for p in pairs),
        "leakage": sum(p["leakage"] for p in pairs),
    }


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """Wilson 95% interval of a proportion k/n."""
    if n == 0:
        return None
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)
    return [round(max(low, 0.0), 4), round(min(high, 1.0), 4)]


def score_labels(rows: list[dict], flagged_old: list[dict], keep) -> dict:
    """Stratified precision / recall of the old rule and of ``keep`` (pair -> bool) on the labels."""
    by_pair = {frozenset((p["a"]["id"], p["b"]["id"])): p for p in flagged_old}
    sizes = defaultdict(int)
    for p in flagged_old:
        sizes[kind(p)] += 1
    strata: dict[str, dict] = defaultdict(lambda: defaultdict(int))
    targeted: dict[str, dict] = {}
    for r in rows:
        p = by_pair.get(frozenset((r["a"], r["b"])))
        if p is None:
            raise SystemExit(f"labelled pair not flagged by the old rule: {r['a']} ~ {r['b']}")
        same, kept = r["label"] == "same", bool(keep(p))
        if r["kind"].startswith("targeted"):
            t = targeted.setdefault(r["kind"], defaultdict(int))
            t["n"] += 1
            t["same"] += same
            t["kept"] += kept
            t["kept_same"] += kept and same
            continue
        s = strata[r["kind"]]
        s["n"] += 1
        s["same"] += same
        s["kept"] += kept
        s["kept_same"] += kept and same
    out: dict = {"strata": {}, "targeted": targeted}
    est = defaultdict(float)
    for name, s in strata.items():
        w = sizes[name] / s["n"]
        out["strata"][name] = {"flagged_old": sizes[name], **s}
        est["old"] += w * s["n"]
        est["old_same"] += w * s["same"]
        est["new"] += w * s["kept"]
        est["new_same"] += w * s["kept_same"]
    n = sum(s["n"] for s in strata.values())
    same = sum(s["same"] for s in strata.values())
    kept = sum(s["kept"] for s in strata.values())
    kept_same = sum(s["kept_same"] for s in strata.values())
    out.update(
        labelled=n,
        labelled_same=same,
        labelled_kept=kept,
        labelled_kept_same=kept_same,
        precision_old=est["old_same"] / est["old"] if est["old"] else None,
        precision_old_interval=wilson(same, n),
        precision_new=est["new_same"] / est["new"] if est["new"] else None,
        precision_new_interval=wilson(kept_same, kept),
        recall_new_of_old_true=est["new_same"] / est["old_same"] if est["old_same"] else None,
    )
    return out


def known_copies(name: str, report) -> dict:
    groups = [{m["id"] for m in g["members"]} for g in report.exact_duplicates]
    if name == "busi_256":
        hit = [g for g in report.exact_duplicates if {m["id"] for m in g["members"]} == BUSI_PAIR]
        return {"busi_433_145_found": bool(hit) and hit[0]["label_conflict"]}
    if name == "breastmnist":
        hit = [
            g
            for g in report.exact_duplicates
            if g["label_conflict"] and g["leakage"] and len(g["members"]) == 2
        ]
        members = sorted(m["id"] for m in hit[0]["members"]) if hit else []
        return {"busi_433_145_copy_found": len(hit) == 1, "members": members}
    if name == "cxr3":
        return {"exact_groups": len(groups), "exact_images": sum(len(g) for g in groups)}
    return {"exact_groups": len(groups)}


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("L")


def edited_copies(gray: Image.Image, rng: np.random.Generator) -> dict[str, Image.Image]:
    w, h = gray.size
    annotated = gray.copy()
    draw = ImageDraw.Draw(annotated)
    draw.text((w * 0.05, h * 0.05), "R", fill=255)
    draw.line((w * 0.3, h * 0.6, w * 0.6, h * 0.65), fill=255, width=max(1, w // 100))
    noisy = np.asarray(gray, np.float32) + rng.normal(0, 4, (h, w))
    return {
        "jpeg70": _jpeg(gray, 70),
        "resize0.75": gray.resize(
            (max(8, w * 3 // 4), max(8, h * 3 // 4)), Image.Resampling.BILINEAR
        ),
        "bright+jpeg": _jpeg(ImageEnhance.Brightness(gray).enhance(1.15), 85),
        "gamma0.8": gray.point([round(255 * (v / 255) ** 0.8) for v in range(256)]),
        "annotated": annotated,
        "noise4": Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)),
    }


class Images:
    """Grayscale images of a data set by sample id, decoded on demand (as the check sees them)."""

    def __init__(self, path: Path) -> None:
        catalog = read_catalog(path, "auto")
        self.where = {g.ids[i]: (g, i) for g in catalog.groups.values() for i in range(len(g))}
        self.ids = list(self.where)
        self._cache: dict[str, Image.Image] = {}

    def __call__(self, sample_id: str) -> Image.Image:
        if sample_id not in self._cache:
            group, i = self.where[sample_id]
            image = group.images[i] if group.images is not None else read_image(group.paths[i])
            pil = Image.fromarray(image)
            self._cache[sample_id] = pil if pil.mode == "L" else pil.convert("L")
        return self._cache[sample_id]


def thumb(gray: Image.Image, size: int) -> np.ndarray:
    """:func:`thumbnail` at another size."""
    t = np.asarray(gray.resize((size, size), Image.Resampling.BOX), np.float32).reshape(-1)
    t = t - t.mean()
    norm = float(np.linalg.norm(t))
    return t / norm if norm > 0 else t


METRICS = ("r16", "r32", "r64", "c16", "c32", "c64")


def alternatives(pairs: list[dict], images: Images, template_ids: list[str]) -> list[dict]:
    """Other confirmation metrics of each pair: plain (r) and centred (c) correlation of
    thumbnails at 16, 32 and 64 px. ``c16`` is the check's own value (template: the mean of all
    other images); ``c32`` and ``c64`` centre on the mean over ``template_ids`` (a sample)."""
    templates = {s: np.mean([thumb(images(k), s) for k in template_ids], axis=0) for s in (32, 64)}
    out = []
    for p in pairs:
        a, b = images(p["a"]["id"]), images(p["b"]["id"])
        m = {"c16": p["centred_correlation"]}
        for s in (16, 32, 64):
            ta, tb = thumb(a, s), thumb(b, s)
            m[f"r{s}"] = float(ta @ tb)
            if s in templates:
                m[f"c{s}"] = float(centred_correlation(ta, tb, templates[s]))
        out.append(m)
    return out


def margins(rows: list[dict], pairs: list[dict], metrics: list[dict]) -> dict:
    """Per metric: the lowest score of a pair labelled same, the highest of one labelled
    different."""
    index = {
        frozenset((p["a"]["id"], p["b"]["id"])): m for p, m in zip(pairs, metrics, strict=True)
    }
    out = {}
    for label, pick in (("same_min", min), ("different_max", max)):
        scored = [index[frozenset((r["a"], r["b"]))] for r in rows if r["label"] == label[:-4]]
        out[label] = {k: round(pick(m[k] for m in scored), 4) for k in METRICS} if scored else None
    return out


def synthetic_recall(
    images: Images, sources: list[str], template_ids: list[str], seed: int = 0
) -> dict:
    """Whether edited copies of real images pass all three stages of the new rule."""
    template = np.mean([thumbnail(images(k)) for k in template_ids], axis=0)
    rng = np.random.default_rng(seed)
    found: dict[str, int] = dict.fromkeys(EDITS, 0)
    found_old: dict[str, int] = dict.fromkeys(EDITS, 0)
    worst: dict[str, float] = dict.fromkeys(EDITS, 1.0)
    for k in sources:
        original = images(k)
        h0, t0 = dhash(np.asarray(original)), thumbnail(original)
        for name, copy in edited_copies(original, rng).items():
            h1, t1 = dhash(np.asarray(copy)), thumbnail(copy)
            centred = float(centred_correlation(t0, t1, template))
            old = (
                bin(h0 ^ h1).count("1") <= DEFAULT_NEAR_THRESHOLD
                and float(t0 @ t1) >= DEFAULT_NEAR_CORRELATION
            )
            found_old[name] += old
            found[name] += old and centred >= DEFAULT_NEAR_CENTRED_CORRELATION
            worst[name] = min(worst[name], round(centred, 4))
    return {
        "sources": len(sources),
        "found_old": found_old,
        "found": found,
        "recall_old": sum(found_old.values()) / (len(sources) * len(EDITS)),
        "recall": sum(found.values()) / (len(sources) * len(EDITS)),
        "min_centred": worst,
    }


def montages(rows: list[dict], images: Images, dest: Path, name: str, per_page: int = 8) -> None:
    """The labelled pairs as PNG pages, to check the labels by eye: A | B | A red over B cyan
    (aligned content turns gray, anything that moved shows colour fringes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def stretch(g: Image.Image) -> np.ndarray:
        a = np.asarray(g, np.float32)
        lo, hi = np.percentile(a, [1, 99])
        return np.clip((a - lo) / max(hi - lo, 1.0), 0, 1)

    dest.mkdir(parents=True, exist_ok=True)
    for page, start in enumerate(range(0, len(rows), per_page), 1):
        chunk = rows[start : start + per_page]
        fig, axes = plt.subplots(len(chunk), 3, figsize=(7.5, 2.6 * len(chunk)), squeeze=False)
        for ax, r in zip(axes, chunk, strict=True):
            a, b = images(r["a"]), images(r["b"])
            ax[0].imshow(a, cmap="gray")
            ax[1].imshow(b, cmap="gray")
            if a.size == b.size:
                sa, sb = stretch(a), stretch(b)
                ax[2].imshow(np.stack([sa, sb, sb], axis=-1))
            ax[0].set_title(r["a"].split("/")[-1], fontsize=7)
            ax[1].set_title(r["b"].split("/")[-1], fontsize=7)
            ax[2].set_title(f"#{r['pair']} {r['kind']}: {r['label']} {r['subtype']}", fontsize=7)
            for x in ax:
                x.axis("off")
        fig.tight_layout(pad=0.3)
        fig.savefig(dest / f"{name}_{page:02d}.png", dpi=72)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"), help="the shared folder")
    parser.add_argument("--labels", default=str(RESULTS / "labels.csv"))
    parser.add_argument("--out", default=str(RESULTS / "results.json"))
    parser.add_argument("--only", nargs="*", choices=list(DATASETS), help="data sets to run")
    parser.add_argument("--montages", metavar="DIR", help="also render the labelled pairs here")
    args = parser.parse_args(argv)
    with open(args.labels, newline="") as f:
        labels = list(csv.DictReader(f))
    threshold = DEFAULT_NEAR_CENTRED_CORRELATION
    results = {
        "rule_old": f"dHash <= {DEFAULT_NEAR_THRESHOLD}, r >= {DEFAULT_NEAR_CORRELATION}",
        "rule_new": f"old rule and centred r >= {threshold}",
        "datasets": {},
    }
    for name, rel in DATASETS.items():
        if args.only and name not in args.only:
            continue
        path = Path(args.shared) / "data" / rel
        if not path.exists():
            print(f"{name}: {path} absent, skipped")
            continue
        start = time.perf_counter()
        report = check_dataset(path, near_centred_correlation=-1.0, progress=False)
        assert report.near_duplicate_pairs == len(report.near_duplicates), "pairs not all listed"
        old = report.near_duplicates
        new = [p for p in old if p["centred_correlation"] >= threshold]
        rows = [r for r in labels if r["dataset"] == name]
        images = Images(path)
        pick = random.Random(f"data-check-{name}").sample(images.ids, len(images.ids))
        sources = pick[:20]
        template_ids = pick if len(pick) <= 420 else pick[20:420]
        metrics = alternatives(old, images, template_ids)
        entry = {
            "images": report.total,
            "exact_groups": len(report.exact_duplicates),
            "old": summary(old),
            "new": summary(new),
            "labels": score_labels(rows, old, lambda p: p["centred_correlation"] >= threshold),
            "known_copies": known_copies(name, report),
            "check_seconds": report.seconds,
            "synthetic_copies": synthetic_recall(images, sources, template_ids),
            "margins": margins(rows, old, metrics),
            "alternative_rules": {
                name: sum(bool(rule(p, m)) for p, m in zip(old, metrics, strict=True))
                for name, rule in RULES.items()
            },
            "lowest_centred_among_old": sorted(
                (round(p["centred_correlation"], 4), p["a"]["id"], p["b"]["id"]) for p in old
            )[:3],
            "highest_centred_among_old": sorted(
                ((round(p["centred_correlation"], 4), p["a"]["id"], p["b"]["id"]) for p in old),
                reverse=True,
            )[:3],
        }
        results["datasets"][name] = entry
        if args.montages:
            montages(rows, images, Path(args.montages), name)
        lab = entry["labels"]
        print(
            f"{name}: flagged {entry['old']} -> {entry['new']}; labelled {lab['labelled']} "
            f"(same {lab['labelled_same']}), precision {lab['precision_old']} -> "
            f"{lab['precision_new']}, recall of labelled-same {lab['recall_new_of_old_true']}; "
            f"known {entry['known_copies']}; synthetic recall "
            f"{entry['synthetic_copies']['recall_old']:.3f} -> "
            f"{entry['synthetic_copies']['recall']:.3f} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
