"""Privacy on the host with dp_accounting: the DP mechanisms of a run (JAX step + DpEvent), epsilons with their
basis, per-client tracking across rounds, planning with client sampling, and noise calibration.

Names load on first use (``fedjaxpriv.privacy.validation``, which the config reads, needs no dp_accounting)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    **{name: "fedjaxpriv.privacy.accounting" for name in (
        "DEFAULT_RDP_ORDERS", "LEGACY_RDP_ORDERS", "MOMENTS_ACCOUNTANT_ORDERS", "dpfedavg_epsilon", "dpsgd_epsilon",
        "dpsgd_epsilons", "dpsgd_event", "participation_bound", "rdp_curve", "rdp_to_epsilon")},
    "EpsilonBasis": "fedjaxpriv.privacy.basis",
    **{name: "fedjaxpriv.privacy.calibration" for name in (
        "calibrate_clients", "calibrate_noise", "calibrate_noise_multiplier")},
    "EventAccountant": "fedjaxpriv.privacy.composition",
    **{name: "fedjaxpriv.privacy.mechanisms" for name in ("ClientLevelDpFedAvg", "LocalGaussian", "SampleLevelDpSgd")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedjaxpriv.privacy' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
