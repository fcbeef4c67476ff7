"""FLAIR #2 and Hameln readers on tiny synthetic datasets, and every bad input they must reject."""
import datetime
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import rasterio
import rasterio.errors
import rasterio.transform

from data_prep import flair2, hameln, rasters, synth
from data_prep.patch import BadPatch, SourceError

SIZE = synth.TINY["patch_size"]


@pytest.fixture(scope="module")
def flair_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("flair2")
    synth.write_dataset(root, layout="flair2", seed=3, **synth.TINY)
    return root


@pytest.fixture(scope="module")
def hameln_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hameln")
    synth.write_dataset(root, layout="hameln", seed=3, **synth.TINY)
    return root


@pytest.fixture
def flair_copy(flair_root, tmp_path):
    return shutil.copytree(flair_root, tmp_path / "copy")


@pytest.fixture
def hameln_copy(hameln_root, tmp_path):
    return shutil.copytree(hameln_root, tmp_path / "copy")


def _raw(path):
    with rasterio.open(path) as ds:
        return ds.read(1)


def test_flair2_reads_synthetic(flair_root):
    refs = flair2.list_patches(flair_root)
    assert len(refs) == 6 and sum(r.has_label for r in refs) == 4
    table = json.loads((flair_root / flair2.CENTROIDS).read_text())
    for ref in refs:
        p = flair2.read_patch(ref, expect_size=SIZE)
        assert p.aerial.shape == (SIZE, SIZE, 5) and p.aerial.dtype == np.uint8
        assert p.aerial_crs == "EPSG:2154"
        assert p.aerial_transform[0] == pytest.approx(102.4 / SIZE) and p.aerial_transform[4] < 0
        assert p.domain.startswith("D0") and p.domain.endswith("_2021") and p.zone.startswith("Z")
        t = len(p.sits_dates)
        assert p.sits.shape == (t, 40, 40, 10) and p.sits.dtype == np.uint16
        assert p.sits_cloud.shape == (t,) and p.sits_cloud.dtype == np.float32
        assert ((p.sits_cloud >= 0) & (p.sits_cloud <= 1)).all()
        assert all(isinstance(d, datetime.date) and d.year == 2021 for d in p.sits_dates)
        assert p.sits_dates == sorted(p.sits_dates)
        # The crop is the super-patch window around the centroid, channels-last.
        data = np.load(ref.files["sen_data"])
        row, col = table[os.path.basename(ref.aerial_path)]
        np.testing.assert_array_equal(p.sits, np.moveaxis(data[:, :, row - 20:row + 20, col - 20:col + 20], 1, -1))
        if ref.has_label:
            raw = _raw(ref.label_path)
            expected = np.where(raw > 13, 12, raw.astype(int) - 1)
            np.testing.assert_array_equal(p.label, expected)
            assert p.label.dtype == np.uint8 and p.label.max() <= 12
        else:
            assert p.label is None


def test_flair2_label_folding_table():
    codes = np.arange(20, dtype=np.uint8)
    np.testing.assert_array_equal(flair2.fold_labels(codes),
                                  [255, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 12, 12, 12, 12, 12, 12])


def test_flair2_without_labels_root_is_unlabelled(flair_copy):
    shutil.rmtree(flair_copy / flair2.LABELS_DIR)
    refs = flair2.list_patches(flair_copy)
    assert refs and not any(r.has_label for r in refs)
    assert flair2.read_patch(refs[0], expect_size=SIZE).label is None
    with pytest.raises(FileNotFoundError, match="flair_aerial_test"):
        flair2.list_patches(flair_copy, aerial_dir="flair_aerial_test")


