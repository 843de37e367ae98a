"""Decentralized SGD: mixing matrices against their closed forms, gossip against dense W, D-SGD on the complete
graph against FedAvg, vectorized nodes against a per-node loop, and 8 devices against 1."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv import decentralized as dec
from fedjaxpriv.client.local import LocalSpec
from fedjaxpriv.client.settings import make_settings
from fedjaxpriv.models import get_model
from fedjaxpriv.parallel import make_mesh
from fedjaxpriv.server import server_optimizer
from fedjaxpriv.simulation import AggregationSpec, Population, build_round, init_server_state

TOPOLOGIES = [dec.ring(7), dec.torus(3, 4), dec.erdos_renyi(20, 0.3, seed=1), dec.exponential(13), dec.exponential(2),
              dec.complete(6)]


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=[f"{t.name}{t.num_nodes}" for t in TOPOLOGIES])
def test_mixing_is_doubly_stochastic_and_equals_the_dense_matrix(topology):
    """Rows and columns of W sum to 1 and W >= 0; a gossip step of random models equals W @ X (the complete
    graph: the mean, W = 1/C everywhere)."""
    c = topology.num_nodes
    w = np.full((c, c), 1.0 / c) if topology.name == "complete" else topology.dense()
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-6)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
    models = {"a": jax.random.normal(jax.random.key(0), (c, 3, 2)), "b": jax.random.normal(jax.random.key(1), (c,))}
    mixed = dec.mix(models, topology)
    for name in models:
        np.testing.assert_allclose(np.asarray(mixed[name]), np.tensordot(w, np.asarray(models[name]), axes=1),
                                   atol=1e-5)


def test_ring_spectral_gap_is_the_closed_form_and_the_exponential_graph_mixes_faster():
    """Ring with Metropolis-Hastings weights 1/3: eigenvalues 1/3 + 2/3 cos(2 pi k / C), so the gap is
    1 - (1/3 + 2/3 cos(2 pi / C)) for C >= 5 (where the k = 1 eigenvalue has the largest modulus)."""
    for c in (5, 8, 16, 33):
        assert dec.spectral_gap(dec.ring(c)) == pytest.approx(1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / c)),
                                                              abs=1e-6)
    assert dec.spectral_gap(dec.exponential(16)) > 5 * dec.spectral_gap(dec.ring(16))


def test_consensus_decays_at_the_rate_of_the_second_eigenvalue():
    """Gossip from x_i = cos(2 pi i / C), an eigenvector of the ring's W for lambda_2 = 1/3 + 2/3 cos(2 pi / C):
    after t steps the consensus distance is exactly lambda_2^(2t) times the first; from a random start it is at
    most that (every other mode decays at least as fast)."""
    c, steps = 12, 20
    ring = dec.ring(c)
    lam = 1 / 3 + 2 / 3 * math.cos(2 * math.pi / c)
    x = {"w": jnp.cos(2 * jnp.pi * jnp.arange(c) / c)[:, None] * jnp.ones((1, 4))}
    start = float(dec.consensus_distance(x))
    noise = {"w": jax.random.normal(jax.random.key(3), (c, 4))}
    noise_start = float(dec.consensus_distance(noise))
    for _ in range(steps):
        x, noise = dec.mix(x, ring), dec.mix(noise, ring)
    assert float(dec.consensus_distance(x)) == pytest.approx(start * lam ** (2 * steps), rel=1e-3)
    assert float(dec.consensus_distance(noise)) <= noise_start * lam ** (2 * steps) * (1 + 1e-3)


@pytest.mark.parametrize("topology", TOPOLOGIES + [dec.random_matching(9)],
                         ids=[f"{t.name}{t.num_nodes}" for t in TOPOLOGIES + [dec.random_matching(9)]])
def test_offline_nodes_keep_their_models_and_the_online_nodes_mix_by_the_reweighted_matrix(topology):
    """``mix(online=...)`` equals ``W' X`` with W' built from W by hand: offline rows the identity, an online
    node's weight on an offline neighbour moved to its own model. Its rows sum to 1; a symmetric W (all but the
    directed exponential graph) keeps it doubly stochastic, so the online nodes' average is kept (the complete
    graph: every online node gets the online nodes' mean)."""
    c = topology.num_nodes
    key = jax.random.key(4)
    if topology.name == "random_matching":
        neighbors, weights = (np.asarray(a) for a in dec.matching(key, c))
        w = np.zeros((c, c))
        np.add.at(w, (np.repeat(np.arange(c), neighbors.shape[1]), neighbors.ravel()), weights.ravel())
    else:
        w = topology.dense()
    online = np.random.default_rng(c).random(c) >= 0.3
    online[:2] = [True, False]
    if topology.name == "complete":  # the online nodes' mean, as FedAvg over the clients that are there
        reweighted = np.where(online[:, None] & online[None, :], 1.0 / online.sum(), 0.0)
    else:
        reweighted = np.where(online[:, None] & online[None, :], w, 0.0)
    reweighted[np.arange(c), np.arange(c)] += 1.0 - reweighted.sum(axis=1)
    symmetric = bool(np.allclose(w, w.T))
    assert symmetric == (topology.name != "exponential" or c <= 2)
    if symmetric:
        np.testing.assert_allclose(reweighted.sum(axis=0), 1.0, atol=1e-6)
    models = {"a": jax.random.normal(jax.random.key(0), (c, 3, 2)), "b": jax.random.normal(jax.random.key(1), (c,))}
    mixed = dec.mix(models, topology, key, online=jnp.asarray(online))
    for name in models:
        x = np.asarray(models[name])
        np.testing.assert_allclose(np.asarray(mixed[name]), np.tensordot(reweighted, x, axes=1), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(mixed[name])[~online], x[~online])
        if symmetric:
            np.testing.assert_allclose(np.asarray(mixed[name])[online].mean(0), x[online].mean(0), atol=1e-5)


