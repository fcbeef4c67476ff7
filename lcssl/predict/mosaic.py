"""predict_mosaic: the class map of a GeoTIFF mosaic, window by window, written as it goes.

    inputs (aerial windows + their Sentinel-2 crops, batched)  -> MosaicInputs
      -> device step (normalize, forward, TTA, weigh)           -> model.DeviceStep
      -> finished rows of each column block                     -> blend.Blender
      -> class map, confidence, probabilities, aerial-only flag -> sinks

Guarantees (docs/DESIGN.md, "Prediction"): the checkpoint's input contract is applied (bands and
order, normalization, gsd, series preprocessing) or the input refused; the map is on the mosaic's
own grid and CRS (a mosaic at another gsd is resampled window by window); windows overlap and are
blended with a Hann weight, so seams do not show and the map does not depend on the column blocks;
memory is bounded by the block width; aerial nodata and pixels no usable window covers are 255;
files go to temporary names and are renamed at the end.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Iterator

from absl import logging
import numpy as np

from lcssl import files
from lcssl.errors import UserError
from lcssl.predict import sinks as sinks_lib
from lcssl.predict.blend import Blender, Rows
from lcssl.predict.inputs import band_indexes, open_raster
from lcssl.predict.model import (TTA_VIEWS, DeviceStep, global_batch_size, load_model,
                                 load_spec, trained_without_sits)
from lcssl.predict.sits import SitsReader, check_overlap, find_sits, sits_options, window_series
from lcssl.predict.windows import Plan, Window, hann_weight

DEFAULT_BLOCK_WIDTH = 4096
WITHOUT_SITS = ("auto", "nodata")   # windows without a usable series: aerial-only if trained so, or nodata


def predict_mosaic(*args, **kwargs) -> dict:
    """Writes the class map (and the optional sinks asked for, and a .qml style) of the mosaic
    `aerial_path` with the model of `checkpoint` (a run dir, or the tuple load_model returns).
    Returns a summary dict (paths, sizes, windows, timings). Arguments: _predict_mosaic.

    GDAL's block cache defaults to 5% of the machine's memory; it is capped at 256 MiB here (unless
    GDAL_CACHEMAX is set) so that memory stays bounded by the block width, not by the machine.
    """
    import rasterio

    cache = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": 256}   # MiB
    with rasterio.Env(**cache):
        return _predict_mosaic(*args, **kwargs)


def _check_options(overlap, block_width, tta, without_sits, min_clear_fraction) -> None:
    if not 0 <= overlap < 1:
        raise UserError(f"--overlap={overlap}: expected a fraction of the window in [0, 1)")
    if block_width < 1:
        raise UserError(f"--block-width={block_width}: expected a positive number of pixels")
    if tta not in TTA_VIEWS:
        raise UserError(f"--tta={tta}: expected one of {sorted(TTA_VIEWS)}")
    if without_sits not in WITHOUT_SITS:
        raise UserError(f"--without-sits={without_sits}: expected one of {list(WITHOUT_SITS)}")
    if not 0 < min_clear_fraction <= 1:
        raise UserError(f"--min-clear-fraction={min_clear_fraction}: expected a fraction in (0, 1]")


def check_out_path(out_path: str) -> None:
    """UserError unless `out_path` names a file in an existing folder this process can write to."""
    if os.path.isdir(out_path):
        raise UserError(f"--out={out_path} is a folder; expected a file name such as MAP.tif")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise UserError(f"--out={out_path}: the folder {out_dir} does not exist")
    try:
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise UserError(f"--out={out_path}: cannot write in {out_dir} ({e.strerror}); choose a "
                        "folder you can write to") from None


def open_aerial(aerial_path: str):
    """The mosaic as a rasterio dataset, checked for what needs no checkpoint: georeferenced,
    north-up, square pixels, uint8."""
    src = open_raster(aerial_path, "--aerial")
    try:
        if src.crs is None:
            raise UserError(f"--aerial={aerial_path} has no CRS; the map keeps the mosaic's CRS "
                            "and the series is located through it, so it must be georeferenced")
        t = src.transform
        if t.b != 0 or t.d != 0 or t.e >= 0:
            raise UserError(f"--aerial={aerial_path}: a rotated or south-up grid ({tuple(t)[:6]}) "
                            "is not supported; warp it north-up first (gdalwarp)")
        if not math.isclose(abs(t.a), abs(t.e), rel_tol=1e-6):
            raise UserError(f"--aerial={aerial_path}: non-square pixels {t.a} x {-t.e} m")
        if any(dt != "uint8" for dt in src.dtypes):
            raise UserError(f"--aerial={aerial_path}: the checkpoint was trained on uint8 aerial "
                            f"bands (0..255), the mosaic is {src.dtypes[0]}; rescale it to uint8 "
                            "as the training patches were")
    except BaseException:
        src.close()
        raise
    return src


class MosaicInputs:
    """Host batches of a mosaic's windows: aerial [B, S, S, Ca] (resampled to the model's gsd),
    their Sentinel-2 series [B, T, n, n, Cs] with dates and validity, and per window 'ok' (it has
    a prediction) and 'aerial_only' (predicted without Sentinel-2). Windows without any valid
    aerial pixel are skipped; counts of what happened are kept in `counts`."""

    def __init__(self, src, indexes: list[int], spec: dict, win: int, batch_size: int,
                 sits_reader: SitsReader | None, sits_opts, prob_threshold, fallback: bool,
                 min_clear_fraction: float):
        import rasterio

        self.src, self.indexes, self.win, self.batch_size = src, indexes, win, batch_size
        self.size = int(spec["model"]["aerial_size"])
        self.n_sits, self.sits_bands = int(spec["sits"]["size"]), len(spec["sits"]["bands"])
        self.reader, self.opts, self.prob_threshold = sits_reader, sits_opts, prob_threshold
        self.fallback, self.min_clear_fraction = fallback, min_clear_fraction
        self.needs_sits = sits_opts is not None
        self.fill = np.asarray(spec["aerial"]["mean"], np.float32)[:, None, None]
        # No nodata value, mask band or alpha: every pixel is valid, no mask to read.
        self.all_valid = all(flags == [rasterio.enums.MaskFlags.all_valid]
                             for flags in src.mask_flag_enums)
        self.counts = {"windows": 0, "windows_without_sits": 0, "windows_aerial_only": 0,
                       "batches": 0}

    def valid_mask(self, x0: int, y0: int, w: int, h: int) -> np.ndarray | None:
        """[h, w] bool aerial pixels with data, or None when the mosaic has no nodata."""
        from rasterio.windows import Window

        if self.all_valid:
            return None
        return self.src.dataset_mask(window=Window(x0, y0, w, h)) > 0

    def read_aerial(self, w: Window) -> np.ndarray | None:
        """[S, S, Ca] float32 of one window, or None when it has no valid aerial pixel."""
        from rasterio.enums import Resampling
        from rasterio.windows import Window as RWindow

        window, size = RWindow(w.x, w.y, self.win, self.win), self.size
        # Finer mosaic: area average (no aliasing); coarser: bilinear.
        resample = {} if self.win == size else {
            "out_shape": (len(self.indexes), size, size),
            "resampling": Resampling.average if self.win > size else Resampling.bilinear}
        aerial = self.src.read(self.indexes, window=window, **resample).astype(np.float32)
        if not self.all_valid:
            mask = self.src.dataset_mask(window=window, **({} if self.win == size else {
                "out_shape": (size, size)})) > 0
            if not mask.any():
                return None
            aerial = np.where(mask[None], aerial, self.fill)  # nodata -> band mean (0 normalized)
        return np.moveaxis(aerial, 0, -1)

    def batches(self, windows) -> Iterator[tuple[dict, list[Window]]]:
        pending = []
        for w in windows:
            aerial = self.read_aerial(w)
            if aerial is not None:
                pending.append((w, aerial))
            if len(pending) == self.batch_size:
                yield self.assemble(pending)
                pending = []
        if pending:
            yield self.assemble(pending)

    def assemble(self, items) -> tuple[dict, list[Window]]:
        b, size = self.batch_size, self.size
        num_dates = self.opts.max_dates if self.needs_sits else 1
        host = {"aerial": np.zeros((b, size, size, len(self.indexes)), np.float32),
                "sits": np.zeros((b, num_dates, self.n_sits, self.n_sits, self.sits_bands),
                                 np.float32),
                "dates": np.zeros((b, num_dates), np.int32),
                "sits_valid": np.zeros((b, num_dates), bool),
                "ok": np.zeros((b,), np.float32),
                "aerial_only": np.zeros((b,), bool)}
        if not self.needs_sits:
            host["sits_valid"][:] = True
        for i, (_, aerial) in enumerate(items):
            host["aerial"][i] = aerial
            host["ok"][i] = 1.0
        if self.needs_sits:
            for i, got in enumerate(self.series([w for w, _ in items])):
                if got is None:
                    self.counts["windows_without_sits"] += 1
                    if self.fallback:
                        host["aerial_only"][i] = True
                        self.counts["windows_aerial_only"] += 1
                    else:
                        host["ok"][i] = 0.0
                    continue
                host["sits"][i], host["dates"][i], host["sits_valid"][i] = got
        self.counts["windows"] += len(items)
        self.counts["batches"] += 1
        return host, [w for w, _ in items]

    def series(self, windows: list[Window]) -> list:
        """Per window: (sits, dates, valid) as in training, or None without a usable series."""
        if self.reader is None:
            return [None] * len(windows)
        centres = []
        for w in windows:
            cx, cy = self.src.transform @ (w.x + self.win / 2, w.y + self.win / 2)
            centres.append(self.reader.centre_px(cx, cy))
        dates = [d.date for d in self.reader.dates]
        out = []
        for crop in self.reader.crops(centres):
            usable = crop.has_data.mean(axis=(1, 2)) >= self.min_clear_fraction
            out.append(window_series(crop.sits, usable, crop.cloud, dates, self.opts,
                                     self.prob_threshold, has_data=crop.has_data))
        return out


def _predict_mosaic(checkpoint: str | tuple, aerial_path: str, sits_path: str | None, out_path: str,
                    *, overlap: float = 0.25, batch_size: int | None = None,
                    block_width: int = DEFAULT_BLOCK_WIDTH, aerial_bands: str | None = None,
                    sits_bands: str | None = None, tta: str = "none", without_sits: str = "auto",
                    min_clear_fraction: float = 1.0, progress: bool = True, mesh=None,
                    **outputs: bool) -> dict:
    """overlap: fraction of the window shared with each neighbour; batch_size: windows per step
    over all devices (default 4 per device); block_width: mosaic columns processed at once (memory
    grows with it); aerial_bands / sits_bands: 1-based band numbers in the checkpoint's order;
    tta: 'none', 'flips' or 'd4' (model.with_tta); without_sits: 'auto' (windows without a usable
    series are predicted from the aerial image alone when the model was trained with modality
    dropout, flagged in <out>_aerial_only.tif) or 'nodata'; min_clear_fraction: a date counts for
    a window when at least this fraction of its crop has data; outputs: name=True per optional
    sink (sinks.OPTIONAL: confidence, probabilities)."""
    import jax
    from tqdm import tqdm

    from lcssl import models, sharding
    from lcssl.data import normalize

    t_start = time.perf_counter()
    # --- Flags and files: everything that needs no checkpoint, before restoring it ---------------
    optional = {s.name: s for s in sinks_lib.OPTIONAL}
    unknown = sorted(set(outputs) - set(optional))
    if unknown:
        raise TypeError(f"predict_mosaic: unknown outputs {unknown}; known: {sorted(optional)}")
    if jax.process_count() > 1:
        raise UserError("lcssl.predict runs in one process (all its local devices); start it "
                        "without COORDINATOR_ADDRESS / NUM_PROCESSES")
    _check_options(overlap, block_width, tta, without_sits, min_clear_fraction)
    if sits_path and not os.path.exists(sits_path):
        raise UserError(f"--sits={sits_path}: no such file or folder")
    check_out_path(out_path)
    mesh = mesh or sharding.make_mesh()
    batch_size = global_batch_size(batch_size, mesh)

    src = open_aerial(aerial_path)
    sits_reader = None
    out = []
    try:
        # --- The model's contract (its input spec: bands, sizes, series), checked before the
        # weights are restored ---------------------------------------------------------------------
        spec = load_spec(checkpoint) if isinstance(checkpoint, str) else checkpoint[1]
        model_cfg = spec["model"]
        size, gsd_m = int(model_cfg["aerial_size"]), float(spec["aerial"]["gsd_m"])
        variant = models.variant(model_cfg)
        needs_sits = variant != "unet"
        trained_alone = trained_without_sits(model_cfg)
        fallback = (needs_sits and without_sits == "auto" and trained_alone
                    and (isinstance(checkpoint, str) or hasattr(checkpoint[0], "aerial_only")))
        stats = normalize.stats_from_card(spec)
        opts, prob_threshold = sits_options(spec) if needs_sits else (None, None)
        indexes = band_indexes(aerial_path, "--aerial-bands", src.descriptions, src.count,
                               spec["aerial"]["bands"], aerial_bands)
        mosaic_gsd = abs(src.transform.a)
        win = _window_px(src, aerial_path, size, gsd_m)
        plan = Plan.make(src.width, src.height, win, overlap)

        # --- Sentinel-2: dates, contract, footprint -------------------------------------------------
        if needs_sits:
            sits_reader = _sits_reader(sits_path, sits_bands, spec, src, opts, variant, fallback)

        # --- The model -------------------------------------------------------------------------------
        logits_fn, spec, class_names = (load_model(checkpoint, mesh) if isinstance(checkpoint, str)
                                        else checkpoint)
        inputs = MosaicInputs(src, indexes, spec, win, batch_size, sits_reader, opts,
                              prob_threshold, fallback, min_clear_fraction)
        step = DeviceStep(logits_fn, stats, mesh, hann_weight(win), win, tta,
                          aerial_only=fallback)
        if tta != "none":
            logging.info("Test-time augmentation %r: %d forward passes per window.", tta,
                         len(TTA_VIEWS[tta]))

        # --- Outputs ----------------------------------------------------------------------------------
        kinds = [sinks_lib.ClassMap] + [optional[k] for k, on in outputs.items() if on]
        out = [kind(out_path, class_names) for kind in kinds]
        if fallback:
            out.append(sinks_lib.AerialOnly(out_path, class_names))
        for sink in out:
            sink.open(dict(width=src.width, height=src.height, crs=src.crs, transform=src.transform))

        total_km2 = src.width * src.height * mosaic_gsd ** 2 / 1e6
        bar = tqdm(total=round(total_km2, 4), unit="km2", disable=not progress, desc="predict",
                   bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} km2 [{elapsed}<{remaining}]")
        emit = RowWriter(out, inputs, bar, mosaic_gsd ** 2 / 1e6)

        _predict_blocks(plan, block_width, inputs, step, emit, len(class_names), src.height)
        bar.close()

        for sink in out:
            sink.finish()
        qml = os.path.splitext(out_path)[0] + ".qml"
        files.atomic_write_bytes(qml, sinks_lib.qml_style(class_names).encode())
        for sink in out:
            sink.commit()
    except BaseException:
        for sink in out:
            sink.abort()
        raise
    finally:
        src.close()
        if sits_reader is not None:
            sits_reader.close()

    counts = inputs.counts
    elapsed = time.perf_counter() - t_start
    area_km2 = src.width * src.height * mosaic_gsd ** 2 / 1e6
    share = emit.no_prediction / (src.width * src.height)
    _log_without_sits(counts, share, fallback, trained_alone, model_cfg,
                      out[-1].final if fallback else None)
    summary = {"out": {s.name: s.final for s in out}, "qml": qml,
               "width": src.width, "height": src.height, "window_px": win,
               "stride_px": plan.stride, "area_km2": area_km2, "seconds": elapsed,
               "km2_per_hour": area_km2 / elapsed * 3600, "no_prediction_fraction": share,
               "tta_views": len(TTA_VIEWS[tta]), **counts}
    logging.info("Wrote %s (%d x %d px, %.3f km2) in %.1f s: %.2f km2/h, %d windows",
                 out_path, src.width, src.height, area_km2, elapsed, summary["km2_per_hour"],
                 counts["windows"])
    return summary


def _window_px(src, aerial_path: str, size: int, gsd_m: float) -> int:
    """The mosaic's window covering the checkpoint's `size` px at `gsd_m`: the same size when the
    resolutions agree, else resampled to the model's input and back."""
    mosaic_gsd = abs(src.transform.a)
    win = size if math.isclose(mosaic_gsd, gsd_m, rel_tol=1e-3) else round(size * gsd_m / mosaic_gsd)
    if win != size:
        logging.info("The mosaic is at %g m, the checkpoint at %g m: each %d px window is resampled "
                     "to %d px (area average when finer, bilinear when coarser) and its logits back "
                     "(bilinear); the map stays on the mosaic's grid.", mosaic_gsd, gsd_m, win, size)
    if src.width < win or src.height < win:
        raise UserError(f"--aerial={aerial_path}: {src.width} x {src.height} px is smaller "
                        f"than one window ({win} px = {size} px at {gsd_m} m)")
    return win


