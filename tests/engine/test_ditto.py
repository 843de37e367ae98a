"""Ditto (Li et al. 2021) as a FederatedAlgorithm with a personal model per client: its global model is FedAvg's,
its personal models follow the proximal objective (checked against full-batch gradient descent written in
NumPy), and under label skew they beat the global model on test data mixed as each client's labels."""

import jax
import numpy as np
import pytest

from fedjaxpriv.config import ExperimentConfig, with_overrides
from fedjaxpriv.data import load_digits
from fedjaxpriv.data.federated import from_client_lists
from fedjaxpriv.evaluation import label_mix_accuracy
from fedjaxpriv.experiment import Experiment

CLIENTS, SIZE, STEPS, LR, LAM = 4, 16, 3, 0.1, 0.5


def _full_batch_config(algorithm: str) -> ExperimentConfig:
    return with_overrides(ExperimentConfig(), [
        f"data.num_clients={CLIENTS}", "model.name=logreg", f"client.local_steps={STEPS}", f"client.batch_size={SIZE}",
        f"client.lr={LR}", f"server.clients_per_round={CLIENTS}", f"server.algorithm={algorithm}",
        f"server.ditto_lambda={LAM}", "run.rounds=2", "run.checkpoint_every=0", "run.num_devices=1"])


def _softmax_regression_gradient(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray):
    logits = x @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return x.T @ p / len(y), p.mean(axis=0)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.mark.slow
def test_ditto_global_model_is_fedavg_and_personal_models_descend_the_proximal_objective(digits):
    """Every client holds 16 examples and trains on all of them each step (batch 16), so local training is
    deterministic: v <- v - lr (grad F_k(v) + lam (v - w)) three times per round from the client's own v, w the
    round's global model. Two rounds, all clients taking part."""
    train, test = digits
    population = from_client_lists([train.x[c * SIZE:(c + 1) * SIZE] for c in range(CLIENTS)],
                                   [train.y[c * SIZE:(c + 1) * SIZE] for c in range(CLIENTS)])
    runs = {name: Experiment(_full_batch_config(name), population=population, test=test, num_classes=10)
            for name in ("fedavg", "ditto")}
    states = {name: e.initial_state for name, e in runs.items()}
    w0 = jax.tree_util.tree_map(np.asarray, states["ditto"].params)["Dense_0"]
    personal = [(np.asarray(w0["kernel"], np.float64), np.asarray(w0["bias"], np.float64))] * CLIENTS
    for r in range(2):
        global_w = jax.tree_util.tree_map(np.asarray, states["ditto"].params)["Dense_0"]
        gw, gb = np.asarray(global_w["kernel"], np.float64), np.asarray(global_w["bias"], np.float64)
        for c in range(CLIENTS):
            x = population.client(c).x.reshape(SIZE, -1).astype(np.float64)
            v, vb = personal[c]
            for _ in range(STEPS):
                grad_w, grad_b = _softmax_regression_gradient(v, vb, x, population.client(c).y)
                v, vb = v - LR * (grad_w + LAM * (v - gw)), vb - LR * (grad_b + LAM * (vb - gb))
            personal[c] = (v, vb)
        for name, experiment in runs.items():
            states[name], _ = experiment.step(states[name], r)
        # The global model is FedAvg's, bit for bit: the personal step draws its own keys.
        for a, b in zip(jax.tree_util.tree_leaves(states["ditto"].params),
                        jax.tree_util.tree_leaves(states["fedavg"].params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        kept = states["ditto"].client_state.algorithm.personal["Dense_0"]
        for c in range(CLIENTS):
            np.testing.assert_allclose(np.asarray(kept["kernel"])[c], personal[c][0], atol=2e-5)
            np.testing.assert_allclose(np.asarray(kept["bias"])[c], personal[c][1], atol=2e-5)
    # Personal models are never sent: a participant's message is the global model's delta, as in FedAvg.
    record = runs["ditto"].evaluate(states["ditto"].params, states["ditto"])
    assert record["test_accuracy"] == runs["fedavg"].evaluate(states["fedavg"].params)["test_accuracy"]
    assert "personal_test_accuracy" in record


def test_label_mix_accuracy_is_the_accuracy_on_a_test_set_drawn_like_the_client():
    y = np.array([0, 0, 1, 1, 1, 2])
    correct = np.array([[1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0]], float)
    counts = np.array([[3, 1, 0], [0, 0, 5]])  # client 0: 3/4 class 0, 1/4 class 1; client 1: only class 2
    np.testing.assert_allclose(label_mix_accuracy(correct, y, counts), [0.75 * 0.5 + 0.25 * 2 / 3, 0.0])
    # One model for every client: the same per-class accuracies, each client's own mix.
    np.testing.assert_allclose(label_mix_accuracy(correct[0], y, counts), [0.75 * 0.5 + 0.25 * 2 / 3, 1.0])


@pytest.mark.slow
def test_ditto_personal_models_beat_the_global_model_under_label_skew():
    """Two label shards per client (20 clients, half taking part each round): after 15 rounds the personal models
    reach 0.97 on test data mixed as their clients' labels where the global model reaches 0.80; the global model
    is FedAvg's, unchanged by the personal step."""
    config = with_overrides(ExperimentConfig(), [
        "data.num_clients=20", "data.partition=shards", "data.shards_per_client=2", "model.name=logreg",
        "client.local_steps=10", "client.batch_size=16", "client.lr=0.1", "server.clients_per_round=10",
        "server.algorithm=ditto", "server.ditto_lambda=0.1", "run.rounds=15", "run.eval_every=15",
        "run.checkpoint_every=0"])
    last = Experiment(config).run(progress=False).history[-1]
    assert last["personal_test_accuracy"] > last["global_test_accuracy_client_mix"] + 0.1, last
    assert last["client_personal_accuracy_p10"] > last["global_test_accuracy_client_mix"], last
    fedavg = Experiment(with_overrides(config, ["server.algorithm=fedavg"])).run(progress=False).history[-1]
    assert fedavg["test_accuracy"] == last["test_accuracy"]


def test_ditto_lambda_is_checked():
    with pytest.raises(ValueError, match=r"server.ditto_lambda=-1 is invalid; allowed: a finite number >= 0"):
        with_overrides(ExperimentConfig(), ["server.ditto_lambda=-1"])
