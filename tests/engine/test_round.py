"""The compiled round: vectorized clients equal a per-client loop; padding and idle clients are no-ops."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv.client.local import LocalSpec, client_update
from fedjaxpriv.client.settings import make_settings
from fedjaxpriv.models import get_model
from fedjaxpriv.parallel import gather_examples, make_mesh, replicate, shard_rows
from fedjaxpriv.privacy.mechanisms import ClientLevelDpFedAvg
from fedjaxpriv.server import server_optimizer
from fedjaxpriv.simulation import AggregationSpec, Population, build_round, client_keys_base, init_server_state


def _setup(population, info, **overrides):
    model = get_model("mlp", info.input_shape, info.num_classes, hidden=(32,))
    counts = population.counts
    fields = dict(local_steps=[3, 0, 5, 2], batch_size=[8, 4, 16, 5], lr=[0.1, 0.05, 0.2, 0.1],
                  poisson=[False, True, False, True], mixup_alpha=[0.0, 0.4, 0.0, 1.0],
                  prune_sparsity=[0.0, 0.5, 0.3, 0.0], dp_clip_norm=[math.inf, 1.0, 0.5, math.inf],
                  dp_noise_multiplier=[0.0, 1.0, 0.3, 0.0])
    fields.update(overrides)
    settings = make_settings(population.num_clients, counts, **fields)
    spec = LocalSpec(max_steps=5, max_batch=24, max_count=population.max_count, num_classes=info.num_classes,
                     per_example=True, mixup=True, prune="magnitude")
    params = model.init(jax.random.key(1))
    pop = Population(*(jnp.asarray(a) for a in (population.x, population.y, population.offsets, population.counts)))
    settings = jax.tree_util.tree_map(jnp.asarray, settings)
    return model, spec, settings, params, pop


def _round(model, spec, settings, params, pop, ids, mask, *, chunk_size, strategy="vmap", mesh=None,
           aggregation=AggregationSpec(), clip_norm=math.inf):
    tx = server_optimizer("sgd", 1.0)
    round_fn = build_round(model.apply, spec, tx, aggregation, chunk_size=chunk_size, strategy=strategy, mesh=mesh)
    state, out = round_fn(init_server_state(params, tx, clip_norm), pop, settings, jnp.asarray(ids), jnp.asarray(mask),
                          jax.random.key(7))
    return state, out


def _assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


IDS = np.arange(8, dtype=np.int32)


@pytest.fixture(scope="module")
def hetero(digits_population):
    """A heterogeneous population (steps, batch, lr, sampling, mixup, pruning and DP differ per client)."""
    population, _, info = digits_population
    return population, _setup(population, info)


@pytest.fixture(scope="module")
def reference(hetero):
    """The round over clients 0..7 in one vmapped chunk: every other layout must reproduce it."""
    _, (model, spec, settings, params, pop) = hetero
    state, _ = _round(model, spec, settings, params, pop, IDS, np.ones(8, bool), chunk_size=8)
    return state.params


@pytest.mark.slow
def test_vectorized_round_equals_per_client_loop(hetero, reference):
    population, (model, spec, settings, params, pop) = hetero
    # Reference: an explicit Python loop over clients, same keys, weighted mean by example count.
    base = client_keys_base(jax.random.fold_in(jax.random.key(7), 0))
    one_client = jax.jit(client_update, static_argnums=(0, 1))
    total, weight = None, 0.0
    for cid in IDS:
        row = jax.tree_util.tree_map(lambda a: a[cid], settings)
        train_key, _ = jax.random.split(jax.random.fold_in(base, cid))
        result = one_client(spec, model.apply, params, pop.x, pop.y, pop.offsets[cid], pop.counts[cid], row,
                            train_key)
        n = float(population.counts[cid])
        scaled = jax.tree_util.tree_map(lambda d: n * d, result.delta)
        total = scaled if total is None else jax.tree_util.tree_map(jnp.add, total, scaled)
        weight += n
    expected = jax.tree_util.tree_map(lambda p, t: p + t / weight, params, total)
    _assert_trees_close(reference, expected, atol=2e-6)
    # Clients differ, so the round really moved the model.
    moved = sum(float(jnp.abs(a - b).sum()) for a, b in zip(jax.tree_util.tree_leaves(reference),
                                                          jax.tree_util.tree_leaves(params)))
    assert moved > 1e-2


@pytest.mark.slow
def test_zero_steps_client_sends_exact_zero(hetero):
    _, (model, spec, settings, params, pop) = hetero
    row = jax.tree_util.tree_map(lambda a: a[1], settings)  # client 1 has local_steps=0 but DP noise and mixup on
    out = client_update(spec, model.apply, params, pop.x, pop.y, pop.offsets[1], pop.counts[1], row,
                        jax.random.key(3))
    for leaf in jax.tree_util.tree_leaves(out.delta):
        assert np.all(np.asarray(leaf) == 0.0)
    assert float(out.steps) == 0.0


@pytest.mark.slow
def test_padded_cohort_slots_change_nothing(hetero, reference):
    _, (model, spec, settings, params, pop) = hetero
    padded_ids = np.concatenate([IDS, [0, 9, 0, 11]]).astype(np.int32)
    padded_mask = np.arange(12) < 8
    padded, out = _round(model, spec, settings, params, pop, padded_ids, padded_mask, chunk_size=4)
    _assert_trees_close(padded.params, reference, atol=1e-6)
    assert np.all(np.asarray(out.weight)[8:] == 0.0) and np.all(np.asarray(out.bits)[8:] == 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size,strategy", [(1, "vmap"), (3, "vmap"), (8, "loop"), (1, "host")])
def test_result_independent_of_chunking_and_strategy(hetero, reference, chunk_size, strategy):
    _, (model, spec, settings, params, pop) = hetero
    other, _ = _round(model, spec, settings, params, pop, IDS, np.ones(8, bool), chunk_size=chunk_size,
                      strategy=strategy)
    _assert_trees_close(other.params, reference, atol=1e-6)


@pytest.mark.slow
def test_sharded_over_eight_devices_equals_one_device(hetero, reference):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set in tests/conftest.py)")
    _, (model, spec, settings, params, pop) = hetero
    sharded, out = _round(model, spec, settings, params, pop, IDS, np.ones(8, bool), chunk_size=8,
                          mesh=make_mesh(8))
    _assert_trees_close(sharded.params, reference, atol=1e-6)
    assert len(out.loss.sharding.device_set) == 8


@pytest.mark.slow
def test_outer_product_weight_grads_round_equals_reference(hetero, reference):
    """The CPU lowering of dense weight gradients (per-example DP gradients included) changes no result."""
    _, (model, spec, settings, params, pop) = hetero
    fast_spec = dataclasses.replace(spec, outer_product_grads=True)
    state, _ = _round(model, fast_spec, settings, params, pop, IDS, np.ones(8, bool), chunk_size=8)
    _assert_trees_close(state.params, reference, atol=1e-6)


@pytest.mark.slow
def test_host_round_over_eight_devices_equals_one_device(hetero, reference):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set in tests/conftest.py)")
    _, (model, spec, settings, params, pop) = hetero
    mesh = make_mesh(8)
    settings, pop, params = (replicate(tree, mesh) for tree in (settings, pop, params))
    state, out = _round(model, spec, settings, params, pop, IDS, np.ones(8, bool), chunk_size=1, strategy="host",
                        mesh=mesh)
    _assert_trees_close(state.params, reference, atol=1e-6)
    assert len(state.params["Dense_0"]["kernel"].sharding.device_set) == 8


@pytest.mark.slow
def test_gathered_examples_are_each_clients_own_exactly_with_zeros_after_them(hetero):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set in tests/conftest.py)")
    population, (_, _, _, _, pop) = hetero
    mesh = make_mesh(8)
    x, y = shard_rows((pop.x, pop.y), mesh)
    assert {s.data.shape[0] for s in x.addressable_shards} == {math.ceil(len(pop.x) / 8)}  # T / 8 per device
    ids = np.array([3, 0, 11, 5, 5, 7, 1, 2, 9, 10, 4, 6, 8, 0, 11, 3])  # any order, repeats, 2 per device
    width = int(population.counts.max())
    got_x, got_y = gather_examples((x, y), jnp.asarray(population.offsets[ids]), jnp.asarray(population.counts[ids]),
                                   width, mesh)
    assert got_x.shape == (16, width, *pop.x.shape[1:]) and len(got_x.sharding.device_set) == 8
    for row, client in enumerate(ids):
        start, count = population.offsets[client], population.counts[client]
        np.testing.assert_array_equal(got_x[row, :count], population.x[start:start + count])
        np.testing.assert_array_equal(got_y[row, :count], population.y[start:start + count])
        assert not np.any(got_x[row, count:]) and not np.any(got_y[row, count:])


@pytest.mark.slow
@pytest.mark.parametrize("strategy, chunk_size", [("loop", 1)])  # vmap: test_experiment.py's sharded runs
def test_examples_split_over_eight_devices_give_the_same_round(hetero, reference, strategy, chunk_size):
    """Each device holds an eighth of the examples; each chunk fetches its clients' own: the round is the one
    device's round (heterogeneous steps, batches, Poisson sampling, mixup, pruning, DP-SGD)."""
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set in tests/conftest.py)")
    population, (model, spec, settings, params, pop) = hetero
    mesh = make_mesh(8)
    split = Population(*shard_rows((pop.x, pop.y), mesh), pop.offsets, pop.counts)
    tx = server_optimizer("sgd", 1.0)
    round_fn = build_round(model.apply, spec, tx, AggregationSpec(), chunk_size=chunk_size, strategy=strategy,
                           mesh=mesh, sharded_examples=int(population.counts.max()))
    state, _ = round_fn(init_server_state(params, tx), split, settings, jnp.asarray(IDS), jnp.ones(8, bool),
                        jax.random.key(7))
    _assert_trees_close(state.params, reference, atol=1e-6)
    with pytest.raises(ValueError, match="examples split over devices need a mesh and strategy 'vmap' or 'loop'"):
        build_round(model.apply, spec, tx, AggregationSpec(), chunk_size=1, strategy="host", mesh=mesh,
                    sharded_examples=4)


