"""Sentinel-2 time-series preprocessing: crop, cloud scores, date filtering, monthly means, padding.

Pure numpy, so data_prep and tests use it without TensorFlow or rasterio. The entry point is
`preprocess_series`; the other functions are its steps and are public for readers and tests.

Shapes: super-patch [T, C, H, W] (FLAIR #2 .npy layout, channels-first); everything returned is
channels-last: series [T, h, w, C].
"""
from __future__ import annotations

import dataclasses
import datetime
import re
from typing import Optional, Sequence

import numpy as np

# Sentinel-2 product names carry the sensing start as YYYYMMDDTHHMMSS (ESA naming convention,
# e.g. S2A_MSIL2A_20210315T105031_N0214_R051_T31TCJ_20210315T140000); the first such token is the
# acquisition, the last one the processing time.
_PRODUCT_DATETIME = re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})T\d{6}(?!\d)")

# Monthly means are dated on the 15th, as in the FLAIR #2 baseline (IGNF/FLAIR-2, monthly_image).
MONTH_DAY = 15


class TooFewDates(ValueError):
    """Fewer usable dates than `SitsOptions.min_clear_dates` remain after cloud filtering."""


@dataclasses.dataclass(frozen=True)
class SitsOptions:
    """How a raw series becomes a fixed-length one.

    max_cloud: keep dates whose cloud score (see `cloud_probability`) is <= max_cloud.
    min_clear_dates: raise TooFewDates when fewer time steps survive filtering (and monthly means).
    monthly: replace the kept dates by one mean per calendar month, dated on the 15th.
    max_dates: output length T; shorter series are padded, longer ones subsampled evenly by rank.
      12 = one step per month of a year (the monthly option's natural length).
    date_encoding: 'doy' (day of year 1..366) or 'days_since:YYYY-MM-DD'.
    """

    max_cloud: float = 0.5
    min_clear_dates: int = 2
    monthly: bool = False
    max_dates: int = 12
    date_encoding: str = "doy"

    def __post_init__(self):
        if not 0.0 <= self.max_cloud <= 1.0:
            raise ValueError(f"SitsOptions.max_cloud: expected a probability in [0, 1], got {self.max_cloud}")
        if self.max_dates < 1:
            raise ValueError(f"SitsOptions.max_dates: expected >= 1, got {self.max_dates}")
        if not 0 <= self.min_clear_dates <= self.max_dates:
            raise ValueError(
                f"SitsOptions.min_clear_dates: expected 0..max_dates={self.max_dates}, "
                f"got {self.min_clear_dates}")
        _parse_encoding(self.date_encoding)


def parse_product_date(name: str) -> datetime.date:
    """Acquisition date of a Sentinel-2 product name (first YYYYMMDDTHHMMSS token)."""
    match = _PRODUCT_DATETIME.search(name)
    if match is None:
        raise ValueError(
            f"Sentinel-2 product name {name!r}: expected a YYYYMMDDTHHMMSS acquisition token, found none")
    year, month, day = (int(g) for g in match.groups())
    try:
        return datetime.date(year, month, day)
    except ValueError as e:
        raise ValueError(f"Sentinel-2 product name {name!r}: invalid acquisition date ({e})") from None


def crop_centered(superpatch: np.ndarray, centre_rc: Sequence[int], size: int) -> np.ndarray:
    """[T, C, H, W] -> [T, size, size, C]: rows r - size//2 .. r - size//2 + size - 1 (same for cols).

    This is the FLAIR #2 baseline crop (centroid +- size/2), so the crop's geometric centre is the
    corner of pixel (r, c). Works on memory-mapped arrays and returns an in-memory copy.
    """
    if superpatch.ndim != 4:
        raise ValueError(f"super-patch: expected 4 dims [T, C, H, W], got shape {superpatch.shape}")
    _, _, height, width = superpatch.shape
    row, col = (int(v) for v in centre_rc)
    top, left = row - size // 2, col - size // 2
    if top < 0 or left < 0 or top + size > height or left + size > width:
        raise ValueError(
            f"crop of {size}x{size} around centre (row={row}, col={col}) covers rows {top}..{top + size - 1}, "
            f"cols {left}..{left + size - 1}: outside the {height}x{width} super-patch")
    crop = superpatch[:, :, top:top + size, left:left + size]
    return np.ascontiguousarray(np.moveaxis(np.asarray(crop), 1, -1))


