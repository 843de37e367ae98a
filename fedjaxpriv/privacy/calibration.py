"""Noise calibration for personalised per-client privacy budgets (host side).

``calibrate_noise_multiplier`` finds the smallest DP-SGD noise multiplier whose
epsilon is <= a target, with ``dp_accounting.calibrate_dp_mechanism`` (Brent's
method, then a check that the returned value does not exceed the target).
``calibrate_clients`` does it for [C] clients, once per unique
(target, q, total steps) so that tiers of clients cost one search each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import dp_accounting
import numpy as np
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp

from fedjaxpriv.privacy import accounting

ArrayLike = accounting.ArrayLike


class _ClassicRdpAccountant(dp_rdp.RdpAccountant):
    """RdpAccountant whose epsilon uses the classic conversion (Mironov 2017, Prop. 3)."""

    def get_epsilon(self, target_delta: float) -> float:
        return accounting.rdp_to_epsilon(self.orders, self.rdp, target_delta, "classic")


def _accountant_factory(
    accountant: str,
    conversion: str,
    orders: tuple[float, ...],
    pld_discretization: float,
):
    if accountant == "pld":
        return lambda: dp_pld.PLDAccountant(value_discretization_interval=pld_discretization)
    if conversion == "classic":
        return lambda: _ClassicRdpAccountant(list(orders))
    return lambda: dp_rdp.RdpAccountant(list(orders))


def _epsilon_gap(make_accountant, q, steps, delta, target_epsilon):
    def gap(sigma: float) -> float:
        event = accounting.dpsgd_event(q, sigma, steps)
        return make_accountant().compose(event).get_epsilon(delta) - target_epsilon

    return gap


def _calibrate(
    target_epsilon: float,
    q: float,
    steps: int,
    delta: float,
    make_accountant,
    tolerance: float,
    guess: float = 1.0,
) -> float:
    """Smallest sigma (within ``tolerance``) with epsilon <= target; inputs validated.

    An explicit bracket [guess / 2^k, guess * 2^m] is found first by halving or
    doubling, which keeps the search away from tiny sigmas (slow for fractional
    RDP orders, and enormous privacy-loss supports for PLD); then
    ``dp_accounting.calibrate_dp_mechanism`` (Brent) refines it.
    """
    if steps == 0:
        return 0.0
    gap = _epsilon_gap(make_accountant, q, steps, delta, target_epsilon)
    upper = guess
    while gap(upper) > 0:
        upper *= 2.0
    lower = upper / 2.0
    for _ in range(40):
        if gap(lower) > 0:
            break
        upper, lower = lower, lower / 2.0
    else:
        lower = 0.0  # sigma = 0 is non-private: epsilon = inf > target.
    return float(dp_accounting.calibrate_dp_mechanism(
        make_accountant, lambda sigma: accounting.dpsgd_event(q, sigma, steps),
        target_epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lower, upper), tol=tolerance,
    ))


def _calibrate_with_kind(
    target_epsilon, q, steps, delta, accountant, conversion, orders, pld_discretization, tolerance
) -> float:
    rdp_factory = _accountant_factory("rdp", conversion, orders, pld_discretization)
    sigma = _calibrate(target_epsilon, q, steps, delta, rdp_factory, tolerance)
    if accountant == "rdp" or sigma == 0.0:
        return sigma
    # PLD is tighter than RDP, so the RDP answer is a good upper guess.
    pld_factory = _accountant_factory("pld", conversion, orders, pld_discretization)
    return _calibrate(target_epsilon, q, steps, delta, pld_factory, tolerance, guess=sigma)


def calibrate_noise_multiplier(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    *,
    conversion: str = "improved",
    orders: Optional[Sequence[float]] = None,
    pld_discretization: float = accounting.DEFAULT_PLD_DISCRETIZATION,
    tolerance: float = 1e-5,
) -> float:
    """Smallest noise multiplier sigma with DP-SGD epsilon <= ``target_epsilon``.

    Args:
      target_epsilon: epsilon budget, > 0.
      sample_rate: Poisson example sampling rate q in (0, 1].
      steps: total DP-SGD steps (steps per round x rounds taken part in), >= 0;
        0 returns 0.0 (nothing is released, no noise needed).
      delta: target delta in (0, 1).
      accountant, conversion, orders, pld_discretization: as in
        ``accounting.dpsgd_epsilon``.
      tolerance: absolute precision of sigma (the result is within it of the
        smallest sigma that meets the target, and never above the target).

    Returns:
      sigma >= 0 whose epsilon (same accountant) is <= target_epsilon.
    """
    accounting.check_kind(accountant, conversion)
    target_epsilon = accounting.check_epsilon(target_epsilon, "target_epsilon")
    delta = accounting.check_delta(delta)
    q = float(accounting.check_sample_rates(sample_rate))
    total_steps = int(accounting.check_steps(steps))
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance={tolerance} is not allowed: it must be in (0, 1).")
    return _calibrate_with_kind(
        target_epsilon, q, total_steps, delta, accountant, conversion,
        accounting._orders(orders), pld_discretization, tolerance,
    )


def calibrate_clients(
    target_epsilons: ArrayLike,
    sample_rates: ArrayLike,
    steps_per_round: ArrayLike,
    participations: ArrayLike,
    delta: float,
    accountant: str = "rdp",
    *,
    conversion: str = "improved",
    orders: Optional[Sequence[float]] = None,
    pld_discretization: float = accounting.DEFAULT_PLD_DISCRETIZATION,
    tolerance: float = 1e-5,
) -> np.ndarray:
    """Per-client noise multipliers meeting per-client (personalised) epsilon budgets.

    Client i's budget covers ``steps_per_round[i] * participations[i]`` DP-SGD
    steps. For a planned run pass the number of rounds (every round) or a
    high-probability participation bound (``accounting.participation_bound``, and
    then spend the tail probability out of delta).

    Args:
      target_epsilons: [C] (or scalar) budgets, each > 0 (e.g. tiers 1, 4, 8).
      sample_rates: [C] (or scalar) q_i in (0, 1].
      steps_per_round: [C] (or scalar) local steps per round, >= 0.
      participations: [C] (or scalar) rounds each client will take part in, >= 0.
      delta: target delta in (0, 1), shared by all clients.
      accountant, conversion, orders, pld_discretization, tolerance: as in
        ``calibrate_noise_multiplier``.

    Returns:
      float64 [C] noise multipliers; one search per unique (target, q, total steps).
    """
    accounting.check_kind(accountant, conversion)
    delta = accounting.check_delta(delta)
    targets = accounting._as_float_array(target_epsilons, "target_epsilons")
    if np.any(targets <= 0):
        raise ValueError(
            f"target_epsilons={targets[targets <= 0][:5]} is not allowed: budgets must be > 0."
        )
    targets, q, steps, counts = accounting._broadcast_clients({
        "target_epsilons": targets,
        "sample_rates": accounting.check_sample_rates(sample_rates, "sample_rates"),
        "steps_per_round": accounting.check_steps(steps_per_round, "steps_per_round"),
        "participations": accounting.check_steps(participations, "participations"),
    })
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance={tolerance} is not allowed: it must be in (0, 1).")
    total_steps = (steps * counts).astype(np.float64)
    rows = np.stack([np.atleast_1d(targets), np.atleast_1d(q), np.atleast_1d(total_steps)], axis=1)
    unique_rows, inverse = np.unique(rows, axis=0, return_inverse=True)
    order_tuple = accounting._orders(orders)
    sigmas = np.array(
        [
            _calibrate_with_kind(
                float(t), float(r), int(s), delta, accountant, conversion, order_tuple,
                pld_discretization, tolerance,
            )
            for t, r, s in unique_rows
        ],
        dtype=np.float64,
    )
    result = sigmas[np.reshape(inverse, -1)]
    return result if np.ndim(targets) else result.reshape(())


__all__ = ["calibrate_noise_multiplier", "calibrate_clients"]