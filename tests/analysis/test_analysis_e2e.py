"""End to end on real data: a micro grid (vit_pico, BreastMNIST, a few iterations), its summary,
and the sparsity / hybridity / locations analyses of its runs; plus their pure invariants."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from shpeft.analysis import add_subcommands
from shpeft.analysis import grid as G
from shpeft.analysis.changes import topk_flat
from shpeft.analysis.hybridity import chance_overlap, overlap, run_hybridity, write_hybridity
from shpeft.analysis.locations import block_of, run_locations, write_locations
from shpeft.analysis.sparsity import graft, run_sparsity, write_sparsity
from shpeft.analysis.summary import write_summary
from shpeft.params import KINDS

pytestmark = pytest.mark.filterwarnings("ignore:data leakage allowed:UserWarning")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from tests.conftest import SHARED_DATA, SHARED_MODELS

    if not (SHARED_MODELS / "vit_pico").exists():
        pytest.skip(
            "../shared is absent (it ships beside the project in CI, not in a user's clone)"
        )
    torch.set_num_threads(1)
    raw = {
        "name": "micro",
        "backbone": {"model": str(SHARED_MODELS / "vit_pico")},
        "datasets": {
            "breastmnist": {
                "data": str(SHARED_DATA / "breastmnist" / "breastmnist.npz"),
                "allow_leakage": True,  # the official split holds one image in train and test
            }
        },
        "methods": ["full", "shpeft"],
        "method_config": {"shpeft": {"ratio": 0.01, "importance_batches": 2}},
        "seeds": [0, 1],
        "train": {"iterations": 3, "batch_size": 16, "lr": 0.05, "eval_every": 3},
    }
    grid = G.parse_grid(raw)
    out = tmp_path_factory.mktemp("grid")
    status = G.run_grid(grid, out, workers=1, threads=1, device="cpu")
    return grid, out, status


def run_dir(out, method, seed):
    tag = "shpeft@0.01" if method == "shpeft" else method
    return out / "runs" / "breastmnist" / tag / f"lr0.05-it3-s{seed}"


def test_micro_grid_writes_results_and_resumes_by_skipping(micro):
    grid, out, status = micro
    assert status["statuses"] == {"ran": 4}
    r = json.loads((run_dir(out, "shpeft", 1) / "result.json").read_text())
    assert r["run_id"] == "breastmnist/shpeft@0.01/lr0.05-it3-s1"
    assert r["config"]["train"]["seed"] == 1 and r["config"]["method"]["ratio"] == 0.01
    assert {"git_commit", "torch", "timm", "shpeft", "cpu", "cpu_capability"} <= set(
        r["environment"]
    )
    assert r["trainable"]["backbone_trainable_pct"] == pytest.approx(1.0, rel=0.01)
    assert r["wall_s"] > 0 and r["peak_rss_mb"] > 0 and r["delta_bytes"] > 0
    assert 0 <= r["metrics"]["test"]["macro_f1"] <= 1
    before = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    again = G.run_grid(grid, out, workers=1, threads=1, device="cpu")
    assert again["statuses"] == {"done": 4}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == before
    s = write_summary(grid, out)
    assert "| Full finetune | 100 |" in s["text"] and "| SH-PEFT (ratio=0.01) | 1 |" in s["text"]
    progress = (out / "summary_micro" / "progress.md").read_text()
    assert "breastmnist    final        4      0        0" in progress
    assert "4 done, 0 to do, 0 waiting" in progress


def test_graft_endpoints_and_topk_invariants():
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(4, 5, generator=g), "b": torch.randn(7, generator=g)}
    ft = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    full, none = graft(base, ft, 100), graft(base, ft, 0)
    assert all(torch.equal(full[k], ft[k]) and torch.equal(none[k], base[k]) for k in base)
    assert all(torch.equal(v, base[k]) for k, v in graft(base, ft, 1e-9).items())  # rounds to 0
    half = graft(base, ft, 50)
    changed = torch.cat([(half[k] != base[k]).reshape(-1) for k in base])
    diff = torch.cat([(ft[k] - base[k]).abs().reshape(-1) for k in base])
    assert int(changed.sum()) == round(0.5 * diff.numel())
    assert diff[changed].min() >= diff[~changed].max()  # the largest changes are the ones kept
    assert int(topk_flat(torch.ones(10), 30).sum()) == 3  # ties: exact k, lowest indices
    assert topk_flat(torch.ones(10), 30)[:3].all()


def test_sparsity_k100_is_the_finetune_and_k0_the_base(micro, tmp_path):
    _, out, _ = micro
    run = run_dir(out, "full", 0)
    report = run_sparsity(run, [100, 10, 0])
    rows = {r["k_percent"]: r for r in report["rows"]}
    test = json.loads((run / "metrics.json").read_text())["test"]
    assert rows[100]["macro_f1"] == test["macro_f1"] and rows[100]["accuracy"] == test["accuracy"]
    assert rows[100]["share_of_full_f1"] == 1.0
    assert rows[0]["changed_scalars"] == 0
    assert rows[10]["changed_scalars"] <= rows[10]["kept_changes"]
    files = write_sparsity(report, tmp_path)
    assert Path(files["png"]).read_bytes()[:8] == PNG
    assert "share of full FT F1" in Path(files["markdown"]).read_text()


def test_overlap_identical_disjoint_and_chance():
    a = torch.zeros(1000, dtype=torch.bool)
    a[:10] = True
    b = torch.zeros(1000, dtype=torch.bool)
    b[500:510] = True
    assert overlap(a, a) == 1.0 and overlap(a, b) == 0.0
    assert chance_overlap(b) == pytest.approx(0.01)


def test_hybridity_delta_and_mask_modes(micro, tmp_path):
    _, out, _ = micro
    fulls = [run_dir(out, "full", s) for s in (0, 1)]
    rep = run_hybridity(fulls, [5, 1], labels=["s0", "s1"])
    assert rep["mode"] == "delta"
    for lv in rep["levels"]:
        assert lv["matrix"][0][0] == 1.0 and lv["matrix"][1][1] == 1.0
        assert 0 <= lv["matrix"][0][1] <= 1
        assert lv["chance_pct"] == pytest.approx(lv["k_percent"], rel=0.01)
    loc = rep["locations"]
    assert sum(r["shared"] for r in loc["per_kind"]) == loc["shared"]
    assert sum(r["specific"] for r in loc["per_block"]) == loc["specific"]
    files = write_hybridity(rep, tmp_path)
    assert Path(files["png"]).read_bytes()[:8] == PNG
    masks = run_hybridity([run_dir(out, "shpeft", s) for s in (0, 1)])
    assert masks["mode"] == "mask" and masks["levels"][0]["chance_pct"] == pytest.approx(
        1, rel=0.01
    )
    with pytest.raises(ValueError, match="at least two"):
        run_hybridity(fulls[:1])


def test_locations_of_a_shpeft_run(micro, tmp_path):
    _, out, _ = micro
    run = run_dir(out, "shpeft", 0)
    rep = run_locations(run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert rep["selected"] == metrics["trainable"]["backbone_trainable"]
    assert sum(r["selected"] for r in rep["per_kind"]) == rep["selected"]
    assert sum(r["size"] for r in rep["per_block"]) == rep["eligible"]
    assert {r["name"] for r in rep["per_kind"]} <= set(KINDS) - {"other", "layerscale"}
    files = write_locations(rep, tmp_path)
    assert Path(files["png"]).read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="no sparse positions"):
        run_locations(run_dir(out, "full", 0))  # dense: needs a k
    assert run_locations(run_dir(out, "full", 0), k_percent=1)["selected_pct"] == pytest.approx(
        1, rel=0.01
    )


def test_selection_diagnostics_of_a_shpeft_run(micro, tmp_path):
    from shpeft.analysis.selection import never_moved, run_selection, write_selection
    from shpeft.delta import Delta
    from shpeft.runs import load_base_model

    _, out, _ = micro
    run = run_dir(out, "shpeft", 0)
    rep = run_selection(run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert rep["k"] == metrics["trainable"]["backbone_trainable"]
    assert rep["best_iteration"] == metrics["best_iteration"]
    for group in ("per_kind", "per_block"):
        assert sum(r["selected"] for r in rep[group]) == rep["k"]
        assert sum(r["share_of_k_pct"] for r in rep[group]) == pytest.approx(100)
    assert sum(map(sum, rep["map"]["share_of_k_pct"])) == pytest.approx(100)
    share = rep["term_share_selected"]
    assert share["td"] + share["ta"] == pytest.approx(1)
    # "never moved" is exactly: the delta's value equals the base value, bit for bit
    delta, base = (
        Delta.load(run / "delta.safetensors"),
        dict(load_base_model(run).named_parameters()),
    )
    want = sum(
        int((base[n].detach().reshape(-1)[i.long()] == v).sum())
        for n, (i, v) in delta.sparse.items()
    )
    assert rep["unchanged"] == want == sum(m["unchanged"] for m in never_moved(run).values())
    # ... and at the last checkpoint (the sparse values come first, in the delta's order)
    from shpeft.checkpoint import checkpoint_paths

    last = torch.load(checkpoint_paths(run)[0], weights_only=True)["trainable"]
    want_last = sum(
        int((base[n].detach().reshape(-1)[i.long()] == v).sum())
        for (n, (i, _)), v in zip(delta.sparse.items(), last, strict=False)
    )
    assert rep["unchanged_last"] == want_last
    files = write_selection(rep, tmp_path)
    assert Path(files["png"]).read_bytes()[:8] == PNG
    assert "never moved" in Path(files["markdown"]).read_text()
    with pytest.raises(ValueError, match="no sparse part"):
        run_selection(run_dir(out, "full", 0))


def test_block_names():
    assert block_of("blocks.11.attn.qkv.weight") == "block 11"
    assert block_of("pos_embed") == block_of("patch_embed.proj.weight") == "embed"
    assert block_of("norm.weight") == "final"


def test_cli_subcommands(micro, tmp_path, capsys):
    _, out, _ = micro
    parser = argparse.ArgumentParser()
    commands: dict = {}
    add_subcommands(parser.add_subparsers(dest="command", required=True), commands)
    assert set(commands) == {"bench", "analyze"}
    args = parser.parse_args(
        ["analyze", "locations", "--run", str(run_dir(out, "shpeft", 1)), "--out", str(tmp_path)]
    )
    assert args.func(args) == 0 and (tmp_path / "locations.png").is_file()
    assert "Where the selected scalars are" in capsys.readouterr().out
    args = parser.parse_args(["bench", "cfg.json", "--workers", "2"])
    assert args.func is commands["bench"] and args.workers == 2


def test_lr_search_never_reads_test_and_the_reused_run_is_tested_once(tmp_path):
    from tests.conftest import SHARED_DATA, SHARED_MODELS

    if not (SHARED_MODELS / "vit_pico").exists():
        pytest.skip("../shared is absent")
    from shpeft.backbones import BackboneConfig
    from shpeft.config import from_dict
    from shpeft.data import DataConfig
    from shpeft.methods import get_method
    from shpeft.runs import evaluate_test
    from shpeft.training import RunConfig, TrainConfig, train

    torch.set_num_threads(1)
    data = {"data": str(SHARED_DATA / "breastmnist" / "breastmnist.npz"), "allow_leakage": True}
    raw = {
        "name": "search",
        "backbone": {"model": str(SHARED_MODELS / "vit_pico")},
        "datasets": {"breastmnist": data},
        "methods": ["linear"],
        "seeds": [0, 1],
        "train": {"iterations": 3, "batch_size": 16, "eval_every": 3},
        "lr_search": {"lrs": [0.05, 0.5], "iterations": 3, "seed": 0},
    }
    grid = G.parse_grid(raw)
    out = tmp_path / "grid"
    G.run_grid(grid, out, workers=1, threads=1, device="cpu", stages=("search",))
    for spec in G.search_specs(grid):
        d = spec.run_dir(out)
        metrics = json.loads((d / "metrics.json").read_text())
        assert "test" not in metrics and metrics["test_skipped"] is True
        assert not (d / "confusion_matrix_test.png").exists()
        assert "test" not in json.loads((d / "result.json").read_text())["metrics"]
    status = G.run_grid(grid, out, workers=1, threads=1, device="cpu")
    assert status["statuses"] == {"done": 2, "tested": 1, "ran": 1}
    chosen = G.chosen_lrs(grid, out)[("breastmnist", "linear")]
    for spec in G.search_specs(grid):  # only the reused (chosen, seed 0) run saw the test split
        result = json.loads((spec.run_dir(out) / "result.json").read_text())
        assert ("test" in result["metrics"]) == (spec.lr == chosen)
    reused = next(s for s in G.search_specs(grid) if s.lr == chosen).run_dir(out)
    with pytest.raises(ValueError, match="once"):
        evaluate_test(reused)
    assert G.run_grid(grid, out, workers=1, threads=1, device="cpu")["statuses"] == {"done": 4}

    # The deferred test evaluation equals the one train() does at the end of the same run.
    conf = json.loads((reused / "config.json").read_text())
    direct = tmp_path / "direct"
    cfg = RunConfig(
        backbone=from_dict(BackboneConfig, conf["backbone"]),
        data=from_dict(DataConfig, conf["data"]),
        train=from_dict(TrainConfig, {**conf["train"], "out": str(direct), "eval_test": True}),
        method=get_method("linear").config_cls(),
    )
    want = train(cfg)["test"]
    got = json.loads((reused / "metrics.json").read_text())["test"]
    assert got["confusion_matrix"] == want["confusion_matrix"]
    for key in ("macro_f1", "accuracy", "auc"):
        assert got[key] == pytest.approx(want[key], abs=1e-6)


def test_paper_analyses_script_on_the_micro_grid(micro, tmp_path):
    import subprocess
    import sys

    grid, out, _ = micro
    config = tmp_path / "micro.json"
    config.write_text(json.dumps(grid.raw))
    dest = tmp_path / "analyses"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "paper_analyses.py"), str(config),
         "--out", str(out), "--dest", str(dest)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    md = (dest / "analyses.md").read_text()
    # both seeds' full fine-tuning runs grafted; seed 1 is the same-task reference of hybridity
    assert (dest / "sparsity" / "breastmnist-s0" / "sparsity.png").is_file()
    assert (dest / "sparsity" / "breastmnist-s1" / "sparsity.csv").is_file()
    assert "| 100 | 100.0 ± 0.0 | 100.0 |" in md
    assert "breastmnist:s1" in (dest / "hybridity_full_delta" / "hybridity.md").read_text()
    assert (dest / "locations" / "breastmnist" / "locations.png").read_bytes()[:8] == PNG


def test_bench_writes_the_analyses_beside_the_tables(micro, tmp_path):
    """``shpeft bench --analyses yes``: Fig. 2 and locations in summary_NAME/analyses; ``auto``
    leaves them out of a --summary-only call (they evaluate models)."""
    grid, out, _ = micro
    config = tmp_path / "micro.json"
    config.write_text(json.dumps(grid.raw))
    parser = argparse.ArgumentParser()
    commands: dict = {}
    add_subcommands(parser.add_subparsers(dest="command", required=True), commands)
    dest = out / "summary_micro" / "analyses"
    shutil.rmtree(dest, ignore_errors=True)
    args = parser.parse_args(["bench", str(config), "--out", str(out), "--summary-only"])
    assert args.func(args) == 0 and not dest.exists()
    args = parser.parse_args(
        ["bench", str(config), "--out", str(out), "--summary-only", "--analyses", "yes"]
    )
    assert args.func(args) == 0
    md = (dest / "analyses.md").read_text()
    assert "Sparsity (Fig. 2 left)" in md and "breastmnist:s1" in md
    assert (dest / "locations" / "breastmnist" / "locations.png").read_bytes()[:8] == PNG


def test_lost_run_folders_come_back_from_the_ledger(micro, tmp_path):
    """``shpeft bench --restore runs.jsonl`` into an empty folder: the tables are the same as from
    the original runs, and the grid has nothing left to train."""
    grid, out, _ = micro
    config = tmp_path / "micro.json"
    config.write_text(json.dumps(grid.raw))
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command", required=True), {})
    original = Path(write_summary(grid, out)["markdown"]).parent
    ledger = original / "runs.jsonl"
    assert len(ledger.read_text().splitlines()) == 4
    new = tmp_path / "new"
    args = parser.parse_args(
        ["bench", str(config), "--out", str(new), "--restore", str(ledger), "--summary-only"]
    )
    assert args.func(args) == 0
    restored = new / "summary_micro"
    for name in ("table1_f1_fixed.md", "table1_auc_fixed.csv", "cost_fixed.md", "runs.csv"):
        assert (restored / name).read_text() == (original / name).read_text(), name
    assert G.run_grid(grid, new, workers=1, threads=1, device="cpu")["statuses"] == {"done": 4}


def test_bench_dry_run_shows_progress_and_the_plan(micro, tmp_path, capsys):
    grid, out, _ = micro
    config = tmp_path / "micro.json"
    config.write_text(json.dumps(grid.raw))
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command", required=True), {})
    args = parser.parse_args(["bench", str(config), "--out", str(out), "--dry-run"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "breastmnist    final        4      0        0" in text
    assert "4 done, 0 to do, 0 waiting" in text and "CPU-hours to go" in text
    assert "unique runs now known: 4" in text and "todo " not in text


def test_bench_runs_the_grids_named_in_then_into_the_same_folder(micro, tmp_path, capsys):
    """One command for every table: ``then`` runs the companion grid next (its own runs and
    summary, the main grid's shared ones reused), and the main ledger holds both grids' runs;
    ``--methods`` trains only the variants named, in whichever grid of the chain has them."""
    grid, out, _ = micro
    out = Path(shutil.copytree(out, tmp_path / "out"))
    companion = {
        **grid.raw,
        "name": "micro_abl",
        "methods": ["shpeft", {"name": "shpeft-td", "method": "shpeft",
                               "config": {"strategy": "td-l2"}}],
    }  # fmt: skip
    (tmp_path / "abl.json").write_text(json.dumps(companion))
    (tmp_path / "main.json").write_text(json.dumps({**grid.raw, "then": ["abl.json"]}))
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command", required=True), {})
    argv = ["bench", str(tmp_path / "main.json"), "--out", str(out), "--analyses", "no"]
    args = parser.parse_args([*argv, "--dry-run"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "== micro (" in text and "== micro_abl (" in text
    assert "4 done, 0 to do" in text and "2 done, 2 to do" in text  # shpeft's runs are shared
    with pytest.raises(ValueError, match=r"--methods names no variant .*'nope'"):
        args = parser.parse_args([*argv, "--methods", "shpeft-td,nope"])
        args.func(args)
    # a --datasets name the companion lacks is not its error: it runs the ones it has (none)
    other = {**companion, "datasets": {"elsewhere": {"data": "/nowhere"}}}
    (tmp_path / "abl.json").write_text(json.dumps(other))
    args = parser.parse_args([*argv, "--datasets", "breastmnist", "--summary-only"])
    assert args.func(args) == 0 and not (out / "summary_micro_abl").exists()
    (tmp_path / "abl.json").write_text(json.dumps(companion))
    args = parser.parse_args([*argv, "--methods", "shpeft-td"])  # only the companion has it
    assert args.func(args) == 0
    assert len(list((out / "runs" / "breastmnist" / "shpeft-td@0.01").glob("*/result.json"))) == 2
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert (out / "summary_micro_abl" / "runs.csv").is_file()
    ledger = (out / "summary_micro" / "runs.jsonl").read_text().splitlines()
    assert len(ledger) == 6
    (tmp_path / "abl.json").write_text(json.dumps({**companion, "then": ["main.json"]}))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.json*")}
    with pytest.raises(ValueError, match="abl.json leads back to .*main.json: a cycle"):
        args.func(args)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json*")} == before  # refused up front
