"""Per-example losses and metrics, and their means over (optionally masked) batches.

Every per-example function maps ``(logits, targets)`` with a leading batch axis B to ``[B]``; the tasks in
``models.tasks`` pair them up. The means treat a batch whose mask is all False as loss 0 (zero gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def integer_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy against integer labels. logits [B, K], labels [B] int -> [B] (nats)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example cross-entropy against probability targets. logits, targets: [B, K] -> [B]."""
    return optax.softmax_cross_entropy(logits, targets)


def sigmoid_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Binary cross-entropy of independent labels, averaged over labels. logits, targets [B, K] -> [B].

    ``targets`` are multi-hot (or soft, in [0, 1]) label indicators.
    """
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets.astype(logits.dtype)), axis=-1)


def token_cross_entropy(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over a sequence's real tokens. logits [B, T, V], tokens [B, T] int -> [B].

    Tokens < 0 are padding: they are ignored (a sequence with no real token has loss 0).
    """
    real = tokens >= 0
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(real, tokens, 0))
    return _masked_row_mean(per_token, real)


def accuracy_per_example(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """1.0 where the argmax is the label. logits [B, K], labels [B] int -> [B] float32."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def label_accuracy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Fraction of an example's labels predicted right (logit > 0 means on). [B, K], [B, K] -> [B]."""
    return jnp.mean(((logits > 0) == (targets > 0.5)).astype(jnp.float32), axis=-1)


def exact_match(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """1.0 where every label of the example is predicted right. [B, K], [B, K] -> [B] float32."""
    return jnp.all((logits > 0) == (targets > 0.5), axis=-1).astype(jnp.float32)


def token_accuracy(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Fraction of a sequence's real tokens (>= 0) whose argmax is the token. [B, T, V], [B, T] -> [B]."""
    real = tokens >= 0
    return _masked_row_mean((jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32), real)


def token_top_k_accuracy(logits: jax.Array, tokens: jax.Array, k: int) -> jax.Array:
    """Fraction of a sequence's real tokens (>= 0) among the ``k`` highest logits (ties broken towards the lower
    id, as ``jax.lax.top_k``). [B, T, V], [B, T] -> [B]."""
    real = tokens >= 0
    _, top = jax.lax.top_k(logits, k)
    hit = jnp.any(top == jnp.where(real, tokens, -1)[..., None], axis=-1)
    return _masked_row_mean(hit.astype(jnp.float32), real)


def _masked_row_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the trailing axes of ``values`` where ``mask``: [B, ...] -> [B] (0 for an empty row)."""
    axes = tuple(range(1, values.ndim))
    weights = mask.astype(values.dtype)
    return jnp.sum(values * weights, axis=axes) / jnp.maximum(jnp.sum(weights, axis=axes), 1.0)


def masked_mean(per_example: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean of a per-example value [B] over the real examples (mask [B] bool) -> scalar; 0 for an empty batch."""
    if mask is None:
        return jnp.mean(per_example)
    weights = mask.astype(per_example.dtype)
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy over real examples. logits [B, K], labels [B] int, mask [B] bool -> scalar.

    A batch whose mask is all False has loss 0 (and so zero gradient).
    """
    return masked_mean(integer_cross_entropy(logits, labels), mask)


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Fraction of real examples whose argmax matches the label (scalar)."""
    return masked_mean(accuracy_per_example(logits, labels), mask)
