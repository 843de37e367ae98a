"""SCAFFOLD as a FederatedAlgorithm: equal to a plain per-client loop of the paper's updates, and better than
FedAvg where clients drift (one label per client)."""

import jax
import numpy as np
import pytest

from fedjaxpriv.config import ExperimentConfig, with_overrides
from fedjaxpriv.experiment import Experiment

BASE = ("data.num_clients=8", "model.name=logreg", "client.local_steps=[3, 6]", "client.batch_size=16",
        "client.lr=0.05", "server.clients_per_round=4", "server.algorithm=scaffold", "run.checkpoint_every=0",
        "run.num_devices=1")


def _config(*overrides: str) -> ExperimentConfig:
    return with_overrides(ExperimentConfig(), [*BASE, *overrides])


@pytest.mark.slow
def test_scaffold_rounds_equal_the_papers_update_rule_written_in_numpy():
    """Three rounds, half the clients each, local steps 3 or 6: the global model, the server control variate c
    and every client's c_i equal Karimireddy et al.'s option II written here in NumPy for softmax regression
    (y <- y - lr (grad F_i(y) - c_i + c); c_i+ = c_i - c + (x - y) / (K lr); x <- x + mean of y - x;
    c <- c + sum of (c_i+ - c_i) / N). Every client holds 16 examples and a step's batch is all of them, so
    local training is deterministic and needs nothing of the library's."""
    from fedjaxpriv.data import load_digits
    from fedjaxpriv.data.federated import from_client_lists
    from tests.engine.test_ditto import _softmax_regression_gradient

    train, test = load_digits()
    clients, size, lr = 8, 16, 0.05
    population = from_client_lists([train.x[c * size:(c + 1) * size] for c in range(clients)],
                                   [train.y[c * size:(c + 1) * size] for c in range(clients)])
    experiment = Experiment(_config("run.rounds=3", f"client.batch_size={size}"), population=population, test=test,
                            num_classes=10)
    state = experiment.initial_state
    start = jax.tree_util.tree_map(np.asarray, state.params)["Dense_0"]
    x_w, x_b = np.asarray(start["kernel"], np.float64), np.asarray(start["bias"], np.float64)
    c_w, c_b = np.zeros_like(x_w), np.zeros_like(x_b)
    ci = [(np.zeros_like(x_w), np.zeros_like(x_b)) for _ in range(clients)]
    steps = np.asarray(experiment.settings.local_steps)
    for r in range(3):
        cohort, _ = experiment.round_cohort(r)
        deltas, changes = [], []
        for i in cohort.ids[cohort.mask]:
            features, labels = population.client(i).x.reshape(size, -1).astype(np.float64), population.client(i).y
            y_w, y_b = x_w.copy(), x_b.copy()
            for _ in range(int(steps[i])):
                g_w, g_b = _softmax_regression_gradient(y_w, y_b, features, labels)
                y_w, y_b = y_w - lr * (g_w - ci[i][0] + c_w), y_b - lr * (g_b - ci[i][1] + c_b)
            k_lr = int(steps[i]) * lr
            new = (ci[i][0] - c_w + (x_w - y_w) / k_lr, ci[i][1] - c_b + (x_b - y_b) / k_lr)
            changes.append((new[0] - ci[i][0], new[1] - ci[i][1]))
            ci[i] = new
            deltas.append((y_w - x_w, y_b - x_b))
        x_w = x_w + np.mean([d[0] for d in deltas], axis=0)  # equal data sizes: the example-weighted mean
        x_b = x_b + np.mean([d[1] for d in deltas], axis=0)
        c_w, c_b = c_w + sum(d[0] for d in changes) / clients, c_b + sum(d[1] for d in changes) / clients
        state, record = experiment.step(state, r, cohort)
        got = jax.tree_util.tree_map(np.asarray, state.params)["Dense_0"]
        np.testing.assert_allclose(got["kernel"], x_w, atol=2e-5)
        np.testing.assert_allclose(got["bias"], x_b, atol=2e-5)
        server = jax.tree_util.tree_map(np.asarray, state.algorithm_state.control)["Dense_0"]
        np.testing.assert_allclose(server["kernel"], c_w, atol=2e-4)
        np.testing.assert_allclose(server["bias"], c_b, atol=2e-4)
        kept = jax.tree_util.tree_map(np.asarray, state.client_state.algorithm.control)["Dense_0"]
        for i in range(clients):
            np.testing.assert_allclose(kept["kernel"][i], ci[i][0], atol=2e-4)
            np.testing.assert_allclose(kept["bias"][i], ci[i][1], atol=2e-4)
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
