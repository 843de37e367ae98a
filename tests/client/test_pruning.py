"""Tests for pruning masks: exact per-layer counts vs a NumPy reference, global scope, random masks,
masked SGD, the Zhu & Gupta schedule and vmap over clients with different sparsities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv.client.pruning import (
    apply_mask,
    iterative_sparsity,
    keep_above_rank,
    magnitude_mask,
    mask_sparsity,
    random_mask,
)
from fedjaxpriv.models import cross_entropy, get_model

MODEL = get_model("mlp", (6, 6, 1), 3, hidden=(16,))
PARAMS = MODEL.init(jax.random.key(0))


def _expected_pruned(sparsity, size):
    return int(np.floor(np.float32(sparsity) * np.float32(size)))


def _numpy_magnitude_mask(leaf, sparsity):
    flat = np.abs(np.asarray(leaf)).ravel()
    k = _expected_pruned(sparsity, flat.size)
    mask = np.ones(flat.size, np.float32)
    mask[np.argsort(flat, kind="stable")[:k]] = 0.0
    return mask.reshape(np.shape(leaf))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 0.99])
def test_layer_magnitude_mask_matches_numpy_reference_exactly(sparsity):
    mask = jax.jit(magnitude_mask)(PARAMS, sparsity)
    for leaf, m in zip(jax.tree_util.tree_leaves(PARAMS), jax.tree_util.tree_leaves(mask)):
        if leaf.ndim >= 2:
            np.testing.assert_array_equal(np.asarray(m), _numpy_magnitude_mask(leaf, sparsity))
            assert int((np.asarray(m) == 0).sum()) == _expected_pruned(sparsity, leaf.size)
        else:
            assert np.all(np.asarray(m) == 1.0)  # biases are never pruned


def test_global_magnitude_mask_count_and_threshold():
    sparsity = 0.6
    mask = magnitude_mask(PARAMS, sparsity, scope="global")
    pairs = [(np.asarray(p), np.asarray(m)) for p, m in zip(jax.tree_util.tree_leaves(PARAMS), jax.tree_util.tree_leaves(mask))]
    prunable = [(p, m) for p, m in pairs if p.ndim >= 2]
    total = sum(p.size for p, _ in prunable)
    pruned = np.concatenate([np.abs(p[m == 0]) for p, m in prunable])
    kept = np.concatenate([np.abs(p[m == 1]) for p, m in prunable])
    assert pruned.size == _expected_pruned(sparsity, total)
    assert pruned.max() <= kept.min()
    per_layer = [float((m == 0).mean()) for _, m in prunable]
    assert max(per_layer) - min(per_layer) > 0.05  # global scope differs from a uniform per-layer split
    assert all(np.all(m == 1) for p, m in pairs if p.ndim < 2)


def test_ties_are_broken_deterministically_with_exact_count():
    params = {"kernel": jnp.ones((4, 5)), "bias": jnp.zeros(5)}
    mask = np.asarray(magnitude_mask(params, 0.45)["kernel"]).ravel()
    np.testing.assert_array_equal(mask, np.r_[np.zeros(9), np.ones(11)])  # lowest flat indices go first
    with pytest.raises(ValueError, match="scope"):
        magnitude_mask(params, 0.5, scope="row")


@pytest.mark.slow
def test_random_mask_exact_count_and_uniform_positions():
    sparsity, draws = 0.3, 400
    kernel = {"kernel": jnp.zeros((10, 12))}
    masks = jax.jit(jax.vmap(lambda k: random_mask(k, kernel, sparsity)["kernel"]))(jax.random.split(jax.random.key(1), draws))
    masks = np.asarray(masks)
    assert np.all((masks == 0).reshape(draws, -1).sum(1) == _expected_pruned(sparsity, 120))
    k = _expected_pruned(sparsity, 120)
    p = k / 120
    freq = (masks == 0).mean(0)
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / draws))
    assert not np.array_equal(masks[0], masks[1])
    bias_mask = random_mask(jax.random.key(0), PARAMS, 0.9)
    assert all(np.all(np.asarray(m) == 1) for p, m in zip(jax.tree_util.tree_leaves(PARAMS), jax.tree_util.tree_leaves(bias_mask)) if p.ndim < 2)


def test_mask_sparsity_reports_exact_fractions():
    mask = magnitude_mask(PARAMS, 0.4)
    fractions = mask_sparsity(mask)
    for leaf, fraction in zip(jax.tree_util.tree_leaves(PARAMS), jax.tree_util.tree_leaves(fractions)):
        want = _expected_pruned(0.4, leaf.size) / leaf.size if leaf.ndim >= 2 else 0.0
        np.testing.assert_allclose(float(fraction), want, rtol=1e-6)


@pytest.mark.slow
def test_masked_sgd_keeps_pruned_weights_at_zero():
    mask = magnitude_mask(PARAMS, 0.5)
    params = apply_mask(PARAMS, mask)
    x = jax.random.normal(jax.random.key(2), (16, 6, 6, 1))
    y = jnp.arange(16) % 3

    def loss(p):
        return jnp.mean(cross_entropy(MODEL.apply(p, x), y))

    @jax.jit
    def step(p):
        grads = apply_mask(jax.grad(loss)(p), mask)
        return jax.tree_util.tree_map(lambda w, g: w - 0.5 * g, p, grads)

    start = params
    for _ in range(3):
        params = step(params)
    for w, w0, m in zip(*(jax.tree_util.tree_leaves(t) for t in (params, start, mask))):
        w, w0, m = np.asarray(w), np.asarray(w0), np.asarray(m)
        assert np.all(w[m == 0] == 0.0)
        assert np.any(w[m == 1] != w0[m == 1])  # the kept weights did train
    assert float(loss(params)) < float(loss(start))


def test_iterative_sparsity_polynomial_schedule():
    final, begin, end = 0.8, 10, 50
    steps = jnp.arange(0, 70)
    schedule = np.asarray(jax.vmap(lambda t: iterative_sparsity(t, final, begin, end))(steps))
    t = np.arange(70)
    progress = np.clip((t - begin) / (end - begin), 0, 1)
    np.testing.assert_allclose(schedule, final * (1 - (1 - progress) ** 3), rtol=1e-6, atol=1e-7)
    assert schedule[begin] == 0.0 and schedule[end] == pytest.approx(final)
    assert np.all(np.diff(schedule) >= 0)
    # end <= begin: a step at begin.
    assert float(iterative_sparsity(4, 0.5, 5, 5)) == 0.0
    assert float(iterative_sparsity(5, 0.5, 5, 5)) == pytest.approx(0.5)


def test_vmap_over_clients_with_different_sparsities_equals_loop():
    sparsities = jnp.array([0.0, 0.25, 0.5, 0.9])
    keys = jax.random.split(jax.random.key(3), 4)
    batched_magnitude = jax.jit(jax.vmap(magnitude_mask, in_axes=(None, 0)))(PARAMS, sparsities)
    batched_random = jax.jit(jax.vmap(random_mask, in_axes=(0, None, 0)))(keys, PARAMS, sparsities)
    single_magnitude, single_random = jax.jit(magnitude_mask), jax.jit(random_mask)
    for c in range(4):
        for batched, single in (
            (batched_magnitude, single_magnitude(PARAMS, sparsities[c])),
            (batched_random, single_random(keys[c], PARAMS, sparsities[c])),
        ):
            for b, s in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(single)):
                np.testing.assert_array_equal(np.asarray(b[c]), np.asarray(s))


def test_keep_above_rank_removes_exactly_the_lowest_as_a_stable_argsort_ranks_them():
    """Scores with many ties, signed zeros, negatives and extreme magnitudes; every count from 0 to n: the kept
    set equals NumPy's stable-argsort ranks >= num_removed (a sort-free bisection must agree exactly)."""
    rng = np.random.default_rng(0)
    pools = [rng.normal(size=97), np.round(rng.normal(size=97) * 2) / 2,
             np.where(rng.random(97) < 0.4, -0.0, 0.0) + (rng.random(97) < 0.2) * rng.normal(size=97),
             rng.choice([-3e38, -2e-38, 0.0, 1e-37, 7.0, 3e38], size=97)]  # normal floats (XLA's CPU flushes subnormals)
    select = jax.jit(keep_above_rank)
    for scores in pools:
        scores = scores.astype(np.float32)
        ranks = np.empty(scores.size, int)
        ranks[np.argsort(scores, kind="stable")] = np.arange(scores.size)
        for m in range(scores.size + 1):
            np.testing.assert_array_equal(np.asarray(select(jnp.asarray(scores), m)), (ranks >= m).astype(np.float32))
