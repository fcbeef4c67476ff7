"""What a pre-trained encoder's pooled embedding encodes: the land-cover class, or the zone.

The patches of one zone share their acquisition (flight, sun, season, sensor gain, haze, the
Sentinel-2 scenes): radiometry that says nothing about land cover. An encoder whose embedding tells
the zones apart far better than the classes has learnt that nuisance. Zones also differ in their
mix of land cover, so a zone accuracy above chance is not all nuisance: compare it with the
oracle's (an encoder trained with every label) and a random encoder's.

For each run in --checkpoints (a pre-training workdir of lcssl.main, or a supervised one, whose
encoder is the study's oracle) the encoder is exactly what fine-tuning from it loads
(lcssl.tasks.supervised with init_from: the subtrees its input spec declares, from the latest step
of its checkpoints/, checked against the model and the dataset; an encoder subtree it does not
declare, a crossmodal run's fusion, freshly initialised as fine-tuning does). With --random, the
first checkpoint's model config freshly initialised is the baseline. Every example of the train and test
splits goes once through the encoder in eval mode (batch-norm statistics, no dropout); the pooled
features probed are
    aerial       the aerial encoder's deepest map, average-pooled (before any fusion)
    sits         the U-TAE map, average-pooled
    aerial+sits  the two side by side
    fused        the model's own 'embedding' (the fused deepest aerial map, pooled): U-T&T only
and for each a ridge linear probe (lcssl.evaluate.linear_probe, ridge chosen among
config.probe.ridge_candidates by cross-validation on the probe's own training rows):
    class   each labelled patch's majority class, fit on the train split, accuracy on --eval_split,
            against always guessing the commonest training class (the online probe's question)
    zone    which training zone a train patch comes from (every patch of the split, labelled or
            not): --folds cross-validated accuracy, folds stratified by zone and shuffled with
            --seed, against chance 1 / number of zones
Prints a markdown table and writes JSON (--out). Reads the shards with the native reader (no
TensorFlow); runs on whatever JAX finds (a CPU is enough at the study's 32 px).

    .venv/bin/python bench/embedding_probe.py --data_dir=/work/study/runs/study/data/built \\
        --checkpoints=RUNS/byol/seed0/pretrain,RUNS/scratch_utt/seed0/frac1 --random \\
        --out=/tmp/embedding_probe.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lcssl.errors import MissingInputError, UserError  # noqa: E402 -- after the path

# The eval reader's interleave of the shards: passed to it, and used to read each record's zone in
# the same order (its host batches carry no string field).
CYCLE_LENGTH = 8
# Probed features: name -> the keys of UTT.encode's output they are made of.
MODALITIES = {"aerial": ("aerial_embedding",), "sits": ("sits_embedding",),
              "aerial+sits": ("aerial_embedding", "sits_embedding"), "fused": ("embedding",)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", "--data-dir", required=True,
                   help="a built dataset (dataset_card.json and its TFRecord shards)")
    p.add_argument("--checkpoints", default="",
                   help="comma-separated run workdirs (pre-training or supervised runs of lcssl.main)")
    p.add_argument("--random", action="store_true",
                   help="add a freshly initialised encoder of the first checkpoint's model config")
    p.add_argument("--train_split", default="train")
    p.add_argument("--eval_split", default="test", help="where the class probe is scored")
    p.add_argument("--folds", type=int, default=5, help="zone probe: cross-validation folds")
    p.add_argument("--seed", type=int, default=0, help="random encoder's init and the zone folds")
    p.add_argument("--batch_size", type=int, default=64, help="examples per forward, all devices")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    args.checkpoints = [c for c in args.checkpoints.split(",") if c]
    if not args.checkpoints:
        p.error("give at least one run in --checkpoints (--random takes its model config)")
    return args


# ------------------------------------------------------------------------------------------------
# Data: host batches of a split and the zone of each example, in the same order
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Split:
    batches: list        # native eval host batches (padded rows: example_valid False)
    zones: np.ndarray    # [N] str, zone of each valid row in batch order


def read_split(data_dir, card, split: str, batch_size: int) -> Split:
    """The split once in the eval reader's order; zones read by the same reader's record decoding,
    in its interleave order, and checked row by row against the batches' aerial images."""
    from lcssl.data import native, records, schema

    if split not in card["splits"] or not card["splits"][split]["num_examples"]:
        raise UserError(f"{data_dir}/dataset_card.json: no examples in split {split!r} (splits: "
                        f"{ {k: v['num_examples'] for k, v in card['splits'].items()} }); choose "
                        "--train_split / --eval_split among those")
    batches = list(native.make_eval_iterator(data_dir, split, global_batch_size=batch_size,
                                             cycle_length=CYCLE_LENGTH))
    shards, shapes = native.Shards(data_dir, card, split), records.record_shapes(card)
    order = native.interleave_order(shards.counts, min(CYCLE_LENGTH, len(shards.counts)))
    aerial = np.concatenate([b["aerial"][b["example_valid"]] for b in batches])
    zones = []
    for row, i in enumerate(order):
        record = shards.decode(int(i), shapes)
        if not np.array_equal(record["aerial"], aerial[row]):
            raise RuntimeError(f"{split}: row {row} of the eval batches is not record {i} of the "
                               "interleave order; native.make_eval_iterator's order changed")
        # A zone of a domain, as the card names its split zones (FLAIR #2 reuses zone names).
        zones.append(schema.zone_key(record["domain"].decode(), record["zone"].decode()))
    shards.close()
    listed = card["splits"][split].get("zones")
    if listed is not None and set(zones) != set(listed):
        raise RuntimeError(f"{split}: the records' zones {sorted(set(zones))} are not the card's "
                           f"{sorted(listed)}")
    return Split(batches, np.asarray(zones))


