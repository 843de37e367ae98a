"""Gradient inversion of what a run's clients really sent: the messages in its taps.

``invert_taps`` takes an ``Experiment`` and the ``Tap``s of a run (``Results.taps``, or ``Experiment.tap``)
and attacks each (round, client) message as it left the client, i.e. after local training with the
client's own settings and the library's message pipeline (pruning, top-k, clipping, noise, quantization).
The attacker knows what the server knows:

* the server parameters of that round and the client's ``local_steps``, ``lr``, data size n (the FedAvg
  weight), clip norm, noise multiplier and the stages on for it;
* its pruning mask: magnitude masks are recomputed from the server parameters with the client's sparsity
  (and the round's sparsity under an iterative schedule), exactly as ``client.local.client_update`` does;
  random masks are read off the zeros of the message's prunable leaves;
* every coordinate it received: the nonzero ones are matched, and the zeros bound the true update (a magnitude
  sparsifier or a quantizer zeroes only entries below the smallest one it sends, an unsparsified message's
  zeros are exact; after random-k a zero says nothing), so a defense that leaves the message unchanged leaves
  the attack unchanged;
* nothing about the message's scale: the attack runs with L2 matching and with the scale-free cosine (and,
  for pruned clients, with and without the mask), and the strongest of these attackers is reported per group
  of clients with the same public settings (``InversionReport.attacker`` names it), so a clip that only
  rescales the message is not credited as protection.

Regime. The attacker simulates the client's local training on its candidate inputs as ``local_steps``
full-batch SGD steps over all n examples (``inversion.simulate_message``). This is EXACT when the client
samples fixed-size batches with ``batch_size >= n`` (every step uses all its examples, in an order that the
mean loss ignores) and uses no mixup, no DP-SGD, no FedProx and no gradient correction (the simulation runs
the run's own local optimizer, ``client.local.local_sgd``, with its momentum); evaluate on clients whose data
size equals their batch size (e.g. a population built with ``from_client_lists``). Otherwise it is an
approximation (Poisson batches, minibatches, mixup and DP-SGD noise are what the attacker cannot model),
so the loss in reconstruction quality is part of the defense's effect; each target records ``exact``.

FedSGD probe. ``fedsgd_probe`` builds the messages some clients of a run send in one local step over a few of
their examples from the run's initial model (their settings, calibrated noise and keys), the regime where an
undefended message is invertible, so that defenses are told apart by what they destroy (``attack-eval``'s
default, ``AttackSuite.inversion_batch``).

Scoring. Messages are invariant to the order of the examples, so reconstructions are matched to the true
examples by an optimal assignment on MSE (``scipy.optimize.linear_sum_assignment``). PSNR is uncapped (+inf
for an exact reconstruction); SSIM uses a Gaussian window of 7 pixels on images smaller than 11.

Secure aggregation. ``invert_aggregates`` is the server behind secure aggregation: in each round it sees only
the aggregate of the cohort's messages, the weighted mean it applies (``aggregate_messages``, with the weights
of ``simulation.build_round``: data sizes or uniform), not any one message. It still knows each cohort client's
settings, data size n and magnitude-pruning mask, so it optimises candidate inputs for all N = sum n examples
of the cohort at once: each client's candidates go through that client's simulated local training (vmapped over
the clients of one size) and its message clip, and the simulated messages are aggregated with the server's
weights and matched to the aggregate. The distance is chosen for the cohort with what the server can know
without seeing a message: it cannot see whether a client was clipped, but the simulation clips each client's
message at its clip norm as the client does, so clipping leaves the scale known; cosine when some client adds
local noise, else L2. Under a sparsifier only the aggregate's nonzero coordinates are matched (then ``exact``
is False: each client's support is unknown). Labels ("counts") are the
cohort's label multiset read off the aggregate's output bias. The tap of each round must hold the round's whole
cohort (``round_participants``: tap every client); runs with client-level DP-FedAvg are refused (the server's
view is a clipped, noised sum the taps do not record). The aggregate does not say which client held which
example (for FedSGD with example weights it is the mean gradient of the union of the cohort's batches), so the
N reconstructions are matched to the cohort's N examples by one assignment by default (``match="cohort"``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

from fedjaxpriv.attacks import inversion, membership, metrics
from fedjaxpriv.client import dp
from fedjaxpriv.privacy.tracking import UNLIMITED

Params = Any

# Inverting Gradients' optimizer (signed Adam, box projection) with the distance chosen per target and label
# counts from the output bias; on 8x8 digits (pixels in [0, 1]) a TV weight of 1e-6 (1e-4 blurs the strokes).
DEFAULT_ATTACK = inversion.InversionConfig(method="inverting_gradients", num_iterations=1000, learning_rate=0.1,
                                           tv_weight=1e-6, labels="counts")


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
      loss: the final value of the attack objective (for an aggregate, the cohort's joint objective).
      aggregate_of: None when the client's own message was attacked; K when the attacked message was the
        aggregate of the round's cohort of K clients (``invert_aggregates``).
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
    aggregate_of: int | None = None


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

    def attacker(self) -> str:
        """The attackers that won, e.g. "l2 (6 targets); cosine, mask-aware (2 targets)" ("" without targets)."""
        names = [t.distance + (", mask-aware" if t.mask_aware else "") for t in self.targets]
        return "; ".join(f"{name} ({names.count(name)} target{'s' if names.count(name) > 1 else ''})"
                         for name in dict.fromkeys(names))

    def select(self, clients: Sequence[int] | None = None, rounds: Sequence[int] | None = None) -> "InversionReport":
        """The report restricted to some clients and/or rounds."""
        kept = tuple(t for t in self.targets if (clients is None or t.client in clients)
                     and (rounds is None or t.round in rounds))
        return dataclasses.replace(self, targets=kept)

    def relabel(self, ids: Sequence[int] | np.ndarray) -> "InversionReport":
        """The report with client ``i`` renamed ``ids[i]`` (a probe's clients by their ids in the run)."""
        ids = np.asarray(ids)
        return dataclasses.replace(
            self, targets=tuple(dataclasses.replace(t, client=int(ids[t.client])) for t in self.targets),
            skipped=tuple((r, int(ids[c]), why) for r, c, why in self.skipped))

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
        round, client, PSNR and SSIM (``inversion.save_image_grid``); ``per_target`` caps the examples per target."""
        inversion.save_image_grid(path, *self.grid_images(max_images, per_target))

    def grid_images(self, max_images: int = 16, per_target: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """What ``save_grid`` draws: originals ``[N, *input_shape]``, their matched reconstructions (same shape)
        and N titles (round, client, PSNR, SSIM), N <= ``max_images``.

        Raises:
          ValueError: if the report has no reconstructions.
        """
        originals, reconstructions, titles = [], [], []
        for t in self.targets:
            for i in range(len(t.originals) if per_target is None else min(per_target, len(t.originals))):
                if len(titles) == max_images:
                    break
                originals.append(t.originals[i])
                reconstructions.append(t.reconstructions[i])
                ssim = "" if np.isnan(t.example_ssim[i]) else f"\nSSIM {t.example_ssim[i]:.2f}"
                titles.append(f"r{t.round} c{t.client}\n{t.example_psnr[i]:.1f} dB{ssim}")
        if not titles:
            raise ValueError("the report has no reconstructions to draw.")
        return np.stack(originals), np.stack(reconstructions), titles


# ----------------------------------------------------------------------------------------------------------
# What the server knows about one client.


def _row(settings: Any, client: int) -> Any:
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[client], settings)


def _server_mask(experiment: Any, server_params: Params, message: Params, row: Any, round_number: int) -> Params | None:
    """The pruning mask the client trained under, as the server can know it (None: no pruning): magnitude
    pruning's from the run's own program; a random one read off the message, where a pruned weight's update is
    exactly 0."""
    program = experiment.program
    if program.spec.prune != "random":
        return program.server_known_mask(server_params, row, round_number)
    if program.scheduled_sparsity(float(row.prune_sparsity), round_number) <= 0:
        return None
    return jax.tree_util.tree_map(
        lambda m: (np.asarray(m) != 0).astype(np.float32) if np.ndim(m) >= 2 else np.ones(np.shape(m), np.float32),
        message)


def _sparsified(row: Any) -> bool:
    return bool(row.sparsity > 0 or row.topk_fraction < 1 or row.randk_fraction < 1)


@dataclasses.dataclass(frozen=True)
class _Target:
    round: int
    client: int
    index: int  # position among all targets: its key is fold_in(key, index)
    server_params: Params
    message: Params
    mask: Params
    support: Params
    unsent_bound: Params
    lr: float
    num_steps: int
    scale_invariant: bool
    exact: bool
    mask_aware: bool


def _sent_and_bounds(message: Params, row: Any) -> tuple[Params, Params]:
    """The coordinates the server received (the message's nonzero entries, 0/1) and, for each leaf, a bound on
    the magnitude of the true update where nothing arrived: a magnitude sparsifier (top-k, message pruning) or
    a quantizer zeroes only entries below the smallest one it sends, and an unsparsified message's zeros are
    exact, so the bound is the leaf's smallest nonzero magnitude (0 for an all-zero leaf); a random sparsifier
    (random-k) drops entries of any size, so there is no bound (inf)."""
    random_drop = bool(row.randk_fraction < 1)

    def bound(leaf: np.ndarray) -> np.ndarray:
        sent = np.abs(leaf[leaf != 0])
        value = np.inf if random_drop else (float(sent.min()) if sent.size else 0.0)
        return np.full(np.shape(leaf), value, np.float32)

    support = jax.tree_util.tree_map(lambda m: (m != 0).astype(np.float32), message)
    return support, jax.tree_util.tree_map(bound, message)


def target_spec(experiment: Any, batch_size: int) -> inversion.TargetSpec:
    """How the attacker simulates the local training of a run's client with ``batch_size`` examples: the run's
    local steps (``spec.max_steps``; each target's own count is traced) and local momentum, full-batch steps."""
    return inversion.TargetSpec(input_shape=tuple(experiment.population.input_shape),
                                num_classes=int(experiment.num_classes), batch_size=batch_size,
                                local_steps=int(experiment.spec.max_steps), momentum=float(experiment.spec.momentum))


def _client_target(experiment: Any, tap: Any, position: int, attack: inversion.InversionConfig, mask_aware: bool,
                   index: int) -> _Target:
    """What the server knows about the client at ``position`` of ``tap`` (its message, mask, settings)."""
    r, client = int(tap.round), int(np.asarray(tap.client_ids)[position])
    row = _row(experiment.settings, client)
    count = int(np.asarray(experiment.population.counts)[client])
    message = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf[position], np.float32), tap.messages)
    server = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float32), tap.start_of(position))
    start_known = tap.start_exact is None or bool(np.asarray(tap.start_exact)[position])
    mask = _server_mask(experiment, server, message, row, r)
    pruned = mask is not None
    # A random mask read off the message's zeros is exact only if nothing else zeroes or fills coordinates.
    mask_known = not (pruned and experiment.program.spec.prune == "random"
                      and (_sparsified(row) or row.local_noise_multiplier > 0))
    if not mask_aware:
        mask = None
    ones = jax.tree_util.tree_map(lambda leaf: np.ones(np.shape(leaf), np.float32), message)
    # Every coordinate the server received is matched; the zeros bound the true update (``_sent_and_bounds``).
    support, unsent_bound = _sent_and_bounds(message, row)
    invariant = attack.distance == "cosine"  # each attacker sets its own (``invert_taps``)
    return _Target(
        round=r, client=client, index=index, server_params=server, message=message,
        mask=ones if mask is None else mask, support=support, unsent_bound=unsent_bound, lr=float(row.lr),
        num_steps=int(row.local_steps), scale_invariant=bool(invariant),
        exact=(experiment.program.trains_by_full_batch_gd(row, count, server) and (mask is not None or not pruned)
               and mask_known and start_known), mask_aware=mask is not None)


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
            count = int(counts[client])
            if len(targets) == max_targets:
                skipped.append((r, client, f"max_targets={max_targets} reached"))
                continue
            if count == 0 or int(_row(experiment.settings, client).local_steps) == 0:
                skipped.append((r, client, "sent a zero update (no data or local_steps=0)"))
                continue
            if count > max_examples:
                skipped.append((r, client, f"{count} examples > max_examples={max_examples}"))
                continue
            targets.append(_client_target(experiment, tap, j, attack, mask_aware, len(targets)))
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


