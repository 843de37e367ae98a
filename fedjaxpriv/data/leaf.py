"""LEAF's federated datasets (Caldas et al. 2018) from a local copy: one client per user, LEAF's own per-user
train/test split kept.

A LEAF dataset directory (what LEAF's preprocessing writes, e.g. ``leaf/data/shakespeare/data``) holds ``train/``
and ``test/``, each with JSON files ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...],
"y": [...]}}}``; a user's examples may be spread over several files. Supported:

* ``femnist``: x 784 pixel values -> images [28, 28, 1] float32, y one of 62 classes (digits, upper, lower case);
* ``shakespeare``: x 80 characters, y the next one -> next-character prediction on 80-token sequences (inputs the
  80 characters, targets the same shifted by one, ending with y), with a character vocabulary built from the
  training users only (``data.text``);
* ``celeba``: x file names of the raw CelebA images, read from ``raw/img_align_celeba/`` beside ``train/`` and
  ``test/`` (LEAF's layout), as RGB resized to 84 x 84 (as LEAF's CelebA model reads them, bicubic) -> float32
  [84, 84, 3] in [0, 1]; y the binary attribute LEAF chose (smiling), 2 classes.

* ``sent140``: x a tweet's raw fields (id, date, query, user, text; or the text alone), y its sentiment 0 / 1 ->
  the text's first 25 words (as LEAF's model reads them) as token ids [25] (padding after), with a word vocabulary
  of the training users only (``data.vocabulary_size`` most frequent); 2 classes, for ``models.TOKEN_CLASSIFIERS``.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from fedjaxpriv.data import text
from fedjaxpriv.data.federated import Dataset, FederatedData, choose_clients, from_client_lists

LEAF_PREFIX = "leaf:"
LEAF_DATASETS = ("femnist", "shakespeare", "celeba", "sent140")
UNSUPPORTED = {"reddit": "its x are pre-tokenised comment trees, not yet read"}
FEMNIST_CLASSES = 62
SHAKESPEARE_LENGTH = 80
CELEBA_SIZE = 84  # pixels per side, as LEAF's CelebA model resizes them
CELEBA_IMAGES = os.path.join("raw", "img_align_celeba")
SENT140_LENGTH = 25  # words per tweet, as LEAF's Sent140 model reads them

UserData = dict[str, dict[str, list[Any]]]


def read_split(directory: str) -> UserData:
    """{user: {"x": [...], "y": [...]}} from every ``*.json`` file of one LEAF split directory, users merged
    across files in file-name order.

    Raises:
      ValueError: naming the directory or file, when the directory has no JSON file or a file is not LEAF's
        format (users, num_samples and user_data that agree).
    """
    files = sorted(glob.glob(os.path.join(directory, "*.json")))
    if not files:
        raise ValueError(f"{directory}: no LEAF JSON files (*.json) here; expected LEAF's preprocessed data, a "
                         "directory with train/ and test/ of files {\"users\", \"num_samples\", \"user_data\"}.")
    users: UserData = {}
    for path in files:
        try:
            with open(path) as f:
                content = json.load(f)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not readable as JSON ({error}).") from None
        _check_file(path, content)
        for user in content["users"]:
            data = content["user_data"][user]
            kept = users.setdefault(user, {"x": [], "y": []})
            kept["x"].extend(data["x"])
            kept["y"].extend(data["y"])
    return users


def _check_file(path: str, content: Any) -> None:
    if not isinstance(content, Mapping) or not {"users", "num_samples", "user_data"} <= set(content):
        found = sorted(content) if isinstance(content, Mapping) else type(content).__name__
        raise ValueError(f"{path}: not a LEAF file: expected keys users, num_samples, user_data; found {found}.")
    users, counts, data = content["users"], content["num_samples"], content["user_data"]
    if len(users) != len(counts):
        raise ValueError(f"{path}: {len(users)} users but {len(counts)} num_samples entries.")
    for user, count in zip(users, counts):
        entry = data.get(user) if isinstance(data, Mapping) else None
        if not isinstance(entry, Mapping) or "x" not in entry or "y" not in entry:
            raise ValueError(f"{path}: user {user!r} has no user_data entry with x and y.")
        if not len(entry["x"]) == len(entry["y"]) == count:
            raise ValueError(f"{path}: user {user!r} has {len(entry['x'])} x, {len(entry['y'])} y and num_samples "
                             f"{count}; they must agree.")


def dataset_name(name: str) -> str:
    """The LEAF dataset of ``data.dataset`` "leaf:<name>"; ValueError for one not supported, saying why."""
    leaf = name[len(LEAF_PREFIX):]
    if leaf in UNSUPPORTED:
        raise ValueError(f"data.dataset={name!r}: LEAF's {leaf} is not supported: {UNSUPPORTED[leaf]}; supported: "
                         f"{[LEAF_PREFIX + n for n in LEAF_DATASETS]}.")
    if leaf not in LEAF_DATASETS:
        raise ValueError(f"data.dataset={name!r} is not a LEAF dataset this loader reads; allowed: "
                         f"{[LEAF_PREFIX + n for n in LEAF_DATASETS]}.")
    return leaf


def load_leaf(name: str, directory: str | None, num_clients: int, seed: int, vocabulary_size: int = 10_000
              ) -> tuple[FederatedData, Dataset, int]:
    """A LEAF dataset as (population, test set, classes): ``num_clients`` users (all of them, or a seeded random
    subset in sorted-name order), each a client with its training examples; the test set holds the same users'
    test examples.

    Raises:
      ValueError: unsupported name, no directory, a missing split, malformed files, more clients than users.
    """
    leaf = dataset_name(name)
    if not directory:
        raise ValueError(f"data.dataset={name!r} reads a local copy of LEAF's data: set data.data_dir to the "
                         f"directory holding its train/ and test/ (e.g. leaf/data/{leaf}/data).")
    splits = {}
    for split in ("train", "test"):
        path = os.path.join(directory, split)
        if not os.path.isdir(path):
            raise ValueError(f"{path}: no such directory; data.data_dir must hold LEAF's train/ and test/.")
        splits[split] = read_split(path)
    users = choose_clients(sorted(u for u in splits["train"] if splits["train"][u]["y"]), num_clients, seed,
                           f"{directory}'s number of users with training data")
    train = [splits["train"][u] for u in users]
    test = [splits["test"].get(u, {"x": [], "y": []}) for u in users]
    if leaf == "femnist":
        return _femnist(train, test)
    if leaf == "celeba":
        return _celeba(train, test, os.path.join(directory, CELEBA_IMAGES))
    if leaf == "sent140":
        return _sent140(train, test, vocabulary_size)
    return _shakespeare(train, test, vocabulary_size)


def _femnist(train: Sequence[Mapping[str, list]], test: Sequence[Mapping[str, list]]
             ) -> tuple[FederatedData, Dataset, int]:
    def images(x: list) -> np.ndarray:
        return np.asarray(x, np.float32).reshape(-1, 28, 28, 1)

    population = from_client_lists([images(u["x"]) for u in train], [np.asarray(u["y"], np.int32) for u in train])
    test_set = Dataset(np.concatenate([images(u["x"]) for u in test]),
                       np.concatenate([np.asarray(u["y"], np.int32) for u in test]))
    return population, test_set, FEMNIST_CLASSES


def _celeba(train: Sequence[Mapping[str, list]], test: Sequence[Mapping[str, list]], images_dir: str
           ) -> tuple[FederatedData, Dataset, int]:
    from PIL import Image

    if not os.path.isdir(images_dir):
        raise ValueError(f"{images_dir}: no such directory; LEAF's CelebA x are file names of the raw CelebA images, "
                         "read from raw/img_align_celeba/ in data.data_dir (LEAF's layout).")

    def images(names: list) -> np.ndarray:
        out = np.zeros((len(names), CELEBA_SIZE, CELEBA_SIZE, 3), np.float32)
        for i, name in enumerate(names):
            path = os.path.join(images_dir, str(name))
            try:
                with Image.open(path) as image:
                    resized = image.convert("RGB").resize((CELEBA_SIZE, CELEBA_SIZE), Image.Resampling.BICUBIC)
            except OSError as error:
                raise ValueError(f"{path}: a CelebA image LEAF's files name is not readable ({error}).") from None
            out[i] = np.asarray(resized, np.float32) / 255.0
        return out

    population = from_client_lists([images(u["x"]) for u in train], [_binary_labels(u["y"], "celeba") for u in train])
    test_set = Dataset(np.concatenate([images(u["x"]) for u in test]),
                       np.concatenate([_binary_labels(u["y"], "celeba") for u in test]))
    return population, test_set, 2


def _binary_labels(values: list, dataset: str) -> np.ndarray:
    y = np.asarray(values, np.int32)
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"LEAF's {dataset} labels must be 0 or 1; found {sorted(set(y.tolist()) - {0, 1})[:5]}.")
    return y


def _sent140(train: Sequence[Mapping[str, list]], test: Sequence[Mapping[str, list]], vocabulary_size: int
             ) -> tuple[FederatedData, Dataset, int]:
    def tweet(x: Any) -> str:  # LEAF's raw fields end with the text
        return str(x[-1]) if isinstance(x, list) and x else str(x)

    vocabulary = text.build_vocabulary((tweet(x) for u in train for x in u["x"]), "word", vocabulary_size)

    def tokens(user: Mapping[str, list]) -> np.ndarray:
        out = np.full((len(user["x"]), SENT140_LENGTH), text.PAD, np.int32)
        for i, x in enumerate(user["x"]):
            ids = vocabulary.encode(tweet(x))[:SENT140_LENGTH]
            out[i, : len(ids)] = ids
        return out

    population = from_client_lists([tokens(u) for u in train], [_binary_labels(u["y"], "sent140") for u in train])
    test_set = Dataset(np.concatenate([tokens(u) for u in test]),
                       np.concatenate([_binary_labels(u["y"], "sent140") for u in test]))
    return population, test_set, 2


def _shakespeare(train: Sequence[Mapping[str, list]], test: Sequence[Mapping[str, list]], vocabulary_size: int
                 ) -> tuple[FederatedData, Dataset, int]:
    vocabulary = text.build_vocabulary((s + c for u in train for s, c in zip(u["x"], u["y"])), "char",
                                       vocabulary_size)

    def windows(user: Mapping[str, list]) -> tuple[np.ndarray, np.ndarray]:
        x = np.zeros((len(user["y"]), SHAKESPEARE_LENGTH), np.int32)
        y = np.full((len(user["y"]), SHAKESPEARE_LENGTH), text.MASKED, np.int32)
        for i, (sequence, following) in enumerate(zip(user["x"], user["y"])):
            ids = vocabulary.encode(sequence + following)[-(SHAKESPEARE_LENGTH + 1):]
            inputs, targets = text.sequences(ids, SHAKESPEARE_LENGTH)
            if len(inputs):  # (one character alone has no target: the row stays padding)
                x[i], y[i] = inputs[0], targets[0]
        return x, y

    train_windows, test_windows = [windows(u) for u in train], [windows(u) for u in test]
    population = from_client_lists([x for x, _ in train_windows], [y for _, y in train_windows])
    test_set = Dataset(np.concatenate([x for x, _ in test_windows]), np.concatenate([y for _, y in test_windows]))
    return population, test_set, len(vocabulary)
