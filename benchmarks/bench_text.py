"""Keyboard task throughput: client-updates/s of the engine's round against a per-client loop, same clients.

One command, one process::

    python benchmarks/bench_text.py            # LSTM [64] and transformer [64], 100 users, cohorts of 50
    python benchmarks/bench_text.py --quick    # 40 users, cohorts of 20, 2 repeats

Both methods train the same cohort of the embedded ``keyboard`` corpus (users' own sequences of 20 words, 10
local SGD steps of batch 16 each) from the same server model:

  engine    ``Experiment.step``: one compiled round (sampling, local training of the whole cohort vectorized
            over clients, aggregation, server step), as ``fedjaxpriv run`` executes it.
  loop      the same local training (``client.local.client_update`` with the run's ``LocalSpec``), jitted for
            one client and called in a Python loop over the cohort, with a jitted running sum.

Timings alternate the methods (A B A B ...) after a warm-up of each; the ratio engine / loop is reported per
repeat with its median and range. The machine's load average is printed: shared machines skew timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedjaxpriv import parallel  # noqa: E402
from fedjaxpriv.client.local import client_update  # noqa: E402
from fedjaxpriv.config import ExperimentConfig, with_overrides  # noqa: E402
from fedjaxpriv.experiment import Experiment  # noqa: E402


def experiment_for(model: str, users: int, cohort: int) -> Experiment:
    return Experiment(with_overrides(ExperimentConfig(), [
        "data.dataset=keyboard", f"model.name={model}", "model.hidden=[64]", f"data.num_clients={users}",
        f"server.clients_per_round={cohort}", "client.local_steps=10", "client.batch_size=16", "client.lr=1.0",
        "run.rounds=1000", "run.checkpoint_every=0"]))


def engine_runner(experiment: Experiment):
    state = [experiment.initial_state]
    cohort, _ = experiment.round_cohort(0)
    count = [0]

    def run():
        state[0], _ = experiment.step(state[0], count[0], cohort)
        count[0] += 1
        return state[0].params

    return run, np.asarray(cohort.ids)[np.asarray(cohort.mask)]


def loop_runner(experiment: Experiment, ids: np.ndarray):
    population, spec = experiment.population, experiment.spec
    x, y = jnp.asarray(population.x), jnp.asarray(population.y)
    params = experiment.initial_params
    rows = [jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)[i]), experiment.settings) for i in ids]
    update = jax.jit(lambda p, offset, count, row, key: client_update(spec, experiment.model.apply, p, x, y, offset,
                                                                       count, row, key).delta)
    add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b), donate_argnums=(0,))
    keys = jax.random.split(jax.random.key(7), len(ids))

    def run():
        total = jax.tree_util.tree_map(jnp.zeros_like, params)
        for row, client in enumerate(ids):
            total = add(total, update(params, population.offsets[client], population.counts[client], rows[row],
                                      keys[row]))
        return total

    return run


def timed(run) -> float:
    start = time.perf_counter()
    jax.block_until_ready(run())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer users and repeats")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timed pairs")
    parser.add_argument("--models", default="lstm,transformer")
    args = parser.parse_args()
    parallel.use_cpu_cores()  # as the command line does
    users, cohort = (40, 20) if args.quick else (100, 50)
    repeats = args.repeats or (2 if args.quick else 5)
    print(f"backend={jax.default_backend()} devices={jax.device_count()} cores={os.cpu_count()} jax={jax.__version__} "
          f"load(1,5,15 min)={tuple(round(v, 2) for v in os.getloadavg())}")
    print(f"keyboard corpus: {users} users, cohort {cohort}, 10 local steps of batch 16, sequences of 20 words; "
          f"{repeats} interleaved pairs after a warm-up\n")
    print(f"{'model':<28} {'engine clients/s':>17} {'loop clients/s':>15} {'engine/loop':>12} {'range':>14}")
    for model in args.models.split(","):
        experiment = experiment_for(model, users, cohort)
        engine, ids = engine_runner(experiment)
        loop = loop_runner(experiment, ids)
        timed(engine), timed(loop)  # compile both
        engine_s, loop_s = [], []
        for _ in range(repeats):
            engine_s.append(timed(engine))
            loop_s.append(timed(loop))
        ratios = [b / a for a, b in zip(engine_s, loop_s)]  # speed-up: loop time / engine time
        name = f"{model} ({experiment.num_params:,} params)"
        print(f"{name:<28} {len(ids) / statistics.median(engine_s):>17.1f} "
              f"{len(ids) / statistics.median(loop_s):>15.1f} "
              f"{statistics.median(ratios):>11.2f}x {min(ratios):>6.2f}-{max(ratios):.2f}x")


if __name__ == "__main__":
    main()
