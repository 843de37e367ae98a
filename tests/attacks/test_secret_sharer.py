"""The Secret Sharer's exposure (Carlini et al. 2019): exact ranks on hand-made models, canaries typed into
clients' data, and a federated keyboard model that memorises them unless DP-SGD trains it."""

import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv.attacks import secret_sharer
from fedjaxpriv.data import text

CHANCE = 1 / math.log(2)  # mean exposure of a secret the model never saw: E[log2(|R| / uniform rank)]


def vocabulary_and_canaries(inserted=2, controls=3, secret_length=2):
    vocabulary = text.build_vocabulary(["hello there", secret_sharer.canary_words()], "word", 100)
    return vocabulary, secret_sharer.draw_canaries(vocabulary, 0, inserted, controls, secret_length=secret_length)


def test_a_model_that_knows_one_secret_exposes_it_fully_and_ties_rank_in_the_middle():
    vocabulary, canaries = vocabulary_and_canaries()
    assert canaries.space_size == 100 and canaries.inserted.shape == (2, 2) and canaries.controls.shape == (3, 2)
    known = canaries.inserted[0]

    def knows(params, tokens):  # next-token logits: the known secret's digits after the prefix, else flat
        logits = jnp.zeros(tokens.shape + (len(vocabulary),))
        p = len(canaries.prefix)
        logits = logits.at[:, p - 1, known[0]].set(5.0)
        return logits.at[:, p, known[1]].set(jnp.where(tokens[:, p] == known[0], 5.0, 0.0))

    exposure = secret_sharer.exposures(knows, None, canaries, canaries.inserted)
    assert exposure[0] == pytest.approx(math.log2(100))  # ranked first of 100
    flat = secret_sharer.exposures(lambda params, t: jnp.zeros(t.shape + (len(vocabulary),)), None, canaries,
                                   canaries.controls)
    np.testing.assert_allclose(flat, math.log2(100) - math.log2(1 + 99 / 2))  # all tie: the middle rank


def test_canaries_are_typed_repeatedly_by_their_clients_and_need_their_tokens_in_the_vocabulary():
    vocabulary, canaries = vocabulary_and_canaries()
    population, _ = text.text_population(["hello there hello", "there there hello there"], ["hello"], vocabulary, 4)
    typed = secret_sharer.insert(population, canaries, clients=[1, 1], repeats=3, length=4)
    assert typed.counts.tolist() == [population.counts[0], population.counts[1] + 6]
    last = typed.client(1)
    window = np.concatenate([canaries.prefix, canaries.inserted[1]])
    np.testing.assert_array_equal(last.x[-1], window[:-1][:4])
    np.testing.assert_array_equal(last.y[-1], window[1:5])
    with pytest.raises(ValueError, match=r"canary tokens \['my', 'pin', 'is', '0'"):
        secret_sharer.draw_canaries(text.build_vocabulary(["hello"], "word", 10), 0, 1, 1)


@pytest.mark.slow
def test_a_federated_keyboard_model_memorises_typed_secrets_and_dp_sgd_stops_it():
    from fedjaxpriv.config import ExperimentConfig, with_overrides
    from fedjaxpriv.experiment import Experiment
    from fedjaxpriv.models import NEXT_TOKEN

    train, test, _ = text.keyboard_corpus(0, 20)
    vocabulary = text.build_vocabulary(train + [secret_sharer.canary_words()], "word", 1000)
    population, test_set = text.text_population(train, test, vocabulary, 20)
    canaries = secret_sharer.draw_canaries(vocabulary, 0, inserted=5, controls=20)
    population = secret_sharer.insert(population, canaries, clients=[0, 1, 2, 3, 4], repeats=10, length=20)
    summaries = {}
    for name, extra in (("none", []), ("dpsgd", ["client.dp_clip_norm=1.0", "client.target_epsilon=8"])):
        config = with_overrides(ExperimentConfig(), [
            "data.dataset=keyboard", "model.name=lstm", "model.hidden=[64]", "data.num_clients=20",
            "server.clients_per_round=10", "run.rounds=5", "run.eval_every=5", "client.local_steps=10",
            "client.lr=1.0", *extra])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # data fields unused with a population passed in; DP at chance
            experiment = Experiment(config, population=population, test=test_set, num_classes=len(vocabulary),
                                    loss=NEXT_TOKEN)
            tracker = secret_sharer.ExposureTracker(canaries)
            experiment.run(progress=False, callbacks=[tracker])
        assert [round_ for round_, _, _ in tracker.history] == [5]
        summaries[name] = tracker.summary()
    # Controls were never typed: their exposures are draws with mean 1/ln 2 bits (sd about as large).
    for summary in summaries.values():
        assert abs(summary["exposure_control_mean"] - CHANCE) < 4 * CHANCE / math.sqrt(20)
        assert summary["exposure_bound"] == pytest.approx(math.log2(10**4))
    # Typed ten times each, the secrets are memorised undefended (far above chance); under DP-SGD they are not.
    assert summaries["none"]["exposure_inserted_mean"] > CHANCE + 5 * CHANCE / math.sqrt(5)
    assert summaries["dpsgd"]["exposure_inserted_mean"] < CHANCE + 4 * CHANCE / math.sqrt(5)
