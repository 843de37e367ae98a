"""Text for next-token prediction: vocabulary from training text only, windows with padding and out-of-vocabulary
targets masked, the next-token metrics pooled per real token, the token models, and the keyboard corpus's rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv.data import text
from fedjaxpriv.evaluation import evaluate
from fedjaxpriv.models import NEXT_TOKEN, get_model


def test_the_vocabulary_comes_from_training_text_only_by_frequency_then_token():
    vocabulary = text.build_vocabulary(["b a b c", "c b"], "word", max_size=4)
    assert vocabulary.tokens == ("<pad>", "<oov>", "b", "c")  # b x3, then c x2 before a x1; a did not fit
    assert vocabulary.encode("a b zebra c").tolist() == [text.OOV, 2, text.OOV, 3]
    assert text.split_tokens("Don't stop, Go!", "word") == ["don't", "stop", ",", "go", "!"]
    assert text.build_vocabulary(["aab"], "char", 10).tokens == ("<pad>", "<oov>", "a", "b")
    with pytest.raises(ValueError, match="level='byte' is not allowed"):
        text.split_tokens("x", "byte")


def test_windows_shift_by_one_and_mask_padding_and_out_of_vocabulary_targets():
    ids = np.array([5, 6, text.OOV, 7, 8, 9, 4])
    x, y = text.sequences(ids, length=3)
    m = text.MASKED
    assert x.tolist() == [[5, 6, text.OOV], [7, 8, 9]]
    assert y.tolist() == [[6, m, 7], [8, 9, 4]]
    x, y = text.sequences(ids[:5], length=3)  # 4 targets: the second window holds one
    assert x.tolist() == [[5, 6, text.OOV], [7, text.PAD, text.PAD]] and y.tolist() == [[6, m, 7], [8, m, m]]
    assert text.sequences(ids[:1], 3)[0].shape == (0, 3)


def test_next_token_figures_are_pooled_over_real_tokens_as_an_independent_computation_gives():
    rng = np.random.default_rng(0)
    vocab, length = 7, 5
    logits = rng.normal(size=(4, length, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, (4, length)).astype(np.int32)
    targets[0, 3:] = text.MASKED  # padding, out of vocabulary
    targets[2, 1] = text.MASKED
    targets[3, :] = text.MASKED  # a sequence with no real token counts for nothing
    figures = evaluate(lambda params, x: params[x[:, 0]], jnp.asarray(logits),
                       np.arange(4)[:, None].repeat(length, 1), targets, task=NEXT_TOKEN)
    real = targets >= 0
    flat_logits, flat_targets = logits[real], targets[real]
    log_probs = flat_logits - np.log(np.exp(flat_logits).sum(-1, keepdims=True))
    nll = -log_probs[np.arange(len(flat_targets)), flat_targets]
    order = np.argsort(-flat_logits, axis=-1, kind="stable")
    assert figures["tokens"] == real.sum() == 12
    np.testing.assert_allclose(figures["loss"], nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(figures["perplexity"], np.exp(nll.mean()), rtol=1e-5)
    np.testing.assert_allclose(figures["accuracy"], np.mean(order[:, 0] == flat_targets), rtol=1e-6)
    np.testing.assert_allclose(figures["top3_accuracy"], np.mean((order[:, :3] == flat_targets[:, None]).any(-1)),
                               rtol=1e-6)


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_token_models_are_causal_and_give_a_distribution_over_the_vocabulary_per_position(name):
    model = get_model(name, (12,), 20, hidden=(16, 16))
    params = model.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, 20)
    changed = tokens.at[:, 7:].set((tokens[:, 7:] + 5) % 20)
    logits, after = model.apply(params, tokens), model.apply(params, changed)
    assert logits.shape == (3, 12, 20)
    np.testing.assert_array_equal(logits[:, :7], after[:, :7])  # position t sees tokens 0..t only
    assert float(jnp.max(jnp.abs(logits[:, 7:] - after[:, 7:]))) > 1e-3
    with pytest.raises(ValueError, match="needs token sequences"):
        get_model(name, (8, 8, 1), 20)


def test_keyboard_corpus_follows_its_rule_at_its_rate_and_splits_each_user():
    train, test, rule = text.keyboard_corpus(3, num_clients=40, mean_words=250, follow=0.7)
    index = {w: i for i, w in enumerate(rule.words)}
    pairs = [(index[a], index[b]) for typed in train for a, b in zip(typed.split(), typed.split()[1:])]
    followed = np.mean([rule.successor[a] == b for a, b in pairs])
    expected = rule.best_accuracy()  # follow, plus a uniform draw that lands on the successor
    assert abs(followed - expected) < 4 * np.sqrt(expected * (1 - expected) / len(pairs))
    assert len(train) == len(test) == 40
    for a, b in zip(train, test):  # per user: the last fifth of its words is its test text
        assert abs(len(b.split()) / (len(a.split()) + len(b.split())) - 0.2) < 0.05
