"""Empirical privacy auditing: statistical lower bounds on the epsilon of a mechanism (host-side NumPy/SciPy).

Two procedures:

* Many-trial auditing (Jagielski, Ullman, Oprea 2020, "Auditing Differentially Private Machine Learning: How
  Private is Private SGD?"): run the mechanism many times with and without a canary, score each run, turn the
  false-positive and false-negative counts of a threshold test into Clopper-Pearson upper confidence bounds
  FPR_hi and FNR_hi and report ``max(log((1 - delta - FNR_hi) / FPR_hi), log((1 - delta - FPR_hi) / FNR_hi))``.
  An (eps, delta)-DP mechanism satisfies ``FPR + e^eps FNR >= 1 - delta`` and ``FNR + e^eps FPR >= 1 - delta``
  for every test, so with both intervals holding the bound is below the true epsilon.
* One-run auditing (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run"): m canaries,
  each included independently with probability 1/2, one run; the auditor guesses in/out for r of them and is
  right on v. Their main theorem: for an (eps, delta)-DP mechanism
  ``P[V >= v] <= f(v) + 2 m delta max_{i=1..v} (f(v - i) - f(v)) / i`` where
  ``f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]`` (for delta = 0 the last term vanishes: V is
  stochastically dominated by that binomial). The bound reported is the largest eps whose tail probability
  at the observed v is at most ``beta``; every eps below it is rejected at level ``beta``.

Convention: label / inclusion 1 marks the canary IN (positive); larger score means "more likely in".
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import optimize, special, stats

from fedjaxpriv.attacks.metrics import roc_counts
from fedjaxpriv.privacy.network import gaussian_epsilon
from fedjaxpriv.privacy.validation import check_delta


def clopper_pearson_interval(
    successes: np.ndarray | int, trials: np.ndarray | int, alpha: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided exact (Clopper-Pearson) binomial confidence interval at level ``1 - alpha``.

    Args:
      successes: counts k (array or int), ``0 <= k <= n``.
      trials: counts n >= 1, broadcastable with ``successes``.
      alpha: total miscoverage, split equally between the two tails.

    Returns:
      ``(low, high)``: ``low = Beta.ppf(alpha/2; k, n-k+1)`` (0 when k = 0) and
      ``high = Beta.ppf(1-alpha/2; k+1, n-k)`` (1 when k = n).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha} must lie in (0, 1).")
    k = np.asarray(successes, np.float64)
    n = np.asarray(trials, np.float64)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1; got {successes} of {trials}.")
    with np.errstate(invalid="ignore"):
        low = np.where(k > 0, stats.beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        high = np.where(k < n, stats.beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    return low, high


def _epsilon_from_error_bounds(fpr_high: np.ndarray, fnr_high: np.ndarray, delta: float) -> np.ndarray:
    """``max(0, log((1-delta-FNR)/FPR), log((1-delta-FPR)/FNR))`` elementwise, with log of <= 0 as -inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(1 - delta - fnr_high > 0, np.log(1 - delta - fnr_high) - np.log(fpr_high), -np.inf)
        second = np.where(1 - delta - fpr_high > 0, np.log(1 - delta - fpr_high) - np.log(fnr_high), -np.inf)
    return np.maximum(np.maximum(first, second), 0.0)


def epsilon_lower_bound_from_counts(
    false_positives: int,
    negatives: int,
    false_negatives: int,
    positives: int,
    delta: float = 0.0,
    alpha: float = 0.05,
) -> float:
    """Jagielski et al. (2020) epsilon lower bound of one fixed threshold test.

    Args:
      false_positives: runs WITHOUT the canary that the test called "in".
      negatives: runs without the canary (>= 1).
      false_negatives: runs WITH the canary that the test called "out".
      positives: runs with the canary (>= 1).
      delta: the delta of the (eps, delta) claim being audited.
      alpha: each rate uses a two-sided Clopper-Pearson interval at level 1 - alpha (so both upper bounds
        hold with probability >= 1 - alpha, by a union bound over the two upper tails of alpha/2).

    Returns:
      ``max(0, log((1 - delta - FNR_hi) / FPR_hi), log((1 - delta - FPR_hi) / FNR_hi))``.
    """
    check_delta(delta, zero=True)
    _, fpr_high = clopper_pearson_interval(false_positives, negatives, alpha)
    _, fnr_high = clopper_pearson_interval(false_negatives, positives, alpha)
    return float(_epsilon_from_error_bounds(fpr_high, fnr_high, delta))


