"""Tests of host-side DP accounting: published figures, invariants, per-client tracking."""

import math

import numpy as np
import pytest
from scipy import optimize, stats

from fedjaxpriv import privacy

DELTA = 1e-5


# ----------------------------------------------------------------------------- published figures


@pytest.mark.parametrize(
    "name, sample_rate, sigma, steps, orders, published",
    [
        # Abadi et al. 2016 (moments accountant, lambda = 1..32): q=0.01, sigma=4, 10k steps.
        ("abadi2016", 0.01, 4.0, 10_000, privacy.MOMENTS_ACCOUNTANT_ORDERS, 1.26),
        # TF Privacy MNIST DP-SGD tutorial: batch 256 of 60000, 60 epochs = ceil(14062.5) steps.
        ("tf_privacy_mnist", 256 / 60000, 1.1, math.ceil(60 * 60000 / 256),
         privacy.LEGACY_RDP_ORDERS, 3.01),
        # Opacus MNIST example: batch 240 of 60000 (rate 0.004), 15 epochs = 3750 steps.
        ("opacus_mnist", 240 / 60000, 1.3, 15 * 250, privacy.LEGACY_RDP_ORDERS, 1.16),
    ],
)
def test_published_epsilons_with_classic_conversion(
    name, sample_rate, sigma, steps, orders, published
):
    eps = privacy.dpsgd_epsilon(sample_rate, sigma, steps, DELTA, "rdp", conversion="classic",
                                orders=orders)
    assert abs(eps - published) < 0.005, (name, eps)
    # dp_accounting's improved conversion is strictly tighter on the same RDP curve.
    improved = privacy.dpsgd_epsilon(sample_rate, sigma, steps, DELTA, "rdp", orders=orders)
    assert improved < eps - 0.1, (name, improved, eps)


def test_classic_conversion_matches_formula_on_rdp_curve():
    orders = np.array(privacy.LEGACY_RDP_ORDERS)
    curve = privacy.rdp_curve(0.01, 4.0, 10_000, orders)
    expected = np.min(curve + np.log(1 / DELTA) / (orders - 1))
    classic = privacy.rdp_to_epsilon(orders, curve, DELTA, "classic")
    assert classic == pytest.approx(expected, rel=1e-12)
    # Integer order: RDP of the sampled Gaussian by its binomial expansion (Mironov et al. 2019).
    alpha = 20
    k = np.arange(alpha + 1)
    log_terms = (stats.binom.logpmf(k, alpha, 0.01) + (k * k - k) / (2 * 4.0**2))
    reference = 10_000 * np.logaddexp.reduce(log_terms) / (alpha - 1)
    assert curve[list(orders).index(alpha)] == pytest.approx(reference, rel=1e-10)


def test_rdp_epsilon_is_dp_accountings_rdp_accountant():
    import dp_accounting

    for q, sigma, steps in [(0.01, 1.0, 1000), (256 / 60000, 1.1, 14063)]:
        reference = dp_accounting.rdp.RdpAccountant(list(privacy.DEFAULT_RDP_ORDERS))
        reference.compose(privacy.dpsgd_event(q, sigma, steps))
        assert privacy.dpsgd_epsilon(q, sigma, steps, DELTA) == pytest.approx(reference.get_epsilon(DELTA), rel=1e-12)


# ----------------------------------------------------------------------------- invariants


def _analytic_gaussian_epsilon(effective_sigma: float, delta: float) -> float:
    """Exact epsilon of one Gaussian mechanism (Balle & Wang 2018), solved with scipy."""
    s = effective_sigma

    def gap(eps):
        return (stats.norm.cdf(-eps * s + 1 / (2 * s))
                - math.exp(eps) * stats.norm.cdf(-eps * s - 1 / (2 * s)) - delta)

    return optimize.brentq(gap, 0.0, 100.0, xtol=1e-12)


