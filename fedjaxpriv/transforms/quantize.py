"""Unbiased stochastic quantizers with per-client traced precision.

References:
  Alistarh, Grubic, Li, Tomioka, Vojnovic. "QSGD: Communication-Efficient SGD via Gradient Quantization
  and Encoding". NeurIPS 2017.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjaxpriv.transforms.base import (
    FLOAT_BITS,
    MessageTransform,
    Settings,
    Strength,
    Wire,
    bit_length,
    check_strength,
    resolve,
    select_wire,
    stateless,
)

MAX_LEVELS = 2**30


def stochastic_round(key: jax.Array, scaled: jax.Array) -> jax.Array:
    """Rounds each entry of ``scaled`` up with probability equal to its fractional part (unbiased)."""
    lower = jnp.floor(scaled)
    up = jax.random.uniform(key, scaled.shape, jnp.float32) < (scaled - lower)
    return lower + up.astype(scaled.dtype)


def qsgd_leaf(key: jax.Array, leaf: jax.Array, levels: jax.Array) -> jax.Array:
    """QSGD quantization of one tensor with ``levels`` = s >= 1 uniform levels of ``|v_i| / ||v||``.

    ``Q(v)_i = ||v|| sign(v_i) xi_i / s`` with ``xi_i`` the stochastic rounding of ``s |v_i| / ||v||``;
    ``E Q(v) = v`` and ``E ||Q(v) - v||^2 <= min(n / s^2, sqrt(n) / s) ||v||^2``.
    """
    values = leaf.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(values)))
    safe_norm = jnp.where(norm > 0, norm, 1.0)
    levels = levels.astype(jnp.float32)
    xi = stochastic_round(key, jnp.abs(values) / safe_norm * levels)
    return (jnp.sign(values) * xi * (norm / levels)).astype(leaf.dtype)


def qsgd(levels: Strength = "qsgd_levels") -> MessageTransform:
    """QSGD: unbiased stochastic quantization of each leaf onto ``s`` levels of its L2 norm.

    Each leaf is a bucket: its norm is sent as one float32 and each transmitted coordinate as a sign bit
    plus ``ceil(log2(s + 1))`` bits for its level in ``0..s`` (fixed-length code, no Elias coding).
    Wire after: ``value_bits = 1 + ceil(log2(s + 1))``, ``side_bits += 32 * num_leaves``.

    Args:
      levels: settings field name or constant for s (int). ``s <= 0`` means off (pass-through).

    Stats: ``"qsgd/sq_error"``: ``||Q(v) - v||^2`` summed over leaves.
    """
    check_strength(levels, "levels")

    def apply(message, key, settings: Settings, wire: Wire):
        s = jnp.clip(resolve(levels, settings, jnp.int32), 0, MAX_LEVELS)
        enabled = s > 0
        safe_s = jnp.maximum(s, 1)
        leaves, treedef = jax.tree_util.tree_flatten(message)
        quantized = [
            jnp.where(enabled, qsgd_leaf(jax.random.fold_in(key, i), leaf, safe_s), leaf)
            for i, leaf in enumerate(leaves)
        ]
        sq_error = sum(jnp.sum(jnp.square((q - v).astype(jnp.float32))) for q, v in zip(quantized, leaves))
        on_wire = Wire(wire.values, 1 + bit_length(safe_s), wire.index_bits, wire.side_bits + FLOAT_BITS * len(leaves))
        out = jax.tree_util.tree_unflatten(treedef, quantized)
        return out, {"qsgd/sq_error": jnp.asarray(sq_error, jnp.float32)}, select_wire(enabled, on_wire, wire)

    return stateless(apply)


def stochastic_rounding_leaf(key: jax.Array, leaf: jax.Array, bits: jax.Array) -> jax.Array:
    """Unbiased rounding of one tensor to the ``2^bits`` evenly spaced points spanning ``[min, max]``."""
    values = leaf.astype(jnp.float32)
    low, high = jnp.min(values), jnp.max(values)
    intervals = jnp.exp2(bits.astype(jnp.float32)) - 1.0
    step = (high - low) / intervals
    safe_step = jnp.where(step > 0, step, 1.0)
    grid = jnp.clip(stochastic_round(key, (values - low) / safe_step), 0.0, intervals)
    rounded = low + grid * safe_step
    return jnp.where(step > 0, rounded, values).astype(leaf.dtype)


def stochastic_rounding(bits: Strength = "quant_bits") -> MessageTransform:
    """Unbiased stochastic rounding of each leaf to a uniform grid of ``2^b`` levels over ``[min, max]``.

    Wire after: ``value_bits = b`` and ``side_bits += 64 * num_leaves`` (min and max as float32).

    Args:
      bits: settings field name or constant for b (int). ``b <= 0`` or ``b >= 32`` means off
        (pass-through, full float32).

    Stats: ``"stochastic_rounding/sq_error"``: squared rounding error summed over leaves.
    """
    check_strength(bits, "bits")

    def apply(message, key, settings: Settings, wire: Wire):
        b = resolve(bits, settings, jnp.int32)
        enabled = (b > 0) & (b < FLOAT_BITS)
        safe_b = jnp.where(enabled, b, 1)
        leaves, treedef = jax.tree_util.tree_flatten(message)
        rounded = [
            jnp.where(enabled, stochastic_rounding_leaf(jax.random.fold_in(key, i), leaf, safe_b), leaf)
            for i, leaf in enumerate(leaves)
        ]
        sq_error = sum(jnp.sum(jnp.square((r - v).astype(jnp.float32))) for r, v in zip(rounded, leaves))
        on_wire = Wire(wire.values, safe_b, wire.index_bits, wire.side_bits + 2 * FLOAT_BITS * len(leaves))
        out = jax.tree_util.tree_unflatten(treedef, rounded)
        stats = {"stochastic_rounding/sq_error": jnp.asarray(sq_error, jnp.float32)}
        return out, stats, select_wire(enabled, on_wire, wire)

    return stateless(apply)
