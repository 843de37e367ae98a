"""FedProx Synthetic(alpha, beta): the generative recipe's statistics, labels, sizes and heterogeneity."""

import jax
import numpy as np
import pytest
from scipy import stats

from fedjaxpriv.data import synthetic_federated, synthetic_iid
from fedjaxpriv.data.synthetic import as_generator, device_examples, device_sizes, feature_variances, synthetic_devices


def per_device(counts: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def mean_label_total_variation(y: np.ndarray, counts: np.ndarray, num_classes: int = 10) -> float:
    """Mean over devices of the total variation between the device's and the overall label distribution."""
    hist = np.bincount(per_device(counts) * num_classes + y, minlength=len(counts) * num_classes)
    hist = hist.reshape(-1, num_classes).astype(np.float64)
    overall = hist.sum(0) / hist.sum()
    return float(np.mean(0.5 * np.abs(hist / hist.sum(1, keepdims=True) - overall).sum(1)))


def test_federated_output_is_the_recipe_split_per_device():
    """synthetic_federated = devices, then each device's train draws, then its test draws, from one generator."""
    train, test = synthetic_federated(7, num_clients=12, alpha=0.5, beta=0.5, max_size=300, test_fraction=0.25)
    rng = as_generator(7)
    devices = synthetic_devices(rng, 12, 0.5, 0.5, 60, 10, max_size=300)
    n_test = np.floor(0.25 * devices.sizes).astype(np.int64)
    x_train, y_train = device_examples(rng, devices, devices.sizes - n_test)
    x_test, y_test = device_examples(rng, devices, n_test)
    np.testing.assert_array_equal(train.x, x_train)
    np.testing.assert_array_equal(train.y, y_train)
    np.testing.assert_array_equal(test.x, x_test)
    np.testing.assert_array_equal(test.y, y_test)
    np.testing.assert_array_equal(train.counts, devices.sizes - n_test)
    np.testing.assert_array_equal(train.offsets, np.concatenate([[0], np.cumsum(train.counts)[:-1]]))
    assert train.x.dtype == np.float32 and train.y.dtype == np.int32 and train.input_shape == (60,)
    assert np.all(devices.sizes >= 50) and np.all(devices.sizes <= 300)
    # Same seed as an int, a generator or a jax key gives a deterministic population.
    again, _ = synthetic_federated(np.random.default_rng(7), num_clients=12, alpha=0.5, beta=0.5, max_size=300,
                                   test_fraction=0.25)
    np.testing.assert_array_equal(again.x, train.x)
    from_key, _ = synthetic_federated(jax.random.key(7), num_clients=12, max_size=300)
    from_key_again, _ = synthetic_federated(jax.random.key(7), num_clients=12, max_size=300)
    np.testing.assert_array_equal(from_key.x, from_key_again.x)
    assert not np.array_equal(from_key.x[:10], train.x[:10])


def test_labels_are_the_argmax_of_each_device_linear_model():
    rng = np.random.default_rng(1)
    devices = synthetic_devices(rng, 40, 1.0, 1.0, 60, 10, max_size=200)
    x, y = device_examples(rng, devices)
    device = per_device(devices.sizes)
    logits = np.einsum("nd,ndk->nk", x.astype(np.float64), devices.weights[device].astype(np.float64))
    logits += devices.biases[device]
    reference = np.argmax(logits, axis=1)
    top2 = np.sort(logits, axis=1)[:, -2:]
    disagree = reference != y
    assert np.all(top2[disagree, 1] - top2[disagree, 0] < 1e-4)  # only float32 near-ties may differ
    assert disagree.mean() < 1e-3
    assert len(np.unique(y)) == 10


def test_features_have_device_means_and_diagonal_covariance_j_pow_minus_1_2():
    rng = np.random.default_rng(2)
    devices = synthetic_devices(rng, 30, 1.0, 1.0, 60, 10, size_mean=6.0, size_sigma=0.3, max_size=2000)
    x, _ = device_examples(rng, devices)
    device = per_device(devices.sizes)
    residual = x.astype(np.float64) - devices.feature_means[device]
    variances = feature_variances(60)
    np.testing.assert_allclose(variances[[0, 1, 59]], [1.0, 2.0 ** -1.2, 60.0 ** -1.2])
    # Per-coordinate variance: relative standard error sqrt(2 / n) for n Gaussian residuals; 5 sigma.
    n = residual.shape[0]
    sample_var = np.mean(residual ** 2, axis=0)
    assert np.all(np.abs(sample_var / variances - 1) < 5 * np.sqrt(2 / n))
    # Standardized residuals are N(0, 1) (KS) while the exponent 1.0 instead of 1.2 is rejected.
    sub = residual[::40]
    assert stats.kstest((sub / np.sqrt(variances)).ravel(), "norm").pvalue > 1e-3
    wrong = np.arange(1, 61) ** -1.0
    assert stats.kstest((sub / np.sqrt(wrong)).ravel(), "norm").pvalue < 1e-6
    # Per-device feature means v_k: (mean - v_k) / sqrt(Sigma_jj / n_k) ~ N(0, 1).
    sums = np.zeros((30, 60))
    np.add.at(sums, device, residual)
    z = sums / devices.sizes[:, None] / np.sqrt(variances / devices.sizes[:, None])
    assert stats.kstest(z.ravel(), "norm").pvalue > 1e-3
    # Features are uncorrelated across coordinates: |corr| < 5 / sqrt(n) for every pair.
    corr = np.corrcoef(residual[:, :12].T)
    assert np.max(np.abs(corr - np.eye(12))) < 5 / np.sqrt(n)


def test_device_parameters_follow_alpha_and_beta():
    alpha, beta, num = 2.0, 0.5, 3000
    devices = synthetic_devices(np.random.default_rng(3), num, alpha, beta, 60, 10)
    w = devices.weights.reshape(num, -1).astype(np.float64)
    b = devices.biases.astype(np.float64)
    v = devices.feature_means.astype(np.float64)
    # Around their device mean, W_k, b_k and v_k entries are N(0, 1).
    assert stats.kstest((w - w.mean(1, keepdims=True))[:200].ravel() * np.sqrt(600 / 599), "norm").pvalue > 1e-3
    # The mean of W_k's 600 entries is u_k + N(0, 1/600): variance alpha^2 + 1/600 (chi-square 5-sigma band).
    for estimate, var in ((w.mean(1), alpha ** 2 + 1 / 600), (v.mean(1), beta ** 2 + 1 / 60)):
        ratio = np.var(estimate) / var
        assert abs(ratio - 1) < 5 * np.sqrt(2 / num)
    # b_k shares u_k with W_k: corr(mean b_k, mean W_k) = alpha^2 / sqrt((alpha^2 + 1/10)(alpha^2 + 1/600)).
    expected = alpha ** 2 / np.sqrt((alpha ** 2 + 0.1) * (alpha ** 2 + 1 / 600))
    assert abs(np.corrcoef(b.mean(1), w.mean(1))[0, 1] - expected) < 5 * (1 - expected ** 2) / np.sqrt(num)


def test_sizes_are_int_lognormal_plus_offset():
    num, mean, sigma = 20_000, 4.0, 2.0
    sizes = device_sizes(np.random.default_rng(4), num, mean, sigma, 50)
    assert sizes.min() >= 50 and sizes.dtype == np.int64
    # Parameters recovered from quantiles of log(sizes - 50); standard errors of a normal's sample median
    # (1.2533 sigma / sqrt(n)) and IQR-based sigma (1.1664 sigma / sqrt(n)); 5 sigma tolerances.
    log_sizes = np.log(np.maximum(sizes - 50, 1))
    q25, q50, q75 = np.quantile(log_sizes, [0.25, 0.5, 0.75])
    assert abs(q50 - mean) < 5 * 1.2533 * sigma / np.sqrt(num) + 0.02  # + the floor()'s effect at e^4
    assert abs((q75 - q25) / 1.34898 - sigma) < 5 * 1.1664 * sigma / np.sqrt(num) + 0.02
    # Exact tail probabilities P(int(L) >= m) = P(L >= m), binomial 5-sigma bands; a wrong sigma fails.
    thresholds = np.array([1, 5, 20, 55, 150, 400, 3000, 20000])
    observed = np.array([(sizes - 50 >= m).mean() for m in thresholds])
    for s, should_pass in ((sigma, True), (1.8, False)):
        p = stats.norm.sf((np.log(thresholds) - mean) / s)
        within = np.abs(observed - p) < 5 * np.sqrt(p * (1 - p) / num)
        assert within.all() == should_pass
    capped = device_sizes(np.random.default_rng(4), num, mean, sigma, 50, max_size=120)
    np.testing.assert_array_equal(capped, np.minimum(sizes, 120))


def test_alpha_never_changes_labels_and_beta_and_iid_order_heterogeneity():
    common = dict(num_clients=150, max_size=300, test_fraction=0.0)
    no_shift, _ = synthetic_federated(5, alpha=0.0, beta=1.0, **common)
    big_shift, _ = synthetic_federated(5, alpha=10.0, beta=1.0, **common)
    # u_k adds the same amount to every logit of device k: identical features and (up to float ties) labels.
    np.testing.assert_array_equal(no_shift.x, big_shift.x)
    assert np.mean(no_shift.y == big_shift.y) > 0.999

    def heterogeneity(population):
        return mean_label_total_variation(population.y, population.counts)

    iid, _ = synthetic_iid(5, **common)
    zero, _ = synthetic_federated(5, alpha=0.0, beta=0.0, **common)
    large, _ = synthetic_federated(5, alpha=0.0, beta=10.0, **common)
    tv_iid, tv_zero, tv_large = heterogeneity(iid), heterogeneity(zero), heterogeneity(large)
    # IID: only sampling noise, E[TV] <= 0.5 * sum_c sqrt(p_c (1 - p_c) / n), summed over devices' sizes.
    hist = np.bincount(iid.y, minlength=10) / iid.num_examples
    bound = np.mean([0.5 * np.sum(np.sqrt(hist * (1 - hist) / n)) for n in iid.counts])
    assert tv_iid < 1.2 * bound
    assert tv_zero > 3 * tv_iid
    assert tv_large > tv_zero + 0.03
    # Feature heterogeneity: the spread of device feature means grows with beta (var 1 + beta^2 vs 1).
    spread = [np.var([p.client(k).x.mean() for k in range(p.num_clients)]) for p in (iid, zero, large)]
    assert spread[0] < 0.01 < spread[1] < 1.0 < 10.0 < spread[2]


@pytest.mark.slow
def test_hundred_thousand_clients():
    train, test = synthetic_federated(0, num_clients=100_000, dim=8, size_mean=0.0, size_sigma=0.5, size_offset=4,
                                      max_size=12)
    sizes = device_sizes(np.random.default_rng(0), 100_000, 0.0, 0.5, 4, 12)  # the first draw of the recipe
    num_test = np.floor(0.2 * sizes).astype(np.int64)
    np.testing.assert_array_equal(train.counts, sizes - num_test)
    assert len(test) == num_test.sum()
    assert train.num_examples == train.offsets[-1] + train.counts[-1]
    assert len(np.unique(train.y)) == 10


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": -1.0}, "alpha=-1.0"), ({"beta": -0.1}, "beta=-0.1"), ({"num_clients": 0}, "num_clients=0"),
    ({"test_fraction": 1.0}, "test_fraction=1.0"), ({"max_size": 0}, "max_size=0"), ({"num_classes": 1}, "1"),
])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic_federated(0, **kwargs)
