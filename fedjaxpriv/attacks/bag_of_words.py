"""Which words a keyboard user typed, read from its model update (Melis et al. 2019, "Exploiting unintended
feature leakage in collaborative learning", section 5.1).

An embedding layer's gradient is non-zero only in the rows of the tokens in the batch, so a message's embedding
table (``[V, d]``) changes only in the rows of the words its client typed: without a defense, the non-zero rows
*are* the client's bag of words (for plain local SGD, over any number of local steps, the rows of words never in a
batch stay exactly zero). Noise, quantization and sparsification change that; how much they hide is measured,
not assumed:

* ``support_*``: the exact-support attack, a word is predicted typed where its row is non-zero; its precision
  and recall against the words the client's training data holds (macro means over the attacked clients);
* ``auc`` (with a cluster-bootstrap interval over clients): each word ranked by its row's L2 norm, typed words
  against untyped ones, pooled over (client, word) pairs; threshold-free, 0.5 when the rows say nothing.

Padding and out-of-vocabulary rows (``data.text.PAD``, ``OOV``) are not words and are left out. Everything is
vectorized over clients: tables ``[K, V, d]``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv.data.federated import FederatedData
from fedjaxpriv.data.text import OOV, PAD

SPECIAL_IDS = (PAD, OOV)


def embedding_table(tree: Any, vocabulary: int) -> Any | None:
    """The leaf of ``tree`` that is an embedding table of ``vocabulary`` rows (a Flax ``nn.Embed``'s
    "embedding", shape ``[..., V, d]``; leading axes e.g. the tapped clients), or None."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1]))) if path else ""
        if name == "embedding" and np.ndim(leaf) >= 2 and np.shape(leaf)[-2] == vocabulary:
            return leaf
    return None


@jax.jit
def row_norms(tables: jax.Array) -> jax.Array:
    """L2 norm of every row of every client's table: ``[K, V, d] -> [K, V]`` (float32)."""
    return jnp.sqrt(jnp.sum(jnp.square(tables.astype(jnp.float32)), axis=-1))


def word_mask(vocabulary: int) -> np.ndarray:
    """``[V]`` bool: the ids that are words (all but ``SPECIAL_IDS``)."""
    words = np.ones(vocabulary, bool)
    words[list(SPECIAL_IDS)] = False
    return words


def typed_words(population: FederatedData, client_ids: Sequence[int], vocabulary: int) -> np.ndarray:
    """``[K, V]`` bool: the tokens in each client's training inputs (its bag of words; specials excluded)."""
    bags = np.zeros((len(client_ids), vocabulary), bool)
    for row, client in enumerate(client_ids):
        tokens = np.asarray(population.client(int(client)).x, np.int64).ravel()
        bags[row, tokens[(tokens >= 0) & (tokens < vocabulary)]] = True
    return bags & word_mask(vocabulary)


def support_precision_recall(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per client, precision and recall ``[K]`` of "typed where the row is non-zero" (words only). A client with
    no predicted word has precision NaN; with no typed word, recall NaN."""
    words = word_mask(truth.shape[-1])
    predicted = (np.asarray(scores) > 0) & words
    hits = np.sum(predicted & truth, axis=-1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / np.sum(predicted, axis=-1), hits / np.sum(truth & words, axis=-1)


def bag_of_words_attack(tables: jax.Array, truth: np.ndarray, *, bootstrap: int = 1000, seed: int = 0
                        ) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """The attack on K messages' embedding tables ``[K, V, d]`` against the clients' bags ``truth`` [K, V].

    Returns:
      (metrics: ``support_precision``, ``support_recall`` (macro means), ``auc`` with ``auc_low`` /
      ``auc_high``, ``words_typed`` (mean per client), ``clients``; (scores, labels) of the pooled words, for a
      ROC curve).
    """
    from fedjaxpriv.attacks.membership import attack_metrics

    scores = np.asarray(row_norms(jnp.asarray(tables)))
    precision, recall = support_precision_recall(scores, truth)
    words = word_mask(truth.shape[-1])
    pooled_scores, labels = scores[:, words].ravel(), truth[:, words].ravel().astype(int)
    groups = np.repeat(np.arange(len(truth)), int(words.sum()))
    metrics = {"support_precision": float(np.nanmean(precision)), "support_recall": float(np.nanmean(recall)),
               "words_typed": float(np.mean(np.sum(truth[:, words], axis=-1))), "clients": float(len(truth))}
    if 0 < labels.sum() < len(labels):
        found = attack_metrics(pooled_scores, labels, bootstrap=bootstrap, seed=seed, groups=groups)
        metrics.update(auc=found["auc"], auc_low=found["auc_low"], auc_high=found["auc_high"])
    return metrics, (pooled_scores, labels)


def attack_taps(experiment: Any, taps: Any, *, bootstrap: int = 1000, seed: int = 0
                ) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]] | str:
    """The attack on every tapped message of a run (``Results.taps``: {round: Tap}), each (round, client)
    message one attacked table; or a string saying why it does not apply."""
    from fedjaxpriv.attacks.membership import ordered_taps

    tables, clients = [], []
    for tap in ordered_taps(taps):
        table = embedding_table(tap.messages, experiment.num_classes)
        if table is None:
            return (f"the model's messages hold no embedding table of {experiment.num_classes} rows (a token "
                    "model's nn.Embed 'embedding')")
        tables.append(np.asarray(table))
        clients.extend(int(c) for c in tap.client_ids)
    if not tables:
        return "no tapped message (run.tap_clients / run.tap_rounds)"
    truth = typed_words(experiment.population, clients, experiment.num_classes)
    return bag_of_words_attack(np.concatenate(tables), truth, bootstrap=bootstrap, seed=seed)
