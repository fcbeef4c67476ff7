"""Land-cover maps from a trained model: sliding-window prediction over a GeoTIFF mosaic.

    python -m lcssl.predict --checkpoint=runs/ft --aerial=MOSAIC.tif --sits=S2_DIR --out=MAP.tif
    python -m lcssl.predict --checkpoint=runs/ft --records=data/flair2 --split=test --out=MAPS_DIR

What it guarantees (docs/DESIGN.md, "Prediction"):
- The weights' input contract (the checkpoint's input spec: bands and order, normalization, gsd,
  SITS size, date encoding and preprocessing, classes) is applied, and an input that does not fit
  it is refused with what the checkpoint expects and what the input has.
- Georeferencing, never pixel guesses: every window's Sentinel-2 crop is the `sits.size` x
  `sits.size` block of a `sits.gsd_m` lattice in the aerial CRS whose centre is the lattice corner
  nearest the window centre, i.e. what `data_prep` cuts around each training patch
  (`lcssl.data.sits.crop_centered` around the patch centroid). A series in another CRS or at
  another resolution is warped onto that lattice (rasterio WarpedVRT, bilinear; logged).
- The map is on the mosaic's own grid and CRS. A mosaic at another ground resolution than the
  checkpoint's is resampled window by window (bilinear in, bilinear logits out; logged).
- Windows overlap and their logits are blended with a Hann (sin^2) weight, so seams do not show
  and the map does not depend on how the mosaic is cut into blocks.
- Memory is bounded by the block width, whatever the mosaic size: the mosaic is processed in
  column blocks, each top to bottom with a rolling accumulator one window high; finished rows are
  written at once. Windows straddling two blocks are computed for both (a few % more work).
- Nodata: aerial nodata pixels, and pixels that no window with a usable Sentinel-2 series covers,
  are IGNORE_LABEL (255) in every raster written. Files go to a temporary name, then are renamed.

No TensorFlow here (the GPU machines have none).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import logging
import math
import os
import re
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from lcssl.data import schema

log = logging.getLogger("lcssl.predict")

NODATA = schema.IGNORE_LABEL  # 255: no prediction, in the class map and the uint8 probability rasters
PROB_SCALE = 254  # probabilities are stored as round(p * 254), so 255 stays free for nodata
DEFAULT_BLOCK_WIDTH = 4096
_DATE = re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)")

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


class PredictError(ValueError):
    """A user error (input, flag, checkpoint): the CLI prints the message alone and exits 2."""


# ------------------------------------------------------------------------------------------------
# The model: the one function that knows how a run stores its weights
# ------------------------------------------------------------------------------------------------

def _checkpoint_dir(path: str) -> str:
    """RUN/best (the best validation checkpoint) if there is one, else RUN/checkpoints, else PATH."""
    from lcssl import checkpoint as ckpt_lib

    best = os.path.join(path, "best")
    if os.path.isdir(best) and any(n.isdigit() for n in os.listdir(best)):
        return os.path.abspath(best)
    try:
        return ckpt_lib.resolve_checkpoint_dir(path)
    except FileNotFoundError as e:
        raise PredictError(f"--checkpoint={path}: {e}".replace(
            " Point init_from at the workdir of a finished pre-training run.",
            " Point --checkpoint at the workdir of a supervised or fine-tuning run.")) from None


def load_model(path: str, mesh=None) -> tuple[Callable[[dict], Any], dict, list[str]]:
    """(logits_fn, input_spec, class_names) of the run at `path` (a workdir or its checkpoints dir).

    logits_fn(batch) -> logits [B, H, W, K] float32, with batch the *normalized* model input
    {'aerial' [B, H, W, Ca], 'sits' [B, T, h, w, Cs], 'dates' [B, T] int32, 'sits_valid' [B, T]}
    (lcssl.data.normalize with the spec's statistics), sharded on the mesh's 'data' axis; the
    weights are replicated on `mesh` (default: every device).
    """
    import jax
    import ml_collections
    import orbax.checkpoint as ocp

    from lcssl import models, sharding

    directory = _checkpoint_dir(path)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    mngr = ocp.CheckpointManager(directory, options=options, item_handlers={
        "state": ocp.PyTreeCheckpointHandler(), "input_spec": ocp.JsonCheckpointHandler()})
    step = mngr.latest_step()
    meta = mngr.item_metadata(step)["state"]
    if "seg_head" not in meta["params"] and "utae" not in meta["params"]:
        raise PredictError(
            f"--checkpoint={path}: {directory} (step {step}) has no segmentation head (params: "
            f"{sorted(meta['params'])}); a SimCLR pre-training checkpoint cannot map land cover: "
            "fine-tune it first (configs/finetune_*.py) and predict with that run.")
    wanted = {"params": meta["params"], "batch_stats": meta.get("batch_stats") or {}}
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(wanted, restore_args=as_numpy, partial_restore=True),
        input_spec=ocp.args.JsonRestore()))
    mngr.close()
    spec = dict(out["input_spec"])
    model_cfg = ml_collections.ConfigDict(spec["model"])
    model = models.build_model(model_cfg)
    mesh = mesh or sharding.make_mesh()
    variables = jax.device_put({"params": out["state"]["params"],
                                "batch_stats": out["state"].get("batch_stats") or {}},
                               sharding.replicated(mesh))
    log.info("Loaded %s step %d: model %r, %d classes", directory, step, models.variant(model_cfg),
             model_cfg.num_classes)

    @jax.jit
    def forward(variables, batch):
        return model.apply(variables, batch["aerial"], batch["sits"], batch["dates"],
                           batch["sits_valid"], train=False)["logits"]

    return functools.partial(forward, variables), spec, list(spec["classes"])


# ------------------------------------------------------------------------------------------------
# The input contract
# ------------------------------------------------------------------------------------------------

def sits_options(spec: dict):
    """The SitsOptions the training data was built with (the checkpoint's `sits_preprocessing`)."""
    from lcssl.data.sits import SitsOptions

    sits = spec["sits"]
    pre = dict(spec.get("sits_preprocessing") or {})
    if not pre:
        log.warning("The checkpoint does not record its Sentinel-2 preprocessing (written before "
                    "input specs had 'sits_preprocessing'); using the data_prep defaults with its "
                    "max_dates=%s and date_encoding=%s.", sits["max_dates"], sits["date_encoding"])
    fields = {f.name for f in dataclasses.fields(SitsOptions)}
    kwargs = {k: v for k, v in pre.items() if k in fields}
    kwargs.update(max_dates=int(sits["max_dates"]), date_encoding=str(sits["date_encoding"]))
    return SitsOptions(**kwargs), pre.get("cloud_prob_threshold")


def _band_indexes(path: str, flag: str, descriptions: Sequence[str | None], count: int,
                  expected: Sequence[str], chosen: str | None) -> list[int]:
    """1-based band indexes of `path` in the checkpoint's band order, or a PredictError."""
    expected = list(expected)
    if chosen:
        try:
            indexes = [int(v) for v in chosen.split(",")]
        except ValueError:
            raise PredictError(f"{flag}={chosen!r}: expected comma-separated band numbers "
                               f"(1-based), e.g. {','.join(str(i + 1) for i in range(len(expected)))}"
                               ) from None
        if len(indexes) != len(expected) or not all(1 <= i <= count for i in indexes):
            raise PredictError(f"{flag}={chosen}: expected {len(expected)} band numbers in "
                               f"1..{count} (the checkpoint's bands {expected})")
        return indexes
    names = [d for d in descriptions if d]
    if len(names) == count:
        if list(descriptions)[:len(expected)] == expected and count == len(expected):
            return list(range(1, count + 1))
        raise PredictError(
            f"{path}: the checkpoint expects the bands {expected} in this order, the file has "
            f"{list(descriptions)}; pass the file's band numbers in the checkpoint's order with "
            f"{flag} (e.g. {flag}=" + ",".join(
                str(list(descriptions).index(b) + 1) if b in descriptions else "?" for b in expected)
            + ") or use data with those bands.")
    if count != len(expected):
        raise PredictError(f"{path}: the checkpoint expects {len(expected)} bands {expected}, the "
                           f"file has {count}; choose them with {flag}=i,j,... (1-based, in the "
                           "checkpoint's order).")
    log.info("%s: no band descriptions; its %d bands are taken as %s.", path, count, expected)
    return list(range(1, count + 1))


# ------------------------------------------------------------------------------------------------
# Sentinel-2 input: one GeoTIFF per date, or one multi-band GeoTIFF with 'YYYYMMDD_<band>' names
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SitsDate:
    date: datetime.date
    path: str
    band_indexes: list[int]         # 1-based, in the checkpoint's band order
    mask_path: str | None = None    # 2 bands: cloud and snow probability 0..100 (as FLAIR #2 masks)


def _parse_date(text: str) -> datetime.date | None:
    for match in _DATE.finditer(text):
        try:
            return datetime.date(*(int(g) for g in match.groups()))
        except ValueError:
            continue
    return None


def find_sits(path: str, bands: Sequence[str], chosen: str | None = None) -> list[SitsDate]:
    """The dates of a Sentinel-2 input, sorted.

    A folder: every *.tif / *.vrt with YYYYMMDD in its name is one date (bands in the checkpoint's
    order, checked against band descriptions when the file has them); a file whose name also
    contains 'mask' holds that date's cloud and snow probabilities (0..100, two bands).
    A file: its band descriptions name date and band, e.g. '20210415_B04'.
    """
    if os.path.isdir(path):
        dates, masks = {}, {}
        for name in sorted(os.listdir(path)):
            if not name.lower().endswith((".tif", ".tiff", ".vrt")):
                continue
            date = _parse_date(name)
            if date is None:
                continue
            full = os.path.join(path, name)
            target = masks if "mask" in name.lower() else dates
            if date in target:
                raise PredictError(f"--sits={path}: two files for {date}: "
                                   f"{os.path.basename(target[date])} and {name}")
            target[date] = full
        if not dates:
            raise PredictError(f"--sits={path}: no GeoTIFF with a YYYYMMDD date in its name; expected "
                               "one file per date (e.g. S2_20210415.tif) with the bands "
                               f"{list(bands)}")
        out = []
        for date, full in sorted(dates.items()):
            with _open(full, "--sits") as src:
                indexes = _band_indexes(full, "--sits-bands", src.descriptions, src.count, bands,
                                        chosen)
            out.append(SitsDate(date, full, indexes, masks.get(date)))
        return out
    with _open(path, "--sits") as src:
        descriptions = list(src.descriptions)
    by_date: dict[datetime.date, dict[str, int]] = {}
    for i, d in enumerate(descriptions, start=1):
        date = _parse_date(d or "")
        band = (d or "").split("_", 1)[-1] if date else None
        if date is None or not band:
            raise PredictError(
                f"--sits={path}: band {i} has description {d!r}; a multi-date file needs band "
                "descriptions 'YYYYMMDD_<band>' (e.g. '20210415_B04'), or use a folder of one file "
                "per date")
        by_date.setdefault(date, {})[band] = i
    out = []
    for date, have in sorted(by_date.items()):
        missing = [b for b in bands if b not in have]
        if missing:
            raise PredictError(f"--sits={path}: {date} lacks the bands {missing}; the checkpoint "
                               f"expects {list(bands)}, the file has {sorted(have)} for that date")
        out.append(SitsDate(date, path, [have[b] for b in bands]))
    return out


def _open(path: str, flag: str):
    import rasterio

    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
        raise PredictError(f"{flag}={path}: cannot open it as a raster ({e})") from None


class SitsReader:
    """Per-window Sentinel-2 crops on the lattice (CRS = the aerial CRS, pixel = sits.gsd_m).

    The lattice is the first date's own grid when it is already in the aerial CRS at the
    checkpoint's gsd (no resampling), else the gsd-multiples grid of the aerial CRS; a date on
    another grid is read through a WarpedVRT onto it.
    """

    def __init__(self, dates: list[SitsDate], aerial_crs, aerial_bounds, gsd_m: float, size: int):
        import rasterio
        from rasterio import warp
        from rasterio.vrt import WarpedVRT

        self.dates, self.gsd_m, self.size = dates, gsd_m, size
        self._files = {}
        first = self._dataset(dates[0].path)
        if first.crs is None:
            raise PredictError(f"--sits: {dates[0].path} has no CRS; Sentinel-2 rasters must be "
                               "georeferenced")
        if self._on_lattice(first, aerial_crs):
            t = first.transform
            self.origin = (t.c, t.f)
        else:
            self.origin = (0.0, 0.0)
        left, bottom, right, top = aerial_bounds
        margin = (size / 2 + 2) * gsd_m
        c0 = math.floor((left - margin - self.origin[0]) / gsd_m)
        c1 = math.ceil((right + margin - self.origin[0]) / gsd_m)
        r0 = math.floor((self.origin[1] - top - margin) / gsd_m)
        r1 = math.ceil((self.origin[1] - bottom + margin) / gsd_m)
        self.lattice = rasterio.Affine(gsd_m, 0, self.origin[0], 0, -gsd_m, self.origin[1])
        self.sources = []   # per date: [(data reader, col, row offset), (mask reader, ...) or None]
        self._vrts, warped = [], set()
        for d in dates:
            entry = []
            for p in (d.path, d.mask_path):
                if p is None:
                    entry.append(None)
                    continue
                src = self._dataset(p)
                if src.crs is None:
                    raise PredictError(f"--sits: {p} has no CRS; Sentinel-2 rasters must be "
                                       "georeferenced")
                if self._on_lattice(src, aerial_crs, self.origin):
                    t = src.transform
                    entry.append((src, round((t.c - self.origin[0]) / gsd_m),
                                  round((self.origin[1] - t.f) / gsd_m)))
                else:
                    transform = self.lattice @ rasterio.Affine.translation(c0, r0)
                    vrt = WarpedVRT(src, crs=aerial_crs, transform=transform, width=c1 - c0,
                                    height=r1 - r0, resampling=warp.Resampling.bilinear)
                    self._vrts.append(vrt)
                    warped.add(f"{os.path.basename(p)} ({src.crs.to_string()}, "
                               f"{abs(src.transform.a):g} m)")
                    entry.append((vrt, c0, r0))
            self.sources.append(entry)
        if warped:
            log.info("Sentinel-2: warped %d file(s) onto the aerial CRS %s at %g m (bilinear): %s",
                     len(warped), aerial_crs.to_string(), gsd_m, ", ".join(sorted(warped)[:3])
                     + (" ..." if len(warped) > 3 else ""))

    def _dataset(self, path):
        if path not in self._files:
            self._files[path] = _open(path, "--sits")
        return self._files[path]

    def _on_lattice(self, src, crs, origin=None) -> bool:
        """In `crs`, north-up at gsd_m, and (given an origin) offset from it by whole pixels."""
        t = src.transform
        if not (src.crs == crs and t.b == 0 and t.d == 0 and math.isclose(t.a, self.gsd_m, rel_tol=1e-6)
                and math.isclose(-t.e, self.gsd_m, rel_tol=1e-6)):
            return False
        if origin is None:
            return True
        offsets = ((t.c - origin[0]) / self.gsd_m, (origin[1] - t.f) / self.gsd_m)
        return all(abs(v - round(v)) < 1e-3 for v in offsets)

    def centre_px(self, x: float, y: float) -> tuple[int, int]:
        """(col, row) of the lattice corner nearest the ground point (x, y)."""
        return (round((x - self.origin[0]) / self.gsd_m), round((self.origin[1] - y) / self.gsd_m))

    @staticmethod
    def _read(entry, indexes, c0, r0, w, h):
        """Bands [len(indexes), h, w] and validity [h, w] of lattice block (c0, r0, w, h); pixels
        outside the raster are invalid."""
        from rasterio.windows import Window

        src, oc, orow = entry
        data = np.zeros((len(indexes), h, w), dtype=np.float32)
        valid = np.zeros((h, w), dtype=bool)
        fc0, fr0 = c0 - oc, r0 - orow
        ic0, ir0 = max(fc0, 0), max(fr0, 0)
        ic1, ir1 = min(fc0 + w, src.width), min(fr0 + h, src.height)
        if ic1 > ic0 and ir1 > ir0:
            win = Window(ic0, ir0, ic1 - ic0, ir1 - ir0)
            rows = slice(ir0 - fr0, ir1 - fr0)
            cols = slice(ic0 - fc0, ic1 - fc0)
            data[:, rows, cols] = src.read(indexes, window=win)
            valid[rows, cols] = src.dataset_mask(window=win) > 0
        return data, valid

    def crops(self, centres: Sequence[tuple[int, int]]):
        """Per centre (lattice col, row): sits [T, n, n, C] float32, usable [T] bool (the crop has no
        nodata), cloud [T, 2, n, n] uint8 or None; all read with one block per date."""
        n = self.size
        cs = np.array([c for c, _ in centres]) - n // 2
        rs = np.array([r for _, r in centres]) - n // 2
        c0, r0 = int(cs.min()), int(rs.min())
        w, h = int(cs.max()) - c0 + n, int(rs.max()) - r0 + n
        sits, usable, masks = [], [], []
        for d, (data_src, mask_src) in zip(self.dates, self.sources):
            data, valid = self._read(data_src, d.band_indexes, c0, r0, w, h)
            sits.append(data)
            usable.append(valid)
            if mask_src is not None:
                masks.append(self._read(mask_src, [1, 2], c0, r0, w, h)[0])
        has_masks = len(masks) == len(self.dates)
        out = []
        for c, r in zip(cs - c0, rs - r0):
            sl = (slice(r, r + n), slice(c, c + n))
            series = np.stack([np.moveaxis(s[:, sl[0], sl[1]], 0, -1) for s in sits])
            ok = np.array([u[sl].all() for u in usable])
            cloud = (np.stack([m[:, sl[0], sl[1]] for m in masks]).astype(np.uint8)
                     if has_masks else None)
            out.append((series, ok, cloud))
        return out

    def close(self):
        for f in self._vrts + list(self._files.values()):
            f.close()


def window_series(series, usable, masks, dates: Sequence[datetime.date], opts, prob_threshold):
    """One window's crops -> (sits [T, n, n, C] float32, dates [T] int32, valid [T] bool) exactly as
    data_prep builds a training example, or None when too few clear dates remain."""
    from lcssl.data import sits as sits_lib

    keep = np.flatnonzero(usable)
    cloud = None
    if masks is not None and keep.size:
        cloud = sits_lib.cloud_probability(masks[keep], prob_threshold)
    try:
        sits, dates_enc, valid = sits_lib.preprocess_series(
            np.rint(series[keep]).astype(np.uint16), cloud, [dates[i] for i in keep], opts)
    except sits_lib.TooFewDates:
        return None
    return sits.astype(np.float32), dates_enc, valid


# ------------------------------------------------------------------------------------------------
# Windows and blending (pure)
# ------------------------------------------------------------------------------------------------

def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Window offsets covering [0, length): every `stride`, the last one flush with the end."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, stride))
    return starts + [length - size]


def hann_weight(size: int) -> np.ndarray:
    """[size, size] float32 sin^2 window, > 0 everywhere (pixel centres), 1 at the centre: at 50%
    overlap the weights of neighbouring windows sum to 1 (a partition of unity)."""
    w = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    return np.outer(w, w).astype(np.float32)


@functools.cache
def _jitted():
    import jax

    from lcssl.data import normalize

    def weigh(logits, ok, weight, win: int):
        """[B, S, S, K] logits -> resampled to the window's mosaic pixels [B, win, win, K] (when
        the mosaic's gsd is not the checkpoint's), times the blending weight; 0 for padding."""
        if logits.shape[1] != win:
            logits = jax.image.resize(logits, (logits.shape[0], win, win, logits.shape[-1]),
                                      "linear")
        return logits * (weight[None, :, :, None] * ok[:, None, None, None])

    return jax.jit(normalize.normalize), jax.jit(weigh, static_argnums=3)


def _normalize(batch, stats):
    return _jitted()[0](batch, stats)


def _weigh(logits, ok, weight, win):
    return _jitted()[1](logits, ok, weight, win)


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


# ------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------

def class_colours(names: Sequence[str]) -> list[tuple[int, int, int]]:
    out, k = [], 0
    for name in names:
        hexa = FLAIR_COLOURS.get(name)
        if hexa is None:
            hexa = _PALETTE[k % len(_PALETTE)]
            k += 1
        out.append(tuple(int(hexa[i:i + 2], 16) for i in (1, 3, 5)))
    return out


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


@dataclasses.dataclass
class _Output:
    final: str
    raw: str        # uncompressed tiled GeoTIFF written block by block
    tmp: str        # the COG, renamed to `final` when everything succeeded
    bands: int
    dataset: Any = None


def _make_outputs(out_path: str, num_classes: int, confidence: bool,
                  probabilities: bool) -> dict[str, _Output]:
    stem, ext = os.path.splitext(out_path)
    tag = f".tmp-{os.getpid()}"
    wanted = {"class": (out_path, 1)}
    if confidence:
        wanted["confidence"] = (f"{stem}_confidence{ext or '.tif'}", 1)
    if probabilities:
        wanted["probabilities"] = (f"{stem}_probabilities{ext or '.tif'}", num_classes)
    return {k: _Output(final=p, raw=f"{p}{tag}-raw.tif", tmp=f"{p}{tag}.tif", bands=n)
            for k, (p, n) in wanted.items()}


def _open_raw(o: _Output, profile: dict, class_names: Sequence[str], kind: str):
    import rasterio

    p = dict(driver="GTiff", dtype="uint8", count=o.bands, nodata=NODATA, tiled=True,
             blockxsize=256, blockysize=256, compress="none", BIGTIFF="IF_SAFER",
             width=profile["width"], height=profile["height"], crs=profile["crs"],
             transform=profile["transform"])
    o.dataset = rasterio.open(o.raw, "w", **p)
    if kind == "class":  # before any pixel: the TIFF's photometric tag cannot change afterwards
        o.dataset.write_colormap(1, {i: (*c, 255) for i, c in enumerate(class_colours(class_names))})
    return o.dataset


def _finish(o: _Output, kind: str, class_names: Sequence[str]) -> None:
    """Raw GeoTIFF -> tiled, DEFLATE-compressed COG with overviews under the temporary name."""
    import rasterio
    import rasterio.shutil

    ds = o.dataset
    if kind == "class":
        ds.update_tags(1, **{f"CLASS_{i}": n for i, n in enumerate(class_names)})
        ds.set_band_description(1, "class")
    else:
        for b in range(1, o.bands + 1):
            ds.set_band_description(b, kind if o.bands == 1 else class_names[b - 1])
        ds.update_tags(scale=f"1/{PROB_SCALE}",
                       meaning="max softmax probability" if kind == "confidence"
                       else "softmax probability per class")
    ds.update_tags(classes=",".join(class_names), nodata=str(NODATA), software="lcssl.predict")
    ds.close()
    o.dataset = None
    rasterio.shutil.copy(o.raw, o.tmp, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=512,
                         OVERVIEW_RESAMPLING="NEAREST" if kind == "class" else "AVERAGE",
                         BIGTIFF="IF_SAFER")
    os.remove(o.raw)


# ------------------------------------------------------------------------------------------------
# The prediction
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Window:
    x: int                          # mosaic pixel offsets of the window's top-left corner
    y: int


def predict_mosaic(*args, **kwargs) -> dict:
    """Writes the class map (and optional confidence / probability rasters, and a .qml style) of
    the mosaic `aerial_path` with the model of `checkpoint` (a run dir, or the tuple load_model
    returns). Returns a summary dict (paths, sizes, windows, timings). Arguments: _predict_mosaic.

    GDAL's block cache defaults to 5% of the machine's memory; it is capped at 256 MiB here (unless
    GDAL_CACHEMAX is set) so that memory stays bounded by the block width, not by the machine.
    """
    import rasterio

    cache = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": 256}   # MiB
    with rasterio.Env(**cache):
        return _predict_mosaic(*args, **kwargs)


def _predict_mosaic(checkpoint: str | tuple, aerial_path: str, sits_path: str | None, out_path: str,
                   *, overlap: float = 0.25, batch_size: int | None = None,
                   block_width: int = DEFAULT_BLOCK_WIDTH, confidence: bool = False,
                   probabilities: bool = False, aerial_bands: str | None = None,
                   sits_bands: str | None = None, progress: bool = True, mesh=None) -> dict:
    """overlap: fraction of the window shared with each neighbour; batch_size: windows per step
    over all devices (default 4 per device); block_width: mosaic columns processed at once (memory
    grows with it); aerial_bands / sits_bands: 1-based band numbers in the checkpoint's order."""
    import jax
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import Window
    from tqdm import tqdm

    from lcssl import models, sharding
    from lcssl.data import normalize

    t_start = time.perf_counter()
    if jax.process_count() > 1:
        raise PredictError("lcssl.predict runs in one process (all its local devices); start it "
                           "without COORDINATOR_ADDRESS / NUM_PROCESSES")
    mesh = mesh or sharding.make_mesh()
    logits_fn, spec, class_names = (load_model(checkpoint, mesh) if isinstance(checkpoint, str)
                                    else checkpoint)
    model_cfg = spec["model"]
    size = int(model_cfg["aerial_size"])
    gsd_m = float(spec["aerial"]["gsd_m"])
    n_sits = int(spec["sits"]["size"])
    needs_sits = models.variant(model_cfg) != "unet"
    num_classes = len(class_names)
    if not 0 <= overlap < 1:
        raise PredictError(f"--overlap={overlap}: expected a fraction of the window in [0, 1)")
    devices = sharding.num_data_shards(mesh)
    batch_size = batch_size or 4 * devices
    try:
        sharding.check_batch_divisible(batch_size, mesh, "--batch-size")
    except ValueError as e:
        raise PredictError(str(e)) from None
    if block_width < 1:
        raise PredictError(f"--block-width={block_width}: expected a positive number of pixels")
    stats = normalize.stats_from_card(spec)
    opts, prob_threshold = sits_options(spec) if needs_sits else (None, None)
    if os.path.isdir(out_path):
        raise PredictError(f"--out={out_path} is a folder; expected a file name such as MAP.tif")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise PredictError(f"--out={out_path}: the folder {out_dir} does not exist")

    src = _open(aerial_path, "--aerial")
    sits_reader = None
    outputs = {}
    try:
        # --- Aerial: contract and grid -------------------------------------------------------
        if src.crs is None:
            raise PredictError(f"--aerial={aerial_path} has no CRS; the map keeps the mosaic's CRS "
                               "and the series is located through it, so it must be georeferenced")
        t = src.transform
        if t.b != 0 or t.d != 0 or t.e >= 0:
            raise PredictError(f"--aerial={aerial_path}: a rotated or south-up grid ({tuple(t)[:6]}) "
                               "is not supported; warp it north-up first (gdalwarp)")
        if not math.isclose(abs(t.a), abs(t.e), rel_tol=1e-6):
            raise PredictError(f"--aerial={aerial_path}: non-square pixels {t.a} x {-t.e} m")
        if any(dt != "uint8" for dt in src.dtypes):
            raise PredictError(f"--aerial={aerial_path}: the checkpoint was trained on uint8 aerial "
                               f"bands (0..255), the mosaic is {src.dtypes[0]}; rescale it to uint8 "
                               "as the training patches were")
        indexes = _band_indexes(aerial_path, "--aerial-bands", src.descriptions, src.count,
                                spec["aerial"]["bands"], aerial_bands)
        mosaic_gsd = abs(t.a)
        win = size if math.isclose(mosaic_gsd, gsd_m, rel_tol=1e-3) else round(size * gsd_m / mosaic_gsd)
        if win != size:
            log.info("The mosaic is at %g m, the checkpoint at %g m: each %d px window is resampled "
                     "to %d px (area average when finer, bilinear when coarser) and its logits back "
                     "(bilinear); the map stays on the mosaic's grid.",
                     mosaic_gsd, gsd_m, win, size)
        if src.width < win or src.height < win:
            raise PredictError(f"--aerial={aerial_path}: {src.width} x {src.height} px is smaller "
                               f"than one window ({win} px = {size} px at {gsd_m} m)")
        stride = max(1, win - int(round(overlap * win)))
        xs, ys = window_starts(src.width, win, stride), window_starts(src.height, win, stride)

        # --- Sentinel-2: dates, contract, footprint -----------------------------------------------
        if needs_sits:
            if not sits_path:
                raise PredictError(f"--sits is required: the checkpoint's model {models.variant(model_cfg)!r} "
                                   "fuses Sentinel-2 with the aerial image")
            dates = find_sits(sits_path, spec["sits"]["bands"], sits_bands)
            _check_overlap(sits_path, dates, src)
            sits_reader = SitsReader(dates, src.crs, src.bounds, float(spec["sits"]["gsd_m"]), n_sits)
            log.info("Sentinel-2: %d dates %s .. %s; preprocessing %s", len(dates), dates[0].date,
                     dates[-1].date, opts)

        # --- Device step ----------------------------------------------------------------------------
        weight = hann_weight(win)
        weight_dev = jax.device_put(weight, sharding.replicated(mesh))

        def submit(host):
            host = dict(host)
            ok = host.pop("ok")
            batch = sharding.host_batch_to_global(host, mesh)
            ok = sharding.host_batch_to_global({"ok": ok}, mesh)["ok"]
            return _weigh(logits_fn(_normalize(batch, stats)), ok, weight_dev, win)

        # --- Outputs --------------------------------------------------------------------------------
        profile = dict(width=src.width, height=src.height, crs=src.crs, transform=src.transform)
        outputs = _make_outputs(out_path, num_classes, confidence, probabilities)
        for kind, o in outputs.items():
            _open_raw(o, profile, class_names, kind)

        total_km2 = src.width * src.height * mosaic_gsd ** 2 / 1e6
        bar = tqdm(total=round(total_km2, 4), unit="km2", disable=not progress, desc="predict",
                   bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} km2 [{elapsed}<{remaining}]")
        counts = {"windows": 0, "windows_without_sits": 0, "batches": 0}
        fill = (stats.aerial_mean[:, None, None]).astype(np.float32)
        # No nodata value, mask band or alpha: every pixel is valid, no mask to read.
        all_valid = all(flags == [rasterio.enums.MaskFlags.all_valid] for flags in src.mask_flag_enums)

        def read_window(w: _Window):
            """Host inputs of one window, or None when it has no valid aerial pixel or no series."""
            window = Window(w.x, w.y, win, win)
            # Finer mosaic: area average (no aliasing); coarser: bilinear.
            resample = {} if win == size else {"out_shape": (len(indexes), size, size),
                                                "resampling": Resampling.average if win > size
                                                else Resampling.bilinear}
            aerial = src.read(indexes, window=window, **resample).astype(np.float32)
            if not all_valid:
                mask = src.dataset_mask(window=window, **({} if win == size else {
                    "out_shape": (size, size)})) > 0
                if not mask.any():
                    return None
                aerial = np.where(mask[None], aerial, fill)  # nodata -> band mean (0 normalized)
            return np.moveaxis(aerial, 0, -1)

        def batches(band_windows: list[_Window]) -> Iterator[tuple[dict, list[_Window]]]:
            pending: list[tuple[_Window, np.ndarray]] = []
            for w in band_windows:
                aerial = read_window(w)
                if aerial is not None:
                    pending.append((w, aerial))
                if len(pending) == batch_size:
                    yield _assemble(pending)
                    pending = []
            if pending:
                yield _assemble(pending)

        def _assemble(items):
            num_dates = opts.max_dates if needs_sits else 1
            b = batch_size
            host = {"aerial": np.zeros((b, size, size, len(indexes)), np.float32),
                    "sits": np.zeros((b, num_dates, n_sits, n_sits, len(spec["sits"]["bands"])),
                                     np.float32),
                    "dates": np.zeros((b, num_dates), np.int32),
                    "sits_valid": np.zeros((b, num_dates), bool),
                    "ok": np.zeros((b,), np.float32)}
            if not needs_sits:
                host["sits_valid"][:] = True
            for i, (_, aerial) in enumerate(items):
                host["aerial"][i] = aerial
                host["ok"][i] = 1.0
            if needs_sits:
                centres = []
                for w, _ in items:
                    cx, cy = src.transform @ (w.x + win / 2, w.y + win / 2)
                    centres.append(sits_reader.centre_px(cx, cy))
                for i, (series, usable, masks) in enumerate(sits_reader.crops(centres)):
                    got = window_series(series, usable, masks, [d.date for d in dates], opts,
                                        prob_threshold)
                    if got is None:
                        host["ok"][i] = 0.0
                        counts["windows_without_sits"] += 1
                        continue
                    host["sits"][i], host["dates"][i], host["sits_valid"][i] = got
            counts["windows"] += len(items)
            counts["batches"] += 1
            return host, [w for w, _ in items]

        # --- Blocks of columns, each top to bottom with a rolling accumulator -------------------------
        no_prediction = 0
        for bx0 in range(0, src.width, block_width):
            bx1 = min(bx0 + block_width, src.width)
            band_xs = [x for x in xs if x < bx1 and x + win > bx0]
            buf_x0 = band_xs[0]
            buf_w = band_xs[-1] + win - buf_x0
            acc = np.zeros((win, buf_w, num_classes), np.float32)
            wsum = np.zeros((win, buf_w), np.float32)
            state = {"y0": 0}   # mosaic row of the accumulator's first row

            def flush(y_end):
                """Writes mosaic rows [y0, y_end) of this block and shifts the accumulator, at most
                `win` rows at a time (skipped all-nodata windows can leave longer gaps)."""
                while state["y0"] < y_end:
                    flush_rows(min(y_end - state["y0"], win))

            def flush_rows(rows):
                nonlocal acc, wsum, no_prediction
                y0 = state["y0"]
                cols = slice(bx0 - buf_x0, bx1 - buf_x0)
                weights = wsum[:rows, cols]
                covered = weights > 0
                window = Window(bx0, y0, bx1 - bx0, rows)
                valid = covered if all_valid else covered & (src.dataset_mask(window=window) > 0)
                no_prediction += int((~covered).sum())
                # The weights are > 0, so the argmax of the weighted sum is the blended class.
                cls = np.where(valid, acc[:rows, cols].argmax(-1), NODATA).astype(np.uint8)
                outputs["class"].dataset.write(cls, 1, window=window)
                if "confidence" in outputs or "probabilities" in outputs:
                    probs = softmax(acc[:rows, cols] / np.where(covered, weights, 1.0)[..., None])
                if "confidence" in outputs:
                    conf = np.where(valid, np.rint(probs.max(-1) * PROB_SCALE), NODATA)
                    outputs["confidence"].dataset.write(conf.astype(np.uint8), 1, window=window)
                if "probabilities" in outputs:
                    p = np.where(valid[..., None], np.rint(probs * PROB_SCALE), NODATA)
                    outputs["probabilities"].dataset.write(
                        np.moveaxis(p.astype(np.uint8), -1, 0), window=window)
                acc = np.concatenate([acc[rows:], np.zeros((rows,) + acc.shape[1:], np.float32)])
                wsum = np.concatenate([wsum[rows:], np.zeros((rows, buf_w), np.float32)])
                state["y0"] = y0 + rows
                bar.update(rows * (bx1 - bx0) * mosaic_gsd ** 2 / 1e6)

            def accumulate(result, windows, ok):
                weighted = np.asarray(result)   # waits for the device
                for i, w in enumerate(windows):
                    if w.y > state["y0"]:
                        flush(w.y)  # windows come row by row: no later one reaches above w.y
                    if ok[i]:
                        r, c = w.y - state["y0"], w.x - buf_x0
                        acc[r:r + win, c:c + win] += weighted[i]
                        wsum[r:r + win, c:c + win] += weight

            band_windows = [_Window(x, y) for y in ys for x in band_xs]
            in_flight = None
            for host, windows in batches(band_windows):
                result = submit(host)   # asynchronous: the next batch is read meanwhile
                if in_flight is not None:
                    accumulate(*in_flight)
                in_flight = (result, windows, host["ok"] > 0)
            if in_flight is not None:
                accumulate(*in_flight)
            flush(src.height)
        bar.close()

        for kind, o in outputs.items():
            _finish(o, kind, class_names)
        qml = os.path.splitext(out_path)[0] + ".qml"
        from lcssl import files

        files.atomic_write_bytes(qml, qml_style(class_names).encode())
        for o in outputs.values():
            os.replace(o.tmp, o.final)
    except BaseException:
        for o in outputs.values():
            if o.dataset is not None:
                o.dataset.close()
            for p in (o.raw, o.tmp):
                if os.path.exists(p):
                    os.remove(p)
        raise
    finally:
        src.close()
        if sits_reader is not None:
            sits_reader.close()

    elapsed = time.perf_counter() - t_start
    area_km2 = src.width * src.height * mosaic_gsd ** 2 / 1e6
    share = no_prediction / (src.width * src.height)
    if counts["windows_without_sits"]:
        log.warning("%d of %d windows had too few clear Sentinel-2 dates in their footprint (no "
                    "coverage, nodata or clouds); %.1f%% of the mosaic has no prediction (nodata).",
                    counts["windows_without_sits"], counts["windows"], 100 * share)
    summary = {"out": {k: o.final for k, o in outputs.items()}, "qml": qml,
               "width": src.width, "height": src.height, "window_px": win, "stride_px": stride,
               "area_km2": area_km2, "seconds": elapsed, "km2_per_hour": area_km2 / elapsed * 3600,
               "no_prediction_fraction": share, **counts}
    log.info("Wrote %s (%d x %d px, %.3f km2) in %.1f s: %.2f km2/h, %d windows",
             out_path, src.width, src.height, area_km2, elapsed, summary["km2_per_hour"],
             counts["windows"])
    return summary


def _check_overlap(sits_path: str, dates: list[SitsDate], src) -> None:
    """PredictError naming both footprints and CRSs when no Sentinel-2 file overlaps the mosaic."""
    from rasterio import warp

    left, bottom, right, top = src.bounds
    footprints = []
    for path in sorted({d.path for d in dates}):
        with _open(path, "--sits") as s2:
            if s2.crs is None:
                raise PredictError(f"--sits: {path} has no CRS; Sentinel-2 rasters must be "
                                   "georeferenced")
            b = warp.transform_bounds(s2.crs, src.crs, *s2.bounds)
            if b[0] < right and b[2] > left and b[1] < top and b[3] > bottom:
                return
            footprints.append(f"{os.path.basename(path)}: {tuple(round(v, 1) for v in s2.bounds)} "
                              f"in {s2.crs.to_string()}")
    raise PredictError(
        f"--sits={sits_path} does not overlap the mosaic: the mosaic covers "
        f"{tuple(round(v, 1) for v in src.bounds)} in {src.crs.to_string()}, the Sentinel-2 "
        f"files cover {'; '.join(footprints[:3])}{' ...' if len(footprints) > 3 else ''}. "
        "Give the series of the mosaic's area.")


# ------------------------------------------------------------------------------------------------
# A prepared split (TFRecords) -> per-patch maps
# ------------------------------------------------------------------------------------------------

def _sample(host: dict, i: int, spec: dict) -> dict:
    """What a report panel shows of patch i: aerial RGB [H, W, 3] uint8, and the mean NDVI of the
    series crop per valid date (with the encoded dates), when the bands are there."""
    aerial_bands, sits_bands = list(spec["aerial"]["bands"]), list(spec["sits"]["bands"])
    rgb = [aerial_bands.index(b) for b in ("R", "G", "B") if b in aerial_bands]
    out = {"rgb": host["aerial"][i][..., rgb if len(rgb) == 3 else [0, 1, 2]].astype(np.uint8)}
    if "B04" in sits_bands and "B08" in sits_bands:
        valid = host["sits_valid"][i].astype(bool)
        red = host["sits"][i][valid][..., sits_bands.index("B04")].astype(np.float64)
        nir = host["sits"][i][valid][..., sits_bands.index("B08")].astype(np.float64)
        out["ndvi"] = ((nir - red) / np.maximum(nir + red, 1e-6)).mean(axis=(1, 2)).astype(np.float32)
        out["dates"] = host["dates"][i][valid].astype(np.int32)
        out["date_encoding"] = np.asarray(spec["sits"]["date_encoding"])
    return out


def predict_split(checkpoint: str | tuple, data_dir: str, split: str, out_dir: str, *,
                  batch_size: int | None = None, samples: int = 8, progress: bool = True,
                  mesh=None) -> dict:
    """Per-patch maps of a split built by `python -m data_prep build`, for inspection.

    Writes OUT/<split>_<index>.tif per example (the split's fixed eval order): band 1 the predicted
    class, band 2 the label (255 = ignore), uint8, colour table and .qml as for mosaics (records
    carry no georeferencing, so neither do these), and OUT/summary.json with each patch's pixel
    accuracy and the split's scores; for the first `samples` patches also
    OUT/<split>_<index>_sample.npz (aerial RGB, NDVI over time) for `lcssl.report --maps=OUT`.
    TensorFlow is imported here only (lcssl.data.pipeline).
    """
    import io

    import jax
    import rasterio
    from tqdm import tqdm

    from lcssl import checkpoint as ckpt_lib
    from lcssl import files, metrics, sharding
    from lcssl.data import normalize, pipeline

    mesh = mesh or sharding.make_mesh()
    logits_fn, spec, class_names = (load_model(checkpoint, mesh) if isinstance(checkpoint, str)
                                    else checkpoint)
    try:
        card = pipeline.load_card(data_dir)
    except (OSError, ValueError) as e:
        raise PredictError(f"--records={data_dir}: {e}") from None
    if split not in card.get("splits", {}):
        raise PredictError(f"--split={split}: not in {data_dir} (splits: {sorted(card['splits'])})")
    try:
        ckpt_lib.check_input_spec(spec, card, source=str(checkpoint)[:200], target=data_dir)
    except ValueError as e:
        raise PredictError(str(e).split("\nRebuild")[0]) from None
    if list(card["classes"]) != list(class_names):
        raise PredictError(f"--records={data_dir}: the checkpoint predicts the classes "
                           f"{class_names}, the dataset has {card['classes']}")
    batch_size = batch_size or 4 * sharding.num_data_shards(mesh)
    try:
        sharding.check_batch_divisible(batch_size, mesh, "--batch-size")
    except ValueError as e:
        raise PredictError(str(e)) from None
    stats = normalize.stats_from_card(spec)
    os.makedirs(out_dir, exist_ok=True)
    num_classes = len(class_names)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    patches, index = [], 0
    colours = {i: (*c, 255) for i, c in enumerate(class_colours(class_names))}
    total = card["splits"][split]["num_examples"]
    with tqdm(total=total, unit="patch", disable=not progress, desc=f"predict {split}") as bar:
        for host in pipeline.make_eval_iterator(data_dir, split, global_batch_size=batch_size):
            valid = host.pop("example_valid")
            label = host.pop("label")
            batch = sharding.host_batch_to_global(host, mesh)
            pred = np.asarray(jax.numpy.argmax(logits_fn(_normalize(batch, stats)), -1))
            for i in np.flatnonzero(valid):
                p, y = pred[i].astype(np.uint8), label[i].astype(np.uint8)
                labelled = y != NODATA
                np.add.at(confusion, (y[labelled], p[labelled]), 1)
                name = f"{split}_{index:05d}.tif"
                tmp = os.path.join(out_dir, f".{name}.tmp-{os.getpid()}.tif")
                with rasterio.open(tmp, "w", driver="GTiff", width=p.shape[1], height=p.shape[0],
                                   count=2, dtype="uint8", nodata=NODATA) as dst:
                    dst.write_colormap(1, colours)   # before the pixels (TIFF photometric tag)
                    dst.write(np.stack([p, y]))
                    dst.set_band_description(1, "prediction")
                    dst.set_band_description(2, "label")
                    dst.update_tags(classes=",".join(class_names))
                os.replace(tmp, os.path.join(out_dir, name))
                patches.append({"file": name, "labelled_px": int(labelled.sum()),
                                "accuracy": float((p == y)[labelled].mean()) if labelled.any()
                                else None})
                if index < samples:
                    buffer = io.BytesIO()
                    np.savez_compressed(buffer, **_sample(host, i, spec))
                    patches[-1]["sample"] = name[:-4] + "_sample.npz"
                    files.atomic_write_bytes(os.path.join(out_dir, patches[-1]["sample"]),
                                             buffer.getvalue())
                index += 1
            bar.update(int(valid.sum()))
    files.atomic_write_bytes(os.path.join(out_dir, f"{split}.qml"), qml_style(class_names).encode())
    scores = metrics.scores_from_confusion(confusion, class_names)
    scores["confusion_matrix"] = confusion.tolist()
    summary = {"split": split, "data_dir": os.path.abspath(data_dir), "num_patches": index,
               "scores": scores, "patches": patches}
    files.write_json(os.path.join(out_dir, "summary.json"), summary)
    log.info("Wrote %d per-patch maps of %s/%s to %s (mIoU %s)", index, data_dir, split, out_dir,
             scores.get("miou"))
    return summary


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lcssl.predict", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  python -m lcssl.predict --checkpoint=runs/ft --aerial=mosaic.tif "
               "--sits=s2/ --out=map.tif --confidence")
    p.add_argument("--checkpoint", required=True,
                   help="run workdir (its best/ checkpoint if any, else the latest of checkpoints/) "
                        "or a checkpoints folder")
    p.add_argument("--aerial", help="aerial mosaic, GeoTIFF or VRT, uint8 bands")
    p.add_argument("--sits", help="Sentinel-2: a folder of one GeoTIFF per date (YYYYMMDD in the "
                                  "name; '*mask*' files: cloud/snow probability) or one GeoTIFF "
                                  "with band descriptions 'YYYYMMDD_<band>'; any CRS")
    p.add_argument("--out", required=True, help="class map to write (COG GeoTIFF, uint8); a .qml "
                                                "QGIS style is written beside it. With --records: "
                                                "the folder for the per-patch maps")
    p.add_argument("--records", help="instead of a mosaic: a dataset folder from `python -m "
                                     "data_prep build`; writes one map per patch of --split")
    p.add_argument("--split", default="test", help="with --records: the split (default test)")
    p.add_argument("--overlap", type=float, default=0.25,
                   help="window overlap as a fraction of the window (0.5: smoothest, 4x the "
                        "windows of 0; default %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per step over all devices, a multiple of the device count "
                        "(default 4 per device)")
    p.add_argument("--block-width", type=int, default=DEFAULT_BLOCK_WIDTH,
                   help="mosaic columns processed at once: memory grows with it, not with the "
                        "mosaic (default %(default)s)")
    p.add_argument("--confidence", action="store_true",
                   help="also write <out>_confidence.tif: max softmax x 254 (255 = nodata)")
    p.add_argument("--probabilities", action="store_true",
                   help="also write <out>_probabilities.tif: one band per class, p x 254")
    p.add_argument("--aerial-bands", help="mosaic band numbers (1-based) in the checkpoint's band "
                                          "order, e.g. 3,2,1,4,5")
    p.add_argument("--sits-bands", help="Sentinel-2 band numbers (1-based, per-date files) in the "
                                        "checkpoint's band order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)   # Orbax's per-restore INFO lines
    if bool(args.aerial) == bool(args.records):
        print("error: give either --aerial (a mosaic) or --records (a prepared dataset)",
              file=sys.stderr)
        return 2
    try:
        if args.records:
            summary = predict_split(args.checkpoint, args.records, args.split, args.out,
                                    batch_size=args.batch_size, progress=not args.no_progress)
            print(f"wrote {summary['num_patches']} maps and summary.json to {args.out}")
            return 0
        summary = predict_mosaic(
            args.checkpoint, args.aerial, args.sits, args.out, overlap=args.overlap,
            batch_size=args.batch_size, block_width=args.block_width, confidence=args.confidence,
            probabilities=args.probabilities, aerial_bands=args.aerial_bands,
            sits_bands=args.sits_bands, progress=not args.no_progress)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(summary['out'].values())} and {summary['qml']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
