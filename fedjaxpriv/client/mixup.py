"""Mixup data augmentation for one client's batch (Zhang et al. 2018).

References:
  Zhang, Cisse, Dauphin, Lopez-Paz. "mixup: Beyond Empirical Risk Minimization". ICLR 2018.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def real_example_permutation(key: jax.Array, mask: jax.Array) -> jax.Array:
    """A random permutation of the batch that maps real rows to real rows.

    Args:
      key: PRNG key.
      mask: [B] bool, True for real examples, False for padding.

    Returns:
      partner: [B] int32 indices, a permutation of ``range(B)`` with ``mask[partner[i]] == mask[i]``;
        the real rows are shuffled uniformly among themselves.
    """
    batch = mask.shape[0]
    # Real rows in index order, then padded rows in index order.
    in_order = jnp.argsort(jnp.where(mask, 0, 1), stable=True)
    # Real rows in random order, then padded rows (scores of 2 sort after every uniform draw).
    scores = jnp.where(mask, jax.random.uniform(key, (batch,)), 2.0)
    shuffled = jnp.argsort(scores, stable=True)
    return jnp.zeros((batch,), jnp.int32).at[in_order].set(shuffled.astype(jnp.int32))


def mixup(
    key: jax.Array,
    x: jax.Array,
    y_onehot: jax.Array,
    mask: jax.Array,
    alpha: jax.Array | float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mixes each real example with a random real partner, one mixing weight per batch.

    ``x_mixed = lam * x + (1 - lam) * x[partner]`` (same for the labels) with ``lam ~ Beta(alpha, alpha)``
    and ``partner`` a random permutation of the real rows, so padding never leaks into real rows.

    Args:
      key: PRNG key.
      x: [B, ...] float32 inputs.
      y_onehot: [B, K] float32 one-hot (or soft) labels.
      mask: [B] bool, True for real examples.
      alpha: traced scalar Beta concentration; ``alpha <= 0`` disables mixing (``lam = 1`` and the
        outputs are the inputs, bit for bit).

    Returns:
      (x_mixed [B, ...], y_mixed [B, K], lam scalar float32).
    """
    alpha = jnp.asarray(alpha, jnp.float32)
    enabled = alpha > 0
    key_lam, key_perm = jax.random.split(key)
    safe_alpha = jnp.where(enabled, alpha, 1.0)
    lam = jnp.where(enabled, jax.random.beta(key_lam, safe_alpha, safe_alpha), 1.0).astype(jnp.float32)
    partner = real_example_permutation(key_perm, mask)

    def mix(values: jax.Array) -> jax.Array:
        lam_cast = lam.astype(values.dtype)
        mixed = lam_cast * values + (1 - lam_cast) * values[partner]
        return jnp.where(enabled, mixed, values)

    return mix(x), mix(y_onehot), lam
