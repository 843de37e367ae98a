"""Experiment configuration: frozen, keyword-only dataclasses validated on construction.

Per-client numeric settings (``PerClient`` fields) accept a scalar (every client the same), a list of tier
values (client ``i`` gets ``values[i % len(values)]``), or a list with one value per client. They become the
per-client arrays of ``ClientSettings`` that local training reads, so heterogeneous clients run in one call.

Configs load from YAML/JSON files and dotted overrides (``client.lr=0.05``) via ``from_dict``/``with_overrides``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from typing import Any, Mapping, Sequence, Union

PerClient = Union[float, int, tuple]


def _check(condition: bool, field: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ValueError(f"{field}={value!r} is invalid; allowed: {allowed}.")


def _check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
    _check(value in choices, field, value, f"one of {list(choices)}")


def _values(value: PerClient) -> tuple[float, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _check_per_client(field: str, value: PerClient, low: float, high: float, *, low_open: bool = False,
                      high_open: bool = False, allowed: str | None = None) -> None:
    for v in _values(value):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
        ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        _check(ok, field, value, allowed or f"numbers in {lo}{low}, {high}{hi} (scalar or per-client list)")


# Datasets generated with their own clients (``partition`` is ignored): "synthetic" (Li et al.'s
# Synthetic(alpha, beta)) and "attribute" (tabular, with a binary sensitive attribute in the last input column and
# client-specific group shares: ``attacks.attribute.attribute_population``).
NATURAL_DATASETS: tuple[str, ...] = ("synthetic", "attribute")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which data and how it is split into clients."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    image_key: str = "image"
    label_key: str = "label"
    partition: str = "dirichlet"
    num_clients: int = 50
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    quantity_sigma: float = 1.0
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    synthetic_max_size: int | None = 2000

    def __post_init__(self) -> None:
        _check_choice("data.partition", self.partition, ("iid", "dirichlet", "shards", "quantity_skew", "natural"))
        _check(self.num_clients >= 1, "data.num_clients", self.num_clients, "an integer >= 1")
        _check(self.dirichlet_alpha > 0, "data.dirichlet_alpha", self.dirichlet_alpha, "a number > 0")
        _check(self.shards_per_client >= 1, "data.shards_per_client", self.shards_per_client, "an integer >= 1")
        _check(self.quantity_sigma >= 0, "data.quantity_sigma", self.quantity_sigma, "a number >= 0")
        _check(self.synthetic_alpha >= 0, "data.synthetic_alpha", self.synthetic_alpha, "a number >= 0")
        _check(self.synthetic_beta >= 0, "data.synthetic_beta", self.synthetic_beta, "a number >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which model. ``hidden`` sets the MLP widths."""

    name: str = "mlp"
    hidden: tuple[int, ...] = (64,)

    def __post_init__(self) -> None:
        _check(all(int(h) >= 1 for h in self.hidden), "model.hidden", self.hidden, "positive layer widths")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """Local training. Fields typed ``PerClient`` may differ between clients.

    Attributes:
      local_steps: optimizer steps per round (0 means the client sends a zero update).
      batch_size: examples per step (fixed-size sampling) or the expected batch (Poisson sampling).
      lr: local SGD learning rate.
      momentum: local SGD momentum (same for all clients).
      prox_mu: FedProx proximal coefficient (0 = FedAvg).
      sampling: "fixed" (without replacement, full batches) or "poisson" (each example with rate
        batch_size / n_i per step, variable batch).
      mixup_alpha: mixup Beta(alpha, alpha) parameter (0 = off).
      prune_sparsity: fraction of each prunable layer held at zero during local training, in [0, 1).
      prune_method / prune_scope: "magnitude" or "random"; "layer" or "global".
      prune_begin_round / prune_end_round: iterative pruning: sparsity ramps from 0 at the begin round to
        prune_sparsity at the end round (Zhu & Gupta 2017 cubic schedule); equal values mean constant.
      dp_clip_norm / dp_noise_multiplier: sample-level DP-SGD (per-example clipping and Gaussian noise);
        noise multiplier 0 and clip norm inf switch it off.
      target_epsilon: if set, each client's dp_noise_multiplier is calibrated before training so that its
        sample-level epsilon after ``run.rounds`` rounds is at most this value (needs privacy accounting).
    """

    local_steps: PerClient = 10
    batch_size: PerClient = 16
    lr: PerClient = 0.1
    momentum: float = 0.0
    prox_mu: PerClient = 0.0
    sampling: str = "fixed"
    mixup_alpha: PerClient = 0.0
    prune_sparsity: PerClient = 0.0
    prune_method: str = "magnitude"
    prune_scope: str = "layer"
    dp_clip_norm: PerClient = math.inf
    dp_noise_multiplier: PerClient = 0.0
    target_epsilon: PerClient | None = None
    prune_begin_round: int = 0
    prune_end_round: int = 0

    def __post_init__(self) -> None:
        _check(0 <= self.prune_begin_round <= self.prune_end_round, "client.prune_end_round", self.prune_end_round,
               f"an integer >= client.prune_begin_round={self.prune_begin_round} >= 0")
        _check_per_client("client.local_steps", self.local_steps, 0, 10**6)
        _check_per_client("client.batch_size", self.batch_size, 1, 10**6)
        _check_per_client("client.lr", self.lr, 0, math.inf, low_open=True, high_open=True)
        _check(0 <= self.momentum < 1, "client.momentum", self.momentum, "a number in [0, 1)")
        _check_per_client("client.prox_mu", self.prox_mu, 0, math.inf, high_open=True)
        _check_choice("client.sampling", self.sampling, ("fixed", "poisson"))
        _check_per_client("client.mixup_alpha", self.mixup_alpha, 0, math.inf, high_open=True)
        _check_per_client("client.prune_sparsity", self.prune_sparsity, 0, 1, high_open=True)
        _check_choice("client.prune_method", self.prune_method, ("magnitude", "random"))
        _check_choice("client.prune_scope", self.prune_scope, ("layer", "global"))
        _check_per_client("client.dp_clip_norm", self.dp_clip_norm, 0, math.inf, low_open=True)
        _check_per_client("client.dp_noise_multiplier", self.dp_noise_multiplier, 0, math.inf, high_open=True)
        if self.target_epsilon is not None:
            _check_per_client("client.target_epsilon", self.target_epsilon, 0, math.inf, low_open=True,
                              high_open=True)


