"""Tests of noise calibration for per-client privacy budgets."""

import numpy as np
import pytest

from fedjaxpriv import privacy

DELTA = 1e-5


@pytest.mark.parametrize("conversion", ["improved", "classic"])
def test_calibrated_noise_hits_target_from_below(conversion):
    target, q, steps = 2.0, 0.01, 1000
    sigma = privacy.calibrate_noise_multiplier(target, q, steps, DELTA, conversion=conversion)
    achieved = privacy.dpsgd_epsilon(q, sigma, steps, DELTA, conversion=conversion)
    assert target * (1 - 1e-4) <= achieved <= target
    # Less noise than the tolerance below the answer breaks the budget: it is the smallest.
    assert privacy.dpsgd_epsilon(q, sigma - 3e-5, steps, DELTA, conversion=conversion) > target


def test_calibration_inverts_published_setting():
    # Abadi et al. 2016: sigma = 4 gives 1.26 (classic, moments orders), so the
    # calibrated sigma for a 1.2586 budget is just below 4.
    eps = privacy.dpsgd_epsilon(0.01, 4.0, 10_000, DELTA, conversion="classic",
                                orders=privacy.MOMENTS_ACCOUNTANT_ORDERS)
    sigma = privacy.calibrate_noise_multiplier(eps, 0.01, 10_000, DELTA, conversion="classic",
                                               orders=privacy.MOMENTS_ACCOUNTANT_ORDERS)
    assert sigma == pytest.approx(4.0, abs=2e-5)


def test_pld_calibration_needs_less_noise_than_rdp():
    kwargs = dict(target_epsilon=3.0, sample_rate=0.05, steps=100, delta=DELTA)
    sigma_rdp = privacy.calibrate_noise_multiplier(**kwargs)
    sigma_pld = privacy.calibrate_noise_multiplier(**kwargs, accountant="pld",
                                                   pld_discretization=1e-3, tolerance=1e-4)
    assert sigma_pld < sigma_rdp
    achieved = privacy.dpsgd_epsilon(0.05, sigma_pld, 100, DELTA, "pld", pld_discretization=1e-3)
    assert 3.0 * (1 - 1e-3) <= achieved <= 3.0


def test_calibrate_clients_personalised_tiers():
    rng = np.random.default_rng(0)
    num_clients = 500
    tier = rng.integers(0, 3, num_clients)
    targets = np.array([1.0, 4.0, 8.0])[tier]
    sample_rates = np.array([0.02, 0.05, 0.05])[tier]
    steps = np.array([10, 10, 20])[tier]
    participations = rng.integers(5, 8, num_clients)
    orders = range(2, 40)  # integer orders keep the 9 searches fast
    sigmas = privacy.calibrate_clients(targets, sample_rates, steps, participations, DELTA,
                                       orders=orders)
    assert sigmas.shape == (num_clients,)
    achieved = privacy.dpsgd_epsilons(sample_rates, sigmas, steps * participations, DELTA,
                                      orders=orders)
    assert np.all(achieved <= targets)
    assert np.all(achieved >= targets * (1 - 1e-4))
    # Same (target, q, total steps) -> identical sigma; a looser budget needs less noise.
    for t in range(3):
        chosen = (tier == t) & (participations == 6)
        assert np.unique(sigmas[chosen]).size == 1
    same_steps = (steps == 10) & (participations == 6) & (sample_rates == 0.05)
    assert np.all(sigmas[same_steps & (targets == 4.0)] > 0)
    direct = privacy.calibrate_noise_multiplier(4.0, 0.05, 60, DELTA, orders=orders)
    np.testing.assert_array_equal(sigmas[same_steps & (targets == 4.0)], direct)
    loose = privacy.calibrate_noise_multiplier(8.0, 0.05, 60, DELTA, orders=orders)
    assert loose < direct


def test_calibration_edge_cases_and_validation():
    assert privacy.calibrate_noise_multiplier(1.0, 0.1, 0, DELTA) == 0.0
    sigmas = privacy.calibrate_clients([1.0, 2.0], 0.1, [5, 0], 3, DELTA)
    assert sigmas[0] > 0 and sigmas[1] == 0.0
    with pytest.raises(ValueError, match="target_epsilon"):
        privacy.calibrate_noise_multiplier(0.0, 0.1, 10, DELTA)
    with pytest.raises(ValueError, match="target_epsilons"):
        privacy.calibrate_clients([1.0, -1.0], 0.1, 10, 3, DELTA)
    with pytest.raises(ValueError, match="sample_rate"):
        privacy.calibrate_noise_multiplier(1.0, 1.2, 10, DELTA)
    with pytest.raises(ValueError, match="delta"):
        privacy.calibrate_noise_multiplier(1.0, 0.1, 10, 2.0)
    with pytest.raises(ValueError, match="shapes"):
        privacy.calibrate_clients([1.0, 2.0], [0.1, 0.1, 0.1], 10, 3, DELTA)
