"""Data passed to ``Experiment`` is checked before anything is built: each mistake a ``ValueError`` naming it."""

import numpy as np
import pytest

from fedjaxpriv.config import from_dict
from fedjaxpriv.data import Dataset, from_client_lists
from fedjaxpriv.experiment import Experiment
from fedjaxpriv.models.tasks import NEXT_TOKEN, check_targets

CONFIG = from_dict({"data": {"num_clients": 2}, "model": {"hidden": [8]}, "server": {"clients_per_round": 2},
                    "run": {"rounds": 1, "checkpoint_every": 0}})


def _data(labels=(0, 1, 2, 3), x_fill=0.5, test_shape=(4,)):
    rng = np.random.default_rng(0)
    xs = [rng.random((2, 4)).astype(np.float32) for _ in range(2)]
    xs[1][0, 0] = x_fill
    population = from_client_lists(xs, [np.array(labels[:2]), np.array(labels[2:])])
    test = Dataset(np.zeros((3, *test_shape), np.float32), np.array([0, 1, 2]))
    return population, test


@pytest.mark.parametrize("change, message", [
    (dict(labels=(5, 6, 7, 8)), r"population\.y holds 4 target\(s\) outside the 4 classes, e\.g\. 5; allowed: in "
                                r"\[0, 4\)"),
    (dict(labels=(0, -1, 2, 3)), r"population\.y holds 1 target.*e\.g\. -1"),
    (dict(x_fill=np.nan), r"population\.x holds 1 NaN or infinite value"),
    (dict(test_shape=(5,)), r"test inputs have shape \(5,\) per example but the population's have \(4,\)"),
])
def test_bad_data_is_refused_naming_the_problem(change, message):
    population, test = _data(**change)
    with pytest.raises(ValueError, match=message):
        Experiment(CONFIG, population=population, test=test, num_classes=4)


def test_wrong_containers_and_class_counts_say_what_to_pass():
    population, test = _data()
    with pytest.raises(ValueError, match=r"population is a tuple; allowed: a fedjaxpriv\.data\.FederatedData.*"
                                         r"from_client_lists"):
        Experiment(CONFIG, population=(population.x, population.y), test=test, num_classes=4)
    with pytest.raises(ValueError, match=r"test is a tuple; allowed: a fedjaxpriv\.data\.Dataset"):
        Experiment(CONFIG, population=population, test=(test.x, test.y), num_classes=4)
    with pytest.raises(ValueError, match=r"num_classes=2\.5 is not allowed"):
        Experiment(CONFIG, population=population, test=test, num_classes=2.5)
    Experiment(CONFIG, population=population, test=test, num_classes=4)  # the same data, right: accepted


def test_next_token_targets_may_be_padding_but_not_beyond_the_vocabulary():
    check_targets(NEXT_TOKEN, np.array([[3, 4, -1, -1]]), 5, "y")
    with pytest.raises(ValueError, match=r"y holds 1 target.*e\.g\. 5; allowed: < 5 \(negative = padding\)"):
        check_targets(NEXT_TOKEN, np.array([[3, 5, -1]]), 5, "y")
