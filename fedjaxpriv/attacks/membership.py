"""Membership inference: is a candidate example in the training data of a model or of a client?

Four attacks, scored with JAX (jitted, ``vmap``-ed over examples and models) or, for RMIA, host-side NumPy,
and evaluated by ``attack_metrics`` (label 1 = member, higher score = member):

* Loss threshold (Yeom et al. 2018, "Privacy Risk in Machine Learning: Analyzing the Connection to
  Overfitting"): the score is minus the example's loss under the target model (or its confidence).
* LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles"): the score of an example
  is the logit-scaled confidence ``phi = log(p_y / (1 - p_y))`` of its true class. Shadow models (see
  ``attacks.shadow``) trained with and without it give per-example Gaussians ``N(mu_in, s_in^2)`` and
  ``N(mu_out, s_out^2)`` of phi; the online attack scores the likelihood ratio of the target's phi,
  the offline attack the one-sided test ``(phi - mu_out) / s_out`` against the "out" Gaussian only.
  With few shadows the variances are pooled over examples ("global variance").
* RMIA (Zarifzadeh, Liu, Shokri 2024, "Low-Cost High-Power Membership Inference Attacks"): the target's
  probability of x relative to its mean over reference models, compared pairwise with the same ratio of
  population points z; the score is the fraction of z that x dominates (``rmia_scores``).
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

from fedjaxpriv.attacks.audit import clopper_pearson_interval
from fedjaxpriv.attacks.metrics import bootstrap_counts, resampled_auc, resampled_tpr_at_fpr, roc_auc, roc_counts
from fedjaxpriv.models.tasks import CLASSIFICATION, Task

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]

LOW_FPRS = (1e-3, 1e-2)
VARIANCE_FLOOR = 1e-6
RMIA_OFFLINE_A = 0.33


# -- per-example statistics ------------------------------------------------------------------------------------


def example_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy of each example (the classification task's loss): logits [N, K], int labels [N] -> [N] (nats)."""
    return CLASSIFICATION.loss(logits, labels)


def logit_confidence(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """LiRA's logit-scaled confidence ``log(p_y / (1 - p_y))`` per example, computed stably in log space.

    ``log p_y - log(1 - p_y) = z_y - logsumexp_{j != y} z_j`` for logits z; [N, K], [N] -> [N].
    """
    true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return true_logit - jax.nn.logsumexp(others, axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 4))
