"""Device populations: per-client compute, memory, uplink, energy, availability and privacy requirement.

A population is drawn from tiers (each a kind of device with a probability); ``jitter`` spreads the
continuous quantities log-normally around the tier's values so devices of one tier still differ. The
result, ``DeviceProfiles``, holds one array [C] per quantity, indexed by client id, in SI units.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceTier:
    """A kind of device.

    Attributes:
      name: label, e.g. "low-end phone".
      probability: share of the population in this tier (tiers' probabilities sum to 1).
      flops_per_s: sustained training throughput, FLOP/s.
      memory_bytes: memory available for training, bytes.
      uplink_bps: upload bandwidth, bit/s.
      joules_per_flop: energy per floating point operation, J/FLOP.
      joules_per_bit: energy per bit sent, J/bit.
      dropout_prob: probability that the device is unavailable in a given round, in [0, 1].
      target_epsilon: the owner's sample-level privacy requirement (inf = none).
    """

    name: str
    probability: float
    flops_per_s: float
    memory_bytes: float
    uplink_bps: float
    joules_per_flop: float = 1e-9
    joules_per_bit: float = 1e-7
    dropout_prob: float = 0.0
    target_epsilon: float = math.inf

    def __post_init__(self) -> None:
        for field in ("flops_per_s", "memory_bytes", "uplink_bps"):
            value = getattr(self, field)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"DeviceTier {self.name!r}: {field}={value!r} is invalid; allowed: finite > 0.")
        for field in ("joules_per_flop", "joules_per_bit"):
            value = getattr(self, field)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"DeviceTier {self.name!r}: {field}={value!r} is invalid; allowed: finite >= 0.")
        if not 0 <= self.probability <= 1:
            raise ValueError(f"DeviceTier {self.name!r}: probability={self.probability!r} is invalid; "
                             "allowed: [0, 1].")
        if not 0 <= self.dropout_prob <= 1:
            raise ValueError(f"DeviceTier {self.name!r}: dropout_prob={self.dropout_prob!r} is invalid; "
                             "allowed: [0, 1].")
        if not self.target_epsilon > 0:
            raise ValueError(f"DeviceTier {self.name!r}: target_epsilon={self.target_epsilon!r} is invalid; "
                             "allowed: > 0 (inf = no requirement).")


# Orders of magnitude for phones to laptops (training throughput well below peak).
DEFAULT_TIERS: tuple[DeviceTier, ...] = (
    DeviceTier(name="low", probability=0.3, flops_per_s=2e8, memory_bytes=2e5, uplink_bps=2e5,
               joules_per_flop=5e-9, joules_per_bit=5e-7, dropout_prob=0.3, target_epsilon=2.0),
    DeviceTier(name="mid", probability=0.5, flops_per_s=1e9, memory_bytes=1e6, uplink_bps=2e6,
               joules_per_flop=2e-9, joules_per_bit=2e-7, dropout_prob=0.1, target_epsilon=8.0),
    DeviceTier(name="high", probability=0.2, flops_per_s=1e10, memory_bytes=1e8, uplink_bps=2e7,
               joules_per_flop=1e-9, joules_per_bit=1e-7, dropout_prob=0.02),
)


class DeviceProfiles(NamedTuple):
    """One device per client; every field is an array [C].

    Attributes:
      tier: int32 index into the tiers the population was drawn from.
      flops_per_s: float64 FLOP/s.
      memory_bytes: float64 bytes.
      uplink_bps: float64 bit/s.
      joules_per_flop: float64 J/FLOP.
      joules_per_bit: float64 J/bit.
      dropout_prob: float64 per-round unavailability probability.
      target_epsilon: float64 privacy requirement (inf = none).
    """

    tier: np.ndarray
    flops_per_s: np.ndarray
    memory_bytes: np.ndarray
    uplink_bps: np.ndarray
    joules_per_flop: np.ndarray
    joules_per_bit: np.ndarray
    dropout_prob: np.ndarray
    target_epsilon: np.ndarray

    @property
    def num_clients(self) -> int:
        return int(self.tier.shape[0])


def check_tiers(tiers: Sequence[DeviceTier]) -> None:
    """Raises ValueError unless there is at least one tier and the probabilities sum to 1."""
    if not tiers:
        raise ValueError("tiers=() is invalid; allowed: at least one DeviceTier.")
    total = sum(t.probability for t in tiers)
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(f"tier probabilities sum to {total!r}; allowed: a sum of 1.")


def profiles_from_tiers(tiers: Sequence[DeviceTier], tier_index: np.ndarray) -> DeviceProfiles:
    """Profiles with each client's values exactly those of its tier (``tier_index`` [C] int)."""
    tier_index = np.asarray(tier_index, np.int32)
    if tier_index.ndim != 1 or np.any(tier_index < 0) or np.any(tier_index >= len(tiers)):
        raise ValueError(f"tier_index must be a 1-D array of integers in [0, {len(tiers)}).")

    def column(field: str) -> np.ndarray:
        return np.asarray([getattr(t, field) for t in tiers], np.float64)[tier_index]

    return DeviceProfiles(tier=tier_index, **{f: column(f) for f in DeviceProfiles._fields if f != "tier"})


def sample_profiles(num_clients: int, seed: int, tiers: Sequence[DeviceTier] = DEFAULT_TIERS,
                    jitter: float = 0.0) -> DeviceProfiles:
    """Draws a device population.

    Args:
      num_clients: C.
      seed: seed of the draw (the population is fixed for a run; it does not change across rounds).
      tiers: the kinds of device and their probabilities.
      jitter: log-normal sigma applied independently to compute, memory and uplink of each device
        (0 = every device exactly at its tier's values).

    Returns:
      ``DeviceProfiles`` with arrays [C].
    """
    check_tiers(tiers)
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients} is invalid; allowed: an integer >= 1.")
    if not jitter >= 0:
        raise ValueError(f"jitter={jitter!r} is invalid; allowed: a number >= 0.")
    rng = np.random.default_rng([seed, 0xDE71CE])
    probabilities = np.asarray([t.probability for t in tiers], np.float64)
    tier_index = rng.choice(len(tiers), size=num_clients, p=probabilities / probabilities.sum())
    profiles = profiles_from_tiers(tiers, tier_index)
    if jitter > 0:
        spread = {f: getattr(profiles, f) * np.exp(jitter * rng.standard_normal(num_clients))
                  for f in ("flops_per_s", "memory_bytes", "uplink_bps")}
        profiles = profiles._replace(**spread)
    return profiles
