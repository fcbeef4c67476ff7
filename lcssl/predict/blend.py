"""The blender (pure numpy): windows' weighted logits in, finished map rows out.

One blender per column block. Windows arrive row by row (top to bottom); each `add` first hands
back the rows above the new window, which no later window reaches, then accumulates the window's
Hann-weighted logits. The accumulator is one window high, so memory is bounded by the block width.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from lcssl.predict.windows import Block, Window


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


@dataclasses.dataclass
class Rows:
    """Finished map rows [y0, y0 + h) x [x0, x0 + w) (mosaic px).

    logits [h, w, K] float32: the weighted mean of the windows' logits (0 where none covers);
    covered [h, w]: some window with a prediction covers the pixel; aerial_only [h, w]: some window
    predicted without Sentinel-2 contributes; valid [h, w]: covered and not aerial nodata (the
    caller narrows it with the mosaic's mask). Sinks write `valid` pixels, nodata elsewhere.
    """
    x0: int
    y0: int
    logits: np.ndarray
    covered: np.ndarray
    aerial_only: np.ndarray
    valid: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.covered.shape

    @functools.cached_property
    def classes(self) -> np.ndarray:
        return self.logits.argmax(-1)

    @functools.cached_property
    def probabilities(self) -> np.ndarray:
        return softmax(self.logits)


class Blender:
    """Blends the windows of one column block: `add(window, weighted_logits, aerial_only)` and
    `close(height)` return the rows that are final (a list of Rows, at most `win` rows each)."""

    def __init__(self, block: Block, win: int, num_classes: int, weight: np.ndarray):
        self.x0, self.x1, self.win, self.weight = block.x0, block.x1, win, weight
        self.buf_x0 = block.buffer_x0
        width = block.buffer_width(win)
        self.y0 = 0                     # mosaic row of the accumulator's first row
        self.acc = np.zeros((win, width, num_classes), np.float32)   # sum of weight x logits
        self.wsum = np.zeros((win, width), np.float32)                # sum of weights
        self.aerial_wsum = np.zeros((win, width), np.float32)         # ... of aerial-only windows

    def add(self, window: Window, weighted_logits: np.ndarray, aerial_only: bool = False
            ) -> list[Rows]:
        """weighted_logits [win, win, K]: the window's logits times `weight` (done on device)."""
        if window.y < self.y0:
            raise ValueError(f"window at row {window.y} arrives after row {self.y0} was finished; "
                             "windows must come row by row")
        done = self.finish(window.y)
        r, c = window.y - self.y0, window.x - self.buf_x0
        self.acc[r:r + self.win, c:c + self.win] += weighted_logits
        self.wsum[r:r + self.win, c:c + self.win] += self.weight
        if aerial_only:
            self.aerial_wsum[r:r + self.win, c:c + self.win] += self.weight
        return done

    def close(self, height: int) -> list[Rows]:
        """The block's remaining rows, down to the mosaic's `height`."""
        return self.finish(height)

    def finish(self, y_end: int) -> list[Rows]:
        """Rows [y0, y_end), at most `win` at a time (skipped windows can leave longer gaps)."""
        out = []
        while self.y0 < y_end:
            out.append(self._pop(min(y_end - self.y0, self.win)))
        return out

    def _pop(self, rows: int) -> Rows:
        cols = slice(self.x0 - self.buf_x0, self.x1 - self.buf_x0)
        weights = self.wsum[:rows, cols]
        covered = weights > 0
        logits = self.acc[:rows, cols] / np.where(covered, weights, 1.0)[..., None]
        out = Rows(self.x0, self.y0, logits, covered, self.aerial_wsum[:rows, cols] > 0,
                   covered.copy())
        for name in ("acc", "wsum", "aerial_wsum"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a[rows:], np.zeros_like(a[:rows])]))
        self.y0 += rows
        return out
