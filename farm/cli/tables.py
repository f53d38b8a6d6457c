"""The CLI's tables: compact, in the style of `docker ps`, and never cutting what a user
copies. Imported only by the commands that print one (rich's Table is not free)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text


class FoldTable(Table):
    """Cells fold onto more lines rather than being cut with '…'. The `whole` columns (ids
    and names to copy) stay on one line as far as the width allows, the first named first;
    past that they fold too, whole characters, never cut."""

    def __init__(self, *headers: str, title: str | None = None, whole: Iterable[str] = ()):
        super().__init__(
            title=title,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            collapse_padding=True,
        )
        for header in headers:
            self.add_column(header, overflow="fold", min_width=max(map(len, header.split())))
        self.whole = [name for name in whole if name in headers]

    def __rich_console__(self, console: Any, options: Any) -> Any:
        for name in self.whole:
            column = next(c for c in self.columns if c.header == name)
            before = column.min_width or 0
            widest = max((Text.from_markup(str(cell)).cell_len for cell in column.cells), default=0)
            column.min_width = max(before, widest)
            if self.__rich_measure__(console, options).minimum > options.max_width:
                column.min_width = before
        yield from super().__rich_console__(console, options)
