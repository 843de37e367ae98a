"""Per-client settings as arrays: the leaves of ``ClientSettings`` have a leading client axis [C].

Everything that may differ between clients lives here, so one compiled round serves a heterogeneous
population: a client's row is gathered by id and read as traced scalars inside local training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import numpy as np

from fedjaxpriv.config import ClientConfig, MessageConfig, Rule, describe, in_bounds


class ClientSettings(NamedTuple):
    """Per-client settings, each an array of shape [C] (or a scalar inside one client's computation).

    Every field but ``poisson``, ``sample_rate`` and ``extra`` is the per-client knob of the same name in the
    config's ``client`` or ``message`` section (``SETTING_KNOBS``), with that knob's allowed values.

    Attributes:
      local_steps: int32 local optimizer steps (0 = the client sends a zero update).
      batch_size: int32 fixed-size batch (fixed sampling) or expected batch (Poisson).
      lr: float32 local learning rate.
      prox_mu: float32 FedProx coefficient.
      poisson: bool, Poisson example sampling instead of fixed-size batches.
      sample_rate: float32 Poisson inclusion probability per step, batch_size / n_i clipped to (0, 1].
      mixup_alpha: float32 mixup Beta parameter (0 = off).
      prune_sparsity: float32 in [0, 1).
      dp_clip_norm: float32 per-example clip norm (inf = no clipping).
      dp_noise_multiplier: float32 DP-SGD noise multiplier (0 = no noise).
      sparsity: float32 magnitude pruning of the sent update (``message.sparsity``), fraction zeroed per layer
        (0 = off).
      topk_fraction: float32 fraction of update coordinates kept by top-k (1 = all).
      randk_fraction: float32 fraction kept by random-k (1 = all).
      clip_norm: float32 L2 clip of the sent update (``message.clip_norm``; inf = none).
      local_noise_multiplier: float32 local-DP Gaussian noise on the update, std = multiplier x clip.
      quant_bits: int32 stochastic-rounding bits per coordinate of the update (0 = off).
      qsgd_levels: int32 QSGD levels s (0 = off).
      extra: a user's own per-client strengths, {name: float32 [C]}, read by name like any field (a message
        transform's strength ``"my_strength"`` reads ``extra["my_strength"]``).
    """

    local_steps: np.ndarray
    batch_size: np.ndarray
    lr: np.ndarray
    prox_mu: np.ndarray
    poisson: np.ndarray
    sample_rate: np.ndarray
    mixup_alpha: np.ndarray
    prune_sparsity: np.ndarray
    dp_clip_norm: np.ndarray
    dp_noise_multiplier: np.ndarray
    sparsity: np.ndarray
    topk_fraction: np.ndarray
    randk_fraction: np.ndarray
    clip_norm: np.ndarray
    local_noise_multiplier: np.ndarray
    quant_bits: np.ndarray
    qsgd_levels: np.ndarray
    extra: dict[str, np.ndarray] = {}


# Per-client knobs of the config that are not local-training settings: a target epsilon is turned into each
# client's dp_noise_multiplier before training (``privacy.tracking.calibrate_targets``).
NOT_SETTINGS = ("target_epsilon",)


def _setting_knobs() -> dict[str, tuple[str, Rule]]:
    knobs = {}
    for section, config_class in (("client", ClientConfig), ("message", MessageConfig)):
        for field in dataclasses.fields(config_class):
            rule = field.metadata.get("rule")
            if rule is not None and rule.shape == "per_client" and field.name not in NOT_SETTINGS:
                knobs[field.name] = (section, dataclasses.replace(rule, shape="scalar"))
    return knobs


# settings field -> (config section, the knob's rule for one client's value): one name and one rule per knob.
SETTING_KNOBS: dict[str, tuple[str, Rule]] = _setting_knobs()
_DTYPES = {"poisson": bool, **{name: np.int32 for name, (_, rule) in SETTING_KNOBS.items() if rule.kind is int}}


def per_client_array(field: str, value: float | int | Sequence[float], num_clients: int) -> np.ndarray:
    """Expands a scalar, tier list (client i gets values[i % len]) or full list into a [C] array."""
    dtype = _DTYPES.get(field, np.float32)
    values = np.asarray(value if isinstance(value, (list, tuple, np.ndarray)) else [value], dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{field}={value!r} must be a scalar or a non-empty 1-D list.")
    if values.size not in (1, num_clients) and values.size > num_clients:
        raise ValueError(f"{field} has {values.size} values for {num_clients} clients; give a scalar, tiers, "
                         f"or exactly {num_clients} values.")
    expanded = values[np.arange(num_clients) % values.size]
    return expanded.astype(dtype)


def make_settings(num_clients: int, counts: np.ndarray, *, extra: dict[str, float | Sequence[float]] | None = None,
                  **fields: float | Sequence[float]) -> ClientSettings:
    """Builds ``ClientSettings`` [C] from scalars/tiers/lists; unspecified fields take neutral defaults.

    ``sample_rate`` defaults to batch_size / count (clipped to (0, 1]) for each client. ``extra`` adds a user's
    own per-client strengths (scalar, tiers or one value per client, as float32).
    """
    defaults = dict(local_steps=1, batch_size=16, lr=0.1, prox_mu=0.0, poisson=False, sample_rate=None,
                    mixup_alpha=0.0, prune_sparsity=0.0, dp_clip_norm=math.inf, dp_noise_multiplier=0.0,
                    sparsity=0.0, topk_fraction=1.0, randk_fraction=1.0, clip_norm=math.inf,
                    local_noise_multiplier=0.0, quant_bits=0, qsgd_levels=0)
    unknown = set(fields) - set(defaults)
    if unknown:
        raise ValueError(f"unknown client setting(s) {sorted(unknown)}; allowed: {sorted(defaults)}.")
    merged = {**defaults, **fields}
    arrays = {k: per_client_array(k, v, num_clients) for k, v in merged.items() if v is not None}
    if merged["sample_rate"] is None:
        counts = np.asarray(counts, np.float64)
        arrays["sample_rate"] = np.clip(arrays["batch_size"] / np.maximum(counts, 1.0), 1e-12, 1.0).astype(np.float32)
    settings = ClientSettings(**arrays, extra=with_extra({}, num_clients, extra or {}))
    validate_settings(settings)
    return settings


def replace_settings(settings: ClientSettings, counts: np.ndarray,
                     **fields: float | Sequence[float]) -> ClientSettings:
    """``settings`` with ``fields`` replaced (scalars, tiers or one value per client, as in ``make_settings``),
    validated; ``sample_rate`` follows a new ``batch_size`` (batch_size / count) unless given."""
    current = {name: getattr(settings, name) for name in ClientSettings._fields if name != "extra"}
    if "batch_size" in fields and "sample_rate" not in fields:
        current.pop("sample_rate")
    return make_settings(len(current["lr"]), counts, extra=settings.extra, **{**current, **fields})


def with_extra(current: dict[str, np.ndarray], num_clients: int,
               extra: dict[str, float | Sequence[float]]) -> dict[str, np.ndarray]:
    """``current`` extra strengths plus ``extra`` expanded to float32 [C]; a name that is a built-in field or is
    not finite is an error."""
    out = dict(current)
    for name, value in extra.items():
        if not isinstance(name, str) or not name.isidentifier() or name in ClientSettings._fields:
            raise ValueError(f"extra client setting name {name!r} must be an identifier other than the built-in "
                             f"fields {list(ClientSettings._fields)}.")
        values = per_client_array(name, value, num_clients)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"extra client setting {name}={value!r} must be finite numbers.")
        out[name] = values
    return out


def validate_settings(settings: ClientSettings) -> None:
    """Raises ValueError naming the first field with a value its config knob does not allow (``SETTING_KNOBS``),
    a sample rate outside (0, 1], or noise without a finite clip norm."""
    for field, (section, rule) in SETTING_KNOBS.items():
        values = np.asarray(getattr(settings, field))
        bad = ~np.isin(values, [v for v in np.unique(values) if in_bounds(float(v), rule)])
        if np.any(bad):
            first = int(np.argmax(bad))
            raise ValueError(f"client setting {field}={values[first]!r} (client {first}; {section}.{field}) is "
                             f"invalid; allowed: {describe(rule)}.")
    rates = np.asarray(settings.sample_rate)
    bad_rate = ~((rates > 0) & (rates <= 1))
    if np.any(bad_rate):
        first = int(np.argmax(bad_rate))
        raise ValueError(f"client setting sample_rate={rates[first]!r} (client {first}) is invalid; allowed: a "
                         "number in (0, 1].")
    noisy_unclipped = (np.asarray(settings.dp_noise_multiplier) > 0) & ~np.isfinite(settings.dp_clip_norm)
    if np.any(noisy_unclipped):
        raise ValueError(f"client {int(np.argmax(noisy_unclipped))} has dp_noise_multiplier > 0 but "
                         "dp_clip_norm=inf; DP-SGD needs a finite clip norm.")
    local_noise_unclipped = (np.asarray(settings.local_noise_multiplier) > 0) & ~np.isfinite(settings.clip_norm)
    if np.any(local_noise_unclipped):
        raise ValueError(f"client {int(np.argmax(local_noise_unclipped))} has local_noise_multiplier > 0 but "
                         "clip_norm=inf; local DP noise needs a finite clip norm.")
