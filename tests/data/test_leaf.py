"""LEAF's JSON format read from files the tests write: one client per user (users spread over several files),
LEAF's per-user train/test split, FEMNIST as images and Shakespeare as next-character sequences, and a clear
error for every malformed or missing piece."""

import json
import os

import numpy as np
import pytest

from fedjaxpriv.config import ExperimentConfig, with_overrides
from fedjaxpriv.data import leaf, text

LETTERS = "abcdefghij ,.!"


def write_split(directory, files):
    """files: list of {user: (xs, ys)}, one JSON file each, in LEAF's format."""
    os.makedirs(directory, exist_ok=True)
    for i, users in enumerate(files):
        content = {"users": list(users), "num_samples": [len(ys) for _, ys in users.values()],
                   "user_data": {u: {"x": xs, "y": ys} for u, (xs, ys) in users.items()}}
        with open(os.path.join(directory, f"all_data_{i}.json"), "w") as f:
            json.dump(content, f)


def shakespeare_dir(root, rng, users=5):
    def lines(n):
        strings = ["".join(rng.choice(list(LETTERS), 81)) for _ in range(n)]
        return [s[:80] for s in strings], [s[80] for s in strings]

    train = {f"ROLE_{i}": lines(3 + i) for i in range(users)}
    test = {f"ROLE_{i}": lines(2) for i in range(users)}
    test["ROLE_0"][0][0] = test["ROLE_0"][0][0][0] + "#" + test["ROLE_0"][0][0][2:]  # no training user has "#"
    names = list(train)
    write_split(root / "train", [{u: train[u] for u in names[:2]}, {u: train[u] for u in names[2:]}])
    write_split(root / "test", [test])
    return train, test


def test_shakespeare_users_become_clients_of_next_character_sequences(tmp_path):
    train, test = shakespeare_dir(tmp_path, np.random.default_rng(0))
    population, test_set, classes = leaf.load_leaf("leaf:shakespeare", str(tmp_path), 5, seed=0)
    vocabulary = text.build_vocabulary((s + c for xs, ys in train.values() for s, c in zip(xs, ys)), "char", 10_000)
    assert classes == len(vocabulary) and "#" not in vocabulary.tokens
    assert population.num_clients == 5 and population.counts.tolist() == [3, 4, 5, 6, 7]
    assert population.x.dtype == np.int32 and population.x.shape[1:] == (80,)
    for client, user in enumerate(sorted(train)):
        xs, ys = train[user]
        rows = population.client(client)
        for row, (string, following) in enumerate(zip(xs, ys)):
            assert vocabulary.decode(rows.x[row]) == list(string)
            assert vocabulary.decode(rows.y[row]) == list(string[1:] + following)  # shifted by one, then y
    # The test set: the users' own test lines; the unseen character is out of vocabulary, masked as a target.
    assert test_set.x.shape == (10, 80) and test_set.x[0, 1] == text.OOV and test_set.y[0, 0] == text.MASKED
    first = test["ROLE_0"][0][0]
    assert test_set.y[0, 1] == vocabulary.tokens.index(first[2]) and (test_set.y >= 0).sum() == 10 * 80 - 1


def test_femnist_users_become_clients_of_images_and_a_subset_is_seeded(tmp_path):
    rng = np.random.default_rng(1)
    train = {f"f{i:04d}": (rng.uniform(size=(2 + i, 784)).round(3).tolist(), rng.integers(0, 62, 2 + i).tolist())
             for i in range(6)}
    test = {u: (rng.uniform(size=(1, 784)).round(3).tolist(), [int(rng.integers(62))]) for u in train}
    write_split(tmp_path / "train", [dict(list(train.items())[:3]), dict(list(train.items())[3:])])
    write_split(tmp_path / "test", [test])
    population, test_set, classes = leaf.load_leaf("leaf:femnist", str(tmp_path), 6, seed=0)
    assert classes == 62 and population.x.shape[1:] == (28, 28, 1) and population.x.dtype == np.float32
    np.testing.assert_array_equal(population.client(4).x.reshape(-1, 784), np.asarray(train["f0004"][0], np.float32))
    assert population.client(4).y.tolist() == train["f0004"][1] and len(test_set) == 6
    subset, subset_test, _ = leaf.load_leaf("leaf:femnist", str(tmp_path), 3, seed=7)
    again, _, _ = leaf.load_leaf("leaf:femnist", str(tmp_path), 3, seed=7)
    np.testing.assert_array_equal(subset.x, again.x)  # the same users for the same seed
    assert subset.num_clients == 3 and len(subset_test) == 3
    sizes = {len(ys) for _, ys in train.values()}
    assert set(subset.counts.tolist()) <= sizes


