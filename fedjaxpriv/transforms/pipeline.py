"""The message pipeline of a run: named stages read their per-client strengths from ``ClientSettings``.

``message_pipeline`` builds the chain a config describes; ``make_message_fn`` turns any ``MessageTransform``
(that chain, or one a user passes to ``Experiment(config, message_transform=...)``) into the function the round
calls for each client; every client keeps its own copy of the transform's state from one round to the next
(``simulation.initial_client_states``).
"""

from __future__ import annotations

import importlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from fedjaxpriv.client.settings import ClientSettings
from fedjaxpriv.config import STAGE_BY_NAME, STAGES, MessageStage, local_dp_order_problem
from fedjaxpriv.transforms.base import FLOAT_BITS, WIRE_KEYS, MessageTransform, Wire, chain, wire_after
from fedjaxpriv.transforms.feedback import error_feedback

# Stages that compress (and so may be wrapped in error feedback); clip and noise never are.
COMPRESSOR_STAGES: tuple[str, ...] = tuple(stage.name for stage in STAGES if stage.compressor)


def stage_transform(stage: MessageStage) -> MessageTransform:
    """The stage's transform, reading its strengths from the ``ClientSettings`` fields named as its knobs."""
    module, function = stage.transform.split(":")
    return getattr(importlib.import_module(module), function)(*stage.strengths)


def message_pipeline(order: Sequence[str], settings: ClientSettings, *,
                     feedback: bool = False) -> tuple[MessageTransform, tuple[str, ...]]:
    """The chain of the stages in ``order`` that are on for at least one client, and their names; with
    ``feedback`` each compressor stage carries its own error-feedback residual (``feedback.error_feedback``).

    Raises ValueError when local noise is on and the stages before it would not bound the noised message by the
    clip norm the noise is scaled to (``config.local_dp_order_problem``).
    """
    unknown = [name for name in order if name not in STAGE_BY_NAME]
    if unknown:
        raise ValueError(f"unknown message stage(s) {unknown}; allowed: {list(STAGE_BY_NAME)}.")
    active = tuple(name for name in order
                   if STAGE_BY_NAME[name].is_on(getattr(settings, STAGE_BY_NAME[name].strengths[0])))
    if "noise" in active:  # the same rule as the config's, on the stages these settings switch on
        problem = local_dp_order_problem(active, feedback)
        if problem is not None:
            raise ValueError(f"message stages {list(active)} (feedback={feedback}) cannot carry local DP: allowed "
                             f"are orders with {problem}.")

    def stage(name: str) -> MessageTransform:
        transform = stage_transform(STAGE_BY_NAME[name])
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
