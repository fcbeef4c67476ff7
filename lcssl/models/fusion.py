"""Fusion of the U-TAE features into every level of the aerial U-Net encoder (U-T&T, FLAIR #2).

Two branches turn the last U-TAE feature map [B, h, w, Ct] into a term per encoder level [B, H_l, W_l, C_l]:
- 'cropped': the centre area covering the aerial footprint, a 1x1 conv per level, resampled to the
  level's size (FM_cropped in the FLAIR #2 code);
- 'collapsed': the spatial mean, a 3-layer MLP per level, broadcast over the level (FM_collapsed).
The term is combined with the aerial level by
- 'add':  x + term (the FLAIR #2 baseline);
- 'concat': 1x1 conv of [x, branch outputs] back to C_l;
- 'se': squeeze-excitation gating, x * sigmoid(term) (Hu et al. 2018, with the gate computed from
  the time series instead of x);
- 'residual_excite': x + x * sigmoid(term), which keeps the identity path of x.

Everything is per sample: sample i's aerial features only see sample i's series. (The FLAIR #2
reference takes the collapsed vector of sample 0 for the whole batch, and drops the time-series
modality for the whole batch at once; neither is reproduced here.)
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcssl.models import ops

FUSION_MODES = ("add", "concat", "se", "residual_excite")
FUSION_BRANCHES = ("cropped", "collapsed")


def footprint_resize(x, footprint_px: float, out_hw: Sequence[int]):
    """Resample the centred footprint of x to out_hw.

    x [B, h, w, C] -> [B, out_h, out_w, C]. The footprint is the square of side footprint_px SITS
    pixels (fractional, e.g. 10.24 = 512 px * 0.2 m / 10 m) centred on the map, the aerial extent
    (docs/DESIGN.md, Footprint). Bilinear, with antialiasing when the output is coarser.
    """
    _, h, w, _ = x.shape
    out_h, out_w = out_hw
    x32 = ops.upcast(x)
    scale = jnp.array([out_h / footprint_px, out_w / footprint_px], x32.dtype)
    # Output coordinate u maps to input (u - translation) / scale; u = 0 must land on the
    # footprint's top-left edge, (h - footprint_px) / 2.
    translation = -scale * jnp.array([(h - footprint_px) / 2, (w - footprint_px) / 2], x32.dtype)
    out = jax.image.scale_and_translate(x32, (x.shape[0], out_h, out_w, x.shape[3]),
                                        (1, 2), scale, translation, "linear", antialias=True)
    return out.astype(x.dtype)


class CollapsedMLP(nn.Module):
    """3 linear layers whose widths step evenly from the input to the output width (FM_collapsed)."""
    features: int
    dropout: float = 0.3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        c_in = x.shape[-1]
        step = abs(c_in - self.features) // 3
        if c_in < self.features:
            hidden = (c_in + step, c_in + 2 * step)
        elif c_in > self.features:
            hidden = (c_in - step, c_in - 2 * step)
        else:
            hidden = (2 * c_in, 2 * c_in)
        for i, width in enumerate(hidden):
            x = nn.Dense(width, dtype=self.dtype, name=f"dense{i}")(x)
            x = nn.relu(nn.Dropout(self.dropout, deterministic=not train)(x))
        return nn.Dense(self.features, dtype=self.dtype, name=f"dense{len(hidden)}")(x)


class LevelFusion(nn.Module):
    """Fuses the time-series map into one aerial level. x [B, H, W, C], sits_map [B, h, w, Ct]."""
    mode: str = "add"
    branches: Sequence[str] = FUSION_BRANCHES
    footprint_px: float = 10.24
    dropout: float = 0.3
    dtype: Any = jnp.float32
    # The footprint resampling in the compute dtype (lcssl.models.ops) instead of fp32.
    low_precision_resample: bool = False

    @nn.compact
    def __call__(self, x, sits_map, train: bool = False):
        b, hh, ww, c = x.shape
        terms = []
        if "cropped" in self.branches:
            # 1x1 conv before resampling: the two commute (the resampling weights sum to 1), and the
            # conv then runs on the small SITS grid instead of the level's.
            y = nn.Conv(c, (1, 1), dtype=self.dtype, name="cropped_conv")(sits_map)
            if self.low_precision_resample:
                terms.append(ops.footprint_resize_lowp(y, self.footprint_px, (hh, ww), self.dtype))
            else:
                terms.append(footprint_resize(y, self.footprint_px, (hh, ww)))
        if "collapsed" in self.branches:
            pooled = jnp.mean(ops.upcast(sits_map), axis=(1, 2)).astype(self.dtype)
            y = CollapsedMLP(c, self.dropout, self.dtype, name="collapsed_mlp")(pooled, train)
            terms.append(jnp.broadcast_to(y[:, None, None, :], (b, hh, ww, c)))
        if not terms:
            raise ValueError(f"model.fusion_branches must name some of {FUSION_BRANCHES}, "
                             f"found {tuple(self.branches)}")
        if self.mode == "concat":
            y = jnp.concatenate([x] + [t.astype(x.dtype) for t in terms], axis=-1)
            return nn.Conv(c, (1, 1), dtype=self.dtype, name="concat_conv")(y)
        term = sum(terms).astype(x.dtype)
        if self.mode == "add":
            return x + term
        gate = jax.nn.sigmoid(ops.upcast(term)).astype(x.dtype)
        if self.mode == "se":
            return x * gate
        if self.mode == "residual_excite":
            return x + x * gate
        raise ValueError(f"model.fusion_mode must be one of {FUSION_MODES}, found {self.mode!r}")


class Fusion(nn.Module):
    """One LevelFusion per aerial level ('level{i}'), with optional per-sample modality dropout.

    levels: list of [B, H_l, W_l, C_l]; sits_map [B, h, w, Ct] -> fused levels (same shapes).
    modality_dropout p: in training, each sample independently keeps its aerial-only features (the
    time-series contribution dropped, at every level) with probability p; uses the 'dropout' rng.
    """
    mode: str = "add"
    branches: Sequence[str] = FUSION_BRANCHES
    footprint_px: float = 10.24
    dropout: float = 0.3
    modality_dropout: float = 0.0
    dtype: Any = jnp.float32
    low_precision_resample: bool = False

    @nn.compact
    def __call__(self, levels, sits_map, train: bool = False):
        fused = [LevelFusion(self.mode, tuple(self.branches), self.footprint_px, self.dropout,
                             self.dtype, self.low_precision_resample,
                             name=f"level{i}")(x, sits_map, train)
                 for i, x in enumerate(levels)]
        if train and self.modality_dropout > 0:
            b = sits_map.shape[0]
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.modality_dropout, (b,))
            keep = keep[:, None, None, None]
            fused = [jnp.where(keep, f, x) for f, x in zip(fused, levels)]
        return fused
