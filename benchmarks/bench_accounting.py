"""Per-client privacy accounting: dp_accounting curve by curve vs the vectorized RDP module, on one core.

One command, one process::

    python benchmarks/bench_accounting.py                      # 2,359 rates, sigma 1.0, 1e5 clients
    python benchmarks/bench_accounting.py --rates 2359 --sigma 1.0 --reference-rates 50

Workload: every client runs DP-SGD with batch ``--batch`` over its own data, so its per-step sampling rate
is ``batch / size``; client sizes are lognormal and ``--rates`` distinct sizes (hence rates) are drawn.
Rows:
  Poisson curves   one-step RDP of the Poisson-subsampled Gaussian at ``DEFAULT_ORDERS`` for every rate:
                   ``RdpAccountant.compose(PoissonSampledDpEvent)`` per rate vs one ``poisson_gaussian_rdp``.
  SWOR curves      the same for fixed-size batches without replacement (``SampledWithoutReplacementDpEvent``,
                   replace-one) vs one ``swor_gaussian_rdp``.
  epsilon rows     ``--clients`` (group, steps) rows, each the curve of its rate times its step count,
                   converted at ``--delta``: ``compute_epsilon`` per row vs one ``epsilons_from_rdp``.
  tracker          the run's ``PrivacyTracker`` for ``--tracker-clients`` clients over those rates (fixed-size
                   and Poisson DP-SGD): time to build it, its first round and later rounds (``--participants``
                   clients recorded, then every client's epsilon, as each round of a run does).
dp_accounting is timed on a subset (``--reference-rates`` curves, ``--reference-rows`` rows) and its time
per item is extrapolated to the full count; those cells are marked "(extrapolated)". The vectorized
functions run on everything (median of ``--repeats``). The last column is the largest relative difference
between the two on the timed subset. The process is pinned to one core unless ``--all-cores``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from importlib.metadata import version
from typing import Any, Callable

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dp_accounting  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402
from dp_accounting import rdp as dp_rdp  # noqa: E402

from fedjaxpriv.privacy import rdp  # noqa: E402

ORDERS = list(rdp.DEFAULT_ORDERS)


def median_seconds(run: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``run`` after one untimed warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def draw_client_sizes(count: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct client dataset sizes > batch, drawn from a lognormal (median 400 examples)."""
    pool = np.unique(np.maximum(batch + 1, np.round(rng.lognormal(np.log(400.0), 1.0, 1_000_000))))
    if pool.size < count:
        raise SystemExit(f"only {pool.size} distinct client sizes drawn; ask for fewer --rates")
    return np.sort(rng.choice(pool, count, replace=False)).astype(np.int64)


def reference_poisson(q: float, sigma: float) -> np.ndarray:
    accountant = dp_rdp.RdpAccountant(ORDERS)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
    return accountant.rdp


def reference_swor(n: int, m: int, sigma: float) -> np.ndarray:
    accountant = dp_rdp.RdpAccountant(ORDERS, neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(sigma)))
    return accountant.rdp


def timed_loop(items: list, compute: Callable[[Any], Any]) -> tuple[float, list]:
    """Seconds per item of ``compute`` over ``items`` (one pass), and the results."""
    start = time.perf_counter()
    results = [compute(item) for item in items]
    return (time.perf_counter() - start) / len(items), results


