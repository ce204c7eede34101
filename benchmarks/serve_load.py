"""Load benchmark of ``shpeft serve``: correctness under interleaved load, speed, memory.

Usage (CPU; about 5 minutes with the defaults, longer with --model dinov2_vits14):

    python benchmarks/serve_load.py --out runs/serve_bench
    python benchmarks/serve_load.py --out runs/serve_bench_dinov2 \\
        --model ../shared/models/dinov2_vits14 --image-size 112 --iterations 4 --batch-size 8 \\
        --requests 240 --batch1 60

1. Trains six tiny runs on one backbone (reused when present): SH-PEFT on three datasets,
   BitFit (switch deltas), LoRA and AdaptFormer (own modules). The runs need to be real, not
   good: a few iterations each, on small subsets of ../shared's data.
2. Writes the request images: unseen BUSI, BreastMNIST and PneumoniaMNIST images as PNG, and one
   BUSI image as JPEG, 16-bit TIFF and DICOM.
3. References: ``shpeft predict`` (the CLI, its CSV) and its computation (``load_run`` +
   ``ImageFileDataset``, batches of 64) for every run and image.
4. Starts ``shpeft serve`` subprocesses on the loopback: the N tasks on a shared backbone, a
   single-task server of one merged model (the first SH-PEFT task, ``--merged``), and the N tasks
   as N merged models (``--merged``, for memory).
5. Load: ``--clients`` concurrent clients send ``--requests`` requests (bounded by
   ``--max-seconds``) with the tasks interleaved to the shared server, then the same number for
   the one task to the merged single-task server. Every response is checked against step 3:
   logits within 1e-5, and the CLI's prediction and probabilities (to its 6 decimals, plus what
   1e-5 of logits can move them).
6. Batch of one: a single client sends each image three ways, in a random order per round (so
   background load hits all alike): to the shared server naming the next switch-delta task (every
   request switches the backbone), to the shared server naming the single task, and to the merged
   single-task server. Their p50 latencies give the overhead of switching and of sharing.
7. Memory after warm-up: the tensor bytes each server reports (``/health``) and its resident set
   (VmRSS). Then, in-process, one switch (apply + revert) against one batch-of-one forward.

Writes ``serve_load.json`` and the Markdown summary ``serve_load.md`` into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"

# name: (method, dataset, method settings)
TASKS = {
    "busi-shpeft": ("shpeft", "busi", {"ratio": 0.01}),
    "breast-shpeft": ("shpeft", "breast", {"ratio": 0.01}),
    "pneumonia-shpeft": ("shpeft", "pneumonia", {"ratio": 0.001}),
    "pneumonia-bitfit": ("bitfit", "pneumonia", {}),
    "breast-lora": ("lora", "breast", {}),
    "busi-adapter": ("adapter", "busi", {}),
}
SINGLE = "busi-shpeft"  # the task of the single-task merged server
ATOL = 1e-5


# --------------------------------------------------------------------------------------------
# data, runs, images


def subsets(root: Path) -> dict[str, Path]:
    """Small training sets: 40 BUSI images per class, BreastMNIST, 600 PneumoniaMNIST (seeded)."""
    busi = root / "busi"
    if not busi.exists():
        for cls in ("benign", "malignant", "normal"):
            (busi / cls).mkdir(parents=True)
            for src in sorted((DATA / "busi_256" / cls).glob("*.png"))[:40]:
                shutil.copy(src, busi / cls / src.name)
    pneumonia = root / "pneumoniamnist.npz"  # the name gives its MedMNIST class names
    if not pneumonia.exists():
        full = np.load(DATA / "pneumoniamnist_reconstructed" / "pneumoniamnist_reconstructed.npz")
        rng = np.random.default_rng(0)
        parts = {}
        for split, n in {"train": 400, "val": 100, "test": 100}.items():
            keep = np.sort(rng.permutation(len(full[f"{split}_labels"]))[:n])
            parts |= {f"{split}_{k}": full[f"{split}_{k}"][keep] for k in ("images", "labels")}
        np.savez(pneumonia, **parts)
    return {
        "busi": busi,
        "breast": DATA / "breastmnist" / "breastmnist.npz",
        "pneumonia": pneumonia,
    }


def train_runs(root: Path, args) -> dict[str, Path]:
    import shpeft
    from shpeft.methods import get_method

    data = subsets(root / "data")
    runs = {}
    for name, (method, dataset, settings) in TASKS.items():
        out = root / "runs" / name
        runs[name] = out
        if (out / "metrics.json").exists():
            continue
        config = get_method(method).config_cls(**settings)
        if method == "shpeft":
            config.importance_batches = 2
        print(f"training {name} ({method} on {dataset})", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BreastMNIST's known train/test duplicate
            shpeft.train(
                shpeft.RunConfig(
                    backbone=shpeft.BackboneConfig(model=args.model, image_size=args.image_size),
                    data=shpeft.DataConfig(data=str(data[dataset]), allow_leakage=True),
                    train=shpeft.TrainConfig(
                        out=str(out),
                        method=method,
                        iterations=args.iterations,
                        batch_size=args.batch_size,
                        eval_every=args.iterations,
                        lr=0.05,
                        progress=False,
                        threads=1,
                        overwrite=True,
                    ),
                    method=config,
                )
            )
    return runs


def write_images(folder: Path) -> list[Path]:
    """24 unseen images: 9 BUSI, 6 BreastMNIST, 6 PneumoniaMNIST (PNG), BUSI as JPEG/TIFF/DICOM."""
    if folder.exists():
        return sorted(folder.iterdir())
    folder.mkdir(parents=True)
    for cls in ("benign", "malignant", "normal"):
        for src in sorted((DATA / "busi_256" / cls).glob("*.png"))[100:103]:
            shutil.copy(src, folder / f"busi_{src.name.replace(' ', '_')}")
    for name, path in [("breast", DATA / "breastmnist" / "breastmnist.npz"),
                       ("pneumonia", DATA / "pneumoniamnist_reconstructed" /
                        "pneumoniamnist_reconstructed.npz")]:  # fmt: skip
        test = np.load(path)["test_images"]
        for i in range(6):
            Image.fromarray(test[i]).save(folder / f"{name}_{i}.png")
    gray = np.asarray(Image.open(sorted(folder.glob("busi_*.png"))[0]).convert("L"))
    Image.fromarray(gray).convert("RGB").save(folder / "busi_jpeg.jpg", quality=90)
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "busi_16bit.tif")
    from shpeft.data.io import write_dicom

    write_dicom(folder / "busi_12bit.dcm", gray.astype(np.uint16) * 16)
    return sorted(folder.iterdir())


# --------------------------------------------------------------------------------------------
# references: what `shpeft predict` gives


def references(runs: dict[str, Path], images: list[Path], root: Path) -> dict[str, dict]:
    """Per task and image: the CLI's prediction and probabilities, and its logits."""
    from shpeft.cli import main
    from shpeft.data import ImageFileDataset, make_loader
    from shpeft.runs import load_run

    folder = images[0].parent
    out: dict[str, dict] = {}
    for name, run in runs.items():
        csv_path = root / f"predict_{name}.csv"
        if main(["-q", "predict", "--run", str(run), "--images", str(folder), "-o", str(csv_path),
                 "--device", "cpu"]) != 0:  # fmt: skip
            raise RuntimeError(f"shpeft predict failed on {run}")
        rows = {Path(r["path"]).name: r for r in csv.DictReader(csv_path.open())}
        # the same computation as cmd_predict, keeping the logits it rounds away
        model, classes, spec, _ = load_run(run)
        ds = ImageFileDataset(
            images, image_size=spec.image_size, mean=spec.mean, std=spec.std,
            interpolation=spec.interpolation,
        )  # fmt: skip
        with torch.no_grad():
            logits = torch.cat([model(x) for x, _ in make_loader(ds, 64)])
        out[name] = {
            p.name: {
                "classes": classes,
                "logits": logits[i].tolist(),
                "prediction": rows[p.name]["prediction"],
                "probabilities": [float(rows[p.name][f"prob_{c}"]) for c in classes],
            }
            for i, p in enumerate(images)
        }
    return out


