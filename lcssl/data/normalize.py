"""Per-band standardisation of a host batch, run on the device inside the jitted step.

The statistics come from the dataset card (`dataset_card.json`, DESIGN.md), so the numbers a model
was trained with travel with the data and, through the checkpoint's input spec, with the weights.

    aerial [B, H, W, Ca] uint8          -> float32, (x - mean) / std per band
    sits   [B, T, h, w, Cs] float32 raw -> float32, (x - mean) / std per band; padded dates -> 0
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class NormStats:
    """Per-band mean and standard deviation, in raw units (uint8 DN for aerial, reflectance for S2)."""

    aerial_mean: np.ndarray  # [Ca] float32
    aerial_std: np.ndarray  # [Ca] float32
    sits_mean: np.ndarray  # [Cs] float32
    sits_std: np.ndarray  # [Cs] float32


def _band_stats(card: Mapping[str, Any], modality: str) -> tuple[np.ndarray, np.ndarray]:
    section = card.get(modality)
    if not isinstance(section, Mapping):
        raise ValueError(f"dataset card: missing section '{modality}' (expected a dict with mean and std)")
    out = []
    for field in ("mean", "std"):
        if field not in section:
            raise ValueError(f"dataset card: missing field '{modality}.{field}' (one value per band)")
        values = np.asarray(section[field], dtype=np.float32)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(
                f"dataset card: '{modality}.{field}' must be a non-empty list of numbers, found {section[field]!r}")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"dataset card: '{modality}.{field}' has non-finite values: {values.tolist()}")
        out.append(values)
    mean, std = out
    if mean.shape != std.shape:
        raise ValueError(
            f"dataset card: '{modality}.mean' has {mean.size} bands but '{modality}.std' has {std.size}")
    bands = section.get("bands")
    if bands is not None and len(bands) != mean.size:
        raise ValueError(
            f"dataset card: '{modality}.bands' names {len(bands)} bands {list(bands)} "
            f"but '{modality}.mean' has {mean.size} values")
    if np.any(std <= 0):
        raise ValueError(
            f"dataset card: '{modality}.std' must be > 0 for every band (a constant band cannot be "
            f"standardised), found {std.tolist()}")
    return mean, std


def stats_from_card(card: Mapping[str, Any]) -> NormStats:
    """Reads `card['aerial'|'sits']['mean'|'std']` (one value per band) into float32 arrays."""
    aerial_mean, aerial_std = _band_stats(card, "aerial")
    sits_mean, sits_std = _band_stats(card, "sits")
    return NormStats(aerial_mean=aerial_mean, aerial_std=aerial_std, sits_mean=sits_mean, sits_std=sits_std)


def dark_level_z(stats: NormStats, bands: Sequence[int]) -> float:
    """Distance from zero radiance to the band mean in standard deviations (mean / std), averaged
    over `bands`. `lcssl.data.augment` uses it so that brightness and lighting act as gains on
    radiance (a shadow darkens towards black, not towards the dataset mean)."""
    bands = list(bands)
    return float(np.mean(np.asarray(stats.aerial_mean)[bands] / np.asarray(stats.aerial_std)[bands]))


def normalize(batch: Mapping[str, Any], stats: NormStats) -> dict[str, Any]:
    """Standardises `aerial` and `sits`; other keys pass through unchanged. Jittable.

    Padded dates (`sits_valid` False) are set to exactly 0 after standardisation, which is the band
    mean, so whatever the model does with them cannot leak a raw value.
    """
    out = dict(batch)
    if "aerial" in batch:
        aerial = batch["aerial"]
        _check_bands("aerial", aerial.shape[-1], stats.aerial_mean)
        out["aerial"] = (aerial.astype(jnp.float32) - stats.aerial_mean) / stats.aerial_std
    if "sits" in batch:
        sits = batch["sits"]
        _check_bands("sits", sits.shape[-1], stats.sits_mean)
        sits = (sits.astype(jnp.float32) - stats.sits_mean) / stats.sits_std
        if "sits_valid" in batch:
            valid = batch["sits_valid"].astype(bool)[:, :, None, None, None]  # [B, T, 1, 1, 1]
            sits = jnp.where(valid, sits, 0.0)
        out["sits"] = sits
    return out


def _check_bands(modality: str, found: int, mean) -> None:
    expected = np.shape(mean)[0]
    if found != expected:
        raise ValueError(
            f"normalize: batch '{modality}' has {found} bands but the dataset card stats have {expected}")
