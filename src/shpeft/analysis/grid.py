"""The benchmark grid: methods x datasets x seeds x budgets from one JSON file, resumable, parallel.

Reproduces the protocol of the SH-PEFT paper's Table 1, Table 4/5 and Fig. 4 (Liu, Xu, Liu,
Zhang 2024) with every method trained by the same loop (:func:`shpeft.training.train`), plus the
fairness step the paper does not take: every method gets the same small learning-rate search on
the validation split, and the paper's single shared setting is run as well.

A grid config is JSON::

    {"name": "cpu_grid", "protocol": "cpu", "note": "...",
     "backbone": {BackboneConfig fields},
     "datasets": {"busi": {DataConfig fields, "paper_name": "BUSI", "note": "..."}, ...},
     "methods": ["full", "linear", ..., {"name": "shpeft-l1", "method": "shpeft",
                                         "config": {"strategy": "l1"}}],
     "method_config": {"shpeft": {"ratio": 0.01}},
     "seeds": [0, 1, 2],
     "budgets": {"shpeft": [0.0001, 0.001, 0.01, 0.1], "lora": [1, 4, 16]},
     "budget_seeds": [0],
     "train": {TrainConfig fields},
     "lr_search": {"lrs": [0.001, 0.01, 0.03], "iterations": 400, "seed": 0,
                   "methods": null, "extend": 0},
     # or "lrs": {"default": [...], "full": [...]}: per-method starting grids
     "shared_lr": 0.001,
     "protocols": {"paper": {overlay applied by --protocol paper}},
     "then": ["cpu_ablations.json"]}

``then`` names grid configs (relative to this file) that ``shpeft bench`` runs after this one,
into the same output folder and with the same options: companion grids that reuse this grid's
runs (Tables 4-5 use SH-PEFT's search and finals), so that one command makes every table.

Relative paths (``data``, ``split_file``, ``model``, ``weights``) are resolved against the
config file's folder when that path exists there, else left as written (a timm model name, or a
placeholder the user edits).

Stages, each a list of runs:

1. ``search``: for each (dataset, method) and each lr of ``lr_search.lrs`` (the method's own
   starting grid where one is given): one run on ``lr_search.seed`` for
   ``lr_search.iterations``, trained with ``eval_test=False``: the test split is not read at
   all. The lr with the best **validation** macro F1 is chosen; while it lies at an end of the
   grid, up to ``lr_search.extend`` lrs one step beyond that end are added (the same rule for
   every method). Choices go to ``lr_choice_<name>.json``.
   ``lr_search.methods`` limits the search to some variants; another variant of the same method
   (an ablation) then uses their choice.
2. ``final``: every (dataset, method, seed) at its chosen lr (the "tuned" setting). When the
   search uses the final iterations and a final seed, its run at the chosen lr is reused, not
   repeated: it is then evaluated on the test split (once, from its exported best-validation
   state, :func:`shpeft.runs.evaluate_test`); the other lrs' runs never see the test split.
3. ``shared``: every (dataset, method, seed) at ``shared_lr`` (the paper's one setting).
4. ``budgets``: for each method in ``budgets``, every budget value and seed (``budget_seeds``,
   default ``seeds``) at the tuned lr (Fig. 4).

A run is identified by (dataset, method, budget, lr, iterations, seed) and lives in
``OUT/runs/<dataset>/<method>@<budget>/lr<lr>-it<iterations>-s<seed>/``: a normal run directory
plus ``result.json``. A run with ``result.json`` is finished and skipped; one with checkpoints is
resumed (:func:`shpeft.training.resume_run`); anything else is started afresh. Parallel workers
(and separate invocations) claim runs through an exclusive lock in ``OUT/.claims``, held from
before training until ``result.json`` is written, so a run is never trained twice at once, and a
run claimed elsewhere is waited for, not repeated.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import resource
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shpeft.analysis.ledger import is_restored, read_val_curve
from shpeft.io_utils import write_json

log = logging.getLogger("shpeft")

STAGES = ("search", "final", "shared", "budgets")

#: ``--protocol paper``: the paper's recipe (CLIP ViT-B/16 at its native 224 px, 40k iterations,
#: batch 64, SGD lr 1e-3 cosine) when the config file does not define its own overlay.
DEFAULT_PAPER_OVERLAY: dict[str, Any] = {
    "backbone": {"image_size": None},
    "train": {
        "iterations": 40000,
        "batch_size": 64,
        "lr": 1e-3,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "schedule": "cosine",
        "warmup_iterations": 0,
        "eval_every": 0,
    },
    "shared_lr": 1e-3,
    "lr_search": {"iterations": 4000},
}

_PATH_KEYS = ("data", "split_file", "model", "weights")


@dataclass(frozen=True)
class Variant:
    """A row of the tables: a registered method with fixed settings (e.g. SH-PEFT with L1)."""

    name: str
    method: str
    config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class LrSearch:
    """The same learning-rate search for every method, on the validation split."""

    lrs: tuple[float, ...]
    iterations: int
    seed: int = 0
    methods: tuple[str, ...] | None = None
    """Variants searched (default: all); another variant of the same method reuses its choice."""
    extend: int = 0
    """Up to this many extra lrs per (dataset, method) when the best lr is at an end of the grid:
    one geometric step beyond that end at a time, the same rule for every method."""
    per_method: dict[str, tuple[float, ...]] = field(default_factory=dict, hash=False)
    """Starting grids of particular variants or methods (``lrs`` for the others): methods whose
    good lrs lie decades apart start near their own, and ``extend`` moves any edge choice."""

    def start(self, variant: Variant) -> tuple[float, ...]:
        """The starting lr grid of ``variant`` (its name, then its method, then ``lrs``)."""
        return self.per_method.get(variant.name) or self.per_method.get(variant.method) or self.lrs


@dataclass
class GridConfig:
    """A parsed grid config (see the module docstring for the JSON layout)."""

    name: str
    backbone: dict[str, Any]
    datasets: dict[str, dict[str, Any]]
    methods: list[Variant]
    seeds: list[int]
    train: dict[str, Any]
    budgets: dict[str, list[float]] = field(default_factory=dict)
    budget_seeds: list[int] | None = None
    lr_search: LrSearch | None = None
    shared_lr: float | None = None
    protocol: str = "cpu"
    note: str = ""
    dataset_info: dict[str, dict[str, str]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    then: list[Path] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        return int(self.train.get("iterations", 40000))

    @property
    def default_lr(self) -> float:
        return float(self.train.get("lr", 1e-3))

    def lr_source(self, name: str) -> str | None:
        """The searched variant whose chosen lr ``name`` uses (None: the fixed ``train.lr``)."""
        if self.lr_search is None:
            return None
        searched = self.lr_search.methods or tuple(v.name for v in self.methods)
        if name in searched:
            return name
        method = self.variant(name).method
        return next((n for n in searched if self.variant(n).method == method), None)

    def variant(self, name: str) -> Variant:
        for v in self.methods:
            if v.name == name:
                return v
        raise ValueError(f"grid {self.name!r} has no method {name!r}")


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    dataset: str
    variant: str
    method: str
    lr: float
    seed: int
    iterations: int
    budget_field: str | None = None
    budget: float | None = None

    @property
    def run_id(self) -> str:
        tag = self.variant if self.budget is None else f"{self.variant}@{_fmt(self.budget)}"
        return f"{self.dataset}/{tag}/lr{_fmt(self.lr)}-it{self.iterations}-s{self.seed}"

    def run_dir(self, out: Path) -> Path:
        return Path(out) / "runs" / self.run_id

    def claim_dir(self, out: Path) -> Path:
        return Path(out) / ".claims" / self.run_id.replace("/", "__")


def _fmt(x: float) -> str:
    """Short, stable number text for run ids (1e-3 -> 0.001, 4.0 -> 4)."""
    return f"{float(x):g}" if not float(x).is_integer() else str(int(x))


# ---------------------------------------------------------------------------------------------
# Config parsing


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay`` merged in recursively (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _resolve_paths(section: dict[str, Any], root: Path | None) -> dict[str, Any]:
    out = dict(section)
    if root is None:
        return out
    for key in _PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            candidate = (root / value).resolve()
            if candidate.exists():
                out[key] = str(candidate)
    return out


def _check_keys(section: Any, cls: type, where: str, extra: tuple[str, ...] = ()) -> None:
    """Unknown keys are typos (``lr_rate``, ``batchsize``): refuse them instead of ignoring."""
    import dataclasses

    if not isinstance(section, dict):
        raise ValueError(f"{where} must be an object, got {section!r}")
    known = {f.name for f in dataclasses.fields(cls)} | set(extra)
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {', '.join(sorted(known))}")


def parse_grid(raw: dict[str, Any], *, root: Path | None = None, protocol: str | None = None):
    """Validate a grid config dict and return a :class:`GridConfig`.

    Args:
        raw: the JSON object.
        root: folder against which relative paths are resolved (the config file's folder).
        protocol: apply ``raw["protocols"][protocol]`` (or the built-in paper overlay for
            ``"paper"``) before parsing; None keeps the file's own protocol.

    Raises:
        ValueError: naming the first problem found (unknown method, bad budget, empty lists...).
    """
    from shpeft.backbones import BackboneConfig
    from shpeft.data import DataConfig
    from shpeft.methods import METHODS
    from shpeft.training import TrainConfig

    if not isinstance(raw, dict):
        raise ValueError("a grid config must be a JSON object")
    if protocol is not None and protocol != raw.get("protocol"):
        overlays = raw.get("protocols") or {}
        if protocol in overlays:
            raw = deep_merge(raw, overlays[protocol])
        elif protocol == "paper":
            raw = deep_merge(raw, DEFAULT_PAPER_OVERLAY)
        else:
            raise ValueError(
                f"protocol {protocol!r} is not defined in the config's 'protocols' "
                f"(defined: {', '.join(overlays) or 'none'}; built in: paper)"
            )
        raw["protocol"] = protocol
    missing = [k for k in ("name", "backbone", "datasets", "methods", "seeds") if k not in raw]
    if missing:
        raise ValueError(f"grid config lacks {', '.join(missing)}")
    datasets: dict[str, dict[str, Any]] = {}
    info: dict[str, dict[str, str]] = {}
    if not isinstance(raw["datasets"], dict) or not raw["datasets"]:
        raise ValueError("'datasets' must be a non-empty object {name: DataConfig fields}")
    for name, section in raw["datasets"].items():
        if not isinstance(section, dict) or "data" not in section:
            raise ValueError(f"dataset {name!r} needs at least a 'data' path")
        _check_keys(section, DataConfig, f"dataset {name!r}", ("paper_name", "note"))
        section = dict(section)
        info[name] = {k: str(section.pop(k)) for k in ("paper_name", "note") if k in section}
        datasets[name] = _resolve_paths(section, root)
    variants: list[Variant] = []
    overrides = raw.get("method_config") or {}
    for entry in raw["methods"]:
        if isinstance(entry, str):
            entry = {"name": entry, "method": entry}
        if not isinstance(entry, dict) or "method" not in entry:
            raise ValueError(
                f"a method entry must be a name or {{name, method, config}}: {entry!r}"
            )
        method = entry["method"]
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(sorted(METHODS))}")
        config = {**overrides.get(method, {}), **entry.get("config", {})}
        _check_keys(config, METHODS[method].config_cls, f"method {entry.get('name', method)!r}")
        METHODS[method].config_cls(**config)  # fail now, not an hour into the grid
        variants.append(Variant(entry.get("name", method), method, config))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    seeds = [int(s) for s in raw["seeds"]]
    if not seeds:
        raise ValueError("'seeds' must list at least one seed")
    budgets = {}
    for name, values in (raw.get("budgets") or {}).items():
        variant = next((v for v in variants if v.name == name or v.method == name), None)
        if variant is None:
            raise ValueError(f"budgets name {name!r}, which is not among the grid's methods")
        method = METHODS[variant.method]
        if method.budget_field is None:
            raise ValueError(f"method {variant.method!r} has no budget knob")
        for value in values:  # each value must make a valid method config
            method.config_cls(**{**variant.config, method.budget_field: value})
        budgets[variant.name] = list(values)
    search = None
    if raw.get("lr_search"):
        s = raw["lr_search"]
        spec = s.get("lrs", ())
        grids = dict(spec) if isinstance(spec, dict) else {"default": spec}
        if "default" not in grids:
            raise ValueError("lr_search.lrs as an object needs a 'default' list")
        parsed: dict[str, tuple[float, ...]] = {}
        for key, values in grids.items():
            if key != "default" and key not in names and key not in METHODS:
                raise ValueError(f"lr_search.lrs names {key!r}, which is no method of the grid")
            vals = tuple(sorted(float(x) for x in values or ()))
            if not vals or any(not (x > 0 and math.isfinite(x)) for x in vals):
                raise ValueError(f"lr_search.lrs must be positive numbers, got {values!r}")
            parsed[key] = vals
        lrs = parsed.pop("default")
        iters = int(s.get("iterations", raw.get("train", {}).get("iterations", 40000)))
        searched = s.get("methods")
        if searched is not None:
            unknown = sorted(set(searched) - set(names))
            if unknown or not searched:
                raise ValueError(f"lr_search.methods must name grid methods, got {searched!r}")
            searched = tuple(searched)
        extend = int(s.get("extend", 0))
        if extend < 0 or (extend and min(len(v) for v in (lrs, *parsed.values())) < 2):
            raise ValueError("lr_search.extend must be >= 0 and needs at least two lrs per grid")
        search = LrSearch(lrs, iters, int(s.get("seed", 0)), searched, extend, parsed)
    train = dict(raw.get("train") or {})
    _check_keys(train, TrainConfig, "train")
    _check_keys(raw["backbone"], BackboneConfig, "backbone")
    TrainConfig(**{k: v for k, v in train.items() if k != "out"})  # validate early
    shared = raw.get("shared_lr")
    budget_seeds = raw.get("budget_seeds")
    then = raw.get("then") or []
    if not isinstance(then, list) or not all(isinstance(t, str) and t for t in then):
        raise ValueError(f"'then' must list grid config files, got {then!r}")
    then_paths = [Path(t) if root is None or Path(t).is_absolute() else root / t for t in then]
    if root is not None:
        missing = [str(t) for t in then_paths if not t.is_file()]
        if missing:
            raise ValueError(f"'then' names grid config(s) that do not exist: {missing}")
    return GridConfig(
        name=str(raw["name"]),
        backbone=_resolve_paths(raw["backbone"], root),
        datasets=datasets,
        methods=variants,
        seeds=seeds,
        train=train,
        budgets=budgets,
        budget_seeds=[int(x) for x in budget_seeds] if budget_seeds is not None else None,
        lr_search=search,
        shared_lr=float(shared) if shared is not None else None,
        protocol=str(raw.get("protocol", "cpu")),
        note=str(raw.get("note", "")),
        dataset_info=info,
        raw=raw,
        then=then_paths,
    )


def load_grid(path: str | os.PathLike, protocol: str | None = None) -> GridConfig:
    """Read and parse a grid config file (relative paths resolved against its folder)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"grid config not found: {p}")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"grid config {p} is not valid JSON: {e}") from e
    return parse_grid(raw, root=p.resolve().parent, protocol=protocol)


