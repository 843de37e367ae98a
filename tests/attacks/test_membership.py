"""Membership inference: statistics against references, LiRA math, vectorized shadows, LiRA vs loss threshold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from fedjaxpriv.attacks import membership, shadow
from fedjaxpriv.config import ClientConfig, DataConfig, ExperimentConfig, ModelConfig, RunConfig, ServerConfig
from fedjaxpriv.data import Dataset, load_digits, partition
from fedjaxpriv.experiment import Experiment
from fedjaxpriv.models import get_model


def test_statistics_match_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=8.0, size=(50, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 50)
    p = special.softmax(logits.astype(np.float64), axis=-1)[np.arange(50), labels]
    np.testing.assert_allclose(membership.example_loss(jnp.asarray(logits), jnp.asarray(labels)), -np.log(p),
                               rtol=1e-4, atol=1e-5)
    # log(p / (1 - p)) is finite and accurate even where p rounds to 1 in float32.
    expected = np.log(p) - np.log1p(-p)
    got = np.asarray(membership.logit_confidence(jnp.asarray(logits), jnp.asarray(labels)))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-3)
    assert np.all(np.isfinite(got))


def test_lira_scores_match_scipy_reference():
    rng = np.random.default_rng(1)
    num_shadows, n = 12, 30
    inclusion = shadow.balanced_inclusion(jax.random.key(0), num_shadows, n)
    assert np.all(inclusion.sum(axis=0) == num_shadows // 2)
    conf = rng.normal(size=(num_shadows, n)) + 2.0 * inclusion
    target = rng.normal(size=n) + 1.0
    online = np.asarray(membership.lira_scores(target, conf, inclusion, online=True))
    offline = np.asarray(membership.lira_scores(target, conf, inclusion, online=False))
    pooled = np.asarray(membership.lira_scores(target, conf, inclusion, online=True, global_variance=True))
    ins = [conf[inclusion[:, i], i] for i in range(n)]
    outs = [conf[~inclusion[:, i], i] for i in range(n)]
    ref_online = [stats.norm.logpdf(t, a.mean(), a.std(ddof=1)) - stats.norm.logpdf(t, b.mean(), b.std(ddof=1))
                  for t, a, b in zip(target, ins, outs)]
    ref_offline = [(t - b.mean()) / b.std(ddof=1) for t, b in zip(target, outs)]
    var_in = sum(((a - a.mean()) ** 2).sum() for a in ins) / sum(len(a) - 1 for a in ins)
    var_out = sum(((b - b.mean()) ** 2).sum() for b in outs) / sum(len(b) - 1 for b in outs)
    ref_pooled = [stats.norm.logpdf(t, a.mean(), np.sqrt(var_in)) - stats.norm.logpdf(t, b.mean(), np.sqrt(var_out))
                  for t, a, b in zip(target, ins, outs)]
    np.testing.assert_allclose(online, ref_online, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(offline, ref_offline, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-4, atol=1e-4)


def test_vectorized_shadows_equal_python_loop():
    """All shadows in one call equal one call per shadow (same keys), and each fits its own half."""
    train, _ = load_digits()
    pool = Dataset(train.x[:120], train.y[:120])
    model = get_model("logreg", pool.x.shape[1:], 10)
    key = jax.random.key(3)
    inclusion = shadow.balanced_inclusion(key, 4, len(pool))
    population = shadow.shadow_population(pool, inclusion)
    spec = shadow.shadow_spec(population, 10, steps=30, batch_size=8)
    together, _ = shadow.train_models(model, population, spec, key, lr=0.5, batch_size=8)
    for s in range(4):
        alone, _ = shadow.train_models(model, population, spec, key, lr=0.5, batch_size=8, shadow_ids=np.array([s]))
        for a, b in zip(jax.tree_util.tree_leaves(together), jax.tree_util.tree_leaves(alone)):
            np.testing.assert_allclose(np.asarray(a)[s], np.asarray(b)[0], rtol=1e-5, atol=1e-6)
    losses = np.asarray(jax.vmap(lambda p: membership.example_loss(model.apply(p, pool.x), jnp.asarray(pool.y)))(together))
    assert np.all(losses[inclusion].mean() < losses[~inclusion].mean())
    with pytest.raises(ValueError, match="num_shadows"):
        shadow.balanced_inclusion(key, 1, 10)


def test_lira_beats_loss_threshold_at_low_fpr():
    """On an overfit FL model, LiRA's TPR at 1% FPR exceeds the loss attack's by > 3 binomial std errors."""
    train, test = load_digits()
    x, y = np.concatenate([train.x, test.x]), np.concatenate([train.y, test.y])
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(y))[:800]
    pool = Dataset(x[pick], y[pick])
    member = rng.random(len(pick)) < 0.5
    rounds, steps, batch, lr = 10, 50, 32, 0.3
    config = ExperimentConfig(
        data=DataConfig(dataset="digits", num_clients=2, partition="iid"), model=ModelConfig(name="mlp", hidden=(64,)),
        client=ClientConfig(local_steps=steps, batch_size=batch, lr=lr), server=ServerConfig(clients_per_round=2),
        run=RunConfig(rounds=rounds, eval_every=rounds, checkpoint_every=0))
    population = partition(Dataset(pool.x[member], pool.y[member]), "iid", 2, 0)
    experiment = Experiment(config, population=population, test=Dataset(pool.x[~member], pool.y[~member]),
                            num_classes=10)
    target = experiment.run(progress=False).params
    shadows = shadow.train_shadows(experiment.model, pool, 16, jax.random.key(1), steps=rounds * steps,
                                   batch_size=batch, lr=lr)
    apply, labels = experiment.model.apply, member.astype(np.int32)
    target_conf = membership.stacked_logit_confidence(apply, jax.tree_util.tree_map(lambda a: a[None], target),
                                                      pool.x, pool.y)[0]
    shadow_conf = membership.stacked_logit_confidence(apply, shadows.params, pool.x, pool.y)
    lira = membership.attack_metrics(np.asarray(membership.lira_scores(
        target_conf, shadow_conf, shadows.inclusion, online=True, global_variance=True)), labels)
    offline = membership.attack_metrics(np.asarray(membership.lira_scores(
        target_conf, shadow_conf, shadows.inclusion, online=False, global_variance=True)), labels)
    loss = membership.attack_metrics(membership.loss_threshold_scores(apply, target, pool.x, pool.y), labels)
    n = int(member.sum())
    margin = 3 * np.hypot(membership.tpr_standard_error(lira["tpr@1%fpr"], n),
                          membership.tpr_standard_error(loss["tpr@1%fpr"], n))
    assert lira["tpr@1%fpr"] > loss["tpr@1%fpr"] + margin, (lira, loss, margin)
    assert offline["tpr@1%fpr"] > loss["tpr@1%fpr"], (offline, loss)
    assert lira["auc"] > loss["auc"] + 0.03, (lira, loss)


def test_roc_plot_written(tmp_path):
    rng = np.random.default_rng(2)
    labels = np.r_[np.ones(200), np.zeros(200)].astype(int)
    scores = rng.normal(size=400) + labels
    path = membership.plot_roc({"gaussian": (scores, labels)}, str(tmp_path / "roc.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    metrics = membership.attack_metrics(scores, labels)
    # Two unit-variance Gaussians one std apart: AUC = Phi(1 / sqrt(2)) ~ 0.760; 5 sigma of ~0.023.
    assert abs(metrics["auc"] - stats.norm.cdf(1 / np.sqrt(2))) < 5 * 0.023
