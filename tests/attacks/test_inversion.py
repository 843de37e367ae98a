"""Tests for gradient inversion (DLG, iDLG, Inverting Gradients) on the sigmoid LeNet of DLG.

Setting: 8x8 grayscale handwritten digits (scikit-learn's bundled copy of the UCI digits, pixels scaled to
[0, 1]), batch 1, LeNet initialised by Flax's defaults. The published DLG setting is 32x32 CIFAR; the 8x8
version is the smallest that still shows full recovery and its failure under pruning or noise.
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedjaxpriv.attacks import inversion, metrics
from fedjaxpriv.client.local import LocalSpec, client_update
from fedjaxpriv.client.settings import make_settings
from fedjaxpriv.models import get_model
from fedjaxpriv.transforms.pipeline import message_pipeline

NUM_TARGETS = 4
SHAPE = (8, 8, 1)
# Fixed L-BFGS step 1.0 without line search, as in the original DLG code.
DLG = inversion.InversionConfig(method="dlg", num_iterations=50, learning_rate=1.0, labels="idlg")
SPEC = inversion.TargetSpec(input_shape=SHAPE, num_classes=10, batch_size=1)


@pytest.fixture(scope="module")
def setup():
    digits = load_digits()
    images = (digits.images[:NUM_TARGETS] / 16.0).astype(np.float32)[..., None]
    labels = digits.target[:NUM_TARGETS].astype(np.int32)
    model = get_model("lenet", SHAPE, 10)
    params = model.init(jax.random.key(0))
    make = jax.jit(jax.vmap(lambda x, y: inversion.make_target(SPEC, model.apply, params, x[None], y[None])))
    targets = make(jnp.asarray(images), jnp.asarray(labels))
    keys = jax.random.split(jax.random.key(1), NUM_TARGETS)
    return dict(images=images, labels=labels, model=model, params=params, targets=targets, keys=keys)


def _psnr_per_target(result, images):
    return np.asarray(jax.vmap(metrics.psnr)(result.x[:, 0], jnp.asarray(images)))


@pytest.mark.slow
def test_idlg_recovers_every_batch1_label():
    """iDLG (Zhao et al. 2020): 100% label accuracy for batch 1, for gradients and for FedAvg updates."""
    per_model, num_models = 64, 4
    model = get_model("lenet", SHAPE, 10)
    update_spec = inversion.TargetSpec(input_shape=SHAPE, num_classes=10, batch_size=1, local_steps=2)

    def recover(p, x, y):
        gradient = inversion.make_target(SPEC, model.apply, p, x, y)
        update = inversion.make_target(update_spec, model.apply, p, x, y, local_lr=0.5)
        kernel = inversion.last_layer_kernel(gradient)
        # The rule: the true class's column is <= 0 and every other column >= 0.
        others = jnp.where(jnp.arange(10) == y[0], 0.0, kernel)
        sign_rule = jnp.all(kernel[:, y[0]] <= 0) & jnp.all(others >= 0)
        from_update = inversion.idlg_label(-inversion.last_layer_kernel(update))
        return inversion.idlg_label(kernel), from_update, sign_rule

    recover_all = jax.jit(jax.vmap(recover, in_axes=(None, 0, 0)))
    for seed in range(num_models):  # a fresh model and fresh random images and labels each time
        key_x, key_y, key_p = jax.random.split(jax.random.key(100 + seed), 3)
        images = jax.random.uniform(key_x, (per_model, 1) + SHAPE)
        labels = jax.random.randint(key_y, (per_model, 1), 0, 10)
        from_gradient, from_update, sign_rule = recover_all(model.init(key_p), images, labels)
        assert np.all(sign_rule)
        np.testing.assert_array_equal(from_gradient, labels[:, 0])
        np.testing.assert_array_equal(from_update, labels[:, 0])


@pytest.mark.slow
def test_last_layer_kernel_follows_module_order_in_a_12_layer_mlp():
    """Flax names the 12 Dense layers Dense_0 ... Dense_11; as strings Dense_9 sorts last, not the output layer."""
    model = get_model("mlp", (64,), 10, hidden=(32,) * 11)
    params = model.init(jax.random.key(5))
    last_path, last_leaf = jax.tree_util.tree_flatten_with_path(params)[0][-1]
    assert last_path[0].key == "Dense_9" and last_leaf.shape == (32, 32)  # what plain flattening order gives
    np.testing.assert_array_equal(inversion.last_layer_kernel(params), params["Dense_11"]["kernel"])
    np.testing.assert_array_equal(inversion.last_layer_bias(params), params["Dense_11"]["bias"])
    spec = inversion.TargetSpec(input_shape=(64,), num_classes=10, batch_size=1)
    key_x, key_y = jax.random.split(jax.random.key(6))
    images = jax.random.uniform(key_x, (64, 1, 64))
    labels = jax.random.randint(key_y, (64, 1), 0, 10)
    recover = jax.jit(jax.vmap(lambda x, y: inversion.idlg_label(
        inversion.last_layer_kernel(inversion.make_target(spec, model.apply, params, x, y)))))
    np.testing.assert_array_equal(recover(images, labels), labels[:, 0])  # 100% at batch 1


def test_label_counts_hand_values():
    """n = B (pbar + delta_b / (lr E)); with an unknown scale the present classes' counts sum to B."""
    counts = np.array([2, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    pbar = jnp.full(10, 0.1)
    update = 0.5 * (counts / 4 - pbar)  # delta_b for lr x E = 0.5
    expected = np.repeat(np.arange(10), counts)
    np.testing.assert_array_equal(inversion.label_counts(update, pbar, 4, jnp.float32(0.5)), expected)
    clipped = 0.3 * update
    np.testing.assert_array_equal(inversion.label_counts(clipped, pbar, 4, jnp.float32(0.5), scale_known=False),
                                  expected)
    wrong_scale = inversion.label_counts(clipped, pbar, 4, jnp.float32(0.5), scale_known=True)
    assert not np.array_equal(wrong_scale, expected)


@pytest.mark.slow
def test_batched_line_search_dlg_recovers_logistic_regression_inputs(setup):
    model = get_model("logreg", (64,), 10)
    params = model.init(jax.random.key(7))
    spec = inversion.TargetSpec(input_shape=(64,), num_classes=10, batch_size=1)
    flat = jnp.asarray(setup["images"].reshape(NUM_TARGETS, 1, 64))
    targets = jax.vmap(lambda x, y: inversion.make_target(spec, model.apply, params, x, y[None]))(
        flat, jnp.asarray(setup["labels"]))
    config = inversion.InversionConfig(method="dlg", num_iterations=30, labels="idlg", line_search="batched")
    result = inversion.invert_batch(config, spec, model.apply, params, targets, setup["keys"])
    psnrs = np.asarray(jax.vmap(metrics.psnr)(result.x[:, 0], flat[:, 0]))
    assert np.all(psnrs > 40.0), psnrs
    np.testing.assert_array_equal(result.y[:, 0], setup["labels"])


@pytest.mark.slow
def test_dlg_recovers_batch1_images(setup):
    result = inversion.invert_batch(DLG, SPEC, setup["model"].apply, setup["params"], setup["targets"], setup["keys"])
    psnrs = _psnr_per_target(result, setup["images"])
    assert np.all(psnrs > 30.0), psnrs
    np.testing.assert_array_equal(result.y[:, 0], setup["labels"])
    ssims = jax.vmap(lambda a, b: metrics.ssim(a, b, window_size=7))(result.x[:, 0], jnp.asarray(setup["images"]))
    assert np.all(np.asarray(ssims) > 0.99)


def _through_pipeline(messages, order, seed=0, **strengths):
    """The targets' messages after the library's message pipeline with the given per-client strengths."""
    num = len(jax.tree_util.tree_leaves(messages)[0])
    settings = make_settings(num, np.ones(num), **strengths)
    transform, active = message_pipeline(order, settings)
    assert active == tuple(order)
    rows = jax.tree_util.tree_map(jnp.asarray, settings)
    keys = jax.random.split(jax.random.key(seed), num)
    send = jax.jit(jax.vmap(lambda m, key, row: transform.update(m, transform.init(m), key, row)[0]))
    return send(messages, keys, rows)


def test_dlg_fails_on_top_k_gradient(setup):
    sparse = _through_pipeline(setup["targets"], ("topk",), topk_fraction=0.1)
    kept = np.mean([np.mean(np.asarray(leaf) != 0) for leaf in jax.tree_util.tree_leaves(sparse)])
    assert kept < 0.2
    result = inversion.invert_batch(DLG, SPEC, setup["model"].apply, setup["params"], sparse, setup["keys"])
    psnrs = _psnr_per_target(result, setup["images"])
    assert np.all(psnrs < 15.0), psnrs


def test_dlg_fails_on_noisy_gradient(setup):
    # Local Gaussian noise of std 10 x 0.001 = 0.01 per coordinate (the clip at 10 never acts); the clean
    # gradients' root-mean-square coordinate is about 0.04.
    noisy = _through_pipeline(setup["targets"], ("clip", "noise"), clip_norm=10.0,
                              local_noise_multiplier=0.001)
    noise = jax.tree_util.tree_map(jnp.subtract, noisy, setup["targets"])
    flat = np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(noise)])
    std = np.sqrt(np.mean(flat**2))
    assert 0.009 < std < 0.011
    result = inversion.invert_batch(DLG, SPEC, setup["model"].apply, setup["params"], noisy, setup["keys"])
    psnrs = _psnr_per_target(result, setup["images"])
    assert np.all(psnrs < 15.0), psnrs


