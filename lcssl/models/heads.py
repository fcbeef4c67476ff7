"""Self-supervised heads on top of the segmentation backbone's encoder.

ProjectionHead, SimCLR (Chen et al. 2020): a 2-layer MLP with ReLU; with batch_norm, batch norm
after every dense layer as in SimCLR v2 (Chen et al. 2020b), the last one without ReLU; with
batch_norm_output=False, batch norm after the hidden layers only (BYOL's MLPs).

PredictionHead, the BYOL predictor (Grill et al. 2020): ProjectionHead with BYOL's layout,
projection [B, P] -> Dense(hidden, 4096 in BYOL) -> BN -> ReLU -> Dense(P) -> [B, P]; the BYOL task
(lcssl/tasks/byol.py) switches it on.

DenseProjectionHead, pixel level (DenseCL, Wang et al. 2021; PixPro, Xie et al. 2021): 1x1 conv
-> [BN] -> ReLU -> 1x1 conv on a feature map [B, h, w, C] -> [B, h, w, out]. A 1x1 conv is a Dense
on the channel axis, and nn.Dense contracts the last axis, so this is ProjectionHead applied per
pixel; its BN, when on, reduces over B, h, w like BatchNorm2d. PretrainModel feeds it the map that
'embedding' pools: the deepest fused aerial level encode()['levels'][-1] (stride 32, 16x16 for
512 px) for 'utt' and 'unet', encode()['sits_map'] for 'utae'; with dense_source='decoder' ('utt',
'unet'), the aerial decoder's full-resolution map [B, H, W, decoder_channels[-1]] instead, so that a
pixel-level objective trains the decoder too (lcssl.losses.dense_info_nce).

PretrainModel holds the backbone under the attribute name 'backbone', so params['backbone'] has
exactly the encoder subtrees of the segmentation model's params (lcssl.models.encoder_keys) and
fine-tuning copies them over. The other heads sit beside 'projector' as optional submodules reading
the same encode() dict: 'aerial_projector'/'sits_projector' (per_modality), 'predictor' (on
'projection'), 'dense_projector' and 'date_reconstructor'; dense_source='decoder' also runs the
backbone's 'aerial_decoder', which then appears in params['backbone']. With all of them off the
param tree is {'backbone', 'projector'}, as it was before they existed, so older checkpoints load
unchanged.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lcssl.models import ops
from lcssl.models.unet import batch_norm
from lcssl.models.utae import positional_encoding


class ProjectionHead(nn.Module):
    """[..., D] -> [..., out_dim] float32: (Dense -> [BN] -> ReLU) x (num_layers - 1), Dense, [BN].

    use_batch_norm: BN after the hidden layers, and after the output layer too unless
    batch_norm_output=False. A dense layer followed by BN has no bias.
    """
    hidden_dim: int = 2048
    out_dim: int = 128
    num_layers: int = 2
    use_batch_norm: bool = False
    dtype: Any = jnp.float32
    batch_norm_output: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnp.asarray(x, self.dtype)
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            bn = self.use_batch_norm and (self.batch_norm_output or not last)
            x = nn.Dense(self.out_dim if last else self.hidden_dim, use_bias=not bn,
                         dtype=self.dtype, name=f"dense{i}")(x)
            if bn:
                x = batch_norm(train, self.dtype, f"bn{i}")(x)
            if not last:
                x = nn.relu(x)
        return ops.upcast(x)


class PredictionHead(ProjectionHead):
    """BYOL predictor: [B, P] -> Dense(hidden_dim) -> BN -> ReLU -> Dense(out_dim) -> [B, out_dim]
    float32, out_dim = P, the projection dim it reads (lcssl/tasks/byol.py).
    """
    hidden_dim: int = 4096
    out_dim: int = 256                   # BYOL's projection dim
    use_batch_norm: bool = True
    batch_norm_output: bool = False


class DenseProjectionHead(ProjectionHead):
    """Pixel-level projection: [B, h, w, C] -> 1x1 conv(hidden_dim) -> [BN] -> ReLU
    -> 1x1 conv(out_dim) -> [B, h, w, out_dim] float32 (DenseCL's head; BN on the hidden layer only,
    as in PixPro, with use_batch_norm)."""
    batch_norm_output: bool = False

    def __call__(self, x, train: bool = False):
        if x.ndim != 4:
            raise ValueError(f"DenseProjectionHead takes a feature map [B, h, w, C], "
                             f"found {x.shape}")
        return super().__call__(x, train)


class DateReconstructionHead(nn.Module):
    """Masked-date reconstruction (lcssl/tasks/masked_dates.py): the U-TAE map [B, h, w, C] and
    the dates [B, T] -> every date's Sentinel-2 bands at every pixel [B, T, h, w, out_dim] float32.

    An MLP with one hidden layer on [pixel features, the date's sinusoidal encoding] (the L-TAE's
    encoding, date_dim dims of period date_period). Its first layer is written as the sum of a
    pixel part and a date part, which is the same Dense on the concatenation, computed once per
    pixel and once per date instead of once per (date, pixel).
    """
    out_dim: int                         # the Sentinel-2 bands
    hidden_dim: int = 128
    date_dim: int = 16
    date_period: float = 1000.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, fmap, dates):
        pixel = nn.Dense(self.hidden_dim, dtype=self.dtype, name="pixel_proj")(fmap)
        encoding = positional_encoding(dates, self.date_dim, self.date_period)
        date = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype, name="date_proj")(encoding)
        x = nn.relu(pixel[:, None] + date[:, :, None, None])
        return ops.upcast(nn.Dense(self.out_dim, dtype=self.dtype, name="out")(x))


def _pool_to_grid(fmap, grid: int):
    """[B, h, w, C] -> [B, grid, grid, C], the mean of each (h / grid) x (w / grid) cell: the
    pixel embeddings of a dense loss at a fixed resolution, before the head (its 1x1 convs then run
    on grid^2 cells, not h w pixels)."""
    b, h, w, c = fmap.shape
    if h % grid or w % grid:
        raise ValueError(f"model.projector.dense_grid={grid} must divide the dense map's size "
                         f"{h} x {w}")
    return ops.upcast(fmap.reshape(b, grid, h // grid, grid, w // grid, c)).mean(axis=(2, 4)
                                                                             ).astype(fmap.dtype)


class PretrainModel(nn.Module):
    """Backbone encoder + the heads of the pre-training objectives (lcssl/tasks).

    Same inputs as the segmentation model. Returns {'embedding' [B, D], 'projection' [B, out_dim]},
    plus with per_modality (cross-modal contrast, 'utt' only) 'aerial_embedding'/'sits_embedding'
    and 'aerial_projection'/'sits_projection' from separate heads; with predictor, 'prediction'
    [B, out_dim] (PredictionHead on 'projection'); with dense, 'dense_projection'
    [B, h, w, dense_out_dim] (DenseProjectionHead on the map 'embedding' pools: levels[-1], or
    sits_map for 'utae'; with dense_source='decoder', on the aerial decoder's output
    [B, H, W, decoder_channels[-1]]; with dense_grid > 0, that map average-pooled to dense_grid^2
    cells first); with date_reconstruction ('utt' or 'utae'), 'date_reconstruction'
    [B, T, h, w, Cs] (DateReconstructionHead on the U-TAE map and the input dates, with the L-TAE's
    date encoding); all float32. Each objective reads the outputs it needs.
    """
    backbone: nn.Module
    hidden_dim: int = 2048
    out_dim: int = 128
    num_layers: int = 2
    use_batch_norm: bool = False
    per_modality: bool = False
    dtype: Any = jnp.float32
    predictor: bool = False
    predictor_hidden_dim: int = 4096
    dense: bool = False
    dense_hidden_dim: int = 2048
    dense_out_dim: int = 128
    dense_batch_norm: bool = False
    dense_source: str = "encoder"        # 'encoder' | 'decoder' (runs backbone.aerial_decoder)
    dense_grid: int = 0                  # > 0: average-pool the map to dense_grid^2 cells first
    date_reconstruction: bool = False
    date_hidden_dim: int = 128

    @nn.compact
    def __call__(self, aerial, sits, dates, sits_valid, train: bool = False):
        feats = self.backbone.encode(aerial, sits, dates, sits_valid, train)
        head = lambda name: ProjectionHead(self.hidden_dim, self.out_dim, self.num_layers,
                                           self.use_batch_norm, self.dtype, name=name)
        out = {"embedding": feats["embedding"],
               "projection": head("projector")(feats["embedding"], train)}
        if self.per_modality:
            for m in ("aerial", "sits"):
                if f"{m}_embedding" not in feats:
                    raise ValueError("model.projector.per_modality needs both modalities "
                                     "(model.variant='utt')")
                out[f"{m}_embedding"] = feats[f"{m}_embedding"]
                out[f"{m}_projection"] = head(f"{m}_projector")(feats[f"{m}_embedding"], train)
        if self.predictor:
            out["prediction"] = PredictionHead(self.predictor_hidden_dim, self.out_dim,
                                               dtype=self.dtype, name="predictor")(
                out["projection"], train)
        if self.dense:
            if self.dense_source not in ("encoder", "decoder"):
                raise ValueError(f"model.projector.dense_source must be 'encoder' or 'decoder', "
                                 f"found {self.dense_source!r}")
            if self.dense_source == "decoder":
                if "levels" not in feats:
                    raise ValueError("model.projector.dense_source='decoder' needs the aerial "
                                     "decoder (model.name='utt' or 'unet')")
                fmap = self.backbone.aerial_decoder(feats["levels"], train)
            else:
                fmap = feats["levels"][-1] if "levels" in feats else feats["sits_map"]
            if self.dense_grid:
                fmap = _pool_to_grid(fmap, self.dense_grid)
            out["dense_projection"] = DenseProjectionHead(
                self.dense_hidden_dim, self.dense_out_dim, use_batch_norm=self.dense_batch_norm,
                dtype=self.dtype, name="dense_projector")(fmap, train)
        if self.date_reconstruction:
            if "sits_map" not in feats:
                raise ValueError("model.projector.date_reconstruction needs the Sentinel-2 branch "
                                 "(model.variant='utt' or 'utae')")
            out["date_reconstruction"] = DateReconstructionHead(
                sits.shape[-1], self.date_hidden_dim, self.backbone.d_model // self.backbone.n_head,
                self.backbone.date_period, self.dtype, name="date_reconstructor")(
                feats["sits_map"], dates)
        return out
