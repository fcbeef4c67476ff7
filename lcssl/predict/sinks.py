"""Where predictions go: GeoTIFF outputs behind one small interface.

A mosaic sink turns finished rows (lcssl.predict.blend.Rows) into uint8 bands of one raster:

    sink = Confidence("map.tif", class_names)
    sink.open(profile)              # raw tiled GeoTIFF under a temporary name
    sink.write(rows)                # any number of times, any order of row blocks
    sink.finish(); sink.commit()    # COG under a temporary name; renamed to its final name
    sink.abort()                    # on any failure: closes and removes its temporaries

A new output format is one subclass (its `name`, `suffix`, `help`, `bands` and `pixels`) added to
OPTIONAL; `python -m lcssl.predict` gets a `--<name>` flag for it. PatchMaps writes the per-patch
maps of a prepared split (`--records`) through the same GeoTIFF conventions (colour table, class
names, nodata 255).

A raster is renamed to its final name only after GDAL reported no error while writing it: GDAL
logs some write errors (a full disk while it flushes its blocks at close) without rasterio raising
anything, and the file is then corrupt (`_writing`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Sequence

import numpy as np

from lcssl.data import schema
from lcssl.errors import UserError

NODATA = schema.IGNORE_LABEL  # 255: no prediction, in the class map and the uint8 probability rasters
PROB_SCALE = 254  # probabilities are stored as round(p * 254), so 255 stays free for nodata

# The FLAIR #2 legend colours (IGNF/FLAIR-2 class table); other class names get _PALETTE in order.
FLAIR_COLOURS = {
    "building": "#db0e9a", "pervious surface": "#938e7b", "impervious surface": "#f80c00",
    "bare soil": "#a97101", "water": "#1553ae", "coniferous": "#194a26", "deciduous": "#46e483",
    "brushwood": "#f3a60d", "vineyard": "#660082", "herbaceous vegetation": "#55ff00",
    "agricultural land": "#fff30d", "plowed land": "#e4df7c", "other": "#000000",
}
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
            "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")


def class_colours(names: Sequence[str]) -> list[tuple[int, int, int]]:
    out, k = [], 0
    for name in names:
        hexa = FLAIR_COLOURS.get(name)
        if hexa is None:
            hexa = _PALETTE[k % len(_PALETTE)]
            k += 1
        out.append(tuple(int(hexa[i:i + 2], 16) for i in (1, 3, 5)))
    return out


def colour_table(names: Sequence[str]) -> dict[int, tuple[int, int, int, int]]:
    return {i: (*c, 255) for i, c in enumerate(class_colours(names))}


def qml_style(names: Sequence[str]) -> str:
    """A QGIS paletted-raster style: one entry per class, nodata transparent."""
    from xml.sax.saxutils import quoteattr

    entries = "\n".join(
        f'        <paletteEntry value="{i}" color="#{r:02x}{g:02x}{b:02x}" alpha="255" '
        f"label={quoteattr(name)}/>"
        for i, (name, (r, g, b)) in enumerate(zip(names, class_colours(names))))
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.28" styleCategories="AllStyleCategories">
  <pipe>
    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
  </pipe>
  <blendMode>0</blendMode>
</qgis>
"""


