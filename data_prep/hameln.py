"""Reader for the Hameln layout (the seminar's data is not public; docs/DATA.md defines the layout).

    <root>/hameln.json                          manifest: classes, unlabelled_value, bands, gsd, sizes, crs
    <root>/aerial/<zone>/<patch_id>.tif         4 bands uint8 R,G,B,IR, 512x512, 0.2 m, georeferenced
    <root>/labels/<zone>/<patch_id>.tif         optional, 1 band uint8: unlabelled_value, 1..K
    <root>/sits/<zone>/<patch_id>.npy           [T, 10, h, w] uint16, centred on the aerial patch
    <root>/sits/<zone>/<patch_id>_dates.txt     T ISO dates (YYYY-MM-DD), one per line
    <root>/sits/<zone>/<patch_id>_cloud.npy     optional: [T] float 0..1 or [T, 2, h, w] uint8 0..100

A patch without a label file is unlabelled. Validation and errors are those of the FLAIR #2 reader
(data_prep/rasters.py);
every raster must be in the manifest's `crs` with `aerial_gsd_m` pixels (a patch of another size
than `aerial_size` keeps the manifest's footprint), and a label on its aerial patch's grid.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
from typing import Optional

import numpy as np
import rasterio.crs
import rasterio.errors

from data_prep.patch import BadPatch, Layout, MissingSource, PatchRef, RawPatch, SourceError, SynthSpec
from data_prep.rasters import check_same_grid, check_superpatch, load_npy, read_raster, write_tif
from lcssl.data import sits as sits_lib
from lcssl.data.schema import HAMELN_AERIAL_BANDS, HAMELN_CLASSES, IGNORE_LABEL, S2_BANDS, S2_GSD_M

MANIFEST = "hameln.json"
SITS_SIZE = 40
# Manifest fields and their defaults (docs/DATA.md); `classes` is required.
MANIFEST_DEFAULTS = {
    "domain": "hameln",
    "crs": "EPSG:25832",             # ETRS89 / UTM 32N, the Lower Saxony survey CRS
    "unlabelled_value": 0,
    "aerial_bands": list(HAMELN_AERIAL_BANDS),
    "aerial_gsd_m": 0.2,
    "aerial_size": 512,
    "sits_gsd_m": 10.0,
    "sits_size": SITS_SIZE,
}


def read_manifest(root) -> dict:
    """<root>/hameln.json with defaults filled in; ValueError names the field on a bad value."""
    path = pathlib.Path(root) / MANIFEST
    if not path.exists():
        raise MissingSource(f"Hameln root {root}: expected the manifest {path}, found none")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: the manifest is not valid UTF-8 JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise SourceError(f"{path}: expected a JSON object of manifest fields, found {type(manifest).__name__}")
    manifest = {**MANIFEST_DEFAULTS, **manifest}
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes or len(classes) > 254:
        raise SourceError(f"{path}: field 'classes': expected a list of 1..254 class names, found {classes!r}")
    unlabelled = manifest["unlabelled_value"]
    if not isinstance(unlabelled, int) or not (unlabelled == 0 or len(classes) < unlabelled <= 255):
        raise SourceError(f"{path}: field 'unlabelled_value': expected 0 or {len(classes) + 1}..255 "
                          f"(1..{len(classes)} are class codes), found {unlabelled!r}")
    try:
        rasterio.crs.CRS.from_user_input(manifest["crs"])
    except (rasterio.errors.CRSError, TypeError, ValueError) as e:
        raise SourceError(f"{path}: field 'crs': expected a CRS such as 'EPSG:25832', found "
                          f"{manifest['crs']!r} ({e})") from None
    gsd = manifest["aerial_gsd_m"]
    if not isinstance(gsd, (int, float)) or isinstance(gsd, bool) or not gsd > 0:
        raise SourceError(f"{path}: field 'aerial_gsd_m': expected a positive pixel size in metres, found {gsd!r}")
    return manifest


def fold_labels(codes: np.ndarray, num_classes: int, unlabelled_value: int) -> np.ndarray:
    """Raw codes: unlabelled_value -> 255, 1..K -> 0..K-1. Other codes must be rejected by the caller."""
    lut = np.full(256, IGNORE_LABEL, np.uint8)
    lut[1:num_classes + 1] = np.arange(num_classes)
    return lut[codes]


def list_patches(root) -> list[PatchRef]:
    """All <root>/aerial/<zone>/*.tif, sorted by zone and patch id."""
    root = pathlib.Path(root)
    info = read_manifest(root)
    aerial_root = root / "aerial"
    if not aerial_root.is_dir():
        raise MissingSource(f"Hameln root {root}: expected the aerial folder {aerial_root}, found none")
    manifest_values = {"num_classes": len(info["classes"]), "unlabelled_value": int(info["unlabelled_value"]),
                       "num_aerial_bands": len(info["aerial_bands"]), "aerial_size": int(info["aerial_size"]),
                       "crs": str(info["crs"]), "aerial_gsd_m": float(info["aerial_gsd_m"])}
    refs = []
    for aerial_path in sorted(aerial_root.glob("*/*.tif")):
        zone, patch_id = aerial_path.parent.name, aerial_path.stem
        label_path = root / "labels" / zone / f"{patch_id}.tif"
        sits_dir = root / "sits" / zone
        cloud_path = sits_dir / f"{patch_id}_cloud.npy"
        refs.append(PatchRef(
            patch_id=patch_id, zone=zone, domain=str(info["domain"]), aerial_path=str(aerial_path),
            label_path=str(label_path) if label_path.exists() else None,
            files={"sits": str(sits_dir / f"{patch_id}.npy"), "dates": str(sits_dir / f"{patch_id}_dates.txt"),
                   "cloud": str(cloud_path) if cloud_path.exists() else None, "manifest": str(root / MANIFEST)},
            info=manifest_values))
    return refs


