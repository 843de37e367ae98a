"""The privacy layer's input checks, in one place: each returns the value as the accountants use it, or raises
ValueError naming the value (and, for arrays, the index of the first bad entry) and what is allowed."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")
CONVERSIONS: tuple[str, ...] = ("improved", "classic")  # RDP -> (epsilon, delta); "classic" for RDP only


def _first_bad(name: str, values: np.ndarray, bad: np.ndarray) -> str:
    """``name[i, ...]=value`` of the first bad entry (``name=value`` for a scalar)."""
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"{name}{list(index) if index else ''}={float(values[index])!r}"


def check_delta(delta: float, name: str = "delta", *, zero: bool = False) -> float:
    """``delta`` as float; in (0, 1), or [0, 1) with ``zero``."""
    value = float(delta)
    if not ((0.0 <= value if zero else 0.0 < value) and value < 1.0):
        raise ValueError(f"{name}={value!r} is not allowed: it must satisfy {'0 <=' if zero else '0 <'} {name} < 1.")
    return value


def check_epsilon(epsilon: float, name: str = "epsilon") -> float:
    """``epsilon`` as float; finite and > 0."""
    value = float(epsilon)
    if not 0.0 < value < math.inf:
        raise ValueError(f"{name}={value!r} is not allowed: it must be finite and > 0.")
    return value


def check_epsilons(epsilons: ArrayLike, name: str = "epsilons") -> np.ndarray:
    """The budgets as float64 (any shape); each finite and > 0."""
    values = np.asarray(epsilons, dtype=np.float64)
    bad = ~(np.isfinite(values) & (values > 0.0))
    if bad.any():
        raise ValueError(f"{_first_bad(name, values, bad)} is not allowed: a budget must be finite and > 0.")
    return values


def check_kind(accountant: str, conversion: str = "improved") -> None:
    """An accountant of ``ACCOUNTANTS`` with a conversion of ``CONVERSIONS`` ("classic" with RDP only)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r} is not allowed: use one of {list(ACCOUNTANTS)}.")
    if conversion not in CONVERSIONS:
        raise ValueError(f"conversion={conversion!r} is not allowed: use one of {list(CONVERSIONS)}.")
    if accountant == "pld" and conversion != "improved":
        raise ValueError(f"conversion={conversion!r} is not allowed with accountant='pld': the classic conversion "
                         "applies only to RDP; use conversion='improved'.")


def check_sample_rates(sample_rates: ArrayLike, name: str = "sample_rate") -> np.ndarray:
    """The rates as float64 (any shape); each in (0, 1] (NaN refused)."""
    rates = np.asarray(sample_rates, dtype=np.float64)
    bad = ~((rates > 0.0) & (rates <= 1.0))
    if bad.any():
        raise ValueError(f"{_first_bad(name, rates, bad)} is not allowed: a sample rate must be in (0, 1].")
    return rates


def check_noise_multipliers(noise_multipliers: ArrayLike, name: str = "noise_multiplier", *,
                            zero: bool = True) -> np.ndarray:
    """The multipliers as float64 (any shape); each finite and >= 0 (0: no noise, epsilon inf), or > 0 without
    ``zero``."""
    sigmas = np.asarray(noise_multipliers, dtype=np.float64)
    bad = ~(np.isfinite(sigmas) & ((sigmas >= 0.0) if zero else (sigmas > 0.0)))
    if bad.any():
        raise ValueError(f"{_first_bad(name, sigmas, bad)} is not allowed: a noise multiplier must be finite and "
                         f"{'>= 0 (0 means no noise and gives epsilon = inf)' if zero else '> 0'}.")
    return sigmas


def check_steps(steps: ArrayLike, name: str = "steps") -> np.ndarray:
    """The counts as int64 (any shape); each an integer >= 0."""
    values = np.asarray(steps, dtype=np.float64)
    bad = ~(np.isfinite(values) & (values >= 0) & (values == np.round(values)))
    if bad.any():
        raise ValueError(f"{_first_bad(name, values, bad)} is not allowed: a count of steps must be an integer >= 0.")
    return values.astype(np.int64)
