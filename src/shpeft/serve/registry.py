"""Tasks on shared backbones: load runs, group them by base, give each task a view of its base.

Every delta records the SHA-256 of the backbone it was trained on (``base_hash``). Runs with the
same hash share one backbone in memory, built once from the first such run's backbone config
and checked against that hash. Each task then gets a *view* of its base::

    view = copy.deepcopy(base, memo={id(t): t for t in base tensors})  # new modules, same tensors

The view's modules are its own (a method may wrap them or change their class: LoRA, SSF hooks,
adapters, VPT), while every backbone tensor is the base's, aliased and never copied. The view
gets a fresh head, ``method.build`` re-creates the method's modules on it, and the task's delta
splits in two by what each entry names:

- the view's *own* tensors (the head; LoRA factors, adapters, prompts, SSF scales): written
  once, at load;
- *shared* tensors (SH-PEFT's selected scalars, BitFit's biases, ...): the task's *switch
  delta*, written into the base before each batch of the task and reverted after it, bit for
  bit, in O(k) (:mod:`shpeft.serve.switch`; the base's worker is the only writer).

So SH-PEFT and the selective methods (bitfit, ln, attn, full) are switch deltas plus a head
(the linear probe is its head alone). Adapters and VPT (not mergeable) keep their own small modules. LoRA, SSF and SPT-LoRA are
mergeable but served unmerged, as their own small modules over the shared weights: their merged
update is dense (SSF rescales every weight), so merging at each switch would rewrite whole
matrices, and merging once would cost a backbone per task. Unmerged is also exactly what
:func:`shpeft.runs.load_run` (``shpeft predict``) computes.

``share=False`` builds the comparison instead: one full model per task, merged where the method
allows (N merged models side by side).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from shpeft.backbones import BackboneConfig, InputSpec, create_model, hash_backbone, make_head
from shpeft.config import from_dict
from shpeft.delta import Delta, DeltaError, apply_delta
from shpeft.runs import load_run_config, method_from_config, resolve_device
from shpeft.serve.switch import FlatTensors, Switch

log = logging.getLogger("shpeft.serve")

TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class RunRef:
    """A run directory and the task name it is served under."""

    name: str
    run_dir: Path

    @classmethod
    def parse(cls, text: str) -> RunRef:
        """``RUN_DIR`` (named after the folder) or ``NAME=RUN_DIR``."""
        name, sep, path = text.partition("=")
        if not sep or Path(text).is_dir():
            name, path = Path(text).resolve().name, text
        if not TASK_NAME.fullmatch(name):
            raise ValueError(
                f"task name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (not first); "
                "name the run with NAME=RUN_DIR"
            )
        return cls(name, Path(path))


@dataclass
class Base:
    """One backbone in memory and the tasks that run on it (one lock and worker each)."""

    key: str
    hash: str
    model_name: str
    model: nn.Module | None
    """The shared backbone (``share=True``); None when every task has its own model."""
    flat: FlatTensors | None = None
    """The shared backbone's tensors as flat buffers (what switch deltas index)."""
    tasks: list[str] = field(default_factory=list)

    def tensor_ids(self) -> set[int]:
        """Identities of the shared tensors (head excluded: every task has its own)."""
        if self.model is None:
            return set()
        return {
            id(t)
            for n, t in chain(self.model.named_parameters(), self.model.named_buffers())
            if not n.startswith("head.")
        }


@dataclass
class Task:
    """A served task: its model view, its switch delta and what ``GET /tasks`` reports."""

    name: str
    run_dir: Path
    method: str
    classes: list[str]
    spec: InputSpec
    model: nn.Module
    switch: Switch | None
    """Written into the shared tensors for each batch and reverted after it (None: nothing)."""
    base: Base
    served_as: str
    info: dict[str, Any]
    memory: dict[str, int]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "method": self.method,
            "served_as": self.served_as,
            "base": self.base.hash,
            "base_model": self.base.model_name,
            "input_size": self.spec.image_size,
            **self.info,
            "memory_bytes": dict(self.memory),
        }


@dataclass
class Refusal:
    """A run that could not be served, and why (one sentence)."""

    name: str
    run_dir: Path
    reason: str