def _read_dates(path, num_dates: int) -> list[datetime.date]:
    if not os.path.exists(path):
        raise BadPatch(path, "bad_dates", "dates file missing")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise BadPatch(path, "bad_dates", f"expected UTF-8 text, one ISO date a line ({e})") from None
    try:
        dates = [datetime.date.fromisoformat(line) for line in lines]
    except ValueError as e:
        raise BadPatch(path, "bad_dates", f"expected ISO dates YYYY-MM-DD ({e})") from None
    if len(dates) != num_dates:
        raise BadPatch(path, "bad_dates", f"expected {num_dates} dates (one per SITS time step), found {len(dates)}")
    return dates


def _read_cloud(path, num_dates: int, height: int, width: int, sits_size: int, prob_threshold):
    """[T] float 0..1 as stored, or the score of [T, 2, h, w] uint8 masks over the crop."""
    cloud = load_npy(path, what="cloud")
    if cloud.shape == (num_dates,):
        if cloud.dtype.kind != "f":
            raise BadPatch(path, "dtype", f"per-date cloud: expected float probabilities, found {cloud.dtype}")
        cloud = np.asarray(cloud, np.float32)
        if not np.all(np.isfinite(cloud)):
            raise BadPatch(path, "nonfinite", "per-date cloud probabilities contain NaN or inf")
        if cloud.min() < 0 or cloud.max() > 1:
            raise BadPatch(path, "unreadable", f"expected probabilities 0..1, found {cloud.min()}..{cloud.max()}")
        return cloud
    if cloud.shape != (num_dates, 2, height, width):
        raise BadPatch(path, "size", f"expected shape ({num_dates},) or {(num_dates, 2, height, width)}, "
                                     f"found {cloud.shape}")
    if cloud.dtype != np.uint8:
        raise BadPatch(path, "dtype", f"cloud/snow masks: expected uint8 percent, found {cloud.dtype}")
    crop = sits_lib.crop_centered(cloud, (height // 2, width // 2), sits_size)
    try:
        return sits_lib.cloud_probability(np.moveaxis(crop, -1, 1), prob_threshold)
    except ValueError as e:
        raise BadPatch(path, "unreadable", str(e)) from None


def read_patch(ref: PatchRef, *, sits_size: int = SITS_SIZE, expect_size: Optional[int] = None,
               cloud_prob_threshold: Optional[float] = None) -> RawPatch:
    """Read and validate one patch; raises BadPatch naming the offending file.

    expect_size: aerial height = width (default: the manifest's aerial_size). The series is cropped to
    sits_size x sits_size around its centre when stored larger.
    """
    m, files = ref.info, ref.files
    size = m["aerial_size"] if expect_size is None else expect_size
    aerial, crs, transform = read_raster(
        ref.aerial_path, bands=m["num_aerial_bands"], size=size, dtype=np.uint8, need_georef=True,
        expect_crs=m["crs"], expect_gsd_m=m["aerial_gsd_m"] * m["aerial_size"] / size,
        crs_source=f" (the crs of the manifest {files['manifest']})")
    label = None
    if ref.label_path is not None:
        codes, label_crs, label_transform = read_raster(ref.label_path, bands=1, size=size, dtype=np.uint8,
                                                        need_georef=False)
        codes = codes[..., 0]
        bad = (codes > m["num_classes"]) & (codes != m["unlabelled_value"])
        if bad.any():
            raise BadPatch(ref.label_path, "label_range",
                           f"expected codes 1..{m['num_classes']} or unlabelled {m['unlabelled_value']}, "
                           f"found {np.unique(codes[bad])[:10].tolist()}")
        check_same_grid(ref.label_path, label_crs, label_transform, ref.aerial_path, crs, transform)
        label = fold_labels(codes, m["num_classes"], m["unlabelled_value"])

    data = load_npy(files["sits"], what="SITS")
    check_superpatch(files["sits"], data, what="SITS")
    num_dates, _, height, width = data.shape
    if height < sits_size or width < sits_size:
        raise BadPatch(files["sits"], "size", f"expected at least {sits_size}x{sits_size} px, found {height}x{width}")
    sits = sits_lib.crop_centered(data, (height // 2, width // 2), sits_size)
    dates = _read_dates(files["dates"], num_dates)
    cloud = None
    if files["cloud"] is not None:
        cloud = _read_cloud(files["cloud"], num_dates, height, width, sits_size, cloud_prob_threshold)
    return RawPatch(
        patch_id=ref.patch_id, zone=ref.zone, domain=ref.domain, aerial=aerial, aerial_crs=crs,
        aerial_transform=transform, label=label, sits=sits, sits_cloud=cloud, sits_dates=dates,
        source={"aerial": ref.aerial_path, "label": ref.label_path, "sits": files["sits"],
                "dates": files["dates"], "cloud": files["cloud"]})


def metadata(root) -> dict:
    """Class names, band names and Sentinel-2 GSD from the manifest; Hameln has no official metric."""
    manifest = read_manifest(root)
    return {"classes": list(manifest["classes"]), "aerial_bands": list(manifest["aerial_bands"]),
            "sits_gsd_m": float(manifest["sits_gsd_m"])}


# ----------------------------------------------------------------------------- synthetic writer

class Writer:
    """Writes data_prep.synth's scenes in this layout: per patch an aerial tif, a label tif when
    labelled, its own series, dates and cloud file (odd zones per-date scores, even zones masks);
    then the manifest."""

    def __init__(self, out: pathlib.Path):
        self.out = out

    @staticmethod
    def names(zone_index: int, year: int) -> tuple:
        return f"hameln_{year}", f"zone_{zone_index:02d}"

    def zone(self, rng, **_) -> None:
        pass

    def patch(self, rng, *, zone_name, zone_index, index_in_zone, aerial, codes, has_label, crs, transform,
              centre_rc, series, masks, dates, sits_size, **_) -> None:
        patch_id = f"hm{zone_index:02d}_{index_in_zone:03d}"
        write_tif(self.out / "aerial" / zone_name / f"{patch_id}.tif", aerial, crs, transform)
        if has_label:
            write_tif(self.out / "labels" / zone_name / f"{patch_id}.tif", codes[..., None], crs, transform)
        _write_sits(rng, self.out / "sits" / zone_name, patch_id, series, masks, dates, centre_rc, sits_size,
                    per_date_cloud=zone_index % 2 == 1)

    def finish(self, *, seed, year, crs, gsd, patch_size, sits_size, **_) -> dict:
        manifest = {
            "format_version": 1, "synthetic": True, "seed": seed, "domain": f"hameln_{year}", "crs": crs,
            "classes": list(HAMELN_CLASSES), "unlabelled_value": 0, "aerial_bands": list(HAMELN_AERIAL_BANDS),
            "aerial_gsd_m": gsd, "aerial_size": patch_size, "sits_bands": list(S2_BANDS),
            "sits_gsd_m": S2_GSD_M, "sits_size": sits_size}
        (self.out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        return {"manifest": str(self.out / MANIFEST)}


def _write_sits(rng, folder, patch_id, series, masks, dates, centre_rc, sits_size, per_date_cloud):
    """Per-patch series [T, 10, s, s] (channels-first, as the layout), dates and cloud file."""
    folder.mkdir(parents=True, exist_ok=True)
    row, col = centre_rc
    window = (slice(None), slice(None), slice(row - sits_size // 2, row - sits_size // 2 + sits_size),
              slice(col - sits_size // 2, col - sits_size // 2 + sits_size))
    keep = np.arange(len(dates))
    if rng.random() < 1 / 3:                                   # a missing acquisition for this patch
        keep = np.delete(keep, rng.integers(0, len(dates)))
    np.save(folder / f"{patch_id}.npy", np.ascontiguousarray(series[window][keep]))
    (folder / f"{patch_id}_dates.txt").write_text("".join(f"{dates[i].isoformat()}\n" for i in keep))
    mask_crop = masks[window][keep]
    if per_date_cloud:
        cloud = (mask_crop.max(axis=1).astype(np.float32) / 100).mean(axis=(1, 2)).astype(np.float32)
        np.save(folder / f"{patch_id}_cloud.npy", cloud)
    else:
        np.save(folder / f"{patch_id}_cloud.npy", np.ascontiguousarray(mask_crop))


# Raw code (schema.HAMELN_CLASSES, 1-based) of each of synth's internal classes; pools and greenhouses
# have no class: unlabelled (0). Vineyards and plowed land count as crop, snow cover and the
# undefined class as unlabelled, clear cut as loose material, ligneous as grove, mixed forest as
# deciduous trees.
SYNTH_CODES = (1, 2, 2, 3, 12, 11, 8, 7, 10, 4, 6, 0, 0,    # building .. greenhouse
               6, 6, 0, 3, 9, 7, 5, 0)                       # vineyard, plowed, snow, clear cut, ligneous, mixed, reed, undefined

# Synthetic series: 8 acquisitions from February to November 2022, as the seminar's.
LAYOUT = Layout(
    name="hameln", title="Hameln (the seminar's layout)", list_patches=list_patches, read_patch=read_patch,
    metadata=metadata,
    synth=SynthSpec(year=2022, first_doy=32, last_doy=334, num_dates=8, missing_zone_dates=False,
                    crs=MANIFEST_DEFAULTS["crs"], origin=(530000.0, 5775000.0), with_elevation=False,
                    aerial_bands=HAMELN_AERIAL_BANDS, codes=SYNTH_CODES,
                    fold=lambda codes: fold_labels(codes, len(HAMELN_CLASSES), 0), num_classes=len(HAMELN_CLASSES),
                    writer=Writer, every_class=False),
    sits_size=SITS_SIZE, pretrain_split="unlabelled")
