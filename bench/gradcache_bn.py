"""How far GradCache is from the full-batch step when the encoder has batch norm (issue 24, item 4).

    python bench/gradcache_bn.py                          # tiny U-T&T SimCLR model, 32 views
    python bench/gradcache_bn.py --patches 16 --chunks 1,2,4,8 --json /tmp/gc_bn.json

GradCache (lcssl.gradcache) embeds the batch in chunks, and in train mode each batch norm layer
normalizes a chunk with that chunk's own statistics. It returns the exact gradient of that chunked
objective, which is not the full-batch one: this program measures the difference on the real SSL
model (models.build_ssl_model, the tiny preset by default, float32, dropout off so that batch norm
is the only difference), one SimCLR step on random
inputs from the same initial variables, for several chunk counts:
- loss: NT-Xent of the gradient-cached embeddings against the full-batch one;
- gradient: relative L2 error ||g_c - g|| / ||g|| and cosine over all parameters;
- batch norm statistics of the step, read back from the updated running averages (momentum m per
  layer probed by a second forward from shifted running averages: new = m * old + (1 - m) * batch):
  the batch mean and variance each layer saw, the chunked ones averaged over chunks as
  lcssl.gradcache does; mean relative difference over layers (variance: signed, the chunked one is
  the mean of per-chunk variances, below the whole batch's by the between-chunk spread).
The two views of a patch are interleaved as lcssl.tasks.simclr does (both in the same chunk).
num_chunks 1 gives the float32 noise floor (same numbers, another program). Prints a table, writes
JSON. No TensorFlow.
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lcssl import files, gradcache, losses, models  # noqa: E402


def inputs_for(cfg, patches: int, dates: int, seed: int = 0) -> dict:
    """2 x patches views, interleaved (patch i's views at rows 2i, 2i+1); view 2 = flipped + noise."""
    rng = np.random.default_rng(seed)
    aerial = rng.normal(size=(patches, cfg.aerial_size, cfg.aerial_size, cfg.aerial_bands))
    sits = rng.normal(size=(patches, dates, cfg.sits_size, cfg.sits_size, cfg.sits_bands))
    view2 = {"aerial": aerial[:, ::-1] + 0.1 * rng.normal(size=aerial.shape),
             "sits": sits[:, :, ::-1] + 0.1 * rng.normal(size=sits.shape)}
    pair = lambda a, b: np.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])
    dates_doy = np.sort(rng.integers(1, 366, size=(patches, dates)), axis=1)
    return {"aerial": jnp.asarray(pair(aerial, view2["aerial"]), jnp.float32),
            "sits": jnp.asarray(pair(sits, view2["sits"]), jnp.float32),
            "dates": jnp.asarray(pair(dates_doy, dates_doy), jnp.int32),
            "sits_valid": jnp.ones((2 * patches, dates), bool)}


def make_fns(model, temperature: float):
    def embed(params, batch_stats, x):
        out, mutated = model.apply({"params": params, "batch_stats": batch_stats},
                                   *(x[k] for k in models.INPUT_KEYS), train=True,
                                   mutable=["batch_stats"])
        return out["projection"], mutated["batch_stats"]

    def contrast(z):
        z = z.reshape(-1, 2, z.shape[-1])
        return losses.nt_xent(z[:, 0], z[:, 1], temperature), {}

    @jax.jit
    def full(params, batch_stats, x):
        def loss_fn(p):
            z, stats = embed(p, batch_stats, x)
            return contrast(z)[0], stats
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, stats, grads

    def cached(num_chunks):
        @jax.jit
        def step(params, batch_stats, x):
            (loss, _, stats), grads = gradcache.grad_cached_value_and_grad(
                lambda p, c: embed(p, batch_stats, c), params, x, contrast, num_chunks)
            return loss, stats, grads
        return step

    return embed, full, cached


def batch_statistics(new, old, momentum):
    """The batch statistic of each running average: (new - m * old) / (1 - m)."""
    return jax.tree.map(lambda n, o, m: (n - m * o) / (1 - m), new, old, momentum)


