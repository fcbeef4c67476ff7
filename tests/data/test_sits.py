"""Sentinel-2 series preprocessing on hand-made arrays with known answers."""
import datetime

import numpy as np
import pytest

from lcssl.data import sits as S

D = datetime.date


def test_parse_product_date_takes_acquisition_not_processing_time():
    name = "S2A_MSIL2A_20210315T105031_N0214_R051_T31TCJ_20210316T140000"
    assert S.parse_product_date(name) == D(2021, 3, 15)
    assert S.parse_product_date("S2B_MSIL2A_20201231T000000_whatever") == D(2020, 12, 31)


@pytest.mark.parametrize("bad", ["S2A_MSIL2A_N0214_R051", "", "S2A_20210231T105031_x"])
def test_parse_product_date_names_the_string(bad):
    with pytest.raises(ValueError, match="product name"):
        S.parse_product_date(bad)


def test_crop_centered_window_and_channels_last():
    t, c, h, w = 2, 3, 10, 12
    sp = np.arange(t * c * h * w).reshape(t, c, h, w)
    crop = S.crop_centered(sp, (5, 6), 4)
    assert crop.shape == (t, 4, 4, c)
    # rows 3..6, cols 4..7
    np.testing.assert_array_equal(crop[1, :, :, 2], sp[1, 2, 3:7, 4:8])
    # a crop touching the border is fine, one past it is not
    assert S.crop_centered(sp, (2, 2), 4).shape == (t, 4, 4, c)
    assert S.crop_centered(sp, (8, 10), 4).shape == (t, 4, 4, c)
    for centre in [(1, 5), (5, 1), (9, 5), (5, 11)]:
        with pytest.raises(ValueError, match="outside the 10x12 super-patch"):
            S.crop_centered(sp, centre, 4)


def test_cloud_probability_mean_and_threshold():
    masks = np.zeros((3, 2, 2, 2), np.uint8)
    masks[0, 0] = [[100, 0], [0, 0]]          # one pixel fully cloudy
    masks[1, 1] = [[60, 60], [59, 0]]         # snow
    masks[2, 0] = [[50, 50], [50, 50]]
    masks[2, 1] = [[80, 0], [0, 0]]           # max(cloud, snow) per pixel
    np.testing.assert_allclose(S.cloud_probability(masks), [0.25, 0.4475, 0.575], rtol=1e-6)
    np.testing.assert_allclose(S.cloud_probability(masks, prob_threshold=0.6), [0.25, 0.5, 0.25])
    assert S.cloud_probability(masks).dtype == np.float32
    with pytest.raises(ValueError, match=r"\[T, 2, h, w\]"):
        S.cloud_probability(masks[:, :1])
    with pytest.raises(ValueError, match="0..100"):
        S.cloud_probability(masks + 101)


def test_encode_dates_doy_with_leap_year_and_days_since():
    dates = [D(2020, 12, 31), D(2021, 12, 31), D(2020, 3, 1), D(2021, 3, 1)]
    np.testing.assert_array_equal(S.encode_dates(dates, "doy"), [366, 365, 61, 60])
    np.testing.assert_array_equal(S.encode_dates(dates, "days_since:2021-01-01"), [-1, 364, -306, 59])
    assert S.encode_dates(dates, "doy").dtype == np.int32
    for bad in ["dayofyear", "days_since:2021-13-01", "days_since:"]:
        with pytest.raises(ValueError, match="date_encoding"):
            S.encode_dates(dates, bad)


def _series(values, h=1, w=1, c=2):
    """[T, h, w, c] where time step t is filled with values[t] (channel 1 holds 10 * value)."""
    values = np.asarray(values, np.uint16)
    out = np.empty((len(values), h, w, c), np.uint16)
    out[..., 0] = values[:, None, None]
    out[..., 1] = 10 * values[:, None, None]
    return out


