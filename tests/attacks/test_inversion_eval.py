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
from fedjaxpriv.program import Tap

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_sparsification_quantization_and_local_noise_degrade_reconstruction(run):
    report = run["report"]
    same_images = float(np.median(report.select(clients=SAME_DATA).psnr))
    assert same_images > 40.0, report.select(clients=SAME_DATA).psnr
    for group in ("topk", "message_prune", "qsgd", "noise"):
        defended = report.select(clients=GROUPS[group])
        assert np.all(defended.psnr < 13.0), (group, defended.psnr)
        assert defended.fraction_above_threshold == 0.0, group


@pytest.mark.slow
def test_mask_aware_attacker_defeats_client_pruning(run):
    aware = run["report"].select(clients=GROUPS["client_prune"])
    assert all(t.mask_aware and t.exact for t in aware.targets)
    unaware = inversion_eval.invert_taps(run["experiment"], run["taps"], key=jax.random.key(0),
                                         clients=GROUPS["client_prune"], mask_aware=False)
    assert not any(t.mask_aware or t.exact for t in unaware.targets)
    assert np.median(aware.psnr) > 20.0, aware.psnr
    assert np.all(unaware.psnr < 13.0), unaware.psnr
    assert np.median(aware.psnr) > np.median(unaware.psnr) + 10.0


@pytest.mark.slow
def test_a_target_reconstructs_the_same_in_a_smaller_chunk(run):
    """Targets of a call are padded to a power of two: two targets run in a chunk of 2 (the fixture's 16 ran in
    chunks of 8), each with its own key, and give the same reconstructions (up to float reordering over hundreds of iterations)."""
    alone = inversion_eval.invert_taps(run["experiment"], run["taps"], key=jax.random.key(0), clients=SAME_DATA)
    together = run["report"].select(clients=SAME_DATA)
    assert [t.client for t in alone.targets] == list(SAME_DATA)
    for a, b in zip(alone.targets, together.targets):
        np.testing.assert_allclose(a.reconstructions, b.reconstructions, atol=1e-3)  # pixels in [0, 1]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ----------------------------------------------------------------------------------------------------------
# The server behind secure aggregation (``invert_aggregates``): it sees each round's aggregate only.
# FedSGD on the digits (one full-batch local step, lr 1, the server averaging by example count), one example
# per client, the MLP with 64 hidden units, and Inverting Gradients' signed Adam for 1000 iterations (L2, as the
# rules pick for unclipped, noiseless messages; no TV prior; label counts): a client's message alone is
# recovered to ~100 dB in that budget, so whatever the aggregate loses is its own.
AGG_BATCH, AGG_CLIENTS = 1, 4
AGG_ATTACK = inversion.InversionConfig(method="inverting_gradients", num_iterations=1000, learning_rate=0.1,
                                       tv_weight=0.0, labels="counts")


def _fedsgd_experiment(train, test, num_clients):
    population = from_client_lists([train.x[c * AGG_BATCH:(c + 1) * AGG_BATCH] for c in range(num_clients)],
                                   [train.y[c * AGG_BATCH:(c + 1) * AGG_BATCH] for c in range(num_clients)])
    config = ExperimentConfig(
        data=DataConfig(dataset="digits", num_clients=num_clients), model=ModelConfig(name="mlp", hidden=(64,)),
        client=ClientConfig(batch_size=AGG_BATCH),
        server=ServerConfig(algorithm="fedsgd", clients_per_round=num_clients),
        run=RunConfig(rounds=1, checkpoint_every=0))
    return Experiment(config, population=population, test=test, num_classes=10)


