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

from shpeft._version import __version__

log = logging.getLogger("shpeft")

# Errors the code raises on purpose for bad input or a bad environment: one line, exit status 2.
# Anything else (a RuntimeError from torch, a KeyError, an AssertionError...) is a bug and keeps
# its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # bad settings or data (DataError, DeltaError are ValueErrors)
    OSError,  # missing files, permissions, disk full, no network: the message names the problem
    FloatingPointError,  # training diverged: the message says how to resume or what to change
)


def _method_configs() -> dict[str, type]:
    from shpeft.methods import METHODS

    return {name: info.config_cls for name, info in sorted(METHODS.items())}


def _add_train_parser(sub) -> None:
    from shpeft.config import BackboneConfig, DataConfig, TrainConfig, add_dataclass_arguments

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
    p.add_argument(
        "--data",
        help="folder, CSV manifest or MedMNIST .npz (default: the run's own recorded split, "
        "from its split.json)",
    )
    p.add_argument(
        "--data-format", default="auto", help="auto or a layout name (see `shpeft train --help`)"
    )
    p.add_argument(
        "--split",
        default="test",
        choices=("test", "val", "train", "all"),
        help="split to use when the source has splits (else every sample); without --data, "
        "which of the run's own splits",
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
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable image (default: report it on stderr, predict the "
        "rest, exit with status 1)",
    )
    p.add_argument(
        "--explain",
        metavar="OUT_DIR",
        help="also write per image an overlay PNG of what the model attended to for its "
        "predicted class (gradient-weighted attention rollout, Chefer et al. 2021), under OUT_DIR",
    )

    p = sub.add_parser("merge", help="merge a run's delta into a plain timm checkpoint")
    p.add_argument("--run", required=True, help="run directory written by `shpeft train`")
    p.add_argument("--out", required=True, help="output .safetensors file")

    sub.add_parser("methods", help="list the available PEFT methods")

    from shpeft.report.command import add_report_parser

    add_report_parser(sub)

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
    from shpeft.config import (
        BackboneConfig,
        DataConfig,
        RunConfig,
        TrainConfig,
        dataclass_from_args,
    )
    from shpeft.methods import method_info
    from shpeft.training import train

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
    method_cls = method_info(tc.method)
    _refuse_other_methods_flags(tc.method, given)
    cfg = RunConfig(
        backbone=build(BackboneConfig, "backbone"),
        data=build(DataConfig, "data"),
        train=tc,
        method=build(method_cls.config_cls, "method"),
    )
    return _print_summary(train(cfg))


def _refuse_other_methods_flags(method: str, given: dict) -> None:
    """A flag of another method's config would be silently ignored: refuse it instead."""
    from shpeft.config import flag
    from shpeft.methods import METHODS

    owners: dict[str, list[str]] = {}
    for name, info in sorted(METHODS.items()):
        for f in dataclasses.fields(info.config_cls):
            owners.setdefault(f.name, []).append(name)
    for field_name, methods in owners.items():
        if field_name in given and method not in methods:
            raise ValueError(
                f"{flag(field_name)} is an option of --method {' / '.join(methods)}, not of "
                f"--method {method}; drop it or choose that method"
            )


def _print_summary(metrics: dict) -> int:
    summary = {k: metrics[k] for k in ("method", "trainable", "best_iteration", "delta_bytes")}
    if "test" in metrics:
        summary["test"] = {k: metrics["test"][k] for k in ("macro_f1", "accuracy", "auc")}
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from shpeft.data import load_eval_data, make_loader
    from shpeft.evaluate import evaluate, format_metrics
    from shpeft.io_utils import write_json
    from shpeft.runs import load_run, run_split_loader

    model, classes, spec, conf = load_run(args.run, device=args.device)
    if args.data is None:  # the run's own recorded split (split.json), e.g. its test set
        split = "test" if args.split == "all" else args.split
        loader = run_split_loader(args.run, conf, spec, split, args.batch_size)
        name = f"own_{split}"
    else:
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
        loader = make_loader(ds, args.batch_size, seed=0, shuffle=False)
        name = Path(args.data).stem
    metrics = evaluate(model, loader, classes, next(model.parameters()).device)
    metrics["data"] = str(args.data) if args.data else f"{args.run} (its recorded {name[4:]} split)"
    out = Path(args.out) if args.out else Path(args.run) / f"eval_{name}.json"
    write_json(out, metrics)
    print(format_metrics(metrics))
    log.info("metrics written to %s", out)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict every image; an unreadable one is reported and skipped (exit status 1), or,
    with ``--strict``, stops the command (exit status 2)."""
    import torch

    from shpeft.data import DataError, ImageFileDataset, list_images
    from shpeft.report.examples import write_explanations
    from shpeft.runs import load_run

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
    skipped: list[tuple[str, str]] = []

    def batches():
        xs, names = [], []
        for i in range(len(ds)):
            try:
                x, path = ds[i]
            except (DataError, OSError) as e:
                if args.strict:
                    raise
                skipped.append((ds.paths[i], str(e)))
                log.warning("skipped %s: %s", ds.paths[i], e)
                continue
            xs.append(x)
            names.append(path)
            if len(xs) == args.batch_size:
                yield torch.stack(xs), names
                xs, names = [], []
        if xs:
            yield torch.stack(xs), names

    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(args.output, "w", newline="")) if args.output else sys.stdout
        writer = csv.writer(out)
        writer.writerow(["path", "prediction", *[f"prob_{c}" for c in classes]])
        with torch.no_grad():
            for x, batch_paths in batches():
                probs = model(x.to(device)).float().softmax(-1).cpu()
                for path, pr in zip(batch_paths, probs, strict=True):
                    writer.writerow(
                        [path, classes[int(pr.argmax())], *[f"{v:.6f}" for v in pr.tolist()]]
                    )
                out.flush()
                if args.explain:  # overlays for the predicted classes written above
                    targets = probs.argmax(-1).tolist()
                    write_explanations(
                        model, x, batch_paths, targets, args.explain, args.images,
                        spec.mean, spec.std,
                    )  # fmt: skip
    if args.explain:
        log.info("explanation overlays written under %s", args.explain)
    if skipped:
        print(
            f"shpeft predict: {len(skipped)} of {len(ds)} image(s) could not be read and were "
            f"skipped (first: {skipped[0][0]}: {skipped[0][1]})",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from shpeft.delta import atomic_save_safetensors
    from shpeft.runs import load_run, method_from_config

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
    for name, info in sorted(METHODS.items()):
        merge = "" if info.mergeable else "  [not mergeable]"
        print(f"{name:<{width}}  {info.summary}{merge}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from shpeft.data import run_check

    return run_check(args)


def cmd_report(args: argparse.Namespace) -> int:
    from shpeft.report.command import run_report_command

    return run_report_command(args)


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
    "report": cmd_report,
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
        print(f"shpeft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
