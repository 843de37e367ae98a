"""A user's own model and loss: Flax modules and (init, apply) pairs, multi-label and next-token tasks, plans
chosen from the model's structure, clear errors before training, and what the run directory records."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from fedjaxpriv import evaluation, parallel
from fedjaxpriv.client.local import LocalSpec
from fedjaxpriv.config import from_dict
from fedjaxpriv.data import Dataset, FederatedData
from fedjaxpriv.experiment import Experiment
from fedjaxpriv.models import MULTI_LABEL, NEXT_TOKEN, as_model, get_model, tasks

# 4 clients of the 8x8 digits, 2 rounds of 2 local steps: a few seconds per experiment.
SMALL = {"data": {"num_clients": 4}, "server": {"clients_per_round": 2},
         "client": {"local_steps": 2, "batch_size": 8, "lr": 0.1}, "run": {"rounds": 2, "eval_every": 1}}


def _config(**sections):
    raw = {k: dict(v) for k, v in SMALL.items()}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw)


class UserLeNet(nn.Module):
    """A user's convnet, written independently with the built-in "lenet" architecture."""

    @nn.compact
    def __call__(self, x):
        for stride in (2, 2, 1):
            x = nn.sigmoid(nn.Conv(12, (5, 5), strides=(stride, stride), padding=2)(x))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class UserMcMahanCNN(nn.Module):
    """The McMahan et al. CNN as a user would write it (``nn.max_pool``)."""

    @nn.compact
    def __call__(self, x):
        for features in (32, 64):
            x = nn.max_pool(nn.relu(nn.Conv(features, (5, 5), padding="SAME")(x)), (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(512)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(x)


def _name_rule(name, backend, max_steps, input_shape, batch):
    """The execution choices made from the model's registry name before plans read its structure."""
    conv = name in ("cnn", "lenet", "resnet")
    if backend != "cpu" or not conv:
        strategy = "vmap"
    elif max_steps <= 16 and min(input_shape[:-1]) >= 16:
        strategy = "host"
    else:
        strategy = "loop"
    return (strategy, backend == "cpu" and conv and strategy != "host",
            backend == "cpu" and not conv and batch <= 32)


def _structure(apply_fn, params, shape, batch=16):
    return parallel.model_structure(apply_fn, params, jax.ShapeDtypeStruct((batch, *shape), jnp.float32))


@pytest.mark.parametrize("name,shape", [("logreg", (64,)), ("mlp", (8, 8, 1)), ("cnn", (8, 8, 1)),
                                        ("cnn", (28, 28, 1)), ("lenet", (8, 8, 1)), ("lenet", (28, 28, 1)),
                                        ("resnet", (32, 32, 3)), ("resnet", (8, 8, 3))])
def test_builtin_models_get_the_plans_their_names_gave(name, shape):
    model = get_model(name, shape, 10)
    params = jax.eval_shape(model.init, jax.random.key(0))
    structure = _structure(model.apply, params, shape)
    assert structure.num_params == sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))
    for backend in ("cpu", "gpu"):
        for steps in (1, 5, 16, 17):
            for batch in (16, 32, 33):
                strategy = parallel.auto_strategy(structure, backend, max_steps=steps)
                got = (strategy, parallel.auto_conv_as_matmul(structure, backend, strategy=strategy),
                       parallel.auto_outer_product_grads(structure, batch, backend))
                assert got == _name_rule(name, backend, steps, shape, batch), (backend, steps, batch)
    plan = parallel.plan(model.apply, params, jnp.zeros((16, *shape)), max_steps=5, max_batch=16, num_clients=40,
                         backend="cpu")
    strategy, as_matmul, outer = _name_rule(name, "cpu", 5, shape, 16)
    assert plan == parallel.Plan(strategy=strategy, chunk_size=parallel.auto_chunk_size(40, structure.num_params,
                                                                                        "cpu"),
                                 unroll=5 if strategy == "host" else 1, conv_as_matmul=as_matmul,
                                 outer_product_grads=outer, structure=structure)


