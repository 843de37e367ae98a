"""Error feedback: a compressor that remembers what it did not send and sends it later.

Error feedback (Seide et al. 2014; Stich, Cordonnier & Jaggi 2018; Karimireddy et al. 2019, "EF-SGD") keeps
per client the residual ``e`` of its compressor: it compresses ``v + e`` instead of ``v`` and keeps
``e' = v + e - C(v + e)``. Over rounds the sent messages add up to the inputs minus the last residual, so a
biased compressor such as top-k no longer loses the coordinates it never picks.

Wrap compressors only (sparsifiers, quantizers). Never wrap a noise stage: feeding back DP noise would cancel
it over rounds. The residual of a compressor that runs after a noise stage is a function of the noised
message (post-processing), so the noise's guarantee stands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjaxpriv.transforms.base import MessageTransform, PyTree, Settings, Stats, Wire


def error_feedback(compressor: MessageTransform, name: str = "error_feedback") -> MessageTransform:
    """``compressor`` with a per-client residual carried from round to round.

    State: ``(residual, compressor_state)``, the residual shaped like the message (float32 zeros at init).
    Stats: the compressor's, plus ``"<name>/residual_norm"``: L2 norm of the residual kept after this message.

    Args:
      compressor: the transform to correct (e.g. ``top_k(...)``, ``qsgd(...)``, or a ``chain`` of them).
      name: prefix of the diagnostic.
    """
    if not isinstance(compressor, MessageTransform):
        raise ValueError(f"error_feedback needs a MessageTransform, got {type(compressor).__name__}.")

    def init(params_like: PyTree) -> tuple[PyTree, PyTree]:
        residual = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params_like)
        return residual, compressor.init(params_like)

    def update(message: PyTree, state: tuple[PyTree, PyTree], key: jax.Array, settings: Settings,
               wire: Wire | None = None) -> tuple[PyTree, tuple[PyTree, PyTree], Stats]:
        residual, inner = state
        corrected = jax.tree_util.tree_map(lambda m, e: m + e.astype(m.dtype), message, residual)
        sent, inner, stats = compressor.update(corrected, inner, key, settings, wire)
        residual = jax.tree_util.tree_map(lambda c, s: (c - s).astype(jnp.float32), corrected, sent)
        return sent, (residual, inner), {**stats, f"{name}/residual_norm": optax.tree.norm(residual)}

    return MessageTransform(init, update)