def test_offline_nodes_neither_train_nor_move_and_only_their_online_rounds_are_counted():
    """A ring of 8 with node_dropout 0 and 0.5 in turn, every node sampled every round: the odd nodes are online in
    a fraction of the rounds within 4 standard errors of 1/2, the even ones always; in each round an offline node's
    model is exactly what it was, only messages between online neighbours count in ``bytes_total``, and the
    privacy tracker counts a node's online rounds only. The draws are the same
    in a second experiment of the same config (a resumed run sees the same nodes offline)."""
    from fedjaxpriv.config import from_dict

    rounds = 12
    config = from_dict(_run_config(topology={"graph": "ring", "node_dropout": [0.0, 0.5]},
                                   run={"rounds": rounds, "checkpoint_every": 0}))
    experiment = dec.DecentralizedExperiment(config, progress=False)
    state = experiment.initial_state
    seen = []
    for r in range(rounds):
        online = experiment.nodes_online(r)
        before = jax.tree_util.tree_map(np.asarray, state.params)
        state, record = experiment.step(state, r)
        after = jax.tree_util.tree_map(np.asarray, state.params)
        assert record["nodes_online"] == record["participants"] == int(online.sum())
        links = (experiment.topology.dense() > 0) & ~np.eye(8, dtype=bool) & online[:, None] & online[None, :]
        assert record["bytes_total"] == pytest.approx(record["bytes_per_client"] * links.sum())  # online pairs only
        for old, new in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
            np.testing.assert_array_equal(new[~online], old[~online])
            assert np.all(np.any((new != old).reshape(8, -1), axis=1)[online])
        seen.append(online)
    seen = np.asarray(seen)
    assert seen[:, 0::2].all()
    rate = seen[:, 1::2].mean()
    assert abs(rate - 0.5) < 4 * np.sqrt(0.25 / seen[:, 1::2].size), rate
    np.testing.assert_array_equal(experiment.privacy.participations, seen.sum(axis=0))
    again = dec.DecentralizedExperiment(config, progress=False)
    np.testing.assert_array_equal(np.asarray([again.nodes_online(r) for r in range(rounds)]), seen)


def test_random_matchings_pair_every_node_once_and_keep_the_average():
    for c in (8, 9):
        neighbors, weights = dec.matching(jax.random.key(c), c)
        partner = np.asarray(neighbors[:, 1])
        assert np.array_equal(partner[partner], np.arange(c))  # an involution: pairs
        assert np.sum(partner == np.arange(c)) == c % 2  # only the odd node out keeps itself
        x = {"w": jax.random.normal(jax.random.key(5), (c, 3))}
        mixed = dec.mix(x, dec.random_matching(c), jax.random.key(c))
        np.testing.assert_allclose(np.asarray(mixed["w"]).mean(0), np.asarray(x["w"]).mean(0), atol=1e-6)
        np.testing.assert_allclose(np.asarray(mixed["w"]),
                                   0.5 * (np.asarray(x["w"]) + np.asarray(x["w"])[partner]), atol=1e-6)


def test_topology_errors_name_what_is_allowed():
    with pytest.raises(ValueError, match="num_nodes=2 is invalid; allowed: an integer >= 3"):
        dec.ring(2)
    with pytest.raises(ValueError, match="separate parts"):
        dec.erdos_renyi(30, 0.01, seed=0)
    with pytest.raises(ValueError, match="a square number of nodes"):
        dec.topology_for("torus", 10)
    with pytest.raises(ValueError, match=r"topology='star' is invalid; allowed: one of \['ring'"):
        dec.topology_for("star", 10)
    assert dec.topology_for("torus", 16).neighbors.shape == (16, 5)


def _problem(digits_population, num_nodes=8, **fields):
    population, _, info = digits_population
    counts = population.counts[:num_nodes]
    model = get_model("mlp", info.input_shape, info.num_classes, hidden=(16,))
    settings = make_settings(num_nodes, counts, **{"local_steps": 2, "batch_size": 8, "lr": 0.1, **fields})
    spec = LocalSpec(max_steps=4, max_batch=16, max_count=population.max_count, num_classes=info.num_classes)
    offsets = population.offsets[:num_nodes]
    pop = Population(jnp.asarray(population.x), jnp.asarray(population.y), jnp.asarray(offsets), jnp.asarray(counts))
    return model, spec, jax.tree_util.tree_map(jnp.asarray, settings), pop, model.init(jax.random.key(2))


def test_dsgd_on_the_complete_graph_is_fedavg_with_every_client(digits_population):
    """Every node starts from the same model: one D-SGD round on the complete graph gives every node the FedAvg
    round's model (all clients, uniform weights, server SGD at lr 1), since node i trains as FL's client i."""
    model, spec, settings, pop, params = _problem(digits_population, local_steps=[1, 2, 3, 1, 2, 3, 1, 2])
    c = pop.counts.shape[0]
    mask = jnp.ones(c, bool)
    dsgd = dec.build_dsgd_round(model.apply, spec, dec.complete(c), chunk_size=4)
    nodes, out = dsgd(dec.init_nodes(params, c), pop, settings, mask, jax.random.key(9))
    tx = server_optimizer("sgd", 1.0)
    fedavg = build_round(model.apply, spec, tx, AggregationSpec(weighting="uniform"), chunk_size=4)
    state, fl = fedavg(init_server_state(params, tx), pop, settings, jnp.arange(c, dtype=jnp.int32), mask,
                       jax.random.key(9))
    for node_leaf, fl_leaf, start in zip(jax.tree_util.tree_leaves(nodes.params),
                                         jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params)):
        assert float(jnp.max(jnp.abs(fl_leaf - start))) > 1e-3  # the round moved the model
        np.testing.assert_allclose(np.asarray(node_leaf), np.broadcast_to(np.asarray(fl_leaf), node_leaf.shape),
                                   atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.loss), np.asarray(fl.loss), atol=1e-6)
    assert float(out.consensus) < 1e-10


