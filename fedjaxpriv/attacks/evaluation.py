"""Defense-vs-attack evaluation: each defense at several strengths, trained for real and attacked on what the run
produced, per threat model (``THREAT_MODELS``; ``ATTACK_VIEWS`` says which view each attack uses).

``evaluate_defenses`` trains one experiment per defense point (dotted config overrides on a base config) and runs
``AttackSuite`` on it:

* participant (the released global models): membership inference by loss threshold (Yeom et al.), LiRA online
  and offline (Carlini et al. 2022) and RMIA (Zarifzadeh et al. 2024), with reference models from shadow
  federations that replay the same federated training (``membership_setup`` says why the pool is small);
* server (every message of every client in the rounds it took part in, from the run's taps): the passive
  update-based membership attack, gradient inversion of the real messages (``inversion_eval.invert_taps``:
  the attacker knows masks, clip norms, steps and batch sizes) and, on a population with a sensitive attribute
  (``data.dataset="attribute"``), attribute inference against its message-free baselines;
* eavesdropper (one client's messages): local-model reconstruction against the released global model as the
  trivial baseline;
* neighbour (decentralized runs, ``topology.graph``; ``DECENTRALIZED_ATTACKS``): a curious node's passive
  membership attack and gradient inversion on what the tapped nodes send it, against the start it can compute
  (``decentralized.ObserverView``), attribute inference, and the loss-threshold attack on every node's final
  model by graph distance.

Each point gives one record with ``test_accuracy``, ``epsilon`` (+ its basis), ``bytes_uploaded`` and
``attack/<name>/<metric>`` keys (95% intervals as ``_low`` / ``_high``); ``write_tables`` writes them as CSV, one
markdown table per threat model, the privacy-utility frontier, log-log ROC curves, reconstruction grids and a
``results.jsonl`` store that ``fedjaxpriv report`` reads.

Canary audits beside the accountant live in ``fedjaxpriv.attacks.canary_audit``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import time
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv.attacks import attribute, inversion_eval, membership, reconstruction, shadow
from fedjaxpriv.config import NATURAL_DATASETS, ExperimentConfig, is_text, reads_tokens, with_overrides
from fedjaxpriv.data.federated import Dataset
from fedjaxpriv.files import atomic_write
from fedjaxpriv.privacy.basis import level_of
from fedjaxpriv.results import as_float, cumulative, jsonable

Record = dict[str, Any]

# Each defense at several strengths: family -> {strength label: dotted overrides}. DP defenses are calibrated to
# a target epsilon (example level for DP-SGD, client level for DP-FedAvg).
DEFENSES: dict[str, dict[str, dict[str, Any]]] = {
    "none": {"": {}},
    "pruning": {f"sparsity={v}": {"client.prune_sparsity": v} for v in (0.5, 0.9, 0.99)},
    "quantization": {f"bits={v}": {"message.quant_bits": v} for v in (1, 2, 4)},
    "topk": {f"fraction={v}": {"message.topk_fraction": v} for v in (0.01, 0.1)},
    "mixup": {f"alpha={v}": {"client.mixup_alpha": v} for v in (0.2, 1.0, 4.0)},
    "poisson": {"poisson batches": {"client.sampling": "poisson"}},
    "dpsgd": {f"eps={v}": {"client.dp_clip_norm": 1.0, "client.target_epsilon": v} for v in (1.0, 4.0, 8.0)},
    "dpsgd_poisson": {f"eps={v}": {"client.dp_clip_norm": 1.0, "client.target_epsilon": v,
                                   "client.sampling": "poisson"} for v in (1.0, 4.0, 8.0)},
    "dpfedavg": {f"eps={v}": {"server.central_clip_norm": 1.0, "server.target_epsilon": v} for v in (1.0, 4.0, 8.0)},
    "pruning+quantization": {"sparsity=0.5,bits=4": {"client.prune_sparsity": 0.5, "message.quant_bits": 4},
                             "sparsity=0.9,bits=2": {"client.prune_sparsity": 0.9, "message.quant_bits": 2}},
    "dpsgd+topk": {"eps=8,fraction=0.1": {"client.dp_clip_norm": 1.0, "client.target_epsilon": 8.0,
                                         "message.topk_fraction": 0.1}},
}
# What ``fedjaxpriv attack-eval`` runs unless told otherwise; a decentralized base leaves out the server's defenses
# (``SERVER_DEFENSES``: those that set a server.* knob).
DEFAULT_DEFENSES: tuple[str, ...] = ("none", "pruning", "quantization", "topk", "mixup", "poisson", "dpsgd",
                                     "dpsgd_poisson", "dpfedavg")
SERVER_DEFENSES: tuple[str, ...] = tuple(name for name, points in DEFENSES.items()
                                         if any(k.startswith("server.") for o in points.values() for k in o))
# The base run of ``fedjaxpriv attack-eval`` without --config: few examples per client (the membership pool of
# ``AttackSuite.pool_size`` split over 10 clients), many local epochs and a wide model, so that the undefended
# federation memorises its data and the attacks can tell defenses apart (see ``membership_setup``).
MEMBERSHIP_BASE: tuple[str, ...] = (
    "data.num_clients=10", "data.partition=iid", "model.hidden=[512]", "client.local_steps=100", "client.lr=0.3",
    "server.clients_per_round=10", "run.rounds=10", "run.eval_every=10", "run.checkpoint_every=0")
# Defenses compared at equal utility: the same model and local training over 100 clients of 4 examples (a pool of
# 800), 20 per round by Poisson sampling, so that client-level DP has a population to hide in.
EQUAL_UTILITY_BASE: tuple[str, ...] = (
    "data.num_clients=100", "data.partition=iid", "model.hidden=[512]", "client.local_steps=100", "client.lr=0.3",
    "server.clients_per_round=20", "server.client_sampling=poisson", "run.rounds=50", "run.eval_every=50",
    "run.checkpoint_every=0")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A base run of ``fedjaxpriv attack-eval`` (``--preset``): config overrides, the membership pool it is meant
    with, and what it shows (measured figures)."""

    overrides: tuple[str, ...]
    pool_size: int
    about: str
    point_seconds: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def estimate(self, families: Sequence[str], shadow_federations: int) -> str:
        """A rough time for defense points of ``families`` (one entry per point) before any has run: each family's
        measured seconds per point on this preset (``point_seconds``: 16 shadow federations, 2 CPU cores), scaled
        by the federations each point trains; a family not measured counts at the slowest measured one."""
        if not self.point_seconds:
            return "time known after the first point"
        slowest = max(self.point_seconds.values())
        seconds = sum(self.point_seconds.get(f, slowest) for f in families) * (1 + shadow_federations) / 17
        unmeasured = sorted({f for f in families if f not in self.point_seconds})
        return (f"estimate before the first point: about {max(1, round(seconds / 60))} min on 2 CPU cores (this "
                "preset's measured time per point of each family, scaled to the shadow federations"
                + (f"; {', '.join(unmeasured)} not measured, counted as the slowest" if unmeasured else "") + ")")


# Seconds per defense point of each family with 16 shadow federations, measured on 2 CPU cores that other work
# shared (``fedjaxpriv attack-eval --out DIR``, all 22 default points: 38 min; the undefended point includes start-up).
PRESETS: dict[str, Preset] = {
    "membership": Preset(MEMBERSHIP_BASE, 600, "10 clients of 30 examples, 1000 local steps per round: the "
                         "undefended global model memorises (LiRA online AUC 0.67) and DP trains to near chance",
                         point_seconds={"none": 46, "pruning": 27, "quantization": 16, "topk": 26, "mixup": 32,
                                        "poisson": 28, "dpsgd": 247, "dpsgd_poisson": 383, "dpfedavg": 20}),
    "equal_utility": Preset(EQUAL_UTILITY_BASE, 800, "100 clients of 4 examples, 20 per round by Poisson "
                            "sampling: DP-FedAvg at epsilon 8 keeps 84 % of the undefended accuracy (0.780 of "
                            "0.928) while the undefended global model leaks membership (RMIA AUC 0.62)",
                            point_seconds={"none": 173, "dpsgd": 600, "dpsgd_poisson": 600}),  # DP-SGD: ~10 min
}


