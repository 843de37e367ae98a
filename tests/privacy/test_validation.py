"""The privacy layer's one set of input checks: exact boundaries, and errors that name the first bad entry."""

import math

import numpy as np
import pytest

from fedjaxpriv.privacy import validation as v


def test_boundaries_are_exactly_the_documented_ones():
    assert v.check_delta(1e-300) == 1e-300 and v.check_delta(0.0, zero=True) == 0.0
    for bad in (0.0, 1.0, math.nan, -1e-9):
        with pytest.raises(ValueError, match=r"delta=.* is not allowed: it must satisfy 0 < delta < 1"):
            v.check_delta(bad)
    with pytest.raises(ValueError, match=r"tail=1.0 is not allowed: it must satisfy 0 <= tail < 1"):
        v.check_delta(1.0, "tail", zero=True)
    assert v.check_sample_rates([1.0, 1e-12]).tolist() == [1.0, 1e-12]
    assert v.check_noise_multipliers(0.0) == 0.0  # no noise: epsilon inf, allowed where accounted
    with pytest.raises(ValueError, match=r"sigma=0.0 is not allowed: a noise multiplier must be finite and > 0"):
        v.check_noise_multipliers(0.0, "sigma", zero=False)
    assert v.check_steps([0, 3.0]).dtype == np.int64
    with pytest.raises(ValueError, match="target_epsilon=inf is not allowed: it must be finite and > 0"):
        v.check_epsilon(math.inf, "target_epsilon")


def test_array_errors_name_the_first_bad_entry():
    with pytest.raises(ValueError, match=r"rates\[1, 0\]=nan is not allowed: a sample rate must be in \(0, 1\]"):
        v.check_sample_rates([[0.5, 0.2], [math.nan, 2.0]], "rates")
    with pytest.raises(ValueError, match=r"steps\[2\]=2.5 is not allowed: a count of steps must be an integer >= 0"):
        v.check_steps([1, 2, 2.5, -1])
    with pytest.raises(ValueError, match=r"budgets\[0\]=-1.0 is not allowed: a budget must be finite and > 0"):
        v.check_epsilons([-1.0, 2.0], "budgets")


def test_accountants_and_conversions_go_together():
    v.check_kind("rdp", "classic")
    with pytest.raises(ValueError, match=r"accountant='gdp' is not allowed: use one of \['rdp', 'pld'\]"):
        v.check_kind("gdp")
    with pytest.raises(ValueError, match="conversion='classic' is not allowed with accountant='pld'"):
        v.check_kind("pld", "classic")
