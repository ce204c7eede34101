"""The run report and the bench index: numbers against metrics.json, calibration against a hand
computation, rebuilding old runs, predict --explain, and both pages in a real browser."""

from __future__ import annotations

import csv
import html.parser
import io
import json
import logging
import shutil
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch

from shpeft.cli import main
from shpeft.evaluate import compute_metrics
from shpeft.report import sections
from shpeft.report.build import REPORT, report_after_training, write_report
from shpeft.report.calibration import expected_calibration_error, reliability
from shpeft.report.examples import explanation_path, pick_examples
from shpeft.report.predictions import FILE as PREDICTIONS
from shpeft.report.predictions import Predictions, load_predictions, save_predictions
from tests.browser import artifacts_dir, chromium, console_errors, images_decoded

pytestmark = pytest.mark.filterwarnings("ignore:data leakage allowed:UserWarning")


# ---------------------------------------------------------------------------- page parsing


class Page(html.parser.HTMLParser):
    """The parts of a report the tests read: tagged values, images, links, headings, scripts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.values: dict[str, list] = {}
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.headings: list[str] = []
        self.scripts = 0
        self._heading: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-key" in a:
            self.values.setdefault(a["data-key"], []).append(json.loads(a["data-value"]))
        if tag == "img":
            self.images.append(a)
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag == "script":
            self.scripts += 1
        if tag in ("h1", "h2", "h3"):
            self._heading = ""

    def handle_data(self, data):
        if self._heading is not None:
            self._heading += data

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append(self._heading.strip())
            self._heading = None

    def value(self, key: str):
        """The value tagged ``key`` (every occurrence must agree)."""
        found = self.values[key]
        assert all(v == found[0] for v in found), (key, found)
        return found[0]


def read_page(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------ calibration (unit)


def ece_by_hand(labels, probs, n_bins):
    """An independent ECE: loops over bins ((m-1)/M, m/M], no vectorised binning."""
    n, total = len(labels), 0.0
    for m in range(1, n_bins + 1):
        lo, hi = (m - 1) / n_bins, m / n_bins
        members = [
            i for i in range(n) if (lo < max(probs[i]) <= hi) or (m == 1 and max(probs[i]) == 0)
        ]
        if not members:
            continue
        acc = sum(int(np.argmax(probs[i]) == labels[i]) for i in members) / len(members)
        conf = sum(max(probs[i]) for i in members) / len(members)
        total += len(members) / n * abs(acc - conf)
    return total


def test_ece_on_a_hand_made_case():
    # top-class confidence / correct:  0.95 yes | 0.85 no | 0.72 yes | 0.68 yes | 0.62 no
    labels = np.array([0, 1, 1, 2, 0])
    probs = np.array(
        [
            [0.95, 0.03, 0.02],
            [0.85, 0.10, 0.05],
            [0.18, 0.72, 0.10],
            [0.12, 0.20, 0.68],
            [0.30, 0.62, 0.08],
        ]
    )
    # 10 bins: (0.9,1] {0.95 yes}: |1-0.95| = 0.05; (0.8,0.9] {0.85 no}: 0.85;
    # (0.7,0.8] {0.72 yes}: 0.28; (0.6,0.7] {0.68 yes, 0.62 no}: |0.5-0.65| = 0.15 (weight 2)
    want = (0.05 + 0.85 + 0.28 + 2 * 0.15) / 5
    assert want == pytest.approx(0.296)
    assert expected_calibration_error(labels, probs, 10) == pytest.approx(want, abs=1e-12)
    assert ece_by_hand(labels, probs, 10) == pytest.approx(want, abs=1e-12)
    rel = reliability(labels, probs, 10)
    assert rel.count.tolist() == [0, 0, 0, 0, 0, 0, 2, 1, 1, 1]
    assert rel.accuracy[6] == 0.5 and rel.confidence[6] == pytest.approx(0.65)
    # one bin: |accuracy - mean confidence| over everything
    assert expected_calibration_error(labels, probs, 1) == pytest.approx(abs(3 / 5 - 3.82 / 5))


def test_ece_bins_are_right_closed_and_random_cases_agree():
    # exactly representable edges (M = 4): 0.5 is in (0.25, 0.5], 0.75 in (0.5, 0.75], 1 in the last
    probs = np.array([[0.5, 0.5], [0.75, 0.25], [1.0, 0.0]])
    assert reliability(np.array([0, 0, 0]), probs, 4).count.tolist() == [0, 1, 1, 1]
    g = np.random.default_rng(0)
    for c in (2, 3, 7):
        logits = g.normal(size=(200, c)) * 3
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        y = g.integers(0, c, 200)
        for bins in (5, 10, 15):
            assert expected_calibration_error(y, p, bins) == pytest.approx(
                ece_by_hand(y, p, bins), abs=1e-12
            )


def test_ece_rejects_bad_input():
    with pytest.raises(ValueError, match="n_bins"):
        reliability(np.array([0]), np.array([[1.0, 0.0]]), 0)
    with pytest.raises(ValueError, match="N > 0"):
        reliability(np.array([], dtype=int), np.zeros((0, 2)))


# --------------------------------------------------------------------------- examples (unit)


def test_pick_examples_takes_confident_ones_of_every_class_in_turn():
    labels = np.array([0, 0, 0, 1, 1, 1, 2])
    probs = np.array(
        [
            [0.9, 0.1, 0.0],  # 0 correct 0.9
            [0.6, 0.4, 0.0],  # 1 correct 0.6
            [0.2, 0.8, 0.0],  # 2 wrong 0.8
            [0.3, 0.7, 0.0],  # 3 correct 0.7
            [0.1, 0.8, 0.1],  # 4 correct 0.8
            [0.95, 0.05, 0.0],  # 5 wrong 0.95
            [0.5, 0.1, 0.4],  # 6 wrong 0.5
        ]
    )
    assert pick_examples(labels, probs, n_correct=3, n_wrong=2) == [0, 4, 1, 2, 5]
    assert pick_examples(labels, probs, n_correct=10, n_wrong=10) == [0, 4, 1, 3, 2, 5, 6]
    assert pick_examples(labels, probs, n_correct=0, n_wrong=0) == []


def test_explanation_paths_mirror_the_image_folders(tmp_path):
    root = tmp_path / "imgs"
    assert explanation_path("out", str(root / "a" / "x.jpg"), root) == Path("out/a/x.jpg.png")
    assert explanation_path("out", str(root / "x.png"), root / "x.png") == Path("out/x.png.png")


# ---------------------------------------------------------------- a hand-made run (no model)

ODD = '<b>"odd" & class</b>'


def hand_made_run(tmp_path: Path) -> tuple[Path, Predictions]:
    """A minimal finished run directory, written by hand, with hostile class names and paths."""
    run = tmp_path / "run <x> & 'y'"
    run.mkdir()
    classes = [ODD, "plain"]
    labels = np.array([0, 0, 1, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.4, 0.6], [0.55, 0.45], [0.8, 0.2]])
    conf = {
        "backbone": {"model": "m<odel>", "head": "l2norm"},
        "data": {"data": "/data/<script>alert(1)</script>"},
        "train": {"method": "linear", "iterations": 20},
        "method": {},
        "classes": classes,
        "input": {"image_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    metrics = {
        "method": "linear",
        "trainable": {
            "backbone_trainable": 0,
            "head_trainable": 34,
            "backbone_params": 1000,
            "backbone_trainable_pct": 0.0,
        },  # fmt: skip
        "iterations": 20,
        "best_iteration": 10,
        "train_s": 1.5,
        "prepare_s": 0.1,
        "delta_bytes": 3000,
        "val": {"macro_f1": 0.5, "accuracy": 0.5, "auc": 0.5, "n": 4},
        "test": compute_metrics(labels, probs, classes),
    }
    (run / "config.json").write_text(json.dumps(conf))
    (run / "metrics.json").write_text(json.dumps(metrics))
    rows = [{"iteration": i, "loss": 1.0 / i, "lr": 0.01} for i in (10, 20)]
    rows += [
        {"iteration": i, "val": {"macro_f1": 0.5, "accuracy": 0.5, "auc": None}} for i in (10, 20)
    ]
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut')
    pred = Predictions([f"id{i}" for i in range(6)], labels, probs.astype(np.float32), classes)
    return run, pred


def test_report_of_a_hand_made_run_escapes_and_embeds_everything(tmp_path):
    run, pred = hand_made_run(tmp_path)
    save_predictions(run, pred)
    assert load_predictions(run).ids == pred.ids
    (run / "result.json").write_text(
        json.dumps({"wall_s": 12.5, "cpu_s": 20.0, "peak_rss_mb": 900})
    )
    path = write_report(run, predictions=load_predictions(run))
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    # run texts are escaped everywhere: no tag of theirs reaches the page
    assert "<script>" not in text and "<b>" not in text and "<x>" not in text
    assert "&lt;b&gt;&quot;odd&quot; &amp; class&lt;/b&gt;" in text
    assert page.scripts == 0
    # self-contained: every image embedded, with alt text; no resource from elsewhere
    assert page.images and all(i["src"].startswith("data:image/") for i in page.images)
    assert all(i.get("alt", "").strip() for i in page.images)
    assert all(h.startswith("#") for h in page.links)
    assert page.headings[0].startswith("Run report") and "Test metrics" in page.headings
    # the numbers are metrics.json's
    test = json.loads((run / "metrics.json").read_text())["test"]
    assert page.value("test.macro_f1") == test["macro_f1"]
    assert page.value(f"test.per_class.{ODD}.recall") == test["per_class"][ODD]["recall"]
    assert page.value("test.ece") == pytest.approx(ece_by_hand(pred.labels, pred.probs, 10))
    # a grid run's result.json adds its whole-run cost (and stands in for an unrecorded peak)
    assert page.value("wall_s") == 12.5 and page.value("peak_rss_mb") == 900
    # no model: the examples say why; a linear run has no selection map
    assert "No explanation maps: the model was not loaded" in text
    assert "trains no individually selected scalars" in text


def test_disagreeing_predictions_are_reported_not_hidden(tmp_path):
    run, pred = hand_made_run(tmp_path)
    pred.probs = pred.probs[:, ::-1].copy()  # every prediction flipped
    text = write_report(run, predictions=pred).read_text()
    assert "The test predictions disagree with metrics.json" in text


def test_report_of_an_unfinished_run_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has not finished"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a shpeft run directory"):
        write_report(tmp_path / "nothing")


def test_a_failing_report_never_fails_the_run(tmp_path, monkeypatch, caplog):
    run, pred = hand_made_run(tmp_path)

    def broken(*a, **k):
        raise RuntimeError("plotting exploded")

    monkeypatch.setattr(sections, "training", broken)
    with caplog.at_level(logging.WARNING, logger="shpeft"):
        assert report_after_training(run, model=None, test_pred=(pred.labels, pred.probs)) is None
    assert "plotting exploded" in caplog.text and "shpeft report" in caplog.text
    assert not (run / REPORT).exists()
    assert load_predictions(run).source == "training"  # saved before the report failed


# --------------------------------------------------------------------- a real run (vit_pico)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """SH-PEFT 1% on BreastMNIST with vit_pico, 20 iterations: trained once for this module."""
    from tests.conftest import SHARED_DATA, SHARED_MODELS

    if not (SHARED_MODELS / "vit_pico").exists():
        pytest.skip(
            "../shared is absent (it ships beside the project in CI, not in a user's clone)"
        )
    import shpeft
    from shpeft.methods.shpeft import ShpeftConfig

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("report") / "shpeft-run"
    metrics = shpeft.train(
        shpeft.RunConfig(
            backbone=shpeft.BackboneConfig(model=str(SHARED_MODELS / "vit_pico")),
            data=shpeft.DataConfig(
                data=str(SHARED_DATA / "breastmnist" / "breastmnist.npz"),
                allow_leakage=True,  # the official split holds one image in train and test
            ),
            train=shpeft.TrainConfig(
                out=str(out),
                method="shpeft",
                iterations=20,
                batch_size=16,
                lr=0.05,
                eval_every=5,
                progress=False,
                threads=1,
            ),  # fmt: skip
            method=ShpeftConfig(ratio=0.01, importance_batches=4),
        )
    )
    return out, metrics


@pytest.mark.slow
def test_training_saves_test_predictions_equal_to_metrics_json(real_run):
    run, metrics = real_run
    pred = load_predictions(run)
    assert pred.source == "training" and pred.classes == ["malignant", "normal, benign"]
    split = json.loads((run / "split.json").read_text())["splits"]["test"]
    assert pred.ids == split["ids"]
    assert [pred.classes[y] for y in pred.labels] == split["labels"]
    # the same pass as the test metrics: recomputing them from the file gives metrics.json
    assert compute_metrics(pred.labels, pred.probs, pred.classes) == metrics["test"]
    assert json.loads((run / "metrics.json").read_text())["peak_memory"]["rss_mb"] > 0


def check_numbers(page: Page, run: Path) -> None:
    """Every number the report tags equals metrics.json / an independent computation."""
    m = json.loads((run / "metrics.json").read_text())
    pred = load_predictions(run)
    test, classes = m["test"], m["test"]["classes"]
    for key in ("macro_f1", "accuracy", "auc", "n"):
        assert page.value(f"test.{key}") == test[key], key
        assert page.value(f"val.{key}") == m["val"][key], key
    for c in classes:
        for k in ("precision", "recall", "f1", "support"):
            assert page.value(f"test.per_class.{c}.{k}") == test["per_class"][c][k]
    for i, row in enumerate(test["confusion_matrix"]):
        for j, n in enumerate(row):
            assert page.value(f"test.confusion_matrix.{i}.{j}") == n
    for k in ("backbone_trainable", "head_trainable", "backbone_trainable_pct"):
        assert page.value(f"trainable.{k}") == m["trainable"][k]
    for k in ("delta_bytes", "train_s", "prepare_s"):
        assert page.value(k) == m[k]
    # calibration: the report's ECE against the test's own loop over the saved predictions
    assert page.value("test.ece") == pytest.approx(ece_by_hand(pred.labels, pred.probs, 10))
    # per-class AUC from the predictions; binary: the run's AUC is the second class's
    from sklearn.metrics import roc_auc_score

    for c, name in enumerate(classes):
        want = roc_auc_score(pred.labels == c, pred.probs[:, c])
        assert page.value(f"test.auc_per_class.{name}") == pytest.approx(want, abs=1e-12)
    assert page.value(f"test.auc_per_class.{classes[1]}") == pytest.approx(test["auc"], abs=1e-12)


@pytest.mark.slow
def test_report_numbers_match_metrics_json(real_run):
    run, metrics = real_run
    page = read_page(run / REPORT)
    check_numbers(page, run)
    # the selection map of a sparse run: k is the trained backbone count
    assert page.value("selection.k") == metrics["trainable"]["backbone_trainable"]
    sel = json.loads((run / "selection.json").read_text())
    for row in page.values:
        if row.startswith("selection.kind.") and row.endswith(".selected"):
            kind = row.split(".")[2]
            assert page.value(row) == sel["per_kind"][kind]["selected"]
    assert page.value("peak_rss_mb") == metrics["peak_memory"]["rss_mb"]
    # four correct and four wrong test images with their heat maps (this run gets both)
    examples = [i for i in page.images if i["alt"].startswith("Test image")]
    assert len(examples) == 8
    assert all(i["src"].startswith("data:image/jpeg;base64,") for i in examples)
    assert {"Correct (4)", "Wrong (4)", "Selection", "Cost", "Configuration"} <= set(page.headings)


@pytest.mark.slow
def test_shpeft_report_rebuilds_an_old_run(real_run, tmp_path):
    run, _ = real_run
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    # what a run of an earlier version holds: no predictions, no report, no peak memory
    before = load_predictions(old)
    (old / PREDICTIONS).unlink()
    (old / REPORT).unlink()
    m = json.loads((old / "metrics.json").read_text())
    m.pop("peak_memory")
    (old / "metrics.json").write_text(json.dumps(m))
    assert main(["-q", "report", str(old)]) == 0
    pred = load_predictions(old)
    assert pred.source == "recomputed" and pred.ids == before.ids
    np.testing.assert_array_equal(pred.labels, before.labels)
    np.testing.assert_allclose(pred.probs, before.probs, rtol=0, atol=1e-6)
    page = read_page(old / REPORT)
    check_numbers(page, old)
    text = (old / REPORT).read_text()
    assert "recomputed by `shpeft report`" in text and "not recorded" in text
    assert "disagree" not in text
    # a folder of runs: every run below it; --skip-existing leaves built ones alone
    mtime = (old / REPORT).stat().st_mtime_ns
    assert main(["-q", "report", str(tmp_path), "--skip-existing"]) == 0
    assert (old / REPORT).stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_a_run_without_test_metrics_never_reads_its_test_split(real_run, tmp_path, monkeypatch):
    run, _ = real_run
    search = tmp_path / "search-run"
    shutil.copytree(run, search)
    m = json.loads((search / "metrics.json").read_text())
    m.pop("test")
    m["test_skipped"] = True
    (search / "metrics.json").write_text(json.dumps(m))
    (search / PREDICTIONS).unlink()
    import shpeft.report.rebuild as rebuild

    def no_test_split(*a, **k):
        raise AssertionError("the test split was read")

    monkeypatch.setattr(rebuild, "run_split_loader", no_test_split)
    monkeypatch.setattr(rebuild, "load_run", no_test_split)
    assert main(["-q", "report", str(search)]) == 0
    text = (search / REPORT).read_text()
    assert "trained without reading its test split" in text and "test.macro_f1" not in text
    assert not (search / PREDICTIONS).exists()
    monkeypatch.undo()
    # evaluate_test (the grid's lr-search run becoming a final run) then adds them, once
    from shpeft.report.build import report_after_training
    from shpeft.runs import evaluate_test

    metrics = evaluate_test(search, after=report_after_training)  # as the grid calls it
    assert load_predictions(search).source == "training"
    check_numbers(read_page(search / REPORT), search)
    assert metrics["test"] == json.loads((run / "metrics.json").read_text())["test"]


@pytest.mark.slow
def test_predict_explain_writes_an_overlay_per_image(real_run, tmp_path, capsys):
    from PIL import Image

    from tests.conftest import SHARED_DATA

    run, _ = real_run
    images = np.load(SHARED_DATA / "breastmnist" / "breastmnist.npz")["test_images"][:3]
    root = tmp_path / "images"
    paths = [root / "a" / "one.png", root / "a" / "two.png", root / "three.png"]
    for p, im in zip(paths, images, strict=True):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(p)
    out = tmp_path / "maps"
    assert main(["-q", "predict", "--run", str(run), "--images", str(root), "--explain", str(out),
                 "--device", "cpu"]) == 0  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["path"] for r in rows] == [str(root / "a/one.png"), str(root / "a/two.png"),
                                         str(root / "three.png")]  # fmt: skip
    for p in paths:
        overlay = out / p.relative_to(root).with_name(p.name + ".png")
        with Image.open(overlay) as im:
            assert im.format == "PNG" and im.size == (224, 224) and im.mode == "RGB"


# --------------------------------------------------------------------------- bench index


def bench_with_a_real_report(tmp_path: Path, run: Path | None) -> tuple[Path, Path]:
    """A synthetic grid summary whose shpeft/busi/seed-0 run is (a copy of) ``run``."""
    from shpeft.analysis import grid as G
    from shpeft.analysis import summary as S
    from tests.analysis.test_analysis_tables import config, populate

    g = config()
    populate(tmp_path, g)
    spec = next(
        s for s in G.final_specs(g, {}) if (s.variant, s.dataset, s.seed) == ("shpeft", "busi", 0)
    )
    if run is not None:
        shutil.copytree(run, spec.run_dir(tmp_path), dirs_exist_ok=True)
    S.write_summary(g, tmp_path)
    return tmp_path / "summary_syn" / "index.html", spec.run_dir(tmp_path)


def test_bench_index_links_every_cell_to_its_runs(tmp_path):
    index, linked = bench_with_a_real_report(tmp_path, None)
    (linked / REPORT).write_text("<!DOCTYPE html><title>r</title>")
    from shpeft.analysis import summary as S
    from tests.analysis.test_analysis_tables import F1, config

    S.write_summary(config(), tmp_path)
    page = read_page(index)
    runs = [h for h in page.links if "runs/" in h]
    # one link per finished Table 1 run (fixed lr setting; the shared one has none)
    assert len(runs) == sum(len(v) for v in F1.values())
    for href in runs:
        assert (index.parent / href.replace("%40", "@")).exists(), href
    assert "../runs/busi/shpeft%400.01/lr0.01-it5-s0/report.html" in runs
    assert "../runs/busi/full/lr0.01-it5-s1/" in runs  # no report yet: its folder
    assert page.value("table1.fixed.shpeft.busi") == pytest.approx(82.0)
    assert any(i["alt"].startswith("Fig. 4") for i in page.images)
    assert all(i["src"].startswith("data:image/png;base64,") for i in page.images)
    assert page.scripts == 0 and page.headings[0] == "Benchmark grid syn"


# ------------------------------------------------------------------------------- browser


def full_page_screenshot(driver, path: Path) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height) + 40, 12000))
    driver.save_screenshot(str(path))


@pytest.mark.slow
def test_report_and_bench_index_in_chromium(real_run, tmp_path):
    from selenium.webdriver.common.by import By

    run, _ = real_run
    index, linked = bench_with_a_real_report(tmp_path, run)
    with chromium() as driver:
        driver.get((run / REPORT).as_uri())
        assert driver.title.startswith("shpeft report")
        assert console_errors(driver) == []
        assert images_decoded(driver) == []
        assert len(driver.find_elements(By.TAG_NAME, "img")) >= 13
        full_page_screenshot(driver, artifacts_dir() / "report.png")

        driver.set_window_size(1280, 900)
        driver.get(index.as_uri())
        assert console_errors(driver) == [] and images_decoded(driver) == []
        full_page_screenshot(driver, artifacts_dir() / "bench_index.png")
        # the cell's link opens that run's report
        link = driver.find_element(By.CSS_SELECTOR, 'a[href$="lr0.01-it5-s0/report.html"]')
        link.click()
        assert unquote(driver.current_url) == unquote((linked / REPORT).as_uri())
        assert console_errors(driver) == [] and images_decoded(driver) == []
