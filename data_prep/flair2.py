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
is missing (or the whole labels folder) is unlabelled. `LAYOUT` is this layout's entry in
data_prep/layouts.py; `Writer` writes it for data_prep/synth.py.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
from typing import Optional

import numpy as np

from data_prep.patch import BadPatch, Layout, MissingSource, PatchRef, RawPatch, SourceError, SynthSpec
from data_prep.rasters import check_same_grid, check_superpatch, load_npy, read_raster, stat_key, write_tif
from lcssl.data import sits as sits_lib
from lcssl.data.schema import FLAIR2_AERIAL_BANDS, FLAIR2_CLASSES, IGNORE_LABEL, S2_GSD_M

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
SITS_SIZE = 40           # FLAIR #2 baseline crop of the super-patch (40 x 40 px at 10 m)
MAX_RAW_CODE = 19        # FLAIR #2 nomenclature: codes 1..19; 14..19 are rare and fold into 'other'

# Raw code -> class id: 0 -> ignore; 1..13 -> 0..12; 14..19 -> 12 ('other', last).
_FOLD = np.full(256, IGNORE_LABEL, np.uint8)
_FOLD[1:MAX_RAW_CODE + 1] = np.minimum(np.arange(1, MAX_RAW_CODE + 1), len(FLAIR2_CLASSES)) - 1


def fold_labels(codes: np.ndarray) -> np.ndarray:
    """Raw FLAIR #2 codes [H, W] uint8 (0..19) -> class ids 0..12, 255 where the code is 0."""
    return _FOLD[codes]


# ----------------------------------------------------------------------------- zone super-patches

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
    return _load_zone_cached(stat_key(ref.files["sen_data"]), stat_key(ref.files["sen_masks"]),
                             stat_key(ref.files["sen_products"]))


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
                files={"sen_data": f"{sen}_data.npy", "sen_masks": f"{sen}_masks.npy",
                       "sen_products": f"{sen}_products.txt", "centroids": str(centroids_path)},
                info={"centroid": centroid, "centroid_error": centroid_error}, fixed_split=split))
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
    centroids_path, centroid = ref.files["centroids"], ref.info["centroid"]
    if ref.info["centroid_error"] is not None:
        raise BadPatch(centroids_path, "no_centroid",
                       f"entry for {os.path.basename(ref.aerial_path)}: {ref.info['centroid_error']}")
    if centroid is None:
        raise BadPatch(centroids_path, "no_centroid", f"no entry for {os.path.basename(ref.aerial_path)}")
    try:
        sits = sits_lib.crop_centered(data, centroid, sits_size)
        mask_crop = sits_lib.crop_centered(masks, centroid, sits_size)
    except ValueError as e:
        raise BadPatch(centroids_path, "no_centroid",
                       f"{os.path.basename(ref.aerial_path)} in {ref.files['sen_data']}: {e}") from None
    try:
        cloud = sits_lib.cloud_probability(np.moveaxis(mask_crop, -1, 1), cloud_prob_threshold)
    except ValueError as e:
        raise BadPatch(ref.files["sen_masks"], "unreadable", str(e)) from None
    return RawPatch(
        patch_id=ref.patch_id, zone=ref.zone, domain=ref.domain, aerial=aerial, aerial_crs=crs,
        aerial_transform=transform, label=label, sits=sits, sits_cloud=cloud, sits_dates=list(dates),
        source={"aerial": ref.aerial_path, "label": ref.label_path, "sits": ref.files["sen_data"],
                "masks": ref.files["sen_masks"], "products": ref.files["sen_products"],
                "centroids": centroids_path})


def metadata(root) -> dict:
    """Class names, band names, Sentinel-2 GSD and the official metric (fixed by the spec)."""
    return {"classes": list(FLAIR2_CLASSES), "aerial_bands": list(FLAIR2_AERIAL_BANDS),
            "sits_gsd_m": float(S2_GSD_M), "official_miou": OFFICIAL_MIOU}


# ----------------------------------------------------------------------------- synthetic writer