def mismatch(body: dict, want: dict) -> str | None:
    """Why a response differs from ``shpeft predict``, or None.

    Logits within 1e-5; probabilities within the CLI's rounding (6 decimals) plus what 1e-5 of
    logits can move them; the CLI's prediction, unless its top two logits tie within 2e-5.
    """
    if body.get("classes") != want["classes"]:
        return "classes"
    diff = float(np.max(np.abs(np.subtract(body["logits"], want["logits"]))))
    if diff > ATOL:
        return f"logits differ by {diff:.2e}"
    if np.max(np.abs(np.subtract(body["probabilities"], want["probabilities"]))) > 5e-7 + ATOL:
        return "probabilities"
    top2 = np.sort(want["logits"])[-2:]
    if body["prediction"] != want["prediction"] and top2[1] - top2[0] > 2 * ATOL:
        return "prediction"
    return None


# --------------------------------------------------------------------------------------------
# servers and clients


@contextlib.contextmanager
def server(runs: dict[str, Path], log: Path, *flags: str) -> Iterator[tuple[str, int, int]]:
    """``shpeft serve`` in a subprocess; yields (host, port, pid)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    cmd = [sys.executable, "-m", "shpeft.cli", "serve", "--port", "0", "--runs",
           *(f"{n}={p}" for n, p in runs.items()), *flags]  # fmt: skip
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not (m := re.search(r"at http://127\.0\.0\.1:(\d+)/", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"shpeft serve did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield "127.0.0.1", int(m.group(1)), proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def rss_mb(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    get = lambda key: int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 1024  # noqa: E731
    return {"rss_mb": get("VmRSS"), "peak_rss_mb": get("VmHWM")}


def get_json(host: str, port: int, path: str) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("GET", path)
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


class Client:
    """One keep-alive connection posting multipart uploads."""

    def __init__(self, host: str, port: int) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=120)

    def predict(self, task: str, name: str, data: bytes) -> tuple[float, int, dict]:
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"'
                f"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        t = time.perf_counter()
        self.conn.request("POST", f"/predict/{task}", body=body, headers=headers)
        response = self.conn.getresponse()
        payload = json.loads(response.read())
        return time.perf_counter() - t, response.status, payload


def load(host, port, plan, refs, uploads, clients: int, max_seconds: float) -> dict:
    """``clients`` threads share ``plan`` [(task, image)]; every response is checked."""
    latencies: list[float] = []
    problems: list[str] = []
    lock = threading.Lock()
    queue = list(reversed(plan))
    deadline = time.monotonic() + max_seconds

    def run() -> None:
        client = Client(host, port)
        while time.monotonic() < deadline:
            with lock:
                if not queue:
                    return
                task, image = queue.pop()
            seconds, status, body = client.predict(task, image, uploads[image])
            why = f"HTTP {status}: {body}" if status != 200 else mismatch(body, refs[task][image])
            with lock:
                latencies.append(seconds)
                if why:
                    problems.append(f"{task} {image}: {why}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "requests": len(latencies),
        "mismatches": len(problems),
        "first_mismatches": problems[:5],
        "seconds": wall,
        "throughput_rps": len(latencies) / wall,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
    }


def interleaved_plan(tasks: list[str], images: list[str], n: int, seed: int) -> list:
    """``n`` (task, image) pairs: a shuffled mix in which no task runs twice in a row."""
    rng = random.Random(seed)
    plan, last = [], None
    while len(plan) < n:
        task = rng.choice([t for t in tasks if t != last])
        plan.append((task, rng.choice(images)))
        last = task
    return plan


# --------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/serve_bench", help="folder for runs, images, results")
    p.add_argument("--model", default=str(SHARED / "models" / "vit_mini"))
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--iterations", type=int, default=20, help="training iterations per run")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size")
    p.add_argument("--requests", type=int, default=600, help="requests per load phase")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--max-seconds", type=float, default=300, help="time bound per load phase")
    p.add_argument("--batch1", type=int, default=200, help="batch-of-one rounds (3 requests)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    args = p.parse_args(argv)
    if not (SHARED / "models").exists():
        raise SystemExit(f"{SHARED} is absent: the benchmark trains on its models and data")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    runs = train_runs(root, args)
    images = write_images(root / "images")
    uploads = {p.name: p.read_bytes() for p in images}
    print(f"{len(runs)} runs, {len(images)} images; computing references", flush=True)
    refs = references(runs, images, root)
    names = list(runs)
    switching = [n for n in names if TASKS[n][0] in ("shpeft", "bitfit")]
    flags = ["--threads", str(args.threads)]
    result: dict = {
        "config": vars(args) | {"tasks": {n: TASKS[n][:2] for n in names}},
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }  # fmt: skip

    with (
        server(runs, root / "server_shared.log", *flags) as shared,
        server({SINGLE: runs[SINGLE]}, root / "server_single.log", "--merged", *flags) as single,
        server(runs, root / "server_merged.log", "--merged", *flags) as merged,
    ):
        # warm up (every task and image; one image per task for the memory-only server), then
        # memory before any load
        everything = [(t, img) for t in names for img in uploads]
        for (host, port, _), plan in (
            (shared, everything),
            (single, [(SINGLE, img) for img in uploads]),
            (merged, [(t, images[0].name) for t in names]),
        ):
            client = Client(host, port)
            for task, image in plan:
                client.predict(task, image, uploads[image])
        for key, (host, port, pid) in (("shared", shared), ("single", single), ("merged", merged)):
            result[f"memory_{key}"] = get_json(host, port, "/health")["memory_bytes"] | rss_mb(pid)
        result["tasks"] = get_json(*shared[:2], "/tasks")["tasks"]

        print("load: shared server, tasks interleaved", flush=True)
        plan = interleaved_plan(names, list(uploads), args.requests, seed=0)
        result["load_shared"] = load(*shared[:2], plan, refs, uploads, args.clients,
                                     args.max_seconds)  # fmt: skip
        result["load_shared"]["engine"] = get_json(*shared[:2], "/health")["bases"]
        print("load: single-task merged server", flush=True)
        plan = [
            (SINGLE, img) for _, img in interleaved_plan(names, list(uploads), args.requests, 1)
        ]
        result["load_single"] = load(*single[:2], plan, refs, uploads, args.clients,
                                     args.max_seconds)  # fmt: skip
        result["load_single"]["engine"] = get_json(*single[:2], "/health")["bases"]
        print("batch of one: three ways, interleaved", flush=True)
        result["batch1"] = batch_of_one(shared, single, switching, refs, uploads, args.batch1)
    result["switch_cost"] = switch_cost(runs, args)
    (root / "serve_load.json").write_text(json.dumps(result, indent=2) + "\n")
    text = summary(result, runs)
    (root / "serve_load.md").write_text(text)
    print(text)
    return result


def batch_of_one(shared, single, switching, refs, uploads, rounds: int) -> dict:
    """One client; each round sends one image three ways, in a random order: to the shared
    server naming the next switch-delta task (so every request switches the backbone), to the
    shared server naming the single task, and to the merged single-task server."""
    a, b = Client(*shared[:2]), Client(*single[:2])
    keys = ("shared_switching", "shared_same_task", "single_merged")
    latencies: dict[str, list[float]] = {k: [] for k in keys}
    problems: list[str] = []
    rng = random.Random(2)
    for i in range(rounds):
        image = rng.choice(list(uploads))
        jobs = [(keys[0], a, switching[i % len(switching)]), (keys[1], a, SINGLE),
                (keys[2], b, SINGLE)]  # fmt: skip
        rng.shuffle(jobs)
        for key, client, task in jobs:
            seconds, status, body = client.predict(task, image, uploads[image])
            latencies[key].append(seconds)
            why = f"HTTP {status}" if status != 200 else mismatch(body, refs[task][image])
            if why:
                problems.append(f"{task} {image}: {why}")
    p50 = {k: 1000 * statistics.median(v) for k, v in latencies.items()}
    return {
        "rounds": rounds,
        "mismatches": len(problems),
        "first_mismatches": problems[:5],
        "p50_ms": p50,
        "overhead_switching": p50["shared_switching"] / p50["single_merged"] - 1,
        "overhead_same_task": p50["shared_same_task"] / p50["single_merged"] - 1,
    }


def switch_cost(runs: dict[str, Path], args) -> dict[str, dict[str, float]]:
    """In-process: p50 of one switch (apply + revert) and of a batch-of-one forward, per task."""
    from shpeft.serve.registry import RunRef, load_registry

    torch.set_num_threads(args.threads)
    registry = load_registry([RunRef(n, p) for n, p in runs.items()])
    out = {}
    for name, task in registry.tasks.items():
        x = torch.zeros(1, 3, task.spec.image_size, task.spec.image_size)
        fwd, sw = [], []
        with torch.inference_mode():
            task.model(x)
        for _ in range(30):
            t = time.perf_counter()
            handle = task.switch.apply() if task.switch else None
            if handle is not None:
                task.switch.revert(handle)
            sw.append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.inference_mode():
                task.model(x)
            fwd.append(time.perf_counter() - t)
        out[name] = {
            "k": task.switch.k if task.switch else 0,
            "switch_ms": 1000 * statistics.median(sw),
            "forward_ms": 1000 * statistics.median(fwd),
        }
    return out


def summary(r: dict, runs: dict[str, Path]) -> str:
    mb = lambda b: b / 2**20  # noqa: E731
    ls, l1, b1 = r["load_shared"], r["load_single"], r["batch1"]
    ms, mm, m1 = r["memory_shared"], r["memory_merged"], r["memory_single"]
    deltas = sum((p / "delta.safetensors").stat().st_size for p in runs.values())
    backbone = ms["backbones"]
    engine = ls["engine"][0]
    lines = [
        f"backbone {Path(r['config']['model']).name}"
        + (f" at {r['config']['image_size']} px" if r["config"]["image_size"] else "")
        + f", {len(runs)} tasks, {r['config']['clients']} clients, "
        f"{r['config']['threads']} torch thread(s) per server, "
        f"load average at start {r['machine']['load_average'][0]:.1f} on "
        f"{r['machine']['cpus']} cores",
        "",
        "| load (interleaved) | requests | mismatches | throughput | p50 | p99 |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {len(runs)} tasks, shared backbone | {ls['requests']} | {ls['mismatches']} | "
        f"{ls['throughput_rps']:.1f} req/s | {ls['p50_ms']:.1f} ms | {ls['p99_ms']:.1f} ms |",
        f"| 1 task, merged model | {l1['requests']} | {l1['mismatches']} | "
        f"{l1['throughput_rps']:.1f} req/s | {l1['p50_ms']:.1f} ms | {l1['p99_ms']:.1f} ms |",
        "",
        f"Shared server: {engine['batches']} batches for {engine['images']} images (mean batch "
        f"{engine['mean_batch']:.2f}), {engine['switches']} backbone switches; single-task "
        f"server: mean batch {l1['engine'][0]['mean_batch']:.2f} (counts include the warm-up).",
        "",
        f"Batch of one, {b1['rounds']} requests to each, interleaved in random order: p50 "
        f"{b1['p50_ms']['shared_switching']:.2f} ms on the shared server when every request "
        f"switches task ({100 * b1['overhead_switching']:+.1f}%), "
        f"{b1['p50_ms']['shared_same_task']:.2f} ms when it names one task "
        f"({100 * b1['overhead_same_task']:+.1f}%), {b1['p50_ms']['single_merged']:.2f} ms on "
        f"the merged single-task server ({b1['mismatches']} mismatches).",
        "",
        "| memory (after warm-up, before load) | tensors | resident (VmRSS) |",
        "|---|---:|---:|",
        f"| {len(runs)} tasks, shared backbone | {mb(ms['total']):.2f} MiB (backbone "
        f"{mb(backbone):.2f} + tasks {mb(ms['tasks']):.2f} + scratch {mb(ms['scratch']):.2f}) | "
        f"{ms['rss_mb']:.0f} MiB |",
        f"| {len(runs)} merged models side by side | {mb(mm['total']):.2f} MiB | "
        f"{mm['rss_mb']:.0f} MiB |",
        f"| 1 merged model (runtime + one backbone) | {mb(m1['total']):.2f} MiB | "
        f"{m1['rss_mb']:.0f} MiB |",
        "",
        f"One backbone plus the delta files: {mb(backbone + deltas):.2f} MiB; the shared server "
        f"holds {mb(ms['total']):.2f} MiB of tensors "
        f"({100 * (ms['total'] / (backbone + deltas) - 1):+.1f}%).",
        "",
        "| task | method | served as | k per switch | switch (apply+revert) | forward, batch 1 |",
        "|---|---|---|---:|---:|---:|",
    ]
    served = {t["name"]: t["served_as"] for t in r["tasks"]}
    for name, c in r["switch_cost"].items():
        lines.append(
            f"| {name} | {TASKS[name][0]} | {served[name]} | {c['k']:,} | "
            f"{c['switch_ms']:.3f} ms | {c['forward_ms']:.2f} ms |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
