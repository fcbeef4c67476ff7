"""Reader for the FLAIR #2 layout as published by IGN (Garioud et al. 2023), see docs/DATA.md.

    <root>/<aerial_dir>/<domain>/<zone>/img/IMG_<id>.tif    5 bands uint8 R,G,B,NIR,elevation, 512x512
    <root>/<labels_dir>/<domain>/<zone>/msk/MSK_<id>.tif    1 band uint8, raw codes 1..19
    <root>/<sen_dir>/<domain>/<zone>/sen/SEN2_sp_<domain>-<zone>_data.npy      [T, 10, H, W] uint16
                                         ..._masks.npy     [T, 2, H, W] uint8 cloud, snow 0..100
                                         ..._products.txt  T Sentinel-2 product names
    <root>/<centroids>   {"IMG_<id>.tif": [row, col]} patch centre in its zone's super-patch

`list_patches` only lists paths (cheap, so build can parallelise `read_patch`). A patch whose MSK file
is missing (or the whole labels folder) is unlabelled. The raster helpers here are shared with
data_prep/hameln.py.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import warnings
from typing import Optional

import numpy as np
import rasterio
import rasterio.errors

from data_prep.patch import BadPatch, RawPatch
from lcssl.data import sits as sits_lib
from lcssl.data.schema import FLAIR2_AERIAL_BANDS, FLAIR2_CLASSES, IGNORE_LABEL, S2_BANDS

AERIAL_DIR = "flair_aerial_train"
LABELS_DIR = "flair_labels_train"
SEN_DIR = "flair_sen_train"
CENTROIDS = "flair-2_centroids_sp_to_patch.json"
AERIAL_SIZE = 512        # FLAIR #2 patches: 512 x 512 px at 0.2 m
AERIAL_GSD_M = 0.2
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

    @property
    def has_label(self) -> bool:
        return self.label_path is not None


# ----------------------------------------------------------------------------- rasters (shared)

def read_raster(path, *, bands: int, size: int, dtype, need_georef: bool):
    """GeoTIFF -> ([H, W, bands] array, crs string or '', affine 6-tuple), validated.

    Raises BadPatch: unreadable, band_count, size, dtype, no_crs (when need_georef), nonfinite.
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
                data = ds.read()
    except (rasterio.errors.RasterioError, OSError) as e:
        raise BadPatch(path, "unreadable", f"cannot read GeoTIFF ({e})") from None
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise BadPatch(path, "nonfinite", "found NaN or inf values")
    return np.ascontiguousarray(np.moveaxis(data, 0, -1)), crs, tuple(transform)[:6]


def load_npy(path, *, what: str):
    """Memory-mapped .npy; a missing file is 'no_sits', an unparseable one 'unreadable'."""
    if not os.path.exists(path):
        raise BadPatch(path, "no_sits", f"{what} file missing")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise BadPatch(path, "unreadable", f"cannot read {what} .npy ({e})") from None


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
    with open(products_path) as f:
        products = [line.strip() for line in f if line.strip()]
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
                 sen_dir: str = SEN_DIR, centroids: str = CENTROIDS) -> list[PatchRef]:
    """All IMG_*.tif under <root>/<aerial_dir>/<domain>/<zone>/img, sorted by domain, zone, id."""
    root = pathlib.Path(root)
    aerial_root = root / aerial_dir
    if not aerial_root.is_dir():
        raise FileNotFoundError(f"FLAIR #2 root {root}: expected the aerial folder {aerial_root}, found none")
    centroids_path = root / centroids
    table = {}
    if centroids_path.exists():
        with open(centroids_path) as f:
            table = json.load(f)
        if not isinstance(table, dict):
            raise ValueError(f"{centroids_path}: expected an object {{'IMG_<id>.tif': [row, col]}}, "
                             f"found {type(table).__name__}")
    refs = []
    for aerial_path in sorted(aerial_root.glob("*/*/img/IMG_*.tif")):
        zone_dir = aerial_path.parent.parent
        zone, domain = zone_dir.name, zone_dir.parent.name
        number = aerial_path.stem[len("IMG_"):]
        label_path = root / labels_dir / domain / zone / "msk" / f"MSK_{number}.tif"
        sen = root / sen_dir / domain / zone / "sen" / f"SEN2_sp_{domain}-{zone}"
        centroid = table.get(aerial_path.name)
        refs.append(PatchRef(
            patch_id=aerial_path.stem, zone=zone, domain=domain, aerial_path=str(aerial_path),
            label_path=str(label_path) if label_path.exists() else None,
            sen_data_path=f"{sen}_data.npy", sen_masks_path=f"{sen}_masks.npy",
            sen_products_path=f"{sen}_products.txt", centroids_path=str(centroids_path),
            centroid=tuple(int(v) for v in centroid) if centroid is not None else None))
    return refs


def read_patch(ref: PatchRef, *, sits_size: int = SITS_SIZE, expect_size: Optional[int] = None,
               cloud_prob_threshold: Optional[float] = None) -> RawPatch:
    """Read and validate one patch; raises BadPatch naming the offending file.

    expect_size: aerial height = width (default 512, the FLAIR #2 spec; the synthetic set uses 64).
    cloud_prob_threshold: see lcssl.data.sits.cloud_probability (None: mean cloud/snow probability).
    """
    size = AERIAL_SIZE if expect_size is None else expect_size
    aerial, crs, transform = read_raster(ref.aerial_path, bands=len(FLAIR2_AERIAL_BANDS), size=size,
                                         dtype=np.uint8, need_georef=True)
    label = None
    if ref.label_path is not None:
        codes, _, _ = read_raster(ref.label_path, bands=1, size=size, dtype=np.uint8, need_georef=False)
        codes = codes[..., 0]
        if codes.max() > MAX_RAW_CODE:
            bad = np.unique(codes[codes > MAX_RAW_CODE])
            raise BadPatch(ref.label_path, "label_range",
                           f"expected codes 0..{MAX_RAW_CODE}, found {bad[:10].tolist()}")
        label = fold_labels(codes)

    data, masks, dates = _load_zone(ref)
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
