"""The Secret Sharer's exposure (Carlini et al. 2019): how much a next-token model memorised secrets that some
clients typed.

A canary is a fixed prefix followed by a secret of ``k`` tokens drawn uniformly from an alphabet of ``A`` tokens
("my pin is 3 1 4 1"); the space of secrets R has ``A^k`` members. Some canaries are inserted into chosen clients'
training data (each ``repeats`` times, as the user typing it again); controls of the same format are drawn but
never inserted. A model's exposure of a secret s is ``log2 |R| - log2 rank(s)``, rank 1 for the candidate of R
the model finds most likely (lowest log-perplexity of the secret's tokens given the prefix; ties count half):
``log2 |R|`` for a secret the model ranks first, and for a secret it never saw a draw whose tail is
``P(exposure >= e) = 2^-e`` (mean about 1.44 bits). Every candidate of R is scored: exact ranks, no extrapolation;
keep ``A^k`` to the size a forward pass over all candidates affords (10^4 by default).

    canaries = secret_sharer.draw_canaries(vocabulary, key_or_seed=0, inserted=5, controls=20)
    population = secret_sharer.insert(population, canaries, clients=[0, 1, 2, 3, 4], repeats=10, length=20)
    tracker = secret_sharer.ExposureTracker(canaries)
    Experiment(config, population=population, ...).run(callbacks=[tracker])
    tracker.history  # [(round, inserted exposures [5], control exposures [20]), ...]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv.data import text
from fedjaxpriv.data.federated import FederatedData, from_client_lists

CANARY_PREFIX = "my pin is"
DIGITS = tuple("0123456789")


class Canaries(NamedTuple):
    """Canary token ids.

    Attributes:
      prefix: [P] ids of the prefix, shared by every canary.
      alphabet: [A] ids the secrets' tokens are drawn from.
      inserted: [N, k] secrets inserted into clients' data.
      controls: [M, k] secrets of the same format never inserted.
    """

    prefix: np.ndarray
    alphabet: np.ndarray
    inserted: np.ndarray
    controls: np.ndarray

    @property
    def space_size(self) -> int:
        """|R| = A^k, the number of possible secrets."""
        return int(len(self.alphabet) ** self.inserted.shape[1])


def canary_words(prefix: str = CANARY_PREFIX, alphabet: Sequence[str] = DIGITS) -> str:
    """Text holding every canary token once: add it to the training text the vocabulary is built from (the
    secrets are typed by clients, so their tokens are in a vocabulary of the training clients)."""
    return " ".join([prefix, *alphabet])


def draw_canaries(vocabulary: text.Vocabulary, seed: int, inserted: int, controls: int, secret_length: int = 4,
                  prefix: str = CANARY_PREFIX, alphabet: Sequence[str] = DIGITS) -> Canaries:
    """Distinct secrets of ``secret_length`` tokens of ``alphabet`` after ``prefix``, ``inserted`` of them to
    insert and ``controls`` to compare with.

    Raises:
      ValueError: a canary token is not in the vocabulary, or the space holds fewer secrets than asked for.
    """
    prefix_ids = vocabulary.encode(prefix)
    alphabet_ids = np.array([vocabulary.encode(a)[0] for a in alphabet], np.int32)
    missing = [t for t, i in zip([*text.split_tokens(prefix, vocabulary.level), *alphabet],
                                 [*prefix_ids, *alphabet_ids]) if i == text.OOV]
    if missing:
        raise ValueError(f"canary tokens {missing} are not in the vocabulary: build it from the training text plus "
                         "secret_sharer.canary_words().")
    space = len(alphabet) ** secret_length
    if inserted + controls > space:
        raise ValueError(f"{inserted} + {controls} distinct secrets do not fit a space of {space}.")
    codes = np.random.default_rng(seed).choice(space, inserted + controls, replace=False)
    secrets = alphabet_ids[_digits(codes, len(alphabet), secret_length)]
    return Canaries(prefix_ids.astype(np.int32), alphabet_ids, secrets[:inserted], secrets[inserted:])


def _digits(codes: np.ndarray, base: int, length: int) -> np.ndarray:
    """Integers [n] -> their ``length`` base-``base`` digits [n, length], most significant first."""
    return (np.asarray(codes)[:, None] // base ** np.arange(length - 1, -1, -1)) % base


def insert(population: FederatedData, canaries: Canaries, clients: Sequence[int], repeats: int, length: int
           ) -> FederatedData:
    """The population with inserted canary i typed ``repeats`` times by client ``clients[i]``: each time one
    more sequence (prefix and secret, padded to ``length``) at the end of the client's data."""
    if len(clients) != len(canaries.inserted):
        raise ValueError(f"{len(canaries.inserted)} inserted canaries need as many clients; got {len(clients)}.")
    extra: dict[int, list[np.ndarray]] = {}
    for client, secret in zip(clients, canaries.inserted):
        x, y = text.sequences(np.concatenate([canaries.prefix, secret]), length)
        extra.setdefault(int(client), []).extend([(x, y)] * repeats)
    xs, ys = [], []
    for client in range(population.num_clients):
        data = population.client(client)
        added = extra.get(client, [])
        xs.append(np.concatenate([data.x, *[x for x, _ in added]]).astype(data.x.dtype))
        ys.append(np.concatenate([data.y, *[y for _, y in added]]).astype(data.y.dtype))
    return from_client_lists(xs, ys)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _secret_nll(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, tokens: jax.Array,
                prefix_length: int) -> jax.Array:
    """``-sum log p`` (nats) of the tokens after the prefix of each sequence: tokens [n, P + k] -> [n]."""
    log_probs = jax.nn.log_softmax(apply_fn(params, tokens[:, :-1]).astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(picked[:, prefix_length - 1:], axis=-1)


def secret_log_perplexities(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, prefix: np.ndarray,
                            secrets: np.ndarray, batch: int = 2048) -> np.ndarray:
    """``-sum_t log p(secret_t | prefix, secret_<t)`` (nats) of each secret [n, k] -> [n], in batches of the
    full sequences (prefix + secret) of one shape: one compile per model function and batch."""
    secrets = np.asarray(secrets, np.int32)
    n, _ = secrets.shape
    p = len(prefix)
    sequences = np.concatenate([np.broadcast_to(prefix, (n, p)), secrets], axis=1)
    out = []
    for start in range(0, n, batch):
        chunk = sequences[start: start + batch]
        pad = batch - len(chunk) if n > batch else 0
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
        out.append(np.asarray(_secret_nll(apply_fn, params, jnp.asarray(padded), p))[: len(chunk)])
    return np.concatenate(out)


def exposures(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, canaries: Canaries,
              secrets: np.ndarray) -> np.ndarray:
    """Exposure (bits) of each secret [n, k] under the model: ``log2 |R| - log2 rank`` among every candidate of
    R (rank 1 = the model's most likely; ties count half). The space is scored once; each secret's own score is
    read from it (every secret is one of its members)."""
    length = canaries.inserted.shape[1]
    base = len(canaries.alphabet)
    space = canaries.alphabet[_digits(np.arange(canaries.space_size), base, length)]
    scores = secret_log_perplexities(apply_fn, params, canaries.prefix, space)
    position = {int(token): i for i, token in enumerate(canaries.alphabet)}
    digits = np.vectorize(position.__getitem__)(np.asarray(secrets, np.int64))
    mine = scores[digits @ base ** np.arange(length - 1, -1, -1)]  # a secret's index in the space
    everyone = np.sort(scores)
    below = np.searchsorted(everyone, mine, side="left")
    ties = np.searchsorted(everyone, mine, side="right") - below  # itself included
    rank = 1.0 + below + (ties - 1) / 2.0
    return np.log2(canaries.space_size) - np.log2(rank)


@dataclasses.dataclass
class ExposureTracker:
    """A run callback: the exposure of the inserted and control canaries on the global model at every evaluated
    round (``history``: [(round, inserted [N], controls [M])]) and ``summary()`` of the last."""

    canaries: Canaries
    history: list[tuple[int, np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)

    def __call__(self, experiment: Any, record: dict) -> None:
        if "test_loss" not in record:
            return
        both = exposures(experiment.model.apply, experiment.latest_params, self.canaries,
                         np.concatenate([self.canaries.inserted, self.canaries.controls]))
        inserted = len(self.canaries.inserted)
        self.history.append((int(record["round"]), both[:inserted], both[inserted:]))

    def summary(self) -> dict[str, float]:
        """The last evaluated round's mean and max exposure of the inserted canaries and of the controls, and
        ``log2 |R|`` (the largest exposure possible)."""
        _, inserted, controls = self.history[-1]
        return {"exposure_inserted_mean": float(np.mean(inserted)), "exposure_inserted_max": float(np.max(inserted)),
                "exposure_control_mean": float(np.mean(controls)), "exposure_control_max": float(np.max(controls)),
                "exposure_bound": float(np.log2(self.canaries.space_size))}
