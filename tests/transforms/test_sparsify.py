"""Tests for top-k, random-k and message pruning: exact kept sets, exact bits, unbiasedness, vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv.client.pruning import magnitude_mask
from fedjaxpriv.transforms import prune_message, random_k, top_k

MESSAGE = {
    "kernel": jax.random.normal(jax.random.key(0), (10, 10)),
    "bias": jnp.array([0.3, -2.0, 0.05, 1.5, -0.1, 0.7, -0.4]),
}
INDEX_BITS = {"kernel": 7, "bias": 3}  # ceil(log2 100), ceil(log2 7)


def _kept(fraction, size):
    return int(np.clip(np.ceil(np.float32(fraction) * np.float32(size)), 0, size))


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.37, 0.9])
def test_top_k_keeps_exactly_the_k_largest_and_counts_bits(fraction):
    out, _, stats = jax.jit(top_k("f").update)(MESSAGE, (), jax.random.key(0), {"f": fraction})
    expected_bits = 0
    for name, v in MESSAGE.items():
        v, o = np.asarray(v).ravel(), np.asarray(out[name]).ravel()
        k = _kept(fraction, v.size)
        largest = np.argsort(-np.abs(v), kind="stable")[:k]
        np.testing.assert_array_equal(np.flatnonzero(o), np.sort(largest))
        np.testing.assert_array_equal(o[largest], v[largest])
        expected_bits += k * (32 + INDEX_BITS[name])
    assert int(stats["bits"]) == expected_bits


@pytest.mark.slow
def test_top_k_off_at_fraction_one():
    out, _, stats = top_k("f").update(MESSAGE, (), jax.random.key(0), {"f": 1.0})
    assert int(stats["bits"]) == 107 * 32 and int(stats["wire_index_bits"]) == 0
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(MESSAGE)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_random_k_exact_count_and_unbiased_scaling():
    fraction, draws = 0.25, 2000
    transform = random_k("f", unbiased=True)
    keys = jax.random.split(jax.random.key(1), draws)
    outs, _, stats = jax.jit(jax.vmap(lambda k: transform.update(MESSAGE, (), k, {"f": fraction})))(keys)
    for name, v in MESSAGE.items():
        v = np.asarray(v, np.float64)
        o = np.asarray(outs[name], np.float64).reshape(draws, -1)
        n, k = v.size, _kept(fraction, v.size)
        assert np.all((o != 0).sum(1) == k)
        # Each coordinate is v_i * n/k with probability k/n, else 0: variance v_i^2 (n/k - 1).
        tolerance = 5 * np.abs(v.ravel()) * np.sqrt(n / k - 1) / np.sqrt(draws)
        assert np.all(np.abs(o.mean(0) - v.ravel()) <= tolerance + 1e-6)
    assert np.all(np.asarray(stats["bits"]) == 25 * (32 + 7) + 2 * (32 + 3))
    biased, _, _ = random_k("f").update(MESSAGE, (), keys[0], {"f": fraction})
    kept = np.asarray(biased["kernel"]) != 0
    np.testing.assert_array_equal(np.asarray(biased["kernel"])[kept], np.asarray(MESSAGE["kernel"])[kept])


def test_prune_message_with_server_mask_costs_no_index_bits():
    server_mask = {"kernel": (jnp.arange(100).reshape(10, 10) % 3 == 0).astype(jnp.float32), "bias": jnp.ones(7)}
    out, _, stats = prune_message(mask="server_mask").update(MESSAGE, (), jax.random.key(0), {"server_mask": server_mask})
    np.testing.assert_array_equal(np.asarray(out["kernel"]), np.asarray(MESSAGE["kernel"] * server_mask["kernel"]))
    assert int(stats["bits"]) == (34 + 7) * 32 and int(stats["wire_index_bits"]) == 0


def test_prune_message_by_magnitude_matches_mask_and_counts_indices():
    out, _, stats = prune_message(sparsity="s").update(MESSAGE, (), jax.random.key(0), {"s": 0.6})
    mask = magnitude_mask(MESSAGE, 0.6)
    np.testing.assert_array_equal(np.asarray(out["kernel"]), np.asarray(MESSAGE["kernel"] * mask["kernel"]))
    np.testing.assert_array_equal(np.asarray(out["bias"]), np.asarray(MESSAGE["bias"]))  # biases are not pruned
    assert int(stats["bits"]) == 40 * (32 + 7) + 7 * 32
    _, _, off = prune_message(sparsity="s").update(MESSAGE, (), jax.random.key(0), {"s": 0.0})
    assert int(off["bits"]) == 107 * 32


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="exactly one"):
        prune_message()
    with pytest.raises(ValueError, match="exactly one"):
        prune_message(sparsity=0.5, mask="m")
    with pytest.raises(ValueError, match="fraction"):
        top_k([0.1])
    with pytest.raises(ValueError, match="no field"):
        top_k("missing").update(MESSAGE, (), jax.random.key(0), {"f": 0.5})


@pytest.mark.slow
def test_vmap_over_clients_with_different_fractions_equals_loop():
    fractions = jnp.array([1.0, 0.5, 0.05, 0.3])
    keys = jax.random.split(jax.random.key(2), 4)
    for transform in (top_k("f"), random_k("f", unbiased=True)):
        out, _, stats = jax.jit(jax.vmap(transform.update, in_axes=(None, None, 0, 0)))(MESSAGE, (), keys, {"f": fractions})
        update = jax.jit(transform.update)
        for c in range(4):
            single, _, single_stats = update(MESSAGE, (), keys[c], {"f": fractions[c]})
            for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(single)):
                np.testing.assert_allclose(np.asarray(a[c]), np.asarray(b), rtol=1e-6)
            assert int(stats["bits"][c]) == int(single_stats["bits"])
