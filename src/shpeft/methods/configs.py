"""Every method's config and its registry entry; nothing here imports torch.

A method is one implementation module in this package plus its entry here: a typed config
dataclass (one CLI flag per field, see :mod:`shpeft.config`) and a :class:`MethodInfo` line in
:data:`METHODS` naming the module, the summary, whether it merges into the backbone, its budget
knob (Fig. 4's x axis) and its row label in the paper's tables. Keeping these torch-free lets the
CLI build its parser, list the methods and validate a grid config without importing torch, timm
or peft (``shpeft --help`` in well under two seconds); :func:`shpeft.methods.get_method` imports
the implementation when a method is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Importance strategies (see :mod:`shpeft.importance`).
STRATEGIES = ("l2", "l1", "td-l2", "td-l1", "ta", "ta-l1", "ta-l2")
#: How SH-PEFT's two importance terms are put on one scale (:func:`shpeft.importance.term_parts`).
MIXES = ("paper", "tensor", "rank")
ADAPTER_INPUTS = ("norm", "residual")
#: LoRA targets: short name -> the Linear inside each block.
LORA_TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
SSF_INITS = ("ssf", "identity")


@dataclass
class MethodConfig:
    """Hyper-parameters of a method (subclasses add fields with help text)."""


@dataclass
class ShpeftConfig(MethodConfig):
    """SH-PEFT: sparse tuning of the scalars with the highest hybrid importance."""

    ratio: float = field(
        default=0.01,
        metadata={
            "help": "fraction of backbone scalars to train, in (0, 1]: 0.01 is the paper's 1%, 0.0001 is 0.01%"
        },
    )
    strategy: str = field(
        default="l2",
        metadata={
            "help": "importance: l2 (grad^2 + lambda*s*w^2, paper default), l1 (|sum grad| + lambda*s*|w|), "
            "td-l2 / td-l1 (task-dependent only), ta (task-agnostic |w| only)",
            "choices": STRATEGIES,
        },
    )
    lam: float = field(
        default=1.0,
        metadata={
            "help": "lambda, weight of the task-agnostic term (paper: 1.0)",
            "aliases": ("--lambda",),
        },
    )
    importance_batches: int | None = field(
        default=None,
        metadata={
            "help": "B, mini-batches for the importance estimate (default: one epoch of the training split)"
        },
    )
    importance_augment: str = field(
        default="none",
        metadata={
            "help": "the importance batches' augmentation: none (paper: the training images as "
            "they are) or train (the run's own training augmentation, --augment, seeded)",
            "choices": ("none", "train"),
        },
    )

    zero_grad: str = field(
        default="keep",
        metadata={
            "help": "keep (paper) or skip scalars whose gradient is zero up to float rounding "
            "(structurally untrainable, e.g. key biases), detected from the gradients",
            "choices": ("keep", "skip"),
        },
    )
    mix: str = field(
        default="paper",
        metadata={
            "help": "how the gradient and magnitude terms are scaled before adding: paper "
            "(eq. 1, one global s), tensor (each term over its tensor's mean), rank (global "
            "quantiles)",
            "choices": MIXES,
        },
    )
    allocation: str = field(
        default="global",
        metadata={
            "help": "global (paper: one threshold) or row (every output neuron's best scalars "
            "first, the rest by one threshold; after GPS)",
            "choices": ("global", "row"),
        },
    )
    step_scale: str = field(
        default="uniform",
        metadata={
            "help": "uniform (one lr for every selected scalar) or rms (each tensor's lr times "
            "its pretrained RMS over the RMS of the backbone's weight matrices, floored at 0.1x: "
            "relative steps, so LayerNorm scales and biases move as much, relative to their size, "
            "as matrix weights, and the small-weight patch embedding less)",
            "choices": ("uniform", "rms"),
        },
    )
    density_cap: float | None = field(
        default=None,
        metadata={
            "help": "no tensor may have more than this many times the overall ratio of its "
            "scalars selected (e.g. 10: density <= 10 x ratio; scale-free across budgets); "
            "none: no cap"
        },
    )

    def __post_init__(self) -> None:
        if self.zero_grad not in ("keep", "skip"):
            raise ValueError(f"zero_grad must be keep or skip, got {self.zero_grad!r}")
        if self.importance_augment not in ("none", "train"):
            raise ValueError(
                f"importance_augment must be none or train, got {self.importance_augment!r}"
            )
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {self.mix!r}")
        if self.allocation not in ("global", "row"):
            raise ValueError(f"allocation must be global or row, got {self.allocation!r}")
        if self.step_scale not in ("uniform", "rms"):
            raise ValueError(f"step_scale must be uniform or rms, got {self.step_scale!r}")
        if self.density_cap is not None and not self.density_cap >= 1:
            raise ValueError(f"density_cap must be >= 1 (x the ratio), got {self.density_cap}")
        if self.density_cap is not None and self.allocation == "row":
            raise ValueError("density_cap applies to allocation='global' only")
        if not (0 < self.ratio <= 1):
            raise ValueError(f"ratio must be in (0, 1] (0.01 means 1%), got {self.ratio}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.importance_batches is not None and self.importance_batches < 1:
            raise ValueError(f"importance_batches must be >= 1, got {self.importance_batches}")


@dataclass
class LoraMethodConfig(MethodConfig):
    """LoRA on the attention projections of every block (peft's implementation)."""

    lora_rank: int = field(
        default=8,
        metadata={
            "help": "r, the rank of each LoRA update (the budget knob): r*(d_in+d_out) scalars per "
            "adapted matrix, e.g. r=8 on qkv+proj of ViT-B/16 trains 0.44M scalars"
        },
    )
    lora_alpha: float = field(
        default=8.0,
        metadata={
            "help": "LoRA alpha: the update is scaled by alpha/r (8 with r=8: scaling 1, as in "
            "most ViT LoRA baselines); keep alpha fixed when sweeping r, as in the paper"
        },
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "dropout on the input of the LoRA branch, in [0, 1)"},
    )
    lora_targets: str = field(
        default="qkv,proj",
        metadata={
            "help": "comma-separated Linear layers of every block to adapt: qkv (fused query/key/"
            "value), proj (attention output), fc1, fc2 (MLP)"
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int):
            raise ValueError(f"lora_rank must be an integer >= 1, got {self.lora_rank!r}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        targets = self.target_list()
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad or not targets:
            raise ValueError(
                f"lora_targets must be a comma-separated subset of {', '.join(LORA_TARGETS)}, "
                f"got {self.lora_targets!r}"
            )

    def target_list(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]


@dataclass
class SptLoraConfig(MethodConfig):
    """SPT-LoRA: sensitivity-chosen mix of LoRA matrices and unstructured scalars."""

    spt_budget: float = field(
        default=0.01,
        metadata={
            "help": "trainable budget as a fraction of all backbone scalars, in (0, 1]; LoRA "
            "factors count in full (SPT's accounting). 0.01 = 0.86M on ViT-B/16, within the "
            "paper's SPT-LoRA range (~0.4M-1M) and equal to shpeft's default ratio"
        },
    )
    spt_lora_rank: int = field(
        default=8,
        metadata={"help": "r, rank of the LoRA on structurally tuned matrices (SPT: 8)"},
    )
    spt_lora_alpha: float = field(
        default=8.0,
        metadata={
            "help": "LoRA alpha of the structured matrices: updates are scaled by alpha/r "
            "(alpha = r: scaling 1, like SPT's unscaled LoRA)"
        },
    )
    spt_structured_alpha: float = field(
        default=10.0,
        metadata={
            "help": "SPT's alpha: a matrix goes LoRA when its selected sensitive scalars reach "
            "r*(d_in+d_out)/alpha (SPT's default 10; 1 = only when they outnumber LoRA's own)"
        },
    )
    spt_batches: int | None = field(
        default=None,
        metadata={
            "help": "mini-batches for the sensitivity (squared gradients); None: one epoch of "
            "the training split (SPT uses 8-16 batches)"
        },
    )
    spt_lora_modules: str = field(
        default="",
        metadata={
            "help": "comma-separated Linear modules tuned with LoRA; filled in by training "
            "from the sensitivity (leave empty), read back when loading a run"
        },
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.spt_budget, float | int) and 0 < self.spt_budget <= 1):
            raise ValueError(f"spt_budget must be in (0, 1] (0.01 means 1%), got {self.spt_budget}")
        if isinstance(self.spt_lora_rank, bool) or not isinstance(self.spt_lora_rank, int):
            raise ValueError(f"spt_lora_rank must be an integer >= 1, got {self.spt_lora_rank!r}")
        if self.spt_lora_rank < 1:
            raise ValueError(f"spt_lora_rank must be >= 1, got {self.spt_lora_rank}")
        if not self.spt_lora_alpha > 0:
            raise ValueError(f"spt_lora_alpha must be > 0, got {self.spt_lora_alpha}")
        if not (self.spt_structured_alpha > 0 and math.isfinite(self.spt_structured_alpha)):
            raise ValueError(
                f"spt_structured_alpha must be a finite number > 0, got {self.spt_structured_alpha}"
            )
        if self.spt_batches is not None and self.spt_batches < 1:
            raise ValueError(f"spt_batches must be >= 1 or None, got {self.spt_batches}")
        if not isinstance(self.spt_lora_modules, str):
            raise ValueError(
                f"spt_lora_modules must be a comma-separated string, got {self.spt_lora_modules!r}"
            )

    def lora_module_list(self) -> list[str]:
        return [m.strip() for m in self.spt_lora_modules.split(",") if m.strip()]


@dataclass
class AdapterConfig(MethodConfig):
    """AdaptFormer: bottleneck width, output scale, dropout and what the adapter reads."""

    adapter_dim: int = field(
        default=8,
        metadata={
            "help": "bottleneck width r of each block's adapter (the budget knob): "
            "depth * (2*d*r + r + d) scalars, 0.16M for ViT-B/16 at r=8 (AdaptFormer uses 64)"
        },
    )
    adapter_scale: float = field(
        default=0.1,
        metadata={"help": "scale s of the adapter output added to the MLP's (AdaptFormer: 0.1)"},
    )
    adapter_dropout: float = field(
        default=0.0,
        metadata={
            "help": "dropout on the bottleneck activations during training, in [0, 1) "
            "(the official AdaptFormer code uses 0.1)"
        },
    )
    adapter_input: str = field(
        default="norm",
        metadata={
            "help": "what the adapter reads: norm (the MLP's LayerNorm output, AdaptFormer paper "
            "Eq. 3) or residual (the un-normalised stream, as in the official code)",
            "choices": ADAPTER_INPUTS,
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.adapter_dim, bool) or int(self.adapter_dim) != self.adapter_dim:
            raise ValueError(f"adapter_dim must be an integer >= 1, got {self.adapter_dim!r}")
        if self.adapter_dim < 1:
            raise ValueError(f"adapter_dim must be >= 1, got {self.adapter_dim}")
        if not math.isfinite(self.adapter_scale):
            raise ValueError(f"adapter_scale must be a finite number, got {self.adapter_scale}")
        if not (0 <= self.adapter_dropout < 1):
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")
        if self.adapter_input not in ADAPTER_INPUTS:
            raise ValueError(
                f"adapter_input must be one of {ADAPTER_INPUTS}, got {self.adapter_input!r}"
            )


@dataclass
class SsfConfig(MethodConfig):
    """SSF: a per-channel scale and shift after every Linear, LayerNorm and the patch projection."""

    ssf_init: str = field(
        default="ssf",
        metadata={
            "help": "initial scale/shift: ssf (scale ~ N(1, 0.02), shift ~ N(0, 0.02), as in the "
            "SSF code) or identity (ones/zeros: the prepared model starts equal to the base)",
            "choices": SSF_INITS,
        },
    )

    def __post_init__(self) -> None:
        if self.ssf_init not in SSF_INITS:
            raise ValueError(f"ssf_init must be one of {SSF_INITS}, got {self.ssf_init!r}")


@dataclass
class VptConfig(MethodConfig):
    """VPT: number of prompt tokens (per block for vpt-deep) and prompt dropout."""

    vpt_tokens: int = field(
        default=10,
        metadata={
            "help": "prompt tokens (the budget knob): tokens * dim scalars for vpt-shallow, "
            "depth * tokens * dim for vpt-deep (ViT-B/16, 10 tokens: 7.7K / 92K); VPT tunes it "
            "per task in 1-200 and 10 is a common choice"
        },
    )
    vpt_dropout: float = field(
        default=0.0,
        metadata={
            "help": "dropout on the prompt tokens during training, in [0, 1) (VPT's config "
            "default is 0.0, its example commands use 0.1)"
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.vpt_tokens, bool) or int(self.vpt_tokens) != self.vpt_tokens:
            raise ValueError(f"vpt_tokens must be an integer >= 1, got {self.vpt_tokens!r}")
        if self.vpt_tokens < 1:
            raise ValueError(f"vpt_tokens must be >= 1, got {self.vpt_tokens}")
        if not (0 <= self.vpt_dropout < 1):
            raise ValueError(f"vpt_dropout must be in [0, 1), got {self.vpt_dropout}")


@dataclass(frozen=True)
class MethodInfo:
    """A method's registry entry (see the module docstring)."""

    name: str
    """The name on the command line and in configs (``--method NAME``)."""
    module: str
    """Implementation module under ``shpeft.methods``; it defines a ``@register``-ed class."""
    summary: str
    """One line for ``shpeft methods``."""
    label: str
    """Row label in the paper's tables (Table 1, Fig. 4)."""
    config_cls: type[MethodConfig] = MethodConfig
    mergeable: bool = True
    """Whether the trained delta folds into a plain backbone (``shpeft merge``)."""
    budget_field: str | None = None
    """The config field that sizes the method (Fig. 4's x axis), if any."""


METHODS: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo(
            "shpeft",
            "shpeft",
            "SH-PEFT: top-k% scalars by hybrid (gradient + magnitude) importance, head",
            "SH-PEFT",
            ShpeftConfig,
            budget_field="ratio",
        ),
        MethodInfo(
            "full",
            "simple",
            "full fine-tuning: every backbone weight and the head",
            "Full finetune",
        ),
        MethodInfo(
            "linear", "simple", "linear probe: the head only, backbone frozen", "Linear probe"
        ),
        MethodInfo(
            "adapter",
            "adapter",
            "AdaptFormer: parallel bottleneck adapter beside every block's MLP, head",
            "Adapter-par",
            AdapterConfig,
            mergeable=False,
            budget_field="adapter_dim",
        ),
        MethodInfo(
            "ssf",
            "ssf",
            "SSF (Lian et al. 2022): per-channel scale/shift after each Linear/LayerNorm, head",
            "SSF",
            SsfConfig,
        ),
        MethodInfo(
            "lora",
            "lora",
            "LoRA (Hu et al. 2022, via peft): low-rank updates on attention qkv + proj, head",
            "LoRA",
            LoraMethodConfig,
            budget_field="lora_rank",
        ),
        MethodInfo(
            "vpt-deep",
            "vpt",
            "VPT-deep: learnable prompt tokens at every block's input, head",
            "VPT-Deep",
            VptConfig,
            mergeable=False,
            budget_field="vpt_tokens",
        ),
        MethodInfo(
            "vpt-shallow",
            "vpt",
            "VPT-shallow: learnable prompt tokens at the first block's input, head",
            "VPT-Shallow",
            VptConfig,
            mergeable=False,
            budget_field="vpt_tokens",
        ),
        MethodInfo(
            "ln",
            "selective",
            "FT-LN (Basu et al. 2023): every LayerNorm weight and bias of the backbone, head",
            "FT-LN",
        ),
        MethodInfo(
            "bitfit",
            "selective",
            "BitFit (Zaken et al. 2022): every backbone bias (LayerNorm biases too), head",
            "BitFit",
        ),
        MethodInfo(
            "attn",
            "selective",
            "FT-Att (Touvron et al. 2022): qkv and proj weights/biases of every block, head",
            "FT-Att",
        ),
        MethodInfo(
            "spt-lora",
            "spt_lora",
            "SPT-LoRA (He et al. 2023): LoRA on sensitive matrices + sparse sensitive scalars, head",
            "SPT-LoRA",
            SptLoraConfig,
            budget_field="spt_budget",
        ),
    )
}


def method_info(name: str) -> MethodInfo:
    """The registry entry of ``name`` (clear error listing the known methods)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}"
        ) from None
