"""Model zoo: published parameter counts, pure init/apply, and that every model can fit a small batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjaxpriv.models import MODEL_NAMES, NEXT_TOKEN, READS_TOKENS, TOKEN_MODELS, accuracy, count_params, cross_entropy, get_model


def test_mcmahan_cnn_has_the_published_parameter_count():
    # McMahan et al. 2017: the MNIST CNN has 1,663,370 parameters.
    model = get_model("cnn", (28, 28, 1), 10)
    assert count_params(model.init(jax.random.key(0))) == 1_663_370


def test_mlp_and_logreg_counts_are_exact():
    assert count_params(get_model("logreg", (8, 8, 1), 10).init(jax.random.key(0))) == 64 * 10 + 10
    mlp = get_model("mlp", (8, 8, 1), 10, hidden=(32, 16)).init(jax.random.key(0))
    assert count_params(mlp) == (64 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)


def test_init_is_a_pure_function_of_the_key():
    model = get_model("lenet", (16, 16, 1), 10)
    a, b = model.init(jax.random.key(3)), model.init(jax.random.key(3))
    c = model.init(jax.random.key(4))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(c)))


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in MODEL_NAMES if m not in READS_TOKENS])
def test_every_model_fits_a_small_batch(name):
    model = get_model(name, (8, 8, 1), 4)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((12, 8, 8, 1), np.float32))
    y = jnp.asarray(np.arange(12) % 4)
    params = model.init(jax.random.key(0))
    opt = optax.adam(0.01)
    state = opt.init(params)
    loss_fn = lambda p: cross_entropy(model.apply(p, x), y)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    initial = float(loss_fn(params))

    def fitted(params):
        return float(loss_fn(params)) < 0.5 * initial and float(accuracy(model.apply(params, x), y)) == 1.0

    # Up to 150 Adam steps, checked every 10 (each model here fits within 10-20; XLA level 0 makes steps slow).
    for _ in range(15):
        if fitted(params):
            break
        for _ in range(10):
            params, state = step(params, state)
    assert fitted(params)


@pytest.mark.slow
@pytest.mark.parametrize("name", TOKEN_MODELS)
def test_every_token_model_fits_a_next_token_rule(name):
    """Each next token is the current one plus 3 (mod 8): both token models get every position right."""
    model = get_model(name, (6,), 8, hidden=(32,))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 8, (12, 6)), jnp.int32)
    targets = (tokens + 3) % 8
    params = model.init(jax.random.key(0))
    opt = optax.adam(0.02)
    state = opt.init(params)
    loss_fn = lambda p: jnp.mean(NEXT_TOKEN.loss(model.apply(p, tokens), targets))  # noqa: E731

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(loss_fn)(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(300):
        params, state = step(params, state)
    assert float(jnp.mean(NEXT_TOKEN.metrics(model.apply(params, tokens), targets)["accuracy"])) == 1.0


@pytest.mark.slow
def test_the_token_classifier_reads_the_state_after_the_last_real_token_and_fits_a_rule():
    """The class is whether token 5 occurs in the text; texts have 1-6 tokens and padding after: the logits do not
    depend on the padding, and the classifier gets every text right."""
    model = get_model("lstm_classifier", (8,), 2, vocabulary=7, hidden=(16,))
    rng = np.random.default_rng(0)
    tokens = np.zeros((24, 8), np.int32)
    for row, length in enumerate(rng.integers(1, 7, 24)):
        tokens[row, :length] = rng.integers(2, 7, length)
    labels = jnp.asarray((tokens == 5).any(-1).astype(np.int32))
    params = model.init(jax.random.key(0))
    truncated = jnp.asarray(tokens[:, :7])  # one padding position fewer: the same state after the last token
    short = tokens[:, 7] == 0
    np.testing.assert_allclose(model.apply(params, jnp.asarray(tokens))[short],
                               get_model("lstm_classifier", (7,), 2, vocabulary=7, hidden=(16,)).apply(
                                   params, truncated)[short], rtol=1e-5, atol=1e-6)
    opt = optax.adam(0.03)
    state = opt.init(params)
    loss_fn = lambda p: cross_entropy(model.apply(p, jnp.asarray(tokens)), labels)  # noqa: E731

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(loss_fn)(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(200):
        params, state = step(params, state)
    assert float(accuracy(model.apply(params, jnp.asarray(tokens)), labels)) == 1.0


def test_bad_model_arguments_are_named():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        get_model("vgg", (8, 8, 1), 10)
    with pytest.raises(ValueError, match="needs image inputs"):
        get_model("cnn", (64,), 10)
    with pytest.raises(ValueError, match="num_classes=1"):
        get_model("mlp", (8,), 1)


def test_reshape_max_pool_equals_flax_max_pool_in_value_and_gradient():
    import flax.linen as nn

    from fedjaxpriv.models.core import max_pool_2x2

    x = jax.random.normal(jax.random.key(0), (3, 14, 15, 5))  # odd width: the last column is dropped (VALID)
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
    weights = jax.random.normal(jax.random.key(1), (3, 7, 7, 5))
    grad_ours = jax.grad(lambda v: jnp.sum(weights * max_pool_2x2(v)))(x)
    grad_flax = jax.grad(lambda v: jnp.sum(weights * nn.max_pool(v, (2, 2), strides=(2, 2))))(x)
    np.testing.assert_array_equal(grad_ours, grad_flax)  # continuous inputs: no ties
