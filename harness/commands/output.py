"""What the commands print: a frame as a rich table on the terminal (files and artifacts go through the one table
writer, `harness.studies.writers`), and notes on stderr so stdout carries only the table or the path asked for."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

LEFT = ("Method", "Year", "row", "method", "state")  # text columns; every other column is right-aligned


def note(text: str) -> None:
    """A line for the user on stderr."""
    print(text, file=sys.stderr)


def cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_frame(frame: Any, title: str, caption: str = "", lines: Sequence[str] = ()) -> None:
    """`frame` (a pandas DataFrame) as a rich table. A first cell written `*like this*` is a section header (the
    paper's row groups), shown in italics. `lines` (protocol, notes) follow at the terminal's width."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption or None)
    for column in frame.columns:
        table.add_column(str(column), justify="left" if column in LEFT else "right")
    for line in frame.itertuples(index=False):
        values = [cell(v) if not isinstance(v, str) else v for v in line]
        if values and values[0].startswith("*") and values[0].endswith("*"):
            values[0] = f"[italic]{values[0].strip('*')}[/italic]"
        table.add_row(*values)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs and pipes: never truncate numbers to fit 80 columns
    console.print(table)
    for text in lines:
        console.print(text, markup=False, highlight=False)
