"""The trainer, in process on 8 virtual CPU devices, with the tiny SimCLR config on a synthetic
FLAIR #2 dataset: a NaN stops the run and leaves the last good checkpoint; an interrupted run
resumes to exactly the same weights; checkpoints restore on other device counts; fine-tuning loads
exactly the pre-trained encoder."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lcssl import checkpoint as ckpt_lib
from lcssl import configs, models, sharding, tasks, train
from lcssl.data import pipeline, schema
from lcssl.errors import UserError
from lcssl.tasks import supervised
from tests._train_helpers import build_task, compilation_cache, saved_state, tiny_config, tiny_dataset


class Interrupted(Exception):
    """Stands in for a crash or a killed job."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    compilation_cache(tmp_path_factory)
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def ssl_run(data_dir, tmp_path_factory):
    """An uninterrupted tiny SimCLR run: 6 steps, checkpoints at 3 and 6."""
    workdir = tmp_path_factory.mktemp("ssl_uninterrupted")
    results = train.run(tiny_config("ssl_flair2", data_dir), str(workdir))
    return workdir, results


def tamper_with_batches(monkeypatch, at_step: int, action):
    """Makes the pipeline's batch for step `at_step` + 1 go through `action` (poison or raise)."""
    real = pipeline.make_train_iterator

    def iterator(*args, start_step=0, **kwargs):
        for step, batch in enumerate(real(*args, start_step=start_step, **kwargs), start=start_step):
            yield action(batch) if step == at_step else batch

    monkeypatch.setattr(pipeline, "make_train_iterator", iterator)


def test_ssl_run_writes_checkpoints_with_their_input_spec_and_a_probe(ssl_run, data_dir):
    workdir, results = ssl_run
    assert results["step"] == 6
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    spec = ckpt_lib.read_input_spec(str(workdir))
    card = pipeline.load_card(data_dir)
    assert spec["aerial"]["bands"] == card["aerial"]["bands"] == ["R", "G", "B", "NIR", "elevation"]
    assert spec["sits"]["date_encoding"] == card["sits"]["date_encoding"]
    assert spec["aerial"]["mean"] == card["aerial"]["mean"] and spec["classes"] == card["classes"]
    assert spec["model"]["aerial_size"] == 32 and spec["model"]["num_classes"] == 13
    probe = results["probe"]
    assert probe["num_train"] > 0 and probe["num_eval"] > 0 and 0 <= probe["accuracy"] <= 1
    # A checkpoint saves the model's config and the data position, no other config field: one
    # written before the supervised settings moved under config.supervised resumes and fine-tunes
    # as it did (config.json beside it is a record for a reader; no code reads it back).
    saved = "".join(f.read_text() for item in ("input_spec", "progress")
                    for f in (workdir / "checkpoints" / "6" / item).rglob("*") if f.is_file())
    assert '"label_seed"' in saved and [name for name in configs.MOVED if name in saved] == []
    assert json.loads((workdir / "eval_results.json").read_text())["probe"] == probe


