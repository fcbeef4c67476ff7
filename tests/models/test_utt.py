"""U-T&T model: shapes, padded dates, per-sample fusion, variants, dtype policy, param trees.

Params are initialised with an 'rbg' key: jitting an init that draws ~100 tensors from partitionable
threefry takes minutes to compile on CPU, rbg seconds. Shape-only checks use jax.eval_shape.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcssl import models
from lcssl.models.fusion import Fusion, footprint_resize
from lcssl.models.utae import positional_encoding

B, T = 2, 3


def make_inputs(cfg, seed=0, batch=B, num_dates=T):
    rng = np.random.default_rng(seed)
    aerial = rng.normal(size=(batch, cfg.aerial_size, cfg.aerial_size, cfg.aerial_bands))
    sits = rng.normal(size=(batch, num_dates, cfg.sits_size, cfg.sits_size, cfg.sits_bands))
    dates = np.sort(rng.integers(1, 366, size=(batch, num_dates)), axis=1)
    valid = np.ones((batch, num_dates), bool)
    return (jnp.asarray(aerial, jnp.float32), jnp.asarray(sits, jnp.float32),
            jnp.asarray(dates, jnp.int32), jnp.asarray(valid))


def init(model, cfg):
    return jax.jit(lambda: model.init(jax.random.key(0, impl="rbg"), *models.dummy_inputs(cfg),
                                      train=False))()


_EVAL_FNS = {}


def _eval_fn(model):
    """One jitted eval function per model object, so repeated shapes reuse the compiled program."""
    if id(model) not in _EVAL_FNS:
        _EVAL_FNS[id(model)] = (model, jax.jit(lambda v, *a: model.apply(v, *a, train=False)))
    return _EVAL_FNS[id(model)][1]


@pytest.fixture(scope="module")
def tiny():
    cfg = models.tiny_config()
    model = models.build_model(cfg)
    return cfg, model, init(model, cfg)


@pytest.mark.parametrize("bands,classes", [(4, 12), (5, 13)])
@pytest.mark.parametrize("name", ["utt", "unet", "utae"])
def test_output_shapes_and_dtypes(name, bands, classes):
    cfg = models.tiny_config()
    cfg.variant, cfg.aerial_bands, cfg.num_classes = name, bands, classes
    model = models.build_model(cfg)
    variables = models.param_shapes(model, cfg)
    out = jax.eval_shape(lambda v, *a: model.apply(v, *a, train=False), variables,
                         *make_inputs(cfg))
    expected = {"utt": {"logits", "aux_logits", "embedding"}, "unet": {"logits", "embedding"},
                "utae": {"logits", "embedding"}}[name]
    assert set(out) == expected
    for key in expected - {"embedding"}:
        assert out[key].shape == (B, cfg.aerial_size, cfg.aerial_size, classes)
    width = cfg.utae_decoder_widths[0] if name == "utae" else cfg.widths[-1]
    assert out["embedding"].shape == (B, width)
    assert all(o.dtype == jnp.float32 for o in out.values())
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == set(models.encoder_keys(cfg)) | {
        "utt": {"aerial_decoder", "seg_head", "aux_head"}, "unet": {"aerial_decoder", "seg_head"},
        "utae": {"aux_head"}}[name]


def test_default_param_count_is_close_to_reference():
    # FLAIR #2 U-T&T: smp Unet-resnet34 (24.4 M) + U-TAE + fusion MLPs, about 27 M.
    cfg = models.default_config()
    n = models.count_params(models.param_shapes(models.build_model(cfg), cfg)["params"])
    assert abs(n - 27e6) / 27e6 < 0.10, n
    assert cfg.footprint_px == pytest.approx(10.24)


def test_padded_dates_change_nothing(tiny):
    cfg, model, variables = tiny
    aerial, sits, dates, valid = make_inputs(cfg)
    # Two padded dates with garbage pixels (the pipeline pads with date 0).
    pad_sits = jnp.concatenate([sits, 100.0 * jnp.ones_like(sits[:, :2])], axis=1)
    pad_dates = jnp.concatenate([dates, jnp.zeros_like(dates[:, :2])], axis=1)
    pad_valid = jnp.concatenate([valid, jnp.zeros_like(valid[:, :2])], axis=1)
    ref = _eval_fn(model)(variables, aerial, sits, dates, valid)
    out = _eval_fn(model)(variables, aerial, pad_sits, pad_dates, pad_valid)
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-5)
    # ...while the same dates marked valid do change it.
    out = _eval_fn(model)(variables, aerial, pad_sits, pad_dates, jnp.ones_like(pad_valid))
    assert not np.allclose(out["logits"], ref["logits"], atol=1e-4)


def test_fusion_is_per_sample(tiny):
    cfg, model, variables = tiny
    aerial, sits, dates, valid = make_inputs(cfg)
    ref = _eval_fn(model)(variables, aerial, sits, dates, valid)
    other = sits.at[1].set(-sits[1] + 3.0)
    out = _eval_fn(model)(variables, aerial, other, dates.at[1].set(dates[1] + 40), valid)
    for key in ref:
        np.testing.assert_allclose(out[key][0], ref[key][0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out["logits"][1], ref["logits"][1], atol=1e-4)
    assert not np.allclose(out["aux_logits"][1], ref["aux_logits"][1], atol=1e-4)


@pytest.mark.parametrize("mode", ["se", "residual_excite"])
def test_excitation_fusion_runs_and_differs_from_add(tiny, mode):
    cfg, model, variables = tiny
    cfg = models.tiny_config()
    cfg.fusion_mode = mode
    gated = models.build_model(cfg)
    inputs = make_inputs(cfg)
    # The gates use the same per-level fusion params as 'add', so the same variables apply.
    assert jax.tree.structure(models.param_shapes(gated, cfg)) == jax.tree.structure(variables)
    out = _eval_fn(gated)(variables, *inputs)
    ref = _eval_fn(model)(variables, *inputs)
    assert np.all(np.isfinite(out["logits"]))
    assert not np.allclose(out["logits"], ref["logits"], atol=1e-4)
    np.testing.assert_allclose(out["aux_logits"], ref["aux_logits"], rtol=1e-6)


def test_concat_fusion_adds_a_projection_per_level():
    cfg = models.tiny_config()
    cfg.fusion_mode = "concat"
    params = models.param_shapes(models.build_model(cfg), cfg)["params"]["fusion"]
    for i, width in enumerate((cfg.stem_width,) + tuple(cfg.widths)):
        kernel = params[f"level{i}"]["concat_conv"]["kernel"]
        assert kernel.shape == (1, 1, 3 * width, width)  # [x, cropped, collapsed] -> width


def test_modality_dropout_is_per_sample():
    levels = [jnp.ones((64, 4, 4, 8)), jnp.ones((64, 2, 2, 16))]
    sits_map = jax.random.normal(jax.random.key(0), (64, 8, 8, 16))

    variables = jax.jit(Fusion().init)(jax.random.key(1, impl="rbg"), levels, sits_map)

    def run(p, train=True):
        apply = jax.jit(functools.partial(Fusion(modality_dropout=p, dropout=0.0).apply,
                                          train=train))
        return apply(variables, levels, sits_map, rngs={"dropout": jax.random.key(2)})

    dropped = [np.all(np.isclose(f, x), axis=(1, 2, 3)) for f, x in zip(run(0.5), levels)]
    np.testing.assert_array_equal(dropped[0], dropped[1])  # a sample drops at every level at once
    assert 10 < dropped[0].sum() < 54
    assert all(np.allclose(f, x) for f, x in zip(run(1.0), levels))
    assert not any(np.all(np.isclose(f, x), axis=(1, 2, 3)).any() for f, x in zip(run(1.0, False), levels))


def test_bfloat16_compute_keeps_fp32_params_and_outputs():
    cfg = models.tiny_config()
    cfg.dtype = "bfloat16"
    model = models.build_model(cfg)
    variables = models.param_shapes(model, cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    inputs = make_inputs(cfg)
    out = jax.eval_shape(lambda v, *a: model.apply(v, *a, train=False), variables, *inputs)
    assert all(o.dtype == jnp.float32 for o in out.values())
    jaxpr = jax.make_jaxpr(lambda v, *a: model.apply(v, *a, train=False))(variables, *inputs)
    conv_dtypes = {eqn.invars[0].aval.dtype for eqn in jaxpr.eqns
                   if eqn.primitive.name == "conv_general_dilated"}
    assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}


def test_remat_keeps_the_param_tree():
    cfg = models.tiny_config()
    ref = models.param_shapes(models.build_model(cfg), cfg)
    cfg.remat = "blocks"
    model = models.build_model(cfg)
    variables = models.param_shapes(model, cfg)
    assert jax.tree.structure(variables) == jax.tree.structure(ref)
    def loss(params, batch_stats, *inputs):
        out, _ = model.apply({"params": params, "batch_stats": batch_stats}, *inputs, train=True,
                             rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
        return out["logits"].sum()

    grads = jax.eval_shape(jax.grad(loss), variables["params"], variables["batch_stats"],
                           *make_inputs(cfg))
    assert jax.tree.structure(grads) == jax.tree.structure(ref["params"])


@pytest.mark.parametrize("per_modality", [False, True])
def test_simclr_backbone_params_match_the_segmentation_encoder(per_modality):
    cfg = models.tiny_config()
    cfg.projector.per_modality = per_modality
    seg = models.param_shapes(models.build_model(cfg), cfg)["params"]
    ssl_model = models.build_ssl_model(cfg)
    ssl = models.param_shapes(ssl_model, cfg)
    assert set(ssl["params"]["backbone"]) == set(models.ENCODER_KEYS)
    for key in models.ENCODER_KEYS:
        assert jax.tree.map(lambda x: x.shape, ssl["params"]["backbone"][key]) == \
            jax.tree.map(lambda x: x.shape, seg[key])
    out = jax.eval_shape(lambda v, *a: ssl_model.apply(v, *a, train=False), ssl, *make_inputs(cfg))
    assert out["projection"].shape == (B, cfg.projector.out_dim)
    assert out["embedding"].shape == (B, cfg.widths[-1])
    if per_modality:
        assert out["aerial_projection"].shape == out["sits_projection"].shape == (B, cfg.projector.out_dim)


def test_return_features_gives_dense_maps():
    cfg = models.tiny_config()
    model = models.build_model(cfg)
    out = jax.eval_shape(lambda v, *a: model.apply(v, *a, train=False, return_features=True),
                         models.param_shapes(model, cfg), *make_inputs(cfg))
    f = out["features"]
    assert f["decoder"].shape == (B, cfg.aerial_size, cfg.aerial_size, cfg.decoder_channels[-1])
    assert [lv.shape[-1] for lv in f["levels"]] == [cfg.stem_width] + list(cfg.widths)
    assert f["sits_map"].shape == (B, cfg.sits_size, cfg.sits_size, cfg.utae_decoder_widths[0])
    assert f["aerial_embedding"].shape == (B, cfg.widths[-1])
    assert f["sits_embedding"].shape == (B, cfg.utae_decoder_widths[0])


def test_footprint_resize_samples_the_centred_extent():
    # A horizontal ramp x = column centre; the centred footprint [15, 25) of a 40 px map resampled
    # to 10 px must give the pixel centres 15.5 .. 24.5.
    ramp = jnp.broadcast_to(jnp.arange(40, dtype=jnp.float32) + 0.5, (1, 40, 40))[..., None]
    out = footprint_resize(ramp, 10.0, (10, 10))
    np.testing.assert_allclose(out[0, 3, :, 0], np.arange(10) + 15.5, atol=1e-4)
    out = footprint_resize(ramp, 10.24, (16, 16))  # fractional footprint: [14.88, 25.12]
    np.testing.assert_allclose(out[0, 0, :, 0], 14.88 + (np.arange(16) + 0.5) * 10.24 / 16, atol=1e-4)


def test_positional_encoding_is_sinusoidal_with_period_1000():
    pe = positional_encoding(jnp.array([[0, 100]]), d=4, period=1000.0, repeat=2)
    assert pe.shape == (1, 2, 8)
    expected = [np.sin(100), np.cos(100), np.sin(100 / 1000 ** 0.5), np.cos(100 / 1000 ** 0.5)]
    np.testing.assert_allclose(pe[0, 1], expected * 2, atol=1e-6)
    np.testing.assert_allclose(pe[0, 0], [0, 1, 0, 1] * 2)
