"""Reproducing the SH-PEFT paper's experiments: the benchmark grid, its tables, the analyses.

Liu, Xu, Liu, Zhang (2024): Table 1 (every PEFT method on six datasets), Tables 4/5 (ablations),
Fig. 4 (F1 vs trainable share), Fig. 2 (sparsity and hybridity of the fine-tuning change).

- :mod:`shpeft.analysis.grid`: a grid config -> resumable, parallel runs with ``result.json``
  (``shpeft bench CONFIG``), the same lr search for every method on the validation split;
- :mod:`shpeft.analysis.tables`: Table 1 / 4 / 5 layouts with the paper's numbers beside ours,
  Markdown + CSV, and the Fig. 4 plot;
- :mod:`shpeft.analysis.sparsity`: graft the top-k% changes into the base (``shpeft analyze
  sparsity``);
- :mod:`shpeft.analysis.hybridity`: overlap of key-weight positions across tasks (``shpeft
  analyze hybridity``);
- :mod:`shpeft.analysis.locations`: where one run's selected scalars lie (``shpeft analyze
  locations``);
- :mod:`shpeft.analysis.selection`: where a sparse run's k went, which importance term chose it
  and what never moved (``shpeft analyze selection``);
- :mod:`shpeft.analysis.paper`: the paper's numbers.

This package imports nothing heavy at import time, so the CLI stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_subcommands", "cmd_analyze", "cmd_bench"]


def _add_ks(parser: argparse.ArgumentParser, default: tuple[float, ...]) -> None:
    parser.add_argument(
        "--ks",
        type=float,
        nargs="+",
        default=list(default),
        help=f"k values in %% (default: {' '.join(f'{k:g}' for k in default)})",
    )


def add_subcommands(subparsers: Any, commands: dict[str, Callable[..., int]] | None = None) -> None:
    """Add ``bench`` and ``analyze {sparsity,hybridity,locations}`` to the ``shpeft`` CLI.

    Args:
        subparsers: the object returned by ``parser.add_subparsers()``.
        commands: the CLI's ``{command: handler}`` table, if it dispatches by command name;
            ``bench`` and ``analyze`` are added to it. Every parser also sets ``func``.
    """
    from shpeft.analysis.paper import PAPER_HYBRIDITY_KS, PAPER_SPARSITY_KS

    p = subparsers.add_parser(
        "bench",
        help="run a benchmark grid (methods x datasets x seeds x budgets) and summarise it",
        description="Run the grid of a JSON config: the same lr search for every method on the "
        "validation split, final runs over seeds at the chosen lr, the paper's shared lr, budget "
        "sweeps; finished runs are skipped, interrupted ones resumed. Then write Table 1 "
        "(macro F1, ACC, AUC; tuned and shared), Tables 4/5 and Fig. 4 beside the paper's "
        "numbers as Markdown, CSV and PNG. Grids the config names in 'then' (e.g. its "
        "ablations) run next, into the same folder with the same options.",
    )
    p.add_argument("config", help="grid config JSON (e.g. benchmarks/configs/cpu_grid.json)")
    p.add_argument(
        "--out",
        help="output folder (default: the config's 'out', else runs/bench/<name>; then "
        "-<protocol>)",
        default=None,
    )
    p.add_argument(
        "--protocol",
        default=None,
        help="apply the config's 'protocols' overlay of this name; 'paper' = the paper's recipe "
        "(40k iterations, batch 64, lr 1e-3, native image size) (default: the config's own)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="parallel runs, each in a fresh process (default 1: sequential, in this process)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default auto)")
    p.add_argument(
        "--stages",
        default="search,final,shared,budgets",
        help="comma-separated stages to run (default: all: search,final,shared,budgets)",
    )
    p.add_argument(
        "--datasets",
        default=None,
        help="comma-separated datasets of the config to run, in this order (default: all, in "
        "the config's order; each dataset's search, finals and budgets finish before the next)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated variants of the config to train (default: all); the summary "
        "still covers every finished run",
    )
    p.add_argument("--summary-only", action="store_true", help="only write the tables")
    p.add_argument(
        "--analyses",
        choices=("auto", "yes", "no"),
        default="auto",
        help="Fig. 2 (sparsity, hybridity) and SH-PEFT's selection locations from the tuned "
        "finals, into summary_NAME/analyses (they evaluate models: minutes). auto: after a run "
        "of the grid that includes the final stage, not with --summary-only (default auto)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="show what is done and left per dataset and stage (with a CPU estimate), list the "
        "planned runs, and stop",
    )
    p.add_argument(
        "--restore",
        metavar="RUNS_JSONL",
        help="first write back the finished runs of a ledger (the runs.jsonl that bench writes "
        "beside its tables) where OUT lacks them, e.g. after the run folders were lost: the grid "
        "then resumes instead of training them again (metrics only; runs that need their model "
        "later are retrained)",
    )
    p.add_argument(
        "--poll", type=float, default=10.0, help="seconds between checks on runs held elsewhere"
    )
    p.set_defaults(func=cmd_bench)

    p = subparsers.add_parser(
        "analyze",
        help="analyses of fine-tuned runs (sparsity, hybridity, locations, selection)",
    )
    p.set_defaults(func=cmd_analyze)
    sub = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")

    q = sub.add_parser(
        "sparsity",
        help="graft the top-k%% of |W_ft - W_ori| into the base and evaluate (Fig. 2 left)",
    )
    q.add_argument("--run", required=True, help="a fine-tuned run (normally --method full)")
    _add_ks(q, PAPER_SPARSITY_KS)
    q.add_argument("--split", default="test", choices=("test", "val", "train"))
    q.add_argument("--device", default="cpu")
    q.add_argument("--batch-size", type=int, help="default: the run's training batch size")
    q.add_argument("--out", help="output folder (default: RUN/analysis)")
    q.set_defaults(func=cmd_analyze, analysis="sparsity")

    q = sub.add_parser(
        "hybridity",
        help="overlap of top-k%% |dW| positions (or SH-PEFT masks) between tasks (Fig. 2 right)",
    )
    q.add_argument("--runs", nargs="+", required=True, help="runs on different datasets")
    _add_ks(q, PAPER_HYBRIDITY_KS)
    q.add_argument(
        "--mode",
        default="auto",
        choices=("auto", "delta", "mask"),
        help="delta: top-k%% of |W_ft - W_ori|; mask: the runs' selected (sparse) positions; "
        "auto: mask when every run has sparse positions (default)",
    )
    q.add_argument(
        "--location-k", type=float, help="k of the location breakdown (default: first of --ks)"
    )
    q.add_argument("--labels", nargs="+", help="names of the runs in the report")
    q.add_argument("--out", required=True, help="output folder")
    q.set_defaults(func=cmd_analyze, analysis="hybridity")

    q = sub.add_parser(
        "locations", help="share of selected scalars per block and parameter type of one run"
    )
    q.add_argument("--run", required=True, help="a run (SH-PEFT, or any with --k)")
    q.add_argument(
        "--k",
        type=float,
        help="analyse the top-k%% of |W_ft - W_ori| instead of the sparse delta (dense methods)",
    )
    q.add_argument("--out", help="output folder (default: RUN/analysis)")
    q.set_defaults(func=cmd_analyze, analysis="locations")

    q = sub.add_parser(
        "selection",
        help="where a sparse run's k went, which importance term chose it, what never moved",
    )
    q.add_argument("--run", required=True, help="a run with a sparse delta (e.g. shpeft)")
    q.add_argument("--out", help="output folder (default: RUN/analysis)")
    q.set_defaults(func=cmd_analyze, analysis="selection")

    if commands is not None:
        commands["bench"] = cmd_bench
        commands["analyze"] = cmd_analyze


def cmd_bench(args: argparse.Namespace) -> int:
    """``shpeft bench``: run (or plan, or summarise) a grid and the grids its ``then`` names;
    print Table 1."""
    if args.workers < 1 or args.threads < 1:
        raise ValueError("--workers and --threads must be >= 1")
    # fail now, not an hour into the grid
    names = _check_then(Path(args.config), args.protocol, ())
    unknown = set(_names(args.methods) or ()) - names
    if unknown:
        raise ValueError(f"--methods names no variant of the grid(s): {sorted(unknown)}")
    _bench(Path(args.config), args, Path(args.out) if args.out else None, ())
    return 0


def _names(text: str | None) -> list[str] | None:
    """A comma-separated option as a list (None when empty)."""
    return [n.strip() for n in (text or "").split(",") if n.strip()] or None


def _check_then(config: Path, protocol: str | None, chain: tuple) -> set[str]:
    """Every config of the ``then`` chain parses, and none leads back to one above it; returns
    the variant names of them all."""
    from shpeft.analysis.grid import load_grid

    chain = (*chain, config.resolve())
    grid = load_grid(config, protocol=protocol)
    names = {v.name for v in grid.methods}
    for nxt in grid.then:
        if nxt.resolve() in chain:
            raise ValueError(f"'then' of {config} leads back to {nxt}: a cycle")
        names |= _check_then(nxt, protocol, chain)
    return names


def _bench(config: Path, args: argparse.Namespace, out: Path | None, chain: tuple) -> None:
    """One grid of a ``then`` chain (``chain``: the configs above it, to refuse cycles)."""
    from shpeft.analysis.grid import (
        STAGES,
        default_out,
        grid_progress,
        load_grid,
        planned_specs,
        progress_text,
        run_grid,
        unique,
    )
    from shpeft.analysis.summary import write_summary

    grid = load_grid(config, protocol=args.protocol)
    # runs of different protocols never share a folder (their run ids would collide)
    out = out or default_out(grid)
    stages = _names(args.stages) or []
    bad = set(stages) - set(STAGES)
    if bad:
        raise ValueError(f"unknown stage(s) {sorted(bad)}; choose from {', '.join(STAGES)}")
    datasets, methods = _names(args.datasets), _names(args.methods)
    if methods is not None:  # a grid of the chain trains those of them it has (maybe none)
        methods = [m for m in methods if m in {v.name for v in grid.methods}]
    if datasets is not None and chain:  # a companion runs those of the datasets it has
        datasets = [d for d in datasets if d in grid.datasets]
        if not datasets:
            return
    chain = (*chain, config.resolve())
    if args.restore and len(chain) == 1:  # the ledger holds the whole folder: once is enough
        from shpeft.analysis.ledger import restore_runs

        counts = restore_runs(args.restore, out, dry_run=args.dry_run)
        print(
            f"{'would restore' if args.dry_run else 'restored'} {counts['restored']} finished "
            f"run(s) from {args.restore} into {out} ({counts['kept']} already there, left alone)",
            file=sys.stderr,
        )
    if args.dry_run:
        if grid.then or len(chain) > 1:
            print(f"== {grid.name} ({config})")
        print(progress_text(grid_progress(grid, out, stages, datasets or ())))
        plan = planned_specs(grid, out)
        total = [
            s
            for s in unique(s for st in stages for s in plan[st])
            if datasets is None or s.dataset in datasets
        ]
        for st in stages:
            print(f"{st}: {len(plan[st])} runs")
        if grid.lr_search and "final" in stages and not plan["final"]:
            print("final/budgets: planned once the lr search has finished")
        print(f"unique runs now known: {len(total)}")
        for s in total:
            done = (s.run_dir(out) / "result.json").is_file()
            print(f"  {'done ' if done else 'todo '} {s.run_id}")
        for nxt in grid.then:
            _bench(nxt, args, out, chain)
        return
    if not args.summary_only:
        status = run_grid(
            grid,
            out,
            workers=args.workers,
            threads=args.threads,
            device=args.device,
            stages=stages,
            poll_s=args.poll,
            datasets=datasets,
            methods=methods,
            # the tables so far, whenever a dataset is done: a stopped grid still has them
            after_dataset=lambda ds: write_summary(grid, out),
        )
        print(json.dumps(status["statuses"]), file=sys.stderr)
    # the companions first: they share the folder, so this grid's summary (and its ledger of
    # every finished run there) is written last and holds their runs too
    for nxt in grid.then:
        _bench(nxt, args, out, chain)
    summary = write_summary(grid, out)
    analyses = args.analyses == "yes" or (
        args.analyses == "auto" and not args.summary_only and "final" in stages
    )
    if analyses:
        from shpeft.analysis.grid_analyses import write_grid_analyses
        from shpeft.runs import resolve_device

        dest = Path(summary["markdown"]).parent / "analyses"
        md = write_grid_analyses(grid, out, dest, device=str(resolve_device(args.device)))
        print(f"analyses: {md}", file=sys.stderr)
    print(summary["text"])
    print(f"summary: {summary['markdown']}", file=sys.stderr)


def cmd_analyze(args: argparse.Namespace) -> int:
    """``shpeft analyze sparsity|hybridity|locations``: write Markdown, CSV/JSON and a PNG."""
    if args.analysis == "sparsity":
        from shpeft.analysis.sparsity import run_sparsity, sparsity_markdown, write_sparsity

        report = run_sparsity(
            args.run, args.ks, split=args.split, device=args.device, batch_size=args.batch_size
        )
        files = write_sparsity(report, args.out or Path(args.run) / "analysis")
        print(sparsity_markdown(report))
    elif args.analysis == "hybridity":
        from shpeft.analysis.hybridity import hybridity_markdown, run_hybridity, write_hybridity

        report = run_hybridity(
            args.runs, args.ks, mode=args.mode, location_k=args.location_k, labels=args.labels
        )
        files = write_hybridity(report, args.out)
        print(hybridity_markdown(report))
    elif args.analysis == "locations":
        from shpeft.analysis.locations import locations_markdown, run_locations, write_locations

        report = run_locations(args.run, args.k)
        files = write_locations(report, args.out or Path(args.run) / "analysis")
        print(locations_markdown(report))
    elif args.analysis == "selection":
        from shpeft.analysis.selection import run_selection, selection_markdown, write_selection

        report = run_selection(args.run)
        files = write_selection(report, args.out or Path(args.run) / "analysis")
        print(selection_markdown(report))
    else:  # argparse's required subparser makes this unreachable from the CLI
        raise ValueError(f"unknown analysis {args.analysis!r}")
    print("written: " + ", ".join(files.values()), file=sys.stderr)
    return 0
