"""Memory per device and round time with the population's examples and every client's state split over the
devices (``run.shard_data``) against a full copy on every device, same run (SCAFFOLD: a model-sized control
variate per client).

One command, one process, on an 8-device CPU mesh (XLA's virtual host devices; set before JAX starts)::

    python benchmarks/bench_shard_data.py            # Synthetic(1, 1): 2,000 clients, cohorts of 64
    python benchmarks/bench_shard_data.py --quick    # 400 clients, 2 repeats

Figures per device: the population's and the client states' bytes it holds (``addressable_shards``), and the
compiled round's
argument and temporary bytes (XLA's ``memory_analysis`` of the partitioned program, which is per device). The
round times alternate the two layouts (A B A B ...) after a warm-up of each; the ratio split / copied is reported
per repeat with its median and range. The machine's load average is printed: shared machines skew timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fedjaxpriv.config import ExperimentConfig, with_overrides  # noqa: E402
from fedjaxpriv.experiment import Experiment  # noqa: E402
from bench_text import engine_runner, timed  # noqa: E402  (this directory is on the path)


def experiment_for(clients: int, cohort: int, split: bool) -> Experiment:
    return Experiment(with_overrides(ExperimentConfig(), [
        "data.dataset=synthetic", f"data.num_clients={clients}", f"server.clients_per_round={cohort}",
        "model.name=mlp", "model.hidden=[64]", "client.local_steps=5", "client.batch_size=16", "run.rounds=1000",
        "run.strategy=vmap", "run.checkpoint_every=0", "server.algorithm=scaffold",
        f"run.shard_data={str(split).lower()}"]))


def held_bytes(tree) -> int:
    """The bytes of ``tree``'s arrays on the first device (every device holds the same amount)."""
    device = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(tree) for s in leaf.addressable_shards
               if s.device == device)


def compiled_memory(experiment: Experiment) -> tuple[int, int]:
    """The compiled round's argument and temporary bytes per device (XLA's ``memory_analysis``)."""
    cohort, _ = experiment.round_cohort(0)
    args = (experiment.initial_state, experiment.device_population, experiment.device_settings,
            jnp.asarray(cohort.ids), jnp.asarray(cohort.mask), experiment.root_key)
    analysis = experiment.round_fn.lower(*args).compile().memory_analysis()
    return analysis.argument_size_in_bytes, analysis.temp_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer clients and repeats")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timed pairs")
    args = parser.parse_args()
    clients, cohort = (400, 64) if args.quick else (2000, 64)
    repeats = args.repeats or (2 if args.quick else 5)
    print(f"backend={jax.default_backend()} devices={jax.device_count()} cores={os.cpu_count()} jax={jax.__version__} "
          f"load(1,5,15 min)={tuple(round(v, 2) for v in os.getloadavg())}")
    copied, split = experiment_for(clients, cohort, False), experiment_for(clients, cohort, True)
    examples = len(copied.population.x)
    print(f"Synthetic(1, 1): {clients} clients, {examples:,} examples of {copied.population.x.shape[1:]} float32, "
          f"largest client {int(copied.population.counts.max())}; SCAFFOLD ({copied.num_params:,} parameters), cohort "
          f"{cohort}, chunk {copied.chunk_size}, "
          f"{repeats} interleaved pairs after a warm-up\n")
    runners = {}
    print(f"{'layout':<10} {'population bytes/device':>24} {'client states bytes/device':>27} "
          f"{'round args bytes':>17} {'round temp bytes':>17}")
    for name, experiment in (("copied", copied), ("split", split)):
        runners[name] = engine_runner(experiment)[0]
        arguments, temporary = compiled_memory(experiment)
        population = (experiment.device_population.x, experiment.device_population.y)
        print(f"{name:<10} {held_bytes(population):>24,} {held_bytes(experiment.initial_state.client_state):>27,} "
              f"{arguments:>17,} {temporary:>17,}")
    for run in runners.values():
        timed(run)  # compile
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(timed(run))
    ratios = [b / a for a, b in zip(times["copied"], times["split"])]
    print(f"\nround time: copied {statistics.median(times['copied']):.3f} s, split "
          f"{statistics.median(times['split']):.3f} s; split/copied {statistics.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
