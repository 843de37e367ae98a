"""SCAFFOLD as a FederatedAlgorithm: equal to a plain per-client loop of the paper's updates, and better than
FedAvg where clients drift (one label per client)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv.client.local import client_update
from fedjaxpriv.config import ExperimentConfig, with_overrides
from fedjaxpriv.experiment import Experiment
from fedjaxpriv.simulation import client_keys_base

BASE = ("data.num_clients=8", "model.name=logreg", "client.local_steps=[3, 6]", "client.batch_size=16",
        "client.lr=0.05", "server.clients_per_round=4", "server.algorithm=scaffold", "run.checkpoint_every=0",
        "run.num_devices=1")


def _config(*overrides: str) -> ExperimentConfig:
    return with_overrides(ExperimentConfig(), [*BASE, *overrides])


@pytest.mark.slow
def test_scaffold_rounds_equal_a_per_client_loop_of_the_paper_updates():
    """Three rounds with partial participation and heterogeneous local steps: the global model, the server
    control variate c and every client's c_i equal a Python loop over clients of Karimireddy et al.'s
    option II (y <- y - lr (g - c_i + c); c_i+ = c_i - c + (x - y) / (K lr); x <- x + weighted mean of y - x;
    c <- c + sum of (c_i+ - c_i) / N), each client trained by the library's ``client_update``."""
    experiment = Experiment(_config("run.rounds=3"))
    p, s = experiment.population, experiment.settings
    params = experiment.initial_state.params
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    server_c, client_c = zeros, [zeros] * p.num_clients
    data = [jnp.asarray(a) for a in (p.x, p.y)]
    state = experiment.initial_state
    for r in range(3):
        cohort, _ = experiment.round_cohort(r)
        ids = cohort.ids[cohort.mask]
        base = client_keys_base(jax.random.fold_in(experiment.root_key, r))
        deltas, weights, changes = [], [], []
        for i in ids:
            row = jax.tree_util.tree_map(lambda a: jnp.asarray(a[i]), s)
            train_key, _ = jax.random.split(jax.random.fold_in(base, int(i)))
            correction = jax.tree_util.tree_map(jnp.subtract, server_c, client_c[i])
            out = client_update(experiment.spec, experiment.model.apply, params, *data, jnp.int32(p.offsets[i]),
                                jnp.int32(p.counts[i]), row, train_key, correction=correction)
            k_lr = float(out.steps) * float(row.lr)
            new_c = jax.tree_util.tree_map(lambda ci, c, d: ci - c - d / k_lr, client_c[i], server_c, out.delta)
            changes.append(jax.tree_util.tree_map(jnp.subtract, new_c, client_c[i]))
            client_c[i] = new_c
            deltas.append(out.delta)
            weights.append(float(p.counts[i]))
        total = sum(weights)
        params = jax.tree_util.tree_map(lambda x, *d: x + sum(w * di for w, di in zip(weights, d)) / total,
                                        params, *deltas)
        server_c = jax.tree_util.tree_map(lambda c, *d: c + sum(d) / p.num_clients, server_c, *changes)
        state, record = experiment.step(state, r, cohort)
        for got, want in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
        for got, want in zip(jax.tree_util.tree_leaves(state.algorithm_state), jax.tree_util.tree_leaves(server_c)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
        for i in range(p.num_clients):
            for got, want in zip(jax.tree_util.tree_leaves(state.client_state.algorithm),
                                 jax.tree_util.tree_leaves(client_c[i])):
                np.testing.assert_allclose(np.asarray(got)[i], np.asarray(want), rtol=1e-4, atol=1e-5)
    # Each participant sends its delta and its control-variate change, both dense float32.
    assert record["bytes_per_client"] == 2 * 4 * experiment.num_params


@pytest.mark.slow
def test_scaffold_beats_fedavg_when_every_client_holds_one_label():
    """Karimireddy et al. 2020: with heterogeneous clients and many local steps, FedAvg drifts and SCAFFOLD
    corrects it. One digit class per client, 20 local steps, half the clients per round, 20 rounds: SCAFFOLD's
    test accuracy exceeds FedAvg's by more than 3 binomial standard errors of the difference."""
    overrides = ("data.num_clients=20", "data.partition=shards", "data.shards_per_client=1", "client.local_steps=20",
                 "server.clients_per_round=10", "run.rounds=20", "run.eval_every=20")
    scaffold = Experiment(_config(*overrides))
    accuracy = scaffold.run(progress=False).final("test_accuracy")
    fedavg = Experiment(_config(*overrides, "server.algorithm=fedavg")).run(progress=False).final("test_accuracy")
    n = len(scaffold.test.y)
    margin = 3 * np.sqrt(accuracy * (1 - accuracy) / n + fedavg * (1 - fedavg) / n)
    assert accuracy > fedavg + margin, (accuracy, fedavg, margin)


@pytest.mark.slow
def test_scaffold_state_survives_resume(tmp_path):
    config = _config("run.rounds=4", "run.eval_every=4", "run.checkpoint_every=2")
    full = Experiment(config).run(progress=False)
    Experiment(config).run(str(tmp_path), progress=False, rounds=2)
    resumed = Experiment(config).run(str(tmp_path), progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(resumed.params), jax.tree_util.tree_leaves(full.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scaffold_refuses_client_level_dp_it_would_void():
    with pytest.raises(ValueError, match="control-variate change"):
        _config("server.central_clip_norm=1.0", "server.central_noise_multiplier=1.0")
