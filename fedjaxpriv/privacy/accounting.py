"""Epsilons of DP-SGD and DP-FedAvg outside a run, for planning and for published figures: thin calls of the one
path a run accounts with (a mechanism's ``DpEvent`` -> ``composition.EventAccountant`` -> the vectorized RDP of
``fedjaxpriv.privacy.rdp`` or dp_accounting's PLD), so that a figure here is the figure a run reports.

Everything here is NumPy + ``dp_accounting`` and runs on the host.

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

* ``accountant="rdp"``: the RDP of dp_accounting's ``RdpAccountant``, computed vectorized
  (``fedjaxpriv.privacy.rdp``, checked against it). Its RDP -> (eps, delta) conversion
  (``conversion="improved"``) is the improved bound of Balle et al. 2020
  ("Hypothesis testing interpretations and Renyi DP", Prop. 12) / Canonne, Kamath,
  Steinke 2020 (eq. 20): ``eps = min_a rdp(a) + log1p(-1/a) - log(delta * a) / (a - 1)``
  (together with a KL bound for tiny RDP). ``conversion="classic"`` is Mironov 2017,
  Prop. 3: ``eps = min_a rdp(a) + log(1/delta) / (a - 1)``, computed from the same
  RDP curve; it is looser but is what most published DP-SGD figures use.
* ``accountant="pld"``: ``dp_accounting.pld.PLDAccountant`` (pessimistic
  discretisation, so the reported epsilon is an upper bound); tighter than RDP.

A noise multiplier of 0 gives ``eps = inf``; zero steps give ``eps = 0``. These are results, not errors.

Published figures reproduced (tests/privacy/test_accounting.py), all with the
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
from scipy import stats

from fedjaxpriv.privacy import rdp as rdp_lib
from fedjaxpriv.privacy.composition import DEFAULT_PLD_DISCRETIZATION, EventAccountant, rdp_curves, unique_events
from fedjaxpriv.privacy.validation import (check_delta, check_kind, check_noise_multipliers, check_sample_rates,
                                           check_steps)


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
    """RDP of ``steps`` sampled Gaussian steps at each order: the curve a run's RDP accountant composes.

    Returns:
      float64 [len(orders)], in nats; ``inf`` where unbounded.
    """
    q = float(check_sample_rates(sample_rate))
    sigma = float(check_noise_multipliers(noise_multiplier))
    return rdp_curves([dpsgd_event(q, sigma, int(check_steps(steps)))], _orders(orders))[0]


def rdp_to_epsilon(
    orders: Sequence[float], rdp: np.ndarray, delta: float, conversion: str = "improved"
) -> float:
    """Converts an RDP curve to epsilon at ``delta`` (``rdp.epsilons_from_rdp``, the conversion of every run).

    ``"improved"`` is dp_accounting's ``compute_epsilon`` (Balle et al. 2020 / Canonne et al. 2020);
    ``"classic"`` is Mironov 2017: ``min_a rdp(a) + log(1/delta) / (a - 1)``.
    """
    check_kind("rdp", conversion)
    return float(rdp_lib.epsilons_from_rdp(orders, np.asarray(rdp, np.float64)[None], delta, conversion)[0])


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
      accountant: ``"rdp"`` or ``"pld"`` (dp_accounting's PLDAccountant, pessimistic discretisation).
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
    for name, value in (("sample_rate", sample_rate), ("noise_multiplier", noise_multiplier), ("steps", steps)):
        if np.ndim(value):
            raise ValueError(f"{name}={value!r} is not allowed: one value (dpsgd_epsilons takes one per client).")
    check_sample_rates(sample_rate, "sample_rate")
    check_noise_multipliers(noise_multiplier, "noise_multiplier")
    check_steps(steps, "steps")
    return float(dpsgd_epsilons(sample_rate, noise_multiplier, steps, delta, accountant, conversion=conversion,
                                amplification=amplification, orders=orders,
                                pld_discretization=pld_discretization))


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
        ``round(client_rate * population)`` clients without replacement (the round event of
        ``mechanisms.ClientLevelDpFedAvg``): dp_accounting's sampled-without-replacement RDP (Wang et al. 2019)
        under replace-one neighbours, where replacing a client moves the clipped
        sum by up to 2C, so the Gaussian's multiplier is z / 2 (also without
        amplification). RDP only.

    Returns:
      epsilon (nats) that holds for each client of the population.
    """
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
    """``dpsgd_epsilon`` for many clients at once (vectorized RDP, once per unique (q, sigma)).

    Args:
      sample_rates, noise_multipliers, steps: [C] arrays (or scalars, broadcast).
      Other arguments as in ``dpsgd_epsilon``.

    Returns:
      float64 [C] epsilons (``inf`` where sigma is 0 and steps > 0, 0 where steps is 0).
    """
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
