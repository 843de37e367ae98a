"""The round program: every part one federated round is built from, as one value that runs, replays and answers
questions about the round.

``Experiment`` builds a ``RoundProgram`` once from its config (model, local-training spec, server optimizer,
aggregation, algorithm, message transform, pruning schedule, execution plan) and runs its ``round_fn``. The
attacks take the same value instead of the experiment's fields: a shadow federation replays it on other data
(``replace(spec=...)``), a canary audit replays what a client sends (``tap_fn``) from a state it makes with
``init_state``, and a gradient-inversion attacker asks it what the server can know of a client's local training
(``scheduled_sparsity``, ``server_known_mask``, ``trains_by_full_batch_gd``): the code that trains answers, not
a second model of it in the attack.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from fedjaxpriv.client.local import ApplyFn, LocalSpec, training_mask
from fedjaxpriv.server.algorithms import FEDAVG, FederatedAlgorithm, corrects_gradients
from fedjaxpriv.server import Cohort
from fedjaxpriv.parallel import replicate, shard_rows
from fedjaxpriv.simulation import (AggregationSpec, Population, RoundOutput, ServerState, build_message_tap,
                                   build_round, identity_message, init_server_state, initial_client_states,
                                   scheduled_sparsity)
from fedjaxpriv.transforms.pipeline import make_message_fn

Params = Any


@dataclasses.dataclass(frozen=True, eq=False)
class RoundProgram:
    """One federated round as built for a run.

    Attributes:
      apply_fn: the model's ``apply(params, x) -> logits``.
      spec: the static local-training spec (``client.local.LocalSpec``).
      server_tx: the server optimizer.
      aggregation: how messages are weighted, clipped and noised into the mean (``simulation.AggregationSpec``).
      algorithm: the federated algorithm (``server.algorithms``).
      message_transform: what each client applies to its update before sending it (``transforms``; None: the
        update as it is).
      prune_schedule: ``(begin, end)`` rounds over which pruning ramps to each client's sparsity (None: from the
        first round).
      chunk_size / strategy / mesh: the execution plan (``parallel.execution_plan``).
      sharded_examples: with a mesh, the largest client's example count when the examples are split over the
        devices (``run.shard_data``; None: replicated). Client state is then split over the devices too.
    """

    apply_fn: ApplyFn
    spec: LocalSpec
    server_tx: optax.GradientTransformation
    aggregation: AggregationSpec
    algorithm: FederatedAlgorithm = FEDAVG
    message_transform: Any = None
    prune_schedule: tuple[int, int] | None = None
    chunk_size: int = 1
    strategy: str = "vmap"
    mesh: Mesh | None = None
    sharded_examples: int | None = None

    def replace(self, **changes: Any) -> RoundProgram:
        """This program with some parts changed (e.g. ``spec`` for other data, ``mesh=None`` for one device)."""
        return dataclasses.replace(self, **changes)

    @functools.cached_property
    def message_fn(self) -> Callable[..., Any]:
        """``(delta, settings_row, key, values, state) -> (message, state, stats)`` of ``message_transform``."""
        return identity_message if self.message_transform is None else make_message_fn(self.message_transform)

    def round_fn(self, tap_width: int = 0) -> Callable[..., tuple[ServerState, Any]]:
        """The compiled round ``(state, population, settings, ids, mask, root_key[, tap_slots]) -> (state,
        RoundOutput)`` (``simulation.build_round``); ``tap_width > 0`` also emits what that many cohort slots
        send."""
        return build_round(self.apply_fn, self.spec, self.server_tx, self.aggregation, message_fn=self.message_fn,
                           chunk_size=self.chunk_size, strategy=self.strategy, mesh=self.mesh,
                           prune_schedule=self.prune_schedule, algorithm=self.algorithm,
                           sharded_examples=self.sharded_examples, tap_width=tap_width,
                           shard_client_state=self.sharded_examples is not None)

    @functools.cached_property
    def _compiled_rounds(self) -> dict[int, Callable[..., tuple[ServerState, Any]]]:
        return {}

    def compiled_round(self, tap_width: int = 0) -> Callable[..., tuple[ServerState, Any]]:
        """``round_fn(tap_width)``, built once per program and tap width (every round then reuses its compiled
        program)."""
        if tap_width not in self._compiled_rounds:
            self._compiled_rounds[tap_width] = self.round_fn(tap_width)
        return self._compiled_rounds[tap_width]

    def observe(self, state: ServerState, population: Population, settings: Any, cohort: Cohort,
                root_key: jax.Array, tapped: Sequence[int] = (),
                tap_width: int = 0) -> tuple[ServerState, RoundOutput, Tap | None]:
        """One round from ``state`` (donated) for ``cohort``, and what an observer sees of the clients ``tapped``
        (at most ``tap_width`` distinct clients of the cohort): their messages as this same compiled step
        computed and aggregated them, and the global model they started from (a ``Tap``; None without
        ``tapped``). ``population`` and ``settings`` as placed on the devices; the output on the host."""
        slots, server_params = None, None
        if len(tapped):
            slots = tap_slots(cohort, tapped, tap_width)
            server_params = jax.tree_util.tree_map(np.asarray, state.params)  # before the round donates them
        arguments = (state, population, settings, jnp.asarray(cohort.ids), jnp.asarray(cohort.mask), root_key)
        state, out = (self.compiled_round()(*arguments) if slots is None
                      else self.compiled_round(tap_width)(*arguments, jnp.asarray(slots)))
        out = jax.tree_util.tree_map(np.asarray, out)
        tap = None if slots is None else Tap(
            round=int(state.round), client_ids=np.asarray(tapped, np.int32), server_params=server_params,
            messages=jax.tree_util.tree_map(lambda leaf: leaf[:len(tapped)], out.tapped))
        return state, out, tap

    @functools.cached_property
    def tap_fn(self) -> Callable[..., Params]:
        """``(state, population, settings, ids, root_key) -> messages`` [T, ...]: what clients ``ids`` send in the
        round that starts from ``state``, trained again one at a time (``simulation.build_message_tap``)."""
        return build_message_tap(self.apply_fn, self.spec, message_fn=self.message_fn,
                                 prune_schedule=self.prune_schedule, algorithm=self.algorithm)

    def init_state(self, params: Params, num_clients: int, round_index: int = 0) -> ServerState:
        """A server state at the start of round ``round_index`` (0-based) with global model ``params``, its
        optimizer and algorithm state fresh and every one of ``num_clients`` clients' states initial."""
        client_state = initial_client_states(self.message_transform, self.algorithm, params, num_clients)
        state = init_server_state(params, self.server_tx, self.algorithm.clip_norm, client_state,
                                  self.algorithm.server_init(params))
        return state._replace(round=state.round + np.int32(round_index))

    # -- the data and state on the devices ----------------------------------------------------------------------
    def place_population(self, population: Any) -> Population:
        """``population`` (``FederatedData``) on the mesh as the round reads it: a copy per device, or its example
        rows split over the devices with ``sharded_examples`` (offsets and counts always copied)."""
        index = (jnp.asarray(population.offsets), jnp.asarray(population.counts))
        if self.sharded_examples is None:
            return replicate(Population(jnp.asarray(population.x), jnp.asarray(population.y), *index), self.mesh)
        return Population(*shard_rows((population.x, population.y), self.mesh), *replicate(index, self.mesh))

    def place_settings(self, settings: Any) -> Any:
        """Every client's settings [C] on the mesh as the round reads them: a copy per device, or split over the
        devices with ``sharded_examples``, as the clients' states are (the padding rows are never read)."""
        if self.sharded_examples is None:
            return replicate(jax.tree_util.tree_map(jnp.asarray, settings), self.mesh)
        return shard_rows(settings, self.mesh)

    def place_state(self, state: ServerState) -> ServerState:
        """``state`` on the mesh as the round returns it, so every round reuses one compiled program: a copy per
        device, every client's state split over the devices with ``sharded_examples``."""
        if self.sharded_examples is None:
            return replicate(state, self.mesh)
        return replicate(state._replace(client_state=()), self.mesh)._replace(
            client_state=shard_rows(state.client_state, self.mesh))

    def replay_tap(self, state: ServerState, population: Population, settings: Any, client_ids: Sequence[int],
                   num_clients: int, root_key: jax.Array, width: int = 0) -> Tap:
        """What ``client_ids`` would send in the round that starts from ``state`` (the round's own keys from
        ``root_key``), trained again (``tap_fn``): for replays and probes; a run's own taps come out of its rounds.
        ``population`` and ``settings`` as placed on the devices; ``width``: the ids are padded to at least this
        many, so that taps of different sizes reuse one compiled program."""
        ids = np.asarray(client_ids, np.int32)
        if ids.ndim != 1 or ids.size == 0 or ids.min() < 0 or ids.max() >= num_clients:
            raise ValueError(f"client_ids={client_ids!r} must be a non-empty list of ids in [0, {num_clients}).")
        padded = np.concatenate([ids, np.full(max(ids.size, width) - ids.size, ids[-1], np.int32)])
        messages = self.tap_fn(state, population, settings, jnp.asarray(padded), root_key)
        return Tap(round=int(state.round) + 1, client_ids=ids,
                   server_params=jax.tree_util.tree_map(np.asarray, state.params),
                   messages=jax.tree_util.tree_map(lambda leaf: np.asarray(leaf[:ids.size]), messages))

    # -- what the server can know of a client's local training ------------------------------------------------
    def scheduled_sparsity(self, final_sparsity: float, round_number: int) -> float:
        """The pruning sparsity a client with ``final_sparsity`` trains with in round ``round_number`` (1-based),
        by the same schedule as the round's (``simulation.scheduled_sparsity``)."""
        return float(scheduled_sparsity(self.prune_schedule, round_number - 1, final_sparsity))

    def server_known_mask(self, server_params: Params, settings_row: Any, round_number: int) -> Params | None:
        """The weight mask local training applies in round ``round_number`` (1-based) to a client with settings
        ``settings_row``, where the server can compute it: magnitude pruning's mask of the global model
        (``client.local.training_mask``, the code local training runs). None: no pruning this round, or a
        random mask (drawn from the client's own key)."""
        sparsity = self.scheduled_sparsity(float(settings_row.prune_sparsity), round_number)
        if self.spec.prune != "magnitude" or sparsity <= 0:
            return None
        row = jax.tree_util.tree_map(np.asarray, settings_row)._replace(prune_sparsity=np.float32(sparsity))
        mask = training_mask(self.spec, server_params, row, jax.random.key(0))
        return jax.tree_util.tree_map(np.asarray, mask)

    def trains_by_full_batch_gd(self, settings_row: Any, count: int, params: Params) -> bool:
        """Whether a client's local training (settings ``settings_row``, ``count`` examples) is exactly
        ``local_steps`` steps of full-batch gradient descent on its examples at rate ``lr`` with the program's
        momentum (``spec.momentum``): every step sees all of them without sampling noise (no Poisson sampling,
        batch >= count), nothing is mixed, clipped or noised per example, and no proximal term or gradient
        correction changes the step."""
        row = settings_row
        return bool(not row.poisson and int(row.batch_size) >= count and float(row.mixup_alpha) == 0
                    and float(row.dp_noise_multiplier) == 0 and not math.isfinite(float(row.dp_clip_norm))
                    and (float(row.prox_mu) == 0 or not self.spec.prox)
                    and not corrects_gradients(self.algorithm, params))


