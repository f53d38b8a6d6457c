"""The CLI's tables: compact, in the style of `docker ps`, and never cutting what a user
copies. Piped or redirected, each row is one line of whole values (`farm usage | grep alice`);
on a terminal, ids and names stay whole while the width allows and free text folds.
Imported only by the commands that print one (rich's Table is not free)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich import box
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

UNBOUNDED = 1_000_000  # columns: wider than any row
# The narrowest a column folds to while the ids and names beside it are kept whole.
FOLD_FLOOR = 4


class FoldTable(Table):
    """Not on a terminal (a pipe, a file), nothing folds: every row is one line of whole
    values, however wide. On a terminal, a table that fits is printed as it is; one that
    does not folds its cells rather than cutting them with '…': the `whole` columns (ids
    and names to copy) stay on one line as far as the width allows, the first named first;
    the other columns keep their values' words whole while they can, and their headers and
    long free text fold first."""

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
            self.add_column(header, overflow="fold")
        self.whole = [name for name in whole if name in headers]

    def __rich_console__(self, console: Any, options: Any) -> Any:
        for column in self.columns:  # a width `_fit` set for another console's
            column.width = None
        natural = self.__rich_measure__(console, options.update(max_width=UNBOUNDED)).maximum
        if not console.is_terminal:
            # Like `docker ps` and `kubectl get` when piped: whole values for grep and cut,
            # however wide the line (farm's consoles do not crop: soft_wrap).
            wide = options.update(width=natural)
            rows = (
                piece
                for part in super().__rich_console__(console, wide)
                for piece in ([part] if isinstance(part, Segment) else console.render(part, wide))
            )
            for line in Segment.split_lines(rows):
                yield from _rstrip(line)
                yield Segment.line()
            return
        if natural > options.max_width:
            self._fit(console, options.max_width)
        yield from super().__rich_console__(console, options)

    def _fit(self, console: Any, max_width: int) -> None:
        """Fix each column's width for a terminal the table is too wide for. Every column
        starts at FOLD_FLOOR characters (fewer where its values are shorter); then, while
        the room allows, the `whole` columns get their widest values (in order: an id
        before a name), the other columns their longest words; the room left goes to the
        columns that need least to show their values and header words whole, shared a
        character at a time. What still lacks room folds (headers and free text first).
        When not even the floors fit, rich shares the width out itself."""
        columns = self.columns
        cells = [[Text.from_markup(str(cell)) for cell in c.cells] for c in columns]
        widest = [max((t.cell_len for t in texts), default=1) for texts in cells]
        longest_word = [
            max((len(word) for t in texts for word in t.plain.split()), default=1)
            for texts in cells
        ]
        header_word = [max(map(len, str(c.header).split()), default=1) for c in columns]
        room = max_width - _padding(self, console)
        width = [max(1, min(FOLD_FLOOR, w)) for w in widest]  # 1: a column of empty cells
        if sum(width) > room:
            return
        whole = [i for name in self.whole for i, c in enumerate(columns) if c.header == name]
        wants = [(i, widest[i]) for i in whole]
        wants += [(i, longest_word[i]) for i in range(len(columns)) if i not in whole]
        for i, want in wants:
            if width[i] < want and sum(width) - width[i] + want <= room:
                width[i] = want
        left = room - sum(width)
        for target in (
            longest_word,
            [max(widest[i], header_word[i]) for i in range(len(columns))],
            [max(widest[i], len(str(c.header))) for i, c in enumerate(columns)],
        ):
            while left and (short := [i for i, w in enumerate(width) if w < target[i]]):
                for i in short[:left]:  # a character each in turn: headers fold alike
                    width[i] += 1
                    left -= 1
        for column, w in zip(columns, width, strict=True):
            column.width = w


def _padding(table: Table, console: Any) -> int:
    """The table's width beyond its cells: the gaps between columns, and any edges."""
    saved = [c.width for c in table.columns]
    for column in table.columns:
        column.width = 1
    try:
        options = console.options.update(max_width=UNBOUNDED)
        return table.__rich_measure__(console, options).maximum - len(table.columns)
    finally:
        for column, w in zip(table.columns, saved, strict=True):
            column.width = w


def _rstrip(line: list[Segment]) -> list[Segment]:
    """A line without the spaces rich pads its last cell with."""
    while line and not line[-1].control and not line[-1].text.strip():
        line = line[:-1]
    if line:
        last = line[-1]
        line = [*line[:-1], Segment(last.text.rstrip(), last.style, last.control)]
    return line
