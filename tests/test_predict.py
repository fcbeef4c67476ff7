"""lcssl.predict on small synthetic mosaics written here with rasterio (a few hundred px, tiny
model): the map keeps the mosaic's grid, equals patch-wise prediction, does not depend on the block
it was computed in nor on the CRS of the series, keeps nodata, refuses what does not fit the
checkpoint, and never leaves a half map under the final name."""
import datetime
import json
import os
import re
import subprocess

import jax
import numpy as np
import pytest
import rasterio
from rasterio import warp
from rasterio.transform import from_origin

from lcssl import checkpoint as ckpt_lib
from lcssl import models, predict, sharding, train
from lcssl.errors import UserError
from lcssl.tasks.base import TrainState
from lcssl.data import normalize, schema
from lcssl.data import sits as sits_lib
from tests._train_helpers import PYTHON, ROOT, cli_env, compilation_cache

L93, UTM31 = "EPSG:2154", "EPSG:32631"
GSD_M, SIZE, SITS_SIZE = 3.2, 32, 16          # the tiny model: 102.4 m windows, 160 m series crops
ORIGIN = (650_000.0, 6_860_000.0)             # Lambert-93, near Paris; a multiple of 10 m
WIDTH, HEIGHT = 160, 128                      # 5 x 4 windows
DATES = [datetime.date(2021, m, 10) for m in (3, 5, 7, 9)]
S2_BANDS = list(schema.S2_BANDS)
AERIAL_BANDS = list(schema.FLAIR2_AERIAL_BANDS)
# absl's log line, as the trainer writes it: "I1207 04:07:25.387131 1397810 mosaic.py:334] text"
ABSL_LINE = re.compile(r"([DIWEF])\d{4} [\d:.]+ +\d+ ([^:]+):\d+\] (.*)")


def tiny_card() -> dict:
    """The dataset card facts a checkpoint's input spec keeps (as data_prep build writes them)."""
    return {
        "layout": "flair2", "classes": list(schema.FLAIR2_CLASSES), "ignore_label": 255,
        "aerial": {"bands": AERIAL_BANDS, "size": SIZE, "gsd_m": GSD_M,
                   "mean": [90.0, 100.0, 70.0, 130.0, 140.0], "std": [30.0, 28.0, 27.0, 40.0, 40.0]},
        "sits": {"bands": S2_BANDS, "size": SITS_SIZE, "gsd_m": 10.0, "max_dates": 6,
                 "date_encoding": "doy", "mean": [1500.0] * 10, "std": [900.0] * 10},
        "build_options": {"cloud_prob_threshold": None,
                          "sits": {"max_cloud": 0.5, "min_clear_dates": 2, "monthly": False,
                                   "max_dates": 6, "date_encoding": "doy"}},
    }


def random_variables(shapes, seed=0):
    """Weights drawn in numpy (He-scaled kernels, unit BN statistics): no init program to compile,
    and prediction needs weights of the right shapes, not trained ones."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
        if name == "query":
            return rng.normal(0, 0.5, leaf.shape).astype(np.float32)
        return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A checkpoint as the trainer writes it (TrainState, input spec), with the tiny model's random
    weights: prediction only needs weights and their contract, not a trained model."""
    compilation_cache(tmp_path_factory)
    card = tiny_card()
    cfg = train.model_config_for(models.tiny_config(), card)
    variables = random_variables(models.param_shapes(models.build_model(cfg), cfg))
    state = TrainState(step=np.int32(1), params=variables["params"],
                       batch_stats=variables["batch_stats"], opt_state={}, rng=np.zeros(4, np.uint32))
    workdir = tmp_path_factory.mktemp("predict_run")
    ckpts = ckpt_lib.Checkpoints(str(workdir / "checkpoints"))
    ckpts.save(1, state, ckpt_lib.input_spec(card, cfg.to_dict()), {"next_step": 1}, force=True)
    ckpts.wait()
    ckpts.close()
    return str(workdir)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return predict.load_model(run_dir)


# --- Synthetic inputs ------------------------------------------------------------------------------

