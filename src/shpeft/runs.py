"""A run directory: what a run writes, and the API that reads it back.

``shpeft train`` (:func:`shpeft.training.train`) writes into one folder: ``config.json`` (the
resolved configuration, input spec, base hash, environment), ``split.json`` (the exact samples of
each split), ``train_log.jsonl``, ``metrics.json``, ``delta.safetensors`` and the method's
artefacts. This module is the other side: load a run's config, model (base backbone + delta),
base model and recorded splits; evaluate its test split once; and the small helpers the training
loop uses to write the folder. Nothing here trains.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from shpeft._version import __version__
from shpeft.backbones import create_model, hash_backbone
from shpeft.config import BackboneConfig, from_dict
from shpeft.data import load_eval_data, make_loader
from shpeft.delta import Delta, apply_delta
from shpeft.evaluate import compute_metrics, format_metrics, predict, save_confusion_matrix_png
from shpeft.io_utils import write_json, write_text
from shpeft.methods import Method, get_method

log = logging.getLogger("shpeft")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def environment() -> dict[str, Any]:
    """Versions and the git commit, recorded beside every result."""
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or None
        )
    import timm

    return {
        "shpeft": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        **cpu_info(),
    }


#: CPU features that change which kernels torch runs (bf16 and AMX paths round differently)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_info() -> dict[str, Any]:
    """The CPU a run used: model, torch's kernel level and the flags in :data:`CPU_FLAGS`.

    Recorded because a seeded CPU run is bit-reproducible on one machine but not across CPU
    models: different kernels round differently and a short fine-tuning run amplifies it."""
    model, flags = platform.processor() or None, set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return {
        "cpu": model,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
    }


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse a used run directory unless ``overwrite``, then clear what a run writes there.

    Called with the run lock held, so a run in progress is never cleared under its feet.
    """
    used = [p for p in run_dir.iterdir() if p.name != ".lock"]
    if used and not overwrite:
        raise FileExistsError(
            f"run directory {run_dir} exists and is not empty (use --overwrite, or --resume to continue it)"
        )
    for p in used:
        if p.is_file() or p.is_symlink():
            p.unlink()
        elif p.name == "checkpoints":
            shutil.rmtree(p)


def truncate_log(path: Path, iteration: int) -> None:
    """Drop log rows after ``iteration`` (written after the checkpoint a resume starts from)."""
    if iteration == 0 or not path.is_file():
        write_text(path, "")
        return
    rows = [r for r in path.read_text().splitlines() if r.strip()]
    keep = []
    for r in rows:
        try:
            if json.loads(r).get("iteration", 0) <= iteration:
                keep.append(r)
        except json.JSONDecodeError:  # a row cut by the kill
            continue
    write_text(path, "".join(r + "\n" for r in keep))


def load_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a shpeft run directory (no config.json)")
    return json.loads(path.read_text())


def load_run(run_dir: str | os.PathLike, device: str = "cpu", delta_path: str | None = None):
    """Rebuild a trained model from a run directory: base backbone + the method's delta.

    Returns:
        ``(model, classes, input_spec, config_dict)``. For methods that only change existing
        tensors the model is a plain timm model with the delta written into its weights; methods
        that add modules (adapters, LoRA, prompts) are re-built first (see ``Method.build``).
    """
    conf = load_run_config(run_dir)
    bcfg = from_dict(BackboneConfig, conf["backbone"])
    classes = conf["classes"]
    method = method_from_config(conf)
    model, spec = create_model(bcfg, num_classes=len(classes))
    base_hash = hash_backbone(model)
    delta = Delta.load(delta_path or Path(run_dir) / "delta.safetensors")
    method.build(model)
    apply_delta(model, delta, base_hash=base_hash)
    model.to(resolve_device(device)).eval()
    return model, classes, spec, conf


def load_base_model(run_dir: str | os.PathLike) -> nn.Module:
    """The pretrained model a run started from (its backbone config; a fresh, unused head)."""
    conf = load_run_config(run_dir)
    model, _ = create_model(from_dict(BackboneConfig, conf["backbone"]), len(conf["classes"]))
    return model


def method_from_config(conf: dict[str, Any]) -> Method:
    """The run's method object, with the settings recorded in its ``config.json``."""
    cls = get_method(conf["train"]["method"])
    return cls(from_dict(cls.config_cls, conf.get("method") or {}))


def run_split_loader(
    run_dir: str | os.PathLike,
    conf: dict[str, Any],
    spec,
    split: str,
    batch_size: int | None = None,
) -> DataLoader:
    """One split of a run's own data, exactly the ids its ``split.json`` records, in fixed order.

    Only that split is read and decoded. ``batch_size`` defaults to the run's training batch size.
    """
    record = Path(run_dir) / "split.json"
    if not record.is_file():
        raise FileNotFoundError(f"{run_dir} has no split.json: its {split} split is unknown")
    ds = load_eval_data(
        conf["data"]["data"],
        image_size=spec.image_size,
        mean=spec.mean,
        std=spec.std,
        classes=list(conf["classes"]),
        data_format=conf["data"].get("data_format", "auto"),
        split=split,
        interpolation=spec.interpolation,
        split_record=json.loads(record.read_text()),
    )
    return make_loader(
        ds,
        batch_size or conf["train"]["batch_size"],
        seed=0,
        shuffle=False,
        num_workers=conf["data"].get("num_workers", 0),
    )


def evaluate_test(
    run_dir: str | os.PathLike,
    *,
    device: str = "cpu",
    batch_size: int | None = None,
    after: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Evaluate a finished run trained with ``eval_test=False`` on its test split, once.

    The test samples are exactly those of the run's ``split.json`` and the model is the exported
    (best-validation) state in ``delta.safetensors``, the same state ``train`` would have tested.
    ``metrics.json`` gains ``test`` (and loses ``test_skipped``); the updated metrics are returned.
    ``after(run_dir, model=..., test_data=..., test_pred=(labels, probs))`` is then called, e.g.
    :func:`shpeft.report.build.report_after_training` to write the run's report.

    Raises:
        ValueError: the run already has test metrics (the test split is read once per run).
        FileNotFoundError: not a finished run directory.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run (no metrics.json)")
    metrics = json.loads(metrics_path.read_text())
    if metrics.get("test") is not None:
        raise ValueError(f"{run_dir} already has test metrics; the test split is read once")
    model, classes, spec, conf = load_run(run_dir, device=device)
    loader = run_split_loader(run_dir, conf, spec, "test", batch_size)
    test_pred = predict(model, loader, next(model.parameters()).device, progress=False)
    metrics["test"] = compute_metrics(*test_pred, classes)
    metrics.pop("test_skipped", None)
    save_test_confusion(metrics["test"], classes, run_dir, conf["train"]["method"])
    write_json(metrics_path, metrics)
    if after is not None:
        after(run_dir, model=model, test_data=loader.dataset, test_pred=test_pred)
    return metrics


def save_test_confusion(test: dict[str, Any], classes, run_dir: Path, name: str) -> None:
    save_confusion_matrix_png(
        test["confusion_matrix"], classes, run_dir / "confusion_matrix_test.png",
        title=f"{name}: test",
    )  # fmt: skip
    log.info("test:\n%s", format_metrics(test))
