"""Federated algorithms as values: what each client keeps between rounds and how the server combines it.

A ``FederatedAlgorithm`` adds to the round (``simulation.build_round``) a per-client persistent state (leaves
``[C, ...]`` in ``ServerState.client_state.algorithm``, gathered for the cohort and scattered back for the
clients that took part) and a server state (``ServerState.algorithm_state``), through three pure functions of
ONE client or of the server, vmapped like everything else:

* ``correction(server_state, client_state) -> pytree like params or None``: added to every local gradient
  (after DP-SGD's clipping and noise, so it is post-processing of what the client already released);
* ``client_finish(delta, steps, lr, server_state, client_state) -> (extra message, new client state)``: what
  the client sends besides its model delta, and what it keeps;
* ``server_finish(server_state, extra_sum, participants, num_clients) -> new server state``, from the sum of
  the participants' extra messages.

FedAvg, FedProx and FedSGD keep no state (``FEDAVG``; FedProx's proximal term and FedSGD's single full-batch
step are local-training settings); SCAFFOLD keeps control variates.

References:
  Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic Controlled Averaging for Federated
  Learning". ICML 2020.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Params = Any


class FederatedAlgorithm(NamedTuple):
    """The per-client and server state an algorithm adds to FedAvg's round (see the module docstring).

    Attributes:
      name: short name (``server.algorithm``).
      client_init: ``params -> one client's initial state`` (``()``: none).
      server_init: ``params -> the server's initial state`` (``()``: none).
      correction: ``(server_state, client_state) -> gradient correction`` (None: none).
      client_finish: ``(delta, steps, lr, server_state, client_state) -> (extra message, new client state)``;
        the extra message is sent uncompressed (32-bit floats) beside the delta.
      server_finish: ``(server_state, extra_sum, participants, num_clients) -> new server state``.
    """

    name: str
    client_init: Callable[[Params], Any]
    server_init: Callable[[Params], Any]
    correction: Callable[[Any, Any], Params | None]
    client_finish: Callable[..., tuple[Any, Any]]
    server_finish: Callable[[Any, Any, jax.Array, int], Any]


def _none(params: Params) -> tuple:
    del params
    return ()


FEDAVG = FederatedAlgorithm(
    name="fedavg", client_init=_none, server_init=_none, correction=lambda server, client: None,
    client_finish=lambda delta, steps, lr, server, client: ((), client),
    server_finish=lambda server, extra_sum, participants, num_clients: server)


def _zeros_like(params: Params) -> Params:
    return jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)


def _scaffold_correction(server_control: Params, client_control: Params) -> Params:
    """c - c_i: the local gradient is corrected by the drift of this client from the average."""
    return jax.tree_util.tree_map(jnp.subtract, server_control, client_control)


def _scaffold_client_finish(delta: Params, steps: jax.Array, lr: jax.Array, server_control: Params,
                            client_control: Params) -> tuple[Params, Params]:
    """Option II of the paper: c_i+ = c_i - c + (x - y) / (K lr) = c_i - c - delta / (K lr); sends c_i+ - c_i.
    A client that took no step keeps c_i and sends 0."""
    took_steps = steps > 0
    scale = 1.0 / jnp.maximum(steps * lr, 1e-30)
    new_control = jax.tree_util.tree_map(
        lambda ci, c, d: jnp.where(took_steps, ci - c - scale * d.astype(jnp.float32), ci),
        client_control, server_control, delta)
    return jax.tree_util.tree_map(jnp.subtract, new_control, client_control), new_control


def _scaffold_server_finish(server_control: Params, extra_sum: Params, participants: jax.Array,
                            num_clients: int) -> Params:
    """c <- c + (|S| / N) mean_S(c_i+ - c_i) = c + sum_S(c_i+ - c_i) / N."""
    del participants
    return jax.tree_util.tree_map(lambda c, s: c + s / jnp.float32(num_clients), server_control, extra_sum)


SCAFFOLD = FederatedAlgorithm(
    name="scaffold", client_init=_zeros_like, server_init=_zeros_like, correction=_scaffold_correction,
    client_finish=_scaffold_client_finish, server_finish=_scaffold_server_finish)

ALGORITHMS: dict[str, FederatedAlgorithm] = {"fedavg": FEDAVG, "fedprox": FEDAVG, "fedsgd": FEDAVG,
                                              "scaffold": SCAFFOLD}


def algorithm_for(name: str) -> FederatedAlgorithm:
    """The algorithm ``server.algorithm`` names (FedProx and FedSGD are FedAvg's round with other local settings)."""
    if name not in ALGORITHMS:
        raise ValueError(f"server.algorithm={name!r} is invalid; allowed: one of {sorted(ALGORITHMS)}.")
    return ALGORITHMS[name]
