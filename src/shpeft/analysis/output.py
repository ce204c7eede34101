"""Writing an analysis's outputs: JSON, Markdown, optional CSV and a PNG, side by side in one folder."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from shpeft.io_utils import write_csv, write_json, write_text


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out and save a matplotlib figure (parent folders created)."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def write_outputs(
    report: dict[str, Any],
    dest: str | Path,
    stem: str,
    markdown: str,
    plot: Callable[[dict[str, Any], Path], Path],
    csv_rows: tuple[Sequence[str], Iterable[Sequence[Any]]] | None = None,
) -> dict[str, str]:
    """Write ``DEST/STEM.{json,md[,csv],png}`` and return their paths by kind.

    Args:
        csv_rows: ``(header, rows)`` for the CSV; None writes none.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files = {"json": dest / f"{stem}.json", "markdown": dest / f"{stem}.md"}
    write_json(files["json"], report)
    write_text(files["markdown"], markdown)
    if csv_rows is not None:
        files["csv"] = dest / f"{stem}.csv"
        write_csv(files["csv"], *csv_rows)
    files["png"] = plot(report, dest / f"{stem}.png")
    return {k: str(v) for k, v in files.items()}