def client_rows(state: Any, num_clients: int) -> Any:
    """``state`` with one row per client (``state.client_state``'s leaves [C, ...], without the rows that padding to
    the devices added: ``RoundProgram.place_state`` undone), the shapes of ``init_state``: what a checkpoint holds,
    so that a run resumes on any number of devices, its clients' data split or copied."""
    rows = jax.tree_util.tree_map(lambda leaf: leaf[:num_clients], state.client_state)
    return state._replace(client_state=rows)


def prune_schedule_of(begin_round: int, end_round: int) -> tuple[int, int] | None:
    """``client.prune_begin_round`` / ``prune_end_round`` as a program's ``prune_schedule`` (None: no ramp)."""
    return (begin_round, end_round) if end_round > begin_round else None


@dataclasses.dataclass
class Tap:
    """What an observer of round ``round`` (1-based) sees of the tapped clients that take part in it.

    Attributes:
      round: the round number.
      client_ids: [T] the tapped clients that were in the round's cohort (a client that does not take part
        sends nothing, so it is never tapped).
      server_params: the global model the clients start the round from (None in a decentralized run, where
        every node starts from its own model: ``start_params``).
      messages: pytree of the clients' messages, leaves [T, ...] (as sent, before server-side clipping); in a
        decentralized run, the model a node sent its neighbours minus ``start_params`` (CHOCO gossip: the
        compressed change of its public model the node sent).
      start_params: decentralized runs: leaves [T, ...], the model each tapped node started the round from as its
        curious neighbour (``observers``) can compute it from what it has heard (``decentralized.observer_view``;
        CHOCO gossip: the node's public model).
      start_exact: decentralized runs: [T] bool, whether that start is exactly the node's (else an estimate).
      observers: decentralized runs: [T] int, the node that observes each tapped node.
    """

    round: int
    client_ids: np.ndarray
    server_params: Any
    messages: Any
    start_params: Any = None
    start_exact: np.ndarray | None = None
    observers: np.ndarray | None = None

    def start_of(self, position: int) -> Any:
        """The model the client at ``position`` started the round from, as the observer knows it."""
        if self.start_params is None:
            return self.server_params
        return jax.tree_util.tree_map(lambda leaf: leaf[position], self.start_params)


