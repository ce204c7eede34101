"""The per-task delta: what a run changed, as a small safetensors file, and how to use it.

Layout of ``delta.safetensors`` (format version 2):

- ``sparse/indices`` and ``sparse/values``: the int32 flat (row-major) indices into each touched
  base tensor, strictly increasing within a tensor, and the new values at those indices, all
  tensors concatenated; the metadata entry ``sparse_layout`` (JSON ``[[name, count], ...]``)
  says which slice belongs to which tensor. One pair of tensors instead of two per touched
  tensor keeps the safetensors header (JSON, ~100 bytes per entry) out of the file's size:
  at 1% of a ViT the file is 8 bytes x k + head + about 2 KB;
- ``dense/<param>``: a whole tensor that replaces ``<param>`` (the new head, or every weight of a
  dense method such as full fine-tuning);
- metadata (safetensors' string map): ``format`` = ``shpeft-delta``, ``format_version``,
  ``sha256`` (over the metadata, the layout and every tensor), and ``shpeft`` = a JSON object with the method, its settings, the base model name and the hash of
  the base backbone weights, the class names and the shpeft version.

At 1% of ViT-B/16 the sparse part is ~0.86M scalars x 8 bytes = 6.9 MB; at 0.01% it is 69 KB.
A delta is validated before anything is written into a model, so a bad file leaves it untouched.
Files are read with safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from shpeft.io_utils import atomic_path

FORMAT = "shpeft-delta"
FORMAT_VERSION = 2
READABLE_VERSIONS = ("1", "2")  # version 1: ``sparse/<param>/indices|values`` per tensor


class DeltaError(ValueError):
    """A delta file that is malformed or does not belong to the model it is applied to."""


@dataclass
class Delta:
    """Sparse and dense tensor updates plus the metadata that identifies their base."""

    sparse: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_sparse(self) -> int:
        """Number of scalars in the sparse part (k)."""
        return sum(int(v.numel()) for _, v in self.sparse.values())

    @property
    def num_dense(self) -> int:
        """Number of scalars stored whole (the head and dense methods' tensors)."""
        return sum(int(t.numel()) for t in self.dense.values())

    def tensors(self) -> dict[str, Tensor]:
        """The flat safetensors mapping."""
        out: dict[str, Tensor] = {}
        for name, (idx, val) in self.sparse.items():
            out[f"sparse/{name}/indices"] = idx.to(torch.int32).contiguous().cpu()
            out[f"sparse/{name}/values"] = val.detach().contiguous().cpu()
        for name, t in self.dense.items():
            out[f"dense/{name}"] = t.detach().contiguous().cpu()
        return out

    def packed(self) -> tuple[dict[str, Tensor], str]:
        """The version-2 tensors (sparse part concatenated) and the JSON layout of the slices."""
        out: dict[str, Tensor] = {}
        layout = [[name, int(idx.numel())] for name, (idx, _) in self.sparse.items()]
        if self.sparse:
            dtypes = {val.dtype for _, val in self.sparse.values()}
            if len(dtypes) != 1:
                raise DeltaError(f"sparse values of mixed dtypes {sorted(map(str, dtypes))}")
            out["sparse/indices"] = torch.cat(
                [idx.reshape(-1).to(torch.int32).cpu() for idx, _ in self.sparse.values()]
            )
            out["sparse/values"] = torch.cat(
                [val.detach().reshape(-1).cpu() for _, val in self.sparse.values()]
            )
        for name, t in self.dense.items():
            out[f"dense/{name}"] = t.detach().contiguous().cpu()
        return out, json.dumps(layout)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file, fsync, rename): a crash never leaves half a delta."""
        tensors, layout = self.packed()
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "sparse_layout": layout}
        meta["shpeft"] = json.dumps(self.meta, sort_keys=True)
        meta["sha256"] = content_hash(tensors, meta["shpeft"] + layout)
        return atomic_save_safetensors(tensors, Path(path), meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Delta:
        """Read and validate the structure of a delta file (not yet its fit to a model)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"delta file not found: {path}")
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                raw_meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise DeltaError(f"{path}: not a readable safetensors file ({e})") from e
        if raw_meta.get("format") != FORMAT:
            raise DeltaError(
                f"{path}: not a shpeft delta (metadata 'format' is {raw_meta.get('format')!r})"
            )
        version = raw_meta.get("format_version")
        if version not in READABLE_VERSIONS:
            raise DeltaError(
                f"{path}: delta format version {version!r} is not supported "
                f"(this shpeft reads versions {', '.join(READABLE_VERSIONS)})"
            )
        layout_json = raw_meta.get("sparse_layout", "") if version == "2" else ""
        if raw_meta.get("sha256") != content_hash(
            tensors, raw_meta.get("shpeft", "") + layout_json
        ):
            raise DeltaError(
                f"{path}: content checksum mismatch: the file is corrupted or was modified"
            )
        try:
            meta = json.loads(raw_meta.get("shpeft", "{}"))
        except json.JSONDecodeError as e:
            raise DeltaError(f"{path}: metadata is not valid JSON ({e})") from e
        delta = cls(meta=meta if isinstance(meta, dict) else {})
        if version == "2":
            tensors = _unpack_v2(tensors, layout_json, str(path))
        pending: dict[str, dict[str, Tensor]] = {}
        for key, t in tensors.items():
            kind, _, rest = key.partition("/")
            if kind == "dense" and rest:
                delta.dense[rest] = t
            elif kind == "sparse" and rest.endswith(("/indices", "/values")):
                name, _, part = rest.rpartition("/")
                pending.setdefault(name, {})[part] = t
            else:
                raise DeltaError(f"{path}: unexpected tensor {key!r}")
        for name, parts in pending.items():
            if set(parts) != {"indices", "values"}:
                raise DeltaError(f"{path}: sparse tensor {name!r} lacks its indices or values")
            delta.sparse[name] = (parts["indices"], parts["values"])
        delta.validate_structure(str(path))
        return delta

    def validate_structure(self, where: str = "delta") -> None:
        """Checks that need no model: dtypes, 1-D shapes, sorted unique indices, finite values."""
        for name, (idx, val) in self.sparse.items():
            if idx.dtype != torch.int32:
                raise DeltaError(f"{where}: indices of {name!r} are {idx.dtype}, expected int32")
            if idx.dim() != 1 or val.dim() != 1 or idx.numel() != val.numel():
                raise DeltaError(
                    f"{where}: {name!r} has {tuple(idx.shape)} indices for {tuple(val.shape)} values"
                )
            if idx.numel() and (int(idx[0]) < 0 or bool((idx[1:] <= idx[:-1]).any())):
                raise DeltaError(f"{where}: indices of {name!r} are not sorted, unique and >= 0")
            if not val.is_floating_point() or not torch.isfinite(val).all():
                raise DeltaError(f"{where}: values of {name!r} are not finite floats")
        for name, t in self.dense.items():
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise DeltaError(f"{where}: dense tensor {name!r} is not finite floats")

    def validate_against(self, params: dict[str, Tensor], base_hash: str | None) -> None:
        """Checks against a model's tensors and its backbone hash; raises before any write."""
        want = self.meta.get("base_hash")
        if base_hash is not None and want is not None and want != base_hash:
            raise DeltaError(
                f"this delta was trained on a different base backbone "
                f"({self.meta.get('base_model', '?')}, hash {want[:12]}...), not on the loaded one "
                f"(hash {base_hash[:12]}...); load the base weights it was made for"
            )
        both = sorted(set(self.sparse) & set(self.dense))
        if both:
            raise DeltaError(
                f"delta stores {both[0]!r} both sparse and dense; one tensor, one part"
            )
        for name, (idx, val) in self.sparse.items():
            if name not in params:
                raise DeltaError(f"delta names {name!r}, which the model does not have")
            p = params[name]
            if idx.numel() and int(idx[-1]) >= p.numel():
                raise DeltaError(f"delta indices of {name!r} exceed its {p.numel()} scalars")
            if val.dtype != p.dtype:
                raise DeltaError(f"delta values of {name!r} are {val.dtype}, the model's {p.dtype}")
        for name, t in self.dense.items():
            if name not in params:
                raise DeltaError(f"delta names {name!r}, which the model does not have")
            if t.dtype != params[name].dtype:
                raise DeltaError(
                    f"delta tensor {name!r} is {t.dtype}, the model's is {params[name].dtype}"
                )
            if tuple(t.shape) != tuple(params[name].shape):
                raise DeltaError(
                    f"delta tensor {name!r} has shape {tuple(t.shape)}, the model's is "
                    f"{tuple(params[name].shape)} (different number of classes?)"
                )


