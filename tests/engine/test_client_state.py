"""Per-client transform state carried across rounds: error feedback against a tap reference, its published
effect on top-k, resume, and a user's own stateful transform with its own per-client strength."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv.config import ExperimentConfig, with_overrides
from fedjaxpriv.experiment import Experiment
from fedjaxpriv.transforms import MessageTransform, chain, top_k

BASE = ("data.num_clients=10", "model.name=logreg", "client.local_steps=5", "client.batch_size=16", "client.lr=0.1",
        "run.checkpoint_every=0", "run.num_devices=1")


def _config(*overrides: str) -> ExperimentConfig:
    return with_overrides(ExperimentConfig(), [*BASE, *overrides])


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(tree)])


@pytest.mark.slow
def test_feedback_residual_equals_the_tap_reference_and_waits_for_absent_clients():
    """Round by round, a participant's residual becomes delta + e - sent, where delta is its uncompressed update
    (the same client, keys and global model without the compressor) and sent its tapped message; a client
    outside the cohort keeps its residual unchanged."""
    config = _config("server.clients_per_round=4", "run.rounds=3", "message.topk_fraction=0.05",
                     "message.error_feedback=true")
    compressed = Experiment(config)
    dense = Experiment(with_overrides(config, ["message.topk_fraction=1.0", "message.error_feedback=false"]))
    state = compressed.initial_state
    residuals = np.zeros((10, _flat(state.params).size), np.float32)
    previous = residuals.copy()
    for r in range(3):
        cohort, _ = compressed.round_cohort(r)
        ids = cohort.ids[cohort.mask]
        sent = compressed.tap(state, ids).messages
        plain = dense.initial_state._replace(params=state.params, round=state.round)
        delta = dense.tap(plain, ids).messages
        for k, client in enumerate(ids):
            residuals[client] += _flat(jax.tree_util.tree_map(lambda d, s: d[k] - s[k], delta, sent))
        state, record = compressed.step(jax.tree_util.tree_map(jnp.copy, state), r, cohort)
        residual = state.client_state.message[0][0]  # chain stage 0: (residual, top-k state)
        got = np.stack([_flat(jax.tree_util.tree_map(lambda a: a[c], residual)) for c in range(10)])
        np.testing.assert_allclose(got, residuals, atol=2e-5)
        absent = np.setdiff1d(np.arange(10), ids)
        assert absent.size and np.array_equal(got[absent], previous[absent])
        previous = got
        assert record["message/error_feedback@topk/residual_norm"] == pytest.approx(
            np.mean(np.linalg.norm(residuals[ids], axis=1)), rel=1e-4)


@pytest.mark.slow
def test_feedback_top_k_reaches_an_accuracy_plain_top_k_does_not():
    """Karimireddy et al. 2019 (EF-SGD): top-k at 1% of coordinates stalls without error feedback and nearly
    matches dense training with it. Margins: 3 binomial standard errors of the difference on the test set."""
    config = _config("server.clients_per_round=10", "run.rounds=30", "run.eval_every=30",
                     "message.topk_fraction=0.01")
    plain = Experiment(config).run(progress=False).final("test_accuracy")
    experiment = Experiment(with_overrides(config, ["message.error_feedback=true"]))
    feedback = experiment.run(progress=False).final("test_accuracy")
    dense = Experiment(with_overrides(config, ["message.topk_fraction=1.0"])).run(progress=False)
    n = len(experiment.test.y)

    def margin(p: float, q: float) -> float:
        return 3 * np.sqrt(p * (1 - p) / n + q * (1 - q) / n)

    assert feedback > plain + margin(feedback, plain), (feedback, plain)
    assert feedback > dense.final("test_accuracy") - 0.1, (feedback, dense.final("test_accuracy"))


@pytest.mark.slow
def test_resumed_run_carries_the_client_state(tmp_path):
    config = _config("server.clients_per_round=5", "run.rounds=4", "run.eval_every=4", "run.checkpoint_every=2",
                     "message.topk_fraction=0.05", "message.error_feedback=true")
    full = Experiment(config).run(progress=False)
    Experiment(config).run(str(tmp_path), progress=False, rounds=2)
    resumed = Experiment(config).run(str(tmp_path), progress=False)
    np.testing.assert_array_equal(_flat(resumed.params), _flat(full.params))
    assert [r["message/error_feedback@topk/residual_norm"] for r in resumed.history] == \
        [r["message/error_feedback@topk/residual_norm"] for r in full.history]


def _scale_and_count(strength: str) -> MessageTransform:
    """A user's transform: scales the message by a per-client strength and counts the messages it sent."""

    def init(params_like):
        return jnp.zeros((), jnp.int32)

    def update(message, count, key, settings, wire=None):
        from fedjaxpriv.transforms import dense_wire, resolve

        scale = resolve(strength, settings)
        scaled = jax.tree_util.tree_map(lambda m: scale * m, message)
        wire = dense_wire(message) if wire is None else wire
        return scaled, count + 1, {"scale_and_count/scale": scale, **wire.as_stats()}

    return MessageTransform(init, update)


@pytest.mark.slow
def test_user_transform_with_its_own_strength_state_and_diagnostics():
    """A user-written stateful transform reading a user-added per-client strength, chained with a built-in
    one: its state counts each client's rounds exactly, its diagnostic is the cohort's mean strength, and a
    client whose strength is 0 sends nothing."""
    config = _config("server.clients_per_round=4", "run.rounds=5", "run.eval_every=5")
    scales = np.linspace(0.0, 0.9, 10).astype(np.float32)
    experiment = Experiment(config, message_transform=chain(top_k(0.5), _scale_and_count("my_scale")),
                            extra_settings={"my_scale": scales.tolist()})
    results = experiment.run(progress=False)
    expected = np.zeros(10, np.int32)
    for r, record in enumerate(results.history):
        cohort, _ = experiment.round_cohort(r)
        ids = cohort.ids[cohort.mask]
        expected[ids] += 1
        assert record["message/scale_and_count/scale"] == pytest.approx(float(np.mean(scales[ids])), rel=1e-5)
        assert record["message/top_k/sq_error"] > 0
    state = experiment.initial_state
    for r in range(5):
        state, _ = experiment.step(state, r)
    np.testing.assert_array_equal(np.asarray(state.client_state.message[1]), expected)
    assert expected.sum() == 5 * 4
    silent = experiment.tap(experiment.initial_state, [0]).messages
    assert all(float(np.max(np.abs(leaf))) == 0.0 for leaf in jax.tree_util.tree_leaves(silent))
    with pytest.raises(ValueError, match="my_scal"):
        Experiment(config, message_transform=_scale_and_count("my_scal"),
                   extra_settings={"my_scale": 1.0}).run(progress=False, rounds=1)
