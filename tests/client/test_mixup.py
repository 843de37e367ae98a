"""Tests for mixup: lambda distribution, identity when disabled, padding isolation, vmap over clients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjaxpriv.client.mixup import mixup, real_example_permutation

BATCH = 8
jitted_mixup = jax.jit(mixup)
MASK = jnp.array([True] * 5 + [False] * 3)


def _batch():
    x = jnp.eye(BATCH, dtype=jnp.float32)  # row i is "example i", so mixing weights are readable
    y = jax.nn.one_hot(jnp.arange(BATCH) % 3, 3)
    return x, y


def test_lambda_is_beta_by_ks_and_wrong_alpha_rejected():
    x, y = _batch()
    keys = jax.random.split(jax.random.key(0), 3000)
    lams = np.asarray(jax.jit(jax.vmap(lambda k: mixup(k, x, y, MASK, 0.4)[2]))(keys))
    assert stats.kstest(lams, stats.beta(0.4, 0.4).cdf).pvalue > 1e-3
    assert stats.kstest(lams, stats.beta(0.6, 0.6).cdf).pvalue < 1e-6


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_nonpositive_alpha_is_exact_identity(alpha):
    key = jax.random.key(1)
    x = jax.random.normal(key, (BATCH, 4, 4, 1))
    y = jax.nn.one_hot(jnp.arange(BATCH) % 3, 3)
    x_mixed, y_mixed, lam = mixup(key, x, y, MASK, alpha)
    np.testing.assert_array_equal(np.asarray(x_mixed), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(y_mixed), np.asarray(y))
    assert float(lam) == 1.0


def test_real_rows_mix_only_with_real_partners_and_partners_form_permutation():
    x, y = _batch()
    real = np.asarray(MASK)
    for seed in range(20):
        x_mixed, y_mixed, lam = jitted_mixup(jax.random.key(seed), x, y, MASK, 1.0)
        lam = float(lam)
        weights = np.asarray(x_mixed)  # weights[i, j]: share of example j in mixed row i
        # Real rows put no weight on padded examples; total weight 1.
        np.testing.assert_allclose(weights[real][:, ~real], 0.0, atol=0)
        np.testing.assert_allclose(weights[real].sum(axis=1), 1.0, rtol=1e-6)
        # Removing the lam * self part leaves a permutation matrix over the real rows.
        partner_part = (weights[real][:, real] - lam * np.eye(real.sum())) / (1 - lam)
        np.testing.assert_allclose(partner_part.sum(axis=0), 1.0, atol=1e-4)
        np.testing.assert_allclose(partner_part.sum(axis=1), 1.0, atol=1e-4)
        # Labels are mixed with the same weights.
        np.testing.assert_allclose(np.asarray(y_mixed), weights @ np.asarray(y), atol=1e-6)


def test_partner_is_uniform_over_real_rows_by_chi_square():
    keys = jax.random.split(jax.random.key(2), 2000)
    partners = np.asarray(jax.jit(jax.vmap(lambda k: real_example_permutation(k, MASK)))(keys))
    assert np.all(partners[:, 5:] >= 5)  # padded rows pair with padded rows
    counts = np.bincount(partners[:, 0], minlength=BATCH)
    assert counts[5:].sum() == 0
    assert stats.chisquare(counts[:5]).pvalue > 1e-3
    # A wrong hypothesis (row 0 partners with itself half the time) is rejected.
    wrong = np.array([0.5] + [0.125] * 4) * counts[:5].sum()
    assert stats.chisquare(counts[:5], wrong).pvalue < 1e-6


@pytest.mark.slow
def test_vmap_over_clients_with_different_alphas_equals_loop():
    x, y = _batch()
    alphas = jnp.array([0.0, 0.2, 1.0, 5.0])
    masks = jnp.stack([MASK, jnp.ones(BATCH, bool), MASK, jnp.arange(BATCH) < 2])
    keys = jax.random.split(jax.random.key(3), 4)
    xs, ys = jnp.stack([x] * 4), jnp.stack([y] * 4)
    batched = jax.jit(jax.vmap(mixup))(keys, xs, ys, masks, alphas)
    for c in range(4):
        single = jitted_mixup(keys[c], x, y, masks[c], alphas[c])
        for got, want in zip(batched, single):
            np.testing.assert_allclose(np.asarray(got[c]), np.asarray(want), rtol=1e-6, atol=1e-7)
