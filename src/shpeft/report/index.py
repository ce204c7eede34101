"""``index.html`` of a benchmark grid: Table 1 with every cell linking to its runs' reports.

Written by ``shpeft bench`` beside its Markdown and CSV tables (:func:`write_index`, called from
:func:`shpeft.analysis.summary.write_summary`). Each Table 1 cell shows the mean ± std over seeds
and one link per finished run (``s0``, ``s1``, ...) to that run's ``report.html``, by a path
relative to the index, so the grid folder can be moved or served as a whole. A run without a
report (a run older than the reports) links to its folder instead, marked; ``shpeft report OUT
--skip-existing`` builds the missing ones. Fig. 4 is embedded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from shpeft.analysis.grid import GridConfig, RunSpec, default_budget
from shpeft.io_utils import atomic_write_bytes
from shpeft.report.html import esc, figure, page, table, value

if TYPE_CHECKING:  # tables imports this module: no import cycle at run time
    from shpeft.analysis.tables import Table

INDEX = "index.html"
REPORT = "report.html"  # shpeft.report.build.REPORT, without importing the report builder


def _href(target: Path, start: Path, folder: bool = False) -> str:
    rel = Path(os.path.relpath(target, start)).as_posix()
    return quote(rel) + ("/" if folder else "")


def _markdown_inline(text: str) -> str:
    """Escaped text with Markdown ``code`` spans as <code> (the protocol notes use them)."""
    parts = re.split(r"`([^`]*)`", text)
    return "".join(f"<code>{esc(p)}</code>" if i % 2 else esc(p) for i, p in enumerate(parts))


def run_links(
    grid: GridConfig, out: Path, dest: Path, specs: Sequence[RunSpec]
) -> dict[tuple[str, str], list[str]]:
    """Per (variant, dataset) Table 1 cell, the links to its finished runs, in seed order."""
    links: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for spec in specs:
        # the same runs as Table 1: each method's default budget (budget sweeps are Fig. 4's)
        if spec.budget != default_budget(grid.variant(spec.variant))[1]:
            continue
        run = spec.run_dir(out)
        if not (run / "result.json").is_file():
            continue
        if (run / REPORT).is_file():
            a = (f'<a href="{esc(_href(run / REPORT, dest))}" '
                 f'title="report of {esc(spec.run_id)}">s{spec.seed}</a>')  # fmt: skip
        else:
            a = (f'<a class="missing" href="{esc(_href(run, dest, folder=True))}" '
                 f'title="no report yet ({esc(spec.run_id)}): shpeft report '
                 f'{esc(run)}">s{spec.seed}</a>')  # fmt: skip
        links.setdefault((spec.variant, spec.dataset), []).append((spec.seed, a))
    return {k: [a for _, a in sorted(v)] for k, v in links.items()}


def table_html(table_: Table, links: dict[tuple[str, str], list[str]], key: str) -> str:
    """Table 1 as HTML: the Markdown table's cells, dataset cells with their runs' links."""
    head = table_.header()
    rows = []
    for row, cells in zip(table_.rows, table_.text_rows(), strict=True):
        html_cells = []
        for col, text in zip(head, cells, strict=True):
            cell = esc(text)
            if col in table_.datasets:
                stat = table_.cell(row, col)
                cell = value(f"{key}.{row}.{col}", stat.mean if stat else None, text)
                runs = links.get((row, col))
                if runs:
                    cell += '<br><span class="runs small">' + " ".join(runs) + "</span>"
            html_cells.append(cell)
        rows.append(html_cells)
    return table([esc(h) for h in head], rows, numeric=[False] + [True] * (len(head) - 1))


def write_index(
    grid: GridConfig,
    out: str | os.PathLike,
    dest: str | os.PathLike,
    settings: Sequence[tuple[str, str, Table, Sequence[RunSpec]]],
    fig4: Path | None = None,
    protocol: str = "",
) -> Path:
    """Write ``DEST/index.html``.

    Args:
        grid: the grid config.
        out: the grid's output folder (``OUT/runs/...`` holds the runs).
        dest: the summary folder, where the index goes.
        settings: per setting (tuned, shared, ...) ``(key, description, Table 1 of macro F1,
            the runs of that table)``.
        fig4: Fig. 4's PNG when the grid has budgets.
        protocol: the protocol notes (Markdown bullets, as in ``summary.md``).
    """
    out, dest = Path(out), Path(dest)
    body = [f"<header><h1>Benchmark grid {esc(grid.name)}</h1>"]
    notes = [line.removeprefix("- ") for line in protocol.splitlines() if line.strip()]
    if notes:
        body.append("<ul>" + "".join(f"<li>{_markdown_inline(n)}</li>" for n in notes) + "</ul>")
    body.append(
        '<p class="muted">Cells: test macro F1 (%), mean ± sample std over seeds; the links under '
        "a cell open each seed's run report. Dotted links: runs without a report yet (build "
        f"them with <code>shpeft report {esc(out)} --skip-existing</code>).</p></header><main>"
    )
    for key, desc, table_, specs in settings:
        body.append(f'<section id="table1-{esc(key)}"><h2>Table 1, test macro F1 (%), '
                    f"{esc(desc)}</h2>")  # fmt: skip
        body.append(table_html(table_, run_links(grid, out, dest, specs), f"table1.{key}"))
        body.append("</section>")
    if fig4 is not None and Path(fig4).is_file():
        body.append('<section id="fig4"><h2>Fig. 4: macro F1 against the trainable share</h2>')
        body.append(
            figure(
                Path(fig4).read_bytes(),
                "Fig. 4: average test macro F1 over datasets against the trainable share of the "
                "backbone (log scale), one line per method and budget sweep.",
                "Average test macro F1 over the datasets against the trainable backbone share "
                f'(<a href="{esc(_href(Path(fig4), dest))}">PNG</a>, '
                '<a href="fig4_budgets.csv">CSV</a>).',
            )
        )
        body.append("</section>")
    files: list[Any] = sorted(p.name for p in dest.glob("*") if p.suffix in (".md", ".csv"))
    body.append(
        '<section id="files"><h2>Files</h2><ul>'
        + "".join(f'<li><a href="{esc(quote(f))}">{esc(f)}</a></li>' for f in files)
        + "</ul></section></main>"
    )
    text = page(f"shpeft bench: {grid.name}", "\n".join(body))
    return atomic_write_bytes(dest / INDEX, text.encode("utf-8"))
