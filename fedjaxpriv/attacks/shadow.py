"""Shadow models for LiRA and RMIA, trained in parallel by the vectorized engine: central shadows
(``train_shadows``) and shadow federations that replay the target's federated training
(``train_shadow_federations``).

Each shadow is treated as a client whose data is its own random half of a candidate pool: the pool becomes
a ``FederatedData`` whose client ``s`` holds shadow ``s``'s subset, every shadow starts from its own fresh
initialisation, and ``client.local.client_update`` (many local SGD steps) trains all of them in one compiled
call through ``parallel.map_clients``. Shadow ``s`` depends only on (key, s), not on the chunking.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv.client.local import LocalSpec, client_update
from fedjaxpriv.client.settings import ClientSettings, make_settings
from fedjaxpriv.data.federated import Dataset, FederatedData, from_partition
from fedjaxpriv.models import Model
from fedjaxpriv.parallel import map_clients

Params = Any


class ShadowModels(NamedTuple):
    """Trained shadows.

    Attributes:
      params: pytree with leaves [S, ...], one model per shadow.
      inclusion: [S, N] bool, True where shadow s trained on pool example n.
      train_loss: [S] mean training loss over the local steps.
    """

    params: Params
    inclusion: np.ndarray
    train_loss: np.ndarray


def balanced_inclusion(key: jax.Array, num_shadows: int, num_examples: int) -> np.ndarray:
    """[S, N] bool: each shadow holds a uniformly random half of the examples, independently of the others
    (Carlini et al. 2022's design; for odd N the halves alternate between floor and ceil of N / 2).

    Every shadow trains on as many examples as the target (which holds half the pool), and the shadows'
    memberships of an example are independent coin flips: an example's count of "in" shadows is binomial, not
    fixed. A fixed count (every example in exactly S/2 shadows) biases leave-one-out pooling below chance:
    when the attacked model holds the example its references hold it one time fewer, so the "in" mean is
    estimated from fewer models exactly when the example is a member. With few shadows some examples have no
    "in" or no "out" reference; their scores are NaN and ``membership.finite_scores`` drops and counts them
    (independently of membership, since the references' coins are independent of the attacked model's).
    """
    if num_shadows < 2:
        raise ValueError(f"num_shadows={num_shadows} must be >= 2 (each example needs in and out shadows).")
    if num_examples < 2:
        raise ValueError(f"num_examples={num_examples} must be >= 2 (each shadow holds a half of them).")
    ranks = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, num_examples))(
        jax.random.split(key, num_shadows)))           # [S, N]
    half = num_examples // 2 + (np.arange(num_shadows) % 2) * (num_examples % 2)
    return ranks < half[:, None]


def shadow_population(pool: Dataset, inclusion: np.ndarray) -> FederatedData:
    """The pool as a population whose client s holds the examples shadow s trains on."""
    inclusion = np.asarray(inclusion, bool)
    if inclusion.ndim != 2 or inclusion.shape[1] != len(pool):
        raise ValueError(f"inclusion shape {inclusion.shape} must be [S, N={len(pool)}].")
    return from_partition(pool, [np.nonzero(row)[0] for row in inclusion])


def shadow_spec(population: FederatedData, num_classes: int, steps: int, batch_size: int,
                momentum: float = 0.0) -> LocalSpec:
    """The static local-training spec of a shadow population (plain SGD, fixed-size batches)."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be >= 1.")
    max_count = max(1, population.max_count)
    return LocalSpec(max_steps=steps, max_batch=min(batch_size, max_count), max_count=max_count,
                     num_classes=num_classes, momentum=momentum)


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("chunk_size", "strategy"))
def _train(spec: LocalSpec, apply_fn: Any, init_params: Params, x: jax.Array, y: jax.Array,
           offsets: jax.Array, counts: jax.Array, settings: ClientSettings, keys: jax.Array, *,
           chunk_size: int, strategy: str) -> tuple[Params, jax.Array]:
    def one(row: tuple) -> tuple[jax.Array, tuple[Params, jax.Array]]:
        params, offset, count, setting, key = row
        out = client_update(spec, apply_fn, params, x, y, offset, count, setting, key)
        trained = jax.tree_util.tree_map(jnp.add, params, out.delta)
        return jnp.zeros((), jnp.float32), (trained, out.loss)

    _, (params, loss) = map_clients(one, (init_params, offsets, counts, settings, keys), chunk_size=chunk_size,
                                    strategy=strategy)
    return params, loss


