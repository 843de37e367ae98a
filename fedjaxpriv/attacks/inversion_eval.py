"""Gradient inversion of what a run's clients really sent: the messages in its taps.

``invert_taps`` takes an ``Experiment`` and the ``Tap``s of a run (``Results.taps``, or ``Experiment.tap``)
and attacks each (round, client) message as it left the client, i.e. after local training with the
client's own settings and the library's message pipeline (pruning, top-k, clipping, noise, quantization).
The attacker knows what the server knows:

* the server parameters of that round and the client's ``num_steps``, ``lr``, data size n (the FedAvg
  weight), clip norm, noise multiplier and the stages on for it;
* its pruning mask: magnitude masks are recomputed from the server parameters with the client's sparsity
  (and the round's sparsity under an iterative schedule), exactly as ``client.local.client_update`` does;
  random masks are read off the zeros of the message's prunable leaves;
* which coordinates were sent: under a sparsifier (``message.sparsity``, top-k, random-k) only the nonzero
  coordinates of the message are matched, as the sparse encoding names them;
* whether the message's scale is known: clipped (finite clip norm and a message norm at the clip; within a
  factor 2 with a quantizer) or noised messages are matched with the scale-invariant cosine, others with L2.

Regime. The attacker simulates the client's local training on its candidate inputs as ``num_steps``
full-batch SGD steps over all n examples (``inversion.simulate_message``). This is EXACT when the client
samples fixed-size batches with ``batch_size >= n`` (every step uses all its examples, in an order that the
mean loss ignores) and uses no mixup, no DP-SGD, no FedProx and no momentum; evaluate on clients whose data
size equals their batch size (e.g. a population built with ``from_client_lists``). Otherwise it is an
approximation (Poisson batches, minibatches, mixup and DP-SGD noise are what the attacker cannot model),
so the loss in reconstruction quality is part of the defense's effect; each target records ``exact``.

Scoring. Messages are invariant to the order of the examples, so reconstructions are matched to the true
examples by an optimal assignment on MSE (``scipy.optimize.linear_sum_assignment``). PSNR is uncapped (+inf
for an exact reconstruction); SSIM uses a Gaussian window of 7 pixels on images smaller than 11.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import optimize

from fedjaxpriv.attacks import inversion, metrics
from fedjaxpriv.client import pruning

Params = Any

# Inverting Gradients' optimizer (signed Adam, box projection) with the distance chosen per target and label
# counts from the output bias; on 8x8 digits (pixels in [0, 1]) a TV weight of 1e-6 (1e-4 blurs the strokes).
DEFAULT_ATTACK = inversion.InversionConfig(method="inverting_gradients", num_iterations=1000, learning_rate=0.1,
                                           tv_weight=1e-6, labels="counts")
# A clipped message has norm clip_norm up to float error; a smaller one was not scaled.
CLIP_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class TargetInversion:
    """The attack on one (round, client) message.

    Attributes:
      round: the round (1-based) of the tap.
      client: the client id.
      originals: the client's true examples ``[n, *input_shape]``.
      reconstructions: ``[n, *input_shape]``, row i matched to ``originals[i]`` (optimal assignment on MSE).
      labels: ``[n]`` true labels.
      predicted_labels: ``[n]`` recovered labels of the matched reconstructions.
      example_psnr: ``[n]`` PSNR of each matched pair, dB (+inf when identical).
      example_ssim: ``[n]`` SSIM of each matched pair (NaN for non-image inputs).
      psnr: PSNR of the whole matched batch (from its mean MSE), dB.
      ssim: mean of ``example_ssim``.
      distance: "l2" or "cosine", the objective used.
      exact: whether the attacker's simulation of the local training is exact (see the module docstring).
      mask_aware: whether the attacker trained its simulation under the client's pruning mask (False also
        when the client did not prune).
      loss: the final value of the attack objective.
    """

    round: int
    client: int
    originals: np.ndarray
    reconstructions: np.ndarray
    labels: np.ndarray
    predicted_labels: np.ndarray
    example_psnr: np.ndarray
    example_ssim: np.ndarray
    psnr: float
    ssim: float
    distance: str
    exact: bool
    mask_aware: bool
    loss: float


def _quantile(values: np.ndarray, q: float) -> float:
    """Linear-interpolation quantile that keeps +inf (numpy gives NaN for inf - inf)."""
    ordered = np.sort(np.asarray(values, np.float64))
    if ordered.size == 0:
        return math.nan
    position = q * (ordered.size - 1)
    low, high = ordered[int(np.floor(position))], ordered[int(np.ceil(position))]
    fraction = position - np.floor(position)
    if low == high or fraction == 0.0:
        return float(low)
    return float(low + (high - low) * fraction)


def _spread(values: np.ndarray) -> tuple[float, float, float, float]:
    """(median, 25th percentile, 75th percentile, inter-quartile range); the range is 0 for equal quartiles."""
    q25, q50, q75 = (_quantile(values, q) for q in (0.25, 0.5, 0.75))
    return q50, q25, q75, (0.0 if q25 == q75 else q75 - q25)


@dataclasses.dataclass(frozen=True)
class InversionReport:
    """Reconstructions of every attacked target and their scores.

    Attributes:
      targets: one ``TargetInversion`` per attacked (round, client), in tap order.
      psnr_threshold: dB; ``fraction_above_threshold`` counts matched examples with a higher PSNR.
      attack: the attack's configuration.
      skipped: (round, client, reason) of the tapped messages left out.
    """

    targets: tuple[TargetInversion, ...]
    psnr_threshold: float
    attack: inversion.InversionConfig
    skipped: tuple[tuple[int, int, str], ...] = ()

    @property
    def psnr(self) -> np.ndarray:
        """Per-target batch PSNR ``[T]``, dB."""
        return np.array([t.psnr for t in self.targets], np.float64)

    @property
    def ssim(self) -> np.ndarray:
        """Per-target mean SSIM ``[T]``."""
        return np.array([t.ssim for t in self.targets], np.float64)

    @property
    def label_accuracy(self) -> float:
        """Fraction of matched examples whose recovered label is right (NaN without targets)."""
        hits = [t.predicted_labels == t.labels for t in self.targets]
        return float(np.mean(np.concatenate(hits))) if hits else math.nan

    @property
    def fraction_above_threshold(self) -> float:
        """Fraction of matched examples with PSNR above ``psnr_threshold`` (NaN without targets)."""
        values = [t.example_psnr for t in self.targets]
        return float(np.mean(np.concatenate(values) > self.psnr_threshold)) if values else math.nan

    def select(self, clients: Sequence[int] | None = None, rounds: Sequence[int] | None = None) -> "InversionReport":
        """The report restricted to some clients and/or rounds."""
        kept = tuple(t for t in self.targets if (clients is None or t.client in clients)
                     and (rounds is None or t.round in rounds))
        return dataclasses.replace(self, targets=kept)

    def summary(self) -> dict[str, float]:
        """Flat float metrics: median, quartiles and IQR of the per-target PSNR (dB) and SSIM over targets, label
        accuracy, the fraction of examples above the threshold, the threshold, and target counts."""
        out: dict[str, float] = {}
        for name, values in (("psnr", self.psnr), ("ssim", self.ssim)):
            median, q25, q75, iqr = _spread(values)
            out.update({f"{name}_median": median, f"{name}_q25": q25, f"{name}_q75": q75, f"{name}_iqr": iqr})
        out.update(label_accuracy=self.label_accuracy, fraction_above_threshold=self.fraction_above_threshold,
                   psnr_threshold=float(self.psnr_threshold), targets=float(len(self.targets)),
                   exact_fraction=float(np.mean([t.exact for t in self.targets])) if self.targets else math.nan)
        return out

    def save_grid(self, path: str, max_images: int = 16, per_target: int | None = None) -> None:
        """PNG of up to ``max_images`` originals (top) above their matched reconstructions, titled with the
        round, client and PSNR (``inversion.save_image_grid``); ``per_target`` caps the examples per target."""
        originals, reconstructions, titles = [], [], []
        for t in self.targets:
            for i in range(len(t.originals) if per_target is None else min(per_target, len(t.originals))):
                if len(titles) == max_images:
                    break
                originals.append(t.originals[i])
                reconstructions.append(t.reconstructions[i])
                titles.append(f"r{t.round} c{t.client}\n{t.example_psnr[i]:.1f} dB")
        if not titles:
            raise ValueError("the report has no reconstructions to draw.")
        inversion.save_image_grid(path, np.stack(originals), np.stack(reconstructions), titles)


# ----------------------------------------------------------------------------------------------------------
# What the server knows about one client.


def _row(settings: Any, client: int) -> Any:
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[client], settings)


def _round_sparsity(experiment: Any, sparsity: float, round_number: int) -> float:
    c = experiment.config.client
    if c.prune_end_round > c.prune_begin_round:
        return float(pruning.iterative_sparsity(round_number - 1, sparsity, c.prune_begin_round, c.prune_end_round))
    return float(sparsity)


def _server_mask(experiment: Any, server_params: Params, message: Params, row: Any, round_number: int) -> Params | None:
    """The pruning mask the client trained under, as the server can know it (None: no pruning)."""
    if experiment.spec.prune is None:
        return None
    sparsity = _round_sparsity(experiment, float(row.prune_sparsity), round_number)
    if sparsity <= 0:
        return None
    if experiment.spec.prune == "magnitude":
        mask = pruning.magnitude_mask(server_params, sparsity, scope=experiment.spec.prune_scope)
        return jax.tree_util.tree_map(np.asarray, mask)
    return jax.tree_util.tree_map(  # random: a pruned weight stays at zero, so its update is exactly 0
        lambda m: (np.asarray(m) != 0).astype(np.float32) if np.ndim(m) >= 2 else np.ones(np.shape(m), np.float32),
        message)


def _sparsified(row: Any) -> bool:
    return bool(row.message_sparsity > 0 or row.topk_fraction < 1 or row.randk_fraction < 1)


def _scale_unknown(message: Params, row: Any) -> bool:
    """Noised, or possibly clipped (finite clip norm and a message norm at it; within a factor 2 when a
    quantizer, which perturbs the norm, may follow the clip): the message's norm says nothing about the
    update's."""
    if row.local_noise_multiplier > 0:
        return True
    clip = float(row.update_clip_norm)
    if not math.isfinite(clip):
        return False
    quantized = bool(row.quant_levels > 0 or 0 < row.quant_bits < 32)
    tolerance = 0.5 if quantized else CLIP_TOLERANCE
    return float(optax.tree.norm(message)) >= (1.0 - tolerance) * clip


