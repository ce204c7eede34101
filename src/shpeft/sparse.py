"""Sparse training of selected scalars (paper eq. 2): w <- w - eta * dL/dw * M.

Rather than masking dense gradients, each touched tensor keeps its pretrained values frozen and
gains a 1-D trainable ``values`` vector for its k_i selected scalars, so the optimizer (momentum,
weight decay) only ever sees the k selected scalars: O(k) state, and nothing else can move, not
even by rounding, because every other entry is the frozen base. This mirrors the storage of peft's
Super-Tuning (int flat indices + 1-D values). The values are attached with
``torch.nn.utils.parametrize`` (one :class:`SparseUpdate` per tensor), so every parameter kind
(Linear, Conv2d, LayerNorm, position embedding, class token) has the same names and state:

    W_eff = W_base.flatten().index_put(indices, values).view_as(W_base)

Two execution paths share that storage:

* the generic path (small tensors: norms, biases, embeddings, the patch-embedding conv) runs the
  parametrization above; autograd then computes the tensor's dense gradient and gathers k_i
  entries from it, which is cheap for tensors this small;
* the sampled path for ``nn.Linear`` weights (qkv, proj, fc1, fc2: nearly all scalars). A dense
  weight gradient there costs ``tokens x d_out x d_in`` multiply-adds, as much as full
  fine-tuning, whereas only k_i entries ``dW[r, c] = sum_t dY[t, r] * X[t, c]`` are needed (a
  sampled dense-dense matrix product, SDDMM). :class:`SparseLinearFunction` computes exactly
  those: entries that crowd into a few rows or columns come from a GEMM over just those rows
  / columns, the scattered rest from gathered dot products (see :class:`SampledGradPlan`). A
  tensor without selected scalars has no parametrization and therefore no weight gradient.

The sampled path also drops the per-step ``W_eff`` copy: the frozen base tensor itself serves as
the cache of ``W_eff``. Its selected entries are overwritten with ``values`` (O(k_i), only when
``values`` or the base changed since the last write, tracked with the tensors' version counters)
and every other entry stays the pretrained value bit for bit, so the generic formula above, the
merged weights and :func:`sparse_state` are unchanged.

Credits: the (indices, values) storage follows peft's Super-Tuning tuner
(``peft.tuners.supertuning``) and SPT (He et al., "Sensitivity-Aware Visual Parameter-Efficient
Fine-Tuning", ICCV 2023); SDDMM as the kernel of sparse training follows the sparse-training
literature (e.g. Nikdan et al., "SparseProp", ICML 2023).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

# Cost of one gathered dot-product entry relative to one multiply-add of a GEMM, per token.
# Measured on CPU (AVX-512, torch 2.14, benchmarks/perf.py): a gathered entry costs ~50-80
# GEMM multiply-adds. On CUDA, GEMMs are relatively faster still (tensor cores vs memory
# bandwidth), so whole rows / columns pay off sooner. Fixed constants, not a run-time
# calibration, so that the plan, and with it every float rounding, is reproducible.
GATHER_COST = {"cpu": 64.0, "cuda": 512.0}
DEFAULT_GATHER_COST = 64.0
# Gathered elements per chunk of the scattered entries (bounds the temporary memory: 2**21
# float32 = 8 MiB per gathered operand).
CHUNK_ELEMENTS = 2**21


class SampledGradPlan(nn.Module):
    """How to compute ``dW[rows, cols]`` of one Linear weight without a dense ``dW``.

    The k selected entries are split into three disjoint groups by a greedy cover (computed once,
    when the selection is attached):

    * *dense rows* ``R``: ``dW[R, :] = dY[:, R]^T X`` as one GEMM, then gather the entries;
    * *dense columns* ``C``: ``dW[:, C] = dY^T X[:, C]`` as one GEMM, then gather;
    * *scattered* entries: ``sum_t dY[t, r] * X[t, c]`` from gathered columns, chunked.

    A row costs ``d_in`` multiply-adds per token, a column ``d_out``, a scattered entry
    ``gather_cost``; a row or column is taken while it saves more than it costs. SH-PEFT's
    selections crowd into a few rows / columns (outlier channels), so the GEMM parts are small.

    Only the input features that some selected entry reads are needed for the weight gradient.
    When those are at most half of ``d_in``, the forward saves just those columns of ``X`` for
    the backward (:meth:`restrict`) instead of all of ``X``: for a frozen-weight Linear autograd
    would keep nothing at all, so this is the activation memory the sparse update costs.

    Everything is stored as non-persistent buffers: it moves with ``.to()`` and never enters a
    state dict.
    """

    def __init__(self, indices: Tensor, shape: tuple[int, int], gather_cost: float) -> None:
        super().__init__()
        d_out, d_in = shape
        self.shape = (d_out, d_in)
        self.k = int(indices.numel())
        flat = indices.detach().cpu().numpy().astype(np.int64)
        rows, cols = flat // d_in, flat % d_in
        dense_rows, dense_cols, row_of, col_of = _greedy_cover(rows, cols, d_out, d_in, gather_cost)
        in_row, in_col = row_of >= 0, col_of >= 0
        rest = ~(in_row | in_col)
        dev = indices.device
        used = np.unique(cols)  # the input features the selected entries read
        self.subset = bool(used.size <= d_in // 2)
        # columns are addressed inside the saved input: its restriction to `used`, or all of it
        ucol = np.searchsorted(used, cols) if self.subset else cols
        width = used.size if self.subset else d_in
        self.width = int(width)

        def buf(name: str, a: np.ndarray) -> None:
            self.register_buffer(name, torch.as_tensor(a, dtype=torch.long, device=dev), False)

        buf("rows_sel", dense_rows)  # rows computed by GEMM
        buf("rows_pos", np.nonzero(in_row)[0])  # their entries' positions among the k
        buf("rows_at", row_of[in_row] * width + ucol[in_row])  # flat index into dW[R, used]
        buf("x_cols", used if self.subset else np.zeros(0, dtype=np.int64))
        buf("cols_sel", np.searchsorted(used, dense_cols) if self.subset else dense_cols)
        buf("cols_pos", np.nonzero(in_col)[0])
        buf("cols_at", rows[in_col] * len(dense_cols) + col_of[in_col])  # into dW[:, C]
        buf("rest_pos", np.nonzero(rest)[0])
        buf("rest_rows", rows[rest])
        buf("rest_cols", ucol[rest])

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, k={self.k}, rows={self.rows_sel.numel()} "
            f"({self.rows_pos.numel()} entries), cols={self.cols_sel.numel()} "
            f"({self.cols_pos.numel()} entries), scattered={self.rest_pos.numel()}, "
            f"saved input columns={self.width}"
        )

    def macs_per_token(self, gather_cost: float = 1.0) -> float:
        """Multiply-adds per token of this plan (scattered entries weighted by ``gather_cost``)."""
        d_out, d_in = self.shape
        return (
            self.rows_sel.numel() * self.width
            + self.cols_sel.numel() * d_out
            + gather_cost * self.rest_pos.numel()
        )

    def restrict(self, x: Tensor) -> Tensor:
        """The part of the input (tokens x d_in) that :meth:`forward` needs."""
        return x.index_select(1, self.x_cols) if self.subset else x

    def forward(self, grad_out: Tensor, x: Tensor) -> Tensor:
        """``dW.flatten()[indices]`` for ``grad_out`` (tokens x d_out) and ``restrict(x)``."""
        # accumulate in at least float32 (bf16 / fp16 activations under autocast)
        acc = torch.promote_types(grad_out.dtype, torch.float32)
        parts = []
        if self.rows_sel.numel():
            g = grad_out
            if self.rows_sel.numel() != self.shape[0]:
                g = grad_out.index_select(1, self.rows_sel)
            dw_rows = g.t().mm(x)  # |R| x d_in
            parts.append((self.rows_pos, dw_rows.reshape(-1).index_select(0, self.rows_at)))
        if self.cols_sel.numel():
            xc = x if self.cols_sel.numel() == self.width else x.index_select(1, self.cols_sel)
            dw_cols = grad_out.t().mm(xc)  # d_out x |C|
            parts.append((self.cols_pos, dw_cols.reshape(-1).index_select(0, self.cols_at)))
        n_rest = self.rest_pos.numel()
        if n_rest:
            step = max(1, CHUNK_ELEMENTS // max(1, grad_out.shape[0]))
            chunks = []
            for s in range(0, n_rest, step):
                r, c = self.rest_rows[s : s + step], self.rest_cols[s : s + step]
                prod = grad_out.index_select(1, r) * x.index_select(1, c)  # tokens x chunk
                chunks.append(prod.sum(0, dtype=acc))
            parts.append((self.rest_pos, torch.cat(chunks) if len(chunks) > 1 else chunks[0]))
        if len(parts) == 1:  # one group holds all k entries, in index order
            return parts[0][1].to(acc)
        out = torch.empty(self.k, dtype=acc, device=grad_out.device)
        for pos, val in parts:
            out.index_copy_(0, pos, val.to(acc))
        return out


def _greedy_cover(
    rows: np.ndarray, cols: np.ndarray, d_out: int, d_in: int, gather_cost: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Choose rows / columns to compute by GEMM; the other entries are gathered.

    Greedy weighted cover: repeatedly take the row (cost ``d_in``) or column (cost ``d_out``)
    whose still-uncovered entries would cost the most to gather, while that exceeds its cost.

    Returns:
        ``(dense_rows, dense_cols, row_of, col_of)``: the chosen rows and columns (ascending),
        and per entry its position in ``dense_rows`` / ``dense_cols`` or -1 (each entry is
        assigned to one group only: a row taken first keeps its entries).
    """
    k = rows.size
    row_count = np.bincount(rows, minlength=d_out).astype(np.int64)
    col_count = np.bincount(cols, minlength=d_in).astype(np.int64)
    by_row = np.argsort(rows, kind="stable")
    row_start = np.searchsorted(rows[by_row], np.arange(d_out + 1))
    by_col = np.argsort(cols, kind="stable")
    col_start = np.searchsorted(cols[by_col], np.arange(d_in + 1))
    alive = np.ones(k, dtype=bool)
    take_rows: list[int] = []
    take_cols: list[int] = []
    while True:
        r, c = int(row_count.argmax()), int(col_count.argmax())
        gain_r = gather_cost * row_count[r] - d_in
        gain_c = gather_cost * col_count[c] - d_out
        if max(gain_r, gain_c) <= 0:
            break
        if gain_r >= gain_c:
            ents = by_row[row_start[r] : row_start[r + 1]]
            ents = ents[alive[ents]]
            row_count[r] = 0
            np.subtract.at(col_count, cols[ents], 1)
            take_rows.append(r)
        else:
            ents = by_col[col_start[c] : col_start[c + 1]]
            ents = ents[alive[ents]]
            col_count[c] = 0
            np.subtract.at(row_count, rows[ents], 1)
            take_cols.append(c)
        alive[ents] = False
    dense_rows = np.array(sorted(take_rows), dtype=np.int64)
    dense_cols = np.array(sorted(take_cols), dtype=np.int64)
    row_pos = np.full(d_out, -1, dtype=np.int64)
    row_pos[dense_rows] = np.arange(dense_rows.size)
    col_pos = np.full(d_in, -1, dtype=np.int64)
    col_pos[dense_cols] = np.arange(dense_cols.size)
    row_of = row_pos[rows]
    col_of = np.where(row_of >= 0, -1, col_pos[cols])  # rows win ties
    return dense_rows, dense_cols, row_of, col_of


