"""Partitioners: exact invariants, label statistics with computed tolerances, argument checks."""

import numpy as np
import pytest
from scipy import stats

from fedjaxpriv.data import PARTITION_SCHEMES, Dataset, dirichlet, iid, natural, partition, quantity_skew, shards


def indexed_dataset(num_examples: int, num_classes: int = 10, seed: int = 0) -> Dataset:
    """x[i] = i (so a partition can be traced back), labels uniform over classes in random order."""
    labels = np.random.default_rng(seed).permutation(np.arange(num_examples) % num_classes).astype(np.int32)
    return Dataset(np.arange(num_examples, dtype=np.float32)[:, None], labels)


def label_histograms(fed, num_classes: int) -> np.ndarray:
    """[C, L] label counts per client."""
    owner = np.repeat(np.arange(fed.num_clients), fed.counts)
    return np.bincount(owner * num_classes + fed.y, minlength=fed.num_clients * num_classes).reshape(-1, num_classes)


def mean_total_variation(fed, num_classes: int) -> float:
    """Mean over clients of the total variation distance between client and global label distributions."""
    hist = label_histograms(fed, num_classes).astype(np.float64)
    client = hist / hist.sum(1, keepdims=True)
    overall = hist.sum(0) / hist.sum()
    return float(np.mean(0.5 * np.abs(client - overall).sum(1)))


def assert_is_permutation(fed, data: Dataset) -> None:
    source = fed.x[:, 0].astype(np.int64)
    np.testing.assert_array_equal(np.sort(source), np.arange(len(data)))  # every example exactly once
    np.testing.assert_array_equal(fed.y, data.y[source])  # labels travel with their examples
    assert fed.counts.sum() == len(data)
    np.testing.assert_array_equal(fed.offsets, np.concatenate([[0], np.cumsum(fed.counts)[:-1]]))


SCHEME_CASES = [
    ("iid", 7, {}),
    ("dirichlet", 20, {"alpha": 0.3, "min_size": 5}),
    ("shards", 50, {"shards_per_client": 2}),
    ("quantity_skew", 30, {"sigma": 1.5}),
]


@pytest.mark.parametrize("scheme, num_clients, kwargs", SCHEME_CASES)
def test_every_example_is_assigned_exactly_once_and_seeds_are_deterministic(scheme, num_clients, kwargs):
    data = indexed_dataset(2003)
    fed = partition(data, scheme, num_clients, seed=3, **kwargs)
    assert fed.num_clients == num_clients
    assert_is_permutation(fed, data)
    again = partition(data, scheme, num_clients, seed=3, **kwargs)
    np.testing.assert_array_equal(fed.x, again.x)
    np.testing.assert_array_equal(fed.counts, again.counts)
    other = partition(data, scheme, num_clients, seed=4, **kwargs)
    assert not np.array_equal(fed.x, other.x)


def test_iid_sizes_differ_by_at_most_one_and_label_histograms_match_the_global_one():
    num_classes, num_clients = 10, 40
    data = indexed_dataset(20_011, num_classes)
    fed = iid(data, num_clients, seed=0)
    assert fed.counts.max() - fed.counts.min() == 1
    hist = label_histograms(fed, num_classes)
    p = np.bincount(data.y, minlength=num_classes) / len(data)
    n = fed.counts[:, None]
    # Each count is hypergeometric with variance below n p (1 - p): a 5-sigma band (+1 for rounding of n p).
    assert np.all(np.abs(hist - n * p) <= 5 * np.sqrt(n * p * (1 - p)) + 1)
    # and the spread is really of that order (not, e.g., a per-client sort by label).
    z = (hist - n * p) / np.sqrt(n * p * (1 - p))
    assert 0.5 < z.std() < 1.2


def test_dirichlet_small_alpha_is_far_more_skewed_than_large_alpha():
    num_classes = 10
    data = indexed_dataset(6000, num_classes)
    skewed = dirichlet(data, 20, alpha=0.1, seed=0, min_size=10)
    near_iid = dirichlet(data, 20, alpha=1000.0, seed=0, min_size=10)
    reference = iid(data, 20, seed=0)
    tv_skewed, tv_near, tv_iid = (mean_total_variation(f, num_classes) for f in (skewed, near_iid, reference))
    # IID clients of ~300 examples: E[TV] ~ 0.5 * L * sqrt(2 p (1 - p) / (pi n)) ~ 0.07.
    expected_iid = 0.5 * num_classes * np.sqrt(2 * 0.1 * 0.9 / (np.pi * 300))
    assert abs(tv_iid - expected_iid) < 0.3 * expected_iid
    assert tv_near < 2 * expected_iid
    assert tv_skewed > 0.6
    assert skewed.counts.min() >= 10 and near_iid.counts.min() >= 10
    # Small alpha: a typical client holds most of its data in few classes.
    top2 = np.sort(label_histograms(skewed, num_classes), axis=1)[:, -2:].sum(1) / skewed.counts
    assert np.median(top2) > 0.7


