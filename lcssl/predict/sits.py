"""Sentinel-2 input of a mosaic prediction: the dates of a folder or of one multi-date file, each
window's crop read through its footprint, and the training preprocessing of that crop.

Georeferencing, never pixel guesses: every window's crop is the `sits.size` x `sits.size` block of
a `sits.gsd_m` lattice in the aerial CRS whose centre is the lattice corner nearest the window
centre, i.e. what `data_prep` cuts around each training patch (`lcssl.data.sits.crop_centered`
around the patch centroid). A series in another CRS or at another resolution is warped onto that
lattice (rasterio WarpedVRT, bilinear; logged).
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
from typing import Sequence

from absl import logging
import numpy as np

from lcssl.errors import UserError
from lcssl.predict.inputs import band_indexes, open_raster

_DATE = re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)")


def sits_options(spec: dict):
    """(SitsOptions, cloud_prob_threshold) the training data was built with (the checkpoint's
    `sits_preprocessing`)."""
    from lcssl.data.sits import SitsOptions

    sits = spec["sits"]
    pre = dict(spec.get("sits_preprocessing") or {})
    if not pre:
        logging.warning("The checkpoint does not record its Sentinel-2 preprocessing (written before "
                        "input specs had 'sits_preprocessing'); using the data_prep defaults with its "
                        "max_dates=%s and date_encoding=%s.", sits["max_dates"], sits["date_encoding"])
    fields = {f.name for f in dataclasses.fields(SitsOptions)}
    kwargs = {k: v for k, v in pre.items() if k in fields}
    kwargs.update(max_dates=int(sits["max_dates"]), date_encoding=str(sits["date_encoding"]))
    return SitsOptions(**kwargs), pre.get("cloud_prob_threshold")


# --- The dates: one GeoTIFF per date, or one multi-band GeoTIFF with 'YYYYMMDD_<band>' names ------

@dataclasses.dataclass
class SitsDate:
    date: datetime.date
    path: str
    band_indexes: list[int]         # 1-based, in the checkpoint's band order
    mask_path: str | None = None    # 2 bands: cloud and snow probability 0..100 (as FLAIR #2 masks)


def _parse_date(text: str) -> datetime.date | None:
    for match in _DATE.finditer(text):
        try:
            return datetime.date(*(int(g) for g in match.groups()))
        except ValueError:
            continue
    return None


def find_sits(path: str, bands: Sequence[str], chosen: str | None = None) -> list[SitsDate]:
    """The dates of a Sentinel-2 input, sorted.

    A folder: every *.tif / *.vrt with YYYYMMDD in its name is one date (bands in the checkpoint's
    order, checked against band descriptions when the file has them); a file whose name also
    contains 'mask' holds that date's cloud and snow probabilities (0..100, two bands). Dates
    without a mask file are taken as clear (logged), the others are cloud-filtered.
    A file: its band descriptions name date and band, e.g. '20210415_B04'.
    """
    if os.path.isdir(path):
        return _find_in_folder(path, bands, chosen)
    if not os.path.exists(path):
        raise UserError(f"--sits={path}: no such file or folder; expected a folder of one GeoTIFF "
                        "per date or one multi-date GeoTIFF")
    with open_raster(path, "--sits") as src:
        descriptions = list(src.descriptions)
    by_date: dict[datetime.date, dict[str, int]] = {}
    for i, d in enumerate(descriptions, start=1):
        date = _parse_date(d or "")
        band = (d or "").split("_", 1)[-1] if date else None
        if date is None or not band:
            raise UserError(
                f"--sits={path}: band {i} has description {d!r}; a multi-date file needs band "
                "descriptions 'YYYYMMDD_<band>' (e.g. '20210415_B04'), or use a folder of one file "
                "per date")
        by_date.setdefault(date, {})[band] = i
    out = []
    for date, have in sorted(by_date.items()):
        missing = [b for b in bands if b not in have]
        if missing:
            raise UserError(f"--sits={path}: {date} lacks the bands {missing}; the checkpoint "
                            f"expects {list(bands)}, the file has {sorted(have)} for that date")
        out.append(SitsDate(date, path, [have[b] for b in bands]))
    return out


def _find_in_folder(path: str, bands: Sequence[str], chosen: str | None) -> list[SitsDate]:
    dates, masks = {}, {}
    for name in sorted(os.listdir(path)):
        if not name.lower().endswith((".tif", ".tiff", ".vrt")):
            continue
        date = _parse_date(name)
        if date is None:
            continue
        full = os.path.join(path, name)
        target = masks if "mask" in name.lower() else dates
        if date in target:
            raise UserError(f"--sits={path}: two files for {date}: "
                            f"{os.path.basename(target[date])} and {name}")
        target[date] = full
    if not dates:
        raise UserError(f"--sits={path}: no GeoTIFF with a YYYYMMDD date in its name; expected "
                        "one file per date (e.g. S2_20210415.tif) with the bands "
                        f"{list(bands)}")
    orphans = sorted(set(masks) - set(dates))
    if orphans:
        logging.warning("--sits=%s: mask files for dates without data are ignored: %s", path,
                        ", ".join(map(str, orphans)))
    unmasked = [d for d in dates if d not in masks]
    if masks and unmasked:
        logging.warning("--sits=%s: %d of %d dates have no cloud mask (%s); they are taken as clear, "
                        "the others are cloud-filtered as in training.", path, len(unmasked),
                        len(dates), ", ".join(map(str, sorted(unmasked)[:5]))
                        + (" ..." if len(unmasked) > 5 else ""))
    out = []
    for date, full in sorted(dates.items()):
        with open_raster(full, "--sits") as src:
            indexes = band_indexes(full, "--sits-bands", src.descriptions, src.count, bands, chosen)
        out.append(SitsDate(date, full, indexes, masks.get(date)))
    return out


def check_overlap(sits_path: str, dates: list[SitsDate], src) -> None:
    """UserError naming both footprints and CRSs when no Sentinel-2 file overlaps the mosaic."""
    from rasterio import warp

    left, bottom, right, top = src.bounds
    footprints = []
    for path in sorted({d.path for d in dates}):
        with open_raster(path, "--sits") as s2:
            if s2.crs is None:
                raise UserError(f"--sits: {path} has no CRS; Sentinel-2 rasters must be "
                                "georeferenced")
            b = warp.transform_bounds(s2.crs, src.crs, *s2.bounds)
            if b[0] < right and b[2] > left and b[1] < top and b[3] > bottom:
                return
            footprints.append(f"{os.path.basename(path)}: {tuple(round(v, 1) for v in s2.bounds)} "
                              f"in {s2.crs.to_string()}")
    raise UserError(
        f"--sits={sits_path} does not overlap the mosaic: the mosaic covers "
        f"{tuple(round(v, 1) for v in src.bounds)} in {src.crs.to_string()}, the Sentinel-2 "
        f"files cover {'; '.join(footprints[:3])}{' ...' if len(footprints) > 3 else ''}. "
        "Give the series of the mosaic's area.")


# --- Reading through each window's footprint -----------------------------------------------------

@dataclasses.dataclass
class Crop:
    """One window's raw series: sits [T, n, n, C] float32, has_data [T, n, n] bool (pixels with
    data), cloud: per date [2, n, n] uint8 cloud and snow probability, or None for a date without
    a mask file."""
    sits: np.ndarray
    has_data: np.ndarray
    cloud: list[np.ndarray | None]


class SitsReader:
    """Per-window Sentinel-2 crops on the lattice (CRS = the aerial CRS, pixel = sits.gsd_m).

    The lattice is the first date's own grid when it is already in the aerial CRS at the
    checkpoint's gsd (no resampling), else the gsd-multiples grid of the aerial CRS; a date on
    another grid is read through a WarpedVRT onto it.
    """

    def __init__(self, dates: list[SitsDate], aerial_crs, aerial_bounds, gsd_m: float, size: int):
        import rasterio

        self.dates, self.gsd_m, self.size = dates, gsd_m, size
        self._files = {}
        first = self._dataset(dates[0].path)
        if first.crs is None:
            raise UserError(f"--sits: {dates[0].path} has no CRS; Sentinel-2 rasters must be "
                            "georeferenced")
        if self._on_lattice(first, aerial_crs):
            t = first.transform
            self.origin = (t.c, t.f)
        else:
            self.origin = (0.0, 0.0)
        self.lattice = rasterio.Affine(gsd_m, 0, self.origin[0], 0, -gsd_m, self.origin[1])
        self._vrts, self._warped = [], set()
        # per date: [(data reader, col, row offset), (mask reader, ...) or None]
        self.sources = [[None if p is None else self._source(p, aerial_crs, aerial_bounds)
                         for p in (d.path, d.mask_path)] for d in dates]
        if self._warped:
            logging.info("Sentinel-2: warped %d file(s) onto the aerial CRS %s at %g m (bilinear): %s",
                         len(self._warped), aerial_crs.to_string(), gsd_m,
                         ", ".join(sorted(self._warped)[:3]) + (" ..." if len(self._warped) > 3 else ""))

    def _source(self, path, aerial_crs, aerial_bounds):
        """(reader, col, row of its pixel (0, 0) on the lattice): the file itself when it is on
        the lattice, else a WarpedVRT onto the lattice over the mosaic's bounds plus a margin."""
        import rasterio
        from rasterio import warp
        from rasterio.vrt import WarpedVRT

        src = self._dataset(path)
        if src.crs is None:
            raise UserError(f"--sits: {path} has no CRS; Sentinel-2 rasters must be georeferenced")
        if self._on_lattice(src, aerial_crs, self.origin):
            t = src.transform
            return src, round((t.c - self.origin[0]) / self.gsd_m), round((self.origin[1] - t.f)
                                                                           / self.gsd_m)
        left, bottom, right, top = aerial_bounds
        margin = (self.size / 2 + 2) * self.gsd_m
        c0 = math.floor((left - margin - self.origin[0]) / self.gsd_m)
        c1 = math.ceil((right + margin - self.origin[0]) / self.gsd_m)
        r0 = math.floor((self.origin[1] - top - margin) / self.gsd_m)
        r1 = math.ceil((self.origin[1] - bottom + margin) / self.gsd_m)
        transform = self.lattice @ rasterio.Affine.translation(c0, r0)
        vrt = WarpedVRT(src, crs=aerial_crs, transform=transform, width=c1 - c0, height=r1 - r0,
                        resampling=warp.Resampling.bilinear)
        self._vrts.append(vrt)
        self._warped.add(f"{os.path.basename(path)} ({src.crs.to_string()}, "
                         f"{abs(src.transform.a):g} m)")
        return vrt, c0, r0

    def _dataset(self, path):
        if path not in self._files:
            self._files[path] = open_raster(path, "--sits")
        return self._files[path]

    def _on_lattice(self, src, crs, origin=None) -> bool:
        """In `crs`, north-up at gsd_m, and (given an origin) offset from it by whole pixels."""
        t = src.transform
        if not (src.crs == crs and t.b == 0 and t.d == 0
                and math.isclose(t.a, self.gsd_m, rel_tol=1e-6)
                and math.isclose(-t.e, self.gsd_m, rel_tol=1e-6)):
            return False
        if origin is None:
            return True
        offsets = ((t.c - origin[0]) / self.gsd_m, (origin[1] - t.f) / self.gsd_m)
        return all(abs(v - round(v)) < 1e-3 for v in offsets)

    def centre_px(self, x: float, y: float) -> tuple[int, int]:
        """(col, row) of the lattice corner nearest the ground point (x, y)."""
        return (round((x - self.origin[0]) / self.gsd_m), round((self.origin[1] - y) / self.gsd_m))

    @staticmethod
    def _read(entry, indexes, c0, r0, w, h):
        """Bands [len(indexes), h, w] and validity [h, w] of lattice block (c0, r0, w, h); pixels
        outside the raster are invalid."""
        from rasterio.windows import Window

        src, oc, orow = entry
        data = np.zeros((len(indexes), h, w), dtype=np.float32)
        valid = np.zeros((h, w), dtype=bool)
        fc0, fr0 = c0 - oc, r0 - orow
        ic0, ir0 = max(fc0, 0), max(fr0, 0)
        ic1, ir1 = min(fc0 + w, src.width), min(fr0 + h, src.height)
        if ic1 > ic0 and ir1 > ir0:
            win = Window(ic0, ir0, ic1 - ic0, ir1 - ir0)
            rows = slice(ir0 - fr0, ir1 - fr0)
            cols = slice(ic0 - fc0, ic1 - fc0)
            data[:, rows, cols] = src.read(indexes, window=win)
            valid[rows, cols] = src.dataset_mask(window=win) > 0
        return data, valid

    def crops(self, centres: Sequence[tuple[int, int]]) -> list[Crop]:
        """One Crop per centre (lattice col, row), all read with one block per date (and mask)."""
        n = self.size
        cs = np.array([c for c, _ in centres]) - n // 2
        rs = np.array([r for _, r in centres]) - n // 2
        c0, r0 = int(cs.min()), int(rs.min())
        w, h = int(cs.max()) - c0 + n, int(rs.max()) - r0 + n
        sits, has_data, masks = [], [], []
        for d, (data_src, mask_src) in zip(self.dates, self.sources):
            data, valid = self._read(data_src, d.band_indexes, c0, r0, w, h)
            sits.append(data)
            has_data.append(valid)
            masks.append(None if mask_src is None else self._read(mask_src, [1, 2], c0, r0, w, h)[0])
        out = []
        for c, r in zip(cs - c0, rs - r0):
            rows, cols = slice(r, r + n), slice(c, c + n)
            out.append(Crop(
                sits=np.stack([np.moveaxis(s[:, rows, cols], 0, -1) for s in sits]),
                has_data=np.stack([v[rows, cols] for v in has_data]),
                cloud=[None if m is None else m[:, rows, cols].astype(np.uint8) for m in masks]))
        return out

    def close(self):
        for f in self._vrts + list(self._files.values()):
            f.close()


