"""Device populations and policies that turn device capabilities into per-client settings."""

from fedjaxpriv.devices.policies import (
    DeviceExperiment,
    DevicePolicy,
    add_cost_fields,
    apply_policy,
    policy_settings,
    availability,
    compute_time,
    message_bits,
    participation_mask,
    round_cost,
    straggler_mask,
    training_flops,
    upload_time,
)
from fedjaxpriv.devices.profiles import (
    DEFAULT_TIERS,
    DeviceProfiles,
    DeviceTier,
    profiles_from_tiers,
    sample_profiles,
)

__all__ = [
    "DEFAULT_TIERS", "DeviceExperiment", "DevicePolicy", "DeviceProfiles", "DeviceTier", "add_cost_fields",
    "apply_policy", "policy_settings", "availability", "compute_time", "message_bits", "participation_mask",
    "profiles_from_tiers",
    "round_cost", "sample_profiles", "straggler_mask", "training_flops", "upload_time",
]