def test_hameln_reads_synthetic(hameln_root):
    refs = hameln.list_patches(hameln_root)
    assert len(refs) == 6 and sum(r.has_label for r in refs) == 4
    kinds = set()
    for ref in refs:
        p = hameln.read_patch(ref)         # expect_size from the manifest
        assert p.aerial.shape == (SIZE, SIZE, 4) and p.aerial.dtype == np.uint8
        assert p.aerial_crs == "EPSG:25832" and p.domain == "hameln_2022"
        t = len(p.sits_dates)
        assert t in (synth.TINY["num_dates"], synth.TINY["num_dates"] - 1) and p.sits.shape == (t, 40, 40, 10) and p.sits.dtype == np.uint16
        assert all(datetime.date(2022, 2, 1) <= d <= datetime.date(2022, 11, 30) for d in p.sits_dates)
        assert p.sits_cloud.shape == (t,) and p.sits_cloud.dtype == np.float32
        kinds.add(np.load(ref.files["cloud"]).ndim)
        if ref.has_label:
            raw = _raw(ref.label_path)
            np.testing.assert_array_equal(p.label, np.where(raw == 0, 255, raw.astype(int) - 1))
        else:
            assert p.label is None
    assert kinds == {1, 4}                  # both cloud file forms are exercised


def _rewrite(path, array_chw, *, crs=None, transform=None, georef=True):
    """Rewrites a GeoTIFF with new pixels; it keeps the file's CRS and transform unless given."""
    kwargs = {}
    if georef:
        with rasterio.open(path) as ds:
            kwargs = dict(crs=crs or ds.crs, transform=transform or ds.transform)
    count, height, width = array_chw.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=count,
                           dtype=array_chw.dtype.name, **kwargs) as ds:
            ds.write(array_chw)


def _first_labelled(refs):
    return next(r for r in refs if r.has_label)


