"""Sparsifying message transforms: top-k, random-k and pruning masks, with per-client traced strengths.

The number of kept entries of a leaf with n entries is ``k = clip(ceil(fraction * n), 0, n)`` evaluated
in float32 and applied through ``pruning.keep_above_rank`` (exact, ties by index, no sort), so ``fraction``
may differ between vmapped clients.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from fedjaxpriv.client.pruning import Scope, is_prunable, keep_above_rank, magnitude_mask
from fedjaxpriv.transforms.base import (
    MessageTransform,
    Settings,
    Strength,
    Wire,
    check_strength,
    index_bits,
    lookup,
    resolve,
    select_wire,
    stateless,
)


def num_kept(fraction: jax.Array, size: int) -> jax.Array:
    """``clip(ceil(fraction * size), 0, size)`` in float32, as an int32 scalar."""
    return jnp.clip(jnp.ceil(fraction.astype(jnp.float32) * jnp.float32(size)), 0, size).astype(jnp.int32)


def _sparse_wire(wire: Wire, kept: list[jax.Array], sizes: list[int], indexed: list[bool]) -> Wire:
    """Wire after sending ``kept[i]`` values of leaf i, with a position index each where ``indexed[i]``.

    The new positions replace the previous stage's ``index_bits``; value bits and side bits carry over.
    """
    values = sum(kept)
    positions = sum(k * index_bits(n) for k, n, x in zip(kept, sizes, indexed) if x)
    return Wire(jnp.asarray(values, jnp.int32), wire.value_bits, jnp.asarray(positions, jnp.int32), wire.side_bits)


def _keep_k(fraction: Strength, *, random: bool, unbiased: bool, name: str) -> MessageTransform:
    check_strength(fraction, "fraction")

    def apply(message, key, settings: Settings, wire: Wire):
        frac = resolve(fraction, settings)
        enabled = frac < 1.0
        leaves, treedef = jax.tree_util.tree_flatten(message)
        out, kept = [], []
        for i, leaf in enumerate(leaves):
            k = num_kept(frac, leaf.size)
            if random:
                scores = jax.random.uniform(jax.random.fold_in(key, i), leaf.shape)
            else:
                scores = jnp.abs(leaf).astype(jnp.float32)
            mask = keep_above_rank(scores, leaf.size - k)
            sparse = leaf * mask.astype(leaf.dtype)
            if unbiased:
                sparse = sparse * (leaf.size / jnp.maximum(k, 1)).astype(leaf.dtype)
            out.append(jnp.where(enabled, sparse, leaf))
            kept.append(k)
        sizes = [leaf.size for leaf in leaves]
        new_wire = select_wire(enabled, _sparse_wire(wire, kept, sizes, [True] * len(sizes)), wire)
        sq_error = sum(jnp.sum(jnp.square((o - v).astype(jnp.float32))) for o, v in zip(out, leaves))
        return jax.tree_util.tree_unflatten(treedef, out), {f"{name}/sq_error": sq_error}, new_wire

    return stateless(apply)


def top_k(fraction: Strength = "topk_fraction") -> MessageTransform:
    """Keeps the ``k = ceil(fraction * n)`` largest-magnitude entries of each leaf, zeroes the rest.

    Ties are broken by flat index (higher index kept), so exactly k entries survive. Each kept value
    is sent with a ``ceil(log2 n)``-bit index: wire ``values = sum k``, ``index_bits = sum k ceil(log2 n)``.

    Args:
      fraction: settings field name or constant; ``fraction >= 1`` means off (dense, no index bits).

    Stats: ``"top_k/sq_error"``.
    """
    return _keep_k(fraction, random=False, unbiased=False, name="top_k")


def random_k(fraction: Strength = "randk_fraction", unbiased: bool = False) -> MessageTransform:
    """Keeps ``k = ceil(fraction * n)`` uniformly random entries of each leaf (same wire cost as top-k).

    Args:
      fraction: settings field name or constant; ``fraction >= 1`` means off.
      unbiased: scale kept entries by ``n / k`` so the message is unbiased.

    Stats: ``"random_k/sq_error"``.
    """
    return _keep_k(fraction, random=True, unbiased=unbiased, name="random_k")


def prune_message(
    sparsity: Optional[Strength] = None, mask: Optional[str] = None, scope: Scope = "layer"
) -> MessageTransform:
    """Zeroes message entries with a pruning mask; give exactly one of ``sparsity`` and ``mask``.

    * ``mask``: name of a settings field holding a server-assigned mask pytree (message structure,
      0/1). The server knows it, so no index bits: wire ``values = number of ones``.
    * ``sparsity``: magnitude mask of the message itself (``floor(sparsity * n)`` smallest entries of
      each prunable leaf, see :func:`fedjaxpriv.client.pruning.magnitude_mask`); kept entries of
      prunable leaves carry ``ceil(log2 n)``-bit indices. ``sparsity <= 0`` means off.

    Stats: ``"prune/kept_fraction"``: fraction of coordinates kept.
    """
    if (sparsity is None) == (mask is None):
        raise ValueError(f"prune_message needs exactly one of sparsity={sparsity!r} and mask={mask!r}.")
    if sparsity is not None:
        check_strength(sparsity, "sparsity")
    if mask is not None and not isinstance(mask, str):
        raise ValueError(f"mask={mask!r} must be the name of a settings field holding a mask pytree.")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope={scope!r} is not supported; use 'layer' or 'global'.")

    def apply(message, key, settings: Settings, wire: Wire):
        del key
        leaves = jax.tree_util.tree_leaves(message)
        total = sum(leaf.size for leaf in leaves)
        if mask is not None:
            tree_mask = lookup(mask, settings)
            masked = jax.tree_util.tree_map(lambda v, m: v * m.astype(v.dtype), message, tree_mask)
            kept = sum(jnp.sum(m != 0) for m in jax.tree_util.tree_leaves(tree_mask))
            new_wire = Wire(jnp.asarray(kept, jnp.int32), wire.value_bits, wire.index_bits, wire.side_bits)
        else:
            s = resolve(sparsity, settings)
            enabled = s > 0
            tree_mask = magnitude_mask(message, s, scope)
            masked = jax.tree_util.tree_map(lambda v, m: jnp.where(enabled, v * m.astype(v.dtype), v), message,
                                            tree_mask)
            mask_leaves = jax.tree_util.tree_leaves(tree_mask)
            kept_per_leaf = [jnp.sum(m != 0).astype(jnp.int32) for m in mask_leaves]
            kept = sum(kept_per_leaf)
            sizes = [leaf.size for leaf in leaves]
            on_wire = _sparse_wire(wire, kept_per_leaf, sizes, [is_prunable(leaf) for leaf in leaves])
            new_wire = select_wire(enabled, on_wire, wire)
            kept = jnp.where(enabled, kept, total)
        return masked, {"prune/kept_fraction": jnp.asarray(kept, jnp.float32) / total}, new_wire

    return stateless(apply)
