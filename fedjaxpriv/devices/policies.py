"""Policies: from each client's device to its training settings, plus stragglers, dropouts and round cost.

A device-aware policy gives each client what its device can afford within the round deadline:

* local steps from compute: ``floor(compute_budget_s * flops_per_s / (batch_size * flops_per_example))``,
  clipped to ``[min_local_steps, max_local_steps]``; ``flops_per_example = 6 x num_params`` by default
  (forward ~2 FLOP per parameter, backward ~2x forward);
* pruning sparsity from memory: training needs ``train_memory_factor x 4 bytes x num_params`` (weights,
  gradients, optimizer state, activations); a device with less keeps only the fraction that fits:
  ``clip(1 - memory / needed, 0, max_prune_sparsity)``;
* quantization bits from bandwidth: ``floor(upload_budget_s * uplink_bps / num_params)`` bits per coordinate,
  float32 (``quant_bits=0``) when 32 or more fit, at least ``min_quant_bits``;
* DP-SGD noise from the privacy tier: clients with a finite ``target_epsilon`` get ``dp_clip_norm`` and the
  noise multiplier calibrated (dp_accounting) to meet their target over the planned rounds.

The uniform policy keeps the base settings for everyone (and the strictest privacy target for all).
Stragglers (compute + upload time over ``round_deadline_s``) drop out of every round (``stragglers="drop"``)
or run the steps that fit (``"fewer_steps"``; they drop out if none fits). Independently, each device is
unavailable in a round with its ``dropout_prob``. ``DeviceExperiment`` runs an experiment with all of this.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

import jax

from fedjaxpriv.client.settings import ClientSettings, validate_settings
from fedjaxpriv.devices.profiles import DeviceProfiles, sample_profiles
from fedjaxpriv.experiment import Experiment, client_settings, load_population, model_for, target_epsilons
from fedjaxpriv.models import count_params

POLICY_KINDS = ("uniform", "device_aware")
STRAGGLER_MODES = ("drop", "fewer_steps")
BYTES_PER_PARAM = 4.0
FLOAT_BITS = 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class DevicePolicy:
    """How device capabilities become client settings.

    Attributes:
      kind: "uniform" (base settings for all) or "device_aware".
      num_params: model parameter count P.
      round_deadline_s: a round's wall-time budget; slower clients are stragglers.
      compute_budget_s: local-training time budget of the device-aware policy (default 0.8 x deadline).
      upload_budget_s: upload time budget (default deadline - compute budget).
      flops_per_example: FLOPs of one example's forward+backward pass (default 6 x P).
      min_local_steps / max_local_steps: bounds of the device-aware local steps.
      train_memory_factor: training memory in units of the float32 model size.
      max_prune_sparsity: largest sparsity the policy assigns, in [0, 1).
      min_quant_bits: fewest bits per coordinate the policy assigns, in [1, 31].
      stragglers: "drop" or "fewer_steps".
      dp_clip_norm: per-example clip norm given to clients with a privacy requirement.
      rounds / client_rate / delta / accountant: the planned run, for calibrating noise to target epsilons.
    """

    kind: str = "device_aware"
    num_params: int
    round_deadline_s: float
    compute_budget_s: float | None = None
    upload_budget_s: float | None = None
    flops_per_example: float | None = None
    min_local_steps: int = 1
    max_local_steps: int = 100
    train_memory_factor: float = 4.0
    max_prune_sparsity: float = 0.9
    min_quant_bits: int = 2
    stragglers: str = "drop"
    dp_clip_norm: float = 1.0
    rounds: int = 1
    client_rate: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"DevicePolicy.{field}={getattr(self, field)!r} is invalid; allowed: {allowed}.")

        check(self.kind in POLICY_KINDS, "kind", f"one of {list(POLICY_KINDS)}")
        check(self.stragglers in STRAGGLER_MODES, "stragglers", f"one of {list(STRAGGLER_MODES)}")
        check(self.num_params >= 1, "num_params", "an integer >= 1")
        check(self.round_deadline_s > 0, "round_deadline_s", "a number > 0 (inf = no deadline)")
        check(self.compute_budget_s is None or 0 < self.compute_budget_s <= self.round_deadline_s,
              "compute_budget_s", "None or in (0, round_deadline_s]")
        check(self.upload_budget_s is None or self.upload_budget_s > 0, "upload_budget_s", "None or > 0")
        check(self.flops_per_example is None or self.flops_per_example > 0, "flops_per_example", "None or > 0")
        check(0 <= self.min_local_steps <= self.max_local_steps, "min_local_steps", "0 <= min <= max_local_steps")
        check(self.train_memory_factor > 0, "train_memory_factor", "a number > 0")
        check(0 <= self.max_prune_sparsity < 1, "max_prune_sparsity", "[0, 1)")
        check(1 <= self.min_quant_bits <= 31, "min_quant_bits", "an integer in [1, 31]")
        check(self.dp_clip_norm > 0, "dp_clip_norm", "a number > 0")
        check(self.rounds >= 1, "rounds", "an integer >= 1")
        check(0 < self.client_rate <= 1, "client_rate", "(0, 1]")
        check(0 < self.delta < 1, "delta", "(0, 1)")

    @property
    def example_flops(self) -> float:
        """FLOPs per example per local step."""
        return self.flops_per_example or 6.0 * self.num_params

    @property
    def compute_budget(self) -> float:
        return self.compute_budget_s or 0.8 * self.round_deadline_s

    @property
    def upload_budget(self) -> float:
        return self.upload_budget_s or self.round_deadline_s - self.compute_budget


# -- per-client estimates -------------------------------------------------------------------------------------
def message_bits(settings: ClientSettings, num_params: int) -> np.ndarray:
    """Estimated bits of each client's message [C]: kept coordinates x (value bits + index bits if sparse)."""
    bits = np.asarray(settings.quant_bits)
    value_bits = np.where((bits > 0) & (bits < FLOAT_BITS), bits, FLOAT_BITS).astype(np.float64)
    density = (np.asarray(settings.topk_fraction, np.float64) * np.asarray(settings.randk_fraction, np.float64)
               * (1.0 - np.asarray(settings.sparsity, np.float64)))
    index_bits = np.where(density < 1.0, math.ceil(math.log2(max(num_params, 2))), 0)
    return num_params * density * (value_bits + index_bits)