MESSAGE_STAGES = ("prune", "topk", "randk", "clip", "noise", "round", "qsgd")
NORM_NONINCREASING_STAGES = ("prune", "topk", "randk")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MessageConfig:
    """Transforms of the update a client sends, applied in ``order`` (stages that are off for every client are
    left out of the compiled round). Fields typed ``PerClient`` may differ between clients.

    Attributes:
      order: stage names from MESSAGE_STAGES, applied first to last.
      sparsity: "prune": magnitude-prune this fraction of each layer of the update, in [0, 1).
      topk_fraction / randk_fraction: "topk"/"randk": fraction of coordinates kept, in (0, 1].
      clip_norm: "clip": L2 clip of the update (inf = off).
      local_noise_multiplier: "noise": local DP Gaussian noise, std = multiplier x clip_norm.
      quant_bits: "round": unbiased stochastic rounding to 2^bits levels per tensor (0 = off).
      qsgd_levels: "qsgd": QSGD with s levels (0 = off).
    """

    order: tuple[str, ...] = MESSAGE_STAGES
    sparsity: PerClient = 0.0
    topk_fraction: PerClient = 1.0
    randk_fraction: PerClient = 1.0
    clip_norm: PerClient = math.inf
    local_noise_multiplier: PerClient = 0.0
    quant_bits: PerClient = 0
    qsgd_levels: PerClient = 0

    def __post_init__(self) -> None:
        for stage in self.order:
            _check_choice("message.order", stage, MESSAGE_STAGES)
        _check(len(set(self.order)) == len(self.order), "message.order", self.order, "each stage at most once")
        _check_per_client("message.sparsity", self.sparsity, 0, 1, high_open=True)
        _check_per_client("message.topk_fraction", self.topk_fraction, 0, 1, low_open=True)
        _check_per_client("message.randk_fraction", self.randk_fraction, 0, 1, low_open=True)
        _check_per_client("message.clip_norm", self.clip_norm, 0, math.inf, low_open=True)
        _check_per_client("message.local_noise_multiplier", self.local_noise_multiplier, 0, math.inf,
                          high_open=True)
        _check_per_client("message.quant_bits", self.quant_bits, 0, 32)
        _check_per_client("message.qsgd_levels", self.qsgd_levels, 0, 2**30)
        noisy = any(v > 0 for v in _values(self.local_noise_multiplier))
        _check(not noisy or all(math.isfinite(v) for v in _values(self.clip_norm)), "message.clip_norm",
               self.clip_norm, "finite whenever message.local_noise_multiplier > 0")
        if noisy:  # local DP holds only for noise added to a message of norm <= clip_norm
            order = list(self.order)
            _check("clip" in order and "noise" in order and order.index("clip") < order.index("noise"),
                   "message.order", self.order, "'clip' before 'noise' when message.local_noise_multiplier > 0 (noise "
                   "added before clipping is scaled down with the message and voids the local DP guarantee)")
            between = order[order.index("clip") + 1:order.index("noise")]
            _check(all(stage in NORM_NONINCREASING_STAGES for stage in between), "message.order", self.order,
                   f"only {list(NORM_NONINCREASING_STAGES)} between 'clip' and 'noise' (they never increase the "
                   "norm; rounding and QSGD can, which would void the clip norm that the noise is scaled to)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Client sampling, aggregation and the server optimizer.

    Attributes:
      algorithm: "fedavg", "fedprox" (needs client.prox_mu > 0) or "fedsgd" (one full-batch gradient step
        per client; the server applies the averaged gradient with ``lr``).
      optimizer: "sgd" (FedAvg: lr 1), "momentum" (FedAvgM) or "adam" (FedAdam).
      clients_per_round: cohort size (uniform) or expected cohort size (Poisson).
      client_sampling: "uniform" (fixed size, without replacement) or "poisson".
      weighting: "examples" (by client data size) or "uniform".
      central_clip_norm / central_noise_multiplier: client-level DP-FedAvg: each update is clipped to the
        norm and Gaussian noise of std multiplier x clip is added to the sum (uniform weighting, fixed
        denominator = expected cohort size).
      adaptive_clip_quantile: adaptive clipping (Andrew et al. 2021): the clip norm starts at
        central_clip_norm and tracks this quantile of the update norms, from a noisy count.
      adaptive_clip_lr: geometric step size of the clip norm update.
      clip_count_noise_multiplier: std of the Gaussian noise on the count of unclipped updates (count units,
        default clients_per_round / 20). The epsilon accounts for both Gaussian releases of a round
        (``privacy.mechanisms.ClientLevelDpFedAvg``).
      target_epsilon: if set, central_noise_multiplier is calibrated before training so that the client-level
        epsilon after ``run.rounds`` rounds is at most this value (needs a finite central_clip_norm; leave
        central_noise_multiplier at 0).
    """

    algorithm: str = "fedavg"
    optimizer: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.9
    adam_b1: float = 0.9
    adam_b2: float = 0.99
    adam_eps: float = 1e-3
    clients_per_round: int = 10
    client_sampling: str = "uniform"
    weighting: str = "examples"
    central_clip_norm: float = math.inf
    central_noise_multiplier: float = 0.0
    adaptive_clip_quantile: float | None = None
    adaptive_clip_lr: float = 0.2
    clip_count_noise_multiplier: float | None = None
    target_epsilon: float | None = None

    def __post_init__(self) -> None:
        if self.adaptive_clip_quantile is not None:
            _check(0 < self.adaptive_clip_quantile < 1, "server.adaptive_clip_quantile",
                   self.adaptive_clip_quantile, "a number in (0, 1), or null for a fixed clip norm")
            _check(math.isfinite(self.central_clip_norm), "server.central_clip_norm", self.central_clip_norm,
                   "a finite initial clip norm when server.adaptive_clip_quantile is set")
        _check(self.adaptive_clip_lr > 0, "server.adaptive_clip_lr", self.adaptive_clip_lr, "a number > 0")
        _check(self.clip_count_noise_multiplier is None or self.clip_count_noise_multiplier > 0,
               "server.clip_count_noise_multiplier", self.clip_count_noise_multiplier,
               "a number > 0, or null for clients_per_round / 20")
        _check_choice("server.algorithm", self.algorithm, ("fedavg", "fedprox", "fedsgd"))
        _check_choice("server.optimizer", self.optimizer, ("sgd", "momentum", "adam"))
        _check(self.lr > 0, "server.lr", self.lr, "a number > 0")
        _check(0 <= self.momentum < 1, "server.momentum", self.momentum, "a number in [0, 1)")
        _check(self.clients_per_round >= 1, "server.clients_per_round", self.clients_per_round, "an integer >= 1")
        _check_choice("server.client_sampling", self.client_sampling, ("uniform", "poisson"))
        _check_choice("server.weighting", self.weighting, ("examples", "uniform"))
        _check(self.central_clip_norm > 0, "server.central_clip_norm", self.central_clip_norm, "a number > 0")
        _check(self.central_noise_multiplier >= 0, "server.central_noise_multiplier",
               self.central_noise_multiplier, "a number >= 0")
        _check(self.central_noise_multiplier == 0 or math.isfinite(self.central_clip_norm),
               "server.central_clip_norm", self.central_clip_norm,
               "a finite clip norm whenever server.central_noise_multiplier > 0")
        if self.target_epsilon is not None:
            _check(isinstance(self.target_epsilon, (int, float)) and 0 < self.target_epsilon < math.inf,
                   "server.target_epsilon", self.target_epsilon, "a finite number > 0, or null")
            _check(math.isfinite(self.central_clip_norm), "server.central_clip_norm", self.central_clip_norm,
                   "a finite clip norm when server.target_epsilon is set")
            _check(self.central_noise_multiplier == 0, "server.central_noise_multiplier",
                   self.central_noise_multiplier, "0 when server.target_epsilon is set (it is calibrated)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """How the simulation runs.

    Attributes:
      rounds: number of federated rounds.
      seed: root seed; every random draw derives from it.
      eval_every: evaluate the global model every this many rounds (and at the last round).
      chunk_size: clients trained at once per device; bounds memory at O(chunk x params). 0 = automatic.
      num_devices: devices the clients are sharded over (a "clients" mesh of the default backend's local
        devices); 0 = all of them, 1 = no sharding. On CPU the command line makes one device per core.
      strategy: "auto", "vmap" (vectorize each chunk), "loop" (one client at a time inside the compiled
        round) or "host" (one compiled call per client from Python, over the devices; fastest for convnets
        on CPU). "auto" picks per model and backend (``parallel.auto_strategy``).
      checkpoint_every: save a resumable checkpoint every this many rounds (0 = only at the end).
      delta: target delta for privacy accounting.
      accountant: "rdp" or "pld" (dp_accounting).
      tap_clients / tap_rounds: attack taps: in each listed round (1-based), record the messages that the listed
        clients taking part in that round send, and the server model they start from.
    """

    rounds: int = 40
    seed: int = 0
    eval_every: int = 1
    chunk_size: int = 0
    num_devices: int = 0
    strategy: str = "auto"
    checkpoint_every: int = 10
    delta: float = 1e-5
    accountant: str = "rdp"
    tap_clients: tuple[int, ...] = ()
    tap_rounds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("run.accountant", self.accountant, ("rdp", "pld"))
        _check(self.rounds >= 1, "run.rounds", self.rounds, "an integer >= 1")
        _check(self.eval_every >= 1, "run.eval_every", self.eval_every, "an integer >= 1")
        _check(self.chunk_size >= 0, "run.chunk_size", self.chunk_size, "an integer >= 0")
        _check(self.num_devices >= 0, "run.num_devices", self.num_devices, "an integer >= 0 (0 = all devices)")
        _check_choice("run.strategy", self.strategy, ("auto", "vmap", "loop", "host"))
        _check(self.checkpoint_every >= 0, "run.checkpoint_every", self.checkpoint_every, "an integer >= 0")
        _check(0 < self.delta < 1, "run.delta", self.delta, "a number in (0, 1)")
        _check(all(int(r) >= 1 for r in self.tap_rounds), "run.tap_rounds", self.tap_rounds, "round numbers >= 1")
        _check(all(int(c) >= 0 for c in self.tap_clients), "run.tap_clients", self.tap_clients, "client ids >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DevicesConfig:
    """Simulated devices (``fedjaxpriv.devices``): a population drawn from the default device tiers and a
    policy that turns each device's compute, memory, bandwidth and privacy tier into its settings.

    Attributes:
      policy: "none" (the config's settings, no devices), "uniform" (the config's settings on devices:
        stragglers and dropouts happen, costs are recorded) or "device_aware" (local steps from compute,
        pruning from memory, quantization bits from bandwidth, DP noise from the privacy tier).
      jitter: log-normal spread of each device's capabilities around its tier's values.
      round_deadline_s: the round's wall-time budget; slower clients are stragglers.
      stragglers: "drop" (stragglers never take part) or "fewer_steps" (they run the steps that fit).
      max_local_steps: upper bound of the device-aware local steps.
      train_memory_factor: training memory in units of the float32 model size.
      privacy_tiers: use the tiers' privacy requirements (target epsilons); False = no DP from devices.
      tiers: the device kinds, each a mapping of ``DeviceTier`` fields (name, probability, flops_per_s,
        memory_bytes, uplink_bps, joules_per_flop, joules_per_bit, dropout_prob, target_epsilon); empty = the
        built-in phone-to-laptop tiers (``fedjaxpriv.devices.DEFAULT_TIERS``).
    """

    policy: str = "none"
    jitter: float = 0.0
    round_deadline_s: float = 1.0
    stragglers: str = "drop"
    max_local_steps: int = 100
    train_memory_factor: float = 4.0
    privacy_tiers: bool = False
    tiers: tuple[Mapping[str, Any], ...] = ()

    def device_tiers(self) -> tuple:
        """The tiers as ``DeviceTier`` objects (validated)."""
        from fedjaxpriv.devices.profiles import DEFAULT_TIERS, DeviceTier, check_tiers

        if not self.tiers:
            return DEFAULT_TIERS
        try:
            tiers = tuple(DeviceTier(**dict(t)) for t in self.tiers)
        except TypeError as error:
            raise ValueError(f"devices.tiers={list(self.tiers)!r} is invalid: {error}; each tier takes the "
                             "fields of DeviceTier.") from None
        check_tiers(tiers)
        return tiers

    def __post_init__(self) -> None:
        _check_choice("devices.policy", self.policy, ("none", "uniform", "device_aware"))
        _check(self.jitter >= 0, "devices.jitter", self.jitter, "a number >= 0")
        _check(self.round_deadline_s > 0, "devices.round_deadline_s", self.round_deadline_s, "a number > 0")
        _check_choice("devices.stragglers", self.stragglers, ("drop", "fewer_steps"))
        _check(self.max_local_steps >= 1, "devices.max_local_steps", self.max_local_steps, "an integer >= 1")
        _check(self.train_memory_factor > 0, "devices.train_memory_factor", self.train_memory_factor,
               "a number > 0")
        _check(all(isinstance(t, Mapping) for t in self.tiers), "devices.tiers", self.tiers,
               "a list of mappings of DeviceTier fields")
        if self.tiers:
            self.device_tiers()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """A whole experiment: the same object drives notebooks, the CLI and sweeps."""

    name: str = "default"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    client: ClientConfig = ClientConfig()
    message: MessageConfig = MessageConfig()
    server: ServerConfig = ServerConfig()
    run: RunConfig = RunConfig()
    devices: DevicesConfig = DevicesConfig()

    def __post_init__(self) -> None:
        if self.server.algorithm == "fedprox":
            _check(any(v > 0 for v in _values(self.client.prox_mu)), "client.prox_mu", self.client.prox_mu,
                   "a value > 0 when server.algorithm='fedprox'")
        _check(all(int(c) < self.data.num_clients for c in self.run.tap_clients), "run.tap_clients",
               self.run.tap_clients, f"client ids < data.num_clients={self.data.num_clients}")
        if self.data.partition == "natural" and self.data.dataset not in NATURAL_DATASETS:
            raise ValueError(f"data.partition='natural' needs a dataset with natural client ids {NATURAL_DATASETS}; "
                             f"data.dataset={self.data.dataset!r} has none: use iid, dirichlet, shards or "
                             "quantity_skew.")
        if self.server.client_sampling == "uniform":
            _check(self.server.clients_per_round <= self.data.num_clients, "server.clients_per_round",
                   self.server.clients_per_round, f"at most data.num_clients={self.data.num_clients}")
        for name, section in (("client", self.client), ("message", self.message)):
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if f.name == "order":
                    continue
                if isinstance(value, tuple) and len(value) not in (1, self.data.num_clients) and len(value) > 16:
                    raise ValueError(f"{name}.{f.name} has {len(value)} values; give a scalar, up to 16 tier "
                                     f"values, or exactly data.num_clients={self.data.num_clients} values.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """A short stable hash of the configuration (for result stores and run directories)."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "client": ClientConfig, "message": MessageConfig,
             "server": ServerConfig, "run": RunConfig, "devices": DevicesConfig}