def logged_scalars(workdir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the run's TensorBoard event files (clu's writer)."""
    import tensorflow as tf

    scalars = {}
    for path in workdir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return scalars


def test_ssl_run_logs_health_and_throughput_beside_the_loss(ssl_run):
    """What a user watches: loss with embedding std and positive-pair accuracy (collapse shows),
    the share of time spent waiting for input, and the achieved TFLOP/s per device."""
    workdir, _ = ssl_run
    scalars = logged_scalars(workdir)
    for tag in ("train/loss", "train/embedding_std", "train/pos_accuracy",
                "train/input_wait_fraction", "train/tflops_per_device"):
        # every log_every_steps = 2, and before every checkpoint (checkpoint_every_steps = 3)
        assert set(scalars.get(tag, {})) == {2, 3, 4, 6}, tag
    assert all(0 <= v <= 1 for v in scalars["train/input_wait_fraction"].values())
    assert all(v > 0 for v in scalars["train/tflops_per_device"].values())
    assert "train/mfu" not in scalars  # no known peak for a CPU


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
        data_dir, tmp_path, monkeypatch):
    def poison(batch):
        return dict(batch, sits=np.full_like(batch["sits"], np.nan))

    tamper_with_batches(monkeypatch, at_step=4, action=poison)  # step 5 sees NaN inputs
    with pytest.raises(FloatingPointError, match=r"NaN or inf between steps 4 and 6.*step 3"):
        train.run(tiny_config("ssl_flair2", data_dir), str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    state = saved_state(tmp_path, 3)
    assert state["step"] == 3
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_interrupted_run_resumes_to_exactly_the_same_weights(ssl_run, data_dir, tmp_path, monkeypatch):
    def crash(batch):
        raise Interrupted

    tamper_with_batches(monkeypatch, at_step=4, action=crash)  # dies after the step-3 checkpoint
    config = tiny_config("ssl_flair2", data_dir)
    with pytest.raises(Interrupted):
        train.run(config, str(tmp_path))
    monkeypatch.undo()
    first_config = (tmp_path / "config.json").read_text()
    resumed = train.run(config, str(tmp_path))  # the same command again
    # config.json stays the first start's; the resume's config lies beside it.
    assert (tmp_path / "config.json").read_text() == first_config
    assert json.loads((tmp_path / "config.resume-3.json").read_text()) == json.loads(first_config)

    uninterrupted_dir, uninterrupted = ssl_run
    a, b = saved_state(uninterrupted_dir), saved_state(tmp_path)
    assert int(a["step"]) == int(b["step"]) == 6
    # Same programs on the same devices: bit-identical, not merely close.
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert resumed["probe"] == uninterrupted["probe"]


def test_checkpoint_restores_on_a_different_number_of_devices(ssl_run):
    workdir, _ = ssl_run
    reference = saved_state(workdir)
    checkpoints = ckpt_lib.Checkpoints(str(workdir / "checkpoints"))
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), reference)
    for devices in (jax.devices()[:4], jax.devices()[:1]):
        mesh = sharding.make_mesh(devices=devices)
        target = ckpt_lib.abstract_like(template, sharding.state_shardings(template, mesh))
        state, spec, progress = checkpoints.restore(6, target)
        assert progress["next_step"] == 6 and progress["global_batch_size"] == 16
        leaf = jax.tree.leaves(state)[0]
        assert len(leaf.sharding.device_set) == len(devices)
        for x, y in zip(jax.tree.leaves(reference), jax.tree.leaves(state)):
            np.testing.assert_array_equal(x, np.asarray(y))
    checkpoints.close()


def test_finetuning_loads_exactly_the_pretrained_encoder(ssl_run, data_dir):
    """The fine-tuning task loads the subtrees the SimCLR task declared in its checkpoint."""
    workdir, _ = ssl_run
    assert ckpt_lib.read_input_spec(str(workdir))["transfer"] == {
        "prefix": "backbone", "keys": list(models.ENCODER_KEYS)}
    card = pipeline.load_card(data_dir)
    task, ctx = build_task(tiny_config("finetune_flair2", data_dir, **{"supervised.init_from": str(workdir)}), card)
    shapes = jax.eval_shape(task.init, jax.random.key(0, impl=train.RNG_IMPL))
    # A fresh segmentation state, all zeros, so whatever is not loaded is recognisable.
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    state, report = task.warm_start(state)

    pretrained = saved_state(workdir)
    for tree in ("params", "batch_stats"):
        for key in models.ENCODER_KEYS:
            if key not in pretrained[tree]["backbone"]:
                continue
            loaded = jax.tree.leaves(getattr(state, tree)[key])
            expected = jax.tree.leaves(pretrained[tree]["backbone"][key])
            assert len(loaded) == len(expected) > 0
            for x, y in zip(loaded, expected):
                np.testing.assert_array_equal(np.asarray(x), y)
    new = sorted(set(state.params) - set(models.ENCODER_KEYS))
    assert new == report["new"] == ["aerial_decoder", "aux_head", "seg_head"]
    for key in new:
        assert all(not np.asarray(x).any() for x in jax.tree.leaves(state.params[key]))
    assert all(p.startswith(("['params']['aerial_encoder']", "['params']['utae']", "['params']['fusion']",
                             "['batch_stats']['aerial_encoder']", "['batch_stats']['utae']",
                             "['batch_stats']['fusion']")) for p in report["loaded"])
    assert "projector" not in json.dumps(report)


def test_every_curve_starts_with_an_evaluation_before_the_first_step(ssl_run):
    """The probe of the untrained encoder at step 0 (the floor a pre-training is read against),
    then every probe.every_steps = 3."""
    workdir, _ = ssl_run
    assert set(logged_scalars(workdir)["probe/accuracy"]) == {0, 3, 6}


@pytest.mark.slow
def test_finetuning_from_a_supervised_run_loads_its_encoder(data_dir, tmp_path):
    """The study's oracle: a segmentation run's best checkpoint declares its encoder (no prefix),
    and a fine-tuning run starting from it loads exactly that, decoder and heads new."""
    sup = tmp_path / "sup"
    train.run(tiny_config("sup_flair2", data_dir, num_steps=2, eval_every_steps=2), str(sup))
    assert ckpt_lib.read_input_spec(str(sup / "best"))["transfer"] == {
        "prefix": None, "keys": list(models.ENCODER_KEYS)}
    card = pipeline.load_card(data_dir)
    task, _ = build_task(tiny_config("finetune_flair2", data_dir, **{"supervised.init_from": str(sup / "best")}), card)
    shapes = jax.eval_shape(task.init, jax.random.key(0, impl=train.RNG_IMPL))
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    state, report = task.warm_start(state)
    trained = saved_state(sup, 2, folder="best")
    for key in models.ENCODER_KEYS:
        if key not in trained["params"]:
            continue
        for x, y in zip(jax.tree.leaves(state.params[key]), jax.tree.leaves(trained["params"][key])):
            np.testing.assert_array_equal(np.asarray(x), y)
    assert report["new"] == ["aerial_decoder", "aux_head", "seg_head"]
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(state.params["seg_head"]))


def test_finetuning_refuses_a_checkpoint_made_for_other_bands(ssl_run, data_dir):
    workdir, _ = ssl_run
    card = pipeline.load_card(data_dir)
    spec = ckpt_lib.read_input_spec(str(workdir))
    hameln_like = dict(card, aerial=dict(card["aerial"], bands=["R", "G", "B", "IR"]))
    with pytest.raises(ValueError, match=r"aerial.bands: checkpoint expects \['R', 'G', 'B', 'NIR', "
                                         r"'elevation'\], dataset has \['R', 'G', 'B', 'IR'\]"):
        ckpt_lib.check_input_spec(spec, hameln_like, source=str(workdir), target="hameln")
    other_dates = dict(card, sits=dict(card["sits"], date_encoding="days_since:2021-01-01"))
    with pytest.raises(ValueError, match="date_encoding"):
        ckpt_lib.check_input_spec(spec, other_dates, source=str(workdir), target="x")
    other_stats = dict(card, aerial=dict(card["aerial"], mean=[m + 10 for m in card["aerial"]["mean"]]))
    warnings = ckpt_lib.check_input_spec(spec, other_stats, source=str(workdir), target="x")
    assert any("aerial.mean differs" in w for w in warnings)


def test_adapt_input_kernel_maps_bands_by_name():
    kernel = np.arange(2 * 2 * 3 * 2, dtype=np.float32).reshape(2, 2, 3, 2)  # bands R, G, NIR
    out = np.asarray(supervised.adapt_input_kernel(kernel, ["R", "G", "NIR"], ["NIR", "SWIR", "R"]))
    assert out.shape == (2, 2, 3, 2)
    np.testing.assert_array_equal(out[:, :, 0], kernel[:, :, 2])  # NIR moved first
    np.testing.assert_array_equal(out[:, :, 1], 0.0)              # SWIR is new
    np.testing.assert_array_equal(out[:, :, 2], kernel[:, :, 0])  # R; G dropped
    with pytest.raises(ValueError, match="3 input channels"):
        supervised.adapt_input_kernel(kernel, ["R", "G"], ["R"])


@pytest.mark.slow
@pytest.mark.parametrize("bands", [["R", "G", "B", "NIR"],                        # Hameln's 4
                                   ["elevation", "B", "G", "R", "NIR", "SWIR"]])  # reordered + new
def test_finetuning_adapts_a_checkpoint_to_other_bands_when_asked(ssl_run, data_dir, bands):
    workdir, _ = ssl_run
    card = pipeline.load_card(data_dir)
    other = dict(card, aerial=dict(card["aerial"], bands=bands, mean=[100.0] * len(bands),
                                   std=[50.0] * len(bands)))
    model_cfg = train.model_config_for(tiny_config("finetune_flair2", data_dir).model, other)
    assert model_cfg.aerial_bands == len(bands)
    shapes = models.param_shapes(models.build_model(model_cfg), model_cfg)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    state = tasks.TrainState(step=np.int32(0), params=zeros["params"],
                             batch_stats=zeros["batch_stats"], opt_state={}, rng=np.zeros(2, np.uint32))
    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match="adapt_bands=True"):
        supervised.load_pretrained(state, str(workdir), models.ENCODER_KEYS, other, "other", mesh)

    state, report = supervised.load_pretrained(state, str(workdir), models.ENCODER_KEYS, other,
                                                  "other", mesh, adapt_bands=True)
    flair = ["R", "G", "B", "NIR", "elevation"]
    pretrained = saved_state(workdir)["params"]["backbone"]["aerial_encoder"]["stem_conv"]["kernel"]
    stem = np.asarray(state.params["aerial_encoder"]["stem_conv"]["kernel"])
    for i, band in enumerate(bands):
        expected = pretrained[:, :, flair.index(band)] if band in flair else 0.0
        np.testing.assert_array_equal(stem[:, :, i], expected)
    assert report["adapted_bands"]["aerial"]["kept"] == [b for b in bands if b in flair]
    assert "sits" not in report["adapted_bands"]  # same Sentinel-2 bands: loaded as they are
    # the rest of the encoder is loaded unchanged
    np.testing.assert_array_equal(
        np.asarray(state.params["utae"]["in_conv"]["conv1"]["conv"]["kernel"]),
        saved_state(workdir)["params"]["backbone"]["utae"]["in_conv"]["conv1"]["conv"]["kernel"])
    logits = models.build_model(model_cfg).apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        *models.dummy_inputs(model_cfg, batch=1, num_dates=3), train=False)["logits"]
    assert logits.shape[-1] == 13 and np.isfinite(np.asarray(logits)).all()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exiting(data_dir, tmp_path, monkeypatch):
    import os
    import signal

    def preempt(batch):
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before killing the job
        return batch

    tamper_with_batches(monkeypatch, at_step=3, action=preempt)
    assert train.run(tiny_config("ssl_flair2", data_dir), str(tmp_path)) == {}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "4"]
    assert int(saved_state(tmp_path)["step"]) == 4
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def random_host_batch(card, b: int, with_label: bool, seed: int = 0) -> dict:
    """A host batch of the card's shapes as the pipeline yields it (uint8 aerial, reflectance)."""
    rng = np.random.default_rng(seed)
    t, h, s = int(card["sits"]["max_dates"]), card["aerial"]["size"], card["sits"]["size"]
    ca, cs = len(card["aerial"]["bands"]), len(card["sits"]["bands"])
    host = {"aerial": rng.integers(0, 255, (b, h, h, ca), dtype=np.uint8),
            "sits": rng.normal(1000, 300, (b, t, s, s, cs)).astype(np.float32),
            "dates": np.sort(rng.integers(1, 366, (b, t)), axis=1).astype(np.int32),
            "sits_valid": np.ones((b, t), bool)}
    if with_label:
        host["label"] = rng.integers(0, len(card["classes"]), (b, h, h)).astype(np.int32)
        host["label"][:4] = 255  # some patches entirely unlabelled: micro-batches weigh differently
    return host


