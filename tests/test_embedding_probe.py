"""bench/embedding_probe.py on the tiny synthetic dataset: a BYOL pre-training checkpoint and a
supervised one as the trainer writes them (fresh weights: the probe's plumbing is tested, not what
a trained encoder encodes), and the random baseline, give one row per modality with accuracies in
[0, 1] and the zone chance 1 / training zones; a missing run or dataset is one clear error."""
import importlib.util
import sys

import jax
import numpy as np
import pytest

from lcssl import checkpoint as ckpt_lib
from lcssl import sharding, train
from lcssl.data import pipeline
from lcssl.errors import UserError
from tests._train_helpers import ROOT, build_task, compilation_cache, tiny_config, tiny_dataset


_spec = importlib.util.spec_from_file_location("embedding_probe", ROOT / "bench" / "embedding_probe.py")
probe = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = probe  # its dataclasses look their module up there
_spec.loader.exec_module(probe)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    compilation_cache(tmp_path_factory)
    return tiny_dataset(tmp_path_factory)


def fresh_run(data_dir, workdir, module: str, **overrides) -> str:
    """A run's checkpoint as train.run writes it (its task's state, the input spec naming the
    subtrees fine-tuning loads), with random weights drawn in numpy: no program to compile."""
    config = tiny_config(module, data_dir, **overrides)
    card, mesh = pipeline.load_card(data_dir), sharding.make_mesh()
    task, ctx = build_task(config, card, mesh)
    shapes = jax.eval_shape(task.init, jax.random.key(0, impl=train.RNG_IMPL))
    rng = np.random.default_rng(0)
    draw = lambda scale, low: lambda x: (low + scale * rng.random(x.shape)).astype(x.dtype)
    state = shapes.replace(
        params=jax.tree.map(draw(0.2, -0.1), shapes.params),
        batch_stats=jax.tree.map(draw(1.0, 0.5), shapes.batch_stats),  # variances > 0
        task_state=jax.tree.map(draw(0.2, -0.1), shapes.task_state),
        opt_state=jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes.opt_state),
        step=np.int32(1), rng=np.zeros(shapes.rng.shape, shapes.rng.dtype))
    spec = ckpt_lib.input_spec(card, ctx.model_cfg.to_dict())
    spec["transfer"] = {"prefix": task.transfer_prefix, "keys": list(task.transfer_keys)}
    ckpts = ckpt_lib.Checkpoints(str(workdir / "checkpoints"))
    ckpts.save(1, state, spec, {"next_step": 1}, force=True)
    ckpts.close()
    return str(workdir)


def test_probe_table_of_a_pretrained_a_supervised_and_a_random_encoder(data_dir, tmp_path, capsys):
    byol = fresh_run(data_dir, tmp_path / "byol" / "seed0" / "pretrain", "ssl_flair2", task="byol")
    sup = fresh_run(data_dir, tmp_path / "sup" / "seed0" / "frac1", "sup_flair2")
    out = tmp_path / "probe.json"
    result = probe.main([f"--data_dir={data_dir}", f"--checkpoints={byol},{sup}", "--random",
                         "--batch_size=8", "--folds=3", f"--out={out}"])

    modalities = ["aerial", "sits", "aerial+sits", "fused"]
    assert [(r["checkpoint"], r["modality"]) for r in result["rows"]] == [
        (name, m) for name in ("byol/seed0/pretrain", "sup/seed0/frac1", "random init (seed 0)")
        for m in modalities]
    train_zones = pipeline.load_card(data_dir)["splits"]["train"]["zones"]
    assert result["train_zones"] == sorted(train_zones)
    for row in result["rows"]:
        assert 0 <= row["class_probe"]["accuracy"] <= 1 and 0 <= row["class_probe"]["baseline_accuracy"] <= 1
        assert 0 <= row["zone_probe"]["accuracy"] <= 1
        assert row["zone_probe"]["chance"] == pytest.approx(1 / len(train_zones))
        assert row["zone_probe"]["num_examples"] == result["num_train"]
    loaded = {r["checkpoint"]: (r["prefix"], r["loaded"]) for r in result["rows"]}
    assert loaded["byol/seed0/pretrain"] == ("backbone", ["aerial_encoder", "utae", "fusion"])
    assert loaded["sup/seed0/frac1"] == (None, ["aerial_encoder", "utae", "fusion"])

    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table[0] == "| checkpoint | modality | class acc (baseline) | zone acc (chance) |"
    assert table[1] == "|---|---|---|---|" and len(table) == 2 + len(result["rows"])
    assert all(line.startswith("| ") and line.count("|") == 5 for line in table[2:])
    assert out.is_file() and list(tmp_path.glob(".*probe.json*")) == []


def test_a_missing_run_or_dataset_is_one_clear_error(data_dir, tmp_path):
    with pytest.raises(UserError, match="--data_dir=.*no such directory"):
        probe.main([f"--data_dir={tmp_path / 'nowhere'}", f"--checkpoints={tmp_path}"])
    with pytest.raises(UserError, match="--checkpoints: .*not a directory"):
        probe.main([f"--data_dir={data_dir}", f"--checkpoints={tmp_path / 'nowhere'}"])
    with pytest.raises(UserError, match="--checkpoints: no checkpoint under"):
        probe.main([f"--data_dir={data_dir}", f"--checkpoints={tmp_path}", "--batch_size=8"])
