"""One federated round: a single compiled function ("vmap"/"loop"), or compiled pieces around per-client
compiled calls dispatched from Python ("host", for convnets on CPU).

Data flow (each numbered step is one piece of code):
  1 sample     cohort ids and mask (host, ``server.sampling``)
  2 gather     the cohort's rows of the per-client settings and data offsets
  3 train      ``client_update`` for every client, through ``map_clients`` (vmap / loop, chunks, mesh)
  4 transform  the message each client sends (``message_fn``: prune, quantize, clip, local noise), from and to
               the client's own transform state, and the algorithm's extra message and client state
               (``server.algorithms``, e.g. SCAFFOLD's control variates); client states are rows of
               ``ServerState.client_state`` gathered by id and scattered back for the clients that took part
  5 aggregate  weighted sum streamed over chunks; client-level DP (``ClientLevelDpFedAvg``) clips (fixed or
               adaptive clip norm), adds central Gaussian noise and divides by the expected cohort
  6 server     optax server optimizer on the pseudo-gradient -mean(delta); the algorithm's server state from
               the sum of the extra messages

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
from fedjaxpriv.parallel import CLIENT_AXIS, SlotRows, gather_examples, map_clients, map_clients_host
from fedjaxpriv.privacy.mechanisms import ClientLevelDpFedAvg
from fedjaxpriv.server.algorithms import FEDAVG, FederatedAlgorithm, check_protects

Params = Any
# (delta, settings row, key, number of coordinates to send, client's transform state)
#   -> (message, new transform state, stats: float32 "bits" and float32 diagnostics).
MessageFn = Callable[[Params, ClientSettings, jax.Array, jax.Array, Any], tuple[Params, Any, dict[str, jax.Array]]]


class ClientStates(NamedTuple):
    """What every client keeps between rounds, leaves [C, ...] (``()`` when nothing is kept).

    Attributes:
      message: the message transform's state (e.g. error-feedback residuals).
      algorithm: the algorithm's client state (e.g. SCAFFOLD's control variate c_i).
    """

    message: Any = ()
    algorithm: Any = ()


class ServerState(NamedTuple):
    """Global model and server optimizer state.

    Attributes:
      params: the global model.
      opt_state: the server optimizer's state.
      round: int32, the number of finished rounds.
      clip_norm: float32, the client-level clip norm of DP-FedAvg (adapted each round with adaptive
        clipping; inf when updates are not clipped).
      client_state: ``ClientStates``, every client's message-transform and algorithm state, leaves [C, ...];
        a client's row changes only in the rounds it takes part in.
      algorithm_state: the algorithm's server state (e.g. SCAFFOLD's control variate c; ``()`` for FedAvg).
    """

    params: Params
    opt_state: Any
    round: jax.Array
    clip_norm: jax.Array
    client_state: ClientStates = ClientStates()
    algorithm_state: Any = ()


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
      diagnostics: the message transforms' diagnostics, {name: [K_max] float32} (e.g. "top_k/sq_error").
      tapped: the messages of the tapped cohort slots, leaves [T, ...] (row t: the slot whose ``tap_slots`` is t,
        as that client sent it, before server-side clipping; zeros for a t no slot names), from the round itself;
        ``()`` for a round built without taps (``tap_width`` 0).
    """

    loss: jax.Array
    steps: jax.Array
    bits: jax.Array
    update_norm: jax.Array
    weight: jax.Array
    diagnostics: dict[str, jax.Array] = {}
    tapped: Any = ()


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

    def contribution(self, message: Params, clip_norm: jax.Array, num_examples: jax.Array,
                     participates: jax.Array) -> tuple[Params, jax.Array, jax.Array]:
        """Step 5, one client's part: (its weighted, clipped message, its weight, the message's norm before
        clipping). Summed over the cohort by ``map_clients``; nothing for a client that does not take part."""
        norm = optax.tree.norm(message)
        if self.clips:
            message = self.client_level.clip(message, norm, clip_norm)
        weight = self.client_weight(num_examples, participates)
        weighted = jax.tree_util.tree_map(lambda m: jnp.where(participates, weight * m, 0.0), message)
        return weighted, weight, norm

    def mean(self, weighted_sum: Params, weight_sum: jax.Array, clip_norm: jax.Array, key: jax.Array) -> Params:
        """Step 5, the server's part: the weighted mean of the messages; with DP-FedAvg the noisy sum over the
        expected cohort (``ClientLevelDpFedAvg.noisy_mean``)."""
        if self.clips:
            return self.client_level.noisy_mean(weighted_sum, clip_norm, key)
        denominator = jnp.maximum(weight_sum, 1e-12)
        return jax.tree_util.tree_map(lambda s: s / denominator, weighted_sum)

    def next_clip_norm(self, clip_norm: jax.Array, norms: jax.Array, weights: jax.Array, key: jax.Array) -> jax.Array:
        """The clip norm of the next round (adaptive clipping of DP-FedAvg; unchanged otherwise)."""
        if not self.clips:
            return clip_norm
        return self.client_level.next_clip_norm(clip_norm, norms, weights > 0, key)