def _check_attack(attack: inversion.InversionConfig, psnr_threshold: float) -> None:
    if attack.labels == "known":
        raise ValueError("attack.labels='known' would hand the attacker the labels; use 'counts', 'soft' or 'idlg'.")
    if not math.isfinite(psnr_threshold):
        raise ValueError(f"psnr_threshold={psnr_threshold} must be a finite number of dB.")


def _invert_targets(experiment: Any, targets: Sequence[_Target], attack: inversion.InversionConfig, key: jax.Array,
                    chunk_size: int, data_range: float) -> dict[int, TargetInversion]:
    """Attacks every target (its own distance, mask and support) and scores it: {target index: result}."""
    population = experiment.population
    counts = np.asarray(population.counts)
    results: dict[int, TargetInversion] = {}
    for batch_size in sorted({int(counts[t.client]) for t in targets}):
        group = [t for t in targets if counts[t.client] == batch_size]
        spec = target_spec(experiment, batch_size)
        for start in range(0, len(group), chunk_size):
            chunk = group[start:start + chunk_size]
            width = min(chunk_size, 1 << (len(chunk) - 1).bit_length())
            padded = chunk + [chunk[-1]] * (width - len(chunk))
            out = inversion.invert_batch(  # the distance is per target, so one compiled attack serves all choices
                dataclasses.replace(attack, distance=None), spec, experiment.model.apply,
                _stack([t.server_params for t in padded]), _stack([t.message for t in padded]),
                jnp.stack([jax.random.fold_in(key, t.index) for t in padded]),
                local_lr=jnp.asarray([t.lr for t in padded], jnp.float32), params_per_target=True,
                masks=_stack([t.mask for t in padded]), supports=_stack([t.support for t in padded]),
                unsent_bounds=_stack([t.unsent_bound for t in padded]),
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
    return results


def _settings_key(settings: Any, client: int) -> tuple:
    """A client's public settings (every per-client field), to group the targets an attacker treats alike."""
    return tuple(tuple(np.ravel(np.asarray(leaf)[client]).tolist()) for leaf in jax.tree_util.tree_leaves(settings))


def _strength(results: Sequence[TargetInversion], threshold: float) -> tuple[float, float]:
    """How well an attacker did on some targets: (median batch PSNR, fraction of examples above ``threshold``)."""
    psnr = _quantile(np.array([t.psnr for t in results]), 0.5)
    above = float(np.mean(np.concatenate([t.example_psnr for t in results]) > threshold))
    return (-math.inf if math.isnan(psnr) else psnr), above


def invert_taps(
    experiment: Any,
    taps: Mapping[int, Any] | Sequence[Any],
    *,
    key: jax.Array,
    attack: inversion.InversionConfig | None = None,
    max_targets: int = 8,
    psnr_threshold: float = 20.0,
    clients: Sequence[int] | None = None,
    mask_aware: bool | None = None,
    max_examples: int = 64,
    chunk_size: int = 8,
) -> InversionReport:
    """Reconstructs the examples behind the tapped messages of a run (see the module docstring).

    The strongest of several attackers is reported: each matching distance (L2 and the scale-free cosine, or
    only ``attack.distance`` when it is set) and, for clients that pruned, with and without the pruning mask.
    For every group of targets with the same public settings (each defense of attack-eval is one), the attacker
    with the highest median PSNR (then fraction above the threshold) wins; each target records the distance
    and mask use that won, and ``InversionReport.attacker`` says which. Every coordinate the server received
    is matched, and the zeros bound the true update (``_sent_and_bounds``): a message that a defense leaves
    unchanged is attacked exactly as without it.

    Args:
      experiment: the ``Experiment`` (or ``DeviceExperiment``) that produced the taps.
      taps: ``Results.taps`` (round -> ``Tap``) or a sequence of ``Tap``; targets are taken round by round in
        tap order, only from the clients each tap holds (those that took part).
      key: PRNG key of the attack; target i uses ``fold_in(key, i)`` in every attacker.
      attack: the attack (default ``DEFAULT_ATTACK``). Labels must be "counts" (any batch), "soft", or "idlg"
        (batch-1 clients only); "known" is refused.
      max_targets: at most this many (round, client) targets; the rest are listed in ``skipped``.
      psnr_threshold: dB, for ``InversionReport.fraction_above_threshold``.
      clients: attack only these client ids (default: every tapped client).
      mask_aware: only the attacker that recomputes the client's pruning mask from the server parameters
        (True, what the server can do) or only the one that simulates the unpruned model (False); default both.
      max_examples: skip clients with more examples (the attack reconstructs all of them).
      chunk_size: at most this many targets per compiled call. A shorter chunk is padded to the next power of
        two (at most ``chunk_size``), so repeated calls with other taps or clients reuse a few compiled attacks
        per batch size and padding at most doubles the work.

    Returns:
      ``InversionReport``; ``report.summary()`` gives the flat metrics, ``report.save_grid(path)`` a picture.
    """
    attack = DEFAULT_ATTACK if attack is None else attack
    _check_attack(attack, psnr_threshold)
    for name, value in (("max_targets", max_targets), ("max_examples", max_examples), ("chunk_size", chunk_size)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1.")
    ordered = membership.ordered_taps(taps)
    aware, skipped = _collect(experiment, ordered, attack, clients, max_targets, max_examples, True)
    counts = np.asarray(experiment.population.counts)
    if attack.labels == "idlg" and any(counts[t.client] != 1 for t in aware):
        raise ValueError("attack.labels='idlg' needs batch-1 clients; use labels='counts' for larger ones.")
    pruned = any(t.mask_aware for t in aware)  # else the two attackers are one, with the targets collected
    masks = ([True, False] if mask_aware is None else [bool(mask_aware)]) if pruned else [False]
    unaware = _collect(experiment, ordered, attack, clients, max_targets, max_examples, False)[0] \
        if pruned and False in masks else aware
    distances = [attack.distance] if attack.distance is not None else ["l2", "cosine"]
    data_range = 1.0 if attack.box is None else float(attack.box[1] - attack.box[0])
    attempts: dict[tuple[str, bool], dict[int, TargetInversion]] = {}
    for distance in distances:
        for use_mask in masks:
            chosen = [dataclasses.replace(t, scale_invariant=distance == "cosine") for t in
                      (aware if use_mask else unaware)]
            attempts[(distance, use_mask)] = _invert_targets(experiment, chosen, attack, key, chunk_size, data_range)
    groups: dict[tuple, list[int]] = {}
    for t in aware:
        groups.setdefault(_settings_key(experiment.settings, t.client), []).append(t.index)
    results: dict[int, TargetInversion] = {}
    for indices in groups.values():
        best = max(attempts, key=lambda k: _strength([attempts[k][i] for i in indices], psnr_threshold))
        results.update({i: attempts[best][i] for i in indices})
    return InversionReport(targets=tuple(results[i] for i in sorted(results)), psnr_threshold=float(psnr_threshold),
                           attack=attack, skipped=tuple(skipped))


class FedSgdProbe(NamedTuple):
    """A FedSGD round of some clients of a run (``fedsgd_probe``): ``experiment`` holds them as clients 0..n-1,
    ``tap`` their messages, ``clients`` [n] their ids in the run."""

    experiment: Any
    tap: Any
    clients: np.ndarray


def fedsgd_probe(experiment: Any, clients: Sequence[int], examples: int, *, params: Params | None = None,
                 round_number: int = 1, **parts: Any) -> FedSgdProbe:
    """The messages ``clients`` send in a FedSGD version of round ``round_number`` of ``experiment``: each takes
    ONE local step over its first ``examples`` examples (all of them if it holds fewer), from the global model
    ``params`` (default: the run's initial model, as in its first round), with its own defenses: its settings row
    (clip, DP-SGD and local noise with the run's calibrated multipliers, mixup, pruning, Poisson rate, message
    stages) and the run's PRNG keys of that round.

    Why: the run's own messages come from many local steps over minibatches in an order only the client knows,
    which an attacker cannot replay, so their inversion fails with or without a defense and tells defenses
    apart by nothing. One step over a small batch is the regime the inversion literature attacks (Geiping et
    al. 2020) and one the attacker models exactly without a defense, so a defense is credited only for what it
    destroys in a message that is invertible without it. The server's DP (DP-FedAvg) is left out: the server
    clips and noises the aggregate after it has seen each message, so it does not change what it sees.

    Args:
      experiment: the run (``Experiment``); its model, task, config and calibrated per-client settings are used.
      clients: the client ids probed (clients without examples are left out).
      examples: >= 1 examples per probed client.
      params: the global model the round starts from (default the run's initial model).
      round_number: the round (1-based) whose keys and pruning schedule apply.
      parts: ``Experiment`` keyword arguments the run was built with (``model=``, ``loss=``,
        ``message_transform=``, ``extra_settings=``), used again for the probe.

    Returns:
      ``FedSgdProbe``: ``invert_taps(probe.experiment, [probe.tap], ...)`` attacks it, and
      ``report.relabel(probe.clients)`` names the run's clients.
    """
    from fedjaxpriv.config import with_overrides
    from fedjaxpriv.data.federated import from_client_lists
    from fedjaxpriv.experiment import Experiment
    from fedjaxpriv.parallel import replicate

    if examples < 1 or round_number < 1:
        raise ValueError(f"examples={examples} and round_number={round_number} must be >= 1.")
    population = experiment.population
    outside = [int(c) for c in clients if not 0 <= int(c) < population.num_clients]
    if outside:
        raise ValueError(f"clients {outside} are not in the run: ids must be in [0, {population.num_clients}).")
    ids = np.asarray([c for c in clients if population.counts[c] > 0], np.int64)
    if ids.size == 0:
        raise ValueError(f"clients={list(clients)} hold no examples; probe clients that do.")
    shards = [population.client(int(c)) for c in ids]
    probe_data = from_client_lists([d.x[:examples] for d in shards], [d.y[:examples] for d in shards])
    counts = np.asarray(probe_data.counts)
    rows = jax.tree_util.tree_map(lambda a: np.asarray(a)[ids], experiment.settings)
    poisson = np.asarray(rows.poisson, bool)
    settings = rows._replace(
        local_steps=np.minimum(np.asarray(rows.local_steps), 1).astype(np.int32),
        batch_size=np.where(poisson, np.maximum(1, np.rint(np.asarray(rows.sample_rate) * counts)),
                            counts).astype(np.int32))
    rounds = max(int(experiment.config.run.rounds), round_number)
    config = with_overrides(experiment.config, {
        "name": f"{experiment.config.name} fedsgd probe", "data.num_clients": int(ids.size),
        "server.clients_per_round": int(ids.size), "server.client_sampling": "uniform",
        "server.central_clip_norm": math.inf, "server.central_noise_multiplier": 0.0, "server.target_epsilon": None,
        "server.adaptive_clip_quantile": None,
        "client.target_epsilon": None, "devices.policy": "none", "run.rounds": rounds,
        "run.tap_clients": list(range(ids.size)), "run.tap_rounds": [round_number], "run.checkpoint_every": 0})
    # A plain Experiment: the run's settings rows already hold what a device policy chose for these clients.
    probe = Experiment(config, population=probe_data, test=experiment.test, num_classes=experiment.num_classes,
                       settings=settings, targets=np.full(ids.size, np.inf), data_from_config=True, progress=False,
                       **parts)
    start = experiment.initial_params if params is None else params
    state = probe.fresh_state(start)._replace(round=jnp.asarray(round_number - 1, jnp.int32))
    return FedSgdProbe(probe, probe.tap(replicate(state, probe.mesh), list(range(ids.size))), ids)


# ----------------------------------------------------------------------------------------------------------
# The server behind secure aggregation: it sees each round's aggregate, not one client's message.


@dataclasses.dataclass(frozen=True)
class _Cohort:
    """Static part of a cohort attack: the cohort's data sizes, in cohort order (client k holds rows
    ``offsets[k] : offsets[k] + sizes[k]`` of the joint candidate batch ``[N, *input_shape]``), and which
    stages the attack models (static, so a round compiles only the stages it needs)."""

    base: inversion.TargetSpec  # ``target_spec`` of the run, for any data size
    sizes: tuple[int, ...]
    clipped: bool  # some client has a finite clip norm: the simulation clips each message
    masked: bool  # some client trains under a pruning mask the server knows
    scale_invariant: bool  # cosine (True) or L2 (False) matching

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def offsets(self) -> np.ndarray:
        return np.cumsum((0,) + self.sizes[:-1])

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    @property
    def local_steps(self) -> int:
        return self.base.local_steps

    def spec(self, size: int) -> inversion.TargetSpec:
        return dataclasses.replace(self.base, batch_size=size)

    def groups(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """(data size, positions of the clients of that size) per distinct size, ascending."""
        return tuple((size, tuple(k for k, s in enumerate(self.sizes) if s == size))
                     for size in sorted(set(self.sizes)))


@dataclasses.dataclass(frozen=True)
class _CohortView:
    """What the server behind secure aggregation knows of one round."""

    round: int
    client_ids: np.ndarray  # [K], ascending
    targets: tuple[_Target, ...]  # per cohort client: its settings, mask, and message (only summed)
    weights: np.ndarray  # [K] float32
    aggregate: Params
    support: Params | None  # None: every coordinate is matched
    scale_invariant: bool
    exact: bool


def round_participants(experiment: Any, round_number: int) -> np.ndarray:
    """Ids ``[K]`` (ascending) of the clients whose messages the server aggregates in round ``round_number``
    (1-based): the sampled cohort (``experiment.cohort``, which drops a ``DeviceExperiment``'s unavailable
    devices), less the clients whose planned participations were spent (replayed from round 1 as
    ``Experiment.run`` records them) and the clients without data (weight 0)."""
    if round_number < 1:
        raise ValueError(f"round_number={round_number} must be >= 1 (rounds are 1-based).")
    tracker = (experiment.new_privacy_tracker()
               if np.any(np.asarray(experiment.participation_budget) < UNLIMITED) else None)
    for index in range(0 if tracker is not None else round_number - 1, round_number):
        cohort = experiment.round_cohort(index, tracker)[0] if tracker is not None else experiment.cohort(index)
        if tracker is not None and index < round_number - 1:
            tracker.record_round(cohort.ids[cohort.mask])
    ids = np.asarray(cohort.ids)[cohort.mask]
    return np.sort(ids[np.asarray(experiment.population.counts)[ids] > 0]).astype(np.int64)


def _server_weights(experiment: Any, client_ids: np.ndarray) -> np.ndarray:
    """``[K]`` float32 aggregation weights of the round (``simulation.AggregationSpec.client_weight``)."""
    counts = np.asarray(experiment.population.counts)[np.asarray(client_ids)].astype(np.float32)
    return np.asarray(experiment.program.aggregation.client_weight(counts, counts > 0), np.float32)


@jax.jit
def aggregate_messages(messages: Params, weights: jax.Array | np.ndarray) -> Params:
    """The mean delta the server applies, ``sum_k w_k m_k / max(sum_k w_k, 1e-12)`` as ``simulation.build_round``
    forms it without client-level DP. ``messages``: leaves ``[K, ...]``; ``weights``: ``[K]``; leaves ``[...]``."""
    weights = jnp.asarray(weights, jnp.float32)
    denominator = jnp.maximum(jnp.sum(weights), 1e-12)
    return jax.tree_util.tree_map(
        lambda m: jnp.sum(weights.reshape((-1,) + (1,) * (m.ndim - 1)) * m, axis=0) / denominator, messages)


def _cohort_ids(experiment: Any, tap: Any) -> tuple[np.ndarray, list[int]]:
    """(participant ids [K], their positions in ``tap``); raises unless the tap holds the whole cohort."""
    if experiment.client_level is not None:
        raise ValueError("the run uses client-level DP-FedAvg (server.central_clip_norm / "
                         "central_noise_multiplier): the server sees a clipped, noised sum whose clip norm and noise "
                         "the taps do not record; invert_aggregates covers runs without it.")
    r = int(tap.round)
    ids = round_participants(experiment, r)
    tapped = np.asarray(tap.client_ids).tolist()
    missing = sorted(set(ids.tolist()) - set(tapped))
    if missing:
        raise ValueError(f"round {r}: the tap lacks {len(missing)} of the {len(ids)} clients whose messages the "
                         f"server aggregates (missing client ids {missing}); the aggregate needs the whole cohort: "
                         "tap every client (run.tap_clients=tuple(range(data.num_clients))).")
    return ids, [tapped.index(c) for c in ids.tolist()]


def server_aggregate(experiment: Any, tap: Any) -> Params:
    """The aggregate the server sees in the round of ``tap`` (which must hold the round's whole cohort)."""
    ids, positions = _cohort_ids(experiment, tap)
    messages = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float32)[np.asarray(positions)], tap.messages)
    return jax.tree_util.tree_map(np.asarray, aggregate_messages(messages, _server_weights(experiment, ids)))


def _cohort_view(experiment: Any, tap: Any, ids: np.ndarray, positions: Sequence[int],
                 attack: inversion.InversionConfig, mask_aware: bool) -> _CohortView:
    """The server's view of the round of ``tap``, whose cohort ``ids`` [K] sit at ``positions`` of the tap."""
    # A random pruning mask is read off a single message's zeros, which the server does not see.
    aware = mask_aware and experiment.spec.prune != "random"
    targets = tuple(_client_target(experiment, tap, j, attack, aware, k) for k, j in enumerate(positions))
    weights = _server_weights(experiment, ids)
    aggregate = jax.tree_util.tree_map(np.asarray, aggregate_messages(_stack([t.message for t in targets]), weights))
    rows = [_row(experiment.settings, c) for c in ids.tolist()]
    sparsified = any(_sparsified(row) for row in rows)
    support = jax.tree_util.tree_map(lambda a: (a != 0).astype(np.float32), aggregate) if sparsified else None
    # Clipping does not hide the scale here (the simulation clips each message as its client does); noise does.
    invariant = (attack.distance == "cosine" if attack.distance is not None else
                 any(row.local_noise_multiplier > 0 for row in rows))
    return _CohortView(round=int(tap.round), client_ids=ids, targets=targets, weights=weights, aggregate=aggregate,
                       support=support, scale_invariant=bool(invariant),
                       exact=all(t.exact for t in targets) and not sparsified)


def _safe_norm(tree: Params) -> jax.Array:
    """Global L2 norm with a finite gradient at zero (a client with no steps sends zeros)."""
    squares = sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree_util.tree_leaves(tree))
    return jnp.sqrt(jnp.maximum(squares, jnp.finfo(jnp.float32).tiny))


