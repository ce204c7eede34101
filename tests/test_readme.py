"""Every `shpeft` command the READMEs show parses with today's CLI (the docs do not drift)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from shpeft.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def shown_commands(path: Path) -> list[str]:
    """`shpeft ...` commands of the file's bash blocks, continuation lines joined, comments off."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|\||>", line.split(" # ")[0]):
                part = part.strip()
                if part.startswith("shpeft "):
                    commands.append(part)
    return commands


COMMANDS = [
    (path.relative_to(ROOT).as_posix(), cmd)
    for path in (ROOT / "README.md", ROOT / "benchmarks" / "README.md")
    for cmd in shown_commands(path)
]


def test_the_readmes_show_commands():
    assert len(COMMANDS) > 20


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_command_parses(doc, command):
    argv = shlex.split(command)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{doc}: `{command}` does not parse (exit {e.code})")


def test_the_readme_results_table_is_what_the_result_files_hold():
    """The README's DINOv2 table is written from the committed result files, never by hand."""
    import importlib.util

    path = ROOT / "benchmarks" / "readme_results.py"
    spec = importlib.util.spec_from_file_location("readme_results", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check"]) == 0, "run: python benchmarks/readme_results.py"
    datasets, rows = mod.rows()
    assert {"busi", "cxr3", "breastmnist"} <= set(datasets) and len(rows) >= 12