# ---------------------------------------------------------------------------------------------
# Planning


def default_budget(variant: Variant) -> tuple[str | None, float | None]:
    """(budget field, value) a variant runs with in Table 1 (its config, else the default)."""
    from shpeft.methods import METHODS

    info = METHODS[variant.method]
    if info.budget_field is None:
        return None, None
    return info.budget_field, getattr(info.config_cls(**variant.config), info.budget_field)


def run_spec(
    grid: GridConfig,
    variant: Variant,
    dataset: str,
    lr: float,
    seed: int,
    iters: int,
    budget: float | None = None,
) -> RunSpec:
    """The run of ``variant`` on ``dataset`` (its default budget unless ``budget`` is given)."""
    fname, value = default_budget(variant)
    if budget is not None:
        value = budget
    return RunSpec(dataset, variant.name, variant.method, float(lr), seed, iters, fname, value)


def searched_lrs(grid: GridConfig, out: Path | None, dataset: str, name: str) -> list[float]:
    """The lrs searched for (dataset, variant): the grid's, plus the edge extensions so far.

    With ``lr_search.extend`` = n, while every candidate has finished and the best (validation
    only) is the smallest or the largest lr, the next lr one geometric step beyond that end is
    added, at most n times. A pure function of the finished runs, so every process agrees.
    """
    s = grid.lr_search
    assert s is not None
    variant = grid.variant(name)
    lrs = sorted(s.start(variant))
    if not s.extend or out is None:
        return lrs
    for _ in range(s.extend):
        specs = [run_spec(grid, variant, dataset, lr, s.seed, s.iterations) for lr in lrs]
        results = [read_result(out, sp) for sp in specs]
        if any(r is None and not _failed(out, sp) for r, sp in zip(results, specs, strict=True)):
            break  # still running: decide once all are in
        ties = [validation_curve_mean(sp.run_dir(out)) for sp in specs]
        best = select_lr(list(zip(lrs, results, ties, strict=True)))
        if best is None or (best != lrs[0] and best != lrs[-1]):
            break
        if best == lrs[-1]:
            lrs.append(_round_lr(lrs[-1] * lrs[-1] / lrs[-2]))
        else:
            lrs.insert(0, _round_lr(lrs[0] * lrs[0] / lrs[1]))
    return lrs


