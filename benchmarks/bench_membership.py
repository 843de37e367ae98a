"""Shadow training for LiRA / RMIA: S shadows in one vectorized call vs a Python loop over shadows.

    python benchmarks/bench_membership.py [--shadows 32] [--steps 500] [--federations 16]

Two rows, each vectorized vs loop with the same compiled program and keys (so the same shadows), each timed
after a warm-up call that compiles it:
  central     S centrally trained shadow models (``client_update`` via ``map_clients``);
  federations S shadow federations replaying a federated run (``train_shadow_federations``: the compiled
              round vmapped over federations vs the same round called once per federation; the default picks
              the vmapped round on accelerators and the loop on CPU).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from fedjaxpriv.attacks import shadow
from fedjaxpriv.data import Dataset, load_digits
from fedjaxpriv.models import get_model


def _timed(fn):
    jax.block_until_ready(fn())                      # compile
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shadows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pool", type=int, default=1000)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--federations", type=int, default=16, help="shadow federations (0 = skip that row)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each shadow federation")
    args = parser.parse_args()
    train, test = load_digits()
    x, y = np.concatenate([train.x, test.x]), np.concatenate([train.y, test.y])
    pool = Dataset(x[: args.pool], y[: args.pool])
    model = get_model(args.model, pool.x.shape[1:], 10)
    key = jax.random.key(0)
    inclusion = shadow.balanced_inclusion(key, args.shadows, len(pool))
    population = shadow.shadow_population(pool, inclusion)
    spec = shadow.shadow_spec(population, 10, args.steps, args.batch)

    def vectorized():
        return shadow.train_models(model, population, spec, key, lr=0.1, batch_size=args.batch)[0]

    def loop():
        return [shadow.train_models(model, population, spec, key, lr=0.1, batch_size=args.batch,
                                    shadow_ids=np.array([s]))[0] for s in range(args.shadows)]

    together, t_vec = _timed(vectorized)
    singles, t_loop = _timed(loop)
    diff = max(float(np.max(np.abs(np.asarray(a)[s] - np.asarray(b)[0])))
               for s, one in enumerate(singles)
               for a, b in zip(jax.tree_util.tree_leaves(together), jax.tree_util.tree_leaves(one)))
    print(f"backend={jax.default_backend()} model={args.model} shadows={args.shadows} steps={args.steps} "
          f"batch={args.batch} pool={args.pool}")
    print(f"vectorized: {t_vec:.3f} s  ({args.shadows / t_vec:.2f} shadows/s)")
    print(f"python loop: {t_loop:.3f} s  ({args.shadows / t_loop:.2f} shadows/s)")
    print(f"speed-up: {t_loop / t_vec:.2f}x   max |vectorized - loop| = {diff:.2e}")
    if args.federations:
        federations_row(args, pool)


def federations_row(args: argparse.Namespace, pool: Dataset) -> None:
    """Shadow federations of a small federated run, vectorized vs one federation at a time."""
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.experiment import Experiment, partition_like

    config = from_dict({"data": {"num_clients": 10, "partition": "iid"}, "model": {"hidden": [256]},
                        "client": {"local_steps": 20, "batch_size": 16, "lr": 0.3},
                        "server": {"clients_per_round": 10},
                        "run": {"rounds": args.rounds, "eval_every": args.rounds, "num_devices": 1}})
    members = Dataset(pool.x[::2], pool.y[::2])
    experiment = Experiment(config, population=partition_like(config, members, 0), test=members, num_classes=10)
    key = jax.random.key(3)

    def run(vectorize: bool):
        return shadow.train_shadow_federations(experiment, pool, args.federations, key, vectorize=vectorize).params

    together, t_vec = _timed(lambda: run(True))
    singles, t_loop = _timed(lambda: run(False))
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree_util.tree_leaves(together), jax.tree_util.tree_leaves(singles)))
    print(f"\nshadow federations: {args.federations} federations x 10 clients x {args.rounds} rounds x 20 local steps "
          f"(MLP 256, pool {len(pool)})")
    print(f"vectorized: {t_vec:.3f} s  ({args.federations / t_vec:.2f} federations/s)")
    print(f"python loop: {t_loop:.3f} s  ({args.federations / t_loop:.2f} federations/s)")
    print(f"speed-up: {t_loop / t_vec:.2f}x   max |vectorized - loop| = {diff:.2e}")


if __name__ == "__main__":
    main()
