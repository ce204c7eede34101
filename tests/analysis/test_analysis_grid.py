"""The grid config, run ids, stage planning, skipping and claiming, and validation-only lr choice."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shpeft.analysis import grid as G
from shpeft.checkpoint import RunLock


def raw_config(**over) -> dict:
    raw = {
        "name": "t",
        "backbone": {"model": "/nowhere/model", "pretrained": False},
        "datasets": {
            "a": {"data": "/nowhere/a"},
            "b": {"data": "/nowhere/b", "paper_name": "BUSI"},
        },
        "methods": [
            "full",
            "shpeft",
            {"name": "shpeft-l1", "method": "shpeft", "config": {"strategy": "l1"}},
        ],
        "method_config": {"shpeft": {"ratio": 0.02}},
        "seeds": [0, 1, 2],
        "train": {"iterations": 10, "batch_size": 4},
        "lr_search": {"lrs": [0.01, 0.1], "iterations": 10, "seed": 0},
        "shared_lr": 0.001,
        "budgets": {"shpeft": [0.001, 0.02]},
        "budget_seeds": [0],
    }
    raw.update(over)
    return raw


def fake_result(val_f1: float | None, test_f1: float, pct: float = 1.0) -> dict:
    return {
        "metrics": {
            "val": None if val_f1 is None else {"macro_f1": val_f1},
            "test": {"macro_f1": test_f1, "accuracy": test_f1, "auc": test_f1},
        },
        "trainable": {"backbone_trainable_pct": pct},
    }


def write_result(out: Path, spec: G.RunSpec, result: dict) -> None:
    d = spec.run_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "result.json").write_text(json.dumps({"run_id": spec.run_id, **result}))


def test_parse_fills_method_settings_and_budget_ids():
    g = G.parse_grid(raw_config())
    assert [v.name for v in g.methods] == ["full", "shpeft", "shpeft-l1"]
    assert g.variant("shpeft-l1").config == {"ratio": 0.02, "strategy": "l1"}
    assert g.dataset_info["b"] == {"paper_name": "BUSI"}
    assert "paper_name" not in g.datasets["b"]  # not a DataConfig field
    search = G.search_specs(g)
    assert len(search) == 2 * 3 * 2  # datasets x methods x lrs
    ids = {s.run_id for s in search}
    assert "a/full/lr0.01-it10-s0" in ids
    assert "b/shpeft@0.02/lr0.1-it10-s0" in ids  # the method's configured budget is in the id
    assert len(ids) == len(search)


def test_stages_reuse_runs_and_follow_choices():
    g = G.parse_grid(raw_config())
    choices = {(ds, v.name): 0.1 for ds in g.datasets for v in g.methods}
    final = G.final_specs(g, choices)
    assert len(final) == 2 * 3 * 3 and {s.lr for s in final} == {0.1}
    # the search run at the chosen lr is the seed-0 final run (same iterations and seed)
    assert {s.run_id for s in G.search_specs(g)} & {s.run_id for s in final}
    shared = G.shared_specs(g)
    assert {s.lr for s in shared} == {0.001} and len(shared) == 18
    budgets = G.budget_specs(g, choices)
    assert {(s.variant, s.budget, s.seed) for s in budgets} == {
        ("shpeft", 0.001, 0),
        ("shpeft", 0.02, 0),
    }
    # a pending choice leaves its finals out instead of guessing an lr
    partial = G.final_specs(g, {("a", "full"): 0.01})
    assert {(s.dataset, s.variant) for s in partial} == {("a", "full")}


def test_lr_search_methods_share_their_choice():
    g = G.parse_grid(raw_config(lr_search={"lrs": [0.01, 0.1], "methods": ["full", "shpeft"]}))
    assert g.lr_source("shpeft-l1") == "shpeft"
    assert {s.variant for s in G.search_specs(g)} == {"full", "shpeft"}
    final = G.final_specs(g, {("a", "shpeft"): 0.1})
    assert {(s.variant, s.lr) for s in final} == {("shpeft", 0.1), ("shpeft-l1", 0.1)}


def test_protocol_overlay_and_paths(tmp_path):
    (tmp_path / "data_a").mkdir()
    raw = raw_config(datasets={"a": {"data": "data_a"}}, backbone={"model": "vit_tiny_patch16_224"})
    g = G.parse_grid(raw, root=tmp_path, protocol="paper")
    assert g.protocol == "paper"
    assert g.train["iterations"] == 40000 and g.train["batch_size"] == 64 and g.train["lr"] == 1e-3
    assert g.datasets["a"]["data"] == str(tmp_path / "data_a")  # relative to the config file
    assert g.backbone["model"] == "vit_tiny_patch16_224"  # a name, not a path: left alone
    raw["protocols"] = {"quick": {"train": {"iterations": 3}}}
    assert G.parse_grid(raw, protocol="quick").iterations == 3
    with pytest.raises(ValueError, match="protocol 'nope'"):
        G.parse_grid(raw, protocol="nope")


@pytest.mark.parametrize(
    "over, match",
    [
        ({"methods": ["full", "nope"]}, "unknown method"),
        ({"methods": ["full", "full"]}, "unique"),
        ({"budgets": {"full": [1]}}, "no budget knob"),
        ({"budgets": {"shpeft": [2.0]}}, "ratio"),
        ({"lr_search": {"lrs": []}}, "lr_search.lrs"),
        ({"seeds": []}, "seed"),
        ({"train": {"iterations": 0}}, "iterations"),
        ({"method_config": {"shpeft": {"ratio": 0}}}, "ratio"),
        ({"then": "ablations.json"}, "'then' must list"),
    ],
)
def test_bad_configs_fail_early(over, match):
    with pytest.raises(ValueError, match=match):
        G.parse_grid(raw_config(**over))


def test_lr_is_chosen_on_validation_never_test():
    # lr 0.1 wins on test by far, lr 0.01 on validation: the choice must follow validation
    cands = [(0.01, fake_result(0.9, 0.1)), (0.1, fake_result(0.5, 0.99)), (1.0, None)]
    assert G.select_lr(cands) == 0.01
    assert G.select_lr([(0.1, fake_result(None, 0.99)), (0.3, None)]) is None
    assert G.select_lr([(0.1, fake_result(0.7, 0)), (0.3, fake_result(0.7, 1))]) == 0.1  # tie
    # a tie on the best F1 (e.g. the same warm start) goes to the lr that trained better
    tied = [(0.1, fake_result(0.7, 0), 0.5), (0.3, fake_result(0.7, 1), 0.6), (1.0, None, 0.9)]
    assert G.select_lr(tied) == 0.3
    assert G.select_lr([(0.1, fake_result(0.7, 0), None), (0.3, fake_result(0.7, 1), 0.6)]) == 0.3


def test_lr_choices_from_run_folders(tmp_path):
    g = G.parse_grid(raw_config())
    for spec in G.search_specs(g):
        good = spec.lr == 0.01
        write_result(tmp_path, spec, fake_result(0.8 if good else 0.4, 0.1 if good else 0.95))
    choices = G.chosen_lrs(g, tmp_path)
    assert set(choices.values()) == {0.01} and len(choices) == 6
    path = G.write_lr_choices(g, tmp_path)
    assert json.loads(path.read_text())["selected_by"].startswith("validation")
    # an unfinished candidate keeps the choice pending
    spec = G.search_specs(g)[0]
    (spec.run_dir(tmp_path) / "result.json").unlink()
    assert (spec.dataset, spec.variant) not in G.chosen_lrs(g, tmp_path)


def test_finished_runs_are_skipped_and_claimed_runs_left_alone(tmp_path):
    g = G.parse_grid(raw_config())
    spec = G.search_specs(g)[0]
    job = G.job_payload(g, spec, tmp_path, threads=1, device="cpu")
    write_result(tmp_path, spec, fake_result(0.5, 0.5))
    before = (spec.run_dir(tmp_path) / "result.json").read_text()
    assert G.run_job(job)["status"] == "done"  # the data path does not exist: nothing ran
    assert (spec.run_dir(tmp_path) / "result.json").read_text() == before
    other = G.search_specs(g)[1]
    job = G.job_payload(g, other, tmp_path, threads=1, device="cpu")
    with RunLock(other.claim_dir(tmp_path)):  # another worker holds it
        assert G.run_job(job)["status"] == "busy"
    assert not other.run_dir(tmp_path).exists()


def test_a_failing_run_is_recorded_and_does_not_stop_the_grid(tmp_path):
    g = G.parse_grid(raw_config())
    spec = G.search_specs(g)[0]
    st = G.run_job(G.job_payload(g, spec, tmp_path, threads=1, device="cpu"))
    assert st["status"] == "failed"
    fail = tmp_path / "failures" / (spec.run_id.replace("/", "__") + ".json")
    assert "nowhere" in json.loads(fail.read_text())["error"]


def test_interrupted_runs_are_resumed(tmp_path, monkeypatch):
    import shpeft.training

    g = G.parse_grid(raw_config())
    spec = G.search_specs(g)[0]
    run_dir = spec.run_dir(tmp_path)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "ckpt_00000004.pt").write_bytes(b"")
    (run_dir / "config.json").write_text(json.dumps({"train": {}}))
    calls = []

    def fake_resume(path, **over):
        calls.append((Path(path), over))
        return {"val": {"macro_f1": 0.5}, "test": {"macro_f1": 0.4}, "trainable": {}}

    monkeypatch.setattr(shpeft.training, "resume_run", fake_resume)
    st = G.run_job(G.job_payload(g, spec, tmp_path, threads=1, device="cpu"))
    assert st["status"] == "resumed" and calls[0][0] == run_dir
    result = json.loads((run_dir / "result.json").read_text())
    assert result["how"] == "resumed" and result["lr"] == spec.lr and result["peak_rss_mb"] > 0


def test_runs_held_elsewhere_are_waited_for(monkeypatch):
    answers = {"x": ["busy", "busy", "ran"], "y": ["done"]}

    def fake(job):
        return {"run_id": job["run_id"], "status": answers[job["run_id"]].pop(0)}

    monkeypatch.setattr(G, "run_job", fake)
    out = G.run_jobs([{"run_id": "x"}, {"run_id": "y"}], workers=1, poll_s=0)
    assert [s["status"] for s in out] == ["ran", "done"]


def test_datasets_run_one_after_the_other_search_then_finals(tmp_path, monkeypatch, caplog):
    raw = raw_config()
    for ds in ("a", "b"):
        (tmp_path / ds).mkdir()
        raw["datasets"][ds]["data"] = str(tmp_path / ds)
    g = G.parse_grid(raw)
    order, summaries = [], []

    def fake(job):  # every run "finishes" with a validation F1 that favours lr 0.1
        spec = G.RunSpec(**job["spec"])
        order.append((spec.dataset, "search" if not job["train"]["eval_test"] else "later"))
        write_result(Path(job["out"]), spec, fake_result(spec.lr, 0.5))
        return {"run_id": spec.run_id, "status": "ran"}

    monkeypatch.setattr(G, "run_job", fake)
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="shpeft"):
        G.run_grid(g, out, workers=1, poll_s=0, after_dataset=summaries.append)
    # progress: what a round has to do, then every finished run's count and the time to go
    n = int(re.search(r"a round 1: (\d+) run\(s\) to do", caplog.text).group(1))
    assert n > sum(1 for ds, st in order if ds == "a" and st == "search")  # + shared-lr runs
    assert f"[a round 1 1/{n}, about " in caplog.text and f"[a round 1 {n}/{n}]" in caplog.text
    datasets = [ds for ds, _ in order]
    assert datasets == sorted(datasets, key=["a", "b"].index)  # all of a, then all of b
    for ds in ("a", "b"):
        stages = [st for d, st in order if d == ds]
        assert stages == sorted(stages, key=["search", "later"].index) and "later" in stages
    assert summaries == ["a", "b"]
    order.clear()
    G.run_grid(g, out, workers=1, poll_s=0, datasets=["b"])
    assert order and {ds for ds, _ in order} == {"b"}  # only b was asked for
    with pytest.raises(ValueError, match="unknown dataset"):
        G.run_grid(g, out, datasets=["c"])


def test_settled_methods_run_their_finals_while_others_still_search(tmp_path, monkeypatch, caplog):
    (tmp_path / "a").mkdir()
    raw = raw_config(
        datasets={"a": {"data": str(tmp_path / "a")}},
        lr_search={"lrs": [0.01, 0.03, 0.1], "iterations": 10, "seed": 0, "extend": 1},
        shared_lr=None,
        budgets={},
    )
    g = G.parse_grid(raw)

    calls = []

    def fake(job):  # full keeps improving with the lr (an edge extension is due); the rest peak
        spec = G.RunSpec(**job["spec"])
        calls.append((spec.run_id, job["train"]["eval_test"]))
        f1 = spec.lr if spec.variant == "full" else 1 - abs(spec.lr - 0.03)
        write_result(Path(job["out"]), spec, fake_result(f1, 0.5))
        return {"run_id": spec.run_id, "status": "ran"}

    monkeypatch.setattr(G, "run_job", fake)
    with caplog.at_level("INFO", logger="shpeft"):
        G.run_grid(g, tmp_path / "out", workers=1, poll_s=0)
    round2 = [line for line in caplog.text.splitlines() if "[a round 2 " in line]
    assert any("a/full/lr0.333-" in line for line in round2)  # full's extension search ...
    assert any("a/shpeft@0.02/lr0.03-it10-s1" in line for line in round2)  # ... beside finals
    # seed 0's final is the search run at the chosen lr, given its test metrics after the search
    assert calls.count(("a/shpeft@0.02/lr0.03-it10-s0", True)) == 1
    assert calls.count(("a/shpeft@0.02/lr0.03-it10-s0", False)) == 1
    assert ("a/full/lr0.333-it10-s0", True) in calls and ("a/full/lr0.333-it10-s2", True) in calls
    # rerun with every search run finished: seed 0's test comes in the first round, not after
    # the whole round of finals (a stopped grid would otherwise lack it every time)
    for path in (tmp_path / "out").rglob("result.json"):
        if "-s0" not in path.parent.name:
            path.unlink()
    calls.clear()
    G.run_grid(g, tmp_path / "out", workers=1, poll_s=0)
    s0, s1 = ("a/shpeft@0.02/lr0.03-it10-s0", True), ("a/shpeft@0.02/lr0.03-it10-s1", True)
    assert calls.index(s0) < calls.index(s1)


def test_unknown_keys_and_missing_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        G.parse_grid(raw_config(train={"iterations": 5, "batchsize": 4}))
    with pytest.raises(ValueError, match="unknown key"):
        G.parse_grid(raw_config(datasets={"a": {"data": "x", "alow_leakage": True}}))
    with pytest.raises(ValueError, match="unknown key"):
        G.parse_grid(raw_config(method_config={"shpeft": {"rank": 3}}))
    with pytest.raises(FileNotFoundError, match="/nowhere/a"):
        G.run_grid(G.parse_grid(raw_config()), tmp_path)


def test_shipped_configs_parse():
    root = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
    cpu = G.load_grid(root / "cpu_grid.json")
    assert len(cpu.methods) == 12 and cpu.seeds == [0, 1, 2] and len(cpu.datasets) == 3
    assert cpu.lr_search.iterations == cpu.iterations  # search runs double as seed-0 finals
    assert (
        "reconstructed, not the byte-identical official file"
        in cpu.dataset_info["pneumoniamnist"]["note"]
    )
    paper_cfg = G.load_grid(root / "cpu_grid.json", protocol="paper")
    assert paper_cfg.train["iterations"] == 40000 and paper_cfg.train["batch_size"] == 64
    assert paper_cfg.backbone["model"] == "vit_base_patch16_clip_224.openai"
    p = G.load_grid(root / "paper_grid.json")
    assert p.protocol == "paper" and len(p.datasets) == 6 and p.shared_lr == 1e-3
    abl = G.load_grid(root / "cpu_ablations.json")
    assert {abl.lr_source(v.name) for v in abl.methods} == {"shpeft"}
    # one command makes every table: each main grid runs its ablations next, into its folder
    for main, companion in (("cpu_grid", "cpu_ablations"), ("dinov2_grid", "dinov2_ablations")):
        g, c = G.load_grid(root / f"{main}.json"), G.load_grid(root / f"{companion}.json")
        assert g.then == [root / f"{companion}.json"] and G.default_out(g) == G.default_out(c)


def test_then_names_existing_configs_relative_to_the_file(tmp_path):
    (tmp_path / "abl.json").write_text("{}")
    g = G.parse_grid(raw_config(then=["abl.json"]), root=tmp_path)
    assert g.then == [tmp_path / "abl.json"]
    with pytest.raises(ValueError, match="do not exist.*nope.json"):
        G.parse_grid(raw_config(then=["nope.json"]), root=tmp_path)


def test_configs_sharing_an_output_folder_agree_on_every_run_id():
    """A run id names (dataset, variant, budget, lr, iterations, seed), not the settings behind
    them: configs that share an output folder (the DINOv2 grid, its screen and ablations) must
    mean the same thing by a shared name, or one would silently reuse the other's runs."""
    root = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
    seen: dict[tuple[str, str], tuple[str, object]] = {}
    for path in sorted(root.glob("*.json")):
        g = G.load_grid(path)
        out = str(G.default_out(g))
        facts = {"train": g.train, "backbone": g.backbone, **{
            f"dataset {k}": v for k, v in g.datasets.items()
        }}  # fmt: skip
        facts |= {f"variant {v.name}": (v.method, v.config) for v in g.methods}
        for key, value in facts.items():
            first = seen.setdefault((out, key), (path.name, value))
            assert first[1] == value, f"{path.name} and {first[0]} differ on {key} in {out}"


