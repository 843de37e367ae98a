"""Gradient inversion of tapped messages (``attacks.inversion_eval``) through the library's own pipeline.

One ``Experiment`` on the bundled 8x8 digits: 16 clients of 8 examples each, batch size 8 and 4 local SGD
steps (every step is full-batch, so the attacker's simulation of the local training is exact), an MLP with
64 hidden units, and the defenses set per client in the config (per-client lists), so that local training
and the message transforms run as in a round. The messages are those ``Experiment.tap`` records for a run
(``Results.taps``) in round 1. Clients 0-3 are undefended; each defended pair holds copies of the examples
of clients 0 and 1, so every comparison is on the same images. All attacks use the default attack, whose
compiled program is shared by every call below.
"""

import dataclasses
import math

import jax
import matplotlib.image
import numpy as np
import pytest

from fedjaxpriv.attacks import inversion, inversion_eval
from fedjaxpriv.client import pruning
from fedjaxpriv.config import (ClientConfig, DataConfig, ExperimentConfig, MessageConfig, ModelConfig, RunConfig,
                               ServerConfig)
from fedjaxpriv.data import load_dataset
from fedjaxpriv.data.federated import from_client_lists
from fedjaxpriv.experiment import Experiment

BATCH, STEPS, NUM_CLIENTS = 8, 4, 16
GROUPS = {"none": (0, 1, 2, 3), "topk": (4, 5), "message_prune": (6, 7), "qsgd": (8, 9), "clip": (10, 11),
          "noise": (12, 13), "client_prune": (14, 15)}
SAME_DATA = (0, 1)  # the undefended clients whose examples every defended pair holds
NEVER_CLIPS = 1e3  # clip norm of the clients without clipping (local noise needs a finite clip for all)


def _per_client(group: str, value: float, default: float) -> tuple:
    return tuple(value if c in GROUPS[group] else default for c in range(NUM_CLIENTS))


@pytest.fixture(scope="module")
def run():
    train, test, _ = load_dataset("digits")
    blocks = [c if c in GROUPS["none"] else SAME_DATA[c % 2] for c in range(NUM_CLIENTS)]
    population = from_client_lists([train.x[b * BATCH:(b + 1) * BATCH] for b in blocks],
                                   [train.y[b * BATCH:(b + 1) * BATCH] for b in blocks])
    clip = tuple(0.1 if c in GROUPS["clip"] + GROUPS["noise"] else NEVER_CLIPS for c in range(NUM_CLIENTS))
    config = ExperimentConfig(
        data=DataConfig(dataset="digits", num_clients=NUM_CLIENTS), model=ModelConfig(name="mlp", hidden=(64,)),
        client=ClientConfig(local_steps=STEPS, batch_size=BATCH, lr=0.1,
                            prune_sparsity=_per_client("client_prune", 0.5, 0.0)),
        message=MessageConfig(topk_fraction=_per_client("topk", 0.1, 1.0),
                              sparsity=_per_client("message_prune", 0.9, 0.0), qsgd_levels=_per_client("qsgd", 1, 0),
                              clip_norm=clip, local_noise_multiplier=_per_client("noise", 0.1, 0.0)),
        server=ServerConfig(clients_per_round=NUM_CLIENTS), run=RunConfig(rounds=1, checkpoint_every=0))
    experiment = Experiment(config, population=population, test=test, num_classes=10)
    taps = {1: experiment.tap(experiment.initial_state, list(range(NUM_CLIENTS)))}
    report = inversion_eval.invert_taps(experiment, taps, key=jax.random.key(0), max_targets=NUM_CLIENTS)
    return dict(experiment=experiment, taps=taps, report=report)


def _median_psnr(report, group):
    return float(np.median(report.select(clients=GROUPS[group]).psnr))


