"""The input contract shared by mosaic and Sentinel-2 reading: opening a raster named by a flag,
and finding the checkpoint's bands in a file (by band descriptions, or chosen by number)."""
from __future__ import annotations

from typing import Sequence

from absl import logging

from lcssl.errors import UserError


def open_raster(path: str, flag: str):
    """rasterio dataset of `path`, or a UserError naming the flag when it is not a readable raster."""
    import rasterio

    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
        raise UserError(f"{flag}={path}: cannot open it as a raster ({e})") from None


def band_indexes(path: str, flag: str, descriptions: Sequence[str | None], count: int,
                 expected: Sequence[str], chosen: str | None) -> list[int]:
    """1-based band indexes of `path` in the checkpoint's band order, or a UserError."""
    expected = list(expected)
    if chosen:
        try:
            indexes = [int(v) for v in chosen.split(",")]
        except ValueError:
            raise UserError(f"{flag}={chosen!r}: expected comma-separated band numbers "
                               f"(1-based), e.g. {','.join(str(i + 1) for i in range(len(expected)))}"
                               ) from None
        if len(indexes) != len(expected) or not all(1 <= i <= count for i in indexes):
            raise UserError(f"{flag}={chosen}: expected {len(expected)} band numbers in "
                               f"1..{count} (the checkpoint's bands {expected})")
        return indexes
    names = [d for d in descriptions if d]
    if len(names) == count:
        if list(descriptions)[:len(expected)] == expected and count == len(expected):
            return list(range(1, count + 1))
        raise UserError(
            f"{path}: the checkpoint expects the bands {expected} in this order, the file has "
            f"{list(descriptions)}; pass the file's band numbers in the checkpoint's order with "
            f"{flag} (e.g. {flag}=" + ",".join(
                str(list(descriptions).index(b) + 1) if b in descriptions else "?" for b in expected)
            + ") or use data with those bands.")
    if count != len(expected):
        raise UserError(f"{path}: the checkpoint expects {len(expected)} bands {expected}, the "
                           f"file has {count}; choose them with {flag}=i,j,... (1-based, in the "
                           "checkpoint's order).")
    logging.info("%s: no band descriptions; its %d bands are taken as %s.", path, count, expected)
    return list(range(1, count + 1))
