"""FedSGD, FedProx and server optimizers against hand-computed references; Synthetic data end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjaxpriv.config import ALGORITHM_NAMES, from_dict
from fedjaxpriv.experiment import Experiment
from fedjaxpriv.models import cross_entropy
from fedjaxpriv.privacy.mechanisms import ClientLevelDpFedAvg
from fedjaxpriv.server import algorithms


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def _fedavg_config(**sections):
    base = {"data": {"num_clients": 6, "partition": "iid"}, "model": {"name": "logreg"},
            "client": {"local_steps": 2, "batch_size": 8}, "server": {"clients_per_round": 3},
            "run": {"rounds": 2}}
    for name, fields in sections.items():
        base[name] = {**base.get(name, {}), **fields}
    return from_dict(base)


def _two_rounds(exp):
    state = exp.initial_state
    for r in range(2):
        state, _ = exp.step(state, r)
    return _leaves(state.params)


@pytest.mark.parametrize("name", ["fedsgd", "fedprox"])
def test_algorithm_constructors_train_exactly_as_the_config_names(name):
    """``fedsgd()`` / ``fedprox(mu)`` passed to a FedAvg config train bit for bit as ``server.algorithm`` does."""
    named = (_fedavg_config(server={"algorithm": "fedsgd"}) if name == "fedsgd" else
             _fedavg_config(server={"algorithm": "fedprox"}, client={"prox_mu": 0.7}))
    passed = algorithms.fedsgd() if name == "fedsgd" else algorithms.fedprox(0.7)
    by_name, by_value = Experiment(named), Experiment(_fedavg_config(), algorithm=passed)
    np.testing.assert_array_equal(by_value.settings.local_steps, by_name.settings.local_steps)
    np.testing.assert_array_equal(by_value.settings.prox_mu, by_name.settings.prox_mu)
    for got, want in zip(_two_rounds(by_value), _two_rounds(by_name)):
        np.testing.assert_array_equal(got, want)


def test_dp_fedavg_passed_in_is_the_configured_mechanism_and_its_accounting():
    """A DP-FedAvg mechanism passed as ``dp_fedavg(mechanism)`` trains and accounts as the config's own."""
    configured = Experiment(_fedavg_config(server={"central_clip_norm": 0.5, "central_noise_multiplier": 1.1}))
    passed = Experiment(_fedavg_config(), algorithm=algorithms.dp_fedavg(configured.client_level, 0.5))
    assert passed.program.aggregation == configured.program.aggregation and passed.cohort_slots == configured.cohort_slots
    states = []
    for exp in (configured, passed):
        state = exp.initial_state
        for r in range(2):
            state, _ = exp.step(state, r)
        states.append(state)
    for got, want in zip(_leaves(states[1].params), _leaves(states[0].params)):
        np.testing.assert_array_equal(got, want)
    assert passed.privacy.client_level_epsilon() == configured.privacy.client_level_epsilon() > 0


def test_algorithm_errors_name_what_is_wrong():
    mechanism = Experiment(_fedavg_config(server={"central_clip_norm": 0.5,
                                                  "central_noise_multiplier": 1.1})).client_level
    with pytest.raises(ValueError, match="control-variate"):
        algorithms.dp_fedavg(mechanism, 0.5, algorithms.SCAFFOLD)
    with pytest.raises(ValueError, match=r"clip_norm=inf"):
        algorithms.dp_fedavg(mechanism, float("inf"))
    with pytest.raises(ValueError, match=r"mu=-1"):
        algorithms.fedprox(-1.0)
    with pytest.raises(ValueError, match=r"num_clients=6 but the run has 5"):
        Experiment(_fedavg_config(data={"num_clients": 5}), algorithm=algorithms.dp_fedavg(mechanism, 0.5))
    with pytest.raises(ValueError, match="give one of them"):
        Experiment(_fedavg_config(server={"central_clip_norm": 0.5}), algorithm=algorithms.dp_fedavg(mechanism, 0.5))
    # 100 clients, 10 expected per round: the static slots are fewer than C + 1, so a cohort can overflow them.
    unpadded = ClientLevelDpFedAvg(noise_multiplier=1.0, num_clients=100, expected_cohort=10, poisson=True)
    with pytest.raises(ValueError, match=r"cohort_truncation_probability=0 but the run's Poisson cohort"):
        Experiment(_fedavg_config(data={"num_clients": 100}, server={"client_sampling": "poisson",
                                                                     "clients_per_round": 10}),
                   algorithm=algorithms.dp_fedavg(unpadded, 0.5))
    chatty = algorithms.FEDAVG._replace(name="chatty", client_finish=lambda delta, steps, lr, server, client: (
        jax.tree_util.tree_map(jnp.zeros_like, delta), client))
    # What may run under DP is read from the declared capability, and the round holds the declaration to what
    # client_finish returns: an undeclared extra message, or a declared one that never comes, is refused.
    exp = Experiment(_fedavg_config(), algorithm=algorithms.dp_fedavg(mechanism, 0.5, chatty))
    with pytest.raises(ValueError, match="'dp_chatty' declares extra_message=False but its client_finish sends an "
                                         "extra message"):
        exp.step(exp.initial_state, 0)
    with pytest.raises(ValueError, match=r"'chatty' with client-level DP \(dp_fedavg\) is invalid"):
        algorithms.dp_fedavg(mechanism, 0.5, chatty._replace(extra_message=True))
    with pytest.raises(ValueError, match=r"'scaffold' with local DP \(message.local_noise_multiplier > 0\)"):
        Experiment(_fedavg_config(message={"clip_norm": 1.0, "local_noise_multiplier": 1.0}),
                   algorithm=algorithms.SCAFFOLD)  # passed in: the config's own check does not see it
    quiet = Experiment(_fedavg_config(), algorithm=algorithms.FEDAVG._replace(name="quiet", extra_message=True))
    with pytest.raises(ValueError, match="'quiet' declares extra_message=True but its client_finish sends no"):
        quiet.step(quiet.initial_state, 0)


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_the_config_refuses_dp_for_exactly_the_built_in_algorithms_that_release_an_extra_message(name):
    algorithm = algorithms.algorithm_for(name)
    assert algorithm.name == name  # one list of names: the config's choices are the algorithms built
    asks = [{"server": {"central_clip_norm": 1.0, "central_noise_multiplier": 1.0, "clients_per_round": 5}},
            {"message": {"clip_norm": 1.0, "local_noise_multiplier": 1.0}}]
    prox = {"client": {"prox_mu": 0.1}} if name == "fedprox" else {}
    for ask in asks:
        config = {**prox, **ask, "server": {**ask.get("server", {}), "algorithm": name}}
        if algorithm.extra_message:  # read off the algorithm's declared capability, not its name
            with pytest.raises(ValueError, match=f"server.algorithm='{name}': .*extra message"):
                from_dict(config)
        else:
            assert from_dict(config).server.algorithm == name
    assert algorithm.extra_message == (name == "scaffold")  # the one built-in that sends more than its update
