"""Test-time augmentation (pure jax on tiny arrays): averaging over flips and rotations leaves an
equivariant model unchanged, aerial image and series transformed alike, and averages a model that
is not equivariant."""
import jax.numpy as jnp
import numpy as np
import pytest

from lcssl.predict.model import TTA_VIEWS, with_tta


def batch(seed=0, size=8):
    rng = np.random.default_rng(seed)
    return {"aerial": jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32),
            "sits": jnp.asarray(rng.normal(size=(2, 4, size, size, 5)), jnp.float32),
            "dates": jnp.zeros((2, 4), jnp.int32), "sits_valid": jnp.ones((2, 4), bool)}


def equivariant(b):
    """Per pixel: the aerial bands plus the first date's first band, [B, H, W, 4]; a series left
    untransformed would come back flipped / rotated in the last channel."""
    return jnp.concatenate([b["aerial"], b["sits"][:, 0, ..., :1]], axis=-1)


@pytest.mark.parametrize("tta", ["flips", "d4"])
def test_an_equivariant_model_is_unchanged(tta):
    b = batch()
    np.testing.assert_allclose(with_tta(equivariant, tta)(b), equivariant(b), atol=1e-6)


@pytest.mark.parametrize("tta", ["flips", "d4"])
def test_a_position_dependent_model_is_averaged_over_the_views(tta):
    def row_index(b):
        h = b["aerial"].shape[1]
        return jnp.broadcast_to(jnp.arange(h, dtype=jnp.float32)[None, :, None, None],
                                b["aerial"].shape[:3] + (1,))

    got = with_tta(row_index, tta)(batch())
    # views map row y to y and 7 - y equally often: the mean is 3.5 everywhere
    np.testing.assert_allclose(got, 3.5, atol=1e-6)
    assert len(TTA_VIEWS[tta]) == {"flips": 4, "d4": 8}[tta]
    assert with_tta(row_index, "none") is row_index
