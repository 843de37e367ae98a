"""Defenses and accounting inside real rounds: pruning masks and their wire cost, iterative pruning,
adaptive clipping, and the epsilons a run records."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv.client.local import client_update
from fedjaxpriv.client.pruning import magnitude_mask
from fedjaxpriv.config import from_dict
from fedjaxpriv.experiment import Experiment
from fedjaxpriv.privacy.accounting import dpfedavg_epsilon, dpsgd_epsilon
from fedjaxpriv.privacy.mechanisms import ClientLevelDpFedAvg
from fedjaxpriv.server import server_optimizer
from fedjaxpriv.simulation import AggregationSpec, build_round, init_server_state

BASE = {"data": {"num_clients": 10}, "model": {"hidden": [16]}, "server": {"clients_per_round": 5}}


def _kernel_sizes(params):
    return [leaf.size for leaf in jax.tree_util.tree_leaves(params) if leaf.ndim >= 2]


def _param_count(params):
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_pruned_weights_stay_zero_and_are_not_sent():
    exp = Experiment(from_dict({**BASE, "client": {"prune_sparsity": 0.5, "local_steps": 4}, "run": {"rounds": 1}}))
    params = exp.initial_state.params
    mask = magnitude_mask(params, 0.5)
    row = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), exp.settings)
    p = exp.device_population
    out = client_update(exp.spec, exp.model.apply, params, p.x, p.y, p.offsets[0], p.counts[0], row,
                        jax.random.key(0))
    for delta, m in zip(jax.tree_util.tree_leaves(out.delta), jax.tree_util.tree_leaves(mask)):
        assert np.all(np.asarray(delta)[np.asarray(m) == 0] == 0.0)
        assert np.any(np.asarray(delta)[np.asarray(m) == 1] != 0.0)
    kept = _param_count(params) - sum(n // 2 for n in _kernel_sizes(params))
    assert int(out.trained_coordinates) == kept
    _, record = exp.step(exp.initial_state, 0)
    assert record["bytes_per_client"] == 4 * kept


@pytest.mark.slow
def test_iterative_pruning_ramps_the_mask():
    config = from_dict({**BASE, "client": {"prune_sparsity": 0.8, "prune_begin_round": 0, "prune_end_round": 3},
                        "run": {"rounds": 4, "eval_every": 4}})
    exp = Experiment(config)
    params = exp.initial_state.params
    results = exp.run(progress=False)
    total, kernels = _param_count(params), _kernel_sizes(params)
    for record in results.history:
        r = record["round"] - 1
        sparsity = 0.8 + (0.0 - 0.8) * (1 - min(max(r / 3, 0.0), 1.0)) ** 3
        expected = total - sum(math.floor(np.float32(sparsity) * n) for n in kernels)
        assert record["bytes_per_client"] == pytest.approx(4 * expected, abs=4 * len(kernels))


def test_adaptive_clip_norm_follows_the_geometric_rule():
    exp = Experiment(from_dict({**BASE, "run": {"rounds": 1}}))
    settings = jax.tree_util.tree_map(jnp.asarray, exp.settings)
    adaptive = ClientLevelDpFedAvg(noise_multiplier=0.0, num_clients=10, expected_cohort=5, poisson=False,
                                   adaptive_quantile=0.3, adaptive_lr=0.5, count_noise_std=0.0)
    aggregation = AggregationSpec(weighting="uniform", client_level=adaptive)
    tx = server_optimizer("sgd", 1.0)
    round_fn = build_round(exp.model.apply, exp.spec, tx, aggregation, chunk_size=5)
    cohort = exp.cohort(0)
    state, out = round_fn(init_server_state(exp.initial_state.params, tx, 0.05), exp.device_population, settings,
                          jnp.asarray(cohort.ids), jnp.asarray(cohort.mask), exp.root_key)
    norms = np.asarray(out.update_norm)[cohort.mask]
    # Centred indicators over the expected cohort of 5 (here all 5 sampled clients take part).
    below = np.sum(np.where(norms <= 0.05, 0.5, -0.5)) / 5 + 0.5
    np.testing.assert_allclose(float(state.clip_norm), 0.05 * math.exp(-0.5 * (below - 0.3)), rtol=1e-6)


@pytest.mark.slow
def test_recorded_sample_level_epsilon_matches_the_accountant():
    config = from_dict({**BASE, "client": {"dp_clip_norm": 1.0, "dp_noise_multiplier": [1.0, 2.0],
                                           "sampling": "poisson", "local_steps": 3},
                        "run": {"rounds": 3, "eval_every": 3}})
    exp = Experiment(config)
    results = exp.run(progress=False)
    counts = np.zeros(10, int)
    for r in range(3):
        cohort = exp.cohort(r)
        counts[cohort.ids[cohort.mask]] += 1
    q = exp.settings.sample_rate
    sigma = exp.settings.dp_noise_multiplier
    expected = [dpsgd_epsilon(float(q[i]), float(sigma[i]), 3 * int(counts[i]), 1e-5) for i in range(10) if counts[i]]
    assert results.final("epsilon_max") == pytest.approx(max(expected), rel=1e-9)
    plain = [dpsgd_epsilon(1.0, float(sigma[i]), 3 * int(counts[i]), 1e-5) for i in range(10) if counts[i]]
    assert results.final("epsilon_unamplified_max") == pytest.approx(max(plain), rel=1e-9)


@pytest.mark.slow
def test_recorded_client_level_epsilon_matches_dpfedavg():
    config = from_dict({**BASE, "server": {"clients_per_round": 5, "client_sampling": "poisson",
                                           "central_clip_norm": 0.5, "central_noise_multiplier": 1.2},
                        "run": {"rounds": 3, "eval_every": 3}})
    results = Experiment(config).run(progress=False)
    assert results.final("client_level_epsilon") == pytest.approx(dpfedavg_epsilon(0.5, 1.2, 3, 1e-5), rel=1e-9)


@pytest.mark.slow
def test_personalized_targets_are_met():
    config = from_dict({**BASE, "client": {"dp_clip_norm": 1.0, "target_epsilon": [1.0, 4.0],
                                           "sampling": "poisson", "local_steps": 2},
                        "run": {"rounds": 4, "eval_every": 4}})
    exp = Experiment(config)
    sigma = exp.settings.dp_noise_multiplier
    assert np.all(sigma[0::2] > sigma[1::2])  # the stricter tier gets more noise
    exp.run(progress=False)
    eps = exp.privacy.per_client()["epsilon"]
    targets = np.where(np.arange(10) % 2 == 0, 1.0, 4.0)
    assert np.all(eps <= targets + 1e-9)


@pytest.mark.slow
def test_tapped_messages_are_the_messages_aggregated_in_the_round():
    """With server SGD at lr 1 and example weighting, the new model is params + the weighted mean of the
    cohort's messages: the tap of the cohort reproduces it exactly. The round emits its taps itself: nothing
    trains the tapped clients a second time."""
    config = from_dict({**BASE, "client": {"local_steps": 3, "mixup_alpha": 0.5}, "message": {"quant_bits": 6},
                        "run": {"rounds": 2, "tap_rounds": [2], "tap_clients": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}})
    exp = Experiment(config)

    def trained_again(*args):
        raise AssertionError("a tap trained its clients a second time")

    vars(exp.program)["tap_fn"] = trained_again  # the program's replay (a cached property) raises if called
    results = exp.run(progress=False)
    tap = results.taps[2]
    cohort = exp.cohort(1)
    counts = exp.population.counts[cohort.ids].astype(np.float64)
    for before, after, messages in zip(jax.tree_util.tree_leaves(tap.server_params),
                                       jax.tree_util.tree_leaves(results.params),
                                       jax.tree_util.tree_leaves(tap.messages)):
        position = [int(np.flatnonzero(tap.client_ids == c)[0]) for c in cohort.ids]  # the tap holds the cohort
        mean = np.tensordot(counts / counts.sum(), messages[position], axes=1)
        np.testing.assert_allclose(after, before + mean, atol=1e-5)