def _group_rows(cohort: _Cohort, take: np.ndarray, size: int) -> np.ndarray:
    """Rows ``[K_g, size]`` of the joint batch held by the clients at positions ``take``."""
    return cohort.offsets[take][:, None] + np.arange(size)


def _in_order(cohort: _Cohort, parts: Sequence[Any], rows: bool) -> Any:
    """Per-group outputs (leaves ``[K_g, ...]`` in ``cohort.groups()`` order) put in cohort order: leaves
    ``[K, ...]``, or with ``rows`` (leaves ``[K_g, size, ...]``) the joint batch's rows, leaves ``[N, ...]``."""
    if rows:
        parts = [jax.tree_util.tree_map(lambda leaf: leaf.reshape((-1,) + leaf.shape[2:]), part) for part in parts]
        order = np.concatenate([_group_rows(cohort, np.asarray(positions), size).ravel()
                                for size, positions in cohort.groups()])
    else:
        order = np.concatenate([np.asarray(positions) for _, positions in cohort.groups()])
    inverse = np.argsort(order)
    return jax.tree_util.tree_map(lambda *leaves: jnp.concatenate(leaves)[inverse], *parts)


def _take(tree: Params | None, take: np.ndarray) -> Params | None:
    return None if tree is None else jax.tree_util.tree_map(lambda leaf: leaf[take], tree)


