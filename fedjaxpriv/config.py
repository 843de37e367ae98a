"""Experiment configuration: frozen, keyword-only dataclasses validated on construction.

Every field declares its type and allowed range once (``knob``: a ``Rule`` in the field's metadata); one
validator (``parse_value``) reads any value by that rule, so a dataclass built in Python, a YAML or JSON file
and a ``--set section.field=value`` override are checked alike, and every error names the field, the value and
what is allowed. Numbers are read as YAML 1.2 reads them (``1e-6``, ``inf``, ``.inf``, ``-inf``; JSON's
``Infinity``); integers must be whole, booleans must be booleans, strings must be strings.

Per-client numeric settings (``shape="per_client"``) accept a scalar (every client the same), a list of tier
values (client ``i`` gets ``values[i % len(values)]``), or a list with one value per client. They become the
per-client arrays of ``ClientSettings`` that local training reads, so heterogeneous clients run in one call.

Configs load from files (``load_config``) and dotted overrides (``with_overrides``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import warnings
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

from fedjaxpriv.privacy.validation import ACCOUNTANTS
from fedjaxpriv.sinks import SINK_NAMES

PerClient = Union[float, int, tuple]
Overrides = Union[Mapping[str, Any], Sequence[str]]

INT_MAX = 2**31 - 1  # round numbers, client ids and counts live in int32 arrays
SEED_MAX = 2**32 - 1  # jax.random.key and numpy generators both take any uint32 seed
MAX_TIER_VALUES = 16


def _check(condition: bool, field: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ValueError(f"{field}={value!r} is invalid; allowed: {allowed}.")


def _values(value: PerClient) -> tuple[float, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one config field is read and which values it allows.

    Attributes:
      kind: the type of a value (of each element for lists): int, float, bool, str or dict (a mapping).
      low / high: numeric bounds, None for none; ``low_open`` / ``high_open`` exclude the bound itself. Floats
        must be finite unless ``high`` is ``math.inf`` (closed), which admits inf.
      choices: the allowed strings (empty: any string).
      shape: "scalar"; "per_client" (a scalar, tier values or one value per client); "list" (a list; a scalar
        is read as a one-element list).
      optional: None (YAML ``null``) is allowed.
      note: what special values mean, shown after the allowed values.
    """

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    shape: str = "scalar"
    optional: bool = False
    note: str = ""


def knob(default: Any, kind: type, **rule: Any) -> Any:
    """A dataclass field with its ``Rule`` (see ``Rule`` for the keywords)."""
    return dataclasses.field(default=default, metadata={"rule": Rule(kind, **rule)})


def _number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def _bounds_text(rule: Rule) -> str:
    low, high = rule.low, rule.high
    if low is not None and high is not None and high != math.inf:
        return (f" in {'(' if rule.low_open else '['}{_number_text(low)}, "
                f"{_number_text(high)}{')' if rule.high_open else ']'}")
    text = "" if low is None else f" {'>' if rule.low_open else '>='} {_number_text(low)}"
    if high is not None and high != math.inf:
        text += f" {'<' if rule.high_open else '<='} {_number_text(high)}"
    return text + (", or inf" if high == math.inf else "")


def describe(rule: Rule) -> str:
    """What a rule allows, in words (the ``allowed:`` part of an error)."""
    if rule.kind is bool:
        text = "true or false"
    elif rule.kind is str:
        text = f"one of {list(rule.choices)}" if rule.choices else "a string"
    elif rule.kind is dict:
        text = "a mapping"
    elif rule.kind is int:
        text = "an integer" + _bounds_text(rule)
    else:
        text = ("a number" if rule.high == math.inf else "a finite number") + _bounds_text(rule)
    if rule.shape == "per_client":
        text += ", or a list of them (tier values, or one per client)"
    elif rule.shape == "list":
        text = f"a list, each {text}"
    if rule.note:
        text += f" ({rule.note})"
    return text + (", or null" if rule.optional else "")


_INT_TEXT = re.compile(r"[-+]?[0-9][0-9_]*")


def parse_number(text: str) -> int | float | None:
    """A number written as YAML 1.2 or JSON write them (``12``, ``1e-6``, ``inf``, ``.inf``, ``-Infinity``), or
    None if ``text`` is not one."""
    text = text.strip()
    if _INT_TEXT.fullmatch(text):
        return int(text.replace("_", ""))
    word = text.lower().replace(".inf", "inf").replace(".nan", "nan")
    try:
        return float(word)
    except ValueError:
        return None


def in_bounds(x: float, rule: Rule) -> bool:
    if math.isnan(x) or (math.isinf(x) and not (x > 0 and rule.high == math.inf)):
        return False
    if rule.low is not None and not (x > rule.low if rule.low_open else x >= rule.low):
        return False
    return rule.high is None or (x < rule.high if rule.high_open else x <= rule.high)


def _element(value: Any, rule: Rule) -> Any:
    """One value read by ``rule.kind`` and checked against the rule; raises TypeError/ValueError if invalid."""
    if rule.kind is bool:
        if type(value).__name__ not in ("bool", "bool_"):
            raise TypeError
        return bool(value)
    if rule.kind is str:
        if not isinstance(value, str) or (rule.choices and value not in rule.choices):
            raise TypeError
        return value
    if rule.kind is dict:
        if not isinstance(value, Mapping):
            raise TypeError
        return dict(value)
    if isinstance(value, str):
        value = parse_number(value)
    if value is None or type(value).__name__.startswith("bool") or not hasattr(value, "__float__"):
        raise TypeError
    if rule.kind is int:
        if not float(value).is_integer():
            raise ValueError
        value = int(value)
    else:
        value = float(value)  # OverflowError (a ValueError's sibling) for ints beyond float range
    if not in_bounds(value, rule):
        raise ValueError
    return value


def parse_value(field: str, value: Any, rule: Rule) -> Any:
    """``value`` read and checked by ``rule``: ints to floats for float fields, whole floats to ints for int
    fields, numbers in text form to numbers, lists to tuples.

    Raises:
      ValueError: ``"{field}={value!r} is invalid; allowed: ..."``.
    """
    if value is None and rule.optional:
        return None
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # NumPy arrays and scalars
    try:
        if value is None:
            raise TypeError
        if rule.shape == "scalar":
            return _element(value, rule)
        if isinstance(value, (list, tuple)):
            if rule.shape == "per_client" and not value:
                raise ValueError
            return tuple(_element(v, rule) for v in value)
        parsed = _element(value, rule)
        return (parsed,) if rule.shape == "list" else parsed
    except (TypeError, ValueError, OverflowError):
        # YAML 1.1 (PyYAML) reads unquoted on/off/yes/no/true/false as booleans.
        hint = " (a YAML file reads unquoted on/off/yes/no as true/false: quote the value)" if isinstance(
            value, bool) else ""
        raise ValueError(f"{field}={value!r} is invalid; allowed: {describe(rule)}{hint}.") from None