class SparseLinearFunction(torch.autograd.Function):
    """``F.linear(x, W_eff, b)`` whose weight gradient is only the selected entries.

    Forward is the plain linear with ``W_eff`` (the base tensor that already holds the values).
    Backward: ``dX = dY @ W_eff`` (dense: the layers below need it anyway), ``db = sum_t dY``
    when the bias trains, and ``d values = dW[rows, cols]`` from :class:`SampledGradPlan`,
    never a dense ``dW``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        values: Tensor,
        plan: SampledGradPlan,
    ) -> Tensor:
        # for d values only the input columns the selected entries read (plan.restrict)
        x_w = plan.restrict(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[3] else None
        ctx.save_for_backward(x_w, weight)
        ctx.plan = plan
        ctx.has_bias = bias is not None
        ctx.x_dtype = x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        x_w, weight = ctx.saved_tensors
        grad_x = grad_bias = grad_values = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight.to(grad_out.dtype)).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        if ctx.needs_input_grad[3]:
            grad_values = ctx.plan(g2, x_w.to(g2.dtype))
        return grad_x, None, grad_bias, grad_values, None


class SparseUpdate(nn.Module):
    """Parametrization that overwrites ``indices`` of the frozen base tensor with ``values``.

    With ``plan`` set (``nn.Linear`` weights), the owner's forward uses
    :class:`SparseLinearFunction` and the base tensor doubles as the ``W_eff`` cache (see the
    module docstring); the parametrization's own forward, used by the generic path and by
    :func:`merge_sparse`, gives the same tensor either way.
    """

    def __init__(self, base: Tensor, indices: Tensor, *, plan: SampledGradPlan | None = None):
        super().__init__()
        indices = indices.to(device=base.device, dtype=torch.long)
        self.register_buffer("indices", indices, persistent=False)
        self.values = nn.Parameter(base.detach().reshape(-1)[indices].clone())
        self.plan = plan
        if plan is not None:
            # the sampled path writes W_eff into the base tensor (its cache): keep the
            # pretrained values of the selected entries (O(k)) to report the base exactly
            self.register_buffer("base_values", self.values.detach().clone(), persistent=False)
        self._synced: tuple[int, int, int, int] | None = None

    def forward(self, base: Tensor) -> Tensor:
        flat = base.reshape(-1).index_put((self.indices,), self.values)  # out of place
        return flat.view(base.shape)

    @torch.no_grad()
    def restore_base(self, original: Tensor) -> Tensor:
        """The pretrained tensor, from the parametrization's ``original`` (a copy when the
        sampled path has written trained values into it, else ``original`` itself)."""
        if self.plan is None:
            return original
        out = original.detach().clone()
        out.view(-1).index_copy_(0, self.indices, self.base_values.to(out.dtype))
        return out

    @torch.no_grad()
    def sync_(self, base: Tensor) -> Tensor:
        """Write ``values`` into the base tensor in place (O(k)) if either changed; return it.

        Version counters (bumped by every in-place op: optimizer steps, ``copy_``, loading a
        state dict) tell whether a write is due. Skipping needless writes keeps the base's
        version stable between forward and backward, so two forwards before one backward
        (gradient accumulation) stay legal.
        """
        v = self.values
        key = (v._version, base._version, v.data_ptr(), base.data_ptr())
        if key != self._synced:
            base.view(-1).index_copy_(0, self.indices, v.detach().to(base.dtype))
            self._synced = (v._version, base._version, v.data_ptr(), base.data_ptr())
        return base


def _sparse_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """Forward of an ``nn.Linear`` whose weight has a :class:`SparseUpdate` (bound per module)."""
    plist = self.parametrizations["weight"]
    update: SparseUpdate = plist[0]
    weight = update.sync_(plist.original)
    bias = self.bias  # a parametrized bias goes through its own (generic) SparseUpdate
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Mixed precision: cast like autocast would for F.linear, then run the function without
        # autocast so that forward and backward see the same dtypes. Weight gradients are
        # still accumulated in float32 (SampledGradPlan), the values stay float32.
        dt = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return SparseLinearFunction.apply(
                x.to(dt),
                weight.to(dt),
                None if bias is None else bias.to(dt),
                update.values,
                update.plan,
            )
    return SparseLinearFunction.apply(x, weight, bias, update.values, update.plan)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def _sampled_path_applies(owner: nn.Module, attr: str, base: Tensor) -> bool:
    # Only a plain Linear forward (torch's or a subclass that does not override it, e.g. not the
    # L2-normalised head) and a weight that is not already parametrized otherwise.
    return (
        attr == "weight"
        and isinstance(owner, nn.Linear)
        and type(owner).forward is nn.Linear.forward
        and not parametrize.is_parametrized(owner, "weight")
        and base.dim() == 2
        and base.is_contiguous()
        and "forward" not in owner.__dict__
    )


def attach_sparse(
    model: nn.Module,
    indices: dict[str, Tensor],
    *,
    sampled_linear: bool = True,
    gather_cost: float | None = None,
) -> list[nn.Parameter]:
    """Make only ``indices`` of the named parameters trainable; return the new ``values`` params.

    Parameters not in ``indices`` are not frozen here: the caller decides (the head stays
    trainable). Each touched base tensor gets ``requires_grad=False`` so it never receives a
    gradient, and tensors without selected scalars get no weight gradient at all.

    Args:
        model: the model to re-parametrize in place.
        indices: ``{parameter name: int flat indices}`` (e.g. from ``masks_to_indices``).
        sampled_linear: compute only the selected entries of ``nn.Linear`` weight gradients
            (:class:`SparseLinearFunction`). ``False`` gives the naive design (dense gradient,
            then gather) everywhere; it exists for tests and benchmarks.
        gather_cost: cost of a gathered entry in GEMM multiply-adds (default:
            :data:`GATHER_COST` of the tensor's device type).
    """
    params = dict(model.named_parameters())
    trainable = []
    for name, idx in indices.items():
        if name not in params:
            raise ValueError(f"no parameter named {name!r} in the model")
        base = params[name]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= base.numel()):
            raise ValueError(f"indices for {name!r} out of range [0, {base.numel()})")
        owner, attr = _owner(model, name)
        base.requires_grad_(False)
        plan = None
        if sampled_linear and _sampled_path_applies(owner, attr, base):
            cost = gather_cost or GATHER_COST.get(base.device.type, DEFAULT_GATHER_COST)
            plan = SampledGradPlan(idx.to(base.device), tuple(base.shape), cost)
        update = SparseUpdate(base, idx, plan=plan)
        parametrize.register_parametrization(owner, attr, update, unsafe=True)
        if plan is not None:
            # An instance attribute wins over the class's forward; deepcopy rebinds it.
            owner.forward = types.MethodType(_sparse_linear_forward, owner)
        trainable.append(update.values)
    return trainable


def iter_sparse(model: nn.Module) -> Iterator[tuple[str, SparseUpdate]]:
    """``(parameter name, SparseUpdate)`` for every sparse parametrization in ``model``."""
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, SparseUpdate):
                    yield (f"{mod_name}.{attr}" if mod_name else attr), p


def sparse_state(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (int64 indices, values)}`` of the sparse parametrizations, detached, on the CPU."""
    return {n: (u.indices.cpu(), u.values.detach().cpu()) for n, u in iter_sparse(model)}


@torch.no_grad()
def merge_sparse(model: nn.Module) -> nn.Module:
    """Write the trained values into the base tensors and remove the parametrizations (in place).

    The result is a plain model whose state dict has the original keys; the merged tensors are
    bit-identical to the parametrized forward's weights (the scatter copies values exactly).
    """
    for name, _ in list(iter_sparse(model)):
        owner, attr = _owner(model, name)
        if attr == "weight" and getattr(owner.__dict__.get("forward"), "__func__", None) is (
            _sparse_linear_forward
        ):
            del owner.forward  # back to the class's forward
        parametrize.remove_parametrizations(owner, attr, leave_parametrized=True)
        getattr(owner, attr).requires_grad_(False)
    return model
