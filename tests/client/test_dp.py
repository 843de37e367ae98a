"""Tests for DP-SGD's step (``SampleLevelDpSgd.noisy_gradient``): clipping, sensitivity, noise scale (KS),
adaptive clipping, vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjaxpriv.client.dp import adaptive_clip_update, clip_per_example, standard_normal
from fedjaxpriv.privacy.mechanisms import SampleLevelDpSgd

noisy_clipped_mean = SampleLevelDpSgd.noisy_gradient

BATCH = 6
jitted_mean = jax.jit(noisy_clipped_mean)


def _grads(key, scale=3.0):
    k1, k2 = jax.random.split(key)
    return {
        "w": scale * jax.random.normal(k1, (BATCH, 4, 3)),
        "b": scale * jax.random.normal(k2, (BATCH, 3)),
    }


def _flat(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.asarray(leaf).reshape(np.shape(leaf)[0], -1) for leaf in leaves], 1)


def _tree_flat(tree):
    return np.concatenate([np.asarray(leaf).ravel() for leaf in jax.tree_util.tree_leaves(tree)])


def test_clip_per_example_matches_numpy_reference():
    grads = _grads(jax.random.key(0))
    clip = 13.5
    clipped, norms = clip_per_example(grads, clip)
    flat = _flat(grads)
    ref_norms = np.linalg.norm(flat, axis=1)
    np.testing.assert_allclose(np.asarray(norms), ref_norms, rtol=1e-6)
    assert (ref_norms > clip).any() and (ref_norms < clip).any()
    ref = flat * np.minimum(1.0, clip / ref_norms)[:, None]
    np.testing.assert_allclose(_flat(clipped), ref, rtol=1e-6, atol=1e-7)
    unclipped, _ = clip_per_example(grads, jnp.inf)
    np.testing.assert_array_equal(_flat(unclipped), flat)
    zeros, zero_norms = clip_per_example(jax.tree_util.tree_map(jnp.zeros_like, grads), 1.0)
    assert np.all(_flat(zeros) == 0) and np.all(np.asarray(zero_norms) == 0)


def test_removing_or_replacing_one_example_moves_clipped_sum_within_sensitivity():
    clip = 1.5
    mask = jnp.ones(BATCH, bool)
    worst_remove, worst_replace = 0.0, 0.0
    for seed in range(10):
        grads = _grads(jax.random.key(seed), scale=5.0)
        base = _tree_flat(jitted_mean(grads, mask, clip, 0.0, jax.random.key(0), 1.0))
        removed = _tree_flat(jitted_mean(grads, mask.at[seed % BATCH].set(False), clip, 0.0, jax.random.key(0), 1.0))
        other = _grads(jax.random.key(100 + seed), scale=50.0)
        replaced_grads = jax.tree_util.tree_map(lambda g, o: g.at[seed % BATCH].set(-o[0]), grads, other)
        replaced = _tree_flat(jitted_mean(replaced_grads, mask, clip, 0.0, jax.random.key(0), 1.0))
        worst_remove = max(worst_remove, np.linalg.norm(base - removed))
        worst_replace = max(worst_replace, np.linalg.norm(base - replaced))
    assert worst_remove <= clip * (1 + 1e-5)
    assert worst_remove >= 0.99 * clip  # large gradients: the bound is attained
    assert worst_replace <= 2 * clip * (1 + 1e-5)


def test_padded_examples_contribute_nothing_and_zero_noise_is_exact_mean():
    grads = _grads(jax.random.key(1))
    mask = jnp.array([True, True, True, False, False, False])
    huge = jax.tree_util.tree_map(lambda g: g.at[3:].set(1e6), grads)
    got = noisy_clipped_mean(huge, mask, 2.0, 0.0, jax.random.key(0), 3.0)
    clipped, _ = clip_per_example(grads, 2.0)
    want = jax.tree_util.tree_map(lambda g: g[:3].sum(0) / 3.0, clipped)
    np.testing.assert_allclose(_tree_flat(got), _tree_flat(want), rtol=1e-5, atol=1e-6)


def test_denominator_is_the_data_independent_batch_size():
    denominator = jax.jit(SampleLevelDpSgd.denominator)
    # min(b, n): the fixed batch, or Poisson's expected batch q n at q = b / n; never below 1 (an empty client).
    assert float(denominator(jnp.int32(16), jnp.int32(64))) == 16.0
    assert float(denominator(jnp.int32(16), jnp.int32(10))) == 10.0
    assert float(denominator(jnp.int32(16), jnp.int32(0))) == 1.0


def test_noise_std_right_by_ks_and_ten_percent_off_rejected():
    clip, multiplier, denominator = 2.0, 1.5, 4.0
    grads = {"w": jnp.zeros((BATCH, 200, 100))}
    mask = jnp.ones(BATCH, bool)
    noise = np.asarray(noisy_clipped_mean(grads, mask, clip, multiplier, jax.random.key(7), denominator)["w"]).ravel()
    sigma = multiplier * clip / denominator
    assert stats.kstest(noise, stats.norm(0, sigma).cdf).pvalue > 1e-3
    assert stats.kstest(noise, stats.norm(0, 1.1 * sigma).cdf).pvalue < 1e-6
    assert stats.kstest(noise, stats.norm(0, sigma / 1.1).cdf).pvalue < 1e-6


def test_standard_normal_is_n01_and_the_two_words_of_a_hash_are_uncorrelated():
    """``two_words``: both 32-bit words of each threefry2x32 hash are used, word i and word i + ceil(n/2) from one
    hash. Their correlation, the lag-1 correlation, two keys' draws' and the default draws' correlation with them
    are within 4.5 standard errors (1/sqrt(n)) of zero, and the draws pass a KS test against N(0, 1); a vmapped
    draw is each key's own draw. Without ``two_words`` the draws are ``jax.random.normal``'s."""
    n = 100_001
    x = np.asarray(standard_normal(jax.random.key(3), (n,), two_words=True), np.float64)
    assert stats.kstest(x, stats.norm(0, 1).cdf).pvalue > 1e-3
    half = (n + 1) // 2
    other = np.asarray(standard_normal(jax.random.key(4), (n,), two_words=True), np.float64)
    default = np.asarray(standard_normal(jax.random.key(3), (n,)), np.float64)
    for a, b in ((x[:n - half], x[half:]), (x[:-1], x[1:]), (x, other), (x, default)):
        assert abs(np.corrcoef(a, b)[0, 1]) < 4.5 / np.sqrt(a.size)
    np.testing.assert_array_equal(default, np.asarray(jax.random.normal(jax.random.key(3), (n,)), np.float64))
    keys = jax.random.split(jax.random.key(5), 3)
    together = jax.jit(jax.vmap(lambda k: standard_normal(k, (7, 5), two_words=True)))(keys)
    for key, row in zip(keys, together):
        np.testing.assert_array_equal(np.asarray(row), np.asarray(standard_normal(key, (7, 5), two_words=True)))


def test_adaptive_clip_matches_formula_without_noise():
    norms = jnp.array([0.5, 1.0, 2.0, 3.0, 0.1, 0.1])
    mask = jnp.array([True, True, True, False, False, False])
    new = adaptive_clip_update(1.5, norms, mask, 0.7, 0.2, 0.0, jax.random.key(0), expected_count=5.0)
    # Centred indicators of the 3 real norms: +1/2 +1/2 -1/2 -> b = 0.5 / 5 + 1/2 = 0.6 (the EXPECTED count 5 is the
    # denominator, not the 3 that took part; the padded small norms do not count).
    np.testing.assert_allclose(float(new), 1.5 * np.exp(-0.2 * (0.6 - 0.7)), rtol=1e-6)
    # No participant: b = 1/2, the same release whatever the realised cohort size.
    empty = adaptive_clip_update(1.5, norms, jnp.zeros(6, bool), 0.7, 0.2, 0.0, jax.random.key(0), expected_count=5.0)
    np.testing.assert_allclose(float(empty), 1.5 * np.exp(-0.2 * (0.5 - 0.7)), rtol=1e-6)


def test_adaptive_clip_converges_to_target_quantile():
    def step(clip, key):
        k_norms, k_noise = jax.random.split(key)
        norms = jax.random.exponential(k_norms, (512,))
        return adaptive_clip_update(clip, norms, jnp.ones(512, bool), 0.5, 0.2, 0.0, k_noise, 512.0), None

    keys = jax.random.split(jax.random.key(3), 600)
    clip, _ = jax.lax.scan(step, jnp.float32(0.05), keys)
    assert abs(float(clip) - np.log(2.0)) < 0.1 * np.log(2.0)  # median of Exp(1)


def test_adaptive_clip_count_noise_std_by_ks():
    norms = jnp.linspace(0.1, 2.0, 40)
    mask = jnp.ones(40, bool)
    clip, lr, noise_std = 1.0, 0.5, 4.0
    keys = jax.random.split(jax.random.key(5), 4000)
    new = jax.jit(jax.vmap(lambda k: adaptive_clip_update(clip, norms, mask, 0.5, lr, noise_std, k, 40.0)))(keys)
    base = adaptive_clip_update(clip, norms, mask, 0.5, lr, 0.0, keys[0], 40.0)
    log_ratio = np.log(np.asarray(new) / float(base))  # = -lr * noise / expected count
    sigma = lr * noise_std / 40
    assert stats.kstest(log_ratio, stats.norm(0, sigma).cdf).pvalue > 1e-3
    assert stats.kstest(log_ratio, stats.norm(0, 1.1 * sigma).cdf).pvalue < 1e-4


@pytest.mark.slow
def test_vmap_over_clients_with_different_strengths_equals_loop():
    clients = 4
    grads = jax.jit(jax.vmap(_grads))(jax.random.split(jax.random.key(9), clients))
    masks = jnp.stack([jnp.arange(BATCH) < n for n in (6, 3, 1, 0)])
    clips = jnp.array([jnp.inf, 1.0, 0.5, 2.0])
    multipliers = jnp.array([0.0, 1.0, 3.0, 0.5])
    denominators = jnp.array([6.0, 3.0, 1.0, 2.0])
    keys = jax.random.split(jax.random.key(10), clients)
    batched = jax.jit(jax.vmap(noisy_clipped_mean))(grads, masks, clips, multipliers, keys, denominators)
    for c in range(clients):
        single = jitted_mean(
            jax.tree_util.tree_map(lambda g: g[c], grads), masks[c], clips[c], multipliers[c], keys[c], denominators[c]
        )
        np.testing.assert_allclose(
            _tree_flat(jax.tree_util.tree_map(lambda g: g[c], batched)), _tree_flat(single), rtol=1e-5, atol=1e-6
        )


def _coupled_model():
    """apply(p, x) = x W + mean over the batch of (x V): a batch of one is x (W + V), but in a batch every example's
    logits read every other example."""
    def apply(p, x):
        flat = x.reshape(x.shape[0], -1)
        return flat @ p["w"] + jnp.mean(flat @ p["v"], axis=0, keepdims=True)

    params = {"w": 0.3 * jax.random.normal(jax.random.key(3), (5, 3)),
              "v": 0.3 * jax.random.normal(jax.random.key(4), (5, 3))}
    return apply, params


def _soft_cross_entropy(logits, targets):
    return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)


def test_local_training_dp_sgd_gradient_is_the_weighted_per_example_form_and_keeps_its_sensitivity():
    """``client.local.dp_sgd_gradient`` (ghost norms, the clipped sum in one weighted backward pass) against
    ``noisy_gradient`` of the per-example gradients: the same noisy mean to float rounding, with padding, soft
    (mixed-up) targets, noise and no clipping. Each example's loss comes from its own forward pass, so even a
    model that couples the examples of a batch (``_coupled_model``) moves the clipped sum by at most the clip norm
    when one example is removed."""
    from fedjaxpriv.client import local
    from fedjaxpriv.client.settings import make_settings

    apply, params = _coupled_model()
    x = 3.0 * jax.random.normal(jax.random.key(5), (BATCH, 5))
    targets = jax.nn.softmax(jax.random.normal(jax.random.key(6), (BATCH, 3)))
    mask = jnp.array([True, True, True, True, False, True])
    step = jax.jit(local.dp_sgd_gradient, static_argnums=(0, 4))
    for clip, multiplier in ((0.5, 0.0), (0.5, 1.3), (jnp.inf, 0.0)):
        row = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), make_settings(
            1, np.array([BATCH]), dp_clip_norm=float(clip), dp_noise_multiplier=multiplier))
        loss, got = step(apply, params, x, targets, _soft_cross_entropy, mask, row, jax.random.key(8), 5.0)
        per_example = local._per_example_grads(apply, params, x, targets, _soft_cross_entropy)
        want = noisy_clipped_mean(per_example, mask, clip, multiplier, jax.random.key(8), 5.0)
        np.testing.assert_allclose(_tree_flat(got), _tree_flat(want), rtol=1e-5, atol=1e-6)
        # the loss each real example has through its own forward pass (the coupled model alone), averaged
        own = [_soft_cross_entropy(apply(params, x[i:i + 1]), targets[i:i + 1])[0] for i in range(BATCH) if mask[i]]
        np.testing.assert_allclose(float(loss), float(np.mean(own)), rtol=1e-6)
    row = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), make_settings(1, np.array([BATCH]), dp_clip_norm=0.5))
    full = _tree_flat(step(apply, params, x, targets, _soft_cross_entropy, mask, row, jax.random.key(0),
                           1.0)[1])
    for k in np.flatnonzero(np.asarray(mask)):
        removed = _tree_flat(step(apply, params, x, targets, _soft_cross_entropy, mask.at[k].set(False), row,
                                  jax.random.key(0), 1.0)[1])
        assert np.linalg.norm(full - removed) <= 0.5 * (1 + 1e-5)


@pytest.mark.parametrize("name, convs, weights_by_ghost", [
    ("mlp", False, 3), ("lenet", False, 1), pytest.param("cnn", True, 4, marks=pytest.mark.slow),
    pytest.param("transformer", False, 5, marks=pytest.mark.slow), pytest.param("lstm", False, 1, marks=pytest.mark.slow)])
def test_ghost_norms_equal_the_norms_of_the_per_example_gradients(name, convs, weights_by_ghost):
    """``ghost.per_example_norms`` against the norms of the [B, params] per-example gradients: dense layers on
    vectors, convolutions run as patches x kernel (the Gram form over output pixels), attention and feed-forward
    products over a sequence, and weights a scan uses (the LSTM's, left to per-example gradients)."""
    from fedjaxpriv.client import dp, ghost, local
    from fedjaxpriv.models import get_model
    from fedjaxpriv.models.tasks import CLASSIFICATION, NEXT_TOKEN
    from fedjaxpriv.parallel import rewrite_model

    if name in ("lstm", "transformer"):
        model = get_model(name, (12,), 20, hidden=(16, 16))
        x = jax.random.randint(jax.random.key(2), (BATCH, 12), 0, 20)
        targets, loss = x, NEXT_TOKEN.training_loss
    else:
        model = get_model(name, (8, 8, 1), 10)
        x = jax.random.uniform(jax.random.key(1), (BATCH, 8, 8, 1))
        targets, loss = jax.nn.one_hot(jnp.arange(BATCH) % 10, 10), CLASSIFICATION.training_loss
    params = model.init(jax.random.key(0))
    apply = rewrite_model(model.apply, convs=convs, dense=False)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    single = jax.make_jaxpr(lambda ls, xi: apply(jax.tree_util.tree_unflatten(treedef, ls), xi[None]))(leaves, x[0])
    assert len(ghost.ghost_products(single.jaxpr, len(leaves))) == weights_by_ghost
    want = dp.per_example_global_norms(local._per_example_grads(apply, params, x, targets, loss))
    got = jax.jit(lambda p: ghost.per_example_norms(apply, p, x, targets, loss))(params)
    np.testing.assert_allclose(got, want, rtol=2e-6)


@pytest.mark.parametrize("positions, inputs, outputs", [(1, 7, 5), (3, 20, 30), (40, 6, 4)])
def test_the_squared_norm_of_one_examples_weight_gradient_by_each_form(positions, inputs, outputs):
    """``||X^T G||_F^2`` by ``||x||^2 ||g||^2`` (one position), the Gram form (3 positions of 20 x 30) and the
    product itself (40 positions of 6 x 4), against NumPy."""
    from fedjaxpriv.client import ghost

    x = np.random.default_rng(0).normal(size=(positions, inputs))
    g = np.random.default_rng(1).normal(size=(positions, outputs))
    want = np.sum((x.T @ g) ** 2)
    np.testing.assert_allclose(float(ghost._square_norm_of_product(jnp.asarray(x), jnp.asarray(g))), want, rtol=1e-5)
