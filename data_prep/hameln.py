"""Reader for the Hameln layout (the seminar's data is not public; docs/DATA.md defines the layout).

    <root>/hameln.json                          manifest: classes, unlabelled_value, bands, gsd, sizes, crs
    <root>/aerial/<zone>/<patch_id>.tif         4 bands uint8 R,G,B,IR, 512x512, 0.2 m, georeferenced
    <root>/labels/<zone>/<patch_id>.tif         optional, 1 band uint8: unlabelled_value, 1..K
    <root>/sits/<zone>/<patch_id>.npy           [T, 10, h, w] uint16, centred on the aerial patch
    <root>/sits/<zone>/<patch_id>_dates.txt     T ISO dates (YYYY-MM-DD), one per line
    <root>/sits/<zone>/<patch_id>_cloud.npy     optional: [T] float 0..1 or [T, 2, h, w] uint8 0..100

A patch without a label file is unlabelled. Validation and errors are those of the FLAIR #2 reader;
every raster must be in the manifest's `crs` with `aerial_gsd_m` pixels (a patch of another size
than `aerial_size` keeps the manifest's footprint), and a label on its aerial patch's grid.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
from typing import Optional

import numpy as np
import rasterio.crs
import rasterio.errors

from data_prep.flair2 import check_same_grid, check_superpatch, load_npy, read_raster
from data_prep.patch import BadPatch, MissingSource, RawPatch, SourceError
from lcssl.data import sits as sits_lib
from lcssl.data.schema import HAMELN_AERIAL_BANDS, IGNORE_LABEL

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


@dataclasses.dataclass(frozen=True)
class PatchRef:
    """Paths of one Hameln patch plus the manifest values its reading needs."""

    patch_id: str
    zone: str
    domain: str
    aerial_path: str
    label_path: Optional[str]
    sits_path: str
    dates_path: str
    cloud_path: Optional[str]
    num_classes: int
    unlabelled_value: int
    num_aerial_bands: int
    aerial_size: int
    crs: str
    aerial_gsd_m: float
    manifest_path: str

    @property
    def has_label(self) -> bool:
        return self.label_path is not None


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
    refs = []
    for aerial_path in sorted(aerial_root.glob("*/*.tif")):
        zone, patch_id = aerial_path.parent.name, aerial_path.stem
        label_path = root / "labels" / zone / f"{patch_id}.tif"
        sits_dir = root / "sits" / zone
        cloud_path = sits_dir / f"{patch_id}_cloud.npy"
        refs.append(PatchRef(
            patch_id=patch_id, zone=zone, domain=str(info["domain"]), aerial_path=str(aerial_path),
            label_path=str(label_path) if label_path.exists() else None,
            sits_path=str(sits_dir / f"{patch_id}.npy"), dates_path=str(sits_dir / f"{patch_id}_dates.txt"),
            cloud_path=str(cloud_path) if cloud_path.exists() else None,
            num_classes=len(info["classes"]), unlabelled_value=int(info["unlabelled_value"]),
            num_aerial_bands=len(info["aerial_bands"]), aerial_size=int(info["aerial_size"]),
            crs=str(info["crs"]), aerial_gsd_m=float(info["aerial_gsd_m"]), manifest_path=str(root / MANIFEST)))
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
    size = ref.aerial_size if expect_size is None else expect_size
    aerial, crs, transform = read_raster(
        ref.aerial_path, bands=ref.num_aerial_bands, size=size, dtype=np.uint8, need_georef=True,
        expect_crs=ref.crs, expect_gsd_m=ref.aerial_gsd_m * ref.aerial_size / size,
        crs_source=f" (the crs of the manifest {ref.manifest_path})")
    label = None
    if ref.label_path is not None:
        codes, label_crs, label_transform = read_raster(ref.label_path, bands=1, size=size, dtype=np.uint8,
                                                        need_georef=False)
        codes = codes[..., 0]
        bad = (codes > ref.num_classes) & (codes != ref.unlabelled_value)
        if bad.any():
            raise BadPatch(ref.label_path, "label_range",
                           f"expected codes 1..{ref.num_classes} or unlabelled {ref.unlabelled_value}, "
                           f"found {np.unique(codes[bad])[:10].tolist()}")
        check_same_grid(ref.label_path, label_crs, label_transform, ref.aerial_path, crs, transform)
        label = fold_labels(codes, ref.num_classes, ref.unlabelled_value)

    data = load_npy(ref.sits_path, what="SITS")
    check_superpatch(ref.sits_path, data, what="SITS")
    num_dates, _, height, width = data.shape
    if height < sits_size or width < sits_size:
        raise BadPatch(ref.sits_path, "size", f"expected at least {sits_size}x{sits_size} px, found {height}x{width}")
    sits = sits_lib.crop_centered(data, (height // 2, width // 2), sits_size)
    dates = _read_dates(ref.dates_path, num_dates)
    cloud = None
    if ref.cloud_path is not None:
        cloud = _read_cloud(ref.cloud_path, num_dates, height, width, sits_size, cloud_prob_threshold)
    return RawPatch(
        patch_id=ref.patch_id, zone=ref.zone, domain=ref.domain, aerial=aerial, aerial_crs=crs,
        aerial_transform=transform, label=label, sits=sits, sits_cloud=cloud, sits_dates=dates,
        source={"aerial": ref.aerial_path, "label": ref.label_path, "sits": ref.sits_path,
                "dates": ref.dates_path, "cloud": ref.cloud_path})
