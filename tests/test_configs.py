"""Configs are code: every experiment loads, presets reproduce the seminar's table, command-line
overrides work and a typo fails loudly."""
import importlib

import pytest
from absl import flags
from ml_collections import config_flags

from lcssl import configs, tasks
from tests._train_helpers import ROOT

EXPERIMENTS = ["ssl_flair2", "ssl_hameln", "finetune_flair2", "finetune_hameln", "sup_flair2",
               "sup_hameln", "ssl_flair_hub", "finetune_flair_hub", "sup_flair_hub"]


def test_every_layout_has_its_three_experiments():
    from data_prep import layouts

    for name in layouts.NAMES:
        for kind in ("sup", "ssl", "finetune"):
            assert load(f"{kind}_{name}").dataset == name
    assert load("ssl_hameln").split == "unlabelled" and load("ssl_flair_hub").split == "train"


def load(name, arg=None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def parse(*argv):
    """What `python -m lcssl.main` does with its flags."""
    fv = flags.FlagValues()
    argv = ["lcssl.main", *argv]
    config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_has_a_locked_default_and_a_tiny_preset(name):
    for config in (load(name), load(name, "tiny")):
        assert config.is_locked
        assert config.task in tasks.NAMES
    assert f"configs/{name}.py" in importlib.import_module(f"configs.{name}").__doc__


@pytest.mark.parametrize("name, preset, epochs, batch, temperature", [
    ("ssl_flair2", "ssl1", 30, 16, 0.1), ("finetune_flair2", "ssl1", 5, 16, None),
    ("ssl_hameln", "ssl2", 40, 16, 0.1), ("finetune_hameln", "ssl2", 20, 16, None),
    ("ssl_hameln", "ssl3", 40, 8, 0.7), ("finetune_hameln", "ssl3", 20, 8, None),
    ("sup_flair2", "seed", 30, 16, None), ("sup_hameln", "seed", 50, 16, None),
])
def test_seed_presets_are_the_seminar_table(name, preset, epochs, batch, temperature):
    c = load(name, preset)
    assert (c.num_epochs, c.batch_size, c.num_steps) == (epochs, batch, None)
    assert (c.optimizer.name, c.optimizer.learning_rate, c.schedule.name) == ("sgd", 0.001, "constant")
    if temperature is not None:
        assert c.simclr.temperature == temperature


def test_modern_ssl_default_is_large_batch_lars_with_warmup_and_cosine():
    c = load("ssl_hameln")
    assert c.batch_size >= 256 and c.optimizer.name == "lars"
    assert c.schedule.name == "cosine" and c.schedule.warmup_epochs > 0
    assert 0.1 <= c.simclr.temperature <= 0.2
    assert c.split == "unlabelled"


def test_finetune_configs_point_at_their_pretraining_run():
    assert load("finetune_hameln").supervised.init_from == "runs/ssl_hameln"
    assert load("sup_hameln").supervised.init_from is None


def test_supervised_settings_live_under_supervised_and_their_old_flags_name_the_new_ones():
    c = parse(f"--config={ROOT}/configs/finetune_flair2.py:tiny", "--config.supervised.finetune_mode=linear",
              "--config.supervised.grad_accum_steps=2")
    assert (c.supervised.finetune_mode, c.supervised.grad_accum_steps) == ("linear", 2)
    assert not set(configs.MOVED) & set(c.keys())  # none is left at the top level
    assert {f"supervised.{name}" for name in c.supervised.keys()} == set(configs.MOVED.values())
    assert configs.moved_flag("--config.class_weights=none") == (
        "--config.class_weights is now --config.supervised.class_weights (supervised settings moved "
        "under config.supervised)")
    assert configs.moved_flag("--config.init_encoder_from").startswith("--config.init_encoder_from is now")
    for other in ("--config.supervised.init_from=x", "--config.seed=1", "--init_from=x", "--config.label_seed=1"):
        assert configs.moved_flag(other) is None


def test_command_line_overrides_reach_nested_fields():
    c = parse(f"--config={ROOT}/configs/ssl_hameln.py:ssl3", "--config.batch_size=512",
              "--config.simclr.temperature=0.2", "--config.simclr.loss_impl=blockwise")
    assert (c.batch_size, c.simclr.temperature, c.simclr.loss_impl) == (512, 0.2, "blockwise")
    assert c.num_epochs == 40  # the rest of the ssl3 preset stays


def test_a_typo_in_an_override_fails_loudly():
    with pytest.raises(AttributeError, match='temprature.*Did you mean "temperature"'):
        parse(f"--config={ROOT}/configs/ssl_hameln.py", "--config.simclr.temprature=0.2")
    c = load("ssl_hameln")
    with pytest.raises(AttributeError):
        c.simclr.temprature = 0.2


def test_a_wrong_type_in_an_override_fails():
    with pytest.raises(flags.IllegalFlagValueError, match="config.batch_size=lots"):
        parse(f"--config={ROOT}/configs/ssl_hameln.py", "--config.batch_size=lots")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="ssl2"):
        load("ssl_hameln", "ssl4")


