"""Membership inference: is a candidate example in the training data of a model or of a client?

Three attacks, all scoring candidates with JAX (jitted, ``vmap``-ed over examples and models) and
evaluated with the host-side metrics of ``attacks.metrics`` (label 1 = member, higher score = member):

* Loss threshold (Yeom et al. 2018, "Privacy Risk in Machine Learning: Analyzing the Connection to
  Overfitting"): the score is minus the example's loss under the target model (or its confidence).
* LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles"): the score of an example
  is the logit-scaled confidence ``phi = log(p_y / (1 - p_y))`` of its true class. Shadow models (see
  ``attacks.shadow``) trained with and without it give per-example Gaussians ``N(mu_in, s_in^2)`` and
  ``N(mu_out, s_out^2)`` of phi; the online attack scores the likelihood ratio of the target's phi,
  the offline attack the one-sided test ``(phi - mu_out) / s_out`` against the "out" Gaussian only.
  With few shadows the variances are pooled over examples ("global variance").
* Passive update-based FL attack (Zari, Xu, Neglia 2021, "Efficient passive membership inference attack in
  federated learning"): an honest-but-curious server sees a target client's messages over several rounds;
  for each observed round it measures how much the client's update lowers the candidate's loss
  (``loss(server_params) - loss(server_params + message)``) and averages over rounds: the client's
  training pushes its own examples' losses down more than those of other examples.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv.attacks.metrics import roc_auc, roc_curve, tpr_at_fpr

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]

LOW_FPRS = (1e-3, 1e-2)
VARIANCE_FLOOR = 1e-6


# -- per-example statistics ------------------------------------------------------------------------------------


def example_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy of each example: logits [N, K], int labels [N] -> [N] (nats)."""
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def logit_confidence(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """LiRA's logit-scaled confidence ``log(p_y / (1 - p_y))`` per example, computed stably in log space.

    ``log p_y - log(1 - p_y) = z_y - logsumexp_{j != y} z_j`` for logits z; [N, K], [N] -> [N].
    """
    true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return true_logit - jax.nn.logsumexp(others, axis=-1)


@functools.partial(jax.jit, static_argnums=(0,))
def model_statistics(apply_fn: ApplyFn, params: Params, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    """Loss, true-class probability and logit-scaled confidence of every example under one model.

    Args:
      apply_fn: (params, x [B, ...]) -> logits [B, K].
      params: the model.
      x: [N, ...] candidates.
      y: [N] int labels.

    Returns:
      dict of [N] float32 arrays: "loss" (nats), "confidence" (p_y), "logit_confidence".
    """
    logits = apply_fn(params, x).astype(jnp.float32)
    loss = example_loss(logits, y)
    return {"loss": loss, "confidence": jnp.exp(-loss), "logit_confidence": logit_confidence(logits, y)}


@functools.partial(jax.jit, static_argnums=(0,))
def stacked_logit_confidence(apply_fn: ApplyFn, stacked_params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """``logit_confidence`` of N examples under S models in one call: params leaves [S, ...] -> [S, N]."""
    return jax.vmap(lambda p: logit_confidence(apply_fn(p, x).astype(jnp.float32), y))(stacked_params)


# -- loss threshold (Yeom et al.) ----------------------------------------------------------------------------


def loss_threshold_scores(apply_fn: ApplyFn, params: Params, x: jax.Array, y: jax.Array,
                          statistic: str = "loss") -> np.ndarray:
    """Yeom et al. scores [N]: ``-loss`` ("loss") or ``p_y`` ("confidence"); higher means member."""
    if statistic not in ("loss", "confidence"):
        raise ValueError(f"statistic={statistic!r}; allowed: 'loss' or 'confidence'.")
    stats = model_statistics(apply_fn, params, jnp.asarray(x), jnp.asarray(y))
    return np.asarray(-stats["loss"] if statistic == "loss" else stats["confidence"])


# -- LiRA (Carlini et al.) -----------------------------------------------------------------------------------


def _normal_logpdf(x: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    return -0.5 * (jnp.log(2 * jnp.pi * var) + jnp.square(x - mean) / var)


def _masked_moments(values: jax.Array, mask: jax.Array, global_variance: bool) -> tuple[jax.Array, jax.Array]:
    """Per-example mean [N] and variance [N] of values [S, N] over the shadows where mask [S, N] is True.

    ``global_variance`` pools the squared deviations of every example (one variance for all)."""
    weights = mask.astype(jnp.float32)
    count = jnp.sum(weights, axis=0)
    mean = jnp.sum(values * weights, axis=0) / jnp.maximum(count, 1.0)
    squares = jnp.square(values - mean) * weights
    per_example = jnp.sum(squares, axis=0) / jnp.maximum(count - 1.0, 1.0)
    pooled = jnp.sum(squares) / jnp.maximum(jnp.sum(count) - jnp.sum(count > 0), 1.0)
    var = jnp.where(global_variance, jnp.broadcast_to(pooled, per_example.shape), per_example)
    return mean, jnp.maximum(var, VARIANCE_FLOOR)


@functools.partial(jax.jit, static_argnames=("online",))
def lira_scores(target_confidence: jax.Array, shadow_confidence: jax.Array, shadow_in: jax.Array, *,
                online: bool = True, global_variance: bool | jax.Array = False) -> jax.Array:
    """LiRA membership scores of N candidates from S shadow models.

    Args:
      target_confidence: [N] logit-scaled confidence of each candidate under the target model.
      shadow_confidence: [S, N] the same statistic under each shadow model.
      shadow_in: [S, N] bool, True where the shadow trained on the candidate.
      online: likelihood ratio ``log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2)``; False: the
        offline one-sided statistic ``(phi - mu_out) / s_out`` (a monotone map of the "out" CDF).
      global_variance: pool each variance over all candidates (recommended below ~64 shadows).

    Returns:
      [N] scores, higher = more likely a member. A candidate with no "in" (online) or "out" shadow gets
      a NaN mean; give every candidate shadows of both kinds (each shadow takes a random half).
    """
    shadow_in = shadow_in.astype(bool)
    mu_out, var_out = _masked_moments(shadow_confidence, ~shadow_in, global_variance)
    if not online:
        return (target_confidence - mu_out) / jnp.sqrt(var_out)
    mu_in, var_in = _masked_moments(shadow_confidence, shadow_in, global_variance)
    return _normal_logpdf(target_confidence, mu_in, var_in) - _normal_logpdf(target_confidence, mu_out, var_out)


# -- passive FL attack (Zari et al.) ------------------------------------------------------------------------


def _add_message(server_params: Params, message: Params) -> Params:
    return jax.tree_util.tree_map(lambda p, m: p + m.astype(p.dtype), server_params, message)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("statistic",))
def passive_scores(apply_fn: ApplyFn, server_params: Params, messages: Params, x: jax.Array, y: jax.Array,
                   statistic: str = "loss_drop") -> jax.Array:
    """Zari et al. passive scores of N candidates for ONE target client observed over R rounds.

    Args:
      apply_fn: the model.
      server_params: global models the client started from, leaves [R, ...].
      messages: the client's messages (updates) in those rounds, leaves [R, ...].
      x: [N, ...] candidates; y: [N] labels.
      statistic: "loss_drop": mean over rounds of ``loss(server) - loss(server + message)``;
        "local_loss": mean over rounds of ``-loss(server + message)`` (the client's local models only).

    Returns:
      [N] scores, higher = more likely in the client's data. ``jax.vmap`` over clients for many targets.
    """
    if statistic not in ("loss_drop", "local_loss"):
        raise ValueError(f"statistic={statistic!r}; allowed: 'loss_drop' or 'local_loss'.")

    def one_round(params: Params, message: Params) -> jax.Array:
        after = example_loss(apply_fn(_add_message(params, message), x).astype(jnp.float32), y)
        if statistic == "local_loss":
            return -after
        return example_loss(apply_fn(params, x).astype(jnp.float32), y) - after

    return jnp.mean(jax.vmap(one_round)(server_params, messages), axis=0)


def stack_taps(taps: Sequence[Any], client: int) -> tuple[Params, Params]:
    """Server params and one client's messages over the tapped rounds it took part in, leaves [R, ...].

    Args:
      taps: ``experiment.Tap`` records of the observed rounds (e.g. ``results.taps.values()`` in order).
      client: the target's client id; rounds whose tap does not hold it (it was not sampled) are skipped.
    """
    rounds = [(t, int(np.flatnonzero(np.asarray(t.client_ids) == client)[0])) for t in taps
              if np.any(np.asarray(t.client_ids) == client)]
    if not rounds:
        raise ValueError(f"client {client} took part in none of the {len(taps)} tapped rounds.")
    server = jax.tree_util.tree_map(lambda *a: np.stack(a), *[t.server_params for t, _ in rounds])
    messages = jax.tree_util.tree_map(lambda *a: np.stack(a),
                                      *[jax.tree_util.tree_map(lambda m, i=i: m[i], t.messages) for t, i in rounds])
    return server, messages


# -- metrics and plots ---------------------------------------------------------------------------------------


def tpr_standard_error(tpr: float | np.ndarray, num_members: int) -> np.ndarray:
    """Binomial standard error ``sqrt(tpr (1 - tpr) / n)`` of a TPR measured on ``num_members`` members."""
    tpr = np.asarray(tpr, np.float64)
    return np.sqrt(np.maximum(tpr * (1 - tpr), 1.0 / num_members) / num_members)


def attack_metrics(scores: np.ndarray, labels: np.ndarray, fprs: Sequence[float] = LOW_FPRS) -> dict[str, float]:
    """AUC, balanced accuracy at the best threshold and TPR at each FPR (keys ``tpr@0.1%fpr``...)."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    fpr, tpr, _ = roc_curve(scores, labels)
    out = {"auc": roc_auc(scores, labels), "advantage": float(np.max(tpr - fpr))}
    for target, value in zip(fprs, tpr_at_fpr(scores, labels, np.asarray(fprs))):
        out[f"tpr@{100 * target:g}%fpr"] = float(value)
    return out


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str, title: str = "") -> str:
    """Log-log ROC plot (the low-FPR view of Carlini et al.) of named ``(scores, labels)`` pairs -> path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (scores, labels) in curves.items():
        fpr, tpr, _ = roc_curve(scores, labels)
        ax.plot(np.maximum(fpr, 1e-5), np.maximum(tpr, 1e-5), label=f"{name} (AUC {roc_auc(scores, labels):.3f})")
    ax.plot([1e-5, 1], [1e-5, 1], "k--", lw=0.8)
    ax.set(xscale="log", yscale="log", xlim=(1e-3, 1), ylim=(1e-3, 1), xlabel="false positive rate",
           ylabel="true positive rate", title=title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
