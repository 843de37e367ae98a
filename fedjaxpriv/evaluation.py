"""Evaluation of the global model: test loss and the task's metrics, and the per-client metric distribution."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv.client.local import ApplyFn
from fedjaxpriv.models.losses import accuracy_per_example
from fedjaxpriv.models.tasks import CLASSIFICATION, Task

Params = Any


@partial(jax.jit, static_argnums=(0, 1))
def _batch_stats(task: Task, apply_fn: ApplyFn, params: Params, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    logits = apply_fn(params, x)
    return {"loss": task.loss(logits, y), **task.metrics(logits, y)}


def per_example_metrics(apply_fn: ApplyFn, params: Params, x: np.ndarray, y: np.ndarray, batch_size: int = 1024, *,
                        task: Task = CLASSIFICATION) -> dict[str, np.ndarray]:
    """The task's per-example loss and metrics: {"loss": [N], metric: [N], ...}, in fixed-size padded batches
    (one compile). x [N, ...], y [N, ...] the task's targets."""
    n = int(y.shape[0])
    batch = max(1, min(batch_size, n))
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n, batch):
        xb, yb = x[start : start + batch], y[start : start + batch]
        pad = batch - yb.shape[0]
        if pad:
            xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
            yb = np.concatenate([yb, np.zeros((pad,) + yb.shape[1:], yb.dtype)])
        stats = _batch_stats(task, apply_fn, params, jnp.asarray(xb), jnp.asarray(yb))
        parts.append({k: np.asarray(v)[: batch - pad] for k, v in stats.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def per_example_stats(apply_fn: ApplyFn, params: Params, x: np.ndarray, y: np.ndarray,
                      batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Classification: per-example loss [N] and correctness [N] (float32)."""
    stats = per_example_metrics(apply_fn, params, x, y, batch_size, task=CLASSIFICATION)
    return stats["loss"], stats["accuracy"]


def evaluate(apply_fn: ApplyFn, params: Params, x: np.ndarray, y: np.ndarray, batch_size: int = 1024, *,
             task: Task = CLASSIFICATION) -> dict[str, float]:
    """The loss and the task's metrics of ``params`` on (x [N, ...], y [N, ...]), e.g. {"loss", "accuracy"}: means
    over examples, or the task's own pooling (``Task.pooled``, e.g. per real token for next-token prediction)."""
    per_example = per_example_metrics(apply_fn, params, x, y, batch_size, task=task)
    if task.pooled is not None:
        return task.pooled(per_example)
    return {k: float(np.mean(v)) for k, v in per_example.items()}


def per_client_metric(apply_fn: ApplyFn, params: Params, x: np.ndarray, y: np.ndarray, offsets: np.ndarray,
                      counts: np.ndarray, batch_size: int = 1024, *, task: Task = CLASSIFICATION,
                      metric: str | None = None) -> np.ndarray:
    """A metric (default the task's primary one) of the global model on each client's own examples: [C] (NaN for
    empty clients). One pass over the flat population arrays, then a segment mean by client."""
    values = per_example_metrics(apply_fn, params, x, y, batch_size, task=task)[metric or task.primary]
    client_of_example = np.repeat(np.arange(counts.shape[0]), counts)
    order = np.concatenate([np.arange(o, o + c) for o, c in zip(offsets, counts)]) if counts.sum() else np.zeros(0, int)
    sums = np.bincount(client_of_example, weights=values[order], minlength=counts.shape[0])
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


@partial(jax.jit, static_argnums=(0, 4))
def _models_correct(apply_fn: ApplyFn, models: Params, x: jax.Array, y: jax.Array, chunk: int) -> jax.Array:
    """[M, N] correctness (float32) of M models (leaves [M, ...]) on the same N examples, ``chunk`` at a time."""
    return jax.lax.map(lambda p: accuracy_per_example(apply_fn(p, x), y).astype(jnp.float32), models,
                       batch_size=chunk)


def models_accuracy(apply_fn: ApplyFn, models: Params, x: np.ndarray, y: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Accuracy of each of M models (leaves ``[M, ...]``) on the same examples (x [N, ...], y [N] labels): [M]."""
    return np.asarray(_models_correct(apply_fn, models, jnp.asarray(x), jnp.asarray(y), chunk)).mean(axis=1)


def label_mix_accuracy(correct: np.ndarray, y: np.ndarray, label_counts: np.ndarray) -> np.ndarray:
    """Accuracy of each model on test data mixed as its client's labels: ``sum_k p_c(k) acc_c(k)``, with
    ``p_c`` client c's label distribution over the classes the test set holds and ``acc_c(k)`` model c's
    accuracy on the test examples of class k. Under label skew (Dirichlet, shards) this is the expected
    accuracy on a test set drawn like the client's data.

    Args:
      correct: ``[C, N]`` (or ``[N]``, one model for all clients) correctness on the test set.
      y: ``[N]`` test labels.
      label_counts: ``[C, K]`` each client's training examples per class.

    Returns:
      ``[C]`` accuracies (NaN for a client without examples of a class the test set holds).
    """
    label_counts = np.asarray(label_counts, np.float64)
    num_classes = label_counts.shape[1]
    in_test = np.bincount(y, minlength=num_classes)[:num_classes]
    correct = np.broadcast_to(np.asarray(correct, np.float64), (label_counts.shape[0], y.shape[0]))
    per_class = np.stack([correct[:, y == k].mean(axis=1) if in_test[k] else np.zeros(correct.shape[0])
                          for k in range(num_classes)], axis=1)                                   # [C, K]
    weights = np.where(in_test > 0, label_counts, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(weights * per_class, axis=1) / weights.sum(axis=1)


def personal_metrics(apply_fn: ApplyFn, personal: Params, global_params: Params, x: np.ndarray, y: np.ndarray,
                     label_counts: np.ndarray, client_counts: np.ndarray, chunk: int = 32) -> dict[str, float]:
    """Personal models against the global model, each on test data mixed as its client's labels
    (``label_mix_accuracy``).

    Keys: ``personal_test_accuracy`` and ``global_test_accuracy_client_mix`` (means over all clients weighted by
    their examples; a client that never took part still holds the initial model), and the distribution of the
    personal accuracy over clients (``client_personal_accuracy_*``).

    Args:
      personal: the personal models, leaves ``[C, ...]``.
      global_params: the global model.
      x, y: the test set, ``[N, ...]`` and ``[N]`` labels.
      label_counts: ``[C, K]`` each client's training examples per class.
      client_counts: ``[C]`` each client's examples.
      chunk: personal models evaluated at once.
    """
    x, y = jnp.asarray(x), np.asarray(y)
    personal_correct = np.asarray(_models_correct(apply_fn, personal, x, jnp.asarray(y), chunk))
    global_correct = per_example_stats(apply_fn, global_params, np.asarray(x), y)[1]
    mine, theirs = (label_mix_accuracy(c, y, label_counts) for c in (personal_correct, global_correct))
    weights = np.where(np.isnan(mine), 0.0, np.asarray(client_counts, np.float64))
    total = max(weights.sum(), 1.0)
    return {"personal_test_accuracy": float(np.nansum(weights * mine) / total),
            "global_test_accuracy_client_mix": float(np.nansum(weights * theirs) / total),
            **distribution_summary(mine, "client_personal_accuracy")}


def label_counts_per_client(y: np.ndarray, offsets: np.ndarray, counts: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, K]`` each client's examples per class, from the flat labels ``y`` [T] and each client's offset and
    count [C]."""
    return np.stack([np.bincount(np.asarray(y[o:o + c], np.int64), minlength=num_classes)[:num_classes]
                     for o, c in zip(offsets, counts)])


def run_metrics(apply_fn: ApplyFn, params: Params, test: Any, population: Any, task: Task = CLASSIFICATION,
                personal: Params | None = None, label_counts: np.ndarray | None = None) -> dict[str, float]:
    """What a run records at an evaluated round: the global model's test loss and the task's metrics
    (``test_loss``, ``test_accuracy`` ...), the distribution of its primary metric over the clients' own examples
    (``client_accuracy_mean`` ...), and with ``personal`` models (leaves [C, ...]; classification, with
    ``label_counts`` [C, K]) ``personal_metrics``."""
    metric = task.primary
    record = {f"test_{k}": v for k, v in evaluate(apply_fn, params, test.x, test.y, task=task).items()}
    per_client = per_client_metric(apply_fn, params, population.x, population.y, population.offsets,
                                   population.counts, task=task, metric=metric)
    record.update(distribution_summary(per_client, f"client_{metric}"))
    if personal is not None and task is CLASSIFICATION:
        record.update(personal_metrics(apply_fn, personal, params, test.x, test.y, label_counts, population.counts))
    return record


def at_chance(accuracy: float, labels: np.ndarray) -> tuple[bool, float]:
    """Whether a test accuracy is not above what always predicting the test set's most frequent label scores,
    beyond three binomial standard errors of that rate over the ``labels [N]`` (or next-token targets [N, L],
    whose -1 entries are not scored); returns (verdict, that rate)."""
    labels = np.asarray(labels).reshape(-1)
    labels = labels[labels >= 0]  # next-token targets: padding and out-of-vocabulary (-1) are not scored
    if labels.size == 0:
        return False, float("nan")
    majority = float(np.max(np.unique(labels, return_counts=True)[1]) / labels.size)
    error = np.sqrt(majority * (1.0 - majority) / labels.size)
    return bool(accuracy <= majority + 3.0 * error), majority

