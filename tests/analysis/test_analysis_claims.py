"""The claims table: verdicts computed from results, ties within seed std, partial grids."""

from __future__ import annotations

import json
from pathlib import Path

from shpeft.analysis import claims as C
from shpeft.analysis import grid as G
from shpeft.analysis import summary as S
from shpeft.analysis import tables as T
from tests.analysis.test_analysis_tables import config


def table(values: dict[tuple[str, str], list[float]], g: G.GridConfig | None = None) -> T.Table:
    g = g or config()
    rows = T.ordered_variants(g)
    return T.Table(
        title="t",
        datasets=list(g.datasets),
        rows=rows,
        labels={r: T.row_label(g, r) for r in rows},
        values={k: dict(enumerate(v)) for k, v in values.items()},
        seeds=list(g.seeds),
    )


def both(row: str, vals: list[float]) -> dict[tuple[str, str], list[float]]:
    return {(row, "busi"): vals, (row, "other"): vals}


def test_table1_claim_agrees_disagrees_ties_and_waits():
    g = config()
    win = {**both("shpeft", [90, 91, 92]), **both("full", [80, 81, 82]), **both("linear", [70] * 3)}
    c = C.table1_claim(g, table(win))
    assert c.verdict == "**agrees**" and "rank 1 of 3" in c.ours
    lose = {**win, **both("full", [95, 96, 97])}
    c = C.table1_claim(g, table(lose))
    assert c.verdict == "**disagrees**" and "rank 2 of 3" in c.ours
    # full 0.5 points ahead with a seed std of 1: no claim either way
    tie = {**win, **both("full", [90.5, 91.5, 92.5])}
    c = C.table1_claim(g, table(tie))
    assert c.verdict.startswith("**does not show it**") and "within seed std" in c.verdict
    # a missing seed anywhere keeps a dataset out; none complete: pending
    partial = {**win, ("full", "other"): [80, 81]}
    c = C.table1_claim(g, table(partial))
    assert c.verdict == "**agrees** so far (busi of busi, other)"
    c = C.table1_claim(g, table({**partial, ("linear", "busi"): [70]}))
    assert c.verdict == "pending"


def test_ablation_claims_hybrid_and_lambda():
    g = config()  # variants: shpeft (l2, lambda 1), shpeft-td-l2, shpeft-lam0.5
    vals = {
        **both("shpeft", [80, 81, 82]),
        **both("shpeft-td-l2", [70, 71, 72]),
        **both("shpeft-lam0.5", [85, 86, 87]),
    }
    hybrid, lam = C.ablation_claims(g, table(vals))
    assert hybrid.verdict == "**agrees**" and "shpeft-td-l2 71.0 ± 1.0" in hybrid.ours
    assert lam.verdict == "**disagrees**: lambda 0.5 is best"
    vals.update(both("shpeft-lam0.5", [80.5, 81.5, 82.5]))
    _, lam = C.ablation_claims(g, table(vals))
    assert lam.verdict == "**no clear optimum**: lambda 0.5 highest, within seed std"
    # a grid without strategy or lambda variants says so
    plain = G.parse_grid({**g.raw, "methods": ["shpeft", "full"]})
    assert [c.verdict for c in C.ablation_claims(plain, table({}, plain))] == [
        "not in this grid",
        "not in this grid",
    ]


def write_results(out: Path, g: G.GridConfig, f1, pct) -> None:
    """result.json for every final and budget run: f1(spec), pct(spec) in %."""
    for spec in G.final_specs(g, {}) + G.budget_specs(g, {}):
        d = spec.run_dir(out)
        d.mkdir(parents=True, exist_ok=True)
        r = {
            "run_id": spec.run_id,
            "metrics": {"val": {"macro_f1": 0.5}, "test": {"macro_f1": f1(spec) / 100}},
            "trainable": {"backbone_trainable_pct": pct(spec), "backbone_trainable": 1},
        }
        (d / "result.json").write_text(json.dumps(r))