@pytest.mark.slow
def test_central_dp_noise_has_the_configured_std(digits_population):
    """DP-FedAvg: with every update clipped to zero-length (lr tiny), the new params minus old are pure noise."""
    population, _, info = digits_population
    model, spec, settings, params, pop = _setup(population, info, local_steps=0, prune_sparsity=0.0, mixup_alpha=0.0,
                                                dp_noise_multiplier=0.0, dp_clip_norm=math.inf)
    dp_fedavg = ClientLevelDpFedAvg(noise_multiplier=2.0, num_clients=population.num_clients, expected_cohort=4,
                                    poisson=False)
    aggregation = AggregationSpec(weighting="uniform", client_level=dp_fedavg)
    ids = np.arange(4, dtype=np.int32)
    state, _ = _round(model, spec, settings, params, pop, ids, np.ones(4, bool), chunk_size=4, aggregation=aggregation,
                      clip_norm=0.5)
    noise = np.concatenate([np.ravel(np.asarray(a) - np.asarray(b)) for a, b in
                            zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params))])
    expected_std = 2.0 * 0.5 / 4.0
    n = noise.size
    # The sample std of n Gaussians has relative standard error ~ 1/sqrt(2n); allow 6 of them.
    assert abs(noise.std() / expected_std - 1.0) < 6.0 / math.sqrt(2 * n)
    assert abs(noise.mean()) < 6.0 * expected_std / math.sqrt(n)


