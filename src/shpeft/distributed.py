"""Multi-process training with PyTorch's standard engine: ``torchrun`` + DistributedDataParallel.

    torchrun --standalone --nproc_per_node=2 -m shpeft.cli train --model ... --data ...

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables;
:func:`init_from_env` reads them and joins the process group (``nccl`` on CUDA, ``gloo`` on
CPU). Without those variables everything here answers as a single process (rank 0 of 1), so the
single-process path is unchanged.

What runs where (see ``training.py`` and ``importance.py``):

* importance estimation: rank r scores mini-batches r, r+W, r+2W, ...; the per-batch
  contributions are gathered and added in the single-process batch order, so every rank holds
  bit for bit the single-process accumulators and selects the same mask;
* training: every global batch is cut into W equal slices, one per rank; DDP averages the
  gradients of the trainable tensors, which equals the gradient of the whole batch's mean loss;
* only rank 0 writes the run directory and evaluates.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialised process group (e.g. under ``torchrun``)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and evaluates."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: str = "auto") -> bool:
    """Join the process group described by torchrun's environment variables.

    Args:
        device: the run's device setting; ``cuda`` (or ``auto`` with CUDA present) selects the
            ``nccl`` backend and binds this process to GPU ``LOCAL_RANK``, anything else ``gloo``.

    Returns:
        True when this call initialised the group (the caller should :func:`cleanup` it), False
        when not launched by torchrun or already initialised.
    """
    if is_distributed() or not launched_by_torchrun():
        return False
    use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def device_for_rank(device: torch.device) -> torch.device:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun (one GPU per process)."""
    if is_distributed() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """``flag`` and-ed over all ranks (e.g. "this step's loss is finite everywhere")."""
    if not is_distributed():
        return flag
    dev = _collective_device(device)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _collective_device(device: torch.device | str) -> torch.device:
    # nccl needs CUDA tensors, gloo CPU ones
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if torch.device(device).type != "cpu" else torch.device(device)


@torch.no_grad()
def gather_in_order(tensors: Sequence[Tensor], present: bool) -> list[list[Tensor] | None]:
    """Every rank's ``tensors``, in rank order (``None`` for ranks with ``present=False``).

    One flat ``all_gather`` per call. Used to add per-batch contributions in a fixed global
    order, so that sums are bit-identical to a single process (a sum all-reduce is not: float
    addition is not associative).
    """
    world = world_size()
    if not tensors:
        return [[] for _ in range(world)]
    dtype = tensors[0].dtype
    device = _collective_device(tensors[0].device)
    flat = torch.cat([t.reshape(-1).to(device=device, dtype=dtype) for t in tensors])
    flag = torch.tensor([1.0 if present else 0.0], dtype=dtype, device=device)
    payload = torch.cat([flag, flat])
    out = [torch.empty_like(payload) for _ in range(world)]
    dist.all_gather(out, payload)
    result: list[list[Tensor] | None] = []
    for p in out:
        if p[0].item() == 0:
            result.append(None)
            continue
        parts, offset = [], 1
        for t in tensors:
            parts.append(p[offset : offset + t.numel()].view(t.shape).to(t.device))
            offset += t.numel()
        result.append(parts)
    return result
