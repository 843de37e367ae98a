"""Partitioners: split a centralized ``Dataset`` into a federated population of clients.

Every partitioner assigns each example to exactly one client (the result is a permutation of the dataset),
draws all randomness from the given seed (an int or a ``np.random.Generator``), and returns ``FederatedData``
with clients in id order and each client's examples in random order. They are vectorized NumPy on the host
and scale to 10^5+ clients.

``attributes`` (optional [N] int per-example sensitive attribute) is carried along into
``FederatedData.attributes``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np

from fedjaxpriv.data.federated import Dataset, FederatedData, from_partition

Seed = int | np.random.Generator


def _check_num_clients(num_clients: int, num_examples: int) -> None:
    if int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients={num_clients} must be an integer >= 1.")
    if num_clients > num_examples:
        raise ValueError(f"num_clients={num_clients} exceeds the {num_examples} examples; every client needs at "
                         f"least one example, so num_clients must be <= {num_examples}.")


def _build(dataset: Dataset, order: np.ndarray, counts: np.ndarray,
           attributes: np.ndarray | None) -> FederatedData:
    """Client i gets examples ``order[sum(counts[:i]) : sum(counts[:i + 1])]``."""
    if attributes is not None and np.shape(attributes) != (len(dataset),):
        raise ValueError(f"attributes has shape {np.shape(attributes)}; it must be ({len(dataset)},).")
    return from_partition(dataset, np.split(order, np.cumsum(counts)[:-1]), attributes)


def _from_owner(dataset: Dataset, owner: np.ndarray, num_clients: int, rng: np.random.Generator,
                attributes: np.ndarray | None) -> FederatedData:
    """Builds the population where example i belongs to client ``owner[i]``, examples shuffled within clients."""
    shuffled = rng.permutation(len(owner))
    order = shuffled[np.argsort(owner[shuffled], kind="stable")]
    return _build(dataset, order, np.bincount(owner, minlength=num_clients), attributes)


def _split_by_counts(dataset: Dataset, counts: np.ndarray, rng: np.random.Generator,
                     attributes: np.ndarray | None) -> FederatedData:
    """Random examples to clients with the given sizes (labels IID across clients)."""
    return _build(dataset, rng.permutation(len(dataset)), counts, attributes)


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``weights`` that sum exactly to ``total`` (Hamilton's method)."""
    share = weights / weights.sum() * total
    counts = np.floor(share).astype(np.int64)
    short = int(total - counts.sum())
    if short:
        counts[np.argsort(counts - share, kind="stable")[:short]] += 1
    return counts


