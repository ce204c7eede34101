"""shpeft: sparsity- and hybridity-inspired parameter-efficient fine-tuning (SH-PEFT) of ViTs.

Liu, Xu, Liu, Zhang (2024): train only the top-k% backbone scalars ranked by
``I = I_td + lambda * s * I_ta`` (gradient-based task-dependent importance plus magnitude-based
task-agnostic importance), and ship each task as a small sparse delta on a shared backbone.
"""

__version__ = "0.1.0"

# ruff: noqa: E402  (the version must exist before submodules that record it are imported)
from shpeft.backbones import BackboneConfig, InputSpec, create_model, hash_backbone
from shpeft.data import DataConfig, load_data
from shpeft.delta import Delta, DeltaError, apply_delta, revert_delta
from shpeft.importance import estimate_importance
from shpeft.methods import METHODS, get_method
from shpeft.methods.shpeft import ShpeftConfig
from shpeft.selection import select_topk
from shpeft.sparse import attach_sparse, merge_sparse
from shpeft.training import RunConfig, TrainConfig, load_run, train

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
