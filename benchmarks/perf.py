"""Cost of SH-PEFT's sparse training against full fine-tuning, peft LoRA and peft Super-Tuning.

One command, CPU or CUDA; prints a Markdown table per model and writes every figure to JSON:

    python benchmarks/perf.py --quick            # tiny model, CI smoke (< 1 minute)
    python benchmarks/perf.py                    # vit_pico, vit_mini, ViT-Ti/16, ViT-B/16
    python benchmarks/perf.py --sizes vit_tiny --repeats 7 --out runs/perf.json

Every time is the median of ``--repeats`` runs after ``--warmup`` runs, and every method is run
side by side in the same process, on copies of the same model, on the same batches, interleaved
(round r runs every method once), so the load of a shared machine affects all of them alike:
the ratios are the result, absolute numbers are printed for orientation only.

Figures per model:

* ``importance``: ``estimate_importance`` over B batches / B plain forward+backward passes;
* ``step``: one SGD (momentum 0.9) training step per method, and its ratio to full fine-tuning,
  to LoRA and to the *lower bound*: one forward plus a backward that computes activation
  gradients only (no weight gradient at all) down to the lowest layer that holds trainable
  scalars of that SH-PEFT selection;
* ``memory``: peak memory of training (CPU: peak RSS (``VmHWM``) of a fresh process per method,
  forked from a server that has only imported the libraries; CUDA: ``max_memory_allocated``);
* ``optimizer_state_bytes`` and ``trainable_bytes`` per method;
* ``delta_bytes`` per method, against ``8 bytes x k + head`` for the sparse methods;
* ``inference``: latency of the merged model / the base model (eval, no grad).

Methods: ``full`` (every weight), ``linear`` (head only), ``lora`` (peft LoRA r=8 on qkv+proj,
as ``shpeft train --method lora``), ``supertuning@d`` (peft's Super-Tuning tuner, its own
magnitude selection, density d of every qkv/proj/fc1/fc2 Linear; Linear layers only),
``shpeft@d`` (SH-PEFT, global top-d by hybrid importance), ``naive@d`` (the same selection with
the dense-gradient-then-gather design SH-PEFT used before, for reference) and ``lower_bound@d``.
Credits: LoRA and Super-Tuning are Hugging Face peft's implementations.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "models"

# name -> (model spec, CPU batch, CUDA batch); the spec is a models/ folder or a timm name
SIZES: dict[str, tuple[str, int, int]] = {
    "tiny": ("tiny", 8, 8),
    "vit_pico": (str(MODELS / "vit_pico"), 32, 64),
    "vit_mini": (str(MODELS / "vit_mini"), 32, 64),
    "vit_tiny": ("vit_tiny_patch16_224", 16, 64),
    "vit_base": ("vit_base_patch16_224", 4, 64),
}
DENSITIES = (0.01, 0.0001)
NUM_CLASSES = 10
LORA_RANK = 8
LINEAR_TARGETS = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"


def build_model(spec: str) -> nn.Module:
    """The backbone with a fresh head; random weights for timm names and the tiny model."""
    from shpeft.backbones import BackboneConfig, create_model

    torch.manual_seed(0)
    if spec == "tiny":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=NUM_CLASSES
        )
    if os.path.isdir(spec):
        model, _ = create_model(BackboneConfig(model=spec), NUM_CLASSES)
    else:
        model, _ = create_model(BackboneConfig(model=spec, pretrained=False), NUM_CLASSES)
    return model


def image_size(model: nn.Module) -> int:
    size = model.patch_embed.img_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def make_batches(model: nn.Module, batch: int, n: int, device: torch.device) -> list:
    g = torch.Generator().manual_seed(1234)
    s = image_size(model)
    return [
        (
            torch.randn(batch, 3, s, s, generator=g).to(device),
            torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device),
        )
        for _ in range(n)
    ]


# ----------------------------------------------------------------------------------------------
# Methods: each turns a fresh copy of the base model into (model, trainable params)


def head_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.startswith("head.")]


def prep_full(model: nn.Module, **_: Any) -> list[nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(True)
    return list(model.parameters())


def prep_linear(model: nn.Module, **_: Any) -> list[nn.Parameter]:
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head."))
    return head_params(model)


def prep_lora(model: nn.Module, **_: Any) -> list[nn.Parameter]:
    from shpeft.methods import PrepareContext, get_method

    cls = get_method("lora")
    method = cls(cls.config_cls(lora_rank=LORA_RANK, lora_alpha=float(LORA_RANK)))
    return method.prepare(model, PrepareContext())


def prep_supertuning(model: nn.Module, density: float, **_: Any) -> list[nn.Parameter]:
    from peft import SupertuningConfig, inject_adapter_in_model

    for p in model.parameters():
        p.requires_grad_(False)
    cfg = SupertuningConfig(target_modules=LINEAR_TARGETS, sparsity=1.0 - density)
    inject_adapter_in_model(cfg, model)
    for p in head_params(model):
        p.requires_grad_(True)
    values = [p for n, p in model.named_parameters() if "supertuning_values" in n]
    return values + head_params(model)


def prep_shpeft(model: nn.Module, indices: dict, sampled: bool = True, **_: Any) -> list:
    from shpeft.sparse import attach_sparse

    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head."))
    return attach_sparse(model, indices, sampled_linear=sampled) + head_params(model)


def prep_lower_bound(model: nn.Module, indices: dict, **_: Any) -> list[nn.Parameter]:
    """No trainable tensor; the activation entering the lowest trained layer requires grad.

    A backward from the loss then computes activation gradients only, down to that layer: the
    least any method that trains scalars there has to do besides its weight gradients.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = [n for n in indices if n.startswith("blocks.")]
    if any(not n.startswith(("blocks.", "norm.", "fc_norm.", "head.")) for n in indices):
        # embeddings / patch embedding: from the token embeddings up (no image gradient)
        model.patch_embed.register_forward_hook(lambda m, a, out: out.detach().requires_grad_())
    elif blocks:
        first = min(int(n.split(".")[1]) for n in blocks)
        model.blocks[first].register_forward_pre_hook(
            lambda m, a: (a[0].detach().requires_grad_(), *a[1:])
        )
    else:
        model.norm.register_forward_pre_hook(lambda m, a: (a[0].detach().requires_grad_(),))
    return []


