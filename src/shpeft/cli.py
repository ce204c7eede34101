"""Command line: ``shpeft train | eval | predict | merge | methods | data check | bench | analyze | demo``.

Flags of ``train`` are generated from the config dataclasses (one place for names, types,
defaults and help). ``main(argv)`` is callable from tests with a list of flags.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from shpeft import __version__

log = logging.getLogger("shpeft")

# Errors a user can cause; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,  # disk full, permissions, missing files: the message names the problem
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    KeyError,
    FloatingPointError,
    RuntimeError,
)


def _method_configs() -> dict[str, type]:
    from shpeft.methods import METHODS

    return {name: cls.config_cls for name, cls in sorted(METHODS.items())}


def _add_train_parser(sub) -> None:
    from shpeft.backbones import BackboneConfig
    from shpeft.config import add_dataclass_arguments
    from shpeft.data import DataConfig
    from shpeft.training import TrainConfig

    p = sub.add_parser(
        "train",
        help="fine-tune a backbone on a labelled dataset and write a run directory",
        description="Fine-tune a pretrained ViT with a PEFT method (default: SH-PEFT at 1%%). "
        "Writes config.json, split.json, train_log.jsonl, metrics.json, the confusion matrix and "
        "delta.safetensors into --out.",
    )
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue an interrupted run from its newest good checkpoint (its own config is "
        "used; other flags are ignored except --threads, --device, --progress)",
    )
    p.add_argument(
        "--config",
        help="JSON file with sections backbone/data/train/method "
        "(e.g. a run's config.json); flags given here override it",
    )
    add_dataclass_arguments(p, BackboneConfig, "backbone")
    add_dataclass_arguments(p, DataConfig, "data")
    add_dataclass_arguments(p, TrainConfig, "training")
    seen: set[str] = set()
    for name, cfg_cls in _method_configs().items():
        fields = [f.name for f in dataclasses.fields(cfg_cls)]
        if not fields:
            continue
        add_dataclass_arguments(p, cfg_cls, f"method {name}", skip=tuple(seen))
        seen.update(fields)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shpeft",
        description="SH-PEFT: sparse, importance-selected fine-tuning of vision transformers.",
    )
    parser.add_argument("--version", action="version", version=f"shpeft {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_train_parser(sub)
    from shpeft.analysis import add_subcommands

    add_subcommands(sub, COMMANDS)  # bench, analyze {sparsity,hybridity,locations}
    from shpeft.serve.cli import add_serve_parser

    add_serve_parser(sub, COMMANDS)  # serve

    p = sub.add_parser("eval", help="evaluate a run on a labelled dataset")
    p.add_argument("--run", required=True, help="run directory written by `shpeft train`")
    p.add_argument("--data", required=True, help="folder, CSV manifest or MedMNIST .npz")
    p.add_argument(
        "--data-format", default="auto", help="auto or a layout name (see `shpeft train --help`)"
    )
    p.add_argument(
        "--split",
        default="test",
        choices=("test", "val", "train", "all"),
        help="split to use when the source has splits (else every sample)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="metrics JSON to write (default: RUN/eval_<data name>.json)")

    p = sub.add_parser("predict", help="predict classes of images; CSV on stdout")
    p.add_argument("--run", required=True, help="run directory written by `shpeft train`")
    p.add_argument(
        "--images", required=True, help="an image file or a folder (searched recursively)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", "-o", help="CSV file to write (default: stdout)")

    p = sub.add_parser("merge", help="merge a run's delta into a plain timm checkpoint")
    p.add_argument("--run", required=True, help="run directory written by `shpeft train`")
    p.add_argument("--out", required=True, help="output .safetensors file")

    sub.add_parser("methods", help="list the available PEFT methods")

    from shpeft.data import add_check_arguments

    p = sub.add_parser("data", help="inspect a dataset before training")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    add_check_arguments(
        data_sub.add_parser(
            "check",
            help="counts, sizes, unreadable files, duplicates, label conflicts, leakage, imbalance",
        )
    )

    p = sub.add_parser(
        "demo", help="offline miniature of the paper on real digits (a few minutes on CPU)"
    )
    p.add_argument(
        "--out", default="runs/demo", help="folder for the demo's data, backbone and runs"
    )
    p.add_argument("--iterations", type=int, default=2000, help="fine-tuning iterations per method")
    p.add_argument(
        "--methods", default="shpeft,linear,full", help="comma-separated methods to compare"
    )
    p.add_argument("--ratio", type=float, default=0.01, help="SH-PEFT ratio (0.01 = 1%%)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate of every method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing demo runs")
    return parser


def _read_config_file(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {p} is not valid JSON: {e}") from e


def cmd_train(args: argparse.Namespace) -> int:
    from shpeft.backbones import BackboneConfig
    from shpeft.config import dataclass_from_args
    from shpeft.data import DataConfig
    from shpeft.methods import get_method
    from shpeft.training import RunConfig, TrainConfig, train

    if args.resume:
        from shpeft.training import resume_run

        extra = {k: getattr(args, k) for k in ("progress", "threads", "device") if hasattr(args, k)}
        return _print_summary(resume_run(args.resume, **extra))
    base = _read_config_file(args.config)
    given = vars(args)

    def build(cls, section: str):
        merged = dict(base.get(section, {}))
        merged.update({k: v for k, v in given.items()})
        return dataclass_from_args(cls, merged)

    tc = build(TrainConfig, "train")
    method_cls = get_method(tc.method)
    cfg = RunConfig(
        backbone=build(BackboneConfig, "backbone"),
        data=build(DataConfig, "data"),
        train=tc,
        method=build(method_cls.config_cls, "method"),
    )
    return _print_summary(train(cfg))


def _print_summary(metrics: dict) -> int:
    summary = {k: metrics[k] for k in ("method", "trainable", "best_iteration", "delta_bytes")}
    if "test" in metrics:
        summary["test"] = {k: metrics["test"][k] for k in ("macro_f1", "accuracy", "auc")}
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from shpeft.data import load_eval_data
    from shpeft.evaluate import evaluate, format_metrics
    from shpeft.training import _write_json, load_run, make_loader

    model, classes, spec, _ = load_run(args.run, device=args.device)
    ds = load_eval_data(
        args.data,
        image_size=spec.image_size,
        mean=spec.mean,
        std=spec.std,
        classes=classes,
        data_format=args.data_format,
        split=args.split,
        interpolation=spec.interpolation,
    )
    device = next(model.parameters()).device
    metrics = evaluate(
        model, make_loader(ds, args.batch_size, seed=0, shuffle=False), classes, device
    )
    metrics["data"] = str(args.data)
    out = Path(args.out) if args.out else Path(args.run) / f"eval_{Path(args.data).stem}.json"
    _write_json(out, metrics)
    print(format_metrics(metrics))
    log.info("metrics written to %s", out)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from shpeft.data import ImageFileDataset, list_images
    from shpeft.training import load_run, make_loader

    model, classes, spec, _ = load_run(args.run, device=args.device)
    paths = list_images(args.images)
    ds = ImageFileDataset(
        paths,
        image_size=spec.image_size,
        mean=spec.mean,
        std=spec.std,
        interpolation=spec.interpolation,
    )
    device = next(model.parameters()).device
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(args.output, "w", newline="")) if args.output else sys.stdout
        writer = csv.writer(out)
        writer.writerow(["path", "prediction", *[f"prob_{c}" for c in classes]])
        with torch.no_grad():
            for x, batch_paths in make_loader(ds, args.batch_size, seed=0, shuffle=False):
                probs = model(x.to(device)).float().softmax(-1).cpu()
                for path, pr in zip(batch_paths, probs, strict=True):
                    writer.writerow(
                        [path, classes[int(pr.argmax())], *[f"{v:.6f}" for v in pr.tolist()]]
                    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from shpeft.delta import atomic_save_safetensors
    from shpeft.training import load_run, method_from_config

    model, classes, spec, conf = load_run(args.run, device="cpu")
    model = method_from_config(conf).merge(model)
    meta = {
        "format": "shpeft-merged",
        "shpeft_version": __version__,
        "model": conf["backbone"]["model"],
        "head": conf["backbone"]["head"],
        "classes": json.dumps(classes),
        "input": json.dumps(conf["input"]),
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out = atomic_save_safetensors(state, Path(args.out), meta)
    log.info("merged checkpoint (%d tensors, plain timm keys) written to %s", len(state), out)
    print(out)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from shpeft.methods import METHODS

    width = max(len(n) for n in METHODS)
    for name, cls in sorted(METHODS.items()):
        merge = "" if cls.mergeable else "  [not mergeable]"
        print(f"{name:<{width}}  {cls.summary}{merge}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from shpeft.data import run_check

    return run_check(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from shpeft.demo import run_demo

    run_demo(
        Path(args.out),
        iterations=args.iterations,
        methods=args.methods.split(","),
        ratio=args.ratio,
        lr=args.lr,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "merge": cmd_merge,
    "methods": cmd_methods,
    "data": cmd_data,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shpeft`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"shpeft {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
