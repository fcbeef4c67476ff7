"""Sentinel-2 per window: cloud masks used per date when only some dates have them, and a date
that counts when enough of its crop has data (pure numpy, plus a folder of tiny GeoTIFFs)."""
import datetime
import logging

import numpy as np
import rasterio
from rasterio.transform import from_origin

from lcssl.data import schema
from lcssl.data import sits as sits_lib
from lcssl.predict.sits import find_sits, window_series

DATES = [datetime.date(2021, m, 10) for m in (3, 5, 7, 9)]
OPTS = sits_lib.SitsOptions(max_cloud=0.5, min_clear_dates=2, max_dates=4)


def series():
    return np.stack([np.full((4, 4, 2), 1000.0 * (t + 1)) for t in range(4)]).astype(np.float32)


def test_dates_without_a_mask_are_clear_and_the_others_cloud_filtered():
    cloudy = np.zeros((2, 4, 4), np.uint8)
    cloudy[0] = 90
    clear = np.zeros((2, 4, 4), np.uint8)
    masks = [None, cloudy, clear, None]               # masks for the 2nd and 3rd dates only
    sits, dates, valid = window_series(series(), np.ones(4, bool), masks, DATES, OPTS, None)
    assert valid.tolist() == [True, True, True, False]
    assert sits[:3, 0, 0, 0].tolist() == [1000, 3000, 4000]   # the cloudy 2nd date dropped


def test_a_date_counts_when_enough_of_its_crop_has_data():
    has_data = np.ones((4, 4, 4), bool)
    has_data[1, :, 3] = False                          # 3/4 of the 2nd date's crop has data
    raw = series()
    raw[1, :, 3] = 0                                   # nodata there
    cover = has_data.mean(axis=(1, 2))
    strict = window_series(raw, cover >= 1.0, None, DATES, OPTS, None, has_data=has_data)
    assert strict[2].sum() == 3
    sits, _, valid = window_series(raw, cover >= 0.7, None, DATES, OPTS, None, has_data=has_data)
    assert valid.all()
    assert (sits[1] == 2000).all()                     # nodata filled with the date's mean there
    # Clouds are scored over the pixels with data: a cloud over 2 of them is 2/12, not 2/16.
    masks = np.zeros((4, 2, 4, 4), np.uint8)
    masks[1, 0, 0, :2] = 100
    masks[1, 0, :, 3] = 100                            # "clouds" over the nodata column: ignored
    opts = sits_lib.SitsOptions(max_cloud=0.17, min_clear_dates=2, max_dates=4)
    assert window_series(raw, cover >= 0.7, masks, DATES, opts, None, has_data=has_data)[2].all()
    opts = sits_lib.SitsOptions(max_cloud=0.16, min_clear_dates=2, max_dates=4)
    assert window_series(raw, cover >= 0.7, masks, DATES, opts, None,
                         has_data=has_data)[2].sum() == 3


def test_a_folder_with_masks_for_some_dates(tmp_path, caplog):
    for i, d in enumerate(DATES):
        with rasterio.open(tmp_path / f"S2_{d:%Y%m%d}.tif", "w", driver="GTiff", width=4, height=4,
                           count=10, dtype="uint16", crs="EPSG:2154",
                           transform=from_origin(650_000, 6_860_000, 10, 10)) as dst:
            for b, name in enumerate(schema.S2_BANDS, start=1):
                dst.set_band_description(b, name)
        if i in (1, 2):
            with rasterio.open(tmp_path / f"S2_{d:%Y%m%d}_mask.tif", "w", driver="GTiff",
                               width=4, height=4, count=2, dtype="uint8", crs="EPSG:2154",
                               transform=from_origin(650_000, 6_860_000, 10, 10)):
                pass
    caplog.set_level(logging.WARNING, logger="absl")
    found = find_sits(str(tmp_path), list(schema.S2_BANDS))
    assert [d.mask_path is not None for d in found] == [False, True, True, False]
    assert "2 of 4 dates have no cloud mask (2021-03-10, 2021-09-10)" in caplog.text