def test_unamplified_pld_equals_exact_gaussian_composition():
    # T Gaussian steps without subsampling = one Gaussian with sigma / sqrt(T).
    sigma, steps = 8.0, 100
    exact = _analytic_gaussian_epsilon(sigma / math.sqrt(steps), DELTA)
    pld = privacy.dpsgd_epsilon(0.05, sigma, steps, DELTA, "pld", amplification=False)
    rdp = privacy.dpsgd_epsilon(0.05, sigma, steps, DELTA, "rdp", amplification=False)
    assert exact <= pld <= exact * 1.002
    assert rdp > pld
    assert privacy.dpsgd_epsilon(1.0, sigma, steps, DELTA, "pld") == pld


@pytest.mark.parametrize("q, sigma, steps", [(0.01, 1.0, 1000), (0.1, 2.0, 200), (0.004, 0.8, 500)])
def test_pld_below_rdp_and_amplified_below_unamplified(q, sigma, steps):
    rdp = privacy.dpsgd_epsilon(q, sigma, steps, DELTA, "rdp")
    classic = privacy.dpsgd_epsilon(q, sigma, steps, DELTA, "rdp", conversion="classic")
    pld = privacy.dpsgd_epsilon(q, sigma, steps, DELTA, "pld", pld_discretization=1e-3)
    unamplified = privacy.dpsgd_epsilon(q, sigma, steps, DELTA, "rdp", amplification=False)
    assert pld < rdp < classic < unamplified


def test_pld_epsilon_is_dp_accountings_pld_accountant():
    """The PLD figure is dp_accounting's own PLDAccountant composed with the same event (add/remove one)."""
    import dp_accounting

    reference = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    reference.compose(privacy.dpsgd_event(0.02, 1.1, 300))
    assert privacy.dpsgd_epsilon(0.02, 1.1, 300, DELTA, "pld", pld_discretization=1e-3) == pytest.approx(
        reference.get_epsilon(DELTA), rel=1e-12)


def test_zero_noise_is_infinite_and_zero_steps_is_free():
    assert privacy.dpsgd_epsilon(0.1, 0.0, 10, DELTA) == math.inf
    assert privacy.dpsgd_epsilon(0.1, 0.0, 10, DELTA, "pld") == math.inf
    assert privacy.dpsgd_epsilon(0.1, 1.0, 0, DELTA) == 0.0
    assert privacy.dpfedavg_epsilon(0.1, 0.0, 5, DELTA) == math.inf


def test_epsilon_monotone_in_steps_noise_and_rate():
    base = privacy.dpsgd_epsilon(0.01, 1.0, 500, DELTA)
    assert privacy.dpsgd_epsilon(0.01, 1.0, 1000, DELTA) > base
    assert privacy.dpsgd_epsilon(0.01, 1.5, 500, DELTA) < base
    assert privacy.dpsgd_epsilon(0.02, 1.0, 500, DELTA) > base


def test_dpfedavg_equals_sampled_gaussian_at_client_level():
    eps = privacy.dpfedavg_epsilon(100 / 10_000, 1.0, 1000, DELTA, "pld", pld_discretization=1e-3)
    assert eps == privacy.dpsgd_epsilon(0.01, 1.0, 1000, DELTA, "pld", pld_discretization=1e-3)
    unamplified = privacy.dpfedavg_epsilon(0.01, 1.0, 1000, DELTA, amplification=False)
    assert unamplified > 10 * eps


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: privacy.dpsgd_epsilon(0.0, 1.0, 10, DELTA), "sample_rate"),
        (lambda: privacy.dpsgd_epsilon(1.5, 1.0, 10, DELTA), "sample_rate"),
        (lambda: privacy.dpsgd_epsilon(0.1, -1.0, 10, DELTA), "noise_multiplier"),
        (lambda: privacy.dpsgd_epsilon(0.1, 1.0, -1, DELTA), "steps"),
        (lambda: privacy.dpsgd_epsilon(0.1, 1.0, 2.5, DELTA), "steps"),
        (lambda: privacy.dpsgd_epsilon(0.1, 1.0, 10, 0.0), "delta"),
        (lambda: privacy.dpsgd_epsilon(0.1, 1.0, 10, 1.0), "delta"),
        (lambda: privacy.dpsgd_epsilon([0.1, 0.2], 1.0, 10, DELTA), "sample_rate"),
        (lambda: privacy.dpsgd_epsilon(0.1, 1.0, 10, DELTA, "moments"), "accountant"),
        (lambda: privacy.dpsgd_epsilon(0.1, 1.0, 10, DELTA, "pld", conversion="classic"),
         "conversion"),
        (lambda: privacy.dpsgd_epsilons([0.1, 0.2], [1.0, 1.0, 1.0], 5, DELTA), "shapes"),
    ],
)
def test_bad_input_raises_value_error_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- many clients