@dataclass
class MethodSpec:
    name: str
    prep: Callable[..., list]
    kwargs: dict[str, Any] = field(default_factory=dict)
    sparse_k: int | None = None  # selected backbone scalars (sparse methods)


def method_specs(selections: dict[float, dict]) -> list[MethodSpec]:
    specs = [
        MethodSpec("full", prep_full),
        MethodSpec("lora", prep_lora),
        MethodSpec("linear", prep_linear),
    ]
    for d in DENSITIES:
        idx = selections[d]
        k = sum(int(i.numel()) for i in idx.values())
        tag = f"{d:.2%}"
        specs += [
            MethodSpec(f"shpeft@{tag}", prep_shpeft, {"indices": idx}, k),
            MethodSpec(f"supertuning@{tag}", prep_supertuning, {"density": d}),
            MethodSpec(f"lower_bound@{tag}", prep_lower_bound, {"indices": idx}),
        ]
    specs.append(
        MethodSpec(
            f"naive@{DENSITIES[0]:.2%}",
            prep_shpeft,
            {"indices": selections[DENSITIES[0]], "sampled": False},
        )
    )
    return specs


# ----------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, opt, batch) -> None:
    x, y = batch
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if opt is not None:
        opt.step()


# The clock of every timing: "wall" (perf_counter) or "cpu" (process CPU time). On a CPU shared
# with other jobs, the CPU time of a single-threaded process is far steadier than the wall clock
# (which counts the time others hold the cores); with several threads it would count OpenMP
# spin-waits, so "auto" uses it only with one thread. Set by main().
CLOCK = {"name": "wall", "fn": time.perf_counter}


def interleaved(
    fns: dict[str, Callable[[int], None]],
    warmup: int,
    repeats: int,
    device,
    raw: dict | None = None,
) -> dict[str, float]:
    """Median seconds per callable; round r calls every callable once (argument r).

    The order rotates from round to round, so no method always follows the same neighbour.
    ``raw``, if given, receives every timed sample per callable.
    """
    clock = CLOCK["fn"]
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for j in range(len(names)):
            name = names[(j + r) % len(names)]
            sync(device)
            t0 = clock()
            fns[name](r)
            sync(device)
            if r >= warmup:
                times[name].append(clock() - t0)
    if raw is not None:
        raw.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


def make_optimizer(params: list[nn.Parameter]):
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9) if params else None


def tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def optimizer_state_bytes(opt) -> int:
    if opt is None:
        return 0
    return sum(
        tensor_bytes(v for v in s.values() if torch.is_tensor(v)) for s in opt.state.values()
    )