def test_a_user_mcmahan_cnn_gets_the_builtin_cnn_plan():
    """Structure, not name: the user's CNN (other pooling, other class) is planned like the built-in one."""
    for shape, expected in (((28, 28, 1), "host"), ((8, 8, 1), "loop")):
        builtin = get_model("cnn", shape, 10)
        user = as_model(UserMcMahanCNN(), shape)
        plans = [parallel.plan(m.apply, jax.eval_shape(m.init, jax.random.key(0)), jnp.zeros((16, *shape)),
                               max_steps=5, max_batch=16, num_clients=100, backend="cpu") for m in (builtin, user)]
        assert plans[0].strategy == expected and plans[0] == plans[1]
        assert plans[1].structure.num_params == (1_663_370 if shape[0] == 28 else 188_810)
    assert user.name == "user-supplied UserMcMahanCNN" and user.num_classes == 10


@pytest.mark.slow
def test_user_flax_convnet_trains_exactly_like_the_builtin_one(tmp_path):
    config = _config(model={"name": "lenet"})
    builtin = Experiment(config)
    user = Experiment(config, model=UserLeNet())
    assert user.plan == builtin.plan and builtin.plan.strategy == "loop" and builtin.plan.conv_as_matmul
    assert user.spec == builtin.spec
    ours = builtin.run(progress=False)
    theirs = user.run(str(tmp_path / "user"), progress=False)
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), ours.params, builtin.initial_params)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3  # training moved the model
    assert jax.tree_util.tree_structure(theirs.params) == jax.tree_util.tree_structure(ours.params)
    for a, b in zip(jax.tree_util.tree_leaves(theirs.params), jax.tree_util.tree_leaves(ours.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(theirs.history, ours.history):
        assert (a["train_loss"], a["test_loss"], a["test_accuracy"]) == (b["train_loss"], b["test_loss"],
                                                                         b["test_accuracy"])
    saved = json.load(open(tmp_path / "user" / "config.json"))["config"]
    assert saved["model"]["name"] == "user-supplied UserLeNet" == user.config.model.name
    assert builtin.config.model.name == "lenet"


def test_mlp_widths_set_beside_another_model_are_named_and_not_recorded():
    """model.hidden sets the built-in MLP's widths only: beside a model passed in (or another built-in) a
    non-default value is a warning naming it, and the run records the default, so that the hash does not depend
    on a value that did not run; the default is no warning."""
    from fedjaxpriv.config import ModelConfig

    with pytest.warns(UserWarning, match=r"model\.hidden=\[32\] is not used.*'user-supplied UserLeNet'"):
        user = Experiment(_config(model={"name": "mlp", "hidden": [32]}), model=UserLeNet())
    plain = Experiment(_config(model={"name": "mlp"}), model=UserLeNet())
    assert user.config.model.hidden == ModelConfig().hidden == plain.config.model.hidden
    assert user.config.config_hash() == plain.config.config_hash()
    with pytest.warns(UserWarning, match=r"model\.hidden=\[32\] is not used.*'lenet'"):
        Experiment(_config(model={"name": "lenet", "hidden": [32]}))
    mlp = Experiment(_config(model={"name": "mlp", "hidden": [32]}))  # used: kept, no warning
    assert mlp.config.model.hidden == (32,)


@pytest.mark.slow
def test_user_init_apply_pair_reproduces_the_builtin_logistic_regression():
    """A pure-JAX pair (its own parameter tree and matmul) started from the built-in's initial weights trains to
    the built-in's weights."""
    config = _config(model={"name": "logreg"})
    reference = get_model("logreg", (8, 8, 1), 10)

    def init(key):
        dense = reference.init(key)["Dense_0"]
        return {"w": dense["kernel"], "b": dense["bias"]}

    def apply(params, x):
        return x.reshape((x.shape[0], -1)) @ params["w"] + params["b"]

    builtin, user = Experiment(config), Experiment(config, model=(init, apply))
    assert user.plan == builtin.plan and user.plan.outer_product_grads  # a dense model, read from its jaxpr
    assert user.config.model.name.startswith("user-supplied") and "apply" in user.config.model.name
    ours, theirs = builtin.run(progress=False), user.run(progress=False)
    np.testing.assert_allclose(theirs.params["w"], ours.params["Dense_0"]["kernel"], atol=1e-6)
    np.testing.assert_allclose(theirs.params["b"], ours.params["Dense_0"]["bias"], atol=1e-6)
    assert theirs.final("test_accuracy") == pytest.approx(ours.final("test_accuracy"), abs=1e-6)
    assert float(np.max(np.abs(ours.params["Dense_0"]["bias"]))) > 1e-3


def _multi_label_data(seed=0, clients=4, per_client=48, dim=8, labels=4):
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(dim, labels))

    def draw(n):
        x = rng.normal(size=(n, dim)).astype(np.float32)
        return x, (x @ weights + 0.3 * rng.normal(size=(n, labels)) > 0).astype(np.int32)

    x, y = draw(clients * per_client)
    counts = np.full(clients, per_client, np.int32)
    population = FederatedData(x, y, (np.arange(clients) * per_client).astype(np.int32), counts,
                               np.zeros(0, np.int32))
    return population, Dataset(*draw(400))


@pytest.mark.slow
def test_multi_label_task_trains_and_reports_its_metrics():
    population, test = _multi_label_data()
    config = _config(model={"name": "mlp", "hidden": [16]}, client={"local_steps": 5, "lr": 0.5},
                     server={"clients_per_round": 4}, run={"rounds": 6, "eval_every": 6})
    experiment = Experiment(config, population=population, test=test, num_classes=4, loss=MULTI_LABEL)
    assert experiment.config.model.name == "mlp; loss: multi_label"
    before = experiment.evaluate(experiment.initial_params)
    results = experiment.run(progress=False)
    after = results.history[-1]
    assert {"test_loss", "test_label_accuracy", "test_exact_match", "client_label_accuracy_mean"} <= set(after)
    # The best constant predictor (each label's base rate) is what a model ignoring x achieves.
    rate = test.y.mean(axis=0)
    constant_loss = float(np.mean(-(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))))
    assert before["test_loss"] > constant_loss - 0.05
    assert after["test_loss"] < constant_loss - 0.15 and after["test_loss"] < before["test_loss"] - 0.15
    assert after["test_label_accuracy"] > float(np.mean(np.maximum(rate, 1 - rate))) + 0.1
    # The reported metrics equal a NumPy computation from the model's logits.
    logits = np.asarray(experiment.model.apply(results.params, test.x))
    predicted = logits > 0
    assert after["test_label_accuracy"] == pytest.approx(np.mean(predicted == (test.y > 0)), abs=1e-6)
    assert after["test_exact_match"] == pytest.approx(np.mean(np.all(predicted == (test.y > 0), axis=1)), abs=1e-6)
    bce = np.logaddexp(0, logits) - logits * test.y
    assert after["test_loss"] == pytest.approx(float(np.mean(bce)), rel=1e-5)