def defense_points(defenses: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(family, strength, overrides) for every strength of every family; a family given as plain overrides
    ({"client.mixup_alpha": 1.0}) is one strength named "" (``DEFENSES`` names can be given as strings)."""
    points = []
    for family, value in defenses.items():
        if isinstance(value, str):
            if value not in DEFENSES:
                raise ValueError(f"unknown defense {value!r}; allowed: {sorted(DEFENSES)}.")
            value = DEFENSES[value]
        if not isinstance(value, Mapping):
            raise ValueError(f"defense {family!r} must map config fields to values, or strengths to such maps.")
        strengths = value if value and all(isinstance(v, Mapping) for v in value.values()) else {"": value}
        points.extend((family, strength, dict(overrides)) for strength, overrides in strengths.items())
    return points


THREAT_MODELS: dict[str, str] = {
    "server": "honest-but-curious server: every message of every client in every round it takes part in",
    "eavesdropper": "an eavesdropper on one client's link: that client's messages",
    "participant": "a participant (or anyone the models are released to): the global models only",
    "secure_aggregation": "a server behind secure aggregation: only the weighted sum of each round's cohort",
    "neighbour": ("a curious node of a decentralized run: the models its neighbours send it, against the starts it "
                  "can compute from what it heard, and the models nodes hold at every graph distance"),
}
# Evaluated unless chosen otherwise; secure aggregation taps every client and inverts whole cohorts (small ones).
DEFAULT_THREAT_MODELS: tuple[str, ...] = ("server", "eavesdropper", "participant")
# Summary metrics of the attribute and reconstruction attacks kept in a record (each with _low / _high where given).
ATTRIBUTE_METRICS = ("accuracy", "accuracy_low", "accuracy_high", "baseline", "majority_accuracy", "global_accuracy",
                     "advantage", "advantage_low", "advantage_high", "share_error", "num_examples")
RECONSTRUCTION_METRICS = ("relative_l2_global", "closer_than_global", "accuracy", "local_accuracy",
                          "global_accuracy", "accuracy_gain_global", "accuracy_gain_global_low",
                          "accuracy_gain_global_high", "num_clients")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttackSuite:
    """Which attacks run on each defense, and their budgets.

    Attributes:
      threat_models: the observers to evaluate (``THREAT_MODELS`` names); attacks run only if their view
        (``ATTACK_VIEWS``) is selected.
      pool_size: membership evaluation pool: this many examples of the dataset (train and test together), a
        random half of which the target federation trains on (the other half are non-members and the test
        set). A small pool (few examples per client, many local epochs) is where membership leaks: see
        ``membership_setup``. 0: the config's own data (members: training examples, non-members: test set).
      shadow_federations: S shadow federations replaying the target's training on random halves of the pool
        (LiRA and RMIA reference models); the target and every shadow serve in turn as the attacked model with
        the others as references, pooling (S + 1) x pool_size scores so that low FPRs are resolvable.
        0 = no LiRA / RMIA.
      tap_clients: the target clients of the server's and the eavesdropper's attacks (observed from
        ``tap_from_round`` on, in the rounds they take part in).
      tap_from_round: first observed round (1-based).
      max_candidates: members (and as many non-members) scored per client by the passive attack.
      inversion_targets: messages that gradient inversion attacks (``inversion_eval.invert_taps``: the server's
        knowledge of masks and step counts, every received coordinate matched, the strongest of the L2 and
        cosine attackers, with and without the mask, reported with the one that won; 0 = skip inversion).
      inversion_batch: > 0: the attacked messages are those of a FedSGD probe of the first round
        (``inversion_eval.fedsgd_probe``): each tapped client takes one local step over this many of its
        examples from the run's initial model, with its own defenses and calibrated noise. 0: the run's own
        tapped messages (many local steps over minibatches, which no attacker replays exactly).
      inversion_iterations: optimisation steps of the inversion.
      psnr_threshold: dB above which an example counts as reconstructed.
      aggregate_rounds: rounds whose cohort aggregate the secure-aggregation attack inverts
        (``inversion_eval.invert_aggregates``).
      aggregate_max_examples: the secure-aggregation attack inverts cohorts of at most this many examples in all
        (it reconstructs every one of them at once).
      seed: seed of the attacks' own randomness (pool halves, shadows, candidates).
    """

    threat_models: tuple[str, ...] = DEFAULT_THREAT_MODELS
    pool_size: int = 600
    shadow_federations: int = 16
    tap_clients: tuple[int, ...] = (0, 1, 2, 3)
    tap_from_round: int = 2
    max_candidates: int = 300
    inversion_targets: int = 4
    inversion_batch: int = 8
    inversion_iterations: int = 300
    psnr_threshold: float = 20.0
    aggregate_rounds: int = 1
    aggregate_max_examples: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [t for t in self.threat_models if t not in THREAT_MODELS]
        if unknown or not self.threat_models:
            raise ValueError(f"threat_models={list(self.threat_models)} is not allowed: choose from "
                             f"{list(THREAT_MODELS)}.")
        if self.shadow_federations == 1 or self.shadow_federations < 0:
            raise ValueError(f"shadow_federations={self.shadow_federations}; allowed: 0 (off) or >= 2.")
        if self.pool_size != 0 and self.pool_size < 20:
            raise ValueError(f"pool_size={self.pool_size}; allowed: 0 (the config's data) or >= 20.")
        for name in ("max_candidates", "tap_from_round", "aggregate_max_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.aggregate_rounds < 1:
            raise ValueError(f"aggregate_rounds={self.aggregate_rounds} must be >= 1.")
        for name in ("inversion_targets", "inversion_iterations", "inversion_batch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")


def final_epsilon(history: Sequence[Mapping[str, Any]]) -> tuple[float, str]:
    """The largest final epsilon of a history over the levels it tracks (example, local, client) and that
    epsilon's basis; (inf, "") without any DP."""
    from fedjaxpriv.privacy.basis import BASIS_KEYS, EPSILON_KEYS

    last: dict[str, Any] = {}
    for record in history:
        last.update(record)
    present = [(float(last[k]), last.get(b, "")) for k, b in zip(EPSILON_KEYS, BASIS_KEYS) if last.get(k)]
    return max(present, key=lambda p: p[0]) if present else (math.inf, "")


def _balanced_candidates(members: Dataset, non_members: Dataset, limit: int,
                         rng: np.random.Generator) -> tuple[Dataset, np.ndarray]:
    n = min(limit, len(members), len(non_members))
    take_in = rng.choice(len(members), n, replace=False)
    take_out = rng.choice(len(non_members), n, replace=False)
    x = np.concatenate([members.x[take_in], non_members.x[take_out]])
    y = np.concatenate([members.y[take_in], non_members.y[take_out]])
    return Dataset(x, y), np.r_[np.ones(n, np.int32), np.zeros(n, np.int32)]


def _prefixed(name: str, values: Mapping[str, float]) -> Record:
    return {f"attack/{name}/{k}": float(v) for k, v in values.items()}


class MembershipSetup(NamedTuple):
    """The membership evaluation data.

    Attributes:
      pool: the N candidates.
      members: bool [N], the half of the pool the target federation trains on.
      population: examples outside the pool that no model trains on (RMIA's population points).
      num_classes: label classes.
    """

    pool: Dataset
    members: np.ndarray
    population: Dataset
    num_classes: int


def membership_setup(config: ExperimentConfig, pool_size: int, seed: int,
                     population_size: int = 1000) -> MembershipSetup:
    """The membership evaluation pool and which half of it the target trains on.

    ``pool_size`` examples are drawn from the dataset (training and test splits together) and a uniformly
    random half are members. Why this setup: a digit classifier trained on all 1437 training images
    generalises so well that no attack separates members (loss-threshold AUC 0.49-0.50); with a few hundred
    members spread over the clients (about 30 per client at the defaults), many local epochs and a wide model,
    the undefended federation memorises its data and membership measurably leaks, so defenses can be told
    apart. Non-members come from the same distribution, so the test accuracy on them is honest.

    Up to ``population_size`` further examples outside the pool form RMIA's population (never trained on).
    """
    from fedjaxpriv.data import load_dataset

    data = config.data
    train, test, info = load_dataset(data.dataset, data_dir=data.data_dir, download=data.download,
                                  image_key=data.image_key, label_key=data.label_key)
    x, y = np.concatenate([train.x, test.x]), np.concatenate([train.y, test.y])
    if not 2 <= pool_size <= len(y):
        raise ValueError(f"pool_size={pool_size} is not allowed for {data.dataset!r}: use 2..{len(y)}.")
    rng = np.random.default_rng([seed, 0x600D])
    order = rng.permutation(len(y))
    chosen, rest = order[:pool_size], order[pool_size:pool_size + population_size]
    members = np.zeros(pool_size, bool)
    members[rng.choice(pool_size, pool_size // 2, replace=False)] = True
    return MembershipSetup(Dataset(x[chosen], y[chosen]), members, Dataset(x[rest], y[rest]), info.num_classes)


def model_attacks(experiment: Any, params: Any, pool: Dataset, members: np.ndarray, suite: AttackSuite,
                  population: Dataset | None = None) -> tuple[Record, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Membership inference on released global models: loss threshold (Yeom et al.), LiRA online and offline
    (Carlini et al. 2022) and, given ``population`` points no model trained on, RMIA (Zarifzadeh et al. 2024),
    against reference models from shadow federations that replay the target's training
    (``shadow.train_shadow_federations``). Candidates a score is undefined for (no in or no out reference) are
    left out and counted in ``attack/<name>/dropped``.

    The target and each shadow federation serve in turn as the attacked model, with all the others as
    references; their scores are pooled into one ROC over (S + 1) x N (candidate, model) pairs, so that the
    smallest resolvable FPR is about 1 / ((S + 1) N / 2). The AUC intervals resample candidates (a cluster
    bootstrap: a candidate's scores under the models share its difficulty). Without shadows only the target is
    scored.

    Returns:
      (``attack/<name>/<metric>`` record, {attack name: (pooled scores, labels)} for ROC curves).
    """
    from fedjaxpriv.attacks.membership import attack_metrics

    apply = experiment.model.apply
    stacked = jax.tree_util.tree_map(lambda a: np.asarray(a)[None], params)
    inclusion = np.asarray(members, bool)[None]
    if suite.shadow_federations:
        shadows = shadow.train_shadow_federations(experiment, pool, suite.shadow_federations,
                                                  jax.random.key(suite.seed + 17))
        stacked = jax.tree_util.tree_map(lambda t, s: np.concatenate([t, np.asarray(s)]), stacked, shadows.params)
        inclusion = np.concatenate([inclusion, shadows.inclusion])
    def statistics(data: Dataset) -> dict[str, np.ndarray]:
        stats = jax.vmap(lambda p: membership.model_statistics(apply, p, jnp.asarray(data.x), jnp.asarray(data.y),
                                                               experiment.task))(stacked)
        return {k: np.asarray(v) for k, v in stats.items()}  # each [M, N]

    candidates = statistics(pool)
    labels = inclusion.astype(np.int32).ravel()
    pooled = {"loss_threshold": (-candidates["loss"].ravel(), labels)}
    models = inclusion.shape[0]
    if models >= 3:
        confidence = candidates["logit_confidence"]
        for name, online in (("lira_online", True), ("lira_offline", False)):
            pooled[name] = membership.leave_one_out_lira(confidence, inclusion, online=online,
                                                         global_variance=models < 64).ravel(), labels
        if population is not None and len(population):
            def probabilities(loss: np.ndarray) -> np.ndarray:  # p(y|x) in float64, kept off 0 (float32 exp underflows)
                return np.maximum(np.exp(-loss.astype(np.float64)), 1e-300)

            points = probabilities(statistics(population)["loss"])
            probs = probabilities(candidates["loss"])
            pooled["rmia"] = membership.leave_one_out_rmia(probs, inclusion, points).ravel(), labels
    candidate = np.tile(np.arange(inclusion.shape[1]), inclusion.shape[0])  # of each pooled (model, candidate)
    out: Record = {}
    for name, (scores, truth) in list(pooled.items()):
        groups = candidate[np.isfinite(np.asarray(scores, np.float64))]
        scores, truth, dropped = membership.finite_scores(scores, truth)
        pooled[name] = (scores, truth)
        out.update(_prefixed(name, {**attack_metrics(scores, truth, groups=groups if models > 1 else None),
                                    "dropped": dropped}))
    return out, pooled


def passive_attack(experiment: Any, taps: Mapping[int, Any],
                   suite: AttackSuite) -> tuple[Record, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Zari et al. passive attack on each tapped client of ``suite.tap_clients`` (members: its data; non-members:
    the test set) over the rounds it took part in; scores of all targets pooled into one ROC. Its intervals
    resample candidates within the tapped clients: they are conditional on those clients (with the default 4,
    too few to resample clients themselves), not on a population of clients. Returns (record,
    {"passive": (scores, labels)})."""
    observed = membership.ordered_taps(taps)
    if not observed:
        return {}, {}
    rng = np.random.default_rng(suite.seed + 1)
    all_scores, all_labels = [], []
    clients = sorted({int(c) for tap in observed for c in tap.client_ids} & set(suite.tap_clients))
    for client in clients:
        server, messages = membership.stack_taps(observed, client)
        candidates, labels = _balanced_candidates(experiment.population.client(int(client)), experiment.test,
                                                  suite.max_candidates, rng)
        if labels.size == 0:
            continue
        all_scores.append(np.asarray(membership.passive_scores(experiment.model.apply, server, messages,
                                                               candidates.x, candidates.y,
                                                               loss=experiment.task.loss)))
        all_labels.append(labels)
    if not all_scores:
        return {}, {}
    scores, labels = np.concatenate(all_scores), np.concatenate(all_labels)
    return _prefixed("passive", membership.attack_metrics(scores, labels)), {"passive": (scores, labels)}


@dataclasses.dataclass
class DefenseResult:
    """One defense point, trained and attacked.

    Attributes:
      record: the table row: defense, strength, test_accuracy, epsilon (+ basis), bytes, ``attack/...`` metrics.
      config: the config that ran.
      history: the run's history, the attack metrics in its last record.
      scores: {attack: (pooled scores, labels)} of the membership attacks, for ROC curves.
      inversion: the gradient inversion of the run's tapped messages (None if skipped).
    """

    record: Record
    config: ExperimentConfig
    history: list[Record]
    scores: dict[str, tuple[np.ndarray, np.ndarray]]
    inversion: Any = None


@dataclasses.dataclass(frozen=True)
class AttackContext:
    """What one defense point's run produced, as the attacks see it.

    Attributes:
      label: the defense point's label.
      experiment: the run's ``Experiment`` (model, population, settings, mechanisms).
      results: its ``Results``: ``params`` (the released global model), ``history``, ``taps`` {round: Tap}.
      suite: the attack budgets.
      pool: membership candidates [N]; members: bool [N], which of them the target trained on.
      reference_points: examples no model trained on (RMIA's population), or None.
      targets: the clients of ``suite.tap_clients`` that took part in some tapped round.
      parts: the ``Experiment`` keyword arguments the run was built with (``model=`` ...), for attacks that
        build runs of their own (the inversion's FedSGD probe).
    """

    label: str
    experiment: Any
    results: Any
    suite: AttackSuite
    pool: Dataset
    members: np.ndarray
    reference_points: Dataset | None
    targets: tuple[int, ...]
    parts: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class AttackOutcome(NamedTuple):
    """An attack's result: ``metrics`` {metric: value} (``_low`` / ``_high`` suffixes for 95% intervals; a key
    "<name>/<metric>" reports under another record name of the attack's ``names``), optional ``scores``
    {name: (scores [M], labels [M])} for ROC curves and an optional ``inversion`` report for image grids."""

    metrics: Mapping[str, float | str]
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]] = {}
    inversion: Any = None


@dataclasses.dataclass(frozen=True)
class Attack:
    """An attack ``attack-eval`` runs on every defense point: ``run(context) -> AttackOutcome`` (or a string
    saying why it does not apply to this run), observing only what its ``view`` (a ``THREAT_MODELS`` name)
    sees. Its metrics land in the record as ``attack/<name>/<metric>`` and in the table of its view; where it
    does not apply, ``attack/<name>/n/a`` holds the reason and the table says "n/a: <reason>".

    Attributes:
      name: record name (and table columns' prefix).
      view: the threat model whose observations it uses; it runs only when the suite selects that view.
      run: the attack.
      names: every record name it reports under (default ``(name,)``).
      check: ``check(config, suite) -> reason | None``: why the attack cannot apply to a defense point's config,
        known before training (the reason names the knob that makes it apply); None: it may apply.
    """

    name: str
    view: str
    run: Callable[[AttackContext], AttackOutcome | str]
    names: tuple[str, ...] = ()
    check: Callable[[ExperimentConfig, AttackSuite], str | None] | None = None

    def __post_init__(self) -> None:
        if self.view not in THREAT_MODELS:
            raise ValueError(f"attack {self.name!r}: view={self.view!r} is not one of {list(THREAT_MODELS)}.")
        if not self.names:
            object.__setattr__(self, "names", (self.name,))

    def not_applicable(self, reason: str) -> Record:
        """The record entries of a point where the attack does not apply: ``attack/<name>/n/a`` = reason."""
        return {f"attack/{name}/n/a": reason for name in self.names}

    def record(self, outcome: AttackOutcome) -> Record:
        """``attack/<name>/<metric>`` entries of an outcome (keys with a "/" name the record themselves); numbers as
        floats, text (which attacker won) as it is."""
        return {f"attack/{k}" if "/" in k else f"attack/{self.name}/{k}": v if isinstance(v, str) else float(v)
                for k, v in outcome.metrics.items()}


def _membership_on_models(context: AttackContext) -> AttackOutcome:
    suite = context.suite if len(context.pool) and context.reference_points is not None else dataclasses.replace(
        context.suite, shadow_federations=0)
    record, scores = model_attacks(context.experiment, context.results.params, context.pool, context.members,
                                   suite, context.reference_points)
    return AttackOutcome({k.removeprefix("attack/"): v for k, v in record.items()}, scores)


NO_TARGETS = "no client of suite.tap_clients took part in a tapped round (raise run.rounds or lower tap_from_round)"


def _passive(context: AttackContext, curve: str = "passive") -> AttackOutcome | str:
    """The passive attack on the run's taps; its ROC curve is named ``curve``."""
    record, scores = passive_attack(context.experiment, context.results.taps, context.suite)
    if not record:
        return NO_TARGETS
    return AttackOutcome({k.removeprefix("attack/passive/"): v for k, v in record.items()},
                         {curve: scores["passive"]})


def _inversion_config(suite: AttackSuite) -> Any:
    return dataclasses.replace(inversion_eval.DEFAULT_ATTACK, num_iterations=suite.inversion_iterations)


def _skipped_inversion(config: ExperimentConfig, suite: AttackSuite) -> str | None:
    if reads_tokens(config.data):
        return ("the inputs are token ids, which gradient matching cannot optimise (on next-token text the "
                "bag_of_words attack reads the typed words from the embedding rows)")
    return "skipped (inversion_targets=0, --inversion-targets)" if suite.inversion_targets == 0 else None


def _inversion(context: AttackContext, probe: bool = True) -> AttackOutcome | str:
    """Gradient inversion of the tapped clients' messages: a FedSGD probe's (``suite.inversion_batch`` > 0, unless
    ``probe`` is False) or the run's own."""
    suite = context.suite
    probe = probe and suite.inversion_batch > 0
    if probe:  # the first round's messages of the tapped clients, FedSGD over a small batch
        clients = [c for c in suite.tap_clients if c < context.experiment.population.num_clients]
        probe = inversion_eval.fedsgd_probe(context.experiment, clients[:suite.inversion_targets],
                                            suite.inversion_batch, **context.parts)
        experiment, taps, chosen, ids = probe.experiment, [probe.tap], None, probe.clients
    elif not context.targets:
        return NO_TARGETS
    else:  # the run's own tapped messages
        experiment, taps, chosen, ids = context.experiment, context.results.taps, context.targets, None
    report = inversion_eval.invert_taps(experiment, taps, key=jax.random.key(suite.seed + 2),
                                        attack=_inversion_config(suite), max_targets=suite.inversion_targets,
                                        psnr_threshold=suite.psnr_threshold, clients=chosen)
    if ids is not None:  # the probe's clients by their ids in the run
        report = report.relabel(ids)
    if not report.targets:
        return "every tapped message was skipped: " + "; ".join(sorted({why for _, _, why in report.skipped}))
    batch = {"batch": float(suite.inversion_batch)} if probe else {}
    return AttackOutcome({**report.summary(), **batch, "attacker": report.attacker()}, inversion=report)


def _attribute(context: AttackContext) -> AttackOutcome | str:
    if not context.experiment.population.attributes.size:
        return "the population has no sensitive attribute (data.dataset with attributes, e.g. 'attribute')"
    if not context.targets:
        return NO_TARGETS
    inferred = attribute.attribute_attack_on_taps(context.experiment, context.results.taps, clients=context.targets)
    return AttackOutcome({k: inferred[k] for k in ATTRIBUTE_METRICS})


def _reconstruction(context: AttackContext) -> AttackOutcome | str:
    if not context.targets:
        return NO_TARGETS
    rebuilt = reconstruction.reconstruction_attack_on_taps(context.experiment, context.results.taps, context.targets,
                                                           global_params=context.results.params)
    return AttackOutcome({k: rebuilt[k] for k in RECONSTRUCTION_METRICS})


def _cohort_examples(config: ExperimentConfig, suite: AttackSuite) -> int | None:
    """The examples of one round's cohort when known from the config alone: with a membership pool split
    evenly (iid) over the clients, clients_per_round clients of pool_size / 2 / num_clients examples each."""
    d, s = config.data, config.server
    if not suite.pool_size or d.partition != "iid" or d.dataset in NATURAL_DATASETS:
        return None
    return s.clients_per_round * (suite.pool_size // 2 // d.num_clients)


def _aggregate_check(config: ExperimentConfig, suite: AttackSuite) -> str | None:
    """Why the secure-aggregation attack cannot apply to a config (None: it may)."""
    if config.server.clips:
        return ("the server sees DP-FedAvg's clipped, noised sum, which the taps do not record (a run without "
                "server.central_clip_norm / central_noise_multiplier / target_epsilon)")
    skipped = _skipped_inversion(config, suite)
    if skipped:
        return skipped
    total = _cohort_examples(config, suite)
    if total is not None and total > suite.aggregate_max_examples:
        return (f"a cohort holds {total} examples > aggregate_max_examples={suite.aggregate_max_examples} (raise "
                f"--aggregate-max-examples to {total}, or lower server.clients_per_round or --pool-size)")
    return None


def _aggregate_inversion(context: AttackContext) -> AttackOutcome | str:
    suite = context.suite
    reason = _aggregate_check(context.experiment.config, suite)
    if reason:
        return reason
    if not context.results.taps:
        return NO_TARGETS
    report = inversion_eval.invert_aggregates(context.experiment, context.results.taps,
                                              key=jax.random.key(suite.seed + 3), attack=_inversion_config(suite),
                                              max_rounds=suite.aggregate_rounds, psnr_threshold=suite.psnr_threshold,
                                              max_examples=suite.aggregate_max_examples)
    if not report.targets:
        return "every tapped round was skipped: " + "; ".join(sorted({why for _, _, why in report.skipped}))
    return AttackOutcome(report.summary())


BUILTIN_ATTACKS: tuple[Attack, ...] = (
    Attack("membership", "participant", _membership_on_models,
           names=("loss_threshold", "lira_online", "lira_offline", "rmia")),
    Attack("passive", "server", _passive),
    Attack("inversion", "server", _inversion, check=_skipped_inversion),
    Attack("attribute", "server", _attribute),
    Attack("reconstruction", "eavesdropper", _reconstruction),
    Attack("aggregate_inversion", "secure_aggregation", _aggregate_inversion, check=_aggregate_check),
)


def _bag_of_words(context: AttackContext) -> AttackOutcome | str:
    from fedjaxpriv.attacks import bag_of_words

    if not context.results.taps:
        return NO_TARGETS
    found = bag_of_words.attack_taps(context.experiment, context.results.taps, seed=context.suite.seed + 5)
    if isinstance(found, str):
        return found
    metrics, scores = found
    return AttackOutcome(metrics, {"bag_of_words": scores})


def _not_text(config: ExperimentConfig, suite: AttackSuite) -> str | None:
    del suite
    return None if is_text(config.data) else "the data are not text (a text dataset, data.text_level)"


# Attacks of the text task (``attacks_for``): the words a keyboard user typed, from its messages.
TEXT_ATTACKS: tuple[Attack, ...] = (Attack("bag_of_words", "server", _bag_of_words, check=_not_text),)


def _decentralized_only(config: ExperimentConfig, suite: AttackSuite) -> str | None:
    del suite
    return None if config.topology.decentralized else "a federated run has no curious neighbour (topology.graph)"


def _neighbour_passive(context: AttackContext) -> AttackOutcome | str:
    return _passive(context, curve="neighbour_passive")


def _neighbour_inversion_check(config: ExperimentConfig, suite: AttackSuite) -> str | None:
    return _decentralized_only(config, suite) or _skipped_inversion(config, suite)


def _neighbour_inversion(context: AttackContext) -> AttackOutcome | str:
    """Gradient inversion of the run's own tapped messages as the neighbour sees them (never a FedSGD probe: a
    node's start is its own model, which only the run's rounds give)."""
    return _inversion(context, probe=False)


def _membership_by_distance(context: AttackContext) -> AttackOutcome | str:
    """The loss-threshold attack on every node's final model against each target's examples, by graph distance
    (``DecentralizedExperiment.membership_by_distance``): ``auc_distance_<d>`` (d = 0 the target's own model)."""
    victims = [c for c in context.suite.tap_clients if c < context.experiment.population.num_clients]
    if not victims:
        return NO_TARGETS
    _, by_distance = context.experiment.membership_by_distance(context.results.params, victims)
    return AttackOutcome({f"auc_distance_{d}": auc for d, auc in by_distance.items() if d >= 0})


# Attacks of decentralized runs (``attacks_for``): what a curious node sees.
DECENTRALIZED_ATTACKS: tuple[Attack, ...] = (
    Attack("neighbour_passive", "neighbour", _neighbour_passive, check=_decentralized_only),
    Attack("neighbour_inversion", "neighbour", _neighbour_inversion, check=_neighbour_inversion_check),
    Attack("neighbour_attribute", "neighbour", _attribute, check=_decentralized_only),
    Attack("membership_by_distance", "neighbour", _membership_by_distance, check=_decentralized_only),
)


def attacks_for(config: ExperimentConfig) -> tuple[Attack, ...]:
    """The built-in attacks a base config's defense points get: ``BUILTIN_ATTACKS``, and ``TEXT_ATTACKS`` on
    text; a decentralized run's (``topology.graph``): ``DECENTRALIZED_ATTACKS``."""
    if config.topology.decentralized:
        return DECENTRALIZED_ATTACKS
    return BUILTIN_ATTACKS + (TEXT_ATTACKS if is_text(config.data) else ())


def default_threat_models(config: ExperimentConfig) -> tuple[str, ...]:
    """The observers evaluated unless chosen otherwise: ``DEFAULT_THREAT_MODELS``; a decentralized run's
    curious neighbour."""
    return ("neighbour",) if config.topology.decentralized else DEFAULT_THREAT_MODELS


def attack_views(attacks: Sequence[Attack]) -> dict[str, str]:
    """Record name -> view of every name the attacks report under (the tables' grouping)."""
    return {n: a.view for a in attacks for n in a.names}


ATTACK_VIEWS: dict[str, str] = attack_views(BUILTIN_ATTACKS + TEXT_ATTACKS + DECENTRALIZED_ATTACKS)


def evaluate_defense(base: ExperimentConfig, name: str, overrides: Mapping[str, Any],
                     suite: AttackSuite = AttackSuite(), *, family: str | None = None, strength: str = "",
                     attacks: Sequence[Attack] | None = None,
                     parts: Mapping[str, Any] | None = None) -> DefenseResult:
    """Trains ``base`` with one defense's overrides and runs every attack whose view the suite selects on what
    the run produced (``attacks``: ``attacks_for(base)`` by default; add your own ``Attack``). ``parts`` go to the
    ``Experiment`` in place of what the config builds (``model=``, ``loss=``, ``message_transform=``,
    ``extra_settings=``); the shadow federations replay the run with the same parts."""
    from fedjaxpriv.experiment import build_experiment, partition_like

    attacks = attacks_for(base) if attacks is None else tuple(attacks)
    rounds = base.run.rounds
    secure = "secure_aggregation" in suite.threat_models  # the aggregate needs every cohort client's message
    tapped = list(range(base.data.num_clients)) if secure else list(suite.tap_clients)
    # A defense that wrecks training is a result to tabulate (accuracy at chance), not an error: no divergence stop.
    config = with_overrides(base, {**overrides, "run.tap_clients": tapped,
                                   "run.tap_rounds": list(range(min(suite.tap_from_round, rounds), rounds + 1)),
                                   "run.divergence_factor": None, "name": name})
    if suite.pool_size and config.data.dataset not in NATURAL_DATASETS:
        setup = membership_setup(config, suite.pool_size, suite.seed)
        pool, members, reference_points = setup.pool, setup.members, setup.population
        clients = partition_like(config, Dataset(pool.x[members], pool.y[members]), config.run.seed)
        experiment = build_experiment(config, population=clients, num_classes=setup.num_classes,
                                      test=Dataset(pool.x[~members], pool.y[~members]), data_from_config=True,
                                      progress=False,
                                      **(parts or {}))
    else:  # the config's own data: training examples against test examples, no shadow federations
        experiment = build_experiment(config, progress=False, **(parts or {}))
        rng = np.random.default_rng(suite.seed)
        p = experiment.population
        pool, labels = _balanced_candidates(Dataset(p.x, p.y), experiment.test, suite.max_candidates, rng)
        members, reference_points = labels.astype(bool), None
    _say(f"[{name}] training the target federation")
    results = experiment.run(progress=False)
    epsilon, basis = final_epsilon(results.history)
    record: Record = {"label": name, "defense": family or name, "strength": strength,
                      "test_accuracy": results.final("test_accuracy"), "epsilon": epsilon,
                      "epsilon_level": level_of(basis), "epsilon_basis": basis,
                      "bytes_uploaded": cumulative(results.history, "bytes_total")}
    if "cost_wall_time_s" in results.history[-1]:  # devices: simulated wall time and energy over the run
        record.update(wall_time_s=cumulative(results.history, "cost_wall_time_s"),
                      energy_j=cumulative(results.history, "cost_energy_j"))
    observed = {int(c) for tap in results.taps.values() for c in tap.client_ids}
    context = AttackContext(label=name, experiment=experiment, results=results, suite=suite, pool=pool,
                            members=members, reference_points=reference_points,
                            targets=tuple(c for c in suite.tap_clients if c in observed), parts=dict(parts or {}))
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    inverted = None
    for attack in attacks:
        if attack.view not in suite.threat_models:
            continue
        reason = attack.check(config, suite) if attack.check is not None else None
        if reason is None:
            _say(f"[{name}] {attack.name} ({attack.view}'s view)")
            outcome = attack.run(context)
            reason = outcome if isinstance(outcome, str) else None
        if reason is not None:
            _say(f"[{name}] {attack.name}: n/a: {reason}")
            record.update(attack.not_applicable(reason))
            continue
        record.update(attack.record(outcome))
        scores.update(outcome.scores)
        inverted = outcome.inversion if outcome.inversion is not None else inverted
    history = [dict(r) for r in results.history]
    history[-1].update({k: v for k, v in record.items() if k.startswith("attack/")})
    return DefenseResult(record, config, history, scores, inverted)


def _say(message: str) -> None:
    """Progress of a long evaluation, on stderr."""
    import sys

    print(message, file=sys.stderr, flush=True)


POINTS_DIR = "points"


def check_threat_models(base: ExperimentConfig, points: Sequence[tuple[str, str, Mapping[str, Any]]],
                        suite: AttackSuite, attacks: Sequence[Attack]) -> None:
    """Raises ValueError, before anything trains, when a threat model the suite selects has no attack that can
    apply at any defense point, naming each reason (and so the knob that makes it apply)."""
    reasons: dict[str, list[str]] = {view: [] for view in suite.threat_models}
    applies = set()
    for _, _, overrides in points:
        config = with_overrides(base, overrides)
        for attack in attacks:
            if attack.view in reasons:
                reason = attack.check(config, suite) if attack.check is not None else None
                if reason is None:
                    applies.add(attack.view)
                elif f"{attack.name}: {reason}" not in reasons[attack.view]:
                    reasons[attack.view].append(f"{attack.name}: {reason}")
    for view, why in reasons.items():
        if view not in applies:
            because = "; ".join(why) or "no attack observes it"
            raise ValueError(f"threat model {view!r} was asked for, but nothing can attack it at any defense "
                             f"point: {because}.")


def point_key(base: ExperimentConfig, label: str, overrides: Mapping[str, Any], suite: AttackSuite,
              attacks: Sequence[Attack], code: str | None = None) -> str:
    """A short hash of everything one defense point's result depends on: the base config, the label, the
    overrides, the suite, the attacks' names and views, and the code that computes it (``code``: the package's
    version and git revision, so that a point kept by other code is evaluated again)."""
    text = json.dumps([code, base.config_hash(), label, jsonable(dict(overrides)), repr(suite),
                       [(a.name, a.view, getattr(a.run, "__qualname__", "")) for a in attacks]],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_point(path: str) -> DefenseResult | None:
    """A point kept by an earlier evaluation into the same directory (None: none, or unreadable)."""
    try:
        with open(path, "rb") as f:
            kept = pickle.load(f)
    except FileNotFoundError:
        return None
    except Exception as error:  # a file cut short or from another version: evaluate the point again
        warnings.warn(f"{path}: unreadable kept defense point ({type(error).__name__}); evaluating it again.",
                      stacklevel=2)
        return None
    return kept if isinstance(kept, DefenseResult) else None


def evaluate_defenses(base: ExperimentConfig, defenses: Mapping[str, Any] | None = None,
                      suite: AttackSuite = AttackSuite(), out_dir: str | None = None,
                      attacks: Sequence[Attack] | None = None,
                      parts: Mapping[str, Any] | None = None,
                      estimate: Callable[[list[str]], str] | None = None) -> list[Record]:
    """Every strength of every defense in turn (``DEFENSES`` by default): train, attack, tabulate.

    Args:
      base: the experiment every defense modifies.
      defenses: family -> {strength: dotted overrides} (or -> dotted overrides for a single point, or a
        ``DEFENSES`` name).
      suite: the attacks.
      attacks: the attacks run on every point (default ``attacks_for(base)``; add your own ``Attack``).
      parts: ``Experiment`` keyword arguments used at every point instead of what the config builds
        (``model=``, ``loss=``, ``message_transform=``, ``extra_settings=``).
      out_dir: if given, ``write_tables`` writes the tables, the privacy-utility frontier, log-log ROC curves and a
        ``results.jsonl`` store that ``fedjaxpriv report`` reads.
      estimate: ``estimate(families of the points to run)``: a time for them, said before the first starts
        (``Preset.estimate``).

    Returns:
      one record per defense point.
    """
    from fedjaxpriv.results import ResultsStore, code_revision, make_record, package_versions

    attacks = attacks_for(base) if attacks is None else tuple(attacks)
    points = defense_points(DEFENSES if defenses is None else defenses)
    if not points:
        raise ValueError(f"defenses={dict(defenses or {})!r} names no defense point; allowed: built-in names "
                         f"{sorted(DEFENSES)} or {{name: {{field: value}}}} maps.")
    check_threat_models(base, points, suite, attacks)
    views = attack_views(attacks)
    # Each finished point is kept in out_dir/points/ as it finishes, so an interrupted evaluation resumes after
    # its last finished point (parts passed in are code, not values: their points are not kept).
    kept_dir = os.path.join(out_dir, POINTS_DIR) if out_dir is not None and parts is None else None
    store = ResultsStore(out_dir) if out_dir is not None else None
    code = f"{package_versions().get('fedjaxpriv')} {code_revision()}" if kept_dir is not None else None
    results, figures = [], []
    labels = [f"{family} {strength}".strip() for family, strength, _ in points]
    paths = [os.path.join(kept_dir, f"{point_key(base, label, overrides, suite, attacks, code)}.pkl")
             if kept_dir is not None else None for label, (_, _, overrides) in zip(labels, points)]
    to_run = [path is None or not os.path.exists(path) for path in paths]
    shadows = f" and {suite.shadow_federations} shadow federations" if suite.shadow_federations else ""
    ahead = (f"; {estimate([f for (f, _, _), run in zip(points, to_run) if run])}"
             if estimate is not None and any(to_run) else "")
    _say(f"{len(points)} defense points ({len(points) - sum(to_run)} finished earlier), each training the target "
         f"federation{shadows} and attacking it{ahead}")
    durations: dict[str, list[float]] = {}  # family -> seconds of its finished points
    for index, ((family, strength, overrides), label, path) in enumerate(zip(points, labels, paths)):
        result = _read_point(path) if path is not None else None
        fresh = result is None
        if not fresh:
            _say(f"defense {index + 1}/{len(points)}: {label} (finished earlier: {path})")
        else:
            remaining = [f for (f, _, _), run in zip(points[index:], to_run[index:]) if run]
            _say(f"defense {index + 1}/{len(points)}: {label} ({time_left(durations, remaining)})")
            started = time.perf_counter()
            result = evaluate_defense(base, label, overrides, suite, family=family, strength=strength,
                                      attacks=attacks, parts=parts)
            durations.setdefault(family, []).append(time.perf_counter() - started)
            if path is not None:
                os.makedirs(kept_dir, exist_ok=True)
                atomic_write(path, pickle.dumps(result))
        if store is not None and (fresh or result.config.config_hash() not in store.completed_hashes()):
            store.append(make_record(result.config, result.history, label=label, overrides=dict(overrides)))
        if out_dir is not None:  # what its ROC curves and grid are drawn from, for `fedjaxpriv report`
            figures.append(point_figures(result, views))
            save_point_figures(figures[-1], out_dir, result.config.config_hash())
        results.append(result)
    records = [r.record for r in results]
    if out_dir is not None:
        latest = {r["config_hash"]: r for r in store.records()}
        store_records = [latest[r.config.config_hash()] for r in results]
        write_tables(records, out_dir, store_records=store_records,
                     figures=figures, views=views)
    return records


def time_left(durations: Mapping[str, Sequence[float]], families: Sequence[str]) -> str:
    """How long the points of ``families`` (one entry per point still to run) take: each at the mean duration
    (seconds) of the finished points of its family in ``durations`` {family: [seconds]}, or of all finished points
    for a family not yet timed (DP families can take several times longer than the others)."""
    finished = [d for values in durations.values() for d in values]
    if not finished:
        return "time left known after the first point"
    seconds = sum(float(np.mean(durations.get(f) or finished)) for f in families)
    untimed = sorted({f for f in families if not durations.get(f)})
    text = f"about {seconds / 60:.0f} min left" if seconds >= 90 else f"about {seconds:.0f} s left"
    return text + (f", {', '.join(untimed)} not yet timed" if untimed else "")


def _with_interval(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    if isinstance(value, str):
        return value
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return "n/a" if key in record else ""
    low, high = record.get(f"{key}_low"), record.get(f"{key}_high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and not math.isnan(low):
        return f"{value:.3f} [{low:.3f}, {high:.3f}]"
    return f"{value:.4g}"


def chance_level(metric: str) -> float | None:
    """What a membership metric scores without any information: AUC 0.5, TPR at X% FPR X/100 (None: no such
    level)."""
    if metric == "auc":
        return 0.5
    if metric.startswith("tpr@") and metric.endswith("%fpr"):
        return float(metric[4:-4]) / 100.0
    return None


def separation(record: Mapping[str, Any], key: str, reference: Mapping[str, Any] | None) -> str:
    """Marks of a metric's 95% interval: "*" when it excludes chance (``chance_level``), "+" when it does not
    overlap the interval of the same metric in ``reference`` (the undefended run); "" otherwise or without an
    interval."""
    low, high = record.get(f"{key}_low"), record.get(f"{key}_high")
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float))) or math.isnan(low) or math.isnan(high):
        return ""
    marks = ""
    chance = chance_level(key.rsplit("/", 1)[-1])
    if chance is not None and (low > chance or high < chance):
        marks += "*"
    if reference is not None and reference is not record:
        other_low, other_high = reference.get(f"{key}_low"), reference.get(f"{key}_high")
        if isinstance(other_low, (int, float)) and isinstance(other_high, (int, float)) and (
                low > other_high or high < other_low):
            marks += "+"
    return marks


def _cell(record: Mapping[str, Any], attack: str, key: str, first: bool,
          reference: Mapping[str, Any] | None = None) -> str:
    """A table cell: the metric ``key`` (with its interval and ``separation`` marks against the undefended
    ``reference``), or where ``attack`` did not apply to the point "n/a: <reason>" in its ``first`` column and
    "n/a" in the others."""
    reason = record.get(f"attack/{attack}/n/a")
    if reason is None:
        marks = separation(record, key, reference)
        return _with_interval(record, key) + (f" {marks}" if marks else "")
    return f"n/a: {reason}" if first else "n/a"


# Metrics an attack's table columns show beside the common ones: whether the neighbour's start was exact.
TABLE_EXTRAS: dict[str, tuple[str, ...]] = {"neighbour_inversion": ("exact_fraction",)}


def threat_model_tables(records: Sequence[Mapping[str, Any]], views: Mapping[str, str] = ATTACK_VIEWS) -> str:
    """Markdown: one table per threat model with the attacks that use its view (``views``: record name -> view;
    95% intervals in brackets, marked "*" where they exclude chance and "+" where they do not overlap the
    undefended run's: the record whose defense is "none")."""
    lines = []
    reference = next((r for r in records if r.get("defense") == "none"), None)
    for threat, meaning in THREAT_MODELS.items():
        attacks = [a for a, view in views.items() if view == threat
                   and any(k.startswith(f"attack/{a}/") for r in records for k in r)]
        if not attacks:
            continue
        columns = []
        for attack in attacks:
            metrics_present = [m for m in ("auc", "tpr@0.1%fpr", "tpr@1%fpr", "psnr_median", "psnr_iqr", "attacker",
                                           "fraction_above_threshold", "label_accuracy", "accuracy", "baseline",
                                           "advantage", "relative_l2_global", "accuracy_gain_global",
                                           "support_precision", "support_recall")
                               if any(f"attack/{attack}/{m}" in r for r in records)]
            metrics_present += [m for m in TABLE_EXTRAS.get(attack, ()) if any(f"attack/{attack}/{m}" in r
                                                                               for r in records)]
            metrics_present += sorted({k.rsplit("/", 1)[1] for r in records for k in r  # by graph distance
                                       if k.startswith(f"attack/{attack}/auc_distance_")},
                                      key=lambda m: int(m.rsplit("_", 1)[1]))
            # An attack that applied nowhere still gets a column, which says why.
            columns += [(attack, f"attack/{attack}/{m}", i == 0) for i, m in enumerate(metrics_present or ["n/a"])]
        header = ["defense", "strength", "test accuracy", "epsilon",
                  *[key.removeprefix("attack/") for _, key, _ in columns]]
        lines += [f"### {threat}: {meaning}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in records:
            epsilon = r.get("epsilon", math.inf)
            cells = [str(r.get("defense", "")), str(r.get("strength", "")), f"{r.get('test_accuracy', math.nan):.3f}",
                     "no DP" if not math.isfinite(epsilon) else f"{epsilon:.2f} ({r.get('epsilon_level') or '?'})",
                     *[_cell(r, *column, reference) for column in columns]]
            lines.append("| " + " | ".join(cells) + " |")
        resolvable = {a: min((r.get(f"attack/{a}/min_resolvable_fpr", math.inf) for r in records), default=math.inf)
                      for a in attacks}
        notes = [f"{a}: {v:.2g}" for a, v in resolvable.items() if math.isfinite(v)]
        if notes:
            lines += ["", "Smallest resolvable FPR (1 / non-members): " + ", ".join(notes) + "."]
        if "inversion" in attacks and inversion_note(records):
            lines += ["", inversion_note(records)]
        lines.append("")
    legend = ("Marks on 95% intervals: * excludes chance (AUC 0.5, TPR = FPR); + does not overlap the undefended "
              "run's (defense 'none'); no mark: not resolved from chance or from the undefended run at this size.")
    return "\n".join(lines + ([legend, ""] if any("_low" in k for r in records for k in r) else []))


def inversion_note(records: Sequence[Mapping[str, Any]]) -> str:
    """What the inversion column attacked: the FedSGD probe's batch size(s) or the run's own messages."""
    batches = sorted({int(r["attack/inversion/batch"]) for r in records if "attack/inversion/batch" in r})
    if not any("attack/inversion/psnr_median" in r for r in records):
        return ""  # it applied nowhere: its column says why
    if not batches:
        return "Inversion: the run's own tapped messages (every local step of the round)."
    return (f"Inversion: each tapped client's first-round message as one local step over "
            f"{' / '.join(map(str, batches))} of its examples from the initial model, with the defense's settings and "
            "calibrated noise (a FedSGD probe, --inversion-batch; 0 attacks the run's own messages). PSNR in dB, "
            "uncapped.")


# Fractions of the undefended accuracy at which defenses are compared (``matched_utility``).
MATCHED_FRACTIONS = (0.9, 0.8)
# The membership attacks compared at matched utility, when present.
MATCHED_METRICS = ("attack/rmia/auc", "attack/lira_online/auc", "attack/lira_offline/auc",
                   "attack/loss_threshold/auc", "attack/passive/auc")


def matched_utility(records: Sequence[Mapping[str, Any]], metric: str, fraction: float
                    ) -> dict[str, tuple[float, float, float] | str]:
    """Each defense family's attack success at the accuracy ``fraction`` x the undefended run's (defense "none").

    A family's strengths, sorted by test accuracy, are joined piecewise linearly (metric, and its interval ends
    ``_low`` / ``_high`` alike) and read at the target accuracy; no extrapolation: a family whose every strength
    is less accurate, or more accurate, than the target says so instead.

    Returns:
      {family: (value, low, high)} (low / high NaN without an interval) or {family: "n/a: <why>"}.
    """
    reference = [r for r in records if r.get("defense") == "none" and metric in r]
    if not reference:
        return {}
    target = fraction * float(np.mean([as_float(r["test_accuracy"]) for r in reference]))
    families: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        if r.get("defense") != "none" and metric in r and not math.isnan(as_float(r.get("test_accuracy"))):
            families.setdefault(str(r.get("defense")), []).append(r)
    out: dict[str, tuple[float, float, float] | str] = {}
    for family, members in families.items():
        members = sorted(members, key=lambda r: as_float(r["test_accuracy"]))
        accuracy = np.array([as_float(r["test_accuracy"]) for r in members])
        if accuracy[-1] < target:
            out[family] = f"n/a: no strength reaches accuracy {target:.3f} (best {accuracy[-1]:.3f})"
            continue
        if accuracy[0] > target:
            out[family] = f"n/a: every strength is more accurate than {target:.3f} (least {accuracy[0]:.3f})"
            continue
        columns = [np.array([as_float(r.get(f"{metric}{suffix}", math.nan)) for r in members])
                   for suffix in ("", "_low", "_high")]
        out[family] = tuple(float(np.interp(target, accuracy, values)) for values in columns)
    return out


def matched_utility_table(records: Sequence[Mapping[str, Any]],
                          fractions: Sequence[float] = MATCHED_FRACTIONS) -> str:
    """Markdown: membership attack success of every defense family at fixed fractions of the undefended
    accuracy (``matched_utility``), one row per family; "" without an undefended run or membership metrics."""
    metrics = [m for m in MATCHED_METRICS if any(m in r for r in records)]
    cells = {(m, f): matched_utility(records, m, f) for m in metrics for f in fractions}
    families = list(dict.fromkeys(family for table in cells.values() for family in table))
    if not families:
        return ""
    header = ["defense", *[f"{m.removeprefix('attack/')} at {f:.0%} accuracy" for m in metrics for f in fractions]]
    lines = ["", "### Attack success at matched utility", "",
             "Each defense's strengths joined piecewise linearly in test accuracy and read at a fraction of the "
             "undefended run's accuracy (intervals: their ends joined alike); no extrapolation.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for family in families:
        row, said = [family], set()
        for m in metrics:
            for f in fractions:
                value = cells[(m, f)].get(family, "n/a")
                if isinstance(value, str):  # a reason is given once per row; later cells with it say "n/a"
                    row.append("n/a" if value in said else value)
                    said.add(value)
                else:
                    middle, low, high = value
                    row.append(f"{middle:.3f}" if math.isnan(low) else f"{middle:.3f} [{low:.3f}, {high:.3f}]")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + ["", ""])


def write_tables(records: Sequence[Record], out_dir: str, *, store_records: Sequence[Mapping[str, Any]] = (),
                 figures: Sequence[PointFigures] = (), views: Mapping[str, str] = ATTACK_VIEWS) -> dict[str, str]:
    """Writes ``attack_eval.csv`` (every metric, full precision), ``attack_eval.md`` (one table per threat model,
    with intervals, and the epsilon bases), ``frontier.png`` (attack success against test accuracy and bytes, one
    curve per defense over its strengths) and the ROC curves and reconstruction grids of ``figures``
    (``draw_point_figures``)."""
    from fedjaxpriv.report import basis_notes, plot_frontier
    from fedjaxpriv.results import write_csv

    os.makedirs(out_dir, exist_ok=True)
    csv_path, md_path = os.path.join(out_dir, "attack_eval.csv"), os.path.join(out_dir, "attack_eval.md")
    write_csv(csv_path, records)
    with open(md_path, "w") as f:
        f.write("# Defenses against attacks\n\n" + threat_model_tables(records, views)
                + matched_utility_table(records) + basis_notes(records))
    written = {"csv": csv_path, "markdown": md_path}
    frontier = plot_frontier(store_records, os.path.join(out_dir, "frontier.png")) if store_records else None
    if frontier:
        written["frontier"] = frontier
    written.update(draw_point_figures(figures, out_dir))
    return written


# ----------------------------------------------------------------------------------------------------------
# The figures of each defense point, kept beside its store record so that ``fedjaxpriv report`` redraws them.

FIGURES_DIR = "figures"  # <store>/figures/<config hash>.npz, one per defense point


class PointFigures(NamedTuple):
    """What one defense point's figures are drawn from.

    Attributes:
      label: the point's label, e.g. "pruning sparsity=0.9".
      scores: {attack: (scores [M], membership labels [M])} of the membership attacks, for ROC curves.
      views: {attack: name of the threat model whose view it uses}.
      grid: the inversion's ``(originals [N, *input_shape], reconstructions [N, *input_shape], N titles)``
        (``InversionReport.grid_images``), or None without reconstructions.
    """

    label: str
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]]
    views: Mapping[str, str]
    grid: tuple[np.ndarray, np.ndarray, list[str]] | None = None


def point_figures(result: DefenseResult, views: Mapping[str, str] = ATTACK_VIEWS) -> PointFigures:
    """The figures' data of one evaluated point (the grid: up to 12 examples, 3 per target)."""
    report = result.inversion
    grid = report.grid_images(max_images=12, per_target=3) if report is not None and report.targets else None
    return PointFigures(result.record["label"], dict(result.scores),
                        {a: views.get(a, "unknown") for a in result.scores}, grid)


def save_point_figures(figures: PointFigures, out_dir: str, config_hash: str) -> str:
    """Writes ``figures`` to ``out_dir/figures/<config_hash>.npz`` (atomically) -> its path."""
    import io

    attacks = list(figures.scores)
    arrays: dict[str, np.ndarray] = {"label": np.array(figures.label), "attacks": np.array(attacks, dtype=str),
                                     "views": np.array([figures.views[a] for a in attacks], dtype=str)}
    for i, attack in enumerate(attacks):
        arrays[f"scores_{i}"], arrays[f"labels_{i}"] = (np.asarray(v) for v in figures.scores[attack])
    if figures.grid is not None:
        originals, reconstructions, titles = figures.grid
        arrays.update(originals=np.asarray(originals), reconstructions=np.asarray(reconstructions),
                      titles=np.array(titles, dtype=str))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    os.makedirs(os.path.join(out_dir, FIGURES_DIR), exist_ok=True)
    path = os.path.join(out_dir, FIGURES_DIR, f"{config_hash}.npz")
    atomic_write(path, buffer.getvalue())
    return path


def load_point_figures(path: str) -> PointFigures:
    """Reads a file written by ``save_point_figures``.

    Raises:
      ValueError: naming the file, when it cannot be read as one.
    """
    try:
        with np.load(path, allow_pickle=False) as kept:
            attacks = [str(a) for a in kept["attacks"]]
            scores = {a: (kept[f"scores_{i}"], kept[f"labels_{i}"]) for i, a in enumerate(attacks)}
            grid = ((kept["originals"], kept["reconstructions"], [str(t) for t in kept["titles"]])
                    if "titles" in kept.files else None)
            return PointFigures(str(kept["label"]), scores, dict(zip(attacks, (str(v) for v in kept["views"]))),
                                grid)
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise ValueError(f"{path}: not a defense point's figures file ({error}); delete it and run attack-eval "
                         f"into the same directory again to rewrite it.") from None


def figures_for(records: Sequence[Mapping[str, Any]], directories: Sequence[str]) -> list[PointFigures]:
    """The kept figures of ``records`` (in their order), looked up by config hash in each directory's
    ``figures/``; records without a file are left out."""
    found = []
    for record in records:
        for directory in directories:
            path = os.path.join(directory, FIGURES_DIR, f"{record.get('config_hash')}.npz")
            if os.path.isfile(path):
                found.append(load_point_figures(path))
                break
    return found


def draw_point_figures(points: Sequence[PointFigures], out_dir: str) -> dict[str, str]:
    """Writes ``roc_<attack>.png`` (log-log ROC curves, one per point that ran the attack) and
    ``inversion_<label>.png`` (originals above their reconstructions, one per point with any) -> {name: path}."""
    from fedjaxpriv.attacks.inversion import save_image_grid
    from fedjaxpriv.attacks.membership import plot_roc

    written = {}
    os.makedirs(out_dir, exist_ok=True)
    for point in points:
        if point.grid is not None:
            path = os.path.join(out_dir, f"inversion_{point.label.replace(' ', '_').replace('=', '')}.png")
            save_image_grid(path, *point.grid)
            written[f"inversion_{point.label}"] = path
    for attack in sorted({a for point in points for a in point.scores}):
        curves = {point.label: point.scores[attack] for point in points if attack in point.scores}
        view = next(point.views.get(attack, "unknown") for point in points if attack in point.scores)
        written[f"roc_{attack}"] = plot_roc(curves, os.path.join(out_dir, f"roc_{attack}.png"),
                                            title=f"{attack}: {view}'s view")
    return written
