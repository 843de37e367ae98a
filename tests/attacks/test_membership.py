"""Membership inference: statistics against references, LiRA math, vectorized shadows, LiRA vs loss threshold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats
from sklearn import metrics as skm

from fedjaxpriv.attacks import membership, metrics, shadow
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
    assert np.all(inclusion.sum(axis=1) == n // 2)
    assert np.all(inclusion.any(axis=0) & (~inclusion).any(axis=0))
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


@pytest.mark.slow
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


def _null_pooled_lira_aucs(shadow_inclusion, num_examples: int, replications: int) -> np.ndarray:
    """AUCs of pooled leave-one-out LiRA (target + S shadows) where no model's confidence depends on membership."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(7)
    aucs = []
    for r in range(replications):
        target = np.zeros(num_examples, bool)
        target[rng.choice(num_examples, num_examples // 2, replace=False)] = True
        inclusion = np.concatenate([target[None], shadow_inclusion(r)])
        confidence = 3.0 * rng.normal(size=num_examples) + rng.normal(size=inclusion.shape)
        scores = membership.leave_one_out_lira(confidence, inclusion, online=True).ravel()
        finite = np.isfinite(scores)
        aucs.append(roc_auc_score(inclusion.ravel()[finite], scores[finite]))
    return np.asarray(aucs)


def test_pooled_lira_is_at_chance_without_signal_with_few_shadows():
    """Target + 4 shadows, confidences independent of membership: the pooled AUC is 0.5 within 4 standard errors
    of the mean over replications. Shadows that hold every example exactly twice (a fixed count per example)
    fail the same check, below chance, which shows the check has the power to see the bias."""
    num_shadows, n, reps = 4, 400, 24
    independent = _null_pooled_lira_aucs(
        lambda r: shadow.balanced_inclusion(jax.random.key(100 + r), num_shadows, n), n, reps)
    error = independent.std(ddof=1) / np.sqrt(reps)
    assert abs(independent.mean() - 0.5) < 4 * error, (independent.mean(), error)

    def fixed_count(r: int) -> np.ndarray:
        ranks = np.argsort(np.random.default_rng(r).random((n, num_shadows)), axis=1)
        return (ranks < num_shadows // 2).T

    fixed = _null_pooled_lira_aucs(fixed_count, n, reps)
    assert fixed.mean() < 0.5 - 4 * fixed.std(ddof=1) / np.sqrt(reps), fixed.mean()


@pytest.mark.slow
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
    def metrics(scores: jax.Array) -> dict:  # a candidate all 16 shadows hold (or none does) has no score
        return membership.attack_metrics(*membership.finite_scores(np.asarray(scores), labels)[:2])

    lira = metrics(membership.lira_scores(target_conf, shadow_conf, shadows.inclusion, online=True,
                                          global_variance=True))
    offline = metrics(membership.lira_scores(target_conf, shadow_conf, shadows.inclusion, online=False,
                                             global_variance=True))
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
    wide = np.r_[np.ones(2000), np.zeros(2000)].astype(int)
    path = membership.plot_roc({"gaussian": (scores, labels), "wide": (rng.normal(size=4000) + 2 * wide, wide)},
                               str(tmp_path / "roc.png"), title="two attacks")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    got = membership.attack_metrics(scores, labels)
    # Two unit-variance Gaussians one std apart: AUC = Phi(1 / sqrt(2)) ~ 0.760; 5 sigma of ~0.023.
    assert abs(got["auc"] - stats.norm.cdf(1 / np.sqrt(2))) < 5 * 0.023


# -- attack_metrics ------------------------------------------------------------------------------------------


def _two_gaussians(rng, mu, num_members, num_nonmembers):
    scores = np.r_[rng.normal(mu, 1, num_members), rng.normal(0, 1, num_nonmembers)]
    return scores, np.r_[np.ones(num_members, int), np.zeros(num_nonmembers, int)]


def test_attack_metrics_point_values_match_sklearn_and_brute_force():
    rng = np.random.default_rng(3)
    scores, labels = _two_gaussians(rng, 1.0, 300, 500)
    scores = np.round(scores, 1)  # ties
    got = membership.attack_metrics(scores, labels, (1e-3, 2e-3, 1e-2, 0.1), bootstrap=200)
    assert got["auc"] == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    thresholds = np.r_[np.unique(scores), np.inf]
    tprs = np.array([np.mean(positives >= t) for t in thresholds])
    fprs = np.array([np.mean(negatives >= t) for t in thresholds])
    assert got["advantage"] == pytest.approx(np.max(tprs - fprs), abs=1e-12)
    assert got["balanced_accuracy"] == pytest.approx(np.max((tprs + 1 - fprs) / 2), abs=1e-12)
    assert got["balanced_accuracy"] == pytest.approx((1 + got["advantage"]) / 2, abs=1e-15)
    assert np.isnan(got["tpr@0.1%fpr"])  # below 1 / 500 non-members
    for f in (2e-3, 1e-2, 0.1):
        key = membership.fpr_key(f)
        tpr = np.max(tprs[fprs <= f])
        assert got[key] == pytest.approx(tpr, abs=1e-12)
        # Clopper-Pearson over the 300 members, as scipy's exact binomial interval.
        interval = stats.binomtest(int(round(tpr * 300)), 300).proportion_ci(0.95, method="exact")
        assert got[f"{key}_low"] == pytest.approx(interval.low, abs=1e-9)
        assert got[f"{key}_high"] == pytest.approx(interval.high, abs=1e-9)
    assert (got["num_members"], got["num_nonmembers"], got["min_resolvable_fpr"]) == (300, 500, 1 / 500)
    assert got["auc_low"] < got["auc"] < got["auc_high"]
    assert membership.attack_metrics(scores, labels, bootstrap=200) == membership.attack_metrics(scores, labels,
                                                                                                  bootstrap=200)


def test_attack_metrics_nan_below_the_resolvable_fpr():
    rng = np.random.default_rng(4)
    scores, labels = _two_gaussians(rng, 1.5, 60, 50)
    got = membership.attack_metrics(scores, labels, (1e-3, 1e-2, 0.02, 0.1), bootstrap=0)
    assert got["min_resolvable_fpr"] == 0.02
    for f in (1e-3, 1e-2):  # below 1 / 50 non-members
        key = membership.fpr_key(f)
        assert np.isnan(got[key]) and np.isnan(got[f"{key}_low"]) and np.isnan(got[f"{key}_high"])
    for f in (0.02, 0.1):  # one and five false positives allowed
        key = membership.fpr_key(f)
        assert got[key] == metrics.tpr_at_fpr(scores, labels, f)
        assert got[f"{key}_low"] <= got[key] <= got[f"{key}_high"]
    assert np.isnan(got["auc_low"]) and np.isnan(got["auc_high"])


def test_clopper_pearson_tpr_interval_covers_the_tpr_of_the_chosen_threshold():
    """The rule picked at FPR <= f is 'score > v' with v the (k+1)-th largest non-member score, k = f n_0;
    its true TPR is P[N(mu, 1) > v]. The interval over the members must cover it with prob >= 1 - alpha."""
    mu, num_members, num_nonmembers, repeats, alpha = 1.0, 100, 200, 300, 0.05
    allowed = {0.01: 2, 0.05: 10, 0.2: 40}  # false positives allowed out of 200
    covered = {f: 0 for f in allowed}
    width_ratio = {f: 0.0 for f in allowed}
    for seed in range(repeats):
        scores, labels = _two_gaussians(np.random.default_rng(seed), mu, num_members, num_nonmembers)
        got = membership.attack_metrics(scores, labels, tuple(allowed), alpha=alpha, bootstrap=0)
        descending = np.sort(scores[labels == 0])[::-1]
        for f, k in allowed.items():
            true_tpr = stats.norm.sf(descending[k] - mu)
            key = membership.fpr_key(f)
            assert got[key] == np.mean(scores[labels == 1] > descending[k])
            covered[f] += got[f"{key}_low"] <= true_tpr <= got[f"{key}_high"]
            wald = 2 * stats.norm.isf(alpha / 2) * np.sqrt(true_tpr * (1 - true_tpr) / num_members)
            width_ratio[f] += (got[f"{key}_high"] - got[f"{key}_low"]) / wald / repeats
    tolerance = 3 * np.sqrt(alpha * (1 - alpha) / repeats)  # 3 binomial sigmas of the coverage estimate
    for f in allowed:
        assert covered[f] / repeats >= 1 - alpha - tolerance, (f, covered[f])
        assert 0.9 < width_ratio[f] < 1.25, (f, width_ratio[f])  # exact but not vacuous: close to Wald's width


def test_pooled_tpr_interval_covers_dependent_scores_that_clopper_pearson_does_not():
    """Pooled scores of 5 models on 100 candidates share each candidate's difficulty d ~ N(0, 0.25) and its
    vulnerability v ~ N(0.5, 9) (a member's score is shifted by v). The population rule at 10% FPR is
    'score >= sqrt(1.25) z_0.9', with TPR P[N(0.5, 10.25) >= that]. Over 60 replications the interval with
    ``groups`` (Clopper-Pearson widened by the cluster bootstrap, each resample choosing its threshold) covers
    it at least 51 times (P(<= 50 | 0.95) < 1e-3); Clopper-Pearson alone, which treats the ~250 member pairs
    as independent and the threshold as fixed, falls short of that bar."""
    rng = np.random.default_rng(3)
    models, candidates, shift, f = 5, 100, 0.5, 0.1
    expected = stats.norm.sf((np.sqrt(1.25) * stats.norm.isf(f) - shift) / np.sqrt(10.25))
    groups = np.tile(np.arange(candidates), models)
    covered = {"pooled": 0, "independent": 0}
    for _ in range(60):
        difficulty, vulnerability = 0.5 * rng.normal(size=candidates), shift + 3.0 * rng.normal(size=candidates)
        labels = rng.random((models, candidates)) < 0.5
        scores = (difficulty[None] + vulnerability[None] * labels + rng.normal(size=labels.shape)).ravel()
        labels = labels.ravel().astype(int)
        for name, g in (("pooled", groups), ("independent", None)):
            got = membership.attack_metrics(scores, labels, (f,), bootstrap=400, seed=1, groups=g)
            covered[name] += got["tpr@10%fpr_low"] <= expected <= got["tpr@10%fpr_high"]
            assert got["tpr@10%fpr"] == metrics.tpr_at_fpr(scores, labels, f)
    assert covered["pooled"] >= 51 > covered["independent"], covered


def test_resampled_tpr_equals_tpr_of_the_repeated_scores():
    rng = np.random.default_rng(0)
    scores, labels = np.round(3 * rng.normal(size=300)) / 3, (rng.random(300) < 0.4).astype(int)  # many ties
    counts = rng.integers(0, 3, size=(20, 300))
    fprs = np.array([0.0, 0.01, 0.1, 0.5, 1.0])
    got = metrics.resampled_tpr_at_fpr(scores, labels, counts, fprs)
    for row, c in zip(got, counts):
        repeated = np.repeat(np.arange(300), c)
        np.testing.assert_array_equal(row, metrics.tpr_at_fpr(scores[repeated], labels[repeated], fprs))
    np.testing.assert_array_equal(metrics.resampled_tpr_at_fpr(scores, labels, np.ones(300, int), fprs)[0],
                                  metrics.tpr_at_fpr(scores, labels, fprs))


def test_bootstrap_auc_interval_covers_theory_and_shrinks_like_root_n():
    mu, alpha = 1.0, 0.05
    auc = stats.norm.cdf(mu / np.sqrt(2))
    # Exact Var of the Mann-Whitney AUC: P[X1 > Y, X2 > Y] = P[X > Y1, X > Y2] is a bivariate normal orthant
    # probability (the two differences have correlation 1/2).
    pair = stats.multivariate_normal(mean=[0, 0], cov=[[1, 0.5], [0.5, 1]]).cdf([mu / np.sqrt(2)] * 2)

    def interval_width(n):
        return 2 * stats.norm.isf(alpha / 2) * np.sqrt((auc * (1 - auc) + 2 * (n - 1) * (pair - auc**2)) / n**2)

    widths = {}
    for n, repeats in ((200, 40), (800, 10)):
        covered, total = 0, 0.0
        for seed in range(repeats):
            scores, labels = _two_gaussians(np.random.default_rng(100 + seed), mu, n, n)
            got = membership.attack_metrics(scores, labels, alpha=alpha, seed=seed)
            covered += got["auc_low"] <= auc <= got["auc_high"]
            total += got["auc_high"] - got["auc_low"]
        widths[n] = total / repeats
        assert covered >= stats.binom.ppf(0.005, repeats, 1 - alpha), (n, covered)
        assert 0.85 < widths[n] / interval_width(n) < 1.15, (n, widths[n], interval_width(n))
    assert 1.7 < widths[200] / widths[800] < 2.3, widths


def test_attack_metrics_rejects_bad_input():
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="finite"):
        membership.attack_metrics(np.array([0.1, np.nan, 0.35, 0.8]), labels)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        membership.attack_metrics(scores, np.array([0, 2, 1, 1]))
    with pytest.raises(ValueError, match="positive"):
        membership.attack_metrics(scores, np.ones(4, int))
    with pytest.raises(ValueError, match="positive"):
        membership.attack_metrics(scores, np.zeros(4, int))
    for alpha in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="alpha"):
            membership.attack_metrics(scores, labels, alpha=alpha)
    with pytest.raises(ValueError, match="bootstrap"):
        membership.attack_metrics(scores, labels, bootstrap=-1)
    with pytest.raises(ValueError, match="fprs"):
        membership.attack_metrics(scores, labels, (0.01, 1.5))


def test_finite_scores_drops_nan_and_counts_them():
    scores, labels, dropped = membership.finite_scores(np.array([0.3, np.nan, 1.0, -np.inf]), np.array([1, 0, 0, 1]))
    np.testing.assert_array_equal(scores, [0.3, 1.0])
    np.testing.assert_array_equal(labels, [1, 0])
    assert dropped == 2


def test_lira_scores_nan_without_in_or_out_shadows():
    rng = np.random.default_rng(5)
    num_shadows, n = 8, 12
    inclusion = np.asarray(shadow.balanced_inclusion(jax.random.key(1), num_shadows, n))
    inclusion[:, 0] = True   # candidate 0: no "out" shadow
    inclusion[:, 1] = False  # candidate 1: no "in" shadow
    conf = rng.normal(size=(num_shadows, n)) + 2.0 * inclusion
    target = rng.normal(size=n) + 1.0
    online = np.asarray(membership.lira_scores(target, conf, inclusion, online=True))
    offline = np.asarray(membership.lira_scores(target, conf, inclusion, online=False))
    pooled = np.asarray(membership.lira_scores(target, conf, inclusion, online=True, global_variance=True))
    assert np.isnan(online[:2]).all() and np.isnan(pooled[:2]).all() and np.isfinite(pooled[2:]).all()
    assert np.isnan(offline[0]) and np.isfinite(offline[1:]).all()
    outs = conf[:, 1]
    assert offline[1] == pytest.approx((target[1] - outs.mean()) / outs.std(ddof=1), rel=1e-4)
    # Per-example moments: the other candidates score as without the degenerate ones.
    rest = np.asarray(membership.lira_scores(target[2:], conf[:, 2:], inclusion[:, 2:], online=True))
    np.testing.assert_allclose(online[2:], rest, rtol=1e-5, atol=1e-5)


# -- RMIA ---------------------------------------------------------------------------------------------------


def _rmia_brute_force(target, refs, pop_target, pop_refs, online, a, gamma):
    """Paper formulas, one pair (x, z) at a time."""
    def marginal(column):
        mean = sum(column) / len(column)
        return mean if online else 0.5 * (1 + a) * mean + 0.5 * (1 - a)

    out = []
    for i in range(len(target)):
        ratio_x = target[i] / marginal(refs[:, i])
        wins = 0
        for j in range(len(pop_target)):
            ratio_z = pop_target[j] / marginal(pop_refs[:, j])
            wins += ratio_x / ratio_z >= gamma
        out.append(wins / len(pop_target))
    return np.array(out)


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("gamma", [1.0, 1.7])
def test_rmia_equals_brute_force_double_loop(online, gamma):
    rng = np.random.default_rng(6)
    num_refs, n, z = 4, 9, 11
    target, refs = rng.uniform(0.05, 1, n), rng.uniform(0.05, 1, (num_refs, n))
    pop_target, pop_refs = rng.uniform(0.05, 1, z), rng.uniform(0.05, 1, (num_refs, z))
    target[0], refs[:, 0] = pop_target[3], pop_refs[:, 3]  # an exact tie with a population point
    inside = np.arange(num_refs)[:, None] < 2 + np.zeros(n, int)  # every candidate: 2 in, 2 out
    got = membership.rmia_scores(target, refs, pop_target, pop_refs, reference_in=inside if online else None,
                                 offline_a=0.4, gamma=gamma)
    expected = _rmia_brute_force(target, refs, pop_target, pop_refs, online, 0.4, gamma)
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(got)) > 3  # not a degenerate all-0 / all-1 case


