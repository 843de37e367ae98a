"""Tests for message clipping and local Gaussian noise: norm bound, sensitivity, KS noise scale, vmap."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from fedjaxpriv.transforms import add_local_noise, chain, clip_update


def _flat(tree):
    return np.concatenate([np.asarray(leaf).ravel() for leaf in jax.tree_util.tree_leaves(tree)])


def _message(seed, scale=1.0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"kernel": scale * jax.random.normal(k1, (20, 10)), "bias": scale * jax.random.normal(k2, (10,))}


def test_clip_update_bounds_norm_keeps_direction_and_inf_is_off():
    message = _message(0, scale=2.0)
    norm = np.linalg.norm(_flat(message))
    for clip in (1.0, 10.0, norm * 2):
        out, _, stats_ = clip_update("c").update(message, (), jax.random.key(0), {"c": clip})
        flat = _flat(out)
        np.testing.assert_allclose(np.linalg.norm(flat), min(norm, clip), rtol=1e-5)
        np.testing.assert_allclose(flat / np.linalg.norm(flat), _flat(message) / norm, rtol=1e-4, atol=1e-6)
        assert float(stats_["clip/clipped"]) == float(norm > clip)
        assert int(stats_["bits"]) == 210 * 32
    out, _, _ = clip_update("c").update(message, (), jax.random.key(0), {"c": jnp.inf})
    np.testing.assert_array_equal(_flat(out), _flat(message))


def test_clipped_updates_of_neighbouring_clients_differ_by_at_most_twice_clip():
    clip = 0.5
    transform = jax.jit(clip_update(clip).update)
    sums = []
    for replaced in (False, True):
        total = 0.0
        for client in range(5):
            seed = 100 + client if (replaced and client == 2) else client
            out, _, _ = transform(_message(seed, scale=float(1 + 30 * (seed >= 100))), (), jax.random.key(0), {})
            total = total + _flat(out)
        sums.append(total)
    assert np.linalg.norm(sums[0] - sums[1]) <= 2 * clip * (1 + 1e-5)
    # Dropping a client moves the sum by at most clip.
    out, _, _ = transform(_message(2), (), jax.random.key(0), {})
    assert np.linalg.norm(_flat(out)) <= clip * (1 + 1e-6)


def test_local_noise_std_by_ks_and_wrong_scale_rejected():
    zeros = {"kernel": jnp.zeros((200, 100)), "bias": jnp.zeros((100,))}
    settings = {"z": 0.8, "c": 2.5}
    out, _, stats_ = add_local_noise("z", "c").update(zeros, (), jax.random.key(3), settings)
    noise = _flat(out)
    sigma = 0.8 * 2.5
    assert stats.kstest(noise, stats.norm(0, sigma).cdf).pvalue > 1e-3
    assert stats.kstest(noise, stats.norm(0, 1.1 * sigma).cdf).pvalue < 1e-6
    assert stats.kstest(noise, stats.norm(0, sigma / 1.1).cdf).pvalue < 1e-6
    np.testing.assert_allclose(float(stats_["local_noise/std"]), sigma, rtol=1e-6)
    # Leaves get independent noise (different keys): correlation within 5 sigma of 0.
    corr = np.corrcoef(noise[:100], np.asarray(out["kernel"])[0])[0, 1]
    assert abs(corr) < 5 / np.sqrt(100)
    message = _message(1)
    same, _, off_stats = add_local_noise("z", "c").update(message, (), jax.random.key(3), {"z": 0.0, "c": 1.0})
    np.testing.assert_array_equal(_flat(same), _flat(message))
    assert int(off_stats["local_noise/std"]) == 0


def test_clip_then_noise_vmapped_over_clients_equals_loop():
    transform = chain(clip_update("clip_norm"), add_local_noise("noise_multiplier", "clip_norm"))
    clients = 4
    scales = np.arange(1, clients + 1, dtype=np.float32)
    messages = jax.tree_util.tree_map(lambda m: jnp.asarray(scales.reshape((-1,) + (1,) * m.ndim) * np.asarray(m)), _message(0))
    settings = {"clip_norm": jnp.array([jnp.inf, 1.0, 5.0, 0.1]), "noise_multiplier": jnp.array([0.0, 0.0, 1.0, 2.0])}
    keys = jax.random.split(jax.random.key(4), clients)
    state = transform.init(_message(0))
    out, _, stats_ = jax.jit(jax.vmap(transform.update, in_axes=(0, None, 0, 0)))(messages, state, keys, settings)
    update = jax.jit(transform.update)
    for c in range(clients):
        single, _, single_stats = update(
            jax.tree_util.tree_map(lambda m: m[c], messages), state, keys[c], jax.tree_util.tree_map(lambda s: s[c], settings)
        )
        np.testing.assert_allclose(_flat(jax.tree_util.tree_map(lambda m: m[c], out)), _flat(single), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(stats_["clip/norm"][c]), float(single_stats["clip/norm"]), rtol=1e-6)
