"""Throughput of gradient inversion: T targets in one vmapped call vs one target at a time.

Usage: python benchmarks/bench_attacks.py [--formulations dlg-batched dlg-zoom dlg-fixed inverting-gradients]
       [--iterations 100] [--trials 4] [--size 16] [--targets 1 8 32] [--repeats 2] [--conv-as-matmul]

For each formulation and each T, in one process, the script attacks T batch-1 FedSGD gradients of the
sigmoid LeNet on random images, once as a single jitted call vmapped over targets and once as a Python loop
over targets (one jitted call each), and prints attacks/second for both, their ratio (vmapped / loop;
above 1 means vectorizing pays) and the median PSNR of the reconstructions (dB, so that speed is not bought
with failure). Compilation is excluded (a warm-up call first). Formulations:

* ``dlg-batched``: DLG with L-BFGS and the batched line search (``--trials`` step sizes per iteration in
  one call, no data-dependent loop), the default;
* ``dlg-zoom``: DLG with optax's zoom line search (while loops: under vmap every target waits for the
  slowest one, and both branches of its conditionals run);
* ``dlg-fixed``: DLG with a fixed L-BFGS step 1.0 (the original DLG code), no line search;
* ``inverting-gradients``: cosine + TV, signed Adam (fixed cost per step).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from fedjaxpriv.attacks import inversion, metrics
from fedjaxpriv.models import get_model

FORMULATIONS = {
    "dlg-batched": dict(method="dlg", learning_rate=None, line_search="batched"),
    "dlg-zoom": dict(method="dlg", learning_rate=None, line_search="zoom"),
    "dlg-fixed": dict(method="dlg", learning_rate=1.0),
    "inverting-gradients": dict(method="inverting_gradients", learning_rate=0.1),
}


def _best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formulations", nargs="+", default=["dlg-batched", "dlg-zoom"], choices=list(FORMULATIONS))
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--trials", type=int, default=4, help="step sizes per batched line search")
    parser.add_argument("--size", type=int, default=16, help="image height = width (1 channel)")
    parser.add_argument("--targets", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--conv-as-matmul", action="store_true", help="run convolutions as matrix products (fast on CPU under vmap)"
    )
    args = parser.parse_args()

    shape = (args.size, args.size, 1)
    model = get_model("lenet", shape, 10)
    params = model.init(jax.random.key(0))
    apply = model.apply
    if args.conv_as_matmul:
        from fedjaxpriv.parallel import conv_as_matmul

        apply = conv_as_matmul(model.apply)
    spec = inversion.TargetSpec(input_shape=shape, num_classes=10, batch_size=1)
    make = jax.jit(jax.vmap(lambda x, y: inversion.make_target(spec, apply, params, x[None], y[None])))

    print(f"device={jax.devices()[0].device_kind} iterations={args.iterations} image={shape} "
          f"conv_as_matmul={args.conv_as_matmul} repeats={args.repeats} trials={args.trials}")
    print(f"{'formulation':>20} {'T':>4} {'vmapped att/s':>14} {'loop att/s':>11} {'ratio':>7} {'PSNR dB':>8}")
    for name in args.formulations:
        config = inversion.InversionConfig(num_iterations=args.iterations, labels="idlg",
                                           line_search_trials=args.trials, **FORMULATIONS[name])
        attack_one = jax.jit(lambda target, key, c=config: inversion.invert_one(c, spec, apply, params, target, key))
        for count in args.targets:
            key_x, key_y, key_attack = jax.random.split(jax.random.key(count), 3)
            images = jax.random.uniform(key_x, (count,) + shape)
            labels = jax.random.randint(key_y, (count,), 0, 10)
            targets = make(images, labels)
            keys = jax.random.split(key_attack, count)
            per_target = [jax.tree_util.tree_map(lambda leaf, t=t: leaf[t], targets) for t in range(count)]

            def vectorized(c=config, t=targets, k=keys):
                return inversion.invert_batch(c, spec, apply, params, t, k)

            def looped(p=per_target, k=keys):
                return [attack_one(target, k[t]) for t, target in enumerate(p)]

            vmapped_rate = count / _best_time(vectorized, args.repeats)
            loop_rate = count / _best_time(looped, args.repeats)
            psnr = np.median(np.asarray(jax.vmap(metrics.psnr)(vectorized().x[:, 0], images)))
            print(f"{name:>20} {count:>4} {vmapped_rate:>14.2f} {loop_rate:>11.2f} {vmapped_rate / loop_rate:>7.2f} "
                  f"{psnr:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
