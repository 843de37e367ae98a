"""Text for next-token prediction: a vocabulary from the training clients, token-id sequences per client, and
``keyboard``, a generated typing corpus whose next-word rule is known (so the best achievable accuracy is too).

Ids: 0 is padding and 1 out-of-vocabulary in the inputs; in the targets both are -1, which the next-token task
(``models.tasks.NEXT_TOKEN``) leaves out of its loss and metrics, so a model is never scored on predicting a word
it cannot name. A client's text becomes consecutive windows: inputs ``x[i] = ids[iL : (i+1)L]`` and targets
``y[i] = ids[iL+1 : (i+1)L+1]`` (L = ``length``), the last window padded.

    vocabulary = build_vocabulary(train_texts, level="word", max_size=10_000)
    population, test = text_population(train_texts, test_texts, vocabulary, length=20)
"""

from __future__ import annotations

import collections
import re
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from fedjaxpriv.data.federated import Dataset, FederatedData, from_client_lists

PAD, OOV = 0, 1  # input ids; targets mark both as MASKED
MASKED = -1
SPECIAL_TOKENS = ("<pad>", "<oov>")
LEVELS = ("char", "word")
_WORD = re.compile(r"[\w']+|[^\w\s]")


class Vocabulary(NamedTuple):
    """Token strings by id (``tokens[0]`` padding, ``tokens[1]`` out-of-vocabulary) and how text is split."""

    tokens: tuple[str, ...]
    level: str

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> int32 ids [n] (``OOV`` for tokens not in the vocabulary)."""
        index = {token: i for i, token in enumerate(self.tokens)}
        return np.array([index.get(token, OOV) for token in split_tokens(text, self.level)], np.int32)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids -> token strings (negative ids, i.e. masked targets, as ``<pad>``)."""
        return [self.tokens[i] if i >= 0 else SPECIAL_TOKENS[PAD] for i in ids]


def split_tokens(text: str, level: str) -> list[str]:
    """Characters, or lower-cased words and punctuation marks (``level`` "char" / "word")."""
    if level == "char":
        return list(text)
    if level == "word":
        return _WORD.findall(text.lower())
    raise ValueError(f"level={level!r} is not allowed: one of {list(LEVELS)}.")


def build_vocabulary(texts: Iterable[str], level: str, max_size: int) -> Vocabulary:
    """The ``max_size - 2`` most frequent tokens of ``texts`` (the training clients' only: test text never
    chooses the vocabulary), ties by token, after the two special tokens."""
    if max_size < 3:
        raise ValueError(f"max_size={max_size} is not allowed: at least 3 (two special tokens and one more).")
    counts = collections.Counter(token for text in texts for token in split_tokens(text, level))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[: max_size - len(SPECIAL_TOKENS)]
    return Vocabulary(SPECIAL_TOKENS + tuple(token for token, _ in ranked), level)


def sequences(ids: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive windows of one text's ids: inputs x [n, length] and next-token targets y [n, length] int32,
    n = ceil((len(ids) - 1) / length) (0 for fewer than two tokens); padding in x is ``PAD``, in y ``MASKED``, and
    out-of-vocabulary targets are ``MASKED`` too."""
    if length < 1:
        raise ValueError(f"length={length} is not allowed: at least 1.")
    ids = np.asarray(ids, np.int32)
    count = max(0, -(-(len(ids) - 1) // length))
    x = np.full((count, length), PAD, np.int32)
    y = np.full((count, length), MASKED, np.int32)
    for i in range(count):
        window = ids[i * length: (i + 1) * length + 1]
        x[i, : len(window) - 1] = window[:-1]
        y[i, : len(window) - 1] = np.where(window[1:] == OOV, MASKED, window[1:])
    return x, y


def text_population(train_texts: Sequence[str], test_texts: Sequence[str], vocabulary: Vocabulary,
                    length: int) -> tuple[FederatedData, Dataset]:
    """One client per training text (a user's typing), and a test set of all ``test_texts``' windows."""
    windows = [sequences(vocabulary.encode(text), length) for text in train_texts]
    population = from_client_lists([x for x, _ in windows], [y for _, y in windows])
    return population, windows_of(test_texts, vocabulary, length)


def windows_of(texts: Sequence[str], vocabulary: Vocabulary, length: int) -> Dataset:
    """All ``texts``' windows (``sequences`` of each text, in order) as one ``Dataset``: x, y int32 [n, length]."""
    windows = [sequences(vocabulary.encode(text), length) for text in texts]
    return Dataset(np.concatenate([x for x, _ in windows] or [np.zeros((0, length), np.int32)]).astype(np.int32),
                   np.concatenate([y for _, y in windows] or [np.zeros((0, length), np.int32)]).astype(np.int32))


# -- a generated keyboard ------------------------------------------------------------------------------------

KEYBOARD_WORDS = (
    "the", "be", "to", "of", "and", "a", "in", "that", "have", "i", "it", "for", "not", "on", "with", "he", "as",
    "you", "do", "at", "this", "but", "his", "by", "from", "they", "we", "say", "her", "she", "or", "an", "will",
    "my", "one", "all", "would", "there", "their", "what", "so", "up", "out", "if", "about", "who", "get", "which",
    "go", "me")


class KeyboardRule(NamedTuple):
    """The next-word rule of ``keyboard_corpus``: after word w comes ``successor[w]`` with probability ``follow``,
    else a word drawn uniformly from all of ``words`` (the successor included)."""

    words: tuple[str, ...]
    successor: np.ndarray
    follow: float

    def best_accuracy(self, k: int = 1) -> float:
        """Top-k accuracy of the Bayes-optimal predictor (the successor, then any k - 1 others):
        ``follow + k (1 - follow) / V``."""
        return self.follow + k * (1.0 - self.follow) / len(self.words)


def keyboard_corpus(seed: int, num_clients: int, mean_words: int = 300, follow: float = 0.8, sigma: float = 0.5,
                    test_fraction: float = 0.2, words: Sequence[str] = KEYBOARD_WORDS
                    ) -> tuple[list[str], list[str], KeyboardRule]:
    """Each client's typing as text, split per client into training and test text (LEAF's per-user split).

    Client i types ``n_i ~ mean_words * lognormal(0, sigma)`` words (normalised to mean ``mean_words``, at least
    4) by ``KeyboardRule`` from a uniformly drawn first word; its last ``test_fraction`` of words is its test
    text. Returns (train texts, test texts, rule)."""
    if not 0.0 <= follow <= 1.0 or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"follow={follow} must be in [0, 1] and test_fraction={test_fraction} in (0, 1).")
    rng = np.random.default_rng(seed)
    vocabulary = len(words)
    rule = KeyboardRule(tuple(words), rng.permutation(vocabulary), float(follow))
    sizes = rng.lognormal(0.0, sigma, num_clients)
    sizes = np.maximum(4, np.round(sizes / sizes.mean() * mean_words)).astype(int)
    train, test = [], []
    for size in sizes:
        typed = np.empty(size, np.int64)
        typed[0] = rng.integers(vocabulary)
        follows = rng.random(size) < follow
        noise = rng.integers(vocabulary, size=size)
        for t in range(1, size):
            typed[t] = rule.successor[typed[t - 1]] if follows[t] else noise[t]
        cut = int(round(size * (1.0 - test_fraction)))
        train.append(" ".join(words[w] for w in typed[:cut]))
        test.append(" ".join(words[w] for w in typed[cut:]))
    return train, test, rule
