"""Reader for the FLAIR-HUB layout as published by IGN (Garioud et al. 2025, arXiv:2506.07080), see
docs/DATA.md. Paths as in IGN's FLAIR-HUB repository (csv/FLAIR-HUB_TOY.zip, the data loader):

    <root>/data/<DOMAIN>_<SENSOR>_<DATATYPE>/<ROI>/<DOMAIN>_<SENSOR>_<DATATYPE>_<ROI>_<r>-<c>.tif
        D004-2021_AERIAL_RGBI            4 bands uint8 R,G,B,NIR, 512x512 px at 0.2 m, EPSG:2154
        D004-2021_AERIAL_LABEL-COSIA     1 band uint8, class ids 0..18 (the 19 classes of CLASSES)
        D004-2021_SENTINEL2_TS           T x 10 bands uint16 (date-major: t0 B02..B12, t1 ...)
        D004-2021_SENTINEL2_MSK-SC       T x 2 bands uint8 (snow, cloud probability 0..100)
    <root>/GLOBAL_ALL_MTD/GLOBAL_SENTINEL2_MTD_DATES.gpkg   per patch_id its acquisition_dates,
        a JSON object {"0": "YYYYMMDD", ...} in band order (a GeoPackage: an SQLite file, read with sqlite3)

patch_id = <DOMAIN>_<ROI>_<r>-<c>; a patch is one AERIAL_RGBI file, its zone the ROI (of its domain).
A patch without its COSIA label file is unlabelled. The other modalities (DEM_ELEV, SPOT_RGBI,
SENTINEL1-ASC_TS, SENTINEL1-DESC_TS, AERIAL-RLT_PAN, ALL_LABEL-LPIS, any other folder) are not read:
lcssl's model takes aerial + Sentinel-2; `build` names the ones present once, in its output, its
summary and the dataset card (`metadata()['not_read']`).
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import re
import sqlite3
from typing import Optional

import numpy as np
import rasterio
import rasterio.errors
import rasterio.transform

from data_prep.patch import BadPatch, Layout, MissingSource, PatchRef, RawPatch, SourceError, SynthSpec
from data_prep.rasters import check_same_grid, read_raster, stat_key, write_tif
from lcssl.data import sits as sits_lib
from lcssl.data.schema import IGNORE_LABEL, S2_BANDS, S2_GSD_M

# FLAIR-HUB land-cover nomenclature (IGN's configs/train/config_supervision.yaml, AERIAL_LABEL-COSIA).
CLASSES = (
    "building", "greenhouse", "swimming pool", "impervious surface", "pervious surface", "bare soil",
    "water", "snow", "herbaceous vegetation", "agricultural land", "plowed land", "vineyard", "deciduous",
    "coniferous", "brushwood", "clear cut", "ligneous", "mixed", "undefined",
)
AERIAL_BANDS = ("R", "G", "B", "NIR")
# IGN's baselines give classes 15..18 (clear cut, ligneous, mixed, undefined) weight 0 in training and
# score the 15 others (config_supervision.yaml: value_weights default_exceptions).
OFFICIAL_MIOU = {"exclude_classes": list(CLASSES[15:]),
                 "protocol": "FLAIR-HUB land cover: mIoU over the 15 classes with a non-zero weight in IGN's "
                             "baselines (clear cut, ligneous, mixed, undefined left out)"}
DATA_DIR = "data"
MTD_DIR = "GLOBAL_ALL_MTD"
S2_DATES = "GLOBAL_SENTINEL2_MTD_DATES.gpkg"
AERIAL, LABEL, S2, S2_MASKS = "AERIAL_RGBI", "AERIAL_LABEL-COSIA", "SENTINEL2_TS", "SENTINEL2_MSK-SC"
READ = (AERIAL, LABEL, S2, S2_MASKS)  # the modalities read; any other <DOMAIN>_<MODALITY> folder is not
AERIAL_SIZE = 512
AERIAL_GSD_M = 0.2
CRS = "EPSG:2154"
# The series files cover about the aerial patch: 10 x 10 px at 10 m (as third-party FLAIR-HUB loaders
# describe them; synth writes that). `build` crops 8 px by default, the largest centred crop that
# U-TAE's three 2x down-samplings divide; a larger --sits-size than a file holds is a `size` bad patch.
S2_FILE_PX = 10
SITS_SIZE = 8
_FOLDER = re.compile(r"^(?P<domain>D\d{3}-\d{4})_(?P<modality>.+)$")


def fold_labels(codes: np.ndarray) -> np.ndarray:
    """FLAIR-HUB codes are class ids 0..18 already; anything above -> 255 (rejected by read_patch)."""
    codes = np.asarray(codes)
    return np.where(codes < len(CLASSES), codes, IGNORE_LABEL).astype(np.uint8)


def _folders(root: pathlib.Path) -> dict:
    """{(domain, modality): folder} of <root>/data."""
    out = {}
    for folder in sorted((root / DATA_DIR).iterdir()):
        m = _FOLDER.match(folder.name)
        if m and folder.is_dir():
            out[(m["domain"], m["modality"])] = folder
    return out


def list_patches(root) -> list[PatchRef]:
    """All <root>/data/<DOMAIN>_AERIAL_RGBI/<ROI>/*.tif, sorted by domain, ROI and name."""
    root = pathlib.Path(root)
    if not (root / DATA_DIR).is_dir():
        raise MissingSource(f"FLAIR-HUB root {root}: expected the folder {root / DATA_DIR} "
                            f"(with <DOMAIN>_{AERIAL}/ ...), found none")
    folders = _folders(root)
    dates_path = root / MTD_DIR / S2_DATES
    refs = []
    for (domain, modality), folder in sorted(folders.items()):
        if modality != AERIAL:
            continue
        prefix = f"{domain}_{AERIAL}_"
        for aerial_path in sorted(folder.glob(f"*/{prefix}*.tif")):
            roi = aerial_path.parent.name
            tail = aerial_path.stem[len(prefix):]            # <ROI>_<r>-<c>

            def sibling(mod, tail=tail, roi=roi, domain=domain):
                path = root / DATA_DIR / f"{domain}_{mod}" / roi / f"{domain}_{mod}_{tail}.tif"
                return str(path) if path.exists() else None

            refs.append(PatchRef(
                patch_id=f"{domain}_{tail}", zone=roi, domain=domain, aerial_path=str(aerial_path),
                label_path=sibling(LABEL),
                files={"sits": str(folders.get((domain, S2), root / DATA_DIR / f"{domain}_{S2}") / roi
                                   / f"{domain}_{S2}_{tail}.tif"),
                       "masks": sibling(S2_MASKS), "dates": str(dates_path)}))
    return refs


