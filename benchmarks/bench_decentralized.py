"""Decentralized SGD: node updates per second of the compiled D-SGD round (every node's local training vmapped in
chunks, then one sparse gossip step) against a per-node loop (one compiled local-training call per node, then the
same gossip step), on the exponential graph.

One command, one process::

    python benchmarks/bench_decentralized.py            # 1,000 and 10,000 nodes, MLP on Synthetic(1, 1)
    python benchmarks/bench_decentralized.py --quick    # 200 and 1,000 nodes, 2 repeats

Each node: 5 local steps of batch 16 (at most 64 examples), an MLP with 64 hidden units. The loop is timed on
its first ``--loop-nodes`` nodes (a fixed cost per node; node updates/s is the figure compared). Runs alternate
(A B A B ...) after a warm-up of each; the ratio engine/loop (in node updates/s) is reported per repeat with its
median and range. The machine's load average is printed: shared machines skew timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedjaxpriv import decentralized as dec  # noqa: E402
from fedjaxpriv import parallel  # noqa: E402
from fedjaxpriv.client.local import LocalSpec, client_update  # noqa: E402
from fedjaxpriv.client.settings import make_settings  # noqa: E402
from fedjaxpriv.data import synthetic_federated  # noqa: E402
from fedjaxpriv.models import get_model  # noqa: E402
from fedjaxpriv.simulation import Population, client_keys_base  # noqa: E402
from bench_text import timed  # noqa: E402  (this directory is on the path)


def problem(num_nodes: int):
    population, _ = synthetic_federated(0, num_nodes, max_size=80)
    model = get_model("mlp", population.input_shape, 10, hidden=(64,))
    settings = jax.tree_util.tree_map(jnp.asarray, make_settings(num_nodes, population.counts, local_steps=5,
                                                                 batch_size=16, lr=0.05))
    spec = LocalSpec(max_steps=5, max_batch=16, max_count=int(np.max(population.counts)), num_classes=10)
    pop = Population(*(jnp.asarray(a) for a in (population.x, population.y, population.offsets, population.counts)))
    return model, spec, settings, pop


def engine_runner(model, spec, settings, pop, topology):
    round_fn = dec.build_dsgd_round(model.apply, spec, topology, chunk_size=256)
    state = [dec.init_nodes(model.init(jax.random.key(0)), topology.num_nodes)]
    mask = jnp.ones(topology.num_nodes, bool)

    def run():
        state[0], out = round_fn(state[0], pop, settings, mask, jax.random.key(1))
        return out.consensus

    return run


def loop_runner(model, spec, settings, pop, topology, nodes: int):
    """One compiled local-training call per node (its own model), then the gossip step over all nodes."""
    models = dec.init_nodes(model.init(jax.random.key(0)), topology.num_nodes).params
    update = jax.jit(lambda p, offset, count, row, key: client_update(spec, model.apply, p, pop.x, pop.y, offset,
                                                                       count, row, key).delta)
    mix = jax.jit(lambda m: dec.mix(m, topology))
    rows = [jax.tree_util.tree_map(lambda a: a[i], settings) for i in range(nodes)]
    base = client_keys_base(jax.random.fold_in(jax.random.key(1), 0))

    def run():
        sent = []
        for i in range(nodes):
            own = jax.tree_util.tree_map(lambda a: a[i], models)
            delta = update(own, pop.offsets[i], pop.counts[i], rows[i], jax.random.fold_in(base, i))
            sent.append(jax.tree_util.tree_map(jnp.add, own, delta))
        stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *sent)
        full = jax.tree_util.tree_map(lambda m, s: m.at[:nodes].set(s), models, stacked)
        return mix(full)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer nodes and repeats")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timed pairs")
    parser.add_argument("--loop-nodes", type=int, default=500, help="nodes the per-node loop trains per timing")
    args = parser.parse_args()
    parallel.use_cpu_cores()  # as the command line does
    sizes = (200, 1000) if args.quick else (1000, 10000)
    repeats = args.repeats or (2 if args.quick else 5)
    print(f"backend={jax.default_backend()} devices={jax.device_count()} cores={os.cpu_count()} jax={jax.__version__} "
          f"load(1,5,15 min)={tuple(round(v, 2) for v in os.getloadavg())}")
    print(f"exponential graph; 5 local steps of batch 16, MLP (64 hidden); {repeats} interleaved pairs after a "
          "warm-up\n")
    print(f"{'nodes':>7} {'engine node-updates/s':>22} {'loop node-updates/s':>20} {'engine/loop':>12} {'range':>14}")
    for num_nodes in sizes:
        model, spec, settings, pop = problem(num_nodes)
        topology = dec.exponential(num_nodes)
        loop_nodes = min(num_nodes, args.loop_nodes)
        engine = engine_runner(model, spec, settings, pop, topology)
        loop = loop_runner(model, spec, settings, pop, topology, loop_nodes)
        timed(engine), timed(loop)  # compile both
        engine_rate, loop_rate = [], []
        for _ in range(repeats):
            engine_rate.append(num_nodes / timed(engine))
            loop_rate.append(loop_nodes / timed(loop))
        ratios = [e / lo for e, lo in zip(engine_rate, loop_rate)]
        print(f"{num_nodes:>7,} {statistics.median(engine_rate):>22,.0f} {statistics.median(loop_rate):>20,.0f} "
              f"{statistics.median(ratios):>11.1f}x {min(ratios):>6.1f}-{max(ratios):.1f}x")


if __name__ == "__main__":
    main()