def train_models(model: Model, population: FederatedData, spec: LocalSpec, key: jax.Array, *, lr: float,
                 batch_size: int, shadow_ids: np.ndarray | None = None, chunk_size: int = 0,
                 strategy: str = "vmap") -> tuple[Params, jax.Array]:
    """Trains one fresh model per selected client of ``population`` in one compiled call.

    Model ``s`` is initialised with ``fold_in(key, 2 s)``, trained with ``fold_in(key, 2 s + 1)`` on
    client ``s``'s examples, so it depends only on (key, s): a Python loop over single ids reproduces the
    vectorized call (and reuses one compiled program, since the shapes do not change).

    Args:
      model: the architecture.
      population: client s holds shadow s's training examples.
      spec: static local-training spec (``shadow_spec``).
      key: PRNG key.
      lr: SGD learning rate.
      batch_size: examples per step.
      shadow_ids: [S'] clients to train (default all).
      chunk_size: models per vectorized chunk (0 = all selected at once).
      strategy: "vmap" or "loop" (see ``parallel.map_clients``).

    Returns:
      (params with leaves [S', ...], mean training loss [S']).
    """
    ids = np.arange(population.num_clients) if shadow_ids is None else np.asarray(shadow_ids)
    if ids.ndim != 1 or ids.size == 0 or ids.min() < 0 or ids.max() >= population.num_clients:
        raise ValueError(f"shadow_ids={shadow_ids!r} must be a non-empty list of ids in "
                         f"[0, {population.num_clients}).")
    init_keys = jax.vmap(lambda i: jax.random.fold_in(key, 2 * i))(jnp.asarray(ids))
    train_keys = jax.vmap(lambda i: jax.random.fold_in(key, 2 * i + 1))(jnp.asarray(ids))
    init_params = jax.vmap(model.init)(init_keys)
    counts = population.counts[ids]
    settings = make_settings(ids.size, counts, local_steps=spec.max_steps, batch_size=batch_size, lr=lr)
    settings = jax.tree_util.tree_map(jnp.asarray, settings)
    return _train(spec, model.apply, init_params, jnp.asarray(population.x), jnp.asarray(population.y),
                  jnp.asarray(population.offsets[ids]), jnp.asarray(counts), settings, train_keys,
                  chunk_size=chunk_size or int(ids.size), strategy=strategy)


def train_shadows(model: Model, pool: Dataset, num_shadows: int, key: jax.Array, *, steps: int,
                  batch_size: int, lr: float, momentum: float = 0.0, chunk_size: int = 0,
                  strategy: str = "vmap") -> ShadowModels:
    """Trains ``num_shadows`` shadow models, each on a random half of ``pool``, in one vectorized call.

    Args:
      model: the architecture of the target.
      pool: the candidate examples ``Dataset(x [N, ...], y [N])``.
      num_shadows: S (16-64 typical).
      key: PRNG key for the halves, the initialisations and the batches.
      steps: local SGD steps per shadow (match the target's total training).
      batch_size: examples per step.
      lr: SGD learning rate.
      momentum: SGD momentum.
      chunk_size: shadows per vectorized chunk (0 = all at once).
      strategy: "vmap" or "loop" (inside the compiled call, see ``parallel.map_clients``).
    """
    inclusion = balanced_inclusion(jax.random.fold_in(key, 0), num_shadows, len(pool))
    population = shadow_population(pool, inclusion)
    spec = shadow_spec(population, model.num_classes, steps, batch_size, momentum)
    params, loss = train_models(model, population, spec, jax.random.fold_in(key, 1), lr=lr, batch_size=batch_size,
                                chunk_size=chunk_size, strategy=strategy)
    return ShadowModels(params, inclusion, np.asarray(loss))


# -- shadow federations: the target's federated training replayed on shadow populations --------------------


class ShadowFederations(NamedTuple):
    """Final global models of shadow federations.

    Attributes:
      params: pytree with leaves [S, ...], the final global model of each shadow federation.
      inclusion: [S, N] bool, True where shadow federation s trained on pool example n.
    """

    params: Params
    inclusion: np.ndarray


def _join_populations(populations: list[FederatedData]) -> tuple[np.ndarray, ...]:
    """All federations' examples in one flat array (shared, not batched: no batched gathers under vmap), and each
    federation's client offsets into it and counts, [S, C]."""
    starts = np.cumsum([0] + [p.num_examples for p in populations[:-1]])
    return (np.concatenate([p.x for p in populations]), np.concatenate([p.y for p in populations]),
            np.stack([p.offsets + start for p, start in zip(populations, starts)]).astype(np.int32),
            np.stack([p.counts for p in populations]))


