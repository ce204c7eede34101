"""Backbones: a timm Vision Transformer with pretrained weights and a fresh classification head.

``create_model`` returns timm's own ``VisionTransformer`` (so parameter names are timm's:
``cls_token``, ``pos_embed``, ``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``, ...,
``head.weight``) whose ``head`` is replaced by a freshly initialised layer. SH-PEFT (Liu, Xu, Liu,
Zhang 2024) replaces CLIP's final projection by "L2 normalization and a linear layer":
``NormedLinear`` is that head. Pretrained ``head.*`` tensors (CLIP's projection, a 10-class CIFAR
head, ...) are never loaded.

Where the backbone comes from:

* a timm model name (``vit_base_patch16_clip_224.openai``), weights from the Hugging Face hub
  through timm (needs internet) or from a local file (``BackboneConfig.weights``);
* a local folder with shpeft's ``card.json`` (the shared test models), timm's hub layout
  (``config.json`` + ``model.safetensors``), or a Hugging Face transformers CLIP export
  (``config.json`` with ``model_type`` ``clip``/``clip_vision_model``).

Local weight files may hold a timm state dict, an OpenCLIP / OpenAI CLIP state dict (converted by
timm's ``checkpoint_filter_fn``) or a Hugging Face transformers CLIP state dict (converted here);
``.pth/.pt/.bin`` files are read with ``torch.load(weights_only=True)`` only, never unpickling
arbitrary objects. Position embeddings are resampled when the input size differs.

Credits: the model, the OpenCLIP converter and the position-embedding resampling are timm's
(Ross Wightman, https://github.com/huggingface/pytorch-image-models); CLIP is OpenAI's (Radford et
al. 2021, https://github.com/openai/CLIP); the key layout converted in ``convert_hf_clip`` is that
of Hugging Face transformers' ``CLIPVisionModel`` (https://github.com/huggingface/transformers).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models import get_pretrained_cfg, split_model_name_tag
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from shpeft.config import HEADS, BackboneConfig
from shpeft.params import is_head

log = logging.getLogger(__name__)

# std of the fresh head's weights. Not zero: with a zero head every backbone gradient is zero and
# the task-dependent importance (dE/dw at the pretrained weights) would be degenerate. 0.02 is
# timm's ViT init and about nn.Linear's default scale for width 768.
HEAD_INIT_STD = 0.02
VIT_ARCH = "timm.models.vision_transformer.VisionTransformer"
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# OpenAI CLIP normalisation (used when an HF CLIP folder has no preprocessor_config.json).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Containers that training scripts wrap state dicts in (checked in this order, repeatedly).
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
# Prefixes added by DDP, torch.compile and Lightning-style wrappers; stripped when all keys share one.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
_warned_quickgelu: set[str] = set()


@dataclass(frozen=True)
class InputSpec:
    """How images must be prepared for the model: square size, normalisation, resize filter."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


