"""Defense overheads: each defense's round time over the plain round's, in one process.

One command::

    python benchmarks/bench_defenses.py                 # MLP on digits, 20 clients of ~72 examples
    python benchmarks/bench_defenses.py --model cnn --rounds 4

Workload: digits split over ``--clients`` clients (iid), every client in every round, ``--steps`` local steps of
batch ``--batch``; the same seed and config apart from the defense. Every variant is compiled by a warm-up round,
then the variants take ``--rounds`` rounds of ``Experiment.step`` (local training, message transforms,
aggregation and the privacy accounting of the round) in turn, one round each per repeat, so that load on the
machine hits them alike; a row gives its median round time and the median (quartiles) of its per-repeat ratios to
the plain round. DP rows use fixed noise multipliers (no calibration).

Rows marked "(argsort)" run the same defense with the stable-argsort selection that ``pruning.keep_above_rank``
(sort-free bisection, same masks) replaced, swapped in for that row only; rows marked "(all slots)" compute
every batch slot of a step, as before ``LocalSpec.slot_chunk`` computed Poisson batches in chunks up to their last
example. For every DP row, the host accounting
part of its round (``PrivacyTracker.record_round`` and ``summary``, on a copy of the run's tracker, over
``--rounds`` x 20 further rounds) is given in microseconds and as a share of that row's median round. A last line
times the selection alone, vmapped over the cohort's messages of the model's largest leaf.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedjaxpriv.client import pruning  # noqa: E402
from fedjaxpriv.config import ExperimentConfig, with_overrides  # noqa: E402
from fedjaxpriv import experiment as experiment_module  # noqa: E402
from fedjaxpriv.experiment import Experiment  # noqa: E402
from fedjaxpriv.transforms import sparsify  # noqa: E402
from bench_engine import stop_on_term  # noqa: E402

DEFENSES: dict[str, list[str]] = {
    "plain": [],
    "pruning 0.5": ["client.prune_sparsity=0.5"],
    "rounding 2-bit": ["message.quant_bits=2"],
    "QSGD 4 levels": ["message.qsgd_levels=4"],
    "top-k 1%": ["message.topk_fraction=0.01"],
    "mixup 1.0": ["client.mixup_alpha=1.0"],
    "Poisson batches": ["client.sampling=poisson"],
    "DP-SGD z=1": ["client.dp_clip_norm=1.0", "client.dp_noise_multiplier=1.0"],
    "DP-SGD z=1 Poisson": ["client.dp_clip_norm=1.0", "client.dp_noise_multiplier=1.0", "client.sampling=poisson"],
    "DP-FedAvg z=1": ["server.central_clip_norm=1.0", "server.central_noise_multiplier=1.0",
                      "server.weighting=uniform"],
}
WITH_ARGSORT = ("pruning 0.5", "top-k 1%")  # also run with the previous selection
WITH_ALL_SLOTS = ("Poisson batches", "DP-SGD z=1 Poisson")  # also run computing every batch slot


def compiled(config: ExperimentConfig) -> list:
    """[experiment, state after one warm-up round that compiles]."""
    experiment = Experiment(config, progress=False)
    state, _ = experiment.step(experiment.initial_state, 0)
    jax.block_until_ready(state.params)
    return [experiment, state]


def accounting_seconds(experiment: Experiment, rounds: int) -> float:
    """Median host time (s) of one round's privacy accounting (record the cohort, then the epsilons so far with
    their bases), on a copy of ``experiment``'s tracker fed the round's cohorts from round 1 on."""
    tracker = copy.deepcopy(experiment.privacy)
    spent = []
    for r in range(1, rounds + 1):
        cohort, _ = experiment.round_cohort(r, tracker)
        participants = cohort.ids[cohort.mask]
        start = time.perf_counter()
        tracker.record_round(participants)
        tracker.summary()
        spent.append(time.perf_counter() - start)
    return statistics.median(spent)


def argsort_keep_above_rank(scores: jax.Array, num_removed: jax.Array) -> jax.Array:
    """The selection top-k and pruning used before: stable-argsort ranks, then ranks >= num_removed."""
    flat = scores.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    ranks = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return (ranks >= num_removed).astype(jnp.float32).reshape(scores.shape)


@contextlib.contextmanager
def all_slots():
    """Runs built inside the block compute every batch slot of a step (``LocalSpec.slot_chunk`` 0)."""
    saved = experiment_module.slot_chunk
    experiment_module.slot_chunk = lambda *args: 0
    try:
        yield
    finally:
        experiment_module.slot_chunk = saved


@contextlib.contextmanager
def argsort_selection():
    """Top-k and pruning masks select through ``argsort_keep_above_rank`` inside the block."""
    saved = pruning.keep_above_rank, sparsify.keep_above_rank
    pruning.keep_above_rank = sparsify.keep_above_rank = argsort_keep_above_rank
    try:
        yield
    finally:
        pruning.keep_above_rank, sparsify.keep_above_rank = saved


def selection_seconds(select, scores: jax.Array, removed: jax.Array, repeats: int) -> float:
    run = jax.jit(jax.vmap(select))
    run(scores, removed).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(scores, removed).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def workload_parser(description: str) -> argparse.ArgumentParser:
    """The workload flags the defense benchmarks share: model, clients, local steps and batch size."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", choices=("logreg", "mlp", "cnn"))
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    return parser


