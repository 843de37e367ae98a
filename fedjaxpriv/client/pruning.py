"""Functional pruning masks for one client.

A mask is a pytree with the structure of the params whose leaves are float32 arrays of 0s and 1s.
Only kernels/weights (leaves with ``ndim >= 2``) are prunable; biases and normalization scales always get
a mask of ones. Sparsity is a traced scalar, so the number of pruned entries is never a Python integer:
``k = floor(sparsity * n)`` evaluated in float32, and the k lowest scores are found by ``keep_above_rank``.

References:
  Zhu, Gupta. "To prune, or not to prune: exploring the efficacy of pruning for model compression".
  ICLR Workshop 2018 (arXiv:1710.01878, 2017).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

PyTree = Any
Scope = Literal["layer", "global"]


def is_prunable(leaf: jax.Array) -> bool:
    """Kernels and weights (``ndim >= 2``) are prunable; biases and scales are not."""
    return jnp.ndim(leaf) >= 2


def num_pruned(sparsity: jax.Array | float, size: int) -> jax.Array:
    """``floor(sparsity * size)`` in float32, clipped to ``[0, size]``; int32 scalar."""
    product = jnp.asarray(sparsity, jnp.float32) * jnp.float32(size)
    return jnp.clip(jnp.floor(product), 0, size).astype(jnp.int32)


def _order_keys(scores: jax.Array) -> jax.Array:
    """uint32 keys of a flat float array with the order of the values, as XLA compares them: -0.0 and +0.0
    alike (and subnormals, which XLA's CPU flushes to zero, too); no NaNs."""
    x = scores.reshape(-1).astype(jnp.float32)
    x = jnp.where(x == 0, jnp.float32(0.0), x)  # -0.0 -> +0.0 (XLA simplifies x + 0.0 away)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(0x80000000))


def keep_above_rank(scores: jax.Array, num_removed: jax.Array) -> jax.Array:
    """Float32 mask (shape of ``scores``) that zeroes exactly the ``num_removed`` lowest scores, ties broken by
    index (the lower index goes first), as a stable argsort would rank them.

    Without sorting: the ``num_removed``-th lowest score is found by bisection over its 32-bit key (32 counting
    passes, exact), then the ties at it are taken in index order. On CPU, vmapped over 64 clients of 32k
    entries, this is 10x faster than argsort ranks.
    """
    keys = _order_keys(scores)
    m = jnp.asarray(num_removed, jnp.int32)

    def halve(_, bounds):  # the smallest key v with #(keys <= v) >= m lies in [lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(keys <= mid, dtype=jnp.int32) >= m
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    threshold, _ = jax.lax.fori_loop(0, 32, halve, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
    below, tied = keys < threshold, keys == threshold
    removed = below | (tied & (jnp.cumsum(tied, dtype=jnp.int32) <= m - jnp.sum(below, dtype=jnp.int32)))
    return (~removed).astype(jnp.float32).reshape(scores.shape)


def _check_scope(scope: str) -> None:
    if scope not in ("layer", "global"):
        raise ValueError(f"scope={scope!r} is not supported; use 'layer' or 'global'.")


def _mask_from_scores(scores: PyTree, sparsity: jax.Array | float, scope: Scope) -> PyTree:
    """Zeroes the lowest-scoring ``floor(sparsity * n)`` prunable entries per layer or globally."""
    _check_scope(scope)
    leaves, treedef = jax.tree_util.tree_flatten(scores)
    prunable = [is_prunable(leaf) for leaf in leaves]
    if scope == "layer":
        masks = [
            keep_above_rank(leaf, num_pruned(sparsity, leaf.size)) if p else jnp.ones(leaf.shape, jnp.float32)
            for leaf, p in zip(leaves, prunable)
        ]
        return jax.tree_util.tree_unflatten(treedef, masks)
    pooled = [leaf.reshape(-1) for leaf, p in zip(leaves, prunable) if p]
    if not pooled:
        return jax.tree_util.tree_unflatten(treedef, [jnp.ones(leaf.shape, jnp.float32) for leaf in leaves])
    flat = jnp.concatenate(pooled)
    flat_mask = keep_above_rank(flat, num_pruned(sparsity, flat.size))
    masks, start = [], 0
    for leaf, p in zip(leaves, prunable):
        if p:
            masks.append(flat_mask[start : start + leaf.size].reshape(leaf.shape))
            start += leaf.size
        else:
            masks.append(jnp.ones(leaf.shape, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, masks)


def magnitude_mask(params: PyTree, sparsity: jax.Array | float, scope: Scope = "layer") -> PyTree:
    """Mask that zeroes the ``floor(sparsity * n)`` smallest-magnitude weights.

    Args:
      params: parameter pytree.
      sparsity: traced scalar in [0, 1), fraction of prunable weights to remove.
      scope: "layer" counts n per prunable leaf; "global" ranks all prunable weights together.

    Returns:
      mask pytree (float32 0/1, shapes of ``params``). Ties in magnitude are broken by flat index
      (lower index pruned first), so the count is exact.
    """
    scores = jax.tree_util.tree_map(lambda leaf: jnp.abs(leaf).astype(jnp.float32), params)
    return _mask_from_scores(scores, sparsity, scope)


def random_mask(key: jax.Array, params: PyTree, sparsity: jax.Array | float, scope: Scope = "layer") -> PyTree:
    """Mask that zeroes ``floor(sparsity * n)`` uniformly random prunable weights.

    Args:
      key: PRNG key; leaf i draws from ``fold_in(key, i)``.
      params: parameter pytree (only shapes are used).
      sparsity: traced scalar in [0, 1).
      scope: "layer" (exact count per prunable leaf) or "global".

    Returns:
      mask pytree (float32 0/1).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    scores = [jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(leaf)) for i, leaf in enumerate(leaves)]
    return _mask_from_scores(jax.tree_util.tree_unflatten(treedef, scores), sparsity, scope)


def apply_mask(tree: PyTree, mask: PyTree) -> PyTree:
    """Elementwise product of a pytree (params, gradients, updates) with a mask."""
    return jax.tree_util.tree_map(lambda leaf, m: leaf * m.astype(leaf.dtype), tree, mask)


def mask_sparsity(mask: PyTree) -> PyTree:
    """Fraction of zeros in each mask leaf; a pytree of float32 scalars with the mask's structure."""
    return jax.tree_util.tree_map(lambda m: jnp.mean((m == 0).astype(jnp.float32)), mask)


def iterative_sparsity(
    step: jax.Array | int,
    final_sparsity: jax.Array | float,
    begin: jax.Array | int,
    end: jax.Array | int,
    power: float = 3.0,
    initial_sparsity: jax.Array | float = 0.0,
) -> jax.Array:
    """Polynomial sparsity schedule of Zhu & Gupta (2017).

    ``s(t) = s_f + (s_i - s_f) * (1 - p)^power`` with progress ``p = clip((t - begin) / (end - begin), 0, 1)``:
    ``s_i`` before ``begin``, ``s_f`` from ``end`` on (a step at ``begin`` when ``end <= begin``).

    Args:
      step: traced round or step index t.
      final_sparsity: traced s_f.
      begin: traced first step of pruning.
      end: traced step at which s_f is reached.
      power: exponent of the schedule (3 in the paper).
      initial_sparsity: traced s_i.

    Returns:
      float32 scalar sparsity.
    """
    step = jnp.asarray(step, jnp.float32)
    begin = jnp.asarray(begin, jnp.float32)
    end = jnp.asarray(end, jnp.float32)
    span = end - begin
    progress = jnp.where(span > 0, (step - begin) / jnp.where(span > 0, span, 1.0), jnp.where(step >= begin, 1.0, 0.0))
    progress = jnp.clip(progress, 0.0, 1.0)
    final_sparsity = jnp.asarray(final_sparsity, jnp.float32)
    initial_sparsity = jnp.asarray(initial_sparsity, jnp.float32)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** power