def training_flops(policy: DevicePolicy, settings: ClientSettings) -> np.ndarray:
    """FLOPs of each client's local training in one round [C]: steps x batch x flops per example."""
    return np.asarray(settings.local_steps, np.float64) * np.asarray(settings.batch_size, np.float64) * \
        policy.example_flops


def compute_time(policy: DevicePolicy, profiles: DeviceProfiles, settings: ClientSettings) -> np.ndarray:
    """Seconds of local training per client [C]."""
    return training_flops(policy, settings) / profiles.flops_per_s


def upload_time(policy: DevicePolicy, profiles: DeviceProfiles, settings: ClientSettings) -> np.ndarray:
    """Seconds to upload each client's message [C]."""
    return message_bits(settings, policy.num_params) / profiles.uplink_bps


def straggler_mask(policy: DevicePolicy, profiles: DeviceProfiles, settings: ClientSettings) -> np.ndarray:
    """True [C] for clients that cannot take part within the deadline (too slow, or no step fits)."""
    total = compute_time(policy, profiles, settings) + upload_time(policy, profiles, settings)
    return (total > policy.round_deadline_s) | (np.asarray(settings.local_steps) <= 0)


def availability(profiles: DeviceProfiles, seed: int, round_index: int) -> np.ndarray:
    """Random per-round availability [C] bool: each device is away with its ``dropout_prob``."""
    rng = np.random.default_rng([seed, round_index, 0xA7A1])
    return rng.random(profiles.num_clients) >= profiles.dropout_prob


def participation_mask(policy: DevicePolicy, profiles: DeviceProfiles, settings: ClientSettings, seed: int,
                       round_index: int) -> np.ndarray:
    """Clients [C] that can take part in a round: available and not stragglers."""
    return availability(profiles, seed, round_index) & ~straggler_mask(policy, profiles, settings)


# -- policies ---------------------------------------------------------------------------------------------------
def _device_aware(policy: DevicePolicy, profiles: DeviceProfiles, base: ClientSettings) -> dict[str, np.ndarray]:
    batch = np.asarray(base.batch_size, np.float64)
    steps = np.floor(policy.compute_budget * profiles.flops_per_s / (batch * policy.example_flops))
    steps = np.clip(steps, policy.min_local_steps, policy.max_local_steps)
    needed = policy.train_memory_factor * BYTES_PER_PARAM * policy.num_params
    sparsity = np.clip(1.0 - profiles.memory_bytes / needed, 0.0, policy.max_prune_sparsity)
    bits = np.floor(policy.upload_budget * profiles.uplink_bps / policy.num_params)
    bits = np.where(bits >= FLOAT_BITS, 0, np.maximum(bits, policy.min_quant_bits))
    return dict(local_steps=steps.astype(np.int32), prune_sparsity=sparsity.astype(np.float32),
                quant_bits=bits.astype(np.int32), target_epsilon=np.asarray(profiles.target_epsilon, np.float64))