def tap_slots(cohort: Cohort, tapped: Sequence[int], width: int) -> np.ndarray:
    """[K_max] int32: for each cohort slot, the row of its client in ``tapped`` (-1: not tapped), for a round
    built with ``round_fn(width)``.

    Raises:
      ValueError: ``tapped`` is not 1 to ``width`` distinct clients of the cohort.
    """
    ids = [int(c) for c in tapped]
    in_cohort = set(np.asarray(cohort.ids)[np.asarray(cohort.mask)].tolist())
    if not 0 < len(ids) <= width or len(set(ids)) != len(ids) or not set(ids) <= in_cohort:
        raise ValueError(f"tapped={ids} must be at most run.tap_clients' {width} distinct clients of the round's "
                         "cohort.")
    row = {c: i for i, c in enumerate(ids)}
    slots = np.full(len(cohort.ids), -1, np.int32)
    for k, (client, present) in enumerate(zip(np.asarray(cohort.ids), np.asarray(cohort.mask))):
        if present and int(client) in row:
            slots[k] = row.pop(int(client))  # a client in two slots (Poisson padding) is tapped once
    return slots


def round_record(out: RoundOutput, cohort: Cohort, round_index: int, clip_norm: float,
                 seconds: float) -> dict[str, Any]:
    """The training record of round ``round_index`` (0-based) from its output (host arrays [K_max]): means over
    the clients that took part (in the cohort, with a positive weight) and the wire totals in bytes."""
    real = cohort.mask & (out.weight > 0)
    n = max(int(real.sum()), 1)

    def total(per_client: np.ndarray) -> float:
        return float(np.sum(np.where(real, per_client, 0.0)))

    return {
        "round": round_index + 1,
        "participants": int(real.sum()),
        "train_loss": total(out.loss) / n,
        "local_steps_mean": total(out.steps) / n,
        "update_norm_mean": total(out.update_norm) / n,
        "bytes_per_client": total(out.bits) / n / 8.0,
        "bytes_total": total(out.bits) / 8.0,
        "cohort_dropped": cohort.dropped,
        "clip_norm": clip_norm,
        "round_time_s": seconds,
        **{f"message/{name}": total(value) / n for name, value in out.diagnostics.items()},
    }