def train_shadow_federations(experiment: Any, pool: Dataset, num_shadows: int, key: jax.Array, *,
                             rounds: int | None = None, vectorize: bool | None = None) -> ShadowFederations:
    """Replays ``experiment``'s federated training on ``num_shadows`` shadow populations, all in one vectorized
    call per round, for LiRA / RMIA with reference models that were trained the way the target was.

    Shadow federation s takes a random half of ``pool`` (``balanced_inclusion``), splits it into the config's
    clients with the config's partition scheme, starts from its own fresh initialisation, and runs the same
    rounds: the same cohort size and client sampling (its own seed), local training, defenses, message
    transforms and aggregation (including DP-FedAvg noise) as the target, through the compiled round of
    ``simulation.build_round`` vmapped over the federations. Client i of every shadow federation keeps the
    target client i's settings (steps, batch, lr, defenses and DP-SGD noise multiplier); its Poisson rate is
    recomputed from its own data size. Privacy budgets are not enforced in shadows (they train as planned).

    Args:
      experiment: the target ``Experiment`` (its config, model, settings and compiled pieces are reused).
      pool: the candidate examples ``Dataset(x [N, ...], y [N])``.
      num_shadows: S >= 2.
      key: PRNG key of the halves, partitions, initialisations and training randomness.
      rounds: rounds to replay (default ``config.run.rounds``).
      vectorize: True: the compiled round vmapped over federations; False: the federations one after another
        through the same compiled round (same keys, same result). None: vmapped on accelerators, one after
        another on CPU, where the vmapped round measured 0.55-0.74x the loop (``benchmarks/bench_membership.py``).
    """
    from fedjaxpriv.client.sampling import batch_slots
    from fedjaxpriv.experiment import partition_like
    from fedjaxpriv.server import sample_cohort
    from fedjaxpriv.simulation import Population

    config = experiment.config
    inclusion = balanced_inclusion(jax.random.fold_in(key, 0), num_shadows, len(pool))
    seeds = np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (num_shadows,), 0, 2**31 - 1))
    populations = [partition_like(config, Dataset(pool.x[row], pool.y[row]), int(seed))
                   for row, seed in zip(inclusion, seeds)]
    target = experiment.settings
    settings = []
    for population in populations:
        counts = np.maximum(population.counts, 1).astype(np.float64)
        rate = np.clip(np.asarray(target.batch_size) / counts, 1e-12, 1.0).astype(np.float32)
        settings.append(target._replace(sample_rate=rate))
    private = np.asarray(target.dp_noise_multiplier) > 0
    slots = max(experiment.spec.max_batch, *(batch_slots(s, p.counts, private) for s, p in zip(settings, populations)))
    spec = dataclasses.replace(experiment.spec, max_batch=slots,
                               max_count=max(experiment.spec.max_count, *(max(1, p.max_count) for p in populations)),
                               unroll=1)
    strategy = "vmap" if experiment.program.strategy == "host" else experiment.program.strategy
    # The run's own round program, replayed on the shadow data on one device.
    round_fn = experiment.program.replace(spec=spec, strategy=strategy, mesh=None, sharded_examples=None).round_fn()
    x, y, offsets, counts = _join_populations(populations)
    shared_x, shared_y = jnp.asarray(x), jnp.asarray(y)
    # Federations differ in their state, client slices, settings, cohort and keys; the examples are shared.
    if vectorize is None:
        vectorize = jax.default_backend() != "cpu"
    if vectorize:
        mapped = jax.vmap(lambda state, off, cnt, *rest: round_fn(state, Population(shared_x, shared_y, off, cnt),
                                                                 *rest))
        federated_round = jax.jit(mapped)
    else:
        def federated_round(state: Any, off: Any, cnt: Any, *rest: Any) -> tuple[Any, Any]:
            outputs = [round_fn(*jax.tree_util.tree_map(lambda a, i=i: a[i], (state,)),
                                Population(shared_x, shared_y, off[i], cnt[i]),
                                *jax.tree_util.tree_map(lambda a, i=i: a[i], rest)) for i in range(num_shadows)]
            return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outputs)
    offsets, counts = jnp.asarray(offsets), jnp.asarray(counts)
    stacked_settings = jax.tree_util.tree_map(lambda *a: jnp.asarray(np.stack(a)), *settings)
    initial = [experiment.fresh_state(experiment.model.init(jax.random.fold_in(key, 10 + s)))
               for s in range(num_shadows)]
    state = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *initial)
    root_keys = jax.random.split(jax.random.fold_in(key, 2), num_shadows)
    s = config.server
    for r in range(config.run.rounds if rounds is None else rounds):
        cohorts = [sample_cohort(int(seed), r, config.data.num_clients, s.clients_per_round, s.client_sampling,
                                 experiment.cohort_slots) for seed in seeds]
        ids = jnp.asarray(np.stack([cohort.ids for cohort in cohorts]))
        mask = jnp.asarray(np.stack([cohort.mask for cohort in cohorts]))
        state, _ = federated_round(state, offsets, counts, stacked_settings, ids, mask, root_keys)
    return ShadowFederations(state.params, inclusion)