def _unpack_v2(tensors: dict[str, Tensor], layout_json: str, where: str) -> dict[str, Tensor]:
    """Split version 2's concatenated sparse tensors back into the per-tensor (v1) mapping."""
    out = {k: t for k, t in tensors.items() if not k.startswith("sparse/")}
    extra = set(tensors) - set(out) - {"sparse/indices", "sparse/values"}
    if extra:
        raise DeltaError(f"{where}: unexpected tensor {sorted(extra)[0]!r}")
    try:
        layout = json.loads(layout_json or "[]")
    except json.JSONDecodeError as e:
        raise DeltaError(f"{where}: sparse layout is not valid JSON ({e})") from e
    ok = isinstance(layout, list) and all(
        isinstance(e, list)
        and len(e) == 2
        and isinstance(e[0], str)
        and isinstance(e[1], int)
        and not isinstance(e[1], bool)
        and e[1] >= 0
        for e in layout
    )
    if not ok:
        raise DeltaError(f"{where}: sparse layout must be a list of [name, count >= 0]")
    names = [e[0] for e in layout]
    if len(set(names)) != len(names):
        raise DeltaError(f"{where}: sparse layout names a tensor twice")
    total = sum(e[1] for e in layout)
    idx, val = tensors.get("sparse/indices"), tensors.get("sparse/values")
    if not layout:
        if idx is not None or val is not None:
            raise DeltaError(f"{where}: sparse tensors without a layout")
        return out
    if idx is None or val is None or idx.dim() != 1 or val.dim() != 1:
        raise DeltaError(f"{where}: sparse indices/values missing or not 1-D")
    if idx.numel() != total or val.numel() != total:
        raise DeltaError(
            f"{where}: sparse layout counts {total} scalars, the file holds "
            f"{idx.numel()} indices and {val.numel()} values"
        )
    offset = 0
    for name, count in layout:
        out[f"sparse/{name}/indices"] = idx[offset : offset + count]
        out[f"sparse/{name}/values"] = val[offset : offset + count]
        offset += count
    return out


