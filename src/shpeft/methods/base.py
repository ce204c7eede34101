"""The method interface and its registry: a PEFT method is one module plus a ``@register`` call.

A method turns a freshly built model (pretrained backbone + new head) into one whose trainable
parameters are exactly what the method trains, exports those as a :class:`~shpeft.delta.Delta`,
and, where possible, merges them into a plain backbone. The training loop, data, seeds and
metrics are shared by every method, so comparisons are on equal terms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from shpeft.delta import Delta
from shpeft.methods.configs import MethodConfig, MethodInfo, method_info
from shpeft.params import is_head


@dataclass
class PrepareContext:
    """What a method may use while preparing the model (built by the training loop)."""

    importance_loader: Callable[[], Iterable] | None = None
    """Makes a fresh, seeded loader over the training split (for data-driven selection)."""
    importance_augment: Callable[[Any, int], Any] | None = None
    """The run's training augmentation for importance batch ``i`` (seeded): ``f(images, i)``."""
    device: Any = "cpu"
    run_dir: Path | None = None
    progress: bool = False
    artifacts: dict[str, Any] = field(default_factory=dict)
    """Method outputs to write into the run directory (JSON-serialisable)."""
    saved_state: dict[str, Any] | None = None
    """On resume: what :meth:`Method.state` returned in the first run (reuse, don't recompute)."""


class Method:
    """Base class: a subclass sets ``name``; :func:`register` fills in the rest from the method's
    entry in :mod:`shpeft.methods.configs` (``summary``, ``config_cls``, ``mergeable``, ...)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    mergeable: ClassVar[bool] = True
    info: ClassVar[MethodInfo]

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> list[nn.Parameter]:
        """Freeze / re-parametrize ``model`` in place; return the parameters to optimise."""
        raise NotImplementedError

    def delta(self, model: nn.Module) -> Delta:
        """The trained tensors of a prepared model (metadata is added by the caller).

        Tensors that replace base tensors keep their base names; tensors the method adds
        (adapters, LoRA factors, prompts, scales) are named as in ``model.named_parameters()``
        after :meth:`build`, so that loading is ``build`` followed by ``apply_delta``.
        """
        raise NotImplementedError

    def lr_scales(self, model: nn.Module) -> dict[int, float]:
        """Per-parameter multipliers of the learning rate, by ``id(param)`` (default: none).

        For methods whose trained tensors differ in scale by orders of magnitude (SH-PEFT's
        ``step_scale="rms"``); parameters not listed train at the plain lr.
        """
        return {}

    def state(self, model: nn.Module) -> dict[str, Any]:
        """Data-driven choices made in :meth:`prepare` (tensors), saved once for resuming."""
        return {}

    def build(self, model: nn.Module) -> None:
        """Re-create the modules the method adds (untrained), so a saved delta can be loaded.

        Methods that only change existing tensors (shpeft, full, linear, bitfit, ...) add none.
        Must be deterministic given the config: same parameter names and shapes as ``prepare``.
        """

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the method into a plain backbone (same logits, timm state-dict keys).

        Raises:
            ValueError: for methods whose added modules cannot be folded into the weights.
        """
        if not self.mergeable:
            raise ValueError(
                f"method {self.name!r} adds computation that cannot be folded into the backbone "
                "weights; load the run with shpeft.load_run instead of merging"
            )
        return model

    def meta(self) -> dict[str, Any]:
        """Method settings recorded in the delta's metadata."""
        from dataclasses import asdict

        return {"method": self.name, **asdict(self.config)}


_CLASSES: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: the implementation of the method ``cls.name`` of the registry.

    ``summary``, ``config_cls`` and ``mergeable`` come from its :class:`MethodInfo`, so that the
    registry (what the CLI lists without importing torch) and the class can never disagree.
    """
    info = method_info(cls.name)
    if cls.name in _CLASSES:
        raise ValueError(f"method {cls.name!r} is registered twice")
    cls.info, cls.summary, cls.config_cls, cls.mergeable = (
        info,
        info.summary,
        info.config_cls,
        info.mergeable,
    )
    _CLASSES[cls.name] = cls
    return cls


def registered(name: str) -> type[Method]:
    """The class registered for ``name`` (its module must have been imported)."""
    try:
        return _CLASSES[name]
    except KeyError:
        raise ValueError(f"method {name!r} has no registered implementation") from None


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The head's parameters by name (:func:`shpeft.params.is_head`)."""
    return {n: p for n, p in model.named_parameters() if is_head(n)}


def freeze_all_but_head(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every parameter except the head's; return the head's parameters."""
    head = head_parameters(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in head)
    return list(head.values())


def head_delta(model: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in head_parameters(model).items()}


class SelectiveMethod(Method):
    """Trains whole existing tensors chosen by name (LayerNorm, biases, attention, ...) + head.

    Subclasses implement :meth:`selects`. The delta stores the chosen tensors whole (dense);
    merging is trivial because nothing is added to the network.
    """

    def selects(self, name: str, param: nn.Parameter) -> bool:
        raise NotImplementedError

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> list[nn.Parameter]:
        head = freeze_all_but_head(model)
        chosen = [
            p
            for n, p in model.named_parameters()
            if n not in head_parameters(model) and self.selects(n, p)
        ]
        if not chosen:
            raise ValueError(f"method {self.name!r} found no parameter to train in this model")
        for p in chosen:
            p.requires_grad_(True)
        return chosen + head

    def delta(self, model: nn.Module) -> Delta:
        head = head_parameters(model)
        return Delta(
            dense={
                n: p.detach().clone()
                for n, p in model.named_parameters()
                if n in head or self.selects(n, p)
            }
        )
