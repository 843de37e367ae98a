"""Local-model reconstruction by an eavesdropper (after Xu and Neglia 2021, "What else is leaked when
eavesdropping Federated Learning?").

An eavesdropper on a client's link sees only the messages (model updates) the client sends, not the global
models in between. It starts from the known initial model and applies the client's observed updates as if
the client had trained alone, ``theta_rec = theta_0 + scale * sum_r message_r``: every update is a step
down the client's own loss, so the reconstruction fits the client's data, much like the client's true local
model ``server_params_R + message_R`` does. Quality: accuracy of the reconstruction on the client's data
against that of the true local model (and of the initial model), and the L2 distance to the local model.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv import evaluation

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]


def accumulate_messages(init_params: Params, messages: Params, scale: float | jax.Array = 1.0,
                        mask: jax.Array | None = None) -> Params:
    """``init + scale * sum_r mask_r message_r``: the eavesdropper's model of ONE client.

    Args:
      init_params: the known initial global model.
      messages: the client's observed messages, leaves [R, ...] (updates, as sent).
      scale: multiplies the summed updates (traced scalar; 1 replays the client's steps).
      mask: [R] bool/float, which rounds were observed (default all).

    Returns:
      reconstructed params (``jax.vmap`` over clients for many targets).
    """

    def accumulate(p: jax.Array, m: jax.Array) -> jax.Array:
        weights = jnp.ones(m.shape[:1], p.dtype) if mask is None else jnp.asarray(mask, p.dtype)
        total = jnp.tensordot(weights, m.astype(p.dtype), axes=1)
        return p + jnp.asarray(scale, p.dtype) * total

    return jax.tree_util.tree_map(accumulate, init_params, messages)


def params_distance(a: Params, b: Params) -> jax.Array:
    """L2 distance between two parameter pytrees over all coordinates -> scalar."""
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda u, v: jnp.sum(jnp.square(u - v)), a, b))
    return jnp.sqrt(sum(leaves))


def reconstruction_report(apply_fn: ApplyFn, reconstructed: Params, local_params: Params, init_params: Params,
                          x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """How well the reconstruction stands in for the client's local model on the client's data.

    Returns:
      dict: "accuracy" (reconstruction), "local_accuracy" (true local model), "init_accuracy",
      "l2_distance" (to the local model), "init_l2_distance" (initial model to the local model) and
      "relative_l2" (their ratio; < 1 means closer than the initial model).
    """
    accuracy = evaluation.evaluate(apply_fn, reconstructed, x, y)["accuracy"]
    local = evaluation.evaluate(apply_fn, local_params, x, y)["accuracy"]
    init = evaluation.evaluate(apply_fn, init_params, x, y)["accuracy"]
    distance = float(params_distance(reconstructed, local_params))
    init_distance = float(params_distance(init_params, local_params))
    return {"accuracy": accuracy, "local_accuracy": local, "init_accuracy": init, "l2_distance": distance,
            "init_l2_distance": init_distance, "relative_l2": distance / max(init_distance, 1e-12)}
