"""Throughput of gradient inversion: T targets in one vmapped call vs one target at a time.

Usage: python benchmarks/bench_attacks.py [--method dlg|inverting_gradients] [--iterations 100]
       [--dlg-step STEP] [--size 16] [--targets 1 8 32] [--repeats 2] [--conv-as-matmul]

For each T the script attacks T batch-1 FedSGD gradients of the sigmoid LeNet on random images, once as a
single jitted call vmapped over targets and once as a Python loop over targets (one jitted call each),
and prints attacks/second for both and their ratio. Compilation is excluded (a warm-up call first).
"""

from __future__ import annotations

import argparse
import time

import jax

from fedjaxpriv.attacks import inversion
from fedjaxpriv.models import get_model


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
    parser.add_argument("--method", default="dlg", choices=inversion.METHODS)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--dlg-step", type=float, default=None, help="fixed L-BFGS step (default: line search)")
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
    config = inversion.InversionConfig(
        method=args.method,
        num_iterations=args.iterations,
        learning_rate=0.1 if args.method == "inverting_gradients" else args.dlg_step,
        labels="idlg",
    )
    make = jax.jit(jax.vmap(lambda x, y: inversion.make_target(spec, apply, params, x[None], y[None])))
    attack_one = jax.jit(lambda target, key: inversion.invert_one(config, spec, apply, params, target, key))

    print(
        f"device={jax.devices()[0].device_kind} method={args.method} iterations={args.iterations} image={shape} "
        f"conv_as_matmul={args.conv_as_matmul} dlg_step={args.dlg_step}"
    )
    print(f"{'T':>4} {'vmapped att/s':>14} {'loop att/s':>11} {'ratio':>7}")
    for count in args.targets:
        key_x, key_y, key_attack = jax.random.split(jax.random.key(count), 3)
        images = jax.random.uniform(key_x, (count,) + shape)
        labels = jax.random.randint(key_y, (count,), 0, 10)
        targets = make(images, labels)
        keys = jax.random.split(key_attack, count)
        per_target = [jax.tree_util.tree_map(lambda leaf, t=t: leaf[t], targets) for t in range(count)]

        def vectorized():
            return inversion.invert_batch(config, spec, apply, params, targets, keys)

        def looped():
            return [attack_one(target, keys[t]) for t, target in enumerate(per_target)]

        vmapped_rate = count / _best_time(vectorized, args.repeats)
        loop_rate = count / _best_time(looped, args.repeats)
        print(f"{count:>4} {vmapped_rate:>14.2f} {loop_rate:>11.2f} {vmapped_rate / loop_rate:>7.2f}")


if __name__ == "__main__":
    main()