# ------------------------------------------------------------------------------------------------
# Encoders: what fine-tuning loads, or a fresh one
# ------------------------------------------------------------------------------------------------

def _config_key(model_cfg) -> str:
    import json

    return json.dumps(model_cfg.to_dict(), sort_keys=True)


@dataclasses.dataclass
class Setup:
    """What every encoder is probed with: the dataset, the devices, both splits, the options, and
    what is compiled once per model config (a fresh encoder's init, the embedding step)."""
    card: dict
    mesh: object
    stats: object                # normalize.NormStats of the card: how fine-tuning standardises
    train: Split
    held_out: Split
    args: argparse.Namespace
    _fresh: dict = dataclasses.field(default_factory=dict)
    _steps: dict = dataclasses.field(default_factory=dict)
    _widths: dict = dataclasses.field(default_factory=dict)

    @property
    def num_dates(self) -> int:
        return int(self.card["sits"]["max_dates"])

    def fresh_encoder(self, model_cfg) -> dict:
        """{'params', 'batch_stats'} of the encoder subtrees as the model initialises them (seed
        --seed), replicated on the mesh."""
        import jax

        from lcssl import models, sharding
        from lcssl.tasks import base

        key = _config_key(model_cfg)
        if key not in self._fresh:
            model = models.build_model(model_cfg)
            dummy = models.dummy_inputs(model_cfg, batch=2, num_dates=self.num_dates)
            rng = jax.random.key(self.args.seed, impl=base.RNG_IMPL)
            # encode only: the decoder and heads are not probed, and compiling their init is most
            # of the init's time on a CPU
            variables = jax.jit(lambda r: model.init({"params": r, "dropout": r}, *dummy,
                                                      train=False, method=models.UTT.encode))(rng)
            self._fresh[key] = jax.device_put(
                {c: dict(variables.get(c, {})) for c in ("params", "batch_stats")},
                sharding.replicated(self.mesh))
        return self._fresh[key]

    def encode_keys(self, model_cfg) -> dict:
        key = _config_key(model_cfg)
        if key not in self._widths:
            self._widths[key] = encode_keys(model_cfg)
        return self._widths[key]

    def embed_step(self, model_cfg, keys: tuple):
        import jax

        from lcssl import evaluate, models

        key = (_config_key(model_cfg), keys)
        if key not in self._steps:
            self._steps[key] = jax.jit(functools.partial(
                evaluate.embed_step, model=_Pooled(models.build_model(model_cfg), keys),
                stats=self.stats, num_classes=len(self.card["classes"])))
        return self._steps[key]


