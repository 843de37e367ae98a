"""Federated data containers.

A population's examples are stored *flat*: every client's examples are concatenated into one array and a
client is a contiguous slice ``[offset, offset + count)``. Local training gathers its batches by index from
the shared flat arrays, so a cohort needs no padded copy of its data and memory is O(total examples), not
O(clients x largest client). ``FederatedData.padded(ids)`` gives the padded ``[K, N_max, ...]`` view with
an example mask where a per-client dense layout is wanted (per-client evaluation, attacks).
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple, Sequence

import numpy as np


class Dataset(NamedTuple):
    """A centralized dataset.

    Attributes:
      x: [N, *input_shape] float32 features.
      y: [N] int32 labels in [0, num_classes).
    """

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])


class FederatedArrays(NamedTuple):
    """Padded per-client arrays for a set of K clients.

    Attributes:
      x: [K, N_max, *input_shape] float32; padded rows are zero.
      y: [K, N_max] int32; padded entries are zero.
      mask: [K, N_max] bool, True for real examples.
      client_ids: [K] int32 population ids of the rows.
    """

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    client_ids: np.ndarray


class FederatedData(NamedTuple):
    """A population of clients with flat example storage (a pytree of arrays).

    Attributes:
      x: [T, *input_shape] float32 (int32 token ids for text), all clients' examples, client by client.
      y: [T, ...] int32 targets: labels [T], or next tokens [T, L] for text.
      offsets: [C] int32, index in ``x`` of each client's first example.
      counts: [C] int32, number of examples of each client (may be 0).
      attributes: [T] int32 per-example sensitive attribute (e.g. a group id) used by attribute inference,
        or an empty [0] array when the source has none.
    """

    x: np.ndarray
    y: np.ndarray
    offsets: np.ndarray
    counts: np.ndarray
    attributes: np.ndarray

    @property
    def num_clients(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_examples(self) -> int:
        return int(self.y.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def max_count(self) -> int:
        return int(np.max(self.counts)) if self.num_clients else 0

    def client(self, client_id: int) -> Dataset:
        """One client's examples as a centralized ``Dataset``."""
        if not 0 <= client_id < self.num_clients:
            raise ValueError(f"client_id={client_id} is outside [0, {self.num_clients}).")
        start = int(self.offsets[client_id])
        stop = start + int(self.counts[client_id])
        return Dataset(self.x[start:stop], self.y[start:stop])

    def padded(self, client_ids: Sequence[int] | np.ndarray, max_count: int | None = None) -> FederatedArrays:
        """Padded ``[K, N_max, ...]`` arrays with an example mask for the given clients."""
        ids = np.asarray(client_ids, dtype=np.int32)
        n_max = int(max_count if max_count is not None else max(1, int(np.max(self.counts[ids], initial=1))))
        k = ids.shape[0]
        x = np.zeros((k, n_max) + self.input_shape, dtype=self.x.dtype)
        y = np.zeros((k, n_max), dtype=self.y.dtype)
        mask = np.zeros((k, n_max), dtype=bool)
        for row, cid in enumerate(ids):
            start, count = int(self.offsets[cid]), min(int(self.counts[cid]), n_max)
            x[row, :count] = self.x[start : start + count]
            y[row, :count] = self.y[start : start + count]
            mask[row, :count] = True
        return FederatedArrays(x, y, mask, ids)


def from_client_lists(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray],
                      attributes: Sequence[np.ndarray] | None = None) -> FederatedData:
    """Builds ``FederatedData`` from per-client arrays ``xs[i]: [n_i, ...]``, ``ys[i]: [n_i, ...]``: features as
    float32, or as int32 where every ``xs[i]`` is integer (token ids)."""
    if len(xs) != len(ys):
        raise ValueError(f"got {len(xs)} feature arrays but {len(ys)} label arrays; they must match.")
    counts = np.array([len(y) for y in ys], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32) if len(counts) else counts
    tokens = len(xs) > 0 and all(np.issubdtype(np.asarray(a).dtype, np.integer) for a in xs)
    x = np.concatenate([np.asarray(a, np.int32 if tokens else np.float32) for a in xs], axis=0)
    y = np.concatenate([np.asarray(a, np.int32) for a in ys], axis=0)
    attrs = (np.concatenate([np.asarray(a, np.int32) for a in attributes]) if attributes is not None
             else np.zeros((0,), np.int32))
    return FederatedData(x, y, offsets, counts, attrs)


def from_partition(dataset: Dataset, client_indices: Sequence[np.ndarray],
                   attributes: np.ndarray | None = None) -> FederatedData:
    """Builds ``FederatedData`` from a centralized dataset and one index array per client (features as float32,
    or as int32 where ``dataset.x`` is integer: token ids)."""
    order = (np.concatenate([np.asarray(i, np.int64) for i in client_indices]) if client_indices
             else np.zeros(0, np.int64))
    counts = np.array([len(i) for i in client_indices], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32) if len(counts) else counts
    attrs = np.asarray(attributes, np.int32)[order] if attributes is not None else np.zeros((0,), np.int32)
    tokens = np.issubdtype(np.asarray(dataset.x).dtype, np.integer)
    return FederatedData(np.asarray(dataset.x, np.int32 if tokens else np.float32)[order],
                         np.asarray(dataset.y, np.int32)[order],
                         offsets, counts, attrs)


def choose_clients(names: Sequence[Any], num_clients: int, seed: int, where: str) -> list[Any]:
    """``num_clients`` of a natural partition's client ``names`` (in their order): all of them, or a seeded
    random subset.

    Raises:
      ValueError: more clients asked for than there are, naming ``where`` they come from.
    """
    if num_clients > len(names):
        raise ValueError(f"data.num_clients={num_clients} but {where} has {len(names)}; allowed: at most that.")
    if num_clients == len(names):
        return list(names)
    chosen = np.sort(np.random.default_rng(seed).choice(len(names), num_clients, replace=False))
    return [names[i] for i in chosen]


def fingerprint(*arrays: np.ndarray | int) -> str:
    """A short content hash (16 hex digits) of arrays (dtype, shape and bytes, in order) and integers: two
    populations fingerprint alike only if their data are identical."""
    digest = hashlib.sha256()
    for value in arrays:
        array = np.ascontiguousarray(np.asarray(value))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]