def test_vectorized_epsilons_equal_dp_accounting_per_client():
    """``dpsgd_epsilons`` (one vectorized RDP call for all distinct mechanisms) against dp_accounting's own
    accountant for each client; a noiseless tier is at inf and zero steps cost nothing."""
    rng = np.random.default_rng(1)
    num_clients = 60
    tier = rng.integers(0, 3, num_clients)
    q = np.array([0.01, 0.02, 0.05])[tier] * rng.choice([1.0, 1.5], num_clients)
    sigma = np.array([1.0, 1.2, 0.0])[tier]
    steps = rng.integers(0, 300, num_clients)
    import dp_accounting

    vectorized = privacy.dpsgd_epsilons(q, sigma, steps, DELTA)

    def accountant_epsilon(i):
        if sigma[i] == 0 and steps[i] > 0:
            return math.inf
        accountant = dp_accounting.rdp.RdpAccountant(list(privacy.DEFAULT_RDP_ORDERS))
        return accountant.compose(privacy.dpsgd_event(q[i], sigma[i], steps[i])).get_epsilon(DELTA)

    reference = np.array([accountant_epsilon(i) for i in range(num_clients)])
    np.testing.assert_allclose(vectorized, reference, rtol=1e-9)
    assert np.all(np.isinf(vectorized[(sigma == 0) & (steps > 0)])) and np.all(vectorized[steps == 0] == 0)
    pld = privacy.dpsgd_epsilons(q[:4], np.maximum(sigma[:4], 1.0), steps[:4], DELTA, "pld", pld_discretization=1e-3)
    reference = [privacy.dpsgd_epsilon(q[i], max(sigma[i], 1.0), steps[i], DELTA, "pld", pld_discretization=1e-3)
                 for i in range(4)]
    np.testing.assert_array_equal(pld, reference)


# ----------------------------------------------------------------------------- planning


def test_participation_bound_matches_binomial_tail():
    n = privacy.participation_bound(0.1, 500, 1e-7)
    tail = stats.binom.pmf(np.arange(501), 500, 0.1)
    assert tail[n + 1:].sum() <= 1e-7 < tail[n:].sum()
    assert privacy.participation_bound(1.0, 40, 1e-9) == 40


def test_fixed_cohort_dpfedavg_uses_replace_one_with_and_without_amplification():
    """A fixed cohort of 10 of 50: both figures under replace-one (multiplier z / 2), so the unamplified one is the
    larger, as it must be."""
    import dp_accounting

    amplified = privacy.dpfedavg_epsilon(0.2, 1.0, 30, DELTA, population=50)
    unamplified = privacy.dpfedavg_epsilon(0.2, 1.0, 30, DELTA, population=50, amplification=False)
    gaussian = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(0.5), 30)
    reference = dp_accounting.rdp.RdpAccountant(list(privacy.DEFAULT_RDP_ORDERS)).compose(gaussian)
    assert unamplified == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)
    assert unamplified > amplified > privacy.dpfedavg_epsilon(0.2, 1.0, 30, DELTA)  # add/remove Poisson: smaller
