"""Tables that fit the terminal without ever cutting a number.

Rich shrinks and folds columns to fit a width, and where even that is not enough it
squeezes the last columns away. A table built here is measured first: headings are
abbreviated, then low-priority columns are dropped, until its narrowest rendering fits.
Number columns are never narrower than their widest value; only text (names, errors)
is folded or shortened with an ellipsis.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["Column", "fit_table"]


@dataclass(frozen=True)
class Column:
    """One column of a fitted table.

    ``number``: right-aligned and never wrapped, shortened or cut. ``drop``: 0 keeps
    the column always; when the table does not fit, the column with the highest
    ``drop`` goes first. ``short``: the heading used when space is short. Text columns
    ``wrap`` onto more lines, or else are shortened with an ellipsis, never below
    ``min_width`` characters.
    """

    name: str
    number: bool = False
    drop: int = 0
    short: str | None = None
    wrap: bool = True
    min_width: int = 6


def _cell_len(cell: Any) -> int:
    return cell.cell_len if isinstance(cell, Text) else len(str(cell))


def _build(
    columns: Sequence[Column],
    rows: Sequence[Sequence[Any]],
    keep: list[int],
    short: bool,
    cap: int | None,
    table_options: dict[str, Any],
) -> Table:
    table = Table(**table_options)
    for i in keep:
        col = columns[i]
        heading = (col.short or col.name) if short else col.name
        if col.number:
            widest = max([len(heading)] + [_cell_len(r[i]) for r in rows])
            table.add_column(heading, justify="right", no_wrap=True, min_width=widest)
        elif col.wrap:
            words = max(len(w) for w in heading.split()) if heading.strip() else 1
            longest = max([1] + [_cell_len(r[i]) for r in rows])
            table.add_column(
                heading, overflow="fold", min_width=max(words, min(col.min_width, longest))
            )
        else:  # one line, shortened with an ellipsis beyond ``cap`` characters
            longest = max([len(heading)] + [_cell_len(r[i]) for r in rows])
            table.add_column(
                heading,
                no_wrap=True,
                overflow="ellipsis",
                max_width=None if cap is None else max(col.min_width, min(cap, longest)),
            )
    for r in rows:
        table.add_row(*(r[i] if isinstance(r[i], Text) else Text(str(r[i])) for i in keep))
    return table


NAME_CAP = 24  # one-line text is cut to this before any column is dropped


def fit_table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[Any]],
    width: int,
    **table_options: Any,
) -> Table:
    """A rich ``Table`` of ``rows`` whose narrowest rendering fits in ``width`` cells
    (unless its always-kept columns alone are wider). ``table_options`` go to
    ``Table`` (title, box, caption ...).

    In turn, until it fits: shorter headings, one-line text (names) cut at 24
    characters, columns dropped by their ``drop`` order, then that text cut to its
    ``min_width``.
    """
    console = Console(file=io.StringIO(), width=max(width, 1))
    keep = list(range(len(columns)))
    droppable = sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: -columns[i].drop)
    steps: list[tuple[bool, int | None]] = [(False, None), (True, None), (True, NAME_CAP)]
    short, cap = steps[0]
    while True:
        table = _build(columns, rows, keep, short, cap, table_options)
        # Not Measurement.get: it clamps the minimum to the width it is given.
        if table.__rich_measure__(console, console.options).minimum <= width:
            return table
        if len(steps) > 1:
            steps.pop(0)
            short, cap = steps[0]
        elif droppable:
            keep.remove(droppable.pop(0))
        elif cap != 0:
            cap = 0  # every one-line text down to its min_width
        else:
            return table