@dataclasses.dataclass
class Encoder:
    name: str
    model_cfg: object        # ml_collections.ConfigDict of the segmentation model (UTT)
    variables: dict          # {'params', 'batch_stats'} of the encoder subtrees, on the mesh
    info: dict               # JSON-ready: path, step, prefix, loaded and fresh subtrees


def _model_config(spec: dict):
    """The segmentation model's config of a checkpoint's input spec (its SSL heads left out)."""
    import ml_collections

    cfg = ml_collections.ConfigDict({k: v for k, v in spec["model"].items() if k != "projector"})
    cfg.dtype = "float32"  # the weights are float32 whatever the run computed in
    return cfg


def load_run(path: str, setup: Setup) -> Encoder:
    """The encoder a fine-tuning run with --config.supervised.init_from=`path` starts from: the
    subtrees the run declared (supervised.declared_transfer), read and checked against the model
    and the dataset by supervised.load_pretrained; an encoder subtree it does not declare (a
    crossmodal run's fusion) fresh, as fine-tuning initialises it."""
    import jax
    import optax

    from lcssl import checkpoint as ckpt_lib
    from lcssl import models
    from lcssl.tasks import base, supervised

    try:
        ckpt_lib.resolve_checkpoint_dir(path)
    except MissingInputError:
        raise MissingInputError(
            f"--checkpoints: no checkpoint under {path!r} (looked for numbered step folders in "
            f"{path}/checkpoints and {path}); give the workdir of a pre-training or supervised run "
            "of lcssl.main") from None
    model_cfg = _model_config(ckpt_lib.read_input_spec(path))
    keys, prefix = supervised.declared_transfer(path, models.encoder_keys(model_cfg))
    # The fine-tuning model's state as shapes only: what load_pretrained checks the subtrees against.
    init = base.state_init(models.build_model(model_cfg), model_cfg, setup.num_dates,
                           optax.identity(), setup.args.seed)
    abstract = jax.eval_shape(init, jax.random.key(setup.args.seed, impl=base.RNG_IMPL))
    state, report = supervised.load_pretrained(abstract, path, keys, setup.card,
                                               str(setup.args.data_dir), setup.mesh, prefix=prefix)
    encoder = models.encoder_keys(model_cfg)
    fresh = [k for k in encoder if k not in keys]
    variables = {c: {k: getattr(state, c)[k] for k in encoder if k in keys and k in getattr(state, c)}
                 for c in ("params", "batch_stats")}
    if fresh:
        for c, tree in setup.fresh_encoder(model_cfg).items():
            variables[c].update({k: tree[k] for k in fresh if k in tree})
    name = "/".join(pathlib.Path(path).resolve().parts[-3:])
    return Encoder(name, model_cfg, variables,
                   {"path": os.path.abspath(path), "step": report["step"], "prefix": prefix,
                    "loaded": list(keys), "fresh": fresh})


def random_encoder(model_cfg, setup: Setup) -> Encoder:
    from lcssl import models

    return Encoder(f"random init (seed {setup.args.seed})", model_cfg, setup.fresh_encoder(model_cfg),
                   {"path": None, "step": 0, "prefix": None, "loaded": [],
                    "fresh": list(models.encoder_keys(model_cfg))})


# ------------------------------------------------------------------------------------------------
# Embeddings
# ------------------------------------------------------------------------------------------------

class _Pooled:
    """A model whose apply returns {'embedding': the pooled features `keys` of UTT.encode side by
    side}, so that evaluate.embed_step (eval mode, majority class, usable rows) serves them all."""

    def __init__(self, model, keys):
        self.model, self.keys = model, tuple(keys)

    def apply(self, variables, *inputs, train: bool):
        import jax.numpy as jnp

        feats = self.model.apply(variables, *inputs, train=train, method=type(self.model).encode)
        return {"embedding": jnp.concatenate([feats[k] for k in self.keys], axis=-1)}