# Plain SGD at a constant rate: the update is lr x the gradient, so equal updates mean equal grads.
PLAIN_SGD = {"optimizer.name": "sgd", "optimizer.momentum": 0.0, "optimizer.weight_decay": 0.0,
             "optimizer.learning_rate": 0.1, "schedule.name": "constant"}


@pytest.mark.slow
@pytest.mark.parametrize("negatives", ["all", "same_zone"])
def test_blockwise_and_gradient_cached_nt_xent_make_the_same_update_as_the_plain_one(data_dir, negatives):
    """The SimCLR task's real step on 8 devices with naive, blockwise (on the mesh: each device its
    own anchors' tiles) and gradient-cached (one chunk: the same batch-norm statistics) NT-Xent:
    same loss, same new weights, with every negative or the same-zone ones (3 zones straddling the
    devices' rows). The SITS-only variant keeps the compiles short; the loss path is
    what differs. fp32 sums of 32 logits in another order: rtol 1e-5 on the loss; 1e-4 on weights
    after one update (gradients pass through the whole network's float32 backward)."""
    card = pipeline.load_card(data_dir)
    mesh = sharding.make_mesh()
    host = random_host_batch(card, 16, with_label=False)
    if negatives == "same_zone":
        host["zone"] = np.array([0, 0, 0, 1, 1, 2, 0, 2, 2, 2, 1, 0, 1, 1, 0, 2], np.int32)
    batch = sharding.host_batch_to_global(host, mesh)
    results = {}
    for impl in ("naive", "blockwise", "gradcache"):
        config = tiny_config("ssl_flair2", data_dir, **PLAIN_SGD, **{
            "model.variant": "utae", "simclr.loss_impl": impl, "simclr.num_chunks": 1,
            "simclr.block_size": 8, "simclr.negatives": negatives})
        task, _ = build_task(config, card, mesh)
        state = sharding.init_sharded(task.init, mesh, jax.random.key(0, impl=train.RNG_IMPL))
        step = train.jit_train_step(task, state, mesh)
        new_state, metrics = step(state, batch)
        results[impl] = (float(metrics.compute()["loss"]), jax.tree.map(np.asarray, new_state.params))

    loss, params = results["naive"]
    assert np.isfinite(loss) and loss > 0
    for impl in ("blockwise", "gradcache"):
        other_loss, other_params = results[impl]
        np.testing.assert_allclose(other_loss, loss, rtol=1e-5)
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(other_params)):
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def zones_of_training_batches(monkeypatch) -> list:
    """The `zone` index [b] of every training batch the trainer reads from now on, in order."""
    zones_read = []
    real = pipeline.make_train_iterator

    def recording(*args, **kwargs):
        for batch in real(*args, **kwargs):
            zones_read.append(batch["zone"])
            yield batch

    monkeypatch.setattr(pipeline, "make_train_iterator", recording)
    return zones_read


