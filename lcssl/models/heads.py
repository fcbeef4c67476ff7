"""Self-supervised heads on top of the segmentation backbone's encoder.

SimCLR (Chen et al. 2020): a 2-layer MLP projection head with ReLU; with batch_norm, batch norm after
every dense layer as in SimCLR v2 (Chen et al. 2020b), the last one without ReLU.

SimCLRModel holds the backbone under the attribute name 'backbone', so params['backbone'] has exactly
the encoder subtrees of the segmentation model's params (lcssl.models.encoder_keys) and fine-tuning
copies them over. Further heads go beside 'projector' as new submodules reading the same encode()
dict: a BYOL predictor on 'projection', a dense projection head on the fused 'levels'.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lcssl.models.unet import batch_norm


class ProjectionHead(nn.Module):
    """[B, D] -> [B, out_dim] float32: (Dense -> [BN] -> ReLU) x (num_layers - 1) -> Dense -> [BN]."""
    hidden_dim: int = 2048
    out_dim: int = 128
    num_layers: int = 2
    use_batch_norm: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnp.asarray(x, self.dtype)
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(self.out_dim if last else self.hidden_dim,
                         use_bias=not self.use_batch_norm, dtype=self.dtype, name=f"dense{i}")(x)
            if self.use_batch_norm:
                x = batch_norm(train, self.dtype, f"bn{i}")(x)
            if not last:
                x = nn.relu(x)
        return x.astype(jnp.float32)


class SimCLRModel(nn.Module):
    """Backbone encoder + projection head(s).

    Same inputs as the segmentation model. Returns {'embedding' [B, D], 'projection' [B, out_dim]},
    plus with per_modality (cross-modal contrast, 'utt' only) 'aerial_embedding'/'sits_embedding'
    and 'aerial_projection'/'sits_projection' from separate heads; all float32.
    """
    backbone: nn.Module
    hidden_dim: int = 2048
    out_dim: int = 128
    num_layers: int = 2
    use_batch_norm: bool = False
    per_modality: bool = False
    dtype: Any = jnp.float32

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
                                     "(model.name='utt')")
                out[f"{m}_embedding"] = feats[f"{m}_embedding"]
                out[f"{m}_projection"] = head(f"{m}_projector")(feats[f"{m}_embedding"], train)
        return out
