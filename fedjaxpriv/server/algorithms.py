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

Two more optional parts change the round without state:

* ``local_settings(settings, counts) -> settings``: the per-client settings ``[C]`` the algorithm trains with
  (host side, before noise is calibrated): FedProx's proximal weight, FedSGD's single full-batch step;
* ``client_level``: the server's client-level mechanism (``privacy.mechanisms.ClientLevelDpFedAvg``): clip each
  message, add central noise to the sum, divide by the expected cohort; its events are what the run accounts.

``FEDAVG`` keeps nothing; ``fedprox(mu)``, ``fedsgd()`` and ``dp_fedavg(mechanism)`` are FedAvg with other
local settings or another aggregation; SCAFFOLD keeps control variates (``ScaffoldServerState``,
``ScaffoldClientState``); Ditto (``ditto(lam)``) keeps a personal model per client (``DittoClientState``).

What may run under DP is read from one capability, ``FederatedAlgorithm.extra_message`` (the client sends a
message beside its delta, which neither client-level nor local DP clips or noises), by one check,
``check_protects``; the round verifies the declaration against what ``client_finish`` returns.

References:
  Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic Controlled Averaging for Federated
  Learning". ICML 2020.
  Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in Heterogeneous Networks" (FedProx).
  MLSys 2020.
  McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent Language Models" (DP-FedAvg).
  ICLR 2018.
  Li, Hu, Beirami, Smith. "Ditto: Fair and Robust Federated Learning Through Personalization". ICML 2021.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv.config import ALGORITHM_NAMES
from fedjaxpriv.client.settings import ClientSettings, replace_settings

if TYPE_CHECKING:
    from fedjaxpriv.privacy.mechanisms import ClientLevelDpFedAvg

Params = Any
ClientState = Any  # one client's state: a pytree (a NamedTuple such as ScaffoldClientState), () for none
ServerAlgorithmState = Any  # the server's state: a pytree (ScaffoldServerState), () for none


class ClientFinish(Protocol):
    """What a client sends beside its delta and keeps, after local training (one client, traced)."""

    def __call__(self, delta: Params, steps: jax.Array, lr: jax.Array, server_state: ServerAlgorithmState,
                 client_state: ClientState) -> tuple[Params | tuple, ClientState]: ...


class ServerFinish(Protocol):
    """The server's new state from the sum of the participants' extra messages (traced)."""

    def __call__(self, server_state: ServerAlgorithmState, extra_sum: Params | tuple, participants: jax.Array,
                 num_clients: int) -> ServerAlgorithmState: ...


