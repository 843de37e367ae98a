"""FedSGD, FedProx and server optimizers against hand-computed references; Synthetic data end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjaxpriv.config import from_dict
from fedjaxpriv.experiment import Experiment
from fedjaxpriv.models import cross_entropy


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_fedsgd_round_is_one_full_batch_gradient_step():
    config = from_dict({"data": {"num_clients": 6, "partition": "iid"}, "model": {"name": "logreg"},
                        "server": {"algorithm": "fedsgd", "clients_per_round": 6, "lr": 0.5},
                        "run": {"rounds": 1}})
    exp = Experiment(config)
    params = exp.initial_state.params
    state, _ = exp.step(exp.initial_state, 0)
    pop = exp.population
    grads = jax.grad(lambda p: cross_entropy(exp.model.apply(p, jnp.asarray(pop.x)), jnp.asarray(pop.y)))(params)
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grads)
    for got, want in zip(_leaves(state.params), _leaves(expected)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_fedprox_local_steps_match_manual_proximal_sgd():
    lr, mu = 0.3, 2.0
    config = from_dict({"data": {"num_clients": 4, "partition": "iid"}, "model": {"name": "logreg"},
                        "client": {"local_steps": 2, "batch_size": 1000, "lr": lr, "prox_mu": mu},
                        "server": {"algorithm": "fedprox", "clients_per_round": 1}, "run": {"rounds": 1}})
    exp = Experiment(config)
    params = exp.initial_state.params
    state, _ = exp.step(exp.initial_state, 0)
    (client,) = exp.cohort(0).ids
    data = exp.population.client(int(client))
    loss = lambda p: cross_entropy(exp.model.apply(p, jnp.asarray(data.x)), jnp.asarray(data.y))
    w1 = jax.tree_util.tree_map(lambda w, g: w - lr * g, params, jax.grad(loss)(params))
    g1 = jax.grad(loss)(w1)
    w2 = jax.tree_util.tree_map(lambda w, g, w0: w - lr * (g + mu * (w - w0)), w1, g1, params)
    for got, want in zip(_leaves(state.params), _leaves(w2)):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_server_optimizer_applies_optax_to_the_pseudo_gradient(optimizer):
    config = from_dict({"data": {"num_clients": 5, "partition": "iid"}, "model": {"name": "logreg"},
                        "client": {"local_steps": 2},
                        "server": {"optimizer": optimizer, "lr": 0.01, "clients_per_round": 5},
                        "run": {"rounds": 2}})
    exp = Experiment(config)
    sgd = Experiment(from_dict({**config.to_dict(), "server": {**config.to_dict()["server"], "optimizer": "sgd",
                                                                 "lr": 1.0}}))
    params = exp.initial_state.params
    # With server SGD at lr 1 the new params are params + mean(delta): recover mean(delta) from it.
    state_sgd, _ = sgd.step(sgd.initial_state, 0)
    mean_delta = jax.tree_util.tree_map(jnp.subtract, state_sgd.params, params)
    tx = optax.adam(0.01, b1=0.9, b2=0.99, eps=1e-3) if optimizer == "adam" else optax.sgd(0.01, momentum=0.9)
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.negative, mean_delta), tx.init(params), params)
    expected = optax.apply_updates(params, updates)
    state, _ = exp.step(exp.initial_state, 0)
    for got, want in zip(_leaves(state.params), _leaves(expected)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_synthetic_population_trains():
    config = from_dict({"data": {"dataset": "synthetic", "num_clients": 30, "synthetic_alpha": 0.5,
                                 "synthetic_beta": 0.5, "synthetic_max_size": 300},
                        "model": {"name": "logreg"}, "client": {"local_steps": 10, "lr": 0.05},
                        "server": {"clients_per_round": 10}, "run": {"rounds": 30, "eval_every": 30}})
    exp = Experiment(config)
    first = exp.evaluate(exp.initial_state.params)["test_accuracy"]
    results = exp.run(progress=False)
    # 10 classes: an untrained model is near chance; FedAvg on Synthetic(0.5, 0.5) learns well above it.
    assert first < 0.3 and results.final("test_accuracy") > 0.55