def test_shards_give_each_client_at_most_two_labels_and_mcmahan_sizes():
    data = indexed_dataset(6000, 10)  # 600 per class -> 200 shards of 30, as MNIST's 300 at 1/10 scale
    fed = shards(data, 100, seed=0, shards_per_client=2)
    hist = label_histograms(fed, 10)
    assert np.all((hist > 0).sum(1) <= 2)
    assert np.all(fed.counts == 60)
    assert np.all(hist % 30 == 0)  # whole single-label shards
    assert (hist > 0).sum(1).mean() > 1.5  # most clients do get two different labels

    uneven = Dataset(np.arange(1000, dtype=np.float32)[:, None], (np.arange(1000) % 7 == 0).astype(np.int32) +
                     2 * (np.arange(1000) % 11 == 0))
    fed = shards(uneven, 9, seed=1, shards_per_client=3)
    assert np.all((label_histograms(fed, 4) > 0).sum(1) <= 3)
    assert_is_permutation(fed, uneven)


def test_quantity_skew_sizes_are_lognormal_with_iid_labels():
    sigma, num_clients = 0.8, 2000
    data = indexed_dataset(600_000, 10)
    fed = quantity_skew(data, num_clients, seed=0, sigma=sigma, min_size=0)
    log_sizes = np.log(fed.counts)
    centred = log_sizes - log_sizes.mean()
    assert stats.kstest(centred, stats.norm(scale=sigma).cdf).pvalue > 1e-3
    assert stats.kstest(centred, stats.norm(scale=1.2 * sigma).cdf).pvalue < 1e-3
    assert stats.kstest(centred, stats.norm(scale=0.8 * sigma).cdf).pvalue < 1e-3
    hist = label_histograms(fed, 10)
    n = fed.counts[:, None]
    assert np.all(np.abs(hist - 0.1 * n) <= 5 * np.sqrt(n * 0.09) + 1)
    equal = quantity_skew(data, 7, seed=0, sigma=0.0)
    assert equal.counts.max() - equal.counts.min() <= 1
    floor = quantity_skew(indexed_dataset(1000), 50, seed=0, sigma=3.0, min_size=8)
    assert floor.counts.min() >= 8


def test_natural_makes_one_client_per_group_and_carries_attributes():
    data = indexed_dataset(500)
    groups = np.random.default_rng(1).choice(np.array([3, 17, 42, 99]), size=500)
    attributes = np.arange(500) % 5
    fed = partition(data, "natural", 4, seed=0, group_ids=groups, attributes=attributes)
    assert_is_permutation(fed, data)
    source = fed.x[:, 0].astype(np.int64)
    np.testing.assert_array_equal(fed.attributes, attributes[source])
    for client, group in enumerate([3, 17, 42, 99]):
        rows = source[fed.offsets[client]: fed.offsets[client] + fed.counts[client]]
        np.testing.assert_array_equal(np.sort(rows), np.flatnonzero(groups == group))
    assert natural(data, groups).num_clients == 4


def test_many_clients_scale():
    data = indexed_dataset(300_000, 10)
    fed = partition(data, "dirichlet", 20_000, seed=0, alpha=0.5, min_size=0)
    assert_is_permutation(fed, data)
    fed = partition(data, "iid", 100_000, seed=0)
    assert np.all(fed.counts == 3)


@pytest.mark.parametrize("scheme, num_clients, kwargs, message", [
    ("federated", 5, {}, "allowed"),
    ("dirichlet", 5, {"alpha": 0.0}, "alpha=0.0"),
    ("dirichlet", 5, {"alpha": -1.0}, "alpha=-1.0"),
    ("dirichlet", 5, {}, "alpha"),
    ("iid", 0, {}, "num_clients=0"),
    ("iid", 101, {}, "num_clients=101"),
    ("shards", 60, {"shards_per_client": 2}, "120"),
    ("shards", 3, {"shards_per_client": 3}, "9"),
    ("shards", 5, {"shards_per_client": 0}, "shards_per_client=0"),
    ("quantity_skew", 5, {"sigma": -1.0}, "sigma=-1.0"),
    ("quantity_skew", 5, {"min_size": 30}, "min_size=30"),
    ("iid", 5, {"alpha": 1.0}, "alpha"),
    ("natural", 5, {"group_ids": np.arange(100) % 4}, "4 distinct"),
    ("natural", 4, {}, "group_ids"),
    ("iid", 4, {"attributes": np.arange(99)}, "attributes has shape"),
    ("natural", 4, {"group_ids": np.arange(100) % 4, "alpha": 1.0}, "alpha"),
])
def test_invalid_arguments_raise_value_error(scheme, num_clients, kwargs, message):
    with pytest.raises(ValueError, match=message):
        partition(indexed_dataset(100), scheme, num_clients, seed=0, **kwargs)


def test_impossible_min_size_gives_up_with_a_clear_error():
    with pytest.raises(ValueError, match="min_size=40"):
        dirichlet(indexed_dataset(1000), 25, alpha=0.01, seed=0, min_size=40, max_attempts=5)


def test_scheme_names():
    assert PARTITION_SCHEMES == ("iid", "dirichlet", "shards", "quantity_skew", "natural")