def identity_message(delta: Params, settings: ClientSettings, key: jax.Array, values: jax.Array,
                     state: Any) -> tuple[Params, Any, dict[str, jax.Array]]:
    """Sends the ``values`` coordinates the server does not already know to be zero as float32."""
    del settings, key
    return delta, state, {"bits": 32.0 * values.astype(jnp.float32)}


def gather_clients(tree: Any, ids: jax.Array) -> Any:
    """Rows ``ids`` of every [C, ...] leaf: leaves [K, ...]."""
    return jax.tree_util.tree_map(lambda a: jnp.take(a, ids, axis=0), tree)


def scatter_clients(tree: Any, ids: jax.Array, keep: jax.Array, rows: Any) -> Any:
    """``tree`` (leaves [C, ...]) with row ``ids[k]`` set to ``rows[k]`` where ``keep[k]``; other rows unchanged
    (slots not kept are dropped, so padded or repeated ids of absent clients write nothing)."""
    num_clients = jax.tree_util.tree_leaves(tree)[0].shape[0] if jax.tree_util.tree_leaves(tree) else 0
    target = jnp.where(keep, ids, num_clients)
    return jax.tree_util.tree_map(lambda a, r: a.at[target].set(r.astype(a.dtype), mode="drop"), tree, rows)


def client_keys_base(round_key: jax.Array) -> jax.Array:
    return jax.random.fold_in(round_key, 0)


def scheduled_sparsity(prune_schedule: tuple[int, int] | None, round_index: jax.Array | int,
                       final_sparsity: jax.Array | float) -> jax.Array | float:
    """The pruning sparsity a client with ``final_sparsity`` trains with in round ``round_index`` (0-based):
    ramped from 0 at round ``begin`` to ``final_sparsity`` at round ``end`` of ``prune_schedule`` (Zhu & Gupta
    2017's cubic schedule, ``pruning.iterative_sparsity``), or ``final_sparsity`` throughout without one."""
    if prune_schedule is None:
        return final_sparsity
    begin, end = prune_schedule
    return pruning.iterative_sparsity(round_index, final_sparsity, begin, end)


def cohort_rows(state: ServerState, population: Population, settings: ClientSettings, ids: jax.Array,
                mask: jax.Array, prune_schedule: tuple[int, int] | None) -> dict[str, Any]:
    """Step 2 of a round: the cohort's settings rows (with the round's pruning sparsity) and data slices."""
    cohort_settings = gather_clients(settings, ids)
    if prune_schedule is not None:
        cohort_settings = cohort_settings._replace(prune_sparsity=jax.vmap(
            lambda s: scheduled_sparsity(prune_schedule, state.round, s))(cohort_settings.prune_sparsity))
    return {"id": ids, "offset": jnp.take(population.offsets, ids), "count": jnp.take(population.counts, ids),
            "settings": cohort_settings, "mask": mask, "client_state": gather_clients(state.client_state, ids)}


