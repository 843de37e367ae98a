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
  the participants' extra messages;
* optionally ``personal_update(train, server_params, server_state, client_state) -> new client state``: local
  training the client keeps to itself (never sent), through ``train(start_params, prox=(centre, mu)) ->
  ClientOutput``, the client's own local training (same data, settings and defenses) from ``start_params``
  with the proximal term ``mu / 2 ||params - centre||^2``; and ``personal_params(client_states) -> params``
  (leaves ``[C, ...]``), the personal models the run evaluates.

FedAvg, FedProx and FedSGD keep no state (``FEDAVG``; FedProx's proximal term and FedSGD's single full-batch
step are local-training settings); SCAFFOLD keeps control variates; Ditto (``ditto(lam)``) keeps a personal
model per client.

References:
  Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic Controlled Averaging for Federated
  Learning". ICML 2020.
  Li, Hu, Beirami, Smith. "Ditto: Fair and Robust Federated Learning Through Personalization". ICML 2021.
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
      personal_update: ``(train, server_params, server_state, client_state) -> new client state``: training
        the client keeps to itself (None: none).
      personal_params: ``client_states -> personal models`` (leaves ``[C, ...]``; None: no personal models).
    """

    name: str
    client_init: Callable[[Params], Any]
    server_init: Callable[[Params], Any]
    correction: Callable[[Any, Any], Params | None]
    client_finish: Callable[..., tuple[Any, Any]]
    server_finish: Callable[[Any, Any, jax.Array, int], Any]
    personal_update: Callable[..., Any] | None = None
    personal_params: Callable[[Any], Params] | None = None


def _none(params: Params) -> tuple:
    del params
    return ()


FEDAVG = FederatedAlgorithm(
    name="fedavg", client_init=_none, server_init=_none, correction=lambda server, client: None,
    client_finish=lambda delta, steps, lr, server, client: ((), client),
    server_finish=lambda server, extra_sum, participants, num_clients: server)


def _zeros_like(params: Params) -> Params:
    return jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)


def _float32_copy(params: Params) -> Params:
    """A client's initial personal model: the initial global model, in float32."""
    return jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), params)


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


def ditto(lam: float) -> FederatedAlgorithm:
    """Ditto (Li et al. 2021): FedAvg's global model, and a personal model v_k per client, trained (when the
    client takes part) by the client's own local training from v_k on ``F_k(v) + lam / 2 ||v - w||^2``, w the
    round's global model. v_k starts at the initial global model and is never sent.

    Args:
      lam: the proximal weight, >= 0 (0: purely local models; large: v_k stays near w).
    """
    if not lam >= 0:
        raise ValueError(f"ditto lam={lam} is invalid; allowed: a number >= 0.")

    def personal_update(train: Callable[..., Any], server_params: Params, server_state: Any,
                        personal: Params) -> Params:
        del server_state
        out = train(personal, prox=(server_params, jnp.float32(lam)))
        return jax.tree_util.tree_map(lambda v, d: v + d.astype(v.dtype), personal, out.delta)

    return FederatedAlgorithm(
        name="ditto", client_init=_float32_copy, server_init=_none, correction=lambda server, client: None,
        client_finish=lambda delta, steps, lr, server, client: ((), client),
        server_finish=lambda server, extra_sum, participants, num_clients: server,
        personal_update=personal_update, personal_params=lambda personal: personal)


ALGORITHM_NAMES: tuple[str, ...] = ("fedavg", "fedprox", "fedsgd", "scaffold", "ditto")


def algorithm_for(name: str, *, ditto_lambda: float = 1.0) -> FederatedAlgorithm:
    """The algorithm ``server.algorithm`` names (FedProx and FedSGD are FedAvg's round with other local
    settings); ``ditto_lambda`` is Ditto's proximal weight (``server.ditto_lambda``)."""
    if name not in ALGORITHM_NAMES:
        raise ValueError(f"server.algorithm={name!r} is invalid; allowed: one of {list(ALGORITHM_NAMES)}.")
    if name == "scaffold":
        return SCAFFOLD
    if name == "ditto":
        return ditto(ditto_lambda)
    return FEDAVG
