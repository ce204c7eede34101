"""shpeft: sparsity- and hybridity-inspired parameter-efficient fine-tuning (SH-PEFT) of ViTs.

Liu, Xu, Liu, Zhang (2024): train only the top-k% backbone scalars ranked by
``I = I_td + lambda * s * I_ta`` (gradient-based task-dependent importance plus magnitude-based
task-agnostic importance), and ship each task as a small sparse delta on a shared backbone.

The configs and the method registry load without torch; everything else is imported on first
use (``shpeft.train``, ``shpeft.create_model``, ...), so that the CLI starts quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shpeft._version import __version__
from shpeft.config import BackboneConfig, DataConfig, RunConfig, TrainConfig
from shpeft.methods import METHODS, get_method
from shpeft.methods.configs import ShpeftConfig

if TYPE_CHECKING:
    from shpeft.backbones import InputSpec, create_model, hash_backbone
    from shpeft.data import load_data
    from shpeft.delta import Delta, DeltaError, apply_delta, revert_delta
    from shpeft.importance import estimate_importance
    from shpeft.runs import load_run
    from shpeft.selection import select_topk
    from shpeft.sparse import attach_sparse, merge_sparse
    from shpeft.training import train

# public name -> module that defines it (imported on first access)
_LAZY = {
    "InputSpec": "shpeft.backbones",
    "create_model": "shpeft.backbones",
    "hash_backbone": "shpeft.backbones",
    "load_data": "shpeft.data",
    "Delta": "shpeft.delta",
    "DeltaError": "shpeft.delta",
    "apply_delta": "shpeft.delta",
    "revert_delta": "shpeft.delta",
    "estimate_importance": "shpeft.importance",
    "load_run": "shpeft.runs",
    "select_topk": "shpeft.selection",
    "attach_sparse": "shpeft.sparse",
    "merge_sparse": "shpeft.sparse",
    "train": "shpeft.training",
}

__all__ = [
    "METHODS",
    "BackboneConfig",
    "DataConfig",
    "Delta",
    "DeltaError",
    "InputSpec",
    "RunConfig",
    "ShpeftConfig",
    "TrainConfig",
    "__version__",
    "apply_delta",
    "attach_sparse",
    "create_model",
    "estimate_importance",
    "get_method",
    "hash_backbone",
    "load_data",
    "load_run",
    "merge_sparse",
    "revert_delta",
    "select_topk",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
