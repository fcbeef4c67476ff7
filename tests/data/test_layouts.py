"""The layout contract: one registry for build, synth, the CLI and configs; every class of every
synthetic layout in its built dataset; the FLAIR-HUB reader; the Hameln synthetic output unchanged."""
import dataclasses
import hashlib
import json
import pathlib
import re
import sqlite3

import numpy as np
import pytest

from data_prep import build, flair_hub, layouts, rasters, synth
from data_prep.__main__ import parser
from data_prep.patch import BadPatch, Layout
from lcssl.data import records

ROOT = pathlib.Path(__file__).resolve().parents[2]
SITS = {"max_dates": 6, "min_clear_dates": 1, "max_cloud": 1.0}


def test_every_layout_is_one_registry_entry_with_the_whole_contract():
    for name in layouts.NAMES:
        layout = layouts.get(name)
        assert isinstance(layout, Layout) and layout.name == name
        assert len(layout.synth.plot_classes()) == layout.synth.num_classes  # every class can be drawn
        assert len(layout.synth.codes) == synth.NUM_INTERNAL
    commands = {a.dest: a for a in parser()._subparsers._group_actions[0].choices["build"]._actions}
    assert tuple(commands["layout"].choices) == layouts.NAMES
    with pytest.raises(ValueError, match="unknown layout 'sentinel'; expected one of flair2, hameln, flair_hub"):
        layouts.get("sentinel")


def test_no_code_branches_on_a_layout_name():
    """What depends on a layout is in its module (data_prep/layouts.py), not in an `if` elsewhere."""
    names = "|".join(layouts.NAMES)
    branch = re.compile(rf"""(layout|dataset)\s*(==|!=|in)\s*[("']|(==|!=)\s*["']({names})["']"""
                        rf"""|\bin\s*[(\[{{][^)\]}}]*["']({names})["']""")
    for path in [*(ROOT / "data_prep").glob("*.py"), ROOT / "lcssl" / "configs.py",
                 *(ROOT / "configs").glob("*.py")]:
        hits = [line for line in path.read_text().splitlines() if branch.search(line)]
        assert not hits, f"{path}: {hits}"
    assert branch.search('if preset in ("hameln", "flair2"):')
    assert branch.search('x = 1 if name == "flair_hub" else 2')


def _labels_by_split(out: pathlib.Path, card: dict) -> dict:
    import tensorflow as tf

    decode = records.decode_fn(card)
    found = {}
    for split, info in card["splits"].items():
        seen = set()
        for name in info["files"]:
            for rec in tf.data.TFRecordDataset(str(out / name)):
                ex = decode(rec)
                if bool(ex["has_label"]):
                    seen |= set(np.unique(ex["label"].numpy()).tolist())
        found[split] = seen - {255}
    return found


@pytest.mark.parametrize("layout, extra", [("flair2", {"test_zones": 1}), ("hameln", {"every_class": True}),
                                           ("flair_hub", {})])
def test_every_class_is_in_each_labelled_split_of_a_synthetic_layout(tmp_path, layout, extra):
    synth.write_dataset(tmp_path / "raw", layout=layout, num_zones=4, patches_per_zone=1, unlabelled_per_zone=0,
                        patch_size=32, num_dates=4, seed=3, **extra)
    options = build.BuildOptions(workers=1, shard_size=8, sits=SITS, progress=False, tfds_metadata=False,
                                 expect_size=32, val_fraction=0.25, test_fraction=0.25, seed=0)
    build.build(tmp_path / "raw", tmp_path / "out", layout=layout, options=options)
    card = json.loads((tmp_path / "out" / "dataset_card.json").read_text())
    num_classes = len(card["classes"])
    assert num_classes == layouts.get(layout).synth.num_classes
    assert all(n > 0 for n in card["class_histogram"]), card["class_histogram"]
    found = _labels_by_split(tmp_path / "out", card)
    for split in ("train", "val", "test"):
        assert found[split] == set(range(num_classes)), (split, sorted(found[split]))
    if layout == "flair2":  # the released test folders are the test split
        assert card["splits"]["test"]["zones"] == ["D002_2021/Z2_UU"]  # zone 3 (urban) of department 2


