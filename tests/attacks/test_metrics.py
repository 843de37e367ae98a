"""Tests for attack metrics: reconstruction quality and membership-score metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from fedjaxpriv.attacks import metrics


def test_mse_and_psnr_hand_values():
    ref = jnp.full((4, 4, 1), 0.5)
    x = ref + 0.1
    np.testing.assert_allclose(metrics.mse(x, ref), 0.01, rtol=1e-5)
    np.testing.assert_allclose(metrics.psnr(x, ref), 20.0, rtol=1e-5)
    # 255-scale images with error 2.55 everywhere have the same PSNR.
    np.testing.assert_allclose(metrics.psnr(x * 255, ref * 255, data_range=255.0), 20.0, rtol=1e-5)
    assert np.isinf(metrics.psnr(ref, ref))


def _ssim_reference(x: np.ndarray, y: np.ndarray, window: int, sigma: float, data_range: float) -> float:
    """SSIM from Wang et al. (2004) eqs. (13)-(15), window by window, in float64."""
    offsets = np.arange(window) - (window - 1) / 2
    taps = np.exp(-(offsets**2) / (2 * sigma**2))
    weights = np.outer(taps, taps) / np.outer(taps, taps).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    height, width, channels = x.shape
    per_channel = []
    for c in range(channels):
        values = []
        for i in range(height - window + 1):
            for j in range(width - window + 1):
                a = x[i : i + window, j : j + window, c]
                b = y[i : i + window, j : j + window, c]
                mu_a, mu_b = np.sum(weights * a), np.sum(weights * b)
                var_a = np.sum(weights * (a - mu_a) ** 2)
                var_b = np.sum(weights * (b - mu_b) ** 2)
                cov = np.sum(weights * (a - mu_a) * (b - mu_b))
                values.append(
                    (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
                )
        per_channel.append(np.mean(values))
    return float(np.mean(per_channel))


@pytest.mark.parametrize("window", [7, 11])
def test_ssim_matches_formula_reference(window):
    rng = np.random.default_rng(0)
    ref = rng.uniform(size=(16, 14, 3))
    x = np.clip(ref + rng.normal(0, 0.2, ref.shape), 0, 1)
    expected = _ssim_reference(x, ref, window, 1.5, 1.0)
    got = metrics.ssim(jnp.asarray(x), jnp.asarray(ref), window_size=window)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert 0.05 < expected < 0.95  # a non-trivial value
    np.testing.assert_allclose(metrics.ssim(jnp.asarray(ref), jnp.asarray(ref)), 1.0, atol=1e-6)


def _ssim_skimage_procedure(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """SSIM the way ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)`` computes it: ``scipy.ndimage.gaussian_filter`` (truncate 3.5: 11 taps) over the
    whole image, the border of (11 - 1) / 2 pixels cropped, mean over positions, then over channels."""
    from scipy import ndimage

    def smooth(image):
        return ndimage.gaussian_filter(image, sigma=1.5, truncate=3.5, mode="reflect")

    c1, c2, pad = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2, 5
    per_channel = []
    for c in range(x.shape[-1]):
        a, b = x[..., c].astype(np.float64), y[..., c].astype(np.float64)
        mu_a, mu_b = smooth(a), smooth(b)
        var_a, var_b = smooth(a * a) - mu_a**2, smooth(b * b) - mu_b**2
        cov = smooth(a * b) - mu_a * mu_b
        s_map = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        per_channel.append(s_map[pad:-pad, pad:-pad].mean())
    return float(np.mean(per_channel))


def test_ssim_matches_scikit_images_procedure():
    """scikit-image's SSIM (the usual reference, in the test extra) and its procedure (separable Gaussian filter,
    cropped border) re-expressed here with scipy give the same value, and ``metrics.ssim`` gives it too."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    ref = rng.uniform(size=(20, 20, 2))
    x = np.clip(ref + rng.normal(0, 0.1, ref.shape), 0, 1)
    expected = _ssim_skimage_procedure(x, ref, 1.0)
    assert 0.3 < expected < 0.95  # a non-trivial value
    np.testing.assert_allclose(metrics.ssim(jnp.asarray(x), jnp.asarray(ref)), expected, atol=2e-5)
    np.testing.assert_allclose(structural_similarity(x, ref, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                                     sigma=1.5, use_sample_covariance=False), expected, atol=1e-9)


def test_ssim_vmaps_over_a_batch_and_rejects_small_images():
    rng = np.random.default_rng(2)
    refs = rng.uniform(size=(3, 12, 12, 1)).astype(np.float32)
    xs = np.clip(refs + rng.normal(0, 0.3, refs.shape), 0, 1).astype(np.float32)
    batched = jax.vmap(lambda a, b: metrics.ssim(a, b, window_size=7))(xs, refs)
    for i in range(3):
        np.testing.assert_allclose(batched[i], _ssim_reference(xs[i], refs[i], 7, 1.5, 1.0), atol=2e-5)
    with pytest.raises(ValueError, match="window_size"):
        metrics.ssim(jnp.zeros((8, 8)), jnp.zeros((8, 8)), window_size=11)


