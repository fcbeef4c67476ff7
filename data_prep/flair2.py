"""Reader for the FLAIR #2 layout as published by IGN (Garioud et al. 2023), see docs/DATA.md.

    <root>/<aerial_dir>/<domain>/<zone>/img/IMG_<id>.tif    5 bands uint8 R,G,B,NIR,elevation, 512x512
    <root>/<labels_dir>/<domain>/<zone>/msk/MSK_<id>.tif    1 band uint8, raw codes 1..19
    <root>/<sen_dir>/<domain>/<zone>/sen/SEN2_sp_<domain>-<zone>_data.npy      [T, 10, H, W] uint16
                                         ..._masks.npy     [T, 2, H, W] uint8 cloud, snow 0..100
                                         ..._products.txt  T Sentinel-2 product names
    <root>/<centroids>   {"IMG_<id>.tif": [row, col]} patch centre in its zone's super-patch

The folders are the released training ones (flair_aerial_train, ...) and, where present, the released
test ones (flair_2_aerial_test, ...): their patches are the official test set (PatchRef.fixed_split 'test').
`list_patches` only lists paths (cheap, so build can parallelise `read_patch`). A patch whose MSK file
is missing (or the whole labels folder) is unlabelled. The raster helpers here are shared with
data_prep/hameln.py.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import warnings
from typing import Optional

import numpy as np
import rasterio
import rasterio.crs
import rasterio.errors

from data_prep.patch import BadPatch, MissingSource, RawPatch, SourceError
from lcssl.data import sits as sits_lib
from lcssl.data.schema import FLAIR2_AERIAL_BANDS, FLAIR2_CLASSES, IGNORE_LABEL, S2_BANDS

AERIAL_DIR = "flair_aerial_train"
LABELS_DIR = "flair_labels_train"
SEN_DIR = "flair_sen_train"
CENTROIDS = "flair-2_centroids_sp_to_patch.json"
# The released test set (IGN's FLAIR #2 download page): the official test split when present.
TEST_AERIAL_DIR = "flair_2_aerial_test"
TEST_LABELS_DIR = "flair_2_labels_test"
TEST_SEN_DIR = "flair_2_sen_test"
# The challenge's score (Garioud et al. 2023; IGN's metric code averages ious[:-1]): mIoU over the
# first 12 classes, 'other' left out. Written to the dataset card; lcssl.metrics reads it from there.
OFFICIAL_MIOU = {"exclude_classes": [FLAIR2_CLASSES[-1]],
                 "protocol": "FLAIR #2 challenge: mIoU over the 12 classes without 'other'"}
AERIAL_SIZE = 512        # FLAIR #2 patches: 512 x 512 px at 0.2 m
AERIAL_GSD_M = 0.2
CRS = "EPSG:2154"        # RGF93 / Lambert-93, the CRS of every FLAIR #2 raster
# Ground resolution tolerance: pixel scales are stored as float64 (some writers: float32, relative
# 6e-8); 1e-6 leaves a margin and still tells 0.2 m from 0.2002 m.
GSD_RTOL = 1e-6
# Origin tolerance of a label against its aerial patch: a thousandth of a pixel, far above the float64
# rounding of map coordinates (~1e-10 m at 1e6 m) and far below any real misregistration.
ORIGIN_TOL_PX = 1e-3
SITS_SIZE = 40           # FLAIR #2 baseline crop of the super-patch (40 x 40 px at 10 m)
MAX_RAW_CODE = 19        # FLAIR #2 nomenclature: codes 1..19; 14..19 are rare and fold into 'other'

# Raw code -> class id: 0 -> ignore; 1..13 -> 0..12; 14..19 -> 12 ('other', last).
_FOLD = np.full(256, IGNORE_LABEL, np.uint8)
_FOLD[1:MAX_RAW_CODE + 1] = np.minimum(np.arange(1, MAX_RAW_CODE + 1), len(FLAIR2_CLASSES)) - 1


def fold_labels(codes: np.ndarray) -> np.ndarray:
    """Raw FLAIR #2 codes [H, W] uint8 (0..19) -> class ids 0..12, 255 where the code is 0."""
    return _FOLD[codes]


