"""Models: the U-T&T multimodal segmentation network, its single-modality variants, SSL heads.

Written in Flax Linen: `module.apply(variables, ...)` is a pure function of plain pytrees, which is
what the rest of the code relies on: jax.jit with explicit NamedShardings on params and batch,
jax.vjp-based gradient caching per chunk in the contrastive step, and Orbax checkpoints of plain
dicts; big_vision and scenic are built the same way.

    model = build_model(cfg)                       # cfg = default_config() or tiny_config()
    variables = model.init(rngs, *dummy_inputs(cfg), train=False)
    out, updates = model.apply(variables, aerial, sits, dates, sits_valid, train=True,
                               rngs={'dropout': key}, mutable=['batch_stats'])

Inputs and outputs are in docs/DESIGN.md ("Model input") and lcssl/models/utt.py.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lcssl.models.heads import DenseProjectionHead, PredictionHead, ProjectionHead, SimCLRModel
from lcssl.models.utt import ENCODER_SUBTREES, UTT, VARIANTS

# The model's inputs, in the order of UTT.__call__ (batch fields of the same names).
INPUT_KEYS = ("aerial", "sits", "dates", "sits_valid")

# Top-level param subtrees of the full U-T&T that SSL pre-training trains and fine-tuning loads.
# The aerial decoder, 'seg_head' and 'aux_head' are new at fine-tuning. Per variant: encoder_keys().
ENCODER_KEYS = ENCODER_SUBTREES["utt"]

# The first convolution of each modality: the only params whose shape depends on the band list
# (kernel [h, w, bands, features]). Fine-tuning with adapt_bands remaps their input channels by band
# name (lcssl.train.adapt_input_kernel).
INPUT_KERNELS = {"aerial": ("aerial_encoder", "stem_conv", "kernel"),
                 "sits": ("utae", "in_conv", "conv1", "conv", "kernel")}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_config() -> ml_collections.ConfigDict:
    """The FLAIR #2 U-T&T baseline sizes (~27 M parameters): smp Unet-resnet34 + U-TAE."""
    cfg = ml_collections.ConfigDict()
    cfg.name = "utt"                     # 'utt' | 'unet' (aerial only) | 'utae' (SITS only)
    cfg.num_classes = 13                 # 13 FLAIR #2, 12 Hameln
    cfg.aerial_bands = 5                 # 5 FLAIR #2 (RGB, NIR, elevation), 4 Hameln (RGB, IR)
    cfg.sits_bands = 10                  # Sentinel-2 bands of lcssl.data.schema.S2_BANDS
    cfg.aerial_size = 512
    cfg.aerial_gsd_m = 0.2
    cfg.sits_size = 40                   # FLAIR #2 super-patch, sat_patch_size 40
    cfg.sits_gsd_m = 10.0
    # Aerial extent in SITS pixels (DESIGN.md, Footprint): 512 * 0.2 / 10 = 10.24; follows overrides
    # of the three fields it is made of unless set itself.
    cfg.footprint_px = (cfg.get_ref("aerial_size") * cfg.get_ref("aerial_gsd_m")
                        / cfg.get_ref("sits_gsd_m"))
    # Aerial U-Net, ResNet34 encoder (He et al. 2016) and smp Unet decoder channels.
    cfg.stage_sizes = (3, 4, 6, 3)
    cfg.widths = (64, 128, 256, 512)
    cfg.stem_width = 64
    cfg.decoder_channels = (256, 128, 64, 32, 16)
    # U-TAE, FLAIR #2 baseline config (flair-2-config.yml); L-TAE as Garnot & Landrieu 2020.
    cfg.utae_encoder_widths = (64, 64, 128, 128)
    cfg.utae_decoder_widths = (64, 64, 128, 128)
    cfg.n_head = 16
    cfg.d_model = 256
    cfg.d_k = 4
    cfg.ltae_dropout = 0.2
    cfg.attn_dropout = 0.1
    cfg.date_period = 1000.0             # positional-encoding period T of U-TAE
    # Fusion (lcssl/models/fusion.py): 'add' | 'concat' | 'se' | 'residual_excite'.
    cfg.fusion = "add"
    cfg.fusion_branches = ("cropped", "collapsed")
    cfg.fusion_dropout = 0.3             # FM_collapsed MLP dropout in FLAIR #2
    cfg.modality_dropout = 0.0           # per-sample probability of dropping the SITS contribution
    cfg.dtype = "float32"                # compute dtype: 'float32' | 'bfloat16'; params stay fp32
    cfg.remat = "none"                   # 'none' | 'blocks'
    cfg.projector = ml_collections.ConfigDict()
    cfg.projector.hidden = 512           # SimCLR: hidden width = embedding width
    cfg.projector.out = 128              # SimCLR output dim
    cfg.projector.num_layers = 2
    cfg.projector.batch_norm = False     # True: SimCLR v2 style
    cfg.projector.per_modality = False   # extra aerial / SITS heads for cross-modal contrast
    # Heads for later objectives (lcssl/models/heads.py), off by default; off, the SimCLR param
    # tree is {'backbone', 'projector'}. The dense loss is lcssl.losses.dense_info_nce; no BYOL loss yet.
    cfg.projector.predictor = False      # BYOL predictor on 'projection' -> 'prediction' [B, out]
    cfg.projector.predictor_hidden = 4096  # BYOL: 4096
    cfg.projector.dense = False          # pixel-level head -> 'dense_projection' [B, h, w, C]
    cfg.projector.dense_hidden = 512     # DenseCL: 2048 (= its C5 width); here the embedding width
    cfg.projector.dense_out = 128        # DenseCL: 128
    cfg.projector.dense_batch_norm = False  # True: BN after the hidden 1x1 conv (PixPro)
    # 'encoder': the deepest fused level (stride 32); 'decoder': the aerial decoder's full-resolution
    # map, which pre-trains the decoder too (the dense objective).
    cfg.projector.dense_source = "encoder"
    cfg.projector.dense_grid = 0         # > 0: the map average-pooled to dense_grid^2 cells first
    return cfg