def metadata(root) -> dict:
    """Class names, band names, Sentinel-2 GSD, the official metric, and the modalities present that
    are not read (SENTINEL1-ASC_TS, DEM_ELEV, ...: every <DOMAIN>_<MODALITY> folder but READ's)."""
    root = pathlib.Path(root)
    present = sorted({mod for _, mod in _folders(root)} - set(READ)) if (root / DATA_DIR).is_dir() else []
    return {"classes": list(CLASSES), "aerial_bands": list(AERIAL_BANDS), "sits_gsd_m": float(S2_GSD_M),
            "official_miou": OFFICIAL_MIOU, "not_read": present}


# ----------------------------------------------------------------------------- Sentinel-2 dates

@functools.lru_cache(maxsize=4)
def _dates_table(key: tuple) -> dict:
    """{patch_id: acquisition_dates text} of the GeoPackage's table holding those two columns."""
    path = key[0]
    if key[1] is None:
        raise MissingSource(f"{path}: the Sentinel-2 dates table (FLAIR-HUB's {MTD_DIR}/{S2_DATES}) is missing")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = [r[0] for r in con.execute("SELECT table_name FROM gpkg_contents")]
            for table in tables:
                columns = {r[1] for r in con.execute(f'PRAGMA table_info("{table}")')}
                if {"patch_id", "acquisition_dates"} <= columns:
                    return dict(con.execute(f'SELECT patch_id, acquisition_dates FROM "{table}"').fetchall())
        finally:
            con.close()
    except sqlite3.Error as e:
        raise SourceError(f"{path}: not a readable GeoPackage ({e})") from None
    raise SourceError(f"{path}: no table with columns patch_id and acquisition_dates (tables: {tables})")


def _parse_dates(path, patch_id: str, text) -> list[datetime.date]:
    try:
        value = json.loads(text)
        items = ([value[k] for k in sorted(value, key=int)] if isinstance(value, dict) else list(value))
        return [datetime.datetime.strptime(str(v), "%Y%m%d").date() for v in items]
    except (TypeError, ValueError) as e:
        raise BadPatch(path, "bad_dates", f"{patch_id}: acquisition_dates: expected a JSON object "
                                          f"{{\"0\": \"YYYYMMDD\", ...}}, found {str(text)[:80]!r} ({e})") from None


