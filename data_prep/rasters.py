"""Raster and array helpers every layout reader shares: GeoTIFF reading with validation, grid and
georeference checks, guarded .npy loading, and the GeoTIFF writer of the synthetic datasets.

Each check raises data_prep.patch.BadPatch naming the file and one of patch.REASONS."""
from __future__ import annotations

import math
import os
import pathlib
import warnings
from typing import Optional

import numpy as np
import rasterio
import rasterio.crs
import rasterio.errors

from data_prep.patch import BadPatch
from lcssl.data.schema import S2_BANDS

# Ground resolution tolerance: pixel scales are stored as float64 (some writers: float32, relative
# 6e-8); 1e-6 leaves a margin and still tells 0.2 m from 0.2002 m.
GSD_RTOL = 1e-6
# Origin tolerance of a label against its aerial patch: a thousandth of a pixel, far above the float64
# rounding of map coordinates (~1e-10 m at 1e6 m) and far below any real misregistration.
ORIGIN_TOL_PX = 1e-3


def _error_chain(e: BaseException) -> str:
    """The message of `e` and of its causes: rasterio's 'Read failed. See previous exception' keeps
    GDAL's reason (e.g. a truncated strip) only in the chained exception."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).strip()
        if text and text not in parts:
            parts.append(text)
        e = e.__cause__ or e.__context__
    return ": ".join(parts)


def check_georef(path, crs, transform, *, expect_crs: Optional[str], expect_gsd_m: Optional[float],
                 crs_source: str = "") -> None:
    """The raster's CRS against the dataset's and its pixel size against the expected one (a
    north-up grid); raises BadPatch wrong_crs / resolution. `crs_source` says where the expected CRS
    comes from (e.g. the Hameln manifest)."""
    if expect_crs is not None and crs != rasterio.crs.CRS.from_user_input(expect_crs):
        raise BadPatch(path, "wrong_crs", f"CRS {crs.to_string() if crs else None}, expected {expect_crs}"
                                          f"{crs_source}")
    if expect_gsd_m is not None:
        a, b, _, d, e, _ = tuple(transform)[:6]
        if b or d or not (math.isclose(abs(a), expect_gsd_m, rel_tol=GSD_RTOL)
                          and math.isclose(abs(e), expect_gsd_m, rel_tol=GSD_RTOL)):
            raise BadPatch(path, "resolution", f"pixel size {abs(a)} x {abs(e)} (rotation terms {b}, {d}), "
                                               f"expected a north-up grid of {expect_gsd_m} m pixels")


def check_same_grid(label_path, label_crs: str, label_transform: tuple, aerial_path, aerial_crs: str,
                    aerial_transform: tuple) -> None:
    """A georeferenced label must lie on its aerial patch's grid (same CRS, pixel size and origin; the
    shapes were checked when read); raises BadPatch 'grid'. A label without georeferencing is taken
    to be on the aerial grid."""
    if not label_crs and rasterio.Affine(*label_transform).is_identity:
        return
    same_crs = bool(label_crs) and (rasterio.crs.CRS.from_user_input(label_crs)
                                    == rasterio.crs.CRS.from_user_input(aerial_crs))
    if not same_crs:
        raise BadPatch(label_path, "grid", f"CRS {label_crs or None}, its aerial patch "
                                           f"{os.path.basename(str(aerial_path))} has {aerial_crs}")
    la, lb, lx, ld, le, ly = label_transform
    aa, ab, ax, ad, ae, ay = aerial_transform
    gsd = max(abs(aa), abs(ae))
    same_pixels = all(math.isclose(u, v, rel_tol=GSD_RTOL, abs_tol=GSD_RTOL * gsd)
                      for u, v in ((la, aa), (lb, ab), (ld, ad), (le, ae)))
    if not same_pixels or abs(lx - ax) > ORIGIN_TOL_PX * gsd or abs(ly - ay) > ORIGIN_TOL_PX * gsd:
        raise BadPatch(label_path, "grid",
                       f"transform {tuple(label_transform)}, its aerial patch {os.path.basename(str(aerial_path))} "
                       f"has {tuple(aerial_transform)} (origin shifted by {lx - ax:+.3f}, {ly - ay:+.3f} m)")


def read_raster(path, *, bands: int, size: Optional[int], dtype, need_georef: bool, expect_crs: Optional[str] = None,
                expect_gsd_m: Optional[float] = None, crs_source: str = ""):
    """GeoTIFF -> ([H, W, bands] array, crs string or '', affine 6-tuple), validated.

    size: height = width in px, or None for any size. Raises BadPatch: unreadable, band_count, size,
    dtype, no_crs (when need_georef), wrong_crs (expect_crs), resolution (expect_gsd_m), nonfinite.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                if ds.count != bands:
                    raise BadPatch(path, "band_count", f"expected {bands} bands, found {ds.count}")
                if size is not None and (ds.height, ds.width) != (size, size):
                    raise BadPatch(path, "size", f"expected {size}x{size} px, found {ds.height}x{ds.width}")
                if any(np.dtype(d) != np.dtype(dtype) for d in ds.dtypes):
                    raise BadPatch(path, "dtype", f"expected {np.dtype(dtype)}, found {', '.join(ds.dtypes)}")
                crs = ds.crs.to_string() if ds.crs is not None else ""
                transform = ds.transform
                if need_georef and (not crs or transform.is_identity):
                    raise BadPatch(path, "no_crs", f"expected a CRS and a geotransform, found crs={crs or None}, "
                                                   f"transform={tuple(transform)[:6]}")
                if need_georef:
                    check_georef(path, ds.crs, transform, expect_crs=expect_crs, expect_gsd_m=expect_gsd_m,
                                 crs_source=crs_source)
                data = ds.read()
    except (rasterio.errors.RasterioError, OSError) as e:
        raise BadPatch(path, "unreadable", f"cannot read GeoTIFF ({_error_chain(e)})") from None
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise BadPatch(path, "nonfinite", "found NaN or inf values")
    return np.ascontiguousarray(np.moveaxis(data, 0, -1)), crs, tuple(transform)[:6]


