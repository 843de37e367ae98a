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


def test_a_run_on_passed_arrays_records_their_fingerprint_and_nothing_it_did_not_use():
    """The saved config names the arrays by a content hash: the same arrays give the same config hash, other
    arrays (one value changed) or the built-in digits another; data fields a passed population makes unused are
    warned about and recorded at their defaults, and the recorded config cannot silently run on other data."""
    import dataclasses
    import warnings

    from fedjaxpriv.config import DataConfig, with_overrides

    population, test = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the config says nothing about the data
        first = Experiment(CONFIG, population=population, test=test, num_classes=4).config
    again = Experiment(CONFIG, population=population, test=test, num_classes=4).config
    other = Experiment(CONFIG, population=_data(x_fill=0.25)[0], test=test, num_classes=4).config
    assert first.data.dataset.startswith("user-supplied arrays ") and len(first.data.dataset.split()[-1]) == 16
    assert again.config_hash() == first.config_hash() != other.config_hash() != CONFIG.config_hash()
    assert first.data == dataclasses.replace(DataConfig(), dataset=first.data.dataset, num_clients=2)
    iid = with_overrides(CONFIG, {"data.partition": "iid", "data.dirichlet_alpha": 0.1})
    with pytest.warns(UserWarning, match=r"data.partition='iid', data.dirichlet_alpha=0.1: not used"):
        recorded = Experiment(iid, population=population, test=test, num_classes=4).config
    assert recorded.config_hash() == first.config_hash()  # the unused fields change nothing that ran
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recorded config run again on the same arrays: nothing to warn about
        assert Experiment(recorded, population=population, test=test, num_classes=4).config == recorded
    with pytest.raises(ValueError, match="records a run on arrays passed to Experiment.*pass the same arrays again"):
        Experiment(recorded)
