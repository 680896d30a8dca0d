"""Render a report, given as a list of blocks, to Markdown (PNGs linked beside it) and to one self-contained HTML
file (PNGs embedded as base64). One list, two renderers: the two files cannot drift apart.

A block is ``("h1"|"h2"|"h3"|"p", text)``, ``("ul", [items])``, ``("table", header, rows)``, ``("img", path,
alt)`` or ``("code", text)``. Inline syntax in text: ``**bold**`` only.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

Block = tuple


def markdown_table(header: list, rows: list) -> str:
    """The project's one Markdown table writer (the report, test_scores.md, ``study leaderboard --format
    markdown``): a header, a rule and one line per row, ``|`` inside a cell escaped; no trailing newline."""
    cell = lambda x: str(x).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(blocks: list[Block], out_dir: Path) -> str:
    """The report as Markdown; image paths relative to ``out_dir``, where report.md is written."""
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in rest[0]))
        elif kind == "table":
            out.append(markdown_table(*rest))
        elif kind == "img":
            out.append(f"![{rest[1]}]({Path(rest[0]).relative_to(out_dir).as_posix()})")
        elif kind == "code":
            out.append("```yaml\n" + rest[0].rstrip() + "\n```")
        else:
            raise ValueError(f"unknown report block {kind!r}")
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def to_html(blocks: list[Block], title: str) -> str:
    """The report as one HTML page, images embedded, readable offline and in MLflow's artifact viewer."""
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline_html(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(rest[0])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in rest[0]) + "</ul>")
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
            trs = "".join("<tr>" + "".join(f"<td>{_inline_html(str(c))}</td>" for c in r) + "</tr>" for r in rows)
            body.append(f"<table><tr>{head}</tr>{trs}</table>")
        elif kind == "img":
            data = base64.b64encode(Path(rest[0]).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(rest[1])}" src="data:image/png;base64,{data}"></p>')
        elif kind == "code":
            body.append(f"<pre>{html.escape(rest[0])}</pre>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.45}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
             "img{max-width:100%}pre{background:#f4f4f4;padding:1em;overflow:auto}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
