"""End-to-end: the CLI on real data (BreastMNIST) with the real pretrained vit_pico backbone."""

import csv
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from shpeft.cli import main
from shpeft.delta import Delta
from shpeft.runs import load_run


def train_args(model_dir, data, out, *extra):
    return [
        "-q",
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--iterations",
        "12",
        "--batch-size",
        "32",
        "--eval-every",
        "6",
        "--no-progress",
        # BreastMNIST's official split has one image in both train and test (the BUSI duplicate)
        "--allow-leakage",
        # SH-PEFT's own option (another method's flags are refused)
        *([] if "--method" in extra else ["--importance-batches", "4"]),
        *extra,
    ]


@pytest.fixture(scope="module")
def shpeft_run(tmp_path_factory):
    from tests.conftest import SHARED_DATA, SHARED_MODELS

    if not (SHARED_MODELS / "vit_pico").exists():
        pytest.skip(
            "../shared is absent (it ships beside the project in CI, not in a user's clone)"
        )
    out = tmp_path_factory.mktemp("runs") / "bm"
    data = SHARED_DATA / "breastmnist" / "breastmnist.npz"
    assert main(train_args(SHARED_MODELS / "vit_pico", data, out, "--ratio", "0.01")) == 0
    return out, data


@pytest.mark.slow
def test_train_writes_a_complete_run_directory(shpeft_run):
    out, _ = shpeft_run
    for name in (
        "config.json",
        "split.json",
        "train_log.jsonl",
        "metrics.json",
        "delta.safetensors",
        "selection.json",
        "confusion_matrix_test.png",
    ):
        assert (out / name).is_file(), name
    conf = json.loads((out / "config.json").read_text())
    assert conf["method"]["ratio"] == 0.01 and conf["classes"] == ["malignant", "normal, benign"]
    assert conf["environment"]["torch"] == torch.__version__
    metrics = json.loads((out / "metrics.json").read_text())
    counts = metrics["trainable"]
    assert counts["backbone_trainable"] == round(0.01 * counts["backbone_params"])
    assert counts["head_trainable"] == 2 * 64 + 2
    for key in ("macro_f1", "accuracy", "auc"):
        assert 0 <= metrics["test"][key] <= 1
    assert metrics["test"]["n"] == 156
    delta = Delta.load(out / "delta.safetensors")
    assert delta.num_sparse == counts["backbone_trainable"]
    assert delta.meta["base_hash"] == conf["base_hash"] and delta.meta["method"] == "shpeft"
    # sparse delta: indices int32 + float32 values + head + small metadata
    assert (out / "delta.safetensors").stat().st_size <= 8 * delta.num_sparse + 4 * 130 + 16 * 1024


@pytest.mark.slow
def test_trained_model_differs_from_base_only_at_selected_scalars(shpeft_run, vit_pico_dir):
    out, _ = shpeft_run
    base = load_file(str(vit_pico_dir / "model.safetensors"))
    model, *_ = load_run(out)
    delta = Delta.load(out / "delta.safetensors")
    for name, tensor in model.state_dict().items():
        if name.startswith("head."):
            continue
        diff = torch.nonzero((tensor != base[name]).reshape(-1)).squeeze(1)
        allowed = (
            delta.sparse[name][0].long()
            if name in delta.sparse
            else torch.empty(0, dtype=torch.long)
        )
        assert set(diff.tolist()) <= set(allowed.tolist()), name
    changed = sum(
        int((model.state_dict()[n].reshape(-1)[i.long()] != base[n].reshape(-1)[i.long()]).sum())
        for n, (i, _) in delta.sparse.items()
    )
    assert changed > 0


