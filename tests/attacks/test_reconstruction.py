"""Local-model reconstruction by an eavesdropper from a client's messages and one global model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv.attacks import reconstruction
from fedjaxpriv.models import get_model
from tests.attacks.test_attribute import TARGETS, attribute_run, dense_params


def test_accumulate_messages_exact_sum_and_mask():
    init = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    messages = {"w": jnp.arange(24.0).reshape(4, 2, 3), "b": jnp.arange(12.0).reshape(4, 3)}
    got = reconstruction.accumulate_messages(init, messages, scale=0.5, mask=jnp.array([1, 0, 1, 1]))
    np.testing.assert_allclose(got["w"], 1 + 0.5 * (messages["w"][0] + messages["w"][2] + messages["w"][3]))
    np.testing.assert_allclose(got["b"], 0.5 * (messages["b"][0] + messages["b"][2] + messages["b"][3]))
    np.testing.assert_allclose(reconstruction.params_distance(init, got),
                               np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2)
                                           for a, b in zip(jax.tree_util.tree_leaves(init),
                                                           jax.tree_util.tree_leaves(got)))), rtol=1e-6)


def test_drift_weights_hand_cases_and_errors():
    rounds = [1, 3, 4, 6]
    # Initial model: the client's earlier steps move the global model forward by w each.
    np.testing.assert_allclose(reconstruction.drift_weights(rounds, 1, 0.1), [0.1, 0.1, 0.1, 1.0], rtol=1e-6)
    # Held model of round 4: only the round-4 step lies between it and round 6.
    np.testing.assert_allclose(reconstruction.drift_weights(rounds, 4, 0.1), [0.0, 0.0, 0.1, 1.0], rtol=1e-6)
    np.testing.assert_allclose(reconstruction.drift_weights(rounds, 5, 0.1), [0.0, 0.0, 0.0, 1.0])
    # Final model (after round 6, or later rounds it was not seen in): round 6's own step is taken back.
    for held in (7, 9):
        np.testing.assert_allclose(reconstruction.drift_weights(rounds, held, 0.1), [0.0, 0.0, 0.0, 0.9],
                                   rtol=1e-6)
    for args, message in (((rounds[::-1], 1, 0.1), r"rounds=\[6, 4, 3, 1\]"), (([], 1, 0.1), r"rounds=\[\]"),
                          (([0, 2], 1, 0.1), r"rounds=\[0, 2\]"), ((rounds, 0, 0.1), "held_round=0"),
                          ((rounds, 1, -0.5), "client_weight=-0.5"), ((rounds, 1, float("nan")), "client_weight=nan")):
        with pytest.raises(ValueError, match=message):
            reconstruction.drift_weights(*args)


def test_reconstruction_report_against_its_two_baselines():
    model = get_model("logreg", (3,), 2)
    local, init, held = (dense_params(seed, (3, 2)) for seed in range(3))
    x = np.random.default_rng(3).normal(size=(50, 3)).astype(np.float32)
    y = np.asarray(jnp.argmax(model.apply(local, jnp.asarray(x)), -1))   # the local model is right everywhere
    report = reconstruction.reconstruction_report(model.apply, held, local, init, held, x, y)
    assert report["relative_l2_global"] == pytest.approx(1.0) and report["accuracy_gain_global"] == 0.0
    assert report["relative_l2"] == pytest.approx(report["global_l2_distance"] / report["init_l2_distance"])
    report = reconstruction.reconstruction_report(model.apply, local, local, init, held, x, y)
    assert report["l2_distance"] == 0.0 and report["relative_l2_global"] == 0.0
    assert report["accuracy"] == report["local_accuracy"] == 1.0
    assert report["accuracy_gain"] == pytest.approx(1.0 - report["init_accuracy"])


@pytest.fixture(scope="module")
def final_model_attacks():
    """The eavesdropper holding the final global model, on the runs without and with DP-SGD (epsilon 1)."""
    out = {}
    for dp in (False, True):
        experiment, results = attribute_run(dp)
        out[dp] = reconstruction.reconstruction_attack_on_taps(experiment, results.taps, global_params=results.params)
    return out


@pytest.mark.slow
def test_eavesdropper_with_final_model_gets_closer_to_local_model(final_model_attacks):
    out = final_model_attacks[False]
    assert out["num_clients"] == len(TARGETS)
    assert all(r["rounds"] == [1, 2, 3, 4, 5] for r in out["per_client"].values())
    assert out["closer_than_global"] >= 0.75 and out["relative_l2_global"] < 0.6, out
    # ... and it fits the client's data about as well as the local model does, better than the global model.
    assert out["accuracy"] >= out["local_accuracy"] - 0.05, out
    assert out["accuracy_gain_global_low"] > 0.05, out


def test_eavesdropper_with_initial_model_only():
    experiment, results = attribute_run(False)
    init = experiment.initial_state.params
    out = reconstruction.reconstruction_attack_on_taps(experiment, results.taps, global_params=init, global_round=1)
    assert out["relative_l2"] == out["relative_l2_global"] < 0.9, out
    assert out["accuracy_gain_global_low"] > 0.05 and out["accuracy"] > out["init_accuracy"] + 0.1, out
    # Replaying every message with weight 1 (the client as if it trained alone) ends farther from the local model.
    replay = reconstruction.reconstruction_attack_on_taps(experiment, results.taps, global_params=init,
                                                          global_round=1, client_weight=1.0)
    assert replay["relative_l2"] > max(1.0, out["relative_l2"] + 0.1), (replay, out)


@pytest.mark.slow
def test_dp_sgd_leaves_the_noise_but_not_the_data(final_model_attacks):
    out, plain = final_model_attacks[True], final_model_attacks[False]
    # The local model holds the client's own DP noise, which the eavesdropper sees in the message: in L2 the
    # reconstruction stays close. What it knows of the client's data is no better than the global model's.
    assert out["relative_l2_global"] < 1, out
    assert out["accuracy_gain_global_low"] <= 0.0 <= out["accuracy_gain_global_high"], out
    assert out["accuracy_gain_global_high"] < plain["accuracy_gain_global_low"], (out, plain)