def _gaussian_scores(rng, mu, n_neg, n_pos, rounding=None):
    scores = np.r_[rng.normal(0, 1, n_neg), rng.normal(mu, 1, n_pos)]
    if rounding is not None:
        scores = np.round(scores, rounding)  # creates ties
    labels = np.r_[np.zeros(n_neg, int), np.ones(n_pos, int)]
    return scores, labels


def test_roc_curve_and_auc_match_sklearn_with_ties():
    rng = np.random.default_rng(3)
    scores, labels = _gaussian_scores(rng, 1.0, 700, 300, rounding=1)
    fpr, tpr, thresholds = metrics.roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thresholds[1:], sk_thresholds[1:])
    assert np.isinf(thresholds[0])
    np.testing.assert_allclose(metrics.roc_auc(scores, labels), skm.roc_auc_score(labels, scores), rtol=1e-12)
    np.testing.assert_allclose(metrics.auc(fpr, tpr), skm.auc(sk_fpr, sk_tpr), rtol=1e-12)


def test_auc_of_two_gaussians_within_five_sigma_of_theory():
    rng = np.random.default_rng(4)
    n, mu = 20_000, 1.0
    scores, labels = _gaussian_scores(rng, mu, n, n)
    expected = stats.norm.cdf(mu / np.sqrt(2))
    # Mann-Whitney variance bound: Var(AUC) <= AUC (1 - AUC) / min(n_pos, n_neg).
    tolerance = 5 * np.sqrt(expected * (1 - expected) / n)
    assert abs(metrics.roc_auc(scores, labels) - expected) < tolerance


def test_tpr_at_fpr_matches_brute_force_and_theory():
    rng = np.random.default_rng(5)
    n, mu = 20_000, 2.0
    scores, labels = _gaussian_scores(rng, mu, n, n)
    targets = np.array([1e-3, 1e-2])
    got = metrics.tpr_at_fpr(scores, labels, targets)
    negatives, positives = scores[labels == 0], scores[labels == 1]
    for target, value in zip(targets, got):
        best = 0.0
        for threshold in np.r_[np.sort(scores), np.inf]:
            if np.mean(negatives >= threshold) <= target:
                best = max(best, np.mean(positives >= threshold))
        assert value == best
        # Theory: TPR = Phi(mu - z_{1 - fpr}); the empirical value also carries threshold noise, so allow
        # 5 sigma of the TPR binomial plus the TPR change from an FPR error of 5 binomial sigmas.
        theory = stats.norm.sf(stats.norm.isf(target) - mu)
        fpr_sigma = np.sqrt(target * (1 - target) / n)
        slope = stats.norm.pdf(stats.norm.isf(target) - mu) / stats.norm.pdf(stats.norm.isf(target))
        tolerance = 5 * np.sqrt(theory * (1 - theory) / n) + 5 * fpr_sigma * slope
        assert abs(value - theory) < tolerance


def test_tpr_at_fpr_perfect_separation_and_input_checks():
    scores = np.array([0.1, 0.2, 0.3, 0.9, 1.0])
    labels = np.array([0, 0, 0, 1, 1])
    np.testing.assert_allclose(metrics.tpr_at_fpr(scores, labels, 0.0), 1.0)
    np.testing.assert_allclose(metrics.roc_auc(scores, labels), 1.0)
    with pytest.raises(ValueError, match="labels"):
        metrics.roc_curve(scores, np.array([0, 0, 0, 2, 1]))
    with pytest.raises(ValueError, match="positive"):
        metrics.roc_curve(scores, np.zeros(5, int))
    with pytest.raises(ValueError, match="fpr"):
        metrics.tpr_at_fpr(scores, labels, 1.5)


def test_label_accuracy_and_matched_psnr():
    np.testing.assert_allclose(metrics.label_accuracy(jnp.array([1, 2, 3, 4]), jnp.array([1, 0, 3, 0])), 0.5)
    rng = np.random.default_rng(6)
    originals = rng.uniform(size=(5, 6, 6, 1))
    noisy = originals + 0.01  # PSNR exactly 40 dB each
    permutation = np.array([3, 0, 4, 1, 2])
    np.testing.assert_allclose(metrics.matched_psnr(noisy[permutation], originals), 40.0, rtol=1e-9)


def test_roc_counts_match_brute_force_with_ties():
    rng = np.random.default_rng(7)
    scores, labels = _gaussian_scores(rng, 0.5, 60, 40, rounding=1)
    thresholds, true_positives, false_positives = metrics.roc_counts(scores, labels)
    assert true_positives.dtype == np.int64 and false_positives.dtype == np.int64
    np.testing.assert_array_equal(thresholds[1:], np.unique(scores)[::-1])
    for t, tp, fp in zip(thresholds, true_positives, false_positives):
        assert tp == np.sum((scores >= t) & (labels == 1)) and fp == np.sum((scores >= t) & (labels == 0))