def _parse_fields(section: Any, prefix: str) -> None:
    """Reads every field of a frozen config dataclass by its rule, in place."""
    for f in dataclasses.fields(section):
        rule = f.metadata.get("rule")
        if rule is not None:
            name = f"{prefix}.{f.name}" if prefix else f.name
            object.__setattr__(section, f.name, parse_value(name, getattr(section, f.name), rule))


_FRACTION = {"low": 0.0, "high": 1.0, "high_open": True}  # [0, 1)
_POSITIVE = {"low": 0.0, "low_open": True}  # finite > 0
_NONNEGATIVE = {"low": 0.0}  # finite >= 0
_INF_OK = {"high": math.inf}  # inf allowed

# Datasets generated with their own clients (``partition`` is ignored): "synthetic" (Li et al.'s
# Synthetic(alpha, beta)) and "attribute" (tabular, with a binary sensitive attribute in the last input column and
# client-specific group shares: ``data.attribute.attribute_population``), "keyboard" (each client's typing,
# generated by a known next-word rule: ``data.text.keyboard_corpus``) and LEAF's datasets (one client per user,
# from a local copy under ``data.data_dir``: ``data.leaf``).
NATURAL_DATASETS: tuple[str, ...] = ("synthetic", "attribute", "keyboard", "leaf:femnist", "leaf:shakespeare",
                                     "leaf:celeba", "leaf:sent140")
# Datasets of token sequences: their task is next-token prediction, their models ``models.TOKEN_MODELS``.
# "tiny_shakespeare" is read from a tfds copy (``data.tfds_source.load_tfds_texts``), character level unless
# ``data.text_level`` says otherwise; any ``tfds:<name>`` with ``data.text_level`` set is read as text too.
TEXT_DATASETS: tuple[str, ...] = ("keyboard", "leaf:shakespeare", "tiny_shakespeare")
# Local Parquet / Arrow files (``data.tables``), and Hugging Face datasets ("hf:<local path or Hub name>",
# ``data.huggingface``, read into the same tables): text where ``data.text_level`` is set.
TABLE_DATASETS: tuple[str, ...] = ("parquet", "arrow")
HF_PREFIX = "hf:"


def is_table(data: "DataConfig") -> bool:
    """Whether the configured data are read as tables (Parquet / Arrow files, or a Hugging Face dataset)."""
    return data.dataset in TABLE_DATASETS or (data.dataset.startswith(HF_PREFIX) and len(data.dataset) > 3)


# Datasets of token sequences with a class label each (sentiment of a tweet): their models
# ``models.TOKEN_CLASSIFIERS``.
TOKEN_CLASSIFICATION_DATASETS: tuple[str, ...] = ("leaf:sent140",)


def reads_tokens(data: "DataConfig") -> bool:
    """Whether the configured data's inputs are token ids (next-token prediction or token classification)."""
    return is_text(data) or data.dataset in TOKEN_CLASSIFICATION_DATASETS


def is_text(data: "DataConfig") -> bool:
    """Whether the configured data are token sequences (next-token prediction)."""
    return data.dataset in TEXT_DATASETS or (
        (is_table(data) or data.dataset.startswith("tfds:")) and data.text_level is not None)


# ``model.name`` of a run whose model or loss its user passed in (``Experiment(model=..., loss=...)``), and the
# start of ``data.dataset`` of a run on arrays passed in (``Experiment(population=...)``).
USER_SUPPLIED = "user-supplied"
# The data fields that say how a run builds its population from a dataset: unused when a population is passed in.
POPULATION_RECIPE_FIELDS: tuple[str, ...] = (
    "dataset", "data_dir", "download", "image_key", "label_key", "partition", "dirichlet_alpha", "shards_per_client",
    "quantity_sigma", "synthetic_alpha", "synthetic_beta", "synthetic_max_size", "sequence_length",
    "vocabulary_size", "train_files", "test_files", "client_column", "text_level", "flwr_partitioner")
PARTITIONS = ("iid", "dirichlet", "shards", "quantity_skew", "natural", "flwr")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which data and how it is split into clients."""

    dataset: str = knob("digits", str)
    data_dir: str | None = knob(None, str, optional=True)
    download: bool = knob(False, bool)
    image_key: str = knob("image", str)
    label_key: str = knob("label", str)
    partition: str = knob("dirichlet", str, choices=PARTITIONS)
    # data.partition "flwr": the Flower Datasets partitioner class that splits the data (``data.flower``).
    flwr_partitioner: str | None = knob(None, str, optional=True)
    num_clients: int = knob(50, int, low=1, high=INT_MAX)
    dirichlet_alpha: float = knob(0.5, float, **_POSITIVE)
    shards_per_client: int = knob(2, int, low=1, high=INT_MAX)
    # lognormal(0, sigma) size weights: beyond ~50 the largest weight overflows float64 for large populations
    quantity_sigma: float = knob(1.0, float, low=0.0, high=50.0, note="0 = equal sizes")
    synthetic_alpha: float = knob(1.0, float, **_NONNEGATIVE)
    synthetic_beta: float = knob(1.0, float, **_NONNEGATIVE)
    synthetic_max_size: int | None = knob(2000, int, low=1, high=INT_MAX, optional=True)
    # Text datasets: tokens per training sequence, and the vocabulary's size (the most frequent tokens of the
    # training clients, with padding and out-of-vocabulary).
    sequence_length: int = knob(20, int, low=1, high=4096)
    vocabulary_size: int = knob(10_000, int, low=3, high=10**7)
    # Parquet / Arrow files (data.dataset "parquet" or "arrow"; image_key / label_key name the feature and label
    # columns): paths or glob patterns, the column whose values are the clients (natural partition; null: split
    # by data.partition), and whether the feature column is text ("char" / "word"; null: numbers or images).
    # text_level also makes a "tfds:<name>" dataset text (its feature image_key; "image" there means "text");
    # tiny_shakespeare is "char" unless set.
    train_files: tuple[str, ...] = knob((), str, shape="list")
    test_files: tuple[str, ...] = knob((), str, shape="list")
    client_column: str | None = knob(None, str, optional=True)
    text_level: str | None = knob(None, str, choices=("char", "word"), optional=True)

    def __post_init__(self) -> None:
        _parse_fields(self, "data")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which model. ``hidden`` sets the MLP widths (empty: no hidden layer)."""

    name: str = knob("mlp", str)
    hidden: tuple[int, ...] = knob((64,), int, low=1, high=INT_MAX, shape="list")

    def __post_init__(self) -> None:
        _parse_fields(self, "model")


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

    local_steps: PerClient = knob(10, int, low=0, high=10**6, shape="per_client")
    batch_size: PerClient = knob(16, int, low=1, high=10**6, shape="per_client")
    lr: PerClient = knob(0.1, float, **_POSITIVE, shape="per_client")
    momentum: float = knob(0.0, float, **_FRACTION)
    prox_mu: PerClient = knob(0.0, float, **_NONNEGATIVE, shape="per_client")
    sampling: str = knob("fixed", str, choices=("fixed", "poisson"))
    mixup_alpha: PerClient = knob(0.0, float, **_NONNEGATIVE, shape="per_client", note="0 = off")
    prune_sparsity: PerClient = knob(0.0, float, **_FRACTION, shape="per_client")
    prune_method: str = knob("magnitude", str, choices=("magnitude", "random"))
    prune_scope: str = knob("layer", str, choices=("layer", "global"))
    dp_clip_norm: PerClient = knob(math.inf, float, **_POSITIVE, **_INF_OK, shape="per_client",
                                   note="inf = no clipping")
    dp_noise_multiplier: PerClient = knob(0.0, float, **_NONNEGATIVE, shape="per_client")
    target_epsilon: PerClient | None = knob(None, float, **_POSITIVE, shape="per_client", optional=True)
    prune_begin_round: int = knob(0, int, low=0, high=INT_MAX)
    prune_end_round: int = knob(0, int, low=0, high=INT_MAX)

    def __post_init__(self) -> None:
        _parse_fields(self, "client")
        _check(self.prune_begin_round <= self.prune_end_round, "client.prune_end_round", self.prune_end_round,
               f"an integer >= client.prune_begin_round={self.prune_begin_round} >= 0")


