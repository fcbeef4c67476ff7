"""Where each SimCLR view's pixels come from (augment.view_geometry) and the pixel correspondence
between two views (map_view_points, view_correspondence) that the dense objective pairs pixels with.

Tolerances: coordinates are fractions of the patch side in float32 (eps ~1e-7 on values <= 1, a
few operations each), so exact maps agree to 1e-5. A pixel matched on a grid of side n is the one
containing the mapped centre: it is at most half a cell (0.5 / n) from it in each axis.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcssl.data import augment

EXACT = 1e-5


def geometry(b=1, origin=(0.0, 0.0), keep=1.0, transpose=False, flip0=False, flip1=False):
    return {"origin": jnp.tile(jnp.asarray(origin, jnp.float32), (b, 1)),
            "keep": jnp.full((b,), keep, jnp.float32),
            "transpose": jnp.full((b,), transpose), "flip0": jnp.full((b,), flip0),
            "flip1": jnp.full((b,), flip1)}


IDENTITY = geometry()


def test_known_crop_and_flip_maps_pixel_to_the_right_pixel():
    # View 2 is the bottom-right quarter (keep 1/2, corner at (1/2, 1/2)), flipped left-right.
    view2 = geometry(origin=(0.5, 0.5), keep=0.5, flip1=True)
    m = augment.view_correspondence(IDENTITY, view2, (8, 8))
    # View-1 pixel (5, 6): centre (5.5, 6.5) / 8 -> crop (0.375, 0.625) -> flipped col 0.375 -> (3, 3).
    assert int(m["match12"][0, 5 * 8 + 6]) == 3 * 8 + 3 and bool(m["valid12"][0, 5 * 8 + 6])
    # The top-left quarter of view 1 is not in view 2.
    assert not bool(m["valid12"][0, 2 * 8 + 2])
    np.testing.assert_array_equal(np.asarray(m["valid12"][0]).reshape(8, 8),
                                  np.logical_and.outer(np.arange(8) >= 4, np.arange(8) >= 4))
    # Every view-2 pixel is inside view 1; view-2 pixel (3, 3) sits in view-1 pixel (5, 6) (2x zoom:
    # view-2 pixel (3, 3) covers the ground of view-1 columns [6, 6.5)), and back.
    assert bool(np.all(m["valid21"]))
    assert int(m["match21"][0, 3 * 8 + 3]) == 5 * 8 + 6


def test_shift_maps_points_exactly():
    view1 = geometry(origin=(0.1, 0.2), keep=0.8)
    view2 = geometry(origin=(0.0, 0.05), keep=0.8)
    points = jnp.array([[[0.5, 0.5], [0.0, 0.0], [0.9, 0.95]]])
    mapped, valid = augment.map_view_points(points, view1, view2)
    # ground = origin1 + 0.8 p; view2 = (ground - origin2) / 0.8 = p + (origin1 - origin2) / 0.8
    expected = np.asarray(points) + np.array([0.1, 0.15]) / 0.8
    np.testing.assert_allclose(mapped, expected, atol=EXACT)
    np.testing.assert_array_equal(valid, [[True, True, False]])  # 0.9 + 0.125 > 1


@pytest.mark.parametrize("transpose,flip0,flip1", [(t, f0, f1) for t in (False, True)
                                                   for f0 in (False, True) for f1 in (False, True)])
def test_dihedral_correspondence_matches_the_array_transform(transpose, flip0, flip1):
    # The eight elements of the dihedral group applied to an array of pixel ids as augment applies
    # them: the matched pixel of the transformed array holds the id of the anchor pixel.
    ids = np.arange(36).reshape(6, 6)
    moved = augment._dihedral(jnp.asarray(ids), (0, 1), (jnp.asarray(transpose), jnp.asarray(flip0),
                                                         jnp.asarray(flip1)))
    m = augment.view_correspondence(IDENTITY, geometry(transpose=transpose, flip0=flip0, flip1=flip1),
                                    (6, 6))
    assert bool(np.all(m["valid12"])) and bool(np.all(m["valid21"]))
    np.testing.assert_array_equal(np.asarray(moved).reshape(-1)[np.asarray(m["match12"][0])], ids.reshape(-1))
    np.testing.assert_array_equal(np.asarray(m["match21"][0]), np.asarray(moved).reshape(-1))


def coordinate_batch(b=4, size=32):
    """Aerial bands 0 / 1 hold each pixel's (row, col) centre as a fraction of the side."""
    centre = (np.arange(size, dtype=np.float32) + 0.5) / size
    rows, cols = np.meshgrid(centre, centre, indexing="ij")
    aerial = np.broadcast_to(np.stack([rows, cols, np.zeros_like(rows)], -1), (b, size, size, 3))
    t = 2
    return {"aerial": np.ascontiguousarray(aerial), "sits": np.zeros((b, t, 8, 8, 2), np.float32),
            "dates": np.ones((b, t), np.int32), "sits_valid": np.ones((b, t), bool)}


def test_geometry_describes_the_views_two_views_returns():
    cfg = augment.default_config()
    cfg.color_prob = cfg.lighting_prob = cfg.blur_prob = cfg.erase_prob = 0.0
    cfg.date_dropout_prob = cfg.sits_noise_prob = 0.0
    cfg.photometric_bands = (0, 1, 2)
    cfg.crop_min_keep = 0.5
    batch, size = coordinate_batch(), 32
    key = jax.random.key(7)
    views = augment.two_views(key, batch, cfg)
    geoms = augment.view_geometry(key, batch, cfg)
    assert any(bool(np.any(g[k])) for g in geoms for k in ("transpose", "flip0", "flip1"))
    assert float(jnp.min(geoms[0]["keep"])) < 0.9
    points = augment.grid_points(4, (size, size))
    sources = []
    for view, geom in zip(views, geoms):
        # Each view pixel's value is the patch coordinate it samples: the map to the patch itself.
        source, valid = augment.map_view_points(points, geom, IDENTITY)
        assert bool(jnp.all(valid))
        got = np.asarray(view["aerial"][..., :2]).reshape(4, -1, 2)
        # Linear interpolation reproduces a linear ramp exactly, except within half an input pixel of
        # the patch border, where the sample is clamped.
        inner = np.all((source > 0.5 / size) & (source < 1 - 0.5 / size), axis=-1)
        assert inner.mean() > 0.8
        np.testing.assert_allclose(got[inner], np.asarray(source)[inner], atol=EXACT)
        sources.append(np.asarray(source))
    # Corresponding pixels of the two views see the same ground, to half a view-2 pixel, which is
    # at most half a patch pixel on the ground (keep <= 1).
    m = augment.view_correspondence(*geoms, (size, size))
    matched = np.take_along_axis(sources[1], np.asarray(m["match12"])[..., None], axis=1)
    valid = np.asarray(m["valid12"])
    assert valid.mean() > 0.3
    assert np.max(np.abs(matched - sources[0])[valid]) <= 0.5 / size + EXACT