def max_rel_diff(ours: np.ndarray, reference: np.ndarray) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    finite = np.isfinite(reference) & (reference != 0)
    same = np.all((ours == reference) | finite)
    rel = np.abs(ours[finite] - reference[finite]) / np.abs(reference[finite])
    return float(rel.max(initial=0.0)) if same else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=int, default=2359, help="distinct sampling rates (client sizes)")
    parser.add_argument("--sigma", type=float, default=1.0, help="noise multiplier of every client")
    parser.add_argument("--batch", type=int, default=16, help="DP-SGD batch size (rate = batch / size)")
    parser.add_argument("--clients", type=int, default=100_000, help="(group, steps) rows to convert")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--reference-rates", type=int, default=50, help="curves timed with dp_accounting")
    parser.add_argument("--reference-rows", type=int, default=2000, help="rows converted with dp_accounting")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the vectorized calls (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--all-cores", action="store_true", help="do not pin the process to one core")
    parser.add_argument("--tracker-clients", type=int, default=100_000, help="clients of the tracker rows")
    parser.add_argument("--participants", type=int, default=1000, help="clients per round of the tracker rows")
    parser.add_argument("--tracker-rounds", type=int, default=30, help="rounds timed in the tracker rows")
    args = parser.parse_args()

    pinned = "no"
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        pinned = f"core {core}"
    rng = np.random.default_rng(args.seed)
    sizes = draw_client_sizes(args.rates, args.batch, rng)
    q = args.batch / sizes
    sigma = np.full(args.rates, args.sigma)
    subset = np.sort(rng.choice(args.rates, min(args.reference_rates, args.rates), replace=False))
    groups = rng.integers(0, args.rates, args.clients)
    steps = rng.integers(1, 1001, args.clients).astype(np.float64)
    row_subset = rng.choice(args.clients, min(args.reference_rows, args.clients), replace=False)

    versions = f"numpy={np.__version__} scipy={scipy.__version__} dp_accounting={version('dp-accounting')}"
    load = tuple(round(v, 2) for v in os.getloadavg())
    print(f"{versions} cores={os.cpu_count()} pinned={pinned} load(1,5,15 min)={load}")
    print(f"{args.rates} distinct rates batch {args.batch} / size (sizes {sizes.min()}..{sizes.max()}, "
          f"q {q.min():.2e}..{q.max():.2e}), sigma {args.sigma}, {len(ORDERS)} orders "
          f"{ORDERS[0]:g}..{ORDERS[-1]:g} (dp_accounting defaults); "
          f"{args.clients} (group, steps) rows, steps 1..1000, delta {args.delta}\n")

    rows = []

    # Poisson curves.
    per_rate, reference = timed_loop(list(subset), lambda g: reference_poisson(q[g], args.sigma))
    ours_seconds = median_seconds(lambda: rdp.poisson_gaussian_rdp(q, sigma), args.repeats)
    poisson = rdp.poisson_gaussian_rdp(q, sigma)
    rows.append(("Poisson curves", args.rates, per_rate, len(subset), ours_seconds,
                 max_rel_diff(poisson[subset], np.array(reference))))

    # Sampling without replacement.
    per_rate, reference = timed_loop(list(subset), lambda g: reference_swor(int(sizes[g]), args.batch, args.sigma))
    ours_seconds = median_seconds(lambda: rdp.swor_gaussian_rdp(q, sigma), args.repeats)
    swor = rdp.swor_gaussian_rdp(q, sigma)
    rows.append(("SWOR curves", args.rates, per_rate, len(subset), ours_seconds,
                 max_rel_diff(swor[subset], np.array(reference))))

    # Conversion of (group, steps) rows: the rows are built from the group curves inside the timed call.
    def convert() -> np.ndarray:
        return rdp.epsilons_from_rdp(ORDERS, steps[:, None] * poisson[groups], args.delta)

    def reference_epsilon(i: int) -> float:
        return dp_rdp.compute_epsilon(ORDERS, list(steps[i] * poisson[groups[i]]), args.delta)[0]

    per_row, reference = timed_loop(list(row_subset), reference_epsilon)
    ours_seconds = median_seconds(convert, args.repeats)
    rows.append((f"epsilon rows ({args.clients} clients)", args.clients, per_row, len(row_subset), ours_seconds,
                 max_rel_diff(convert()[row_subset], np.array(reference))))

    header = (f"{'stage':<30} {'items':>7} {'dp_accounting s (extrapolated)':>38} {'vectorized s':>13} "
              f"{'speed-up':>9} {'max rel diff':>13}")
    print(header + "\n" + "-" * len(header))
    for name, items, per_item, timed, ours_seconds, diff in rows:
        theirs = per_item * items
        label = f"{theirs:,.2f} ({timed} timed, {per_item * 1e3:.2f} ms each)"
        print(f"{name:<30} {items:>7} {label:>38} {ours_seconds:>13.3f} {theirs / ours_seconds:>8.0f}x "
              f"{diff:>13.1e}")
    for kind, curve_row in (("Poisson", rows[0]), ("SWOR", rows[1])):
        ours = curve_row[4] + rows[2][4]
        theirs = curve_row[2] * curve_row[1] + rows[2][2] * rows[2][1]
        print(f"{'per round, ' + kind + ' + epsilons':<30} {'':>7} {theirs:>38,.2f} {ours:>13.3f} "
              f"{theirs / ours:>8.0f}x")
    print("\nThe run's tracker (fedjaxpriv.privacy.tracking.PrivacyTracker) over the same rates, end to end:")
    for poisson, reference_round in ((False, rows[1][2] * rows[1][1]), (True, rows[0][2] * rows[0][1])):
        built, first, later = tracker_round_seconds(sizes, args, poisson, rng)
        kind = "Poisson" if poisson else "fixed-size"
        print(f"  {kind:<10} {args.tracker_clients} clients: build {built:.3f} s, first round {first:.3f} s, "
              f"later rounds {later:.3f} s each (record {args.participants} participants + every epsilon); "
              f"dp_accounting's curves alone: {reference_round:,.1f} s ({reference_round / (built + first):,.0f}x)")
    print(f"\nload after: {tuple(round(v, 2) for v in os.getloadavg())}")


def tracker_round_seconds(sizes: np.ndarray, args: argparse.Namespace, poisson: bool,
                          rng: np.random.Generator) -> tuple[float, float, float]:
    """Seconds to build a ``PrivacyTracker`` for ``args.tracker_clients`` DP-SGD clients whose sizes take the
    given distinct values, then for its first round and (median) later rounds of ``args.participants``."""
    from fedjaxpriv.privacy.mechanisms import sample_level_dpsgd
    from fedjaxpriv.privacy.tracking import PrivacyTracker

    counts = rng.choice(sizes, args.tracker_clients)
    counts[: sizes.size] = sizes  # every distinct size (rate) occurs
    c = args.tracker_clients
    start = time.perf_counter()
    mechanism = sample_level_dpsgd(np.full(c, args.sigma), np.full(c, poisson), args.batch / counts,
                                   np.full(c, args.batch), counts, np.zeros(c, bool), np.full(c, 1e-17 * poisson))
    tracker = PrivacyTracker(num_clients=c, steps_per_round=np.full(c, 10), delta=args.delta,
                             sample_level=mechanism)
    built = time.perf_counter() - start
    times = []
    for _ in range(args.tracker_rounds):
        start = time.perf_counter()
        tracker.record_round(rng.choice(c, args.participants, replace=False))
        tracker.summary()
        times.append(time.perf_counter() - start)
    return built, times[0], statistics.median(times[1:])


if __name__ == "__main__":
    main()