def test_rmia_marginal_and_input_checks():
    refs = np.array([[0.2, 0.9], [0.4, 0.5]])
    np.testing.assert_allclose(membership.rmia_marginal(refs), [0.3, 0.7])
    # Offline: ((1 + a) / 2) mean_out + (1 - a) / 2.
    np.testing.assert_allclose(membership.rmia_marginal(refs, 0.5), [0.75 * 0.3 + 0.25, 0.75 * 0.7 + 0.25])
    np.testing.assert_allclose(membership.rmia_marginal(refs, 1.0), [0.3, 0.7])
    target, pop, pop_refs = np.array([0.5, 0.6]), np.array([0.3, 0.8, 0.1]), np.full((2, 3), 0.5)
    inside = np.array([[True, True], [False, True]])  # candidate 1 has no "out" reference
    online = membership.rmia_scores(target, refs, pop, pop_refs, reference_in=inside)
    assert np.isfinite(online[0]) and np.isnan(online[1])
    with pytest.raises(ValueError, match="probabilities"):
        membership.rmia_scores(np.array([0.5, 1.2]), refs, pop, pop_refs)
    with pytest.raises(ValueError, match="reference_probs"):
        membership.rmia_scores(target, refs[:, :1], pop, pop_refs)
    with pytest.raises(ValueError, match="population_reference_probs"):
        membership.rmia_scores(target, refs, pop, pop_refs[:1])
    with pytest.raises(ValueError, match="reference_in"):
        membership.rmia_scores(target, refs, pop, pop_refs, reference_in=inside[:1])
    with pytest.raises(ValueError, match="offline_a"):
        membership.rmia_scores(target, refs, pop, pop_refs, offline_a=1.5)
    with pytest.raises(ValueError, match="gamma"):
        membership.rmia_scores(target, refs, pop, pop_refs, gamma=0.0)
    with pytest.raises(ValueError, match="Pr"):
        membership.rmia_scores(target, refs, pop, np.zeros((2, 3)), reference_in=np.array([[1, 0], [0, 1]]))


