"""The keyboard task end to end: federated next-word prediction on users' own typing learns the corpus's
next-word rule up to the Bayes-optimal accuracy, and runs with every defense."""

import math

import numpy as np
import pytest

from fedjaxpriv.config import ExperimentConfig, with_overrides
from fedjaxpriv.data import text
from fedjaxpriv.experiment import Experiment

BASE = ["data.dataset=keyboard", "model.name=lstm", "model.hidden=[64]", "data.num_clients=50",
        "server.clients_per_round=10", "client.lr=1.0", "client.local_steps=10"]


@pytest.mark.slow
def test_federated_lstm_learns_the_next_word_rule_up_to_the_bayes_accuracy():
    """After word w the corpus types its successor with probability 0.8, else a uniform word: no predictor beats
    top-1 accuracy 0.8 + 0.2 / 50 = 0.804. Trained on 50 users' own text, the model reaches it within four binomial
    standard errors of the test tokens, and does not exceed it by more."""
    config = with_overrides(ExperimentConfig(), [*BASE, "run.rounds=30", "run.eval_every=30"])
    experiment = Experiment(config)
    assert experiment.population.x.dtype == np.int32 and experiment.config.model.name == "lstm; loss: next_token"
    record = experiment.run(progress=False).history[-1]
    _, _, rule = text.keyboard_corpus(config.run.seed, config.data.num_clients)
    tokens = record["test_tokens"]
    for key, k in (("test_accuracy", 1), ("test_top3_accuracy", 3)):
        best = rule.best_accuracy(k)
        error = math.sqrt(best * (1 - best) / tokens)
        assert best - 4 * error < record[key] < best + 4 * error, (key, record[key], best)
    # The Bayes predictor's cross-entropy is the rule's entropy per word: the model's cannot be far below it.
    follow, words = rule.follow, len(rule.words)
    top, rest = follow + (1 - follow) / words, (1 - follow) / words
    entropy = -(top * math.log(top) + (words - 1) * rest * math.log(rest))
    assert entropy - 0.1 < record["test_loss"] < math.log(words) and record["test_perplexity"] == pytest.approx(
        math.exp(record["test_loss"]))


@pytest.mark.slow
@pytest.mark.parametrize("defense, check", [
    (["client.dp_clip_norm=1.0", "client.target_epsilon=4"],
     lambda r: 0.98 * 4 <= r["epsilon_max"] <= 4.0),  # per example = per sequence
    (["server.central_clip_norm=1.0", "server.target_epsilon=4", "server.client_sampling=poisson"],
     lambda r: 0.98 * 4 <= r["client_level_epsilon"] <= 4.0),
    (["client.prune_sparsity=0.5"], lambda r: r["bytes_per_client"] < 0.6 * r["dense_bytes"]),
    (["message.quant_bits=4"], lambda r: r["bytes_per_client"] < 0.2 * r["dense_bytes"]),
])
def test_every_defense_runs_on_the_text_task(defense, check):
    small = [*BASE, "model.hidden=[16]", "data.num_clients=20", "server.clients_per_round=5", "run.rounds=2",
             "run.eval_every=2", "client.local_steps=3"]
    experiment = Experiment(with_overrides(ExperimentConfig(), [*small, *defense]))
    record = dict(experiment.run(progress=False).history[-1], dense_bytes=4.0 * experiment.num_params)
    assert record["test_tokens"] > 0 and np.isfinite(record["test_loss"])
    assert check(record), record


def test_a_text_dataset_needs_a_token_model_and_an_image_dataset_an_image_model():
    with pytest.raises(ValueError, match=r"model.name='mlp' does not fit data.dataset='keyboard'.*'lstm', "
                                         r"'transformer'"):
        with_overrides(ExperimentConfig(), ["data.dataset=keyboard"])
    with pytest.raises(ValueError, match=r"model.name='lstm' does not fit data.dataset='digits'"):
        with_overrides(ExperimentConfig(), ["model.name=lstm"])