def _flair_cases():
    def corrupt(ref, root):
        with open(ref.aerial_path, "wb") as f:
            f.write(b"not a tiff")
        return ref.aerial_path

    def bands(ref, root):
        _rewrite(ref.aerial_path, np.zeros((3, SIZE, SIZE), np.uint8))
        return ref.aerial_path

    def size(ref, root):
        _rewrite(ref.aerial_path, np.zeros((5, SIZE // 2, SIZE // 2), np.uint8))
        return ref.aerial_path

    def dtype(ref, root):
        _rewrite(ref.aerial_path, np.zeros((5, SIZE, SIZE), np.uint16))
        return ref.aerial_path

    def no_crs(ref, root):
        _rewrite(ref.aerial_path, np.zeros((5, SIZE, SIZE), np.uint8), georef=False)
        return ref.aerial_path

    def label_range(ref, root):
        codes = _raw(ref.label_path)[None].copy()
        codes[0, 0, 0] = 20
        _rewrite(ref.label_path, codes)
        return ref.label_path

    def label_bands(ref, root):
        _rewrite(ref.label_path, np.ones((2, SIZE, SIZE), np.uint8))
        return ref.label_path

    def no_superpatch(ref, root):
        os.remove(ref.files["sen_data"])
        return ref.files["sen_data"]

    def no_masks(ref, root):
        os.remove(ref.files["sen_masks"])
        return ref.files["sen_masks"]

    def corrupt_npy(ref, root):
        with open(ref.files["sen_data"], "wb") as f:
            f.write(b"\x93NUMPY garbage")
        return ref.files["sen_data"]

    def superpatch_dtype(ref, root):
        np.save(ref.files["sen_data"], np.load(ref.files["sen_data"]).astype(np.float32))
        return ref.files["sen_data"]

    def products_count(ref, root):
        lines = open(ref.files["sen_products"]).read().split()
        with open(ref.files["sen_products"], "w") as f:
            f.write("\n".join(lines[:-1]) + "\n")
        return ref.files["sen_products"]

    def products_name(ref, root):
        lines = open(ref.files["sen_products"]).read().split()
        lines[0] = "S2A_MSIL2A_garbage"
        with open(ref.files["sen_products"], "w") as f:
            f.write("\n".join(lines) + "\n")
        return ref.files["sen_products"]

    def wrong_crs(ref, root):  # the same pixels in geographic degrees: a 1.5e-5 "m" ground resolution
        _rewrite(ref.aerial_path, np.moveaxis(rasters.read_raster(ref.aerial_path, bands=5, size=SIZE, dtype=np.uint8,
                                                                 need_georef=True)[0], -1, 0),
                 crs="EPSG:4326", transform=rasterio.transform.Affine(1.5e-5, 0, 2.35, 0, -1.5e-5, 48.85))
        return ref.aerial_path

    def resolution(ref, root):
        with rasterio.open(ref.aerial_path) as ds:
            t = ds.transform
        _rewrite(ref.aerial_path, np.zeros((5, SIZE, SIZE), np.uint8),
                 transform=rasterio.transform.Affine(0.5, 0, t.c, 0, -0.5, t.f))
        return ref.aerial_path

    def label_shifted_1km(ref, root):
        with rasterio.open(ref.label_path) as ds:
            t = ds.transform
        _rewrite(ref.label_path, _raw(ref.label_path)[None].copy(),
                 transform=rasterio.transform.Affine(t.a, 0, t.c + 1000, 0, t.e, t.f))
        return ref.label_path

    def products_not_utf8(ref, root):
        with open(ref.files["sen_products"], "ab") as f:
            f.write(b"S2B_MSIL2A_\xff\xfe\n")
        return ref.files["sen_products"]

    def edit_centroids(value):
        def edit(ref, root):
            path = root / flair2.CENTROIDS
            table = json.loads(path.read_text())
            key = os.path.basename(ref.aerial_path)
            if value is None:
                del table[key]
            else:
                table[key] = value
            path.write_text(json.dumps(table))
            return path
        return edit

    return [("unreadable", corrupt), ("band_count", bands), ("size", size), ("dtype", dtype),
            ("no_crs", no_crs), ("label_range", label_range), ("band_count", label_bands),
            ("no_sits", no_superpatch), ("no_sits", no_masks), ("unreadable", corrupt_npy),
            ("dtype", superpatch_dtype), ("bad_dates", products_count), ("bad_dates", products_name),
            ("no_centroid", edit_centroids(None)), ("no_centroid", edit_centroids([1, 1])),
            ("no_centroid", edit_centroids("12,40")), ("no_centroid", edit_centroids([12.5, 40])),
            ("wrong_crs", wrong_crs), ("resolution", resolution), ("grid", label_shifted_1km),
            ("bad_dates", products_not_utf8)]


@pytest.mark.parametrize("reason,damage", _flair_cases(), ids=lambda v: getattr(v, "__name__", v))
def test_flair2_bad_inputs(flair_copy, reason, damage):
    ref = _first_labelled(flair2.list_patches(flair_copy))
    bad_path = damage(ref, flair_copy)
    ref = _first_labelled(flair2.list_patches(flair_copy))     # re-list: the centroid table may have changed
    with pytest.raises(BadPatch) as info:
        flair2.read_patch(ref, expect_size=SIZE)
    assert info.value.reason == reason
    assert info.value.path == str(bad_path)
    assert os.path.basename(str(bad_path)) in str(info.value)


def test_flair2_georef_messages_say_what_was_found(flair_copy):
    refs = flair2.list_patches(flair_copy)
    ref = _first_labelled(refs)
    with rasterio.open(ref.label_path) as ds:
        t = ds.transform
    _rewrite(ref.label_path, _raw(ref.label_path)[None].copy(),
             transform=rasterio.transform.Affine(t.a, 0, t.c + 1000, 0, t.e, t.f))
    with pytest.raises(BadPatch, match=r"origin shifted by \+1000\.000, \+0\.000 m"):
        flair2.read_patch(ref, expect_size=SIZE)
    other = refs[-1]
    with rasterio.open(other.aerial_path) as ds:
        pixels = ds.read()
    _rewrite(other.aerial_path, pixels, crs="EPSG:4326",
             transform=rasterio.transform.Affine(1.5e-5, 0, 2.35, 0, -1.5e-5, 48.85))
    with pytest.raises(BadPatch, match="CRS EPSG:4326, expected EPSG:2154"):
        flair2.read_patch(other, expect_size=SIZE)


def test_truncated_tiff_keeps_the_gdal_cause(flair_copy):
    ref = flair2.list_patches(flair_copy)[0]
    with open(ref.aerial_path, "rb") as f:
        data = f.read()
    with open(ref.aerial_path, "wb") as f:
        f.write(data[:len(data) // 2])
    try:  # what rasterio itself says: a generic message whose cause holds GDAL's reason
        with rasterio.open(ref.aerial_path) as ds:
            ds.read()
    except rasterio.errors.RasterioError as e:
        cause = str(e.__cause__ or e.__context__)
    assert cause
    with pytest.raises(BadPatch) as info:
        flair2.read_patch(ref, expect_size=SIZE)
    assert info.value.reason == "unreadable" and cause in info.value.detail


def test_flair2_malformed_centroid_table_is_one_source_error(flair_copy):
    path = flair_copy / flair2.CENTROIDS
    path.write_text('{"IMG_1.tif": [1, 2],')
    with pytest.raises(SourceError, match=f"{path}: the centroid table is not valid UTF-8 JSON"):
        flair2.list_patches(flair_copy)
    path.write_bytes(b'{"IMG_\xff.tif": [1, 2]}')
    with pytest.raises(SourceError, match=str(path)):
        flair2.list_patches(flair_copy)


def test_flair2_default_size_is_512(flair_root):
    with pytest.raises(BadPatch, match="expected 512x512 px, found 32x32") as info:
        flair2.read_patch(flair2.list_patches(flair_root)[0])
    assert info.value.reason == "size"


def _hameln_cases():
    def nan_cloud(ref, root):
        path = ref.files["sits"].replace(".npy", "_cloud.npy")
        t = np.load(ref.files["sits"]).shape[0]
        cloud = np.zeros(t, np.float32)
        cloud[1] = np.nan
        np.save(path, cloud)
        return path

    def label_range(ref, root):
        codes = _raw(ref.label_path)[None].copy()
        codes[0, 3, 3] = 13
        _rewrite(ref.label_path, codes)
        return ref.label_path

    def dates_count(ref, root):
        lines = open(ref.files["dates"]).read().split()
        with open(ref.files["dates"], "w") as f:
            f.write("\n".join(lines[1:]) + "\n")
        return ref.files["dates"]

    def dates_format(ref, root):
        with open(ref.files["dates"]) as f:
            lines = f.read().split()
        lines[0] = "15.02.2022"
        with open(ref.files["dates"], "w") as f:
            f.write("\n".join(lines) + "\n")
        return ref.files["dates"]

    def no_sits(ref, root):
        os.remove(ref.files["sits"])
        return ref.files["sits"]

    def sits_bands(ref, root):
        np.save(ref.files["sits"], np.load(ref.files["sits"])[:, :4])
        return ref.files["sits"]

    def sits_small(ref, root):
        np.save(ref.files["sits"], np.load(ref.files["sits"])[:, :, :30, :30])
        return ref.files["sits"]

    def aerial_bands(ref, root):
        _rewrite(ref.aerial_path, np.zeros((5, SIZE, SIZE), np.uint8))
        return ref.aerial_path

    def dates_not_utf8(ref, root):
        with open(ref.files["dates"], "ab") as f:
            f.write(b"\xff\n")
        return ref.files["dates"]

    def manifest_crs(ref, root):  # the manifest says ETRS89 / UTM 32N, the rasters are Lambert-93
        path = root / hameln.MANIFEST
        path.write_text(json.dumps({**json.loads(path.read_text()), "crs": "EPSG:2154"}))
        return ref.aerial_path

    def label_grid(ref, root):
        with rasterio.open(ref.label_path) as ds:
            t = ds.transform
        _rewrite(ref.label_path, _raw(ref.label_path)[None].copy(),
                 transform=rasterio.transform.Affine(t.a, 0, t.c, 0, t.e, t.f - 1000))
        return ref.label_path

    return [("bad_dates", dates_not_utf8), ("wrong_crs", manifest_crs), ("grid", label_grid),
            ("nonfinite", nan_cloud), ("label_range", label_range), ("bad_dates", dates_count),
            ("bad_dates", dates_format), ("no_sits", no_sits), ("band_count", sits_bands), ("size", sits_small),
            ("band_count", aerial_bands)]


@pytest.mark.parametrize("reason,damage", _hameln_cases(), ids=lambda v: getattr(v, "__name__", v))
def test_hameln_bad_inputs(hameln_copy, reason, damage):
    bad_path = damage(_first_labelled(hameln.list_patches(hameln_copy)), hameln_copy)
    ref = _first_labelled(hameln.list_patches(hameln_copy))
    with pytest.raises(BadPatch) as info:
        hameln.read_patch(ref)
    assert info.value.reason == reason
    assert info.value.path == str(bad_path)
    if reason == "wrong_crs":
        assert "CRS EPSG:25832, expected EPSG:2154 (the crs of the manifest" in str(info.value)


def test_hameln_declared_unlabelled_value_and_bad_manifest(hameln_copy):
    path = hameln_copy / hameln.MANIFEST
    manifest = json.loads(path.read_text())
    ref = _first_labelled(hameln.list_patches(hameln_copy))
    codes = _raw(ref.label_path)[None].copy()
    codes[0, :2, :2] = 99
    _rewrite(ref.label_path, codes)
    path.write_text(json.dumps({**manifest, "unlabelled_value": 99}))
    label = hameln.read_patch(_first_labelled(hameln.list_patches(hameln_copy))).label
    assert (label[:2, :2] == 255).all() and label.max() != 99
    path.write_text(json.dumps({**manifest, "unlabelled_value": 5}))
    with pytest.raises(ValueError, match="unlabelled_value"):
        hameln.list_patches(hameln_copy)
    path.write_text(json.dumps({**manifest, "crs": "Lambert-93"}))
    with pytest.raises(SourceError, match="field 'crs'"):
        hameln.list_patches(hameln_copy)
    path.write_bytes(b'{"classes": ["a"\xff]}')
    with pytest.raises(SourceError, match="not valid UTF-8 JSON"):
        hameln.list_patches(hameln_copy)
    os.remove(path)
    with pytest.raises(FileNotFoundError, match="hameln.json"):
        hameln.list_patches(hameln_copy)


def test_flair2_released_test_folders_are_the_test_split(flair_copy):
    # Move one zone from the released training folders into the released test folders.
    zone = sorted((flair_copy / flair2.AERIAL_DIR).glob("*/*"))[0]
    domain = zone.parent.name
    for train_dir, test_dir in ((flair2.AERIAL_DIR, flair2.TEST_AERIAL_DIR),
                                (flair2.LABELS_DIR, flair2.TEST_LABELS_DIR), (flair2.SEN_DIR, flair2.TEST_SEN_DIR)):
        (flair_copy / test_dir / domain).mkdir(parents=True)
        shutil.move(flair_copy / train_dir / domain / zone.name, flair_copy / test_dir / domain / zone.name)
    refs = flair2.list_patches(flair_copy)
    assert len(refs) == 6
    test = [r for r in refs if r.fixed_split == "test"]
    assert test and {(r.domain, r.zone) for r in test} == {(domain, zone.name)}
    assert all(r.fixed_split is None and flair2.TEST_AERIAL_DIR not in r.aerial_path for r in refs if r not in test)
    patch = flair2.read_patch(next(r for r in test if r.has_label), expect_size=SIZE)
    assert patch.label is not None and patch.source["sits"].count(flair2.TEST_SEN_DIR) == 1
    # The test folders alone are a dataset too (e.g. to evaluate a trained model on them).
    shutil.rmtree(flair_copy / flair2.AERIAL_DIR)
    assert [r.patch_id for r in flair2.list_patches(flair_copy)] == [r.patch_id for r in test]
