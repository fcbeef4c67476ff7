"""Window planning (pure): where the windows of a mosaic go, how they are weighted, which column
block computes which of them.

A window is `win` mosaic px square (the model's `aerial.size` at its gsd, in mosaic pixels);
windows start every `stride` px, the last one flush with the edge. The mosaic is processed in
column blocks `block_width` px wide, each top to bottom; a window straddling two blocks is computed
for both, so the map does not depend on where blocks are cut.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Window:
    x: int          # mosaic pixel offsets of the window's top-left corner
    y: int


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Window offsets covering [0, length): every `stride`, the last one flush with the end."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, stride))
    return starts + [length - size]


def hann_weight(size: int) -> np.ndarray:
    """[size, size] float32 sin^2 window, > 0 everywhere (pixel centres), 1 at the centre: at 50%
    overlap the weights of neighbouring windows sum to 1 (a partition of unity)."""
    w = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    return np.outer(w, w).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Block:
    """Mosaic columns [x0, x1) and the windows that touch them, row by row (top to bottom)."""
    x0: int
    x1: int
    windows: tuple[Window, ...]

    @property
    def buffer_x0(self) -> int:
        """Mosaic column of the first window's left edge: the block's accumulator starts there."""
        return self.windows[0].x

    def buffer_width(self, win: int) -> int:
        return max(w.x for w in self.windows) + win - self.buffer_x0


@dataclasses.dataclass(frozen=True)
class Plan:
    width: int
    height: int
    win: int        # window side, mosaic px
    stride: int

    @classmethod
    def make(cls, width: int, height: int, win: int, overlap: float) -> "Plan":
        """overlap: the fraction of a window shared with each neighbour, in [0, 1)."""
        return cls(width, height, win, max(1, win - int(round(overlap * win))))

    @property
    def xs(self) -> list[int]:
        return window_starts(self.width, self.win, self.stride)

    @property
    def ys(self) -> list[int]:
        return window_starts(self.height, self.win, self.stride)

    @property
    def num_windows(self) -> int:
        return len(self.xs) * len(self.ys)

    def blocks(self, block_width: int) -> list[Block]:
        """Column blocks of `block_width` px; each lists its windows row by row."""
        xs, ys, out = self.xs, self.ys, []
        for x0 in range(0, self.width, block_width):
            x1 = min(x0 + block_width, self.width)
            band = [x for x in xs if x < x1 and x + self.win > x0]
            out.append(Block(x0, x1, tuple(Window(x, y) for y in ys for x in band)))
        return out
