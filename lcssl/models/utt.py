"""U-T&T: the FLAIR #2 multimodal segmentation network (Garioud et al. 2023), and its single-modality
variants (aerial-only U-Net, SITS-only U-TAE), as one Linen module.

    aerial [B, H, W, Ca] float, sits [B, T, h, w, Cs] float, dates [B, T] int32, sits_valid [B, T] bool
    -> {'logits': [B, H, W, K] f32, 'aux_logits': [B, H, W, K] f32 (not for 'unet'),
        'embedding': [B, D] f32}

Top-level param subtrees (stable names): 'aerial_encoder', 'utae', 'fusion' (the encoder, what SSL
pre-training trains and fine-tuning loads) and 'aerial_decoder', 'seg_head', 'aux_head' (new at
fine-tuning). `encode` runs only the encoder part; PretrainModel calls it.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lcssl.models import ops
from lcssl.models.fusion import FUSION_BRANCHES, Fusion, footprint_resize
from lcssl.models.unet import ResNetEncoder, UNetDecoder
from lcssl.models.utae import UTAE

VARIANTS = ("utt", "unet", "utae")
ENCODER_SUBTREES = {
    "utt": ("aerial_encoder", "utae", "fusion"),
    "unet": ("aerial_encoder",),
    "utae": ("utae",),
}


def _pool(x):
    return jnp.mean(ops.upcast(x), axis=(1, 2))


class UTT(nn.Module):
    variant: str = "utt"
    num_classes: int = 13
    aerial_size: int = 512
    footprint_px: float = 10.24
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)
    utae_encoder_widths: Sequence[int] = (64, 64, 128, 128)
    utae_decoder_widths: Sequence[int] = (64, 64, 128, 128)
    n_head: int = 16
    d_model: int = 256
    d_k: int = 4
    ltae_dropout: float = 0.2
    attn_dropout: float = 0.1
    date_period: float = 1000.0
    fusion_mode: str = "add"
    fusion_branches: Sequence[str] = FUSION_BRANCHES
    fusion_dropout: float = 0.3
    modality_dropout: float = 0.0
    dtype: Any = jnp.float32
    remat: str = "none"
    # Faster equivalent forms (lcssl.models.ops), off by default; the param tree is the same.
    decoder_phase_conv: bool = False
    fused_bn_act: bool = False
    low_precision_resample: bool = False

    def setup(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"model.variant must be one of {VARIANTS}, found {self.variant!r}")
        if self.variant in ("utt", "unet"):
            self.aerial_encoder = ResNetEncoder(self.stage_sizes, self.widths, self.stem_width,
                                                self.dtype, self.remat,
                                                fused_bn_act=self.fused_bn_act)
            self.aerial_decoder = UNetDecoder(self.decoder_channels, self.dtype, self.remat,
                                              phase_conv=self.decoder_phase_conv,
                                              fused_bn_act=self.fused_bn_act)
            # smp SegmentationHead: conv3x3 to classes, no activation.
            self.seg_head = nn.Conv(self.num_classes, (3, 3), padding=1, dtype=self.dtype)
        if self.variant in ("utt", "utae"):
            self.utae = UTAE(self.utae_encoder_widths, self.utae_decoder_widths, self.n_head,
                             self.d_model, self.d_k, self.ltae_dropout, self.attn_dropout,
                             self.date_period, self.dtype, self.remat)
            # 1x1 conv on the U-TAE map, then the footprint resampled to the aerial size. The FLAIR #2
            # code upsamples (nearest) then convolves; a 1x1 conv commutes with resampling, so this
            # costs K channels at full resolution instead of Ct.
            self.aux_head = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)
        if self.variant == "utt":
            self.fusion = Fusion(self.fusion_mode, tuple(self.fusion_branches), self.footprint_px,
                                 self.fusion_dropout, self.modality_dropout, self.dtype,
                                 low_precision_resample=self.low_precision_resample)

    def encode(self, aerial, sits, dates, sits_valid, train: bool = False):
        """The encoder part: {'embedding', 'aerial_embedding', 'sits_embedding' ([B, D] f32),
        'levels' (fused aerial levels, shallow to deep), 'sits_map' [B, h, w, Ct]} as available."""
        out = {}
        if self.variant in ("utt", "utae"):
            sits_map = self.utae(sits, dates, sits_valid, train)
            out["sits_map"] = sits_map
            out["sits_embedding"] = _pool(sits_map)
            out["embedding"] = out["sits_embedding"]
        if self.variant in ("utt", "unet"):
            levels = self.aerial_encoder(aerial, train)
            out["aerial_embedding"] = _pool(levels[-1])
            if self.variant == "utt":
                levels = self.fusion(levels, sits_map, train)
            out["levels"] = levels
            out["embedding"] = _pool(levels[-1])
        return out

    def __call__(self, aerial, sits, dates, sits_valid, train: bool = False,
                 return_features: bool = False):
        """Forward pass; with return_features, out['features'] holds encode()'s dict plus
        'decoder' [B, H, W, decoder_channels[-1]] (dense features before the seg head)."""
        features = self.encode(aerial, sits, dates, sits_valid, train)
        out = {"embedding": features["embedding"]}
        out_hw = aerial.shape[1:3] if aerial is not None else (self.aerial_size,) * 2
        if "sits_map" in features:
            aux = self.aux_head(features["sits_map"])
            if self.low_precision_resample:
                aux = ops.footprint_resize_lowp(aux, self.footprint_px, out_hw, self.dtype)
            else:
                aux = footprint_resize(ops.upcast(aux), self.footprint_px, out_hw)
            aux = ops.upcast(aux)
            out["logits" if self.variant == "utae" else "aux_logits"] = aux
        if "levels" in features:
            dense = self.aerial_decoder(features["levels"], train)
            features["decoder"] = dense
            out["logits"] = ops.upcast(self.seg_head(dense))
        if return_features:
            out["features"] = features
        return out
