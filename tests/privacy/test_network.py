"""Pairwise network DP of Gaussian gossip averaging (``privacy.network``) against real gossip runs
(``decentralized.gossip_averaging``): linear-algebra invariants of the exact analysis, and a canary audit whose
attacker knows nothing of the analysis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv import decentralized as dec
from fedjaxpriv.attacks import audit
from fedjaxpriv.privacy import network


def test_a_ring_gives_no_amplification_to_a_neighbour_that_listens():
    """On a ring the observer receives 3 values per step and T steps reach 2T unknown values: it solves for every
    one of them, so each node within T hops leaks exactly as its own noisy value (mu = 2 / z), and a node farther
    away not at all. The complete graph shows everyone's value in the first step."""
    ring = dec.ring(12).dense()
    for steps in (1, 2, 4):
        mu = network.pairwise_mu(ring, steps, 2.0, observer=0)
        hops = np.minimum(np.arange(12), 12 - np.arange(12))
        np.testing.assert_allclose(mu, np.where((hops >= 1) & (hops <= steps), 1.0, 0.0), atol=1e-9)
    np.testing.assert_allclose(network.pairwise_mu(dec.complete(6).dense(), 1, 0.5, observer=3),
                               [4.0, 4.0, 4.0, 0.0, 4.0, 4.0], atol=1e-9)


def test_a_torus_amplifies_for_the_nodes_the_observer_does_not_hear_and_less_as_it_listens_longer():
    torus = dec.torus(5, 5)
    hops = dec.graph_distances(torus, 0)
    mus = np.stack([network.pairwise_mu(torus.dense(), steps, 2.0, observer=0) for steps in (1, 2, 3, 5)])
    np.testing.assert_allclose(mus[:, hops == 1], 1.0, atol=1e-9)  # heard directly: its own noisy value
    assert np.all((mus[1:, hops == 2] > 0.1) & (mus[1:, hops == 2] < 0.95)), mus[:, hops == 2]
    assert np.all(np.diff(mus, axis=0) >= -1e-12)  # a longer view never hides more
    assert np.all(mus[0, hops >= 2] == 0) and np.all(mus[2, hops >= 4] == 0)  # not reached yet
    np.testing.assert_allclose(network.pairwise_epsilon(torus.dense(), 3, 2.0, 0, 1e-5)[hops == 1], 4.37717810,
                               rtol=1e-6)  # mu = 1 at delta 1e-5 (dp_accounting's Gaussian)


def test_gossip_averaging_clips_adds_noise_once_and_applies_the_mixing_matrix():
    topology = dec.erdos_renyi(10, 0.4, seed=1)
    values = np.random.default_rng(0).normal(size=(10, 3)) * 2.0
    trajectory = np.asarray(dec.gossip_averaging(values, topology, 4, 1.5, 0.7, jax.random.key(5)), np.float64)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    clipped = values * np.minimum(1.0, 1.5 / norms)
    noise = trajectory[0] - clipped
    assert abs(np.std(noise) / (0.7 * 1.5) - 1) < 0.3  # 30 draws
    weights = topology.dense()
    for t in range(1, 5):
        np.testing.assert_allclose(trajectory[t], np.linalg.matrix_power(weights, t) @ trajectory[0], atol=1e-5)
    with pytest.raises(ValueError, match="needs a fixed graph"):
        dec.gossip_averaging(values, dec.random_matching(10), 2, 1.0, 1.0, jax.random.key(0))


@pytest.mark.parametrize("bad, match", [(dict(steps=0), "steps=0"), (dict(observer=25), "observer=25"),
                                        (dict(noise_multiplier=0.0), "noise_multiplier=0.0"),
                                        (dict(mixing=np.ones((3, 4))), r"shape \(3, 4\)")])
def test_bad_arguments_are_named(bad, match):
    arguments = {**dict(mixing=dec.torus(5, 5).dense(), steps=2, noise_multiplier=1.0, observer=0), **bad}
    with pytest.raises(ValueError, match=match):
        network.pairwise_mu(**arguments)


def test_a_canary_audit_of_gossip_runs_stays_below_each_nodes_epsilon_and_reaches_half_its_mu():
    """Canary audit (Jagielski et al. 2020) of node u's value against observer 0 on a 5x5 torus, 3 gossip steps,
    noise multiplier 2: u's value is +C or -C (replace-one, moves by 2C), every other value fixed. The attacker
    fits Fisher's linear discriminant to what the observer received in 10,000 runs of each kind (it uses no part
    of the analysis), picks its threshold there, and is scored on 10,000 fresh runs of each. Its lower bound (at
    delta 1e-2, where 10,000 runs resolve the rates) stays below the reported epsilon, and exceeds the epsilon of
    half the reported mu: the analysis is neither below
    the truth nor more than twice above it, for a node heard directly (no amplification), nodes at 2 and 3 hops
    (amplified) and one not yet reached (0)."""
    topology, steps, z, clip, delta, observer, runs = dec.torus(5, 5), 3, 2.0, 1.0, 1e-2, 0, 10_000
    mu = network.pairwise_mu(topology.dense(), steps, z, observer)
    heard = network.heard_by(topology.dense(), observer)
    others = np.random.default_rng(0).normal(size=(25, 1))
    others /= np.maximum(np.linalg.norm(others, axis=1, keepdims=True), 1.0)
    view = jax.jit(jax.vmap(lambda values, key: dec.gossip_averaging(values, topology, steps, clip, z, key)[:steps][
        :, heard].reshape(-1), in_axes=(None, 0)))
    hops = dec.graph_distances(topology, observer)
    victims = [int(np.flatnonzero(hops == k)[0]) for k in (1, 2, 3, 4)]
    assert mu[victims[3]] == 0 and mu[victims[0]] == 1.0 and 0 < mu[victims[2]] < mu[victims[1]] < 1
    for victim in victims:
        seen = {}
        for label, sign in ((1, 1.0), (0, -1.0)):
            values = others.copy()
            values[victim] = sign * clip
            keys = jax.random.split(jax.random.fold_in(jax.random.key(victim), label), 2 * runs)
            seen[label] = np.asarray(view(jnp.asarray(values), keys), np.float64)
        fit = {label: views[:runs] for label, views in seen.items()}
        centred = np.concatenate([fit[1] - fit[1].mean(0), fit[0] - fit[0].mean(0)])
        direction = np.linalg.pinv(np.cov(centred.T), rcond=1e-10) @ (fit[1].mean(0) - fit[0].mean(0))
        scores = np.concatenate([fit[1] @ direction, fit[0] @ direction])
        threshold = audit.epsilon_lower_bound_from_scores(scores, np.r_[np.ones(runs), np.zeros(runs)],
                                                          delta).threshold
        test_in, test_out = seen[1][runs:] @ direction, seen[0][runs:] @ direction
        bound = audit.epsilon_lower_bound_from_counts(int(np.sum(test_out >= threshold)), runs,
                                                      int(np.sum(test_in < threshold)), runs, delta)
        reported = float(network.gaussian_epsilon(mu[victim], delta))
        assert bound <= reported, (victim, bound, reported)
        if mu[victim] > 0:
            assert bound > float(network.gaussian_epsilon(mu[victim] / 2, delta)), (victim, bound, mu[victim])