def encode_keys(model_cfg) -> dict:
    """{UTT.encode output key: width} of the pooled features the model's variant has; the model's
    'embedding' only where it differs from both branches (U-T&T: the fused map)."""
    import jax

    from lcssl import models

    model = models.build_model(model_cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *models.dummy_inputs(model_cfg),
                                               train=False, method=models.UTT.encode))
    out = jax.eval_shape(lambda v: model.apply(v, *models.dummy_inputs(model_cfg), train=False,
                                               method=models.UTT.encode), shapes)
    keys = [k for k in ("aerial_embedding", "sits_embedding") if k in out]
    if models.variant(model_cfg) == "utt":
        keys.append("embedding")
    return {k: int(out[k].shape[-1]) for k in keys}


def embed(encoder: Encoder, split: Split, setup: Setup) -> dict:
    """{'features': {encode key: [N, D]}, 'majority': [N], 'labelled': [N]} of the split's valid rows."""
    from lcssl import sharding

    widths = setup.encode_keys(encoder.model_cfg)
    step = setup.embed_step(encoder.model_cfg, tuple(widths))
    feats, majority, labelled = [], [], []
    for host_batch in split.batches:
        out = step(encoder.variables, sharding.host_batch_to_global(host_batch, setup.mesh))
        valid = host_batch["example_valid"]
        feats.append(sharding.to_host(out["embedding"])[valid])
        majority.append(sharding.to_host(out["majority"])[valid])
        labelled.append(sharding.to_host(out["usable"])[valid])
    feats = np.concatenate(feats).astype(np.float64)
    bounds = np.cumsum([0, *widths.values()])
    return {"features": {k: feats[:, a:b] for k, a, b in zip(widths, bounds[:-1], bounds[1:])},
            "majority": np.concatenate(majority), "labelled": np.concatenate(labelled)}


# ------------------------------------------------------------------------------------------------
# Probes
# ------------------------------------------------------------------------------------------------