@dataclasses.dataclass(frozen=True)
class MessageStage:
    """One stage of ``message.order``: everything the config, the settings and the pipeline know of it.

    Attributes:
      name: its name in ``message.order``.
      strengths: the per-client knobs it reads, each a ``message`` knob and the ``ClientSettings`` field of the
        same name; the first one switches it on.
      off: values of that first knob that leave every message as it is (the stage is then left out).
      transform: ``"module:function"`` making its ``MessageTransform`` from ``strengths`` (imported only when a
        pipeline is built, so the config stays free of JAX).
      compressor: it drops or coarsens coordinates, so error feedback may carry what it leaves out.
      norm_nonincreasing: it never increases a message's L2 norm and keeps no state, so it may sit between
        'clip' and 'noise' (``local_dp_order_problem``).
    """

    name: str
    strengths: tuple[str, ...]
    off: tuple[float, ...]
    transform: str
    compressor: bool = False
    norm_nonincreasing: bool = False

    def is_on(self, values: Any) -> bool:
        """Whether the stage changes some client's message, for a knob's values (a scalar, tiers, or [C])."""
        return bool(np.any(~np.isin(np.asarray(values, np.float64), self.off)))


_SPARSIFY, _PRIVACY, _QUANTIZE = "fedjaxpriv.transforms.sparsify", "fedjaxpriv.transforms.privacy", \
    "fedjaxpriv.transforms.quantize"