class ThresholdAudit(NamedTuple):
    """Result of a threshold-sweep audit.

    Attributes:
      epsilon: the largest per-threshold lower bound (>= 0).
      threshold: the score threshold achieving it (test: score >= threshold means "in").
      fpr_high: Clopper-Pearson upper bound on FPR at that threshold.
      fnr_high: Clopper-Pearson upper bound on FNR at that threshold.
    """

    epsilon: float
    threshold: float
    fpr_high: float
    fnr_high: float


def epsilon_lower_bound_from_scores(
    scores: np.ndarray, labels: np.ndarray, delta: float = 0.0, alpha: float = 0.05
) -> ThresholdAudit:
    """Jagielski et al. (2020) audit maximized over every threshold of the scores.

    Each run gives one score; the test "score >= t" is evaluated at every distinct t, and the best bound is
    returned. Choosing the threshold on the same runs makes the reported confidence optimistic (as in the
    paper); for a strict guarantee pick the threshold on held-out runs and call
    ``epsilon_lower_bound_from_counts``.

    Args:
      scores: ``[N]`` one score per run.
      labels: ``[N]`` 1 if the run included the canary, else 0.
      delta: audited delta.
      alpha: Clopper-Pearson miscoverage per rate (see ``epsilon_lower_bound_from_counts``).
    """
    check_delta(delta, zero=True)
    thresholds, true_positives, false_positives = roc_counts(scores, labels)
    positives, negatives = true_positives[-1], false_positives[-1]
    _, fpr_high = clopper_pearson_interval(false_positives, negatives, alpha)
    _, fnr_high = clopper_pearson_interval(positives - true_positives, positives, alpha)
    epsilons = _epsilon_from_error_bounds(fpr_high, fnr_high, delta)
    best = int(np.argmax(epsilons))
    return ThresholdAudit(float(epsilons[best]), float(thresholds[best]), float(fpr_high[best]), float(fnr_high[best]))


def one_run_p_value(num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float = 0.0) -> float:
    """Steinke et al. (2023) bound on ``P[>= num_correct correct out of num_guesses]`` under (eps, delta)-DP.

    ``f(v) + 2 m delta max_{i=1..v} (f(v - i) - f(v)) / i`` with ``f(v) = P[Binomial(r, sigmoid(eps)) >= v]``,
    clipped to 1 (see the module docstring).
    """
    p = special.expit(epsilon)
    tail = stats.binom.sf(num_correct - 1, num_guesses, p)
    if delta == 0.0 or num_correct == 0:
        return float(min(tail, 1.0))
    shifts = np.arange(1, num_correct + 1)
    slack = np.max((stats.binom.sf(num_correct - shifts - 1, num_guesses, p) - tail) / shifts)
    return float(min(tail + 2.0 * num_canaries * delta * slack, 1.0))