def write_dates_table(path, dates: dict) -> None:
    """{patch_id: [date, ...]} -> a GeoPackage attributes table as FLAIR-HUB's (synthetic datasets)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    with con:
        con.execute("PRAGMA application_id = 1196444487")  # 'GPKG'
        con.execute("CREATE TABLE gpkg_contents (table_name TEXT PRIMARY KEY, data_type TEXT NOT NULL, "
                    "identifier TEXT, description TEXT DEFAULT '', last_change DATETIME, min_x DOUBLE, "
                    "min_y DOUBLE, max_x DOUBLE, max_y DOUBLE, srs_id INTEGER)")
        con.execute("INSERT INTO gpkg_contents (table_name, data_type, identifier) VALUES "
                    "('sentinel2_dates', 'attributes', 'sentinel2_dates')")
        con.execute("CREATE TABLE sentinel2_dates (fid INTEGER PRIMARY KEY AUTOINCREMENT, patch_id TEXT, "
                    "acquisition_dates TEXT)")
        con.executemany("INSERT INTO sentinel2_dates (patch_id, acquisition_dates) VALUES (?, ?)",
                        [(pid, json.dumps({str(i): f"{d:%Y%m%d}" for i, d in enumerate(ds)}))
                         for pid, ds in sorted(dates.items())])
    con.close()
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- reading

def read_patch(ref: PatchRef, *, sits_size: int = SITS_SIZE, expect_size: Optional[int] = None,
               cloud_prob_threshold: Optional[float] = None) -> RawPatch:
    """Read and validate one patch; raises BadPatch naming the offending file.

    expect_size: aerial height = width (default 512; the synthetic set: its --patch-size). The series
    is cropped to sits_size x sits_size around its centre.
    """
    size = AERIAL_SIZE if expect_size is None else expect_size
    aerial, crs, transform = read_raster(ref.aerial_path, bands=len(AERIAL_BANDS), size=size, dtype=np.uint8,
                                         need_georef=True, expect_crs=CRS,
                                         expect_gsd_m=AERIAL_GSD_M * AERIAL_SIZE / size)
    label = None
    if ref.label_path is not None:
        codes, label_crs, label_transform = read_raster(ref.label_path, bands=1, size=size, dtype=np.uint8,
                                                        need_georef=False)
        codes = codes[..., 0]
        if codes.max() >= len(CLASSES):
            raise BadPatch(ref.label_path, "label_range", f"expected class ids 0..{len(CLASSES) - 1}, found "
                                                          f"{np.unique(codes[codes >= len(CLASSES)])[:10].tolist()}")
        check_same_grid(ref.label_path, label_crs, label_transform, ref.aerial_path, crs, transform)
        label = fold_labels(codes)

    sits_path = ref.files["sits"]
    if not os.path.exists(sits_path):
        raise BadPatch(sits_path, "no_sits", "Sentinel-2 series file missing")
    series, _, _ = read_raster(sits_path, bands=_band_count(sits_path), size=None, dtype=np.uint16,
                               need_georef=False)
    height, width, channels = series.shape
    if channels % len(S2_BANDS):
        raise BadPatch(sits_path, "band_count", f"expected T x {len(S2_BANDS)} bands (date-major), found {channels}")
    num_dates = channels // len(S2_BANDS)
    if height < sits_size or width < sits_size:
        raise BadPatch(sits_path, "size", f"expected at least {sits_size}x{sits_size} px, found {height}x{width}")
    data = np.moveaxis(series.reshape(height, width, num_dates, len(S2_BANDS)), (2, 3), (0, 1))  # [T, C, H, W]
    sits = sits_lib.crop_centered(data, (height // 2, width // 2), sits_size)

    table = _dates_table(stat_key(ref.files["dates"]))
    if ref.patch_id not in table:
        raise BadPatch(ref.files["dates"], "bad_dates", f"no acquisition_dates for patch_id {ref.patch_id}")
    dates = _parse_dates(ref.files["dates"], ref.patch_id, table[ref.patch_id])
    if len(dates) != num_dates:
        raise BadPatch(ref.files["dates"], "bad_dates", f"{ref.patch_id}: {len(dates)} acquisition dates, its "
                                                        f"series {sits_path} has {num_dates}")
    cloud = None
    if ref.files["masks"] is not None:
        masks_path = ref.files["masks"]
        masks, _, _ = read_raster(masks_path, bands=2 * num_dates, size=None, dtype=np.uint8, need_georef=False)
        if masks.shape[:2] != (height, width):
            raise BadPatch(masks_path, "size", f"expected {height}x{width} px as its series, found "
                                               f"{masks.shape[0]}x{masks.shape[1]}")
        masks = np.moveaxis(masks.reshape(height, width, num_dates, 2), (2, 3), (0, 1))  # [T, 2, H, W]
        crop = sits_lib.crop_centered(masks, (height // 2, width // 2), sits_size)
        try:
            cloud = sits_lib.cloud_probability(np.moveaxis(crop, -1, 1), cloud_prob_threshold)
        except ValueError as e:
            raise BadPatch(masks_path, "unreadable", str(e)) from None
    return RawPatch(
        patch_id=ref.patch_id, zone=ref.zone, domain=ref.domain, aerial=aerial, aerial_crs=crs,
        aerial_transform=transform, label=label, sits=sits, sits_cloud=cloud, sits_dates=dates,
        source={"aerial": ref.aerial_path, "label": ref.label_path, "sits": sits_path,
                "masks": ref.files["masks"], "dates": ref.files["dates"]})


def _band_count(path) -> int:
    """The band count of a series file as stored (checked against T x 10 by the caller)."""
    try:
        with rasterio.open(path) as ds:
            return ds.count
    except (rasterio.errors.RasterioError, OSError):
        return 0  # read_raster then reports it unreadable


# ----------------------------------------------------------------------------- synthetic writer

class Writer:
    """Writes data_prep.synth's scenes in this layout: per patch the aerial RGBI, its COSIA label
    when labelled, its Sentinel-2 series and masks (S2_FILE_PX px around the patch, as published;
    synth's sits_size does not apply); then the dates table."""

    def __init__(self, out: pathlib.Path):
        self.out, self.dates = out, {}

    @staticmethod
    def names(zone_index: int, year: int) -> tuple:
        """(domain, ROI): departments of two zones each, ROIs named like FLAIR-HUB's (AF-S1-27)."""
        return f"D{zone_index // 2 + 1:03d}-{year}", f"{'UAN'[zone_index % 3]}Z-S1-{zone_index:02d}"

    def zone(self, rng, **_) -> None:
        pass

    def _path(self, domain, modality, roi, tail) -> pathlib.Path:
        return self.out / DATA_DIR / f"{domain}_{modality}" / roi / f"{domain}_{modality}_{tail}.tif"

    def patch(self, rng, *, domain, zone_name, index_in_zone, aerial, codes, has_label, crs, transform, centre_rc,
              series, masks, dates, **_) -> None:
        sits_size = S2_FILE_PX
        tail = f"{zone_name}_{index_in_zone // 10}-{index_in_zone % 10}"
        write_tif(self._path(domain, AERIAL, zone_name, tail), aerial, crs, transform)
        if has_label:
            write_tif(self._path(domain, LABEL, zone_name, tail), codes[..., None], crs, transform)
        row, col = centre_rc
        r0, c0 = row - sits_size // 2, col - sits_size // 2
        window = (slice(None), slice(None), slice(r0, r0 + sits_size), slice(c0, c0 + sits_size))
        s2 = series[window]                                   # [T, 10, s, s]
        msk = masks[window][:, ::-1]                          # [T, 2, s, s] as (snow, cloud)
        s2_transform = rasterio.transform.Affine(S2_GSD_M, 0.0, transform.c + (c0 - col) * S2_GSD_M
                                                 + transform.a * aerial.shape[1] / 2, 0.0, -S2_GSD_M,
                                                 transform.f - (r0 - row) * S2_GSD_M
                                                 - transform.a * aerial.shape[0] / 2)
        hwc = lambda a: np.ascontiguousarray(np.moveaxis(a.reshape(-1, sits_size, sits_size), 0, -1))  # noqa: E731
        write_tif(self._path(domain, S2, zone_name, tail), hwc(s2), crs, s2_transform)
        write_tif(self._path(domain, S2_MASKS, zone_name, tail), hwc(msk), crs, s2_transform)
        self.dates[f"{domain}_{tail}"] = list(dates)

    def finish(self, **_) -> dict:
        write_dates_table(self.out / MTD_DIR / S2_DATES, self.dates)
        return {"data": str(self.out / DATA_DIR), "sentinel2_dates": str(self.out / MTD_DIR / S2_DATES)}


# Class id of each of synth's internal classes (synth.INTERNAL_CLASSES); reed counts as herbaceous.
SYNTH_CODES = (0, 4, 3, 5, 6, 6, 13, 12, 14, 8, 9, 2, 1,     # building .. greenhouse
               11, 10, 7, 15, 16, 17, 8, 18)                # vineyard, plowed, snow, clear cut, ligneous, mixed, reed, undefined

LAYOUT = Layout(
    name="flair_hub", title="FLAIR-HUB (IGN)", list_patches=list_patches, read_patch=read_patch, metadata=metadata,
    synth=SynthSpec(year=2021, first_doy=10, last_doy=355, num_dates=12, missing_zone_dates=True, crs=CRS,
                    origin=(700000.0, 6600000.0), with_elevation=False, aerial_bands=AERIAL_BANDS,
                    codes=SYNTH_CODES, fold=fold_labels, num_classes=len(CLASSES), writer=Writer,
                    every_class=True),
    sits_size=SITS_SIZE)
