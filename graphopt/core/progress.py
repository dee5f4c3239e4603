"""Progress bars for long work: a tqdm bar on stderr when it is a terminal, nothing otherwise.

One policy for every command (calibration, evaluation, conformance, tuning): a bar shows done/total,
the rate and the estimated time left; it is off when stderr is not a terminal (a log file, a pipe,
CI) or when the user asks for quiet output, so that those outputs hold only the lines a command
prints on purpose.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def shown(enabled: bool = True) -> bool:
    """Whether a bar would be drawn: ``enabled`` and stderr is a terminal."""
    return bool(enabled) and sys.stderr.isatty()


class Bar:
    """A bar of ``total`` steps; ``update(n)`` advances it, ``note(text)`` sets the text after it.
    When not shown every method does nothing. Use it as a context manager (the bar is removed at
    the end, ``leave=False``, so the command's own summary follows without a stale bar above it)."""

    def __init__(self, total: int | None, *, desc: str, unit: str = "it", enabled: bool = True) -> None:
        self._bar = None
        if shown(enabled):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)

    @property
    def active(self) -> bool:
        return self._bar is not None

    def set_total(self, total: int) -> None:
        """Set the number of steps once it is known (a bar may start before the work is counted)."""
        if self._bar is not None and self._bar.total != total:
            self._bar.total = total
            self._bar.refresh()

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text[:60], refresh=True)

    def write(self, line: str) -> None:
        """Print a line above the bar (or plainly, without one) on stdout."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wrap(items: Iterable[T], *, total: int | None, desc: str, unit: str = "it", enabled: bool = True) -> Iterator[T]:
    """``items`` one by one, advancing a bar (see ``Bar``) after each."""
    with Bar(total, desc=desc, unit=unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update()
