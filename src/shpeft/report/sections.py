"""The sections of a run's report, each a function of the run's records returning HTML.

Numbers come from ``metrics.json`` as recorded (never recomputed for display); the curves, the
per-class AUCs and the calibration come from the run's test predictions. Each number that a test
or a tool may read back is tagged with its exact value (:func:`shpeft.report.html.value`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shpeft.report import figures
from shpeft.report.calibration import DEFAULT_BINS, Reliability, reliability
from shpeft.report.html import esc, figure, kv_table, pct, table, value
from shpeft.report.predictions import Predictions

log = logging.getLogger("shpeft")

#: How many correct and wrong test images the report explains.
N_CORRECT, N_WRONG = 4, 4

#: (anchor, title) of the sections, in page order.
SECTIONS = (
    ("training", "Training"),
    ("test", "Test metrics"),
    ("examples", "Where it looks"),
    ("selection", "Selection"),
    ("cost", "Cost"),
    ("config", "Configuration"),
)


@dataclass
class RunRecord:
    """What a finished run directory holds (``result`` only for benchmark-grid runs)."""

    run_dir: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    log: list[dict[str, Any]]
    split: dict[str, Any] | None
    result: dict[str, Any] | None

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.config["classes"]]

    @property
    def method(self) -> str:
        return str(self.config["train"]["method"])

    @property
    def test(self) -> dict[str, Any] | None:
        return self.metrics.get("test") or None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def read_log(path: Path) -> list[dict[str, Any]]:
    """Rows of ``train_log.jsonl``; a row cut by a crash is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def read_run(run_dir: str | os.PathLike) -> RunRecord:
    """The records of a finished run.

    Raises:
        FileNotFoundError: Not a run directory, or a run that has not finished (no metrics.json).
    """
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    if config is None:
        raise FileNotFoundError(f"{run_dir} is not a shpeft run directory (no config.json)")
    metrics = _read_json(run_dir / "metrics.json")
    if metrics is None:
        raise FileNotFoundError(f"{run_dir} has not finished (no metrics.json): no report yet")
    return RunRecord(
        run_dir=run_dir,
        config=config,
        metrics=metrics,
        log=read_log(run_dir / "train_log.jsonl"),
        split=_read_json(run_dir / "split.json"),
        result=_read_json(run_dir / "result.json"),
    )


