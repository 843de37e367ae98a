"""Tasks: what a model is trained to predict — its per-example loss, the metrics that come with it, and the
soft-target form that mixup mixes.

    task = tasks.MULTI_LABEL                                # or tasks.as_task(my_loss) for any per-example loss
    per_example = task.loss(logits, targets)                # [B]
    metrics = task.metrics(logits, targets)                 # {"label_accuracy": [B], "exact_match": [B]}

Local training, evaluation and the loss-based attacks take the task explicitly; the default everywhere is
``CLASSIFICATION`` (softmax cross-entropy on integer labels). A task is hashable (its functions compare by
identity), so it can sit in the static spec of a compiled program; use the module-level tasks, or build a
custom one once, to keep one compiled program per task.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv.models import losses

PerExampleLoss = Callable[[jax.Array, jax.Array], jax.Array]
Metrics = Callable[[jax.Array, jax.Array], Mapping[str, jax.Array]]
Shape = tuple[int, ...]


def no_metrics(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    """The metrics of a bare loss: none (evaluation reports the loss only)."""
    del logits, targets
    return {}


@dataclasses.dataclass(frozen=True)
class Task:
    """A prediction task.

    Attributes:
      name: short name, recorded in the run's saved config.
      loss: ``(logits [B, ...], targets [B, ...]) -> [B]``, the per-example loss on the data's targets
        (evaluation and the loss-based attacks use it).
      metrics: ``(logits, targets) -> {name: [B]}``, per-example metrics (evaluation reports their means).
      soft_targets: ``(targets [B, ...], num_classes) -> float [B, ...]``, targets that mix linearly (mixup);
        None when the task has no such form (mixup then refuses to run).
      soft_loss: ``(logits, soft targets) -> [B]``, the same loss on soft targets. With a soft form, local
        training always trains on ``soft_loss(logits, soft_targets(targets))``, with or without mixup.
      logits_shape: ``(targets shape, num_classes) -> logits shape`` the task expects of a model, e.g.
        (B,) -> (B, K) for classification; None accepts any model output.
      primary: the metric reported per client (``client_<primary>_mean`` ...); "loss" when there are no metrics.
      pooled: ``{name: per-example values [N]} -> {name: float}``, the figures of a whole evaluation set from the
        per-example loss and metrics (e.g. weighted by each sequence's real tokens); None: the mean of each.
    """

    name: str
    loss: PerExampleLoss
    metrics: Metrics = no_metrics
    soft_targets: Callable[[jax.Array, int], jax.Array] | None = None
    soft_loss: PerExampleLoss | None = None
    logits_shape: Callable[[Shape, int], Shape] | None = None
    primary: str = "loss"
    pooled: Callable[[Mapping[str, np.ndarray]], dict[str, float]] | None = None

    def __post_init__(self) -> None:
        if (self.soft_targets is None) != (self.soft_loss is None):
            raise ValueError(f"task {self.name!r}: give soft_targets and soft_loss together (or neither).")

    @property
    def mixable(self) -> bool:
        """Whether the task has a soft-target form, which mixup needs."""
        return self.soft_loss is not None

    def training_targets(self, targets: jax.Array, num_classes: int) -> jax.Array:
        """The targets local training computes its loss on: soft ones where the task has them."""
        return targets if self.soft_targets is None else self.soft_targets(targets, num_classes)

    @property
    def training_loss(self) -> PerExampleLoss:
        """The per-example loss on ``training_targets``."""
        return self.loss if self.soft_loss is None else self.soft_loss


# -- built-in tasks ------------------------------------------------------------------------------------------

def _one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
    return jax.nn.one_hot(labels, num_classes)


def _as_float(targets: jax.Array, num_classes: int) -> jax.Array:
    del num_classes
    return targets.astype(jnp.float32)


def _classification_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    return {"accuracy": losses.accuracy_per_example(logits, labels)}


def _multi_label_metrics(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    return {"label_accuracy": losses.label_accuracy(logits, targets),
            "exact_match": losses.exact_match(logits, targets)}


def _next_token_metrics(logits: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
    return {"accuracy": losses.token_accuracy(logits, tokens),
            "top3_accuracy": losses.token_top_k_accuracy(logits, tokens, 3),
            "tokens": jnp.sum(tokens >= 0, axis=tuple(range(1, tokens.ndim))).astype(jnp.float32)}


def pooled_over_tokens(per_example: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Next-token figures of a corpus: each sequence's loss and accuracies (means over its real tokens) weighted
    by its real tokens, so that ``loss`` is the mean cross-entropy per real token (nats) and ``perplexity`` its
    exponential; ``tokens`` is the number of real tokens scored."""
    weights = np.asarray(per_example["tokens"], np.float64)
    total = float(np.sum(weights))
    out = {name: float(np.sum(np.asarray(values, np.float64) * weights) / max(total, 1.0))
           for name, values in per_example.items() if name != "tokens"}
    out["perplexity"] = float(np.exp(out["loss"]))
    out["tokens"] = total
    return out


def _class_axis(targets_shape: Shape, num_classes: int) -> Shape:
    return tuple(targets_shape) + (num_classes,)


def _same_as_targets(targets_shape: Shape, num_classes: int) -> Shape:
    del num_classes
    return tuple(targets_shape)


CLASSIFICATION = Task(name="classification", loss=losses.integer_cross_entropy, metrics=_classification_metrics,
                      soft_targets=_one_hot, soft_loss=losses.soft_cross_entropy, logits_shape=_class_axis,
                      primary="accuracy")
"""Softmax cross-entropy; targets [B] int labels in [0, K), logits [B, K]; accuracy; mixup mixes one-hot labels."""

MULTI_LABEL = Task(name="multi_label", loss=losses.sigmoid_cross_entropy, metrics=_multi_label_metrics,
                   soft_targets=_as_float, soft_loss=losses.sigmoid_cross_entropy, logits_shape=_same_as_targets,
                   primary="label_accuracy")
"""Independent sigmoid labels; targets [B, K] multi-hot, logits [B, K]; per-label accuracy and exact match;
mixup mixes the label indicators."""

NEXT_TOKEN = Task(name="next_token", loss=losses.token_cross_entropy, metrics=_next_token_metrics,
                  logits_shape=_class_axis, primary="accuracy", pooled=pooled_over_tokens)
"""Next-token prediction; targets [B, T] int tokens (< 0: padding or out of vocabulary, left out of the loss and
the metrics), logits [B, T, V]; top-1 and top-3 token accuracy and perplexity, pooled over a corpus's real tokens
(``pooled_over_tokens``). No soft form: mixing token sequences has no meaning, so mixup refuses it."""

TASKS: dict[str, Task] = {task.name: task for task in (CLASSIFICATION, MULTI_LABEL, NEXT_TOKEN)}


def check_targets(task: Task, targets: np.ndarray, num_classes: int, where: str) -> None:
    """Raises ValueError naming the first bad value when integer targets of a task whose targets index the
    logits' class axis (classification labels, next-token ids) fall outside [0, num_classes) (next-token
    targets may also be negative: padding). Other tasks' targets are not checked here."""
    targets = np.asarray(targets)
    if task.logits_shape is not _class_axis or targets.size == 0 or not np.issubdtype(targets.dtype, np.integer):
        return
    low = -np.inf if task is NEXT_TOKEN else 0
    bad = (targets < low) | (targets >= num_classes)
    if bad.any():
        value = int(targets[bad].flat[0])
        allowed = f"< {num_classes} (negative = padding)" if task is NEXT_TOKEN else f"in [0, {num_classes})"
        raise ValueError(f"{where} holds {int(bad.sum())} target(s) outside the {num_classes} classes, e.g. {value}; "
                         f"allowed: {allowed} (num_classes={num_classes}).")


def _qualname(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def as_task(loss: Task | PerExampleLoss | str | None) -> Task:
    """A ``Task`` from a task, a task name (``TASKS``), a bare per-example loss ``(logits, targets) -> [B]``
    (no metrics, no soft form) or None (``CLASSIFICATION``)."""
    if loss is None:
        return CLASSIFICATION
    if isinstance(loss, Task):
        return loss
    if isinstance(loss, str):
        if loss not in TASKS:
            raise ValueError(f"unknown task {loss!r}; choose one of {list(TASKS)} or pass a Task or a loss function.")
        return TASKS[loss]
    if not callable(loss):
        raise TypeError(f"loss={loss!r} must be a Task, a task name or a function (logits, targets) -> [B].")
    return Task(name=_qualname(loss), loss=loss)


def with_label_metrics(task: Task, logits_shape: Shape, target_shape: Shape, target_dtype: Any,
                       num_classes: int) -> Task:
    """A bare loss's task (no metrics) with classification's accuracy when its data are class labels: integer
    targets ``[B]`` and logits ``[B, num_classes]`` (``logits_shape`` of a batch, ``target_shape`` of one example),
    so that a user's own loss on labels keeps ``test_accuracy``; its name says so. Any other task as it is."""
    labels = tuple(target_shape) == () and np.issubdtype(np.dtype(target_dtype), np.integer)
    if task.metrics is not no_metrics or not labels or len(logits_shape) != 2 or logits_shape[1] != num_classes:
        return task
    return dataclasses.replace(task, name=f"{task.name} on class labels (accuracy)",
                               metrics=_classification_metrics, primary="accuracy")


def describe(task: Task) -> str:
    """How the saved config names a task: a built-in's name, or "user-supplied <name>"."""
    return task.name if TASKS.get(task.name) is task else f"user-supplied {task.name}"


def check_fits(task: Task, apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, input_shape: Sequence[int],
               input_dtype: Any, target_shape: Sequence[int], target_dtype: Any, num_classes: int,
               batch: int = 3) -> None:
    """Checks, on abstract values (nothing runs), that a model and a task fit the data.

    Args:
      task: the task.
      apply_fn: (params, x [B, *input_shape]) -> logits.
      params: the model's parameters (arrays or ``jax.ShapeDtypeStruct``).
      input_shape / input_dtype: one example's features.
      target_shape / target_dtype: one example's targets (``()`` for integer labels).
      num_classes: classes (labels, vocabulary) of the data.
      batch: the batch size traced.

    Raises:
      ValueError: naming what does not fit — the model cannot take the inputs, its output is not the shape the
        task expects, or the loss (or a metric) is not per-example ([B]).
    """
    x = jax.ShapeDtypeStruct((batch, *input_shape), input_dtype)
    y = jax.ShapeDtypeStruct((batch, *target_shape), target_dtype)
    try:
        logits = jax.eval_shape(apply_fn, params, x)
    except Exception as error:  # noqa: BLE001 - any tracing failure means the model does not take these inputs
        raise ValueError(f"the model cannot run on inputs of shape {x.shape} ({x.dtype}): "
                         f"{type(error).__name__}: {error}") from error
    if not isinstance(logits, jax.ShapeDtypeStruct):
        raise ValueError(f"the model must return one array of logits; it returned {logits!r}.")
    if task.logits_shape is not None:
        expected = task.logits_shape(y.shape, num_classes)
        if tuple(logits.shape) != tuple(expected):
            raise ValueError(f"the model's output shape {tuple(logits.shape)} does not fit task {task.name!r}: "
                             f"with {num_classes} classes and targets of shape {y.shape} it expects "
                             f"{tuple(expected)}.")
    for what, fn in (("loss", task.loss), ("metrics", task.metrics)):
        try:
            out = jax.eval_shape(fn, logits, y)
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"task {task.name!r}: the {what} fails on logits {tuple(logits.shape)} and targets "
                             f"{y.shape}: {type(error).__name__}: {error}") from error
        outputs = {"loss": out} if what == "loss" else dict(out)
        for name, value in outputs.items():
            if tuple(getattr(value, "shape", ())) != (batch,):
                raise ValueError(f"task {task.name!r}: {what} {name!r} returned shape "
                                 f"{tuple(getattr(value, 'shape', ()))} for a batch of {batch}; it must be "
                                 f"per-example, shape ({batch},).")
    if task.primary != "loss" and task.primary not in dict(jax.eval_shape(task.metrics, logits, y)):
        raise ValueError(f"task {task.name!r}: primary metric {task.primary!r} is not among its metrics.")
    if task.mixable:
        soft = jax.eval_shape(lambda t: task.soft_targets(t, num_classes), y)
        out = jax.eval_shape(task.soft_loss, logits, soft)
        if tuple(out.shape) != (batch,):
            raise ValueError(f"task {task.name!r}: soft_loss returned shape {tuple(out.shape)} for a batch of "
                             f"{batch}; it must be per-example, shape ({batch},).")