class Writer:
    """Writes data_prep.synth's scenes in this layout: a super-patch per zone, IMG/MSK per patch, the
    centroid table; zones of split 'test' go to the released test folders."""

    def __init__(self, out: pathlib.Path):
        self.out, self.centroids = out, {}

    @staticmethod
    def names(zone_index: int, year: int) -> tuple:
        """(domain, zone): departments of two zones each, zone names as FLAIR #2's (Z1_UU, ...)."""
        kind = "UAN"[zone_index % 3]
        return f"D{zone_index // 2 + 1:03d}_{year}", f"Z{zone_index % 2 + 1}_{kind * 2}"

    def _folders(self, split: Optional[str]) -> tuple:
        return (TEST_AERIAL_DIR, TEST_LABELS_DIR, TEST_SEN_DIR) if split == "test" else (AERIAL_DIR, LABELS_DIR, SEN_DIR)

    def zone(self, rng, *, domain, zone_name, split, series, masks, dates) -> None:
        sen = self.out / self._folders(split)[2] / domain / zone_name / "sen"
        sen.mkdir(parents=True, exist_ok=True)
        stem = f"SEN2_sp_{domain}-{zone_name}"
        np.save(sen / f"{stem}_data.npy", series)
        np.save(sen / f"{stem}_masks.npy", masks)
        orbit = int(rng.integers(1, 144))
        products = [_product_name(rng, d, orbit, "T31TCJ") for d in dates]
        (sen / f"{stem}_products.txt").write_text("\n".join(products) + "\n")

    def patch(self, rng, *, domain, zone_name, split, patch_number, zone_index, index_in_zone, aerial, codes,
              has_label, crs, transform, centre_rc, **_) -> None:
        aerial_dir, labels_dir, _ = self._folders(split)
        patch_id = f"IMG_{patch_number:06d}"
        write_tif(self.out / aerial_dir / domain / zone_name / "img" / f"{patch_id}.tif", aerial, crs, transform)
        if has_label:
            write_tif(self.out / labels_dir / domain / zone_name / "msk" / f"MSK_{patch_number:06d}.tif",
                      codes[..., None], crs, transform)
        self.centroids[f"{patch_id}.tif"] = [int(centre_rc[0]), int(centre_rc[1])]

    def finish(self, **_) -> dict:
        with open(self.out / CENTROIDS, "w") as f:
            json.dump(self.centroids, f, indent=0, sort_keys=True)
        paths = {"aerial": str(self.out / AERIAL_DIR), "labels": str(self.out / LABELS_DIR),
                 "sen": str(self.out / SEN_DIR), "centroids": str(self.out / CENTROIDS)}
        if (self.out / TEST_AERIAL_DIR).is_dir():
            paths.update(test_aerial=str(self.out / TEST_AERIAL_DIR), test_labels=str(self.out / TEST_LABELS_DIR),
                         test_sen=str(self.out / TEST_SEN_DIR))
        return paths


def _product_name(rng, date: datetime.date, orbit: int, tile: str) -> str:
    sensing = f"{date:%Y%m%d}T1050{int(rng.integers(10, 60)):02d}"
    processed_on = date + datetime.timedelta(days=int(rng.integers(0, 2)))
    processed = f"{processed_on:%Y%m%d}T{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}00"
    return f"S2{'AB'[int(rng.integers(0, 2))]}_MSIL2A_{sensing}_N0301_R{orbit:03d}_{tile}_{processed}"


# Raw code of each of synth's internal classes (synth.INTERNAL_CLASSES): 13 swimming pool,
# 18 greenhouse, 14 snow, 15 clear cut, 16 mixed, 17 ligneous and 19 other fold into 'other'.
SYNTH_CODES = (1, 2, 3, 4, 5, 5, 6, 7, 8, 10, 11, 13, 18,   # building .. greenhouse
               9, 12, 14, 15, 17, 16, 10, 19)               # vineyard, plowed, snow, clear cut, ligneous, mixed, reed, undefined

LAYOUT = Layout(
    name="flair2", title="FLAIR #2 (IGN)", list_patches=list_patches, read_patch=read_patch, metadata=metadata,
    synth=SynthSpec(year=2021, first_doy=10, last_doy=355, num_dates=12, missing_zone_dates=True, crs=CRS,
                    origin=(600000.0, 6800000.0), with_elevation=True, aerial_bands=FLAIR2_AERIAL_BANDS,
                    codes=SYNTH_CODES, fold=fold_labels, num_classes=len(FLAIR2_CLASSES), writer=Writer,
                    every_class=True, test_folders=True),
    sits_size=SITS_SIZE)
