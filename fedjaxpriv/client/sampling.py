"""Per-step example sampling for one client, with static shapes.

Both samplers draw from a client's ``count`` real examples using ``max_count`` uniforms, so the shapes do
not depend on the client and many clients with different sizes run in one vectorized call.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats


def sample_batch(key: jax.Array, count: jax.Array, batch_size: jax.Array, sample_rate: jax.Array,
                 poisson: jax.Array, *, max_batch: int, max_count: int,
                 allow_poisson: bool = True) -> tuple[jax.Array, jax.Array]:
    """Indices of one local batch.

    Fixed-size sampling picks ``min(batch_size, count)`` distinct examples uniformly without replacement.
    Poisson sampling includes each example independently with probability ``sample_rate``; the batch has a
    random size (at most ``max_batch``; the caller sizes ``max_batch`` so that truncation is negligible).

    Args:
      key: PRNG key.
      count: int32 scalar, the client's number of examples (0 <= count <= max_count).
      batch_size: int32 scalar, fixed batch size (<= max_batch).
      sample_rate: float32 scalar in [0, 1], Poisson inclusion probability.
      poisson: bool scalar, which sampler to use.
      max_batch: static number of batch slots.
      max_count: static upper bound on ``count``.
      allow_poisson: static; False when no client samples Poisson batches (skips the inclusion draws).

    Returns:
      (idx [max_batch] int32 in [0, count), mask [max_batch] bool marking real batch entries).
    """
    order_key, include_key = jax.random.split(key)
    valid = jnp.arange(max_count) < count
    include = valid
    if allow_poisson:
        include &= jnp.where(poisson, jax.random.uniform(include_key, (max_count,)) < sample_rate, True)
    score = jnp.where(include, jax.random.uniform(order_key, (max_count,)), -1.0)
    k = min(max_batch, max_count)
    top_scores, idx = jax.lax.top_k(score, k)
    slots = jnp.arange(k)
    mask = (top_scores >= 0.0) & jnp.where(poisson, True, slots < batch_size)
    if k < max_batch:
        idx = jnp.pad(idx, (0, max_batch - k))
        mask = jnp.pad(mask, (0, max_batch - k))
    return idx.astype(jnp.int32), mask


def poisson_max_batch(expected_batch: float, max_count: int, tail_sigmas: float = 7.0) -> int:
    """Static batch slots for Poisson sampling without a privacy claim: expected size plus ``tail_sigmas``
    binomial std devs (``poisson_slots`` sizes them for DP)."""
    slots = expected_batch + tail_sigmas * math.sqrt(max(expected_batch, 1.0)) + 1
    return int(min(max_count, math.ceil(slots)))


CHUNKS_PER_EXPECTED_BATCH = 2  # slot_chunk: chunks per largest expected Poisson batch


def slot_chunk(settings, counts: np.ndarray, slots: int, costly_slots: bool) -> int:
    """Batch slots per chunk of a local step (``LocalSpec.slot_chunk``) for a population (``ClientSettings`` [C],
    data sizes [C]) with ``slots`` slots per step: with Poisson batches whose slots are ``costly_slots`` (DP-SGD's
    ghost norms and weighted pass, or a convolutional model), half the largest expected batch (rounded up), so that
    a step computes about its batch plus a half instead of the tail its slots are sized for. 0 (all slots at once)
    otherwise: a dense model's slot without DP-SGD costs too little for the loop over chunks to pay on CPU
    (``benchmarks/bench_defenses.py``, rows "all slots"), and fixed-size batches fill their slots."""
    poisson = np.asarray(settings.poisson, bool)
    if not (costly_slots and np.any(poisson)):
        return 0
    expected = np.asarray(settings.sample_rate, np.float64)[poisson] * np.asarray(counts, np.float64)[poisson]
    chunk = max(1, math.ceil(float(np.max(expected)) / CHUNKS_PER_EXPECTED_BATCH))
    return chunk if chunk < slots else 0


# Per-step probability that a DP client's Poisson batch (or a DP round's Poisson cohort) overflows its slots.
DP_OVERFLOW_TAIL = 1e-16


def overflow_probability(population: np.ndarray | int, rate: np.ndarray | float,
                         slots: np.ndarray | int) -> np.ndarray:
    """``P[Binomial(population, rate) > slots]``, float64 (0 when slots >= population)."""
    return np.asarray(stats.binom.sf(np.asarray(slots), np.asarray(population), np.asarray(rate)), np.float64)


def poisson_slots(population: np.ndarray | int, rate: np.ndarray | float, tail: float = DP_OVERFLOW_TAIL) -> int:
    """Smallest static slot count B with ``P[Binomial(n + 1, q) > B] <= tail`` for every (n, q) given.

    ``n + 1`` covers the add-one neighbour, so the overflow probability charged to delta holds for both
    neighbouring datasets. At most max(n) + 1 (then an overflow is impossible).
    """
    n = np.atleast_1d(np.asarray(population, np.int64)) + 1
    q = np.broadcast_to(np.asarray(rate, np.float64), n.shape)
    # Bisection on the survival function, which stays accurate far below the tails where binom.isf gives up.
    low, high = np.zeros(n.shape, np.int64), n.copy()  # P[X > n] = 0 <= tail, so the answer is in [0, n]
    while np.any(low < high):
        middle = (low + high) // 2
        fits = overflow_probability(n, q, middle) <= tail
        high, low = np.where(fits, middle, high), np.where(fits, low, middle + 1)
    return int(high.max(initial=0))


def batch_slots(settings, counts: np.ndarray, private: np.ndarray, tail: float = DP_OVERFLOW_TAIL) -> int:
    """Static batch slots per local step for a population (``ClientSettings`` [C], data sizes [C]).

    Fixed-size batches need ``min(batch_size, n)``; Poisson batches of clients without DP get the mean plus 7
    binomial std devs; Poisson batches of DP clients (``private`` [C] bool) get ``poisson_slots`` at overflow
    probability ``tail`` per step, which is charged to their delta (at most the largest client plus one, the
    add-one neighbour; ``privacy.tracking.dp_batch_slots`` sizes ``tail`` so that the charge stays small).
    """
    counts = np.asarray(counts, np.int64)
    max_count = max(1, int(counts.max(initial=0)))
    poisson = np.asarray(settings.poisson, bool)
    batch = np.minimum(np.asarray(settings.batch_size, np.int64), np.maximum(counts, 1))
    slots = int(batch[~poisson].max(initial=1))
    rates = np.asarray(settings.sample_rate, np.float64)
    plain = poisson & ~np.asarray(private, bool)
    if np.any(plain):
        slots = max(slots, poisson_max_batch(float(np.max(rates[plain] * counts[plain])), max_count))
    slots = min(slots, max_count)
    dp = poisson & np.asarray(private, bool)
    if np.any(dp):  # up to max_count + 1: the add-one neighbour of the largest client must fit too
        slots = max(slots, poisson_slots(counts[dp], rates[dp], tail))
    return int(slots)
