"""Progress output: a tqdm bar on a terminal, one plain line per epoch otherwise, or nothing."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


class Progress:
    """`mode`: "auto" (bar on a TTY, lines elsewhere), "bar", "lines" or "quiet"."""

    def __init__(self, mode: str = "auto", stream=None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        if mode not in ("bar", "lines", "quiet"):
            raise ValueError(f"unknown progress mode '{mode}'")
        self.mode = mode
        self._bar: tqdm | None = None

    def batches(self, items: Iterable[T], total: int, description: str) -> Iterator[T]:
        if self.mode != "bar":
            yield from items
            return
        with tqdm(items, total=total, desc=description, file=self.stream, leave=False,
                  dynamic_ncols=True, unit="batch") as self._bar:
            yield from self._bar
        self._bar = None

    def update(self, **values: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def line(self, text: str) -> None:
        if self.mode == "quiet":
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)
