"""Attack metrics: reconstruction quality (JAX) and membership-score metrics (NumPy).

Reconstruction metrics (``mse``, ``psnr``, ``ssim``) are pure JAX functions of ONE image pair, so they run
inside jitted attacks and ``jax.vmap`` over batches and targets. Score metrics (``roc_curve``, ``auc``,
``roc_auc``, ``tpr_at_fpr``, ``membership_advantage``, ``bootstrap_auc``, ``bootstrap_tpr_at_fpr``) run on the host
over attack scores
(scikit-learn for the ROC), where label 1 marks a member (positive) and a higher score means "more likely a
member".
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize
from sklearn import metrics as skm

SSIM_K1 = 0.01
SSIM_K2 = 0.03


def mse(x: jax.Array, ref: jax.Array) -> jax.Array:
    """Mean squared error over all elements of two same-shape arrays -> scalar."""
    return jnp.mean(jnp.square(jnp.asarray(x, jnp.float32) - jnp.asarray(ref, jnp.float32)))


def psnr(x: jax.Array, ref: jax.Array, data_range: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range^2 / mse)``; +inf for identical inputs.

    Args:
      x: reconstruction, any shape (one image; ``jax.vmap`` for a batch).
      ref: reference, same shape as ``x``.
      data_range: max minus min of the pixel scale (1.0 for images in [0, 1]).
    """
    return 10.0 * jnp.log10(data_range**2 / mse(x, ref))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalized 2-D Gaussian window ``[size, size]`` (odd ``size``), the outer product of 1-D taps."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size={size} must be a positive odd integer.")
    if sigma <= 0:
        raise ValueError(f"sigma={sigma} must be > 0.")
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    taps = np.exp(-(offsets**2) / (2.0 * sigma**2))
    taps /= taps.sum()
    return np.outer(taps, taps)