def _simulate_aggregate(cohort: _Cohort, apply: inversion.ApplyFn, params: Params, x: jax.Array,
                        probs: jax.Array, lrs: jax.Array, steps: jax.Array, clips: jax.Array,
                        masks: Params | None, weights: jax.Array) -> Params:
    """The aggregate the cohort would produce from candidates ``x [N, ...]`` with label distributions ``probs
    [N, C]``: each client's local training (``inversion.simulate_message``, vmapped over the clients of one data
    size, with its ``lrs``/``steps`` ``[K]`` and ``masks`` leaves ``[K, ...]`` or None), its message clip
    (``clips [K]``, inf: none), then ``aggregate_messages`` with ``weights [K]``. Leaves like ``params``."""
    parts = []
    for size, positions in cohort.groups():
        take = np.asarray(positions)
        rows = _group_rows(cohort, take, size)

        def one(xk: jax.Array, pk: jax.Array, lr: jax.Array, num: jax.Array, clip: jax.Array,
                mask: Params | None, size: int = size) -> Params:
            message = inversion.simulate_message(cohort.spec(size), apply, params, xk, pk, lr, mask=mask,
                                                 num_steps=num)
            if not cohort.clipped:
                return message
            scale = dp.clip_scale(_safe_norm(message), clip)
            return jax.tree_util.tree_map(lambda leaf: leaf * scale, message)

        parts.append(jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None if masks is None else 0))(
            x[rows], probs[rows], lrs[take], steps[take], clips[take], _take(masks, take)))
    return aggregate_messages(_in_order(cohort, parts, rows=False), weights)