class TinyTokenModel(nn.Module):
    vocab: int = 7

    @nn.compact
    def __call__(self, tokens):
        return nn.Dense(self.vocab)(nn.Embed(self.vocab, 8)(tokens))


@pytest.mark.slow
def test_next_token_task_with_a_user_model_and_padding():
    """Each next token is the current one plus 1 (mod 7); the targets' last position is padding (-1)."""
    vocab, length, clients, per_client = 7, 6, 4, 16
    rng = np.random.default_rng(1)

    def draw(n):
        x = rng.integers(0, vocab, (n, length)).astype(np.int32)
        y = (x + 1) % vocab
        y[:, -1] = -1
        return x, y

    x, y = draw(clients * per_client)
    population = FederatedData(x, y, (np.arange(clients) * per_client).astype(np.int32),
                               np.full(clients, per_client, np.int32), np.zeros(0, np.int32))
    config = _config(client={"local_steps": 5, "lr": 1.0}, server={"clients_per_round": 4},
                     run={"rounds": 3, "eval_every": 3})
    experiment = Experiment(config, population=population, test=Dataset(*draw(64)), num_classes=vocab,
                            model=TinyTokenModel(), loss=NEXT_TOKEN)
    assert experiment.plan.strategy == "vmap" and not experiment.plan.outer_product_grads  # 3-D dense only
    assert experiment.config.model.name == "user-supplied TinyTokenModel; loss: next_token"
    record = experiment.run(progress=False).history[-1]
    assert record["test_loss"] < math.log(vocab) - 0.5 and record["test_accuracy"] > 0.5
    assert "client_accuracy_mean" in record
    logits = jnp.zeros((2, 3, vocab)).at[:, :, 2].set(5.0)
    tokens = jnp.array([[2, 2, -1], [1, 2, -1]])
    np.testing.assert_allclose(tasks.NEXT_TOKEN.metrics(logits, tokens)["accuracy"], [1.0, 0.5])