def test_same_zone_negatives_read_the_batch_zone_and_a_tiny_run_trains(data_dir, tmp_path, monkeypatch):
    """simclr.negatives='same_zone': the zone index crosses to the devices (with 'all' it stays on
    the host) and shapes the loss: one zone in the batch gives the plain loss, four zones a lower
    one (6 negatives per anchor instead of 30). A tiny run with it reads the dataset's zones and
    trains."""
    card = pipeline.load_card(data_dir)
    mesh = sharding.make_mesh()
    host = random_host_batch(card, 16, with_label=False)
    first_loss = []
    for negatives, zone in (("all", None), ("same_zone", np.zeros(16, np.int32)),
                            ("same_zone", np.arange(16, dtype=np.int32) % 4)):
        config = tiny_config("ssl_flair2", data_dir, **{"model.variant": "utae", "simclr.negatives": negatives})
        task, _ = build_task(config, card, mesh)
        assert ("zone" in task.batch_keys) == (negatives == "same_zone")
        batch = host if zone is None else dict(host, zone=zone)
        state = sharding.init_sharded(task.init, mesh, jax.random.key(0, impl=train.RNG_IMPL))
        _, metrics = train.jit_train_step(task, state, mesh)(state, sharding.host_batch_to_global(batch, mesh))
        first_loss.append(float(metrics.compute()["loss"]))
    plain, one_zone, four_zones = first_loss
    np.testing.assert_allclose(one_zone, plain, rtol=1e-6)
    assert four_zones < plain - 0.5

    zones_read = zones_of_training_batches(monkeypatch)
    config = tiny_config("ssl_flair2", data_dir, **{"simclr.negatives": "same_zone"})
    results = train.run(config, str(tmp_path))
    assert results["step"] == 6
    names = pipeline.zone_names(card, config.split)
    assert len(zones_read) >= 6 and all(set(z.tolist()) <= set(range(len(names))) for z in zones_read)
    assert len(set(np.concatenate(zones_read).tolist())) > 1
    with pytest.raises(UserError, match="simclr.negatives must be 'all' or 'same_zone', found 'same'"):
        build_task(tiny_config("ssl_flair2", data_dir, **{"simclr.negatives": "same"}), card, mesh)
    no_zones = {**card, "splits": {**card["splits"], config.split: {
        k: v for k, v in card["splits"][config.split].items() if k != "zones"}}}
    with pytest.raises(UserError, match=f"needs the zones of split '{config.split}', which {data_dir}"):
        build_task(config, no_zones, mesh)