def one_run_epsilon_lower_bound(
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    beta: float = 0.05,
    delta: float = 0.0,
) -> float:
    """Largest epsilon rejected at level ``beta`` by one-run auditing (Steinke, Nasr, Jagielski 2023).

    Returns ``sup {eps >= 0 : one_run_p_value(m, r, v, eps, delta) <= beta}`` (0 if no eps is rejected). For
    delta = 0 this is exact: ``sigmoid(eps) = Beta.ppf(beta; v, r - v + 1)`` because
    ``P[Binomial(r, p) >= v]`` is the regularized incomplete beta ``I_p(v, r - v + 1)``; in particular
    all ``r`` correct gives ``eps = logit(beta^(1/r))``. For delta > 0 the root is found by bisection.

    Args:
      num_canaries: m, canaries in the run (each in with probability 1/2).
      num_guesses: r <= m guesses made.
      num_correct: v <= r correct guesses.
      beta: significance (the bound holds with probability >= 1 - beta).
      delta: audited delta.
    """
    if not 0 <= num_correct <= num_guesses <= num_canaries:
        raise ValueError(
            f"need 0 <= num_correct ({num_correct}) <= num_guesses ({num_guesses}) <= num_canaries ({num_canaries})."
        )
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta={beta} must lie in (0, 1).")
    check_delta(delta, zero=True)
    if num_correct == 0:
        return 0.0
    p_pure = stats.beta.ppf(beta, num_correct, num_guesses - num_correct + 1)
    eps_pure = float(max(special.logit(p_pure), 0.0))
    if delta == 0.0 or eps_pure == 0.0:
        return eps_pure

    def excess(eps: float) -> float:
        return one_run_p_value(num_canaries, num_guesses, num_correct, eps, delta) - beta

    # The delta bound is >= the pure tail, so its root lies in [0, eps_pure].
    if excess(0.0) > 0:
        return 0.0
    return float(optimize.brentq(excess, 0.0, eps_pure, xtol=1e-9))


class OneRunAudit(NamedTuple):
    """Result of a one-run audit.

    Attributes:
      epsilon: the bound at the chosen guess counts.
      num_guesses: r = positive + negative guesses.
      num_correct: v correct guesses.
    """

    epsilon: float
    num_guesses: int
    num_correct: int


def one_run_audit(
    scores: np.ndarray,
    included: np.ndarray,
    num_positive_guesses: int,
    num_negative_guesses: int = 0,
    beta: float = 0.05,
    delta: float = 0.0,
) -> OneRunAudit:
    """One-run audit from canary scores: guess "in" for the top-k+ scores and "out" for the bottom-k-.

    Args:
      scores: ``[m]`` one score per canary.
      included: ``[m]`` 1 if the canary was included (each with probability 1/2, independently).
      num_positive_guesses: k+ highest-scoring canaries guessed in.
      num_negative_guesses: k- lowest-scoring canaries guessed out; ``k+ + k- <= m``.
      beta: significance.
      delta: audited delta.

    The counts k+ and k- must be fixed before looking at the scores for the bound to hold at level beta.
    """
    scores = np.asarray(scores, np.float64).ravel()
    included = np.asarray(included).ravel().astype(bool)
    if scores.shape != included.shape:
        raise ValueError(f"scores {scores.shape} and included {included.shape} must have equal length.")
    m = scores.size
    if num_positive_guesses < 0 or num_negative_guesses < 0 or num_positive_guesses + num_negative_guesses > m:
        raise ValueError(
            f"guess counts k+={num_positive_guesses}, k-={num_negative_guesses} must be >= 0 with sum <= m={m}."
        )
    order = np.argsort(-scores, kind="stable")
    correct = int(included[order[:num_positive_guesses]].sum())
    correct += int((~included[order[m - num_negative_guesses :]]).sum()) if num_negative_guesses else 0
    guesses = num_positive_guesses + num_negative_guesses
    return OneRunAudit(one_run_epsilon_lower_bound(m, guesses, correct, beta, delta), guesses, correct)


def gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """Epsilon of a mu-GDP mechanism (Gaussian mechanism with sensitivity / sigma = mu) at ``delta``."""
    if mu <= 0:
        raise ValueError(f"mu={mu} must be > 0.")
    check_delta(delta, zero=True)
    if delta == 0.0:
        return float("inf")
    return float(gaussian_epsilon(mu, delta))
