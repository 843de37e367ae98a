"""The message pipeline of a run: named stages read their per-client strengths from ``ClientSettings``.

``message_pipeline`` builds the chain a config describes; ``make_message_fn`` turns any ``MessageTransform``
(that chain, or one a user passes to ``Experiment(config, message_transform=...)``) into the function the round
calls for each client; every client keeps its own copy of the transform's state from one round to the next
(``simulation.initial_client_states``).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv.client.settings import ClientSettings
from fedjaxpriv.config import MESSAGE_STAGES, local_dp_order_problem
from fedjaxpriv.transforms.base import FLOAT_BITS, WIRE_KEYS, MessageTransform, Wire, chain, wire_after
from fedjaxpriv.transforms.feedback import error_feedback
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
# Stages that compress (and so may be wrapped in error feedback); clip and noise never are.
COMPRESSOR_STAGES: tuple[str, ...] = ("prune", "topk", "randk", "round", "qsgd")
if tuple(_STAGES) != MESSAGE_STAGES:
    raise ImportError(f"message stages {tuple(_STAGES)} disagree with config.MESSAGE_STAGES {MESSAGE_STAGES}.")


def message_pipeline(order: Sequence[str], settings: ClientSettings, *,
                     feedback: bool = False) -> tuple[MessageTransform, tuple[str, ...]]:
    """The chain of the stages in ``order`` that are on for at least one client, and their names; with
    ``feedback`` each compressor stage carries its own error-feedback residual (``feedback.error_feedback``).

    Raises ValueError when local noise is on and the stages before it would not bound the noised message by the
    clip norm the noise is scaled to (``config.local_dp_order_problem``).
    """
    unknown = [name for name in order if name not in _STAGES]
    if unknown:
        raise ValueError(f"unknown message stage(s) {unknown}; allowed: {list(_STAGES)}.")
    active = tuple(name for name in order if _STAGES[name][1](settings))
    if "noise" in active:  # the same rule as the config's, on the stages these settings switch on
        problem = local_dp_order_problem(active, feedback)
        if problem is not None:
            raise ValueError(f"message stages {list(active)} (feedback={feedback}) cannot carry local DP: allowed "
                             f"are orders with {problem}.")

    def stage(name: str) -> MessageTransform:
        transform = _STAGES[name][0]()
        if feedback and name in COMPRESSOR_STAGES:
            return error_feedback(transform, f"error_feedback@{name}")
        return transform

    return chain(*(stage(name) for name in active)), active


def make_message_fn(transform: MessageTransform):
    """``(delta, settings_row, key, values, state) -> (message, state, stats)`` for ``build_round``.

    ``values`` is the number of coordinates the client must send before any transform (fewer than the
    model's when the server-known pruning mask zeroes some); ``state`` is the client's transform state.
    stats["bits"] is float32; the transform's diagnostics come along as float32 scalars.
    """
    if not isinstance(transform, MessageTransform):
        raise ValueError(f"message_transform must be a MessageTransform (init, update), got "
                         f"{type(transform).__name__}.")

    def message_fn(delta: Any, row: ClientSettings, key: jax.Array, values: jax.Array, state: Any):
        wire = Wire(jnp.asarray(values, jnp.int32), jnp.int32(FLOAT_BITS), jnp.int32(0), jnp.int32(0))
        message, state, stats = transform.update(delta, state, key, row, wire)
        diagnostics = {k: jnp.asarray(v, jnp.float32) for k, v in stats.items() if k not in WIRE_KEYS}
        return message, state, {**diagnostics, "bits": jnp.asarray(wire_after(stats, wire).bits, jnp.float32)}

    return message_fn
