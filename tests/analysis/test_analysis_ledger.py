"""The grid's ledger (runs.jsonl): finished runs written out and restored, never overwritten,
the lr choices (tie-break included) the same after a restore."""

from __future__ import annotations

import json

import pytest

from shpeft.analysis import grid as G
from shpeft.analysis.ledger import is_restored, read_ledger, restore_runs, write_ledger
from tests.analysis.test_analysis_grid import fake_result, raw_config, write_result


def finished_search(tmp_path):
    """Every search run of the test grid finished; both lrs tie on validation F1, so the choice
    rests on the validation curves (the tie-break), which the ledger must carry."""
    g = G.parse_grid(raw_config())
    out = tmp_path / "out"
    for spec in G.search_specs(g):
        write_result(out, spec, {**fake_result(0.8, 0.5), "cpu_s": 12.5})
        curve = [0.6, 0.8] if spec.lr == 0.1 else [0.7, 0.3]
        log = (
            [{"iteration": 0, "val": {"macro_f1": 0.5}, "loss": 1.0}]
            + [{"iteration": 5 * (i + 1), "val": {"macro_f1": f}} for i, f in enumerate(curve)]
            + [{"iteration": 7, "loss": 0.3}]
        )  # a training row without validation
        (spec.run_dir(out) / "train_log.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in log) + '{"cut by a cra'
        )
    return g, out


def test_restore_round_trip_keeps_results_and_lr_choices(tmp_path):
    g, out = finished_search(tmp_path)
    ledger = write_ledger(out, tmp_path / "runs.jsonl")
    records = read_ledger(ledger)
    assert len(records) == len(G.search_specs(g)) == len(ledger.read_text().splitlines())
    assert [r["run_id"] for r in records] == sorted(r["run_id"] for r in records)
    new = tmp_path / "new"
    assert restore_runs(ledger, new, dry_run=True) == {"restored": len(records), "kept": 0}
    assert not new.exists()  # a dry run writes nothing
    assert restore_runs(ledger, new) == {"restored": len(records), "kept": 0}
    for spec in G.search_specs(g):
        before = json.loads((spec.run_dir(out) / "result.json").read_text())
        after = json.loads((spec.run_dir(new) / "result.json").read_text())
        assert is_restored(after) and not is_restored(before)
        assert after["restored"]["from"] == str(ledger)
        assert {k: v for k, v in after.items() if k != "restored"} == before
        assert G.validation_curve_mean(spec.run_dir(new)) == pytest.approx(
            G.validation_curve_mean(spec.run_dir(out))
        )
    assert G.chosen_lrs(g, new) == G.chosen_lrs(g, out)
    assert set(G.chosen_lrs(g, new).values()) == {0.1}  # won on the curve, not on the tie
    # a second restore (and a ledger of restored runs) changes nothing
    assert restore_runs(ledger, new) == {"restored": 0, "kept": len(records)}
    again = read_ledger(write_ledger(new, tmp_path / "again.jsonl"))
    assert [r["restored"]["from"] for r in again] == [str(ledger)] * len(records)


def test_restore_never_overwrites_a_finished_run(tmp_path):
    g, out = finished_search(tmp_path)
    ledger = write_ledger(out, tmp_path / "runs.jsonl")
    spec = G.search_specs(g)[0]
    new = tmp_path / "new"
    write_result(new, spec, fake_result(0.1, 0.1))
    mine = (spec.run_dir(new) / "result.json").read_text()
    counts = restore_runs(ledger, new)
    assert counts == {"restored": len(G.search_specs(g)) - 1, "kept": 1}
    assert (spec.run_dir(new) / "result.json").read_text() == mine


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", r"runs.jsonl:2: not a JSON record"),
        ('{"metrics": {}}', r"runs.jsonl:2: a record needs a run_id"),
        ('{"run_id": "../../etc/x"}', "not a relative run path"),
        ('{"run_id": "/abs/x"}', "not a relative run path"),
    ],
)
def test_bad_ledgers_are_refused_with_the_line(tmp_path, line, match):
    ledger = tmp_path / "runs.jsonl"
    ledger.write_text('{"run_id": "a/b/c"}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        restore_runs(ledger, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written from a bad ledger
    with pytest.raises(FileNotFoundError, match="no ledger"):
        read_ledger(tmp_path / "missing.jsonl")


def test_a_restored_search_run_that_becomes_a_final_is_trained_again(tmp_path, monkeypatch):
    """A restored run has no model files: when a final needs its test metrics, it is retrained
    (with the test split) instead of failing on the missing model."""
    g, out = finished_search(tmp_path)
    for spec in G.search_specs(g):  # search runs never saw the test split
        path = spec.run_dir(out) / "result.json"
        r = json.loads(path.read_text())
        r["metrics"] = {"val": r["metrics"]["val"], "test_skipped": True}
        path.write_text(json.dumps(r))
    new = tmp_path / "new"
    restore_runs(write_ledger(out, tmp_path / "runs.jsonl"), new)
    spec = G.search_specs(g)[0]
    calls = []

    def fake_run_claimed(job):
        calls.append(job["run_id"])
        assert not (spec.run_dir(new) / "result.json").exists()  # the restored record is gone
        return "ran"

    monkeypatch.setattr(G, "_run_claimed", fake_run_claimed)
    job = G.job_payload(g, spec, new, threads=1, device="cpu", eval_test=True)
    assert G.run_job(job)["status"] == "ran" and calls == [spec.run_id]
    other = G.search_specs(g)[1]
    search_job = G.job_payload(g, other, new, threads=1, device="cpu", eval_test=False)
    assert G.run_job(search_job)["status"] == "done"  # no test asked: the restored run stands


def test_analyses_that_read_models_skip_restored_runs(tmp_path, caplog):
    from shpeft.analysis.grid_analyses import tuned_run

    g, out = finished_search(tmp_path)
    new = tmp_path / "new"
    restore_runs(write_ledger(out, tmp_path / "runs.jsonl"), new)
    choices = G.chosen_lrs(g, out)
    assert tuned_run(g, out, choices, "a", "full", 0) is not None  # the search run, reused
    assert tuned_run(g, new, choices, "a", "full", 0) is None
    assert "restored from a ledger" in caplog.text and "delete" in caplog.text


def test_the_ledger_carries_the_small_artefacts_the_screens_read(tmp_path):
    """head_init.json whole, selection.json without its per-tensor rows; only known names are
    ever written back."""
    g, out = finished_search(tmp_path)
    run = G.search_specs(g)[0].run_dir(out)
    head = {"head_init": "linear-probe", "C": 1.0, "val_macro_f1": 0.81}
    sel = {"k": 3, "per_kind": {"qkv": {"selected": 3}}, "per_tensor": {"a": {"selected": 3}}}
    (run / "head_init.json").write_text(json.dumps(head))
    (run / "selection.json").write_text(json.dumps(sel))
    ledger = write_ledger(out, tmp_path / "runs.jsonl")
    record = next(r for r in read_ledger(ledger) if r.get("artifacts"))
    record["artifacts"]["../../escape.json"] = {"x": 1}
    ledger.write_text(json.dumps(record) + "\n")
    new = tmp_path / "new"
    restore_runs(ledger, new)
    back = new / "runs" / record["run_id"]
    assert json.loads((back / "head_init.json").read_text()) == head
    restored = json.loads((back / "selection.json").read_text())
    assert restored == {"k": 3, "per_kind": sel["per_kind"], "left_out_by_ledger": ["per_tensor"]}
    assert "artifacts" not in json.loads((back / "result.json").read_text())
    assert not list(tmp_path.rglob("escape.json"))