def _sits_reader(sits_path, sits_bands, spec, src, opts, variant: str, fallback: bool):
    """The Sentinel-2 series over the mosaic's footprint (dates, bands by the checkpoint's
    contract), or None when the model may predict from the aerial image alone."""
    if sits_path:
        dates = find_sits(sits_path, spec["sits"]["bands"], sits_bands)
        check_overlap(sits_path, dates, src)
        reader = SitsReader(dates, src.crs, src.bounds, float(spec["sits"]["gsd_m"]),
                            int(spec["sits"]["size"]))
        logging.info("Sentinel-2: %d dates %s .. %s; preprocessing %s", len(dates), dates[0].date,
                     dates[-1].date, opts)
        return reader
    if not fallback:
        raise UserError(f"--sits is required: the checkpoint's model {variant!r} fuses "
                        "Sentinel-2 with the aerial image"
                        + ("" if variant != "utt" else " and was not trained with modality "
                           "dropout (model.modality_dropout = 0), so it cannot predict from "
                           "the aerial image alone"))
    logging.warning("No --sits: the whole mosaic is predicted from the aerial image alone "
                    "(the model was trained with modality_dropout=%s).",
                    spec["model"].get("modality_dropout"))
    return None


def _predict_blocks(plan, block_width: int, inputs, step, emit, num_classes: int, height: int) -> None:
    """Column blocks, each top to bottom; the next batch is read while one runs on the devices."""
    win = plan.win
    for block in plan.blocks(block_width):
        blender = Blender(block, win, num_classes, hann_weight(win))
        in_flight = None
        for host, windows in inputs.batches(block.windows):
            result = step(host)     # asynchronous
            if in_flight is not None:
                emit(_accumulate(blender, *in_flight))
            in_flight = (result, windows, host)
        if in_flight is not None:
            emit(_accumulate(blender, *in_flight))
        emit(blender.close(height))


