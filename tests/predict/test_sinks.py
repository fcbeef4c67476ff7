"""Output sinks: finished rows -> uint8 rasters with nodata, a new format is one class, and a
failure leaves no file behind, also when GDAL only logs it (a full disk at close)."""

import logging
import warnings

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from lcssl.errors import UserError
from lcssl.predict import sinks
from lcssl.predict.__main__ import _parser
from lcssl.predict.blend import Rows
from tests._disk import file_size_limit

NAMES = ["a", "b", "c"]
PROFILE = dict(width=6, height=4, crs="EPSG:2154", transform=from_origin(650_000, 6_860_000, 1, 1))


def rows(x0=0, y0=0):
    logits = np.zeros((4, 3, 3), np.float32)
    logits[..., 1] = 2.0                      # class 1, p = e^2 / (e^2 + 2)
    valid = np.ones((4, 3), bool)
    valid[0, 0] = False
    return Rows(x0, y0, logits, valid.copy(), np.zeros((4, 3), bool), valid)


class Entropy(sinks.Sink):
    """A new format: the softmax entropy in bits x 100."""
    name, suffix = "entropy", "_entropy"

    def pixels(self, r):
        p = r.probabilities
        return np.where(r.valid, np.rint(-100 * (p * np.log2(p)).sum(-1)), 255).astype(np.uint8)[None]


def test_sinks_write_rows_with_nodata_and_a_new_one_is_a_class(tmp_path):
    out = str(tmp_path / "map.tif")
    written = [kind(out, NAMES) for kind in (sinks.ClassMap, sinks.Confidence,
                                             sinks.Probabilities, Entropy)]
    for s in written:
        s.open(PROFILE)
        s.write(rows(0))
        s.write(rows(3))
        s.finish()
        s.commit()
    p1 = np.exp(2.0) / (np.exp(2.0) + 2)
    with rasterio.open(tmp_path / "map.tif") as m:
        cls = m.read(1)
        assert m.colormap(1)[1][:3] == sinks.class_colours(NAMES)[1]
    assert cls[0, 0] == 255 and (cls.ravel()[1:3] == 1).all() and cls[0, 3] == 255
    with rasterio.open(tmp_path / "map_confidence.tif") as m:
        assert m.read(1)[1, 1] == round(p1 * 254)
    with rasterio.open(tmp_path / "map_probabilities.tif") as m:
        assert m.count == 3 and m.descriptions == tuple(NAMES)
    with rasterio.open(tmp_path / "map_entropy.tif") as m:
        q = (1 - p1) / 2
        want = -(p1 * np.log2(p1) + 2 * q * np.log2(q))
        assert m.read(1)[2, 2] == round(100 * want)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "map.tif", "map_confidence.tif", "map_entropy.tif", "map_probabilities.tif"]


def test_an_aborted_sink_leaves_nothing(tmp_path):
    s = sinks.Probabilities(str(tmp_path / "map.tif"), NAMES)
    s.open(PROFILE)
    s.write(rows())
    s.abort()
    assert list(tmp_path.iterdir()) == []


def test_each_optional_sink_is_a_flag():
    args = _parser().parse_args(["--checkpoint=r", "--out=m.tif", "--confidence"])
    assert {s.name for s in sinks.OPTIONAL} == {"confidence", "probabilities"}
    assert args.confidence and not args.probabilities
    with pytest.raises(SystemExit):
        _parser().parse_args(["--checkpoint=r", "--out=m.tif", "--entropy"])


def test_a_patch_map_gdal_failed_to_write_is_named_and_never_renamed_into_place(tmp_path, caplog):
    """GDAL flushes a small raster's blocks at close and only logs its write errors there: rasterio
    raises nothing, and the corrupt file used to be renamed to its final name. What GDAL logged is
    in the one message, not in the log."""
    caplog.set_level(logging.INFO)
    maps = sinks.PatchMaps(str(tmp_path), "test", NAMES)
    pred = np.random.default_rng(0).integers(0, 3, (64, 64)).astype(np.uint8)
    with pytest.raises(UserError, match=rf"^{tmp_path}/test_00000.tif: cannot write this raster \(GDAL: "
                                        r".*\); is the disk full\?") as e, file_size_limit(1000):
        maps.write(0, pred, pred)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("rasterio")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # nothing printed: no georeferencing is by design
        assert maps.write(0, pred, pred) == "test_00000.tif"  # space again: written whole
    with rasterio.open(tmp_path / "test_00000.tif") as m:
        assert (m.read(1) == pred).all()


@pytest.mark.parametrize("limit", [2000, 20_000])
def test_a_map_gdal_failed_to_write_is_named_and_leaves_nothing(tmp_path, limit):
    profile = dict(PROFILE, width=300, height=300)
    s = sinks.Confidence(str(tmp_path / "map.tif"), NAMES)
    logits = np.random.default_rng(0).normal(size=(300, 300, 3)).astype(np.float32)
    valid = np.ones((300, 300), bool)
    with pytest.raises(UserError, match=rf"^{tmp_path}/map_confidence.tif: cannot write this raster"), \
            file_size_limit(limit):
        try:
            s.open(profile)
            s.write(Rows(0, 0, logits, valid, np.zeros_like(valid), valid))
            s.finish()
            s.commit()
        except BaseException:
            s.abort()  # as predict_mosaic does
            raise
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size,limit", [(300, 20_000), (1024, 1_100_000)],
                         ids=["flush at close", "COG copy"])
def test_a_map_that_fails_in_finish_is_one_line_naming_it_and_leaves_nothing(tmp_path, caplog, size,
                                                                             limit):
    """A real mosaic arrives in row blocks, so a full disk shows up in finish(): GDAL flushes its
    cached blocks at close (and only logs the errors), or the COG copy fails (a CPLE_*Error, which
    is not a RasterioError). Either way: one message naming the map, nothing under its name, and
    none of GDAL's own lines in the log."""
    caplog.set_level(logging.INFO)
    profile = dict(PROFILE, width=size, height=size)
    s = sinks.Confidence(str(tmp_path / "map.tif"), NAMES)
    logits = np.random.default_rng(0).normal(size=(size, size, 3)).astype(np.float32)
    valid = np.ones((size, size), bool)
    with file_size_limit(limit):
        s.open(profile)
        for y in range(0, size, 150):   # as RowWriter does
            block = slice(y, y + 150)
            s.write(Rows(0, y, logits[block], valid[block], np.zeros_like(valid[block]), valid[block]))
        with pytest.raises(UserError, match=rf"^{tmp_path}/map_confidence.tif: cannot write this raster "
                                            r"\(GDAL: .*\); is the disk full\?") as e:
            try:
                s.finish()
                s.commit()
            except BaseException:
                s.abort()  # as predict_mosaic does
                raise
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("rasterio")]