class NormedLinear(nn.Linear):
    """The paper's head: ``logits = W @ (f / ||f||_2) + b``.

    A subclass of ``nn.Linear`` so that parameter names stay ``head.weight`` / ``head.bias`` and
    code that handles linear heads keeps working. The feature is normalised over its last dim.

    Args:
        in_features: feature width.
        out_features: number of classes.
        bias: whether to learn a bias.
        eps: lower bound of the norm, so that a zero feature does not divide by zero.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        eps: float = 1e-12,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.eps = eps

    def reset_parameters(self) -> None:
        """Seeded init: weight ~ N(0, 0.02^2) truncated at 2 std, bias zero (see ``init_head``)."""
        init_head(self)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.normalize(x, dim=-1, eps=self.eps), self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"


def init_head(layer: nn.Linear) -> None:
    """Initialise a head from torch's RNG: truncated normal (std 0.02, cut at 2 std), zero bias.

    Deterministic given ``torch.manual_seed``. Not zero, so the backbone receives gradients at the
    pretrained weights (SH-PEFT's importance estimate needs them).
    """
    with torch.no_grad():
        nn.init.trunc_normal_(
            layer.weight, std=HEAD_INIT_STD, a=-2 * HEAD_INIT_STD, b=2 * HEAD_INIT_STD
        )
        if layer.bias is not None:
            layer.bias.zero_()


def make_head(kind: str, in_features: int, num_classes: int) -> nn.Linear:
    """A freshly initialised head: ``NormedLinear`` for ``"l2norm"``, ``nn.Linear`` for ``"linear"``."""
    if kind not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {kind!r}")
    if kind == "l2norm":
        return NormedLinear(in_features, num_classes)
    head = nn.Linear(in_features, num_classes)
    init_head(head)
    return head


# --------------------------------------------------------------------------------------------
# model creation


def create_model(cfg: BackboneConfig, num_classes: int) -> tuple[nn.Module, InputSpec]:
    """Build a timm ``VisionTransformer`` with a fresh head for ``num_classes`` and its weights.

    Weights: ``cfg.weights`` when given; otherwise, when ``cfg.pretrained``, the model folder's
    file or the hub (timm names); otherwise random init. The head is always fresh (initialised
    from torch's RNG after the backbone, see ``init_head``). The model is returned in training
    mode, on the CPU, in float32.

    Args:
        cfg: which backbone, weights, input size and head.
        num_classes: number of output classes (>= 1).

    Returns:
        The model and the input specification its pretrained weights expect.

    Raises:
        ValueError: unknown model name, unsupported architecture, or weights that do not fit.
        FileNotFoundError: a model folder or weights file that does not exist.
        RuntimeError: hub weights that could not be downloaded.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    folder = _model_folder(cfg.model)
    if folder is not None:
        model, default_interp, folder_weights = _build_from_folder(folder, cfg, num_classes)
        weights = cfg.weights or (folder_weights if cfg.pretrained else None)
        if weights is not None:
            load_weights(model, weights, name=cfg.model)
        elif cfg.pretrained:
            raise FileNotFoundError(
                f"model folder {cfg.model!r} has no weights file (model.safetensors or "
                "pytorch_model.bin); pass --weights PATH, or pretrained=False for random weights"
            )
    else:
        model = _build_from_timm_name(cfg, num_classes)
        default_interp = "bicubic"
        if cfg.weights is not None:
            load_weights(model, cfg.weights, name=cfg.model)

    model.head = make_head(cfg.head, model.head_hidden_size, num_classes)
    model.num_classes = num_classes
    spec = _input_spec(model, default_interp)
    # Describe the model as returned (size, classes), so timm.data.resolve_data_config agrees
    # with the InputSpec.
    pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
    pcfg.update(
        input_size=(model.patch_embed.proj.in_channels, spec.image_size, spec.image_size),
        mean=spec.mean,
        std=spec.std,
        interpolation=spec.interpolation,
        num_classes=num_classes,
        classifier="head",
    )
    model.pretrained_cfg = model.default_cfg = pcfg
    return model, spec


def _model_folder(name: str) -> Path | None:
    """The folder ``name`` points to, None for a timm name; errors for paths that do not work."""
    if name.startswith(("hf-hub:", "hf_hub:")):
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(
            f"model {name!r} is a file; --model takes a timm model name or a model folder, "
            "pass a weights file with --weights"
        )
    if "/" in name or "\\" in name or name.startswith((".", "~")):
        raise FileNotFoundError(f"model folder {name!r} does not exist")
    return None


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def resolve_timm_name(name: str) -> tuple[str, dict[str, Any]]:
    """Check a timm model name and return what to create: ``(name, extra create kwargs)``.

    CLIP weights trained with QuickGELU (OpenAI's, MetaCLIP, ...) are registered in timm under the
    GELU architecture with the note "natively QuickGELU, use quickgelu model variant for original
    results". Running them with GELU silently changes every activation, so the QuickGELU variant
    is created instead (same weights and hub files), or ``act_layer="quick_gelu"`` is passed when
    timm has no such variant. Logged once per name.

    Raises:
        ValueError: unknown architecture or pretrained tag, with close matches.
    """
    if name.startswith(("hf-hub:", "hf_hub:")):
        return name, {}
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {name!r}{_suggest(arch)}; or pass a model folder")
    if tag:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"timm model {arch!r} has no pretrained tag {tag!r}{hint}; "
                f"known tags: {', '.join(tags) or 'none'}"
            )
    try:
        pcfg = get_pretrained_cfg(name)
    except RuntimeError:  # architecture without any pretrained cfg
        pcfg = None
    notes = " ".join(getattr(pcfg, "notes", None) or ()).lower()
    if "quickgelu" not in notes or "quickgelu" in arch:
        return name, {}
    tag = tag or getattr(pcfg, "tag", "")
    variant = arch.replace("_clip_", "_clip_quickgelu_")
    if variant != arch and f"{variant}.{tag}" in timm.list_pretrained(f"{variant}.*"):
        resolved, extra = f"{variant}.{tag}", {}
        how = f"creating {resolved!r} instead"
    else:
        resolved, extra = name, {"act_layer": "quick_gelu"}
        how = "using act_layer='quick_gelu'"
    if name not in _warned_quickgelu:
        _warned_quickgelu.add(name)
        log.warning("%s was trained with QuickGELU activations; %s (same weights)", name, how)
    return resolved, extra


def _build_from_timm_name(cfg: BackboneConfig, num_classes: int) -> VisionTransformer:
    name, extra = resolve_timm_name(cfg.model)
    kwargs: dict[str, Any] = dict(extra, num_classes=num_classes)
    if cfg.image_size is not None:
        kwargs["img_size"] = cfg.image_size
    from_hub = cfg.pretrained and cfg.weights is None
    try:
        model = timm.create_model(name, pretrained=from_hub, **kwargs)
    except TypeError as e:
        raise ValueError(f"timm model {cfg.model!r} does not accept {kwargs}: {e}") from e
    except Exception as e:
        # huggingface_hub raises OSError subclasses (no connection, offline mode, missing repo),
        # other transports other types: all mean the same thing to the user
        if not from_hub:
            raise
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ConnectionError(
            f"could not download pretrained weights for {cfg.model!r} from the Hugging Face hub "
            f"({type(e).__name__}: {first_line}); pass --weights PATH to load a local file"
        ) from e
    _check_vit(model, cfg.model)
    _check_image_size(model, cfg)
    return model


def _check_vit(model: nn.Module, name: str) -> None:
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"shpeft supports timm VisionTransformer models only; {name!r} builds "
            f"{type(model).__module__}.{type(model).__name__}"
        )


