"""The one table writer: a DataFrame as markdown, csv, LaTeX or HTML text (tables, ablation summaries, study files).

Whatever writes a table to a file or an MLflow artifact goes through `write_table`, so a paper table, an ablation
summary and a tuning study's best trials read the same way. Rich terminal output lives with the commands.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

FORMATS = ("md", "csv", "latex", "html")
SUFFIX = {"md": "md", "csv": "csv", "latex": "tex", "html": "html"}
LEFT = ("Method", "Year", "row", "method", "state")  # text columns; every other column is right-aligned


def _text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no tabulate dependency); '|' in cells is escaped."""
    def cells(values: Sequence[Any]) -> str:
        return "| " + " | ".join(_text(v).replace("|", "\\|") for v in values) + " |"

    align = ["---" if c in LEFT else "---:" for c in frame.columns]
    body = [cells(list(line)) for line in frame.itertuples(index=False)]
    return "\n".join([cells(list(frame.columns)), "| " + " | ".join(align) + " |", *body])


def to_latex(frame: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs tabular; ± and Δ become math."""
    for char in "&%$#_{}":  # pandas escapes the cells, not the caption
        caption = caption.replace(char, "\\" + char)
    text = frame.to_latex(index=False, escape=True, caption=caption, label=f"tab:{label}")
    return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$")


def to_html(frame: pd.DataFrame, title: str, lines: Sequence[str]) -> str:
    body = frame.to_html(index=False, escape=True, border=0, classes="report")
    notes = "".join(f"<p>{line}</p>" for line in lines)
    return f"<h3>{title}</h3>\n{body}\n{notes}\n"


def write_table(frame: pd.DataFrame, fmt: str, title: str = "", lines: Sequence[str] = (), label: str = "") -> str:
    """`frame` as `fmt` text. md, latex and html carry `title` above and `lines` (protocol, notes) below the table;
    csv is the bare frame (one line per row), so that it reads back with pandas."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "md":
        head = f"### {title}\n\n" if title else ""
        return head + to_markdown(frame) + "\n" + "".join(f"\n{line}\n" for line in lines)
    if fmt == "latex":
        return to_latex(frame, title, label or "table") + "".join(f"% {line}\n" for line in lines)
    if fmt == "html":
        return to_html(frame, title, lines)
    raise ValueError(f"unknown format '{fmt}'; known: {', '.join(FORMATS)}")