def test_validation_curve_mean_reads_the_run_log(tmp_path):
    rows = [
        {"iteration": 0, "val": {"macro_f1": 0.9}},  # the warm start does not count
        {"iteration": 10, "loss": 1.0},
        {"iteration": 20, "val": {"macro_f1": 0.5}},
        {"iteration": 40, "val": {"macro_f1": 0.7}},
    ]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert G.validation_curve_mean(tmp_path) == pytest.approx(0.6)
    assert G.validation_curve_mean(tmp_path / "missing") is None


def test_progress_counts_done_todo_and_runs_waiting_for_their_search(tmp_path):
    g = G.parse_grid(raw_config())
    for spec in G.search_specs(g):
        if spec.dataset == "a":  # a's search is finished, b's has not started
            write_result(tmp_path, spec, {**fake_result(0.5, 0.5), "cpu_s": 100.0})
    p = G.grid_progress(g, tmp_path)
    rows = {(r["dataset"], r["stage"]): (r["done"], r["todo"], r["waiting"]) for r in p["rows"]}
    n_var, n_lr, n_seed = len(g.methods), 2, len(g.seeds)
    assert rows[("a", "search")] == (n_var * n_lr, 0, 0)
    assert rows[("b", "search")] == (0, n_var * n_lr, 0)
    # seed 0's final is its search run (counted once, in the search)
    assert rows[("a", "final")] == (0, n_var * (n_seed - 1), 0)
    assert rows[("b", "final")] == (0, 0, n_var * (n_seed - 1))
    assert rows[("a", "shared")] == rows[("b", "shared")] == (0, n_var * n_seed, 0)
    # budgets {0.001, 0.02} on seed 0: 0.02 is SH-PEFT's own ratio, i.e. its final run
    assert rows[("a", "budgets")] == (0, 1, 0) and rows[("b", "budgets")] == (0, 0, 1)
    left = p["todo"] + p["waiting"]
    assert p["done"] == n_var * n_lr and p["median_cpu_s"] == 100.0
    assert p["cpu_h_to_go"] == pytest.approx(left * 100 / 3600)
    text = G.progress_text(p)
    assert f"{p['done']} done, {p['todo']} to do, {p['waiting']} waiting" in text
    only_b = G.grid_progress(g, tmp_path, stages=("search",), datasets=("b",))
    assert [(r["dataset"], r["stage"]) for r in only_b["rows"]] == [("b", "search")]
    assert only_b["cpu_h_to_go"] is None  # no finished run of b's to price it