def test_celeba_users_become_clients_of_their_raw_images_resized_as_leaf_reads_them(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    (tmp_path / "raw" / "img_align_celeba").mkdir(parents=True)
    pixels = {}
    for i in range(7):  # 84 x 84 RGB images are read exactly (resizing to their own size changes nothing)
        pixels[f"{i:06d}.png"] = rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)
        Image.fromarray(pixels[f"{i:06d}.png"]).save(tmp_path / "raw" / "img_align_celeba" / f"{i:06d}.png")
    gray = rng.integers(0, 256, (218, 178), dtype=np.uint8)  # CelebA's own size, in gray: 3 equal channels
    Image.fromarray(gray).save(tmp_path / "raw" / "img_align_celeba" / "gray.png")
    train = {"u1": (["000000.png", "gray.png"], [1, 0]), "u0": (["000001.png", "000002.png", "000003.png"], [0, 0, 1])}
    test = {"u0": (["000004.png"], [1]), "u1": (["000005.png", "000006.png"], [0, 1])}
    write_split(tmp_path / "train", [train])
    write_split(tmp_path / "test", [test])
    population, test_set, classes = leaf.load_leaf("leaf:celeba", str(tmp_path), 2, seed=0)
    assert classes == 2 and population.counts.tolist() == [3, 2] and population.x.shape[1:] == (84, 84, 3)
    for row, name in enumerate(train["u0"][0]):
        np.testing.assert_array_equal(population.client(0).x[row], pixels[name].astype(np.float32) / 255)
    assert population.client(0).y.tolist() == [0, 0, 1] and population.client(1).y.tolist() == [1, 0]
    resized = population.client(1).x[1]
    assert np.array_equal(resized[..., 0], resized[..., 2]) and abs(resized.mean() - gray.mean() / 255) < 0.01
    np.testing.assert_array_equal(test_set.x[2], pixels["000006.png"].astype(np.float32) / 255)  # u0's, then u1's
    assert test_set.y.tolist() == [1, 0, 1]
    (tmp_path / "raw" / "img_align_celeba" / "000003.png").unlink()
    with pytest.raises(ValueError, match=r"000003.png: a CelebA image LEAF's files name is not readable"):
        leaf.load_leaf("leaf:celeba", str(tmp_path), 2, seed=0)
    (tmp_path / "raw" / "img_align_celeba").rename(tmp_path / "raw" / "elsewhere")
    with pytest.raises(ValueError, match=r"img_align_celeba: no such directory; LEAF's CelebA x are file names"):
        leaf.load_leaf("leaf:celeba", str(tmp_path), 2, seed=0)


def test_sent140_users_become_clients_of_their_tweets_first_words_with_a_training_vocabulary(tmp_path):
    fields = lambda text: ["1467810369", "Mon Apr 06 22:19:45 PDT 2009", "NO_QUERY", "someone", text]  # noqa: E731
    long_tweet = " ".join(f"w{i}" for i in range(30))
    train = {"bob": ([fields("I love it, love it!"), fields(long_tweet)], [1, 0]),
             "amy": ([fields("so sad today")], [0])}
    test = {"amy": ([fields("love zebras")], [1]), "bob": ([fields("sad")], [0])}
    write_split(tmp_path / "train", [train])
    write_split(tmp_path / "test", [test])
    population, test_set, classes = leaf.load_leaf("leaf:sent140", str(tmp_path), 2, seed=0)
    vocabulary = text.build_vocabulary(["so sad today", "I love it, love it!", long_tweet], "word", 10_000)
    assert classes == 2 and population.x.dtype == np.int32 and population.x.shape == (3, 25)
    assert population.counts.tolist() == [1, 2] and population.y.tolist() == [0, 1, 0]  # amy, then bob
    assert vocabulary.decode(population.client(1).x[0][:7]) == ["i", "love", "it", ",", "love", "it", "!"]
    assert population.client(1).x[0][7:].tolist() == [text.PAD] * 18  # padding after the text
    assert vocabulary.decode(population.client(1).x[1]) == [f"w{i}" for i in range(25)]  # the first 25 words
    assert test_set.x[0][:2].tolist() == [vocabulary.tokens.index("love"), text.OOV]  # "zebras": not in training
    assert test_set.y.tolist() == [1, 0]


