"""Time-series branch: U-TAE (Garnot & Landrieu 2021, "Panoptic segmentation of satellite image time
series with convolutional temporal attention networks", ICCV) with its L-TAE (Garnot & Landrieu 2020).

A conv encoder shared over dates, a lightweight temporal attention (L-TAE) at the lowest resolution,
the attention masks upsampled to aggregate the skip features of every level over time, and an
up-convolution decoder. Hyper-parameters default to the FLAIR #2 baseline config (flair-2-config.yml).

    sits [B, T, h, w, Cs], dates [B, T] int32, sits_valid [B, T] bool -> [B, h, w, decoder_widths[0]]

Padded dates (sits_valid False) get attention weight exactly 0, so they change nothing downstream.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcssl.models import ops
from lcssl.models.unet import batch_norm, maybe_remat

# PyTorch GroupNorm eps (the reference implementation), not Flax's 1e-6.
_GN_EPS = 1e-5
# U-TAE conv encoder: 4 groups (utae.py ConvLayer n_groups=4).
_ENCODER_GROUPS = 4


def positional_encoding(dates, d: int, period: float = 1000.0, repeat: int = 1):
    """Sinusoidal encoding of date values (Vaswani et al. 2017; U-TAE uses period T=1000).

    dates [..., T] -> [..., T, d * repeat] float32; dims 2i are sin, 2i+1 cos, of date / period^(2i/d).
    """
    i = np.arange(d)
    denom = period ** (2 * (i // 2) / d)
    angle = jnp.asarray(dates, jnp.float32)[..., None] / denom
    table = jnp.where(i % 2 == 0, jnp.sin(angle), jnp.cos(angle))
    return jnp.tile(table, (1,) * (table.ndim - 1) + (repeat,))


def _reflect_pad(x, p: int):
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")


class ConvLayer(nn.Module):
    """conv (reflect padding) -> norm -> ReLU, as U-TAE's ConvLayer with padding_mode='reflect'."""
    features: int
    kernel: int = 3
    strides: int = 1
    pad: int = 1
    norm: str = "group"
    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, (self.kernel, self.kernel), (self.strides, self.strides),
                    padding="VALID", dtype=self.dtype, name="conv")(_reflect_pad(x, self.pad))
        if self.norm == "group":
            x = nn.GroupNorm(_ENCODER_GROUPS, epsilon=_GN_EPS, dtype=self.dtype, name="norm")(x)
        else:
            x = batch_norm(self.train, self.dtype, "norm")(x)
        return nn.relu(x)


class InConv(nn.Module):
    """Two conv3x3 layers at full SITS resolution, applied to each date independently."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ConvLayer(self.features, dtype=self.dtype, name="conv1")(x)
        return ConvLayer(self.features, dtype=self.dtype, name="conv2")(x)


class DownBlock(nn.Module):
    """Strided conv 4x4/2 (pad 1) then conv1 and a residual conv2 (U-TAE DownConvBlock)."""
    features: int
    kernel: int = 4
    strides: int = 2
    pad: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ConvLayer(x.shape[-1], self.kernel, self.strides, self.pad, dtype=self.dtype,
                      name="down")(x)
        x = ConvLayer(self.features, dtype=self.dtype, name="conv1")(x)
        return x + ConvLayer(self.features, dtype=self.dtype, name="conv2")(x)


class UpBlock(nn.Module):
    """Transposed conv x2 and a 1x1-conv'd skip, concatenated, conv1 + residual conv2, batch norm."""
    features: int
    kernel: int = 4
    strides: int = 2
    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, skip):
        skip = nn.Conv(skip.shape[-1], (1, 1), dtype=self.dtype, name="skip_conv")(skip)
        skip = nn.relu(batch_norm(self.train, self.dtype, "skip_bn")(skip))
        x = nn.ConvTranspose(self.features, (self.kernel, self.kernel), (self.strides,) * 2,
                             padding="SAME", dtype=self.dtype, name="up_conv")(x)
        x = nn.relu(batch_norm(self.train, self.dtype, "up_bn")(x))
        x = jnp.concatenate([x, skip], axis=-1)
        x = ConvLayer(self.features, norm="batch", train=self.train, dtype=self.dtype,
                      name="conv1")(x)
        return x + ConvLayer(self.features, norm="batch", train=self.train, dtype=self.dtype,
                             name="conv2")(x)