@pytest.mark.slow
def test_vectorized_nodes_equal_a_per_node_loop_and_eight_devices_equal_one(digits_population):
    """Three rounds on a ring with heterogeneous steps and a dropped node: chunks of 3 (vmapped), the loop
    strategy, and 8 CPU devices give the same models; a dropped node sends its model unchanged."""
    model, spec, settings, pop, params = _problem(digits_population, local_steps=[1, 4, 2, 3, 1, 2, 4, 1],
                                                  lr=[0.1, 0.05, 0.2, 0.1, 0.1, 0.05, 0.2, 0.1])
    c = pop.counts.shape[0]
    mask = jnp.ones(c, bool).at[5].set(False)
    ring = dec.ring(c)
    runs = {"vmap": dict(chunk_size=3), "loop": dict(chunk_size=1, strategy="loop")}
    if jax.device_count() >= 8:
        runs["8 devices"] = dict(chunk_size=8, mesh=make_mesh(8))
    finals = {}
    for name, options in runs.items():
        round_fn = dec.build_dsgd_round(model.apply, spec, ring, **options)
        nodes = dec.init_nodes(params, c)
        consensus = []
        for _ in range(3):
            nodes, out = round_fn(nodes, pop, settings, mask, jax.random.key(4))
            consensus.append(float(out.consensus))
            assert int(out.steps[5]) == 0 and float(out.loss[5]) == 0.0
        finals[name] = nodes.params
        assert consensus[0] > 0  # heterogeneous nodes disagree
    for name, got in finals.items():
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(finals["vmap"])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=name)


@pytest.mark.slow
def test_dsgd_on_a_ring_learns_and_node_metrics_match_direct_evaluation(digits_population):
    """Thirty D-SGD rounds on a ring of 8 digit clients: the average model's test accuracy is far above chance (0.1),
    and the node metrics equal a direct evaluation of the mean model and of every node's model."""
    from fedjaxpriv import evaluation

    model, spec, settings, pop, params = _problem(digits_population, local_steps=3, lr=0.2)
    _, test, _ = digits_population
    c = pop.counts.shape[0]
    round_fn = dec.build_dsgd_round(model.apply, spec, dec.ring(c), chunk_size=8)
    nodes = dec.init_nodes(params, c)
    for _ in range(30):
        nodes, _ = round_fn(nodes, pop, settings, jnp.ones(c, bool), jax.random.key(6))
    got = dec.node_metrics(model.apply, nodes.params, test.x, test.y)
    assert got["average_test_accuracy"] > 0.6, got
    mean = jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), nodes.params)
    assert got["average_test_accuracy"] == pytest.approx(evaluation.evaluate(model.apply, mean, test.x,
                                                                             test.y)["accuracy"], abs=1e-9)
    own = [evaluation.evaluate(model.apply, jax.tree_util.tree_map(lambda a: a[i], nodes.params), test.x,
                               test.y)["accuracy"] for i in range(c)]
    assert got["node_test_accuracy_mean"] == pytest.approx(np.mean(own), abs=1e-6)
    assert got["node_test_accuracy_p10"] == pytest.approx(np.percentile(own, 10), abs=1e-6)
    assert got["consensus_distance"] > 0


def _run_config(**sections):
    base = {"data": {"num_clients": 8, "partition": "iid"}, "model": {"hidden": [16]},
            "client": {"local_steps": 2, "batch_size": 8}, "server": {"clients_per_round": 8},
            "run": {"rounds": 4, "eval_every": 2, "checkpoint_every": 1}}
    for name, fields in sections.items():
        base[name] = {**base.get(name, {}), **fields}
    return base