def workload_config(args: argparse.Namespace, *overrides: str) -> ExperimentConfig:
    """Digits split iid over ``args.clients`` clients, every client in every round, no checkpoints."""
    return with_overrides(ExperimentConfig(), [
        f"data.num_clients={args.clients}", "data.partition=iid", f"model.name={args.model}",
        f"client.local_steps={args.steps}", f"client.batch_size={args.batch}",
        f"server.clients_per_round={args.clients}", "run.checkpoint_every=0", *overrides])


def main() -> None:
    parser = workload_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--only", default="", help="comma-separated defense names (default: all)")
    args = parser.parse_args()
    stop = stop_on_term()
    base = workload_config(args)
    names = ["plain"] + [n for n in DEFENSES if n != "plain" and (not args.only or n in args.only.split(","))]
    variants = {}
    for name in names:
        for label, selection in [(name, contextlib.nullcontext())] + (
                [(f"{name} (argsort)", argsort_selection())] if name in WITH_ARGSORT else []) + (
                [(f"{name} (all slots)", all_slots())] if name in WITH_ALL_SLOTS else []):
            with selection:  # the selection is traced into the program while it compiles
                variants[label] = compiled(with_overrides(base, DEFENSES[name]))
    times = {label: [] for label in variants}
    for r in range(1, args.rounds + 1):  # interleaved: every variant once per repeat, in turn
        for label, entry in variants.items():
            start = time.perf_counter()
            entry[1], _ = entry[0].step(entry[1], r)
            jax.block_until_ready(entry[1].params)
            times[label].append(time.perf_counter() - start)
        if stop.is_set():
            break
    plain = np.asarray(times["plain"])
    done = len(plain)
    print(f"{jax.devices()[0].platform} x{jax.device_count()}, model {args.model}, {args.clients} clients x "
          f"{args.steps} steps of batch {args.batch}; {done} interleaved repeats"
          + (f" (stopped by SIGTERM; {args.rounds} asked)" if done < args.rounds else ""))
    print(f"{'defense':<32} {'round ms':>9} {'x plain (q25-q75)':>22}")
    for label, values in times.items():
        q25, q50, q75 = np.percentile(np.asarray(values) / plain, [25, 50, 75])
        print(f"{label:<32} {1e3 * statistics.median(values):9.2f} {q50:9.2f} ({q25:.2f}-{q75:.2f})", flush=True)
    if stop.is_set():
        return
    print(f"\n{'host accounting per round':<32} {'us':>9} {'% of round':>11}")
    for label, (experiment, state) in variants.items():
        if experiment.privacy.active:
            seconds = accounting_seconds(experiment, args.rounds * 20)
            print(f"{label:<32} {1e6 * seconds:9.1f} {100 * seconds / statistics.median(times[label]):10.2f}%")

    experiment = variants["plain"][0]
    size = max(leaf.size for leaf in jax.tree_util.tree_leaves(experiment.initial_state.params))
    scores = jnp.abs(jax.random.normal(jax.random.key(0), (args.clients, size)))
    removed = jnp.full((args.clients,), size - max(1, size // 100), jnp.int32)  # top-1% of the largest leaf
    new = selection_seconds(pruning.keep_above_rank, scores, removed, 10)
    old = selection_seconds(argsort_keep_above_rank, scores, removed, 10)
    same = bool(jnp.all(jax.vmap(pruning.keep_above_rank)(scores, removed)
                        == jax.vmap(argsort_keep_above_rank)(scores, removed)))
    print(f"\nselection of the top 1% of {args.clients} x {size} entries (largest leaf): bisection {new * 1e3:.2f} ms, "
          f"argsort ranks {old * 1e3:.2f} ms: {old / new:.1f}x faster, same masks: {same}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
