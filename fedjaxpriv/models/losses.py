"""Losses and metrics over (optionally masked) batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example cross-entropy against probability targets. logits, targets: [B, K] -> [B]."""
    return optax.softmax_cross_entropy(logits, targets)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy over real examples. logits [B, K], labels [B] int, mask [B] bool -> scalar.

    A batch whose mask is all False has loss 0 (and so zero gradient).
    """
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if mask is None:
        return jnp.mean(per_example)
    weights = mask.astype(per_example.dtype)
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Fraction of real examples whose argmax matches the label (scalar)."""
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    if mask is None:
        return jnp.mean(correct)
    weights = mask.astype(jnp.float32)
    return jnp.sum(correct * weights) / jnp.maximum(jnp.sum(weights), 1.0)