def _check_image_size(model: VisionTransformer, cfg: BackboneConfig) -> None:
    if cfg.image_size is None:
        return
    patch = model.patch_embed.patch_size
    if cfg.image_size % patch[0] or cfg.image_size % patch[1]:
        raise ValueError(
            f"image_size {cfg.image_size} is not a multiple of the patch size {patch[0]} "
            f"of {cfg.model!r}"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _first_file(folder: Path, names: tuple[str, ...]) -> str | None:
    for n in names:
        if (folder / n).is_file():
            return str(folder / n)
    return None


def _build_from_folder(
    folder: Path, cfg: BackboneConfig, num_classes: int
) -> tuple[VisionTransformer, str, str | None]:
    """Build from a local folder; returns (model, default interpolation, weights file or None)."""
    if (folder / "card.json").is_file():
        return _build_from_card(folder, cfg, num_classes)
    if (folder / "config.json").is_file():
        config = _read_json(folder / "config.json")
        if "architecture" in config:
            return _build_from_timm_config(folder, config, cfg, num_classes)
        if config.get("model_type") in ("clip", "clip_vision_model") or "vision_config" in config:
            return _build_from_hf_clip_config(folder, config, cfg, num_classes)
        raise ValueError(
            f"{folder / 'config.json'} is neither timm's layout (an 'architecture' key) nor a "
            "Hugging Face CLIP config (model_type 'clip')"
        )
    raise FileNotFoundError(
        f"model folder {str(folder)!r} has no card.json or config.json describing the model"
    )


def _make_vit(kwargs: dict[str, Any], where: str) -> VisionTransformer:
    try:
        return VisionTransformer(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: VisionTransformer does not accept these arguments: {e}") from e


def _build_from_card(
    folder: Path, cfg: BackboneConfig, num_classes: int
) -> tuple[VisionTransformer, str, str | None]:
    card = _read_json(folder / "card.json")
    arch = card.get("arch", VIT_ARCH)
    if arch not in (VIT_ARCH, "VisionTransformer"):
        raise ValueError(
            f"{folder / 'card.json'}: arch {arch!r} is not supported; only {VIT_ARCH} is"
        )
    kwargs = dict(card.get("kwargs") or {})
    kwargs["num_classes"] = num_classes
    if cfg.image_size is not None:
        kwargs["img_size"] = cfg.image_size
    model = _make_vit(kwargs, str(folder / "card.json"))
    _check_image_size(model, cfg)
    inp = card.get("input") or {}
    size = inp.get("size") or (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    pcfg: dict[str, Any] = {
        "architecture": "vision_transformer",
        "tag": card.get("name", folder.name),
        "input_size": tuple(size),
        "mean": tuple(inp.get("mean", (0.5, 0.5, 0.5))),
        "std": tuple(inp.get("std", (0.5, 0.5, 0.5))),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    if "interpolation" in inp:
        pcfg["interpolation"] = inp["interpolation"]
    model.pretrained_cfg = pcfg
    weights = str(folder / card["file"]) if card.get("file") else None
    weights = weights or _first_file(folder, ("model.safetensors", "pytorch_model.bin"))
    return model, "bilinear", weights


def _build_from_timm_config(
    folder: Path, config: dict[str, Any], cfg: BackboneConfig, num_classes: int
) -> tuple[VisionTransformer, str, str | None]:
    name = str(config["architecture"])
    tag = (config.get("pretrained_cfg") or {}).get("tag")
    if tag and "." not in name and f"{name}.{tag}" in timm.list_pretrained(f"{name}.*"):
        name = f"{name}.{tag}"  # the tag decides QuickGELU for CLIP weights (openai, ...)
    name, extra = resolve_timm_name(name)
    kwargs = {**extra, **(config.get("model_args") or {})}
    kwargs["num_classes"] = num_classes
    if cfg.image_size is not None:
        kwargs["img_size"] = cfg.image_size
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ValueError(f"{folder / 'config.json'}: timm cannot build the model: {e}") from e
    _check_vit(model, str(folder))
    _check_image_size(model, cfg)
    # the folder's pretrained_cfg describes its weights (mean/std/size), timm's registry may not
    model.pretrained_cfg = {**(model.pretrained_cfg or {}), **(config.get("pretrained_cfg") or {})}
    weights = _first_file(
        folder, ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
    )
    return model, "bicubic", weights


# Hugging Face CLIPVisionConfig defaults: HF config.json files omit values equal to them.
_HF_CLIP_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
# PIL resample codes used in HF preprocessor configs
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def hf_clip_vit_kwargs(vision_config: Mapping[str, Any]) -> dict[str, Any]:
    """``VisionTransformer`` kwargs equivalent to a Hugging Face ``CLIPVisionConfig`` (a dict).

    CLIP's vision tower is a pre-norm ViT (``norm_pre``), no patch-embedding bias, CLS pooling
    with the final LayerNorm, LayerNorm eps 1e-5 and (for OpenAI's weights) QuickGELU.
    """
    vc = {**_HF_CLIP_VISION_DEFAULTS, **dict(vision_config)}
    act = vc["hidden_act"]
    if act not in ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported CLIP hidden_act {act!r}")
    act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(act, act)
    return {
        "img_size": vc["image_size"],
        "patch_size": vc["patch_size"],
        "in_chans": vc["num_channels"],
        "embed_dim": vc["hidden_size"],
        "depth": vc["num_hidden_layers"],
        "num_heads": vc["num_attention_heads"],
        "mlp_ratio": vc["intermediate_size"] / vc["hidden_size"],
        "qkv_bias": True,
        "pre_norm": True,
        "class_token": True,
        "global_pool": "token",
        "act_layer": act,
        "norm_layer": partial(LayerNorm, eps=vc["layer_norm_eps"]),
    }


def _build_from_hf_clip_config(
    folder: Path, config: dict[str, Any], cfg: BackboneConfig, num_classes: int
) -> tuple[VisionTransformer, str, str | None]:
    vision = config.get("vision_config", {}) if config.get("model_type") == "clip" else config
    kwargs = hf_clip_vit_kwargs(vision)
    native = kwargs["img_size"]
    kwargs["num_classes"] = num_classes
    if cfg.image_size is not None:
        kwargs["img_size"] = cfg.image_size
    model = _make_vit(kwargs, str(folder / "config.json"))
    _check_image_size(model, cfg)
    pcfg: dict[str, Any] = {
        "architecture": "vision_transformer",
        "tag": folder.name,
        "input_size": (kwargs["in_chans"], native, native),
        "mean": OPENAI_CLIP_MEAN,
        "std": OPENAI_CLIP_STD,
        "interpolation": "bicubic",
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    if (folder / "preprocessor_config.json").is_file():
        pre = _read_json(folder / "preprocessor_config.json")
        pcfg["mean"] = tuple(pre.get("image_mean", pcfg["mean"]))
        pcfg["std"] = tuple(pre.get("image_std", pcfg["std"]))
        pcfg["interpolation"] = _PIL_RESAMPLE.get(pre.get("resample"), pcfg["interpolation"])
    model.pretrained_cfg = pcfg
    weights = _first_file(folder, ("model.safetensors", "pytorch_model.bin"))
    return model, "bicubic", weights


def _input_spec(model: VisionTransformer, default_interp: str) -> InputSpec:
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    height, width = model.patch_embed.img_size
    if height != width:
        raise ValueError(f"only square inputs are supported, the model takes {height}x{width}")

    def three(values: Any, what: str) -> tuple[float, float, float]:
        values = tuple(float(v) for v in values)
        if len(values) == 1:  # grayscale normalisation applied to the 3 replicated channels
            values = values * 3
        if len(values) != 3:
            raise ValueError(f"{what} must have 3 values, got {values}")
        return values  # type: ignore[return-value]

    return InputSpec(
        image_size=int(height),
        mean=three(pcfg.get("mean", (0.5, 0.5, 0.5)), "mean"),
        std=three(pcfg.get("std", (0.5, 0.5, 0.5)), "std"),
        interpolation=str(pcfg.get("interpolation") or default_interp),
    )


# --------------------------------------------------------------------------------------------
# weights


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    Common containers (``{"state_dict": ...}``, ``{"model": ...}``, ...) are unwrapped; entries
    that are not tensors (epoch counters, ...) are dropped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unsupported suffix, unreadable file, or no tensors in it.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"weights {str(path)!r} is a folder; pass a model folder with --model")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{str(path)!r} is not a readable safetensors file: {e}") from e
    elif suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{str(path)!r} holds Python objects other than tensors; shpeft only loads plain "
                "state dicts (torch.load weights_only=True). Re-save it as a state dict or "
                "safetensors file"
            ) from e
        except RuntimeError as e:
            if "TorchScript" in str(e):
                raise ValueError(
                    f"{str(path)!r} is a TorchScript archive (like OpenAI's original CLIP .pt "
                    "files), which shpeft does not execute; convert it once with "
                    "safetensors.torch.save_file(torch.jit.load(path).state_dict(), out)"
                ) from e
            raise ValueError(f"{str(path)!r} could not be read by torch.load: {e}") from e
    else:
        raise ValueError(
            f"weights file {str(path)!r} has an unsupported suffix {path.suffix!r}; use one of "
            f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
        )
    sd = _unwrap(obj)
    if not sd:
        raise ValueError(f"{str(path)!r} holds no tensors")
    return sd


def _unwrap(obj: Any) -> dict[str, Tensor]:
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        return {}
    return {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}


def _strip_wrappers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    changed = True
    while changed and sd:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_HF_LAYER_SWAPS = {
    "self_attn.out_proj.": "attn.proj.",
    "layer_norm1.": "norm1.",
    "layer_norm2.": "norm2.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}
_HF_TOP = {
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "pre_layrnorm.weight": "norm_pre.weight",  # sic: HF spells it "pre_layrnorm"
    "pre_layrnorm.bias": "norm_pre.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
}


# CLIPModel parts beside the vision tower; seen under an empty prefix in flattened exports
_HF_NOT_VISION = (
    "text_model.",
    "visual_projection.",
    "text_projection.",
    "logit_scale",
    "logit_bias",
)


def _hf_clip_prefix(sd: Mapping[str, Tensor]) -> str | None:
    """The prefix of an HF CLIP vision tower (``vision_model.``), None if ``sd`` is not one."""
    suffix = "embeddings.patch_embedding.weight"
    for k in sd:
        if k.endswith(suffix) and any(".layers.0." in j or j.startswith("encoder.") for j in sd):
            return k[: -len(suffix)]
    return None


def convert_hf_clip(sd: Mapping[str, Tensor], prefix: str = "vision_model.") -> dict[str, Tensor]:
    """Convert a Hugging Face transformers CLIP vision tower state dict to timm's keys.

    ``prefix`` is where the vision tower lives: ``vision_model.`` in ``CLIPModel`` and
    ``CLIPVisionModelWithProjection`` exports (and ``CLIPVisionModel`` before transformers 5),
    empty in transformers 5 ``CLIPVisionModel`` exports.

    q/k/v projections are concatenated (in that order) into ``blocks.N.attn.qkv``, which is how
    timm splits heads; ``class_embedding`` (D,) becomes ``cls_token`` (1, 1, D) and the position
    embedding table (L, D) becomes ``pos_embed`` (1, L, D). Keys outside ``prefix``, the text tower,
    ``visual_projection`` and ``logit_scale`` are dropped; other keys that have no timm
    counterpart are kept unchanged so that loading reports them.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, v in sd.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix) :]
        if k.startswith(_HF_NOT_VISION):
            continue
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
        elif k == "pre_layernorm.weight" or k == "pre_layernorm.bias":
            out["norm_pre." + k.rsplit(".", 1)[1]] = v
        elif k == "embeddings.class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "embeddings.position_embedding.weight":
            out["pos_embed"] = v.unsqueeze(0)
        elif k == "embeddings.position_ids":
            continue  # a buffer of aranges in older exports
        elif m := _HF_LAYER.fullmatch(k):
            n, rest = int(m.group(1)), m.group(2)
            if m2 := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault((n, m2.group(2)), {})[m2.group(1)] = v
                continue
            for old, new in _HF_LAYER_SWAPS.items():
                if rest.startswith(old):
                    out[f"blocks.{n}.{new}{rest[len(old) :]}"] = v
                    break
            else:
                out[key] = v
        else:
            out[key] = v
    for (n, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(
                f"HF CLIP layer {n} has only {sorted(parts)} of the q/k/v projection {kind}s"
            )
        out[f"blocks.{n}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def to_timm_state_dict(sd: Mapping[str, Tensor], model: VisionTransformer) -> dict[str, Tensor]:
    """Convert any supported layout to ``model``'s keys, resample ``pos_embed``, drop the head.

    Layouts: timm (also wrapped in ``module.``/``model.``), OpenCLIP / OpenAI CLIP
    (``visual.*``, converted by timm), Hugging Face CLIP (``vision_model.*``, ``convert_hf_clip``).
    Position and patch embeddings are resampled to ``model``'s grid by timm's
    ``checkpoint_filter_fn``.
    """
    sd = _strip_wrappers(dict(sd))
    prefix = _hf_clip_prefix(sd)
    if prefix is not None:
        sd = convert_hf_clip(sd, prefix)
    sd = checkpoint_filter_fn(sd, model)  # OpenCLIP keys, pos_embed / patch_embed resampling
    # the head is always fresh: CLIP's projection or another task's classifier is never wanted
    return {k: v for k, v in sd.items() if not is_head(k)}


def load_weights(model: VisionTransformer, path: str | Path, *, name: str | None = None) -> None:
    """Load a local weights file into ``model``'s backbone (the head is left as it is).

    Args:
        model: a timm ``VisionTransformer``.
        path: ``.safetensors`` or ``.pth/.pt/.bin`` file with timm, OpenCLIP or HF CLIP keys.
        name: model name for error messages.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is unreadable, or its tensors do not fit the model (missing,
            unexpected or differently shaped keys other than the head).
    """
    sd = to_timm_state_dict(read_state_dict(path), model)
    target = {k: v for k, v in model.state_dict().items() if not is_head(k)}
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(target[k].shape)}"
        for k in target
        if k in sd and sd[k].shape != target[k].shape
    ]
    if missing or unexpected or shapes:
        problems = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if keys:
                more = f", ... ({len(keys)} in all)" if len(keys) > 3 else ""
                problems.append(f"{what}: {', '.join(keys[:3])}{more}")
        raise ValueError(
            f"weights do not fit the model {name or type(model).__name__!r} "
            f"(file {str(path)!r}): {'; '.join(problems)}"
        )
    result = model.load_state_dict(sd, strict=False)
    leftover = [k for k in result.missing_keys if not is_head(k)]
    if leftover or result.unexpected_keys:  # pragma: no cover - guarded by the checks above
        raise ValueError(f"weights do not fit the model: {leftover + result.unexpected_keys}")


# --------------------------------------------------------------------------------------------
# identity of a backbone

_PARAMETRIZED = re.compile(r"(?:(.*)\.)?parametrizations\.([^.]+)\.(original|\d+\..*)")


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict without the head (keys starting with ``head.``).

    Tensors reparametrised with ``torch.nn.utils.parametrize`` (as ``shpeft.sparse`` does) are
    reported under their plain name with their base (pretrained) value, and the
    parametrizations' own state is left out, so a model with a sparse update attached, trained
    or not, still reports its base backbone. Where a parametrization keeps trained values in
    ``original`` (shpeft's sampled Linear path caches ``W_eff`` there), its ``restore_base``
    gives the base as a copy; every other tensor shares memory with the model.
    """
    out: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        if is_head(k):
            continue
        if m := _PARAMETRIZED.fullmatch(k):
            if m.group(3) != "original":
                continue
            owner = model.get_submodule(m.group(1)) if m.group(1) else model
            for p in owner.parametrizations[m.group(2)]:
                if hasattr(p, "restore_base"):
                    v = p.restore_base(v)
            k = f"{m.group(1)}.{m.group(2)}" if m.group(1) else m.group(2)
        out[k] = v
    return out


def hash_backbone(model: nn.Module) -> str:
    """SHA-256 hex digest identifying the backbone weights (head excluded).

    Over the keys of ``base_state_dict`` in sorted order: for each, the key, dtype and shape
    (length-prefixed so no two layouts collide) and the tensor's raw bytes (contiguous, on the
    CPU, native byte order). Deterministic across runs and devices; any changed scalar, dtype,
    shape or name changes it.
    """
    h = hashlib.sha256()
    sd = base_state_dict(model)
    for key in sorted(sd):
        t = sd[key].detach().to("cpu").contiguous()
        header = f"{key}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}".encode()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