def _round_lr(lr: float) -> float:
    """Three significant digits, so that 0.1 * 3.162 steps give stable run ids."""
    return float(f"{lr:.3g}")


def search_specs(grid: GridConfig, out: Path | None = None) -> list[RunSpec]:
    """Stage 1: every (dataset, method, lr) on the search seed, at the default budget.

    With ``out`` the lrs include the edge extensions decided by the runs finished there.
    """
    if grid.lr_search is None:
        return []
    s = grid.lr_search
    return [
        run_spec(grid, v, ds, lr, s.seed, s.iterations)
        for ds in grid.datasets
        for v in grid.methods
        if grid.lr_source(v.name) == v.name
        for lr in searched_lrs(grid, out, ds, v.name)
    ]


def run_lr(grid: GridConfig, choices: dict[tuple[str, str], float], ds: str, name: str):
    """The lr of a (dataset, method) in the tuned setting; None while its search is unfinished."""
    src = grid.lr_source(name)
    return grid.default_lr if src is None else choices.get((ds, src))


def final_specs(grid: GridConfig, choices: dict[tuple[str, str], float]) -> list[RunSpec]:
    """Stage 2 (tuned setting): every (dataset, method, seed) at its chosen lr.

    Without an lr search every method uses ``train.lr``. (dataset, method) pairs whose choice is
    not known yet (search unfinished) are left out.
    """
    out = []
    for ds in grid.datasets:
        for v in grid.methods:
            lr = run_lr(grid, choices, ds, v.name)
            if lr is None:
                continue
            out += [run_spec(grid, v, ds, lr, seed, grid.iterations) for seed in grid.seeds]
    return out