@pytest.mark.slow
def test_a_decentralized_run_on_the_complete_graph_is_the_fedavg_run_and_resumes_exactly(tmp_path):
    """From the config: topology.graph 'complete' with every node training in every round gives the FedAvg run's
    test loss and accuracy (uniform weights, every client in every round) at every evaluation, and node
    metrics with no disagreement; an exponential-graph run of 3 rounds continued to 6 equals a 6-round run bit
    for bit (every node's model, every round's loss); Experiment itself refuses a topology."""
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.experiment import Experiment, build_experiment

    fl = Experiment(from_dict(_run_config(server={"weighting": "uniform"}))).run(progress=False)
    experiment = build_experiment(from_dict(_run_config(topology={"graph": "complete"})))
    assert isinstance(experiment, dec.DecentralizedExperiment)
    gossip = experiment.run(progress=False)
    for mine, theirs in zip(gossip.history, fl.history):
        for key in ("test_loss", "test_accuracy", "train_loss"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (mine["round"], key)
    assert gossip.history[-1]["consensus_distance"] < 1e-10
    assert gossip.history[-1]["node_test_accuracy_std"] < 1e-6

    expo = _run_config(topology={"graph": "exponential"}, server={"clients_per_round": 4},
                       run={"rounds": 3})
    build_experiment(from_dict(expo)).run(str(tmp_path / "run"), progress=False)
    longer = {**expo, "run": {**expo["run"], "rounds": 6}}
    continued = build_experiment(from_dict(longer)).run(str(tmp_path / "run"), progress=False, extend=True)
    straight = build_experiment(from_dict(longer)).run(progress=False)
    assert [r["train_loss"] for r in continued.history] == [r["train_loss"] for r in straight.history]
    for a, b in zip(jax.tree_util.tree_leaves(continued.params), jax.tree_util.tree_leaves(straight.params)):
        assert a.shape[0] == 8 and np.array_equal(np.asarray(a), np.asarray(b))
    assert straight.history[-1]["consensus_distance"] > 0
    with pytest.raises(ValueError, match="is a decentralized run: build it with"):
        Experiment(from_dict(expo))


def test_graph_distances_follow_the_edges_that_carry_models():
    assert dec.graph_distances(dec.ring(8), 0).tolist() == [0, 1, 2, 3, 4, 3, 2, 1]
    assert dec.graph_distances(dec.torus(3, 4), 5).tolist() == [2, 1, 2, 3, 1, 0, 1, 2, 2, 1, 2, 3]
    assert dec.graph_distances(dec.exponential(8), 0).tolist() == [0, 1, 1, 2, 1, 2, 2, 3]  # i hears i-1, i-2, i-4
    assert dec.graph_distances(dec.complete(4), 2).tolist() == [1, 1, 0, 1]
    with pytest.raises(ValueError, match="no fixed graph distances"):
        dec.graph_distances(dec.random_matching(4), 0)


@pytest.mark.slow
def test_a_curious_nodes_membership_advantage_falls_with_graph_distance():
    """Ten D-SGD rounds of 20 local steps on a ring of 16 digit clients: the loss-threshold attack on a victim's
    training examples scores a higher AUC on the victim's own model than on the farthest node's (8 hops), by more
    than two standard errors of the 16 paired differences; on the complete graph every node holds the same model,
    so the AUC is the same at every distance. Each AUC is sklearn's on the same scores."""
    from sklearn.metrics import roc_auc_score

    from fedjaxpriv.attacks.membership import example_loss
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.experiment import build_experiment

    def run(graph):
        config = from_dict(_run_config(data={"num_clients": 16}, model={"hidden": [64]},
                                       client={"local_steps": 20, "batch_size": 16, "lr": 0.3},
                                       server={"clients_per_round": 16}, topology={"graph": graph},
                                       run={"rounds": 10, "eval_every": 10, "checkpoint_every": 0}))
        experiment = build_experiment(config, progress=False)
        return experiment, experiment.run(progress=False).params

    experiment, models = run("ring")
    rows, by_distance = experiment.membership_by_distance(models)
    assert sorted(by_distance) == list(range(9))
    auc = {(r["victim"], r["node"]): r["auc"] for r in rows}
    gaps = np.array([auc[(v, v)] - auc[(v, (v + 8) % 16)] for v in range(16)])
    assert gaps.mean() > 2 * gaps.std(ddof=1) / np.sqrt(16), gaps
    p, t = experiment.population, experiment.test
    n = int(p.counts[3])
    x = np.concatenate([p.x[p.offsets[3]:p.offsets[3] + n], t.x[:n]])
    y = np.concatenate([p.y[p.offsets[3]:p.offsets[3] + n], t.y[:n]])
    losses = example_loss(experiment.model.apply(jax.tree_util.tree_map(lambda a: a[5], models), x), y)
    assert auc[(3, 5)] == pytest.approx(roc_auc_score(np.r_[np.ones(n), np.zeros(n)], -np.asarray(losses)), abs=1e-12)

    experiment, models = run("complete")
    rows, by_distance = experiment.membership_by_distance(models, victims=[0, 7])
    for victim in (0, 7):
        values = {r["auc"] for r in rows if r["victim"] == victim}
        assert max(values) - min(values) < 1e-6


@pytest.mark.slow
def test_one_dsgd_round_equals_a_python_loop_over_nodes_and_a_dense_mixing_matrix(digits_population):
    """An independent reference: each node's local training called one node at a time (``client_update`` from its
    own model, with the key FL's client would get), then the dense W of the ring applied as a matrix product; a
    node that does not train contributes its model unchanged."""
    from fedjaxpriv.client.local import client_update
    from fedjaxpriv.simulation import client_keys_base

    model, spec, settings, pop, params = _problem(digits_population, local_steps=[1, 4, 2, 3, 1, 2, 4, 1])
    c = pop.counts.shape[0]
    mask = np.ones(c, bool)
    mask[2] = False
    ring = dec.ring(c)
    start = dec.init_nodes(params, c)
    spread = lambda a: 0.01 * jnp.arange(c, dtype=a.dtype).reshape((c,) + (1,) * (a.ndim - 1))  # noqa: E731
    models = jax.tree_util.tree_map(lambda a: a + spread(a), start.params)  # the nodes disagree before the round
    state = start._replace(params=models)
    base = client_keys_base(jax.random.fold_in(jax.random.key(8), 0))
    sent = []
    for i in range(c):
        own = jax.tree_util.tree_map(lambda a: a[i], models)
        if not mask[i]:
            sent.append(own)
            continue
        train_key, _ = jax.random.split(jax.random.fold_in(base, i))
        row = jax.tree_util.tree_map(lambda a: a[i], settings)
        delta = client_update(spec, model.apply, own, pop.x, pop.y, pop.offsets[i], pop.counts[i], row,
                              train_key).delta
        sent.append(jax.tree_util.tree_map(jnp.add, own, delta))
    w = ring.dense()
    expected = jax.tree_util.tree_map(
        lambda *leaves: np.tensordot(w, np.stack([np.asarray(x) for x in leaves]), axes=1), *sent)
    round_fn = dec.build_dsgd_round(model.apply, spec, ring, chunk_size=3)
    got, _ = round_fn(jax.tree_util.tree_map(jnp.array, state), pop, settings, jnp.asarray(mask), jax.random.key(8))
    for a, b in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), b, atol=2e-6)