# The message stages, in their default order.
STAGES: tuple[MessageStage, ...] = (
    MessageStage("prune", ("sparsity",), (0.0,), f"{_SPARSIFY}:prune_message", compressor=True,
                 norm_nonincreasing=True),
    MessageStage("topk", ("topk_fraction",), (1.0,), f"{_SPARSIFY}:top_k", compressor=True, norm_nonincreasing=True),
    MessageStage("randk", ("randk_fraction",), (1.0,), f"{_SPARSIFY}:random_k", compressor=True,
                 norm_nonincreasing=True),
    MessageStage("clip", ("clip_norm",), (math.inf,), f"{_PRIVACY}:clip_update"),
    MessageStage("noise", ("local_noise_multiplier", "clip_norm"), (0.0,), f"{_PRIVACY}:add_local_noise"),
    MessageStage("round", ("quant_bits",), (0.0, 32.0), f"{_QUANTIZE}:stochastic_rounding", compressor=True),
    MessageStage("qsgd", ("qsgd_levels",), (0.0,), f"{_QUANTIZE}:qsgd", compressor=True),
)
STAGE_BY_NAME: dict[str, MessageStage] = {stage.name: stage for stage in STAGES}
MESSAGE_STAGES: tuple[str, ...] = tuple(STAGE_BY_NAME)
# The built-in federated algorithms ``server.algorithm`` names (``server.algorithms.algorithm_for``).
ALGORITHM_NAMES: tuple[str, ...] = ("fedavg", "fedprox", "fedsgd", "scaffold", "ditto")
# The server optimizers ``server.optimizer`` names (``server.optimizers.server_optimizer``).
SERVER_OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "adam")
# The gossip graphs ``topology.graph`` names besides "none" (``decentralized.topology_for``).
TOPOLOGIES: tuple[str, ...] = ("ring", "torus", "erdos_renyi", "exponential", "complete", "random_matching")


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
      error_feedback: each compressor stage (prune, topk, randk, round, qsgd) keeps the part of the message
        it did not send and adds it to the client's next message (EF-SGD, Karimireddy et al. 2019); the
        residual is kept per client from round to round. Clip and noise stages are never fed back. With local
        noise, no active compressor may sit between 'clip' and 'noise' (``local_dp_order_problem``).
    """

    order: tuple[str, ...] = knob(MESSAGE_STAGES, str, choices=MESSAGE_STAGES, shape="list")
    sparsity: PerClient = knob(0.0, float, **_FRACTION, shape="per_client")
    topk_fraction: PerClient = knob(1.0, float, low=0.0, high=1.0, low_open=True, shape="per_client")
    randk_fraction: PerClient = knob(1.0, float, low=0.0, high=1.0, low_open=True, shape="per_client")
    clip_norm: PerClient = knob(math.inf, float, **_POSITIVE, **_INF_OK, shape="per_client", note="inf = off")
    local_noise_multiplier: PerClient = knob(0.0, float, **_NONNEGATIVE, shape="per_client")
    quant_bits: PerClient = knob(0, int, low=0, high=32, shape="per_client", note="0 = off")
    qsgd_levels: PerClient = knob(0, int, low=0, high=2**30, shape="per_client", note="0 = off")
    error_feedback: bool = knob(False, bool)

    def __post_init__(self) -> None:
        _parse_fields(self, "message")
        _check(len(set(self.order)) == len(self.order), "message.order", self.order, "each stage at most once")
        for stage in STAGES:
            name, value = f"message.{stage.strengths[0]}", getattr(self, stage.strengths[0])
            if stage.is_on(value) and stage.name not in self.order:  # else the knob would be silently ignored
                raise ValueError(f"{name}={value!r} sets stage {stage.name!r}, which message.order="
                                 f"{list(self.order)} leaves out: it would never be applied; add {stage.name!r} to "
                                 f"message.order or leave {name} at its default.")
        noisy = STAGE_BY_NAME["noise"].is_on(self.local_noise_multiplier)
        _check(not noisy or all(math.isfinite(v) for v in _values(self.clip_norm)), "message.clip_norm",
               self.clip_norm, "finite whenever message.local_noise_multiplier > 0")
        if noisy:
            # A listed stage counts unless it is off and never increases the norm: a device policy may still
            # switch rounding on for some clients (``devices.policies``), and the config is read before it.
            active = tuple(name for name in self.order if not STAGE_BY_NAME[name].norm_nonincreasing
                           or STAGE_BY_NAME[name].is_on(getattr(self, STAGE_BY_NAME[name].strengths[0])))
            problem = local_dp_order_problem(active, self.error_feedback)
            _check(problem is None, "message.order", self.order, problem or "")


def local_dp_order_problem(order: Sequence[str], error_feedback: bool) -> str | None:
    """Why a chain of message stages with local noise would not keep the sensitivity it is accounted with
    (``privacy.mechanisms.LocalGaussian``: every noised message has norm <= clip_norm), or None when it does.

    ``order`` lists the stages that run, first to last, with 'noise' among them. What reaches 'noise' must be the
    output of 'clip' followed only by stages that never increase the norm and carry no state: noise added before
    clipping is scaled down with the message; rounding and QSGD can increase the norm; and a compressor with error
    feedback adds back, after clipping, the residual it kept from earlier rounds (two clients' messages then differ
    by far more than 2 clip_norm). Stages before 'clip' (fed back or not) and after 'noise' (post-processing) are
    free.
    """
    order = list(order)
    if "clip" not in order or "noise" not in order or order.index("clip") > order.index("noise"):
        return ("'clip' before 'noise' when message.local_noise_multiplier > 0 (noise added before clipping is "
                "scaled down with the message and voids the local DP guarantee)")
    between = order[order.index("clip") + 1:order.index("noise")]
    allowed = [stage.name for stage in STAGES if stage.norm_nonincreasing]
    if not all(stage in allowed for stage in between):
        return (f"only {allowed} between 'clip' and 'noise' (they never increase the norm; "
                "rounding and QSGD can, which would void the clip norm that the noise is scaled to)")
    if error_feedback and between:
        return (f"no compressor between 'clip' and 'noise' with message.error_feedback=true (got {between}: error "
                "feedback adds the residual it kept back after clipping, so the noised message is no longer bounded "
                "by message.clip_norm); put them before 'clip' (fed back before clipping) or after 'noise', or set "
                "message.error_feedback=false")
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Client sampling, aggregation and the server optimizer.

    Attributes:
      algorithm: "fedavg", "fedprox" (needs client.prox_mu > 0), "fedsgd" (one full-batch gradient step
        per client; the server applies the averaged gradient with ``lr``) or "scaffold" (control variates that
        correct each client's drift, Karimireddy et al. 2020; every client keeps one model-sized state, and sends
        its change uncompressed beside its update) or "ditto" (FedAvg plus a personal model per client, trained
        on the client's loss plus ``ditto_lambda / 2 ||v - w||^2`` around the global model w and never sent, Li
        et al. 2021; the run reports the personal models' accuracy on test data mixed as each client's labels).
      ditto_lambda: Ditto's proximal weight (0: purely local personal models).
      optimizer: "sgd" (FedAvg: lr 1), "momentum" (FedAvgM) or "adam" (FedAdam).
      lr / momentum / adam_b1 / adam_b2 / adam_eps: the server optimizer's hyperparameters.
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

    algorithm: str = knob("fedavg", str, choices=ALGORITHM_NAMES)
    ditto_lambda: float = knob(1.0, float, **_NONNEGATIVE)
    optimizer: str = knob("sgd", str, choices=SERVER_OPTIMIZERS)
    lr: float = knob(1.0, float, **_POSITIVE)
    momentum: float = knob(0.9, float, **_FRACTION)
    adam_b1: float = knob(0.9, float, **_FRACTION)
    adam_b2: float = knob(0.99, float, **_FRACTION)
    adam_eps: float = knob(1e-3, float, **_POSITIVE)
    clients_per_round: int = knob(10, int, low=1, high=INT_MAX)
    client_sampling: str = knob("uniform", str, choices=("uniform", "poisson"))
    weighting: str = knob("examples", str, choices=("examples", "uniform"))
    central_clip_norm: float = knob(math.inf, float, **_POSITIVE, **_INF_OK, note="inf = no clipping")
    central_noise_multiplier: float = knob(0.0, float, **_NONNEGATIVE)
    adaptive_clip_quantile: float | None = knob(None, float, low=0.0, high=1.0, low_open=True, high_open=True,
                                                optional=True, note="null = a fixed clip norm")
    adaptive_clip_lr: float = knob(0.2, float, **_POSITIVE)
    clip_count_noise_multiplier: float | None = knob(None, float, **_POSITIVE, optional=True,
                                                     note="null = clients_per_round / 20")
    target_epsilon: float | None = knob(None, float, **_POSITIVE, optional=True)

    def __post_init__(self) -> None:
        _parse_fields(self, "server")
        if self.adaptive_clip_quantile is not None:
            _check(math.isfinite(self.central_clip_norm), "server.central_clip_norm", self.central_clip_norm,
                   "a finite initial clip norm when server.adaptive_clip_quantile is set")
        _check(self.central_noise_multiplier == 0 or math.isfinite(self.central_clip_norm),
               "server.central_clip_norm", self.central_clip_norm,
               "a finite clip norm whenever server.central_noise_multiplier > 0")
        if self.target_epsilon is not None:
            _check(math.isfinite(self.central_clip_norm), "server.central_clip_norm", self.central_clip_norm,
                   "a finite clip norm when server.target_epsilon is set")
            _check(self.central_noise_multiplier == 0, "server.central_noise_multiplier",
                   self.central_noise_multiplier, "0 when server.target_epsilon is set (it is calibrated)")

    @property
    def clips(self) -> bool:
        """Whether DP-FedAvg's client-level clip is on (a finite ``central_clip_norm``, which central noise and a
        target epsilon both require): the server then sees only clipped (and possibly noised) sums."""
        return math.isfinite(self.central_clip_norm)


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
      shard_data: split the population's examples and every client's state (error feedback, SCAFFOLD, Ditto)
        over the devices (each holds O(1 / devices) of them) and fetch each chunk's clients' examples to the
        devices that train them, instead of a full copy per device; the same rounds, bit for bit. Needs strategy
        "vmap" or "loop"; nothing changes on one device. null (the default): split exactly when a full copy would
        take more than a quarter of one device's memory (``parallel.splits_data``); a copy is faster while it
        fits.
      checkpoint_every: save a resumable checkpoint every this many rounds (0 = only at the end).
      delta: target delta for privacy accounting.
      accountant: "rdp" or "pld" (dp_accounting).
      tap_clients / tap_rounds: attack taps: in each listed round (1-based), record the messages that the listed
        clients taking part in that round send, and the server model they start from.
      log: where the per-round records go (``fedjaxpriv.sinks``): "jsonl" (the run directory's history.jsonl/csv,
        always on and always listed), "tensorboard" (event files in <out>/tensorboard/) and "wandb" (an offline
        W&B run in <out>/wandb/); given in any order, kept once each in this order.
      divergence_factor: a run whose training loss exceeded this multiple of the initial model's loss and whose
        test accuracy is then at chance (or whose loss stays above it for 3 rounds in a row) has diverged and
        stops with an error (``guards.explosion``); null keeps going (non-finite losses or parameters always stop).
    """

    rounds: int = knob(40, int, low=1, high=INT_MAX)
    seed: int = knob(0, int, low=0, high=SEED_MAX)
    eval_every: int = knob(1, int, low=1, high=INT_MAX)
    chunk_size: int = knob(0, int, low=0, high=INT_MAX, note="0 = automatic")
    num_devices: int = knob(0, int, low=0, high=INT_MAX, note="0 = all devices")
    strategy: str = knob("auto", str, choices=("auto", "vmap", "loop", "host"))
    shard_data: bool | None = knob(None, bool, optional=True,
                                   note="null = split when a copy would take over a quarter of a device's memory")
    checkpoint_every: int = knob(10, int, low=0, high=INT_MAX, note="0 = only at the end")
    delta: float = knob(1e-5, float, low=0.0, high=1.0, low_open=True, high_open=True)
    accountant: str = knob("rdp", str, choices=ACCOUNTANTS)
    tap_clients: tuple[int, ...] = knob((), int, low=0, high=INT_MAX, shape="list")
    tap_rounds: tuple[int, ...] = knob((), int, low=1, high=INT_MAX, shape="list")
    log: tuple[str, ...] = knob(("jsonl",), str, choices=SINK_NAMES, shape="list", note="jsonl is always on")
    divergence_factor: float | None = knob(100.0, float, low=1.0, low_open=True, optional=True,
                                           note="null = only non-finite values stop a run")

    def __post_init__(self) -> None:
        _parse_fields(self, "run")
        # One spelling per set of sinks (order and repeats do not matter; jsonl is always on), so one hash.
        object.__setattr__(self, "log", tuple(n for n in SINK_NAMES if n == "jsonl" or n in self.log))
        _check(all(r <= self.rounds for r in self.tap_rounds), "run.tap_rounds", self.tap_rounds,
               f"round numbers in [1, run.rounds={self.rounds}]")


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

    policy: str = knob("none", str, choices=("none", "uniform", "device_aware"))
    jitter: float = knob(0.0, float, low=0.0, high=10.0)
    round_deadline_s: float = knob(1.0, float, **_POSITIVE)
    stragglers: str = knob("drop", str, choices=("drop", "fewer_steps"))
    max_local_steps: int = knob(100, int, low=1, high=10**6)
    train_memory_factor: float = knob(4.0, float, **_POSITIVE)
    privacy_tiers: bool = knob(False, bool)
    tiers: tuple[Mapping[str, Any], ...] = knob((), dict, shape="list", note="DeviceTier fields; empty = built-in")

    def device_tiers(self) -> tuple:
        """The tiers as ``DeviceTier`` objects (validated)."""
        from fedjaxpriv.devices.profiles import DEFAULT_TIERS, DeviceTier, check_tiers

        if not self.tiers:
            return DEFAULT_TIERS
        tiers = tuple(DeviceTier(**t) for t in self.tiers)
        check_tiers(tiers)
        return tiers

    def __post_init__(self) -> None:
        _parse_fields(self, "devices")
        object.__setattr__(self, "tiers", tuple(_tier(i, t) for i, t in enumerate(self.tiers)))
        if self.tiers:
            self.device_tiers()


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopologyConfig:
    """Decentralized learning (``fedjaxpriv.decentralized``): with a ``graph``, there is no server; every client
    is a node that keeps its own model, trains it when sampled (``server.clients_per_round`` nodes per round, with
    ``server.client_sampling``) and averages it with its neighbours every round (D-SGD).

    Attributes:
      graph: "none" (federated learning with a server) or the mixing graph: "ring", "torus" (a square number of
        nodes), "erdos_renyi", "exponential", "complete" or "random_matching" (a new pairing every round).
      edge_probability: an Erdos-Renyi graph's edge probability (drawn with ``run.seed``; a draw that is not
        connected is refused).
      gossip: "exact" (a node sends its model after training, as the message chain left its update) or "choco"
        (CHOCO gossip, Koloskova et al. 2019: a node sends the message chain applied to what its public model
        lacks of its model, so a compressor such as message.topk_fraction shrinks every message).
      consensus_step: CHOCO's gamma in (0, 1], the step towards the neighbours' public models (1 with exact gossip).
      node_dropout: per node (scalar, tiers or one value per node), the probability that it is offline in a round:
        it neither trains nor sends nor hears, keeps its model, and its neighbours give its mixing weight to their
        own models (``decentralized.mix`` with ``online``); drawn per round from ``run.seed``. Exact gossip only,
        without taps.
    """

    graph: str = knob("none", str, choices=("none", *TOPOLOGIES))
    edge_probability: float = knob(0.2, float, low=0.0, low_open=True, high=1.0)
    gossip: str = knob("exact", str, choices=("exact", "choco"))
    consensus_step: float = knob(1.0, float, low=0.0, low_open=True, high=1.0)
    node_dropout: PerClient = knob(0.0, float, low=0.0, high=1.0, high_open=True, shape="per_client")

    @property
    def decentralized(self) -> bool:
        return self.graph != "none"

    def __post_init__(self) -> None:
        _parse_fields(self, "topology")