@pytest.mark.slow
def test_zone_grouped_batches_train_with_same_zone_negatives_and_resume_only_as_they_were(
        data_dir, tmp_path, monkeypatch):
    """--config.zones_per_batch=2 --config.input=native: every batch the run reads is two chunks of
    one zone each (more same-zone negatives per anchor), it trains, and its checkpoints refuse a
    resume in the every-zone order, which would not continue its data order."""
    zones_read = zones_of_training_batches(monkeypatch)
    config = tiny_config("ssl_flair2", data_dir, **{"simclr.negatives": "same_zone", "batch_size": 8,
                                                      "input": "native", "zones_per_batch": 2})
    assert train.run(config, str(tmp_path))["step"] == 6
    assert len(zones_read) >= 6
    for zones in zones_read:
        chunks = zones.reshape(2, 4)
        assert (chunks == chunks[:, :1]).all(), zones
    config.zones_per_batch = 0
    with pytest.raises(UserError, match=r"exactly: the data order depends on \{'zones_per_batch': \(2, 0\)\}"):
        train.run(config, str(tmp_path))


@pytest.mark.slow
def test_supervised_step_accumulates_micro_batches_and_linear_mode_freezes_the_encoder(
        ssl_run, data_dir):
    """The supervised task's real step on 8 devices (SITS-only variant, no dropout, to keep compiles
    short): 2 accumulated micro-batches make the whole batch's update, and the linear finetune_mode
    leaves every weight the pre-training declared untouched. U-TAE's decoder and L-TAE MLP use batch
    norm, whose statistics are per micro-batch, so deep-layer gradients differ and only the head's
    update is compared (within 5%; a mis-scaled accumulation is off by 50-100%). Exact accumulation
    of the weighted cross-entropy itself is tests/test_gradcache.py."""
    workdir, _ = ssl_run
    card = pipeline.load_card(data_dir)
    mesh = sharding.make_mesh()
    batch = sharding.host_batch_to_global(random_host_batch(card, 16, with_label=True), mesh)
    # Dropout off: a micro-batch draws its own dropout masks, the whole batch another set.
    overrides = {"model.variant": "utae", "model.ltae_dropout": 0.0, "model.attn_dropout": 0.0,
                 "supervised.class_weights": "none", "supervised.init_from": str(workdir), **PLAIN_SGD}
    results = {}
    for mode, accum in (("full", 1), ("full", 2), ("linear", 1)):
        config = tiny_config("finetune_flair2", data_dir, **overrides, **{
            "supervised.finetune_mode": mode, "supervised.grad_accum_steps": accum})
        task, _ = build_task(config, card, mesh)
        state = sharding.init_sharded(task.init, mesh, jax.random.key(0, impl=train.RNG_IMPL))
        before = jax.tree.map(np.asarray, state.params)
        new_state, metrics = train.jit_train_step(task, state, mesh)(state, batch)
        results[mode, accum] = (float(metrics.compute()["loss"]),
                                jax.tree.map(np.asarray, new_state.params))

    keys = [k for k in models.ENCODER_KEYS if k in before]
    assert keys == ["utae"]
    loss, params = results["full", 1]
    assert np.isfinite(loss) and loss > 0
    accum_loss, accum_params = results["full", 2]
    np.testing.assert_allclose(accum_loss, loss, rtol=2e-3)
    heads = sorted(set(before) - set(keys))
    assert heads, "the SITS-only model has a head outside its encoder"

    def head_update(new):
        return np.concatenate([(new[k][n] - before[k][n]).ravel() for k in heads for n in before[k]])

    update, accum_update = head_update(params), head_update(accum_params)
    assert np.linalg.norm(update) > 0
    assert np.linalg.norm(accum_update - update) < 0.05 * np.linalg.norm(update)

    _, linear = results["linear", 1]
    for key in keys:
        for x, y in zip(jax.tree.leaves(before[key]), jax.tree.leaves(linear[key])):
            np.testing.assert_array_equal(y, x)
    assert any(not np.array_equal(x, y) for key in heads
               for x, y in zip(jax.tree.leaves(before[key]), jax.tree.leaves(linear[key])))


