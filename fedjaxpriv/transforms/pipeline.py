"""The message pipeline of a run: named stages read their per-client strengths from ``ClientSettings``."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv.client.settings import ClientSettings
from fedjaxpriv.transforms.base import FLOAT_BITS, MessageTransform, Wire, chain
from fedjaxpriv.transforms.privacy import add_local_noise, clip_update
from fedjaxpriv.transforms.quantize import qsgd, stochastic_rounding
from fedjaxpriv.transforms.sparsify import prune_message, random_k, top_k

# stage name -> (factory reading ClientSettings fields, "is this stage on for some client?")
_STAGES = {
    "prune": (lambda: prune_message(sparsity="message_sparsity"), lambda s: np.any(s.message_sparsity > 0)),
    "topk": (lambda: top_k("topk_fraction"), lambda s: np.any(s.topk_fraction < 1)),
    "randk": (lambda: random_k("randk_fraction"), lambda s: np.any(s.randk_fraction < 1)),
    "clip": (lambda: clip_update("update_clip_norm"), lambda s: np.any(np.isfinite(s.update_clip_norm))),
    "noise": (lambda: add_local_noise("local_noise_multiplier", "update_clip_norm"),
              lambda s: np.any(s.local_noise_multiplier > 0)),
    "round": (lambda: stochastic_rounding("quant_bits"), lambda s: np.any((s.quant_bits > 0) & (s.quant_bits < 32))),
    "qsgd": (lambda: qsgd("quant_levels"), lambda s: np.any(s.quant_levels > 0)),
}


def message_pipeline(order: Sequence[str], settings: ClientSettings) -> tuple[MessageTransform, tuple[str, ...]]:
    """The chain of the stages in ``order`` that are on for at least one client, and their names."""
    unknown = [name for name in order if name not in _STAGES]
    if unknown:
        raise ValueError(f"unknown message stage(s) {unknown}; allowed: {list(_STAGES)}.")
    active = tuple(name for name in order if _STAGES[name][1](settings))
    return chain(*(_STAGES[name][0]() for name in active)), active


def make_message_fn(order: Sequence[str], settings: ClientSettings):
    """``(delta, settings_row, key, values) -> (message, stats)`` for ``build_round``.

    ``values`` is the number of coordinates the client must send before any transform (fewer than the
    model's when the server-known pruning mask zeroes some); stats["bits"] is float32.
    """
    transform, _ = message_pipeline(order, settings)

    def message_fn(delta: Any, row: ClientSettings, key: jax.Array, values: jax.Array):
        wire = Wire(jnp.asarray(values, jnp.int32), jnp.int32(FLOAT_BITS), jnp.int32(0), jnp.int32(0))
        message, _, stats = transform.update(delta, transform.init(delta), key, row, wire)
        return message, {"bits": jnp.asarray(stats["bits"], jnp.float32)}

    return message_fn