@pytest.fixture(scope="module")
def cohort():
    """Round 1 of a FedSGD run whose cohort is all 4 clients, every message tapped, attacked one message at a
    time (``invert_taps``) and as the aggregate the server sees (``invert_aggregates``) with the same key."""
    train, test, _ = load_dataset("digits")
    experiment = _fedsgd_experiment(train, test, AGG_CLIENTS)
    tap = experiment.tap(experiment.initial_state, list(range(AGG_CLIENTS)))
    key = jax.random.key(0)
    single = inversion_eval.invert_taps(experiment, [tap], key=jax.random.fold_in(key, 0),
                                        attack=dataclasses.replace(AGG_ATTACK, distance="l2"))
    aggregate = inversion_eval.invert_aggregates(experiment, [tap], key=key, attack=AGG_ATTACK)
    return {"train": train, "test": test, "experiment": experiment, "tap": tap, "key": key, "single": single,
            "aggregate": aggregate}


@pytest.mark.slow
def test_aggregate_of_a_single_client_is_attacked_as_its_message(cohort):
    """A cohort of one (client 0's data, the same seed, hence the same model and message as in the 4-client
    round, since a message depends only on the seed, round, id and model): the aggregate is (n m) / n = m
    exactly (n = 1), and its client draws its dummy inputs from fold_in(fold_in(key, 0), 0) as client 0 does in
    ``invert_taps`` under fold_in(key, 0), so both attacks optimise the same L2 objective from the same start
    (the single attack also bounds the message's zero coordinates by its smallest nonzero magnitude, which the
    true update meets) and only that and the rounding of two differently compiled programs separate them. Both end near 100 dB (measured
    97.9 dB each), where the last decayed Adam steps and rounding decide the digits, so PSNR is compared capped
    at 60 dB, above any imperfect reconstruction here (the 4-client aggregate gives 42-59 dB)."""
    experiment = _fedsgd_experiment(cohort["train"], cohort["test"], 1)
    big = cohort["tap"]
    for got, want in zip(jax.tree_util.tree_leaves(experiment.initial_state.params),
                         jax.tree_util.tree_leaves(big.server_params)):
        np.testing.assert_array_equal(got, want)
    tap = Tap(round=1, client_ids=np.array([0], np.int32), server_params=big.server_params,
              messages=jax.tree_util.tree_map(lambda leaf: leaf[:1], big.messages))
    aggregate = inversion_eval.invert_aggregates(experiment, [tap], key=cohort["key"], attack=AGG_ATTACK)
    (a,), s = aggregate.targets, cohort["single"].targets[0]
    assert s.client == a.client == 0 and s.aggregate_of is None and a.aggregate_of == 1
    assert a.exact and a.distance == s.distance == "l2"
    np.testing.assert_array_equal(inversion_eval.server_aggregate(experiment, tap)["Dense_0"]["kernel"],
                                  big.messages["Dense_0"]["kernel"][0])
    assert s.psnr > 60.0 and a.psnr > 60.0, (s.psnr, a.psnr)
    assert abs(min(a.psnr, 60.0) - min(s.psnr, 60.0)) <= 0.5
    np.testing.assert_array_equal(a.predicted_labels, s.predicted_labels)


@pytest.mark.slow
def test_secure_aggregation_of_four_clients_hides_much_but_not_all(cohort):
    """K = 4 clients of one example: each message alone is recovered to ~100 dB, the aggregate (for FedSGD
    with example weights: the mean gradient of the 4 examples, a batch-4 gradient) much less well, yet far
    better than the trivial guess of the training set's mean image. Measured (with the tests' XLA flags):
    per-client PSNR median 98.8 dB (IQR 2.4) alone vs 55.6 dB (IQR 5.8; clients 56.6 / 54.7 / 59.3 / 42.2 dB)
    from the aggregate; the mean image scores 11.9 dB; labels all right. (With 2 clients the aggregate is still
    recovered to 96.7 / 98.1 dB.)"""
    single, aggregate = cohort["single"], cohort["aggregate"]
    assert [t.client for t in aggregate.targets] == [0, 1, 2, 3]
    assert all(t.aggregate_of == AGG_CLIENTS and t.originals.shape == (AGG_BATCH, 8, 8, 1)
               for t in aggregate.targets)
    alone, joint = single.summary()["psnr_median"], aggregate.summary()["psnr_median"]
    mean_image = np.asarray(cohort["train"].x, np.float64).mean(axis=0)
    baseline = float(np.median([10 * np.log10(1 / np.mean((t.originals - mean_image) ** 2))
                                for t in aggregate.targets]))
    assert alone > 90.0, single.psnr
    assert joint < alone - 20.0, (single.psnr, aggregate.psnr)
    assert joint > baseline + 20.0, (aggregate.psnr, baseline)
    assert aggregate.label_accuracy == 1.0


