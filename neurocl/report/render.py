"""A report's HTML and Markdown: sections of text, tables and figures rendered both ways."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class _Section:
    title: str
    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)

    def text(self, text: str) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md.append(text)

    def table(self, table: pd.DataFrame, caption: str | None = None) -> None:
        if caption:
            self.text(caption)
        self.html.append(_html_table(table))
        self.md.append(_md_table(table))


_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; max-width: 1100px; margin: 1.5em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .82em; max-width: 100%; table-layout: auto; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; overflow-wrap: anywhere; word-break: break-word; }
th { background: #f4f4f4; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; } figcaption { font-size: .85em; color: #555; }
nav a { margin-right: 1em; }
"""


def _render_html(title: str, sections: list[_Section]) -> str:
    anchors = [_slug(section.title) for section in sections]
    nav = " ".join(f'<a href="#{a}">{html.escape(s.title)}</a>' for a, s in zip(anchors, sections))
    body = "\n".join(
        f'<section id="{anchor}"><h2>{html.escape(section.title)}</h2>\n' + "\n".join(section.html) + "</section>"
        for anchor, section in zip(anchors, sections)
    )
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1><nav>{nav}</nav>\n{body}\n</body></html>\n")


def _render_md(title: str, sections: list[_Section]) -> str:
    parts = [f"# {title}", ""]
    for section in sections:
        parts += [f"## {section.title}", ""]
        for block in section.md:
            parts += [block, ""]
    return "\n".join(parts)


def _html_table(table: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in table.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _md_table(table: pd.DataFrame) -> str:
    def clean(value) -> str:
        return _fmt(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(clean(c) for c in table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(clean(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return _decimals(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


def _decimals(value: float, digits: int = 3) -> str:
    """A float to ``digits`` decimals, as the probe tables give scores, without trailing zeros ("0.5", "12", "0")."""
    if not np.isfinite(value):
        return "n/a"
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _rounded(table: pd.DataFrame) -> pd.DataFrame:
    return table.apply(lambda column: column.map(_fmt))


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in str(text).lower()).strip("-") or "section"