@dataclasses.dataclass(frozen=True)
class PatchRef:
    """Paths of one FLAIR #2 patch; `centroid` is (row, col) in the zone super-patch, or None."""

    patch_id: str
    zone: str
    domain: str
    aerial_path: str
    label_path: Optional[str]
    sen_data_path: str
    sen_masks_path: str
    sen_products_path: str
    centroids_path: str
    centroid: Optional[tuple]
    centroid_error: Optional[str] = None
    fixed_split: Optional[str] = None  # 'test' for the released test folders; None: build draws it

    @property
    def has_label(self) -> bool:
        return self.label_path is not None


# ----------------------------------------------------------------------------- rasters (shared)

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


def read_raster(path, *, bands: int, size: int, dtype, need_georef: bool, expect_crs: Optional[str] = None,
                expect_gsd_m: Optional[float] = None, crs_source: str = ""):
    """GeoTIFF -> ([H, W, bands] array, crs string or '', affine 6-tuple), validated.

    Raises BadPatch: unreadable, band_count, size, dtype, no_crs (when need_georef), wrong_crs
    (expect_crs), resolution (expect_gsd_m), nonfinite.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                if ds.count != bands:
                    raise BadPatch(path, "band_count", f"expected {bands} bands, found {ds.count}")
                if (ds.height, ds.width) != (size, size):
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


# ----------------------------------------------------------------------------- zone super-patches

def _stat_key(path):
    try:
        st = os.stat(path)
        return (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return (str(path), None, None)


@functools.lru_cache(maxsize=8)
def _load_zone_cached(data_key, masks_key, products_key):
    data_path, masks_path, products_path = data_key[0], masks_key[0], products_key[0]
    data = load_npy(data_path, what="super-patch data")
    check_superpatch(data_path, data)
    masks = load_npy(masks_path, what="super-patch cloud/snow masks")
    num_dates, _, height, width = data.shape
    if masks.shape != (num_dates, 2, height, width) or masks.dtype != np.uint8:
        raise BadPatch(masks_path, "size", f"expected uint8 masks of shape {(num_dates, 2, height, width)} "
                                           f"matching the data, found {masks.dtype} {masks.shape}")
    if not os.path.exists(products_path):
        raise BadPatch(products_path, "no_sits", "products file missing")
    try:
        with open(products_path, encoding="utf-8") as f:
            products = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise BadPatch(products_path, "bad_dates", f"expected UTF-8 text, one product name a line ({e})") from None
    if len(products) != num_dates:
        raise BadPatch(products_path, "bad_dates",
                       f"expected {num_dates} product names (one per date of {data_path}), found {len(products)}")
    try:
        dates = [sits_lib.parse_product_date(p) for p in products]
    except ValueError as e:
        raise BadPatch(products_path, "bad_dates", str(e)) from None
    return data, masks, dates


def _load_zone(ref: PatchRef):
    """Memory-mapped super-patch, masks and dates of the patch's zone, cached per zone."""
    return _load_zone_cached(_stat_key(ref.sen_data_path), _stat_key(ref.sen_masks_path),
                             _stat_key(ref.sen_products_path))


# ----------------------------------------------------------------------------- listing and reading