@pytest.mark.slow
def test_eval_predict_merge(shpeft_run, tmp_path, capsys):
    out, data = shpeft_run
    assert (
        main(
            [
                "-q",
                "eval",
                "--run",
                str(out),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "m.json").read_text())
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert m["macro_f1"] == pytest.approx(test["macro_f1"]) and m["n"] == 156

    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()).save(imgs / f"{i}.png")
    assert (
        main(
            [
                "-q",
                "predict",
                "--run",
                str(out),
                "--images",
                str(imgs),
                "-o",
                str(tmp_path / "p.csv"),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((tmp_path / "p.csv").read_text().splitlines()))
    assert len(rows) == 3 and {r["prediction"] for r in rows} <= {"malignant", "normal, benign"}
    assert all(
        abs(float(r["prob_malignant"]) + float(r["prob_normal, benign"]) - 1) < 1e-4 for r in rows
    )

    merged = tmp_path / "merged.safetensors"
    assert main(["-q", "merge", "--run", str(out), "--out", str(merged)]) == 0
    with safe_open(str(merged), "pt") as f:
        meta = f.metadata()
    card = json.loads((out / "config.json").read_text())
    # A plain timm model, no shpeft: same logits as the run's model.
    from tests.conftest import SHARED_MODELS

    kwargs = json.loads((SHARED_MODELS / "vit_pico" / "card.json").read_text())["kwargs"] | {
        "num_classes": 2
    }
    plain = timm.models.vision_transformer.VisionTransformer(**kwargs).eval()
    plain.load_state_dict(load_file(str(merged)))
    model, *_ = load_run(out)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        feats = plain.forward_head(plain.forward_features(x), pre_logits=True)
        logits = plain.head(F.normalize(feats, dim=-1))
        torch.testing.assert_close(logits, model(x), rtol=0, atol=1e-6)
    assert meta["head"] == "l2norm" and json.loads(meta["classes"]) == card["classes"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear", "full"])
def test_baselines_train(method, tmp_path, shared_data, vit_pico_dir):
    out = tmp_path / method
    data = shared_data / "breastmnist" / "breastmnist.npz"
    assert main(train_args(vit_pico_dir, data, out, "--method", method)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    counts = metrics["trainable"]
    assert counts["head_trainable"] == 130
    assert counts["backbone_trainable"] == (counts["backbone_params"] if method == "full" else 0)
    model, *_ = load_run(out)  # the delta applies back onto the base


def test_errors_are_one_line(tmp_path, capsys, vit_pico_dir):
    rc = main(
        ["train", "--model", "no_such_vit", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "error" in err and "Traceback" not in err
    rc = main(
        [
            "train",
            "--model",
            str(vit_pico_dir),
            "--data",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
            "--ratio",
            "0.01",
        ]
    )
    assert rc == 2
    with pytest.raises(SystemExit):
        main(["train", "--ratio", "abc"])
    rc = main(["train", "--model", str(vit_pico_dir), "--data", str(tmp_path), "--ratio", "2"])
    assert rc == 2 and "ratio" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_methods_lists_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("shpeft", "linear", "full"):
        assert name in out


@pytest.mark.parametrize("command", ["train", "eval", "predict", "merge", "methods", "demo"])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_train_flags_map_to_configs():
    from shpeft.cli import build_parser

    ns = build_parser().parse_args(
        [
            "train",
            "--model",
            "m",
            "--data",
            "d",
            "--lambda",
            "0.5",
            "--ratio",
            "0.0001",
            "--no-pretrained",
            "--importance-batches",
            "none",
        ]
    )
    assert ns.lam == 0.5 and ns.ratio == 0.0001 and ns.pretrained is False
    assert ns.importance_batches is None


@pytest.mark.slow
def test_delta_on_a_different_base_is_refused(shpeft_run, tmp_path, capsys):
    import shutil

    out, data = shpeft_run
    other = tmp_path / "other"
    shutil.copytree(out, other)
    conf = json.loads((other / "config.json").read_text())
    conf["backbone"]["pretrained"] = False  # a randomly initialised "base" of the same shape
    (other / "config.json").write_text(json.dumps(conf))
    rc = main(["eval", "--run", str(other), "--data", str(data)])
    err = capsys.readouterr().err
    assert rc == 2 and "different base" in err and "Traceback" not in err


def test_leakage_is_refused_before_anything_is_written(tmp_path, capsys, shared_data, vit_pico_dir):
    out = tmp_path / "run"
    data = shared_data / "breastmnist" / "breastmnist.npz"
    rc = main(["train", "--model", str(vit_pico_dir), "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "leak" in err.lower() and "--allow-leakage" in err
    assert not out.exists()


def test_data_check_finds_the_busi_duplicate(tmp_path, capsys, shared_data):
    rc = main(
        [
            "data",
            "check",
            str(shared_data / "busi_256"),
            "--json",
            str(tmp_path / "r.json"),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1  # a label conflict is an error
    assert "benign (433).png" in out and "malignant (145).png" in out
    assert json.loads((tmp_path / "r.json").read_text())


# --- regressions of the CLI habits -----------------------------------------------------------


@pytest.mark.slow
def test_eval_without_data_uses_the_runs_own_test_split(shpeft_run, tmp_path):
    out, _ = shpeft_run
    assert main(["-q", "eval", "--run", str(out), "--out", str(tmp_path / "own.json")]) == 0
    own = json.loads((tmp_path / "own.json").read_text())
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert own["confusion_matrix"] == test["confusion_matrix"] and own["n"] == test["n"]


@pytest.mark.slow
def test_predict_skips_an_unreadable_image_and_says_so(shpeft_run, tmp_path, capsys):
    from PIL import Image

    out, _ = shpeft_run
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()).save(imgs / f"{i}.png")
    (imgs / "1b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    csv_out = tmp_path / "p.csv"
    rc = main(["-q", "predict", "--run", str(out), "--images", str(imgs), "-o", str(csv_out)])
    err = capsys.readouterr().err
    assert rc == 1 and "1b_broken.png" in err and "skipped" in err
    rows = list(csv.DictReader(csv_out.read_text().splitlines()))
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in rows) == ["0.png", "1.png", "2.png"]
    rc = main(["-q", "predict", "--run", str(out), "--images", str(imgs), "--strict"])
    assert rc == 2 and "1b_broken.png" in capsys.readouterr().err


def test_flags_of_another_method_are_refused(tmp_path, capsys):
    rc = main(["train", "--method", "lora", "--ratio", "0.001", "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--ratio is an option of --method shpeft, not of --method lora" in err
    # vpt-deep and vpt-shallow share their flags
    rc = main(["train", "--method", "vpt-shallow", "--lora-rank", "2", "--data", str(tmp_path)])
    assert rc == 2 and "--lora-rank" in capsys.readouterr().err


@pytest.mark.parametrize("bug", [RuntimeError("shape mismatch"), KeyError("blocks.0.attn")])
def test_a_bug_keeps_its_traceback(bug, monkeypatch):
    """Only errors raised on purpose for bad input are one-line; a RuntimeError from torch or a
    KeyError is a bug and must propagate with its traceback."""
    import shpeft.cli as cli

    def broken(args):
        raise bug

    monkeypatch.setitem(cli.COMMANDS, "methods", broken)
    with pytest.raises(type(bug)):
        main(["methods"])


def test_progress_is_log_lines_when_not_a_terminal(caplog, monkeypatch):
    import logging

    from shpeft import progress

    monkeypatch.setattr(progress, "is_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="shpeft"):
        for _ in progress.progress_bar(range(1000), desc="work", every_s=3600):
            pass
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("work")]
    # one line at the end, not 1000 redraws
    assert len(lines) == 1 and lines[0].startswith("work: 1000/1000 (100%)")