@pytest.mark.slow
def test_each_nodes_epsilons_are_the_events_it_ran_in_the_rounds_it_trained():
    """D-SGD on a ring, 4 of 8 nodes sampled per round, DP-SGD (Poisson batches, noise 1.5) and local noise 4 on
    the message: a node's participations are the rounds whose cohort held it, its example-level epsilon is
    dp_accounting's on its Poisson-sampled Gaussian steps, and its local epsilon the Gaussian mechanism (multiplier
    4 / 2: replace-one moves a clipped message by 2C) composed once per round it sent a new model."""
    import dp_accounting

    from fedjaxpriv.config import from_dict
    from fedjaxpriv.experiment import build_experiment

    config = from_dict(_run_config(client={"dp_clip_norm": 1.0, "dp_noise_multiplier": 1.5, "local_steps": 3,
                                           "sampling": "poisson"},
                                   message={"clip_norm": 0.5, "local_noise_multiplier": 4.0},
                                   server={"clients_per_round": 4}, topology={"graph": "ring"},
                                   run={"rounds": 4, "eval_every": 4, "checkpoint_every": 0}))
    experiment = build_experiment(config, progress=False)
    results = experiment.run(progress=False)
    cohorts = [experiment.cohort(r) for r in range(4)]
    expected_participations = np.bincount(np.concatenate([c.ids[c.mask] for c in cohorts]), minlength=8)
    per_node = experiment.privacy.per_client()
    np.testing.assert_array_equal(per_node["participations"], expected_participations)
    assert sum(r["participants"] for r in results.history) == expected_participations.sum() == 16
    for i in range(8):
        n = int(expected_participations[i])
        if n == 0:
            assert per_node["epsilon"][i] == 0.0 and per_node["local_epsilon"][i] == 0.0
            continue
        step = dp_accounting.PoissonSampledDpEvent(float(experiment.settings.sample_rate[i]),
                                                   dp_accounting.GaussianDpEvent(1.5))
        example = dp_accounting.rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(step, 3 * n))
        assert per_node["epsilon"][i] == pytest.approx(example.get_epsilon(1e-5), rel=1e-6)
        local = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        local.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), n))
        assert per_node["local_epsilon"][i] == pytest.approx(local.get_epsilon(1e-5), rel=1e-9)
    assert results.final("epsilon_max") == pytest.approx(per_node["epsilon"].max(), rel=1e-12)


@pytest.mark.slow
def test_a_nodes_error_feedback_residual_changes_only_in_the_rounds_it_trains():
    """Top-k (5%) with error feedback on a ring, 3 of 8 nodes training per round: after each round the nodes that
    trained hold a non-zero residual (what top-k left of their update), and every other node's is unchanged."""
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.experiment import build_experiment

    config = from_dict(_run_config(message={"topk_fraction": 0.05, "error_feedback": True},
                                   server={"clients_per_round": 3}, topology={"graph": "ring"},
                                   run={"rounds": 3, "checkpoint_every": 0}))
    experiment = build_experiment(config, progress=False)
    state = experiment.initial_state

    def residual_norms(state):
        residual = state.client_state.message[0][0]  # chain stage 0: (residual, top-k state)
        return np.sqrt(sum(np.sum(np.asarray(leaf).reshape(8, -1) ** 2, axis=1)
                           for leaf in jax.tree_util.tree_leaves(residual)))

    before = residual_norms(state)
    for r in range(3):
        cohort, _ = experiment.round_cohort(r)
        trained = np.zeros(8, bool)
        trained[cohort.ids[cohort.mask]] = True
        state, _ = experiment.step(state, r, cohort)
        after = residual_norms(state)
        assert np.all(after[trained] > 0) and np.array_equal(after[~trained], before[~trained]), (r, before, after)
        before = after


def test_a_curious_neighbour_computes_each_start_from_what_it_heard_and_is_exact_only_where_it_heard_all():
    """``observer_view`` against the dense W: the observer is the smallest other node that hears the victim; its
    estimate of the victim's start is sum_j W_vj S_j with each model it has not heard replaced by its own; it is
    exact exactly where it hears every node the victim averages. A 3-ring is all neighbours (exact), an 8-ring
    never; the complete graph reads the observer's own model; random matchings have no fixed neighbour."""
    rng = np.random.default_rng(0)
    for topology in (dec.ring(8), dec.ring(3), dec.torus(3, 3), dec.exponential(8), dec.erdos_renyi(12, 0.3, seed=0)):
        w, c = topology.dense(), topology.num_nodes
        view = dec.observer_view(topology, list(range(c)))
        sent = rng.normal(size=c)
        for v in range(c):
            u = int(view.observers[v])
            assert u == min(i for i in range(c) if i != v and w[i, v] > 0)
            known = set(np.flatnonzero(w[u] > 0).tolist()) | {u}
            proxy = np.array([sent[j] if j in known else sent[u] for j in range(c)])
            assert view.weights[v] @ sent[view.heard] == pytest.approx(w[v] @ proxy, abs=1e-6)
            assert bool(view.exact[v]) == (set(np.flatnonzero(w[v] > 0).tolist()) <= known)
        assert topology.name != "ring" or view.exact.all() == (c == 3) and view.exact.any() == (c == 3)
    complete = dec.observer_view(dec.complete(5), [0, 3])
    assert complete.own_model and complete.exact.all() and complete.observers.tolist() == [1, 0]
    with pytest.raises(ValueError, match="no fixed curious neighbour"):
        dec.observer_view(dec.random_matching(6), [0])
    with pytest.raises(ValueError, match="distinct nodes"):
        dec.observer_view(dec.ring(4), [1, 1])


def _tap_everything(graph, rounds=3, num_nodes=8, message=None, **topology):
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.experiment import build_experiment

    config = from_dict(_run_config(topology={"graph": graph, **topology}, data={"num_clients": num_nodes},
                                   server={"clients_per_round": num_nodes}, message=message or {},
                                   run={"rounds": rounds, "checkpoint_every": 0, "tap_clients": list(range(num_nodes)),
                                        "tap_rounds": list(range(1, rounds + 1))}))
    return build_experiment(config, progress=False)