@pytest.mark.slow
def test_a_bare_loss_function_on_class_labels_trains_and_keeps_accuracy():
    """A user's per-example loss on integer labels with [B, K] logits: the run reports its loss and, since the
    targets are class labels, classification's accuracy (equal to an independent argmax count), and the saved
    config says so."""
    def hinge(logits, labels):  # the multi-class (Crammer-Singer) hinge loss, [B]
        true = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
        others = jnp.where(jnp.arange(logits.shape[-1]) == labels[:, None], -jnp.inf, logits)
        return jnp.maximum(0.0, 1.0 + jnp.max(others, axis=-1) - true)

    experiment = Experiment(_config(client={"local_steps": 5}, run={"rounds": 3, "eval_every": 3}), loss=hinge)
    assert experiment.config.model.name == (f"mlp; loss: user-supplied {hinge.__qualname__} on class labels "
                                            "(accuracy)")
    before = experiment.evaluate(experiment.initial_params)
    results = experiment.run(progress=False)
    after = results.history[-1]
    assert {"test_loss", "test_accuracy", "client_accuracy_mean"} <= set(before)
    logits = np.asarray(experiment.model.apply(results.params, experiment.test.x))
    assert after["test_accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == experiment.test.y), abs=1e-6)
    assert after["test_loss"] < before["test_loss"] - 0.25
    assert after["test_accuracy"] > before["test_accuracy"] + 0.1
    assert results.final("test_accuracy") == after["test_accuracy"]
    with pytest.raises(ValueError, match="soft targets"):
        Experiment(_config(client={"mixup_alpha": 0.3}), loss=hinge)


def test_default_task_is_the_classification_every_module_used():
    """Evaluation's loss and accuracy under the default task equal an independent NumPy computation."""
    model = get_model("mlp", (8, 8, 1), 10, hidden=(16,))
    params = model.init(jax.random.key(0))
    x = np.asarray(jax.random.normal(jax.random.key(1), (37, 8, 8, 1)))
    y = np.asarray(jax.random.randint(jax.random.key(2), (37,), 0, 10))
    logits = np.asarray(model.apply(params, x), np.float64)
    log_probs = scipy.special.log_softmax(logits, axis=1)
    stats = evaluation.evaluate(model.apply, params, x, y, batch_size=16)
    assert stats["loss"] == pytest.approx(float(np.mean(-log_probs[np.arange(37), y])), rel=1e-5)
    assert stats["accuracy"] == pytest.approx(float(np.mean(logits.argmax(1) == y)), abs=1e-6)


class WrongWidth(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(7)(x.reshape((x.shape[0], -1)))


class WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.BatchNorm(use_running_average=False)(x.reshape((x.shape[0], -1))))


@pytest.mark.parametrize("kwargs,match", [
    ({"model": WrongWidth()}, r"output shape \(3, 7\) does not fit task 'classification'.*expects \(3, 10\)"),
    ({"loss": lambda logits, labels: jnp.mean(logits)}, r"returned shape \(\) for a batch of 3.*per-example"),
    ({"loss": lambda logits, labels: jnp.square(logits)}, r"returned shape \(3, 10\)"),
    ({"model": WithBatchNorm()}, "stateless"),
    ({"model": lambda key: None}, "must be a Model"),
    ({"model": (lambda key: {"w": jnp.zeros((5, 10))}, lambda p, x: x @ p["w"])}, "cannot run on inputs"),
])
def test_a_model_or_loss_that_does_not_fit_fails_before_training(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Experiment(_config(), **kwargs)


def test_mixup_needs_a_soft_target_form():
    assert LocalSpec(max_steps=1, max_batch=2, max_count=2, num_classes=4, mixup=True, task=MULTI_LABEL).mixup
    with pytest.raises(ValueError, match="task 'next_token' has none"):
        LocalSpec(max_steps=1, max_batch=2, max_count=2, num_classes=4, mixup=True, task=NEXT_TOKEN)
    with pytest.raises(ValueError, match="together"):
        tasks.Task(name="half", loss=tasks.CLASSIFICATION.loss, soft_loss=tasks.CLASSIFICATION.soft_loss)