def _per_example_confidences(rng, num_candidates, num_population, num_refs, online):
    """p_y = sigmoid(difficulty + 1.0 * in + N(0, 0.5^2)) with difficulty ~ N(0, 2^2) per example; targets,
    references and population points share the per-example distributions. Online: each reference holds
    each point with probability 1/2; offline: no reference holds any."""
    difficulty, population_difficulty = rng.normal(0, 2, num_candidates), rng.normal(0, 2, num_population)

    def confidence(d, inside):
        return special.expit(d + 1.0 * inside + rng.normal(0, 0.5, inside.shape))

    member = rng.random(num_candidates) < 0.5
    ref_in = rng.random((num_refs, num_candidates)) < 0.5 if online else np.zeros((num_refs, num_candidates), bool)
    pop_in = rng.random((num_refs, num_population)) < 0.5 if online else np.zeros((num_refs, num_population), bool)
    return dict(target=confidence(difficulty, member.astype(float)),
                refs=confidence(difficulty[None], ref_in.astype(float)),
                pop_target=confidence(population_difficulty, np.zeros(num_population)),
                pop_refs=confidence(population_difficulty[None], pop_in.astype(float)),
                ref_in=ref_in if online else None, labels=member.astype(int))


@pytest.mark.parametrize("online", [True, False])
def test_rmia_beats_confidence_threshold_beyond_the_intervals(online):
    data = _per_example_confidences(np.random.default_rng(7), 2000, 1000, 8, online)
    scores = membership.rmia_scores(data["target"], data["refs"], data["pop_target"], data["pop_refs"],
                                    reference_in=data["ref_in"])
    scores, labels, dropped = membership.finite_scores(scores, data["labels"])
    if online:  # candidates in all or none of the 8 references (p = 2 / 256 each) are dropped
        expected = np.sum(data["ref_in"].all(axis=0) | ~data["ref_in"].any(axis=0))
        assert dropped == expected > 0
    else:
        assert dropped == 0
    rmia = membership.attack_metrics(scores, labels)
    confidence = membership.attack_metrics(data["target"], data["labels"])
    assert rmia["auc_low"] > confidence["auc_high"], (rmia, confidence)
    assert rmia["tpr@1%fpr_low"] > confidence["tpr@1%fpr_high"], (rmia, confidence)
    assert 0.5 < confidence["auc"] < 0.7  # per-example difficulty hides membership from the plain threshold