@pytest.mark.slow
def test_aggregate_needs_the_whole_cohort_and_is_what_the_server_applies(cohort):
    experiment, tap = cohort["experiment"], cohort["tap"]
    partial = Tap(round=1, client_ids=tap.client_ids[[0, 1, 3]], server_params=tap.server_params,
                  messages=jax.tree_util.tree_map(lambda leaf: leaf[[0, 1, 3]], tap.messages))
    with pytest.raises(ValueError, match=r"round 1: the tap lacks 1 of the 4 clients .*missing client ids \[2\]"):
        inversion_eval.invert_aggregates(experiment, [partial], key=jax.random.key(0), attack=AGG_ATTACK)
    # The aggregate is the update the round applies (FedSGD, server SGD with lr 1), recomputed by the library.
    state, _ = experiment.step(experiment.initial_state, 0)
    for got, new, old in zip(jax.tree_util.tree_leaves(inversion_eval.server_aggregate(experiment, tap)),
                             jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(tap.server_params)):
        np.testing.assert_allclose(got, np.asarray(new) - old, atol=1e-6)


def _one_example_clients(**knobs):
    """Four one-example digits clients, one full-batch local step (a FedSGD message), the given defense knobs."""
    train, test, _ = load_dataset("digits")
    population = from_client_lists([train.x[c:c + 1] for c in range(4)], [train.y[c:c + 1] for c in range(4)])
    client = {"local_steps": 1, "batch_size": 1, "lr": 0.1, **knobs.get("client", {})}
    config = ExperimentConfig(
        data=DataConfig(dataset="digits", num_clients=4), model=ModelConfig(name="mlp", hidden=(64,)),
        client=ClientConfig(**client), message=MessageConfig(**knobs.get("message", {})),
        server=ServerConfig(clients_per_round=4), run=RunConfig(rounds=1, checkpoint_every=0))
    experiment = Experiment(config, population=population, test=test, num_classes=10)
    taps = {1: experiment.tap(experiment.initial_state, [0, 1, 2, 3])}
    return experiment, taps


def _flat_messages(taps):
    return np.concatenate([np.asarray(leaf).reshape(4, -1) for leaf in jax.tree_util.tree_leaves(taps[1].messages)], 1)


def test_a_defense_that_leaves_the_message_unchanged_leaves_the_attack_unchanged():
    """Message pruning at 10 % zeroes entries that are zero already (ReLU units that did not fire: about 70 % of
    this MLP's message), so every message is bit-identical to the undefended one, and so is every attack figure."""
    plain, plain_taps = _one_example_clients()
    noop, noop_taps = _one_example_clients(message={"sparsity": 0.1})
    assert (_flat_messages(plain_taps) == 0).mean() > 0.5
    np.testing.assert_array_equal(_flat_messages(noop_taps), _flat_messages(plain_taps))
    attack = dataclasses.replace(inversion_eval.DEFAULT_ATTACK, num_iterations=300)
    before = inversion_eval.invert_taps(plain, plain_taps, key=jax.random.key(0), attack=attack)
    after = inversion_eval.invert_taps(noop, noop_taps, key=jax.random.key(0), attack=attack)
    np.testing.assert_array_equal(after.psnr, before.psnr)
    assert after.summary() == before.summary() and after.attacker() == before.attacker()
    assert np.median(before.psnr) > 40.0, before.psnr


