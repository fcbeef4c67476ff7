"""SSL heads beside the SimCLR projector: the BYOL predictor and the pixel-level projection head.

    cfg = models.tiny_config()
    cfg.projector.predictor = True          # out['prediction']        [B, out_dim]
    cfg.projector.dense = True              # out['dense_projection']  [B, h, w, dense_out_dim]
    model = models.build_ssl_model(cfg)

Both are off by default, and then the SimCLR param tree is what it was before they existed.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcssl import models
from tests.models.test_utt import B, init, make_inputs


def shapes(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


def with_heads(name="utt", dtype="float32", aerial_size=32):
    cfg = models.tiny_config()
    cfg.variant, cfg.dtype = name, dtype
    if aerial_size != cfg.aerial_size:   # same 51.2 m footprint, finer pixels
        cfg.aerial_gsd_m *= cfg.aerial_size / aerial_size
        cfg.aerial_size = aerial_size
    cfg.projector.predictor = True
    cfg.projector.dense = True
    return cfg


# ------------------------------------------------------------------------------------------------
# The heads on their own
# ------------------------------------------------------------------------------------------------

def test_prediction_head_is_the_byol_mlp():
    head = models.PredictionHead(hidden_dim=32, out_dim=16)
    z = jax.random.normal(jax.random.key(0), (4, 16))
    variables = head.init(jax.random.key(1), z)
    # Dense (no bias: BN follows) -> BN -> ReLU -> Dense with bias, no BN on the output.
    assert shapes(variables["params"]) == {
        "dense0": {"kernel": ((16, 32), jnp.float32)},
        "bn0": {"scale": ((32,), jnp.float32), "bias": ((32,), jnp.float32)},
        "dense1": {"kernel": ((32, 16), jnp.float32), "bias": ((16,), jnp.float32)}}
    p, updates = head.apply(variables, z, train=True, mutable=["batch_stats"])
    assert p.shape == z.shape and p.dtype == jnp.float32
    assert not np.allclose(updates["batch_stats"]["bn0"]["mean"], 0)


def test_projection_head_with_batch_norm_is_still_simclr_v2():
    # The option the predictor uses must not change the existing batch-norm projector's params.
    head = models.ProjectionHead(hidden_dim=32, out_dim=16, use_batch_norm=True)
    params = head.init(jax.random.key(0), jnp.ones((4, 8)))["params"]
    assert sorted(params) == ["bn0", "bn1", "dense0", "dense1"]
    assert "bias" not in params["dense0"] and "bias" not in params["dense1"]


@pytest.mark.parametrize("use_batch_norm", [False, True])
def test_dense_projection_head_is_a_1x1_conv_mlp(use_batch_norm):
    head = models.DenseProjectionHead(hidden_dim=32, out_dim=8, use_batch_norm=use_batch_norm)
    fmap = jax.random.normal(jax.random.key(0), (2, 4, 5, 12))
    variables = head.init(jax.random.key(1), fmap)
    out = head.apply(variables, fmap)
    assert out.shape == (2, 4, 5, 8) and out.dtype == jnp.float32
    assert sorted(variables["params"]) == (["bn0", "dense0", "dense1"] if use_batch_norm
                                           else ["dense0", "dense1"])
    # Receptive field of one pixel: changing pixel (0, 1, 2) changes its output and no other.
    changed = head.apply(variables, fmap.at[0, 1, 2].add(1.0))
    moved = np.any(np.asarray(changed != out), axis=-1)
    expected = np.zeros(moved.shape, bool)
    expected[0, 1, 2] = True
    np.testing.assert_array_equal(moved, expected)


def test_dense_projection_head_wants_a_feature_map():
    head = models.DenseProjectionHead(hidden_dim=8, out_dim=4)
    with pytest.raises(ValueError, match=r"\[B, h, w, C\]"):
        head.init(jax.random.key(0), jnp.ones((2, 16)))


def test_heads_compute_in_bfloat16_and_return_float32():
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 16))
    for make in (lambda dt: models.PredictionHead(32, 16, dtype=dt),
                 lambda dt: models.DenseProjectionHead(32, 8, use_batch_norm=True, dtype=dt)):
        variables = make(jnp.float32).init(jax.random.key(1), x)
        full = make(jnp.float32).apply(variables, x)
        half = make(jnp.bfloat16).apply(variables, x)   # same fp32 params, bf16 compute
        assert half.dtype == full.dtype == jnp.float32
        assert not np.array_equal(half, full)           # rounded in bf16 ...
        np.testing.assert_allclose(half, full, atol=0.1, rtol=0.05)  # ... but the same function


# ------------------------------------------------------------------------------------------------
# In PretrainModel
# ------------------------------------------------------------------------------------------------

def test_heads_off_by_default_leave_the_simclr_param_tree_unchanged():
    cfg = models.tiny_config()
    assert not cfg.projector.predictor and not cfg.projector.dense
    default = models.param_shapes(models.build_ssl_model(cfg), cfg)
    # A model config without the new fields (one saved in a checkpoint before they existed).
    for field in ("predictor", "predictor_hidden_dim", "dense", "dense_hidden_dim", "dense_out_dim",
                  "dense_batch_norm", "date_reconstruction", "date_hidden_dim"):
        del cfg.projector[field]
    before = models.param_shapes(models.build_ssl_model(cfg), cfg)
    assert shapes(default) == shapes(before)
    assert sorted(default["params"]) == ["backbone", "projector"]
    out = jax.eval_shape(lambda v, *a: models.build_ssl_model(cfg).apply(v, *a, train=False),
                         default, *make_inputs(cfg))
    assert sorted(out) == ["embedding", "projection"]


@pytest.mark.parametrize("name", ["utt", "unet", "utae"])
def test_heads_on_add_their_own_subtrees_and_outputs(name):
    cfg = with_heads(name, aerial_size=64)
    model = models.build_ssl_model(cfg)
    variables = models.param_shapes(model, cfg)
    cfg_off = with_heads(name, aerial_size=64)
    cfg_off.projector.predictor = cfg_off.projector.dense = False
    off = models.param_shapes(models.build_ssl_model(cfg_off), cfg_off)
    assert sorted(variables["params"]) == ["backbone", "dense_projector", "predictor", "projector"]
    for key in ("backbone", "projector"):            # the encoder the fine-tuning loads is the same
        assert shapes(variables["params"][key]) == shapes(off["params"][key])

    out = jax.eval_shape(lambda v, *a: model.apply(v, *a, train=False), variables,
                         *make_inputs(cfg))
    p = cfg.projector
    assert out["prediction"].shape == out["projection"].shape == (B, p.out_dim)
    # The map 'embedding' pools: deepest fused aerial level (stride 32), or the U-TAE map.
    hw = cfg.sits_size if name == "utae" else cfg.aerial_size // 32
    assert out["dense_projection"].shape == (B, hw, hw, p.dense_out_dim)
    assert out["prediction"].dtype == out["dense_projection"].dtype == jnp.float32


def test_date_reconstruction_head_is_an_mlp_on_the_pixel_and_the_date_encoding():
    from lcssl.models.utae import positional_encoding

    head = models.DateReconstructionHead(out_dim=3, hidden_dim=6, date_dim=4)
    rng = np.random.default_rng(0)
    fmap, dates = jnp.asarray(rng.normal(size=(2, 3, 3, 5)), jnp.float32), jnp.array([[30, 200], [90, 91]])
    variables = head.init(jax.random.key(0), fmap, dates)
    out = head.apply(variables, fmap, dates)
    assert out.shape == (2, 2, 3, 3, 3) and out.dtype == jnp.float32
    # Dense on the concatenation [pixel features, date encoding], ReLU, Dense: per (date, pixel).
    p = jax.tree.map(np.asarray, variables["params"])
    pixels = np.broadcast_to(np.asarray(fmap)[:, None], (2, 2, 3, 3, 5))
    encoding = np.broadcast_to(np.asarray(positional_encoding(dates, 4))[:, :, None, None], (2, 2, 3, 3, 4))
    kernel = np.concatenate([p["pixel_proj"]["kernel"], p["date_proj"]["kernel"]])
    hidden = np.maximum(np.concatenate([pixels, encoding], -1) @ kernel + p["pixel_proj"]["bias"], 0)
    np.testing.assert_allclose(out, hidden @ p["out"]["kernel"] + p["out"]["bias"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["utt", "utae", "unet"])
def test_date_reconstruction_in_the_pretrain_model(name):
    cfg = models.tiny_config()
    cfg.variant, cfg.projector.date_reconstruction = name, True
    model = models.build_ssl_model(cfg)
    if name == "unet":
        with pytest.raises(ValueError, match="Sentinel-2 branch"):
            models.param_shapes(model, cfg)
        return
    variables = models.param_shapes(model, cfg)
    assert sorted(variables["params"]) == ["backbone", "date_reconstructor", "projector"]
    inputs = make_inputs(cfg)
    out = jax.eval_shape(lambda v, *a: model.apply(v, *a, train=False), variables, *inputs)
    assert out["date_reconstruction"].shape == inputs[1].shape[:2] + (cfg.sits_size,) * 2 + (cfg.sits_bands,)


@pytest.fixture(scope="module")
def tiny_with_heads():
    cfg = with_heads(aerial_size=64)                  # a 2x2 deepest level
    model = models.build_ssl_model(cfg)
    return cfg, model, init(model, cfg)


@pytest.mark.slow
def test_prediction_is_its_own_head_and_trains_the_backbone(tiny_with_heads):
    cfg, model, variables = tiny_with_heads
    inputs = make_inputs(cfg)
    target = jax.random.normal(jax.random.key(2), (B, cfg.projector.out_dim))

    def loss(params):  # BYOL-like: the prediction regressed onto a fixed target
        out, _ = model.apply({**variables, "params": params}, *inputs, train=True,
                             rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
        pred = out["prediction"] / jnp.linalg.norm(out["prediction"], axis=-1, keepdims=True)
        return -jnp.sum(pred * target), out

    grads, out = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    assert not np.allclose(out["prediction"], out["projection"], atol=1e-3)
    for key in ("predictor", "projector", *(f"backbone/{k}" for k in models.ENCODER_KEYS)):
        sub = grads
        for part in key.split("/"):
            sub = sub[part]
        assert float(jax.tree.reduce(lambda a, g: a + jnp.sum(jnp.abs(g)), sub, 0.0)) > 0, key
    # The dense head is not in this loss.
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(grads["dense_projector"]))


def test_dense_projection_of_a_sample_depends_on_that_sample_only(tiny_with_heads):
    cfg, model, variables = tiny_with_heads
    apply = jax.jit(lambda v, *a: model.apply(v, *a, train=False)["dense_projection"])
    aerial, sits, dates, valid = make_inputs(cfg)
    other_aerial, other_sits, *_ = make_inputs(cfg, seed=1)
    before = apply(variables, aerial, sits, dates, valid)
    after = apply(variables, aerial.at[0].set(other_aerial[0]), sits.at[0].set(other_sits[0]),
                  dates, valid)
    assert before.shape == (B, 2, 2, cfg.projector.dense_out_dim)
    assert not np.allclose(after[0], before[0])          # sample 0 changed ...
    np.testing.assert_array_equal(after[1:], before[1:])  # ... the others did not


def test_bfloat16_compute_gives_float32_ssl_outputs():
    cfg = with_heads(dtype="bfloat16")
    model = models.build_ssl_model(cfg)
    variables = models.param_shapes(model, cfg)
    assert {x.dtype for x in jax.tree.leaves(variables)} == {np.dtype("float32")}  # params fp32
    out, _ = jax.eval_shape(
        lambda v, *a: model.apply(v, *a, train=True, rngs={"dropout": jax.random.key(0)},
                                  mutable=["batch_stats"]), variables, *make_inputs(cfg))
    assert sorted(out) == ["dense_projection", "embedding", "prediction", "projection"]
    assert {k: v.dtype for k, v in out.items()} == {k: np.dtype("float32") for k in out}


@pytest.mark.slow
def test_dense_head_on_the_decoder_pretrains_the_decoder():
    # dense_source='decoder': the head reads the aerial decoder's full-resolution map, and the
    # backbone's 'aerial_decoder' (same shapes as the segmentation model's) gets gradients. The
    # aerial-only variant: the same decoder, without compiling the U-TAE.
    cfg = with_heads("unet")
    cfg.projector.predictor = False
    cfg.projector.dense_source = "decoder"
    model = models.build_ssl_model(cfg)
    variables = init(model, cfg)
    seg = models.param_shapes(models.build_model(cfg), cfg)["params"]
    backbone = variables["params"]["backbone"]
    assert sorted(backbone) == ["aerial_decoder", "aerial_encoder"]
    assert shapes(backbone["aerial_decoder"]) == shapes(seg["aerial_decoder"])
    inputs = make_inputs(cfg)

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, *inputs, train=True,
                             rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
        return jnp.sum(out["dense_projection"][:, :3, :5] ** 2), out

    grads, out = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    assert out["dense_projection"].shape == (B, cfg.aerial_size, cfg.aerial_size, cfg.projector.dense_out_dim)
    for key in ("aerial_decoder", "aerial_encoder"):
        assert float(jax.tree.reduce(lambda a, g: a + jnp.sum(jnp.abs(g)), grads["backbone"][key], 0.0)) > 0
    # dense_grid pools the decoder map to grid^2 cells (8 x 8 pixels each here) before the head.
    cfg.projector.dense_grid = 4
    pooled_model = models.build_ssl_model(cfg)
    feats = jax.jit(lambda v, *a: pooled_model.apply(v, *a, train=False))(variables, *inputs)
    assert feats["dense_projection"].shape == (B, 4, 4, cfg.projector.dense_out_dim)
    with pytest.raises(ValueError, match="dense_grid=5 must divide"):
        cfg.projector.dense_grid = 5
        models.param_shapes(models.build_ssl_model(cfg), cfg)


@pytest.mark.parametrize("name,source,message", [("utae", "decoder", "needs the aerial decoder"),
                                                 ("utt", "pixels", "'encoder' or 'decoder'")])
def test_dense_source_errors_name_the_field(name, source, message):
    cfg = with_heads(name)
    cfg.projector.dense_source = source
    with pytest.raises(ValueError, match=message):
        models.param_shapes(models.build_ssl_model(cfg), cfg)