# ----------------------------------------------------------------------------------------------
# Delta files


def delta_bytes(name: str, model: nn.Module, tmp: Path) -> int:
    from safetensors.torch import save_file

    from shpeft.delta import Delta
    from shpeft.methods.base import head_delta
    from shpeft.methods.lora import lora_delta
    from shpeft.sparse import sparse_state

    path = tmp / f"{name.replace('@', '_').replace('%', 'pct')}.safetensors"
    kind = name.split("@")[0]
    if kind in ("shpeft", "naive"):
        sparse = {n: (i.to(torch.int32), v) for n, (i, v) in sparse_state(model).items()}
        Delta(sparse=sparse, dense=head_delta(model)).save(path)
    elif kind == "full":
        Delta(dense={n: p.detach() for n, p in model.named_parameters()}).save(path)
    elif kind == "linear":
        Delta(dense=head_delta(model)).save(path)
    elif kind == "lora":
        Delta(dense=lora_delta(model) | head_delta(model)).save(path)
    elif kind == "supertuning":
        # peft's own storage: int32 flat indices + float32 values per layer, and the head
        tensors = {
            n: t.detach().contiguous()
            for n, t in model.state_dict().items()
            if "supertuning_" in n or n.startswith("head.")
        }
        save_file(tensors, str(path))
    else:
        return 0
    return path.stat().st_size


# ----------------------------------------------------------------------------------------------
# Peak memory in a fresh process per method (CPU)


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _memory_child(spec: str, method: MethodSpec, batch: int, steps: int, conn) -> None:
    try:
        torch.set_num_threads(1)  # memory does not depend on it; keeps the host quiet
        model = build_model(spec)
        params = method.prep(model, **method.kwargs)
        model.train()
        opt = make_optimizer(params)
        batches = make_batches(model, batch, 2, torch.device("cpu"))
        setup_kb = _proc_status_kb("VmRSS") or 0
        for i in range(steps):
            train_step(model, opt, batches[i % 2])
        peak_kb = _proc_status_kb("VmHWM")
        if peak_kb is None:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
            import resource

            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak_kb = peak_kb // 1024 if sys.platform == "darwin" else peak_kb
        conn.send({"peak_bytes": peak_kb * 1024, "setup_bytes": setup_kb * 1024})
    except Exception as e:  # report, don't hang the parent
        conn.send({"error": repr(e)})
    finally:
        conn.close()


def cpu_peak_memory(spec: str, methods: list[MethodSpec], batch: int, steps: int) -> dict:
    """Peak RSS per method, each in a process forked from a server that only imported code.

    The forkserver imports torch, timm, peft and shpeft once; every child starts from that same
    state (its peak includes those shared pages, identical for all methods), builds its own
    model and trains ``steps`` steps.
    """
    ctx = mp.get_context("forkserver")
    out = {}
    for m in methods:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_memory_child, args=(spec, m, batch, steps, child))
        p.start()
        child.close()
        try:
            out[m.name] = parent.recv()
        except EOFError:
            out[m.name] = {"error": f"child exited with {p.exitcode}"}
        p.join()
    return out


def cuda_peak_memory(models, batches, device) -> dict:
    out = {}
    for name, (model, opt) in models.items():
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        for b in batches[:2]:
            train_step(model, opt, b)
        torch.cuda.synchronize(device)
        out[name] = {"peak_bytes": torch.cuda.max_memory_allocated(device)}
    return out


# ----------------------------------------------------------------------------------------------


def time_importance(base: nn.Module, batches: list, args, device) -> tuple[dict, dict]:
    """``estimate_importance`` over B batches against B plain forward+backward passes."""
    from shpeft import estimate_importance

    imp_model = copy.deepcopy(base)
    plain_model = copy.deepcopy(base)
    plain_model.eval()  # estimate_importance runs in eval() mode too

    def plain(_: int) -> None:
        for x, y in batches:
            F.cross_entropy(plain_model(x), y).backward()
        plain_model.zero_grad(set_to_none=True)

    scores: dict = {}

    def importance(_: int) -> None:
        scores.update(estimate_importance(imp_model, batches, device=device))

    t = interleaved({"importance": importance, "plain": plain}, args.warmup, args.repeats, device)
    fig = {
        "batches": len(batches),
        "importance_s": t["importance"],
        "plain_fwd_bwd_s": t["plain"],
        "ratio": t["importance"] / t["plain"],
    }
    return fig, scores