def test_resampled_auc_equals_sklearn_with_sample_weights():
    rng = np.random.default_rng(8)
    scores, labels = _gaussian_scores(rng, 0.7, 90, 60, rounding=1)
    counts = rng.integers(0, 4, size=(5, scores.size))
    counts[:, 0], counts[:, -1] = 1, 1  # one non-member and one member in every row
    got = metrics.resampled_auc(scores, labels, counts)
    expected = [skm.roc_auc_score(labels, scores, sample_weight=row) for row in counts]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(metrics.resampled_auc(scores, labels, np.ones(scores.size, int)),
                               metrics.roc_auc(scores, labels), rtol=1e-12)
    empty = np.ones((1, scores.size), int)
    empty[0, labels == 1] = 0
    with pytest.raises(ValueError, match="member"):
        metrics.resampled_auc(scores, labels, empty)
    with pytest.raises(ValueError, match="integers"):
        metrics.resampled_auc(scores, labels, np.full(scores.size, 0.5))


def test_bootstrap_auc_is_seeded_stratified_and_chunk_invariant():
    rng = np.random.default_rng(9)
    scores, labels = _gaussian_scores(rng, 1.0, 300, 100)
    first = metrics.bootstrap_auc(scores, labels, 200, seed=3)
    assert first.shape == (200,)
    np.testing.assert_array_equal(first, metrics.bootstrap_auc(scores, labels, 200, seed=3, chunk_elements=7 * 400))
    assert not np.array_equal(first, metrics.bootstrap_auc(scores, labels, 200, seed=4))
    # Resamples are centred on the sample AUC: within 4 standard errors of the mean of 200 draws.
    assert abs(first.mean() - metrics.roc_auc(scores, labels)) < 4 * first.std() / np.sqrt(200)
    with pytest.raises(ValueError, match="num_resamples"):
        metrics.bootstrap_auc(scores, labels, 0)


def test_membership_advantage_matches_brute_force():
    rng = np.random.default_rng(10)
    scores, labels = _gaussian_scores(rng, 1.0, 150, 120, rounding=1)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    brute = max(np.mean(positives >= t) - np.mean(negatives >= t) for t in np.r_[scores, np.inf])
    assert metrics.membership_advantage(scores, labels) == pytest.approx(brute, abs=1e-12)
    assert brute > 0.2


def test_bootstrap_auc_keeps_the_class_sizes():
    # Two members above 48 non-members: a stratified resample always holds 2 members, so every AUC is 1 (a
    # pooled resample would lose both members about once in 8 draws).
    scores = np.r_[np.arange(48.0), 100.0, 101.0]
    labels = np.r_[np.zeros(48, int), 1, 1]
    np.testing.assert_array_equal(metrics.bootstrap_auc(scores, labels, 300), 1.0)


def test_cluster_bootstrap_covers_pooled_scores_that_the_pair_bootstrap_does_not():
    """Scores of 5 models on the same 100 candidates share each candidate's difficulty d ~ N(0, 0.25) and its
    vulnerability v ~ N(0.5, 9) (a member's score is shifted by v), as pooled (model, candidate) scores do. The
    expected AUC is Phi(0.5 / sqrt(11.5)) for pairs of different candidates and Phi(0.5 / sqrt(11)) for the
    1 / 100 of pairs that share one. Over 60 replications the 95% cluster-bootstrap interval (resampling
    candidates) covers it at least 51 times (P(<= 50 | 0.95) < 1e-3); the stratified pair bootstrap, which
    treats the 500 pairs as independent, fails that bar."""
    rng = np.random.default_rng(3)
    models, candidates, mean_shift = 5, 100, 0.5
    expected = ((1 - 1 / candidates) * stats.norm.cdf(mean_shift / np.sqrt(11.5))
                + stats.norm.cdf(mean_shift / np.sqrt(11.0)) / candidates)
    covered = {"cluster": 0, "pairs": 0}
    groups = np.tile(np.arange(candidates), models)
    for _ in range(60):
        difficulty = 0.5 * rng.normal(size=candidates)
        vulnerability = mean_shift + 3.0 * rng.normal(size=candidates)
        labels = rng.random((models, candidates)) < 0.5
        scores = difficulty[None] + vulnerability[None] * labels + rng.normal(size=labels.shape)
        for name, g in (("cluster", groups), ("pairs", None)):
            resampled = metrics.bootstrap_auc(scores.ravel(), labels.ravel().astype(int), 400, seed=1, groups=g)
            low, high = np.quantile(resampled, [0.025, 0.975])
            covered[name] += int(low <= expected <= high)
    assert covered["cluster"] >= 51 > covered["pairs"], covered


def test_cluster_bootstrap_rejects_bad_groups():
    scores, labels = np.arange(6.0), np.array([1, 0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="groups"):
        metrics.bootstrap_auc(scores, labels, 10, groups=np.zeros(5, int))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.bootstrap_auc(scores, labels, 10, groups=np.zeros(6, int))