def shared_specs(grid: GridConfig) -> list[RunSpec]:
    """Stage 3: the paper's single shared lr for every method (empty without ``shared_lr``)."""
    if grid.shared_lr is None:
        return []
    return [
        run_spec(grid, v, ds, grid.shared_lr, seed, grid.iterations)
        for ds in grid.datasets
        for v in grid.methods
        for seed in grid.seeds
    ]


def budget_specs(grid: GridConfig, choices: dict[tuple[str, str], float]) -> list[RunSpec]:
    """Stage 4 (Fig. 4): every budget value of every budgeted method, at its tuned lr."""
    out = []
    for name, values in grid.budgets.items():
        v = grid.variant(name)
        for ds in grid.datasets:
            lr = run_lr(grid, choices, ds, name)
            if lr is None:
                continue
            for value in values:
                out += [
                    run_spec(grid, v, ds, lr, seed, grid.iterations, budget=value)
                    for seed in (grid.budget_seeds or grid.seeds)
                ]
    return out


def unique(specs: Iterable[RunSpec]) -> list[RunSpec]:
    """Specs without repeats (stages share runs, e.g. the search seed's run at the chosen lr)."""
    seen: dict[str, RunSpec] = {}
    for s in specs:
        seen.setdefault(s.run_id, s)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------
# Learning-rate selection (validation only)


def validation_f1(result: dict[str, Any] | None) -> float | None:
    """Validation macro F1 of a finished run's ``result.json`` (None when failed / missing)."""
    if not result:
        return None
    val = (result.get("metrics") or {}).get("val") or {}
    f1 = val.get("macro_f1")
    return float(f1) if f1 is not None and math.isfinite(float(f1)) else None


def validation_curve_mean(run_dir: Path) -> float | None:
    """Mean validation macro F1 over a run's evaluations after iteration 0 (its
    ``train_log.jsonl``): how well an lr trained throughout, not only at its best point."""
    f1s = [f1 for it, f1 in read_val_curve(run_dir) if it > 0]
    return sum(f1s) / len(f1s) if f1s else None


