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


# ----------------------------------------------------------------------------- realism options
# Each option is checked against what its documentation says, on the generator's own functions
# (known answers) and on written datasets (the option reaches the files, and only where it should).

def _zone_and_patches(kind="A", size=32, count=36, seed=0):
    """A zone and the top-left corners (metres) of `count` non-overlapping patches on it."""
    side = int(np.ceil(np.sqrt(count)))
    zone = synth.Zone(np.random.default_rng(seed), kind, side * synth.FOOTPRINT_M)
    corners = [(r * synth.FOOTPRINT_M, c * synth.FOOTPRINT_M) for r in range(side) for c in range(side)]
    return zone, corners[:count]


def _clean_classes(zone, top, left, size, margin_px=0):
    gsd = synth.FOOTPRINT_M / size
    n = size + 2 * margin_px
    x, y = synth._grid(top - margin_px * gsd, left - margin_px * gsd, n, n, gsd)
    return zone.classes(x, y).reshape(n, n)


def test_boundary_jitter_moves_boundaries_by_at_most_n_px():
    jitter, size = 2, 32
    zone, corners = _zone_and_patches(size=size, count=12)
    changed = 0
    for i, (top, left) in enumerate(corners):
        rng = np.random.default_rng(i)
        noisy = synth.noisy_labels(rng, zone, top, left, size, synth.Realism(boundary_jitter_px=jitter))
        clean = _clean_classes(zone, top, left, size, margin_px=jitter)      # [size + 2n]^2
        inner = clean[jitter:-jitter, jitter:-jitter]
        changed += int((noisy != inner).sum())
        # every label is the true class of a pixel at most `jitter` px away (Chebyshev)
        for r, c in zip(*np.nonzero(noisy != inner)):
            assert noisy[r, c] in clean[r:r + 2 * jitter + 1, c:c + 2 * jitter + 1], (i, r, c)
    assert changed > 0                                    # the option does something
    one = synth.noisy_labels(np.random.default_rng(0), zone, *corners[0], size,
                             synth.Realism(boundary_jitter_px=1))
    far = _clean_classes(zone, *corners[0], size, margin_px=1)
    assert all(one[r, c] in far[r:r + 3, c:c + 3] for r, c in zip(*np.nonzero(one != far[1:-1, 1:-1])))


def test_wrong_region_share_is_the_share_of_relabelled_regions():
    import scipy.ndimage

    share, size = 0.3, 32
    zone, corners = _zone_and_patches(size=size, count=36)
    regions = flipped = 0
    for i, (top, left) in enumerate(corners):
        noisy = synth.noisy_labels(np.random.default_rng(i), zone, top, left, size,
                                   synth.Realism(wrong_region_share=share))
        clean = _clean_classes(zone, top, left, size)
        is_region = np.isin(clean, synth.REGION_CLASSES)
        np.testing.assert_array_equal(noisy[~is_region], clean[~is_region])    # objects keep their label
        for cls in synth.REGION_CLASSES:
            components, count = scipy.ndimage.label(clean == cls)
            for k in range(1, count + 1):
                new = np.unique(noisy[components == k])
                assert len(new) == 1, "a region is relabelled as a whole"
                regions += 1
                if new[0] != cls:
                    assert new[0] in synth.REGION_CLASSES
                    flipped += 1
    # Bernoulli(share) per region: the measured share is within 4 binomial standard deviations.
    assert regions >= 60
    assert abs(flipped / regions - share) <= 4 * np.sqrt(share * (1 - share) / regions), (flipped, regions)


