"""HTML building blocks for the reports: escaping, embedded images, tables, the page shell.

Pages are static and self-contained: inline CSS, images as ``data:`` URIs, no JavaScript, so a
report opens from disk in any browser and can be mailed or archived as one file. Every text
that comes from a run (paths, class names, config values) goes through :func:`esc`. Numbers that
tests or tools may want to read back carry ``data-key`` / ``data-value`` attributes with the
exact value next to the rounded text.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

CSS = """
:root { color-scheme: light; --fg: #1b1f24; --muted: #57606a; --line: #d0d7de; --bg2: #f6f8fa;
  --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
  margin: 0 auto; max-width: 1180px; padding: 1.2rem 1.5rem 3rem; }
h1 { font-size: 1.55rem; margin: 0.2rem 0 0.3rem; }
h2 { font-size: 1.2rem; margin: 2rem 0 0.6rem; padding-bottom: 0.25rem;
  border-bottom: 1px solid var(--line); }
h3 { font-size: 1.02rem; margin: 1.2rem 0 0.4rem; }
p, li { max-width: 75ch; }
.muted { color: var(--muted); }
.small { font-size: 0.86rem; }
code { font: 0.88em ui-monospace, SFMono-Regular, Menlo, monospace; background: var(--bg2);
  padding: 0.05em 0.3em; border-radius: 4px; word-break: break-all; }
nav ul { display: flex; flex-wrap: wrap; gap: 0.3rem 1rem; padding: 0; list-style: none; }
.cards { display: flex; flex-wrap: wrap; gap: 0.6rem; margin: 0.8rem 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 0.45rem 0.8rem;
  min-width: 8.5rem; background: var(--bg2); }
.card .v { font-size: 1.3rem; font-weight: 600; display: block; }
.card .k { font-size: 0.8rem; color: var(--muted); }
table { border-collapse: collapse; margin: 0.4rem 0 0.8rem; font-size: 0.9rem; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3rem; }
th, td { border: 1px solid var(--line); padding: 0.25rem 0.55rem; vertical-align: top; }
th { background: var(--bg2); text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.kv td:first-child { color: var(--muted); white-space: nowrap; }
.kv td:last-child { word-break: break-word; }
figure { margin: 0.6rem 0 1rem; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { font-size: 0.86rem; color: var(--muted); max-width: 75ch; }
.row { display: flex; flex-wrap: wrap; gap: 1rem 2rem; align-items: flex-start; }
.examples { display: grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr));
  gap: 0.8rem; }
.examples figure { margin: 0; }
.examples img { image-rendering: auto; width: 100%; }
.ok { color: var(--ok); font-weight: 600; }
.bad { color: var(--bad); font-weight: 600; }
.note { border-left: 4px solid var(--warn); background: #fff8c5; padding: 0.4rem 0.8rem;
  max-width: 90ch; }
.runs a { margin-right: 0.3rem; }
a.missing { color: var(--muted); text-decoration: underline dotted; }
details { margin: 0.5rem 0; }
summary { cursor: pointer; }
"""


def esc(value: Any) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape(str(value), quote=True)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def img(data: bytes, alt: str, *, width: int | None = None, mime: str = "image/png") -> str:
    """An embedded image with alt text (required: every image must say what it shows)."""
    if not alt.strip():
        raise ValueError("an image needs alt text")
    w = f' width="{int(width)}"' if width else ""
    return f'<img src="{data_uri(data, mime)}" alt="{esc(alt)}"{w}>'


def figure(
    data: bytes, alt: str, caption: str = "", *, width: int | None = None, mime: str = "image/png"
) -> str:
    """An embedded image and its caption (``caption`` is HTML: escape run texts in it)."""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    # a sized picture bounds its figure, so that the caption wraps to the picture's width
    style = f' style="max-width: {int(width) + 2}px"' if width else ""
    return f"<figure{style}>{img(data, alt, width=width, mime=mime)}{cap}</figure>"


def pct(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage text (``-`` when missing or not finite)."""
    if x is None or not math.isfinite(float(x)):
        return "-"
    return f"{100.0 * float(x):.{digits}f}%"


def value(key: str, x: Any, text: str) -> str:
    """Rounded ``text`` tagged with the exact value (``data-value``, JSON) under ``key``."""
    exact = json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    return f'<span data-key="{esc(key)}" data-value="{esc(exact)}">{esc(text)}</span>'


def table(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    caption: str = "",
    numeric: Sequence[bool] | None = None,
    css: str = "",
) -> str:
    """A table whose cells are already HTML (escape texts with :func:`esc` first)."""
    numeric = list(numeric or [False] * len(header))
    cls = f' class="{esc(css)}"' if css else ""
    out = [f"<table{cls}>"]
    if caption:
        out.append(f"<caption>{esc(caption)}</caption>")
    out.append(
        "<thead><tr>" + "".join(f'<th scope="col">{h}</th>' for h in header) + "</tr></thead>"
    )
    out.append("<tbody>")
    for row in rows:
        cells = [
            f'<td class="num">{c}</td>' if numeric[i] else f"<td>{c}</td>"
            for i, c in enumerate(row)
        ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def kv_table(items: Iterable[tuple[str, Any]], caption: str = "") -> str:
    """A two-column key / value table of plain values (escaped; dicts and lists as JSON)."""
    rows = [
        [esc(k), esc(v if isinstance(v, str) else json.dumps(v, default=str))] for k, v in items
    ]
    return table(["setting", "value"], rows, caption=caption, css="kv")


def page(title: str, body: str, *, lang: str = "en") -> str:
    """A complete HTML5 document around ``body`` (already HTML)."""
    return (
        f'<!DOCTYPE html>\n<html lang="{esc(lang)}">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n"
        # a data-URI favicon: browsers otherwise request /favicon.ico and log a failed load
        '<link rel="icon" href="data:,">\n'
        f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
