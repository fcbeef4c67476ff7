"""The contract between build and the layouts: the raw patch every layout reader yields, the error a
reader raises for a bad one, the patch reference it lists, and the Layout record (data_prep/layouts.py
holds the registry)."""
from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Callable, Mapping, Optional

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


@dataclasses.dataclass(frozen=True)
class PatchRef:
    """One patch as a layout lists it: what build needs to plan (ids, label or not, a fixed split)
    and what the layout's `read_patch` needs to read it (`files` by role, `info`: the layout's
    values, e.g. FLAIR #2's centroid or the Hameln manifest's). Listing reads no pixels."""

    patch_id: str
    zone: str
    domain: str
    aerial_path: str
    label_path: Optional[str]
    files: Mapping[str, Optional[str]] = dataclasses.field(default_factory=dict)
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fixed_split: Optional[str] = None  # e.g. 'test' for FLAIR #2's released test folders; None: build draws it

    @property
    def has_label(self) -> bool:
        return self.label_path is not None


@dataclasses.dataclass(frozen=True)
class SynthSpec:
    """How `data_prep.synth` writes a layout: the geography of its scenes, its label codes and the
    writer of its files (a class with `zone(...)`, `patch(...)` and `finish(...)`, see synth.py).

    codes: raw label code of each of synth's internal classes (synth.INTERNAL_CLASSES order).
    every_class: default of synth's every_class option for this layout (plots of each class in
    every zone)."""

    year: int
    first_doy: int
    last_doy: int
    num_dates: int                 # acquisitions per zone before missing ones
    missing_zone_dates: bool       # zones miss 0-2 dates
    crs: str
    origin: tuple                  # map coordinates (x, y) of the first zone's top-left corner
    with_elevation: bool           # a 5th aerial band of terrain height
    aerial_bands: tuple
    codes: tuple
    fold: Callable                 # raw codes [...] uint8 -> class ids, 255 = ignore (the reader's folding)
    num_classes: int
    writer: Callable
    every_class: bool = False
    test_folders: bool = False     # the layout has released test folders synth can write

    def plot_classes(self) -> list:
        """For each class 0..num_classes-1, the first internal class whose code folds to it (the
        every_class plots); ValueError names a class no internal class gives."""
        ids = np.asarray(self.fold(np.asarray(self.codes, np.uint8)))
        out = []
        for k in range(self.num_classes):
            hits = np.flatnonzero(ids == k)
            if not len(hits):
                raise ValueError(f"every_class: no synthetic class has a code of class {k}")
            out.append(int(hits[0]))
        return out


@dataclasses.dataclass(frozen=True)
class Layout:
    """A raw dataset layout: everything build, the CLI, configs and synth know of it.

    list_patches(root) -> [PatchRef]; read_patch(ref, *, sits_size, expect_size, cloud_prob_threshold)
    -> RawPatch (raises BadPatch); metadata(root) -> {'classes', 'aerial_bands', 'sits_gsd_m',
    optionally 'official_miou'} (raises SourceError)."""

    name: str
    title: str
    list_patches: Callable
    read_patch: Callable
    metadata: Callable
    synth: SynthSpec
    sits_size: int = 40            # default Sentinel-2 crop px of `build`
    pretrain_split: str = "train"  # the split pre-training configs read ('unlabelled' where it is rich)
