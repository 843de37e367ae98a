"""Local-model reconstruction by an eavesdropper from a client's messages only."""

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv import evaluation
from fedjaxpriv.attacks import membership, reconstruction
from fedjaxpriv.config import ClientConfig, DataConfig, ExperimentConfig, ModelConfig, RunConfig, ServerConfig
from fedjaxpriv.experiment import Experiment


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


def test_eavesdropped_model_fits_client_data_like_its_local_model():
    rounds, targets = 10, (0, 1, 2, 3)
    config = ExperimentConfig(
        data=DataConfig(dataset="digits", num_clients=10, partition="shards"), model=ModelConfig(name="mlp", hidden=(64,)),
        client=ClientConfig(local_steps=20, batch_size=16, lr=0.2), server=ServerConfig(clients_per_round=5),
        run=RunConfig(rounds=rounds, eval_every=rounds, checkpoint_every=0, tap_clients=targets,
                      tap_rounds=tuple(range(1, rounds + 1))))
    experiment = Experiment(config)
    results = experiment.run(progress=False)
    taps = [results.taps[r] for r in sorted(results.taps)]
    init = experiment.initial_state.params
    for client in targets:
        server, messages = membership.stack_taps(taps, client)
        rebuilt = reconstruction.accumulate_messages(init, messages)
        local = jax.tree_util.tree_map(lambda p, m: p[-1] + m[-1], server, messages)
        data = experiment.population.client(client)
        report = reconstruction.reconstruction_report(experiment.model.apply, rebuilt, local, init, data.x, data.y)
        global_accuracy = evaluation.evaluate(experiment.model.apply, results.params, data.x, data.y)["accuracy"]
        # Two-class shards: the eavesdropper's model is as good as the client's own local model on its data,
        # far better than the initial model and at least as good as the final global model.
        assert report["accuracy"] >= report["local_accuracy"] - 0.05, report
        assert report["accuracy"] >= report["init_accuracy"] + 0.5, report
        assert report["accuracy"] >= global_accuracy, (report, global_accuracy)
        assert np.isfinite(report["l2_distance"]) and report["init_l2_distance"] > 0