def compare(full_stats, chunk_stats):
    """(mean over layers of |mean_c - mean| / sqrt(var), mean and lowest of var_c / var - 1, layers)."""
    full, chunk = ({jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(t)}
                   for t in (full_stats, chunk_stats))
    mean_err, var_bias = [], []
    for key, var in full.items():
        if not key.endswith("['var']"):
            continue
        mean_key = key[:-len("['var']")] + "['mean']"
        scale = jnp.sqrt(var + 1e-5)
        mean_err.append(float(jnp.mean(jnp.abs(chunk[mean_key] - full[mean_key]) / scale)))
        var_bias.append(float(jnp.mean(chunk[key] / (var + 1e-5) - 1.0)))
    return float(np.mean(mean_err)), float(np.mean(var_bias)), float(np.min(var_bias)), len(var_bias)


def flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("default", "tiny"), default="tiny")
    p.add_argument("--patches", type=int, default=16, help="patches; the batch has 2x as many views")
    p.add_argument("--dates", type=int, default=3)
    p.add_argument("--chunks", default="1,2,4,8", help="comma-separated chunk counts")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--json", default="gradcache_bn.json")
    args = p.parse_args()
    chunk_counts = [int(c) for c in args.chunks.split(",")]
    bad = [c for c in chunk_counts if c < 1 or (2 * args.patches) % c]
    if bad:
        p.error(f"--chunks {bad} must divide the {2 * args.patches} views")

    cfg = models.default_config() if args.preset == "default" else models.tiny_config()
    for name in ("attn_dropout", "fusion_dropout", "ltae_dropout", "modality_dropout"):
        cfg[name] = 0.0  # batch norm alone: dropout masks would differ between the two programs
    model = models.build_ssl_model(cfg)
    variables = model.init(jax.random.key(0), *models.dummy_inputs(cfg, 2, args.dates), train=False)
    params, stats0 = variables["params"], variables["batch_stats"]
    x = inputs_for(cfg, args.patches, args.dates)
    embed, full, cached = make_fns(model, args.temperature)

    loss, stats, grads = full(params, stats0, x)
    shifted = jax.tree.map(lambda s: s + 1.0, stats0)
    _, stats_shifted = jax.jit(embed)(params, shifted, x)
    momentum = jax.tree.map(lambda a, b: b - a, stats, stats_shifted)  # m * 1.0
    full_batch_stats = batch_statistics(stats, stats0, momentum)
    g = flat(grads)
    rows = []
    print(f"GradCache vs the full-batch step, {args.preset} SimCLR model, {2 * args.patches} views "
          f"({args.patches} patches), float32, t={args.temperature}; full-batch loss {float(loss):.6f}")
    print(f"{'chunks':>6} {'views/chunk':>11} {'loss diff':>10} {'grad rel err':>12} "
          f"{'grad cos':>9} {'BN mean err':>11} {'BN var bias':>11} {'worst layer':>11}")
    for n in chunk_counts:
        t0 = time.perf_counter()
        loss_c, stats_c, grads_c = cached(n)(params, stats0, x)
        gc = flat(grads_c)
        mean_err, var_bias, worst, layers = compare(full_batch_stats,
                                                    batch_statistics(stats_c, stats0, momentum))
        row = {"num_chunks": n, "views_per_chunk": 2 * args.patches // n,
               "loss": float(loss_c), "loss_diff": float(loss_c - loss),
               "grad_rel_err": float(jnp.linalg.norm(gc - g) / jnp.linalg.norm(g)),
               "grad_cosine": float(jnp.dot(gc, g) / jnp.linalg.norm(gc) / jnp.linalg.norm(g)),
               "bn_mean_err": mean_err, "bn_var_bias": var_bias, "bn_var_bias_worst": worst,
               "bn_layers": layers, "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{n:>6} {row['views_per_chunk']:>11} {row['loss_diff']:>+10.2e} "
              f"{row['grad_rel_err']:>12.2e} {row['grad_cosine']:>9.5f} {mean_err:>11.2e} "
              f"{var_bias:>+11.2%} {worst:>+11.2%}")
    files.write_json(args.json, {
        "preset": args.preset, "patches": args.patches, "views": 2 * args.patches,
        "dates": args.dates, "temperature": args.temperature, "full_batch_loss": float(loss),
        "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