def select_lr(candidates: Sequence[tuple]) -> float | None:
    """The lr whose run has the best **validation** macro F1.

    ``candidates`` are ``(lr, result)`` or ``(lr, result, tiebreak)``. Ties on the best F1
    (common when the best state of several lrs is the same warm-started head at iteration 0)
    go to the larger ``tiebreak`` (the mean validation F1 over the run,
    :func:`validation_curve_mean`), then to the earlier candidate. Only validation metrics are
    read: the test metrics of search runs never influence the choice. Failed runs (None, or no
    validation metrics) are never chosen.
    """
    best_lr, best = None, (-math.inf, -math.inf)
    for lr, result, *rest in candidates:
        f1 = validation_f1(result)
        tie = rest[0] if rest and rest[0] is not None else -math.inf
        if f1 is not None and (f1, tie) > best:
            best_lr, best = lr, (f1, tie)
    return best_lr


def read_result(out: Path, spec: RunSpec) -> dict[str, Any] | None:
    path = spec.run_dir(out) / "result.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None


def lr_choices(grid: GridConfig, out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (dataset, method): the candidates' validation F1 and the chosen lr (None: pending)."""
    if grid.lr_search is None:
        return {}
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for spec in search_specs(grid, out):
        entry = table.setdefault(
            (spec.dataset, spec.variant), {"candidates": [], "chosen": None, "complete": True}
        )
        result = read_result(out, spec)
        if result is None and not _failed(out, spec):
            entry["complete"] = False
        entry["candidates"].append(
            {
                "lr": spec.lr,
                "val_macro_f1": validation_f1(result),
                "val_curve_mean": validation_curve_mean(spec.run_dir(out)) if result else None,
                "run_id": spec.run_id,
            }
        )
    for (ds, name), entry in table.items():
        # an extension that is due but not yet planned (the grid's own lrs just finished)
        n = len(searched_lrs(grid, out, ds, name))
        if n > len(entry["candidates"]):
            entry["complete"] = False
        if entry["complete"]:
            cands = [
                (c["lr"], _result_or_none(out, c["run_id"]), c["val_curve_mean"])
                for c in entry["candidates"]
            ]
            entry["chosen"] = select_lr(cands)
    return table


def best_candidate(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The best finished candidate of one :func:`lr_choices` entry so far, by the search's own
    rule (validation macro F1, ties to the better mean over the run); None when none finished."""
    done = [c for c in entry["candidates"] if c["val_macro_f1"] is not None]
    return max(
        done, key=lambda c: (c["val_macro_f1"], c["val_curve_mean"] or -math.inf), default=None
    )


def _result_or_none(out: Path, run_id: str) -> dict[str, Any] | None:
    path = Path(out) / "runs" / run_id / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _failed(out: Path, spec: RunSpec) -> bool:
    return (Path(out) / "failures" / (spec.run_id.replace("/", "__") + ".json")).is_file()


def chosen_lrs(grid: GridConfig, out: Path) -> dict[tuple[str, str], float]:
    return {k: v["chosen"] for k, v in lr_choices(grid, out).items() if v["chosen"] is not None}


def write_lr_choices(grid: GridConfig, out: Path) -> Path:
    table = lr_choices(grid, out)
    rows = [{"dataset": ds, "method": name, **entry} for (ds, name), entry in table.items()]
    path = Path(out) / f"lr_choice_{grid.name}.json"
    write_json(path, {"selected_by": "validation macro F1 (test never read)", "choices": rows})
    return path


# ---------------------------------------------------------------------------------------------
# Running one job (in this process or a worker process)


def job_payload(
    grid: GridConfig,
    spec: RunSpec,
    out: Path,
    *,
    threads: int,
    device: str,
    eval_test: bool = True,
) -> dict:
    """Everything a worker needs, as plain data (picklable for a spawned process).

    ``eval_test=False`` (the lr search) trains without reading the test split; a later job for the
    same run with ``eval_test=True`` (a final run reusing it) adds the test metrics once.
    """
    variant = grid.variant(spec.variant)
    method_config = dict(variant.config)
    if spec.budget_field is not None:
        method_config[spec.budget_field] = spec.budget
    train = {
        **grid.train,
        # the linear-probe head's frozen features are the same for every run of a dataset
        "feature_cache": grid.train.get("feature_cache") or str(Path(out) / "feature_cache"),
        "out": str(spec.run_dir(out)),
        "method": spec.method,
        "lr": spec.lr,
        "seed": spec.seed,
        "iterations": spec.iterations,
        "threads": threads,
        "device": device,
        "progress": False,
        "overwrite": True,  # only ever reached with the claim held and no result.json
        "eval_test": eval_test,
    }
    return {
        "spec": asdict(spec),
        "run_id": spec.run_id,
        "grid": grid.name,
        "protocol": grid.protocol,
        "out": str(out),
        "run_dir": str(spec.run_dir(out)),
        "claim_dir": str(spec.claim_dir(out)),
        "backbone": dict(grid.backbone),
        "data": dict(grid.datasets[spec.dataset]),
        "train": train,
        "method_config": method_config,
    }


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one grid run unless it is finished or claimed elsewhere; write ``result.json``.

    Returns:
        ``{"run_id", "status"}`` with status ``done`` (already finished), ``ran``, ``resumed``,
        ``recovered`` (metrics existed, result.json rebuilt), ``tested`` (a finished run trained
        without the test split got its test metrics), ``busy`` (claimed by another process) or
        ``failed`` (the error is in ``OUT/failures/<run>.json``).
    """
    from shpeft.checkpoint import RunLock

    run_dir = Path(job["run_dir"])
    status = {"run_id": job["run_id"]}
    if _finished(job):
        return {**status, "status": "done"}
    lock = RunLock(Path(job["claim_dir"]))
    try:
        lock.__enter__()
    except FileExistsError:
        return {**status, "status": "busy"}
    try:
        if _finished(job):  # finished while we were getting here
            return {**status, "status": "done"}
        if (run_dir / "result.json").is_file():
            return {**status, "status": _add_test(job)}
        return {**status, "status": _run_claimed(job)}
    except Exception as e:  # one broken run must not stop the grid; it is retried next time
        fail = Path(job["out"]) / "failures" / (job["run_id"].replace("/", "__") + ".json")
        write_json(
            fail,
            {
                "run_id": job["run_id"],
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
            },
        )
        log.error("run %s failed: %s: %s", job["run_id"], type(e).__name__, e)
        return {**status, "status": "failed", "error": f"{type(e).__name__}: {e}"}
    finally:
        lock.__exit__()


def _finished(job: dict[str, Any]) -> bool:
    """result.json exists and holds what the job asks for (test metrics unless eval_test=False)."""
    path = Path(job["run_dir"]) / "result.json"
    if not path.is_file():
        return False
    if not job["train"].get("eval_test", True):
        return True
    try:
        return not (json.loads(path.read_text()).get("metrics") or {}).get("test_skipped")
    except (json.JSONDecodeError, OSError):
        return False


def _add_test(job: dict[str, Any]) -> str:
    """Evaluate a finished search run on the test split (it has become a final run); a run
    restored from a ledger has no model files, so it is trained again, with the test split."""
    from shpeft.runs import evaluate_test

    run_dir = Path(job["run_dir"])
    result = json.loads((run_dir / "result.json").read_text())
    if is_restored(result):  # metrics only (shpeft bench --restore): no model to test; train it
        (run_dir / "result.json").unlink()
        (run_dir / "train_log.jsonl").unlink(missing_ok=True)
        return _run_claimed(job)
    t0 = time.perf_counter()
    from shpeft.report.build import report_after_training

    result["metrics"] = evaluate_test(
        run_dir, device=job["train"]["device"], after=report_after_training
    )
    result["test_eval_s"] = time.perf_counter() - t0
    result["test_evaluated"] = "after the lr search, from the exported best-validation state"
    write_json(run_dir / "result.json", result)
    return "tested"


def _run_claimed(job: dict[str, Any]) -> str:
    import torch

    from shpeft.backbones import BackboneConfig
    from shpeft.checkpoint import checkpoint_paths
    from shpeft.config import from_dict
    from shpeft.data import DataConfig
    from shpeft.methods import METHODS
    from shpeft.runs import environment
    from shpeft.training import RunConfig, TrainConfig, resume_run, train

    run_dir = Path(job["run_dir"])
    fail = Path(job["out"]) / "failures" / (job["run_id"].replace("/", "__") + ".json")
    tc = job["train"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    if (run_dir / "metrics.json").is_file() and (run_dir / "config.json").is_file():
        # train() returned but the process died before result.json: keep the finished run
        metrics, how = json.loads((run_dir / "metrics.json").read_text()), "recovered"
    elif checkpoint_paths(run_dir) and (run_dir / "config.json").is_file():
        metrics = resume_run(run_dir, threads=tc["threads"], progress=False, device=tc["device"])
        how = "resumed"
    else:
        method_cls = METHODS[job["spec"]["method"]]
        cfg = RunConfig(
            backbone=from_dict(BackboneConfig, job["backbone"]),
            data=from_dict(DataConfig, job["data"]),
            train=from_dict(TrainConfig, tc),
            method=method_cls.config_cls(**job["method_config"]),
        )
        metrics, how = train(cfg), "ran"
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    config = json.loads((run_dir / "config.json").read_text())
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    result = {
        "run_id": job["run_id"],
        "grid": job["grid"],
        "protocol": job["protocol"],
        **job["spec"],
        "how": how,
        "config": config,
        "environment": config.get("environment") or environment(),
        "metrics": metrics,
        "trainable": metrics.get("trainable"),
        "wall_s": wall,
        # CPU seconds of this process for the run: what it costs on an otherwise idle machine
        "cpu_s": cpu,
        "train_s": metrics.get("train_s"),
        "prepare_s": metrics.get("prepare_s"),
        "delta_bytes": metrics.get("delta_bytes"),
        "peak_rss_mb": rss_kb / 1024 if how != "recovered" else None,
        # a pool worker runs one job per process; an in-process grid reports the process's peak
        "peak_rss_scope": job.get("rss_scope", "process"),
        "peak_cuda_mb": (
            torch.cuda.max_memory_allocated() / 2**20
            if torch.cuda.is_available() and how != "recovered"
            else None
        ),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(run_dir / "result.json", result)
    fail.unlink(missing_ok=True)
    return how


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _pool_job(job: dict[str, Any]) -> dict[str, Any]:
    """Entry point in a spawned worker: fresh process per run, so its peak RSS is the run's."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_job({**job, "rss_scope": "run"})


# What a run imports, including the lazy imports of evaluation and plotting (about 2 s per run
# otherwise); a module that fails to import here is skipped by the fork server.
_PRELOAD = (
    "shpeft.training",
    "shpeft.methods",
    "shpeft.analysis.grid",
    "shpeft.evaluate",
    "sklearn.metrics",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "PIL.Image",
)


def _worker_context():
    """Fresh process per run without paying torch's import each time (~6 CPU-s here).

    A fork server imports torch, timm and shpeft once and forks one child per run; the child is
    a new process (its peak RSS is the run's), started from a single-threaded parent, so no
    OpenMP pool is forked. Where fork servers do not exist, spawn.
    """
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(_PRELOAD))
        return ctx
    return multiprocessing.get_context("spawn")


def run_jobs(
    jobs: list[dict[str, Any]],
    *,
    workers: int = 1,
    poll_s: float = 10.0,
    on_status: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``jobs`` (from :func:`job_payload`), waiting for runs that other processes hold.

    ``workers <= 1`` runs them one after another in this process; more use a pool of spawned
    processes, one fresh process per run (``max_tasks_per_child=1``), each claiming its run
    through the lock. Runs another invocation is training are polled until they finish (their
    result is needed, e.g. to choose a learning rate).
    """
    statuses: dict[str, dict[str, Any]] = {}
    pending = list(jobs)
    while pending:
        if workers <= 1:
            done = []
            for job in pending:
                st = run_job(job)
                done.append(st)
                if on_status:
                    on_status(st)
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = _worker_context()
            done = []
            with ProcessPoolExecutor(workers, mp_context=ctx, max_tasks_per_child=1) as pool:
                futures = {pool.submit(_pool_job, job): job for job in pending}
                for fut in as_completed(futures):
                    try:
                        st = fut.result()
                    except Exception as e:  # a worker killed (e.g. out of memory): rerun later
                        st = {
                            "run_id": futures[fut]["run_id"],
                            "status": "failed",
                            "error": repr(e),
                        }
                        log.error("worker for %s died: %r", st["run_id"], e)
                    done.append(st)
                    if on_status:
                        on_status(st)
        statuses.update({st["run_id"]: st for st in done})
        busy = {st["run_id"] for st in done if st["status"] == "busy"}
        pending = [j for j in pending if j["run_id"] in busy]
        if pending:
            log.info("%d run(s) are being trained by another process; waiting", len(pending))
            time.sleep(poll_s)
    return [statuses[j["run_id"]] for j in jobs]


# ---------------------------------------------------------------------------------------------
# The whole grid


def run_grid(
    grid: GridConfig,
    out: str | os.PathLike,
    *,
    workers: int = 1,
    threads: int = 1,
    device: str = "auto",
    stages: Sequence[str] = STAGES,
    poll_s: float = 10.0,
    datasets: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    after_dataset: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the grid dataset by dataset, each through its stages in order (finished runs are
    skipped), and return a status summary.

    ``datasets`` limits and orders the datasets (default: the config's order); ``methods``
    limits the runs to these variants (default: all; a variant that uses another's lr choice
    waits for that search);
    ``after_dataset(name)`` is called when a dataset's runs are done (e.g. to write the summary).
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    unknown = set(datasets or ()) - set(grid.datasets)
    if unknown:
        raise ValueError(
            f"unknown dataset(s) {sorted(unknown)}; the grid has {', '.join(grid.datasets)}"
        )
    unknown = set(methods or ()) - {v.name for v in grid.methods}
    if unknown:
        raise ValueError(
            f"unknown method(s) {sorted(unknown)}; the grid has "
            f"{', '.join(v.name for v in grid.methods)}"
        )
    missing = [
        f"{ds}: {d['data']}"
        for ds, d in grid.datasets.items()
        if ds in (datasets or grid.datasets) and not Path(d["data"]).exists()
    ]
    if missing:  # e.g. paper_grid.json's placeholders: say so before any run fails on them
        raise FileNotFoundError(
            "dataset path(s) not found (edit the grid config): " + "; ".join(missing)
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"grid_{grid.name}.json", {**grid.raw, "protocol": grid.protocol})
    counts: dict[str, int] = {}

    def execute(work: list[tuple[RunSpec, bool]], what: str) -> None:
        """Run (spec, eval_test) pairs; eval_test=False for the lr search (no test split)."""
        jobs = [
            job_payload(grid, spec, out, threads=threads, device=device, eval_test=eval_test)
            for spec, eval_test in work
        ]
        todo = sum(not _finished(j) for j in jobs)
        if todo:
            log.info("%s: %d run(s) to do (%d finished before)", what, todo, len(jobs) - todo)
        started, ended = time.monotonic(), 0

        def note(st: dict[str, Any]) -> None:
            nonlocal ended
            counts[st["status"]] = counts.get(st["status"], 0) + 1
            if st["status"] in ("done", "busy"):
                return
            ended += 1
            left = max(todo - ended, 0)
            pace = (time.monotonic() - started) / ended  # wall s per run, all workers together
            eta = f", about {left * pace / 60:.0f} min to go at this pace" if left else ""
            log.info("%-9s %s [%s %d/%d%s]", st["status"], st["run_id"], what, ended, todo, eta)

        run_jobs(jobs, workers=workers, poll_s=poll_s, on_status=note)

    # Dataset by dataset: an interrupted grid has whole Table-1 columns instead of every
    # dataset's search and no test metrics. Within a dataset, rounds repeat while finished runs
    # plan new ones (edge extensions of the lr search; finals and budget runs of a method once
    # its lr is chosen), so the finals of settled methods fill the workers while other methods'
    # extensions run, and the search runs of a round go first.
    for ds in datasets or grid.datasets:
        ran: set[tuple[str, bool]] = set()
        rounds = 0
        while True:
            work: list[tuple[RunSpec, bool]] = []
            if "search" in stages and grid.lr_search is not None:
                work += [
                    (sp, False)
                    for sp in unique(search_specs(grid, out))
                    if sp.dataset == ds and (sp.run_id, False) not in ran
                ]
            if grid.lr_search is not None:
                write_lr_choices(grid, out)
            choices = chosen_lrs(grid, out)  # only methods whose search is complete
            later: list[RunSpec] = []
            if "final" in stages:
                later += final_specs(grid, choices)
            if "shared" in stages:
                later += shared_specs(grid)
            if "budgets" in stages:
                later += budget_specs(grid, choices)
            # a seed-0 final that reuses a search run still to train this round gets its test
            # next round; one whose search run is finished gets it now
            searching = {
                sp.run_id for sp, _ in work if not (sp.run_dir(out) / "result.json").is_file()
            }
            work += [
                (sp, True)
                for sp in unique(later)
                if sp.dataset == ds and sp.run_id not in searching
            ]
            work = [
                (sp, ev)
                for sp, ev in work
                if (sp.run_id, ev) not in ran and (methods is None or sp.variant in methods)
            ]
            if not work:
                break
            rounds += 1
            execute(work, f"{ds} round {rounds}")
            ran |= {(sp.run_id, ev) for sp, ev in work}
        if after_dataset is not None:
            after_dataset(ds)
    choices = chosen_lrs(grid, out)
    return {
        "out": str(out),
        "statuses": counts,
        "lr_choices": {f"{k[0]}/{k[1]}": v for k, v in choices.items()},
    }


def default_out(grid: GridConfig) -> Path:
    """The grid's output folder when none is given: the config's ``out`` (or ``runs/bench/NAME``)
    with ``-<protocol>`` appended, relative to the working directory."""
    return Path(f"{grid.raw.get('out') or f'runs/bench/{grid.name}'}-{grid.protocol}")


def planned_specs(
    grid: GridConfig, out: Path, choices: dict[tuple[str, str], float] | None = None
) -> dict[str, list[RunSpec]]:
    """Every stage's runs given what is known now (finals wait for the search's choices), or
    given ``choices`` (dataset, variant) -> lr."""
    if choices is None:
        choices = chosen_lrs(grid, out)
    return {
        "search": search_specs(grid, out),
        "final": final_specs(grid, choices),
        "shared": shared_specs(grid),
        "budgets": budget_specs(grid, choices),
    }


def grid_progress(
    grid: GridConfig, out: Path, stages: Sequence[str] = STAGES, datasets: Sequence[str] = ()
) -> dict[str, Any]:
    """What is done and what is left, per (dataset, stage), with a CPU estimate.

    ``waiting``: the finals and budget runs of methods whose lr search is unfinished (planned
    once it finishes, counted here with a stand-in lr; a search's edge extensions are not
    foreseen). The estimate is the median CPU seconds of the grid's finished runs times the runs
    to do and waiting.

    Returns:
        ``{"rows": [{"dataset", "stage", "done", "todo", "waiting"}], "done", "todo",
        "waiting", "median_cpu_s", "cpu_h_to_go"}`` (the last two None without finished runs).
    """
    choices = chosen_lrs(grid, out)
    stand_in = dict(choices)
    if grid.lr_search is not None:
        for ds in grid.datasets:
            for v in grid.methods:
                src = grid.lr_source(v.name)
                if src is not None:
                    stand_in.setdefault((ds, src), searched_lrs(grid, out, ds, src)[0])
    now, then = planned_specs(grid, out, choices), planned_specs(grid, out, stand_in)
    seen: set[str] = set()
    rows, cpu = [], []
    for ds in datasets or grid.datasets:
        for stage in stages:
            known = [s for s in unique(now[stage]) if s.dataset == ds]
            later = [s for s in unique(then[stage]) if s.dataset == ds]
            known_ids = {s.run_id for s in known}
            row = {"dataset": ds, "stage": stage, "done": 0, "todo": 0, "waiting": 0}
            for s in known:
                if s.run_id in seen:
                    continue  # a run shared by two stages counts in the first
                seen.add(s.run_id)
                r = read_result(out, s)
                row["done" if r else "todo"] += 1
                if r and r.get("cpu_s"):
                    cpu.append(float(r["cpu_s"]))
            for s in later:
                if s.run_id not in known_ids and s.run_id not in seen:
                    seen.add(s.run_id)
                    row["waiting"] += 1
            rows.append(row)
    total = {k: sum(r[k] for r in rows) for k in ("done", "todo", "waiting")}
    median = sorted(cpu)[len(cpu) // 2] if cpu else None
    left = total["todo"] + total["waiting"]
    return {
        "rows": rows,
        **total,
        "median_cpu_s": median,
        "cpu_h_to_go": None if median is None else left * median / 3600,
    }


def progress_text(progress: dict[str, Any]) -> str:
    """:func:`grid_progress` as a small plain-text table."""
    lines = [f"{'dataset':<14} {'stage':<8} {'done':>5} {'to do':>6} {'waiting':>8}"]
    for r in progress["rows"]:
        if r["done"] or r["todo"] or r["waiting"]:
            lines.append(
                f"{r['dataset']:<14} {r['stage']:<8} {r['done']:>5} {r['todo']:>6} "
                f"{r['waiting']:>8}"
            )
    tail = (
        f"{progress['done']} done, {progress['todo']} to do, {progress['waiting']} waiting for "
        "their lr search (edge extensions not foreseen)"
    )
    if progress["cpu_h_to_go"] is not None:
        tail += (
            f"; about {progress['cpu_h_to_go']:.1f} CPU-hours to go at the median "
            f"{progress['median_cpu_s']:.0f} CPU s of the finished runs"
        )
    return "\n".join(lines + [tail]) + "\n"