def tiny_config() -> ml_collections.ConfigDict:
    """Tiny widths and depths for tests and the CPU demo: 32 px aerial, 8 px SITS, 3 SITS levels."""
    cfg = default_config()
    cfg.aerial_size = 32
    cfg.aerial_gsd_m = 1.6               # 51.2 m footprint = 5.12 SITS px, inside the 8 px crop
    cfg.sits_size = 8
    cfg.stage_sizes = (1, 1, 1, 1)
    cfg.widths = (8, 16, 16, 32)
    cfg.stem_width = 8
    cfg.decoder_channels = (16, 16, 8, 8, 8)
    cfg.utae_encoder_widths = (16, 16, 32)
    cfg.utae_decoder_widths = (16, 16, 32)
    cfg.n_head = 4
    cfg.d_model = 32
    cfg.projector.hidden = 32
    cfg.projector.out = 16
    cfg.projector.predictor_hidden = 32
    cfg.projector.dense_hidden = 32
    cfg.projector.dense_out = 16
    return cfg


def encoder_keys(cfg) -> tuple[str, ...]:
    """Top-level param subtrees of the encoder for cfg.name."""
    return ENCODER_SUBTREES[cfg.name]


def build_model(cfg) -> UTT:
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {tuple(_DTYPES)}, found {cfg.dtype!r}")
    return UTT(
        variant=cfg.name, num_classes=cfg.num_classes, aerial_size=cfg.aerial_size,
        footprint_px=float(cfg.footprint_px), stage_sizes=tuple(cfg.stage_sizes),
        widths=tuple(cfg.widths), stem_width=cfg.stem_width,
        decoder_channels=tuple(cfg.decoder_channels),
        utae_encoder_widths=tuple(cfg.utae_encoder_widths),
        utae_decoder_widths=tuple(cfg.utae_decoder_widths), n_head=cfg.n_head,
        d_model=cfg.d_model, d_k=cfg.d_k, ltae_dropout=cfg.ltae_dropout,
        attn_dropout=cfg.attn_dropout, date_period=cfg.date_period, fusion_mode=cfg.fusion,
        fusion_branches=tuple(cfg.fusion_branches), fusion_dropout=cfg.fusion_dropout,
        modality_dropout=cfg.modality_dropout, dtype=_DTYPES[cfg.dtype], remat=cfg.remat)


def build_ssl_model(cfg) -> SimCLRModel:
    p = cfg.projector
    # A model config without the predictor / dense fields (one saved before they existed) builds the
    # model it was trained with: both heads off.
    heads = {}
    if p.get("predictor", False):
        heads.update(predictor=True, predictor_hidden_dim=p.predictor_hidden)
    if p.get("dense", False):
        heads.update(dense=True, dense_hidden_dim=p.dense_hidden, dense_out_dim=p.dense_out,
                     dense_batch_norm=p.dense_batch_norm,
                     dense_source=p.get("dense_source", "encoder"), dense_grid=p.get("dense_grid", 0))
    return SimCLRModel(backbone=build_model(cfg), hidden_dim=p.hidden, out_dim=p.out,
                       num_layers=p.num_layers, use_batch_norm=p.batch_norm,
                       per_modality=p.per_modality, dtype=_DTYPES[cfg.dtype], **heads)


def dummy_inputs(cfg, batch: int = 1, num_dates: int = 2):
    """Zero inputs of the configured shapes (for init and shape checks): aerial, sits, dates, valid."""
    return (jnp.zeros((batch, cfg.aerial_size, cfg.aerial_size, cfg.aerial_bands), jnp.float32),
            jnp.zeros((batch, num_dates, cfg.sits_size, cfg.sits_size, cfg.sits_bands), jnp.float32),
            jnp.zeros((batch, num_dates), jnp.int32),
            jnp.ones((batch, num_dates), bool))


def param_shapes(module, cfg):
    """Variables as ShapeDtypeStructs, via jax.eval_shape on init: no memory, no compute."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *dummy_inputs(cfg), train=False))


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


__all__ = ["ENCODER_KEYS", "INPUT_KEYS", "VARIANTS", "UTT", "SimCLRModel", "ProjectionHead", "PredictionHead",
           "DenseProjectionHead", "default_config",
           "tiny_config", "encoder_keys", "build_model", "build_ssl_model", "dummy_inputs",
           "param_shapes", "count_params"]