def test_undefended_multi_step_updates_are_reconstructed(run, tmp_path):
    report = run["report"].select(clients=GROUPS["none"])
    assert len(report.targets) == 4
    assert all(t.exact and t.distance == "l2" and t.originals.shape == (BATCH, 8, 8, 1) for t in report.targets)
    summary = report.summary()
    assert summary["psnr_median"] > 30.0, report.psnr
    assert summary["ssim_median"] > 0.95, report.ssim
    assert report.label_accuracy >= 0.9
    assert report.fraction_above_threshold >= 0.75 and summary["psnr_threshold"] == 20.0
    assert summary["psnr_q25"] <= summary["psnr_median"] <= summary["psnr_q75"]
    # Reconstructions come back matched to the originals: row i is closest to original i.
    first = report.targets[0]
    errors = ((first.originals[:, None] - first.reconstructions[None]) ** 2).reshape(BATCH, BATCH, -1).mean(-1)
    assert np.all(np.argmin(errors, axis=1) == np.arange(BATCH))
    path = tmp_path / "grid.png"
    report.save_grid(str(path), max_images=8)
    assert matplotlib.image.imread(str(path))[..., :3].std() > 0.05


def test_full_batch_simulation_reproduces_the_tapped_messages(run):
    """The evaluation regime is exact: 4 full-batch SGD steps on a client's true examples (under its pruning
    mask recomputed from the server parameters) give the message the library's pipeline produced."""
    experiment, tap = run["experiment"], run["taps"][1]
    spec = inversion.TargetSpec(input_shape=(8, 8, 1), num_classes=10, batch_size=BATCH, local_steps=STEPS)
    simulate = jax.jit(lambda x, y, mask: inversion.simulate_message(
        spec, experiment.model.apply, tap.server_params, x, jax.nn.one_hot(y, 10), 0.1, mask=mask))
    for client in (0, GROUPS["client_prune"][0]):
        data = experiment.population.client(client)
        mask = pruning.magnitude_mask(tap.server_params, float(experiment.settings.prune_sparsity[client]))
        simulated = simulate(data.x, data.y, mask)
        sent = jax.tree_util.tree_map(lambda leaf: leaf[client], tap.messages)
        for got, want in zip(jax.tree_util.tree_leaves(simulated), jax.tree_util.tree_leaves(sent)):
            np.testing.assert_allclose(got, want, atol=1e-6)


def test_sparsification_quantization_and_local_noise_degrade_reconstruction(run):
    report = run["report"]
    same_images = float(np.median(report.select(clients=SAME_DATA).psnr))
    assert same_images > 40.0, report.select(clients=SAME_DATA).psnr
    for group in ("topk", "message_prune", "qsgd", "noise"):
        defended = report.select(clients=GROUPS[group])
        assert np.all(defended.psnr < 13.0), (group, defended.psnr)
        assert defended.fraction_above_threshold == 0.0, group
    assert all(t.distance == "cosine" for t in report.select(clients=GROUPS["noise"]).targets)
    assert all(t.distance == "l2" for t in report.select(clients=GROUPS["qsgd"]).targets)


def test_mask_aware_attacker_defeats_client_pruning(run):
    aware = run["report"].select(clients=GROUPS["client_prune"])
    assert all(t.mask_aware and t.exact for t in aware.targets)
    unaware = inversion_eval.invert_taps(run["experiment"], run["taps"], key=jax.random.key(0),
                                         clients=GROUPS["client_prune"], mask_aware=False)
    assert not any(t.mask_aware or t.exact for t in unaware.targets)
    assert np.median(aware.psnr) > 20.0, aware.psnr
    assert np.all(unaware.psnr < 13.0), unaware.psnr
    assert np.median(aware.psnr) > np.median(unaware.psnr) + 10.0


def test_clipping_alone_does_not_fool_the_cosine_objective(run):
    report = run["report"]
    clipped, same_images = report.select(clients=GROUPS["clip"]), report.select(clients=SAME_DATA)
    assert all(t.distance == "cosine" for t in clipped.targets)
    # The clipped message is the update scaled down, which the cosine ignores: as good as without clipping
    # (above 40 dB both are converged reconstructions).
    assert np.all(clipped.psnr > 30.0), clipped.psnr
    assert np.all(np.minimum(clipped.psnr, 40.0) >= np.minimum(same_images.psnr, 40.0) - 3.0), (
        clipped.psnr, same_images.psnr)
    # L2 matching of the same messages is fooled: clipping only "defends" against a scale-aware objective.
    l2 = dataclasses.replace(inversion_eval.DEFAULT_ATTACK, distance="l2")
    fooled = inversion_eval.invert_taps(run["experiment"], run["taps"], key=jax.random.key(0),
                                        clients=GROUPS["clip"], attack=l2)
    assert all(t.distance == "l2" for t in fooled.targets)
    assert np.all(fooled.psnr < 13.0), fooled.psnr


