"""Per-step batch sampling: fixed-size without replacement and Poisson, with statistical checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from fedjaxpriv.client.sampling import poisson_max_batch, sample_batch

DRAWS = 4000


def _draw(count, batch, rate, poisson, max_batch, max_count, allow_poisson=True, seed=0):
    keys = jax.random.split(jax.random.key(seed), DRAWS)
    fn = jax.jit(jax.vmap(lambda k: sample_batch(k, jnp.int32(count), jnp.int32(batch), jnp.float32(rate),
                                                 jnp.bool_(poisson), max_batch=max_batch, max_count=max_count,
                                                 allow_poisson=allow_poisson)))
    idx, mask = fn(keys)
    return np.asarray(idx), np.asarray(mask)


def test_fixed_size_batches_are_distinct_and_uniform():
    count, batch = 37, 8
    idx, mask = _draw(count, batch, 0.0, False, max_batch=12, max_count=50)
    assert np.all(mask.sum(1) == batch)
    for row, m in zip(idx[:200], mask[:200]):
        chosen = row[m]
        assert len(set(chosen.tolist())) == batch and chosen.min() >= 0 and chosen.max() < count
    # Each example is in a batch with probability batch / count.
    hits = np.bincount(idx[mask], minlength=count)
    p = batch / count
    assert np.all(np.abs(hits - DRAWS * p) < 5 * math.sqrt(DRAWS * p * (1 - p)))


def test_small_client_uses_all_its_examples():
    idx, mask = _draw(5, 16, 0.0, False, max_batch=16, max_count=20)
    assert np.all(mask.sum(1) == 5)
    assert all(sorted(row[m].tolist()) == [0, 1, 2, 3, 4] for row, m in zip(idx[:50], mask[:50]))


def test_poisson_batches_have_binomial_sizes_and_rate():
    count, rate = 60, 0.2
    max_batch = poisson_max_batch(rate * count, 64)
    idx, mask = _draw(count, 12, rate, True, max_batch=max_batch, max_count=64)
    sizes = mask.sum(1)
    # Batch sizes follow Binomial(count, rate): chi-square goodness of fit over the bulk of the support.
    support = np.arange(4, 21)
    observed = np.array([np.sum(sizes == k) for k in support] + [np.sum((sizes < 4) | (sizes > 20))])
    probs = stats.binom.pmf(support, count, rate)
    expected = DRAWS * np.append(probs, 1 - probs.sum())
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    wrong = DRAWS * np.append(stats.binom.pmf(support, count, 0.25), 1 - stats.binom.pmf(support, count, 0.25).sum())
    assert stats.chisquare(observed, wrong).pvalue < 1e-6
    hits = np.bincount(idx[mask], minlength=count)
    assert np.all(np.abs(hits - DRAWS * rate) < 5 * math.sqrt(DRAWS * rate * (1 - rate)))
    assert np.all(idx[mask] < count)


def test_skipping_poisson_draws_does_not_change_fixed_batches():
    a = _draw(30, 8, 0.3, False, max_batch=8, max_count=40, allow_poisson=True)
    b = _draw(30, 8, 0.3, False, max_batch=8, max_count=40, allow_poisson=False)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_costly_poisson_steps_are_computed_in_chunks_of_half_the_largest_expected_batch():
    """``slot_chunk``: Poisson batches with costly slots (DP-SGD or a convolutional model) get chunks of ceil(max
    expected batch / 2); cheap slots, fixed-size batches only, or one chunk holding every slot: all slots at once."""
    from fedjaxpriv.client.sampling import slot_chunk
    from fedjaxpriv.client.settings import make_settings

    counts = np.array([64, 100, 30])
    settings = make_settings(3, counts, batch_size=[16, 16, 16], poisson=[True, True, False])
    expected = np.asarray(settings.sample_rate)[:2] * counts[:2]
    assert slot_chunk(settings, counts, 45, costly_slots=True) == math.ceil(expected.max() / 2) == 8
    assert slot_chunk(settings, counts, 45, costly_slots=False) == 0
    assert slot_chunk(settings, counts, 8, costly_slots=True) == 0
    fixed = make_settings(3, counts, batch_size=[16, 16, 16], poisson=False)
    assert slot_chunk(fixed, counts, 45, costly_slots=True) == 0