def _initial_candidates(config: inversion.InversionConfig, cohort: _Cohort, keys_x: jax.Array,
                        keys_y: jax.Array) -> dict[str, jax.Array]:
    """Dummy inputs ``x [N, ...]`` (and ``label_logits [N, C]`` for soft labels): client k's rows drawn from
    ``keys_x[k]`` (``keys_y[k]``) as ``inversion.invert_one`` draws a batch of its size."""
    def draw(fn: Any, keys: jax.Array) -> jax.Array:
        return _in_order(cohort, [jax.vmap(functools.partial(fn, size))(keys[np.asarray(positions)])
                                  for size, positions in cohort.groups()], rows=True)

    z0 = {"x": draw(lambda size, key: inversion._initial_inputs(config, cohort.spec(size), key), keys_x)}
    if config.labels == "soft":
        z0["label_logits"] = draw(lambda size, key: jax.random.normal(key, (size, cohort.num_classes), jnp.float32),
                                  keys_y)
    return z0


def _union_labels(config: inversion.InversionConfig, cohort: _Cohort, apply: inversion.ApplyFn, params: Params,
                  target: Params, keys_y: jax.Array, lrs: jax.Array, steps: jax.Array, masks: Params | None,
                  weights: jax.Array) -> jax.Array:
    """The N labels of the whole cohort read off the aggregate's output bias (``inversion.label_counts`` at
    batch N) -> int32 ``[N]`` sorted by class, so client k gets a contiguous run of them. The mean prediction is
    the data-size-weighted mean of each client's probe (``keys_y [K]``, on its masked model), the step scale the
    weighted mean of ``lr x steps``: exact to first order when the clients share ``lr x steps``, the weights are
    proportional to n and nobody clips (the scale is fitted, as ``label_counts`` does, when a client may)."""
    bias = inversion.last_layer_bias(target)
    if bias is None:
        raise ValueError("labels='counts' needs an output-layer bias in the message; the last layer has none.")

    def probe(size: int, key: jax.Array, mask: Params | None) -> jax.Array:
        start = params if mask is None else inversion.restrict(params, mask)
        return inversion._mean_prediction(config, cohort.spec(size), apply, start, key)

    mean = 0.0
    for size, positions in cohort.groups():
        take = np.asarray(positions)
        probes = jax.vmap(functools.partial(probe, size), in_axes=(0, None if masks is None else 0))(
            keys_y[take], _take(masks, take))
        mean = mean + (size / cohort.total) * jnp.sum(probes, axis=0)
    shares = weights / jnp.maximum(jnp.sum(weights), 1e-12)
    step_scale = jnp.float32(1.0) if cohort.local_steps == 0 else jnp.sum(shares * lrs * steps)
    # A clip rescales a client's bias part by a factor the server cannot see: fit the scale then.
    return inversion.label_counts(bias if cohort.local_steps else -bias, mean, cohort.total, step_scale,
                                  not (cohort.scale_invariant or cohort.clipped))