def test_resume_refuses_another_model_or_dataset_naming_what_differs(ssl_run, data_dir, tmp_path):
    import shutil

    from lcssl.errors import UserError

    workdir = tmp_path / "run"
    shutil.copytree(ssl_run[0], workdir)
    config = tiny_config("ssl_flair2", data_dir, num_steps=8, **{"model.stem_width": 4})
    with pytest.raises(UserError, match=r"Cannot resume .* \(step 6\).*\n  model.stem_width: "
                                        r"checkpoint 8, now 4\n"):
        train.run(config, str(workdir))
    rebuilt = tmp_path / "data"
    shutil.copytree(data_dir, rebuilt)
    card = json.loads((rebuilt / "dataset_card.json").read_text())
    card["build_options"]["seed"] = card["build_options"].get("seed", 0) + 1  # another zone split
    (rebuilt / "dataset_card.json").write_text(json.dumps(schema.seal_card(card)))  # as a rebuild seals it
    with pytest.raises(UserError, match=r"\n  dataset card \(dataset_card.json"):
        train.run(tiny_config("ssl_flair2", str(rebuilt), num_steps=8), str(workdir))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]


@pytest.mark.slow
def test_best_checkpoint_is_never_saved_from_a_non_finite_state(data_dir, tmp_path, monkeypatch):
    """Evaluation (and best/) every step, the loss checked only every 100: the state check before
    each save stops the run at the first non-finite state, before best/ could take it."""
    def poison(batch):
        return dict(batch, sits=np.full_like(batch["sits"], np.nan))

    tamper_with_batches(monkeypatch, at_step=1, action=poison)  # step 2 makes NaN weights
    # SITS-only variant without dropout: the smallest supervised programs to compile.
    config = tiny_config("sup_flair2", data_dir, num_steps=3, eval_every_steps=1,
                         log_every_steps=100, checkpoint_every_steps=100,
                         **{"model.variant": "utae", "model.ltae_dropout": 0.0,
                            "model.attn_dropout": 0.0})
    with pytest.raises(FloatingPointError, match="at step 2: the parameters"):
        train.run(config, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "best").iterdir() if p.name.isdigit()) == ["1"]
    best = saved_state(tmp_path, 1, folder="best")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(best["params"]))