def size_text(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _pct_value(key: str, x: float | None) -> str:
    return value(key, x, pct(x))


def _note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def _muted(text: str) -> str:
    return f'<p class="muted">{esc(text)}</p>'


# ------------------------------------------------------------------------------------- header


def header(rec: RunRecord, rel: Reliability | None) -> str:
    """Title, what was trained on what, the headline numbers and the table of contents."""
    conf = rec.config
    plain = {k: v for k, v in (conf.get("method") or {}).items() if not isinstance(v, dict | list)}
    settings = ", ".join(f"{k}={v}" for k, v in plain.items() if v is not None)
    sizes = (rec.split or {}).get("sizes") or {}
    split = " / ".join(f"{k} {v}" for k, v in sizes.items())
    test, tr = rec.test or {}, rec.metrics.get("trainable") or {}
    cards = []
    if test:
        cards += [
            ("test macro F1", _pct_value("test.macro_f1", test.get("macro_f1"))),
            ("test accuracy", _pct_value("test.accuracy", test.get("accuracy"))),
            ("test AUC", _pct_value("test.auc", test.get("auc"))),
        ]
    if rel is not None:
        cards.append(("calibration error (ECE)", _pct_value("test.ece", rel.ece)))
    if tr.get("backbone_trainable_pct") is not None:
        share = tr["backbone_trainable_pct"]
        key = "trainable.backbone_trainable_pct"
        cards.append(("trainable backbone", value(key, share, f"{share:.3g}%")))
    if rec.metrics.get("delta_bytes") is not None:
        b = rec.metrics["delta_bytes"]
        cards.append(("delta file", value("delta_bytes", b, size_text(b))))
    return "".join(
        [
            f"<h1>Run report: {esc(rec.run_dir.name)}</h1>",
            f'<p class="muted"><code>{esc(rec.run_dir.resolve())}</code></p>',
            f"<p><strong>{esc(rec.method)}</strong>",
            f' <span class="muted">({esc(settings)})</span>' if settings else "",
            f" on <code>{esc(conf['data'].get('data'))}</code>, backbone ",
            f"<code>{esc(conf['backbone'].get('model'))}</code>. Classes: ",
            ", ".join(f"<em>{esc(c)}</em>" for c in rec.classes) + ".",
            f" Split: {esc(split)}." if split else "",
            '</p><div class="cards">',
            *(
                f'<div class="card"><span class="v">{v}</span><span class="k">{esc(k)}</span></div>'
                for k, v in cards
            ),
            '</div><nav aria-label="sections"><ul>',
            *(f'<li><a href="#{a}">{esc(t)}</a></li>' for a, t in SECTIONS),
            "</ul></nav>",
        ]
    )


# ----------------------------------------------------------------------------------- training


def training(rec: RunRecord) -> str:
    """Loss and validation metrics over iterations; the best validation state's metrics."""
    m = rec.metrics
    out = ['<section id="training"><h2>Training</h2>']
    best = m.get("best_iteration")
    png = figures.training_curves(rec.log, best)
    if png is None:
        out.append(_muted("No training log recorded."))
    else:
        alt = (
            "Left: training loss and learning rate over iterations. Right: validation macro F1, "
            "accuracy and AUC over iterations, with the best iteration marked."
        )
        caption = (
            f"{esc(m.get('iterations'))} iterations; the state of the best validation macro F1 "
            f"(iteration {esc(best)}) is the one exported and tested."
        )
        out.append(figure(png, alt, caption))
    val = m.get("val")
    if val:
        cells = [_pct_value(f"val.{k}", val.get(k)) for k in ("macro_f1", "accuracy", "auc")]
        cells.append(value("val.n", val.get("n"), str(val.get("n", "-"))))
        caption = "Validation, best iteration"
        out.append(table(["macro F1", "accuracy", "AUC", "n"], [cells], caption=caption,
                         numeric=[True] * 4))  # fmt: skip
    out.append("</section>")
    return "".join(out)


# --------------------------------------------------------------------------------------- test


def consistency(rec: RunRecord, pred: Predictions) -> list[str]:
    """Where the predictions disagree with ``metrics.json`` (empty when they agree)."""
    from shpeft.evaluate import compute_metrics

    if pred.classes != rec.classes:
        return [f"prediction classes {pred.classes} differ from the run's {rec.classes}"]
    again, test = compute_metrics(pred.labels, pred.probs, pred.classes), rec.test or {}
    issues = []
    for key in ("n", "macro_f1", "accuracy", "auc"):
        a, b = again.get(key), test.get(key)
        if (a is None) != (b is None) or (a is not None and abs(float(a) - float(b)) > 1e-9):
            issues.append(f"{key}: {a} from the predictions, {b} in metrics.json")
    return issues


def _per_class_table(rec: RunRecord, pred: Predictions | None) -> str:
    test, classes = rec.test or {}, rec.classes
    aucs = figures.per_class_auc(pred.labels, pred.probs, len(classes)) if pred else None
    rows = []
    for i, c in enumerate(classes):
        pc, key = test["per_class"].get(c, {}), f"test.per_class.{c}"
        auc = aucs[i] if aucs else None
        rows.append(
            [esc(c)]
            + [_pct_value(f"{key}.{k}", pc.get(k)) for k in ("precision", "recall", "f1")]
            + [
                value(f"{key}.support", pc.get("support"), str(pc.get("support", "-"))),
                value(f"test.auc_per_class.{c}", auc, "-" if auc is None else f"{auc:.3f}"),
            ]
        )
    auc = test.get("auc")
    rows.append(
        [
            "<strong>macro average</strong>",
            "",
            "",
            _pct_value("test.macro_f1", test.get("macro_f1")),
            value("test.n", test.get("n"), str(test.get("n"))),
            value("test.auc", auc, "-" if auc is None else f"{auc:.3f}"),
        ]
    )
    head = ["class", "precision", "recall", "F1", "support", "AUC (one vs rest)"]
    caption = f"Per class, test split (accuracy {pct(test.get('accuracy'))})"
    html = table(head, rows, caption=caption, numeric=[False] + [True] * 5)
    if len(classes) == 2:
        html += (
            '<p class="muted small">Two classes: the run\'s AUC is that of the second class '
            f"(<em>{esc(classes[1])}</em>) as positive; one-vs-rest AUCs of both are equal.</p>"
        )
    if auc is None and test.get("auc_note"):
        html += _muted(test["auc_note"])
    return html


def test_metrics(rec: RunRecord, pred: Predictions | None, notes: Sequence[str]) -> str:
    """Per-class metrics, confusion matrix, ROC curves, reliability diagram with ECE."""
    test = rec.test
    out = ['<section id="test"><h2>Test metrics</h2>']
    if not test:
        why = (
            "the run was trained without reading its test split (e.g. a learning-rate search run)"
            if rec.metrics.get("test_skipped")
            else "the run has no test split"
        )
        return "".join(out) + _muted(f"No test metrics: {why}.") + "</section>"
    out += [_note(n) for n in notes]
    out.append(_per_class_table(rec, pred))
    classes, cm = rec.classes, test["confusion_matrix"]
    # the run's own plot of the same matrix when it has one (written beside metrics.json)
    saved = rec.run_dir / "confusion_matrix_test.png"
    pics = [
        figure(
            saved.read_bytes()
            if saved.is_file()
            else figures.confusion_matrix(cm, classes, f"{rec.method}: test"),
            "Confusion matrix of the test split: rows are the true classes, columns the predicted "
            "ones, each cell a number of images.",
            "Confusion matrix (rows: true class, columns: predicted).",
            width=320,
        )
    ]
    if pred is None:
        pics.append(_muted("No test predictions: the ROC curves and the calibration need them."))
    else:
        pics.append(
            figure(
                figures.roc_curves(pred.labels, pred.probs, classes),
                "ROC curves, one per class against the rest, with their AUC in the legend.",
                "ROC curves per class (one vs rest).",
                width=360,
            )
        )
        rel = reliability(pred.labels, pred.probs, DEFAULT_BINS)
        pics.append(
            figure(
                figures.reliability_diagram(rel),
                f"Reliability diagram: accuracy against confidence in {rel.n_bins} bins; expected "
                f"calibration error {100 * rel.ece:.1f}%.",
                f"Expected calibration error {_pct_value('test.ece', rel.ece)} ({rel.n_bins} "
                "equal-width bins of the top-class probability; Guo et al. 2017). Bars below the "
                "diagonal: over-confident.",
                width=360,
            )
        )
    out.append('<div class="row">' + "".join(pics) + "</div>")
    rows = [
        [esc(classes[i])]
        + [value(f"test.confusion_matrix.{i}.{j}", n, str(n)) for j, n in enumerate(r)]
        for i, r in enumerate(cm)
    ]
    head = ["true \\ predicted", *[esc(c) for c in classes]]
    cm_table = table(head, rows, numeric=[False] + [True] * len(classes))
    out.append(f"<details><summary>Confusion matrix as a table</summary>{cm_table}</details>")
    return "".join(out) + "</section>"


# ----------------------------------------------------------------------------------- examples


def examples(rec: RunRecord, pred: Predictions | None, model: Any, test_data: Any) -> str:
    """A few test images, correct and wrong, with their explanation heat maps."""
    out = ['<section id="examples"><h2>Where it looks</h2>']
    if pred is None or model is None or test_data is None:
        why = "no test predictions" if pred is None else "the model was not loaded"
        return "".join(out) + _muted(f"No explanation maps: {why}.") + "</section>"
    from shpeft.report.examples import explained_examples, pick_examples

    inp = rec.config.get("input") or {}
    try:
        shown = explained_examples(
            model,
            test_data,
            pred,
            pick_examples(pred.labels, pred.probs, N_CORRECT, N_WRONG),
            inp.get("mean", (0.5, 0.5, 0.5)),
            inp.get("std", (0.5, 0.5, 0.5)),
        )
    except Exception as e:  # an attribution that does not fit the model must not lose the report
        log.warning("explanation maps of %s failed: %s: %s", rec.run_dir, type(e).__name__, e)
        return "".join(out) + _note(f"No explanation maps: {type(e).__name__}: {e}") + "</section>"
    out.append(
        "<p>Test images as the model saw them (left) and the gradient-weighted attention rollout "
        "for the predicted class (right; Chefer, Gur, Wolf, ICCV 2021): red marks the patches that "
        "contributed most to the prediction, blue the least. Each group takes the most confident "
        "images of every true class in turn.</p>"
    )
    for correct, title in ((True, "Correct"), (False, "Wrong")):
        group = [e for e in shown if e.correct == correct]
        out.append(f"<h3>{title} ({len(group)})</h3>")
        if not group:
            out.append(_muted("None in the test split."))
            continue
        verdict = '<span class="ok">correct</span>' if correct else '<span class="bad">wrong</span>'
        cells = [
            figure(
                e.image,
                f"Test image {e.id}, true class {e.true}, predicted {e.predicted} with probability "
                f"{e.confidence:.2f}: the input and its heat map",
                f"<code>{esc(e.id)}</code>: true <em>{esc(e.true)}</em>, predicted "
                f"<em>{esc(e.predicted)}</em> (p = {e.confidence:.2f}), {verdict}",
                mime=e.mime,
            )
            for e in group
        ]
        out.append('<div class="examples">' + "".join(cells) + "</div>")
    return "".join(out) + "</section>"


# ---------------------------------------------------------------------------------- selection


def has_sparse_part(run_dir: Path) -> bool:
    """Whether the run's delta stores selected scalars (read from the file's keys only)."""
    from safetensors import safe_open

    path = run_dir / "delta.safetensors"
    if not path.is_file():
        return False
    with safe_open(str(path), "pt") as f:
        return any(k.startswith("sparse/") for k in f.keys())  # noqa: SIM118 (not a dict)


def _selection_rows(items: Sequence[dict[str, Any]], kind: str) -> list[list[str]]:
    return [
        [
            esc(r["name"]),
            value(f"selection.{kind}.{r['name']}.selected", r["selected"], f"{r['selected']:,}"),
            f"{r['share_of_k_pct']:.1f}",
            f"{r['density_pct']:.2f}",
            "-" if r.get("td_share_pct") is None else f"{r['td_share_pct']:.1f}",
            value(
                f"selection.{kind}.{r['name']}.unchanged",
                r.get("unchanged") or 0,
                f"{r.get('unchanged') or 0:,}",
            ),  # fmt: skip
        ]
        for r in items
    ]


def selection(rec: RunRecord) -> str:
    """For sparse methods: where k went (block x kind) and which scalars never moved."""
    out = ['<section id="selection"><h2>Selection</h2>']
    if not has_sparse_part(rec.run_dir):
        why = f"{rec.method} trains no individually selected scalars: no selection map."
        return "".join(out) + _muted(why) + "</section>"
    from shpeft.analysis.selection import run_selection

    try:
        sel = run_selection(rec.run_dir)
        png = figures.selection_map(sel)
    except Exception as e:  # e.g. the base weights are no longer where the run found them
        log.warning("selection map of %s failed: %s: %s", rec.run_dir, type(e).__name__, e)
        return "".join(out) + _note(f"No selection map: {type(e).__name__}: {e}") + "</section>"
    k, never = sel["k"], sel["unchanged"]
    eligible = f" of {sel['eligible']:,} eligible" if sel.get("eligible") else ""
    out.append(
        f"<p>k = {value('selection.k', k, f'{k:,}')} selected scalars{eligible}; "
        f"{value('selection.unchanged', never, f'{never:,}')} of them "
        f"({100.0 * never / max(1, k):.2f}%) <strong>never moved</strong>: their trained value "
        "equals the pretrained one bit for bit.</p>"
    )
    out.append(
        figure(
            png,
            "Selection map: share of the selected scalars per block and parameter kind; per kind "
            "the share of k, the part chosen by the gradient term and the part that never moved.",
            "Left: share of k per block and parameter kind. Right: share of k per kind, the part "
            "chosen by the gradient (task-dependent) term of the importance, and the part that "
            "never moved (<code>shpeft analyze selection</code> writes the same as files).",
        )
    )
    head = ["selected", "share of k %", "density %", "gradient-term share %", "never moved"]
    num = [False] + [True] * 5
    out.append('<div class="row">')
    out.append(table(["kind", *head], _selection_rows(sel["per_kind"], "kind"),
                     caption="Per parameter kind", numeric=num))  # fmt: skip
    out.append(table(["block", *head], _selection_rows(sel["per_block"], "block"),
                     caption="Per block", numeric=num))  # fmt: skip
    return "".join(out) + "</div></section>"


# --------------------------------------------------------------------------- cost and config


def cost(rec: RunRecord) -> str:
    """Trainable share, delta size, time and peak memory (grid runs: also wall and CPU time)."""
    m, r = rec.metrics, rec.result or {}
    tr = m.get("trainable") or {}
    peak = m.get("peak_memory") or {}
    rss = peak.get("rss_mb") if peak.get("rss_mb") is not None else r.get("peak_rss_mb")
    cuda = peak.get("cuda_mb") if peak.get("cuda_mb") is not None else r.get("peak_cuda_mb")
    rate = next((row["img_per_s"] for row in reversed(rec.log) if "img_per_s" in row), None)

    def secs(key: str, x: float | None) -> str:
        return "-" if x is None else value(key, x, f"{x:.1f} s")

    def mb(key: str, x: float | None, missing: str) -> str:
        return missing if x is None else value(key, x, f"{x:,.0f} MB")

    items = []
    if tr:
        n, total = tr.get("backbone_trainable", 0), tr.get("backbone_params", 0)
        text = f"{n:,} of {total:,} ({tr.get('backbone_trainable_pct', 0):.4g}%)"
        head = tr.get("head_trainable", 0)
        items += [
            ("trainable backbone scalars", value("trainable.backbone_trainable", n, text)),
            ("trainable head scalars", value("trainable.head_trainable", head, f"{head:,}")),
        ]
    b = m.get("delta_bytes")
    items += [
        ("delta file", "-" if b is None else value("delta_bytes", b, f"{size_text(b)} ({b:,} B)")),
        ("preparation (e.g. importance estimation)", secs("prepare_s", m.get("prepare_s"))),
        ("training loop", secs("train_s", m.get("train_s"))),
        ("throughput (last logged)", "-" if rate is None else esc(f"{rate:.0f} images/s")),
    ]
    if r:  # a grid run's result.json (written after the run, so a rebuilt report has it)
        items += [
            ("whole run, wall clock", secs("wall_s", r.get("wall_s"))),
            ("whole run, CPU time of the process", secs("cpu_s", r.get("cpu_s"))),
        ]
    items += [
        ("peak resident memory (process)", mb("peak_rss_mb", rss, "not recorded")),
        ("peak CUDA memory allocated", mb("peak_cuda_mb", cuda, "-")),
        ("iterations", esc(m.get("iterations"))),
        ("resumed from iteration", esc(m.get("resumed_from") or "-")),
        ("skipped non-finite batches", esc(m.get("skipped_batches", 0))),
    ]
    return (
        '<section id="cost"><h2>Cost</h2>'
        + table(["measure", "value"], [[esc(k), v] for k, v in items], css="kv")
        + '<p class="muted small">Peak memory is the whole process\'s (a grid that trains several '
        "runs in one process reports the largest so far).</p></section>"
    )


def config(rec: RunRecord) -> str:
    """The resolved configuration (``config.json``) and the environment."""
    conf = rec.config
    out = ['<section id="config"><h2>Configuration</h2><div class="row">']
    for section in ("method", "train", "backbone", "data"):
        out.append(kv_table((conf.get(section) or {}).items(), caption=section))
    model = [("classes", rec.classes), ("input", conf.get("input")), ("base hash",
             conf.get("base_hash"))]  # fmt: skip
    out.append(kv_table(model, caption="model") + "</div>")
    env = (conf.get("environment") or {}).items()
    out.append(f"<details><summary>Environment</summary>{kv_table(env)}</details>")
    config_path = esc(rec.run_dir / "config.json")
    out.append(
        '<p class="muted small">The complete configuration is <code>config.json</code> in the run '
        f"directory; <code>shpeft train --config {config_path}</code> reruns it.</p></section>"
    )
    return "".join(out)