@functools.partial(jax.jit, static_argnames=("config", "cohort", "apply"))
def _invert_cohort(config: inversion.InversionConfig, cohort: _Cohort, apply: inversion.ApplyFn, params: Params,
                   target: Params, keys: jax.Array, lrs: jax.Array, steps: jax.Array, clips: jax.Array,
                   masks: Params | None, weights: jax.Array, support: Params | None) -> inversion.InversionResult:
    """Jointly reconstructs the cohort's N examples from its aggregate ``target`` (``inversion.invert_one``'s
    optimisation, with ``_simulate_aggregate`` as the message). ``keys [K]``: client k's dummy inputs and label
    probe use ``keys[k]`` as ``invert_one`` uses its key. Returns ``InversionResult(x [N, ...], y [N], loss)``."""
    inversion._check_call(config, cohort.spec(cohort.total))
    target = inversion.restrict(target, support)
    split = jax.vmap(jax.random.split)(keys)  # [K, 2]
    z0 = _initial_candidates(config, cohort, split[:, 0], split[:, 1])
    fixed_labels = None
    if config.labels != "soft" and cohort.total == 1:  # iDLG, as invert_one at batch 1
        kernel = inversion.last_layer_kernel(target)
        fixed_labels = inversion.idlg_label(kernel if cohort.local_steps == 0 else -kernel)[None]
    elif config.labels != "soft":  # counts
        fixed_labels = _union_labels(config, cohort, apply, params, target, split[:, 1], lrs, steps, masks, weights)

    def label_probs(z: dict[str, jax.Array]) -> jax.Array:
        if fixed_labels is None:
            return jax.nn.softmax(z["label_logits"], axis=-1)
        return jax.nn.one_hot(fixed_labels, cohort.num_classes, dtype=jnp.float32)

    def objective(z: dict[str, jax.Array]) -> jax.Array:
        message = inversion.restrict(_simulate_aggregate(cohort, apply, params, z["x"], label_probs(z), lrs, steps,
                                                         clips, masks, weights), support)
        distance = inversion.cosine_distance if cohort.scale_invariant else inversion.l2_distance
        value = distance(message, target)
        if config.method == "inverting_gradients" and config.tv_weight > 0:
            value = value + config.tv_weight * inversion.total_variation(z["x"])
        return value

    run = inversion._run_lbfgs if config.method == "dlg" else inversion._run_signed_adam
    z, loss = run(objective, z0, config)
    x_hat = z["x"] if config.box is None else jnp.clip(z["x"], *config.box)
    return inversion.InversionResult(x_hat, jnp.argmax(label_probs(z), axis=-1).astype(jnp.int32), loss)


