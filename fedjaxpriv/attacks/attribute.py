"""Attribute inference in federated learning, scored against baselines that see no client messages.

The server knows, for each of a client's examples, the non-sensitive features and the label but not a binary
sensitive attribute (a model input column). Two attacks:

* Model-based (Driouich, Xu, Neglia et al. 2022, "A Novel Model-Based Attribute Inference Attack in Federated
  Learning"): for every candidate value, complete the example, evaluate the loss under a model and guess the
  lowest-loss value (``infer_attributes``). On the global model alone this uses only what the population
  shares (``P(y | z, s)``), which any participant has: it is the baseline that client leakage must beat.
* Update matching on the client's messages (``match_updates``): a message ``m_r`` sent from the global model
  ``theta_r`` is, to first order, ``-c_r sum_i g_i(s_i)``, the client's summed per-example loss gradients at
  the midpoint ``theta_r + m_r / 2`` with the unknown attributes ``s_i``, times an unknown step scale
  ``c_r >= 0``. With ``g_i(s) = g_i(v_0) + s (g_i(v_1) - g_i(v_0))`` for ``s`` relaxed to [0, 1], it fits
  ``min_{c >= 0, s} sum_r ||m_r + c_r (G_r + D_r s)||^2`` over all observed rounds by alternating least
  squares, with ``s`` shrunk to 1/2 in proportion to the residual noise. Thresholded, the relaxed ``s`` is a
  per-example guess; averaged, it is the client's attribute share ``pi_c``, a prior that the global model
  cannot know: the attack's guess is the MAP ``argmin_a loss_global(a) - log pi_c(a)``
  (``attribute_attack_on_taps`` scores both).

``data.attribute.attribute_population`` (importable from here too) builds an honest tabular setup: a binary
attribute ``s`` that shifts the labels' distribution (and is a model input), with client-specific group
proportions, stored in ``FederatedData.attributes``.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fedjaxpriv.attacks.audit import clopper_pearson_interval
from fedjaxpriv.attacks.membership import ordered_taps, stack_taps
from fedjaxpriv.data.attribute import attribute_population  # noqa: F401  (the attacks' population)

if TYPE_CHECKING:
    from fedjaxpriv.experiment import Experiment
    from fedjaxpriv.program import Tap

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]


def with_attribute(x: jax.Array, column: int, value: jax.Array) -> jax.Array:
    """Flat examples x [N, d] with column ``column`` set to ``value`` (scalar) -> [N, d]."""
    return x.at[:, column].set(value)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("column",))
def attribute_losses(apply_fn: ApplyFn, params: Params, x: jax.Array, y: jax.Array, values: jax.Array, *,
                     column: int) -> jax.Array:
    """Loss of every example completed with every candidate attribute value.

    Args:
      apply_fn: (params, x [B, d]) -> logits.
      params: the client's (local) model.
      x: [N, d] flat examples (the attribute column's content is ignored).
      y: [N] labels.
      values: [A] candidate attribute values.
      column: the attribute's column in x.

    Returns:
      [A, N] cross-entropy (nats).
    """

    def losses(value: jax.Array) -> jax.Array:
        logits = apply_fn(params, with_attribute(x, column, value)).astype(jnp.float32)
        return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0]

    return jax.vmap(losses)(values)


def infer_attributes(apply_fn: ApplyFn, params: Params, x: jax.Array, y: jax.Array, values: jax.Array, *,
                     column: int, log_prior: jax.Array | None = None) -> jax.Array:
    """The model-based attack: for each example, the index in ``values`` of the lowest-loss completion.

    With ``log_prior`` [A] (log-probabilities of the values) it is the MAP guess
    ``argmin_a loss(a) - log_prior(a)`` instead. Pure and jittable: ``jax.vmap`` over clients
    (params [C, ...], x [C, N, d], y [C, N]) for many targets. Returns [N] int32.
    """
    losses = attribute_losses(apply_fn, params, x, y, jnp.asarray(values, jnp.float32), column=column)
    if log_prior is not None:
        losses = losses - jnp.asarray(log_prior, jnp.float32)[:, None]
    return jnp.argmin(losses, axis=0).astype(jnp.int32)


def example_gradients(apply_fn: ApplyFn, params: Params, x: jax.Array, y: jax.Array, value: jax.Array, *,
                      column: int, clip_norm: float | jax.Array = math.inf) -> jax.Array:
    """Per-example cross-entropy gradients with the attribute column set to ``value``, flattened -> [N, P].

    ``clip_norm``: each row is scaled to an L2 norm of at most this (the clients' DP-SGD clip; inf = none).
    """

    def loss(p: Params, xi: jax.Array, yi: jax.Array) -> jax.Array:
        logits = apply_fn(p, xi[None])[0].astype(jnp.float32)
        return jax.nn.logsumexp(logits) - logits[yi]

    grads = jax.vmap(jax.grad(loss), (None, 0, 0))(params, with_attribute(x, column, value), y)
    flat = jax.vmap(lambda g: ravel_pytree(g)[0].astype(jnp.float32))(grads)
    norms = jnp.linalg.norm(flat, axis=1, keepdims=True)
    return flat * jnp.minimum(1.0, jnp.asarray(clip_norm, jnp.float32) / jnp.maximum(norms, 1e-12))


def _box_quadratic_minimum(h: jax.Array, rhs: jax.Array, s: jax.Array, sweeps: int) -> jax.Array:
    """``argmin_{s in [0, 1]^N} s^T h s / 2 - rhs^T s`` (h [N, N] positive definite, rhs [N]), approached by
    ``sweeps`` rounds of exact minimisation over each coordinate in turn, from ``s`` [N] (a convergent descent
    for this convex problem) -> [N]."""

    def coordinate(i: int, s: jax.Array) -> jax.Array:
        return s.at[i].set(jnp.clip(s[i] + (rhs[i] - h[i] @ s) / h[i, i], 0.0, 1.0))

    return jax.lax.fori_loop(0, sweeps, lambda _, s: jax.lax.fori_loop(0, s.shape[0], coordinate, s), s)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("column", "iterations", "sweeps"))
def match_updates(apply_fn: ApplyFn, server_params: Params, messages: Params, x: jax.Array, y: jax.Array,
                  values: jax.Array, mask: jax.Array | None = None, clip_norm: float | jax.Array = math.inf, *,
                  column: int, iterations: int = 30, sweeps: int = 10, prior_variance: float = 0.25) -> jax.Array:
    """Relaxed attributes of one client's examples from its messages (binary attribute).

    Fits ``m_r ~ -c_r (G_r + D_r s)`` (see the module docstring) by alternating least squares: ``c_r >= 0`` in
    closed form, then ``s`` in [0, 1]^N as the Gaussian MAP under a prior ``s_i ~ N(1/2, prior_variance)``, the
    noise variance per coordinate estimated from the current residual (ridge ``sigma^2 / prior_variance``), by
    coordinate descent on that box-constrained quadratic (warm-started). Messages dominated by noise (DP) thus
    give ``s`` near 1/2 rather than a confident fit to the noise. A round whose message is all zeros (padding)
    gets ``c_r = 0`` and is left out of the noise estimate.

    Args:
      apply_fn: (params, x [B, d]) -> logits.
      server_params: the global models the client started from, leaves [R, ...].
      messages: its messages from them, leaves [R, ...] (updates, as sent).
      x: [N, d] the client's flat examples (the attribute column's content is ignored).
      y: [N] labels.
      values: [2] the attribute's two values (v_0, v_1).
      mask: [N] bool, real examples (default all).
      clip_norm: the clients' per-example clip norm, applied to the hypothesised gradients (inf = none).
      column: the attribute's column in x.
      iterations: alternating rounds.
      sweeps: coordinate-descent sweeps over the N attributes per round.
      prior_variance: variance of the prior of each ``s_i`` (1/4: that of a fair coin).

    Returns:
      [N] float32 in [0, 1]: the weight of ``v_1`` in each example's fitted attribute (0 where masked).
    """
    n = x.shape[0]
    weight = jnp.ones((n,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    values = jnp.asarray(values, jnp.float32)

    def round_statistics(theta: Params, message: Params) -> tuple[jax.Array, ...]:
        mid = jax.tree_util.tree_map(lambda p, m: p + 0.5 * m.astype(p.dtype), theta, message)
        g0, g1 = (example_gradients(apply_fn, mid, x, y, v, column=column, clip_norm=clip_norm) * weight[:, None]
                  for v in (values[0], values[1]))
        total, diff, m = jnp.sum(g0, 0), (g1 - g0).T, ravel_pytree(message)[0].astype(jnp.float32)
        return diff.T @ diff, diff.T @ m, diff.T @ total, total @ total, total @ m, m @ m

    dd, dm, dg, gg, gm, mm = jax.lax.map(lambda pair: round_statistics(*pair), (server_params, messages))
    coordinates = sum(leaf[0].size for leaf in jax.tree_util.tree_leaves(messages))
    real_rounds = jnp.maximum(jnp.sum(mm > 0), 1)

    def step(_: int, s: jax.Array) -> jax.Array:
        fit = gm + dm @ s                                              # <G_r + D_r s, m_r>   [R]
        norm2 = gg + 2 * dg @ s + jnp.einsum("i,rij,j->r", s, dd, s)    # ||G_r + D_r s||^2   [R]
        c = jnp.maximum(-fit / jnp.maximum(norm2, 1e-30), 0.0)
        noise = jnp.sum(mm + 2 * c * fit + c**2 * norm2) / (real_rounds * coordinates)   # sigma^2
        a = jnp.einsum("r,rij->ij", c**2, dd)
        b = -jnp.einsum("r,ri->i", c, dm) - jnp.einsum("r,ri->i", c**2, dg)
        lam = jnp.maximum(noise, 0.0) / prior_variance + 1e-6 * jnp.trace(a) / n + 1e-30
        return _box_quadratic_minimum(a + lam * jnp.eye(n), b + lam * 0.5, s, sweeps) * weight

    return jax.lax.fori_loop(0, iterations, step, 0.5 * weight)


def client_share(relaxed: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """A client's share of ``v_1`` from relaxed attributes [N], Laplace-smoothed: ``(sum s + 1) / (N + 2)``."""
    weights = jnp.ones_like(relaxed, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    return (jnp.sum(relaxed * weights) + 1.0) / (jnp.sum(weights) + 2.0)


def client_majority(predicted: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """A client's inferred majority group from per-example binary guesses [N] (ties -> 1)."""
    weights = jnp.ones_like(predicted, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return (jnp.sum(predicted * weights) * 2 >= jnp.sum(weights)).astype(jnp.int32)


def attribute_report(predicted: np.ndarray, true: np.ndarray, prior: np.ndarray | None = None) -> dict[str, float]:
    """Attack accuracy against the majority-class baseline.

    Args:
      predicted: [N] guessed attribute values.
      true: [N] true values.
      prior: attribute values the adversary may know the distribution of (default ``true``): the baseline
        always guesses the most common value of ``prior`` and is scored on ``true``.

    Returns:
      dict with "accuracy", "baseline" and their difference "advantage", plus "num_examples".
    """
    predicted, true = np.asarray(predicted).ravel(), np.asarray(true).ravel()
    if predicted.shape != true.shape or true.size == 0:
        raise ValueError(f"predicted {predicted.shape} and true {true.shape} must be equal, non-empty.")
    prior = true if prior is None else np.asarray(prior).ravel()
    values, counts = np.unique(prior, return_counts=True)
    majority = values[np.argmax(counts)]
    accuracy = float(np.mean(predicted == true))
    baseline = float(np.mean(true == majority))
    return {"accuracy": accuracy, "baseline": baseline, "advantage": accuracy - baseline,
            "num_examples": int(true.size)}


def paired_advantage(correct: np.ndarray, baseline_correct: np.ndarray, alpha: float = 0.05) -> dict[str, float]:
    """Accuracy advantage of an attack over a baseline scored on the same N examples, with an exact interval.

    The advantage is ``(b - c) / N`` with b (c) the examples only the attack (only the baseline) gets right.
    Given the ``b + c`` discordant examples, b is binomial with success rate q and the advantage is
    ``(b + c) / N (2 q - 1)``: the Clopper-Pearson interval of q (level ``1 - alpha``) maps to its interval
    (the exact McNemar test), conditional on the observed number of discordant examples (none: [0, 0]).
    Examples are treated as independent.

    Args:
      correct: [N] bool, attack right.
      baseline_correct: [N] bool, baseline right.
      alpha: miscoverage of the interval.

    Returns:
      dict: "advantage", "advantage_low", "advantage_high", "discordant" (b + c).
    """
    correct, baseline_correct = np.asarray(correct, bool).ravel(), np.asarray(baseline_correct, bool).ravel()
    if correct.shape != baseline_correct.shape or correct.size == 0:
        raise ValueError(f"correct {correct.shape} and baseline_correct {baseline_correct.shape} must be equal, "
                         "non-empty.")
    wins, losses = int(np.sum(correct & ~baseline_correct)), int(np.sum(~correct & baseline_correct))
    discordant, n = wins + losses, correct.size
    if discordant == 0:
        return {"advantage": 0.0, "advantage_low": 0.0, "advantage_high": 0.0, "discordant": 0}
    low, high = clopper_pearson_interval(wins, discordant, alpha)
    scale = discordant / n
    return {"advantage": (wins - losses) / n, "advantage_low": float(scale * (2 * low - 1)),
            "advantage_high": float(scale * (2 * high - 1)), "discordant": discordant}


def _attribute_indices(column_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index in ``values`` of every entry of ``column_values``; ValueError for an entry not among them."""
    match = np.isclose(column_values[..., None], values)
    if not np.all(match.any(-1)):
        bad = np.unique(column_values[~match.any(-1)])
        raise ValueError(f"attribute column holds {bad[:5].tolist()}, not among values={values.tolist()}.")
    return np.argmax(match, -1).astype(np.int32)


def _padded_rounds(tree: Params, rounds: int, fill: str) -> Params:
    """Leaves [R, ...] -> [rounds, ...]: padded with zeros (``fill="zeros"``) or copies of the first entry."""

    def pad(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        extra = np.zeros_like(a[:1]) if fill == "zeros" else a[:1]
        return np.concatenate([a] + [extra] * (rounds - a.shape[0])) if a.shape[0] < rounds else a

    return jax.tree_util.tree_map(pad, tree)


def attribute_attack_on_taps(experiment: Experiment, taps: Sequence[Tap] | dict[int, Tap], column: int | None = None,
                             values: Sequence[float] = (0.0, 1.0), *, clients: Sequence[int] | None = None,
                             iterations: int = 30, alpha: float = 0.05) -> dict[str, Any]:
    """Attribute inference by an honest-but-curious server on a run's taps, against its two baselines.

    For every tapped client: its messages over the tapped rounds it took part in (``membership.stack_taps``)
    give its attribute share (``match_updates``, with the clients' DP-SGD clip norm when they clip); the attack
    guesses ``argmin_a loss_global(a) - log share(a)`` with the global model the client started its last
    observed round from. Baselines, which use no message: the majority value of the population's attribute
    column (always guessed) and the model-based attack on that global model alone (what a participant has).

    Args:
      experiment: the run's experiment (model, population with the attribute in a flat input column, settings).
      taps: the run's taps (``results.taps`` or a list of ``Tap``).
      column: the attribute's input column (default the last, as in ``attribute_population``).
      values: the attribute's two values; every entry of the column must be one of them.
      clients: target client ids (default every tapped client); each must appear in some tap.
      iterations: alternating least-squares rounds of ``match_updates``.
      alpha: miscoverage of the intervals.

    Returns:
      dict: "accuracy" (+ "_low"/"_high", Clopper-Pearson), "majority_accuracy", "global_accuracy",
      "baseline" (the stronger baseline's accuracy) and "baseline_name", "advantage" over it with
      "advantage_low"/"advantage_high" (``paired_advantage``); "matching_accuracy" and "matching_advantage"
      (+ "_low"/"_high") of the thresholded relaxed attributes alone (``s_i > 1/2``); "share_error" (mean over
      clients of |estimated - true share|), "num_examples", "num_clients".
      Examples share their client's estimated share, so the interval is optimistic when few clients are tapped.
    """
    population = experiment.population
    if population.x.ndim != 2:
        raise ValueError(f"attribute inference needs flat inputs [T, d]; got input shape {population.input_shape}.")
    dim = population.input_shape[0]
    column = dim - 1 if column is None else int(column)
    if not 0 <= column < dim:
        raise ValueError(f"column={column} must lie in [0, {dim}).")
    values_np = np.asarray(values, np.float32)
    if values_np.shape != (2,) or values_np[0] == values_np[1]:
        raise ValueError(f"values={tuple(values)} must be two distinct attribute values.")
    observed = ordered_taps(taps)
    tapped = sorted({int(c) for tap in observed for c in tap.client_ids})
    targets = tapped if clients is None else [int(c) for c in clients]
    if not targets:
        raise ValueError("no target clients: the taps hold no client and clients= is empty.")
    stacks = {c: stack_taps(observed, c) for c in targets}   # raises for a client in no tap
    max_rounds = max(jax.tree_util.tree_leaves(stacks[c][1])[0].shape[0] for c in targets)
    data = population.padded(targets)
    true = _attribute_indices(np.where(data.mask, data.x[..., column], values_np[0]), values_np)  # padding: v_0
    prior = _attribute_indices(population.x[:, column], values_np)
    majority = int(np.argmax(np.bincount(prior, minlength=2)))
    clip = np.broadcast_to(np.asarray(experiment.settings.dp_clip_norm, np.float32), (population.num_clients,))
    apply_fn, candidates = experiment.model.apply, jnp.asarray(values_np)
    attack, global_guess, matched, share_errors = [], [], [], []
    for row, client in enumerate(targets):
        server, messages = stacks[client]
        x, y, mask = jnp.asarray(data.x[row]), jnp.asarray(data.y[row]), jnp.asarray(data.mask[row])
        relaxed = match_updates(apply_fn, _padded_rounds(server, max_rounds, "first"),
                                _padded_rounds(messages, max_rounds, "zeros"), x, y, candidates, mask,
                                float(clip[client]), column=column, iterations=iterations)
        share = client_share(relaxed, mask)
        latest = jax.tree_util.tree_map(lambda a: jnp.asarray(a[-1]), server)
        log_prior = jnp.log(jnp.stack([1.0 - share, share]))
        attack.append(np.asarray(infer_attributes(apply_fn, latest, x, y, candidates, column=column,
                                                  log_prior=log_prior)))
        global_guess.append(np.asarray(infer_attributes(apply_fn, latest, x, y, candidates, column=column)))
        matched.append((np.asarray(relaxed) > 0.5).astype(np.int32))
        share_errors.append(abs(float(share) - float(np.mean(true[row][data.mask[row]]))))
    keep = data.mask
    truth = true[keep]
    attack_right = np.stack(attack)[keep] == truth
    global_right = np.stack(global_guess)[keep] == truth
    majority_right = truth == majority
    n, hits = int(truth.size), int(np.sum(attack_right))
    low, high = clopper_pearson_interval(hits, n, alpha)
    global_accuracy, majority_accuracy = float(np.mean(global_right)), float(np.mean(majority_right))
    stronger = "global" if global_accuracy >= majority_accuracy else "majority"
    baseline_right = global_right if stronger == "global" else majority_right
    advantage = paired_advantage(attack_right, baseline_right, alpha)
    matching_right = np.stack(matched)[keep] == truth
    matching = paired_advantage(matching_right, baseline_right, alpha)
    return {"accuracy": hits / n, "accuracy_low": float(low), "accuracy_high": float(high),
            "majority_accuracy": majority_accuracy, "global_accuracy": global_accuracy,
            "baseline": max(global_accuracy, majority_accuracy), "baseline_name": stronger,
            "advantage": advantage["advantage"], "advantage_low": advantage["advantage_low"],
            "advantage_high": advantage["advantage_high"], "matching_accuracy": float(np.mean(matching_right)),
            "matching_advantage": matching["advantage"], "matching_advantage_low": matching["advantage_low"],
            "matching_advantage_high": matching["advantage_high"], "share_error": float(np.mean(share_errors)),
            "num_examples": n, "num_clients": len(targets)}
