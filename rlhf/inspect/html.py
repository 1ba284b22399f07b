"""Self-contained static HTML pages for `rlhf inspect` runs (no scripts, no external assets), plus their JSON twin.

A page is a title and a list of sections, each an HTML string built by the functions here:

    write_page("out/page.html", "Neurons", [heading("Layer 0"), tokens_html(tokens, acts), table(cols, rows)])

Text is escaped everywhere; a table cell that is already HTML is passed as `Raw(...)`.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; } caption { text-align: left; color: #555; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.tokens { font: 13px/1.9 ui-monospace, monospace; white-space: pre-wrap; margin: .2em 0 .5em; }
.tokens span { border-radius: 2px; } .note { color: #555; } .unit { margin: 1em 0 1.5em; }
"""


class Raw(str):
    """A string that is already HTML: inserted as is by `table`."""


def esc(value: Any) -> str:
    return value if isinstance(value, Raw) else html.escape(str(value))


def heading(text: str, level: int = 2, anchor: str | None = None) -> str:
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<h{level}{ident}>{esc(text)}</h{level}>"


def paragraph(text: str, note: bool = False) -> str:
    return f"<p{' class=note' if note else ''}>{esc(text)}</p>"


def link(href: str, text: str) -> Raw:
    return Raw(f'<a href="{esc(href)}">{esc(text)}</a>')


def shade(value: float, scale: float) -> str:
    """Background colour for a value: orange for positive, blue for negative, opacity by |value| / scale."""
    if not scale or not math.isfinite(value):
        return "transparent"
    alpha = min(abs(value) / scale, 1.0) * 0.85
    return f"rgba(255,140,0,{alpha:.2f})" if value >= 0 else f"rgba(40,120,255,{alpha:.2f})"


def tokens_html(tokens: Sequence[str], values: Sequence[float], scale: float | None = None) -> Raw:
    """One line of text with each token shaded by its value (hover shows the value); scale = max |value| if None."""
    if scale is None:
        scale = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    spans = "".join(
        f'<span style="background:{shade(v, scale)}" title="{v:.3g}">{esc(t)}</span>'
        for t, v in zip(tokens, values, strict=True)
    )
    return Raw(f'<div class="tokens">{spans}</div>')


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.3g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    return f"<td>{esc(value)}</td>"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> Raw:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return Raw(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def unit_card(
    name: str,
    explanation: str | None,
    score: float | None,
    excerpts: Sequence[tuple[list[str], list[float]]],
    scale: float,
) -> Raw:
    """A unit's explanation and score above its excerpts, all shaded on the unit's own scale."""
    said = f": {esc(explanation)}" if explanation else ""
    scored = f" <span class=note>(score {score:.2f})</span>" if score is not None else ""
    shown = "".join(tokens_html(tokens, acts, scale) for tokens, acts in excerpts)
    return Raw(f'<div class="unit" id="{esc(name)}"><h3>{esc(name)}{said}{scored}</h3>{shown}</div>')


def page(title: str, sections: Sequence[str]) -> str:
    body = "\n".join(sections)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n<h1>{esc(title)}</h1>\n{body}\n</body></html>\n"
    )


def write_page(path: str | Path, title: str, sections: Sequence[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(title, sections), encoding="utf-8")
    return path


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    return path