def _leaves(tree):
    return [np.asarray(leaf, np.float64) for leaf in jax.tree_util.tree_leaves(tree)]


@pytest.mark.slow
def test_a_tapped_node_sends_its_own_update_and_its_neighbours_start_is_the_gossip_of_what_it_heard():
    """Every node of an 8-ring tapped for 3 rounds, stepped by hand: (1) what a node sent minus its true start is
    the update FL's tap computes for it from that start (same keys); (2) the nodes' new models are W times what
    was sent; (3) the tap's start is the dense-W gossip of last round's sent models with the unheard ones replaced
    by the observer's own (the initial model in round 1): equal to the true start where marked exact (round 1
    only, on this ring), and off by more than float error where not. On the complete graph it is always exact."""
    experiment = _tap_everything("ring")
    w, c = experiment.topology.dense(), 8
    observers = experiment.observer_view.observers
    state, previous = experiment.initial_state, None
    structure = jax.tree_util.tree_structure(experiment.initial_params)
    for r in range(3):
        true_start = _leaves(state.params)
        state, _, tap = experiment.observed_step(state, r, tapped=list(range(c)))
        assert tap.client_ids.tolist() == list(range(c)) and tap.start_exact.tolist() == [r == 0] * c
        start, message = _leaves(tap.start_params), _leaves(tap.messages)
        sent = [a + b for a, b in zip(start, message)]
        for v in range(c):
            own_start = jax.tree_util.tree_unflatten(structure, [jnp.asarray(t[v], jnp.float32) for t in true_start])
            fl_state = experiment.program.init_state(own_start, c, r)
            update = experiment.tap_fn(fl_state, experiment.device_population, experiment.device_settings,
                                       jnp.asarray([v], jnp.int32), experiment.root_key)
            for leaf, s, t in zip(jax.tree_util.tree_leaves(update), sent, true_start):
                np.testing.assert_allclose(np.asarray(leaf[0]), s[v] - t[v], atol=2e-5)
        for new, s in zip(_leaves(state.params), sent):
            np.testing.assert_allclose(new, np.tensordot(w, s, axes=1), atol=1e-5)
        for k, (s, t) in enumerate(zip(start, true_start)):
            if previous is None:
                expected = np.repeat(_leaves(experiment.initial_params)[k][None], c, axis=0)
            else:
                expected = np.stack([sum(w[v, j] * previous[k][j if w[observers[v], j] > 0 or j == observers[v]
                                                                else observers[v]]
                                         for j in range(c) if w[v, j] > 0) for v in range(c)])
            np.testing.assert_allclose(s, expected, atol=1e-6)
            gap = np.abs(s - t).reshape(c, -1).max(axis=1)
            assert (gap < 1e-5).all() if r == 0 else (gap > 1e-4).all(), (r, k, gap)
        previous = sent
    complete = _tap_everything("complete", rounds=2, num_nodes=4)
    state = complete.initial_state
    for r in range(2):
        true_start = _leaves(state.params)
        state, _, tap = complete.observed_step(state, r, tapped=[0, 2])
        assert tap.start_exact.all()
        for s, t in zip(_leaves(tap.start_params), true_start):
            np.testing.assert_allclose(s, t[[0, 2]], atol=1e-6)


@pytest.mark.slow
def test_a_curious_neighbour_inverts_round_one_exactly_and_loses_the_start_on_a_ring_but_not_on_the_complete_graph():
    """Gradient inversion (``invert_taps``) of what two nodes send their curious neighbours (clients of 8
    examples, 4 full-batch steps, MLP): in round 1 every node starts from the public initial model, so the
    neighbour's view is exact and the images come back (the same reconstructions on both graphs: the same
    messages); by round 4 a ring neighbour has not heard the victim's other neighbour and its estimated start
    costs the attack more than 10 dB, while on the complete graph it hears everyone and stays exact."""
    from fedjaxpriv.attacks import inversion_eval
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.data import load_dataset
    from fedjaxpriv.data.federated import from_client_lists
    from fedjaxpriv.experiment import build_experiment

    train, test, _ = load_dataset("digits")
    batch, nodes = 8, 8
    population = from_client_lists([train.x[b * batch:(b + 1) * batch] for b in range(nodes)],
                                   [train.y[b * batch:(b + 1) * batch] for b in range(nodes)])
    reports = {}
    for graph in ("ring", "complete"):
        config = from_dict({"data": {"num_clients": nodes}, "model": {"hidden": [64]},
                            "client": {"local_steps": 4, "batch_size": batch, "lr": 0.1},
                            "server": {"clients_per_round": nodes}, "topology": {"graph": graph},
                            "run": {"rounds": 4, "eval_every": 4, "checkpoint_every": 0, "tap_clients": [2, 5],
                                    "tap_rounds": [1, 4]}})
        experiment = build_experiment(config, population=population, test=test, num_classes=10,
                                      data_from_config=True, progress=False)
        results = experiment.run(progress=False)
        for r in (1, 4):
            reports[graph, r] = inversion_eval.invert_taps(experiment, {r: results.taps[r]}, key=jax.random.key(0))
    assert all(t.exact for t in reports["ring", 1].targets) and np.all(reports["ring", 1].psnr > 30.0)
    # The same messages, attacked alike (past 40 dB, float reordering moves a converged reconstruction's PSNR).
    np.testing.assert_allclose(np.minimum(reports["ring", 1].psnr, 40.0), np.minimum(reports["complete", 1].psnr, 40.0),
                               atol=0.05)
    assert not any(t.exact for t in reports["ring", 4].targets)
    assert all(t.exact for t in reports["complete", 4].targets)
    assert np.median(reports["ring", 4].psnr) + 10.0 < np.median(reports["complete", 4].psnr), (
        reports["ring", 4].psnr, reports["complete", 4].psnr)


