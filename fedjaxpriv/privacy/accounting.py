"""Host-side privacy accounting for DP-SGD clients and DP-FedAvg, built on dp_accounting.

Everything here is NumPy + ``dp_accounting`` and runs on the host between rounds.

Mechanisms accounted:

* **Sample-level DP-SGD inside a client.** Each local step Poisson-samples every
  example of the client with probability ``q`` and adds Gaussian noise with
  multiplier ``sigma`` (noise std / per-example clip norm) to the clipped sum.
  One step is ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``; ``T`` steps are
  its ``T``-fold self composition. The neighbouring relation is add/remove one
  example (``NeighboringRelation.ADD_OR_REMOVE_ONE``).
* **Client-level DP-FedAvg.** The server Poisson-samples each client with
  probability ``p`` per round, clips every update to norm ``C`` and adds Gaussian
  noise with std ``z * C`` to the sum: the same event with ``(p, z)`` and add/remove
  one client.

Epsilon conventions:

* ``accountant="rdp"``: ``dp_accounting.rdp.RdpAccountant``. Its RDP -> (eps, delta)
  conversion (``conversion="improved"``) is the improved bound of Balle et al. 2020
  ("Hypothesis testing interpretations and Renyi DP", Prop. 12) / Canonne, Kamath,
  Steinke 2020 (eq. 20): ``eps = min_a rdp(a) + log1p(-1/a) - log(delta * a) / (a - 1)``
  (together with a KL bound for tiny RDP). ``conversion="classic"`` is Mironov 2017,
  Prop. 3: ``eps = min_a rdp(a) + log(1/delta) / (a - 1)``, computed from the same
  RDP curve; it is looser but is what most published DP-SGD figures use.
* ``accountant="pld"``: ``dp_accounting.pld.PLDAccountant`` (pessimistic
  discretisation, so the reported epsilon is an upper bound); tighter than RDP.

A noise multiplier of 0 gives ``eps = inf`` (and ``delta = 1``); zero steps give
``eps = 0``. These are results, not errors.

Published figures reproduced (tests/privacy/test_published.py), all with the
classic conversion:

* Abadi et al. 2016, q=0.01, sigma=4, 10,000 steps, delta=1e-5: 1.26 with the
  integer orders of the moments accountant (``MOMENTS_ACCOUNTANT_ORDERS``).
* TF Privacy MNIST tutorial, q=256/60000, sigma=1.1, 60 epochs
  (ceil(60 * 60000 / 256) = 14063 steps), delta=1e-5: 3.01 with
  ``LEGACY_RDP_ORDERS``.
* Opacus MNIST example, q=240/60000, sigma=1.3, 15 epochs (3750 steps),
  delta=1e-5: 1.16 with ``LEGACY_RDP_ORDERS``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Optional, Union

import dp_accounting
import numpy as np
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp
from scipy import stats

from fedjaxpriv.privacy import rdp as rdp_lib
from fedjaxpriv.privacy.validation import (ACCOUNTANTS, CONVERSIONS, check_delta, check_epsilon, check_kind,  # noqa: F401
                                           check_noise_multipliers, check_sample_rates, check_steps)
from fedjaxpriv.privacy.composition import DEFAULT_PLD_DISCRETIZATION


class _DropUnconvergedOrderWarnings(logging.Filter):
    """dp_accounting logs one warning per fractional RDP order it cannot evaluate for large q and excludes
    that order (the bound stays valid); a run asks for thousands of such curves, so these lines are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_compute_log_a_frac failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropUnconvergedOrderWarnings())

ArrayLike = Union[float, int, Sequence[float], np.ndarray]

# RDP orders of TF Privacy's `compute_dp_sgd_privacy` and Opacus' RDP accountant.
LEGACY_RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
)
# Moments accountant of Abadi et al. 2016: moments lambda = 1..32, i.e. RDP orders 2..33.
MOMENTS_ACCOUNTANT_ORDERS: tuple[float, ...] = tuple(float(a) for a in range(2, 34))
# The orders every accountant of the package uses by default: dp_accounting's defaults (fractional ones included),
# computed vectorized by ``fedjaxpriv.privacy.rdp``.
DEFAULT_RDP_ORDERS: tuple[float, ...] = rdp_lib.DEFAULT_ORDERS