def _uniform(policy: DevicePolicy, profiles: DeviceProfiles, base: ClientSettings) -> dict[str, np.ndarray]:
    strictest = float(np.min(profiles.target_epsilon))
    return dict(target_epsilon=np.full(profiles.num_clients, strictest))


def _fit_steps_to_deadline(policy: DevicePolicy, profiles: DeviceProfiles, settings: ClientSettings) -> np.ndarray:
    spare = policy.round_deadline_s - upload_time(policy, profiles, settings)
    per_step = np.asarray(settings.batch_size, np.float64) * policy.example_flops / profiles.flops_per_s
    fits = np.floor(np.maximum(spare, 0.0) / per_step)
    return np.minimum(np.asarray(settings.local_steps), fits).astype(np.int32)


def _clip_private(policy: DevicePolicy, settings: ClientSettings, targets: np.ndarray) -> ClientSettings:
    """Clients with a privacy requirement clip per example (``policy.dp_clip_norm`` unless already clipping)."""
    private = np.isfinite(targets)
    clip = np.array(settings.dp_clip_norm, np.float32)
    clip[private] = np.where(np.isfinite(clip[private]), clip[private], policy.dp_clip_norm)
    return settings._replace(dp_clip_norm=clip)


def policy_settings(policy: DevicePolicy, profiles: DeviceProfiles,
                    base_settings: ClientSettings) -> tuple[ClientSettings, np.ndarray]:
    """Per-client settings [C] under ``policy`` before noise calibration, and each client's target epsilon
    [C] (inf = none): ``apply_policy`` without the calibration (``Experiment`` calibrates)."""
    if profiles.num_clients != base_settings.lr.shape[0]:
        raise ValueError(f"profiles describe {profiles.num_clients} devices but the settings have "
                         f"{base_settings.lr.shape[0]} clients.")
    chosen = (_device_aware if policy.kind == "device_aware" else _uniform)(policy, profiles, base_settings)
    targets = np.asarray(chosen.pop("target_epsilon"), np.float64)
    settings = base_settings._replace(**chosen)
    if policy.stragglers == "fewer_steps":
        settings = settings._replace(local_steps=_fit_steps_to_deadline(policy, profiles, settings))
    settings = _clip_private(policy, settings, targets)
    validate_settings(settings)
    return settings, targets


def apply_policy(policy: DevicePolicy, profiles: DeviceProfiles, base_settings: ClientSettings,
                 counts: np.ndarray) -> ClientSettings:
    """Per-client settings [C] for this device population under ``policy``.

    Args:
      policy: the policy.
      profiles: devices [C], indexed like the clients of ``base_settings``.
      base_settings: settings from the config; fields the policy does not set are kept.
      counts: the clients' data sizes [C] (their DP-SGD mechanisms depend on them).

    Returns:
      New ``ClientSettings`` (validated), with DP-SGD noise calibrated to each privacy tier's target over
      the planned participations (``privacy.tracking.calibrate_targets``).
    """
    from fedjaxpriv.privacy.tracking import calibrate_targets

    settings, targets = policy_settings(policy, profiles, base_settings)
    return calibrate_targets(settings, counts, targets, client_rate=policy.client_rate, rounds=policy.rounds,
                             delta=policy.delta, accountant=policy.accountant)[0]


# -- cost -------------------------------------------------------------------------------------------------------
def round_cost(policy: DevicePolicy, profiles: DeviceProfiles, settings: ClientSettings, participants: np.ndarray,
               bytes_total: float | None = None) -> dict[str, float]:
    """Cost of one round over its participants.

    Args:
      policy: gives P and FLOPs per example.
      profiles / settings: devices and settings [C].
      participants: [C] bool, or int client ids.
      bytes_total: bytes all participants sent (a history's ``bytes_total``); the per-client message
        estimates are rescaled to add up to it. None: use the estimates as they are.

    Returns:
      ``cost_flops`` (sum), ``cost_upload_bits`` (sum), ``cost_energy_j`` (sum of FLOPs x J/FLOP + bits x
      J/bit), ``cost_compute_time_max_s``, ``cost_upload_time_max_s``, ``cost_wall_time_s`` (max over
      participants of compute + upload time; 0 without participants).
    """
    participants = np.asarray(participants)
    mask = participants if participants.dtype == bool else np.isin(np.arange(profiles.num_clients), participants)
    flops = np.where(mask, training_flops(policy, settings), 0.0)
    bits = np.where(mask, message_bits(settings, policy.num_params), 0.0)
    if bytes_total is not None and bits.sum() > 0:
        bits = bits * (8.0 * bytes_total / bits.sum())
    compute = flops / profiles.flops_per_s
    upload = bits / profiles.uplink_bps
    energy = flops * profiles.joules_per_flop + bits * profiles.joules_per_bit
    any_ = bool(mask.any())
    return {"cost_flops": float(flops.sum()), "cost_upload_bits": float(bits.sum()),
            "cost_energy_j": float(energy.sum()),
            "cost_compute_time_max_s": float(compute[mask].max()) if any_ else 0.0,
            "cost_upload_time_max_s": float(upload[mask].max()) if any_ else 0.0,
            "cost_wall_time_s": float((compute + upload)[mask].max()) if any_ else 0.0}