@pytest.mark.slow
def test_removing_one_client_moves_the_clipped_sum_by_at_most_the_clip_norm(hetero):
    """DP-FedAvg sensitivity: with noise off, dropping any one client from the cohort changes the (fixed
    denominator) mean by at most clip / expected_cohort, and some client reaches that bound."""
    _, (model, spec, settings, params, pop) = hetero
    clipping = ClientLevelDpFedAvg(noise_multiplier=0.0, num_clients=pop.counts.shape[0], expected_cohort=8,
                                   poisson=False)
    aggregation = AggregationSpec(weighting="uniform", client_level=clipping)
    tx = server_optimizer("sgd", 1.0)
    round_fn = build_round(model.apply, spec, tx, aggregation, chunk_size=8)

    def mean_update(mask):
        state, _ = round_fn(init_server_state(params, tx, 0.05), pop, settings, jnp.asarray(IDS),
                            jnp.asarray(mask), jax.random.key(7))
        return np.concatenate([np.ravel(np.asarray(a) - np.asarray(b)) for a, b in
                               zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params))])

    full = mean_update(np.ones(8, bool))
    moves = [np.linalg.norm(full - mean_update(np.arange(8) != k)) for k in range(8)]
    bound = 0.05 / 8.0
    assert max(moves) <= bound * (1 + 1e-4)
    assert max(moves) >= bound * (1 - 1e-4)  # updates are larger than 0.05 before clipping: the bound is tight
