"""Shadow federations replay the target's federated training, vectorized over federations."""

import jax
import numpy as np
import pytest

from fedjaxpriv.attacks import shadow
from fedjaxpriv.config import from_dict
from fedjaxpriv.data import Dataset, load_digits
from fedjaxpriv.experiment import Experiment, partition_like


def _experiment(**client):
    train, _ = load_digits()
    pool = Dataset(train.x[:120], train.y[:120])
    config = from_dict({"data": {"num_clients": 4, "partition": "iid"}, "model": {"hidden": [16]},
                        "client": {"local_steps": 3, "batch_size": 8, **client}, "server": {"clients_per_round": 2},
                        "run": {"rounds": 2, "eval_every": 2, "num_devices": 1}})
    members = Dataset(pool.x[::2], pool.y[::2])
    return Experiment(config, population=partition_like(config, members, 0), test=members, num_classes=10,
                      data_from_config=True), pool


@pytest.mark.slow
def test_vectorized_federations_equal_one_at_a_time_and_each_holds_half_the_pool():
    experiment, pool = _experiment(mixup_alpha=0.5)
    together = shadow.train_shadow_federations(experiment, pool, 4, jax.random.key(0))
    singly = shadow.train_shadow_federations(experiment, pool, 4, jax.random.key(0), vectorize=False)
    for a, b in zip(jax.tree_util.tree_leaves(together.params), jax.tree_util.tree_leaves(singly.params)):
        assert a.shape[0] == 4
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    np.testing.assert_array_equal(together.inclusion, singly.inclusion)
    assert np.all(together.inclusion.sum(1) == len(pool) // 2)
    assert not np.array_equal(together.inclusion[0], together.inclusion[1])
    # Different halves and initialisations give different models; replaying zero rounds returns the fresh
    # initialisations, which the two rounds moved.
    kernel = np.asarray(jax.tree_util.tree_leaves(together.params)[-1])
    assert not np.allclose(kernel[0], kernel[1])
    fresh = shadow.train_shadow_federations(experiment, pool, 4, jax.random.key(0), rounds=0)
    init = jax.vmap(experiment.model.init)(jax.numpy.stack([jax.random.fold_in(jax.random.key(0), 10 + s)
                                                             for s in range(4)]))
    for a, b, c in zip(jax.tree_util.tree_leaves(fresh.params), jax.tree_util.tree_leaves(init),
                       jax.tree_util.tree_leaves(together.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert not np.allclose(np.asarray(a), np.asarray(c))