@dataclass
class Registry:
    """The served tasks (in ``--runs`` order), the bases they share and the refused runs."""

    tasks: dict[str, Task] = field(default_factory=dict)
    bases: list[Base] = field(default_factory=list)
    refused: dict[str, Refusal] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    shared: bool = True
    engine_open: bool = field(default=False, repr=False)
    """Set while an engine runs the tasks: two would write deltas into one base at once."""

    def memory(self) -> dict[str, int]:
        """Bytes of the tensors held: backbones, the tasks' own and switch tensors, scratch."""
        backbones = _nbytes(t for b in self.bases if b.model is not None for t in _tensors(b.model))
        tasks = sum(t.memory["own"] + t.memory["switch"] for t in self.tasks.values())
        scratch = sum(b.flat.scratch_bytes() for b in self.bases if b.flat is not None)
        return {
            "backbones": backbones,
            "tasks": tasks,
            "scratch": scratch,
            "total": backbones + tasks + scratch,
        }


def load_registry(runs: Sequence[RunRef], *, device: str = "cpu", share: bool = True) -> Registry:
    """Load every run as a task; a run that cannot be served is refused with its reason.

    Args:
        runs: the runs and their task names (names must be unique).
        device: where the backbones and task tensors live (``auto``, ``cpu``, ``cuda``, ...).
        share: one backbone per distinct base (the product); False: one model per task.

    Raises:
        ValueError: duplicate task names, or no run could be served (every reason listed).
    """
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two runs are served as {dupes[0]!r}; name them apart with NAME=RUN_DIR")
    reg = Registry(device=resolve_device(device), shared=share)
    bases = _Bases(reg.device)
    for ref in runs:
        try:
            task = _load_task(ref, bases, reg.device, share)
        except Exception as e:  # one bad run must not stop the others; the reason is reported
            reason = _one_line(e)
            log.warning("task %s (%s) refused: %s", ref.name, ref.run_dir, reason)
            log.debug("task %s refused", ref.name, exc_info=True)
            reg.refused[ref.name] = Refusal(ref.name, ref.run_dir, reason)
            continue
        reg.tasks[ref.name] = task
        task.base.tasks.append(ref.name)
        if all(task.base is not b for b in reg.bases):
            reg.bases.append(task.base)
    if not reg.tasks:
        detail = "; ".join(f"{r.name}: {r.reason}" for r in reg.refused.values())
        raise ValueError(f"no run could be served ({detail})")
    return reg