class _GdalErrors(logging.Handler):
    """Collects the errors GDAL signals through rasterio's logger (at INFO level, so that they
    are not shown: the caller turns them into one message)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.levelno >= logging.ERROR or "GDAL signalled an error" in text:
            self.messages.append(text.split("msg=", 1)[-1].strip("'\""))


# Where rasterio logs what GDAL signals: its environment's handler, and its error wrappers (a
# dataset's close).
_GDAL_LOGGERS = ("rasterio._env", "rasterio._err")


@contextlib.contextmanager
def _writing(final: str):
    """Raises a UserError naming `final` (the name the raster would get) when GDAL fails while the
    block writes to its temporary file, whether rasterio raises (a RasterioError, or a CPLE_*Error
    from a copy, which is not one) or GDAL only logs the error; what GDAL logged is absorbed into
    that one message. Under a rasterio.Env of its own (nested in the caller's, if any): without
    one, GDAL prints the errors of a dataset's close on stderr instead of logging them."""
    import rasterio
    import rasterio.errors
    from rasterio._err import CPLE_BaseError

    errors = _GdalErrors()
    loggers = [logging.getLogger(name) for name in _GDAL_LOGGERS]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.addHandler(errors)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        with rasterio.Env():
            yield
    except (rasterio.errors.RasterioError, CPLE_BaseError, OSError) as e:
        cause = e.__cause__ or e
        errors.messages.append(getattr(cause, "strerror", None) or str(cause))
    finally:
        for logger, (level, propagate) in zip(loggers, saved):
            logger.removeHandler(errors)
            logger.setLevel(level)
            logger.propagate = propagate
    if errors.messages:
        raise UserError(
            f"{final}: cannot write this raster (GDAL: {errors.messages[0]}); is the disk full? Free "
            "space (or choose another --out) and re-run the same command; nothing was written under "
            "this name") from None


def scaled(p: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Probabilities 0..1 -> uint8 round(p x 254), NODATA where not valid."""
    return np.where(valid, np.rint(p * PROB_SCALE), NODATA).astype(np.uint8)


# --- Mosaic sinks ----------------------------------------------------------------------------------

class Sink:
    """One uint8 raster on the mosaic's grid: `<out stem><suffix><out extension>`."""
    name = ""               # also the predict flag (--name) for an optional sink
    suffix = ""
    help = ""
    colour_table = False    # a paletted class raster (colour table, NEAREST overviews)

    def __init__(self, out_path: str, class_names: Sequence[str]):
        stem, ext = os.path.splitext(out_path)
        self.final = f"{stem}{self.suffix}{ext or '.tif'}" if self.suffix else out_path
        tag = f".tmp-{os.getpid()}"
        self.raw = f"{self.final}{tag}-raw.tif"     # uncompressed tiled GeoTIFF, written by rows
        self.tmp = f"{self.final}{tag}.tif"         # the COG, renamed to `final` at commit
        self.class_names = list(class_names)
        self.dataset = None

    @property
    def bands(self) -> int:
        return 1

    def pixels(self, rows) -> np.ndarray:
        """[bands, h, w] uint8 of finished rows (NODATA where not rows.valid)."""
        raise NotImplementedError

    def describe(self, ds) -> None:
        """Band descriptions and tags, written once before the COG copy."""

    def open(self, profile: dict) -> None:
        import rasterio

        with _writing(self.final):
            self.dataset = rasterio.open(
                self.raw, "w", driver="GTiff", dtype="uint8", count=self.bands, nodata=NODATA,
                tiled=True, blockxsize=256, blockysize=256, compress="none", BIGTIFF="IF_SAFER",
                width=profile["width"], height=profile["height"], crs=profile["crs"],
                transform=profile["transform"])
            if self.colour_table:  # before any pixel: the TIFF's photometric tag cannot change later
                self.dataset.write_colormap(1, colour_table(self.class_names))

    def write(self, rows) -> None:
        from rasterio.windows import Window

        h, w = rows.shape
        with _writing(self.final):
            self.dataset.write(self.pixels(rows), window=Window(rows.x0, rows.y0, w, h))

    def finish(self) -> None:
        """Raw GeoTIFF -> tiled, DEFLATE-compressed COG with overviews under the temporary name."""
        import rasterio.shutil

        with _writing(self.final):
            self.describe(self.dataset)
            self.dataset.update_tags(classes=",".join(self.class_names), nodata=str(NODATA),
                                     software="lcssl.predict")
            dataset, self.dataset = self.dataset, None
            dataset.close()
            rasterio.shutil.copy(self.raw, self.tmp, driver="COG", COMPRESS="DEFLATE",
                                 BLOCKSIZE=512, BIGTIFF="IF_SAFER",
                                 OVERVIEW_RESAMPLING="NEAREST" if self.colour_table else "AVERAGE")
        os.remove(self.raw)

    def commit(self) -> None:
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        if self.dataset is not None:
            self.dataset.close()
            self.dataset = None
        for p in (self.raw, self.tmp):
            if os.path.exists(p):
                os.remove(p)


class ClassMap(Sink):
    """The map: the blended argmax class, colour table and class names (always written)."""
    name = "class"
    colour_table = True

    def pixels(self, rows):
        return np.where(rows.valid, rows.classes, NODATA).astype(np.uint8)[None]

    def describe(self, ds):
        ds.update_tags(1, **{f"CLASS_{i}": n for i, n in enumerate(self.class_names)})
        ds.set_band_description(1, "class")


class Confidence(Sink):
    name = "confidence"
    suffix = "_confidence"
    help = "also write <out>_confidence.tif: max softmax x 254 (255 = nodata)"

    def pixels(self, rows):
        return scaled(rows.probabilities.max(-1), rows.valid)[None]

    def describe(self, ds):
        ds.set_band_description(1, "confidence")
        ds.update_tags(scale=f"1/{PROB_SCALE}", meaning="max softmax probability")


class Probabilities(Sink):
    name = "probabilities"
    suffix = "_probabilities"
    help = "also write <out>_probabilities.tif: one band per class, p x 254"

    @property
    def bands(self):
        return len(self.class_names)

    def pixels(self, rows):
        return np.moveaxis(scaled(rows.probabilities, rows.valid[..., None]), -1, 0)

    def describe(self, ds):
        for b, name in enumerate(self.class_names, start=1):
            ds.set_band_description(b, name)
        ds.update_tags(scale=f"1/{PROB_SCALE}", meaning="softmax probability per class")


class AerialOnly(Sink):
    """Where the map was predicted without Sentinel-2 (windows without a usable series, for a
    model trained with modality dropout): 1 where such a window contributes, 0 where every window
    had its series, 255 nodata. Written whenever the aerial-only fallback is on."""
    name = "aerial_only"
    suffix = "_aerial_only"

    def pixels(self, rows):
        return np.where(rows.valid, rows.aerial_only, NODATA).astype(np.uint8)[None]

    def describe(self, ds):
        ds.set_band_description(1, "aerial_only")
        ds.update_tags(meaning="1: predicted (at least partly) from the aerial image alone, "
                               "no usable Sentinel-2 series; 0: aerial + Sentinel-2")


OPTIONAL = (Confidence, Probabilities)      # each one a --<name> flag of python -m lcssl.predict


# --- Per-patch maps of a prepared split ---------------------------------------------------------

class PatchMaps:
    """`<out_dir>/<split>_<index>.tif` per patch: band 1 the predicted class, band 2 the label
    (255 = ignore), uint8, colour table and class names (records carry no georeferencing, so
    neither do these); each written to a temporary name, then renamed."""

    def __init__(self, out_dir: str, split: str, class_names: Sequence[str]):
        self.out_dir, self.split, self.class_names = out_dir, split, list(class_names)

    def write(self, index: int, pred: np.ndarray, label: np.ndarray) -> str:
        import rasterio
        import rasterio.errors

        name = f"{self.split}_{index:05d}.tif"
        tmp = os.path.join(self.out_dir, f".{name}.tmp-{os.getpid()}.tif")
        try:
            with warnings.catch_warnings():   # records carry no georeferencing, by design
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                with _writing(os.path.join(self.out_dir, name)), rasterio.open(
                        tmp, "w", driver="GTiff", width=pred.shape[1], height=pred.shape[0],
                        count=2, dtype="uint8", nodata=NODATA) as dst:
                    dst.write_colormap(1, colour_table(self.class_names))   # before the pixels
                    dst.write(np.stack([pred, label]).astype(np.uint8))
                    dst.set_band_description(1, "prediction")
                    dst.set_band_description(2, "label")
                    dst.update_tags(classes=",".join(self.class_names))
            os.replace(tmp, os.path.join(self.out_dir, name))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return name

    def finish(self) -> None:
        from lcssl import files

        files.atomic_write_bytes(os.path.join(self.out_dir, f"{self.split}.qml"),
                                 qml_style(self.class_names).encode())
