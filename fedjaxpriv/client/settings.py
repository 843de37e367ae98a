"""Per-client settings as arrays: the leaves of ``ClientSettings`` have a leading client axis [C].

Everything that may differ between clients lives here, so one compiled round serves a heterogeneous
population: a client's row is gathered by id and read as traced scalars inside local training.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np


class ClientSettings(NamedTuple):
    """Per-client settings, each an array of shape [C] (or a scalar inside one client's computation).

    Attributes:
      num_steps: int32 local optimizer steps (0 = the client sends a zero update).
      batch_size: int32 fixed-size batch (fixed sampling) or expected batch (Poisson).
      lr: float32 local learning rate.
      prox_mu: float32 FedProx coefficient.
      poisson: bool, Poisson example sampling instead of fixed-size batches.
      sample_rate: float32 Poisson inclusion probability per step, batch_size / n_i clipped to (0, 1].
      mixup_alpha: float32 mixup Beta parameter (0 = off).
      prune_sparsity: float32 in [0, 1).
      dp_clip_norm: float32 per-example clip norm (inf = no clipping).
      dp_noise_multiplier: float32 DP-SGD noise multiplier (0 = no noise).
      message_sparsity: float32 magnitude pruning of the sent update, fraction zeroed per layer (0 = off).
      topk_fraction: float32 fraction of update coordinates kept by top-k (1 = all).
      randk_fraction: float32 fraction kept by random-k (1 = all).
      update_clip_norm: float32 L2 clip of the sent update (inf = none).
      local_noise_multiplier: float32 local-DP Gaussian noise on the update, std = multiplier x clip.
      quant_bits: int32 stochastic-rounding bits per coordinate of the update (0 = off).
      quant_levels: int32 QSGD levels s (0 = off).
      extra: a user's own per-client strengths, {name: float32 [C]}, read by name like any field (a message
        transform's strength ``"my_strength"`` reads ``extra["my_strength"]``).
    """

    num_steps: np.ndarray
    batch_size: np.ndarray
    lr: np.ndarray
    prox_mu: np.ndarray
    poisson: np.ndarray
    sample_rate: np.ndarray
    mixup_alpha: np.ndarray
    prune_sparsity: np.ndarray
    dp_clip_norm: np.ndarray
    dp_noise_multiplier: np.ndarray
    message_sparsity: np.ndarray
    topk_fraction: np.ndarray
    randk_fraction: np.ndarray
    update_clip_norm: np.ndarray
    local_noise_multiplier: np.ndarray
    quant_bits: np.ndarray
    quant_levels: np.ndarray
    extra: dict[str, np.ndarray] = {}


_DTYPES = {"num_steps": np.int32, "batch_size": np.int32, "poisson": bool, "quant_bits": np.int32,
           "quant_levels": np.int32}


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
    defaults = dict(num_steps=1, batch_size=16, lr=0.1, prox_mu=0.0, poisson=False, sample_rate=None,
                    mixup_alpha=0.0, prune_sparsity=0.0, dp_clip_norm=math.inf, dp_noise_multiplier=0.0,
                    message_sparsity=0.0, topk_fraction=1.0, randk_fraction=1.0, update_clip_norm=math.inf,
                    local_noise_multiplier=0.0, quant_bits=0, quant_levels=0)
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
    """Raises ValueError naming the first field with an out-of-range value."""
    checks = {
        "num_steps": (lambda a: a >= 0, ">= 0"),
        "batch_size": (lambda a: a >= 1, ">= 1"),
        "lr": (lambda a: (a > 0) & np.isfinite(a), "finite and > 0"),
        "prox_mu": (lambda a: a >= 0, ">= 0"),
        "sample_rate": (lambda a: (a > 0) & (a <= 1), "in (0, 1]"),
        "mixup_alpha": (lambda a: a >= 0, ">= 0"),
        "prune_sparsity": (lambda a: (a >= 0) & (a < 1), "in [0, 1)"),
        "dp_clip_norm": (lambda a: a > 0, "> 0 (inf = no clipping)"),
        "dp_noise_multiplier": (lambda a: (a >= 0) & np.isfinite(a), "finite and >= 0"),
        "update_clip_norm": (lambda a: a > 0, "> 0 (inf = no clipping)"),
        "local_noise_multiplier": (lambda a: (a >= 0) & np.isfinite(a), "finite and >= 0"),
        "message_sparsity": (lambda a: (a >= 0) & (a < 1), "in [0, 1)"),
        "topk_fraction": (lambda a: (a > 0) & (a <= 1), "in (0, 1]"),
        "randk_fraction": (lambda a: (a > 0) & (a <= 1), "in (0, 1]"),
        "quant_bits": (lambda a: (a >= 0) & (a <= 32), "in [0, 32] (0 = off)"),
        "quant_levels": (lambda a: a >= 0, ">= 0 (0 = off)"),
    }
    for field, (ok, allowed) in checks.items():
        values = np.asarray(getattr(settings, field))
        bad = ~ok(values)
        if np.any(bad):
            first = int(np.argmax(bad))
            raise ValueError(f"client setting {field}={values[first]!r} (client {first}) is invalid; "
                             f"allowed: {allowed}.")
    noisy_unclipped = (np.asarray(settings.dp_noise_multiplier) > 0) & ~np.isfinite(settings.dp_clip_norm)
    if np.any(noisy_unclipped):
        raise ValueError(f"client {int(np.argmax(noisy_unclipped))} has dp_noise_multiplier > 0 but "
                         "dp_clip_norm=inf; DP-SGD needs a finite clip norm.")
    local_noise_unclipped = (np.asarray(settings.local_noise_multiplier) > 0) & ~np.isfinite(settings.update_clip_norm)
    if np.any(local_noise_unclipped):
        raise ValueError(f"client {int(np.argmax(local_noise_unclipped))} has local_noise_multiplier > 0 but "
                         "update_clip_norm=inf; local DP noise needs a finite clip norm.")