@pytest.mark.slow
def test_node_models_stay_split_over_eight_devices_and_the_run_equals_one_device():
    """16 nodes on the 8-device test mesh: every node's model and error-feedback residual live as 2 rows per
    device before and after each round, and 3 rounds give the models, losses and consensus of the same run on one
    device. 12 nodes do not divide over 8 devices: padded to 16 rows, 2 per device, and still equal."""
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.experiment import build_experiment

    if jax.device_count() < 8:
        pytest.skip("needs the 8-device test mesh")
    for nodes in (16, 12):
        config = _run_config(topology={"graph": "exponential"}, data={"num_clients": nodes},
                             server={"clients_per_round": nodes // 2},
                             message={"topk_fraction": 0.5, "error_feedback": True},
                             run={"rounds": 3, "checkpoint_every": 0})
        many = build_experiment(from_dict(config), progress=False)
        one = build_experiment(from_dict({**config, "run": {**config["run"], "num_devices": 1}}), progress=False)
        assert many.shard_nodes and not one.shard_nodes and many.node_rows == 16
        state = many.initial_state
        for r in range(3):
            state, record, _ = many.observed_step(state, r)
            for leaf in jax.tree_util.tree_leaves((state.params, state.client_state)):
                rows = {shard.data.shape[0] for shard in leaf.addressable_shards}
                assert rows == {2}, (nodes, r, rows)
        reference = one.initial_state
        for r in range(3):
            reference, expected, _ = one.observed_step(reference, r)
        assert record["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
        assert record["consensus_distance"] == pytest.approx(expected["consensus_distance"], rel=1e-4)
        for a, b in zip(jax.tree_util.tree_leaves(many.saved_state(state).params),
                        jax.tree_util.tree_leaves(reference.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_a_decentralized_run_takes_the_algorithms_that_train_as_fedavg_and_refuses_those_that_keep_state():
    """The capability, read off each algorithm's functions: FedAvg, FedProx and FedSGD only change local
    settings; SCAFFOLD (control variates, extra message), Ditto (personal models) and DP-FedAvg (the server's
    clipping and noise) need a server. A node trained under FedProx takes the proximal step."""
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.experiment import build_experiment
    from fedjaxpriv.server.algorithms import (FEDAVG, SCAFFOLD, ditto, dp_fedavg, fedprox, fedsgd,
                                              trains_as_fedavg)
    from fedjaxpriv.privacy.mechanisms import ClientLevelDpFedAvg

    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    private = dp_fedavg(ClientLevelDpFedAvg(noise_multiplier=1.0, num_clients=8, expected_cohort=4, poisson=False), 1.0)
    assert [trains_as_fedavg(a, params) for a in (FEDAVG, fedprox(), fedsgd(), SCAFFOLD, ditto(0.5), private)] == [
        True, True, True, False, False, False]
    config = from_dict(_run_config(topology={"graph": "ring"}, client={"prox_mu": 0.5}, run={"rounds": 1}))
    prox = build_experiment(config, algorithm=fedprox(), progress=False)
    assert float(prox.settings.prox_mu[0]) == 0.5 and prox.spec.prox
    with pytest.raises(ValueError, match="no server to keep its state or take its extra message"):
        build_experiment(config, algorithm=SCAFFOLD, progress=False)


def test_erdos_renyi_draws_each_pair_independently_without_a_dense_matrix():
    """``_random_pairs``: at probability 1 every pair i < j once, in order; over 400 seeds on 12 nodes every pair's
    frequency is p within 5 binomial standard deviations and the edge count's mean is C(C-1)/2 p within 5 standard
    errors; a sparse graph of 20,000 nodes (mean degree 20, far beyond a C x C draw's 3.2 GB) has the expected
    degree."""
    for c in (2, 3, 12, 101):
        np.testing.assert_array_equal(dec._random_pairs(c, 1.0, np.random.default_rng(0)),
                                      np.argwhere(np.triu(np.ones((c, c), bool), 1)))
    c, p, seeds = 12, 0.3, 400
    pairs = c * (c - 1) // 2
    hits, counts = np.zeros((c, c)), []
    for seed in range(seeds):
        drawn = dec._random_pairs(c, p, np.random.default_rng(seed))
        assert np.all(drawn[:, 0] < drawn[:, 1]) and len(np.unique(drawn, axis=0)) == len(drawn)
        hits[drawn[:, 0], drawn[:, 1]] += 1
        counts.append(len(drawn))
    frequency = hits[np.triu_indices(c, 1)] / seeds
    assert np.all(np.abs(frequency - p) < 5 * np.sqrt(p * (1 - p) / seeds))
    assert abs(np.mean(counts) - pairs * p) < 5 * np.sqrt(pairs * p * (1 - p) / seeds)
    big = dec.erdos_renyi(20000, 20 / 20000, seed=0)
    degree = (big.weights[:, 1:] > 0).sum(axis=1)
    assert abs(degree.mean() - 20 * (19999 / 20000)) < 5 * np.sqrt(20 / 20000)


@pytest.mark.slow
def test_choco_gossip_without_compression_is_exact_gossip_and_with_top_k_sends_a_tenth():
    """CHOCO gossip (``topology.gossip='choco'``): with no compressor and gamma = 1 every public model catches up
    with its node's trained model each round, so 3 rounds on a ring with half the nodes training equal exact
    D-SGD's models; with top-10% sparsification and gamma = 0.5 each node sends about a tenth of a model's bytes
    and the nodes learn about as well as exact gossip does in as many rounds (within 0.05 accuracy after 8).
    Exact gossip refuses a consensus step other than 1, and CHOCO refuses local DP noise."""
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.experiment import build_experiment

    def run(rounds=3, **topology):
        config = from_dict(_run_config(topology={"graph": "ring", **topology}, server={"clients_per_round": 4},
                                       run={"rounds": rounds, "eval_every": rounds, "checkpoint_every": 0},
                                       **({"message": {"topk_fraction": 0.1}} if topology.get("consensus_step")
                                          else {})))
        return build_experiment(config, progress=False).run(progress=False)

    exact, choco = run(), run(gossip="choco")
    for a, b in zip(jax.tree_util.tree_leaves(exact.params), jax.tree_util.tree_leaves(choco.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert [r["bytes_per_client"] for r in choco.history] == [r["bytes_per_client"] for r in exact.history]
    compressed, longer = run(rounds=8, gossip="choco", consensus_step=0.5), run(rounds=8)
    ratio = compressed.history[-1]["bytes_per_client"] / longer.history[-1]["bytes_per_client"]
    assert 0.05 < ratio < 0.25, ratio  # top-10% values plus their indices
    assert compressed.final("test_accuracy") > longer.final("test_accuracy") - 0.05
    with pytest.raises(ValueError, match="topology.consensus_step=0.5 is invalid; allowed: 1.0 with"):
        from_dict(_run_config(topology={"graph": "ring", "consensus_step": 0.5}))
    with pytest.raises(ValueError, match="message.local_noise_multiplier=0.5 is invalid; allowed: 0 with"):
        from_dict(_run_config(topology={"graph": "ring", "gossip": "choco"},
                              message={"clip_norm": 1.0, "local_noise_multiplier": 0.5}))


@pytest.mark.slow
def test_a_curious_neighbour_of_choco_gossip_hears_the_public_model_change_and_starts_from_the_public_model():
    """CHOCO gossip on an 8-ring with top-30% messages and step 0.5, every node tapped for 3 rounds: what a
    neighbour hears of node v is q_v, exactly the change of v's public model in the round (x_hat_v += q_v); its
    start is x_hat_v before the round, which every neighbour holds: exact in round 1 (everyone starts from the
    initial model) and off by more than float error after. Without compression and with step 1, round 1's taps
    are exact gossip's (the same update from the same initial model)."""
    experiment = _tap_everything("ring", message={"topk_fraction": 0.3}, gossip="choco", consensus_step=0.5)
    c = 8
    state = experiment.initial_state
    for r in range(3):
        public_before, true_start = _leaves(state.public), _leaves(state.params)
        state, _, tap = experiment.observed_step(state, r, tapped=list(range(c)))
        assert tap.client_ids.tolist() == list(range(c)) and tap.start_exact.tolist() == [r == 0] * c
        assert tap.observers.tolist() == experiment.observer_view.observers.tolist()
        for start, message, before, after, true in zip(_leaves(tap.start_params), _leaves(tap.messages),
                                                       public_before, _leaves(state.public), true_start):
            np.testing.assert_array_equal(start, before)
            np.testing.assert_allclose(message, after - before, atol=1e-6)
            kept, k = (np.abs(message) > 0).reshape(c, -1).sum(axis=1), math.ceil(0.3 * message[0].size)
            assert np.all(kept <= k) and np.all(kept > k // 2), (kept, k)  # top-k of each leaf (k = ceil(0.3 n))
            gap = np.abs(start - true).reshape(c, -1).max(axis=1)
            assert (gap < 1e-6).all() if r == 0 else (gap > 1e-4).all(), (r, gap)
    plain, exact = (_tap_everything("ring", rounds=1, gossip="choco"), _tap_everything("ring", rounds=1))
    _, _, choco_tap = plain.observed_step(plain.initial_state, 0, tapped=[1, 5])
    _, _, exact_tap = exact.observed_step(exact.initial_state, 0, tapped=[1, 5])
    for a, b in zip(_leaves(choco_tap.messages), _leaves(exact_tap.messages)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_decentralized_checkpoint_holds_one_row_per_node_and_resumes_on_another_device_count(tmp_path):
    """12 nodes split over the 8 test devices (padded to 16 rows, 2 per device), stopped after round 2, resume on 3
    devices (12 rows, 4 per device) and end where the run never stopped ends (its evaluation included); the results
    and the callbacks hold 12 node models, not the padding rows."""
    if jax.device_count() < 8:
        pytest.skip("needs the 8-device test mesh")
    from fedjaxpriv import parallel
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.guards import RunInterrupted

    config = from_dict(_run_config(topology={"graph": "ring"}, data={"num_clients": 12},
                                   server={"clients_per_round": 6},
                                   message={"topk_fraction": 0.5, "error_feedback": True},
                                   run={"rounds": 4, "eval_every": 4, "checkpoint_every": 1}))
    rows_seen = []

    def rows_of_latest(experiment, record):
        rows_seen.extend({np.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(experiment.latest_params)})

    whole = dec.DecentralizedExperiment(config, progress=False).run(progress=False, callbacks=[rows_of_latest])
    assert all(np.shape(leaf)[0] == 12 for leaf in jax.tree_util.tree_leaves(whole.params))
    assert rows_seen == [12] * 4  # callbacks read the 12 nodes' models every round, not the padding rows

    def stop_after_round_2(experiment, record):
        if record["round"] == 2:
            raise RunInterrupted(2)

    out = str(tmp_path / "run")
    stopped = dec.DecentralizedExperiment(config, progress=False)
    assert stopped.node_rows == 16
    with pytest.raises(RunInterrupted):
        stopped.run(out, progress=False, callbacks=[stop_after_round_2])
    resumed_on = dec.DecentralizedExperiment(config, mesh=parallel.local_mesh(3), progress=False)
    assert resumed_on.node_rows == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no checkpoint set aside, no starting over
        resumed = resumed_on.run(out, progress=False)
    assert [r["round"] for r in resumed.history] == [1, 2, 3, 4]
    for x, y in zip(jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5)
    assert resumed.history[-1]["test_accuracy"] == pytest.approx(whole.history[-1]["test_accuracy"], abs=1e-6)