def _attack_cohort(experiment: Any, view: _CohortView, attack: inversion.InversionConfig,
                   key: jax.Array) -> tuple[np.ndarray, np.ndarray, float]:
    """Runs the joint attack on one round -> (reconstructions [N, ...], labels [N], loss)."""
    counts = np.asarray(experiment.population.counts)
    rows = [_row(experiment.settings, c) for c in view.client_ids.tolist()]
    clips = np.array([float(row.clip_norm) for row in rows], np.float32)
    cohort = _Cohort(base=target_spec(experiment, 1), sizes=tuple(int(counts[c]) for c in view.client_ids.tolist()),
                     clipped=bool(np.any(np.isfinite(clips))), masked=any(t.mask_aware for t in view.targets),
                     scale_invariant=view.scale_invariant)
    out = _invert_cohort(
        dataclasses.replace(attack, distance=None), cohort, experiment.model.apply,
        view.targets[0].server_params, view.aggregate,
        jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(len(view.targets))),
        jnp.asarray([t.lr for t in view.targets], jnp.float32),
        jnp.asarray([t.num_steps for t in view.targets], jnp.float32), jnp.asarray(clips),
        _stack([t.mask for t in view.targets]) if cohort.masked else None, jnp.asarray(view.weights),
        view.support)
    x, y, loss = (np.asarray(a) for a in out)
    return x, y, float(loss)