def add_cost_fields(record: Mapping[str, Any], policy: DevicePolicy, profiles: DeviceProfiles,
                    settings: ClientSettings, participants: np.ndarray) -> dict[str, Any]:
    """A copy of a history record with the ``round_cost`` fields (rescaled to its ``bytes_total``)."""
    return {**record, **round_cost(policy, profiles, settings, participants, record.get("bytes_total"))}


class DeviceExperiment(Experiment):
    """An ``Experiment`` whose clients run on devices: settings from a policy, stragglers and dropouts
    removed from each round's cohort, and cost fields in every history record.

    Attributes:
      profiles: the devices [C].
      policy: the policy.
      base_settings: the settings the config alone would give.
    """

    def __init__(self, config: Any, profiles: DeviceProfiles, policy: DevicePolicy, *,
                 population: Any = None, test: Any = None, num_classes: int | None = None, **kwargs: Any) -> None:
        if population is None:
            population, test, num_classes = load_population(config)
            kwargs["data_from_config"] = True
        self.profiles, self.policy = profiles, policy
        self.base_settings = client_settings(config, population.counts)
        settings, tier_targets = policy_settings(policy, profiles, self.base_settings)
        targets = np.minimum(tier_targets, target_epsilons(config, population.num_clients))
        self.stragglers = straggler_mask(policy, profiles, settings)
        if np.all(self.stragglers):  # no round would ever have a participant
            fastest = float(np.min(compute_time(policy, profiles, settings) + upload_time(policy, profiles, settings)))
            hint = ("" if config.devices.stragglers == "fewer_steps"
                    else " or use devices.stragglers='fewer_steps'")
            raise ValueError(f"devices.round_deadline_s={policy.round_deadline_s:g} is met by no client (the fastest "
                             f"needs {fastest:.3g} s for its steps and upload, and a client must run a step): no "
                             f"round would have a participant; raise devices.round_deadline_s{hint}.")
        super().__init__(config, population=population, test=test, num_classes=num_classes, settings=settings,
                         targets=targets, **kwargs)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> "DeviceExperiment":
        """Devices and policy from ``config.devices`` (a population drawn from the default tiers)."""
        d = config.devices
        if d.policy == "none":
            raise ValueError("devices.policy='none': use Experiment, or choose 'uniform' or 'device_aware'.")
        profiles = sample_profiles(config.data.num_clients, config.run.seed, tiers=d.device_tiers(), jitter=d.jitter)
        if not d.privacy_tiers:
            profiles = profiles._replace(target_epsilon=np.full(profiles.num_clients, np.inf))
        population = kwargs["population"] if kwargs.get("population") is not None else load_population(config)[0]
        model = model_for(config, population.input_shape, model=kwargs.get("model"), input_dtype=population.x.dtype)
        policy = DevicePolicy(kind=d.policy, num_params=count_params(model.init(jax.random.key(0))),
                              round_deadline_s=d.round_deadline_s, stragglers=d.stragglers,
                              max_local_steps=d.max_local_steps, train_memory_factor=d.train_memory_factor,
                              rounds=config.run.rounds,
                              client_rate=config.server.clients_per_round / config.data.num_clients,
                              delta=config.run.delta, accountant=config.run.accountant)
        return cls(config, profiles, policy, **kwargs)

    def cohort(self, round_index: int):
        cohort = super().cohort(round_index)
        can = participation_mask(self.policy, self.profiles, self.settings, self.config.run.seed, round_index)
        return cohort._replace(mask=cohort.mask & can[cohort.ids])

    def annotate(self, record: dict[str, Any], cohort: Any) -> dict[str, Any]:
        participants = np.zeros(self.profiles.num_clients, bool)
        participants[cohort.ids[cohort.mask]] = True
        record = add_cost_fields(record, self.policy, self.profiles, self.settings, participants)
        record["stragglers"] = int(self.stragglers.sum())
        return record
