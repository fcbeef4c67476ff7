"""Whole-mosaic prediction (lcssl.predict) against the model's bare forward rate, and its memory.

    python bench/predict.py                                  # tiny widths, 256 px windows at 0.4 m
    python bench/predict.py --sizes 1536,3072 --window 256 --batch 8 --json /tmp/predict.json

For each mosaic size (a square of SIZE px; the second is 4x the area of the first) a fresh process
writes nothing, loads the model, compiles on a warm-up mosaic, then measures
  forward   windows/s of the jitted model alone on one device-resident normalized batch (the same
            batch size), i.e. the ceiling;
  predict   windows/s and km2/h of predict_mosaic: reading the windows and their Sentinel-2 crops,
            the training preprocessing of each series, the forward pass, Hann blending, softmax,
            writing the uint8 class map and its COG copy;
  memory    resident memory (RSS, sampled every 10 ms) before and at its peak during predict_mosaic.
With --tta=flips / d4 predict runs 4 / 8 forward passes per window (its cost: compare the rows).
The model has random weights (speed does not depend on them): the tiny config's widths with
`--window` px aerial windows at `--gsd` m (the U-T&T footprint follows), 6 dates of 10 bands.
Inputs (aerial GeoTIFF mosaic, Sentinel-2 folder, Lambert-93) are written first by this script.
No TensorFlow.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ORIGIN = (650_000.0, 6_860_000.0)
DATES = [datetime.date(2021, m, 12) for m in (2, 4, 5, 6, 8, 10)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1536,3072", help="mosaic sides in px, comma-separated")
    p.add_argument("--window", type=int, default=256, help="model window (aerial_size), px")
    p.add_argument("--gsd", type=float, default=0.4, help="aerial ground resolution, m")
    p.add_argument("--batch", type=int, default=8, help="windows per step, all devices")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--block-width", type=int, default=1024)
    p.add_argument("--tta", default="none", help="test-time augmentation: none, flips (4 views), "
                                                 "d4 (8 views); forward win/s stays one view")
    p.add_argument("--forward-repeats", type=int, default=5)
    p.add_argument("--workdir", default=None, help="where inputs are written (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # one size, in this process
    return p.parse_args(argv)


def write_inputs(folder, side, gsd):
    """An aerial mosaic (side x side px, 5 uint8 bands, written in strips) and 6 Sentinel-2 dates."""
    import rasterio
    from rasterio.transform import from_origin

    from lcssl.data import schema

    os.makedirs(folder, exist_ok=True)
    aerial = os.path.join(folder, "mosaic.tif")
    rng = np.random.default_rng(0)
    with rasterio.open(aerial, "w", driver="GTiff", width=side, height=side, count=5, dtype="uint8",
                       crs="EPSG:2154", transform=from_origin(*ORIGIN, gsd, gsd), tiled=True,
                       blockxsize=256, blockysize=256) as dst:
        for y in range(0, side, 256):
            h = min(256, side - y)
            yy, xx = np.mgrid[y:y + h, 0:side] / 50.0
            strip = np.stack([128 + 80 * np.sin(xx * (1 + b) + yy + b) for b in range(5)])
            strip += rng.normal(0, 10, strip.shape)
            dst.write(np.clip(strip, 0, 255).astype(np.uint8),
                      window=rasterio.windows.Window(0, y, side, h))
        for i, name in enumerate(schema.FLAIR2_AERIAL_BANDS, start=1):
            dst.set_band_description(i, name)
    s2 = os.path.join(folder, "s2")
    os.makedirs(s2, exist_ok=True)
    margin = 400.0
    n = int((side * gsd + 2 * margin) / 10)
    for t, date in enumerate(DATES):
        values = (1000 + 200 * t + rng.normal(0, 300, (10, n, n))).clip(1, 9000).astype(np.uint16)
        with rasterio.open(os.path.join(s2, f"S2_{date:%Y%m%d}.tif"), "w", driver="GTiff",
                           width=n, height=n, count=10, dtype="uint16", crs="EPSG:2154",
                           transform=from_origin(ORIGIN[0] - margin, ORIGIN[1] + margin, 10, 10),
                           nodata=0) as dst:
            dst.write(values)
            for i, name in enumerate(schema.S2_BANDS, start=1):
                dst.set_band_description(i, name)
    return aerial, s2


def model_and_spec(window, gsd):
    """(logits_fn, spec, class names) as lcssl.predict.load_model returns them, random weights."""
    import jax

    from lcssl import checkpoint as ckpt_lib
    from lcssl import models, sharding
    from lcssl.data import schema
    from lcssl.predict.model import Forward

    card = {"classes": list(schema.FLAIR2_CLASSES), "ignore_label": 255,
            "aerial": {"bands": list(schema.FLAIR2_AERIAL_BANDS), "size": window, "gsd_m": gsd,
                       "mean": [100.0] * 5, "std": [40.0] * 5},
            "sits": {"bands": list(schema.S2_BANDS), "size": 16, "gsd_m": 10.0, "max_dates": 6,
                     "date_encoding": "doy", "mean": [1500.0] * 10, "std": [500.0] * 10},
            "build_options": {"sits": {"max_cloud": 0.5, "min_clear_dates": 2, "monthly": False,
                                       "max_dates": 6, "date_encoding": "doy"}}}
    cfg = models.tiny_config()
    cfg.aerial_size, cfg.aerial_gsd_m = window, gsd
    cfg.num_classes, cfg.aerial_bands, cfg.sits_bands = 13, 5, 10
    cfg.sits_size = 16
    model = models.build_model(cfg)
    mesh = sharding.make_mesh()
    variables = jax.jit(lambda k: model.init(k, *models.dummy_inputs(cfg, num_dates=6), train=False),
                        out_shardings=sharding.replicated(mesh))(jax.random.key(0))
    spec = ckpt_lib.input_spec(card, cfg.to_dict())
    return Forward(model, variables), spec, list(card["classes"]), mesh


class RssSampler:
    """Peak resident memory of this process, sampled from /proc every 10 ms."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def worker(args):
    """One mosaic in this process: warm-up, forward rate, predict rate, memory."""
    import jax

    from lcssl import predict, sharding
    from lcssl.data import normalize

    folder = args.worker
    # Both workers compile the same programs: the second one reads them from this cache.
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(folder), "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    side = int(os.path.basename(folder).split("_")[-1])
    logits_fn, spec, names, mesh = model_and_spec(args.window, args.gsd)
    loaded = (logits_fn, spec, names)
    aerial, s2 = os.path.join(folder, "mosaic.tif"), os.path.join(folder, "s2")
    warm = os.path.join(os.path.dirname(folder), "warmup")
    kw = dict(overlap=args.overlap, batch_size=args.batch, block_width=args.block_width,
              tta=args.tta, progress=False, mesh=mesh)
    predict.predict_mosaic(loaded, os.path.join(warm, "mosaic.tif"), os.path.join(warm, "s2"),
                           os.path.join(warm, "map.tif"), **kw)

    b, w = args.batch, args.window
    host = {"aerial": np.random.default_rng(0).uniform(0, 255, (b, w, w, 5)).astype(np.float32),
            "sits": np.full((b, 6, 16, 16, 10), 1500.0, np.float32),
            "dates": np.tile(np.arange(6, dtype=np.int32) * 50 + 30, (b, 1)),
            "sits_valid": np.ones((b, 6), bool)}
    batch = normalize.normalize(sharding.host_batch_to_global(host, mesh),
                                normalize.stats_from_card(spec))
    jax.block_until_ready(logits_fn(batch))
    t0 = time.perf_counter()
    for _ in range(args.forward_repeats):
        jax.block_until_ready(logits_fn(batch))
    forward_rate = b * args.forward_repeats / (time.perf_counter() - t0)

    before = RssSampler.rss()
    with RssSampler() as rss:
        summary = predict.predict_mosaic(loaded, aerial, s2, os.path.join(folder, "map.tif"), **kw)
    rate = summary["windows"] / summary["seconds"]
    return {"side_px": side, "area_km2": summary["area_km2"], "windows": summary["windows"],
            "seconds": summary["seconds"], "predict_windows_per_s": rate,
            "forward_windows_per_s": forward_rate, "fraction_of_forward": rate / forward_rate,
            "km2_per_hour": summary["km2_per_hour"], "rss_before_mib": before / 2 ** 20,
            "rss_peak_mib": rss.peak / 2 ** 20}


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    root = args.workdir or tempfile.mkdtemp(prefix="bench_predict_")
    stride = args.window - round(args.overlap * args.window)
    write_inputs(os.path.join(root, "warmup"), args.window + stride, args.gsd)
    rows = []
    for side in sizes:
        folder = os.path.join(root, f"mosaic_{side}")
        write_inputs(folder, side, args.gsd)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", folder,
               f"--window={args.window}", f"--gsd={args.gsd}", f"--batch={args.batch}",
               f"--overlap={args.overlap}", f"--block-width={args.block_width}", f"--tta={args.tta}",
               f"--forward-repeats={args.forward_repeats}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"worker for {side} px failed:\n{out.stderr[-4000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import jax

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} CPUs, {jax.devices()[0].platform} x {jax.device_count()}",
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "window_px": args.window, "gsd_m": args.gsd, "batch": args.batch,
            "overlap": args.overlap, "block_width": args.block_width, "tta": args.tta}
    print(f"| mosaic | km2 | windows | forward win/s | predict win/s | predict/forward | km2/h "
          f"| RSS before | RSS peak |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side_px']} px | {r['area_km2']:.3f} | {r['windows']} | "
              f"{r['forward_windows_per_s']:.2f} | {r['predict_windows_per_s']:.2f} | "
              f"{100 * r['fraction_of_forward']:.0f}% | {r['km2_per_hour']:.2f} | "
              f"{r['rss_before_mib']:.0f} MiB | {r['rss_peak_mib']:.0f} MiB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
