"""Tests for empirical epsilon lower bounds (Jagielski et al. 2020; Steinke, Nasr, Jagielski 2023)."""

import numpy as np
import pytest
from scipy import special, stats

from fedjaxpriv.attacks import audit


def test_clopper_pearson_defining_property_and_edges():
    k, n, alpha = np.array([0, 3, 17, 50]), 50, 0.1
    low, high = audit.clopper_pearson_interval(k, n, alpha)
    # The upper end is the p at which seeing <= k successes has probability alpha / 2, and vice versa.
    np.testing.assert_allclose(stats.binom.cdf(k[:-1], n, high[:-1]), alpha / 2, rtol=1e-8)
    np.testing.assert_allclose(stats.binom.sf(k[1:] - 1, n, low[1:]), alpha / 2, rtol=1e-8)
    assert low[0] == 0.0 and high[-1] == 1.0
    np.testing.assert_allclose(high[0], 1 - (alpha / 2) ** (1 / n), rtol=1e-10)
    np.testing.assert_allclose(low[-1], (alpha / 2) ** (1 / n), rtol=1e-10)
    with pytest.raises(ValueError, match="alpha"):
        audit.clopper_pearson_interval(1, 10, 1.5)
    with pytest.raises(ValueError, match="successes"):
        audit.clopper_pearson_interval(11, 10)


def test_counts_bound_hand_computed():
    # A perfect test over 1000 + 1000 runs: FPR_hi = FNR_hi = 1 - 0.025^(1/1000).
    root = 0.025 ** (1 / 1000)
    expected = np.log(root / (1 - root))
    np.testing.assert_allclose(audit.epsilon_lower_bound_from_counts(0, 1000, 0, 1000), expected, rtol=1e-10)
    delta = 1e-3
    np.testing.assert_allclose(
        audit.epsilon_lower_bound_from_counts(0, 1000, 0, 1000, delta=delta),
        np.log((root - delta) / (1 - root)),
        rtol=1e-10,
    )
    # 10 false positives of 100, 30 false negatives of 100, alpha = 0.05.
    fpr_hi = stats.beta.ppf(0.975, 11, 90)
    fnr_hi = stats.beta.ppf(0.975, 31, 70)
    expected = max(np.log((1 - fnr_hi) / fpr_hi), np.log((1 - fpr_hi) / fnr_hi), 0.0)
    np.testing.assert_allclose(audit.epsilon_lower_bound_from_counts(10, 100, 30, 100), expected, rtol=1e-10)
    # A coin-flip test proves nothing.
    assert audit.epsilon_lower_bound_from_counts(50, 100, 50, 100) == 0.0


def _gaussian_trials(rng, mu, trials):
    """Scores of the Gaussian mechanism's output: N(0, 1) without the canary, N(mu, 1) with it."""
    scores = np.r_[rng.normal(0, 1, trials), rng.normal(mu, 1, trials)]
    labels = np.r_[np.zeros(trials, int), np.ones(trials, int)]
    return scores, labels


def test_scores_bound_below_gaussian_dp_and_grows_with_mu_and_trials():
    rng = np.random.default_rng(0)
    delta = 1e-5
    bounds = {}
    for trials in (300, 30_000):
        for mu in (0.5, 1.5, 3.0):
            scores, labels = _gaussian_trials(rng, mu, trials)
            result = audit.epsilon_lower_bound_from_scores(scores, labels, delta=delta)
            bounds[trials, mu] = result.epsilon
            # The mechanism is mu-GDP, so its true epsilon at delta upper-bounds any valid audit.
            assert result.epsilon <= audit.gaussian_dp_epsilon(mu, delta)
            # The reported threshold reproduces the reported bound through the counts formula.
            negatives, positives = scores[labels == 0], scores[labels == 1]
            recomputed = audit.epsilon_lower_bound_from_counts(
                int(np.sum(negatives >= result.threshold)),
                trials,
                int(np.sum(positives < result.threshold)),
                trials,
                delta=delta,
            )
            np.testing.assert_allclose(recomputed, result.epsilon, rtol=1e-10)
    for trials in (300, 30_000):
        assert 0.0 < bounds[trials, 0.5] < bounds[trials, 1.5] < bounds[trials, 3.0]
    for mu in (0.5, 1.5, 3.0):
        assert bounds[300, mu] < bounds[30_000, mu]
    # With many trials a strong signal refutes a claim of eps = 2.
    assert bounds[30_000, 3.0] > 2.0