def test_preprocess_filters_clouds_sorts_and_pads():
    dates = [D(2021, 5, 1), D(2021, 1, 10), D(2021, 3, 1), D(2021, 2, 1)]
    sits = _series([5, 1, 3, 2])
    cloud = np.array([0.1, 0.0, 0.9, 0.5], np.float32)   # 0.5 is kept (<= max_cloud)
    out, dates_enc, valid = S.preprocess_series(sits, cloud, dates, S.SitsOptions(max_cloud=0.5, max_dates=5))
    assert out.shape == (5, 1, 1, 2) and out.dtype == np.uint16
    np.testing.assert_array_equal(out[:, 0, 0, 0], [1, 2, 5, 0, 0])
    np.testing.assert_array_equal(out[:, 0, 0, 1], [10, 20, 50, 0, 0])
    np.testing.assert_array_equal(dates_enc, [10, 32, 121, 0, 0])
    np.testing.assert_array_equal(valid, [True, True, True, False, False])
    assert dates_enc.dtype == np.int32 and valid.dtype == bool


def test_preprocess_without_cloud_keeps_everything():
    dates = [D(2021, 1, 1), D(2021, 1, 2)]
    out, _, valid = S.preprocess_series(_series([7, 8]), None, dates, S.SitsOptions(max_dates=3))
    np.testing.assert_array_equal(out[:, 0, 0, 0], [7, 8, 0])
    np.testing.assert_array_equal(valid, [True, True, False])


def test_preprocess_monthly_means_on_the_15th():
    dates = [D(2021, 1, 3), D(2021, 1, 20), D(2021, 1, 28), D(2021, 3, 5), D(2021, 3, 25), D(2021, 4, 1)]
    sits = _series([1, 2, 4, 10, 11, 99])
    cloud = np.array([0, 0, 0, 0, 0, 1], np.float32)      # April only cloudy: month disappears
    out, dates_enc, valid = S.preprocess_series(
        sits, cloud, dates, S.SitsOptions(monthly=True, max_dates=4, date_encoding="days_since:2021-01-01"))
    # Jan mean 7/3 -> 2 (rounded), Mar mean 10.5 -> 10 (round half to even), channel 1: 70/3 -> 23, 105.
    np.testing.assert_array_equal(out[:, 0, 0, 0], [2, 10, 0, 0])
    np.testing.assert_array_equal(out[:, 0, 0, 1], [23, 105, 0, 0])
    np.testing.assert_array_equal(dates_enc, [14, 73, 0, 0])
    np.testing.assert_array_equal(valid, [True, True, False, False])


def test_preprocess_truncates_evenly_by_rank():
    dates = [D(2021, 1, 1) + datetime.timedelta(days=10 * i) for i in range(7)]
    out, dates_enc, valid = S.preprocess_series(_series(range(7)), None, dates, S.SitsOptions(max_dates=3))
    np.testing.assert_array_equal(out[:, 0, 0, 0], [0, 3, 6])      # first, middle, last
    np.testing.assert_array_equal(dates_enc, [1, 31, 61])
    assert valid.all()
    np.testing.assert_array_equal(S.subsample_evenly(5, 4), [0, 1, 3, 4])
    for num in range(1, 30):
        for keep in range(1, num + 1):
            idx = S.subsample_evenly(num, keep)
            assert len(set(idx.tolist())) == keep and idx[0] == 0 and (keep == 1 or idx[-1] == num - 1)


def test_preprocess_too_few_dates():
    dates = [D(2021, 1, 1), D(2021, 2, 1), D(2021, 3, 1)]
    cloud = np.array([0.9, 0.2, 0.8], np.float32)
    with pytest.raises(S.TooFewDates, match="found 1 of 3"):
        S.preprocess_series(_series([1, 2, 3]), cloud, dates, S.SitsOptions(min_clear_dates=2))
    # Monthly means count months: two clear dates in one month are one step.
    dates = [D(2021, 1, 1), D(2021, 1, 2)]
    with pytest.raises(S.TooFewDates):
        S.preprocess_series(_series([1, 2]), None, dates, S.SitsOptions(monthly=True, min_clear_dates=2))
    assert issubclass(S.TooFewDates, ValueError)


def test_preprocess_rejects_inconsistent_inputs():
    opts = S.SitsOptions()
    with pytest.raises(ValueError, match="expected 2 dates"):
        S.preprocess_series(_series([1, 2]), None, [D(2021, 1, 1)], opts)
    with pytest.raises(ValueError, match="cloud: expected shape"):
        S.preprocess_series(_series([1, 2]), np.zeros(3), [D(2021, 1, 1)] * 2, opts)
    with pytest.raises(ValueError, match="min_clear_dates"):
        S.SitsOptions(min_clear_dates=5, max_dates=4)
    with pytest.raises(ValueError, match="max_cloud"):
        S.SitsOptions(max_cloud=1.5)