def client_message(spec: LocalSpec, apply_fn: ApplyFn, message_fn: MessageFn, algorithm: FederatedAlgorithm,
                   state: ServerState, population: Population, base_key: jax.Array, row: dict[str, Any],
                   message_input: Callable[[Params], Params] | None = None):
    """Steps 3-4 for one client: local training (with the algorithm's gradient correction), then the message
    transforms (of ``message_input(delta)`` where given: what a protocol sends instead of the update, e.g.
    CHOCO-gossip's change of the public model) and the algorithm's extra message. Returns (message as the client
    sends it, extra message, its new ``ClientStates`` row, transform stats, ClientOutput)."""
    client_key = jax.random.fold_in(base_key, row["id"])
    train_key, message_key = jax.random.split(client_key)
    kept: ClientStates = row["client_state"]
    correction = algorithm.correction(state.algorithm_state, kept.algorithm)
    # The client's examples: its slice of the population, or its own rows fetched for it (``row["data"]``).
    data_x, data_y, offset = ((*row["data"], jnp.zeros((), jnp.int32)) if "data" in row
                              else (population.x, population.y, row["offset"]))
    out = client_update(spec, apply_fn, state.params, data_x, data_y, offset, row["count"],
                        row["settings"], train_key, correction=correction)
    sent = out.delta if message_input is None else message_input(out.delta)
    message, message_state, stats = message_fn(sent, row["settings"], message_key, out.trained_coordinates,
                                               kept.message)
    extra, algorithm_state = algorithm.client_finish(out.delta, out.steps, row["settings"].lr,
                                                     state.algorithm_state, kept.algorithm)
    if algorithm.personal_update is not None:  # training the client keeps to itself (e.g. Ditto's model)
        personal_key = jax.random.fold_in(client_key, 2)

        def train(start: Params, prox: tuple[Params, jax.Array] | None = None) -> Any:
            return client_update(spec, apply_fn, start, data_x, data_y, offset, row["count"],
                                 row["settings"], personal_key, prox=prox)

        algorithm_state = algorithm.personal_update(train, state.params, state.algorithm_state, algorithm_state)
    extra_bits = 32.0 * sum(leaf.size for leaf in jax.tree_util.tree_leaves(extra))
    stats = {**stats, "bits": stats["bits"] + extra_bits}
    return message, extra, ClientStates(message_state, algorithm_state), stats, out