def ssim(
    x: jax.Array,
    ref: jax.Array,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> jax.Array:
    """Structural similarity (Wang et al. 2004) of one image pair -> scalar in [-1, 1].

    Local statistics use a Gaussian window (``window_size`` taps, std ``sigma`` pixels) over the 'valid'
    positions only (no padding); per-pixel SSIM
    ``(2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`` with
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` (L = ``data_range``) and population (biased) moments, averaged
    over positions, then over channels. Matches ``skimage.metrics.structural_similarity(...,
    gaussian_weights=True, use_sample_covariance=False)`` for ``window_size=11``.

    Args:
      x: reconstruction ``[H, W]`` or ``[H, W, C]``.
      ref: reference, same shape.
      data_range: dynamic range L of the pixels.
      window_size: odd window width, at most min(H, W) (use 7 for small images).
      sigma: Gaussian std in pixels.
    """
    if x.shape != ref.shape:
        raise ValueError(f"ssim needs equal shapes; got {x.shape} and {ref.shape}.")
    if x.ndim not in (2, 3):
        raise ValueError(f"ssim takes one image [H, W] or [H, W, C]; got shape {x.shape}.")
    if window_size > min(x.shape[0], x.shape[1]):
        raise ValueError(f"window_size={window_size} exceeds the image size {x.shape[:2]}.")
    x = jnp.asarray(x, jnp.float32)
    ref = jnp.asarray(ref, jnp.float32)
    if x.ndim == 2:
        x, ref = x[..., None], ref[..., None]
    channels = x.shape[-1]
    kernel = jnp.asarray(gaussian_window(window_size, sigma), jnp.float32)
    kernel = jnp.tile(kernel[:, :, None, None], (1, 1, 1, channels))  # HWIO, depthwise

    def local_mean(image: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            image[None],
            kernel,
            window_strides=(1, 1),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=channels,
            precision=jax.lax.Precision.HIGHEST,
        )[0]

    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = local_mean(x), local_mean(ref)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(ref * ref) - mu_y**2
    cov_xy = local_mean(x * ref) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return jnp.mean(jnp.mean(numerator / denominator, axis=(0, 1)))


def label_accuracy(predicted: jax.Array, true: jax.Array) -> jax.Array:
    """Fraction of positions where integer labels agree -> scalar in [0, 1]."""
    return jnp.mean((jnp.asarray(predicted) == jnp.asarray(true)).astype(jnp.float32))


def matched_psnr(x_hat: np.ndarray, x: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-image PSNR [B] after matching reconstructions to originals (Hungarian, max total PSNR).

    Gradients of a batch are invariant to the order of its examples, so a reconstruction of a batch is
    compared with the originals under the best one-to-one assignment.

    Args:
      x_hat: reconstructions ``[B, ...]``.
      x: originals ``[B, ...]``.
      data_range: pixel range.

    Returns:
      PSNR in dB of each original's matched reconstruction, ``[B]``.
    """
    x_hat = np.asarray(x_hat, np.float64).reshape(len(x_hat), -1)
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    pair_mse = np.mean((x[:, None, :] - x_hat[None, :, :]) ** 2, axis=-1)
    with np.errstate(divide="ignore"):
        pair_psnr = 10.0 * np.log10(data_range**2 / pair_mse)
    rows, cols = optimize.linear_sum_assignment(np.minimum(pair_psnr, 1e6), maximize=True)
    return pair_psnr[rows, cols]


def _validate_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must have the same length.")
    if not np.all(np.isfinite(scores)):
        bad = int(np.sum(~np.isfinite(scores)))
        raise ValueError(f"scores must be finite; got {bad} NaN/inf of {scores.size} (drop them first, e.g. with "
                         "attacks.membership.finite_scores).")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError(f"labels must be 0 or 1; got values {np.unique(labels)[:5]}.")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        raise ValueError(f"labels need at least one positive (1) and one negative (0); got {int(labels.sum())} "
                         f"positives of {labels.size}.")
    return scores, labels


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of ``score >= threshold`` at every distinct threshold.

    Returns:
      ``(fpr [K+1], tpr [K+1], thresholds [K+1])``, nondecreasing rates from (0, 0) to (1, 1) and thresholds
      decreasing from +inf through the K distinct scores: ``sklearn.metrics.roc_curve(labels, scores,
      drop_intermediate=False)``.
    """
    scores, labels = _validate_scores(scores, labels)
    fpr, tpr, thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    thresholds[0] = np.inf  # sklearn >= 1.3 does this too; older versions used max(score) + 1
    return fpr, tpr, thresholds


def roc_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True/false-positive counts of the rule ``score >= threshold`` at every distinct threshold.

    Args:
      scores: ``[N]`` finite attack scores (higher = member).
      labels: ``[N]`` 1 for members (positives), 0 for non-members.

    Returns:
      ``(thresholds [K+1], true_positives [K+1], false_positives [K+1])`` (int64 counts); thresholds decrease
      from +inf (nothing predicted positive) through the K distinct scores (the last predicts everything
      positive).
    """
    scores, labels = _validate_scores(scores, labels)
    fpr, tpr, thresholds = roc_curve(scores, labels)
    positives = int(labels.sum())
    negatives = labels.size - positives
    # sklearn's rates are counts / total, so rounding recovers the integer counts exactly.
    return thresholds, np.rint(tpr * positives).astype(np.int64), np.rint(fpr * negatives).astype(np.int64)


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a curve given by points sorted by ``fpr`` (trapezoidal rule)."""
    fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
    if fpr.shape != tpr.shape or fpr.ndim != 1:
        raise ValueError(f"fpr {fpr.shape} and tpr {tpr.shape} must be equal-length 1-D arrays.")
    if np.any(np.diff(fpr) < 0):
        raise ValueError("fpr must be nondecreasing.")
    return float(skm.auc(fpr, tpr))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P[member score > non-member score] + 0.5 P[tie] (``sklearn roc_auc_score``)."""
    scores, labels = _validate_scores(scores, labels)
    return float(skm.roc_auc_score(labels, scores))


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float | np.ndarray) -> np.ndarray:
    """Highest TPR over thresholds whose FPR is at most ``fpr`` (e.g. 1e-3 and 1e-2 for 0.1% and 1%).

    Args:
      scores: ``[N]`` attack scores.
      labels: ``[N]`` 1 for members.
      fpr: scalar or array of target false-positive rates in [0, 1].

    Returns:
      TPR at each target, same shape as ``fpr``. No interpolation: with fewer than ``1/fpr`` non-members
      only thresholds with zero false positives qualify (``membership.attack_metrics`` reports NaN there).
    """
    targets = np.asarray(fpr, np.float64)
    if np.any(~((targets >= 0) & (targets <= 1))):
        raise ValueError(f"fpr={fpr} must lie in [0, 1].")
    curve_fpr, curve_tpr, _ = roc_curve(scores, labels)
    # curve_fpr is nondecreasing and curve_tpr too, so the best point is the last one with fpr <= target.
    last = np.searchsorted(curve_fpr, targets, side="right") - 1
    return curve_tpr[last]


def membership_advantage(scores: np.ndarray, labels: np.ndarray) -> float:
    """Membership advantage (Yeom et al. 2018) of the best threshold: ``max_t TPR(t) - FPR(t)``, in [0, 1].

    It equals ``2 * balanced_accuracy - 1`` for the threshold with the best balanced accuracy
    ``(TPR + 1 - FPR) / 2``; the threshold is chosen on these same scores.
    """
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.max(tpr - fpr))


def resampled_auc(scores: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUC of each reweighting of the examples, e.g. bootstrap resamples, without sorting per row.

    Row b counts example n ``counts[b, n]`` times (integer multiplicities), so the result equals
    ``sklearn.metrics.roc_auc_score(labels, scores, sample_weight=counts[b])``. Cost O(B N) after one sort.

    Args:
      scores: ``[N]`` finite attack scores.
      labels: ``[N]`` 1 for members.
      counts: ``[B, N]`` (or ``[N]``) nonnegative integers; every row needs a positive total in each class.

    Returns:
      ``[B]`` AUCs (ties count 1/2).
    """
    scores, labels = _validate_scores(scores, labels)
    counts = np.asarray(counts)
    counts = counts[None] if counts.ndim == 1 else counts
    if counts.ndim != 2 or counts.shape[1] != scores.size:
        raise ValueError(f"counts {counts.shape} must be [B, {scores.size}] (one row per resample).")
    if not np.issubdtype(counts.dtype, np.integer) or np.any(counts < 0):
        raise ValueError(f"counts must be nonnegative integers; got dtype {counts.dtype}, min {counts.min()}.")
    negative_scores = scores[~labels]
    order = np.argsort(negative_scores, kind="stable")
    negative_sorted = negative_scores[order]
    negative_counts = counts[:, ~labels][:, order].astype(np.int64)
    positive_counts = counts[:, labels].astype(np.int64)
    positive_total, negative_total = positive_counts.sum(axis=1), negative_counts.sum(axis=1)
    if np.any(positive_total == 0) or np.any(negative_total == 0):
        raise ValueError("every row of counts needs at least one member and one non-member.")
    cumulative = np.zeros((counts.shape[0], negative_sorted.size + 1), np.int64)
    np.cumsum(negative_counts, axis=1, out=cumulative[:, 1:])
    # Weighted non-members strictly below / at most each member's score; 2 wins + ties = below + at_most.
    below = np.searchsorted(negative_sorted, scores[labels], side="left")
    at_most = np.searchsorted(negative_sorted, scores[labels], side="right")
    twice_wins = cumulative[:, below] + cumulative[:, at_most]
    return np.sum(positive_counts * twice_wins, axis=1) / (2.0 * positive_total * negative_total)


def resampled_tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, counts: np.ndarray,
                         fpr: float | np.ndarray) -> np.ndarray:
    """``tpr_at_fpr`` of each reweighting of the examples (e.g. bootstrap resamples), the threshold chosen anew
    in each: row b counts example n ``counts[b, n]`` times.

    Args:
      scores: ``[N]`` finite attack scores.
      labels: ``[N]`` 1 for members.
      counts: ``[B, N]`` (or ``[N]``) nonnegative integers; every row needs a positive total in each class.
      fpr: scalar or ``[F]`` target false-positive rates in [0, 1].

    Returns:
      ``[B, F]`` TPRs (``[B]`` for a scalar ``fpr``); a row of all ones gives ``tpr_at_fpr`` exactly.
    """
    scores, labels = _validate_scores(scores, labels)
    counts = np.asarray(counts)
    counts = counts[None] if counts.ndim == 1 else counts
    if counts.ndim != 2 or counts.shape[1] != scores.size:
        raise ValueError(f"counts {counts.shape} must be [B, {scores.size}] (one row per resample).")
    targets = np.asarray(fpr, np.float64)
    if np.any(~((targets >= 0) & (targets <= 1))):
        raise ValueError(f"fpr={fpr} must lie in [0, 1].")
    order = np.argsort(-scores, kind="stable")
    descending = scores[order]
    ends = np.flatnonzero(np.r_[descending[1:] != descending[:-1], True])  # last of each run of equal scores
    weights, members = counts[:, order].astype(np.int64), labels[order]
    true_positives = np.cumsum(weights * members, axis=1)[:, ends]  # [B, K] at the K distinct thresholds
    false_positives = np.cumsum(weights * ~members, axis=1)[:, ends]
    positives, negatives = true_positives[:, -1:], false_positives[:, -1:]
    if np.any(positives == 0) or np.any(negatives == 0):
        raise ValueError("every row of counts needs at least one member and one non-member.")
    rates = false_positives / negatives
    # The rates are nondecreasing along a row: the qualifying thresholds are a prefix; none means TPR 0.
    qualifying = np.sum(rates[:, :, None] <= targets.ravel()[None, None], axis=1)  # [B, F]
    hits = np.take_along_axis(true_positives, np.maximum(qualifying - 1, 0), axis=1)
    out = np.where(qualifying > 0, hits, 0) / positives
    return out.reshape(out.shape[:1] + targets.shape)


BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22


def bootstrap_counts(labels: np.ndarray, num_resamples: int, seed: int = 0,
                     chunk_elements: int = BOOTSTRAP_CHUNK_ELEMENTS,
                     groups: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Bootstrap resamples as multiplicities, in chunks: stratified (members and non-members each resampled with
    replacement, so every resample keeps the class sizes), or, with ``groups``, of whole groups (a cluster
    bootstrap; a resample without a member or a non-member is drawn again).

    Args:
      labels: ``[N]`` booleans, True for members.
      num_resamples: B >= 1 in all.
      seed: stratified draws come from two streams (members, non-members) spawned from it, so they do not depend
        on ``chunk_elements``.
      chunk_elements: about this many ``[rows, N]`` entries per chunk (memory bound).
      groups: optional ``[N]`` integer group of each score.

    Yields:
      ``[rows, N]`` int64 multiplicities, B rows in all.
    """
    if num_resamples < 1:
        raise ValueError(f"num_resamples={num_resamples} must be >= 1.")
    labels = np.asarray(labels, bool).ravel()
    size = labels.size
    if groups is None:
        members, nonmembers = np.flatnonzero(labels), np.flatnonzero(~labels)
        member_rng, nonmember_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
        chunk = max(1, chunk_elements // size)
        for start in range(0, num_resamples, chunk):
            rows = min(chunk, num_resamples - start)
            counts = np.zeros((rows, size), np.int64)
            for group, rng in ((members, member_rng), (nonmembers, nonmember_rng)):
                picks = group[rng.integers(0, group.size, size=(rows, group.size))]     # [rows, n_group]
                flat = (picks + size * np.arange(rows)[:, None]).ravel()
                counts += np.bincount(flat, minlength=rows * size).reshape(rows, size)
            yield counts
        return
    groups = np.asarray(groups).ravel()
    if groups.shape != labels.shape or not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"groups must be [{size}] integers; got shape {groups.shape}, dtype {groups.dtype}.")
    ids, index = np.unique(groups, return_inverse=True)
    if ids.size < 2:
        raise ValueError(f"groups holds {ids.size} group; a cluster bootstrap needs at least 2.")
    has_member = np.bincount(index, weights=labels, minlength=ids.size) > 0
    has_nonmember = np.bincount(index, weights=~labels, minlength=ids.size) > 0
    rng = np.random.default_rng(seed)
    chunk = max(1, chunk_elements // max(size, ids.size))
    done = 0
    while done < num_resamples:
        rows = min(chunk, num_resamples - done)
        picks = rng.integers(0, ids.size, size=(rows, ids.size))
        picks = picks[has_member[picks].any(axis=1) & has_nonmember[picks].any(axis=1)]
        multiplicity = np.zeros((picks.shape[0], ids.size), np.int64)
        np.add.at(multiplicity, (np.arange(picks.shape[0])[:, None], picks), 1)
        if picks.shape[0]:
            yield multiplicity[:, index]
        done += picks.shape[0]


def bootstrap_auc(scores: np.ndarray, labels: np.ndarray, num_resamples: int = 1000, seed: int = 0,
                  chunk_elements: int = BOOTSTRAP_CHUNK_ELEMENTS, groups: np.ndarray | None = None) -> np.ndarray:
    """AUCs of bootstrap resamples (``bootstrap_counts``): stratified, or, with ``groups``, of whole groups.

    Scores that share a source of variation are not independent: pooled over models, the scores of one candidate
    under every model share its difficulty. Resampling candidates (``groups`` = the candidate of each score)
    keeps that dependence, so the interval is not narrower than the data support.

    Args:
      scores: ``[N]`` finite attack scores.
      labels: ``[N]`` 1 for members.
      num_resamples, seed, chunk_elements, groups: as ``bootstrap_counts``.

    Returns:
      ``[B]`` resampled AUCs; ``np.quantile(out, [alpha / 2, 1 - alpha / 2])`` is the percentile interval.
    """
    scores, labels = _validate_scores(scores, labels)
    return np.concatenate([resampled_auc(scores, labels, counts)
                           for counts in bootstrap_counts(labels, num_resamples, seed, chunk_elements, groups)])


def bootstrap_tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float | np.ndarray,
                         num_resamples: int = 1000, seed: int = 0, chunk_elements: int = BOOTSTRAP_CHUNK_ELEMENTS,
                         groups: np.ndarray | None = None) -> np.ndarray:
    """``tpr_at_fpr`` of bootstrap resamples (``bootstrap_counts``), the threshold chosen anew in each, so the
    spread includes the threshold's own noise (from the non-members) and, with ``groups``, the dependence
    between scores of one group.

    Returns:
      ``[B, F]`` TPRs (``[B]`` for a scalar ``fpr``).
    """
    scores, labels = _validate_scores(scores, labels)
    return np.concatenate([resampled_tpr_at_fpr(scores, labels, counts, fpr)
                           for counts in bootstrap_counts(labels, num_resamples, seed, chunk_elements, groups)])
