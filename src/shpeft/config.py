"""Typed configs of a run and the argparse flags generated from them.

Every config is a dataclass whose fields carry ``metadata={"help": ..., "choices": ...}``; the CLI
adds one flag per field (``--field-name``), so the documentation lives in one place (the approach
of Hugging Face's ``HfArgumentParser``, written small).

The run's configs live here, not beside the code that uses them, so that the CLI's parser (and
``shpeft --help``) loads without torch: :class:`BackboneConfig`, :class:`DataConfig`,
:class:`TrainConfig` and :class:`RunConfig`; each method's config is in
:mod:`shpeft.methods.configs`. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from shpeft.methods.base import Method
    from shpeft.methods.configs import MethodConfig

T = TypeVar("T")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) for ``X``, ``X | None`` and ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_optional(conv):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else conv(text)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, title: str | None = None, skip: tuple[str, ...] = ()
) -> None:
    """Add one flag per field of dataclass ``cls`` (defaults left unset to detect what was given)."""
    group = parser.add_argument_group(
        title or cls.__name__, (cls.__doc__ or "").strip().split("\n")[0]
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, optional = _base_type(hints[f.name])
        help_ = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            conv = tp if tp in (int, float, str) else str
            kwargs["type"] = _parse_optional(conv) if optional else conv
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            kwargs["metavar"] = f.metadata.get("metavar", conv.__name__.upper())
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        # Required fields are checked when the config is built (see dataclass_from_args), so
        # that options such as --resume can stand in for them.
        kwargs["help"] = (
            f"{help_} (default: {str(default).replace('%', '%%')})"
            if not required
            else f"{help_} (required)"
        )
        names = [flag(f.name)] + list(f.metadata.get("aliases", ()))
        group.add_argument(*names, **kwargs)


def dataclass_from_args(cls: type[T], ns: argparse.Namespace | dict, **overrides: Any) -> T:
    """Build ``cls`` from the fields present in ``ns`` (absent ones keep their defaults)."""
    values = vars(ns) if isinstance(ns, argparse.Namespace) else dict(ns)
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs = {k: v for k, v in values.items() if k in names}
    kwargs.update(overrides)
    missing = [
        flag(f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init
        and f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise ValueError(f"missing required option {', '.join(missing)}")
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """JSON-friendly ``asdict`` (tuples become lists)."""
    return dataclasses.asdict(obj)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Inverse of :func:`to_dict`, ignoring keys that a newer or older version added."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


# ---------------------------------------------------------------------------------------------
# The run's configs

#: Heads: the paper's L2-normalised feature -> linear layer, or a plain linear layer.
HEADS = ("l2norm", "linear")
#: Data source formats (see :mod:`shpeft.data.sources` and :mod:`shpeft.data.layouts`).
NATIVE_FORMATS = ("busi", "chaoyang", "covid-ct", "cxr3", "oct", "limuc")
FORMATS = ("auto", "imagefolder", "csv", "medmnist", *NATIVE_FORMATS)
#: Training augmentations (see :func:`shpeft.training.augment_batch`).
AUGMENTATIONS = ("none", "flip")
CACHE_MODES = ("auto", "yes", "no")


@dataclass
class BackboneConfig:
    """Which backbone to build and how to load it."""

    model: str = field(
        default="vit_base_patch16_clip_224.openai",
        metadata={
            "help": "timm model name (e.g. vit_base_patch16_clip_224.openai) or a local model folder "
            "holding card.json (shpeft), config.json + model.safetensors (timm hub layout) or a "
            "Hugging Face CLIP export"
        },
    )
    weights: str | None = field(
        default=None,
        metadata={
            "help": "local weights file (.safetensors, .pth/.pt/.bin): timm, OpenCLIP or Hugging Face "
            "CLIP keys; default: the model folder's file, else the hub when --pretrained"
        },
    )
    pretrained: bool = field(
        default=True,
        metadata={
            "help": "load pretrained weights when --weights is not given: the model folder's file, "
            "or the Hugging Face hub for a timm name (needs internet); false: random init"
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "input size in pixels (square); default: the model's native size. The position "
            "embedding is resampled to the new grid"
        },
    )
    head: str = field(
        default="l2norm",
        metadata={
            "help": "classification head: l2norm (paper: L2-normalised feature -> linear layer) or "
            "linear (plain linear layer on the feature)"
        },
    )

    def __post_init__(self) -> None:
        # Paths are accepted for convenience and stored as str (the CLI and JSON configs use str)
        if isinstance(self.model, Path):
            self.model = str(self.model)
        if isinstance(self.weights, Path):
            self.weights = str(self.weights)
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a timm model name or a folder, got {self.model!r}")
        if self.weights is not None and (
            not isinstance(self.weights, str) or not self.weights.strip()
        ):
            raise ValueError(f"weights must be a file path or None, got {self.weights!r}")
        if not isinstance(self.pretrained, bool):
            raise ValueError(f"pretrained must be true or false, got {self.pretrained!r}")
        if self.image_size is not None and (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, int)
            or self.image_size <= 0
        ):
            raise ValueError(
                f"image_size must be a positive integer or None, got {self.image_size!r}"
            )
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")


@dataclass
class DataConfig:
    """Where the data is and how it is split, cached and augmented (CLI flags mirror the fields)."""

    data: str = field(
        metadata={
            "help": "data source: an ImageFolder directory (<class>/<img> or "
            "<split>/<class>/<img>), a CSV manifest (path,label[,split]), a MedMNIST .npz or a "
            "data set in its native layout (see --data-format)"
        }
    )
    data_format: str = field(
        default="auto",
        metadata={
            "help": "source format: auto | imagefolder | csv | medmnist | busi | chaoyang | "
            "covid-ct | cxr3 | oct | limuc (auto detects the native layouts by their folder and "
            "file names, else imagefolder)",
            "choices": FORMATS,
        },
    )
    val_fraction: float = field(
        default=0.099,
        metadata={
            "help": "validation fraction when the source has no official split (of all samples; "
            "of train when carving val from an official train split); default = BUSI 79/798"
        },
    )
    test_fraction: float = field(
        default=0.2005,
        metadata={
            "help": "test fraction when the source has no official split; default = BUSI 160/798"
        },
    )
    split_seed: int = field(
        default=0, metadata={"help": "seed of the stratified train/val/test split"}
    )
    split_file: str = field(
        default="",
        metadata={
            "help": "JSON split record of an earlier run (split_record.json) to reuse exactly "
            "instead of making a new split; empty = make the split"
        },
    )
    cache: str = field(
        default="auto",
        metadata={
            "help": "decode+resize every image once into memory (uint8): yes | no | auto "
            "(auto: when all resized images take < 2 GiB)",
            "choices": CACHE_MODES,
        },
    )
    num_workers: int = field(
        default=0,
        metadata={"help": "DataLoader worker processes (also threads used to build the cache)"},
    )
    augment: str = field(
        default="flip",
        metadata={
            "help": "training augmentation: none | flip (random horizontal flip)",
            "choices": AUGMENTATIONS,
        },
    )
    resplit_val: bool = field(
        default=False,
        metadata={
            "help": "pool an official train and val split and carve a new val of --val-fraction "
            "from them (by patient where ids exist), for official val splits too small to select "
            "on: CXR3's has 16 images, the paper's CXR3 split (4,708/524 of 5,232) is this with "
            "--val-fraction 0.1"
        },
    )
    allow_leakage: bool = field(
        default=False,
        metadata={
            "help": "train even if train shares exact duplicate images with val/test (checked "
            "before training; e.g. an official split that contains them); default: refuse"
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.data, str | os.PathLike) or not str(self.data):
            problems.append(f"data must be a non-empty path, got {self.data!r}")
        else:
            self.data = str(self.data)
        if self.data_format not in FORMATS:
            problems.append(f"data_format must be one of {FORMATS}, got {self.data_format!r}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < 1:
                problems.append(f"{name} must be in [0, 1), got {value!r}")
        if (
            isinstance(self.val_fraction, int | float)
            and isinstance(self.test_fraction, int | float)
            and self.val_fraction + self.test_fraction >= 1
        ):
            problems.append(
                f"val_fraction + test_fraction must be < 1, got {self.val_fraction} + "
                f"{self.test_fraction}"
            )
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            problems.append(f"split_seed must be an integer, got {self.split_seed!r}")
        elif self.split_seed < 0:
            problems.append(f"split_seed must be >= 0, got {self.split_seed}")
        if self.cache not in CACHE_MODES:
            problems.append(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int):
            problems.append(f"num_workers must be an integer, got {self.num_workers!r}")
        elif self.num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {self.num_workers}")
        if self.augment not in AUGMENTATIONS:
            problems.append(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if not isinstance(self.split_file, str | os.PathLike):
            problems.append(f"split_file must be a path or empty, got {self.split_file!r}")
        if not isinstance(self.resplit_val, bool):
            problems.append(f"resplit_val must be true or false, got {self.resplit_val!r}")
        if not isinstance(self.allow_leakage, bool):
            problems.append(f"allow_leakage must be true or false, got {self.allow_leakage!r}")
        if problems:
            raise ValueError("invalid DataConfig: " + "; ".join(problems))


@dataclass
class TrainConfig:
    """Optimisation recipe and run bookkeeping (defaults: the paper's recipe)."""

    out: str = field(default="runs/shpeft", metadata={"help": "run directory to create"})
    method: str = field(default="shpeft", metadata={"help": "PEFT method (see `shpeft methods`)"})
    iterations: int = field(default=40000, metadata={"help": "optimizer steps (paper: 40000)"})
    batch_size: int = field(default=64, metadata={"help": "mini-batch size (paper: 64)"})
    optimizer: str = field(
        default="sgd",
        metadata={
            "help": "sgd (the paper: SGD with --momentum) or adamw (AdamW, betas 0.9/0.999; "
            "scale-free per scalar, the usual choice for PEFT of ViTs)",
            "choices": ("sgd", "adamw"),
        },
    )
    lr: float = field(default=1e-3, metadata={"help": "learning rate (paper: 1e-3)"})
    head_lr: float | None = field(
        default=None, metadata={"help": "learning rate of the head (default: --lr)"}
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (paper: 0.9)"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "weight decay (only on trained scalars)"}
    )
    schedule: str = field(
        default="cosine",
        metadata={"help": "learning-rate schedule", "choices": ("cosine", "constant")},
    )
    warmup_iterations: int = field(default=0, metadata={"help": "linear warm-up iterations"})
    eval_every: int = field(
        default=0, metadata={"help": "validate every N iterations (0: ten times per run)"}
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the model head, data order and augmentation"}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, mps"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing run directory"})
    checkpoint_every: int = field(
        default=0,
        metadata={
            "help": "write a resumable checkpoint every N iterations (0: at each validation)"
        },
    )
    skip_nonfinite: bool = field(
        default=False,
        metadata={"help": "skip batches whose loss or gradient is not finite instead of stopping"},
    )
    eval_test: bool = field(
        default=True,
        metadata={
            "help": "evaluate the test split at the end (off: the test split is not read; "
            "`shpeft.runs.evaluate_test` can do it later, e.g. for the lr search's runs)"
        },
    )
    head_init: str = field(
        default="random",
        metadata={
            "help": "how the new head starts: random (the paper) or linear-probe (logistic "
            "regression on the frozen backbone's features, C chosen on validation, before the "
            "method prepares: every method starts from the linear probe's optimum, as LP-FT)",
            "choices": ("random", "linear-probe"),
        },
    )
    feature_cache: str = field(
        default="",
        metadata={
            "help": "folder caching the frozen features of --head-init linear-probe across runs "
            "(empty: no cache)"
        },
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "training precision: auto (bf16 autocast on CUDA, fp32 elsewhere), fp32, or "
            "bf16 (autocast; weights, optimizer state and importance stay float32)",
            "choices": ("auto", "fp32", "bf16"),
        },
    )

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or (self.head_lr is not None and not self.head_lr > 0):
            raise ValueError(
                f"learning rates must be > 0, got lr={self.lr}, head_lr={self.head_lr}"
            )
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if (
            min(self.weight_decay, self.warmup_iterations, self.eval_every, self.checkpoint_every)
            < 0
        ):
            raise ValueError(
                "weight_decay, warmup_iterations, eval_every and checkpoint_every must be >= 0"
            )
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.head_init not in ("random", "linear-probe"):
            raise ValueError(f"head_init must be random or linear-probe, got {self.head_init!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


@dataclass
class RunConfig:
    """Everything a run needs; written resolved to ``config.json`` in the run directory."""

    backbone: BackboneConfig
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig | None = None

    def method_obj(self) -> Method:
        from shpeft.methods import get_method  # the implementation is imported when used

        return get_method(self.train.method)(self.method)