def test_budget_claims_from_result_files(tmp_path):
    raw = {
        **config().raw,
        "methods": ["shpeft", "full", "lora"],
        "budgets": {"shpeft": [0.0001, 0.01], "lora": [8]},
    }
    g = G.parse_grid(raw)
    # SH-PEFT: 1% -> 80, 0.01% -> 70; LoRA r8 at 1.5% -> 85; full -> 75
    share = {"full": 100.0, "lora": 1.5}
    score = {"full": 75.0, "lora": 85.0}

    def pct(s):
        return 100 * s.budget if s.variant == "shpeft" else share[s.variant]

    def f1(s):
        return {0.01: 80.0, 0.0001: 70.0}[s.budget] if s.variant == "shpeft" else score[s.variant]

    write_results(tmp_path, g, f1, pct)
    S.write_summary(g, tmp_path)
    md = (tmp_path / "summary_syn" / "claims_fixed.md").read_text()
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ")}
    equal = next(v for k, v in rows.items() if k.startswith("SH-PEFT beats every other"))
    # 1%: LoRA (1.5%, within a factor 3) is ahead; 0.01% has no neighbour
    assert (
        "1%: SH-PEFT 80.0 vs LoRA (lora_rank=8) (1.5%) 85.0" in equal and "**disagrees**" in equal
    )
    tiny = next(v for k, v in rows.items() if k.startswith("SH-PEFT at about 0.01%"))
    assert "0.01%: 70.0" in tiny and "full fine-tuning 75.0" in tiny and "**disagrees**" in tiny
    # one seed of LoRA missing on "other": that dataset is left out, the verdict says so far
    spec = next(s for s in G.final_specs(g, {}) if (s.variant, s.dataset) == ("lora", "other"))
    (spec.run_dir(tmp_path) / "result.json").unlink()
    claims = C.budget_claims(
        g,
        table({}, g),
        T.load_results(tmp_path),
        G.budget_specs(g, {}) + G.final_specs(g, {}),
    )
    assert all(c.verdict.endswith("so far (busi of busi, other)") for c in claims)


def test_selection_ablation_table_against_the_baselines(tmp_path):
    """benchmarks/selection_ablation.py: each (selection, budget) row against the baseline grid's
    best method, its best neighbour in trainable share and full fine-tuning, on shared runs."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "selection_ablation.py"
    spec = importlib.util.spec_from_file_location("selection_ablation", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    raw = config().raw
    base = G.parse_grid({**raw, "methods": ["shpeft", "full", "lora"], "budgets": {}})
    row = {"zero_grad": "skip", "allocation": "row"}
    abl = G.parse_grid(
        {
            **raw,
            "methods": [
                "shpeft",
                {"name": "row", "method": "shpeft", "config": row},
                {"name": "row-0.01pct", "method": "shpeft", "config": {**row, "ratio": 0.0001}},
            ],
            "budgets": {},
        }
    )
    share = {"full": 100.0, "lora": 1.5, "shpeft": 1.0, "row": 1.0, "row-0.01pct": 0.01}
    score = {"full": 75.0, "lora": 85.0, "shpeft": 70.0, "row": 90.0, "row-0.01pct": 74.0}
    write_results(tmp_path, base, lambda s: score[s.variant], lambda s: share[s.variant])
    write_results(tmp_path, abl, lambda s: score[s.variant], lambda s: share[s.variant])
    rows = {r["variant"]: r for r in mod.ablation_rows(abl, base, tmp_path)}
    assert rows["row"]["selection"] == "allocation=row, zero_grad=skip"
    assert rows["shpeft"]["selection"] == "paper (eq. 1)"
    assert rows["row"]["best_all"][0].startswith("LoRA") and rows["row"]["best_all"][1].mean == 85
    assert rows["row"]["best_near"] == ("LoRA (lora_rank=8) 1.5%", 85.0)
    assert rows["row"]["goal"] == "beats the best of all: yes"
    assert rows["shpeft"]["goal"] == "beats the best of all: no"
    # 0.01%: 74 against full fine-tuning's 75 (no seed spread): not reached
    assert rows["row-0.01pct"]["goal"] == ">= full FT: no"
    md = mod.markdown(abl, rows.values())
    assert "| allocation=row, zero_grad=skip | 1% | 1 | 90.0 ± 0.0 | 90.0 ± 0.0 |" in md


def test_precision_check_compares_folders_against_the_first(tmp_path):
    """benchmarks/precision_check.py: the same runs from several folders, each against the first
    within seed noise or not; a folder without the runs says pending."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "precision_check.py"
    spec = importlib.util.spec_from_file_location("precision_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = G.parse_grid({**config().raw, "methods": ["full"], "budgets": {}})
    noise = {0: -2.0, 1: 0.0, 2: 2.0}  # seed std 2
    for name, shift in (("ref", 0.0), ("near", 1.0), ("far", 10.0)):
        write_results(tmp_path / name, g, lambda s, d=shift: 70 + d + noise[s.seed], lambda s: 100)
    (tmp_path / "empty").mkdir()
    md = mod.markdown(g, [(n, tmp_path / n) for n in ("ref", "near", "far", "empty")])
    lines = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| Full")}
    assert "| s0: 68.0, s1: 70.0, s2: 72.0 | 70.0 ± 2.0 |" in lines["ref"]
    assert lines["near"].endswith("| +1.0 | within seed std |")
    assert lines["far"].endswith("| +10.0 | higher |")
    assert "| empty | pending |" in lines["empty"]
