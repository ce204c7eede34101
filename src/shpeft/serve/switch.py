"""Switching a shared backbone between tasks in a few vectorised operations, O(k).

:func:`shpeft.delta.apply_delta` walks a delta tensor by tensor (validation, an index
conversion, a gather and a scatter per tensor). Right for loading a run once, but a server
switches at every batch, and for a ViT that is hundreds of small operations whose fixed cost
rivals the forward pass of a small input. Here the base's tensors are re-pointed into one flat
buffer per dtype (:class:`FlatTensors`), so a task's whole switch delta becomes one sorted
vector of flat indices and one of values (:class:`Switch`), built once at load:

    apply:  saved = flat[index]; flat[index] = values     (index_select + index_copy_)
    revert: flat[index] = saved                           (index_copy_)

Three passes over k positions in ascending order. Sparse indices are stored as int32 (4 bytes,
as in the delta file), whole small tensors (BitFit's biases) as ranges, both expanded into a
per-base scratch buffer at each switch; the overwritten values go to a per-base scratch buffer
too, so a task costs its delta's bytes, not more. Whole tensors too large to index (e.g. full
fine-tuning's) are copied as slices instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from shpeft.delta import Delta

# Dense entries up to this size become indices (one vectorised op for all of BitFit's biases);
# larger ones are slice copies (indexing a whole weight matrix would double its bytes).
DENSE_AS_INDEX = 1 << 16


class FlatTensors:
    """A model's parameters and buffers moved into one flat buffer per dtype, in place.

    Every tensor keeps its object and shape (``tensor.data`` becomes a view into the buffer),
    so modules, views aliasing them and state dicts are unaffected.
    """

    def __init__(self, model: nn.Module) -> None:
        groups: dict[torch.dtype, list[Tensor]] = {}
        seen: set[int] = set()
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                groups.setdefault(t.dtype, []).append(t)
        self.flat: dict[torch.dtype, Tensor] = {}
        self.where: dict[int, tuple[torch.dtype, int]] = {}
        for dtype, tensors in groups.items():
            flat = torch.empty(
                sum(t.numel() for t in tensors), dtype=dtype, device=tensors[0].device
            )
            offset = 0
            for t in tensors:
                n = t.numel()
                flat[offset : offset + n].copy_(t.detach().reshape(-1))
                t.data = flat[offset : offset + n].view(t.shape)
                self.where[id(t)] = (dtype, offset)
                offset += n
            self.flat[dtype] = flat
        self._index = torch.empty(0, dtype=torch.long, device=self._device)
        self._saved: dict[torch.dtype, Tensor] = {}

    @property
    def _device(self) -> torch.device:
        return next(iter(self.flat.values())).device if self.flat else torch.device("cpu")

    def reserve(self, counts: dict[torch.dtype, int]) -> None:
        """Grow the scratch buffers to hold a switch of ``counts`` indexed scalars per dtype."""
        most = max(counts.values(), default=0)
        if most > self._index.numel():
            self._index = torch.empty(most, dtype=torch.long, device=self._device)
        for dtype, n in counts.items():
            if n > self._saved.get(dtype, torch.empty(0)).numel():
                self._saved[dtype] = torch.empty(n, dtype=dtype, device=self._device)

    def scratch_bytes(self) -> int:
        return self._index.nbytes + sum(t.nbytes for t in self._saved.values())


@dataclass
class _Group:
    """One dtype's part of a switch.

    ``index`` (ascending flat positions of the sparse entries), then ``ranges`` (whole small
    tensors as ``(start, length)``, expanded into positions at each switch so they cost no index
    memory), share one ``values`` vector in that order; large whole tensors are ``slices``.
    """

    dtype: torch.dtype
    index: Tensor  # (k_sparse,) int32 or int64
    starts: Tensor  # (r,) int64
    lengths: Tensor  # (r,) int64
    values: Tensor  # (k_sparse + sum(lengths),)
    slices: list[tuple[int, Tensor]] = field(default_factory=list)  # (offset, 1-D values)

    @property
    def k(self) -> int:
        return self.values.numel()

    def positions(self, out: Tensor) -> Tensor:
        """Every indexed position, written into the long scratch buffer ``out``."""
        ks, k = self.index.numel(), self.k
        index = out[:k]
        index[:ks].copy_(self.index)
        if k > ks:
            ranged = index[ks:]
            torch.arange(k - ks, out=ranged)
            prefix = self.lengths.cumsum(0) - self.lengths  # where each range starts in ranged
            shift = torch.repeat_interleave(self.starts - prefix, self.lengths, output_size=k - ks)
            ranged.add_(shift)
        return index


@dataclass
class _Handle:
    """What :meth:`Switch.apply` overwrote; valid until the next switch of the same base."""

    saved_slices: list[list[Tensor]]


class Switch:
    """A task's delta on shared tensors, ready to be written into a :class:`FlatTensors` base.

    Args:
        delta: entries naming tensors of ``params`` that live in ``flat``.
        params: the task's tensors by name (its view of the base).
        flat: the base's flat buffers.
    """

    def __init__(self, delta: Delta, params: dict[str, Tensor], flat: FlatTensors) -> None:
        self.flat = flat
        parts: dict[torch.dtype, dict[str, list]] = {}

        def part(name: str) -> tuple[int, dict[str, list]]:
            dtype, offset = flat.where[id(params[name])]
            keys = ("index", "values", "starts", "lengths", "ranged", "slices")
            return offset, parts.setdefault(dtype, {key: [] for key in keys})

        for name, (idx, val) in delta.sparse.items():
            offset, p = part(name)
            p["index"].append(idx.to(torch.long) + offset)
            p["values"].append(val.reshape(-1))
        for name, t in sorted(delta.dense.items(), key=lambda e: flat.where[id(params[e[0]])]):
            offset, p = part(name)
            if t.numel() <= DENSE_AS_INDEX:
                p["starts"].append(offset)
                p["lengths"].append(t.numel())
                p["ranged"].append(t.reshape(-1))
            else:
                p["slices"].append((offset, t.reshape(-1)))
        self.groups: list[_Group] = []
        for dtype, p in parts.items():
            device = flat.flat[dtype].device
            index = torch.cat(p["index"]) if p["index"] else torch.empty(0, dtype=torch.long)
            values = torch.cat(p["values"]) if p["values"] else torch.empty(0, dtype=dtype)
            order = index.argsort()  # ascending positions: friendlier to caches and prefetchers
            index, values = index[order], values[order]
            if flat.flat[dtype].numel() < 2**31:
                index = index.to(torch.int32)  # widened into the scratch buffer at each switch
            group = _Group(
                dtype,
                index.to(device),
                torch.tensor(p["starts"], dtype=torch.long, device=device),
                torch.tensor(p["lengths"], dtype=torch.long, device=device),
                torch.cat([values, *p["ranged"]]).to(device, dtype),
                [(o, t.to(device)) for o, t in p["slices"]],
            )
            self.groups.append(group)
        flat.reserve({g.dtype: g.k for g in self.groups})

    @property
    def k(self) -> int:
        """Scalars written per switch."""
        return sum(g.k + sum(s.numel() for _, s in g.slices) for g in self.groups)

    def tensors(self) -> list[Tensor]:
        """What the switch holds in memory."""
        return [
            t
            for g in self.groups
            for t in (g.index, g.starts, g.lengths, g.values, *(s for _, s in g.slices))
        ]

    @torch.no_grad()
    def apply(self) -> _Handle:
        """Write the task's values into the base; return what :meth:`revert` needs."""
        saved_slices = []
        for g in self.groups:
            flat = self.flat.flat[g.dtype]
            if g.k:
                index = g.positions(self.flat._index)
                torch.index_select(flat, 0, index, out=self.flat._saved[g.dtype][: g.k])
                flat.index_copy_(0, index, g.values)
            kept = []
            for offset, values in g.slices:
                window = flat[offset : offset + values.numel()]
                kept.append(window.clone())
                window.copy_(values)
            saved_slices.append(kept)
        return _Handle(saved_slices)

    @torch.no_grad()
    def revert(self, handle: _Handle) -> None:
        """Put the base's values back, bit for bit (the base must not have switched since)."""
        for g, kept in zip(self.groups, handle.saved_slices, strict=True):
            flat = self.flat.flat[g.dtype]
            if g.k:
                index = g.positions(self.flat._index)
                flat.index_copy_(0, index, self.flat._saved[g.dtype][: g.k])
            for (offset, values), old in zip(g.slices, kept, strict=True):
                flat[offset : offset + values.numel()].copy_(old)