@pytest.mark.slow
def test_a_clip_that_only_rescales_the_message_is_not_credited():
    """A per-example clip without noise rescales the message: the scale-free attacker recovers the examples."""
    attack = dataclasses.replace(inversion_eval.DEFAULT_ATTACK, num_iterations=300)
    clipped, clipped_taps = _one_example_clients(client={"dp_clip_norm": 0.01, "dp_noise_multiplier": 0.0})
    rescaled = inversion_eval.invert_taps(clipped, clipped_taps, key=jax.random.key(0), attack=attack)
    assert np.median(rescaled.psnr) > 40.0 and rescaled.attacker() == "cosine (4 targets)", (
        rescaled.psnr, rescaled.attacker())


def _multi_step_run(**client):
    """4 clients of 12 digits that train 5 local steps over batches of 4 (what no attacker replays); client 2
    runs DP-SGD (clip 1, noise 0.5)."""
    train, test, _ = load_dataset("digits")
    population = from_client_lists([train.x[12 * c:12 * (c + 1)] for c in range(4)],
                                   [train.y[12 * c:12 * (c + 1)] for c in range(4)])
    config = ExperimentConfig(
        data=DataConfig(dataset="digits", num_clients=4), model=ModelConfig(name="mlp", hidden=(32,)),
        client=ClientConfig(**{"local_steps": 5, "batch_size": 4, "lr": 0.2, "dp_clip_norm": (math.inf, math.inf, 1.0, math.inf),
                               "dp_noise_multiplier": (0.0, 0.0, 0.5, 0.0), **client}),
        server=ServerConfig(clients_per_round=4), run=RunConfig(rounds=3, checkpoint_every=0))
    return Experiment(config, population=population, test=test, num_classes=10)


@pytest.mark.slow
def test_fedsgd_probe_sends_one_step_over_the_first_examples_with_the_clients_own_settings():
    """The probe's message of an undefended client is exactly one full-batch SGD step over its first 3 examples
    from the run's initial model (the attacker's own simulation, an independent path); the DP client keeps its
    noise multiplier and clip, and the report names the run's clients."""
    experiment = _multi_step_run()
    probe = inversion_eval.fedsgd_probe(experiment, [0, 2], 3)
    np.testing.assert_array_equal(probe.clients, [0, 2])
    settings = probe.experiment.settings
    np.testing.assert_array_equal(settings.local_steps, [1, 1])
    np.testing.assert_array_equal(settings.batch_size, [3, 3])
    np.testing.assert_array_equal(settings.dp_noise_multiplier, [0.0, 0.5])
    np.testing.assert_array_equal(settings.dp_clip_norm, experiment.settings.dp_clip_norm[[0, 2]])
    assert probe.tap.round == 1 and probe.experiment.config.server.target_epsilon is None
    spec = inversion.TargetSpec(input_shape=(8, 8, 1), num_classes=10, batch_size=3, local_steps=1)
    for row, client in enumerate((0, 2)):
        data = experiment.population.client(client)
        np.testing.assert_array_equal(probe.experiment.population.client(row).x, data.x[:3])
        simulated = inversion.make_target(spec, experiment.model.apply, experiment.initial_params, data.x[:3],
                                          data.y[:3], 0.2)
        sent = jax.tree_util.tree_map(lambda leaf: leaf[row], probe.tap.messages)
        gap = np.concatenate([np.ravel(np.asarray(a) - np.asarray(b)) for a, b in
                              zip(jax.tree_util.tree_leaves(sent), jax.tree_util.tree_leaves(simulated))])
        if client == 0:  # undefended: the same message to float32 rounding
            assert np.max(np.abs(gap)) < 1e-6
        else:  # DP-SGD: the run's noise, std lr x 0.5 x clip 1 / 3 examples per coordinate (2410 of them: the
            # std's relative standard error is 1.4 %); the per-example clip adds at most the message's own spread
            # (std 0.009 here) in quadrature, +4 %.
            assert abs(np.std(gap) / (0.2 * 0.5 / 3) - 1) < 0.1, np.std(gap)
    report = inversion_eval.invert_taps(probe.experiment, [probe.tap], key=jax.random.key(0), max_targets=2,
                                        attack=dataclasses.replace(inversion_eval.DEFAULT_ATTACK, num_iterations=2))
    assert [t.client for t in report.relabel(probe.clients).targets] == [0, 2]
    assert [t.exact for t in report.targets] == [True, False]
    with pytest.raises(ValueError, match=r"clients \[7\] are not in the run"):
        inversion_eval.fedsgd_probe(experiment, [0, 7], 3)
    with pytest.raises(ValueError, match="examples=0"):
        inversion_eval.fedsgd_probe(experiment, [0], 0)


