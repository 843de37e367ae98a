"""Evaluation of the global model: test loss/accuracy and the per-client accuracy distribution."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjaxpriv.client.local import ApplyFn

Params = Any


@partial(jax.jit, static_argnums=(0,))
def _batch_stats(apply_fn: ApplyFn, params: Params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = apply_fn(params, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
    return loss, correct


def per_example_stats(apply_fn: ApplyFn, params: Params, x: np.ndarray, y: np.ndarray,
                      batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-example loss [N] and correctness [N] (float32), in fixed-size padded batches (one compile)."""
    n = int(y.shape[0])
    batch = max(1, min(batch_size, n))
    losses, corrects = [], []
    for start in range(0, n, batch):
        xb, yb = x[start : start + batch], y[start : start + batch]
        pad = batch - yb.shape[0]
        if pad:
            xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
            yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
        loss, correct = _batch_stats(apply_fn, params, jnp.asarray(xb), jnp.asarray(yb))
        losses.append(np.asarray(loss)[: batch - pad])
        corrects.append(np.asarray(correct)[: batch - pad])
    return np.concatenate(losses), np.concatenate(corrects)


def evaluate(apply_fn: ApplyFn, params: Params, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> dict[str, float]:
    """Mean loss and accuracy of ``params`` on (x [N, ...], y [N])."""
    loss, correct = per_example_stats(apply_fn, params, x, y, batch_size)
    return {"loss": float(np.mean(loss)), "accuracy": float(np.mean(correct))}


def per_client_accuracy(apply_fn: ApplyFn, params: Params, x: np.ndarray, y: np.ndarray, offsets: np.ndarray,
                        counts: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Accuracy of the global model on each client's own examples: [C] (NaN for empty clients).

    One pass over the flat population arrays, then a segment mean by client.
    """
    _, correct = per_example_stats(apply_fn, params, x, y, batch_size)
    client_of_example = np.repeat(np.arange(counts.shape[0]), counts)
    order = np.concatenate([np.arange(o, o + c) for o, c in zip(offsets, counts)]) if counts.sum() else np.zeros(0, int)
    sums = np.bincount(client_of_example, weights=correct[order], minlength=counts.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def distribution_summary(values: np.ndarray, prefix: str) -> dict[str, float]:
    """Mean, std and 10/50/90th percentiles of a per-client metric, ignoring NaNs."""
    v = values[~np.isnan(values)]
    if v.size == 0:
        return {}
    q10, q50, q90 = np.percentile(v, [10, 50, 90])
    return {f"{prefix}_mean": float(v.mean()), f"{prefix}_std": float(v.std()), f"{prefix}_p10": float(q10),
            f"{prefix}_p50": float(q50), f"{prefix}_p90": float(q90)}
