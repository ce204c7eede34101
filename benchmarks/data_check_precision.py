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
  Gaussian noise, scored against the data set's mean thumbnail.

Usage: python benchmarks/data_check_precision.py [--out benchmarks/results/data_check/results.json]
(CPU; decodes each image once, plus a few hundred for the synthetic part: a few minutes for the
five sets, most of it CXR3)
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


def wilson_upper(k: int, n: int, z: float = 1.96) -> float | None:
    """Upper end of the Wilson 95% interval of a proportion k/n."""
    if n == 0:
        return None
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre + half) / (1 + z * z / n)


def score_labels(rows: list[dict], flagged_old: list[dict], keep) -> dict:
    """Stratified precision / recall of the old rule and of ``keep`` (pair -> bool) on the labels."""
    by_pair = {frozenset((p["a"]["id"], p["b"]["id"])): p for p in flagged_old}
    sizes = defaultdict(int)
    for p in flagged_old:
        sizes[kind(p)] += 1
    strata: dict[str, dict] = defaultdict(lambda: defaultdict(int))
    targeted = []
    for r in rows:
        p = by_pair.get(frozenset((r["a"], r["b"])))
        if p is None:
            raise SystemExit(f"labelled pair not flagged by the old rule: {r['a']} ~ {r['b']}")
        same, kept = r["label"] == "same", bool(keep(p))
        if r["kind"].startswith("targeted"):
            targeted.append({"a": r["a"], "b": r["b"], "label": r["label"], "kept": kept})
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
        precision_old_wilson_upper=wilson_upper(same, n),
        precision_new=est["new_same"] / est["new"] if est["new"] else None,
        precision_new_wilson_upper=wilson_upper(kept_same, kept),
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


def synthetic_recall(path: Path, n_sources: int = 20, n_template: int = 400) -> dict:
    """Whether edited copies of real images pass all three stages of the new rule."""
    catalog = read_catalog(path, "auto")
    items = [(g, i) for g in catalog.groups.values() for i in range(len(g))]

    def gray(item) -> Image.Image:
        group, i = item
        image = group.images[i] if group.images is not None else read_image(group.paths[i])
        pil = Image.fromarray(image)
        return pil if pil.mode == "L" else pil.convert("L")

    pick = random.Random(f"synthetic-{path.name}").sample(range(len(items)), len(items))
    sources, rest = pick[:n_sources], pick[n_sources : n_sources + n_template]
    template = np.mean([thumbnail(gray(items[k])) for k in rest], axis=0)
    rng = np.random.default_rng(0)
    found: dict[str, int] = dict.fromkeys(EDITS, 0)
    found_old: dict[str, int] = dict.fromkeys(EDITS, 0)
    worst: dict[str, float] = dict.fromkeys(EDITS, 1.0)
    for k in sources:
        original = gray(items[k])
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"), help="the shared folder")
    parser.add_argument("--labels", default=str(RESULTS / "labels.csv"))
    parser.add_argument("--out", default=str(RESULTS / "results.json"))
    parser.add_argument("--only", nargs="*", choices=list(DATASETS), help="data sets to run")
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
        entry = {
            "images": report.total,
            "exact_groups": len(report.exact_duplicates),
            "old": summary(old),
            "new": summary(new),
            "labels": score_labels(rows, old, lambda p: p["centred_correlation"] >= threshold),
            "known_copies": known_copies(name, report),
            "check_seconds": report.seconds,
            "synthetic_copies": synthetic_recall(path),
            "lowest_centred_among_old": sorted(
                (round(p["centred_correlation"], 4), p["a"]["id"], p["b"]["id"]) for p in old
            )[:3],
            "highest_centred_among_old": sorted(
                ((round(p["centred_correlation"], 4), p["a"]["id"], p["b"]["id"]) for p in old),
                reverse=True,
            )[:3],
        }
        results["datasets"][name] = entry
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