def _coerce(value: Any, current: Any) -> Any:
    """Converts YAML/CLI values to the type of the current field value (lists become tuples)."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(current, bool) and isinstance(value, str):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_dict(raw: Mapping[str, Any], base: ExperimentConfig | None = None) -> ExperimentConfig:
    """Builds a config from a nested mapping (as read from YAML/JSON), on top of ``base`` (the defaults)."""
    base = base or ExperimentConfig()
    unknown = set(raw) - set(_SECTIONS) - {"name"}
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; allowed: {['name', *_SECTIONS]}.")
    sections = {}
    for key, cls in _SECTIONS.items():
        current = getattr(base, key)
        given = raw.get(key) or {}
        if not isinstance(given, Mapping):
            raise ValueError(f"config section {key!r} must be a mapping, got {given!r}.")
        names = {f.name for f in dataclasses.fields(cls)}
        bad = set(given) - names
        if bad:
            raise ValueError(f"unknown field(s) {sorted(f'{key}.{b}' for b in bad)}; allowed: "
                             f"{sorted(f'{key}.{n}' for n in names)}.")
        updates = {k: _coerce(v, getattr(current, k)) for k, v in given.items()}
        sections[key] = dataclasses.replace(current, **updates)
    return ExperimentConfig(name=raw.get("name", base.name), **sections)


# YAML 1.2 floats: PyYAML (YAML 1.1) reads "1e-6" and "1E5" (no dot) as strings.
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X)


def load_yaml(stream: Any) -> Any:
    """``yaml.safe_load`` that reads numbers in exponent form (``1e-6``, ``2E5``) as floats, as YAML 1.2 does."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return yaml.load(stream, Loader=Loader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses ``section.field=value``; the value is read as YAML (numbers, lists, null, strings)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.field=value.")
    key, value = text.split("=", 1)
    return key.strip().split("."), load_yaml(value)


def with_overrides(config: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """Applies dotted ``section.field=value`` overrides to a config."""
    raw: dict[str, Any] = {}
    for text in overrides:
        path, value = parse_override(text)
        if path == ["name"]:
            raw["name"] = value
            continue
        if len(path) != 2:
            raise ValueError(f"override key {'.'.join(path)!r} must be section.field (e.g. client.lr).")
        raw.setdefault(path[0], {})[path[1]] = value
    return from_dict(raw, base=config)


def load_config(path: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Reads a YAML or JSON config file and applies overrides."""
    with open(path) as f:
        raw = load_yaml(f) or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"config file {path!r} must hold a mapping at top level.")
    return with_overrides(from_dict(raw), overrides)