def _cohort_inversions(experiment: Any, view: _CohortView, x: np.ndarray, y: np.ndarray, loss: float,
                       data_range: float, match: str) -> list[TargetInversion]:
    """One ``TargetInversion`` per cohort client from the joint reconstruction ``x [N, ...]``, ``y [N]``:
    ``match="cohort"`` assigns all N reconstructions to all N true examples at once and gives each client its
    examples' matches; ``match="client"`` assigns within each client's own rows of the candidate batch."""
    data = [experiment.population.client(c) for c in view.client_ids.tolist()]
    originals = [np.asarray(d.x, np.float32) for d in data]
    spans = list(itertools.pairwise(np.cumsum([0] + [len(o) for o in originals])))
    if match == "cohort":
        order, mse, psnr, ssim, _ = _score(np.concatenate(originals), x, data_range)
        pieces = [(order[a:b], mse[a:b], psnr[a:b], ssim[a:b]) for a, b in spans]
    else:
        pieces = []
        for (a, b), o in zip(spans, originals):
            order, mse, psnr, ssim, _ = _score(o, x[a:b], data_range)
            pieces.append((order + a, mse, psnr, ssim))
    out = []
    for t, d, o, (order, mse, psnr, ssim) in zip(view.targets, data, originals, pieces):
        with np.errstate(divide="ignore"):
            batch_psnr = float(10.0 * np.log10(data_range**2 / np.mean(mse)))
        out.append(TargetInversion(
            round=view.round, client=t.client, originals=o, reconstructions=x[order],
            labels=np.asarray(d.y, np.int32), predicted_labels=y[order], example_psnr=psnr, example_ssim=ssim,
            psnr=batch_psnr, ssim=float(np.mean(ssim)), distance="cosine" if view.scale_invariant else "l2",
            exact=view.exact, mask_aware=t.mask_aware, loss=loss, aggregate_of=len(view.targets)))
    return out


def invert_aggregates(
    experiment: Any,
    taps: Mapping[int, Any] | Sequence[Any],
    *,
    key: jax.Array,
    attack: inversion.InversionConfig | None = None,
    max_rounds: int = 4,
    psnr_threshold: float = 20.0,
    mask_aware: bool = True,
    max_examples: int = 64,
    match: str = "cohort",
) -> InversionReport:
    """Gradient inversion by a server behind secure aggregation: per tapped round, reconstructs every cohort
    client's examples from the round's aggregate alone (see the module docstring).

    Args:
      experiment: the ``Experiment`` (or ``DeviceExperiment``) that produced the taps.
      taps: ``Results.taps`` or a sequence of ``Tap``; each must hold the round's whole cohort (every client
        ``round_participants`` names; tap every client) or ``ValueError`` names the round and who is missing.
        Its messages serve only to form the aggregate the server sees.
      key: PRNG key; the i-th attacked round uses ``fold_in(key, i)``, its k-th client (ascending ids)
        ``fold_in(fold_in(key, i), k)`` as ``invert_taps`` uses its target key.
      attack: as in ``invert_taps`` (default ``DEFAULT_ATTACK``); ``attack.distance=None`` picks the distance per
        round (cosine when a cohort client adds local noise, else L2); "counts" labels are the cohort's label
        multiset from the aggregate's output bias, "idlg" needs a cohort of one batch-1 client.
      max_rounds: attack at most this many rounds (the rest go to ``skipped``).
      psnr_threshold: dB, for ``InversionReport.fraction_above_threshold``.
      mask_aware: train each client's simulation under its magnitude-pruning mask recomputed from the server
        parameters (a random mask cannot be: the server sees no single message).
      max_examples: skip rounds whose cohort holds more examples in all (the attack reconstructs all of them).
      match: "cohort" (default) matches the N reconstructions to the cohort's N examples by one optimal
        assignment, so an example recovered in another client's rows counts; "client" matches within each
        client's rows only (which client held an example is not identifiable when clients share settings).

    Returns:
      ``InversionReport`` with one target per (round, cohort client), ``aggregate_of`` = the cohort size.
    """
    attack = DEFAULT_ATTACK if attack is None else attack
    _check_attack(attack, psnr_threshold)
    for name, value in (("max_rounds", max_rounds), ("max_examples", max_examples)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1.")
    if match not in ("cohort", "client"):
        raise ValueError(f"match={match!r}; choose 'cohort' or 'client'.")
    counts = np.asarray(experiment.population.counts)
    data_range = 1.0 if attack.box is None else float(attack.box[1] - attack.box[0])
    targets: list[TargetInversion] = []
    skipped: list[tuple[int, int, str]] = []
    attacked = 0
    for tap in membership.ordered_taps(taps):
        ids, positions = _cohort_ids(experiment, tap)
        total, r = int(counts[ids].sum()), int(tap.round)
        reason = (f"max_rounds={max_rounds} reached" if attacked == max_rounds else
                  f"the cohort holds {total} examples > max_examples={max_examples}" if total > max_examples else None)
        if reason is None and attack.labels == "idlg" and total != 1:
            raise ValueError(f"attack.labels='idlg' needs a cohort of one batch-1 client; round {r} aggregates "
                             f"{total} examples: use labels='counts'.")
        if reason is not None or total == 0:
            skipped.extend((r, int(c), reason) for c in ids.tolist())
            continue
        view = _cohort_view(experiment, tap, ids, positions, attack, mask_aware)
        x, y, loss = _attack_cohort(experiment, view, attack, jax.random.fold_in(key, attacked))
        targets.extend(_cohort_inversions(experiment, view, x, y, loss, data_range, match))
        attacked += 1
    return InversionReport(targets=tuple(targets), psnr_threshold=float(psnr_threshold), attack=attack,
                           skipped=tuple(skipped))
