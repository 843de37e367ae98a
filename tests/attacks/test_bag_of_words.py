"""The bag-of-words attack on a keyboard model's messages (Melis et al. 2019): exact without a defense, for
FedSGD and multi-step FedAvg, unchanged by a defense that only rescales the message, and down to chance under
DP-SGD; its pieces checked on hand-made tables."""

import numpy as np
import pytest

from fedjaxpriv.attacks import bag_of_words
from fedjaxpriv.config import ExperimentConfig, with_overrides
from fedjaxpriv.data import text
from fedjaxpriv.data.federated import from_client_lists
from fedjaxpriv.models import NEXT_TOKEN


def test_the_embedding_table_is_found_by_name_and_vocabulary_size():
    tree = {"Dense_0": {"kernel": np.zeros((3, 8, 9))}, "Embed_0": {"embedding": np.ones((3, 9, 4))}}
    assert bag_of_words.embedding_table(tree, 9).shape == (3, 9, 4)
    assert bag_of_words.embedding_table(tree, 8) is None  # the dense kernel is not an embedding


def test_support_precision_and_recall_leave_out_the_special_rows():
    truth = np.array([[False, False, True, True, False, False],
                      [False, False, False, False, True, False]])
    scores = np.array([[9.0, 9.0, 0.5, 0.0, 0.2, 0.0],  # PAD and OOV rows are not words: ignored
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    precision, recall = bag_of_words.support_precision_recall(scores, truth)
    np.testing.assert_allclose(precision, [0.5, np.nan])  # 2 predicted, 1 right; nothing predicted
    np.testing.assert_allclose(recall, [0.5, 0.0])
    population = from_client_lists([np.array([[2, 3, 0]]), np.array([[1, 4, 4]])], [np.zeros((1, 3))] * 2)
    np.testing.assert_array_equal(bag_of_words.typed_words(population, [0, 1], 6), truth)


def personal_vocabularies(seed=0, clients=12, vocabulary=120, own=25, typed=200):
    """Users who each type from their own random 25 of 120 words: what they typed differs between them."""
    rng = np.random.default_rng(seed)
    words = [f"w{i:03d}" for i in range(vocabulary)]

    def user(n):
        mine = rng.choice(vocabulary, own, replace=False)
        return " ".join(words[i] for i in rng.choice(mine, n))

    train, test = [user(typed) for _ in range(clients)], [user(40) for _ in range(4)]
    vocab = text.build_vocabulary(train, "word", 1000)
    population, test_set = text.text_population(train, test, vocab, 20)
    return population, test_set, len(vocab)


def attack(extra, data):
    from fedjaxpriv.experiment import Experiment

    population, test_set, classes = data
    config = with_overrides(ExperimentConfig(), [
        "data.dataset=keyboard", "model.name=lstm", "model.hidden=[32]", "data.num_clients=12",
        "server.clients_per_round=12", "run.rounds=1", "run.eval_every=1", "client.local_steps=5", "client.lr=1.0",
        "run.tap_clients=[0,1,2,3,4,5,6,7,8,9,10,11]", "run.tap_rounds=[1]", *extra])
    with pytest.warns(UserWarning, match="not used, since the population passed in"):
        experiment = Experiment(config, population=population, test=test_set, num_classes=classes, loss=NEXT_TOKEN)
    results = experiment.run(progress=False)
    metrics, _ = bag_of_words.attack_taps(experiment, results.taps, bootstrap=200)
    return metrics


@pytest.mark.slow
def test_messages_give_away_the_bag_of_words_until_dp_sgd_noise_hides_it():
    data = personal_vocabularies()
    words = data[2] - len(bag_of_words.SPECIAL_IDS)
    for algorithm in ([], ["server.algorithm=fedsgd"]):  # 5 local steps, and one full-batch step
        undefended = attack(algorithm, data)
        assert undefended["support_precision"] == undefended["support_recall"] == undefended["auc"] == 1.0
        assert undefended["words_typed"] == 25.0 and undefended["clients"] == 12.0
    # Clipping the message only rescales it: no row becomes zero or non-zero, the ranking is the same.
    assert attack(["message.clip_norm=0.01"], data) == undefended
    private = attack(["client.dp_clip_norm=1.0", "client.target_epsilon=1"], data)
    # Noise makes every row non-zero: the exact-support attack predicts every word (precision = the base rate),
    # and the ranking by row norm is near chance, far from the undefended 1.0.
    assert private["support_precision"] == pytest.approx(25.0 / words) and private["support_recall"] == 1.0
    assert private["auc_high"] < 0.6