def bench_size(size: str, args, device: torch.device, tmp: Path) -> dict[str, Any]:
    from shpeft import select_topk
    from shpeft.selection import masks_to_indices
    from shpeft.sparse import merge_sparse

    spec, cpu_batch, cuda_batch = SIZES[size]
    batch = args.batch or (cuda_batch if device.type == "cuda" else cpu_batch)
    base = build_model(spec).to(device)
    n_params = sum(p.numel() for p in base.parameters())
    n_imp = args.importance_batches
    batches = make_batches(base, batch, max(2, n_imp), device)
    print(f"\n## {size}: {spec}, {n_params / 1e6:.2f}M parameters, batch {batch}, {device}")

    # 1. importance estimation vs the same number of plain forward+backward passes
    importance_fig, scores = time_importance(base, batches[:n_imp], args, device)
    selections = {d: masks_to_indices(select_topk(scores, d)) for d in DENSITIES}

    # 2. one training step per method, interleaved
    specs = method_specs(selections)
    models: dict[str, tuple[nn.Module, Any]] = {}
    info: dict[str, dict[str, Any]] = {}
    skipped = {}
    for m in list(specs):
        model = copy.deepcopy(base)
        try:
            params = m.prep(model, **m.kwargs)
        except ValueError as e:  # e.g. Super-Tuning: a density that leaves a layer empty
            skipped[m.name] = str(e)
            specs.remove(m)
            print(f"skipped {m.name}: {e}")
            continue
        model.train()
        opt = make_optimizer(params)
        models[m.name] = (model, opt)
        head = sum(p.numel() for p in head_params(model))
        info[m.name] = {
            "trainable_scalars": sum(p.numel() for p in params),
            "trainable_bytes": tensor_bytes(params),
            "head_scalars": head if params else 0,
        }
        if m.sparse_k is not None:
            info[m.name]["k"] = m.sparse_k
        if m.name.startswith("supertuning"):
            info[m.name]["k"] = info[m.name]["trainable_scalars"] - head

    fns = {
        name: (lambda r, mo=mo, op=op: train_step(mo, op, batches[r % len(batches)]))
        for name, (mo, op) in models.items()
    }
    samples: dict[str, list[float]] = {}
    steps = interleaved(fns, args.warmup, args.repeats, device, raw=samples)
    full, lora = steps["full"], steps["lora"]
    for name, s in steps.items():
        info[name]["step_s"] = s
        info[name]["step_samples_s"] = samples[name]
        info[name]["step_vs_full"] = s / full
        info[name]["step_vs_lora"] = s / lora
        for d in DENSITIES:
            tag = f"{d:.2%}"
            if name.endswith("@" + tag) and not name.startswith("lower_bound"):
                info[name]["step_vs_lower_bound"] = s / steps[f"lower_bound@{tag}"]
                st = steps.get(f"supertuning@{tag}")
                if st:
                    info[name]["step_vs_supertuning"] = s / st
    for name, (_, opt) in models.items():
        info[name]["optimizer_state_bytes"] = optimizer_state_bytes(opt)

    # 3. delta files
    for name, (model, _) in models.items():
        if not name.startswith("lower_bound"):
            info[name]["delta_bytes"] = delta_bytes(name, model, tmp)
            if "k" in info[name]:
                bound = 8 * info[name]["k"] + 4 * info[name]["head_scalars"]
                info[name]["delta_bound_bytes"] = bound
                info[name]["delta_over_bound_bytes"] = info[name]["delta_bytes"] - bound

    # 4. peak memory
    if args.memory:
        if device.type == "cuda":
            mem = cuda_peak_memory(models, batches, device)
        else:
            mem = cpu_peak_memory(spec, specs, batch, steps=2)
        for name, m in mem.items():
            info[name].update({f"memory_{k}": v for k, v in m.items()})
        lora_peak = mem.get("lora", {}).get("peak_bytes")
        for name, m in mem.items():
            if lora_peak and "peak_bytes" in m:
                info[name]["memory_vs_lora"] = m["peak_bytes"] / lora_peak

    # 5. merged inference vs the base model
    merged = {"base": copy.deepcopy(base).eval()}
    sh = models[f"shpeft@{DENSITIES[0]:.2%}"][0]
    merged["shpeft"] = merge_sparse(copy.deepcopy(sh)).eval()
    from shpeft.methods.lora import merge_lora

    merged["lora"] = merge_lora(copy.deepcopy(models["lora"][0])).eval()
    x = batches[0][0]

    def infer(m: nn.Module) -> Callable[[int], None]:
        def f(_: int) -> None:
            with torch.no_grad():
                m(x)

        return f

    lat = interleaved({k: infer(m) for k, m in merged.items()}, args.warmup, args.repeats, device)
    inference = {
        "base_s": lat["base"],
        "shpeft_merged_s": lat["shpeft"],
        "lora_merged_s": lat["lora"],
        "shpeft_ratio": lat["shpeft"] / lat["base"],
        "lora_ratio": lat["lora"] / lat["base"],
    }
    result = {
        "model": spec,
        "parameters": n_params,
        "batch": batch,
        "image_size": image_size(base),
        "importance": importance_fig,
        "methods": info,
        "skipped": skipped,
        "inference": inference,
    }
    print_table(size, result)
    return result


