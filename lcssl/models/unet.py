"""Aerial branch: U-Net with a ResNet encoder (He et al. 2016; Ronneberger et al. 2015).

Mirrors segmentation_models_pytorch `Unet(encoder_name='resnet34')`, the aerial branch of the FLAIR #2
U-T&T baseline (Garioud et al. 2023): stem conv7x7/2 + max-pool, BasicBlock stages [3, 4, 6, 3] with
widths 64..512, and a decoder of (upsample x2, concat skip, 2 x conv3x3-BN-ReLU) blocks with channels
(256, 128, 64, 32, 16) back to full resolution.

    aerial [B, H, W, Ca] -> levels: [B, H/2, W/2, 64], [B, H/4, ., 64], [B, H/8, ., 128],
                                     [B, H/16, ., 256], [B, H/32, ., 512]   (resnet34 widths)
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lcssl.models import ops

# torchvision's ResNet init (kaiming normal, fan_out), which the smp encoder inherits.
_resnet_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch BatchNorm: momentum 0.1 on the new value = 0.9 on the running average, eps 1e-5.
_BN_MOMENTUM = 0.9
_BN_EPS = 1e-5


def batch_norm(train: bool, dtype: Any, name: str | None = None) -> nn.BatchNorm:
    # Statistics are reduced in fp32 (force_float32_reductions) and the normalisation runs in fp32
    # (x - mean promotes), only the output is cast to the compute dtype. Under jax.jit with the batch
    # sharded over 'data', the batch mean is a global reduction: GSPMD inserts the all-reduce.
    return nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPS,
                        dtype=dtype, name=name)


def bn_relu(x, train: bool, dtype: Any, fused: bool, name: str):
    """relu(batch_norm(x)); with `fused`, one custom-gradient op with the same variables."""
    if fused:
        return ops.BatchNormAct(not train, _BN_MOMENTUM, _BN_EPS, dtype, name=name)(x)
    return nn.relu(batch_norm(train, dtype, name)(x))


def maybe_remat(cls, remat: str):
    """`nn.remat` keeps the wrapped module's name, so the param tree is the same for both settings."""
    if remat == "blocks":
        return nn.remat(cls)
    if remat != "none":
        raise ValueError(f"model.remat must be 'none' or 'blocks', found {remat!r}")
    return cls


class BasicBlock(nn.Module):
    """ResNet BasicBlock: two conv3x3-BN with an identity (or 1x1 conv-BN) shortcut."""
    features: int
    strides: int = 1
    train: bool = False
    dtype: Any = jnp.float32
    fused_bn_act: bool = False  # batch norm + ReLU (+ residual) as one op (lcssl.models.ops)

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, s, name: nn.Conv(f, (k, k), (s, s), padding=k // 2, use_bias=False,
                                             kernel_init=_resnet_init, dtype=self.dtype, name=name)
        y = conv(self.features, 3, self.strides, "conv1")(x)
        y = bn_relu(y, self.train, self.dtype, self.fused_bn_act, "bn1")
        y = conv(self.features, 3, 1, "conv2")(y)
        if x.shape[-1] != self.features or self.strides != 1:
            x = conv(self.features, 1, self.strides, "downsample_conv")(x)
            x = batch_norm(self.train, self.dtype, "downsample_bn")(x)
        if self.fused_bn_act:
            return ops.BatchNormAct(not self.train, _BN_MOMENTUM, _BN_EPS, self.dtype,
                                    name="bn2")(y, x)
        y = batch_norm(self.train, self.dtype, "bn2")(y)
        return nn.relu(x + y)


class ResNetEncoder(nn.Module):
    """Returns the 5 feature maps the U-Net decoder skips to (stem, then one per stage)."""
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    dtype: Any = jnp.float32
    remat: str = "none"
    fused_bn_act: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(self.stem_width, (7, 7), (2, 2), padding=3, use_bias=False,
                    kernel_init=_resnet_init, dtype=self.dtype, name="stem_conv")(x)
        x = bn_relu(x, train, self.dtype, self.fused_bn_act, "stem_bn")
        levels = [x]
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        block_cls = maybe_remat(BasicBlock, self.remat)
        for i, (n_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(n_blocks):
                strides = 2 if (i > 0 and j == 0) else 1
                x = block_cls(width, strides, train, self.dtype, self.fused_bn_act,
                              name=f"stage{i + 1}_block{j}")(x)
            levels.append(x)
        return levels


class DecoderBlock(nn.Module):
    """smp Unet DecoderBlock: nearest upsample x2, concat skip, 2 x conv3x3-BN-ReLU."""
    features: int
    train: bool = False
    dtype: Any = jnp.float32
    # conv1 on the low-resolution input as 4 phases + depth-to-space (lcssl.models.ops), same params.
    phase_conv: bool = False
    fused_bn_act: bool = False

    @nn.compact
    def __call__(self, x, skip=None):
        if self.phase_conv:
            x = ops.UpsampleConcatConv(self.features, self.dtype, name="conv1")(x, skip)
        else:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            if skip is not None:
                x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                        name="conv1")(x)
        x = bn_relu(x, self.train, self.dtype, self.fused_bn_act, "bn1")
        x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                    name="conv2")(x)
        return bn_relu(x, self.train, self.dtype, self.fused_bn_act, "bn2")


class UNetDecoder(nn.Module):
    """levels (shallow to deep) -> full-resolution features [B, H, W, channels[-1]]."""
    channels: Sequence[int] = (256, 128, 64, 32, 16)
    dtype: Any = jnp.float32
    remat: str = "none"
    phase_conv: bool = False
    fused_bn_act: bool = False

    @nn.compact
    def __call__(self, levels, train: bool = False):
        if len(self.channels) != len(levels):
            raise ValueError(f"model.decoder_channels has {len(self.channels)} entries, the encoder "
                             f"gives {len(levels)} levels; they must match")
        block_cls = maybe_remat(DecoderBlock, self.remat)
        x = levels[-1]
        # Skips from the second-deepest level up to the stem; the last block (full res) has none.
        skips = list(reversed(levels[:-1])) + [None]
        for i, (features, skip) in enumerate(zip(self.channels, skips)):
            x = block_cls(features, train, self.dtype, self.phase_conv, self.fused_bn_act,
                          name=f"block{i}")(x, skip)
        return x