def stratified_folds(groups: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Row indices of `folds` folds, each group's rows shuffled (seeded) and dealt round-robin."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(groups), np.int64)
    start = 0
    for g in np.unique(groups):
        rows = rng.permutation(np.flatnonzero(groups == g))
        fold_of[rows] = (start + np.arange(len(rows))) % folds
        start += len(rows)  # the next group continues the deal: folds stay within one row in size
    return [np.flatnonzero(fold_of == f) for f in range(folds) if np.any(fold_of == f)]


def zone_probe(x: np.ndarray, zones: np.ndarray, folds: int, seed: int, ridge: float,
               candidates) -> dict:
    """Cross-validated accuracy of a ridge probe predicting the zone (chance 1 / zones)."""
    from lcssl import evaluate

    names, y = np.unique(zones, return_inverse=True)
    correct, fold_acc, ridges = 0, [], []
    for held in stratified_folds(zones, folds, seed):
        fit = np.setdiff1d(np.arange(len(y)), held)
        r = evaluate.linear_probe(x[fit], y[fit], x[held], y[held], len(names), ridge, candidates)
        correct += int(round(r["accuracy"] * r["num_eval"]))
        fold_acc.append(r["accuracy"])
        ridges.append(r["ridge"])
    return {"accuracy": correct / len(y), "chance": 1.0 / len(names), "num_zones": len(names),
            "num_examples": int(len(y)), "fold_accuracy": fold_acc, "fold_ridge": ridges}


def probe_encoder(encoder: Encoder, setup: Setup) -> list[dict]:
    """One row per probed modality: the class probe and the zone probe of its pooled features."""
    from lcssl import evaluate
    from lcssl.tasks import base

    probe_cfg, args = base.probe_config(), setup.args
    num_classes = len(setup.card["classes"])
    tr, ev = embed(encoder, setup.train, setup), embed(encoder, setup.held_out, setup)
    fresh_fusion = "fusion" in encoder.info["fresh"] and encoder.info["path"] is not None
    rows = []
    for modality, keys in MODALITIES.items():
        if not all(k in tr["features"] for k in keys):
            continue
        if modality == "aerial+sits" and len(tr["features"]) < 2:
            continue
        x_tr = np.concatenate([tr["features"][k] for k in keys], axis=1)
        x_ev = np.concatenate([ev["features"][k] for k in keys], axis=1)
        lab_tr, lab_ev = tr["labelled"], ev["labelled"]
        cls = evaluate.linear_probe(x_tr[lab_tr], tr["majority"][lab_tr], x_ev[lab_ev],
                                    ev["majority"][lab_ev], num_classes, probe_cfg.ridge,
                                    tuple(probe_cfg.ridge_candidates))
        zone = zone_probe(x_tr, setup.train.zones, args.folds, args.seed, probe_cfg.ridge,
                          tuple(probe_cfg.ridge_candidates))
        name = modality + (" (fresh fusion)" if modality == "fused" and fresh_fusion else "")
        rows.append({"checkpoint": encoder.name, **encoder.info, "modality": name,
                     "dim": int(x_tr.shape[1]), "class_probe": cls, "zone_probe": zone})
    return rows


def format_table(rows: list[dict]) -> str:
    def pct(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = ["| checkpoint | modality | class acc (baseline) | zone acc (chance) |",
             "|---|---|---|---|"]
    for r in rows:
        c, z = r["class_probe"], r["zone_probe"]
        lines.append(f"| {r['checkpoint']} | {r['modality']} | {pct(c['accuracy'])} "
                     f"({pct(c['baseline_accuracy'])}) | {pct(z['accuracy'])} ({pct(z['chance'])}) |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    if not os.path.isdir(args.data_dir):
        raise MissingInputError(f"--data_dir={args.data_dir}: no such directory; give a dataset "
                                "built by `python -m data_prep build`")
    for path in args.checkpoints:
        if not os.path.isdir(path):
            raise MissingInputError(f"--checkpoints: {path} is not a directory; give the workdir of "
                                    "a pre-training or supervised run of lcssl.main")

    from lcssl import files, sharding
    from lcssl.data import normalize, pipeline

    card = pipeline.load_card(args.data_dir)
    mesh = sharding.make_mesh()
    sharding.check_batch_divisible(args.batch_size, mesh, "--batch_size")
    t0 = time.perf_counter()
    setup = Setup(card, mesh, normalize.stats_from_card(card),
                  read_split(args.data_dir, card, args.train_split, args.batch_size),
                  read_split(args.data_dir, card, args.eval_split, args.batch_size), args)
    read_s = time.perf_counter() - t0
    train, held_out = setup.train, setup.held_out

    def probed(make) -> tuple[Encoder, list[dict]]:
        t = time.perf_counter()
        encoder = make()
        rows = probe_encoder(encoder, setup)
        return encoder, [dict(r, seconds=round(time.perf_counter() - t, 1)) for r in rows]

    rows, encoders = [], []
    for path in args.checkpoints:
        encoder, found = probed(lambda: load_run(path, setup))
        encoders.append(encoder)
        rows += found
    if args.random:
        rows += probed(lambda: random_encoder(encoders[0].model_cfg, setup))[1]

    table = format_table(rows)
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {len(os.sched_getaffinity(0))} usable cpus",
        "command": " ".join([sys.executable, *sys.argv]) if argv is None else " ".join(argv),
        "data_dir": os.path.abspath(args.data_dir), "train_split": args.train_split,
        "eval_split": args.eval_split, "folds": args.folds, "seed": args.seed,
        "num_train": int(len(train.zones)), "num_eval": int(len(held_out.zones)),
        "train_zones": sorted(set(train.zones.tolist())), "read_seconds": round(read_s, 1),
        "rows": rows, "table": table,
    }
    print(f"{args.data_dir}: class probe {args.train_split} ({len(train.zones)}) -> "
          f"{args.eval_split} ({len(held_out.zones)}); zone probe {args.folds}-fold CV over the "
          f"{len(result['train_zones'])} {args.train_split} zones")
    print(table)
    if args.out:
        files.write_json(args.out, result)  # temp name, then rename
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    from lcssl import cli

    cli.start_logging()
    cli.user_errors(main)()
