"""Privacy accounting on the host with dp_accounting: DP-SGD and DP-FedAvg epsilons, per-client
tracking across rounds, planning with client sampling, and noise calibration for per-client budgets."""

from fedjaxpriv.privacy.accounting import (
    DEFAULT_RDP_ORDERS,
    LEGACY_RDP_ORDERS,
    MOMENTS_ACCOUNTANT_ORDERS,
    ClientPrivacyAccountant,
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
from fedjaxpriv.privacy.calibration import calibrate_clients, calibrate_noise_multiplier

__all__ = [
    "DEFAULT_RDP_ORDERS",
    "LEGACY_RDP_ORDERS",
    "MOMENTS_ACCOUNTANT_ORDERS",
    "ClientPrivacyAccountant",
    "calibrate_clients",
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