def test_scores_bound_is_zero_without_signal():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=4000)
    labels = rng.integers(0, 2, size=4000)
    assert audit.epsilon_lower_bound_from_scores(scores, labels, delta=1e-5).epsilon < 0.2


def test_one_run_all_correct_matches_closed_form():
    beta = 0.05
    for guesses in (1, 10, 100, 1000):
        p = beta ** (1 / guesses)  # P[Binomial(r, p) >= r] = p^r = beta
        expected = max(np.log(p / (1 - p)), 0.0)
        np.testing.assert_allclose(
            audit.one_run_epsilon_lower_bound(1000, guesses, guesses, beta=beta), expected, rtol=1e-9
        )
    assert audit.one_run_epsilon_lower_bound(1000, 1, 1, beta=0.05) == 0.0  # one guess proves nothing
    assert audit.one_run_epsilon_lower_bound(1000, 100, 0) == 0.0


def test_one_run_pure_bound_is_the_binomial_tail_root():
    eps = audit.one_run_epsilon_lower_bound(1000, 200, 150, beta=0.05)
    np.testing.assert_allclose(stats.binom.sf(149, 200, special.expit(eps)), 0.05, rtol=1e-8)
    # Half right is chance: no epsilon is refuted.
    assert audit.one_run_epsilon_lower_bound(1000, 200, 100, beta=0.05) == 0.0


def test_one_run_delta_term_hand_computed():
    # m = 3 canaries, r = 2 guesses, v = 2 correct: f(2) = p^2, f(1) = 1 - (1 - p)^2, f(0) = 1;
    # bound = f(2) + 2 m delta max(f(1) - f(2), (f(0) - f(2)) / 2).
    eps, delta = 1.3, 0.01
    p = np.exp(eps) / (1 + np.exp(eps))
    f2, f1 = p**2, 1 - (1 - p) ** 2
    expected = f2 + 2 * 3 * delta * max(f1 - f2, (1 - f2) / 2)
    np.testing.assert_allclose(audit.one_run_p_value(3, 2, 2, eps, delta), expected, rtol=1e-12)
    np.testing.assert_allclose(audit.one_run_p_value(3, 2, 2, eps, 0.0), f2, rtol=1e-12)


def test_one_run_delta_bound_root_and_monotonicity():
    m, r, v, beta = 1000, 300, 250, 0.05
    pure = audit.one_run_epsilon_lower_bound(m, r, v, beta)
    previous = pure
    for delta in (1e-6, 1e-5, 1e-4):
        eps = audit.one_run_epsilon_lower_bound(m, r, v, beta, delta=delta)
        assert 0.0 < eps <= previous
        np.testing.assert_allclose(audit.one_run_p_value(m, r, v, eps, delta), beta, rtol=1e-6)
        previous = eps
    assert previous < pure


def test_one_run_audit_of_gaussian_canaries_below_gaussian_dp():
    rng = np.random.default_rng(2)
    m, delta = 2000, 1e-5
    results = []
    for mu in (1.0, 2.0, 4.0):
        included = rng.integers(0, 2, size=m)
        scores = mu * included + rng.normal(size=m)
        result = audit.one_run_audit(scores, included, 100, 100, beta=0.05, delta=delta)
        guessed = np.argsort(-scores, kind="stable")
        assert result.num_guesses == 200
        assert result.num_correct == included[guessed[:100]].sum() + (1 - included[guessed[-100:]]).sum()
        assert result.epsilon <= audit.gaussian_dp_epsilon(mu, delta)
        results.append(result.epsilon)
    assert results[0] < results[1] < results[2]
    assert results[2] > 2.0
    with pytest.raises(ValueError, match="guess counts"):
        audit.one_run_audit(np.zeros(10), np.ones(10), 8, 8)
