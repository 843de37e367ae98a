"""The round program answers what the server can know of a client's local training with the code that trains,
and its answers hold for the messages real rounds send: full-batch exactness against an independent gradient
descent, the pruning schedule against Zhu & Gupta's formula, the server-side mask against the message's zeros."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjaxpriv.config import from_dict
from fedjaxpriv.experiment import Experiment

BASE = {"data": {"num_clients": 6}, "model": {"hidden": [8]}, "server": {"clients_per_round": 6},
        "run": {"rounds": 2, "tap_rounds": [1, 2], "tap_clients": [0, 1]}}


def _gradient_descent(apply_fn, params, x, y, lr: float, steps: int):
    """``steps`` steps of plain gradient descent on the mean cross-entropy of all of (x, y): written here from
    the definition, not with the library's local training."""
    def loss(p):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y))

    for _ in range(steps):
        params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, jax.grad(loss)(params))
    return params


def _row(settings, client):
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[client], settings)


def _replay_gaps(experiment, results):
    """For every tapped message: (program says full-batch GD, largest |message - GD replay|)."""
    population, program = experiment.population, experiment.program
    out = []
    for tap in results.taps.values():
        for position, client in enumerate(tap.client_ids):
            start, count = int(population.offsets[client]), int(population.counts[client])
            row = _row(experiment.settings, client)
            x, y = population.x[start:start + count], population.y[start:start + count]
            replay = _gradient_descent(experiment.model.apply, tap.server_params, x, y, float(row.lr),
                                       int(row.local_steps))
            gap = max(float(np.max(np.abs(np.asarray(m[position]) - (np.asarray(r) - np.asarray(s)))))
                      for m, r, s in zip(jax.tree_util.tree_leaves(tap.messages), jax.tree_util.tree_leaves(replay),
                                         jax.tree_util.tree_leaves(tap.server_params)))
            out.append((program.trains_by_full_batch_gd(row, count, tap.server_params), gap))
    return out


@pytest.mark.slow
def test_full_batch_exactness_is_claimed_where_gradient_descent_replays_the_message_and_not_under_scaffold():
    """FedAvg with a batch larger than every client: the program claims exactness and an independent full-batch
    GD reproduces every tapped message; SCAFFOLD's correction (c - c_i, nonzero from round 2) changes the
    steps: the program says so, and the replay misses round 2's messages by far more than float error."""
    client = {"batch_size": 512, "local_steps": 3, "lr": 0.1}
    fedavg = Experiment(from_dict({**BASE, "client": client}), progress=False)
    gaps = _replay_gaps(fedavg, fedavg.run(progress=False))
    assert [claim for claim, _ in gaps] == [True] * 4
    assert max(gap for _, gap in gaps) < 1e-5
    scaffold = Experiment(from_dict({**BASE, "client": client, "server": {**BASE["server"],
                                                                          "algorithm": "scaffold"}}), progress=False)
    gaps = _replay_gaps(scaffold, scaffold.run(progress=False))
    assert [claim for claim, _ in gaps] == [False] * 4
    assert min(gap for _, gap in gaps[2:]) > 1e-3  # round 2: the correction moved every message


def test_a_sampled_batch_or_per_example_clipping_is_not_claimed_exact():
    experiment = Experiment(from_dict({**BASE, "client": {"batch_size": 512}}), progress=False)
    row, count, params = _row(experiment.settings, 0), int(experiment.population.counts[0]), experiment.initial_params
    assert experiment.program.trains_by_full_batch_gd(row, count, params)
    assert not experiment.program.trains_by_full_batch_gd(row._replace(batch_size=np.int32(count - 1)), count, params)
    assert not experiment.program.trains_by_full_batch_gd(row._replace(dp_clip_norm=np.float32(1.0)), count, params)
    assert not experiment.program.trains_by_full_batch_gd(row._replace(mixup_alpha=np.float32(0.2)), count, params)


@pytest.mark.slow
def test_the_server_known_mask_follows_the_round_schedule_and_covers_the_zeros_of_every_pruned_message():
    """Magnitude pruning ramped over rounds 0-3 (cubic schedule s_t = s (1 - (1 - t / 3)^3)): the program's
    sparsity per round is the formula's, its mask of the global model has exactly floor(s_t n) zeros per
    kernel, and every weight it zeroes is one the client's tapped message leaves at 0."""
    final = 0.5
    config = from_dict({**BASE, "client": {"prune_sparsity": final, "prune_begin_round": 0, "prune_end_round": 3,
                                           "local_steps": 2},
                        "run": {**BASE["run"], "rounds": 3, "tap_rounds": [1, 2, 3]}})
    experiment = Experiment(config, progress=False)
    results = experiment.run(progress=False)
    program = experiment.program
    for round_number, tap in results.taps.items():
        expected = final * (1 - (1 - (round_number - 1) / 3) ** 3)
        assert program.scheduled_sparsity(final, round_number) == pytest.approx(expected, rel=1e-6)
        for position, client in enumerate(tap.client_ids):
            mask = program.server_known_mask(tap.server_params, _row(experiment.settings, client), round_number)
            if expected == 0:
                assert mask is None
                continue
            for m, message in zip(jax.tree_util.tree_leaves(mask), jax.tree_util.tree_leaves(tap.messages)):
                if m.ndim < 2:
                    assert np.all(m == 1)  # biases are not pruned
                    continue
                assert int(np.sum(m == 0)) == int(np.floor(expected * m.size + 1e-6))
                assert np.all(np.asarray(message[position])[m == 0] == 0)
