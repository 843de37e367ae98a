"""Client sampling, on which every amplification-by-sampling claim rests: uniform cohorts are K distinct
clients, Poisson cohorts include each client at rate K/C, padding is masked, truncation is rare and unbiased."""

import numpy as np
import pytest
from scipy import stats

from fedjaxpriv.client.sampling import DP_OVERFLOW_TAIL, overflow_probability
from fedjaxpriv.server import max_cohort_size, sample_cohort


def test_uniform_cohorts_are_k_distinct_clients_each_included_at_rate_k_over_c():
    num_clients, k, rounds = 40, 7, 3000
    counts = np.zeros(num_clients)
    for r in range(rounds):
        cohort = sample_cohort(3, r, num_clients, k, "uniform")
        assert cohort.mask.all() and cohort.ids.size == k and np.unique(cohort.ids).size == k
        counts[cohort.ids] += 1
    # Each client's count is Binomial(rounds, k / C): chi-square over the clients.
    expected = rounds * k / num_clients
    chi2 = np.sum((counts - expected) ** 2 / (expected * (1 - k / num_clients)))
    assert stats.chi2.sf(chi2, num_clients - 1) > 1e-3
    assert sample_cohort(3, 5, num_clients, k, "uniform").ids.tolist() == sample_cohort(3, 5, num_clients, k,
                                                                                       "uniform").ids.tolist()


def test_poisson_cohorts_include_each_client_independently_at_rate_k_over_c():
    num_clients, k, rounds = 200, 10, 2000
    slots = max_cohort_size(num_clients, k, "poisson")
    sizes, counts = [], np.zeros(num_clients)
    for r in range(rounds):
        cohort = sample_cohort(1, r, num_clients, k, "poisson", slots)
        real = cohort.ids[cohort.mask]
        assert np.unique(real).size == real.size and cohort.dropped == 0
        assert np.all(cohort.ids[~cohort.mask] == 0)  # padded slots repeat id 0 and are masked
        sizes.append(real.size)
        counts[real] += 1
    # Cohort sizes are Binomial(C, K/C): their mean within 4 standard errors, and a wrong rate rejected.
    p = k / num_clients
    sizes = np.asarray(sizes)
    se = np.sqrt(num_clients * p * (1 - p) / rounds)
    assert abs(sizes.mean() - k) < 4 * se
    assert abs(sizes.mean() - 1.1 * k) > 10 * se
    # Inclusion counts per client are Binomial(rounds, p): chi-square.
    chi2 = np.sum((counts - rounds * p) ** 2 / (rounds * p * (1 - p)))
    assert stats.chi2.sf(chi2, num_clients - 1) > 1e-3


def test_truncated_poisson_cohort_keeps_a_random_subset():
    kept = np.zeros(50)
    for r in range(400):
        cohort = sample_cohort(0, r, 50, 40, "poisson", max_size=20)
        assert cohort.mask.sum() == 20 and cohort.dropped > 0
        kept[cohort.ids[cohort.mask]] += 1
    # Not the lowest ids: high and low ids are kept equally often (each about 400 x 20 / 50 = 160 times).
    assert abs(kept[:25].sum() - kept[25:].sum()) < 0.1 * kept.sum()


def test_private_poisson_cohort_slots_bound_the_overflow_probability():
    num_clients, k = 10_000, 100
    slots = max_cohort_size(num_clients, k, "poisson", private=True)
    assert overflow_probability(num_clients + 1, k / num_clients, slots) <= DP_OVERFLOW_TAIL
    assert overflow_probability(num_clients + 1, k / num_clients, slots - 1) > DP_OVERFLOW_TAIL
    assert slots >= max_cohort_size(num_clients, k, "poisson")


@pytest.mark.parametrize("mode, k", [("uniform", 0), ("uniform", 51), ("gaussian", 5)])
def test_bad_sampling_arguments_are_named(mode, k):
    with pytest.raises(ValueError, match="clients_per_round|sampling mode"):
        sample_cohort(0, 0, 50, k, mode)