def _tree_sha256(folder: pathlib.Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def test_the_synthetic_hameln_dataset_is_what_it_was(tmp_path):
    # The label-efficiency study builds its benchmark from this generator: the bytes are pinned
    # (measured on the generator before the layout registry; every_class is off for Hameln).
    synth.write_dataset(tmp_path, layout="hameln", num_zones=3, seed=3, num_dates=12)  # the CLI's defaults
    assert _tree_sha256(tmp_path) == HAMELN_SEED3_SHA256


# sha256 of `python -m data_prep synth --layout=hameln --num-zones=3 --seed=3` by the generator of
# bb5986c (before the registry), with this venv's GDAL (a GDAL upgrade may change GeoTIFF bytes).
HAMELN_SEED3_SHA256 = "c2e48bf6c101bf5b1223a4b4a4f072ab44a49b122ae5342ed479fa4ce8aaffb4"


# ----------------------------------------------------------------------------- FLAIR-HUB reader

@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    synth.write_dataset(root, layout="flair_hub", num_zones=2, patches_per_zone=2, unlabelled_per_zone=1,
                        patch_size=32, num_dates=5, seed=0)
    return root


def test_flair_hub_patches_read_as_published(hub):
    refs = flair_hub.list_patches(hub)
    assert len(refs) == 6 and sum(r.has_label for r in refs) == 4
    ref = next(r for r in refs if r.has_label)
    assert ref.patch_id.startswith(f"{ref.domain}_{ref.zone}_") and ref.domain == "D001-2021"
    patch = flair_hub.read_patch(ref, expect_size=32)
    assert patch.aerial.shape == (32, 32, 4) and patch.label.max() < 19
    assert patch.sits.shape == (len(patch.sits_dates), 8, 8, 10) and patch.sits.dtype == np.uint16
    assert patch.sits_cloud.shape == (len(patch.sits_dates),)
    # The series file is date-major T x 10 bands; the reader's [T, h, w, C] is that file, reshaped.
    raw, _, _ = rasters.read_raster(ref.files["sits"], bands=10 * len(patch.sits_dates), size=None,
                                    dtype=np.uint16, need_georef=True)
    assert raw.shape[:2] == (10, 10)  # as published; build crops the centre 8 x 8
    np.testing.assert_array_equal(patch.sits[1, :, :, 3], raw[1:9, 1:9, 10 + 3])
    meta = flair_hub.metadata(hub)
    assert len(meta["classes"]) == 19 and meta["official_miou"]["exclude_classes"][-1] == "undefined"


def test_flair_hub_bad_series_and_dates_name_the_file(hub, tmp_path):
    ref = next(r for r in flair_hub.list_patches(hub) if r.has_label)
    with pytest.raises(BadPatch, match="expected at least 12x12 px") as e:
        flair_hub.read_patch(ref, expect_size=32, sits_size=12)
    assert e.value.reason == "size" and e.value.path == ref.files["sits"]
    dates = tmp_path / "dates.gpkg"
    flair_hub.write_dates_table(dates, {"other_patch": []})
    with pytest.raises(BadPatch, match=f"no acquisition_dates for patch_id {ref.patch_id}") as e:
        flair_hub.read_patch(dataclasses.replace(ref, files={**ref.files, "dates": str(dates)}), expect_size=32)
    assert e.value.reason == "bad_dates"
    broken = tmp_path / "broken.gpkg"
    flair_hub.write_dates_table(broken, {ref.patch_id: []})
    con = sqlite3.connect(broken)
    with con:
        con.execute("UPDATE sentinel2_dates SET acquisition_dates = '{\"0\": \"2021-13-01\"}'")
    con.close()
    with pytest.raises(BadPatch, match="acquisition_dates: expected a JSON object"):
        flair_hub.read_patch(dataclasses.replace(ref, files={**ref.files, "dates": str(broken)}), expect_size=32)


def test_flair_hub_modalities_not_read_are_named_once_per_build_and_in_the_card(tmp_path, capsys):
    raw = tmp_path / "raw"
    synth.write_dataset(raw, layout="flair_hub", num_zones=4, patches_per_zone=1, unlabelled_per_zone=1,
                        patch_size=32, num_dates=4, seed=0)
    assert flair_hub.metadata(raw)["not_read"] == []
    # Sentinel-1 and the DEM beside every patch, as a FLAIR-HUB download has them.
    for aerial in (raw / "data").glob("*_AERIAL_RGBI/*/*.tif"):
        for modality in ("SENTINEL1-ASC_TS", "DEM_ELEV"):
            copy = pathlib.Path(str(aerial).replace("AERIAL_RGBI", modality))
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(aerial.read_bytes())
    options = build.BuildOptions(workers=1, shard_size=8, sits=SITS, progress=False, tfds_metadata=False,
                                 expect_size=32, val_fraction=0.25, test_fraction=0.25, seed=0)
    summary = build.build(raw, tmp_path / "out", layout="flair_hub", options=options)
    lines = [line for line in capsys.readouterr().out.splitlines() if "not read" in line]
    assert lines == [f"build flair_hub: {raw} also holds DEM_ELEV, SENTINEL1-ASC_TS: not read (lcssl's model "
                     "takes aerial + Sentinel-2)"]
    card = json.loads((tmp_path / "out" / "dataset_card.json").read_text())
    assert card["modalities_not_read"] == summary["modalities_not_read"] == ["DEM_ELEV", "SENTINEL1-ASC_TS"]
    assert summary["patches_found"] == 8 and summary["skipped_total"] == 0