def cloud_probability(masks: np.ndarray, prob_threshold: Optional[float] = None) -> np.ndarray:
    """[T, 2, h, w] cloud and snow probabilities (uint8 percent 0..100) -> [T] float32 score 0..1.

    A pixel's cover is max(cloud, snow) / 100. Without `prob_threshold` the score is the mean cover
    over the crop. With it, the score is the fraction of pixels whose cover is >= prob_threshold
    (0..1), the FLAIR #2 baseline's filter (filter_dates: proba_threshold=60 %, area_threshold=0.5);
    the baseline adds the cloud and snow counts, we count a pixel once when either is set.
    """
    masks = np.asarray(masks)
    if masks.ndim != 4 or masks.shape[1] != 2:
        raise ValueError(f"cloud/snow masks: expected shape [T, 2, h, w], got {masks.shape}")
    if masks.size and (masks.min() < 0 or masks.max() > 100):
        raise ValueError(
            f"cloud/snow masks: expected probabilities 0..100, found {masks.min()}..{masks.max()}")
    cover = masks.max(axis=1).astype(np.float32) / 100.0
    if prob_threshold is None:
        return cover.mean(axis=(1, 2)).astype(np.float32)
    if not 0.0 <= prob_threshold <= 1.0:
        raise ValueError(f"prob_threshold: expected a probability in [0, 1], got {prob_threshold}")
    # Compare in integer percent so 0.6 selects exactly the pixels >= 60 of the uint8 masks.
    covered = masks.max(axis=1) >= round(prob_threshold * 100)
    return covered.mean(axis=(1, 2)).astype(np.float32)


def clear_dates(cloud: np.ndarray, max_cloud: float) -> np.ndarray:
    """Indices of the dates whose cloud score is <= max_cloud, in input order."""
    return np.flatnonzero(np.asarray(cloud) <= max_cloud)


def monthly_means(sits: np.ndarray, dates: Sequence[datetime.date]):
    """Average the dates of each calendar month: [T, h, w, C] -> ([M, h, w, C] float64, M dates).

    Months without dates are skipped; each mean is dated on the 15th (MONTH_DAY), months ascending.
    """
    months = sorted({(d.year, d.month) for d in dates})
    means, month_dates = [], []
    for year, month in months:
        idx = [i for i, d in enumerate(dates) if (d.year, d.month) == (year, month)]
        means.append(np.asarray(sits[idx], dtype=np.float64).mean(axis=0))
        month_dates.append(datetime.date(year, month, MONTH_DAY))
    shape = (0,) + tuple(sits.shape[1:])
    return (np.stack(means) if means else np.zeros(shape)), month_dates


def _parse_encoding(encoding: str) -> Optional[datetime.date]:
    """None for 'doy', the reference date for 'days_since:YYYY-MM-DD'."""
    if encoding == "doy":
        return None
    prefix = "days_since:"
    if encoding.startswith(prefix):
        try:
            return datetime.date.fromisoformat(encoding[len(prefix):])
        except ValueError:
            pass
    raise ValueError(f"date_encoding: expected 'doy' or 'days_since:YYYY-MM-DD', got {encoding!r}")


def encode_dates(dates: Sequence[datetime.date], encoding: str) -> np.ndarray:
    """Dates -> [T] int32: day of year 1..366 ('doy') or days since a reference (may be negative)."""
    reference = _parse_encoding(encoding)
    if reference is None:
        values = [d.timetuple().tm_yday for d in dates]
    else:
        values = [(d - reference).days for d in dates]
    return np.asarray(values, dtype=np.int32).reshape(len(values))


