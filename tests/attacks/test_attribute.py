"""Model-based attribute inference on a tabular population with a sensitive attribute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv.attacks import attribute
from fedjaxpriv.config import ClientConfig, DataConfig, ExperimentConfig, ModelConfig, RunConfig, ServerConfig
from fedjaxpriv.experiment import Experiment
from fedjaxpriv.models import get_model


def test_population_attribute_is_last_column_and_clients_have_majorities():
    population, test, test_attr = attribute.attribute_population(0, num_clients=50, examples_per_client=40, dim=6)
    np.testing.assert_array_equal(population.x[:, -1].astype(np.int32), population.attributes)
    np.testing.assert_array_equal(test.x[:, -1].astype(np.int32), test_attr)
    shares = np.array([population.attributes[o:o + c].mean() for o, c in zip(population.offsets, population.counts)])
    # Beta(0.5, 0.5) shares: E|p - 1/2| = 1/pi ~ 0.318 vs 0.5 * sqrt(2 / (pi * 40)) ~ 0.063 for p = 1/2 everywhere.
    assert np.mean(np.abs(shares - 0.5)) > 0.2
    with pytest.raises(ValueError, match="group_concentration"):
        attribute.attribute_population(0, group_concentration=0.0)


def test_attack_picks_lowest_loss_completion():
    """On a hand-built model whose loss depends only on the attribute column, the attack recovers it."""
    model = get_model("logreg", (3,), 2)
    params = jax.tree_util.tree_map(jnp.zeros_like, model.init(jax.random.key(0)))
    params["Dense_0"]["kernel"] = jnp.array([[0.0, 0.0], [0.0, 0.0], [-5.0, 5.0]])
    x = jnp.zeros((6, 3))
    y = jnp.array([0, 1, 1, 0, 1, 0])   # label 1 is likely exactly when the attribute is 1
    guess = attribute.infer_attributes(model.apply, params, x, y, jnp.array([0.0, 1.0]), column=2)
    np.testing.assert_array_equal(guess, y)
    report = attribute.attribute_report(np.asarray(guess), np.asarray(y))
    assert report["accuracy"] == 1.0 and report["baseline"] == 0.5


def test_attack_on_client_models_beats_majority_baseline():
    population, test, _ = attribute.attribute_population(0, num_clients=20, examples_per_client=64)
    rounds, targets = 5, tuple(range(8))
    config = ExperimentConfig(
        data=DataConfig(dataset="synthetic", num_clients=20), model=ModelConfig(name="mlp", hidden=(32,)),
        client=ClientConfig(local_steps=20, batch_size=16, lr=0.1), server=ServerConfig(clients_per_round=20),
        run=RunConfig(rounds=rounds, eval_every=rounds, checkpoint_every=0, tap_clients=targets,
                      tap_rounds=(rounds,)))
    experiment = Experiment(config, population=population, test=test, num_classes=2)
    tap = experiment.run(progress=False).taps[rounds]
    assert sorted(tap.client_ids.tolist()) == list(targets)  # everyone takes part, so every target is observed
    local = jax.tree_util.tree_map(lambda p, m: p[None] + m, tap.server_params, tap.messages)
    data = population.padded(tap.client_ids)
    column = population.input_shape[0] - 1
    guesses = jax.vmap(lambda p, x, y: attribute.infer_attributes(experiment.model.apply, p, x, y,
                                                                  jnp.array([0.0, 1.0]), column=column))(
        local, data.x, data.y)
    true = data.x[..., column].astype(np.int32)
    report = attribute.attribute_report(np.asarray(guesses)[data.mask], true[data.mask])
    # Binomial std of an accuracy near the baseline over n guesses: <= 0.5 / sqrt(n).
    sigma = 0.5 / np.sqrt(report["num_examples"])
    assert report["accuracy"] > report["baseline"] + 4 * sigma, report
    majority = np.asarray(jax.vmap(attribute.client_majority)(guesses, data.mask))
    true_majority = (np.sum(true * data.mask, 1) * 2 >= data.mask.sum(1)).astype(int)
    assert np.mean(majority == true_majority) >= 0.75