@pytest.mark.slow
def test_vmapped_attack_equals_one_target_at_a_time(setup):
    """Default DLG (L-BFGS with the batched line search, soft labels) on logistic regression over flat inputs.

    After a few steps, far from convergence, each result still depends on its own target and key.
    """
    model = get_model("logreg", (64,), 10)
    params = model.init(jax.random.key(4))
    spec = inversion.TargetSpec(input_shape=(64,), num_classes=10, batch_size=1)
    short = inversion.InversionConfig(method="dlg", num_iterations=3, labels="soft")
    flat = jnp.asarray(setup["images"].reshape(NUM_TARGETS, 64))
    targets = jax.vmap(lambda x, y: inversion.make_target(spec, model.apply, params, x[None], y[None]))(
        flat, jnp.asarray(setup["labels"])
    )
    keys = setup["keys"]
    batched = inversion.invert_batch(short, spec, model.apply, params, targets, keys)
    one = jax.jit(lambda target, key: inversion.invert_one(short, spec, model.apply, params, target, key))
    for t in range(NUM_TARGETS):
        single = one(jax.tree_util.tree_map(lambda leaf: leaf[t], targets), keys[t])
        np.testing.assert_allclose(single.x, batched.x[t], atol=1e-5)
        np.testing.assert_allclose(single.loss, batched.loss[t], rtol=1e-4)
        np.testing.assert_array_equal(single.y, batched.y[t])
    assert np.all(np.asarray(batched.loss) > 1e-4)  # not converged: the comparison above is not trivial
    rolled = inversion.invert_batch(short, spec, model.apply, params, targets, jnp.roll(keys, 1, axis=0))
    assert float(jnp.max(jnp.abs(rolled.x - batched.x))) > 0.05