class PersonalUpdate(Protocol):
    """A client's new state from training it keeps to itself, through ``train(start_params, prox=(centre, mu))
    -> client.local.ClientOutput`` (one client, traced)."""

    def __call__(self, train: Callable[..., Any], server_params: Params, server_state: ServerAlgorithmState,
                 client_state: ClientState) -> ClientState: ...


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
      local_settings: ``(settings [C], counts [C]) -> settings [C]``, the local training the algorithm asks of
        each client (None: the settings as given).
      client_level: client-level DP of the aggregate (DP-FedAvg; None: the plain weighted mean).
      clip_norm: the initial client-level clip norm (L2, update units; inf: no clipping), adapted from round to
        round by an adaptive ``client_level``.
      extra_message: ``client_finish`` sends a message beside the delta (SCAFFOLD's control-variate change):
        released as it is, so no DP mechanism of the run covers it (``check_protects``).
    """

    name: str
    client_init: Callable[[Params], ClientState]
    server_init: Callable[[Params], ServerAlgorithmState]
    correction: Callable[[ServerAlgorithmState, ClientState], Params | None]
    client_finish: ClientFinish
    server_finish: ServerFinish
    personal_update: PersonalUpdate | None = None
    personal_params: Callable[[ClientState], Params] | None = None
    local_settings: Callable[[ClientSettings, np.ndarray], ClientSettings] | None = None
    client_level: ClientLevelDpFedAvg | None = None
    clip_norm: float = math.inf
    extra_message: bool = False

    def settings_for(self, settings: ClientSettings, counts: np.ndarray) -> ClientSettings:
        """The per-client settings this algorithm trains with, from ``settings`` [C] and example counts [C]."""
        return settings if self.local_settings is None else self.local_settings(settings, counts)


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


class ScaffoldServerState(NamedTuple):
    """SCAFFOLD's server control variate c (leaves like params, float32)."""

    control: Params


class ScaffoldClientState(NamedTuple):
    """A client's control variate c_i (leaves like params, float32)."""

    control: Params


def _scaffold_server_init(params: Params) -> ScaffoldServerState:
    return ScaffoldServerState(_zeros_like(params))


def _scaffold_client_init(params: Params) -> ScaffoldClientState:
    return ScaffoldClientState(_zeros_like(params))


def _scaffold_correction(server: ScaffoldServerState, client: ScaffoldClientState) -> Params:
    """c - c_i: the local gradient is corrected by the drift of this client from the average."""
    return jax.tree_util.tree_map(jnp.subtract, server.control, client.control)


def _scaffold_client_finish(delta: Params, steps: jax.Array, lr: jax.Array, server: ScaffoldServerState,
                            client: ScaffoldClientState) -> tuple[Params, ScaffoldClientState]:
    """Option II of the paper: c_i+ = c_i - c + (x - y) / (K lr) = c_i - c - delta / (K lr); sends c_i+ - c_i.
    A client that took no step keeps c_i and sends 0."""
    took_steps = steps > 0
    scale = 1.0 / jnp.maximum(steps * lr, 1e-30)
    new_control = jax.tree_util.tree_map(
        lambda ci, c, d: jnp.where(took_steps, ci - c - scale * d.astype(jnp.float32), ci),
        client.control, server.control, delta)
    return jax.tree_util.tree_map(jnp.subtract, new_control, client.control), ScaffoldClientState(new_control)


def _scaffold_server_finish(server: ScaffoldServerState, extra_sum: Params, participants: jax.Array,
                            num_clients: int) -> ScaffoldServerState:
    """c <- c + (|S| / N) mean_S(c_i+ - c_i) = c + sum_S(c_i+ - c_i) / N."""
    del participants
    return ScaffoldServerState(jax.tree_util.tree_map(lambda c, s: c + s / jnp.float32(num_clients),
                                                      server.control, extra_sum))


SCAFFOLD = FederatedAlgorithm(
    name="scaffold", client_init=_scaffold_client_init, server_init=_scaffold_server_init,
    correction=_scaffold_correction, client_finish=_scaffold_client_finish, server_finish=_scaffold_server_finish,
    extra_message=True)


class DittoClientState(NamedTuple):
    """A client's personal model v_k (leaves like params, float32), never sent."""

    personal: Params


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
                        client: DittoClientState) -> DittoClientState:
        del server_state
        out = train(client.personal, prox=(server_params, jnp.float32(lam)))
        return DittoClientState(jax.tree_util.tree_map(lambda v, d: v + d.astype(v.dtype), client.personal,
                                                       out.delta))

    return FederatedAlgorithm(
        name="ditto", client_init=lambda params: DittoClientState(_float32_copy(params)), server_init=_none,
        correction=lambda server, client: None, client_finish=lambda delta, steps, lr, server, client: ((), client),
        server_finish=lambda server, extra_sum, participants, num_clients: server,
        personal_update=personal_update, personal_params=lambda states: states.personal)


def fedprox(mu: float | None = None) -> FederatedAlgorithm:
    """FedProx (Li et al. 2020): FedAvg whose local objective adds ``mu / 2 ||w - w_t||^2``, w_t the round's
    global model.

    Args:
      mu: every client's proximal weight, >= 0; None keeps each client's ``prox_mu`` setting (``client.prox_mu``,
        which may differ per client).
    """
    if mu is None:
        return FEDAVG._replace(name="fedprox")
    if not mu >= 0:
        raise ValueError(f"fedprox mu={mu} is invalid; allowed: a number >= 0.")
    return FEDAVG._replace(name="fedprox",
                           local_settings=lambda settings, counts: replace_settings(settings, counts, prox_mu=mu))