def test_analyses_cover_every_shpeft_variant_and_skip_missing_methods(tmp_path, monkeypatch):
    """A grid without ``full`` or a variant named ``shpeft`` (e.g. dinov2_precision.json) gets the
    analyses it can have instead of an error."""
    from shpeft.analysis import grid_analyses as GA

    raw = {**raw_config(), "methods": [{"name": "zr", "method": "shpeft", "config": {}}]}
    raw.pop("budgets")
    g = G.parse_grid(raw)
    out = tmp_path / "out"
    for spec in G.search_specs(g) + G.final_specs(g, {("a", "zr"): 0.01, ("b", "zr"): 0.01}):
        write_result(out, spec, fake_result(0.8 if spec.lr == 0.01 else 0.4, 0.5))
    seen = []

    def fake_write(run, sub):  # run_locations is the identity below: ``run`` is its folder
        seen.append((Path(run).parent.parent.name, sub.relative_to(tmp_path)))
        sub.mkdir(parents=True)
        (sub / "locations.md").write_text("ok")

    monkeypatch.setattr(GA, "run_locations", lambda run: run)
    monkeypatch.setattr(GA, "write_locations", fake_write)
    md = GA.write_grid_analyses(g, out, tmp_path / "an").read_text()
    assert seen == [("a", Path("an/locations/zr/a")), ("b", Path("an/locations/zr/b"))]
    assert "Sparsity" not in md  # no full fine-tuning in this grid: no Fig. 2