# --- One window's series, as data_prep builds a training example ---------------------------------

def window_series(series: np.ndarray, usable: np.ndarray, masks, dates: Sequence[datetime.date],
                  opts, prob_threshold, has_data: np.ndarray | None = None):
    """One window's crops -> (sits [T', n, n, C] float32, dates [T'] int32, valid [T'] bool) as
    data_prep builds a training example, or None when too few clear dates remain.

    series [T, n, n, C]; usable [T] bool: the dates that count (enough of the crop has data);
    masks: cloud and snow probabilities per date, [T, 2, n, n] for all dates, or a list with None
    for a date without a mask (taken as clear), or None (no masks: no cloud filtering);
    has_data [T, n, n] (optional): pixels with data; a usable date's other pixels are filled with
    its mean over those, per band, and its cloud score counts only those.
    """
    from lcssl.data import sits as sits_lib

    keep = np.flatnonzero(usable)
    series = series[keep]
    if has_data is not None:
        present = has_data[keep][..., None]
        counts = np.maximum(present.sum(axis=(1, 2), keepdims=True), 1)
        means = (series * present).sum(axis=(1, 2), keepdims=True) / counts
        series = np.where(present, series, means)
    cloud = None
    if masks is not None and keep.size:
        cloud = np.zeros(keep.size, np.float32)
        for j, i in enumerate(keep):
            if masks[i] is None:
                continue            # no mask for this date: taken as clear
            m = np.asarray(masks[i])[None]
            if has_data is not None and not has_data[i].all():
                m = m[..., has_data[i]][..., None]   # [1, 2, pixels with data, 1]
            cloud[j] = sits_lib.cloud_probability(m, prob_threshold)[0]
    try:
        sits, dates_enc, valid = sits_lib.preprocess_series(
            np.rint(series).astype(np.uint16), cloud, [dates[i] for i in keep], opts)
    except sits_lib.TooFewDates:
        return None
    return sits.astype(np.float32), dates_enc, valid
