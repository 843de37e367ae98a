"""Attribute inference on a tabular population with a sensitive attribute, against baselines without messages."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjaxpriv.attacks import attribute
from fedjaxpriv.config import ClientConfig, DataConfig, ExperimentConfig, ModelConfig, RunConfig, ServerConfig
from fedjaxpriv.experiment import Experiment
from fedjaxpriv.models import get_model

ROUNDS, TARGETS = 5, tuple(range(8))


@functools.cache
def attribute_run(dp: bool):
    """A seeded FedAvg run on ``attribute_population`` (20 clients, all in every round), every round tapped for
    clients 0-7; ``dp``: client DP-SGD at epsilon 1 (clip 1). Shared with test_reconstruction."""
    population, test, _ = attribute.attribute_population(0, num_clients=20, examples_per_client=64)
    client = ClientConfig(local_steps=20, batch_size=16, lr=0.1,
                          **({"dp_clip_norm": 1.0, "target_epsilon": 1.0} if dp else {}))
    config = ExperimentConfig(
        data=DataConfig(dataset="synthetic", num_clients=20), model=ModelConfig(name="mlp", hidden=(32,)),
        client=client, server=ServerConfig(clients_per_round=20),
        run=RunConfig(rounds=ROUNDS, eval_every=ROUNDS, checkpoint_every=0, num_devices=1, strategy="loop",
                      delta=1e-3, tap_clients=TARGETS, tap_rounds=tuple(range(1, ROUNDS + 1))))
    experiment = Experiment(config, population=population, test=test, num_classes=2)
    return experiment, experiment.run(progress=False)


def dense_params(seed: int, widths: tuple[int, ...]) -> dict:
    """Random parameters of a stack of flax Dense layers (``Dense_i``) of the given widths, input first."""
    rng = np.random.default_rng(seed)
    return {f"Dense_{i}": {"kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
                           "bias": jnp.asarray(0.1 * rng.normal(size=b), jnp.float32)}
            for i, (a, b) in enumerate(itertools.pairwise(widths))}


@pytest.fixture(scope="module")
def attacks():
    """attribute_attack_on_taps on the run without DP and with DP-SGD at epsilon 1."""
    return {dp: attribute.attribute_attack_on_taps(attribute_run(dp)[0], attribute_run(dp)[1].taps)
            for dp in (False, True)}


def test_population_attribute_is_last_column_and_clients_have_majorities():
    population, test, test_attr = attribute.attribute_population(0, num_clients=50, examples_per_client=40, dim=6)
    np.testing.assert_array_equal(population.x[:, -1].astype(np.int32), population.attributes)
    np.testing.assert_array_equal(test.x[:, -1].astype(np.int32), test_attr)
    shares = np.array([population.attributes[o:o + c].mean() for o, c in zip(population.offsets, population.counts)])
    # Beta(0.5, 0.5) shares: E|p - 1/2| = 1/pi ~ 0.318 vs 0.5 * sqrt(2 / (pi * 40)) ~ 0.063 for p = 1/2 everywhere.
    assert np.mean(np.abs(shares - 0.5)) > 0.2
    with pytest.raises(ValueError, match="group_concentration"):
        attribute.attribute_population(0, group_concentration=0.0)


def test_attack_picks_lowest_loss_completion_and_prior_overrides_it():
    """On a hand-built model whose loss depends only on the attribute column, the attack recovers it."""
    model = get_model("logreg", (3,), 2)
    params = {"Dense_0": {"kernel": jnp.array([[0.0, 0.0], [0.0, 0.0], [-5.0, 5.0]]), "bias": jnp.zeros(2)}}
    x = jnp.zeros((6, 3))
    y = jnp.array([0, 1, 1, 0, 1, 0])   # label 1 is likely exactly when the attribute is 1
    guess = attribute.infer_attributes(model.apply, params, x, y, jnp.array([0.0, 1.0]), column=2)
    np.testing.assert_array_equal(guess, y)
    report = attribute.attribute_report(np.asarray(guess), np.asarray(y))
    assert report["accuracy"] == 1.0 and report["baseline"] == 0.5
    # With label 1 the completion s = 1 has loss log(1 + e^-10) ~ 0 and s = 0 has log 2 ~ 0.69: a log prior of
    # -1 on value 1 outweighs that gap, one of -0.5 does not (with label 0, s = 0 is ahead by ~9.3 nats).
    for log_odds, expected in ((-1.0, np.zeros(6)), (-0.5, y)):
        prior = jnp.array([0.0, log_odds])
        np.testing.assert_array_equal(attribute.infer_attributes(model.apply, params, x, y, jnp.array([0.0, 1.0]),
                                                                 column=2, log_prior=prior), expected)


def test_paired_advantage_is_the_exact_mcnemar_interval():
    rng = np.random.default_rng(0)
    correct, baseline = rng.random(300) < 0.7, rng.random(300) < 0.6
    got = attribute.paired_advantage(correct, baseline, alpha=0.1)
    wins, losses = int(np.sum(correct & ~baseline)), int(np.sum(~correct & baseline))
    ci = stats.binomtest(wins, wins + losses).proportion_ci(confidence_level=0.9, method="exact")
    scale = (wins + losses) / 300
    assert got["discordant"] == wins + losses
    np.testing.assert_allclose(got["advantage"], (wins - losses) / 300)
    np.testing.assert_allclose([got["advantage_low"], got["advantage_high"]],
                               [scale * (2 * ci.low - 1), scale * (2 * ci.high - 1)], rtol=1e-9)
    # 3 of 4 examples only the attack gets right: q's 95% interval is [0.025^(1/3), 1], so the advantage's is
    # [3/4 (2 * 0.025^(1/3) - 1), 3/4].
    got = attribute.paired_advantage(np.array([1, 1, 1, 0]), np.zeros(4))
    np.testing.assert_allclose([got["advantage"], got["advantage_low"], got["advantage_high"]],
                               [0.75, 0.75 * (2 * 0.025 ** (1 / 3) - 1), 0.75], rtol=1e-9)
    same = attribute.paired_advantage(correct, correct)
    assert (same["advantage"], same["advantage_low"], same["advantage_high"], same["discordant"]) == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="must be equal"):
        attribute.paired_advantage(correct, baseline[:-1])


@pytest.mark.slow
def test_match_updates_recovers_attributes_from_exact_gradient_messages():
    """At the run's global models, messages that are -c_r times the summed loss gradient of a client's examples
    with their true attributes give the attributes back; messages of pure noise give no confident guess."""
    experiment, results = attribute_run(False)
    apply_fn, column = experiment.model.apply, experiment.population.input_shape[0] - 1
    data = experiment.population.client(9)             # not a tapped client: its data is all the test uses
    x, y = jnp.asarray(data.x), jnp.asarray(data.y)
    s = np.asarray(data.x[:, column])
    count = y.shape[0] - 2                                # the last two rows are padding: not in the messages

    @jax.jit
    @jax.grad
    def summed_loss_grad(p, inputs, labels):
        logits = apply_fn(p, inputs)
        return jnp.sum(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0])

    thetas = [results.taps[r].server_params for r in range(1, ROUNDS + 1)]
    messages = [jax.tree_util.tree_map(lambda g, c=c: -c * g, summed_loss_grad(t, x[:count], y[:count]))
                for t, c in zip(thetas, (1e-4, 2e-4, 5e-5, 1e-4, 3e-4))]
    stack = lambda trees: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)
    hidden = x.at[:, column].set(0.5)                    # the attacker does not know the column
    mask = jnp.arange(y.shape[0]) < count
    fit = lambda m: np.asarray(attribute.match_updates(apply_fn, stack(thetas), stack(m), hidden, y,
                                                       jnp.array([0.0, 1.0]), mask, math.inf, column=column,
                                                       iterations=30))
    relaxed, real = fit(messages), np.asarray(mask)
    assert np.mean((relaxed[real] > 0.5) == (s[real] > 0.5)) >= 0.95
    assert np.mean(np.abs(relaxed[real] - 0.5)) > 0.3       # mostly confident: near 0 or 1
    np.testing.assert_array_equal(relaxed[~real], 0.0)
    np.testing.assert_allclose(attribute.client_share(relaxed, mask), (np.sum(s[real]) + 1) / (count + 2), atol=0.02)
    rng = np.random.default_rng(7)
    noise = [jax.tree_util.tree_map(lambda m: 1e-2 * rng.normal(size=m.shape).astype(np.float32), m) for m in messages]
    guessed = fit(noise)
    assert np.mean(np.abs(guessed[real] - 0.5)) < 0.1, guessed


@pytest.mark.slow
def test_attack_on_client_models_beats_majority_baseline():
    experiment, results = attribute_run(False)
    population, tap = experiment.population, results.taps[ROUNDS]
    assert sorted(tap.client_ids.tolist()) == list(TARGETS)  # everyone takes part, so every target is observed
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


@pytest.mark.slow
def test_server_attack_on_taps_beats_both_baselines_without_dp(attacks):
    out = attacks[False]
    assert out["num_clients"] == len(TARGETS) and out["num_examples"] == 64 * len(TARGETS)
    # The global model already beats always guessing the population's majority value; the messages add more.
    assert out["baseline_name"] == "global" and out["global_accuracy"] > out["majority_accuracy"] + 0.1, out
    assert out["advantage_low"] > 0.1 and out["accuracy_low"] > out["baseline"], out
    assert out["matching_advantage_low"] > 0.1 and out["share_error"] < 0.08, out


@pytest.mark.slow
def test_dp_sgd_removes_the_advantage(attacks):
    results = attribute_run(True)[1]
    assert results.history[-1]["epsilon_max"] <= 1.0 + 1e-6
    out, plain = attacks[True], attacks[False]
    assert out["advantage_low"] <= 0.0 <= out["advantage_high"], out
    assert out["advantage_high"] < plain["advantage_low"] / 4, (out, plain)
    assert out["matching_advantage_high"] < plain["matching_advantage_low"] / 4, (out, plain)
    # The shrinkage towards 1/2 keeps the noise-dominated share estimates from hurting the guess.
    assert out["accuracy"] >= out["global_accuracy"] - 0.02, out


def test_attack_on_taps_rejects_bad_targets_and_values():
    experiment, results = attribute_run(False)
    with pytest.raises(ValueError, match="client 9 took part in none"):
        attribute.attribute_attack_on_taps(experiment, results.taps, clients=[9])
    with pytest.raises(ValueError, match="values="):
        attribute.attribute_attack_on_taps(experiment, results.taps, values=(1.0, 1.0))
    with pytest.raises(ValueError, match="not among values"):
        attribute.attribute_attack_on_taps(experiment, results.taps, values=(0.0, 2.0))