def aerial_array(seed=0) -> np.ndarray:
    """[5, H, W] uint8: smooth fields plus texture, so that windows differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH] / 40.0
    bands = [128 + 90 * np.sin(xx * (1 + b) + yy * (2 - b * 0.3) + b) for b in range(5)]
    return np.clip(np.stack(bands) + rng.normal(0, 12, (5, HEIGHT, WIDTH)), 0, 255).astype(np.uint8)


def write_aerial(path, data=None, *, gsd=GSD_M, nodata=None, descriptions=True):
    data = aerial_array() if data is None else data
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype="uint8", crs=L93,
                       transform=from_origin(*ORIGIN, gsd, gsd), nodata=nodata) as dst:
        dst.write(data)
        if descriptions:
            for i, name in enumerate(AERIAL_BANDS[:data.shape[0]], start=1):
                dst.set_band_description(i, name)
    return str(path)


def s2_value(x, y, date_index, band):
    """Reflectance as a linear function of Lambert-93 coordinates: bilinear resampling of a
    linear field is exact, so a warped copy differs only by rounding to uint16 (<= 1 DN)."""
    return (1000 + 150 * band + 300 * date_index + 0.8 * (x - ORIGIN[0]) - 0.6 * (y - ORIGIN[1]))


S2_MARGIN_M = 400.0


def s2_grid_l93():
    left, top = ORIGIN[0] - S2_MARGIN_M, ORIGIN[1] + S2_MARGIN_M
    width = int((WIDTH * GSD_M + 2 * S2_MARGIN_M) / 10)
    height = int((HEIGHT * GSD_M + 2 * S2_MARGIN_M) / 10)
    return from_origin(left, top, 10.0, 10.0), width, height


def s2_arrays_at(xs, ys):
    """[T, C, ...] uint16 values of the linear fields at ground points (Lambert-93)."""
    return np.stack([np.stack([s2_value(xs, ys, t, b) for b in range(len(S2_BANDS))])
                     for t in range(len(DATES))]).round().astype(np.uint16)


def write_s2_folder(folder, *, crs=L93, shift_m=(0.0, 0.0), cover=None):
    """One GeoTIFF per date in `crs` (Lambert-93 on the 10 m lattice, or UTM 31N), band names as
    descriptions. `cover`: fraction of columns (from the left) that have data; the rest nodata 0."""
    os.makedirs(folder, exist_ok=True)
    transform, width, height = s2_grid_l93()
    if crs != L93:
        transform, width, height = warp.calculate_default_transform(
            L93, crs, width, height, *rasterio.transform.array_bounds(height, width, transform),
            resolution=10.0)
    transform = rasterio.Affine(transform.a, 0, transform.c + shift_m[0], 0, transform.e,
                                transform.f + shift_m[1])
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    xs, ys = transform @ (cols, rows)
    if crs != L93:
        xs, ys = (np.asarray(v).reshape(cols.shape) for v in warp.transform(crs, L93, xs.ravel(),
                                                                            ys.ravel()))
    values = s2_arrays_at(xs, ys)
    if cover is not None:
        values[..., int(width * cover):] = 0
    for t, date in enumerate(DATES):
        with rasterio.open(os.path.join(folder, f"S2_{date:%Y%m%d}.tif"), "w", driver="GTiff",
                           width=width, height=height, count=len(S2_BANDS), dtype="uint16", crs=crs,
                           transform=transform, nodata=0) as dst:
            dst.write(values[t])
            for i, name in enumerate(S2_BANDS, start=1):
                dst.set_band_description(i, name)
    return str(folder)


def read(path):
    with rasterio.open(path) as src:
        return src.read(), src.profile, src


def view_np(a, k, flip, axes):
    """numpy twin of a TTA view: flip the columns, then rotate k x 90 degrees."""
    if flip:
        a = np.flip(a, axis=axes[1])
    return np.rot90(a, k, axes=axes)


def patchwise(loaded, x, y, view=None, aerial_only=False):
    """The tiny model on the window at mosaic px (x, y), built as data_prep builds a training
    example: the 16 px series crop centred on the lattice corner nearest the window centre.
    view (k, flip): the window and its crop seen flipped / rotated, the logits turned back.
    aerial_only: the logits without Sentinel-2 (logits_fn.aerial_only)."""
    logits_fn, spec, _ = loaded
    aerial = aerial_array()[:, y:y + SIZE, x:x + SIZE]
    transform, width, height = s2_grid_l93()
    cx, cy = ORIGIN[0] + (x + SIZE / 2) * GSD_M, ORIGIN[1] - (y + SIZE / 2) * GSD_M
    col, row = ~transform @ (cx, cy)
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    superpatch = s2_arrays_at(*(transform @ (cols, rows)))   # [T, C, H, W], the file's pixels
    crop = sits_lib.crop_centered(superpatch, (round(row), round(col)), SITS_SIZE)
    series, dates, valid = sits_lib.preprocess_series(crop, None, DATES,
                                                      predict.sits_options(spec)[0])
    aerial = np.moveaxis(aerial, 0, -1)
    if view is not None:
        aerial, series = view_np(aerial, *view, (0, 1)), view_np(series, *view, (1, 2))
    batch = {"aerial": aerial[None].astype(np.float32),
             "sits": series[None].astype(np.float32), "dates": dates[None], "sits_valid": valid[None]}
    batch = {k: np.repeat(v, 8, axis=0) for k, v in batch.items()}   # one per device
    mesh = sharding.make_mesh()
    norm = normalize.normalize(sharding.host_batch_to_global(batch, mesh),
                               normalize.stats_from_card(spec))
    logits = np.asarray((logits_fn.aerial_only if aerial_only else logits_fn)(norm))[0]
    if view is not None:
        k, flip = view
        logits = np.rot90(logits, -k, axes=(0, 1))
        logits = np.flip(logits, axis=1) if flip else logits
    return logits


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --- Tests -------------------------------------------------------------------------------------------

def test_map_keeps_the_grid_and_equals_patchwise_prediction(loaded, tmp_path):
    aerial = write_aerial(tmp_path / "mosaic.tif")
    s2 = write_s2_folder(tmp_path / "s2")
    out = tmp_path / "map.tif"
    summary = predict.predict_mosaic(loaded, aerial, s2, str(out), overlap=0.0, batch_size=8,
                                     probabilities=True, confidence=True, progress=False)
    assert summary["windows"] == 20 and summary["windows_without_sits"] == 0
    classes, profile, src = read(out)
    with rasterio.open(aerial) as a:
        assert src.crs == a.crs and src.transform == a.transform
        assert (src.width, src.height) == (a.width, a.height)
    assert profile["dtype"] == "uint8" and profile["nodata"] == 255 and profile["tiled"]
    assert profile["compress"].lower() == "deflate"
    with rasterio.open(out) as m:
        assert m.colormap(1)[0][:3] == (0xdb, 0x0e, 0x9a)      # 'building'
        assert m.tags(1)["CLASS_0"] == "building"
    assert (tmp_path / "map.qml").read_text().count("<paletteEntry") == 13
    probs, _, _ = read(tmp_path / "map_probabilities.tif")
    conf, _, _ = read(tmp_path / "map_confidence.tif")
    for y in range(0, HEIGHT, SIZE):
        for x in range(0, WIDTH, SIZE):
            p = softmax(patchwise(loaded, x, y).astype(np.float64))       # [S, S, K]
            window = (slice(y, y + SIZE), slice(x, x + SIZE))
            # float32 sums in another order: the stored p * 254 may round the other way.
            np.testing.assert_allclose(np.moveaxis(probs[(slice(None),) + window], 0, -1),
                                       np.rint(p * 254), atol=1)
            top2 = np.sort(p, -1)[..., -2:]
            clear = top2[..., 1] - top2[..., 0] > 1e-4
            assert (classes[0][window] == p.argmax(-1))[clear].all()
            assert np.abs(conf[0][window].astype(int) - np.rint(p.max(-1) * 254)).max() <= 1
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_map_does_not_depend_on_blocks(loaded, tmp_path):
    """Overlapping windows blended: cutting the mosaic into 64 px column blocks (windows on a
    block edge computed for both) gives the same map."""
    aerial = write_aerial(tmp_path / "mosaic.tif")
    s2 = write_s2_folder(tmp_path / "s2")
    maps = []
    for name, block in (("a", 4096), ("b", 64)):
        predict.predict_mosaic(loaded, aerial, s2, str(tmp_path / f"{name}.tif"), overlap=0.5,
                               block_width=block, batch_size=8, probabilities=True,
                               progress=False)
        maps.append((read(tmp_path / f"{name}.tif")[0][0],
                     read(tmp_path / f"{name}_probabilities.tif")[0].astype(int)))
    (ca, pa), (cb, pb) = maps
    assert np.abs(pa - pb).max() <= 1                       # uint8 rounding of equal floats
    top2 = np.sort(pa, 0)[-2:]
    assert (ca == cb)[top2[1] - top2[0] >= 2].all()


def test_series_in_utm_gives_the_map_of_the_series_in_lambert93(loaded, tmp_path, caplog):
    aerial = write_aerial(tmp_path / "mosaic.tif")
    kw = dict(overlap=0.25, batch_size=8, probabilities=True, progress=False)
    predict.predict_mosaic(loaded, aerial, write_s2_folder(tmp_path / "l93"), str(tmp_path / "a.tif"),
                           **kw)
    caplog.set_level("INFO", logger="absl")
    predict.predict_mosaic(loaded, aerial, write_s2_folder(tmp_path / "utm", crs=UTM31),
                           str(tmp_path / "b.tif"), **kw)
    assert "warped 4 file(s) onto the aerial CRS EPSG:2154" in caplog.text
    pa = read(tmp_path / "a_probabilities.tif")[0].astype(int)
    pb = read(tmp_path / "b_probabilities.tif")[0].astype(int)
    # The warped series equals the original up to uint16 rounding (1 DN, ~0.001 std): far below
    # one step of the uint8 probabilities, plus their own rounding.
    assert np.abs(pa - pb).max() <= 2
    ca, cb = read(tmp_path / "a.tif")[0][0], read(tmp_path / "b.tif")[0][0]
    top2 = np.sort(pa, 0)[-2:]
    assert (ca == cb)[top2[1] - top2[0] >= 4].all()


def test_nodata_and_partial_sentinel2_coverage_are_kept(loaded, tmp_path, caplog):
    data = aerial_array()
    data[:, :40, :50] = 0                                   # a hole in the mosaic
    aerial = write_aerial(tmp_path / "mosaic.tif", data, nodata=0)
    s2 = write_s2_folder(tmp_path / "s2", cover=0.5)        # the series covers the west only
    caplog.set_level("INFO", logger="absl")
    summary = predict.predict_mosaic(loaded, aerial, s2, str(tmp_path / "map.tif"), overlap=0.25,
                                     batch_size=8, progress=False)
    classes = read(tmp_path / "map.tif")[0][0]
    assert (classes[:40, :50] == 255).all()
    assert (classes[40:, :50] != 255).all()
    assert (classes[:, -20:] == 255).all()                  # east: no series, no prediction
    assert 0 < summary["windows_without_sits"] < summary["windows"]
    assert "too few clear Sentinel-2 dates" in caplog.text
    assert "trained without modality dropout" in caplog.text      # says why: holes, not guesses

    data = aerial_array()
    data[:, 24:100] = 0               # two whole rows of windows have no valid pixel: skipped
    aerial = write_aerial(tmp_path / "band.tif", data, nodata=0)
    predict.predict_mosaic(loaded, aerial, write_s2_folder(tmp_path / "s2_full"),
                           str(tmp_path / "band_map.tif"), overlap=0.25, batch_size=8,
                           progress=False)
    classes = read(tmp_path / "band_map.tif")[0][0]
    assert (classes[24:100] == 255).all() and (classes[:24] != 255).all()
    assert (classes[100:] != 255).all()


def test_contract_mismatches_and_no_overlap_are_refused(loaded, tmp_path):
    s2 = write_s2_folder(tmp_path / "s2")
    four = write_aerial(tmp_path / "four.tif", aerial_array()[:4])
    with pytest.raises(UserError, match=r"expects the bands \['R', 'G', 'B', 'NIR', "
                                                   r"'elevation'\] in this order, the file has"):
        predict.predict_mosaic(loaded, four, s2, str(tmp_path / "m.tif"), progress=False)
    swapped = write_aerial(tmp_path / "swapped.tif")
    with rasterio.open(swapped, "r+") as dst:
        dst.set_band_description(1, "G")
        dst.set_band_description(2, "R")
    with pytest.raises(UserError, match="--aerial-bands=2,1,3,4,5"):
        predict.predict_mosaic(loaded, swapped, s2, str(tmp_path / "m.tif"), progress=False)
    far = write_s2_folder(tmp_path / "far", shift_m=(50_000.0, 0.0))
    with pytest.raises(UserError, match=r"does not overlap the mosaic: the mosaic covers "
                                                   r"\(650000.0, .*EPSG:2154.*EPSG:2154"):
        predict.predict_mosaic(loaded, write_aerial(tmp_path / "ok.tif"), far,
                               str(tmp_path / "m.tif"), progress=False)
    assert not list(tmp_path.glob("m*"))


def test_cli_refuses_with_one_line_and_no_traceback(run_dir, tmp_path):
    aerial = write_aerial(tmp_path / "mosaic.tif")
    far = write_s2_folder(tmp_path / "far", crs=UTM31, shift_m=(0.0, 80_000.0))
    proc = subprocess.run(
        [PYTHON, "-m", "lcssl.predict", f"--checkpoint={run_dir}", f"--aerial={aerial}",
         f"--sits={far}", f"--out={tmp_path / 'map.tif'}"],
        cwd=ROOT, env=cli_env(devices=2), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error: --sits=" in proc.stderr and "does not overlap" in proc.stderr
    assert "EPSG:32631" in proc.stderr and "Traceback" not in proc.stderr
    assert not [line for line in proc.stderr.splitlines() if ABSL_LINE.match(line)]   # no Orbax noise
    assert not (tmp_path / "map.tif").exists()


def test_cli_says_what_it_did_in_the_trainers_log_format(run_dir, tmp_path, capsys, monkeypatch):
    import sys

    from absl import logging as absl_logging

    from lcssl.predict.__main__ import main as predict_main

    # absl's handler keeps the stderr of its creation: point it at this test's captured one.
    monkeypatch.setattr(absl_logging.get_absl_handler().python_handler, "stream", sys.stderr)
    aerial, s2 = write_aerial(tmp_path / "mosaic.tif"), write_s2_folder(tmp_path / "s2")
    assert predict_main([f"--checkpoint={run_dir}", f"--aerial={aerial}", f"--sits={s2}",
                         f"--out={tmp_path / 'map.tif'}", "--no-progress"]) == 0
    logged = [m.groups() for m in map(ABSL_LINE.match, capsys.readouterr().err.splitlines()) if m]
    said = " ".join(text for _, _, text in logged)
    assert "Loaded " in said and "Sentinel-2: 4 dates" in said and "Wrote " in said
    # lcssl's lines only: Orbax's per-restore INFO lines (its own files) are left out.
    assert {level for level, _, _ in logged} == {"I"}
    assert {source for _, source, _ in logged} <= {"model.py", "mosaic.py", "sits.py", "inputs.py"}


def test_interrupted_prediction_leaves_no_file_under_the_final_name(loaded, tmp_path):
    aerial = write_aerial(tmp_path / "mosaic.tif")
    s2 = write_s2_folder(tmp_path / "s2")
    logits_fn, spec, names = loaded
    calls = []

    def dies_on_third_batch(batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return logits_fn(batch)

    with pytest.raises(KeyboardInterrupt):
        predict.predict_mosaic((dies_on_third_batch, spec, names), aerial, s2,
                               str(tmp_path / "map.tif"), overlap=0.5, batch_size=8,
                               confidence=True, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["mosaic.tif", "s2"]


def test_finer_mosaic_is_resampled_per_window_and_mapped_on_its_own_grid(loaded, tmp_path, caplog):
    """The same scene at 1.6 m (each 3.2 m pixel as 2 x 2): each 64 px window is averaged to the
    model's 32 px at 3.2 m, which is exactly the coarse window, and its logits are resampled back
    (bilinear) onto the fine grid."""
    fine = np.repeat(np.repeat(aerial_array(), 2, axis=1), 2, axis=2)
    aerial = write_aerial(tmp_path / "fine.tif", fine, gsd=GSD_M / 2)
    s2 = write_s2_folder(tmp_path / "s2")
    caplog.set_level("INFO", logger="absl")
    summary = predict.predict_mosaic(loaded, aerial, s2, str(tmp_path / "map.tif"), overlap=0.0,
                                     batch_size=8, probabilities=True, progress=False)
    assert summary["window_px"] == 64 and "the checkpoint at 3.2 m" in caplog.text
    with rasterio.open(tmp_path / "map.tif") as m:
        assert (m.width, m.height) == (2 * WIDTH, 2 * HEIGHT) and m.transform.a == GSD_M / 2
    probs = read(tmp_path / "map_probabilities.tif")[0].astype(int)
    for x, y in ((0, 0), (64, 32), (128, 96)):
        logits = jax.image.resize(patchwise(loaded, x, y), (2 * SIZE, 2 * SIZE, 13), "linear")
        want = np.rint(softmax(np.asarray(logits, np.float64)) * 254)
        got = np.moveaxis(probs[:, 2 * y:2 * y + 2 * SIZE, 2 * x:2 * x + 2 * SIZE], 0, -1)
        np.testing.assert_allclose(got, want, atol=1)


@pytest.mark.slow
def test_a_prepared_split_is_mapped_patch_by_patch(run_dir, loaded, tmp_path_factory, tmp_path):
    from lcssl.predict.__main__ import main as predict_main
    from tests._train_helpers import tiny_dataset

    data_dir = tiny_dataset(tmp_path_factory)
    summary = predict.predict_split(loaded, data_dir, "test", str(tmp_path), batch_size=8,
                                    progress=False)
    # The command with the native reader asked for by name: the same patches, maps and scores.
    native = tmp_path / "native"
    assert predict_main([f"--checkpoint={run_dir}", f"--records={data_dir}", "--split=test", f"--out={native}",
                         "--input=native", "--batch-size=8", "--no-progress"]) == 0
    assert json.loads((native / "summary.json").read_text()) == json.loads((tmp_path / "summary.json").read_text())
    card = files_card(data_dir)
    assert summary["num_patches"] == card["splits"]["test"]["num_examples"] > 0
    with rasterio.open(tmp_path / summary["patches"][0]["file"]) as m:
        pred, label = m.read()
        assert m.count == 2 and pred.shape == (SIZE, SIZE) and m.descriptions == ("prediction", "label")
    assert pred.max() < 13 and summary["scores"]["oa"] is not None
    assert (tmp_path / "summary.json").exists() and (tmp_path / "test.qml").exists()
    # The report's sample panels: aerial RGB, NDVI over time, label, prediction, errors.
    from lcssl import report

    rows = report.sample_panels(str(tmp_path))
    assert len(rows) == min(8, summary["num_patches"])
    assert all(r.count("data:image/png") == 4 and "NDVI (doy)" in r for r in rows)


def files_card(data_dir):
    from lcssl import files

    return files.read_json(os.path.join(data_dir, schema.CARD_NAME))


def test_a_multi_date_file_is_read_by_its_band_descriptions(tmp_path):
    path = tmp_path / "s2_stack.tif"
    dates = ["20210415", "20210301"]
    order = S2_BANDS[::-1]                               # bands stored in another order
    with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=20, dtype="uint16",
                       crs=L93, transform=from_origin(*ORIGIN, 10, 10)) as dst:
        for i, (d, b) in enumerate([(d, b) for d in dates for b in order], start=1):
            dst.set_band_description(i, f"{d}_{b}")
    found = predict.find_sits(str(path), S2_BANDS)
    assert [d.date for d in found] == [datetime.date(2021, 3, 1), datetime.date(2021, 4, 15)]
    assert found[0].band_indexes == list(range(20, 10, -1))   # checkpoint order, 1-based
    with pytest.raises(UserError, match=r"2021-03-01 lacks the bands \['B13'\]"):
        predict.find_sits(str(path), S2_BANDS[:-1] + ["B13"])


def test_cloudy_dates_of_a_window_are_dropped_as_in_data_prep():
    opts = sits_lib.SitsOptions(max_cloud=0.5, min_clear_dates=2, max_dates=4)
    series = np.stack([np.full((16, 16, 10), 1000.0 * (t + 1)) for t in range(4)]).astype(np.float32)
    usable = np.array([True, True, True, False])          # the last date has nodata in the crop
    masks = np.zeros((4, 2, 16, 16), np.uint8)
    masks[1, 0] = 90                                       # the second date is cloudy
    sits, dates, valid = predict.window_series(series, usable, masks, DATES, opts, None)
    assert valid.tolist() == [True, True, False, False]
    assert sits[0, 0, 0, 0] == 1000 and sits[1, 0, 0, 0] == 3000
    assert dates[:2].tolist() == [d.timetuple().tm_yday for d in (DATES[0], DATES[2])]
    usable[2] = False
    assert predict.window_series(series, usable, masks, DATES, opts, None) is None


# --- Features of the package: aerial-only fallback, TTA, partial dates, one multi-date file ---------

def with_modality_dropout(loaded, p=0.3):
    """The same weights, as if fine-tuned with model.modality_dropout = p (it only acts in
    training, so the forward pass is the same)."""
    logits_fn, spec, names = loaded
    return logits_fn, dict(spec, model=dict(spec["model"], modality_dropout=p)), names


@pytest.mark.slow
def test_aerial_only_is_the_path_modality_dropout_trains(loaded):
    """logits_fn.aerial_only equals the model with its Fusion returning the aerial levels
    unchanged, which is what modality dropout does to a sample in training."""
    import flax.linen as nn

    from lcssl.models.fusion import Fusion

    logits_fn = loaded[0]
    rng = np.random.default_rng(1)
    batch = {"aerial": rng.normal(size=(8, SIZE, SIZE, 5)).astype(np.float32),
             "sits": rng.normal(size=(8, 6, SITS_SIZE, SITS_SIZE, 10)).astype(np.float32),
             "dates": np.tile(np.arange(1, 7, dtype=np.int32) * 40, (8, 1)),
             "sits_valid": np.ones((8, 6), bool)}

    def drop_series(next_fun, args, kwargs, context):
        if isinstance(context.module, Fusion) and context.method_name == "__call__":
            return args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(drop_series):
        want = logits_fn.model.apply(logits_fn.variables, batch["aerial"], batch["sits"],
                                     batch["dates"], batch["sits_valid"], train=False)["logits"]
    fused = np.asarray(logits_fn(batch))
    got = np.asarray(logits_fn.aerial_only(batch))
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)
    assert np.abs(got - fused).max() > 1e-2            # the series did contribute before


def test_windows_without_sentinel2_are_mapped_from_the_aerial_image_and_flagged(loaded, tmp_path,
                                                                                caplog):
    aerial = write_aerial(tmp_path / "mosaic.tif")
    s2 = write_s2_folder(tmp_path / "s2", cover=0.5)    # crops of windows x >= 64 px lack data
    caplog.set_level("INFO", logger="absl")
    summary = predict.predict_mosaic(with_modality_dropout(loaded), aerial, s2,
                                     str(tmp_path / "map.tif"), overlap=0.0, batch_size=8,
                                     probabilities=True, progress=False)
    assert summary["windows_aerial_only"] == summary["windows_without_sits"] == 12
    classes = read(tmp_path / "map.tif")[0][0]
    flag = read(tmp_path / "map_aerial_only.tif")[0][0]
    probs = read(tmp_path / "map_probabilities.tif")[0].astype(int)
    assert (classes != 255).all()
    assert (flag[:, :64] == 0).all() and (flag[:, 64:] == 1).all()
    assert "predicted from the aerial image alone" in caplog.text
    for x, y, alone in ((128, 32, True), (32, 64, False)):
        p = softmax(patchwise(loaded, x, y, aerial_only=alone).astype(np.float64))
        got = np.moveaxis(probs[:, y:y + SIZE, x:x + SIZE], 0, -1)
        np.testing.assert_allclose(got, np.rint(p * 254), atol=1)

    predict.predict_mosaic(with_modality_dropout(loaded), aerial, s2, str(tmp_path / "holes.tif"),
                           overlap=0.0, batch_size=8, without_sits="nodata", progress=False)
    assert (read(tmp_path / "holes.tif")[0][0][:, 64:] == 255).all()
    assert not (tmp_path / "holes_aerial_only.tif").exists()

    # No series at all: everything from the aerial image for this model, refused for the other.
    predict.predict_mosaic(with_modality_dropout(loaded), aerial, None, str(tmp_path / "a.tif"),
                           overlap=0.0, batch_size=8, progress=False)
    assert (read(tmp_path / "a_aerial_only.tif")[0] == 1).all()
    assert (read(tmp_path / "a.tif")[0][0][:, 64:] == classes[:, 64:]).all()
    with pytest.raises(UserError, match=r"--sits is required: .* not trained with modality "
                                        r"dropout"):
        predict.predict_mosaic(loaded, aerial, None, str(tmp_path / "b.tif"), progress=False)


def test_a_date_counts_when_enough_of_its_crop_has_data(loaded, tmp_path):
    aerial = write_aerial(tmp_path / "mosaic.tif")
    s2 = write_s2_folder(tmp_path / "s2", cover=0.5)
    kw = dict(overlap=0.0, batch_size=8, progress=False)
    strict = predict.predict_mosaic(loaded, aerial, s2, str(tmp_path / "a.tif"), **kw)
    half = predict.predict_mosaic(loaded, aerial, s2, str(tmp_path / "b.tif"),
                                  min_clear_fraction=0.4, **kw)
    # The crops of the windows at x = 64 px have data over 70 m of their 160 m: 0.44.
    assert strict["windows_without_sits"] == 12 and half["windows_without_sits"] == 8
    assert (read(tmp_path / "a.tif")[0][0][:, 64:96] == 255).all()
    assert (read(tmp_path / "b.tif")[0][0][:, 64:96] != 255).all()


def test_test_time_augmentation_averages_flipped_windows(loaded, tmp_path):
    aerial = write_aerial(tmp_path / "mosaic.tif")
    s2 = write_s2_folder(tmp_path / "s2")
    summary = predict.predict_mosaic(loaded, aerial, s2, str(tmp_path / "map.tif"), overlap=0.0,
                                     batch_size=8, probabilities=True, tta="flips",
                                     progress=False)
    assert summary["tta_views"] == 4
    probs = read(tmp_path / "map_probabilities.tif")[0].astype(int)
    for x, y in ((0, 0), (96, 64)):
        logits = np.mean([patchwise(loaded, x, y, view).astype(np.float64)
                          for view in ((0, False), (0, True), (2, True), (2, False))], axis=0)
        got = np.moveaxis(probs[:, y:y + SIZE, x:x + SIZE], 0, -1)
        np.testing.assert_allclose(got, np.rint(softmax(logits) * 254), atol=1)
        plain = softmax(patchwise(loaded, x, y).astype(np.float64))
        assert np.abs(got - np.rint(plain * 254)).max() > 2      # TTA changed the map


def write_s2_stack(path, dates=DATES):
    """The series of write_s2_folder as one multi-date GeoTIFF, bands 'YYYYMMDD_<band>'."""
    folder = write_s2_folder(os.path.dirname(path) + "/s2_for_stack")
    data, descriptions = [], []
    for date in dates:
        with rasterio.open(os.path.join(folder, f"S2_{date:%Y%m%d}.tif")) as src:
            data.append(src.read())
            profile = src.profile
    profile.update(count=len(dates) * len(S2_BANDS))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.concatenate(data))
        for i, (d, b) in enumerate([(d, b) for d in dates for b in S2_BANDS], start=1):
            dst.set_band_description(i, f"{d:%Y%m%d}_{b}")
    return str(path), folder


def test_a_single_multi_date_file_gives_the_map_of_the_folder(loaded, tmp_path):
    aerial = write_aerial(tmp_path / "mosaic.tif")
    stack, folder = write_s2_stack(tmp_path / "s2_stack.tif")
    kw = dict(overlap=0.25, batch_size=8, probabilities=True, progress=False)
    one = predict.predict_mosaic(loaded, aerial, stack, str(tmp_path / "a.tif"), **kw)
    predict.predict_mosaic(loaded, aerial, folder, str(tmp_path / "b.tif"), **kw)
    assert one["windows_without_sits"] == 0
    assert (read(tmp_path / "a_probabilities.tif")[0] == read(tmp_path / "b_probabilities.tif")[0]).all()
    assert (read(tmp_path / "a.tif")[0] == read(tmp_path / "b.tif")[0]).all()


def run_main(argv, capsys):
    from lcssl.predict.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, err


def test_cli_checks_inputs_before_the_checkpoint_and_gives_its_own_advice(tmp_path, capsys):
    not_raster = tmp_path / "mosaic.tif"
    not_raster.write_text("not a raster")
    missing = str(tmp_path / "no_run")
    code, err = run_main([f"--checkpoint={missing}", f"--aerial={not_raster}",
                          f"--out={tmp_path / 'map.tif'}", "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --aerial={not_raster}: ")
    aerial = write_aerial(tmp_path / "ok.tif")
    code, err = run_main([f"--checkpoint={missing}", f"--aerial={aerial}",
                          f"--out={tmp_path / 'nowhere' / 'map.tif'}"], capsys)
    assert code == 2 and err == [f"error: --out={tmp_path / 'nowhere' / 'map.tif'}: the folder "
                                 f"{tmp_path / 'nowhere'} does not exist"]
    code, err = run_main([f"--checkpoint={missing}", f"--aerial={aerial}",
                          f"--out={tmp_path / 'map.tif'}"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --checkpoint={missing}: ")
    assert "Point --checkpoint at the workdir of a supervised or fine-tuning run" in err[0]
    assert "init_from" not in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mosaic.tif", "ok.tif"]


def test_cli_names_an_empty_step_folder(run_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "checkpoints" / "7").mkdir()
    aerial = write_aerial(tmp_path / "mosaic.tif")
    code, err = run_main([f"--checkpoint={run}", f"--aerial={aerial}",
                          f"--out={tmp_path / 'map.tif'}", "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and "error: --checkpoint=" in err[0]
    assert "checkpoints/7" in err[0]


def test_cli_checks_bands_and_sentinel2_before_restoring_the_weights(run_dir, tmp_path, capsys,
                                                                     monkeypatch):
    from lcssl.predict import mosaic

    def never(*args, **kwargs):
        raise AssertionError("the weights were restored before the inputs were checked")

    monkeypatch.setattr(mosaic, "load_model", never)
    three_bands = write_aerial(tmp_path / "rgb.tif", aerial_array()[:3])
    s2 = write_s2_folder(tmp_path / "s2")
    code, err = run_main([f"--checkpoint={run_dir}", f"--aerial={three_bands}", f"--sits={s2}",
                          f"--out={tmp_path / 'map.tif'}", "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(
        f"error: {three_bands}: the checkpoint expects the bands")
    aerial = write_aerial(tmp_path / "mosaic.tif")
    code, err = run_main([f"--checkpoint={run_dir}", f"--aerial={aerial}",
                          f"--out={tmp_path / 'map.tif'}", "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --sits is required")
