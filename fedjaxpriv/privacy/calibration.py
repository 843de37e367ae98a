"""Noise calibration for personalised per-client privacy budgets (host side).

``calibrate_noise`` finds the smallest noise multiplier z (to an absolute ``tolerance``) whose mechanism
``make_event(z)``, composed ``count`` times, has epsilon <= a target. It evaluates epsilons with the same
``EventAccountant`` the run's tracker uses (same orders, conversion and truncation charge), so a calibrated
client is accounted exactly as it was planned. The search is a bracket by doubling/halving, then bisection; the
answer is the upper end of the final bracket, so it always meets the target.

``calibrate_noise_multiplier`` / ``calibrate_clients`` are the Poisson-sampled DP-SGD special cases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import dp_accounting
import numpy as np

from fedjaxpriv.privacy import accounting, validation
from fedjaxpriv.privacy.validation import check_epsilons
from fedjaxpriv.privacy.composition import DEFAULT_PLD_DISCRETIZATION, EventAccountant

ArrayLike = accounting.ArrayLike
MAX_NOISE_MULTIPLIER = 1e4


def calibrate_noise(make_event: Callable[[float], dp_accounting.DpEvent], count: int, target_epsilon: float,
                    delta: float, accountant: str = "rdp", *, conversion: str = "improved",
                    orders: Optional[Sequence[float]] = None,
                    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION, truncation_probability: float = 0.0,
                    tolerance: float = 1e-5) -> float:
    """Smallest z (within ``tolerance``) with epsilon(``count`` x ``make_event(z)``) <= ``target_epsilon``.

    Args:
      make_event: noise multiplier -> the one-step ``DpEvent`` of the mechanism.
      count: number of steps composed, >= 0 (0 returns 0.0: nothing is released).
      target_epsilon: the budget, finite and > 0.
      delta: target delta in (0, 1).
      accountant, conversion, orders, pld_discretization: as in ``EventAccountant``.
      truncation_probability: per-step probability charged to delta (``EventAccountant``).
      tolerance: absolute precision of z.

    Raises:
      ValueError: bad arguments, or a target that needs more noise than ``MAX_NOISE_MULTIPLIER``.
    """
    target_epsilon = validation.check_epsilon(target_epsilon, "target_epsilon")
    delta = validation.check_delta(delta)
    count = int(validation.check_steps(count, "count"))
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance={tolerance} is not allowed: it must be in (0, 1).")
    if count == 0:
        return 0.0

    def meets(kind: str, z: float) -> bool:
        events = EventAccountant([make_event(z)], delta, kind, conversion=conversion if kind == "rdp" else "improved",
                                 orders=orders, pld_discretization=pld_discretization,
                                 truncation_probabilities=[truncation_probability])
        return events.epsilon(0, count) <= target_epsilon

    def search(kind: str, guess: float) -> float:
        upper = guess
        while not meets(kind, upper):
            upper *= 2.0
            if upper > MAX_NOISE_MULTIPLIER:
                raise ValueError(f"epsilon {target_epsilon:g} at delta {delta:g} over {count} steps needs a noise "
                                 f"multiplier above {MAX_NOISE_MULTIPLIER:g}: the target cannot be met; allow a "
                                 "larger epsilon or fewer steps")
        lower = upper / 2.0
        while meets(kind, lower):
            upper, lower = lower, lower / 2.0
            if upper < tolerance:
                return upper
        while upper - lower > tolerance:
            middle = 0.5 * (lower + upper)
            lower, upper = (lower, middle) if meets(kind, middle) else (middle, upper)
        return float(upper)

    z = search("rdp", 1.0)
    # PLD is tighter than RDP, so the RDP answer is an upper guess for it.
    return z if accountant == "rdp" else search("pld", z)


def calibrate_noise_multiplier(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    *,
    conversion: str = "improved",
    orders: Optional[Sequence[float]] = None,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
    tolerance: float = 1e-5,
) -> float:
    """Smallest DP-SGD noise multiplier with Poisson-sampled epsilon <= ``target_epsilon``.

    Args:
      target_epsilon: epsilon budget, > 0.
      sample_rate: Poisson example sampling rate q in (0, 1].
      steps: total DP-SGD steps (steps per round x rounds taken part in), >= 0; 0 returns 0.0.
      delta: target delta in (0, 1).
      accountant, conversion, orders, pld_discretization, tolerance: as in ``calibrate_noise``.
    """
    validation.check_kind(accountant, conversion)
    q = float(validation.check_sample_rates(sample_rate))
    return calibrate_noise(lambda z: accounting.dpsgd_event(q, z, 1), int(validation.check_steps(steps)),
                           target_epsilon, delta, accountant, conversion=conversion, orders=orders,
                           pld_discretization=pld_discretization, tolerance=tolerance)


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
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
    tolerance: float = 1e-5,
) -> np.ndarray:
    """Per-client Poisson DP-SGD noise multipliers meeting per-client (personalised) epsilon budgets.

    Client i's budget covers ``steps_per_round[i] * participations[i]`` steps. For a whole run with the
    simulator's own mechanisms (fixed-size batches, mixup, truncation) use ``tracking.calibrate_targets``.

    Args:
      target_epsilons: [C] (or scalar) budgets, each > 0 (e.g. tiers 1, 4, 8).
      sample_rates: [C] (or scalar) q_i in (0, 1].
      steps_per_round: [C] (or scalar) local steps per round, >= 0.
      participations: [C] (or scalar) rounds each client will take part in, >= 0.
      delta, accountant, conversion, orders, pld_discretization, tolerance: as in ``calibrate_noise``.

    Returns:
      float64 [C] noise multipliers; one search per unique (target, q, total steps).
    """
    validation.check_kind(accountant, conversion)
    delta = validation.check_delta(delta)
    targets = check_epsilons(target_epsilons, "target_epsilons")
    targets, q, steps, counts = accounting._broadcast_clients({
        "target_epsilons": targets,
        "sample_rates": validation.check_sample_rates(sample_rates, "sample_rates"),
        "steps_per_round": validation.check_steps(steps_per_round, "steps_per_round"),
        "participations": validation.check_steps(participations, "participations"),
    })
    total_steps = (steps * counts).astype(np.float64)
    rows = np.stack([np.atleast_1d(targets), np.atleast_1d(q), np.atleast_1d(total_steps)], axis=1)
    unique_rows, inverse = np.unique(rows, axis=0, return_inverse=True)
    sigmas = np.array([
        calibrate_noise(lambda z, r=float(r): accounting.dpsgd_event(r, z, 1), int(s), float(t), delta, accountant,
                        conversion=conversion, orders=orders, pld_discretization=pld_discretization,
                        tolerance=tolerance)
        for t, r, s in unique_rows], dtype=np.float64)
    result = sigmas[np.reshape(inverse, -1)]
    return result if np.ndim(targets) else result.reshape(())


__all__ = ["MAX_NOISE_MULTIPLIER", "calibrate_clients", "calibrate_noise", "calibrate_noise_multiplier"]