def _fmt_bytes(b: float | None) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(b) < 1024 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def print_table(size: str, r: dict) -> None:
    imp = r["importance"]
    print(
        f"importance: {imp['importance_s'] * 1e3:.1f} ms for {imp['batches']} batches vs "
        f"{imp['plain_fwd_bwd_s'] * 1e3:.1f} ms plain forward+backward: {imp['ratio']:.3f} x"
    )
    cols = (
        "| method | step ms | / full | / LoRA | / Super-Tuning | / lower bound | peak mem "
        "| mem / LoRA | trainable | optimizer state | delta | delta bound (8k+head) |"
    )
    print(cols)
    print("|" + "---|" * (cols.count("|") - 1))
    for name, m in r["methods"].items():

        def f(key: str, fmt: str = "{:.2f}", m: dict = m) -> str:
            v = m.get(key)
            return "-" if v is None else fmt.format(v)

        print(
            f"| {name} | {m['step_s'] * 1e3:.1f} | {f('step_vs_full')} | {f('step_vs_lora')} | "
            f"{f('step_vs_supertuning')} | {f('step_vs_lower_bound')} | "
            f"{_fmt_bytes(m.get('memory_peak_bytes'))} | {f('memory_vs_lora', '{:.3f}')} | "
            f"{_fmt_bytes(m['trainable_bytes'])} | {_fmt_bytes(m['optimizer_state_bytes'])} | "
            f"{_fmt_bytes(m.get('delta_bytes'))} | {_fmt_bytes(m.get('delta_bound_bytes'))} |"
        )
    inf = r["inference"]
    print(
        f"merged inference / base: shpeft {inf['shpeft_ratio']:.3f} x, lora {inf['lora_ratio']:.3f} x "
        f"(base {inf['base_s'] * 1e3:.1f} ms)"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model only, few repeats (CI smoke)")
    p.add_argument(
        "--sizes",
        default=None,
        help=f"comma-separated subset of {','.join(SIZES)} (default: all but tiny)",
    )
    p.add_argument("--batch", type=int, default=None, help="override the per-size batch")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds")
    p.add_argument("--importance-batches", type=int, default=None, help="B for importance")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument(
        "--clock",
        default="auto",
        choices=("auto", "wall", "cpu"),
        help="timer: wall clock, or process CPU time (auto: CPU time on CPU with --threads 1, "
        "the steady choice on a shared machine; wall clock otherwise)",
    )
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak memory")
    p.add_argument("--out", default="runs/perf.json", help="JSON file to write")
    args = p.parse_args(argv)
    sizes = (args.sizes or ("tiny" if args.quick else "vit_pico,vit_mini,vit_tiny,vit_base")).split(
        ","
    )
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        p.error(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.importance_batches = args.importance_batches or 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    CLOCK.update(name=clock, fn=time.process_time if clock == "cpu" else time.perf_counter)
    if args.memory and device.type == "cpu":
        # start the forkserver now (it imports the libraries once, in the background)
        mp.set_forkserver_preload(["torch", "timm", "peft", "shpeft.methods", "shpeft.sparse"])
    import timm

    env = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "peft": __import__("peft").__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "clock": clock,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    results: dict[str, Any] = {"environment": env, "settings": vars(args).copy(), "sizes": {}}
    print(f"environment: {env}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            results["sizes"][size] = bench_size(size, args, device, Path(tmp))
    results["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {out} ({results['wall_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
