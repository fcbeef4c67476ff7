"""The synthetic dataset: deterministic, spatially consistent, and learnable for the intended reasons."""
import json

import numpy as np
import pytest

from data_prep import flair2, hameln, synth


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", ["flair2", "hameln"])
def test_same_seed_same_bytes(tmp_path, layout):
    a = synth.write_dataset(tmp_path / "a", layout=layout, seed=7, **synth.TINY)
    synth.write_dataset(tmp_path / "b", layout=layout, seed=7, **synth.TINY)
    synth.write_dataset(tmp_path / "c", layout=layout, seed=8, **synth.TINY)
    files_a, files_b, files_c = (_files(tmp_path / k) for k in "abc")
    assert files_a == files_b
    assert files_a.keys() == files_c.keys() and files_a != files_c
    assert a["num_patches"] == 6 and a["num_labelled"] == 4 and a["num_unlabelled"] == 2
    tifs = [p for p in files_a if str(p).endswith(".tif")]
    # aerial for every patch, a label for each labelled one
    assert len(tifs) == a["num_patches"] + a["num_labelled"]


def test_write_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        synth.write_dataset(tmp_path, layout="sentinel")
    with pytest.raises(ValueError, match="num_dates"):
        synth.write_dataset(tmp_path, num_dates=1)


def test_patches_sit_where_the_centroid_table_says(tmp_path):
    """Aerial georeferencing and super-patch centroids describe the same place (10 m per S2 px)."""
    synth.write_dataset(tmp_path, layout="flair2", num_zones=1, patches_per_zone=3, unlabelled_per_zone=1,
                        patch_size=32, num_dates=4)
    table = json.loads((tmp_path / flair2.CENTROIDS).read_text())
    patches = [flair2.read_patch(r, expect_size=32) for r in flair2.list_patches(tmp_path)]
    centres = []
    for p in patches:
        a, _, c, _, e, f = p.aerial_transform
        row, col = table[p.patch_id + ".tif"]
        centres.append((c + 16 * a, f + 16 * e, row, col))
    x0, y0, r0, c0 = centres[0]
    for x, y, row, col in centres[1:]:
        assert x - x0 == pytest.approx(10.0 * (col - c0))
        assert y - y0 == pytest.approx(-10.0 * (row - r0))
        assert abs(x - x0) >= 102.4 or abs(y - y0) >= 102.4        # patches do not overlap


def _pure_pixels(patch, gsd_m, sits_size=40):
    """(class, S2 pixel series [T, 10]) for each S2 pixel in the aerial footprint covered by one class."""
    size = patch.label.shape[0]
    start = sits_size / 2 - synth.FOOTPRINT_M / 20                   # footprint starts at 14.88 px
    cell = np.floor(start + (np.arange(size) + 0.5) * gsd_m / 10).astype(int)
    out = []
    for r in np.unique(cell):
        for c in np.unique(cell):
            labels = patch.label[np.ix_(cell == r, cell == c)]
            if labels.size >= 4 and (labels == labels.flat[0]).all():
                out.append((int(labels.flat[0]), patch.sits[:, r, c, :].astype(np.float64)))
    return out


def test_phenology_separates_classes_that_look_alike_from_the_air(tmp_path):
    synth.write_dataset(tmp_path, layout="flair2", num_zones=3, patches_per_zone=4, unlabelled_per_zone=0,
                        patch_size=32, num_dates=24, seed=1)
    ndvi = {}          # class -> list of (doy, ndvi) on clear dates
    colour = {}        # class -> aerial RGB pixels
    for ref in flair2.list_patches(tmp_path):
        p = flair2.read_patch(ref, expect_size=32)
        clear = p.sits_cloud < 0.1
        doy = np.array([d.timetuple().tm_yday for d in p.sits_dates])
        for cls, series in _pure_pixels(p, 102.4 / 32):
            red, nir = series[:, 2], series[:, 6]                    # B04, B08
            ndvi.setdefault(cls, []).extend(zip(doy[clear], ((nir - red) / (nir + red))[clear]))
        for cls in (6, 9, 10):
            colour.setdefault(cls, []).append(p.aerial[p.label == cls][:, :3])
    deciduous, grass, crop = 6, 9, 10                                # 0-based FLAIR #2 ids
    assert all(len(ndvi.get(c, [])) > 10 for c in (deciduous, grass, crop)), {c: len(v) for c, v in ndvi.items()}

    def mean_ndvi(cls, first, last):
        values = [v for d, v in ndvi[cls] if first <= d <= last]
        assert values, f"class {cls}: no clear date between doy {first} and {last}"
        return float(np.mean(values))

    # Crop: green in early summer, bare after the July harvest; grass steady; deciduous leaf-off in winter.
    assert mean_ndvi(crop, 150, 190) > mean_ndvi(grass, 150, 190) + 0.1
    assert mean_ndvi(crop, 215, 275) < mean_ndvi(grass, 215, 275) - 0.2
    assert mean_ndvi(deciduous, 160, 260) > mean_ndvi(deciduous, 1, 90) + 0.3
    assert mean_ndvi(deciduous, 1, 90) < mean_ndvi(grass, 1, 90) - 0.15
    # ... while their aerial colours are the same within a few grey levels.
    means = np.array([np.concatenate(colour[c]).mean(0) for c in (deciduous, grass, crop)])
    assert np.abs(means - means.mean(0)).max() < 6


def test_buildings_and_roads_share_a_spectrum_but_not_a_shape(tmp_path):
    summary = synth.write_dataset(tmp_path, layout="hameln", num_zones=1, patches_per_zone=4,
                                  unlabelled_per_zone=0, patch_size=64, num_dates=3)
    building, road = 0, 1                                             # Hameln 0-based ids
    interiors = {building: [], road: []}
    compact = []
    for ref in hameln.list_patches(tmp_path):
        p = hameln.read_patch(ref)
        lab = p.label
        # interior pixels: the 3x3 neighbourhood has one class (away from rims and shadows)
        same = np.ones_like(lab[1:-1, 1:-1], bool)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                same &= lab[1 + dr:lab.shape[0] - 1 + dr, 1 + dc:lab.shape[1] - 1 + dc] == lab[1:-1, 1:-1]
        for cls in interiors:
            interiors[cls].append(p.aerial[1:-1, 1:-1][same & (lab[1:-1, 1:-1] == cls)][:, :3])
        compact.append((lab == building).sum())
    assert summary["zones"][0]["kind"] == "U" and sum(compact) > 0
    roof, asphalt = (np.concatenate(interiors[c]) for c in (building, road))
    assert len(roof) > 20 and len(asphalt) > 20
    np.testing.assert_allclose(roof.mean(0), asphalt.mean(0), atol=12)
