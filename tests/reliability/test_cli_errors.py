"""Every user-facing error path of the CLI: non-zero exit, one readable line, no traceback,
no partial run directory. The table doubles as the documentation of the messages."""

from __future__ import annotations

import shutil

import pytest

from shpeft.cli import main


@pytest.fixture
def env(tmp_path, shared_data, vit_pico_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_class = tmp_path / "one"
    (one_class / "a").mkdir(parents=True)
    shutil.copy(
        next((shared_data / "busi_256" / "benign").glob("*.png")), one_class / "a" / "x.png"
    )
    return {
        "pico": str(vit_pico_dir),
        "mini_weights": str(vit_pico_dir.parent / "vit_mini" / "model.safetensors"),
        "busi": str(shared_data / "busi_256"),
        "empty": str(empty),
        "one": str(one_class),
        "out": str(tmp_path / "run"),
        "tmp": tmp_path,
    }


CASES = [
    # (id, argv template, expected fragment of the message)
    (
        "missing data",
        ["train", "--model", "{pico}", "--data", "{tmp}/nope", "--out", "{out}"],
        "nope",
    ),
    (
        "empty dataset",
        ["train", "--model", "{pico}", "--data", "{empty}", "--out", "{out}"],
        "empty",
    ),
    ("single class", ["train", "--model", "{pico}", "--data", "{one}", "--out", "{out}"], "class"),
    (
        "ratio zero",
        ["train", "--model", "{pico}", "--data", "{busi}", "--out", "{out}", "--ratio", "0"],
        "ratio",
    ),
    (
        "ratio above one",
        ["train", "--model", "{pico}", "--data", "{busi}", "--out", "{out}", "--ratio", "1.5"],
        "ratio",
    ),
    (
        "unknown model",
        ["train", "--model", "vit_bsae_patch16_224", "--data", "{busi}", "--out", "{out}"],
        "vit_base_patch16_224",
    ),
    (
        "weights do not fit",
        [
            "train",
            "--model",
            "{pico}",
            "--weights",
            "{mini_weights}",
            "--data",
            "{busi}",
            "--out",
            "{out}",
        ],
        "do not fit",
    ),
    (
        "missing weights",
        [
            "train",
            "--model",
            "{pico}",
            "--weights",
            "{tmp}/w.safetensors",
            "--data",
            "{busi}",
            "--out",
            "{out}",
        ],
        "w.safetensors",
    ),
    (
        "unknown method",
        ["train", "--model", "{pico}", "--data", "{busi}", "--out", "{out}", "--method", "lorra"],
        "lora",
    ),
    (
        "zero iterations",
        ["train", "--model", "{pico}", "--data", "{busi}", "--out", "{out}", "--iterations", "0"],
        "iterations",
    ),
    (
        "bad split fractions",
        [
            "train",
            "--model",
            "{pico}",
            "--data",
            "{busi}",
            "--out",
            "{out}",
            "--test-fraction",
            "1.2",
        ],
        "fraction",
    ),
    ("missing --data", ["train", "--model", "{pico}", "--out", "{out}"], "--data"),
    ("resume of a non-run", ["train", "--resume", "{tmp}"], "config.json"),
    (
        "eval of a non-run",
        ["eval", "--run", "{tmp}", "--data", "{busi}"],
        "not a shpeft run directory",
    ),
    (
        "predict without images",
        ["predict", "--run", "{tmp}", "--images", "{empty}"],
        "run directory",
    ),
    ("report of a missing path", ["report", "{tmp}/nope"], "not found"),
    ("report of a folder without runs", ["report", "{empty}"], "neither a run directory"),
]


@pytest.mark.parametrize("case_id, argv, fragment", CASES, ids=[c[0] for c in CASES])
def test_error_path(env, capsys, case_id, argv, fragment):
    argv = [a.format(**env) for a in argv]
    rc = main(["--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    lines = [ln for ln in err.splitlines() if not ln.startswith("WARNING")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith(f"shpeft {argv[0]}: error:")
    assert fragment.lower() in lines[0].lower(), lines[0]
    out = env["tmp"] / "run"
    assert not out.exists(), "no partial run directory"


@pytest.mark.parametrize("bad", [["--ratio", "abc"], ["--iterations", "1.5"], ["--strategy", "l3"]])
def test_bad_flag_values_are_usage_errors(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "m", "--data", "d", *bad])
    assert e.value.code == 2
    assert "invalid" in capsys.readouterr().err


def test_debug_shows_the_traceback(env):
    with pytest.raises(ValueError, match="ratio"):
        main(
            [
                "--debug",
                "train",
                "--model",
                env["pico"],
                "--data",
                env["busi"],
                "--out",
                env["out"],
                "--ratio",
                "2",
            ]
        )


def test_existing_run_directory_is_not_overwritten(env, capsys):
    out = env["tmp"] / "used"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc = main(["train", "--model", env["pico"], "--data", env["busi"], "--out", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"


def test_a_method_failing_in_prepare_leaves_no_run_directory(env, capsys):
    # SPT's budget too small for the model: fails after the data and model load, in prepare
    rc = main(
        [
            "train",
            "--model",
            env["pico"],
            "--data",
            env["busi"],
            "--out",
            env["out"],
            "--method",
            "spt-lora",
            "--spt-budget",
            "0.000001",
            "--iterations",
            "2",
            "--importance-batches",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 2, capsys.readouterr().err
    assert not (env["tmp"] / "run").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short, non-mergeable run on BUSI, shared by the tests that need a trained run."""
    from tests.conftest import SHARED_DATA, SHARED_MODELS

    if not (SHARED_MODELS / "vit_pico").exists():
        pytest.skip("../shared is absent (it ships beside the project in CI, not in a clone)")
    out = tmp_path_factory.mktemp("cli_errors") / "run"
    rc = main(
        [
            "-q", "train", "--model", str(SHARED_MODELS / "vit_pico"),
            "--data", str(SHARED_DATA / "busi_256"), "--out", str(out),
            "--method", "vpt-shallow", "--iterations", "2", "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    return out


def test_merge_of_a_non_mergeable_method_is_refused(trained_run, tmp_path, capsys):
    rc = main(["merge", "--run", str(trained_run), "--out", str(tmp_path / "m.safetensors")])
    assert rc == 2 and "cannot be folded" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_corrupted_delta_is_refused_by_eval(trained_run, env, capsys):
    run = env["tmp"] / "run"
    shutil.copytree(trained_run, run)
    delta = run / "delta.safetensors"
    raw = bytearray(delta.read_bytes())
    raw[-1] ^= 0x40
    delta.write_bytes(bytes(raw))
    rc = main(["eval", "--run", str(run), "--data", env["busi"]])
    assert rc == 2 and "checksum" in capsys.readouterr().err