def _exact(experiment: Any, row: Any, count: int, pruned: bool, mask_aware: bool) -> bool:
    """Whether full-batch SGD over the client's n examples is exactly its local training."""
    return bool(not row.poisson and row.batch_size >= count and row.mixup_alpha == 0
                and row.dp_noise_multiplier == 0 and not math.isfinite(float(row.dp_clip_norm))
                and (row.prox_mu == 0 or not experiment.spec.prox) and experiment.spec.momentum == 0
                and (mask_aware or not pruned))


@dataclasses.dataclass(frozen=True)
class _Target:
    round: int
    client: int
    index: int  # position among all targets: its key is fold_in(key, index)
    server_params: Params
    message: Params
    mask: Params
    support: Params
    lr: float
    num_steps: int
    scale_invariant: bool
    exact: bool
    mask_aware: bool


def _as_taps(taps: Mapping[int, Any] | Sequence[Any]) -> list[Any]:
    items = list(taps.values()) if isinstance(taps, Mapping) else list(taps)
    return sorted(items, key=lambda tap: int(tap.round))


def _collect(experiment: Any, taps: list[Any], attack: inversion.InversionConfig, clients: Sequence[int] | None,
             max_targets: int, max_examples: int, mask_aware: bool) -> tuple[list[_Target], list[tuple[int, int, str]]]:
    targets: list[_Target] = []
    skipped: list[tuple[int, int, str]] = []
    counts = np.asarray(experiment.population.counts)
    for tap in taps:
        for j, client in enumerate(np.asarray(tap.client_ids).tolist()):
            if clients is not None and client not in clients:
                continue
            r = int(tap.round)
            row = _row(experiment.settings, client)
            count = int(counts[client])
            if len(targets) == max_targets:
                skipped.append((r, client, f"max_targets={max_targets} reached"))
                continue
            if count == 0 or int(row.num_steps) == 0:
                skipped.append((r, client, "sent a zero update (no data or num_steps=0)"))
                continue
            if count > max_examples:
                skipped.append((r, client, f"{count} examples > max_examples={max_examples}"))
                continue
            message = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf[j], np.float32), tap.messages)
            server = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float32), tap.server_params)
            mask = _server_mask(experiment, server, message, row, r)
            pruned = mask is not None
            # A random mask read off the message's zeros is exact only if nothing else zeroes or fills coordinates.
            mask_known = not (pruned and experiment.spec.prune == "random"
                              and (_sparsified(row) or row.local_noise_multiplier > 0))
            if not mask_aware:
                mask = None
            ones = jax.tree_util.tree_map(lambda leaf: np.ones(np.shape(leaf), np.float32), message)
            support = (jax.tree_util.tree_map(lambda m: (m != 0).astype(np.float32), message) if _sparsified(row)
                       else ones)
            if mask is not None:
                support = jax.tree_util.tree_map(np.multiply, support, mask)
            invariant = (attack.distance == "cosine" if attack.distance is not None
                         else _scale_unknown(message, row))
            targets.append(_Target(
                round=r, client=client, index=len(targets), server_params=server, message=message,
                mask=ones if mask is None else mask, support=support, lr=float(row.lr), num_steps=int(row.num_steps),
                scale_invariant=bool(invariant), exact=_exact(experiment, row, count, pruned, mask is not None) and mask_known,
                mask_aware=mask is not None))
    return targets, skipped


