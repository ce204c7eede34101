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