def subsample_evenly(num: int, keep: int) -> np.ndarray:
    """`keep` indices of 0..num-1 evenly spaced by rank, first and last included, ascending."""
    if keep >= num:
        return np.arange(num)
    # Spacing (num-1)/(keep-1) >= 1, so rounding keeps the indices distinct.
    return np.round(np.linspace(0, num - 1, keep)).astype(np.int64)


def _as_uint16(sits: np.ndarray) -> np.ndarray:
    if sits.dtype == np.uint16:
        return sits
    values = np.asarray(sits, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("SITS: expected finite reflectances, found NaN or inf")
    if values.size and (values.min() < 0 or values.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"SITS: expected values in uint16 range, found {values.min()}..{values.max()}")
    return np.rint(values).astype(np.uint16)


def preprocess_series(sits: np.ndarray, cloud: Optional[np.ndarray], dates: Sequence[datetime.date],
                      opts: SitsOptions):
    """Raw series -> fixed-length series. Steps, in order:

    1. sort by date (stable, so same-day acquisitions keep their order);
    2. drop dates with cloud > opts.max_cloud (skipped when `cloud` is None);
    3. optionally average each calendar month (rounded to uint16, dated on the 15th);
    4. TooFewDates when fewer than opts.min_clear_dates steps remain;
    5. more than opts.max_dates steps: keep max_dates evenly spaced by rank (first and last kept), which
       preserves the coverage of the season that phenology needs;
    6. encode dates and pad at the end with zeros, date 0, valid False.

    sits: [T, h, w, C] (uint16 reflectance); cloud: [T] score 0..1 or None; dates: T dates.
    Returns (sits [max_dates, h, w, C] uint16, dates [max_dates] int32, valid [max_dates] bool).
    """
    sits = np.asarray(sits)
    if sits.ndim != 4:
        raise ValueError(f"SITS: expected 4 dims [T, h, w, C], got shape {sits.shape}")
    num_dates = sits.shape[0]
    if len(dates) != num_dates:
        raise ValueError(f"SITS dates: expected {num_dates} dates (one per time step), got {len(dates)}")
    if cloud is not None:
        cloud = np.asarray(cloud, dtype=np.float32)
        if cloud.shape != (num_dates,):
            raise ValueError(f"SITS cloud: expected shape ({num_dates},), got {cloud.shape}")
        if not np.all(np.isfinite(cloud)):
            raise ValueError("SITS cloud: expected finite probabilities, found NaN or inf")

    order = sorted(range(num_dates), key=lambda i: dates[i])
    if cloud is not None:
        order = [i for i in order if cloud[i] <= opts.max_cloud]
    kept_dates = [dates[i] for i in order]
    kept = sits[order]
    if opts.monthly:
        means, kept_dates = monthly_means(kept, kept_dates)
        kept = np.rint(means)
    if len(kept_dates) < opts.min_clear_dates:
        raise TooFewDates(
            f"SITS: expected >= {opts.min_clear_dates} clear dates (max_cloud={opts.max_cloud}, "
            f"monthly={opts.monthly}), found {len(kept_dates)} of {num_dates}")
    pick = subsample_evenly(len(kept_dates), opts.max_dates)
    kept = _as_uint16(kept[pick])
    kept_dates = [kept_dates[i] for i in pick]

    num_kept = len(kept_dates)
    out = np.zeros((opts.max_dates,) + sits.shape[1:], dtype=np.uint16)
    out[:num_kept] = kept
    dates_enc = np.zeros(opts.max_dates, dtype=np.int32)
    dates_enc[:num_kept] = encode_dates(kept_dates, opts.date_encoding)
    valid = np.zeros(opts.max_dates, dtype=bool)
    valid[:num_kept] = True
    return out, dates_enc, valid