def model_statistics(apply_fn: ApplyFn, params: Params, x: jax.Array, y: jax.Array,
                     task: Task = CLASSIFICATION) -> dict[str, jax.Array]:
    """Loss, true-class probability and logit-scaled confidence of every example under one model.

    Args:
      apply_fn: (params, x [B, ...]) -> logits [B, K] (or the shape ``task`` expects).
      params: the model.
      x: [N, ...] candidates.
      y: [N] int labels (or ``task``'s targets).
      task: the task; for any but classification an example's confidence is ``p = exp(-loss)`` (for next-token
        prediction the geometric mean of its real tokens' probabilities) and its logit ``log(p / (1 - p))``.

    Returns:
      dict of [N] float32 arrays: "loss" (nats), "confidence" (p_y), "logit_confidence".
    """
    logits = apply_fn(params, x).astype(jnp.float32)
    if task is CLASSIFICATION:
        loss = example_loss(logits, y)
        return {"loss": loss, "confidence": jnp.exp(-loss), "logit_confidence": logit_confidence(logits, y)}
    loss = task.loss(logits, y).astype(jnp.float32)
    # log(p / (1 - p)) with p = exp(-loss): -loss - log(1 - exp(-loss)), kept finite at loss 0
    logit = -loss - jnp.log(-jnp.expm1(-jnp.maximum(loss, 1e-30)))
    return {"loss": loss, "confidence": jnp.exp(-loss), "logit_confidence": logit}


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
      [N] scores, higher = more likely a member. NaN for a candidate without "in" shadows (online) or without
      "out" shadows (online and offline): its Gaussians are undefined. ``attack_metrics`` rejects NaN, so drop
      them first with ``finite_scores``.
    """
    shadow_in = shadow_in.astype(bool)
    has_out = jnp.any(~shadow_in, axis=0)
    mu_out, var_out = _masked_moments(shadow_confidence, ~shadow_in, global_variance)
    if not online:
        return jnp.where(has_out, (target_confidence - mu_out) / jnp.sqrt(var_out), jnp.nan)
    has_in = jnp.any(shadow_in, axis=0)
    mu_in, var_in = _masked_moments(shadow_confidence, shadow_in, global_variance)
    ratio = _normal_logpdf(target_confidence, mu_in, var_in) - _normal_logpdf(target_confidence, mu_out, var_out)
    return jnp.where(has_in & has_out, ratio, jnp.nan)


# -- RMIA (Zarifzadeh et al.) --------------------------------------------------------------------------------


def _probabilities(name: str, values: np.ndarray, ndim: int) -> np.ndarray:
    values = np.asarray(values, np.float64)
    if values.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {values.shape}.")
    if values.size and not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"{name} must be probabilities in [0, 1]; got min {np.nanmin(values)}, "
                         f"max {np.nanmax(values)}, {int(np.isnan(values).sum())} NaN.")
    return values


def rmia_marginal(reference_probs: np.ndarray, offline_a: float | None = None) -> np.ndarray:
    """RMIA's estimate of ``Pr(x) = E_theta' p(x | theta')`` from R reference models: [R, N] -> [N].

    ``offline_a=None``: the mean over the references (online: each point is in about half of them).
    Otherwise the references never trained on the points, and the paper's offline approximation
    ``Pr(x)_IN ~ a Pr(x)_OUT + (1 - a)`` gives ``Pr(x) = ((1 + a) / 2) mean_out + (1 - a) / 2``.
    """
    mean = np.mean(reference_probs, axis=0)
    if offline_a is None:
        return mean
    return 0.5 * (1.0 + offline_a) * mean + 0.5 * (1.0 - offline_a)


def rmia_scores(target_probs: np.ndarray, reference_probs: np.ndarray, population_target_probs: np.ndarray,
                population_reference_probs: np.ndarray, *, reference_in: np.ndarray | None = None,
                offline_a: float = RMIA_OFFLINE_A, gamma: float = 1.0) -> np.ndarray:
    """RMIA membership scores (Zarifzadeh, Liu, Shokri, ICML 2024) of N candidates, host-side NumPy.

    With ``p(.|theta)`` the target model's probability of the true label and ``Pr(.)`` its mean over the
    reference models (``rmia_marginal``), each candidate x is compared with every population point z by
    ``LR(x, z) = (p(x|theta) / Pr(x)) / (p(z|theta) / Pr(z))`` and scored
    ``Score(x) = |{z : LR(x, z) >= gamma}| / Z``, evaluated as ``ratio(x) >= gamma * ratio(z)`` (no 0/0) with
    one sort of the Z population ratios and a binary search per candidate (O((N + Z) log Z), no N x Z
    pairs). The score is nondecreasing in ``p(x|theta) / Pr(x)``, so the population fixes its scale and its
    resolution (Z + 1 levels): use Z much larger than 1 / (the lowest FPR of interest).

    Online (``reference_in`` given): Pr is the plain mean over all references, for candidates and population
    points alike. Offline (``reference_in=None``: no reference trained on a candidate or population point):
    ``Pr = ((1 + a) / 2) mean_out + (1 - a) / 2`` for both, a = ``offline_a`` (the paper's linear
    approximation of the missing "in" models; a = 1 is the plain out-mean).

    Args:
      target_probs: [N] p(x|theta) of the candidates under the target model, in [0, 1].
      reference_probs: [R, N] the same under R reference models.
      population_target_probs: [Z] p(z|theta) of population (non-member) points under the target.
      population_reference_probs: [R, Z] the same under the reference models.
      reference_in: [R, N] bool, True where reference r trained on candidate n (online); None for offline.
      offline_a: a in [0, 1], used offline only (tune it on a reference model taken as target).
      gamma: the pairwise likelihood-ratio threshold, > 0.

    Returns:
      [N] scores in [0, 1], higher = more likely a member. Online, a candidate with no "in" or no "out"
      reference gets NaN (its mean is not the marginal); drop those with ``finite_scores``.
    """
    target = _probabilities("target_probs", target_probs, 1)
    references = _probabilities("reference_probs", reference_probs, 2)
    population = _probabilities("population_target_probs", population_target_probs, 1)
    population_references = _probabilities("population_reference_probs", population_reference_probs, 2)
    if references.shape != (references.shape[0], target.size) or references.shape[0] < 1:
        raise ValueError(f"reference_probs {references.shape} must be [R >= 1, N={target.size}].")
    if population.size < 1 or population_references.shape != (references.shape[0], population.size):
        raise ValueError(f"population_reference_probs {population_references.shape} must be "
                         f"[R={references.shape[0]}, Z={population.size}] with Z >= 1.")
    if not 0.0 <= offline_a <= 1.0:
        raise ValueError(f"offline_a={offline_a} must lie in [0, 1].")
    if not gamma > 0:
        raise ValueError(f"gamma={gamma} must be > 0.")
    defined = np.ones(target.size, bool)
    if reference_in is not None:
        inside = np.asarray(reference_in)
        if inside.shape != references.shape or not np.all((inside == 0) | (inside == 1)):
            raise ValueError(f"reference_in must be [R, N]={references.shape} of bools; got shape {inside.shape}.")
        inside = inside.astype(bool)
        defined = inside.any(axis=0) & (~inside).any(axis=0)
    a = None if reference_in is not None else offline_a
    marginal_x, marginal_z = rmia_marginal(references, a), rmia_marginal(population_references, a)
    if np.any(marginal_x <= 0) or np.any(marginal_z <= 0):
        raise ValueError("Pr(x) must be > 0: some point has probability 0 under every reference model "
                         "(clip the probabilities away from 0).")
    ratio_x, ratio_z = target / marginal_x, population / marginal_z
    dominated = np.searchsorted(np.sort(gamma * ratio_z), ratio_x, side="right")
    return np.where(defined, dominated / population.size, np.nan)


# -- every model attacked in turn, the others as its references ---------------------------------------------


def leave_one_out_lira(confidence: np.ndarray, inclusion: np.ndarray, *, online: bool = True,
                       global_variance: bool = True) -> np.ndarray:
    """LiRA scores of every model in turn against the other M - 1 as shadows: [M, N] -> [M, N].

    Pooling these over (model, candidate) pairs resolves FPRs down to about 1 / (M N / 2). The pooled ROC is
    unbiased when the models' memberships of a candidate are independent (``shadow.balanced_inclusion``);
    candidates without an "in" or "out" reference get NaN (``lira_scores``).

    Args:
      confidence: [M, N] logit-scaled confidence of each candidate under each model.
      inclusion: [M, N] bool, True where model m trained on candidate n.
      online, global_variance: as in ``lira_scores``.
    """
    confidence, inclusion = np.asarray(confidence), np.asarray(inclusion, bool)
    return np.stack([np.asarray(lira_scores(confidence[t], np.delete(confidence, t, 0), np.delete(inclusion, t, 0),
                                            online=online, global_variance=global_variance))
                     for t in range(confidence.shape[0])])


def leave_one_out_rmia(probs: np.ndarray, inclusion: np.ndarray, population_probs: np.ndarray) -> np.ndarray:
    """Online RMIA scores of every model in turn against the other M - 1 as references: [M, N] -> [M, N].

    Args:
      probs: [M, N] p(x|theta_m) of each candidate under each model.
      inclusion: [M, N] bool, True where model m trained on candidate n.
      population_probs: [M, Z] p(z|theta_m) of population points no model trained on.
    """
    probs, inclusion, population_probs = np.asarray(probs), np.asarray(inclusion, bool), np.asarray(population_probs)
    return np.stack([rmia_scores(probs[t], np.delete(probs, t, 0), population_probs[t],
                                 np.delete(population_probs, t, 0), reference_in=np.delete(inclusion, t, 0))
                     for t in range(probs.shape[0])])


# -- passive FL attack (Zari et al.) ------------------------------------------------------------------------


def _add_message(server_params: Params, message: Params) -> Params:
    return jax.tree_util.tree_map(lambda p, m: p + m.astype(p.dtype), server_params, message)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("statistic", "loss"))
def passive_scores(apply_fn: ApplyFn, server_params: Params, messages: Params, x: jax.Array, y: jax.Array,
                   statistic: str = "loss_drop", loss: Callable[[jax.Array, jax.Array], jax.Array] = example_loss
                   ) -> jax.Array:
    """Zari et al. passive scores of N candidates for ONE target client observed over R rounds.

    Args:
      apply_fn: the model.
      server_params: global models the client started from, leaves [R, ...].
      messages: the client's messages (updates) in those rounds, leaves [R, ...].
      x: [N, ...] candidates; y: [N] labels (the targets of ``loss``).
      statistic: "loss_drop": mean over rounds of ``loss(server) - loss(server + message)``;
        "local_loss": mean over rounds of ``-loss(server + message)`` (the client's local models only).
      loss: the per-example loss ``(logits, targets) -> [N]`` (e.g. ``Experiment.task.loss``).

    Returns:
      [N] scores, higher = more likely in the client's data. ``jax.vmap`` over clients for many targets.
    """
    if statistic not in ("loss_drop", "local_loss"):
        raise ValueError(f"statistic={statistic!r}; allowed: 'loss_drop' or 'local_loss'.")

    def one_round(params: Params, message: Params) -> jax.Array:
        after = loss(apply_fn(_add_message(params, message), x).astype(jnp.float32), y)
        if statistic == "local_loss":
            return -after
        return loss(apply_fn(params, x).astype(jnp.float32), y) - after

    return jnp.mean(jax.vmap(one_round)(server_params, messages), axis=0)


def ordered_taps(taps: Mapping[int, Any] | Sequence[Any]) -> list[Any]:
    """A run's taps (``Results.taps`` {round: Tap} or a sequence of ``Tap``) as a list in round order."""
    items = list(taps.values()) if isinstance(taps, Mapping) else list(taps)
    return sorted(items, key=lambda tap: int(tap.round))


def stack_taps(taps: Sequence[Any], client: int) -> tuple[Params, Params]:
    """The models one client started from (``Tap.start_of``) and its messages over the tapped rounds it took part
    in, leaves [R, ...].

    Args:
      taps: ``experiment.Tap`` records of the observed rounds (e.g. ``results.taps.values()`` in order).
      client: the target's client id; rounds whose tap does not hold it (it was not sampled) are skipped.
    """
    rounds = [(t, int(np.flatnonzero(np.asarray(t.client_ids) == client)[0])) for t in taps
              if np.any(np.asarray(t.client_ids) == client)]
    if not rounds:
        raise ValueError(f"client {client} took part in none of the {len(taps)} tapped rounds.")
    server = jax.tree_util.tree_map(lambda *a: np.stack(a), *[t.start_of(i) for t, i in rounds])
    messages = jax.tree_util.tree_map(lambda *a: np.stack(a),
                                      *[jax.tree_util.tree_map(lambda m, i=i: m[i], t.messages) for t, i in rounds])
    return server, messages


# -- metrics and plots ---------------------------------------------------------------------------------------


def tpr_standard_error(tpr: float | np.ndarray, num_members: int) -> np.ndarray:
    """Binomial standard error ``sqrt(tpr (1 - tpr) / n)`` of a TPR measured on ``num_members`` members."""
    tpr = np.asarray(tpr, np.float64)
    return np.sqrt(np.maximum(tpr * (1 - tpr), 1.0 / num_members) / num_members)


def finite_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Drops candidates whose score is NaN or infinite (e.g. LiRA / RMIA without references).

    Returns:
      ``(scores [M], labels [M], dropped)`` with ``dropped = N - M``; report it next to the metrics.
    """
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must have the same length.")
    keep = np.isfinite(scores)
    return scores[keep], labels[keep], int(np.sum(~keep))


def fpr_key(fpr: float) -> str:
    """Metric name of the TPR at one FPR: 1e-3 -> ``"tpr@0.1%fpr"``."""
    return f"tpr@{100 * fpr:g}%fpr"


def attack_metrics(scores: np.ndarray, labels: np.ndarray, fprs: Sequence[float] = LOW_FPRS, *,
                   alpha: float = 0.05, bootstrap: int = 1000, seed: int = 0,
                   groups: np.ndarray | None = None) -> dict[str, float]:
    """Membership-inference metrics with (1 - alpha) confidence intervals.

    Keys:
      ``num_members``, ``num_nonmembers``; ``min_resolvable_fpr = 1 / num_nonmembers``.
      ``auc`` (ties count 1/2) and ``auc_low``, ``auc_high``: percentile interval of ``bootstrap`` stratified
        resamples (members and non-members resampled separately), or of resampled ``groups`` when given (a
        cluster bootstrap, for scores that are not independent); NaN when ``bootstrap=0``.
      ``advantage``: membership advantage ``max_t TPR(t) - FPR(t)`` (Yeom et al. 2018) of the best threshold t;
        ``balanced_accuracy = (1 + advantage) / 2``: the accuracy of that threshold on a balanced prior. Both
        pick t on these scores (optimistic).
      ``tpr@{100 f:g}%fpr`` for each f in ``fprs`` (e.g. ``tpr@0.1%fpr``): the highest TPR over thresholds
        whose FPR is <= f, with ``..._low``, ``..._high`` its Clopper-Pearson interval over the members: the
        interval of that threshold's TPR given the threshold (chosen on the non-members only), leaving out the
        FPR's own sampling noise. With ``groups`` (and ``bootstrap`` > 0) the scores are not independent, and
        the interval is widened to also hold the percentile interval of the cluster bootstrap, in which each
        resample chooses its own threshold (``metrics.bootstrap_tpr_at_fpr``). Intervals hold per key, not
        jointly. When f < 1 / num_nonmembers no threshold has FPR f, and all three are NaN.

    Args:
      scores: ``[N]`` finite scores (higher = member); drop NaN ones first with ``finite_scores``.
      labels: ``[N]`` 1 for members, 0 for non-members; both classes needed.
      fprs: target false-positive rates in [0, 1].
      alpha: miscoverage of every interval, in (0, 1).
      bootstrap: number of AUC resamples (0 skips the AUC interval).
      seed: seed of the resampling.
      groups: optional ``[N]`` integer group of each score, e.g. the candidate of each (model, candidate) pair
        of a pooled attack: the AUC and TPR intervals then resample whole groups (``metrics.bootstrap_auc``,
        ``metrics.bootstrap_tpr_at_fpr``).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha} must lie in (0, 1).")
    if int(bootstrap) != bootstrap or bootstrap < 0:
        raise ValueError(f"bootstrap={bootstrap} must be an integer >= 0 (0 skips the AUC interval).")
    targets = np.asarray(fprs, np.float64).ravel()
    if np.any(~((targets >= 0) & (targets <= 1))):
        raise ValueError(f"fprs={fprs} must lie in [0, 1].")
    _, true_positives, false_positives = roc_counts(scores, labels)
    members, nonmembers = int(true_positives[-1]), int(false_positives[-1])
    tpr, fpr = true_positives / members, false_positives / nonmembers
    advantage = float(np.max(tpr - fpr))
    out = {"num_members": float(members), "num_nonmembers": float(nonmembers),
           "min_resolvable_fpr": 1.0 / nonmembers, "auc": roc_auc(scores, labels),
           "auc_low": np.nan, "auc_high": np.nan, "advantage": advantage, "balanced_accuracy": (1.0 + advantage) / 2}
    # The rates are nondecreasing, so the best point with FPR <= f is the last one.
    hits = true_positives[np.searchsorted(fpr, targets, side="right") - 1]
    low, high = clopper_pearson_interval(hits, members, alpha)
    if bootstrap:  # one set of resamples for the AUC and, for dependent scores, the TPRs
        aucs, tprs = [], []
        for counts in bootstrap_counts(np.asarray(labels).ravel() == 1, int(bootstrap), seed, groups=groups):
            aucs.append(resampled_auc(scores, labels, counts))
            if groups is not None:
                tprs.append(resampled_tpr_at_fpr(scores, labels, counts, targets))
        quantiles = [alpha / 2, 1 - alpha / 2]
        out["auc_low"], out["auc_high"] = (float(q) for q in np.quantile(np.concatenate(aucs), quantiles))
        if groups is not None:  # dependent scores: the cluster bootstrap's interval as well
            boot_low, boot_high = np.quantile(np.concatenate(tprs), quantiles, axis=0)
            low, high = np.minimum(low, boot_low), np.maximum(high, boot_high)
    for target, k, lo, hi in zip(targets, hits, low, high):
        resolvable = target >= 1.0 / nonmembers
        key = fpr_key(float(target))
        out[key] = float(k / members) if resolvable else np.nan
        out[f"{key}_low"] = float(lo) if resolvable else np.nan
        out[f"{key}_high"] = float(hi) if resolvable else np.nan
    return out


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str, title: str = "",
             alpha: float = 0.05) -> str:
    """Log-log ROC plot (the low-FPR view of Carlini et al. 2022) of named ``(scores, labels)`` pairs -> path.

    Each curve is drawn with a shaded pointwise Clopper-Pearson (1 - alpha) band of its TPR, a dot at its first
    measured point and a dotted vertical line at its smallest resolvable FPR, 1 / num_nonmembers; left of it the
    curve is not measured and not drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    lowest = 1e-3
    for name, (scores, labels) in curves.items():
        _, true_positives, false_positives = roc_counts(scores, labels)
        members, nonmembers = true_positives[-1], false_positives[-1]
        fpr, tpr = false_positives / nonmembers, true_positives / members
        band_low, band_high = clopper_pearson_interval(true_positives, members, alpha)
        # Left of 1 / non-members nothing is measured: not drawn. The curve starts there at the best TPR of any
        # threshold with FPR <= 1 / non-members (the ROC is a step function of the FPR).
        first = int(np.searchsorted(fpr, 1.0 / nonmembers, side="right")) - 1
        shown = np.r_[first, np.flatnonzero(fpr > 1.0 / nonmembers)]
        x = np.r_[1.0 / nonmembers, fpr[shown[1:]]]
        (line,) = ax.plot(x, np.maximum(tpr[shown], 1e-6), drawstyle="steps-post",
                          label=f"{name} (AUC {roc_auc(scores, labels):.3f})")
        # The first point marked: a curve of tied scores may be that point alone (e.g. at (1, 1)).
        ax.plot(x[:1], np.maximum(tpr[shown][:1], 1e-6), "o", ms=3.5, color=line.get_color())
        ax.fill_between(x, np.maximum(band_low[shown], 1e-6), band_high[shown], step="post",
                        color=line.get_color(), alpha=0.12, lw=0)
        ax.axvline(1.0 / nonmembers, color=line.get_color(), ls=":", lw=1.0)
        lowest = min(lowest, 1.0 / nonmembers)
    lim = 10 ** np.floor(np.log10(lowest / 2))
    ax.plot([lim, 1], [lim, 1], "k--", lw=0.8)
    ax.plot([], [], color="gray", ls=":", lw=1.0, label="1 / non-members")
    # Limits a little above 1, so that a curve at TPR 1 (or FPR 1) is drawn inside the frame, not on its edge.
    ax.set(xscale="log", yscale="log", xlim=(lim, 1.25), ylim=(lim, 1.25), xlabel="false positive rate",
           ylabel="true positive rate", title=title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
