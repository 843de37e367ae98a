"""Tests for QSGD and stochastic rounding: unbiasedness, exact variance, grid, exact bit counts, vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv.transforms import qsgd, stochastic_rounding

DRAWS = 4000
MESSAGE = {
    "kernel": jax.random.normal(jax.random.key(0), (8, 8)),
    "bias": jnp.array([0.3, -2.0, 0.0, 1.5, -0.1]),
}


def _draws(transform, settings, message=MESSAGE, draws=DRAWS):
    state = transform.init(message)
    keys = jax.random.split(jax.random.key(42), draws)
    run = jax.jit(jax.vmap(lambda k: transform.update(message, state, k, settings)[0]))
    return run(keys)


@pytest.mark.parametrize("levels", [1, 4])
def test_qsgd_unbiased_and_variance_exact_and_within_bound(levels):
    samples = _draws(qsgd("s"), {"s": levels})
    for name, v in MESSAGE.items():
        v = np.asarray(v, np.float64)
        q = np.asarray(samples[name], np.float64)
        norm, n = np.linalg.norm(v), v.size
        # Each coordinate takes one of two adjacent levels norm/s apart: variance <= (norm/s)^2 / 4.
        tolerance = 5 * (norm / levels / 2) / np.sqrt(DRAWS)
        assert np.all(np.abs(q.mean(0) - v) <= tolerance)
        frac = np.abs(v) / norm * levels % 1.0
        exact_variance = np.sum((norm / levels) ** 2 * frac * (1 - frac))
        squared_errors = np.sum((q - v) ** 2, axis=tuple(range(1, q.ndim)))
        sigma = squared_errors.std() / np.sqrt(DRAWS)
        assert abs(squared_errors.mean() - exact_variance) <= 5 * sigma + 1e-9
        bound = min(n / levels**2, np.sqrt(n) / levels) * norm**2
        assert squared_errors.mean() <= bound
        # Values lie on the grid norm * j / s.
        grid = np.abs(q) / norm * levels
        np.testing.assert_allclose(grid, np.round(grid), atol=1e-4)


@pytest.mark.slow
def test_qsgd_bits_counted_exactly_and_zero_levels_is_off():
    transform = qsgd("s")
    state = transform.init(MESSAGE)
    key = jax.random.key(0)
    for levels, bits_per_value in ((1, 2), (3, 3), (4, 4), (255, 9)):
        _, _, stats = transform.update(MESSAGE, state, key, {"s": levels})
        # 69 coordinates * (sign + ceil(log2(s + 1))) + one float32 norm per leaf.
        assert int(stats["bits"]) == 69 * bits_per_value + 2 * 32
        assert int(stats["wire_value_bits"]) == bits_per_value
    out, _, stats = transform.update(MESSAGE, state, key, {"s": 0})
    assert int(stats["bits"]) == 69 * 32
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(MESSAGE)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_qsgd_zero_message_stays_zero():
    zeros = jax.tree_util.tree_map(jnp.zeros_like, MESSAGE)
    out, _, _ = qsgd(4).update(zeros, (), jax.random.key(0), {})
    assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree_util.tree_leaves(out))


@pytest.mark.parametrize("bits", [1, 3])
def test_stochastic_rounding_unbiased_on_grid_and_range_kept(bits):
    samples = _draws(stochastic_rounding("b"), {"b": bits})
    for name, v in MESSAGE.items():
        v = np.asarray(v, np.float64)
        q = np.asarray(samples[name], np.float64)
        low, high = v.min(), v.max()
        step = (high - low) / (2**bits - 1)
        tolerance = 5 * (step / 2) / np.sqrt(DRAWS)
        assert np.all(np.abs(q.mean(0) - v) <= tolerance + 1e-6)
        grid = (q - low) / step
        np.testing.assert_allclose(grid, np.round(grid), atol=1e-4)
        assert q.min() >= low - 1e-6 and q.max() <= high + 1e-6
        assert len(np.unique(np.round(grid))) <= 2**bits
    # A biased alternative (round to nearest) would fail the same check.
    v = np.asarray(MESSAGE["kernel"], np.float64)
    step = (v.max() - v.min()) / (2**bits - 1)
    nearest = v.min() + np.round((v - v.min()) / step) * step
    assert np.any(np.abs(nearest - v) > 5 * (step / 2) / np.sqrt(DRAWS))


def test_stochastic_rounding_bits_and_off_values():
    transform = stochastic_rounding("b")
    key = jax.random.key(0)
    for bits in (1, 4, 8):
        _, _, stats = transform.update(MESSAGE, (), key, {"b": bits})
        assert int(stats["bits"]) == 69 * bits + 2 * 64
    for off in (0, 32):
        out, _, stats = transform.update(MESSAGE, (), key, {"b": off})
        assert int(stats["bits"]) == 69 * 32
        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(MESSAGE)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@pytest.mark.parametrize("transform, field, values", [(qsgd("x"), "x", [0, 1, 7, 64]), (stochastic_rounding("x"), "x", [0, 2, 5, 32])])
def test_vmap_over_clients_with_different_precision_equals_loop(transform, field, values):
    clients = len(values)
    messages = jax.tree_util.tree_map(lambda leaf: jnp.stack([leaf * (c + 1) for c in range(clients)]), MESSAGE)
    settings = {field: jnp.array(values, jnp.int32)}
    keys = jax.random.split(jax.random.key(5), clients)
    update = jax.jit(transform.update)
    out, _, stats = jax.jit(jax.vmap(transform.update, in_axes=(0, None, 0, 0)))(messages, (), keys, settings)
    for c in range(clients):
        message = jax.tree_util.tree_map(lambda leaf: leaf[c], messages)
        single, _, single_stats = update(message, (), keys[c], {field: jnp.int32(values[c])})
        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(single)):
            np.testing.assert_allclose(np.asarray(a[c]), np.asarray(b), rtol=1e-6, atol=1e-6)
        assert int(stats["bits"][c]) == int(single_stats["bits"])