class LTAE(nn.Module):
    """Lightweight Temporal Attention Encoder, shared over pixels (L-TAE 2d).

    x [B, T, h, w, C], dates [B, T], valid [B, T] -> out [B, h, w, mlp_out], attn [B, h, w, n_head, T]
    One learned master query per head attends over dates; keys come from the d_model projection,
    values are the d_model features split into n_head groups.
    """
    n_head: int = 16
    d_k: int = 4
    d_model: int = 256
    mlp_out: int = 128
    dropout: float = 0.2
    attn_dropout: float = 0.1
    period: float = 1000.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, dates, valid, train: bool = False):
        b, t, h, w, c = x.shape
        # Per (pixel, date) group norm over channels: [B*T*h*w, C] so no statistic mixes dates.
        out = nn.GroupNorm(self.n_head, epsilon=_GN_EPS, dtype=self.dtype,
                           name="in_norm")(x.reshape(-1, c))
        out = nn.Dense(self.d_model, dtype=self.dtype, name="in_proj")(out)
        out = out.reshape(b, t, h, w, self.d_model)
        pe = positional_encoding(dates, self.d_model // self.n_head, self.period, self.n_head)
        out = out + pe[:, :, None, None, :].astype(out.dtype)

        # Init as the reference: N(0, 2/d_k) for the master queries and the key projection.
        qk_init = nn.initializers.normal(np.sqrt(2.0 / self.d_k))
        query = self.param("query", qk_init, (self.n_head, self.d_k))
        keys = nn.Dense(self.n_head * self.d_k, kernel_init=qk_init, dtype=self.dtype,
                        name="key_proj")(out).reshape(b, t, h, w, self.n_head, self.d_k)
        # Attention logits and softmax in fp32. Padded dates get -1e9 (finite, so a sample whose dates
        # are all padded stays NaN-free); exp underflows to exactly 0 when any date is valid.
        logits = jnp.einsum("bthwnk,nk->bhwnt", ops.upcast(keys), query) / np.sqrt(self.d_k)
        logits = jnp.where(valid[:, None, None, None, :], logits, -1e9)
        attn = jax.nn.softmax(logits, axis=-1)
        attn_used = nn.Dropout(self.attn_dropout, deterministic=not train)(attn)

        values = out.reshape(b, t, h, w, self.n_head, self.d_model // self.n_head)
        out = jnp.einsum("bhwnt,bthwnc->bhwnc", attn_used.astype(self.dtype), values)
        out = out.reshape(b * h * w, self.d_model)
        out = nn.Dense(self.mlp_out, dtype=self.dtype, name="mlp_dense")(out)
        out = nn.relu(batch_norm(train, self.dtype, "mlp_bn")(out))
        out = nn.Dropout(self.dropout, deterministic=not train)(out)
        out = nn.GroupNorm(self.n_head, epsilon=_GN_EPS, dtype=self.dtype, name="out_norm")(out)
        return out.reshape(b, h, w, self.mlp_out), attn


def aggregate_skip(x, attn, valid, n_head: int):
    """Attention-weighted temporal mean of a skip level ('att_group' in U-TAE).

    x [B, T, H, W, C], attn [B, h, w, n_head, T] (lowest resolution), valid [B, T] -> [B, H, W, C].
    The masks are bilinearly upsampled to (H, W); channel group g is weighted by head g's mask.
    """
    b, t, hh, ww, c = x.shape
    if c % n_head:
        raise ValueError(f"U-TAE width {c} must be divisible by model.n_head={n_head}")
    attn = jax.image.resize(attn, (b, hh, ww) + attn.shape[3:], "linear")
    attn = attn * valid[:, None, None, None, :]
    groups = x.reshape(b, t, hh, ww, n_head, c // n_head)
    out = jnp.einsum("bhwnt,bthwnc->bhwnc", attn.astype(x.dtype), groups)
    return out.reshape(b, hh, ww, c)


class UTAE(nn.Module):
    """U-TAE up to its last decoder feature map (the classifier lives in the parent model)."""
    encoder_widths: Sequence[int] = (64, 64, 128, 128)
    decoder_widths: Sequence[int] = (64, 64, 128, 128)
    n_head: int = 16
    d_model: int = 256
    d_k: int = 4
    ltae_dropout: float = 0.2
    attn_dropout: float = 0.1
    date_period: float = 1000.0
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, sits, dates, sits_valid, train: bool = False):
        if len(self.encoder_widths) != len(self.decoder_widths) or \
                self.encoder_widths[-1] != self.decoder_widths[-1]:
            raise ValueError("model.utae_encoder_widths and utae_decoder_widths must have the same "
                             f"length and last width; found {self.encoder_widths}, "
                             f"{self.decoder_widths}")
        b, t = sits.shape[:2]
        # Dates share the conv encoder: fold them into the batch axis (group norm is per image).
        x = jnp.asarray(sits, self.dtype).reshape((b * t,) + sits.shape[2:])
        x = maybe_remat(InConv, self.remat)(self.encoder_widths[0], self.dtype, name="in_conv")(x)
        levels = [x]
        down_cls = maybe_remat(DownBlock, self.remat)
        for i, width in enumerate(self.encoder_widths[1:]):
            x = down_cls(width, dtype=self.dtype, name=f"down{i}")(x)
            levels.append(x)
        levels = [lv.reshape((b, t) + lv.shape[1:]) for lv in levels]

        out, attn = LTAE(self.n_head, self.d_k, self.d_model, self.encoder_widths[-1],
                         self.ltae_dropout, self.attn_dropout, self.date_period, self.dtype,
                         name="ltae")(levels[-1], dates, sits_valid, train)
        up_cls = maybe_remat(UpBlock, self.remat)
        for i in range(len(levels) - 2, -1, -1):
            skip = aggregate_skip(levels[i], attn, sits_valid, self.n_head)
            out = up_cls(self.decoder_widths[i], train=train, dtype=self.dtype, name=f"up{i}")(
                out, skip)
        return out
