"""One federated round: a single compiled function ("vmap"/"loop"), or compiled pieces around per-client
compiled calls dispatched from Python ("host", for convnets on CPU).

Data flow (each numbered step is one piece of code):
  1 sample     cohort ids and mask (host, ``server.sampling``)
  2 gather     the cohort's rows of the per-client settings and data offsets
  3 train      ``client_update`` for every client, through ``map_clients`` (vmap / loop, chunks, mesh)
  4 transform  the message each client sends (``message_fn``: prune, quantize, clip, local noise)
  5 aggregate  weighted sum streamed over chunks; client-level DP (``ClientLevelDpFedAvg``) clips (fixed or
               adaptive clip norm), adds central Gaussian noise and divides by the expected cohort
  6 server     optax server optimizer on the pseudo-gradient -mean(delta)

Keys: ``round_key = fold_in(root, round)``; client ``i`` uses ``fold_in(fold_in(round_key, 0), i)`` and the
server ``fold_in(round_key, 1)``, so a client's randomness depends only on (seed, round, id).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjaxpriv.client import pruning
from fedjaxpriv.client.local import ApplyFn, LocalSpec, client_update
from fedjaxpriv.client.settings import ClientSettings
from fedjaxpriv.parallel import map_clients, map_clients_host
from fedjaxpriv.privacy.mechanisms import ClientLevelDpFedAvg

Params = Any
# (delta, settings row, key, number of coordinates to send) -> (message, stats with float32 "bits").
MessageFn = Callable[[Params, ClientSettings, jax.Array, jax.Array], tuple[Params, dict[str, jax.Array]]]


class ServerState(NamedTuple):
    """Global model and server optimizer state.

    Attributes:
      params: the global model.
      opt_state: the server optimizer's state.
      round: int32, the number of finished rounds.
      clip_norm: float32, the client-level clip norm of DP-FedAvg (adapted each round with adaptive
        clipping; inf when updates are not clipped).
    """

    params: Params
    opt_state: Any
    round: jax.Array
    clip_norm: jax.Array


class Population(NamedTuple):
    """Device-resident population data: flat examples and per-client slices (see ``FederatedData``)."""

    x: jax.Array
    y: jax.Array
    offsets: jax.Array
    counts: jax.Array


class RoundOutput(NamedTuple):
    """Per-client diagnostics of one round, each [K_max] aligned with the cohort slots.

    Attributes:
      loss: mean local training loss.
      steps: local steps taken.
      bits: bits the client's message costs on the wire.
      update_norm: L2 norm of the message before client-level clipping.
      weight: aggregation weight (0 for padded slots).
    """

    loss: jax.Array
    steps: jax.Array
    bits: jax.Array
    update_norm: jax.Array
    weight: jax.Array


@dataclasses.dataclass(frozen=True)
class AggregationSpec:
    """How messages are combined.

    Attributes:
      weighting: "examples" or "uniform" (client-level clipping always weighs clients uniformly).
      client_level: DP-FedAvg (``privacy.mechanisms.ClientLevelDpFedAvg``): clip each message to the state's clip
        norm, add central Gaussian noise, divide by the expected cohort, adapt the clip norm. None: plain mean.
    """

    weighting: str = "examples"
    client_level: ClientLevelDpFedAvg | None = None

    @property
    def clips(self) -> bool:
        return self.client_level is not None

    def client_weight(self, num_examples: jax.Array, participates: jax.Array) -> jax.Array:
        """Clients' weights in the server's mean (any shape): the number of examples under "examples"
        weighting without client-level clipping, else 1; 0 for a client that does not take part."""
        by_examples = self.weighting == "examples" and not self.clips
        return jnp.where(participates, num_examples if by_examples else 1.0, 0.0)


def identity_message(delta: Params, settings: ClientSettings, key: jax.Array,
                     values: jax.Array) -> tuple[Params, dict[str, jax.Array]]:
    """Sends the ``values`` coordinates the server does not already know to be zero as float32."""
    del settings, key
    return delta, {"bits": 32.0 * values.astype(jnp.float32)}


def client_keys_base(round_key: jax.Array) -> jax.Array:
    return jax.random.fold_in(round_key, 0)


def cohort_rows(state: ServerState, population: Population, settings: ClientSettings, ids: jax.Array,
                mask: jax.Array, prune_schedule: tuple[int, int] | None) -> dict[str, Any]:
    """Step 2 of a round: the cohort's settings rows (with the round's pruning sparsity) and data slices."""
    cohort_settings = jax.tree_util.tree_map(lambda a: jnp.take(a, ids, axis=0), settings)
    if prune_schedule is not None:
        begin, end = prune_schedule
        cohort_settings = cohort_settings._replace(prune_sparsity=jax.vmap(
            lambda s: pruning.iterative_sparsity(state.round, s, begin, end))(cohort_settings.prune_sparsity))
    return {"id": ids, "offset": jnp.take(population.offsets, ids), "count": jnp.take(population.counts, ids),
            "settings": cohort_settings, "mask": mask}


def client_message(spec: LocalSpec, apply_fn: ApplyFn, message_fn: MessageFn, state: ServerState,
                   population: Population, base_key: jax.Array, row: dict[str, Any]):
    """Steps 3-4 for one client: local training, then the message transforms. Returns (message as the client
    sends it, transform stats, ClientOutput)."""
    client_key = jax.random.fold_in(base_key, row["id"])
    train_key, message_key = jax.random.split(client_key)
    out = client_update(spec, apply_fn, state.params, population.x, population.y, row["offset"], row["count"],
                        row["settings"], train_key)
    message, stats = message_fn(out.delta, row["settings"], message_key, out.trained_params)
    return message, stats, out


def build_round(apply_fn: ApplyFn, spec: LocalSpec, server_tx: optax.GradientTransformation,
                aggregation: AggregationSpec, *, message_fn: MessageFn = identity_message, chunk_size: int,
                strategy: str = "vmap", mesh: Mesh | None = None,
                prune_schedule: tuple[int, int] | None = None) -> Callable[..., tuple[ServerState, RoundOutput]]:
    """Builds ``round_fn(state, population, settings, ids, mask, root_key) -> (state, RoundOutput)``.

    ``settings`` holds the whole population's [C] arrays; ``ids``/``mask`` [K_max] are the cohort. For
    "vmap" and "loop" the returned function is jitted; for "host" it is a Python function around jitted
    pieces (``_host_round``). Shapes are fixed, so each piece compiles once per experiment.
    ``prune_schedule=(begin, end)`` ramps each client's pruning sparsity from 0 at round ``begin`` to its
    configured value at round ``end`` (Zhu & Gupta 2017).
    """

    def one_client(state: ServerState, population: Population, base_key: jax.Array, row: dict[str, Any]):
        message, stats, out = client_message(spec, apply_fn, message_fn, state, population, base_key, row)
        norm = optax.tree.norm(message)
        if aggregation.clips:
            message = aggregation.client_level.clip(message, norm, state.clip_norm)
        participates = row["mask"] & (row["count"] > 0)
        weight = aggregation.client_weight(out.num_examples, participates)
        weighted = jax.tree_util.tree_map(lambda m: jnp.where(participates, weight * m, 0.0), message)
        kept = RoundOutput(loss=out.loss, steps=out.steps, bits=jnp.where(participates, stats["bits"], 0.0),
                           update_norm=norm, weight=weight)
        return (weighted, weight), kept

    def begin(state: ServerState, population: Population, settings: ClientSettings, ids: jax.Array,
              mask: jax.Array, root_key: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
        round_key = jax.random.fold_in(root_key, state.round)
        return round_key, client_keys_base(round_key), cohort_rows(state, population, settings, ids, mask,
                                                                   prune_schedule)

    def finish(state: ServerState, round_key: jax.Array, weighted_sum: Params, weight_sum: jax.Array,
               kept: RoundOutput) -> tuple[ServerState, RoundOutput]:
        server_key = jax.random.fold_in(round_key, 1)
        noise_key, count_key = jax.random.split(server_key)
        if aggregation.clips:
            mean_delta = aggregation.client_level.noisy_mean(weighted_sum, state.clip_norm, noise_key)
        else:
            denominator = jnp.maximum(weight_sum, 1e-12)
            mean_delta = jax.tree_util.tree_map(lambda s: s / denominator, weighted_sum)
        pseudo_grad = jax.tree_util.tree_map(jnp.negative, mean_delta)
        updates, opt_state = server_tx.update(pseudo_grad, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        clip_norm = state.clip_norm
        if aggregation.clips:
            clip_norm = aggregation.client_level.next_clip_norm(clip_norm, kept.update_norm, kept.weight > 0,
                                                                count_key)
        new_state = ServerState(params, opt_state, state.round + 1, clip_norm)
        if mesh is not None:  # every process reads the whole state and the per-client outputs
            new_state, kept = jax.lax.with_sharding_constraint((new_state, kept), NamedSharding(mesh, P()))
        return new_state, kept

    if strategy == "host":
        return _host_round(begin, finish, one_client, mesh)

    def round_fn(state: ServerState, population: Population, settings: ClientSettings, ids: jax.Array,
                 mask: jax.Array, root_key: jax.Array) -> tuple[ServerState, RoundOutput]:
        round_key, base, rows = begin(state, population, settings, ids, mask, root_key)
        (weighted_sum, weight_sum), kept = map_clients(
            lambda row: one_client(state, population, base, row), rows, chunk_size=chunk_size,
            strategy=strategy, mesh=mesh)
        return finish(state, round_key, weighted_sum, weight_sum, kept)

    return jax.jit(round_fn, donate_argnums=(0,))


def _host_round(begin: Callable, finish: Callable, one_client: Callable, mesh: Mesh | None) -> Callable:
    """The "host" strategy: compiled cohort preparation, then from Python one compiled call per client on each
    device of the mesh at once (``map_clients_host``), then compiled aggregation and server step. Same keys
    and results as the compiled strategies."""
    begin, finish = jax.jit(begin), jax.jit(finish, donate_argnums=(0,))

    def host_client(shared: tuple[ServerState, Population, jax.Array], row: dict[str, Any]):
        return one_client(*shared, row)

    def round_fn(state: ServerState, population: Population, settings: ClientSettings, ids: jax.Array,
                 mask: jax.Array, root_key: jax.Array) -> tuple[ServerState, RoundOutput]:
        round_key, base, rows = begin(state, population, settings, ids, mask, root_key)
        (weighted_sum, weight_sum), kept = map_clients_host(host_client, (state, population, base), rows,
                                                            chunk_size=1, mesh=mesh)
        return finish(state, round_key, weighted_sum, weight_sum, kept)

    return round_fn


def build_message_tap(apply_fn: ApplyFn, spec: LocalSpec, *, message_fn: MessageFn = identity_message,
                      prune_schedule: tuple[int, int] | None = None) -> Callable[..., Params]:
    """Builds ``tap(state, population, settings, ids, root_key) -> messages`` (leaves [T, ...]).

    The messages the clients ``ids`` send in round ``state.round``, recomputed with the round's keys, so
    they equal what those clients send inside the round (an eavesdropper's or the server's view, before any
    server-side clipping). Clients run one at a time (memory O(params) per target).
    """

    def tap(state: ServerState, population: Population, settings: ClientSettings, ids: jax.Array,
            root_key: jax.Array) -> Params:
        base = client_keys_base(jax.random.fold_in(root_key, state.round))
        rows = cohort_rows(state, population, settings, ids, jnp.ones(ids.shape, bool), prune_schedule)
        return jax.lax.map(lambda row: client_message(spec, apply_fn, message_fn, state, population, base, row)[0],
                           rows)

    return jax.jit(tap)


def init_server_state(params: Params, server_tx: optax.GradientTransformation,
                      clip_norm: float = math.inf) -> ServerState:
    """A fresh server state holding a copy of ``params`` (the round function donates its state)."""
    params = jax.tree_util.tree_map(jnp.array, params)
    return ServerState(params=params, opt_state=server_tx.init(params), round=jnp.zeros((), jnp.int32),
                       clip_norm=jnp.float32(clip_norm))
