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
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lcssl.models.heads import (DateReconstructionHead, DenseProjectionHead, PredictionHead,
                                ProjectionHead, PretrainModel)
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

# float64 only in jax's x64 mode: the tests compare sharded and single-device runs in it.
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


# Fields of the input data, not of a module: dummy_inputs and the footprint read them, and
# train.model_config_for sets them (and num_classes, aerial_size, sits_size) from the dataset card.
DATA_KEYS = ("aerial_bands", "sits_bands", "aerial_gsd_m", "sits_size", "sits_gsd_m")
# Keys of model configs saved in checkpoints before the config keys were the modules' field names.
_OLD_KEYS = {"name": "variant", "fusion": "fusion_mode"}
_OLD_PROJECTOR_KEYS = {"hidden": "hidden_dim", "out": "out_dim", "batch_norm": "use_batch_norm",
                       "predictor_hidden": "predictor_hidden_dim", "dense_hidden": "dense_hidden_dim",
                       "dense_out": "dense_out_dim"}


def _field_defaults(module_cls, skip=()) -> dict:
    """{field: default} of a Linen module class: the one place model defaults are written."""
    return {f.name: f.default for f in dataclasses.fields(module_cls)
            if f.name not in ("parent", "name", *skip) and f.default is not dataclasses.MISSING}


def default_config() -> ml_collections.ConfigDict:
    """The FLAIR #2 U-T&T baseline (~27 M parameters): smp Unet-resnet34 + U-TAE.

    Keys are UTT's field names with UTT's defaults (lcssl/models/utt.py), `dtype` as a name
    ('float32' | 'bfloat16'), the DATA_KEYS, and `projector`: PretrainModel's fields
    (lcssl/models/heads.py). build_model(cfg) is UTT(**cfg) on those fields.
    """
    cfg = ml_collections.ConfigDict(_field_defaults(UTT, skip=("dtype", "footprint_px")))
    cfg.dtype = "float32"                # compute dtype; params stay fp32
    cfg.aerial_bands = 5                 # 5 FLAIR #2 (RGB, NIR, elevation), 4 Hameln (RGB, IR)
    cfg.sits_bands = 10                  # Sentinel-2 bands of lcssl.data.schema.S2_BANDS
    cfg.aerial_gsd_m = 0.2
    cfg.sits_size = 40                   # FLAIR #2 super-patch, sat_patch_size 40
    cfg.sits_gsd_m = 10.0
    # Aerial extent in SITS pixels (DESIGN.md, Footprint): 512 * 0.2 / 10 = 10.24; follows overrides
    # of the three fields it is made of unless set itself.
    cfg.footprint_px = (cfg.get_ref("aerial_size") * cfg.get_ref("aerial_gsd_m")
                        / cfg.get_ref("sits_gsd_m"))
    cfg.projector = ml_collections.ConfigDict(_field_defaults(PretrainModel, skip=("backbone", "dtype")))
    # SimCLR's hidden width equals the embedding width (2048 for its ResNet-50; 512 here, widths[-1]).
    cfg.projector.hidden_dim = 512
    cfg.projector.dense_hidden_dim = 512
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
    cfg.projector.hidden_dim = 32
    cfg.projector.out_dim = 16
    cfg.projector.predictor_hidden_dim = 32
    cfg.projector.dense_hidden_dim = 32
    cfg.projector.dense_out_dim = 16
    cfg.projector.date_hidden_dim = 32
    return cfg


def _as_dict(cfg) -> dict:
    """A model config (ConfigDict, or a checkpoint's input_spec['model'] dict, old keys renamed)."""
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    d = {_OLD_KEYS.get(k, k): v for k, v in d.items()}
    if "projector" in d:
        d["projector"] = {_OLD_PROJECTOR_KEYS.get(k, k): v for k, v in dict(d["projector"]).items()}
    return d


def _module_kwargs(module_cls, values: dict, skip=()) -> dict:
    names = {f.name for f in dataclasses.fields(module_cls)} - {"parent", "name", *skip}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}


def _dtype(cfg: dict):
    if cfg.get("dtype", "float32") not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {tuple(_DTYPES)}, found {cfg['dtype']!r}")
    return _DTYPES[cfg.get("dtype", "float32")]


def variant(cfg) -> str:
    """'utt' | 'unet' (aerial only) | 'utae' (Sentinel-2 only), also from configs saved before the
    key was renamed."""
    return _as_dict(cfg).get("variant", "utt")


def encoder_keys(cfg) -> tuple[str, ...]:
    """Top-level param subtrees of the encoder for the config's variant."""
    return ENCODER_SUBTREES[variant(cfg)]


def build_model(cfg) -> UTT:
    """UTT(**cfg): the config's keys that are UTT fields, dtype from its name."""
    d = _as_dict(cfg)
    return UTT(**_module_kwargs(UTT, d, skip=("dtype",)), dtype=_dtype(d))


def build_ssl_model(cfg) -> PretrainModel:
    """PretrainModel(backbone=build_model(cfg), **cfg.projector). A projector config without the
    predictor / dense fields (saved before they existed) builds what it was trained with: both off."""
    d = _as_dict(cfg)
    return PretrainModel(backbone=build_model(d), dtype=_dtype(d),
                       **_module_kwargs(PretrainModel, d.get("projector", {}),
                                        skip=("backbone", "dtype")))


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


__all__ = ["ENCODER_KEYS", "INPUT_KEYS", "DATA_KEYS", "VARIANTS", "UTT", "PretrainModel", "ProjectionHead", "PredictionHead",
           "DenseProjectionHead", "DateReconstructionHead", "default_config",
           "tiny_config", "encoder_keys", "build_model", "build_ssl_model", "dummy_inputs",
           "param_shapes", "count_params"]