def test_idlg_labels_of_batch1_taps_from_a_12_layer_mlp():
    """iDLG (Zhao et al. 2020) on batch-1 clients' 2-step updates: 100% label accuracy, with the output kernel
    found in module order (Dense_11; as strings Dense_9 would sort last)."""
    train, test, _ = load_dataset("digits")
    clients = 16
    population = from_client_lists([train.x[i:i + 1] for i in range(clients)],
                                   [train.y[i:i + 1] for i in range(clients)])
    config = ExperimentConfig(
        data=DataConfig(dataset="digits", num_clients=clients), model=ModelConfig(name="mlp", hidden=(32,) * 11),
        client=ClientConfig(local_steps=2, batch_size=1, lr=0.1), server=ServerConfig(clients_per_round=clients),
        run=RunConfig(rounds=1, checkpoint_every=0))
    experiment = Experiment(config, population=population, test=test, num_classes=10)
    tap = experiment.tap(experiment.initial_state, list(range(clients)))
    kernels = jax.vmap(inversion.last_layer_kernel)(tap.messages)  # one client's message per call
    np.testing.assert_array_equal(kernels, tap.messages["Dense_11"]["kernel"])
    labels = jax.vmap(lambda kernel: inversion.idlg_label(-kernel))(kernels)  # updates point against gradients
    np.testing.assert_array_equal(labels, train.y[:clients])


def test_summary_is_uncapped_and_handles_exact_reconstructions():
    def target(psnr):
        x = np.zeros((2, 8, 8, 1), np.float32)
        return inversion_eval.TargetInversion(
            round=1, client=0, originals=x, reconstructions=x, labels=np.zeros(2, np.int32),
            predicted_labels=np.array([0, 1], np.int32), example_psnr=np.array([psnr, psnr]),
            example_ssim=np.ones(2), psnr=psnr, ssim=1.0, distance="l2", exact=True, mask_aware=False, loss=0.0)

    report = inversion_eval.InversionReport(targets=(target(150.0), target(math.inf), target(math.inf)),
                                            psnr_threshold=25.0, attack=inversion_eval.DEFAULT_ATTACK)
    summary = report.summary()
    assert summary["psnr_median"] == math.inf and summary["psnr_q75"] == math.inf
    assert summary["psnr_q25"] == math.inf  # halfway between 150 and inf
    assert summary["psnr_iqr"] == 0.0 and summary["ssim_iqr"] == 0.0
    assert summary["label_accuracy"] == 0.5 and summary["fraction_above_threshold"] == 1.0
    assert summary["psnr_threshold"] == 25.0 and summary["targets"] == 3.0
    low = inversion_eval.InversionReport(targets=(target(10.0), target(30.0)), psnr_threshold=20.0,
                                         attack=inversion_eval.DEFAULT_ATTACK)
    assert low.summary()["psnr_iqr"] == pytest.approx(10.0) and low.fraction_above_threshold == 0.5


def test_invalid_arguments_raise(run):
    experiment, taps = run["experiment"], run["taps"]
    known = dataclasses.replace(inversion_eval.DEFAULT_ATTACK, labels="known")
    with pytest.raises(ValueError, match="known"):
        inversion_eval.invert_taps(experiment, taps, key=jax.random.key(0), attack=known)
    with pytest.raises(ValueError, match="max_targets=0"):
        inversion_eval.invert_taps(experiment, taps, key=jax.random.key(0), max_targets=0)
    idlg = dataclasses.replace(inversion_eval.DEFAULT_ATTACK, labels="idlg")
    with pytest.raises(ValueError, match="batch-1"):
        inversion_eval.invert_taps(experiment, taps, key=jax.random.key(0), attack=idlg)
    with pytest.raises(ValueError, match="distance"):
        inversion.InversionConfig(distance="l1")
    limited = inversion_eval.invert_taps(experiment, taps, key=jax.random.key(0), clients=(0,), max_examples=4)
    assert limited.targets == () and limited.skipped[0][:2] == (1, 0) and "max_examples=4" in limited.skipped[0][2]
