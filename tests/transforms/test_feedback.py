"""Error feedback: the sent messages add up to the inputs minus the last residual; off when nothing is dropped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv.transforms import chain, clip_update, error_feedback, qsgd, top_k


def _messages(count: int) -> list[dict]:
    keys = jax.random.split(jax.random.key(0), count)
    return [{"w": jax.random.normal(k, (6, 5)), "b": jax.random.normal(jax.random.fold_in(k, 1), (5,))} for k in keys]


@pytest.mark.parametrize("compressor", [top_k(0.1), qsgd(2)], ids=["top_k", "qsgd"])
def test_sent_messages_telescope_to_the_inputs(compressor):
    """sum_t sent_t + e_T = sum_t v_t exactly (up to float32 rounding), for a biased and an unbiased compressor."""
    transform = error_feedback(compressor)
    messages = _messages(12)
    state = transform.init(messages[0])
    update = jax.jit(transform.update)
    sent_total = jax.tree_util.tree_map(jnp.zeros_like, messages[0])
    for t, message in enumerate(messages):
        sent, state, stats = update(message, state, jax.random.key(t), {})
        sent_total = jax.tree_util.tree_map(jnp.add, sent_total, sent)
    residual, _ = state
    for name in ("w", "b"):
        inputs = np.sum([np.asarray(m[name]) for m in messages], axis=0)
        np.testing.assert_allclose(np.asarray(sent_total[name] + residual[name]), inputs, atol=1e-5)
    norm = np.sqrt(sum(float(np.sum(np.square(np.asarray(v)))) for v in residual.values()))
    assert float(stats["error_feedback/residual_norm"]) == pytest.approx(norm, rel=1e-5)
    assert norm > 0.1  # the compressor did drop something


def test_top_k_with_feedback_sends_a_dropped_coordinate_later():
    """A coordinate top-k never picks on its own gets sent once its residual has grown."""
    transform = error_feedback(top_k(0.5))
    message = {"v": jnp.array([1.0, 0.3])}  # top-k keeps 1 of 2: always the first without feedback
    state = transform.init(message)
    sent_second = []
    for t in range(6):
        sent, state, _ = transform.update(message, state, jax.random.key(t), {})
        sent_second.append(float(sent["v"][1]))
    assert sent_second[:3] == [0.0, 0.0, 0.0] and max(sent_second) == pytest.approx(1.2, abs=1e-6)


@pytest.mark.slow
def test_feedback_is_a_pass_through_when_nothing_is_dropped():
    transform = error_feedback(chain(top_k("f"), clip_update(100.0)))
    message = _messages(1)[0]
    sent, (residual, _), stats = transform.update(message, transform.init(message), jax.random.key(0), {"f": 1.0})
    for a, b in zip(jax.tree_util.tree_leaves(sent), jax.tree_util.tree_leaves(message)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(float(jnp.max(jnp.abs(r))) == 0.0 for r in jax.tree_util.tree_leaves(residual))
    assert int(stats["bits"]) == 35 * 32


def test_feedback_rejects_what_is_not_a_transform():
    with pytest.raises(ValueError, match="MessageTransform"):
        error_feedback(lambda m: m)