def test_presets_combine_left_to_right_and_dtype_reaches_the_model():
    c = load("ssl_hameln", "ssl3,tiny")
    assert c.batch_size == 16 and c.simclr.temperature == 0.7 and c.model.widths[0] == 8
    c = parse(f"--config={ROOT}/configs/sup_flair2.py", "--config.dtype=bfloat16")
    assert c.model.dtype == "bfloat16"


def test_ssl_learning_rate_follows_the_batch_size_from_the_command_line():
    """SimCLR's rule, lr = 0.3 x batch / 256, holds for the batch the user asks for; an explicit
    learning rate replaces the rule; the seminar presets keep their constant 0.001."""
    assert load("ssl_hameln").optimizer.learning_rate == pytest.approx(0.3)
    c = parse(f"--config={ROOT}/configs/ssl_hameln.py", "--config.batch_size=4096")
    assert c.optimizer.learning_rate == pytest.approx(4.8)
    c = parse(f"--config={ROOT}/configs/ssl_hameln.py", "--config.batch_size=4096",
              "--config.optimizer.learning_rate=1.5")
    assert (c.batch_size, c.optimizer.learning_rate) == (4096, 1.5)
    c = parse(f"--config={ROOT}/configs/ssl_hameln.py:ssl3", "--config.batch_size=64")
    assert c.optimizer.learning_rate == 0.001
    assert parse(f"--config={ROOT}/configs/ssl_flair2.py",
                 "--config.batch_size=512").to_dict()["optimizer"]["learning_rate"] == pytest.approx(0.6)


def test_the_learning_rate_rule_survives_the_tiny_preset():
    """A tiny pre-training arm labelled 'lr 0.3 x batch / 256' runs at that rate (the preset sets
    a learning rate for supervised runs only), for every objective; a warm-up given in steps wins
    over one in epochs."""
    for task in ("simclr", "vicreg", "byol"):
        c = parse(f"--config={ROOT}/configs/ssl_hameln.py:tiny", "--config.batch_size=128",
                  f"--config.task={task}")
        assert (c.optimizer.name, c.optimizer.learning_rate) == ("lars", pytest.approx(0.15)), task
    assert load("sup_hameln", "tiny").optimizer.learning_rate == 0.05
    from lcssl import train

    c = parse(f"--config={ROOT}/configs/finetune_hameln.py:tiny", "--config.schedule.warmup_steps=20",
              "--config.schedule.warmup_epochs=5.0", "--config.optimizer.learning_rate=0.1")
    lr = train.learning_rate_schedule(c, num_steps=100, steps_per_epoch=1)
    assert float(lr(10)) == pytest.approx(0.05) and float(lr(20)) == pytest.approx(0.1)


def test_the_task_is_a_config_field_and_every_task_has_its_own_subtree():
    """`--config.task` swaps the objective of a pre-training config; each task's hyperparameters
    live under its own name (and the probe of every pre-training task under `probe`)."""
    c = parse(f"--config={ROOT}/configs/ssl_hameln.py", "--config.task=simclr",
              "--config.simclr.temperature=0.3", "--config.probe.every_steps=7")
    assert (c.task, c.simclr.temperature, c.probe.every_steps) == ("simclr", 0.3, 7)
    assert load("sup_hameln").task == "supervised" and load("finetune_flair2").task == "supervised"
    supervised = load("sup_flair2")  # every task's subtree is there, at its defaults
    for name in tasks.NAMES:
        assert supervised[name].to_dict() == tasks.get(name).default_config().to_dict()
    with pytest.raises(Exception, match="temprature"):
        parse(f"--config={ROOT}/configs/ssl_hameln.py", "--config.simclr.temprature=0.2")


def test_an_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match=r"config.task='simclear' is not a task; known: .*simclr"):
        tasks.get("simclear")