def test_missing_or_malformed_leaf_data_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"train: no such directory; data.data_dir must hold LEAF's train/ and "
                                         r"test/"):
        leaf.load_leaf("leaf:femnist", str(tmp_path), 1, seed=0)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(ValueError, match=r"train: no LEAF JSON files"):
        leaf.load_leaf("leaf:femnist", str(tmp_path), 1, seed=0)
    bad = tmp_path / "train" / "part.json"
    bad.write_text(json.dumps({"users": ["u"], "num_samples": [2], "user_data": {"u": {"x": [[0.0] * 784], "y": [1]}}}))
    with pytest.raises(ValueError, match=r"part.json: user 'u' has 1 x, 1 y and num_samples 2"):
        leaf.load_leaf("leaf:femnist", str(tmp_path), 1, seed=0)
    bad.write_text(json.dumps({"users": ["u"]}))
    with pytest.raises(ValueError, match=r"part.json: not a LEAF file: expected keys users, num_samples, user_data; "
                                         r"found \['users'\]"):
        leaf.load_leaf("leaf:femnist", str(tmp_path), 1, seed=0)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"part.json: not readable as JSON"):
        leaf.load_leaf("leaf:femnist", str(tmp_path), 1, seed=0)
    write_split(tmp_path / "train", [{"u": ([[0.0] * 784], [1])}])
    bad.unlink()
    write_split(tmp_path / "test", [{"u": ([[0.0] * 784], [1])}])
    with pytest.raises(ValueError, match=r"data.num_clients=2 but .*'s number of users with training data has 1"):
        leaf.load_leaf("leaf:femnist", str(tmp_path), 2, seed=0)


def test_the_config_refuses_unsupported_leaf_data_and_a_missing_directory_before_any_work():
    with pytest.raises(ValueError, match=r"LEAF's reddit is not supported: its x are pre-tokenised"):
        with_overrides(ExperimentConfig(), ["data.dataset=leaf:reddit"])
    with pytest.raises(ValueError, match=r"model.name='lstm' does not fit data.dataset='leaf:sent140': its examples "
                                         r"are token sequences with a class label each; use one of "
                                         r"\['lstm_classifier'\]"):
        with_overrides(ExperimentConfig(), ["data.dataset=leaf:sent140", "data.data_dir=/x", "model.name=lstm"])
    with pytest.raises(ValueError, match=r"data.data_dir=None is invalid; allowed: the directory of a local copy of "
                                         r"LEAF's femnist data"):
        with_overrides(ExperimentConfig(), ["data.dataset=leaf:femnist"])
    with pytest.raises(ValueError, match=r"model.name='mlp' does not fit data.dataset='leaf:shakespeare'"):
        with_overrides(ExperimentConfig(), ["data.dataset=leaf:shakespeare", "data.data_dir=/x"])


@pytest.mark.slow
def test_a_shakespeare_run_trains_the_lstm_on_leaf_files(tmp_path):
    from fedjaxpriv.experiment import Experiment

    shakespeare_dir(tmp_path, np.random.default_rng(2))
    config = with_overrides(ExperimentConfig(), [
        "data.dataset=leaf:shakespeare", f"data.data_dir={tmp_path}", "data.num_clients=5", "model.name=lstm",
        "model.hidden=[16]", "server.clients_per_round=5", "run.rounds=2", "run.eval_every=2", "client.batch_size=2",
        "client.local_steps=2"])
    experiment = Experiment(config)
    record = experiment.run(progress=False).history[-1]
    assert experiment.config.data.dataset == "leaf:shakespeare"  # the files' provenance is the config's
    assert record["test_tokens"] == 10 * 80 - 1  # every test target but the unseen character
    assert np.isfinite(record["test_perplexity"]) and record["participants"] == 5