def content_hash(tensors: dict[str, Tensor], meta_json: str) -> str:
    """SHA-256 over the method metadata and every tensor (name, dtype, shape, bytes).

    safetensors checks the header's structure but not the data: a flipped bit in a value would
    otherwise load as a silently different model.
    """
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_save_safetensors(
    tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None
) -> Path:
    """safetensors ``save_file`` with :mod:`shpeft.io_utils`' durability."""
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


@dataclass
class RevertHandle:
    """The values a delta overwrote, to put them back with :func:`revert_delta`."""

    sparse: dict[str, Tensor]
    dense: dict[str, Tensor]


def _plain_params(model: nn.Module) -> dict[str, Tensor]:
    return dict(model.named_parameters()) | dict(model.named_buffers())


@torch.no_grad()
def apply_delta(model: nn.Module, delta: Delta, *, base_hash: str | None = None) -> RevertHandle:
    """Write a delta into a plain (unparametrized) model in place; return what it overwrote.

    Args:
        model: the base model (e.g. from :func:`shpeft.backbones.create_model`).
        delta: a loaded delta.
        base_hash: the model's backbone hash; when given, a delta made on another base is refused.
    """
    params = _plain_params(model)
    delta.validate_against(params, base_hash)
    handle = RevertHandle(sparse={}, dense={})
    for name, (idx, val) in delta.sparse.items():
        flat = params[name].view(-1)
        i = idx.to(device=flat.device, dtype=torch.long)
        handle.sparse[name] = flat[i].clone()
        flat[i] = val.to(flat.device)
    for name, t in delta.dense.items():
        handle.dense[name] = params[name].detach().clone()
        params[name].copy_(t)
    return handle


@torch.no_grad()
def revert_delta(model: nn.Module, delta: Delta, handle: RevertHandle) -> None:
    """Undo :func:`apply_delta` exactly (bit for bit): its writes undone in reverse order."""
    params = _plain_params(model)
    for name, t in reversed(handle.dense.items()):
        params[name].copy_(t)
    for name, (idx, _) in reversed(delta.sparse.items()):
        flat = params[name].view(-1)
        flat[idx.to(device=flat.device, dtype=torch.long)] = handle.sparse[name].to(flat.device)
