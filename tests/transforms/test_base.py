"""Tests for chain: key folding, bit propagation across stages, stat merging, settings lookup."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv.transforms import Wire, add_local_noise, chain, clip_update, identity, prune_message, qsgd, top_k

MESSAGE = {"kernel": jax.random.normal(jax.random.key(0), (8, 16)), "bias": jnp.linspace(-1.0, 1.0, 4)}
N = 132


def _flat(tree):
    return np.concatenate([np.asarray(leaf).ravel() for leaf in jax.tree_util.tree_leaves(tree)])


def test_chain_equals_stages_applied_by_hand_with_folded_keys():
    stages = (top_k("f"), qsgd("s"), clip_update("c"))
    settings = {"f": 0.25, "s": 4, "c": 0.7}
    key = jax.random.key(9)
    out, state, stats = jax.jit(chain(*stages).update)(MESSAGE, chain(*stages).init(MESSAGE), key, settings)
    manual, wire = MESSAGE, None
    for i, stage in enumerate(stages):
        manual, _, stage_stats = jax.jit(stage.update)(manual, (), jax.random.fold_in(key, i), settings, wire)
        wire = Wire.from_stats(stage_stats)
    np.testing.assert_array_equal(_flat(out), _flat(manual))
    assert state == ((), (), ())
    # top-k keeps 32 + 1; qsgd with 4 levels -> 1 + 3 bits each; index bits 32*7 + 1*2; two norms.
    assert int(stats["bits"]) == 33 * 4 + (32 * 7 + 1 * 2) + 2 * 32
    assert set(stats) >= {"top_k/sq_error", "qsgd/sq_error", "clip/norm", "clip/clipped"}


@pytest.mark.slow
def test_noise_after_compression_makes_the_message_dense_again():
    transform = chain(prune_message(sparsity="p"), qsgd("s"), clip_update("c"), add_local_noise("z", "c"))
    settings = {"p": 0.5, "s": 2, "c": 1.0, "z": 1.0}
    _, _, stats = transform.update(MESSAGE, transform.init(MESSAGE), jax.random.key(0), settings)
    assert int(stats["bits"]) == N * 32
    _, _, quiet = transform.update(MESSAGE, transform.init(MESSAGE), jax.random.key(0), {**settings, "z": 0.0})
    # 64 kernel entries kept with 7-bit indices, 4 biases dense; 3 bits per value; two norms.
    assert int(quiet["bits"]) == 68 * 3 + 64 * 7 + 2 * 32


def test_repeated_stage_stats_get_suffixes_and_identity_is_dense():
    _, _, stats = chain(clip_update(1.0), clip_update(0.5)).update(MESSAGE, ((), ()), jax.random.key(0), {})
    np.testing.assert_allclose(float(stats["clip/norm@1"]), 1.0, rtol=1e-5)
    out, _, stats = identity().update(MESSAGE, (), jax.random.key(0), {})
    assert int(stats["bits"]) == N * 32
    np.testing.assert_array_equal(_flat(out), _flat(MESSAGE))


def test_settings_may_be_a_dataclass_and_missing_fields_raise():
    @dataclasses.dataclass(frozen=True)
    class Row:
        clip_norm: float

    out, _, _ = clip_update().update(MESSAGE, (), jax.random.key(0), Row(clip_norm=0.1))
    np.testing.assert_allclose(np.linalg.norm(_flat(out)), 0.1, rtol=1e-5)
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update().update(MESSAGE, (), jax.random.key(0), {"other": 1.0})
    with pytest.raises(ValueError, match="MessageTransform"):
        chain(clip_update(), lambda x: x)


def test_chain_compiles_once_across_clients_with_different_settings():
    transform = chain(top_k("f"), qsgd("s"), clip_update("c"))
    traces = []

    @jax.jit
    def run(settings, key):
        traces.append(1)
        return transform.update(MESSAGE, transform.init(MESSAGE), key, settings)[2]["bits"]

    bits = [int(run({"f": jnp.float32(f), "s": jnp.int32(s), "c": jnp.float32(1.0)}, jax.random.key(0))) for f, s in ((0.1, 1), (0.5, 8), (1.0, 0))]
    assert len(traces) == 1
    assert bits[2] == N * 32 and bits[0] < bits[1] < bits[2]


def test_a_strength_may_be_a_function_of_the_settings_and_equals_the_name_or_constant_it_computes():
    """A function strength is read per client like a name (one compilation over clients) and gives exactly the
    message of the constant it evaluates to; a strength of another type is refused, naming it."""
    from fedjaxpriv.client.settings import make_settings

    settings = make_settings(2, np.array([10, 10]), clip_norm=[0.5, 2.0])
    row = jax.tree_util.tree_map(lambda a: a[0], settings)
    derived = clip_update(lambda s: 0.5 * s.clip_norm)  # typed, and derived from another strength
    out, _, _ = derived.update(MESSAGE, (), jax.random.key(0), row)
    by_constant, _, _ = clip_update(0.25).update(MESSAGE, (), jax.random.key(0), row)
    np.testing.assert_array_equal(_flat(out), _flat(by_constant))
    by_name, _, _ = clip_update("clip_norm").update(MESSAGE, (), jax.random.key(0), row)
    same, _, _ = clip_update(lambda s: s.clip_norm).update(MESSAGE, (), jax.random.key(0), row)
    np.testing.assert_array_equal(_flat(same), _flat(by_name))
    norms = jax.vmap(lambda r: jnp.linalg.norm(jnp.concatenate(
        [leaf.ravel() for leaf in jax.tree_util.tree_leaves(derived.update(MESSAGE, (), jax.random.key(0), r)[0])])))(
        settings)
    np.testing.assert_allclose(np.asarray(norms), [0.25, 1.0], rtol=1e-5)  # each client its own strength
    with pytest.raises(ValueError, match=r"clip_norm=\[1.0\] must be a settings field name \(str\), a function"):
        clip_update([1.0])