class _Bases:
    """Builds each distinct backbone once; remembers which config gave which hash."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.by_hash: dict[str, Base] = {}
        self.config_hash: dict[str, str] = {}

    def get(self, recorded: str, cfg: BackboneConfig) -> Base:
        if recorded in self.by_hash:
            return self.by_hash[recorded]
        key = json.dumps({k: v for k, v in asdict(cfg).items() if k != "head"}, sort_keys=True)
        found = self.config_hash.get(key)
        if found is None:
            model, _ = create_model(cfg, num_classes=1)
            model.head = nn.Identity()  # every task has its own head
            found = self.config_hash[key] = hash_backbone(model)
            if found == recorded:
                model.to(self.device).eval().requires_grad_(False)
                flat = FlatTensors(model)  # before any view: views alias the same tensors
                self.by_hash[found] = Base(found[:12], found, cfg.model, model, flat)
        if found != recorded:
            raise DeltaError(
                f"the delta was trained on base {recorded[:12]}..., but the run's backbone "
                f"({cfg.model}) loads base {found[:12]}...; serve it with the weights it was "
                "trained on"
            )
        return self.by_hash[recorded]


def _load_task(ref: RunRef, bases: _Bases, device: torch.device, share: bool) -> Task:
    conf = load_run_config(ref.run_dir)
    delta = Delta.load(ref.run_dir / "delta.safetensors")
    method = method_from_config(conf)
    recorded = delta.meta.get("base_hash")
    if not isinstance(recorded, str):
        raise DeltaError("the delta records no base hash, so its backbone cannot be checked")
    cfg = from_dict(BackboneConfig, conf["backbone"])
    classes = [str(c) for c in conf["classes"]]
    if share:
        base = bases.get(recorded, cfg)
        model = _view(base.model, cfg.head, len(classes))
        _build(method, model)
        params = _named_tensors(model)
        delta.validate_against(params, recorded)
        shared = base.tensor_ids()
        own, switch = _split(delta, params, shared)
        apply_delta(model, own)  # the task's own tensors, once
        switch = Switch(switch, params, base.flat) if switch.sparse or switch.dense else None
        own_names = {n for n, t in params.items() if id(t) not in shared}
        modules = any(not n.startswith("head.") for n in own_names)
        served_as = {
            (False, False): "head only",
            (False, True): "switch delta",
            (True, False): "own modules",
            (True, True): "own modules + switch delta",
        }[modules, switch is not None]
        memory = {
            "own": _nbytes(t for n, t in params.items() if n in own_names),
            "switch": _nbytes(switch.tensors()) if switch is not None else 0,
        }
    else:
        model, _ = create_model(cfg, num_classes=len(classes))
        found = hash_backbone(model)
        _build(method, model)
        apply_delta(model, delta, base_hash=found)  # refuses a delta of another base
        if method.mergeable:
            model = method.merge(model)
        model.to(device)
        base = Base(f"{found[:12]}:{ref.name}", found, cfg.model, None)
        switch = None
        served_as = "merged model" if method.mergeable else "own model"
        memory = {"own": _nbytes(_tensors(model)), "switch": 0}
    model.eval().requires_grad_(False)
    return Task(
        name=ref.name,
        run_dir=ref.run_dir,
        method=method.name,
        classes=classes,
        spec=_input_spec(conf),
        model=model,
        switch=switch,
        base=base,
        served_as=served_as,
        info=_run_info(ref.run_dir, method.mergeable),
        memory=memory,
    )


def _view(base: nn.Module, head: str, num_classes: int) -> nn.Module:
    """New modules over the base's tensors (aliased through deepcopy's memo) and a fresh head."""
    memo: dict[int, Any] = {id(t): t for t in chain(base.parameters(), base.buffers())}
    view = copy.deepcopy(base, memo)
    ref = next(base.parameters())
    view.head = make_head(head, view.head_hidden_size, num_classes).to(ref.device, ref.dtype)
    view.num_classes = num_classes
    return view


def _build(method, model: nn.Module) -> None:
    # build() initialises its modules from torch's global RNG; the delta overwrites them, so keep
    # the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        method.build(model)


def _split(delta: Delta, params: dict[str, Tensor], shared: set[int]) -> tuple[Delta, Delta]:
    """(entries naming the view's own tensors, entries naming shared backbone tensors)."""
    own, switch = Delta(meta=dict(delta.meta)), Delta(meta=dict(delta.meta))
    for name, entry in delta.sparse.items():
        (switch if id(params[name]) in shared else own).sparse[name] = entry
    for name, t in delta.dense.items():
        (switch if id(params[name]) in shared else own).dense[name] = t
    return own, switch


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    return dict(model.named_parameters()) | dict(model.named_buffers())


def _tensors(model: nn.Module) -> Iterable[Tensor]:
    return chain(model.parameters(), model.buffers())


def _nbytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages among ``tensors`` (aliases counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def _input_spec(conf: dict[str, Any]) -> InputSpec:
    """How the run's images were prepared in training (``config.json`` -> ``input``)."""
    spec = conf.get("input")
    if not isinstance(spec, dict):
        raise ValueError("the run's config.json records no input spec (size, mean, std)")
    return InputSpec(
        image_size=int(spec["image_size"]),
        mean=tuple(float(v) for v in spec["mean"]),
        std=tuple(float(v) for v in spec["std"]),
        interpolation=str(spec["interpolation"]),
    )


def _run_info(run_dir: Path, mergeable: bool) -> dict[str, Any]:
    """Trainable share, delta size and test metrics, as ``metrics.json`` recorded them."""
    info: dict[str, Any] = {
        "mergeable": mergeable,
        "delta_bytes": (run_dir / "delta.safetensors").stat().st_size,
        "trainable_pct": None,
        "test": None,
    }
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return info
    info["trainable_pct"] = (metrics.get("trainable") or {}).get("backbone_trainable_pct")
    test = metrics.get("test")
    if isinstance(test, dict):
        info["test"] = {k: test.get(k) for k in ("macro_f1", "accuracy", "auc", "n")}
    return info


def _one_line(e: BaseException) -> str:
    if isinstance(e, KeyError):
        return f"config.json lacks {e.args[0]!r}" if e.args else "config.json is incomplete"
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())
