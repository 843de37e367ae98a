"""DP-SGD's round against the plain round, and against weighting the per-example gradients, in one process.

One command::

    python benchmarks/bench_dpsgd.py                    # MLP on digits, 20 clients x 10 steps of batch 16
    python benchmarks/bench_dpsgd.py --repeats 30 --poisson

Variants, each an ``Experiment`` compiled before timing and then stepped in turn (plain, DP-SGD, DP-SGD as before,
plain, ...) so that load on the machine hits them alike:

* ``plain``: no DP;
* ``dp-sgd``: clip 1, noise multiplier 1, as ``client.local.dp_sgd_gradient`` computes it (norms by ghost norms,
  ``client.ghost``, the clipped sum from one weighted backward pass);
* ``dp-sgd (per-example norms)``: the norms from the [B, params] per-example gradients instead, the clipped sum
  as above;
* ``dp-sgd (weighted per-example)``: the clipped sum formed by clipping the per-example gradients and summing
  them (``client.dp.clipped_sum``, as ``SampleLevelDpSgd.noisy_gradient``);
* ``dp-sgd (other noise draws)``: the normals drawn two 32-bit words per threefry2x32 hash instead of JAX's default
  one, which runs keep (``client.dp.standard_normal(..., two_words=True)``): other draws of the same
  distribution.
The two older clipping forms are swapped in for ``client.local._clipped_sums`` while their experiments compile; the
noise, the mean and (with Poisson batches) the chunks of slots are the same for them.

Prints each variant's median round time, its ratio to the plain round (median and quartiles of the per-repeat
ratios) and each older form's time over ``dp-sgd``'s per repeat; every DP-SGD form starts from the same state with
the same keys, and the largest difference of their models from ``dp-sgd``'s after the timed rounds is printed
too.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedjaxpriv.client import dp as dp_ops, local  # noqa: E402
from bench_defenses import workload_config, workload_parser  # noqa: E402
from bench_engine import stop_on_term  # noqa: E402
from fedjaxpriv.config import with_overrides  # noqa: E402
from fedjaxpriv.experiment import Experiment  # noqa: E402


def weighted_per_example(apply_fn, params, x, targets, loss, mask, clip_norm):
    """The clipped sum by clipping and summing the per-example gradients, the losses from a batch forward pass."""
    grads = local._per_example_grads(apply_fn, params, x, targets, loss)
    return local.summed_loss(apply_fn, params, x, targets, mask, loss), dp_ops.clipped_sum(grads, mask, clip_norm)


def per_example_norms(apply_fn, params, x, targets, loss, mask, clip_norm):
    """The clipping multipliers from the per-example gradients' norms, the clipped sum from one weighted pass."""
    norms = dp_ops.per_example_global_norms(local._per_example_grads(apply_fn, params, x, targets, loss))
    losses, total = local._weighted_gradient_sum(apply_fn, params, x, targets, loss,
                                                 dp_ops.clip_weights(norms, mask, clip_norm))
    return jnp.sum(losses * mask.astype(losses.dtype)), total


@contextlib.contextmanager
def swapped_in(form):
    """DP-SGD's clipped sums (``client.local._clipped_sums``: whole batches and chunks of slots) by ``form``."""
    saved = local._clipped_sums
    local._clipped_sums = form
    try:
        yield
    finally:
        local._clipped_sums = saved


STANDARD_NORMAL = dp_ops.standard_normal


def two_word_draws(key, shape):
    """``client.dp.standard_normal`` two words per threefry hash."""
    return STANDARD_NORMAL(key, shape, two_words=True)


@contextlib.contextmanager
def swapped_noise(draw):
    """DP-SGD's standard normal draws (``client.dp.standard_normal``) by ``draw``."""
    saved = dp_ops.standard_normal
    dp_ops.standard_normal = draw
    try:
        yield
    finally:
        dp_ops.standard_normal = saved


def main() -> None:
    parser = workload_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--poisson", action="store_true", help="Poisson batch sampling (slots sized for its tail)")
    args = parser.parse_args()
    stop = stop_on_term()
    base = workload_config(args, *(["client.sampling=poisson"] if args.poisson else []))
    private = with_overrides(base, ["client.dp_clip_norm=1.0", "client.dp_noise_multiplier=1.0"])
    variants = {}
    for name, config, form in (("plain", base, contextlib.nullcontext()),
                               ("dp-sgd", private, contextlib.nullcontext()),
                               ("dp-sgd (per-example norms)", private, swapped_in(per_example_norms)),
                               ("dp-sgd (weighted per-example)", private, swapped_in(weighted_per_example)),
                               ("dp-sgd (other noise draws)", private, swapped_noise(two_word_draws))):
        with form:
            experiment = Experiment(config, progress=False)
            state, _ = experiment.step(experiment.initial_state, 0)  # compiles with this form
            jax.block_until_ready(state.params)
        variants[name] = [experiment, state]
    times = {name: [] for name in variants}
    for r in range(1, args.repeats + 1):
        for name, entry in variants.items():
            experiment, state = entry
            start = time.perf_counter()
            state, _ = experiment.step(state, r)
            jax.block_until_ready(state.params)
            times[name].append(time.perf_counter() - start)
            entry[1] = state
        if stop.is_set():
            break
    plain = np.asarray(times["plain"])
    sampling = "Poisson" if args.poisson else "fixed-size"
    print(f"{jax.devices()[0].platform} x{jax.device_count()}, model {args.model}, {args.clients} clients x "
          f"{args.steps} steps of batch {args.batch} ({sampling}), {len(plain)} interleaved repeats"
          + (f" (stopped by SIGTERM; {args.repeats} asked)" if len(plain) < args.repeats else ""))
    print(f"{'variant':<32} {'round ms':>9} {'x plain (q25-q75)':>22}")
    for name, values in times.items():
        ratios = np.asarray(values) / plain
        q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
        print(f"{name:<32} {1e3 * np.median(values):9.2f} {q50:9.2f} ({q25:.2f}-{q75:.2f})")
    for older in ("dp-sgd (per-example norms)", "dp-sgd (weighted per-example)", "dp-sgd (other noise draws)"):
        speedup = np.asarray(times[older]) / np.asarray(times["dp-sgd"])
        q25, q50, q75 = np.percentile(speedup, [25, 50, 75])
        if older == "dp-sgd (other noise draws)":  # the models differ by the noise
            print(f"{older} / dp-sgd: {q50:.2f}x ({q25:.2f}-{q75:.2f})")
            continue
        gap = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
            jax.tree_util.tree_leaves(variants["dp-sgd"][1].params),
            jax.tree_util.tree_leaves(variants[older][1].params)))
        print(f"{older} / dp-sgd: {q50:.2f}x ({q25:.2f}-{q75:.2f}); largest model difference after "
              f"{len(plain) + 1} rounds: {gap:.2e}")


if __name__ == "__main__":
    main()