@pytest.mark.slow
def test_inverting_gradients_recovers_fedavg_updates_with_per_target_lr(setup):
    """Geiping et al.'s multi-step setting: the update after 3 local SGD steps, lr differing per client."""
    spec = inversion.TargetSpec(input_shape=SHAPE, num_classes=10, batch_size=1, local_steps=3)
    config = inversion.InversionConfig(
        method="inverting_gradients", num_iterations=200, learning_rate=0.1, tv_weight=1e-6, labels="idlg"
    )
    apply, params = setup["model"].apply, setup["params"]
    local_lrs = jnp.array([0.1, 0.3, 1.0, 3.0])
    updates = jax.vmap(lambda x, y, lr: inversion.make_target(spec, apply, params, x[None], y[None], lr))(
        jnp.asarray(setup["images"]), jnp.asarray(setup["labels"]), local_lrs
    )
    result = inversion.invert_batch(config, spec, apply, params, updates, setup["keys"], local_lr=local_lrs)
    psnrs = _psnr_per_target(result, setup["images"])
    assert np.all(psnrs > 30.0), psnrs
    np.testing.assert_array_equal(result.y[:, 0], setup["labels"])
    assert np.all((np.asarray(result.x) >= 0.0) & (np.asarray(result.x) <= 1.0))


