"""The builders an ``Experiment`` is made of, called on their own: the privacy plan's slots against the binomial
tail they promise, the mechanisms' noise against z C, and their refusals."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjaxpriv.client.settings import make_settings
from fedjaxpriv.config import from_dict
from fedjaxpriv.experiment import (build_data, build_layout, build_mechanisms, build_program, configured_settings,
                                  plan_privacy)
from fedjaxpriv.parallel import make_mesh
from fedjaxpriv.transforms.pipeline import message_pipeline
from fedjaxpriv.server.algorithms import FEDAVG, algorithm_for

COUNTS = np.full(40, 30)


def _config(**sections):
    return from_dict({"data": {"num_clients": 40}, "server": {"clients_per_round": 8}, **sections})


def test_fixed_size_batches_and_cohorts_take_exactly_their_size():
    config = _config(client={"batch_size": 12})
    plan = plan_privacy(config, configured_settings(config, COUNTS), COUNTS, np.full(40, np.inf), FEDAVG)
    assert (plan.batch_slots, plan.cohort_slots) == (12, 8)
    assert np.all(plan.participation_budget >= config.run.rounds)


def test_a_private_poisson_cohort_overflows_its_slots_only_within_the_tail_charged_to_delta():
    """DP-FedAvg over Poisson cohorts of rate 8/40: the slots hold a cohort of the population plus one client
    (Binomial(41, 0.2)) except with probability below delta, and one slot fewer would not."""
    config = _config(server={"clients_per_round": 8, "client_sampling": "poisson", "central_clip_norm": 1.0,
                             "central_noise_multiplier": 1.0})
    plan = plan_privacy(config, configured_settings(config, COUNTS), COUNTS, np.full(40, np.inf), FEDAVG)
    overflow = stats.binom.sf(plan.cohort_slots, 41, 0.2)
    assert 0 < overflow <= config.run.delta
    assert stats.binom.sf(plan.cohort_slots - 1, 41, 0.2) > overflow


def test_local_noise_is_z_times_the_clip_and_is_claimed_only_for_the_configs_own_chain():
    config = _config(message={"clip_norm": 2.0, "local_noise_multiplier": 0.5})
    settings = configured_settings(config, COUNTS)
    own = build_mechanisms(config, settings, COUNTS, 16, 8, FEDAVG, transform_passed_in=False)
    np.testing.assert_array_equal(own.local_dp.noise_stds(), np.full(40, 1.0))
    assert own.sample_level is None and own.algorithm is FEDAVG
    with pytest.warns(UserWarning, match="no local-DP epsilon is reported"):
        passed = build_mechanisms(config, settings, COUNTS, 16, 8, FEDAVG, transform_passed_in=True)
    assert passed.local_dp is None


def test_dp_fedavg_wraps_the_algorithm_and_refuses_what_it_cannot_protect():
    config = _config(server={"clients_per_round": 8, "central_clip_norm": 1.5, "central_noise_multiplier": 1.0})
    settings = make_settings(40, COUNTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        built = build_mechanisms(config, settings, COUNTS, 16, 8, FEDAVG, transform_passed_in=False)
    assert built.algorithm.name == "dp_fedavg" and built.algorithm.clip_norm == 1.5
    assert built.algorithm.client_level.noise_multiplier == 1.0 and built.local_dp is None  # no local noise
    with pytest.raises(ValueError, match="brings its own client-level DP, and the config asks for it too"):
        build_mechanisms(config, settings, COUNTS, 16, 8, built.algorithm, transform_passed_in=False)
    scaffold = algorithm_for("scaffold")
    with pytest.raises(ValueError, match="scaffold"):
        build_mechanisms(config, settings, COUNTS, 16, 8, scaffold, transform_passed_in=False)
    assert math.isinf(FEDAVG.clip_norm)


def _run_parts(config):
    data = build_data(config, None, None, None, None, None, True)
    counts = data.population.counts
    budget = plan_privacy(config, configured_settings(config, counts), counts,
                          np.full(data.population.num_clients, np.inf), FEDAVG)
    return data, budget


def test_the_program_sends_the_configured_chain_and_splits_only_where_it_may():
    """The program a run builds applies the message chain ``config.message`` describes (the same messages, key for
    key, as that chain built on its own), and splits the data over the mesh as run.shard_data asks, never where
    the caller forbids it (a decentralized run)."""
    config = _config(message={"topk_fraction": 0.25, "quant_bits": 4}, run={"shard_data": True})
    data, budget = _run_parts(config)
    mesh = make_mesh(2) if jax.device_count() >= 2 else None
    layout = build_layout(config, data, budget, mesh)
    assert layout.mesh is mesh and layout.spec.max_batch == budget.batch_slots
    program = build_program(config, data, layout, FEDAVG, budget.settings)
    alone, stages = message_pipeline(config.message.order, budget.settings)
    assert stages == ("topk", "round")
    delta = jax.tree_util.tree_map(lambda leaf: jax.random.normal(jax.random.key(3), leaf.shape), data.params)
    row = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), budget.settings)
    sent = program.message_transform.update(delta, program.message_transform.init(delta), jax.random.key(4), row)[0]
    expected = alone.update(delta, alone.init(delta), jax.random.key(4), row)[0]
    for a, b in zip(jax.tree_util.tree_leaves(sent), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert program.sharded_examples == (int(np.max(data.population.counts)) if mesh is not None else None)
    assert build_program(config, data, layout, FEDAVG, budget.settings, may_split=False).sharded_examples is None


def test_the_layout_refuses_split_data_under_the_host_strategy():
    if jax.device_count() < 2:
        pytest.skip("needs several devices (tests/conftest.py sets 8 CPU devices)")
    config = _config(run={"shard_data": True, "strategy": "host"})
    data, budget = _run_parts(config)
    with pytest.raises(ValueError, match="run.shard_data=true needs run.strategy 'vmap' or 'loop'.*'host'"):
        build_layout(config, data, budget, make_mesh(2))


@pytest.mark.slow
def test_poisson_runs_chunk_their_slots_where_a_slot_is_costly():
    """The run's local-training spec computes Poisson batches in chunks under DP-SGD and for a convolutional model,
    and all slots at once for a dense model without DP-SGD (``client.sampling.slot_chunk``)."""
    from fedjaxpriv.experiment import Experiment

    def spec(**sections):
        config = from_dict({"data": {"num_clients": 20}, "server": {"clients_per_round": 4}, **sections})
        return Experiment(config, progress=False).spec

    dp = spec(client={"sampling": "poisson", "dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0})
    assert 0 < dp.slot_chunk < dp.max_batch and dp.per_example
    cnn = spec(client={"sampling": "poisson"}, model={"name": "cnn"})
    assert 0 < cnn.slot_chunk < cnn.max_batch
    assert spec(client={"sampling": "poisson"}).slot_chunk == 0
    assert spec(client={"dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0}).slot_chunk == 0  # fixed-size batches
