"""Start-up time of the CLI: ``shpeft --help`` and ``shpeft methods`` against ``python -c pass``.

The configs, the argument parser and the method registry load without torch, timm or peft
(``src/shpeft/config.py``, ``src/shpeft/methods/configs.py``), so listing options or methods
should cost about one interpreter start plus numpy, not the 7-8 s of importing the ML stack.
Every command is run ``--repeats`` times, interleaved (round r runs each once), in fresh
processes; the table gives the medians and the ratio to ``python -c pass`` measured in the
same rounds, so a busy machine affects every row alike.

    python benchmarks/cli_startup.py --repeats 7 --out runs/cli_startup.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def commands() -> dict[str, list[str]]:
    shpeft = shutil.which("shpeft")
    cli = [shpeft] if shpeft else [sys.executable, "-m", "shpeft.cli"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "shpeft --help": [*cli, "--help"],
        "shpeft methods": [*cli, "methods"],
        "shpeft train --help": [*cli, "train", "--help"],
        "python -c 'import torch' (reference)": [sys.executable, "-c", "import torch"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="runs/cli_startup.json")
    args = p.parse_args(argv)
    cmds = commands()
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(args.repeats):
        for name, cmd in cmds.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["python -c pass"])
    rows = {k: {"median_s": statistics.median(v), "ratio": statistics.median(v) / base}
            for k, v in times.items()}  # fmt: skip
    print("| command | median s | x `python -c pass` |\n|---|---:|---:|")
    for k, r in rows.items():
        print(f"| `{k}` | {r['median_s']:.2f} | {r['ratio']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