class RowWriter:
    """Finished rows -> every sink: narrows `valid` to the mosaic's data mask, counts the pixels
    without a prediction, advances the progress bar (km2)."""

    def __init__(self, sinks: list, inputs: MosaicInputs, bar, km2_per_px: float):
        self.sinks, self.inputs, self.bar, self.km2_per_px = sinks, inputs, bar, km2_per_px
        self.no_prediction = 0

    def __call__(self, done: list[Rows]) -> None:
        for rows in done:
            h, w = rows.shape
            mask = self.inputs.valid_mask(rows.x0, rows.y0, w, h)
            if mask is not None:
                rows.valid &= mask
            self.no_prediction += int((~rows.covered).sum())
            for sink in self.sinks:
                sink.write(rows)
            self.bar.update(h * w * self.km2_per_px)


def _accumulate(blender: Blender, result, windows: list[Window], host: dict) -> list[Rows]:
    weighted = np.asarray(result)   # waits for the device
    done = []
    for i, w in enumerate(windows):
        if host["ok"][i]:
            done += blender.add(w, weighted[i], bool(host["aerial_only"][i]))
    return done


def _log_without_sits(counts, share, fallback, trained_alone, model_cfg, flag_path) -> None:
    missing = counts["windows_without_sits"]
    if not missing:
        return
    head = (f"{missing} of {counts['windows']} windows had too few clear Sentinel-2 dates in their "
            "footprint (no coverage, nodata or clouds)")
    if fallback:
        logging.warning("%s; they were predicted from the aerial image alone (the model was trained "
                        "with modality_dropout=%s), flagged 1 in %s.", head,
                        model_cfg.get("modality_dropout"), flag_path)
    elif trained_alone:
        logging.warning("%s; %.1f%% of the mosaic has no prediction (nodata): --without-sits=nodata.",
                        head, 100 * share)
    else:
        logging.warning("%s; %.1f%% of the mosaic has no prediction (nodata). The model was trained "
                        "without modality dropout (model.modality_dropout=0), so it cannot predict "
                        "from the aerial image alone; fine-tune with modality_dropout > 0 to fill "
                        "such windows.", head, 100 * share)