def list_patches(root, *, aerial_dir: str = AERIAL_DIR, labels_dir: str = LABELS_DIR,
                 sen_dir: str = SEN_DIR, centroids: str = CENTROIDS, test_aerial_dir: str = TEST_AERIAL_DIR,
                 test_labels_dir: str = TEST_LABELS_DIR, test_sen_dir: str = TEST_SEN_DIR) -> list[PatchRef]:
    """All IMG_*.tif under <root>/<aerial_dir>/<domain>/<zone>/img, sorted by domain, zone, id, then
    those of <root>/<test_aerial_dir> (split 'test') when that folder exists; at least one must."""
    root = pathlib.Path(root)
    folders = [(aerial_dir, labels_dir, sen_dir, None), (test_aerial_dir, test_labels_dir, test_sen_dir, "test")]
    folders = [f for f in folders if (root / f[0]).is_dir()]
    if not folders:
        raise MissingSource(f"FLAIR #2 root {root}: expected the aerial folder {root / aerial_dir} "
                            f"(or the released test folder {root / test_aerial_dir}), found neither")
    centroids_path = root / centroids
    table = {}
    if centroids_path.exists():
        try:
            table = json.loads(centroids_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SourceError(f"{centroids_path}: the centroid table is not valid UTF-8 JSON ({e}); expected "
                              "{\"IMG_<id>.tif\": [row, col], ...}") from None
        if not isinstance(table, dict):
            raise SourceError(f"{centroids_path}: expected an object {{'IMG_<id>.tif': [row, col]}}, "
                              f"found {type(table).__name__}")
    refs = []
    for aerial_folder, labels_folder, sen_folder, split in folders:
        for aerial_path in sorted((root / aerial_folder).glob("*/*/img/IMG_*.tif")):
            zone_dir = aerial_path.parent.parent
            zone, domain = zone_dir.name, zone_dir.parent.name
            number = aerial_path.stem[len("IMG_"):]
            label_path = root / labels_folder / domain / zone / "msk" / f"MSK_{number}.tif"
            sen = root / sen_folder / domain / zone / "sen" / f"SEN2_sp_{domain}-{zone}"
            centroid, centroid_error = _centroid(table.get(aerial_path.name))
            refs.append(PatchRef(
                patch_id=aerial_path.stem, zone=zone, domain=domain, aerial_path=str(aerial_path),
                label_path=str(label_path) if label_path.exists() else None,
                sen_data_path=f"{sen}_data.npy", sen_masks_path=f"{sen}_masks.npy",
                sen_products_path=f"{sen}_products.txt", centroids_path=str(centroids_path),
                centroid=centroid, centroid_error=centroid_error, fixed_split=split))
    return refs


def _centroid(value) -> tuple:
    """((row, col) or None, why the table's entry is malformed or None)."""
    if value is None:
        return None, None
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return tuple(value), None
    return None, f"expected [row, col] integers, found {json.dumps(value)[:80]}"


def read_patch(ref: PatchRef, *, sits_size: int = SITS_SIZE, expect_size: Optional[int] = None,
               cloud_prob_threshold: Optional[float] = None) -> RawPatch:
    """Read and validate one patch; raises BadPatch naming the offending file.

    expect_size: aerial height = width (default 512, the FLAIR #2 spec; the synthetic set uses 64).
    cloud_prob_threshold: see lcssl.data.sits.cloud_probability (None: mean cloud/snow probability).
    """
    size = AERIAL_SIZE if expect_size is None else expect_size
    # FLAIR #2 patches cover 102.4 m (512 px at 0.2 m); smaller synthetic patches keep that footprint.
    aerial, crs, transform = read_raster(ref.aerial_path, bands=len(FLAIR2_AERIAL_BANDS), size=size,
                                         dtype=np.uint8, need_georef=True, expect_crs=CRS,
                                         expect_gsd_m=AERIAL_GSD_M * AERIAL_SIZE / size)
    label = None
    if ref.label_path is not None:
        codes, label_crs, label_transform = read_raster(ref.label_path, bands=1, size=size, dtype=np.uint8,
                                                        need_georef=False)
        codes = codes[..., 0]
        if codes.max() > MAX_RAW_CODE:
            bad = np.unique(codes[codes > MAX_RAW_CODE])
            raise BadPatch(ref.label_path, "label_range",
                           f"expected codes 0..{MAX_RAW_CODE}, found {bad[:10].tolist()}")
        check_same_grid(ref.label_path, label_crs, label_transform, ref.aerial_path, crs, transform)
        label = fold_labels(codes)

    data, masks, dates = _load_zone(ref)
    if ref.centroid_error is not None:
        raise BadPatch(ref.centroids_path, "no_centroid",
                       f"entry for {os.path.basename(ref.aerial_path)}: {ref.centroid_error}")
    if ref.centroid is None:
        raise BadPatch(ref.centroids_path, "no_centroid", f"no entry for {os.path.basename(ref.aerial_path)}")
    try:
        sits = sits_lib.crop_centered(data, ref.centroid, sits_size)
        mask_crop = sits_lib.crop_centered(masks, ref.centroid, sits_size)
    except ValueError as e:
        raise BadPatch(ref.centroids_path, "no_centroid",
                       f"{os.path.basename(ref.aerial_path)} in {ref.sen_data_path}: {e}") from None
    try:
        cloud = sits_lib.cloud_probability(np.moveaxis(mask_crop, -1, 1), cloud_prob_threshold)
    except ValueError as e:
        raise BadPatch(ref.sen_masks_path, "unreadable", str(e)) from None
    return RawPatch(
        patch_id=ref.patch_id, zone=ref.zone, domain=ref.domain, aerial=aerial, aerial_crs=crs,
        aerial_transform=transform, label=label, sits=sits, sits_cloud=cloud, sits_dates=list(dates),
        source={"aerial": ref.aerial_path, "label": ref.label_path, "sits": ref.sen_data_path,
                "masks": ref.sen_masks_path, "products": ref.sen_products_path,
                "centroids": ref.centroids_path})
