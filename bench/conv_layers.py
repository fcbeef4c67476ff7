"""Where the CPU step's time goes: forward, input-gradient and weight-gradient convolutions of
representative U-T&T layers (FLAIR #2 sizes), each jitted alone, in GFLOP/s.

    .venv/bin/python bench/conv_layers.py [--repeats 3]                      # CPU: batch 2, fp32
    python3 bench/conv_layers.py --batch 32 --dtype bfloat16 --repeats 20     # on a GPU

A layer's three passes do the same FLOPs (2 x multiply-adds of the forward; the input gradient of a
strided convolution without its inserted zeros), so their rates compare directly. No TensorFlow.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

# name, input size, in channels, out channels, kernel, stride
LAYERS = [
    ("stem 7x7/2, 5->64 @512", 512, 5, 64, 7, 2),
    ("layer1 3x3, 64->64 @128", 128, 64, 64, 3, 1),
    ("layer2 3x3, 128->128 @64", 64, 128, 128, 3, 1),
    ("layer3 3x3, 256->256 @32", 32, 256, 256, 3, 1),
    ("layer4 3x3, 512->512 @16", 16, 512, 512, 3, 1),
    ("decoder 3x3, 64->32 @256", 256, 64, 32, 3, 1),
    ("decoder 3x3, 32->16 @512", 512, 32, 16, 3, 1),
    ("decoder 3x3, 16->16 @512", 512, 16, 16, 3, 1),
]


def conv(x, w, stride):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def best_time(fn, *args, repeats: int) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args()
    dtype, b = jnp.dtype(args.dtype), args.batch
    rng = np.random.default_rng(0)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; batch {b}, {args.dtype}; "
          f"best of {args.repeats}, GFLOP/s")
    print(f"{'layer':<28} {'GFLOP':>6} {'forward':>8} {'dgrad':>8} {'wgrad':>8}")
    for name, h, ci, co, k, s in LAYERS:
        x = jnp.asarray(rng.random((b, h, h, ci)), dtype)
        w = jnp.asarray(rng.random((k, k, ci, co)), dtype)
        ho = -(-h // s)
        g = jnp.asarray(rng.random((b, ho, ho, co)), dtype)
        flop = 2 * b * ho * ho * co * k * k * ci
        t_fwd = best_time(lambda x, w: conv(x, w, s), x, w, repeats=args.repeats)
        t_dx = best_time(lambda x, w, g: jax.vjp(lambda x: conv(x, w, s), x)[1](g)[0], x, w, g,
                         repeats=args.repeats)
        t_dw = best_time(lambda x, w, g: jax.vjp(lambda w: conv(x, w, s), w)[1](g)[0], x, w, g,
                         repeats=args.repeats)
        print(f"{name:<28} {flop / 1e9:>6.2f} {flop / t_fwd / 1e9:>8.1f} {flop / t_dx / 1e9:>8.1f} "
              f"{flop / t_dw / 1e9:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
