"""Tests of the vectorized RDP module against dp_accounting (the independent reference)."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp as dp_rdp
from dp_accounting.rdp import rdp_privacy_accountant as dp_rdp_impl

from fedjaxpriv.privacy import rdp

ORDERS = list(rdp.DEFAULT_ORDERS)
SAMPLE_RATES = (1e-4, 0.004, 0.05, 0.25, 0.6, 0.99, 1.0)
SIGMAS = (0.5, 0.8, 1.0, 2.0, 5.0)
DATASET_SIZE = 10_000  # SWOR reference: m = q * n is integral for every rate above
DELTA = 1e-5
RTOL = 1e-9
# dp_accounting sums log(A_a) directly, so its absolute error near A_a = 1 is about 1e-16 / (a - 1).
ATOL = 1e-14


# ----------------------------------------------------------------------------- dp_accounting references


def reference_poisson(q: float, sigma: float, orders=None) -> np.ndarray:
    accountant = dp_rdp.RdpAccountant(None if orders is None else list(orders))
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
    return accountant.rdp


def reference_swor(n: int, m: int, sigma: float, orders=None) -> np.ndarray:
    accountant = dp_rdp.RdpAccountant(
        None if orders is None else list(orders), neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(sigma)))
    return accountant.rdp


@pytest.fixture
def memoized_forward_diffs(monkeypatch):
    """Memoizes dp_accounting's own forward differences of exp(cgf) within one test.

    They depend on sigma and the order but not on q, and recomputing them for every (q, order) is what
    makes a reference curve slow (about 0.45 s); the values are unchanged (one curve is also compared
    with dp_accounting untouched). The key is (number of differences, cgf(1) = 1 / sigma^2, cgf(2)).
    """
    original = dp_rdp_impl._get_forward_diffs
    cache = {}

    def memoized(fun, n):
        key = (n, fun(1.0), fun(2.0))
        if key not in cache:
            cache[key] = original(fun, n)
        deltas, signs = cache[key]
        return deltas.copy(), signs.copy()

    monkeypatch.setattr(dp_rdp_impl, "_get_forward_diffs", memoized)


def assert_rdp_close(ours: np.ndarray, reference: np.ndarray, rtol: float = RTOL, label: str = "") -> None:
    """Same shape, inf at the same orders, and elsewhere |ours - reference| <= ATOL + rtol |reference|."""
    assert ours.shape == reference.shape
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(reference), err_msg=f"{label}: inf at other orders")
    finite = np.isfinite(reference)
    excess = np.zeros(ours.shape)
    excess[finite] = np.abs(ours[finite] - reference[finite]) - (ATOL + rtol * np.abs(reference[finite]))
    worst = int(np.argmax(excess))
    assert excess.max() <= 0, (f"{label}: difference {abs(ours[worst] - reference[worst]):.3g} at order "
                               f"{ORDERS[worst]} (ours {ours[worst]!r}, dp_accounting {reference[worst]!r})")


# ----------------------------------------------------------------------------- RDP curves vs dp_accounting


def test_default_orders_are_dp_accountings():
    assert ORDERS == list(dp_rdp.RdpAccountant()._orders)
    assert any(not float(a).is_integer() for a in ORDERS) and max(ORDERS) == 1024


@pytest.mark.parametrize("sigma", SIGMAS)
def test_poisson_matches_dp_accounting(sigma):
    ours = rdp.poisson_gaussian_rdp(np.array(SAMPLE_RATES), sigma)
    assert ours.shape == (len(SAMPLE_RATES), len(ORDERS)) and ours.dtype == np.float64
    for row, q in zip(ours, SAMPLE_RATES):
        assert_rdp_close(row, reference_poisson(q, sigma), label=f"Poisson q={q} sigma={sigma}")


@pytest.mark.parametrize("sigma", SIGMAS)
def test_swor_matches_dp_accounting(sigma, memoized_forward_diffs):
    sizes = [round(q * DATASET_SIZE) for q in SAMPLE_RATES]
    ours = rdp.swor_gaussian_rdp(np.array(sizes) / DATASET_SIZE, sigma)
    assert ours.shape == (len(SAMPLE_RATES), len(ORDERS)) and ours.dtype == np.float64
    for row, m in zip(ours, sizes):
        assert_rdp_close(row, reference_swor(DATASET_SIZE, m, sigma), label=f"SWOR m={m} sigma={sigma}")


def test_swor_matches_unmemoized_dp_accounting():
    # Any n, m with m / n = q; dp_accounting runs untouched here (forward differences included).
    assert dp_rdp_impl._get_forward_diffs.__module__ == dp_rdp_impl.__name__
    ours = rdp.swor_gaussian_rdp(3 / 7, 1.3)
    assert_rdp_close(ours, reference_swor(7, 3, 1.3), label="SWOR n=7 m=3 sigma=1.3")


def test_fractional_orders_stop_where_dp_accounting_gives_up():
    # q = 0.9, sigma = 0.7: the series at order 1.1 does not meet the stopping rule within 1000 terms in
    # dp_accounting, which then excludes the order (inf); so must we, while 1.5 and 2.5 converge.
    orders = [1.1, 1.5, 2.5]
    ours = rdp.poisson_gaussian_rdp(0.9, 0.7, orders)
    assert ours[0] == np.inf and np.isfinite(ours[1:]).all()
    assert_rdp_close(ours, reference_poisson(0.9, 0.7, orders)[: len(orders)], label="q=0.9 sigma=0.7")


@pytest.mark.parametrize("q, sigma, alpha, looser", [
    (0.05, 1.0, 3.0, 1e-9), (0.05, 1.0, 2.5, 0.01), (0.05, 1.0, 2.9, 0.004), (0.001, 1.0, 2.5, 1e-5),
    (0.01, 2.0, 7.3, 1e-9)])
def test_fractional_orders_bound_the_renyi_divergence_by_quadrature(q, sigma, alpha, looser):
    # Independent of both series: A_a = E_{z ~ N(0, sigma^2)} [((1 - q) + q exp((2 z - 1) / (2 sigma^2)))^a].
    # dp_accounting's series sums |C(a, i)| where the binomial series of a fractional power alternates,
    # so at fractional orders it (and this module) is an upper bound on the true RDP, measured here to be
    # at most 1 % above it; at integer orders it is exact.
    from scipy import integrate, stats

    def integrand(z):
        ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
        return math.exp(stats.norm.logpdf(z, scale=sigma) + alpha * ratio)

    # The integrand is below 1e-300 outside these limits for the cases here.
    value, _ = integrate.quad(integrand, -40 * sigma, 40 * sigma + 2 * alpha, epsabs=0, epsrel=1e-12, limit=500)
    truth = math.log(value) / (alpha - 1)
    ours = rdp.poisson_gaussian_rdp(q, sigma, [alpha])[0]
    assert truth * (1 - 1e-9) <= ours <= truth * (1 + looser)
    assert_rdp_close(np.array([ours]), reference_poisson(q, sigma, [alpha])[:1], label="quadrature case")


def test_full_sampling_is_the_gaussian_mechanism():
    sigma = np.array([0.5, 1.0, 3.0])
    expected = np.array(ORDERS, dtype=np.float64) / (2.0 * sigma[:, None] ** 2)
    np.testing.assert_array_equal(rdp.poisson_gaussian_rdp(1.0, sigma), expected)
    np.testing.assert_array_equal(rdp.swor_gaussian_rdp(1.0, sigma), expected)


def test_poisson_is_accurate_where_dp_accounting_loses_digits():
    # For tiny q, log(A_a) is a small number obtained by dp_accounting as a difference of order-q terms;
    # the 1 + sum_{i>=2} form used here keeps full precision (checked against 50-digit arithmetic).
    mpmath = pytest.importorskip("mpmath")
    q, sigma, orders = 1e-6, 5.0, [2, 8, 64]

    def exact(alpha):
        mq, ms = mpmath.mpf(q), mpmath.mpf(sigma)
        total = mpmath.fsum(mpmath.binomial(alpha, i) * mq**i * (1 - mq) ** (alpha - i)
                            * mpmath.exp(mpmath.mpf(i * i - i) / (2 * ms**2)) for i in range(alpha + 1))
        return float(mpmath.log(total) / (alpha - 1))

    with mpmath.workdps(50):
        expected = np.array([exact(a) for a in orders])
    np.testing.assert_allclose(rdp.poisson_gaussian_rdp(q, sigma, orders), expected, rtol=1e-12)


@pytest.mark.parametrize("function", [rdp.poisson_gaussian_rdp, rdp.swor_gaussian_rdp])
def test_rows_with_different_sigmas_equal_separate_calls(function):
    q = np.array([0.01, 0.25, 0.01, 0.6, 1.0, 0.004])
    sigma = np.array([0.8, 2.0, 5.0, 0.8, 2.0, 1.0])
    together = function(q, sigma)
    for row, (qi, si) in enumerate(zip(q, sigma)):
        np.testing.assert_allclose(together[row], function(np.array([qi]), np.array([si]))[0], rtol=1e-13)
    # Broadcasting: a 2-D grid of rates against a row of sigmas.
    grid = function(q[:, None], sigma[None, :3])
    assert grid.shape == (q.size, 3, len(ORDERS))
    np.testing.assert_allclose(grid[3, 1], function(q[3], sigma[1]), rtol=1e-13)


def test_custom_orders_subset():
    orders = [3, 17, 300]  # 300 takes the Stirling branch of the SWOR bound
    full = dict(zip(ORDERS + [300], rdp.swor_gaussian_rdp(0.05, 1.0, ORDERS + [300])))
    sub = rdp.swor_gaussian_rdp(0.05, 1.0, orders)
    np.testing.assert_allclose(sub, [full[a] for a in orders], rtol=1e-13)
    np.testing.assert_allclose(rdp.poisson_gaussian_rdp(0.05, 1.0, (3.0, 17.0)),
                               reference_poisson(0.05, 1.0, [3, 17]), rtol=RTOL)


# ----------------------------------------------------------------------------- epsilons vs RdpAccountant()


def test_epsilons_equal_dp_accounting_default_accountant():
    # Every (q, sigma, steps) of a grid, accounted by EventAccountant in one vectorized call, against
    # dp_accounting's RdpAccountant() with its default orders, one event at a time: to 1e-6 relative.
    from fedjaxpriv.privacy.composition import EventAccountant

    cases = [(q, sigma, steps) for q in (0.001, 0.01, 0.1, 0.5) for sigma in (0.5, 0.8, 1.1, 3.0)
             for steps in (1, 100, 10_000)]
    events = [dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)) for q, sigma, _ in cases]
    ours = EventAccountant(events, DELTA).epsilons(np.arange(len(cases)), [steps for *_, steps in cases])
    expected = [dp_rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(event, steps)).get_epsilon(DELTA)
                for event, (*_, steps) in zip(events, cases)]
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    # The fractional orders matter: integer orders alone give a larger epsilon at small noise.
    q, sigma, steps = 0.01, 0.5, 100
    integer_orders = list(range(2, 65)) + [72, 80, 96, 128, 160, 192, 256, 384, 512, 1024]
    at_integers = dp_rdp.RdpAccountant(integer_orders).compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)).get_epsilon(DELTA)
    assert ours[cases.index((q, sigma, steps))] < at_integers / 1.2


def test_counts_asked_one_round_at_a_time_give_dp_accountings_epsilons():
    """A run asks for the count of rounds so far, one more each round; the accountant converts the next counts
    with a missing one (``RDP_COUNTS_AHEAD``), so round 70 is answered from a block computed at round 65. Each
    answer equals dp_accounting's RdpAccountant for that count, across the block boundary and for the truncation
    slack charged to delta."""
    from fedjaxpriv.privacy import composition

    event = dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1))
    accountant = composition.EventAccountant([event], DELTA, truncation_probabilities=[1e-9])
    grown = [accountant.epsilon(0, n) for n in range(1, 71)]
    assert accountant._known_keys.size == 2 * composition.RDP_COUNTS_AHEAD  # two blocks: counts 1-64 and 65-128
    for n in (1, 63, 64, 65, 70):
        slack = n * 1e-9  # the truncation charge: exact at delta - n p (1 + e^eps), eps taken at delta / 2
        half = dp_rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(event, n)).get_epsilon(DELTA / 2)
        expected = dp_rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(event, n)).get_epsilon(
            DELTA - slack * (1 + math.exp(half)))
        assert grown[n - 1] == pytest.approx(expected, rel=1e-6), n


def test_memoised_answers_to_mixed_queries_equal_a_fresh_accountants_one_by_one():
    """The memo is keyed by (event, count): a query mixing events, repeated and unsorted counts, after earlier
    queries filled parts of the memo, gives every row the epsilon a fresh accountant gives that row alone."""
    from fedjaxpriv.privacy.composition import EventAccountant

    events = [dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
              for q, sigma in ((0.05, 1.1), (0.2, 0.8), (0.01, 2.0))]
    accountant = EventAccountant(events, DELTA)
    accountant.epsilons([1, 1], [3, 300])  # part of the memo filled first
    rng = np.random.default_rng(0)
    groups, counts = rng.integers(0, 3, 40), rng.choice([0, 1, 2, 3, 64, 65, 299, 300, 1000], 40)
    mixed = accountant.epsilons(groups, counts)
    alone = [EventAccountant(events, DELTA).epsilon(int(g), int(n)) for g, n in zip(groups, counts)]
    np.testing.assert_array_equal(mixed, alone)
    assert len(set(mixed.tolist())) > 15  # the rows differ: a misaligned lookup could not pass by chance
    with pytest.raises(ValueError, match=r"counts=\[-1\] are not allowed"):
        accountant.epsilons([0], [-1])


def test_swor_epsilons_equal_dp_accounting_default_accountant(memoized_forward_diffs):
    from fedjaxpriv.privacy.composition import EventAccountant

    cases = [(n, m, sigma, steps) for n, m in ((1000, 10), (200, 50)) for sigma in (0.7, 1.5) for steps in (1, 500)]
    events = [dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(sigma))
              for n, m, sigma, _ in cases]
    ours = EventAccountant(events, DELTA).epsilons(np.arange(len(cases)), [steps for *_, steps in cases])
    replace_one = dp_accounting.NeighboringRelation.REPLACE_ONE
    expected = [dp_rdp.RdpAccountant(neighboring_relation=replace_one).compose(
        dp_accounting.SelfComposedDpEvent(event, steps)).get_epsilon(DELTA) for event, (*_, steps) in zip(events, cases)]
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


# ----------------------------------------------------------------------------- epsilon conversion


def classic_reference(orders, curve, delta):
    return max(0.0, min(r + math.log(1 / delta) / (a - 1) for a, r in zip(orders, curve)))


@pytest.fixture(scope="module")
def conversion_rows():
    """One-step curves scaled by 1, 10, 1000 and 1e5 steps, a KL-shortcut curve, an inf and a negative row."""
    q = np.array([1e-4, 0.004, 0.05, 0.25, 0.99])
    sigma = np.array([5.0, 1.0, 0.8, 2.0, 0.5])
    curves = rdp.poisson_gaussian_rdp(q, sigma)
    steps = np.array([1, 10, 1000, 100_000], dtype=np.float64)
    rows = (steps[:, None, None] * curves[None]).reshape(-1, len(ORDERS))
    tiny = rdp.poisson_gaussian_rdp(1e-6, 5.0)  # ~1e-13: below delta^2 at the low orders
    negative = curves[1].copy()
    negative[5] = -1e-15
    return np.vstack([rows, tiny, np.full(len(ORDERS), np.inf), negative])


def test_improved_conversion_matches_compute_epsilon(conversion_rows):
    ours = rdp.epsilons_from_rdp(ORDERS, conversion_rows, DELTA)
    expected = [dp_rdp.compute_epsilon(ORDERS, list(row), DELTA)[0] for row in conversion_rows]
    np.testing.assert_allclose(ours, expected, rtol=1e-13, atol=0)
    assert ours[-2] == np.inf and ours[-1] == 0.0


def test_improved_conversion_takes_the_kl_shortcut(conversion_rows):
    tiny = conversion_rows[-3]
    orders = np.array(ORDERS, dtype=np.float64)
    assert (DELTA**2 + np.expm1(-tiny) > 0).any()  # the shortcut applies at some order ...
    prop12 = tiny + np.log1p(-1 / orders) - np.log(DELTA * orders) / (orders - 1)
    assert prop12.min() > 0  # ... and without it epsilon would be positive
    assert rdp.epsilons_from_rdp(ORDERS, tiny[None], DELTA)[0] == 0.0
    assert dp_rdp.compute_epsilon(ORDERS, list(tiny), DELTA)[0] == 0.0


def test_improved_conversion_at_the_kl_threshold():
    # RDP values within a few ulps of where delta^2 + expm1(-r) changes sign, at one order per row.
    for delta in (1e-5, 0.3):
        edge = -math.log1p(-(delta**2))
        rows = np.full((9, len(ORDERS)), 5.0)
        rows[:, 3] = edge * (1.0 + np.arange(-4, 5) * 2.0**-52)
        ours = rdp.epsilons_from_rdp(ORDERS, rows, delta)
        expected = [dp_rdp.compute_epsilon(ORDERS, list(row), delta)[0] for row in rows]
        np.testing.assert_array_equal(ours == 0.0, np.array(expected) == 0.0)
        np.testing.assert_allclose(ours, expected, rtol=1e-13)


def test_improved_conversion_with_orders_near_one():
    orders = [1.0, 1.005, 1.01, 1.02, 1.5, 2.0, 8.0]
    rows = np.array([[0.5, 0.6, 0.7, 0.8, 1.0, 1.5, 3.0],
                     [1e-3, 2e-3, 3e-3, 4e-3, 1e-2, 2e-2, 0.1],
                     [np.inf] * 7])
    for delta in (1e-5, 0.1, 0.9):
        ours = rdp.epsilons_from_rdp(orders, rows, delta)
        expected = [dp_rdp.compute_epsilon(orders, list(row), delta)[0] for row in rows]
        np.testing.assert_allclose(ours, expected, rtol=1e-13)
    # Only orders <= 1.01: the Prop. 12 bound is not used, so finite RDP still gives inf.
    assert rdp.epsilons_from_rdp([1.0, 1.01], [[0.5, 0.6]], 1e-5)[0] == np.inf


def test_classic_conversion_is_mironov(conversion_rows):
    ours = rdp.epsilons_from_rdp(ORDERS, conversion_rows, DELTA, conversion="classic")
    expected = [classic_reference(ORDERS, row, DELTA) for row in conversion_rows]
    np.testing.assert_allclose(ours, expected, rtol=1e-13)
    assert ours[-2] == np.inf
    improved = rdp.epsilons_from_rdp(ORDERS, conversion_rows, DELTA)
    assert np.all(improved <= ours)  # the improved conversion is never looser


def test_conversion_keeps_leading_shape():
    curve = rdp.poisson_gaussian_rdp(0.01, 1.0) * 100
    assert rdp.epsilons_from_rdp(ORDERS, curve, DELTA).shape == ()
    assert rdp.epsilons_from_rdp(ORDERS, np.stack([[curve, curve]] * 3), DELTA).shape == (3, 2)


def test_abadi_2016_published_epsilon():
    # Abadi et al. 2016: q = 0.01, sigma = 4, 10,000 steps, delta = 1e-5, moments accountant (orders 2..33).
    orders = list(range(2, 34))
    curve = 10_000 * rdp.poisson_gaussian_rdp(0.01, 4.0, orders)
    eps = rdp.epsilons_from_rdp(orders, curve[None], 1e-5, conversion="classic")[0]
    assert eps == pytest.approx(1.26, abs=0.005)


# ----------------------------------------------------------------------------- input validation


@pytest.mark.parametrize("function", [rdp.poisson_gaussian_rdp, rdp.swor_gaussian_rdp])
@pytest.mark.parametrize("q, sigma, orders, message", [
    (0.0, 1.0, ORDERS, r"sample_rates=0\.0 .*\(0, 1\]"),
    ([0.1, 1.5], 1.0, ORDERS, r"sample_rates\[1\]=1\.5 .*\(0, 1\]"),
    (np.nan, 1.0, ORDERS, r"sample_rates=nan .*\(0, 1\]"),
    (0.1, 0.0, ORDERS, r"noise_multipliers=0\.0 .*finite and > 0"),
    (0.1, [1.0, -2.0], ORDERS, r"noise_multipliers\[1\]=-2\.0 .*finite and > 0"),
    (0.1, np.inf, ORDERS, r"noise_multipliers=inf .*finite and > 0"),
    (0.1, 1.0, [2, 1], r"order 1 .*finite and > 1"),
    (0.1, 1.0, [2.5, np.inf], r"order inf .*finite and > 1"),
    (0.1, 1.0, [], r"non-empty"),
    ([0.1, 0.2], [1.0, 2.0, 3.0], ORDERS, r"do not broadcast"),
])
def test_bad_curve_inputs(function, q, sigma, orders, message):
    with pytest.raises(ValueError, match=message):
        function(q, sigma, orders)


@pytest.mark.parametrize("kwargs, message", [
    (dict(delta=0.0), r"delta=0\.0 .*0 < delta < 1"),
    (dict(delta=1.0), r"delta=1\.0 .*0 < delta < 1"),
    (dict(delta=1e-5, conversion="tight"), r"conversion='tight' .*'improved', 'classic'"),
    (dict(delta=1e-5, rdp=np.ones((2, 3))), rf"shape \(2, 3\).*{len(ORDERS)} orders"),
    (dict(delta=1e-5, rdp=np.full(len(ORDERS), np.nan)), r"rdp\[0\]=nan"),
    (dict(delta=1e-5, orders=[0.5] + ORDERS[1:]), r"order 0\.5 .*>= 1"),
])
def test_bad_conversion_inputs(kwargs, message):
    arguments = dict(orders=ORDERS, rdp=np.ones((2, len(ORDERS))), delta=1e-5, conversion="improved")
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        rdp.epsilons_from_rdp(**arguments)


@pytest.mark.parametrize("conversion", ["improved", "classic"])
def test_one_delta_per_curve_gives_each_curve_its_own_deltas_epsilon(conversion):
    """``epsilons_from_rdp`` with a delta per curve (each curve's delta less its truncation charge) equals
    converting each curve alone at its delta, including a curve at the improved conversion's KL shortcut (0)."""
    from fedjaxpriv.privacy.rdp import DEFAULT_ORDERS, epsilons_from_rdp, poisson_gaussian_rdp

    rng = np.random.default_rng(0)
    q = rng.uniform(0.001, 0.3, 40)
    curves = poisson_gaussian_rdp(q, np.full(40, 1.1), DEFAULT_ORDERS) * rng.integers(1, 2000, 40)[:, None]
    curves[0] = 1e-14  # a curve whose epsilon is 0 by the KL shortcut
    deltas = 10.0 ** rng.uniform(-9, -3, 40)
    together = epsilons_from_rdp(DEFAULT_ORDERS, curves, deltas, conversion)
    alone = [float(epsilons_from_rdp(DEFAULT_ORDERS, c[None], float(d), conversion)[0]) for c, d in zip(curves, deltas)]
    np.testing.assert_allclose(together, alone, rtol=1e-12)
    assert (together[0] == 0.0) == (conversion == "improved")  # only the improved conversion has the shortcut
    assert len(set(np.round(together[1:], 6))) == 39
    with pytest.raises(ValueError, match=r"every delta must satisfy 0 < delta < 1"):
        epsilons_from_rdp(DEFAULT_ORDERS, curves, np.where(np.arange(40) == 3, 0.0, deltas), conversion)
    with pytest.raises(ValueError, match="one per curve"):
        epsilons_from_rdp(DEFAULT_ORDERS, curves, deltas[:5], conversion)