def test_profile_steps_write_a_trace_of_the_steps_after_warm_up(tmp_path):
    from clu import metric_writers

    config = ml_collections.ConfigDict({"log_every_steps": 100, "profile_steps": 2})
    writer = metric_writers.LoggingWriter()
    hooks = train.loop_hooks(config, str(tmp_path), writer, num_steps=20, start_step=3)
    step_fn = jax.jit(lambda x: x * 2.0)
    x = jnp.ones(4)
    for step in range(4, 17):
        x = step_fn(x)
        for hook in hooks:
            hook(step)
        if step < 13:  # the trace starts at start_step + 10
            assert not list(tmp_path.rglob("*.xplane.pb"))
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))
    config.profile_steps = 0
    assert len(train.loop_hooks(config, str(tmp_path), writer, 20, 0)) == 1


def test_early_stop_counts_evaluations_without_improvement_and_survives_a_resume():
    from lcssl.train import EarlyStop

    stop = EarlyStop("val/miou", patience=2, min_delta=0.01)
    assert not stop.update({"val/miou": 0.30})
    assert not stop.update({"val/miou": 0.305})     # not better by more than min_delta
    assert not stop.update({"other": 1.0})           # evaluations without the metric don't count
    resumed = EarlyStop("val/miou", patience=2, min_delta=0.01)
    resumed.load(json.loads(json.dumps(stop.state())))  # as the checkpoint's JSON holds it
    assert resumed.update({"val/miou": 0.31}) and resumed.stopped  # 2nd evaluation without a gain
    assert "0.3000" in resumed.reason and resumed.summary()["stopped"]
    assert not EarlyStop("val/miou", patience=0, min_delta=0.0).update({"val/miou": 0.0})
    keeps_going = EarlyStop("val/miou", patience=2, min_delta=0.0)
    assert not any(keeps_going.update({"val/miou": v}) for v in (0.1, 0.2, 0.15, 0.3, 0.25))
