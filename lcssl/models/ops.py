"""Faster equivalents of three U-T&T operations, each opt-in through a model field (default off:
the plain Flax layers) and tested equal to the plain form, forward and gradients
(tests/models/test_ops.py). bench/roofline.py ranks them: the step is bound by memory traffic, most
of it batch norm and elementwise passes and the full-resolution decoder levels.

- `upsample_conv3x3` (`decoder_phase_conv`): nearest 2x upsampling followed by a 3x3 'SAME'
  convolution, computed on the low-resolution input as one 2x2 convolution producing the 4 output
  phases, then depth-to-space. The upsampled map is never written, and the convolution does 4/9 of
  the multiply-adds (each phase sees 2x2 distinct input pixels; the 3x3 taps that land on the same
  pixel are summed into the kernel first).
- `BatchNormAct` (`fused_bn_act`): batch norm + ReLU (+ a residual added before the ReLU) as one
  custom-gradient op. The backward keeps only the input (compute dtype), the output and
  per-channel statistics, and does one reduction pass (sum of dz and of dz * x_hat together), where
  autodiff of the Flax layers keeps fp32 intermediates and reduces several times.
- `footprint_resize_lowp` (`low_precision_resample`): the fusion's footprint resampling in the
  compute dtype (bf16) as two small matmuls with the same interpolation weights as
  jax.image.scale_and_translate, instead of fp32 at the highest precision.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Row taps of the 2x2 phase kernel from the 3x3 kernel's rows dy = 0, 1, 2 (offsets -1, 0, +1).
# Output row 2i + a of the upsampled map reads upsampled rows 2i + a - 1 .. 2i + a + 1, which are
# input rows (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1. On the input padded by one pixel,
# phase a reads the 2 rows starting at padded row i + a: taps (w0, w1 + w2) for a = 0 and
# (w0 + w1, w2) for a = 1.
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]],
                        [[1, 1, 0], [0, 0, 1]]], np.float32)  # [phase, tap, dy]


def phase_kernel(kernel):
    """[3, 3, Ci, Co] -> [2, 2, Ci, 4 * Co], output channels ordered (row phase, col phase, Co)."""
    taps = jnp.asarray(_PHASE_TAPS, kernel.dtype)
    k = jnp.einsum("ayd,bxe,deio->yxiabo", taps, taps, kernel)
    return k.reshape(2, 2, kernel.shape[2], 4 * kernel.shape[3])


def upsample_conv3x3(x, kernel, precision=None):
    """conv3x3_same(nearest_upsample_2x(x), kernel), without the upsampled map.

    x [B, h, w, Ci], kernel [3, 3, Ci, Co] -> [B, 2h, 2w, Co].
    """
    b, h, w, _ = x.shape
    co = kernel.shape[-1]
    y = jax.lax.conv_general_dilated(x, phase_kernel(kernel).astype(x.dtype), (1, 1),
                                     ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=precision)  # [B, h + 1, w + 1, 4 Co]
    y = y.reshape(b, h + 1, w + 1, 2, 2, co)
    # Phase (a, c) of input pixel (i, j) sits at padded position (i + a, j + c).
    rows = [jnp.stack([y[:, a:a + h, c:c + w, a, c] for c in (0, 1)], axis=3) for a in (0, 1)]
    y = jnp.stack(rows, axis=2)  # [B, h, 2 (a), w, 2 (c), Co]
    return y.reshape(b, 2 * h, 2 * w, co)


class UpsampleConcatConv(nn.Module):
    """nn.Conv(features, (3, 3), padding=1, use_bias=False) applied to
    concat([nearest_upsample_2x(x), skip]), with the same 'kernel' param [3, 3, Cx + Cs, features]:
    the upsampled part through upsample_conv3x3, the skip part as a plain 3x3 convolution."""
    features: int
    dtype: Any = jnp.float32
    kernel_init: Any = nn.linear.default_kernel_init

    @nn.compact
    def __call__(self, x, skip=None):
        cx = x.shape[-1]
        cin = cx + (skip.shape[-1] if skip is not None else 0)
        kernel = self.param("kernel", self.kernel_init, (3, 3, cin, self.features), jnp.float32)
        kernel = kernel.astype(self.dtype)
        y = upsample_conv3x3(x.astype(self.dtype), kernel[:, :, :cx])
        if skip is not None:
            y = y + jax.lax.conv_general_dilated(
                skip.astype(self.dtype), kernel[:, :, cx:], (1, 1), ((1, 1), (1, 1)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y


def _acc(x):
    """Statistics and normalization run in fp32 for bf16 / fp32 inputs (as in Flax's BatchNorm);
    float64 stays float64 (model dtype 'float64', for the tests' exact comparisons in x64 mode)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def upcast(x):
    """x in at least fp32: for softmaxes, means and outputs that must not be bf16."""
    return x.astype(_acc(x))


def _stats(x32, axes):
    mean = jnp.mean(x32, axes)
    # As Flax's BatchNorm (use_fast_variance): E[x^2] - E[x]^2, clipped at 0.
    var = jnp.maximum(0.0, jnp.mean(jnp.square(x32), axes) - jnp.square(mean))
    return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def bn_act_train(x, scale, bias, residual, eps: float):
    """relu(batch_norm(x) * scale + bias + residual), batch statistics over all axes but the last.

    x [..., C] (compute dtype), scale / bias [C] fp32, residual like x or None.
    Returns (y like x, batch mean [C] fp32, batch variance [C] fp32).
    """
    return _bn_act_fwd(x, scale, bias, residual, eps)[0]


def _bn_act_fwd(x, scale, bias, residual, eps):
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(_acc(x))
    mean, var = _stats(x32, axes)
    rstd = jax.lax.rsqrt(var + eps)
    z = (x32 - mean) * (rstd * scale) + bias
    if residual is not None:
        z = z + residual.astype(x32.dtype)
    y = jnp.maximum(z, 0.0).astype(x.dtype)
    # A 0-size marker says whether there was a residual: the residual itself is not kept.
    marker = None if residual is None else jnp.zeros((0,), x.dtype)
    return (y, mean, var), (x, y, mean, rstd, scale, marker)


def _bn_act_bwd(eps, saved, cotangents):
    x, y, mean, rstd, scale, marker = saved
    gy, gmean, gvar = cotangents
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    x32 = x.astype(_acc(x))
    xhat = (x32 - mean) * rstd
    dz = jnp.where(y > 0, gy.astype(x32.dtype), 0.0)
    # The one reduction pass: both sums read dz and x together.
    dbias = jnp.sum(dz, axes)
    dscale = jnp.sum(dz * xhat, axes)
    dx = (scale * rstd / n) * (n * dz - dbias - xhat * dscale)
    # The batch mean and variance are outputs too (they feed the running averages): their
    # cotangents, if any, flow back exactly (d mean / dx = 1/n, d var / dx = 2 (x - mean) / n).
    dx = dx + gmean / n + gvar * 2.0 * (x32 - mean) / n
    dres = dz.astype(x.dtype) if marker is not None else None
    return dx.astype(x.dtype), dscale, dbias, dres


bn_act_train.defvjp(_bn_act_fwd, _bn_act_bwd)


class BatchNormAct(nn.Module):
    """relu(BatchNorm(x) + residual) with nn.BatchNorm's params ('scale', 'bias'), batch stats
    ('mean', 'var'), momentum and epsilon, so checkpoints carry over; in training one
    custom-gradient op (bn_act_train), in evaluation the running statistics."""
    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, residual=None):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        x = x.astype(self.dtype)
        residual = residual.astype(self.dtype) if residual is not None else None
        if self.use_running_average:
            x32 = x.astype(_acc(x))
            z = (x32 - ra_mean.value) * (jax.lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
            if residual is not None:
                z = z + residual.astype(x32.dtype)
            return jnp.maximum(z, 0.0).astype(self.dtype)
        y, mean, var = bn_act_train(x, scale, bias, residual, self.epsilon)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
        return y


def _resample_matrix(size: int, out_size: int, scale: float, translation: float):
    """[out_size, size]: jax.image.scale_and_translate's weights along one axis ('linear',
    antialiased), read off its response to each unit impulse."""
    eye = jnp.eye(size, dtype=jnp.float32)
    return jax.image.scale_and_translate(eye, (out_size, size), (0,), jnp.array([scale]),
                                         jnp.array([translation]), "linear", antialias=True)


def footprint_resize_lowp(x, footprint_px: float, out_hw: Sequence[int], dtype=jnp.bfloat16):
    """lcssl.models.fusion.footprint_resize in `dtype`: [B, h, w, C] -> [B, out_h, out_w, C] dtype.

    The same interpolation weights, applied as two matmuls (rows, then columns) on `dtype` inputs
    with fp32 accumulation, each result rounded to `dtype`."""
    _, h, w, _ = x.shape
    out_h, out_w = out_hw
    sh, sw = out_h / footprint_px, out_w / footprint_px
    mh = _resample_matrix(h, out_h, sh, -sh * (h - footprint_px) / 2).astype(dtype)
    mw = _resample_matrix(w, out_w, sw, -sw * (w - footprint_px) / 2).astype(dtype)
    x = x.astype(dtype)
    y = jnp.einsum("oh,bhwc->bowc", mh, x, preferred_element_type=jnp.float32).astype(dtype)
    return jnp.einsum("pw,bowc->bopc", mw, y, preferred_element_type=jnp.float32).astype(dtype)