# ----------------------------------------------------------------------------------------------------------
# Scoring.


def _window(shape: tuple[int, ...]) -> int | None:
    if len(shape) != 3:
        return None
    side = min(shape[0], shape[1])
    return 11 if side >= 11 else (side if side % 2 else side - 1)


@functools.lru_cache(maxsize=None)
def _ssim_fn(window: int, data_range: float):
    return jax.jit(jax.vmap(functools.partial(metrics.ssim, data_range=data_range, window_size=window)))


def _score(originals: np.ndarray, reconstructions: np.ndarray, data_range: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Optimal assignment on MSE -> (order of the reconstructions, per-example MSE, PSNR, SSIM, batch PSNR)."""
    flat_x = originals.reshape(len(originals), -1).astype(np.float64)
    flat_r = reconstructions.reshape(len(reconstructions), -1).astype(np.float64)
    pair_mse = np.mean((flat_x[:, None, :] - flat_r[None, :, :]) ** 2, axis=-1)
    rows, cols = optimize.linear_sum_assignment(pair_mse)
    order = cols[np.argsort(rows)]
    mse = pair_mse[np.arange(len(originals)), order]
    with np.errstate(divide="ignore"):
        psnr = 10.0 * np.log10(data_range**2 / mse)
        batch_psnr = float(10.0 * np.log10(data_range**2 / np.mean(mse)))
    window = _window(originals.shape[1:])
    if window is None or window < 3:
        ssim = np.full(len(originals), np.nan)
    else:
        ssim = np.asarray(_ssim_fn(window, float(data_range))(jnp.asarray(reconstructions[order], jnp.float32),
                                                              jnp.asarray(originals, jnp.float32)), np.float64)
    return order, mse, psnr, ssim, batch_psnr


# ----------------------------------------------------------------------------------------------------------
# The attack.


def _stack(trees: Sequence[Params]) -> Params:
    return jax.tree_util.tree_map(lambda *leaves: jnp.asarray(np.stack(leaves)), *trees)


def invert_taps(
    experiment: Any,
    taps: Mapping[int, Any] | Sequence[Any],
    *,
    key: jax.Array,
    attack: inversion.InversionConfig | None = None,
    max_targets: int = 8,
    psnr_threshold: float = 20.0,
    clients: Sequence[int] | None = None,
    mask_aware: bool = True,
    max_examples: int = 64,
    chunk_size: int = 8,
) -> InversionReport:
    """Reconstructs the examples behind the tapped messages of a run (see the module docstring).

    Args:
      experiment: the ``Experiment`` (or ``DeviceExperiment``) that produced the taps.
      taps: ``Results.taps`` (round -> ``Tap``) or a sequence of ``Tap``; targets are taken round by round in
        tap order, only from the clients each tap holds (those that took part).
      key: PRNG key of the attack; target i uses ``fold_in(key, i)``.
      attack: the attack (default ``DEFAULT_ATTACK``). With ``attack.distance=None`` the distance is chosen per
        target (cosine for clipped or noised messages, else L2). Labels must be "counts" (any batch), "soft",
        or "idlg" (batch-1 clients only); "known" is refused.
      max_targets: at most this many (round, client) targets; the rest are listed in ``skipped``.
      psnr_threshold: dB, for ``InversionReport.fraction_above_threshold``.
      clients: attack only these client ids (default: every tapped client).
      mask_aware: recompute the client's pruning mask from the server parameters (True, what the server can
        do) or ignore it (False: the attacker simulates the unpruned model).
      max_examples: skip clients with more examples (the attack reconstructs all of them).
      chunk_size: targets per compiled call (a shorter chunk is padded), so repeated calls with other taps or
        clients reuse one compiled attack per batch size.

    Returns:
      ``InversionReport``; ``report.summary()`` gives the flat metrics, ``report.save_grid(path)`` a picture.
    """
    attack = DEFAULT_ATTACK if attack is None else attack
    if attack.labels == "known":
        raise ValueError("attack.labels='known' would hand the attacker the labels; use 'counts', 'soft' or 'idlg'.")
    for name, value in (("max_targets", max_targets), ("max_examples", max_examples), ("chunk_size", chunk_size)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1.")
    if not math.isfinite(psnr_threshold):
        raise ValueError(f"psnr_threshold={psnr_threshold} must be a finite number of dB.")
    targets, skipped = _collect(experiment, _as_taps(taps), attack, clients, max_targets, max_examples, mask_aware)
    population = experiment.population
    counts = np.asarray(population.counts)
    if attack.labels == "idlg" and any(counts[t.client] != 1 for t in targets):
        raise ValueError("attack.labels='idlg' needs batch-1 clients; use labels='counts' for larger ones.")
    data_range = 1.0 if attack.box is None else float(attack.box[1] - attack.box[0])
    results: dict[int, TargetInversion] = {}
    for batch_size in sorted({int(counts[t.client]) for t in targets}):
        group = [t for t in targets if counts[t.client] == batch_size]
        spec = inversion.TargetSpec(input_shape=population.input_shape, num_classes=experiment.num_classes,
                                    batch_size=batch_size, local_steps=int(experiment.spec.max_steps))
        for start in range(0, len(group), chunk_size):
            chunk = group[start:start + chunk_size]
            padded = chunk + [chunk[-1]] * (chunk_size - len(chunk))
            out = inversion.invert_batch(  # the distance is per target, so one compiled attack serves all choices
                dataclasses.replace(attack, distance=None), spec, experiment.model.apply,
                _stack([t.server_params for t in padded]), _stack([t.message for t in padded]),
                jnp.stack([jax.random.fold_in(key, t.index) for t in padded]),
                local_lr=jnp.asarray([t.lr for t in padded], jnp.float32), params_per_target=True,
                masks=_stack([t.mask for t in padded]), supports=_stack([t.support for t in padded]),
                num_steps=jnp.asarray([t.num_steps for t in padded], jnp.int32),
                scale_invariant=jnp.asarray([t.scale_invariant for t in padded]))
            xs, ys, losses = (np.asarray(a) for a in out)
            for i, t in enumerate(chunk):
                data = population.client(t.client)
                originals, labels = np.asarray(data.x, np.float32), np.asarray(data.y, np.int32)
                order, _, psnr, ssim, batch_psnr = _score(originals, xs[i], data_range)
                results[t.index] = TargetInversion(
                    round=t.round, client=t.client, originals=originals, reconstructions=xs[i][order],
                    labels=labels, predicted_labels=ys[i][order], example_psnr=psnr, example_ssim=ssim,
                    psnr=batch_psnr, ssim=float(np.mean(ssim)), distance="cosine" if t.scale_invariant else "l2",
                    exact=t.exact, mask_aware=t.mask_aware, loss=float(losses[i]))
    return InversionReport(targets=tuple(results[i] for i in sorted(results)), psnr_threshold=float(psnr_threshold),
                           attack=attack, skipped=tuple(skipped))