NPY_MAGIC = b"\x93NUMPY"  # numpy/lib/format.py: every .npy file starts with it


def load_npy(path, *, what: str):
    """Memory-mapped .npy; a missing file is 'no_sits', an unparseable one 'unreadable'.

    A file without the .npy magic string is named as such before numpy reads it: numpy would take
    it for a pickle and advise `allow_pickle=True`, which would run whatever the file holds."""
    if not os.path.exists(path):
        raise BadPatch(path, "no_sits", f"{what} file missing")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
        if magic != NPY_MAGIC:
            raise BadPatch(path, "unreadable", f"{what} is not a .npy array file (it does not start with the "
                                               f"NumPy header {NPY_MAGIC!r}); restore the dataset's original file")
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        detail = str(e) if "pickle" not in str(e) else "its .npy header cannot be parsed"
        raise BadPatch(path, "unreadable", f"cannot read {what} .npy ({detail})") from None


def check_superpatch(path, data: np.ndarray, *, what: str = "super-patch"):
    """[T, 10, H, W] uint16, as FLAIR #2 ships Sentinel-2 L2A reflectances."""
    if data.ndim != 4 or data.shape[1] != len(S2_BANDS):
        raise BadPatch(path, "band_count",
                       f"{what}: expected shape [T, {len(S2_BANDS)}, H, W], found {data.shape}")
    if data.dtype != np.uint16:
        raise BadPatch(path, "dtype", f"{what}: expected uint16, found {data.dtype}")


def write_tif(path, array_hwc: np.ndarray, crs, transform) -> None:
    """[H, W, C] array -> a GeoTIFF at `path` (folders made as needed); the synthetic datasets' writer."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width, count = array_hwc.shape
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=count,
                       dtype=array_hwc.dtype.name, crs=crs, transform=transform) as ds:
        ds.write(np.moveaxis(array_hwc, -1, 0))


def stat_key(path) -> tuple:
    """(path, mtime, size) of a file, (path, None, None) if it cannot be read: a cache key that
    changes when the file does (the per-zone caches of the layouts)."""
    try:
        st = os.stat(path)
        return (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return (str(path), None, None)
