"""DP building blocks in JAX: per-example clipping, Gaussian noise of a given std, the adaptive clip norm.

The noise std, denominators and accounting of each mechanism live in ``fedjaxpriv.privacy.mechanisms``.
All strengths (clip norm, noise multiplier, quantile, ...) are traced scalars, so these functions can be
``jax.vmap``-ed over clients with different privacy settings.

References:
  Abadi et al. "Deep Learning with Differential Privacy". CCS 2016.
  Andrew, Thakkar, McMahan, Ramaswamy. "Differentially Private Learning with Adaptive Clipping".
  NeurIPS 2021.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
_TINY = 1e-30


def per_example_global_norms(per_example_grads: PyTree) -> jax.Array:
    """L2 norm of each example's gradient over all leaves.

    Args:
      per_example_grads: pytree whose leaves have a leading batch axis B.

    Returns:
      norms: [B] float32.
    """
    leaves = jax.tree_util.tree_leaves(per_example_grads)
    squares = [jnp.sum(jnp.square(leaf.reshape(leaf.shape[0], -1).astype(jnp.float32)), axis=1) for leaf in leaves]
    return jnp.sqrt(sum(squares))


def clip_scale(norms: jax.Array, clip_norm: jax.Array | float) -> jax.Array:
    """Multiplier ``min(1, clip_norm / norm)`` (1 for zero norms and for ``clip_norm = inf``)."""
    clip_norm = jnp.asarray(clip_norm, jnp.float32)
    return jnp.where(norms > clip_norm, clip_norm / jnp.maximum(norms, _TINY), 1.0)


def clip_per_example(per_example_grads: PyTree, clip_norm: jax.Array | float) -> tuple[PyTree, jax.Array]:
    """Scales each example's gradient to global L2 norm at most ``clip_norm``.

    Args:
      per_example_grads: pytree whose leaves have a leading batch axis B.
      clip_norm: traced scalar; ``inf`` means no clipping.

    Returns:
      (clipped pytree with the input's structure, norms [B] before clipping).
    """
    norms = per_example_global_norms(per_example_grads)
    scale = clip_scale(norms, clip_norm)

    def rescale(leaf: jax.Array) -> jax.Array:
        return leaf * scale.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)

    return jax.tree_util.tree_map(rescale, per_example_grads), norms


def clip_weights(norms: jax.Array, mask: jax.Array, clip_norm: jax.Array | float) -> jax.Array:
    """[B] float32: each real example's clipping multiplier ``min(1, clip_norm / ||g_i||)`` (0 for padding), so
    that ``sum_i w_i g_i`` is the sum of the clipped gradients.

    Args:
      norms: [B] the per-example gradient norms ``||g_i||`` (``per_example_global_norms``, or
        ``client.ghost.per_example_norms`` without forming the gradients).
      mask: [B] bool, True for real examples.
      clip_norm: traced scalar clip norm (inf: no clipping).
    """
    return mask.astype(jnp.float32) * clip_scale(norms, clip_norm)


def clipped_sum(per_example_grads: PyTree, mask: jax.Array, clip_norm: jax.Array | float) -> PyTree:
    """Sum over real examples of the clipped gradients (L2 sensitivity ``clip_norm`` per example).

    Args:
      per_example_grads: pytree with leading batch axis B.
      mask: [B] bool, True for real examples.
      clip_norm: traced scalar clip norm.

    Returns:
      pytree with the per-example shapes (leading axis summed out).
    """
    weights = clip_weights(per_example_global_norms(per_example_grads), mask, clip_norm)
    return jax.tree_util.tree_map(lambda leaf: jnp.tensordot(weights.astype(leaf.dtype), leaf, axes=1),
                                  per_example_grads)


def standard_normal(key: jax.Array, shape: tuple[int, ...], two_words: bool = False) -> jax.Array:
    """float32 N(0, 1) draws of ``shape``, as ``jax.random.normal`` makes them; with ``two_words``, threefry's bits
    are taken two 32-bit words per threefry2x32 hash (``jax.threefry_partitionable(False)``) instead of one (the
    default keeps the XOR of the pair): the same distribution from half the hashes, other values. On CPU that
    makes a DP-SGD round of clients vmapped together 1.23-1.28x faster, and one client's unrolled program (the
    "host" strategy of convolutional models), whose default draws fuse into its update, 1.1-1.5x slower
    (``benchmarks/bench_dpsgd.py``, row "other noise draws"); runs keep the default. Either way a client's draws
    come from its own key alone, whatever the vmapping, chunking or devices."""
    if not two_words:
        return jax.random.normal(key, shape, jnp.float32)
    with jax.threefry_partitionable(False):
        return jax.random.normal(key, shape, jnp.float32)


def gaussian_noise_like(key: jax.Array, tree: PyTree, std: jax.Array | float) -> PyTree:
    """Independent N(0, std^2) noise with the structure of ``tree`` (``standard_normal``); leaf i uses
    ``fold_in(key, i)``."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    std = jnp.asarray(std, jnp.float32)
    noise = [(std * standard_normal(jax.random.fold_in(key, i), leaf.shape)).astype(leaf.dtype)
             for i, leaf in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, noise)


def adaptive_clip_update(
    clip_norm: jax.Array | float,
    norms: jax.Array,
    mask: jax.Array,
    target_quantile: jax.Array | float,
    learning_rate: jax.Array | float,
    noise_std: jax.Array | float,
    key: jax.Array,
    expected_count: jax.Array | float,
) -> jax.Array:
    """Geometric update of the clip norm towards a quantile of the norms (Andrew et al. 2021).

    ``b = (sum_real (1[norm_i <= C] - 1/2) + N(0, noise_std^2)) / expected_count + 1/2`` and
    ``C_new = C * exp(-learning_rate * (b - target_quantile))``: C shrinks when more than the target fraction of
    norms is below it, and grows otherwise. The centred indicators have sensitivity 1/2 and the denominator is
    the expected (not the realised) count, as in TF Privacy's quantile estimator, so the released clip norm is a
    Gaussian release that does not reveal how many took part.

    Args:
      clip_norm: traced scalar C > 0.
      norms: [B] float32 unclipped norms.
      mask: [B] bool, True for real participants.
      target_quantile: traced scalar in [0, 1].
      learning_rate: traced scalar step size of the geometric update.
      noise_std: traced scalar std of the Gaussian noise on the centred count (count units; 0 = no noise).
      key: PRNG key.
      expected_count: the data-independent denominator (expected number of participants), > 0.

    Returns:
      the new clip norm, float32 scalar.
    """
    clip_norm = jnp.asarray(clip_norm, jnp.float32)
    real = mask.astype(jnp.float32)
    centred = jnp.sum(real * (jnp.where(norms <= clip_norm, 1.0, 0.0) - 0.5))
    noise = jnp.asarray(noise_std, jnp.float32) * jax.random.normal(key, (), jnp.float32)
    fraction_below = (centred + noise) / jnp.asarray(expected_count, jnp.float32) + 0.5
    step = jnp.asarray(learning_rate, jnp.float32) * (fraction_below - jnp.asarray(target_quantile, jnp.float32))
    return clip_norm * jnp.exp(-step)