def _tier(index: int, tier: Mapping[str, Any]) -> dict[str, Any]:
    """A ``devices.tiers`` entry read by ``DeviceTier``'s field types (a str name, numbers otherwise)."""
    from fedjaxpriv.devices.profiles import DeviceTier

    fields = {f.name: f for f in dataclasses.fields(DeviceTier)}
    where = f"devices.tiers[{index}]"
    unknown = sorted(set(tier) - set(fields))
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}; allowed: {list(fields)}.")
    missing = [n for n, f in fields.items()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in tier]
    if missing:
        raise ValueError(f"{where}={dict(tier)!r} is invalid; allowed: a mapping with at least {missing}.")
    name_rule, number_rule = Rule(str), Rule(float, high=math.inf)
    return {k: parse_value(f"{where}.{k}", v, name_rule if k == "name" else number_rule) for k, v in tier.items()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """A whole experiment: the same object drives notebooks, the CLI and sweeps."""

    name: str = knob("default", str)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    client: ClientConfig = ClientConfig()
    message: MessageConfig = MessageConfig()
    server: ServerConfig = ServerConfig()
    run: RunConfig = RunConfig()
    devices: DevicesConfig = DevicesConfig()
    topology: TopologyConfig = TopologyConfig()

    def _check_decentralized(self) -> None:
        """A decentralized run (``topology.graph``) has no server: every server knob but the node sampling
        (``clients_per_round``, ``client_sampling``) is left at its default, and what only FL runs do is refused."""
        defaults = ServerConfig()
        used = {"clients_per_round", "client_sampling"}
        changed = [f"server.{f.name}={getattr(self.server, f.name)!r}" for f in dataclasses.fields(ServerConfig)
                   if f.name not in used and getattr(self.server, f.name) != getattr(defaults, f.name)]
        _check(not changed, "topology.graph", self.topology.graph,
               f"'none' with {', '.join(changed)}: a decentralized run has no server, whose aggregation, optimizer "
               "and client-level DP these set (it reads server.clients_per_round and client_sampling only)")
        for key, value, ok, shown in (
                ("devices.policy", self.devices.policy, self.devices.policy == "none", "'none'"),
                ("run.shard_data", self.run.shard_data, not self.run.shard_data, "null or false"),
                ("run.strategy", self.run.strategy, self.run.strategy in ("auto", "vmap", "loop"),
                 "one of ['auto', 'vmap', 'loop']")):
            _check(ok, key, value, f"{shown} with topology.graph={self.topology.graph!r} (decentralized runs do not "
                                   "support it yet)")
        t = self.topology
        _check(t.gossip == "choco" or t.consensus_step == 1.0, "topology.consensus_step", t.consensus_step,
               "1.0 with topology.gossip='exact' (only CHOCO gossip steps towards its neighbours' public models)")
        if t.gossip == "choco":
            _check(all(v == 0 for v in _values(self.message.local_noise_multiplier)), "message.local_noise_multiplier",
                   self.message.local_noise_multiplier, "0 with topology.gossip='choco' (local DP is accounted for "
                   "updates; CHOCO sends changes of public models, which no accountant here covers)")
        dropout = any(v > 0 for v in _values(t.node_dropout))
        _check(not dropout or t.gossip == "exact", "topology.node_dropout", t.node_dropout,
               "0 with topology.gossip='choco' (node dropout runs with exact gossip)")
        _check(not dropout or not (self.run.tap_clients and self.run.tap_rounds), "topology.node_dropout",
               t.node_dropout, "0 with taps (run.tap_clients, run.tap_rounds): a curious neighbour's view of a node "
               "whose neighbours go offline is not modelled yet")
        _check(not self.run.tap_clients or self.topology.graph != "random_matching", "run.tap_clients",
               list(self.run.tap_clients), "[] with topology.graph='random_matching' (a new neighbour every round: no "
               "fixed curious neighbour to tap)")
        if self.topology.graph == "torus":
            side = math.isqrt(self.data.num_clients)
            _check(side * side == self.data.num_clients, "data.num_clients", self.data.num_clients,
                   "a square number of nodes with topology.graph='torus'")

    def _check_algorithm_protected(self) -> None:
        """The algorithm's own capability (``server.algorithms.check_protects``) against the DP this config asks
        for: an algorithm that releases more than its update (SCAFFOLD) cannot run under client-level or local DP."""
        protections = [("client-level DP or clipping (server.central_clip_norm / central_noise_multiplier / "
                        "target_epsilon)", self.server.clips),
                       ("local DP (message.local_noise_multiplier > 0)",
                        any(v > 0 for v in _values(self.message.local_noise_multiplier)))]
        if not any(asked for _, asked in protections):
            return
        from fedjaxpriv.server.algorithms import algorithm_for, check_protects

        algorithm = algorithm_for(self.server.algorithm, ditto_lambda=self.server.ditto_lambda)
        for protection, asked in protections:
            if asked:
                try:
                    check_protects(algorithm, protection)
                except ValueError as error:
                    raise ValueError(f"server.algorithm={self.server.algorithm!r}: {error}") from None

    def __post_init__(self) -> None:
        _parse_fields(self, "")
        for key, cls in _SECTIONS.items():
            _check(isinstance(getattr(self, key), cls), key, getattr(self, key), f"a {cls.__name__}")
        if self.server.algorithm == "fedprox":
            _check(any(v > 0 for v in _values(self.client.prox_mu)), "client.prox_mu", self.client.prox_mu,
                   "a value > 0 when server.algorithm='fedprox'")
        self._check_algorithm_protected()
        _check(all(c < self.data.num_clients for c in self.run.tap_clients), "run.tap_clients",
               self.run.tap_clients, f"client ids < data.num_clients={self.data.num_clients}")
        if self.topology.decentralized:
            self._check_decentralized()
        else:
            _check(all(v == 0 for v in _values(self.topology.node_dropout)), "topology.node_dropout",
                   self.topology.node_dropout, "0 without topology.graph (federated runs take device dropouts from "
                   "devices.tiers' dropout_prob)")
        from fedjaxpriv.data.sources import DATASET_NAMES_TEXT, is_known_dataset

        if self.data.dataset.startswith("leaf:"):
            from fedjaxpriv.data.leaf import dataset_name

            dataset_name(self.data.dataset)  # an unsupported LEAF dataset: the error says why
            _check(bool(self.data.data_dir), "data.data_dir", self.data.data_dir,
                   f"the directory of a local copy of LEAF's {self.data.dataset[5:]} data (its train/ and test/)")
        from fedjaxpriv.models.core import MODEL_NAMES

        if self.data.dataset in TABLE_DATASETS:
            _check(bool(self.data.train_files) and bool(self.data.test_files), "data.train_files / test_files",
                   [list(self.data.train_files), list(self.data.test_files)],
                   f"the {self.data.dataset} files of both splits (paths or glob patterns)")
        if is_text(self.data) and self.data.dataset not in NATURAL_DATASETS and not self.data.client_column:
            _check(self.data.partition in ("iid", "quantity_skew", "flwr"), "data.partition", self.data.partition,
                   f"'iid', 'quantity_skew' or 'flwr' for {self.data.dataset} text without natural clients (e.g. "
                   "data.client_column; the other schemes split by class label, which next-token targets are not)")
        _check((self.data.partition == "flwr") == bool(self.data.flwr_partitioner), "data.flwr_partitioner",
               self.data.flwr_partitioner, "a Flower Datasets partitioner class name (e.g. 'DirichletPartitioner') "
               "exactly when data.partition is 'flwr'")
        _check(self.data.dataset in NATURAL_DATASETS or is_table(self.data)
               or is_known_dataset(self.data.dataset)
               or self.data.dataset.startswith(USER_SUPPLIED), "data.dataset",
               self.data.dataset, f"{DATASET_NAMES_TEXT}, one generated with its own clients "
                                  f"{list(NATURAL_DATASETS)}, local files {list(TABLE_DATASETS)}, "
                                  f"'{HF_PREFIX}<Hugging Face dataset path or name>' (or pass your own arrays to "
                                  "Experiment(population=...))")
        built_in = self.model.name.split("; loss: ")[0]  # a run with another task records "<model>; loss: <task>"
        _check(built_in in MODEL_NAMES or built_in.startswith(USER_SUPPLIED), "model.name",
               self.model.name, f"one of {list(MODEL_NAMES)} (or pass your own model to Experiment(model=...))")
        if built_in in MODEL_NAMES and not self.data.dataset.startswith(USER_SUPPLIED):
            from fedjaxpriv.models.core import READS_TOKENS, TOKEN_CLASSIFIERS, TOKEN_MODELS

            if is_text(self.data):
                fitting, why = TOKEN_MODELS, "text's task is next-token prediction"
            elif self.data.dataset in TOKEN_CLASSIFICATION_DATASETS:
                fitting, why = TOKEN_CLASSIFIERS, "its examples are token sequences with a class label each"
            else:
                fitting = tuple(m for m in MODEL_NAMES if m not in READS_TOKENS)
                why = (f"{list(READS_TOKENS)} read token sequences, of the text datasets {list(TEXT_DATASETS)} and "
                       f"{list(TOKEN_CLASSIFICATION_DATASETS)}")
            if built_in not in fitting:
                raise ValueError(f"model.name={built_in!r} does not fit data.dataset={self.data.dataset!r}: {why}; "
                                 f"use one of {list(fitting)}.")
        if self.data.partition == "natural" and self.data.dataset not in NATURAL_DATASETS and not (
                is_table(self.data) and self.data.client_column):
            raise ValueError(f"data.partition='natural' needs a dataset with natural client ids {NATURAL_DATASETS}; "
                             f"data.dataset={self.data.dataset!r} has none: use iid, dirichlet, shards or "
                             "quantity_skew.")
        _check(self.server.clients_per_round <= self.data.num_clients, "server.clients_per_round",
               self.server.clients_per_round, f"at most data.num_clients={self.data.num_clients}"
               + (" (Poisson sampling: the expected cohort, rate clients_per_round / num_clients <= 1)"
                  if self.server.client_sampling == "poisson" else ""))
        for name, section in (("client", self.client), ("message", self.message)):
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if f.metadata["rule"].shape != "per_client" or not isinstance(value, tuple):
                    continue
                _check(len(value) <= MAX_TIER_VALUES or len(value) == self.data.num_clients, f"{name}.{f.name}",
                       value, f"a scalar, up to {MAX_TIER_VALUES} tier values, or exactly data.num_clients="
                              f"{self.data.num_clients} values (got {len(value)})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def non_default(self) -> dict[str, Any]:
        """The fields that differ from the defaults, as a nested mapping (``name`` and each section that has any)."""
        mine, defaults = self.to_dict(), _default_dict()
        out: dict[str, Any] = {}
        for key, value in mine.items():
            if isinstance(value, dict):
                changed = {k: v for k, v in value.items() if defaults[key].get(k) != v or k not in defaults[key]}
                if changed:
                    out[key] = changed
            elif value != defaults.get(key):
                out[key] = value
        return out

    def config_hash(self) -> str:
        """A short stable hash of the fields that differ from the defaults (for result stores and run
        directories): a release that only adds fields (at defaults that keep the old behaviour) keeps every hash.
        ``UNHASHED_FIELDS`` (where a run reports, not what it computes) are left out."""
        fields = self.non_default()
        for section, key in UNHASHED_FIELDS:
            fields.get(section, {}).pop(key, None)
        text = json.dumps({k: v for k, v in fields.items() if v != {}}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def extension_problem(previous: "ExperimentConfig", extended: "ExperimentConfig") -> str | None:
    """Why a finished (or interrupted) run of ``previous`` cannot go on as a run of ``extended`` (None: it can).
    Extending may change only ``run.rounds``, upward, and only where nothing was planned over the run's number of
    rounds: a calibrated target epsilon (the noise was chosen for run.rounds) or Poisson sampling under DP (its
    slots were sized so that the truncation over the planned steps stays within delta)."""
    same_rounds = dataclasses.replace(previous, run=dataclasses.replace(previous.run, rounds=extended.run.rounds))
    if same_rounds.config_hash() != extended.config_hash():
        return ("the config differs from the run's in more than run.rounds (extending changes only run.rounds); "
                "choose another --out directory for another config")
    if extended.run.rounds < previous.run.rounds:
        return (f"run.rounds={extended.run.rounds} is fewer than the run's run.rounds={previous.run.rounds}; allowed: "
                "more rounds")
    c, s, d = previous.client, previous.server, previous.devices
    noise = c.dp_noise_multiplier if isinstance(c.dp_noise_multiplier, (list, tuple)) else [c.dp_noise_multiplier]
    dp_sgd = c.target_epsilon is not None or any(float(z) > 0 for z in noise)
    dp_fedavg = s.target_epsilon is not None or s.central_noise_multiplier > 0
    planned = [name for name, on in (
        ("client.target_epsilon (each client's noise is calibrated to it over run.rounds)",
         c.target_epsilon is not None),
        ("server.target_epsilon (the noise is calibrated to it over run.rounds)", s.target_epsilon is not None),
        ("devices.privacy_tiers (tier targets calibrated over run.rounds)", d.privacy_tiers),
        ("client.sampling='poisson' with DP-SGD (batch slots sized for the planned steps' truncation)",
         c.sampling == "poisson" and dp_sgd),
        ("server.client_sampling='poisson' with DP-FedAvg (cohort slots sized for the planned rounds' truncation)",
         s.client_sampling == "poisson" and dp_fedavg)) if on]
    if planned:
        return (f"it was planned over run.rounds={previous.run.rounds}: {'; '.join(planned)}; start a run of "
                f"{extended.run.rounds} rounds in another --out directory instead")
    return None


# Fields that choose where a run reports, not what it computes: a run resumed or a sweep point rerun with other
# logging sinks is the same run.
UNHASHED_FIELDS: tuple[tuple[str, str], ...] = (("run", "log"),)

_SECTIONS = {"data": DataConfig, "model": ModelConfig, "client": ClientConfig, "message": MessageConfig,
             "server": ServerConfig, "run": RunConfig, "devices": DevicesConfig, "topology": TopologyConfig}


def _rule_of(key: str) -> Rule:
    """The rule of a dotted key (``section.field`` or ``name``); raises ValueError naming what exists."""
    if key == "name":
        return _FIELD_RULES[ExperimentConfig]["name"]
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"override key {key!r} must be section.field (e.g. client.lr) or name.")
    section, field = parts
    if section not in _SECTIONS:
        raise ValueError(f"unknown config section {section!r} in {key!r}; allowed: {['name', *_SECTIONS]}.")
    rules = _FIELD_RULES[_SECTIONS[section]]
    if field not in rules:
        raise ValueError(f"unknown field(s) [{key!r}]; allowed: {sorted(f'{section}.{n}' for n in rules)}.")
    return rules[field]


_FIELD_RULES: dict[type, dict[str, Rule]] = {
    cls: {f.name: f.metadata["rule"] for f in dataclasses.fields(cls) if "rule" in f.metadata}
    for cls in (ExperimentConfig, *_SECTIONS.values())}


@functools.lru_cache(maxsize=1)
def _default_dict() -> dict[str, Any]:
    return ExperimentConfig().to_dict()


def from_dict(raw: Mapping[str, Any], base: ExperimentConfig | None = None, *,
              unknown: str = "error") -> ExperimentConfig:
    """Builds a config from a nested mapping (as read from YAML/JSON), on top of ``base`` (the defaults).
    Values are read by each field's rule (``parse_value``).

    Args:
      unknown: what an unknown section or field is: "error" (a typo in what the user wrote) or "warn" (a saved
        config written by a version with other fields: it is dropped with a warning that names it).
    """
    if unknown not in ("error", "warn"):
        raise ValueError(f"unknown={unknown!r} is invalid; allowed: 'error' or 'warn'.")
    base = base or ExperimentConfig()
    if not isinstance(raw, Mapping):
        raise ValueError(f"a config must be a mapping of sections, got {raw!r}.")
    dropped: list[str] = []
    extra = set(raw) - set(_SECTIONS) - {"name"}
    if extra and unknown == "error":
        raise ValueError(f"unknown config section(s) {sorted(map(str, extra))}; allowed: {['name', *_SECTIONS]}.")
    dropped += sorted(map(str, extra))
    sections = {}
    for key, cls in _SECTIONS.items():
        given = raw.get(key)
        given = {} if given is None else given
        if not isinstance(given, Mapping):
            raise ValueError(f"config section {key!r} must be a mapping, got {given!r}.")
        bad = set(given) - set(_FIELD_RULES[cls])
        if bad and unknown == "error":
            raise ValueError(f"unknown field(s) {sorted(f'{key}.{b}' for b in bad)}; allowed: "
                             f"{sorted(f'{key}.{n}' for n in _FIELD_RULES[cls])}.")
        dropped += sorted(f"{key}.{b}" for b in bad)
        sections[key] = dataclasses.replace(getattr(base, key), **{k: v for k, v in given.items() if k not in bad})
    if dropped:
        warnings.warn(f"ignoring config field(s) this version does not have: {dropped}.", stacklevel=2)
    return ExperimentConfig(name=raw.get("name", base.name), **sections)


# YAML 1.2 floats: PyYAML (YAML 1.1) reads "1e-6" and "1E5" (no dot) as strings.
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X)


def load_yaml(stream: Any) -> Any:
    """``yaml.safe_load`` that reads numbers as YAML 1.2 does: exponent forms (``1e-6``, ``2E5``) are floats and
    integers are decimal (``010`` is 10, not YAML 1.1's octal 8; ``1:30`` is not 90).

    Raises:
      ValueError: the text is not valid YAML (the message gives the line and column).
    """
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            """A mapping whose keys are unique: a repeated key is an error naming it (YAML keeps the last)."""
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    if key in first:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} (first at line {first[key]})", key_node.start_mark)
                    first[key] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    break
            return super().construct_mapping(node, deep=deep)

    int_tag = "tag:yaml.org,2002:int"
    Loader.yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers if tag != int_tag]
                                      for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(int_tag, re.compile(r"^[-+]?[0-9][0-9_]*$"), list("-+0123456789"))
    Loader.add_constructor(int_tag, lambda loader, node: int(loader.construct_scalar(node).replace("_", "")))
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    try:
        return yaml.load(stream, Loader=Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"invalid YAML{where}: {' '.join(str(problem).split())}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: a repeated key is an error naming it (JSON keeps the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def load_file(path: str, what: str = "config file") -> dict[str, Any]:
    """A mapping read from a YAML file, or a JSON file if ``path`` ends in ``.json`` (where ``Infinity`` is a
    number). An empty file is an empty mapping.

    Raises:
      ValueError: the file is missing or unreadable, is not valid YAML/JSON, or does not hold a mapping.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{what} path={path!r} is invalid; allowed: a file path (str or os.PathLike).")
    path = os.fspath(path)
    try:
        with open(path) as f:
            if path.endswith(".json"):
                try:
                    raw = json.load(f, object_pairs_hook=_unique_keys)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{what} {path!r} is not valid JSON: {error}.") from None
                except ValueError as error:  # a duplicate key
                    raise ValueError(f"{what} {path!r}: {error}.") from None
            else:
                try:
                    raw = load_yaml(f)
                except ValueError as error:
                    raise ValueError(f"{what} {path!r}: {error}.") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ValueError(f"{what} {path!r} cannot be read: {reason}.") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ValueError(f"{what} {path!r} must hold a mapping at top level, got {type(raw).__name__}.")
    return dict(raw)


def _read_text(key: str, text: str, rule: Rule) -> Any:
    """An override's text read for a field: strings verbatim (unless quoted or null), everything else as YAML."""
    stripped = text.strip()
    if rule.optional and stripped.lower() in ("", "null", "~", "none"):
        return None
    if rule.kind is str and rule.shape == "scalar" and stripped[:1] not in ("'", '"'):
        return stripped
    if rule.kind in (int, float) and stripped[:1] not in ("[", "{", "'", '"'):
        number = parse_number(stripped)
        return stripped if number is None else number
    try:
        return load_yaml(stripped)
    except ValueError as error:
        raise ValueError(f"{key}={text!r} is invalid ({error}); allowed: {describe(rule)}.") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``section.field=value`` as (dotted key, value read by the field's rule, e.g. ``1e-6`` a float).

    Raises:
      ValueError: no ``=``, an unknown key, or a value the field does not allow.
    """
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.field=value.")
    key, value = text.split("=", 1)
    key = key.strip()
    rule = _rule_of(key)
    return key, parse_value(key, _read_text(key, value, rule), rule)


def with_overrides(config: ExperimentConfig, overrides: Overrides) -> ExperimentConfig:
    """``config`` with dotted overrides applied together (cross-field checks see all of them at once).

    Args:
      config: the base config.
      overrides: ``{"client.lr": 0.05, "name": "x"}`` (values as Python values; text is read as in a file)
        or ``["client.lr=0.05", ...]`` (command-line form).

    Raises:
      ValueError: naming the field, the value and what is allowed.
    """
    items: Iterable[tuple[str, Any]]
    if not isinstance(config, ExperimentConfig):
        raise ValueError(f"config={config!r} is invalid; allowed: an ExperimentConfig (from_dict, load_config).")
    if isinstance(overrides, Mapping):
        items = [(str(k), v) for k, v in overrides.items()]
    elif isinstance(overrides, str) or not isinstance(overrides, Iterable):
        raise ValueError(f"overrides={overrides!r} is invalid; allowed: a mapping or a list of section.field=value.")
    else:
        overrides = list(overrides)
        wrong = [text for text in overrides if not isinstance(text, str)]
        if wrong:
            raise ValueError(f"override {wrong[0]!r} is invalid; allowed: text 'section.field=value' (or pass a "
                             "mapping {'section.field': value}).")
        items = [parse_override(text) for text in overrides]
    raw: dict[str, Any] = {}
    for key, value in items:
        rule = _rule_of(key)
        if isinstance(value, str) and rule.kind is not str:
            value = _read_text(key, value, rule)
        if key == "name":
            raw["name"] = value
        else:
            section, field = key.split(".")
            raw.setdefault(section, {})[field] = value
    return from_dict(raw, base=config)


def unwrap_saved(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """The config inside a run directory's ``config.json`` (``{"config_hash": ..., "config": {...}}``); any
    other mapping as it is."""
    if set(raw) == {"config_hash", "config"} and isinstance(raw["config"], Mapping):
        return raw["config"]
    return raw


def load_config(path: str, overrides: Overrides = ()) -> ExperimentConfig:
    """Reads a YAML or JSON config file (a run directory's ``config.json`` included: fields this version does
    not have are dropped with a warning) and applies overrides."""
    raw = load_file(path)
    inner = unwrap_saved(raw)
    return with_overrides(from_dict(inner, unknown="warn" if inner is not raw else "error"), overrides)