def test_zone_gain_and_offset_are_what_the_summary_records_and_the_options_allow(tmp_path):
    options = synth.Realism(zone_gain=0.2, zone_offset=0.05, date_gain=0.1)
    kwargs = dict(layout="flair2", num_zones=2, patches_per_zone=2, unlabelled_per_zone=0, patch_size=32,
                  num_dates=4, seed=5)
    synth.write_dataset(tmp_path / "clean", **kwargs)
    info = synth.write_dataset(tmp_path / "shift", realism=options, **kwargs)
    refs = {r.patch_id: r for r in flair2.list_patches(tmp_path / "clean")}
    for ref in flair2.list_patches(tmp_path / "shift"):
        zone = next(z for z in info["zones"] if z["zone"] == ref.zone and z["domain"] == ref.domain)
        gain, offset, date_gains = zone["gain"], zone["offset"], np.array(zone["date_gains"])
        assert abs(gain - 1) <= 0.2 and abs(offset) <= 0.05 and np.all(np.abs(date_gains - 1) <= 0.1)
        shifted = flair2.read_patch(ref, expect_size=32)
        clean = flair2.read_patch(refs[ref.patch_id], expect_size=32)
        # Aerial R, G, B, NIR: shifted = rint(g x + o) and clean = rint(x) for the same x, so
        # |shifted - (g clean + o)| <= 0.5 + 0.5 g wherever neither was clipped.
        a, b = clean.aerial[..., :4].astype(np.float64), shifted.aerial[..., :4].astype(np.float64)
        ok = (a > 0) & (a < 255) & (b > 0) & (b < 255)
        assert ok.mean() > 0.9
        residual = b - (gain * a + offset * synth.AERIAL_FULL_SCALE)
        assert np.abs(residual[ok]).max() <= 0.5 + 0.5 * gain + 1e-9
        fit_gain, fit_offset = np.polyfit(a[ok], b[ok], 1)
        assert fit_gain == pytest.approx(gain, abs=0.01)
        np.testing.assert_array_equal(shifted.aerial[..., 4], clean.aerial[..., 4])   # elevation untouched
    for zone in info["zones"]:
        stem = f"SEN2_sp_{zone['domain']}-{zone['zone']}_data.npy"
        sen = [next((tmp_path / k).rglob(stem)) for k in ("clean", "shift")]
        a, b = (np.load(p).astype(np.float64) for p in sen)               # [T, 10, h, w]
        g = zone["gain"] * np.array(zone["date_gains"])[:, None, None, None]
        ok = (a > 0) & (b > 0) & (b < 65535)
        residual = b - (g * a + zone["offset"] * synth.S2_FULL_SCALE)
        assert np.all(np.abs(residual[ok]) <= 0.5 + 0.5 * np.broadcast_to(g, a.shape)[ok] + 1e-6)
    # labels are not touched by a radiometric shift
    for ref in flair2.list_patches(tmp_path / "shift"):
        np.testing.assert_array_equal(flair2.read_patch(ref, expect_size=32).label,
                                      flair2.read_patch(refs[ref.patch_id], expect_size=32).label)


def test_phenology_shift_moves_the_vegetation_cycle_by_the_recorded_days(tmp_path):
    days = 25.0
    info = synth.write_dataset(tmp_path, layout="hameln", num_zones=4, patches_per_zone=1, unlabelled_per_zone=0,
                               patch_size=16, sits_size=11, num_dates=3,
                               realism=synth.Realism(phenology_shift_days=days))
    shifts = [z["phenology_shift_days"] for z in info["zones"]]
    assert shifts[0] == shifts[1] and shifts[2] == shifts[3] and shifts[0] != shifts[2]   # per region
    assert all(abs(s) <= days for s in shifts)
    # Known answer: a series rendered on days doy + d with the region shifted by d is the series on
    # days doy without a shift (same draws; dates kept away from the snowy winter).
    zone = synth.Zone(np.random.default_rng(0), "A", 200.0)
    fractions = synth.class_fractions(zone, 20, 20)
    doy = np.array([90, 150, 200, 250])
    base, _ = synth.render_series(np.random.default_rng(1), zone, fractions, doy)
    moved, _ = synth.render_series(np.random.default_rng(1), zone, fractions, doy + 30, region_shift_days=30.0)
    np.testing.assert_allclose(moved.astype(int), base.astype(int), atol=1)   # float rounding of the day sums
    unshifted, _ = synth.render_series(np.random.default_rng(1), zone, fractions, doy + 30)
    assert np.abs(unshifted.astype(int) - base.astype(int)).max() > 100         # without it, the season differs


def test_label_noise_changes_labels_only(tmp_path):
    kwargs = dict(layout="hameln", num_zones=1, patches_per_zone=3, unlabelled_per_zone=1, patch_size=32,
                  sits_size=16, num_dates=3, seed=2)
    synth.write_dataset(tmp_path / "clean", **kwargs)
    info = synth.write_dataset(tmp_path / "noisy", realism=synth.Realism(boundary_jitter_px=2,
                                                                          wrong_region_share=0.5), **kwargs)
    clean, noisy = _files(tmp_path / "clean"), _files(tmp_path / "noisy")
    assert clean.keys() == noisy.keys()
    differ = sorted(str(k) for k in clean if clean[k] != noisy[k])
    assert differ and all(k.startswith("labels/") for k in differ)
    assert info["noisy_label_pixels"] > 0


def test_realism_rejects_bad_options():
    with pytest.raises(ValueError, match="wrong_region_share"):
        synth.Realism(wrong_region_share=1.5)
    with pytest.raises(ValueError, match="boundary_jitter_px"):
        synth.Realism(boundary_jitter_px=-1)