def test_fedsgd_probe_keeps_a_poisson_clients_sampling_rate():
    """Poisson sampling (rate 4 / 12 per example) stays Poisson at the same rate: its expected batch over 6
    examples is 2."""
    probe = inversion_eval.fedsgd_probe(_multi_step_run(sampling="poisson"), [1, 3], 6)
    np.testing.assert_array_equal(probe.experiment.settings.poisson, [True, True])
    np.testing.assert_allclose(probe.experiment.settings.sample_rate, [1 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_array_equal(probe.experiment.settings.batch_size, [2, 2])


def test_fedsgd_probe_of_a_device_run_keeps_what_the_policy_chose():
    """Under the device-aware policy each client's steps, pruning and bits come from its device: the probe keeps
    those rows (one step) and runs as a plain experiment."""
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.experiment import build_experiment

    run = build_experiment(from_dict({"data": {"num_clients": 10}, "model": {"hidden": [16]},
                                      "server": {"clients_per_round": 5}, "devices": {"policy": "device_aware"},
                                      "run": {"rounds": 1, "checkpoint_every": 0}}))
    probe = inversion_eval.fedsgd_probe(run, [3, 7], 4)
    for field in ("prune_sparsity", "quant_bits", "lr", "dp_noise_multiplier"):
        np.testing.assert_array_equal(getattr(probe.experiment.settings, field), getattr(run.settings, field)[[3, 7]])
    np.testing.assert_array_equal(probe.experiment.settings.local_steps, [1, 1])
    assert type(probe.experiment).__name__ == "Experiment"


@pytest.mark.slow
def test_local_momentum_is_modelled_exactly_and_its_updates_are_reconstructed():
    """The attacker simulates local training with the run's own optimizer (``client.local.local_sgd``), momentum
    included: full-batch clients with momentum 0.9 are exact targets, the simulation on their true examples
    gives the tapped message, and their multi-step updates are reconstructed."""
    train, test, _ = load_dataset("digits")
    population = from_client_lists([train.x[c * BATCH:(c + 1) * BATCH] for c in range(2)],
                                   [train.y[c * BATCH:(c + 1) * BATCH] for c in range(2)])
    config = ExperimentConfig(
        data=DataConfig(dataset="digits", num_clients=2), model=ModelConfig(name="mlp", hidden=(64,)),
        client=ClientConfig(local_steps=STEPS, batch_size=BATCH, lr=0.1, momentum=0.9),
        server=ServerConfig(clients_per_round=2), run=RunConfig(rounds=1, checkpoint_every=0))
    experiment = Experiment(config, population=population, test=test, num_classes=10)
    tap = experiment.tap(experiment.initial_state, [0, 1])
    spec = inversion_eval.target_spec(experiment, BATCH)  # the attacker's model of these clients' training
    assert spec.momentum == 0.9 and spec.local_steps == STEPS
    for client in (0, 1):
        data = population.client(client)
        simulated = inversion.make_target(spec, experiment.model.apply, tap.server_params, data.x, data.y, 0.1)
        sent = jax.tree_util.tree_map(lambda leaf: leaf[client], tap.messages)
        for got, want in zip(jax.tree_util.tree_leaves(simulated), jax.tree_util.tree_leaves(sent)):
            np.testing.assert_allclose(got, want, atol=1e-6)
    report = inversion_eval.invert_taps(experiment, {1: tap}, key=jax.random.key(0))
    assert [t.exact for t in report.targets] == [True, True]
    assert np.all(report.psnr > 30.0), report.psnr
