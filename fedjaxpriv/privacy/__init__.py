"""Privacy on the host with dp_accounting: the DP mechanisms of a run (JAX step + DpEvent), epsilons with their
basis, per-client tracking across rounds, planning with client sampling, and noise calibration."""

from fedjaxpriv.privacy.accounting import (
    DEFAULT_RDP_ORDERS,
    LEGACY_RDP_ORDERS,
    MOMENTS_ACCOUNTANT_ORDERS,
    dpfedavg_epsilon,
    dpsgd_delta,
    dpsgd_epsilon,
    dpsgd_epsilons,
    dpsgd_event,
    expected_epsilon,
    participation_bound,
    rdp_curve,
    rdp_to_delta,
    rdp_to_epsilon,
)
from fedjaxpriv.privacy.basis import EpsilonBasis
from fedjaxpriv.privacy.calibration import calibrate_clients, calibrate_noise, calibrate_noise_multiplier
from fedjaxpriv.privacy.composition import EventAccountant
from fedjaxpriv.privacy.mechanisms import ClientLevelDpFedAvg, LocalGaussian, SampleLevelDpSgd

__all__ = [
    "DEFAULT_RDP_ORDERS",
    "LEGACY_RDP_ORDERS",
    "MOMENTS_ACCOUNTANT_ORDERS",
    "ClientLevelDpFedAvg",
    "EpsilonBasis",
    "EventAccountant",
    "LocalGaussian",
    "SampleLevelDpSgd",
    "calibrate_clients",
    "calibrate_noise",
    "calibrate_noise_multiplier",
    "dpfedavg_epsilon",
    "dpsgd_delta",
    "dpsgd_epsilon",
    "dpsgd_epsilons",
    "dpsgd_event",
    "expected_epsilon",
    "participation_bound",
    "rdp_curve",
    "rdp_to_delta",
    "rdp_to_epsilon",
]
