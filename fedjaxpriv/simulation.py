"""One federated round as a single compiled function.

Data flow (each numbered step is one piece of code):
  1 sample     cohort ids and mask (host, ``server.sampling``)
  2 gather     the cohort's rows of the per-client settings and data offsets
  3 train      ``client_update`` for every client, through ``map_clients`` (vmap / loop, chunks, mesh)
  4 transform  the message each client sends (``message_fn``: prune, quantize, clip, local noise)
  5 aggregate  weighted sum streamed over chunks; client-level DP clips and adds central Gaussian noise
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
from jax.sharding import Mesh

from fedjaxpriv.client.local import ApplyFn, LocalSpec, client_update
from fedjaxpriv.client.settings import ClientSettings
from fedjaxpriv.parallel import map_clients

Params = Any
# (delta, settings row, key) -> (message, stats dict of float32 scalars, must include "bits").
MessageFn = Callable[[Params, ClientSettings, jax.Array], tuple[Params, dict[str, jax.Array]]]


class ServerState(NamedTuple):
    """Global model and server optimizer state; ``round`` is the number of finished rounds (int32)."""

    params: Params
    opt_state: Any
    round: jax.Array


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
      update_norm: L2 norm of the message.
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
      weighting: "examples" or "uniform".
      central_clip_norm: client-level clip before summing (inf = none).
      central_noise_multiplier: Gaussian noise std / clip norm added to the sum (DP-FedAvg).
      expected_cohort: fixed denominator used with central noise (expected number of participants).
    """

    weighting: str = "examples"
    central_clip_norm: float = math.inf
    central_noise_multiplier: float = 0.0
    expected_cohort: float = 1.0


def identity_message(delta: Params, settings: ClientSettings, key: jax.Array) -> tuple[Params, dict[str, jax.Array]]:
    """Sends the delta as float32: 32 bits per coordinate."""
    del settings, key
    size = sum(leaf.size for leaf in jax.tree_util.tree_leaves(delta))
    return delta, {"bits": jnp.float32(32 * size)}


def tree_norm(tree: Params) -> jax.Array:
    return optax.tree.norm(tree)


def clip_tree(tree: Params, clip_norm: jax.Array) -> Params:
    """Scales the tree to global L2 norm at most ``clip_norm`` (inf leaves it unchanged)."""
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(tree_norm(tree), 1e-12))
    return jax.tree_util.tree_map(lambda a: a * scale, tree)


def client_keys_base(round_key: jax.Array) -> jax.Array:
    return jax.random.fold_in(round_key, 0)


def build_round(apply_fn: ApplyFn, spec: LocalSpec, server_tx: optax.GradientTransformation,
                aggregation: AggregationSpec, *, message_fn: MessageFn = identity_message, chunk_size: int,
                strategy: str = "vmap", mesh: Mesh | None = None) -> Callable[..., tuple[ServerState, RoundOutput]]:
    """Builds ``round_fn(state, population, settings, ids, mask, root_key) -> (state, RoundOutput)``.

    ``settings`` holds the whole population's [C] arrays; ``ids``/``mask`` [K_max] are the cohort. The
    returned function is jitted; its shapes are fixed, so it compiles once per experiment.
    """
    central_dp = aggregation.central_noise_multiplier > 0 or math.isfinite(aggregation.central_clip_norm)

    def one_client(server_params: Params, population: Population, base_key: jax.Array, row: dict[str, Any]):
        client_key = jax.random.fold_in(base_key, row["id"])
        train_key, message_key = jax.random.split(client_key)
        out = client_update(spec, apply_fn, server_params, population.x, population.y, row["offset"],
                            row["count"], row["settings"], train_key)
        message, stats = message_fn(out.delta, row["settings"], message_key)
        if central_dp:
            message = clip_tree(message, jnp.float32(aggregation.central_clip_norm))
        participates = row["mask"] & (row["count"] > 0)
        if aggregation.weighting == "examples" and not central_dp:
            weight = jnp.where(participates, out.num_examples, 0.0)
        else:
            weight = jnp.where(participates, 1.0, 0.0)
        weighted = jax.tree_util.tree_map(lambda m: jnp.where(participates, weight * m, 0.0), message)
        kept = RoundOutput(loss=out.loss, steps=out.steps, bits=jnp.where(participates, stats["bits"], 0.0),
                           update_norm=tree_norm(message), weight=weight)
        return (weighted, weight), kept

    def round_fn(state: ServerState, population: Population, settings: ClientSettings, ids: jax.Array,
                 mask: jax.Array, root_key: jax.Array) -> tuple[ServerState, RoundOutput]:
        round_key = jax.random.fold_in(root_key, state.round)
        base = client_keys_base(round_key)
        rows = {
            "id": ids,
            "offset": jnp.take(population.offsets, ids),
            "count": jnp.take(population.counts, ids),
            "settings": jax.tree_util.tree_map(lambda a: jnp.take(a, ids, axis=0), settings),
            "mask": mask,
        }
        (weighted_sum, weight_sum), kept = map_clients(
            lambda row: one_client(state.params, population, base, row), rows, chunk_size=chunk_size,
            strategy=strategy, mesh=mesh)
        if central_dp:
            noise_key = jax.random.fold_in(round_key, 1)
            std = aggregation.central_noise_multiplier * aggregation.central_clip_norm
            leaves, treedef = jax.tree_util.tree_flatten(weighted_sum)
            keys = jax.random.split(noise_key, len(leaves))
            noisy = [leaf + std * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
            weighted_sum = jax.tree_util.tree_unflatten(treedef, noisy)
            denominator = jnp.float32(aggregation.expected_cohort)
        else:
            denominator = jnp.maximum(weight_sum, 1e-12)
        mean_delta = jax.tree_util.tree_map(lambda s: s / denominator, weighted_sum)
        pseudo_grad = jax.tree_util.tree_map(jnp.negative, mean_delta)
        updates, opt_state = server_tx.update(pseudo_grad, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return ServerState(params, opt_state, state.round + 1), kept

    return jax.jit(round_fn, donate_argnums=(0,))


def init_server_state(params: Params, server_tx: optax.GradientTransformation) -> ServerState:
    """A fresh server state holding a copy of ``params`` (the round function donates its state)."""
    params = jax.tree_util.tree_map(jnp.array, params)
    return ServerState(params=params, opt_state=server_tx.init(params), round=jnp.zeros((), jnp.int32))
