"""Per-step example sampling for one client, with static shapes.

Both samplers draw from a client's ``count`` real examples using ``max_count`` uniforms, so the shapes do
not depend on the client and many clients with different sizes run in one vectorized call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
    """Static batch slots for Poisson sampling: expected size plus ``tail_sigmas`` binomial std devs."""
    import math

    slots = expected_batch + tail_sigmas * math.sqrt(max(expected_batch, 1.0)) + 1
    return int(min(max_count, math.ceil(slots)))
