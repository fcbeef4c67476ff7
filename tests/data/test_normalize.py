"""Normalization from the dataset card: values, padded dates, pass-through, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcssl.data import normalize as norm

CARD = {
    "aerial": {"bands": ["R", "G", "B", "NIR", "elevation"], "mean": [100, 110, 90, 120, 30],
               "std": [50, 40, 45, 30, 20]},
    "sits": {"bands": ["B02", "B03"], "mean": [1000.0, 1500.0], "std": [200.0, 500.0]},
}


def _batch():
    rng = np.random.default_rng(0)
    return {
        "aerial": rng.integers(0, 256, size=(2, 4, 4, 5), dtype=np.uint8),
        "sits": rng.uniform(0, 5000, size=(2, 3, 2, 2, 2)).astype(np.float32),
        "dates": np.array([[10, 40, 0], [5, 0, 0]], np.int32),
        "sits_valid": np.array([[True, True, False], [True, False, False]]),
        "label": np.zeros((2, 4, 4), np.int32),
    }


def test_stats_from_card_are_float32_per_band():
    stats = norm.stats_from_card(CARD)
    assert stats.aerial_mean.dtype == np.float32 and stats.aerial_mean.shape == (5,)
    assert stats.sits_std.dtype == np.float32 and stats.sits_std.shape == (2,)


def test_normalize_standardises_and_zeroes_padded_dates():
    stats = norm.stats_from_card(CARD)
    batch = _batch()
    out = jax.jit(norm.normalize)(batch, stats)
    assert out["aerial"].dtype == jnp.float32
    expected = (batch["aerial"].astype(np.float32) - np.array(CARD["aerial"]["mean"])) / np.array(
        CARD["aerial"]["std"])
    np.testing.assert_allclose(out["aerial"], expected, rtol=1e-6)
    sits = np.asarray(out["sits"])
    expected_sits = (batch["sits"] - np.array([1000.0, 1500.0])) / np.array([200.0, 500.0])
    np.testing.assert_allclose(sits[0, :2], expected_sits[0, :2], rtol=1e-5)
    assert np.all(sits[0, 2] == 0) and np.all(sits[1, 1:] == 0)
    np.testing.assert_array_equal(out["label"], batch["label"])
    np.testing.assert_array_equal(out["dates"], batch["dates"])


def test_dark_level_is_mean_over_std_of_chosen_bands():
    stats = norm.stats_from_card(CARD)
    assert norm.dark_level_z(stats, [0, 1]) == pytest.approx((100 / 50 + 110 / 40) / 2)


@pytest.mark.parametrize("card, match", [
    ({"sits": CARD["sits"]}, "missing section 'aerial'"),
    ({"aerial": {**CARD["aerial"], "std": [1, 1, 1, 1, 0]}, "sits": CARD["sits"]}, "must be > 0"),
    ({"aerial": {**CARD["aerial"], "bands": ["R"]}, "sits": CARD["sits"]}, "names 1 bands"),
])
def test_bad_cards_name_the_field(card, match):
    with pytest.raises(ValueError, match=match):
        norm.stats_from_card(card)


def test_band_count_mismatch_is_reported():
    stats = norm.stats_from_card(CARD)
    batch = _batch()
    batch["aerial"] = batch["aerial"][..., :4]
    with pytest.raises(ValueError, match="aerial' has 4 bands"):
        norm.normalize(batch, stats)