def test_fedavg_update_is_params_difference_of_sgd_steps(setup):
    apply, params = setup["model"].apply, setup["params"]
    spec = inversion.TargetSpec(input_shape=SHAPE, num_classes=10, batch_size=4, local_steps=3, local_batch_size=2)
    x, y = jnp.asarray(setup["images"]), jnp.asarray(setup["labels"])
    update = inversion.make_target(spec, apply, params, x, y, local_lr=0.2)
    gradient = jax.jit(lambda p, xb, yb: inversion.make_target(SPEC, apply, p, xb, yb))
    current = params
    for step in range(3):  # minibatches [0:2], [2:4], [0:2]
        rows = slice((step % 2) * 2, (step % 2) * 2 + 2)
        grads = gradient(current, x[rows], y[rows])
        current = jax.tree_util.tree_map(lambda p, g: p - 0.2 * g, current, grads)
    expected = jax.tree_util.tree_map(jnp.subtract, current, params)
    for got, want in zip(jax.tree_util.tree_leaves(update), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_the_attackers_model_of_local_training_is_the_trainers_own_code_with_momentum(setup):
    """A client whose batch is its whole data trains by full-batch heavy-ball steps, whatever order the sampler
    draws its examples in: the attacker's simulated message (``simulate_message``) equals the message
    ``client_update`` trains, and both equal heavy-ball SGD written from its update rule (v <- m v + g,
    p <- p - lr v)."""
    apply, params = setup["model"].apply, setup["params"]
    x, y = jnp.asarray(setup["images"]), jnp.asarray(setup["labels"])
    steps, lr, momentum, count = 3, 0.3, 0.9, NUM_TARGETS
    spec = inversion.TargetSpec(input_shape=SHAPE, num_classes=10, batch_size=count, local_steps=steps,
                                momentum=momentum)
    simulated = inversion.make_target(spec, apply, params, x, y, local_lr=lr)
    local = LocalSpec(max_steps=steps, max_batch=count, max_count=count, num_classes=10, momentum=momentum)
    row = jax.tree_util.tree_map(lambda column: column[0],
                                 make_settings(1, np.array([count]), local_steps=steps, batch_size=count, lr=lr))
    trained = client_update(local, apply, params, x, y, jnp.int32(0), jnp.int32(count), row,
                            jax.random.key(3)).delta
    full_batch = inversion.TargetSpec(input_shape=SHAPE, num_classes=10, batch_size=count)  # a FedSGD gradient
    gradient = jax.jit(lambda p: inversion.make_target(full_batch, apply, p, x, y))
    current, velocity = params, jax.tree_util.tree_map(jnp.zeros_like, params)
    for _ in range(steps):
        velocity = jax.tree_util.tree_map(lambda v, g: momentum * v + g, velocity, gradient(current))
        current = jax.tree_util.tree_map(lambda p, v: p - lr * v, current, velocity)
    by_hand = jax.tree_util.tree_map(jnp.subtract, current, params)
    for got, client, want in zip(*(jax.tree_util.tree_leaves(t) for t in (simulated, trained, by_hand))):
        np.testing.assert_allclose(got, want, atol=2e-6)
        np.testing.assert_allclose(client, want, atol=2e-6)
    # Momentum changes the message: a plain-SGD model of this client would be wrong.
    plain = inversion.make_target(dataclasses.replace(spec, momentum=0.0), apply, params, x, y, local_lr=lr)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(plain),
                                                              jax.tree_util.tree_leaves(by_hand)))
    assert gap > 1e-3, gap


def test_distances_and_total_variation_hand_values():
    a = {"w": jnp.array([1.0, 0.0]), "b": jnp.array([0.0])}
    b = {"w": jnp.array([0.0, 2.0]), "b": jnp.array([0.0])}
    np.testing.assert_allclose(inversion.l2_distance(a, b), 5.0)
    np.testing.assert_allclose(inversion.cosine_distance(a, b), 1.0)
    np.testing.assert_allclose(inversion.cosine_distance(a, jax.tree_util.tree_map(lambda v: 3 * v, a)), 0.0, atol=1e-7)
    image = jnp.zeros((1, 2, 2, 1)).at[0, 0, 0, 0].set(1.0)  # one bright corner pixel
    np.testing.assert_allclose(inversion.total_variation(image), 0.5 + 0.5)


def test_invalid_configurations_raise(setup):
    with pytest.raises(ValueError, match="local_batch_size"):
        inversion.TargetSpec(input_shape=SHAPE, num_classes=10, batch_size=4, local_batch_size=3)
    with pytest.raises(ValueError, match="method"):
        inversion.InversionConfig(method="magic")
    with pytest.raises(ValueError, match="learning_rate"):
        inversion.InversionConfig(method="inverting_gradients")
    batch2 = inversion.TargetSpec(input_shape=SHAPE, num_classes=10, batch_size=2)
    with pytest.raises(ValueError, match="batch-1"):
        inversion.invert_one(DLG, batch2, setup["model"].apply, setup["params"], None, jax.random.key(0))


def test_save_image_grid_writes_png(setup, tmp_path):
    path = tmp_path / "grid.png"
    originals = setup["images"]
    inversion.save_image_grid(str(path), originals, 1.0 - originals, titles=[f"{i}" for i in range(NUM_TARGETS)])
    picture = matplotlib.image.imread(str(path))
    assert picture.shape[:2] == (340, 160 * NUM_TARGETS)
    assert picture[..., :3].std() > 0.05  # not blank
    with pytest.raises(ValueError, match="equal shapes"):
        inversion.save_image_grid(str(path), originals, originals[:2])
