"""Shared small populations for engine tests."""

import pytest

from fedjaxpriv.data import load_dataset, partition


@pytest.fixture(scope="session")
def digits_population():
    train, test, info = load_dataset("digits")
    population = partition(train, "dirichlet", 12, seed=0, alpha=0.5)
    return population, test, info