def build_round(apply_fn: ApplyFn, spec: LocalSpec, server_tx: optax.GradientTransformation,
                aggregation: AggregationSpec, *, message_fn: MessageFn = identity_message, chunk_size: int,
                strategy: str = "vmap", mesh: Mesh | None = None, prune_schedule: tuple[int, int] | None = None,
                algorithm: FederatedAlgorithm = FEDAVG, sharded_examples: int | None = None, tap_width: int = 0,
                shard_client_state: bool = False) -> Callable[..., tuple[ServerState, RoundOutput]]:
    """Builds ``round_fn(state, population, settings, ids, mask, root_key[, tap_slots]) -> (state, RoundOutput)``.

    ``settings`` holds the whole population's [C] arrays; ``ids``/``mask`` [K_max] are the cohort. For
    "vmap" and "loop" the returned function is jitted; for "host" it is a Python function around jitted
    pieces (``_host_round``). Shapes are fixed, so each piece compiles once per experiment.
    ``prune_schedule=(begin, end)`` ramps each client's pruning sparsity from 0 at round ``begin`` to its
    configured value at round ``end`` (Zhu & Gupta 2017). ``algorithm`` adds its client and server state
    (``server.algorithms``; FedAvg by default).

    ``sharded_examples=n_max`` (with a mesh, "vmap" or "loop"): the population's x and y are split over the mesh
    (``parallel.shard_rows``) and each chunk fetches its clients' examples, up to ``n_max`` per client, to
    the devices that train them (``parallel.gather_examples``): the same round, with O(examples / devices) of
    the population per device. ``shard_client_state`` (with a mesh): every client's state, ``state.client_state``
    [C', ...], comes in split over the mesh's clients axis (``parallel.shard_rows``) and goes out so, O(C / devices)
    rows per device, instead of replicated.

    ``tap_width=T > 0``: the round also emits what T observed cohort slots send (``RoundOutput.tapped``): pass
    ``tap_slots`` [K_max] int32, slot k's row in the output or -1; the messages come out of the same step that
    aggregates them (one-hot sums over the cohort, exact), so an observer sees what was sent, never a second
    training.
    """
    if sharded_examples is not None and (mesh is None or strategy == "host"):
        raise ValueError(f"examples split over devices need a mesh and strategy 'vmap' or 'loop' (got mesh={mesh}, "
                         f"strategy={strategy!r}).")

    def one_client(state: ServerState, population: Population, base_key: jax.Array, row: dict[str, Any]):
        message, extra, client_state, stats, out = client_message(spec, apply_fn, message_fn, algorithm, state,
                                                                  population, base_key, row)    # steps 3-4
        if bool(jax.tree_util.tree_leaves(extra)) != algorithm.extra_message:  # the capability check reads it
            raise ValueError(f"algorithm {algorithm.name!r} declares extra_message={algorithm.extra_message} but "
                             f"its client_finish sends {'an' if not algorithm.extra_message else 'no'} extra "
                             "message; allowed: extra_message=True exactly when it sends one.")
        if aggregation.clips:
            check_protects(algorithm, "client-level DP")
        participates = row["mask"] & (row["count"] > 0)
        weighted, weight, norm = aggregation.contribution(message, state.clip_norm, out.num_examples,
                                                          participates)                         # step 5
        extra = jax.tree_util.tree_map(lambda e: jnp.where(participates, e, 0.0), extra)
        kept = RoundOutput(loss=out.loss, steps=out.steps, bits=jnp.where(participates, stats["bits"], 0.0),
                           update_norm=norm, weight=weight,
                           diagnostics={k: v for k, v in stats.items() if k != "bits"})
        # Observed: the message in its row (a padding row, masked out, has none).
        tapped = () if not tap_width else SlotRows(jnp.where(row["mask"], row["tap_slot"], -1), message, tap_width)
        return ((weighted, weight, extra, participates.astype(jnp.float32), tapped),
                (kept, client_state, participates))

    def begin(state: ServerState, population: Population, settings: ClientSettings, ids: jax.Array,
              mask: jax.Array, root_key: jax.Array, tap_slots: jax.Array | None
              ) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
        round_key = jax.random.fold_in(root_key, state.round)
        base = client_keys_base(round_key)
        rows = cohort_rows(state, population, settings, ids, mask, prune_schedule)
        if tap_width:
            rows["tap_slot"] = tap_slots
        return round_key, base, rows

    def finish(state: ServerState, round_key: jax.Array, ids: jax.Array, sums: tuple[Params, jax.Array, Any, jax.Array],
               per_client: tuple[RoundOutput, ClientStates, jax.Array],
               num_clients: int) -> tuple[ServerState, RoundOutput]:
        weighted_sum, weight_sum, extra_sum, participants, tapped = sums
        kept, client_states, participates = per_client
        server_key = jax.random.fold_in(round_key, 1)
        noise_key, count_key = jax.random.split(server_key)
        mean_delta = aggregation.mean(weighted_sum, weight_sum, state.clip_norm, noise_key)          # step 5
        pseudo_grad = jax.tree_util.tree_map(jnp.negative, mean_delta)                                 # step 6
        updates, opt_state = server_tx.update(pseudo_grad, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        clip_norm = aggregation.next_clip_norm(state.clip_norm, kept.update_norm, kept.weight, count_key)
        algorithm_state = algorithm.server_finish(state.algorithm_state, extra_sum, participants, num_clients)
        client_state = scatter_clients(state.client_state, ids, participates, client_states)        # step 4's state
        new_state = ServerState(params, opt_state, state.round + 1, clip_norm, client_state, algorithm_state)
        kept = kept._replace(tapped=tapped)
        if mesh is not None:  # every process reads the whole state (but split client states) and per-client outputs
            split = new_state.client_state if shard_client_state else None
            if split is not None:
                new_state = new_state._replace(client_state=())
            new_state, kept = jax.lax.with_sharding_constraint((new_state, kept), NamedSharding(mesh, P()))
            if split is not None:
                new_state = new_state._replace(client_state=jax.lax.with_sharding_constraint(
                    split, NamedSharding(mesh, P(CLIENT_AXIS))))
        return new_state, kept

    if strategy == "host":
        return _host_round(begin, finish, one_client, mesh, tap_width)

    def round_fn(state: ServerState, population: Population, settings: ClientSettings, ids: jax.Array,
                 mask: jax.Array, root_key: jax.Array, tap_slots: jax.Array | None = None
                 ) -> tuple[ServerState, RoundOutput]:
        _check_tap_slots(tap_width, tap_slots)
        round_key, base, rows = begin(state, population, settings, ids, mask, root_key, tap_slots)
        prepare = None if sharded_examples is None else (lambda chunk: {**chunk, "data": gather_examples(
            (population.x, population.y), chunk["offset"], chunk["count"], sharded_examples, mesh)})
        # What every client reads, passed in (replicated over the mesh): the clients' states travel in their rows,
        # and examples split over the devices reach a chunk through ``prepare``.
        shared = (state._replace(client_state=()),
                  population if sharded_examples is None else population._replace(x=None, y=None), base)
        sums, per_client = map_clients(lambda shared, row: one_client(*shared, row), rows, chunk_size=chunk_size,
                                       strategy=strategy, mesh=mesh, prepare=prepare, shared=shared)
        return finish(state, round_key, ids, sums, per_client, population.counts.shape[0])

    return jax.jit(round_fn, donate_argnums=(0,))


def _check_tap_slots(tap_width: int, tap_slots: jax.Array | None) -> None:
    if (tap_slots is not None) != bool(tap_width):
        raise ValueError(f"tap_slots {'must' if tap_width else 'cannot'} be given to a round built with "
                         f"tap_width={tap_width}.")


def _host_round(begin: Callable, finish: Callable, one_client: Callable, mesh: Mesh | None,
                tap_width: int) -> Callable:
    """The "host" strategy: compiled cohort preparation, then from Python one compiled call per client on each
    device of the mesh at once (``map_clients_host``), then compiled aggregation and server step. Same keys
    and results as the compiled strategies."""
    begin, finish = jax.jit(begin), jax.jit(finish, donate_argnums=(0,), static_argnums=(5,))

    def host_client(shared: tuple[ServerState, Population, jax.Array], row: dict[str, Any]):
        return one_client(*shared, row)

    def round_fn(state: ServerState, population: Population, settings: ClientSettings, ids: jax.Array,
                 mask: jax.Array, root_key: jax.Array, tap_slots: jax.Array | None = None
                 ) -> tuple[ServerState, RoundOutput]:
        _check_tap_slots(tap_width, tap_slots)
        round_key, base, rows = begin(state, population, settings, ids, mask, root_key, tap_slots)
        sums, per_client = map_clients_host(host_client, (state, population, base), rows, chunk_size=1, mesh=mesh)
        return finish(state, round_key, ids, sums, per_client, population.counts.shape[0])

    return round_fn


def build_message_tap(apply_fn: ApplyFn, spec: LocalSpec, *, message_fn: MessageFn = identity_message,
                      prune_schedule: tuple[int, int] | None = None,
                      algorithm: FederatedAlgorithm = FEDAVG) -> Callable[..., Params]:
    """Builds ``tap(state, population, settings, ids, root_key) -> messages`` (leaves [T, ...]).

    The messages the clients ``ids`` send in round ``state.round``, recomputed with the round's keys and their
    transform states, so they equal what those clients send inside the round (an eavesdropper's or the
    server's view, before any server-side clipping; an algorithm's extra message, such as SCAFFOLD's
    control-variate change, is not included). Clients run one at a time (memory O(params) per target).
    """

    def tap(state: ServerState, population: Population, settings: ClientSettings, ids: jax.Array,
            root_key: jax.Array) -> Params:
        base = client_keys_base(jax.random.fold_in(root_key, state.round))
        rows = cohort_rows(state, population, settings, ids, jnp.ones(ids.shape, bool), prune_schedule)
        return jax.lax.map(lambda row: client_message(spec, apply_fn, message_fn, algorithm, state, population, base,
                                                      row)[0], rows)

    return jax.jit(tap)


def init_server_state(params: Params, server_tx: optax.GradientTransformation,
                      clip_norm: float = math.inf, client_state: ClientStates = ClientStates(),
                      algorithm_state: Any = ()) -> ServerState:
    """A fresh server state holding copies of ``params``, ``client_state`` (leaves [C, ...], see
    ``initial_client_states``) and ``algorithm_state``; the round function donates its state."""
    params, client_state, algorithm_state = jax.tree_util.tree_map(jnp.array, (params, client_state, algorithm_state))
    return ServerState(params=params, opt_state=server_tx.init(params), round=jnp.zeros((), jnp.int32),
                       clip_norm=jnp.float32(clip_norm), client_state=client_state, algorithm_state=algorithm_state)


def initial_client_states(message_transform: Any, algorithm: FederatedAlgorithm, params: Params,
                          num_clients: int) -> ClientStates:
    """Every client's initial ``ClientStates``: the message transform's and the algorithm's one-client states
    with a leading [C] axis on each leaf (``()`` where nothing is kept, which costs nothing)."""
    def for_every_client(one: Any) -> Any:
        return jax.tree_util.tree_map(
            lambda leaf: jnp.broadcast_to(jnp.asarray(leaf), (num_clients, *jnp.shape(leaf))), one)

    message = () if message_transform is None else message_transform.init(params)
    return ClientStates(for_every_client(message), for_every_client(algorithm.client_init(params)))