def _broadcast_clients(named: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Broadcasts per-client arrays (or scalars) to one common 1-D shape [C]."""
    shapes = {name: np.shape(value) for name, value in named.items()}
    nonscalar = {name: s for name, s in shapes.items() if s != ()}
    if len(set(nonscalar.values())) > 1 or any(len(s) != 1 for s in nonscalar.values()):
        raise ValueError(
            f"per-client arrays must all be 1-D with the same length [C] (or scalars); "
            f"found shapes {shapes}."
        )
    return [np.asarray(v) for v in np.broadcast_arrays(*named.values())]


# ----------------------------------------------------------------------------- mechanisms


def dpsgd_event(sample_rate: float, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    """The DpEvent of ``steps`` Poisson-sampled Gaussian steps (q = 1: plain Gaussian)."""
    gaussian = dp_accounting.GaussianDpEvent(float(noise_multiplier))
    step = (
        gaussian
        if sample_rate == 1.0
        else dp_accounting.PoissonSampledDpEvent(float(sample_rate), gaussian)
    )
    return dp_accounting.SelfComposedDpEvent(step, int(steps))


def _orders(orders: Optional[Sequence[float]]) -> tuple[float, ...]:
    if orders is None:
        return DEFAULT_RDP_ORDERS
    orders = tuple(float(a) for a in orders)
    if not orders or min(orders) <= 1.0:
        raise ValueError(f"orders={orders[:5]}... is not allowed: RDP orders must all be > 1.")
    return orders


def rdp_curve(
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    orders: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """RDP of ``steps`` sampled Gaussian steps at each order, from dp_accounting's RdpAccountant.

    Returns:
      float64 [len(orders)], in nats; ``inf`` where unbounded.
    """
    accountant = dp_rdp.RdpAccountant(list(_orders(orders)))
    accountant.compose(dpsgd_event(sample_rate, noise_multiplier, steps))
    return accountant.rdp


def rdp_to_epsilon(
    orders: Sequence[float], rdp: np.ndarray, delta: float, conversion: str = "improved"
) -> float:
    """Converts an RDP curve to epsilon at ``delta``.

    ``"improved"`` calls ``dp_accounting.rdp.compute_epsilon`` (Balle et al. 2020 /
    Canonne et al. 2020); ``"classic"`` is Mironov 2017:
    ``min_a rdp(a) + log(1/delta) / (a - 1)``.
    """
    check_kind("rdp", conversion)
    delta = check_delta(delta)
    if conversion == "improved":
        return float(dp_rdp.compute_epsilon(list(orders), list(rdp), delta)[0])
    orders_array = np.asarray(orders, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        eps = np.asarray(rdp, dtype=np.float64) + math.log(1.0 / delta) / (orders_array - 1.0)
    return float(max(0.0, np.nanmin(eps)))


def rdp_to_delta(
    orders: Sequence[float], rdp: np.ndarray, epsilon: float, conversion: str = "improved"
) -> float:
    """Converts an RDP curve to delta at ``epsilon`` (same conversions as ``rdp_to_epsilon``)."""
    check_kind("rdp", conversion)
    epsilon = check_epsilon(epsilon)
    if conversion == "improved":
        compute_delta = dp_rdp.rdp_privacy_accountant.compute_delta
        return float(compute_delta(list(orders), list(rdp), epsilon)[0])
    orders_array = np.asarray(orders, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        log_delta = (orders_array - 1.0) * (np.asarray(rdp, dtype=np.float64) - epsilon)
    return float(min(1.0, math.exp(np.nanmin(log_delta))))


def _pld_accountant(
    sample_rate: float, noise_multiplier: float, steps: int, discretization: float
) -> dp_pld.PLDAccountant:
    accountant = dp_pld.PLDAccountant(value_discretization_interval=discretization)
    accountant.compose(dpsgd_event(sample_rate, noise_multiplier, steps))
    return accountant


def _validate_mechanism(sample_rate, noise_multiplier, steps):
    q = float(check_sample_rates(sample_rate))
    sigma = float(check_noise_multipliers(noise_multiplier))
    t = int(check_steps(steps))
    return q, sigma, t


def dpsgd_epsilon(
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    *,
    conversion: str = "improved",
    amplification: bool = True,
    orders: Optional[Sequence[float]] = None,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps (DP-SGD) at ``delta``.

    Args:
      sample_rate: Poisson sampling rate q in (0, 1] (expected batch / dataset size).
      noise_multiplier: sigma >= 0, noise std / clip norm; 0 gives ``inf``.
      steps: number of steps >= 0; 0 gives 0.
      delta: target delta in (0, 1).
      accountant: ``"rdp"`` (RdpAccountant) or ``"pld"`` (PLDAccountant).
      conversion: RDP -> DP conversion, ``"improved"`` (what RdpAccountant uses:
        Balle et al. 2020 / Canonne et al. 2020) or ``"classic"`` (Mironov 2017,
        ``min_a rdp(a) + log(1/delta)/(a-1)``); only ``"improved"`` for PLD.
      amplification: if False, every step is treated as touching the whole data
        set (q = 1): the same noise without amplification by subsampling.
      orders: RDP orders (default dp_accounting's); see ``LEGACY_RDP_ORDERS`` and
        ``MOMENTS_ACCOUNTANT_ORDERS`` for published figures.
      pld_discretization: PLD value discretisation interval (pessimistic).

    Returns:
      epsilon (nats), an upper bound for add/remove-one-example neighbours.
    """
    check_kind(accountant, conversion)
    delta = check_delta(delta)
    q, sigma, t = _validate_mechanism(sample_rate, noise_multiplier, steps)
    return _epsilon(
        1.0 if not amplification else q, sigma, t, delta, accountant, conversion,
        _orders(orders), pld_discretization,
    )


def _epsilon(
    q: float,
    sigma: float,
    steps: int,
    delta: float,
    accountant: str,
    conversion: str,
    orders: tuple[float, ...],
    pld_discretization: float,
    one_step_rdp: Optional[np.ndarray] = None,
) -> float:
    """Epsilon of an already validated mechanism; ``one_step_rdp`` may be passed in from a cache."""
    if steps == 0:
        return 0.0
    if sigma == 0.0:
        return math.inf
    if accountant == "pld":
        return float(_pld_accountant(q, sigma, steps, pld_discretization).get_epsilon(delta))
    if one_step_rdp is None:
        one_step_rdp = rdp_curve(q, sigma, 1, orders)
    # RdpAccountant composes `count` events as `rdp += count * rdp_one_step`: identical.
    return rdp_to_epsilon(orders, steps * one_step_rdp, delta, conversion)


def dpsgd_delta(
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    epsilon: float,
    accountant: str = "rdp",
    *,
    conversion: str = "improved",
    amplification: bool = True,
    orders: Optional[Sequence[float]] = None,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
    """Delta of ``steps`` Poisson-subsampled Gaussian steps at ``epsilon`` > 0.

    Arguments as in ``dpsgd_epsilon``. Returns delta in [0, 1]; 1 when sigma = 0,
    0 when steps = 0.
    """
    check_kind(accountant, conversion)
    epsilon = check_epsilon(epsilon)
    q, sigma, t = _validate_mechanism(sample_rate, noise_multiplier, steps)
    q = q if amplification else 1.0
    if t == 0:
        return 0.0
    if sigma == 0.0:
        return 1.0
    if accountant == "pld":
        return float(_pld_accountant(q, sigma, t, pld_discretization).get_delta(epsilon))
    order_tuple = _orders(orders)
    return rdp_to_delta(order_tuple, rdp_curve(q, sigma, t, order_tuple), epsilon, conversion)


def dpfedavg_epsilon(
    client_rate: float,
    noise_multiplier: float,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
    *,
    conversion: str = "improved",
    amplification: bool = True,
    orders: Optional[Sequence[float]] = None,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
    population: Optional[int] = None,
) -> float:
    """Client-level epsilon of DP-FedAvg (McMahan et al. 2018) for every client.

    Each round the server includes each client independently with probability
    ``client_rate`` (Poisson; p = expected cohort / population), clips each update
    to norm C and adds N(0, (z C)^2) to the sum (``mechanisms.ClientLevelDpFedAvg``
    without adaptive clipping). Poisson sampling: add/remove one client's whole
    data; a fixed-size cohort (``population``): replace one client. The guarantee
    holds for the released models when the cohort is not revealed to the adversary
    (trusted server / secure aggregation); ``amplification=False`` gives the
    guarantee of every round under the same relation when it is.

    Args:
      client_rate: p in (0, 1].
      noise_multiplier: z >= 0 (noise std / clip norm); 0 gives ``inf``.
      rounds: number of rounds >= 0.
      delta: target delta in (0, 1).
      accountant, conversion, amplification, orders, pld_discretization: as in
        ``dpsgd_epsilon``.
      population: if given, the cohort is a FIXED-size sample of
        ``round(client_rate * population)`` clients without replacement; accounted
        with dp_accounting's sampled-without-replacement RDP (Wang et al. 2019)
        under replace-one neighbours, where replacing a client moves the clipped
        sum by up to 2C, so the Gaussian's multiplier is z / 2 (also without
        amplification). RDP only.

    Returns:
      epsilon (nats) that holds for each client of the population.
    """
    from fedjaxpriv.privacy.composition import EventAccountant
    from fedjaxpriv.privacy.mechanisms import ClientLevelDpFedAvg

    check_kind(accountant, conversion)
    delta = check_delta(delta)
    rate = float(check_sample_rates(client_rate, "client_rate"))
    z = float(check_noise_multipliers(noise_multiplier))
    rounds = int(check_steps(rounds, "rounds"))
    if population is None:  # Poisson client sampling: the same Poisson-subsampled Gaussian as a DP-SGD step
        event = dpsgd_event(rate if amplification else 1.0, z, 1)
    else:
        cohort = int(round(rate * int(population)))
        if not 1 <= cohort <= int(population):
            raise ValueError(f"client_rate={client_rate} x population={population} gives cohort {cohort}; "
                             "it must be in [1, population].")
        mechanism = ClientLevelDpFedAvg(noise_multiplier=z, num_clients=int(population), expected_cohort=cohort,
                                        poisson=False)
        event = mechanism.round_event(amplified=amplification)
    if z == 0.0 and rounds > 0:
        return math.inf
    return EventAccountant([event], delta, accountant, conversion=conversion, orders=_orders(orders),
                           pld_discretization=pld_discretization).epsilon(0, rounds)


def dpsgd_epsilons(
    sample_rates: ArrayLike,
    noise_multipliers: ArrayLike,
    steps: ArrayLike,
    delta: float,
    accountant: str = "rdp",
    *,
    conversion: str = "improved",
    amplification: bool = True,
    orders: Optional[Sequence[float]] = None,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> np.ndarray:
    """``dpsgd_epsilon`` for many clients at once (vectorized RDP, once per unique (q, sigma, steps)).

    Args:
      sample_rates, noise_multipliers, steps: [C] arrays (or scalars, broadcast).
      Other arguments as in ``dpsgd_epsilon``.

    Returns:
      float64 [C] epsilons.
    """
    from fedjaxpriv.privacy.composition import EventAccountant, unique_events

    check_kind(accountant, conversion)
    delta = check_delta(delta)
    q, sigma, t = _broadcast_clients({
        "sample_rates": check_sample_rates(sample_rates, "sample_rates"),
        "noise_multipliers": check_noise_multipliers(noise_multipliers, "noise_multipliers"),
        "steps": check_steps(steps),
    })
    shape = np.shape(q)
    q, sigma, t = (np.atleast_1d(a).reshape(-1) for a in (q, sigma, t))
    if not amplification:
        q = np.ones_like(q)
    events, ids = unique_events([dpsgd_event(float(a), float(b), 1) for a, b in zip(q, sigma)])
    accountant_ = EventAccountant(events, delta, accountant, conversion=conversion, orders=_orders(orders),
                                  pld_discretization=pld_discretization)
    return accountant_.epsilons(ids, t).reshape(shape)


# ----------------------------------------------------------------------------- planning


def participation_bound(client_rate: float, rounds: int, tail_probability: float) -> int:
    """Smallest n with P[Binomial(rounds, client_rate) > n] <= tail_probability.

    A client sampled with probability ``client_rate`` in each of ``rounds`` rounds
    takes part in more than n rounds with probability at most ``tail_probability``.
    """
    client_rate = float(check_sample_rates(client_rate, "client_rate"))
    rounds = int(check_steps(rounds, "rounds"))
    check_delta(tail_probability, "tail_probability")
    survival = stats.binom.sf(np.arange(rounds + 1), rounds, client_rate)
    return int(np.argmax(survival <= tail_probability))


def _nested_epsilon(
    p: float,
    q: float,
    sigma: float,
    steps: int,
    rounds: int,
    delta: float,
    accountant: str,
    orders: tuple[float, ...],
    pld_discretization: float,
    inner_epsilons: np.ndarray,
) -> float:
    """Epsilon with client sampling hidden: per round, amplify an (eps, delta) profile point.

    A round's mechanism is M = Poisson(p)-subsample of the ``steps``-fold sampled
    Gaussian. If that inner composition is (e, d)-DP then M is
    (log(1 + p (e^e - 1)), p d)-DP (Balle, Barthe, Gaboardi 2018, Thm. 8, both
    add and remove directions). ``rounds`` such rounds compose optimally via the
    PLD of an (e', d')-DP mechanism (``from_privacy_parameters``). Minimised over
    the inner epsilon grid; every grid point is a valid bound.
    """
    if accountant == "pld":
        inner = _pld_accountant(q, sigma, steps, pld_discretization)
        inner_delta_at = inner.get_delta
    else:
        curve = rdp_curve(q, sigma, steps, orders)
        inner_delta_at = lambda eps: rdp_to_delta(orders, curve, eps)  # noqa: E731
    best = math.inf
    for inner_eps in inner_epsilons:
        inner_delta = float(inner_delta_at(float(inner_eps)))
        round_eps = math.log1p(p * math.expm1(inner_eps))
        round_delta = p * inner_delta
        if round_delta * rounds >= delta:
            continue
        params = dp_pld.common.DifferentialPrivacyParameters(round_eps, round_delta)
        discretization = min(pld_discretization * 10, round_eps / 20)
        round_pld = dp_pld.privacy_loss_distribution.from_privacy_parameters(
            params, value_discretization_interval=discretization
        )
        best = min(best, float(round_pld.self_compose(rounds).get_epsilon_for_delta(delta)))
    return best


def expected_epsilon(
    client_rate: float,
    sample_rate: float,
    noise_multiplier: float,
    steps_per_round: int,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
    *,
    participation_hidden: bool = False,
    tail_fractions: Sequence[float] = (0.01, 0.1, 0.5),
    orders: Optional[Sequence[float]] = None,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
    """Sample-level epsilon for a planned run with Poisson(p) client participation.

    dp_accounting cannot nest subsampling: its RDP and PLD accountants accept a
    ``PoissonSampledDpEvent`` only around a Gaussian (or, for PLD, Laplace), not
    around a composition of sampled Gaussians. So this returns the minimum of two
    sound (epsilon, delta) bounds:

    1. Participation tail bound (always valid, even if the server sees who takes
       part): split delta = d_tail + d_mech; with probability >= 1 - d_tail the
       client takes part in at most n = ``participation_bound(p, rounds, d_tail)``
       rounds; the output distribution is a mixture over participation patterns
       independent of the data, so it is (eps(n * steps), d_mech + d_tail)-DP.
       The split is optimised over ``tail_fractions`` of delta.
    2. If ``participation_hidden`` (only the final model or the aggregate is seen):
       per round, the inner composition is converted to an (e, d) point of its
       privacy profile, amplified by Poisson(p) sampling to
       (log(1 + p (e^e - 1)), p d), and ``rounds`` of those are composed with the
       optimal (e, d) composition (dp_accounting PLD ``from_privacy_parameters``).
       Looser than true nested accounting, but never below the truth.

    For client-level DP-FedAvg use ``dpfedavg_epsilon``, where client sampling
    amplifies a Gaussian and dp_accounting accounts it exactly.

    Args:
      client_rate: p in (0, 1], per-round participation probability.
      sample_rate: q in (0, 1], example sampling rate of each local step.
      noise_multiplier: sigma >= 0.
      steps_per_round: local steps per participation, >= 0.
      rounds: planned rounds >= 0.
      delta: total delta in (0, 1).
      accountant: ``"rdp"`` or ``"pld"`` for the inner DP-SGD composition.
      participation_hidden: also use bound 2.
      tail_fractions: fractions of delta tried for d_tail in bound 1, each in (0, 1).
      orders, pld_discretization: as in ``dpsgd_epsilon``.

    Returns:
      epsilon (nats) that holds with total ``delta``.
    """
    check_kind(accountant, "improved")
    delta = check_delta(delta)
    p = float(check_sample_rates(client_rate, "client_rate"))
    q, sigma, steps = _validate_mechanism(sample_rate, noise_multiplier, steps_per_round)
    rounds = int(check_steps(rounds, "rounds"))
    fractions = np.asarray(tail_fractions, dtype=np.float64)
    if fractions.size == 0 or np.any((fractions <= 0) | (fractions >= 1)):
        raise ValueError(f"tail_fractions={tail_fractions} is not allowed: each must be in (0, 1).")
    if steps == 0 or rounds == 0:
        return 0.0
    if sigma == 0.0:
        return math.inf
    order_tuple = _orders(orders)
    best = math.inf
    for fraction in fractions:
        n_max = participation_bound(p, rounds, fraction * delta)
        best = min(best, _epsilon(
            q, sigma, n_max * steps, (1.0 - fraction) * delta, accountant, "improved",
            order_tuple, pld_discretization,
        ))
    if participation_hidden and p < 1.0:
        inner_grid = np.geomspace(0.05, 20.0, 16)
        best = min(best, _nested_epsilon(
            p, q, sigma, steps, rounds, delta, accountant, order_tuple, pld_discretization,
            inner_grid,
        ))
    return float(best)