def iid(dataset: Dataset, num_clients: int, seed: Seed, *, attributes: np.ndarray | None = None) -> FederatedData:
    """Uniformly random partition into ``num_clients`` clients whose sizes differ by at most one.

    Args:
      dataset: N examples.
      num_clients: number of clients, in [1, N].
      seed: int seed or NumPy generator.
      attributes: optional [N] per-example attribute.

    Returns:
      ``FederatedData`` with counts floor(N / C) or ceil(N / C).
    """
    _check_num_clients(num_clients, len(dataset))
    rng = np.random.default_rng(seed)
    counts = np.full(num_clients, len(dataset) // num_clients)
    counts[: len(dataset) % num_clients] += 1
    return _split_by_counts(dataset, counts, rng, attributes)


def dirichlet(dataset: Dataset, num_clients: int, alpha: float, seed: Seed, *, min_size: int = 1,
              max_attempts: int = 100, attributes: np.ndarray | None = None) -> FederatedData:
    """Label-skewed partition with per-class Dirichlet proportions.

    For each class c, proportions p_c ~ Dir(alpha * 1_C) over the C clients split the class's examples; a
    client that already holds N / C examples gets no more (which balances sizes). The draw is repeated until
    every client has at least ``min_size`` examples. Small alpha: each client sees few classes; large alpha:
    close to IID. With many clients and small alpha some clients get no example in most draws; use
    ``min_size=0`` there.

    Args:
      dataset: N examples.
      num_clients: number of clients C.
      alpha: Dirichlet concentration, > 0.
      seed: int seed or NumPy generator.
      min_size: smallest allowed client size.
      max_attempts: draws tried before giving up.
      attributes: optional [N] per-example attribute.

    References:
      Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
      Classification", 2019; Yurochkin et al., "Bayesian Nonparametric Federated Learning of Neural
      Networks", ICML 2019.
    """
    _check_num_clients(num_clients, len(dataset))
    if not alpha > 0:
        raise ValueError(f"alpha={alpha} must be > 0.")
    if min_size < 0 or min_size * num_clients > len(dataset):
        raise ValueError(f"min_size={min_size} must be in [0, N / num_clients = {len(dataset) // num_clients}].")
    rng = np.random.default_rng(seed)
    labels = np.asarray(dataset.y)
    classes = np.unique(labels)
    cap = len(dataset) / num_clients
    for _ in range(max_attempts):
        owner = np.empty(len(labels), np.int64)
        sizes = np.zeros(num_clients, np.int64)
        for c in rng.permutation(classes):
            members = rng.permutation(np.flatnonzero(labels == c))
            proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
            proportions = np.where(sizes < cap, proportions, 0.0)
            if proportions.sum() <= 0:
                proportions = np.ones(num_clients)
            per_client = _largest_remainder(proportions, len(members))
            owner[members] = np.repeat(np.arange(num_clients), per_client)
            sizes += per_client
        if sizes.min() >= min_size:
            return _from_owner(dataset, owner, num_clients, rng, attributes)
    raise ValueError(f"no Dirichlet draw with alpha={alpha} gave all {num_clients} clients >= min_size={min_size} "
                     f"examples in {max_attempts} attempts; raise alpha, lower num_clients, or lower min_size "
                     f"(min_size=0 allows empty clients).")


def shards(dataset: Dataset, num_clients: int, seed: Seed, shards_per_client: int = 2, *,
           attributes: np.ndarray | None = None) -> FederatedData:
    """Pathological non-IID partition: each client gets ``shards_per_client`` single-label shards.

    Examples are grouped by label and each class is cut into shards (the classes share the
    ``num_clients * shards_per_client`` shards in proportion to their sizes, at least one each); shards never
    mix labels, so every client holds at most ``shards_per_client`` labels. Shards are dealt out at random.

    Args:
      dataset: N examples with L distinct labels.
      num_clients: number of clients C.
      seed: int seed or NumPy generator.
      shards_per_client: shards per client; C * shards_per_client must be in [L, N].
      attributes: optional [N] per-example attribute.

    References:
      McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", 2017.
    """
    _check_num_clients(num_clients, len(dataset))
    if int(shards_per_client) != shards_per_client or shards_per_client < 1:
        raise ValueError(f"shards_per_client={shards_per_client} must be an integer >= 1.")
    labels = np.asarray(dataset.y)
    classes, class_sizes = np.unique(labels, return_counts=True)
    num_shards = num_clients * shards_per_client
    if not len(classes) <= num_shards <= len(dataset):
        raise ValueError(f"num_clients * shards_per_client = {num_shards} must be between the number of labels "
                         f"({len(classes)}) and the number of examples ({len(dataset)}) so shards hold one label.")
    rng = np.random.default_rng(seed)
    shards_per_class = 1 + _largest_remainder(class_sizes.astype(np.float64), num_shards - len(classes))
    shard_of_example = np.empty(len(labels), np.int64)
    first_shard = 0
    for c, k in zip(classes, shards_per_class):
        members = rng.permutation(np.flatnonzero(labels == c))
        shard_sizes = np.full(k, len(members) // k)
        shard_sizes[: len(members) % k] += 1
        shard_of_example[members] = first_shard + np.repeat(np.arange(k), shard_sizes)
        first_shard += k
    client_of_shard = rng.permutation(num_shards) % num_clients
    return _from_owner(dataset, client_of_shard[shard_of_example], num_clients, rng, attributes)


def quantity_skew(dataset: Dataset, num_clients: int, seed: Seed, sigma: float = 1.0, *, min_size: int = 1,
                  attributes: np.ndarray | None = None) -> FederatedData:
    """Unequal client sizes with IID labels: sizes proportional to lognormal(0, sigma) weights.

    Each client first gets ``min_size`` examples; the rest are shared in proportion to the weights.

    Args:
      dataset: N examples.
      num_clients: number of clients C.
      seed: int seed or NumPy generator.
      sigma: standard deviation of the log-weights, >= 0 (0 gives equal sizes).
      min_size: examples every client gets, C * min_size <= N.
      attributes: optional [N] per-example attribute.
    """
    _check_num_clients(num_clients, len(dataset))
    if not 0 <= sigma < np.inf:
        raise ValueError(f"sigma={sigma!r} is invalid; allowed: a finite number >= 0.")
    if min_size < 0 or min_size * num_clients > len(dataset):
        raise ValueError(f"min_size={min_size} must be in [0, N / num_clients = {len(dataset) // num_clients}].")
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, float(sigma), num_clients)
    counts = min_size + _largest_remainder(weights, len(dataset) - min_size * num_clients)
    return _split_by_counts(dataset, counts, rng, attributes)


def natural(dataset: Dataset, group_ids: np.ndarray, seed: Seed = 0, *,
            attributes: np.ndarray | None = None) -> FederatedData:
    """One client per distinct group id (e.g. writer, speaker, device), clients in sorted-id order.

    Args:
      dataset: N examples.
      group_ids: [N] group of each example (any sortable dtype).
      seed: shuffles examples within each client.
      attributes: optional [N] per-example attribute.
    """
    group_ids = np.asarray(group_ids)
    if group_ids.shape != (len(dataset),):
        raise ValueError(f"group_ids has shape {group_ids.shape}; it must be ({len(dataset)},), one per example.")
    unique, owner = np.unique(group_ids, return_inverse=True)
    return _from_owner(dataset, owner.reshape(-1), len(unique), np.random.default_rng(seed), attributes)


PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards", "quantity_skew", "natural")


def partition(dataset: Dataset, scheme: str, num_clients: int, seed: Seed, **kwargs: Any) -> FederatedData:
    """Partitions ``dataset`` with the named scheme.

    Args:
      dataset: N examples.
      scheme: one of ``PARTITION_SCHEMES``.
      num_clients: number of clients; for ``natural`` it must equal the number of distinct ``group_ids``.
      seed: int seed or NumPy generator.
      **kwargs: the scheme's own arguments (``alpha``, ``min_size``, ``shards_per_client``, ``sigma``,
        ``group_ids``, ``attributes``).

    Raises:
      ValueError: unknown scheme, or arguments the scheme rejects.
    """
    schemes: dict[str, Callable[..., FederatedData]] = {
        "iid": iid, "dirichlet": dirichlet, "shards": shards, "quantity_skew": quantity_skew, "natural": natural,
    }
    if scheme not in schemes:
        raise ValueError(f"unknown partition scheme {scheme!r}; allowed: {list(PARTITION_SCHEMES)}.")
    function = schemes[scheme]
    if scheme == "natural":
        if "group_ids" not in kwargs:
            raise ValueError("scheme 'natural' needs group_ids=[N] array of per-example group ids.")
        distinct = len(np.unique(np.asarray(kwargs["group_ids"])))
        if num_clients != distinct:
            raise ValueError(f"num_clients={num_clients} but group_ids has {distinct} distinct ids.")
        args: tuple[Any, ...] = (dataset,)
    else:
        if scheme == "dirichlet" and "alpha" not in kwargs:
            raise ValueError("scheme 'dirichlet' needs alpha > 0.")
        args = (dataset, num_clients)
    try:
        inspect.signature(function).bind(*args, seed=seed, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments {sorted(kwargs)} for scheme {scheme!r}: {err}") from err
    return function(*args, seed=seed, **kwargs)