def _one_full_batch_step(settings: ClientSettings, counts: np.ndarray) -> ClientSettings:
    """FedSGD's local training: one step of lr 1 on every example the client holds (a fixed batch of the largest
    client's size), so that the message is minus the client's full-batch gradient."""
    return replace_settings(settings, counts, local_steps=1, batch_size=max(1, int(np.max(counts))), lr=1.0,
                            poisson=False)


def fedsgd() -> FederatedAlgorithm:
    """FedSGD (McMahan et al. 2017): each client sends minus its full-batch gradient; the server optimizer
    applies the mean with its own learning rate."""
    return FEDAVG._replace(name="fedsgd", local_settings=_one_full_batch_step)


def dp_fedavg(mechanism: ClientLevelDpFedAvg, clip_norm: float,
              base: FederatedAlgorithm | None = None) -> FederatedAlgorithm:
    """DP-FedAvg (McMahan et al. 2018): ``base`` (FedAvg by default) whose server clips each client's message to
    ``clip_norm`` (L2; the initial value under adaptive clipping), adds Gaussian noise to the sum and divides by
    the expected cohort, as ``mechanism`` describes; the run accounts ``mechanism``'s events. An algorithm with an
    extra message (SCAFFOLD) is refused: that message would be released unclipped and un-noised."""
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"dp_fedavg clip_norm={clip_norm} is invalid; allowed: a finite number > 0.")
    base = FEDAVG if base is None else base
    check_protects(base, "client-level DP (dp_fedavg)")
    return base._replace(name="dp_fedavg" if base.name == "fedavg" else f"dp_{base.name}", client_level=mechanism,
                         clip_norm=float(clip_norm))


def check_protects(algorithm: FederatedAlgorithm, protection: str) -> None:
    """Raises ValueError when ``protection`` (a DP mechanism, an audit) would not cover everything ``algorithm``
    releases: an extra message beside the delta (``FederatedAlgorithm.extra_message``) goes out as it is."""
    if algorithm.extra_message:
        raise ValueError(f"algorithm {algorithm.name!r} with {protection} is invalid: the extra message it sends "
                         "beside its update (e.g. SCAFFOLD's control-variate change) would be released unclipped "
                         "and un-noised; allowed: an algorithm without an extra message.")


def _holds(tree: Any) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


def corrects_gradients(algorithm: FederatedAlgorithm, params: Params) -> bool:
    """Whether ``algorithm`` adds a correction to every local gradient (SCAFFOLD's c - c_i), read off its own
    ``correction`` on its initial states for ``params``."""
    return _holds(jax.eval_shape(algorithm.correction, algorithm.server_init(params), algorithm.client_init(params)))


def trains_as_fedavg(algorithm: FederatedAlgorithm, params: Params) -> bool:
    """Whether ``algorithm`` trains and sends as FedAvg does once its local settings are applied: no client or
    server state, no gradient correction, no extra message, no personal training, no client-level DP (FedProx and
    FedSGD do; SCAFFOLD, Ditto and DP-FedAvg do not). Read off its own functions on ``params``, not its name."""
    return (algorithm.client_level is None and not algorithm.extra_message and algorithm.personal_update is None
            and not _holds(jax.eval_shape(algorithm.server_init, params))
            and not _holds(jax.eval_shape(algorithm.client_init, params))
            and not corrects_gradients(algorithm, params))


def algorithm_for(name: str, *, ditto_lambda: float = 1.0) -> FederatedAlgorithm:
    """The algorithm ``server.algorithm`` names (FedProx reads each client's ``prox_mu`` setting);
    ``ditto_lambda`` is Ditto's proximal weight (``server.ditto_lambda``). Client-level DP is added by the run
    from the config (``dp_fedavg``)."""
    if name not in ALGORITHM_NAMES:
        raise ValueError(f"server.algorithm={name!r} is invalid; allowed: one of {list(ALGORITHM_NAMES)}.")
    built = {"fedavg": lambda: FEDAVG, "fedprox": fedprox, "fedsgd": fedsgd, "scaffold": lambda: SCAFFOLD,
             "ditto": lambda: ditto(ditto_lambda)}
    return built[name]()
