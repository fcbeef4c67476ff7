"""The raw patch that every layout reader yields, and the error a reader raises for a bad one."""
from __future__ import annotations

import dataclasses
import datetime
from typing import Optional

import numpy as np

from lcssl.errors import MissingSource, SourceError  # noqa: F401 -- raised by the layouts

# Reason keys for skipped patches; build.py counts patches per key in its summary.
REASONS = (
    "unreadable",        # file missing or not a readable raster / array
    "band_count",        # wrong number of bands
    "size",              # wrong height/width
    "dtype",             # wrong data type
    "no_crs",            # GeoTIFF without CRS or transform
    "wrong_crs",         # CRS other than the dataset's (FLAIR #2: EPSG:2154; Hameln: the manifest's crs)
    "resolution",        # pixel size other than the dataset's, or a rotated grid
    "grid",              # label not on the aerial patch's grid (other CRS, origin or pixel size)
    "nonfinite",         # NaN or inf values
    "label_range",       # label codes outside the layout's range
    "no_sits",           # no Sentinel-2 super-patch / series for the patch
    "no_centroid",       # no (or a malformed) entry in the centroid table, or crop outside the super-patch
    "bad_dates",         # product names / dates unparseable or inconsistent with the array
    "too_few_dates",     # fewer clear dates than required after cloud filtering
)


class BadPatch(Exception):
    """A patch that cannot be used. `path` is the offending file, `reason` one of REASONS."""

    def __init__(self, path, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown BadPatch reason {reason!r}; expected one of {REASONS}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason}: {detail}")

    def __reduce__(self):  # pickled across build worker processes
        return BadPatch, (self.path, self.reason, self.detail)


@dataclasses.dataclass
class RawPatch:
    """One aerial patch with its co-located Sentinel-2 series, as read from disk.

    aerial: [H, W, Ca] uint8; label: [H, W] uint8 0-based, 255 = ignore, or None (unlabelled);
    sits: [T, h, w, Cs] uint16 cropped around the patch centre; sits_cloud: [T] cloud/snow
    probability 0..1 over the crop, or None when the layout has no masks.
    """

    patch_id: str
    zone: str
    domain: str
    aerial: np.ndarray
    aerial_crs: str
    aerial_transform: tuple
    label: Optional[np.ndarray]
    sits: np.ndarray
    sits_cloud: Optional[np.ndarray]
    sits_dates: list[datetime.date]
    source: dict = dataclasses.field(default_factory=dict)
