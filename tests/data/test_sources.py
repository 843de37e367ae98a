"""The embedded digits dataset and the dataset registry."""

import dataclasses

import numpy as np
import pytest
from sklearn.datasets import load_digits as sklearn_digits

from fedjaxpriv.data import DATASET_NAMES, DatasetInfo, load_dataset


def test_digits_split_is_a_fixed_stratified_partition_of_sklearn_digits():
    train, test, info = load_dataset("digits")
    assert info == DatasetInfo("digits", (8, 8, 1), 10, 1437, 360)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int32
    reference = sklearn_digits()
    ref_x = reference.images.astype(np.float32) / 16
    # Train and test together are exactly the 1797 reference examples, each once.
    both_x = np.concatenate([train.x, test.x])[..., 0].reshape(1797, 64)
    both_y = np.concatenate([train.y, test.y])
    ref_rows = {row.tobytes() + bytes([label]) for row, label in zip(ref_x.reshape(1797, 64), reference.target)}
    ours = [row.tobytes() + bytes([label]) for row, label in zip(both_x, both_y)]
    assert len(set(ours)) == len(ours) == len(ref_rows)
    assert set(ours) == ref_rows
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    # Stratified: every class's test share is within one example of 360 / 1797.
    for c in range(10):
        n_c = int(np.sum(reference.target == c))
        assert abs(int(np.sum(test.y == c)) - n_c * 360 / 1797) <= 1.0


def test_digits_is_deterministic():
    first, second = load_dataset("digits"), load_dataset("digits")
    np.testing.assert_array_equal(first[1].x, second[1].x)
    np.testing.assert_array_equal(first[0].y, second[0].y)


def test_registry_and_info_are_frozen():
    assert DATASET_NAMES == ("digits", "mnist", "fashion_mnist", "emnist", "cifar10", "cifar100")
    info = load_dataset("digits")[2]
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_classes = 3


@pytest.mark.parametrize("name", ["mnist_digits", "", "tfds:", "cifar10/extra"])
def test_unknown_names_raise_with_the_allowed_list(name):
    with pytest.raises(ValueError, match="allowed: one of \\['digits', 'mnist'"):
        load_dataset(name)
