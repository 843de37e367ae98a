"""Experiment: config -> parts -> rounds -> results. The same object serves notebooks, the CLI and sweeps.

    exp = Experiment(ExperimentConfig(...))      # validates, loads data, builds the compiled round
    results = exp.run(out_dir="runs/a")          # resumes from runs/a if a checkpoint is there
    results.history[-1]["test_accuracy"]
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from fedjaxpriv import evaluation
from fedjaxpriv.client.local import LocalSpec
from fedjaxpriv.client.sampling import overflow_probability, slot_chunk
from fedjaxpriv.client.settings import SETTING_KNOBS, ClientSettings, make_settings, per_client_array, with_extra
from fedjaxpriv.config import (POPULATION_RECIPE_FIELDS, USER_SUPPLIED, DataConfig, ExperimentConfig,
                               ModelConfig, is_table, is_text)
from fedjaxpriv.data import Dataset, FederatedData, load_dataset, partition, synthetic_federated
from fedjaxpriv.data.federated import fingerprint
from fedjaxpriv.models import TOKEN_CLASSIFIERS, WIDTH_MODELS, Model, ModelLike, as_model, count_params, get_model
from fedjaxpriv.models.tasks import (CLASSIFICATION, NEXT_TOKEN, PerExampleLoss, Task, as_task, check_fits,
                                     check_targets, describe, with_label_metrics)
from fedjaxpriv.parallel import (Plan, device_memory_bytes, local_mesh, plan as execution_plan, splits_data, tree_bytes)
from fedjaxpriv.progress import building_line, built_line, say
from fedjaxpriv.privacy.calibration import calibrate_noise
from fedjaxpriv.privacy.mechanisms import ClientLevelDpFedAvg, local_gaussian, round_up_float32
from fedjaxpriv.privacy.tracking import (PrivacyTracker, calibrate_targets, dp_batch_slots, dp_cohort_slots,
                                         dpsgd_mechanism)
from fedjaxpriv.server import Cohort, max_cohort_size, sample_cohort, server_optimizer
from fedjaxpriv.server.algorithms import FederatedAlgorithm, algorithm_for, check_protects, dp_fedavg
from fedjaxpriv.program import RoundProgram, Tap, client_rows, prune_schedule_of, round_record
from fedjaxpriv.runner import Record, Results, run_experiment
from fedjaxpriv.simulation import AggregationSpec, ServerState
from fedjaxpriv.transforms.base import MessageTransform
from fedjaxpriv.transforms.pipeline import message_pipeline

def load_population(config: ExperimentConfig) -> tuple[FederatedData, Dataset, int]:
    """Loads and partitions the data: (population, central test set, num_classes)."""
    data = config.data
    if data.dataset == "synthetic":
        num_classes = 10
        population, test = synthetic_federated(config.run.seed, num_clients=data.num_clients,
                                               alpha=data.synthetic_alpha, beta=data.synthetic_beta,
                                               num_classes=num_classes, max_size=data.synthetic_max_size)
        return population, test, num_classes
    if is_table(data):
        from fedjaxpriv.data.tables import load_table_dataset

        train, test, classes = load_table_dataset(data, config.run.seed)
        if isinstance(train, FederatedData):  # one client per value of data.client_column
            return train, test, classes
        return partition_like(config, train, config.run.seed), test, classes
    if data.dataset.startswith("leaf:"):
        from fedjaxpriv.data.leaf import load_leaf

        return load_leaf(data.dataset, data.data_dir, data.num_clients, config.run.seed, data.vocabulary_size)
    if data.dataset == "keyboard":
        from fedjaxpriv.data import text

        train_texts, test_texts, _ = text.keyboard_corpus(config.run.seed, data.num_clients)
        vocabulary = text.build_vocabulary(train_texts, "word", data.vocabulary_size)
        population, test = text.text_population(train_texts, test_texts, vocabulary, data.sequence_length)
        return population, test, len(vocabulary)
    if is_text(data):  # a tfds text dataset: its texts' windows, split as data.partition says
        from fedjaxpriv.data import text
        from fedjaxpriv.data.sources import tfds_text_name
        from fedjaxpriv.data.tfds_source import load_tfds_texts

        train_texts, test_texts = load_tfds_texts(
            tfds_text_name(data.dataset), data.data_dir, data.download,
            text_key=data.image_key if data.image_key != "image" else "text")
        vocabulary = text.build_vocabulary(train_texts, data.text_level or "char", data.vocabulary_size)
        train = text.windows_of(train_texts, vocabulary, data.sequence_length)
        return (partition_like(config, train, config.run.seed),
                text.windows_of(test_texts, vocabulary, data.sequence_length), len(vocabulary))
    if data.dataset == "attribute":
        from fedjaxpriv.data.attribute import attribute_population

        population, test, _ = attribute_population(config.run.seed, num_clients=data.num_clients)
        return population, test, 2
    train, test, info = load_dataset(data.dataset, data_dir=data.data_dir, download=data.download,
                                     image_key=data.image_key, label_key=data.label_key)
    return partition_like(config, train, config.run.seed), test, info.num_classes


def partition_like(config: ExperimentConfig, dataset: Dataset, seed: int) -> FederatedData:
    """Splits ``dataset`` into ``data.num_clients`` clients with the config's partition scheme and its
    parameters (the same split a run of ``config`` makes of its training data, for another dataset or seed)."""
    data = config.data
    if data.partition == "flwr":
        from fedjaxpriv.data.flower import configured_partitioner, partition_with

        return partition_with(configured_partitioner(
            data.flwr_partitioner, data.num_clients, seed, dirichlet_alpha=data.dirichlet_alpha,
            shards_per_client=data.shards_per_client), dataset)
    kwargs: dict[str, Any] = {}
    if data.partition == "dirichlet":
        kwargs["alpha"] = data.dirichlet_alpha
    elif data.partition == "shards":
        kwargs["shards_per_client"] = data.shards_per_client
    elif data.partition == "quantity_skew":
        kwargs["sigma"] = data.quantity_sigma
    return partition(dataset, data.partition, data.num_clients, seed, **kwargs)


def model_for(config: ExperimentConfig, input_shape: Sequence[int], num_classes: int = 10,
              model: ModelLike | None = None, *, input_dtype: Any = np.float32) -> Model:
    """The configured model for inputs of ``input_shape`` (``input_dtype``), or ``model`` — a Flax module, a
    ``Model`` or a pure ``(init, apply)`` pair — as a ``Model`` (``models.as_model``)."""
    if model is not None:
        return as_model(model, input_shape, input_dtype)
    if config.model.name.startswith(USER_SUPPLIED):
        raise ValueError(f"model.name={config.model.name!r} records a model or loss its user passed in; pass them "
                         "again (model=..., loss=...).")
    model_kwargs: dict[str, Any] = {"hidden": tuple(config.model.hidden)} if config.model.name in WIDTH_MODELS else {}
    if config.model.name in TOKEN_CLASSIFIERS:  # ids < data.vocabulary_size (the vocabulary's largest size)
        model_kwargs["vocabulary"] = config.data.vocabulary_size
    return get_model(config.model.name, input_shape, num_classes, **model_kwargs)


def client_settings(config: ExperimentConfig, counts: np.ndarray) -> ClientSettings:
    """Per-client settings arrays [C] from the config, as ``server.algorithm`` trains them (FedSGD: one
    full-batch step with lr 1), before any noise is calibrated to a target epsilon (``Experiment`` does that, with
    ``privacy.tracking.calibrate_targets``)."""
    return run_algorithm(config, None).settings_for(configured_settings(config, counts), counts)


def configured_settings(config: ExperimentConfig, counts: np.ndarray) -> ClientSettings:
    """Per-client settings arrays [C] as ``config.client`` and ``config.message`` give them: each field is the
    knob of the same name (``client.settings.SETTING_KNOBS``), and ``poisson`` is ``client.sampling``."""
    fields = {name: getattr(getattr(config, section), name) for name, (section, _) in SETTING_KNOBS.items()}
    return make_settings(len(counts), counts, poisson=config.client.sampling == "poisson", **fields)


def run_algorithm(config: ExperimentConfig, algorithm: FederatedAlgorithm | None) -> FederatedAlgorithm:
    """The algorithm passed in, else the one ``server.algorithm`` names (client-level DP from the config is added
    once the run knows its cohort, ``dp_fedavg``)."""
    s = config.server
    if algorithm is not None and not isinstance(algorithm, FederatedAlgorithm):
        raise ValueError(f"algorithm={algorithm!r} is invalid; allowed: a FederatedAlgorithm (server.algorithms: "
                         f"e.g. algorithm_for('scaffold')), or None for server.algorithm={s.algorithm!r} (set "
                         "server.algorithm in the config to choose a built-in one by name).")
    return algorithm if algorithm is not None else algorithm_for(s.algorithm, ditto_lambda=s.ditto_lambda)


# Elements per chunk when checking that inputs are finite (the check's temporary stays near 16 MiB).
_CHECK_CHUNK = 1 << 24


def check_data(population: Any, test: Any, num_classes: Any, task: Task) -> None:
    """Raises ValueError, before anything is built, when data passed to ``Experiment`` cannot be what it should:
    a population that is not ``FederatedData`` or a test set that is not a ``Dataset`` (with how to build one),
    a number of classes that is not a positive integer, test inputs of another shape than the population's,
    NaN or infinite inputs, or class-id targets outside the classes (``tasks.check_targets``)."""
    if not isinstance(population, FederatedData):
        raise ValueError(f"population is a {type(population).__name__}; allowed: a fedjaxpriv.data.FederatedData, "
                         "e.g. data.from_client_lists(xs, ys) from per-client arrays, or data.from_partition("
                         "Dataset(x, y), data.partition(...)) from one array pair.")
    if not isinstance(test, Dataset):
        raise ValueError(f"test is a {type(test).__name__}; allowed: a fedjaxpriv.data.Dataset(x, y).")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} is not allowed: it must be a positive integer.")
    if tuple(test.x.shape[1:]) != population.input_shape:
        raise ValueError(f"test inputs have shape {tuple(test.x.shape[1:])} per example but the population's have "
                         f"{population.input_shape}; allowed: the same shape.")
    for where, x in (("population.x", population.x), ("test.x", test.x)):
        flat = np.asarray(x).reshape(-1)
        if np.issubdtype(flat.dtype, np.floating):
            bad = sum(int(np.count_nonzero(~np.isfinite(flat[i:i + _CHECK_CHUNK])))
                      for i in range(0, flat.size, _CHECK_CHUNK))
            if bad:
                raise ValueError(f"{where} holds {bad} NaN or infinite value(s); allowed: finite inputs.")
    check_targets(task, population.y, int(num_classes), "population.y")
    check_targets(task, test.y, int(num_classes), "test.y")


def check_client_level(mechanism: ClientLevelDpFedAvg | None, num_clients: int, clients_per_round: int,
                       client_sampling: str, cohort_slots: int) -> None:
    """Raises ValueError when a client-level mechanism passed in describes another population or cohort than the
    run's, or charges less than the run's chance of a Poisson cohort overflowing its ``cohort_slots``: its
    accounting would not be the run's."""
    if mechanism is None:
        return
    poisson = client_sampling == "poisson"
    expected = {"num_clients": num_clients, "expected_cohort": clients_per_round, "poisson": poisson}
    for field, value in expected.items():
        if getattr(mechanism, field) != value:
            raise ValueError(f"the client-level mechanism has {field}={getattr(mechanism, field)!r} but the run has "
                             f"{value!r} (data.num_clients, server.clients_per_round, server.client_sampling); "
                             "allowed: the run's own values.")
    truncation = cohort_truncation(num_clients, clients_per_round, poisson, cohort_slots)
    if mechanism.cohort_truncation_probability < truncation:
        raise ValueError(f"the client-level mechanism has cohort_truncation_probability="
                         f"{mechanism.cohort_truncation_probability:g} but the run's Poisson cohort overflows its "
                         f"{cohort_slots} slots with probability {truncation:g}; allowed: >= {truncation:g}.")


def cohort_truncation(num_clients: int, clients_per_round: int, poisson: bool, cohort_slots: int) -> float:
    """Per round, the probability that a Poisson cohort (rate K / C, one client added) overflows its static
    ``cohort_slots`` (0 for fixed-size cohorts); DP-FedAvg charges it to delta."""
    if not poisson:
        return 0.0
    return float(overflow_probability(num_clients + 1, clients_per_round / num_clients, cohort_slots))


def target_epsilons(config: ExperimentConfig, num_clients: int) -> np.ndarray:
    """Each client's target epsilon from ``client.target_epsilon``, float64 [C] (inf = no target)."""
    if config.client.target_epsilon is None:
        return np.full(num_clients, np.inf)
    return per_client_array("target_epsilon", config.client.target_epsilon, num_clients).astype(np.float64)


def client_level_mechanism(config: ExperimentConfig, num_clients: int,
                           cohort_slots: int) -> ClientLevelDpFedAvg | None:
    """DP-FedAvg as the config describes it (None without client-level clipping or noise); with
    ``server.target_epsilon`` its noise multiplier is calibrated to the target over ``run.rounds`` rounds
    (float32 rounded up)."""
    s = config.server
    if not s.clips:
        return None
    poisson = s.client_sampling == "poisson"
    truncation = cohort_truncation(num_clients, s.clients_per_round, poisson, cohort_slots)
    count_noise = (s.clip_count_noise_multiplier if s.clip_count_noise_multiplier is not None
                   else s.clients_per_round / 20.0)
    mechanism = ClientLevelDpFedAvg(noise_multiplier=float(s.central_noise_multiplier), num_clients=num_clients,
                                    expected_cohort=s.clients_per_round, poisson=poisson,
                                    adaptive_quantile=s.adaptive_clip_quantile, adaptive_lr=s.adaptive_clip_lr,
                                    count_noise_std=float(count_noise), cohort_truncation_probability=truncation)
    if s.target_epsilon is None:
        return mechanism
    r = config.run
    try:
        z = calibrate_noise(lambda z: dataclasses.replace(mechanism, noise_multiplier=z).round_event(), r.rounds,
                            s.target_epsilon, r.delta, r.accountant, truncation_probability=truncation)
    except ValueError as error:
        raise ValueError(f"server.target_epsilon={s.target_epsilon:g}: {error}") from None
    return dataclasses.replace(mechanism, noise_multiplier=float(round_up_float32(np.array([z]))[0]))


def user_data_config(config: ExperimentConfig, population: FederatedData, test: Dataset,
                     num_classes: int) -> ExperimentConfig:
    """The config a run on arrays passed in records: ``data.dataset`` is "user-supplied arrays <fingerprint of the
    population, test set and num_classes>", so that its hash differs from a built-in dataset's and from other
    arrays', and the fields that say how a population is built from a dataset (``POPULATION_RECIPE_FIELDS``) are
    at their defaults, since none is used; each one the config set otherwise is named in a warning."""
    defaults = DataConfig()
    name = f"{USER_SUPPLIED} arrays " + fingerprint(population.x, population.y, population.offsets, population.counts,
                                                    population.attributes, test.x, test.y, num_classes)
    data = config.data
    ignored = [f"data.{field}={getattr(data, field)!r}" for field in POPULATION_RECIPE_FIELDS
               if getattr(data, field) != getattr(defaults, field)
               and not (field == "dataset" and data.dataset == name)]
    if ignored:
        warnings.warn(f"{', '.join(ignored)}: not used, since the population passed in is used as it is; the run "
                      f"records data.dataset={name!r} and the other data fields at their defaults.", stacklevel=3)
    return dataclasses.replace(config, data=dataclasses.replace(defaults, dataset=name, num_clients=data.num_clients))


def recorded_config(config: ExperimentConfig, model: Model | None, task: Task) -> ExperimentConfig:
    """The config as the run records it: ``model.name`` names a model passed in ("user-supplied <name>") and any
    task but classification ("<model>; loss: <task>"), so the run never claims a model or loss that did not run."""
    name = config.model.name if model is None else model.name
    hidden = config.model.hidden
    if (model is not None or config.model.name not in WIDTH_MODELS) and hidden != ModelConfig().hidden:
        warnings.warn(f"model.hidden={list(hidden)} is not used: it sets the widths of the built-in "
                      f"{list(WIDTH_MODELS)} only, and this run's model is {name!r}; the run records model.hidden at "
                      "its default.", stacklevel=3)
        hidden = ModelConfig().hidden
    if task is not CLASSIFICATION:
        name = f"{name}; loss: {describe(task)}"
    if name == config.model.name and hidden == config.model.hidden:
        return config
    return dataclasses.replace(config, model=dataclasses.replace(config.model, name=name, hidden=hidden))


def local_spec(config: ExperimentConfig, settings: ClientSettings, counts: np.ndarray, num_classes: int,
               plan: Plan, slots: int, task: Task = CLASSIFICATION) -> LocalSpec:
    """Static shapes and switches of local training for this population (``slots`` batch slots per step), with the
    execution choices of ``plan``."""
    max_count = max(1, int(np.max(counts)))
    c = config.client
    uses_dp = bool(np.any(settings.dp_noise_multiplier > 0) or np.any(np.isfinite(settings.dp_clip_norm)))
    max_steps = max(1, int(np.max(settings.local_steps)))
    return LocalSpec(
        max_steps=max_steps, max_batch=slots, max_count=max_count,
        num_classes=num_classes, per_example=uses_dp, mixup=bool(np.any(settings.mixup_alpha > 0)),
        prune=c.prune_method if np.any(settings.prune_sparsity > 0) else None, prune_scope=c.prune_scope,
        momentum=c.momentum, prox=bool(np.any(settings.prox_mu > 0)), poisson=bool(np.any(settings.poisson)),
        slot_chunk=slot_chunk(settings, counts, slots, uses_dp or plan.structure.convolves),
        conv_as_matmul=plan.conv_as_matmul, outer_product_grads=plan.outer_product_grads, unroll=plan.unroll,
        task=task)


def clips_without_noise(config: ExperimentConfig, settings: ClientSettings, client_level: Any) -> list[str]:
    """A line for each DP clip that runs with no noise for any client (DP-SGD's per-example clip, DP-FedAvg's
    client clip): clipping alone bounds the sensitivity but gives no privacy guarantee, so no epsilon is
    reported for that level."""
    lines = []
    if np.any(np.isfinite(settings.dp_clip_norm)) and not np.any(settings.dp_noise_multiplier > 0):
        lines.append(f"client.dp_clip_norm={config.client.dp_clip_norm} with no noise (client.dp_noise_multiplier 0, "
                     "no client.target_epsilon): clipping alone gives no privacy guarantee; no example-level "
                     "epsilon is reported.")
    if config.server.clips and (client_level is None or not client_level.private):
        lines.append(f"server.central_clip_norm={config.server.central_clip_norm} with no noise "
                     "(server.central_noise_multiplier 0, no server.target_epsilon): clipping alone gives no "
                     "privacy guarantee; no client-level epsilon is reported.")
    return lines


def warn_about_delta(delta: float, counts: np.ndarray, sample_level: Any, client_level: Any) -> None:
    """Warns (naming ``run.delta``) when delta >= 1/n at the example level or >= 1/C at the client level: such a
    delta allows releasing one example (one client) outright."""
    if sample_level is not None:
        smallest = int(np.min(np.asarray(counts)[sample_level.private]))
        if delta >= 1.0 / max(smallest, 1):
            warnings.warn(f"run.delta={delta:g} is >= 1/n = {1 / max(smallest, 1):g} for the smallest DP-SGD client "
                          f"({smallest} examples): the example-level guarantee is weak; use run.delta < 1/n.",
                          stacklevel=3)
    if client_level is not None and client_level.private and delta >= 1.0 / client_level.num_clients:
        warnings.warn(f"run.delta={delta:g} is >= 1/C = {1 / client_level.num_clients:g} for C = "
                      f"{client_level.num_clients} clients: the client-level guarantee is weak; use run.delta < 1/C.",
                      stacklevel=3)


class RunData(NamedTuple):
    """The data, task and model of a run, checked against each other (``build_data``).

    Attributes:
      config: the config as the run records it (``user_data_config``, ``recorded_config``).
      population / test / num_classes: the clients' data, the central test set, the number of classes.
      task: what the model predicts, with the metrics its targets allow.
      model: the pure model.
      params: the round-0 global model (from ``run.seed``).
    """

    config: ExperimentConfig
    population: FederatedData
    test: Dataset
    num_classes: int
    task: Task
    model: Model
    params: Any


def build_data(config: ExperimentConfig, population: FederatedData | None, test: Dataset | None,
               num_classes: int | None, model: ModelLike | None, loss: Task | PerExampleLoss | str | None,
               data_from_config: bool) -> RunData:
    """The run's data (``config.data``'s, or the population, test set and classes passed in, all three), its task
    (``loss``; next-token prediction for the text datasets) and model (``model`` or ``config.model``), initialised
    from ``run.seed``. Raises ValueError when they do not fit one another (``check_data``, ``check_fits``)."""
    if population is None:
        population, test, num_classes = load_population(config)
    if test is None or num_classes is None:
        raise ValueError("pass population, test and num_classes together (or none of them).")
    if loss is None and data_from_config and is_text(config.data):
        loss = NEXT_TOKEN  # the text datasets' task
    task = as_task(loss)
    check_data(population, test, num_classes, task)
    if population.num_clients != config.data.num_clients:
        raise ValueError(f"population has {population.num_clients} clients but data.num_clients="
                         f"{config.data.num_clients}.")
    if tuple(test.y.shape[1:]) != tuple(population.y.shape[1:]):
        raise ValueError(f"test targets have shape {tuple(test.y.shape[1:])} per example but the population's "
                         f"have {tuple(population.y.shape[1:])}.")
    if not data_from_config:
        config = user_data_config(config, population, test, num_classes)
    built = model_for(config, population.input_shape, num_classes, model, input_dtype=population.x.dtype)
    params = built.init(jax.random.fold_in(jax.random.key(config.run.seed), 2**31 - 1))
    check_fits(task, built.apply, params, population.input_shape, population.x.dtype, population.y.shape[1:],
               population.y.dtype, num_classes)
    logits = jax.eval_shape(built.apply, params, jax.ShapeDtypeStruct((2, *population.input_shape),
                                                                      population.x.dtype))
    task = with_label_metrics(task, logits.shape, population.y.shape[1:], population.y.dtype, num_classes)
    config = recorded_config(config, None if model is None else built, task)
    return RunData(config, population, test, num_classes, task, built, params)


class PrivacyPlan(NamedTuple):
    """What a run's privacy asks of its settings and shapes (``plan_privacy``).

    Attributes:
      settings: every client's settings [C], noise multipliers calibrated to their target epsilons.
      participation_budget: [C] the rounds each client may take part in within its target.
      batch_slots: the batch slots of a local step (Poisson batches: the tail within delta).
      cohort_slots: the cohort slots of a round (Poisson cohorts under DP-FedAvg: the tail within delta).
    """

    settings: ClientSettings
    participation_budget: np.ndarray
    batch_slots: int
    cohort_slots: int


def plan_privacy(config: ExperimentConfig, settings: ClientSettings, counts: np.ndarray, targets: np.ndarray,
                 algorithm: FederatedAlgorithm) -> PrivacyPlan:
    """Calibrates ``settings`` [C] to the per-client ``targets`` [C] (``calibrate_targets``) and sizes the batch and
    cohort slots so that a Poisson batch or cohort overflows them only within delta."""
    s, r = config.server, config.run
    num_clients = int(np.asarray(counts).size)
    settings, budget = calibrate_targets(settings, counts, targets, client_rate=s.clients_per_round / num_clients,
                                         rounds=r.rounds, delta=r.delta, accountant=r.accountant)
    planned = np.minimum(budget, r.rounds) * np.asarray(settings.local_steps, np.int64)
    slots = dp_batch_slots(settings, counts, planned_steps=planned, delta=r.delta, accountant=r.accountant)
    cohort_slots = max_cohort_size(num_clients, s.clients_per_round, s.client_sampling,
                                   private=(s.central_noise_multiplier > 0 or s.target_epsilon is not None
                                            or algorithm.client_level is not None))
    if s.client_sampling == "poisson" and algorithm.client_level is None:
        # The config's DP-FedAvg, untruncated (C + 1 slots cannot overflow), sizes the slots from delta.
        untruncated = client_level_mechanism(config, num_clients, num_clients + 1)
        if untruncated is not None and untruncated.private:
            cohort_slots = max(cohort_slots, dp_cohort_slots(untruncated, r.rounds, r.delta, r.accountant))
    return PrivacyPlan(settings, budget, slots, cohort_slots)


class Mechanisms(NamedTuple):
    """A run's DP mechanisms (``build_mechanisms``): example-level DP-SGD, local DP of the messages (None where
    not used or not claimed) and the algorithm, with DP-FedAvg's aggregation where the config asks for it."""

    sample_level: Any
    local_dp: Any
    algorithm: FederatedAlgorithm


def build_mechanisms(config: ExperimentConfig, settings: ClientSettings, counts: np.ndarray, batch_slots: int,
                     cohort_slots: int, algorithm: FederatedAlgorithm, *, transform_passed_in: bool) -> Mechanisms:
    """The mechanisms of ``settings`` [C] and the config's server. Local DP is claimed only for the config's own
    message chain (``transform_passed_in`` False), whose noise stage is the ``LocalGaussian`` mechanism: a transform
    passed in is not known to add that noise. Raises ValueError when the algorithm cannot run under the DP asked
    for (``check_protects``), or brings client-level DP the config asks for too."""
    s = config.server
    num_clients = int(np.asarray(counts).size)
    sample_level = dpsgd_mechanism(settings, counts, batch_slots)
    local_dp = (None if transform_passed_in
                else local_gaussian(settings.local_noise_multiplier, settings.clip_norm))
    if np.any(settings.local_noise_multiplier > 0):
        check_protects(algorithm, "local DP (message.local_noise_multiplier > 0)")
        if transform_passed_in:
            warnings.warn("message.local_noise_multiplier > 0 with a message_transform passed in: no local-DP "
                          "epsilon is reported, since the transform's noise is not known to the accountant.",
                          stacklevel=3)
    configured = client_level_mechanism(config, num_clients, cohort_slots)
    if configured is not None:
        if algorithm.client_level is not None:
            raise ValueError(f"algorithm {algorithm.name!r} brings its own client-level DP, and the config asks for "
                             "it too (server.central_clip_norm / central_noise_multiplier / target_epsilon): give "
                             "one of them.")
        algorithm = dp_fedavg(configured, s.central_clip_norm, algorithm)
    check_client_level(algorithm.client_level, num_clients, s.clients_per_round, s.client_sampling, cohort_slots)
    return Mechanisms(sample_level, local_dp, algorithm)


class Layout(NamedTuple):
    """Where and how a run's rounds execute (``build_layout``).

    Attributes:
      mesh: the devices clients are sharded over (None: one device).
      plan: the execution plan (strategy, chunk, lowering), chosen from the model's structure.
      spec: the static local-training spec.
    """

    mesh: jax.sharding.Mesh | None
    plan: Plan
    spec: LocalSpec


def build_layout(config: ExperimentConfig, data: RunData, budget: PrivacyPlan,
                 mesh: jax.sharding.Mesh | None) -> Layout:
    """The mesh (``run.num_devices`` local devices unless ``mesh`` is given), the execution plan for the run's
    shapes and the local-training spec. Raises ValueError for a device count or a layout the plan cannot run."""
    r, population = config.run, data.population
    if mesh is None:
        try:
            mesh = local_mesh(r.num_devices)
        except ValueError as error:
            raise ValueError(f"run.num_devices: {error}") from None
    slots = budget.batch_slots
    plan = execution_plan(
        data.model.apply, data.params, jax.ShapeDtypeStruct((slots, *population.input_shape), population.x.dtype),
        max_steps=max(1, int(np.max(budget.settings.local_steps))), max_batch=slots, num_clients=budget.cohort_slots,
        mesh=mesh, strategy=r.strategy, chunk_size=r.chunk_size)
    if r.shard_data and mesh is not None and plan.strategy == "host":
        raise ValueError("run.shard_data=true needs run.strategy 'vmap' or 'loop' (the compiled round fetches "
                         f"each chunk's examples); the plan chose 'host' (run.strategy={r.strategy!r}).")
    spec = local_spec(config, budget.settings, population.counts, data.num_classes, plan, slots, data.task)
    return Layout(mesh, plan, spec)


def build_program(config: ExperimentConfig, data: RunData, layout: Layout, algorithm: FederatedAlgorithm,
                  settings: ClientSettings, message_transform: MessageTransform | None = None, *,
                  may_split: bool = True) -> RoundProgram:
    """The round program of a run: its parts from the config (the message transform passed in, else the chain
    ``config.message`` describes for these settings), and its examples and client states split over the mesh as
    ``run.shard_data`` asks (by default when a copy per device would not fit comfortably:
    ``parallel.splits_data``; never without ``may_split``)."""
    s, c, m, population = config.server, config.client, config.message, data.population
    if message_transform is None:
        message_transform = message_pipeline(m.order, settings, feedback=m.error_feedback)[0]
    server_tx = server_optimizer(s.optimizer, s.lr, momentum=s.momentum, b1=s.adam_b1, b2=s.adam_b2, eps=s.adam_eps)
    program = RoundProgram(
        data.model.apply, layout.spec, server_tx,
        AggregationSpec(weighting=s.weighting, client_level=algorithm.client_level), algorithm, message_transform,
        prune_schedule_of(c.prune_begin_round, c.prune_end_round), layout.plan.chunk_size, layout.plan.strategy,
        layout.mesh)
    copy_bytes = population.x.nbytes + population.y.nbytes + tree_bytes(jax.eval_shape(
        lambda p: program.init_state(p, population.num_clients).client_state, data.params))
    split = may_split and splits_data(config.run.shard_data, layout.mesh, layout.plan.strategy, copy_bytes,
                                      layout.mesh and device_memory_bytes(layout.mesh))
    return program.replace(sharded_examples=int(max(1, np.max(population.counts))) if split else None)


class RunParts(NamedTuple):
    """Everything a run is built from (``build_run``), each part from its own builder."""

    data: RunData
    budget: PrivacyPlan
    layout: Layout
    mechanisms: Mechanisms
    program: RoundProgram


def build_run(config: ExperimentConfig, *, mesh: jax.sharding.Mesh | None = None,
              population: FederatedData | None = None, test: Dataset | None = None, num_classes: int | None = None,
              settings: ClientSettings | None = None, targets: np.ndarray | None = None,
              model: ModelLike | None = None, loss: Task | PerExampleLoss | str | None = None,
              message_transform: MessageTransform | None = None, algorithm: FederatedAlgorithm | None = None,
              extra_settings: Mapping[str, Any] | None = None, data_from_config: bool = False,
              may_split: bool = True) -> RunParts:
    """The parts of the run ``config`` describes; each argument given is used instead of what the config says.

    Args:
      config: the experiment.
      mesh: devices to shard clients over (default: ``run.num_devices`` local devices).
      population / test / num_classes: the data, instead of loading ``config.data`` (all three together). The
        run then records ``data.dataset`` as "user-supplied arrays <fingerprint>" (``user_data_config``).
      settings: per-client settings [C] instead of the config's (noise still calibrated to ``targets``).
      targets: per-client target epsilons [C] (inf = none) instead of ``client.target_epsilon``.
      model: instead of ``config.model``: a stateless Flax module (initialised on the population's input
        shape), a ``Model`` or a pure ``(init, apply)`` pair; ``config.model.name`` then records
        "user-supplied <name>".
      loss: the task (``models.tasks``: ``CLASSIFICATION`` by default, ``MULTI_LABEL``, ``NEXT_TOKEN``, or a
        ``Task``) or a bare per-example loss ``(logits, targets) -> [B]``; the population's ``y`` holds the
        task's targets.
      message_transform: what each client applies to its update before sending it, instead of the chain
        ``config.message`` describes (``transforms.pipeline.message_pipeline``): any ``MessageTransform``, e.g.
        ``transforms.chain(...)``. Its strengths may name any ``ClientSettings`` field; its state is kept per
        client from round to round, and its diagnostics land in the history as ``message/<name>``.
      algorithm: the federated algorithm's client and server state (``server.algorithms``), instead of the one
        ``server.algorithm`` names (FedAvg, or SCAFFOLD's control variates).
      extra_settings: a user's own per-client strengths {name: scalar, tiers or one value per client}, added to
        ``settings.extra`` so that a transform's strength can name them.
      data_from_config: the population passed in was built from ``config.data`` (``load_population``,
        ``partition_like``), so the config describes it and is recorded as it is.
      may_split: the examples and client states may be split over the mesh (``build_program``).

    Raises:
      ValueError: before anything trains, when the model, the task and the data do not fit (input or output
        shapes, a loss that is not per-example, mixup for a task without soft targets), or the settings, the
        mechanisms or the layout are refused.
    """
    # 1. data, task and model, checked against each other
    data = build_data(config, population, test, num_classes, model, loss, data_from_config or population is None)
    config, counts, num = data.config, data.population.counts, data.population.num_clients
    # 2. the algorithm and every client's settings, noise calibrated to the targets; batch and cohort slots
    algorithm = run_algorithm(config, algorithm)
    settings = algorithm.settings_for(settings if settings is not None else configured_settings(config, counts),
                                      counts)
    if extra_settings:
        settings = settings._replace(extra=with_extra(settings.extra, num, extra_settings))
    targets = target_epsilons(config, num) if targets is None else np.asarray(targets)
    budget = plan_privacy(config, settings, counts, targets, algorithm)
    # 3. the devices, the execution plan and the local-training spec
    layout = build_layout(config, data, budget, mesh)
    # 4. the DP mechanisms, each owning its JAX step and its accounting
    mechanisms = build_mechanisms(config, budget.settings, counts, budget.batch_slots, budget.cohort_slots, algorithm,
                                  transform_passed_in=message_transform is not None)
    warn_about_delta(config.run.delta, counts, mechanisms.sample_level, mechanisms.algorithm.client_level)
    for line in clips_without_noise(config, budget.settings, mechanisms.algorithm.client_level):
        warnings.warn(line, stacklevel=3)
    # 5. the round as one value: what runs, and what the attacks replay and ask about local training
    program = build_program(config, data, layout, mechanisms.algorithm, budget.settings, message_transform,
                            may_split=may_split)
    return RunParts(data, budget, layout, mechanisms, program)


def privacy_tracker(parts: RunParts) -> PrivacyTracker:
    """A fresh tracker of a run's mechanisms (nothing spent yet). Raises ValueError naming ``run.accountant`` when
    it cannot account them."""
    r, (sample_level, local_dp, algorithm) = parts.data.config.run, parts.mechanisms
    try:
        return PrivacyTracker(num_clients=parts.data.population.num_clients,
                              steps_per_round=parts.budget.settings.local_steps, delta=r.delta, accountant=r.accountant,
                              sample_level=sample_level, client_level=algorithm.client_level, local=local_dp,
                              max_participations=parts.budget.participation_budget)
    except ValueError as error:
        raise ValueError(f"run.accountant={r.accountant!r}: {error}") from None


def evaluate_run(parts: RunParts, params: Any, state: ServerState | None = None) -> Record:
    """``evaluation.run_metrics`` of the global model ``params``; with ``state``, an algorithm's personal models
    (Ditto) too (classification), each client's scored on the class mix of its own training examples."""
    data, algorithm = parts.data, parts.mechanisms.algorithm
    personal, counts, p = None, None, data.population
    if state is not None and algorithm.personal_params is not None and data.task is CLASSIFICATION:
        personal = algorithm.personal_params(client_rows(state, p.num_clients).client_state.algorithm)
        counts = evaluation.label_counts_per_client(p.y, p.offsets, p.counts, data.num_classes)
    return evaluation.run_metrics(data.model.apply, params, data.test, p, data.task, personal, counts)


class Part:
    """An attribute of ``Experiment`` read from its ``parts`` (``"data.population"``: ``parts.data.population``), so
    that the two never disagree; it is set by replacing ``parts`` (``RunParts._replace``)."""

    def __init__(self, path: str) -> None:
        self.path = path.split(".")

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, experiment: Any, owner: type | None = None) -> Any:
        if experiment is None:
            return self
        value = experiment.parts
        for name in self.path:
            value = getattr(value, name)
        return value

    def __set__(self, experiment: Any, value: Any) -> None:
        raise AttributeError(f"Experiment.{self.name} is parts.{'.'.join(self.path)}: replace the part "
                             "(experiment.parts = experiment.parts._replace(...)) or pass it to the constructor.")


class Experiment:
    """Runs the rounds of a run built from its config (``build_run``): ``Experiment(config, **parts)``, where
    ``parts`` are ``build_run``'s arguments (a population, model, loss, settings, transform, algorithm, mesh
    ... instead of the config's).

    Attributes:
      config: the validated configuration (as the run records it).
      parts: the ``RunParts``; the attributes below are its pieces.
      population / test / num_classes: the clients' data (``FederatedData``), the central test set, the classes.
      model / task / initial_params: the pure model, what it predicts, the round-0 global model (``run.seed``).
      settings: per-client settings arrays [C], noise calibrated.
      plan / spec / mesh: the execution plan chosen from the model's structure, the local-training spec, devices.
      program: the round program; privacy: the run's privacy tracker.
    """

    runs_topology = False  # a decentralized run (``topology.graph``) is a ``DecentralizedExperiment``
    config, population, test = Part("data.config"), Part("data.population"), Part("data.test")
    num_classes, task, model, initial_params = (Part("data.num_classes"), Part("data.task"), Part("data.model"),
                                                Part("data.params"))
    settings, participation_budget = Part("budget.settings"), Part("budget.participation_budget")
    cohort_slots, mesh, plan, spec = Part("budget.cohort_slots"), Part("layout.mesh"), Part("layout.plan"), Part(
        "layout.spec")
    strategy, chunk_size = Part("layout.plan.strategy"), Part("layout.plan.chunk_size")
    sample_level, local_dp, algorithm = (Part("mechanisms.sample_level"), Part("mechanisms.local_dp"),
                                         Part("mechanisms.algorithm"))
    client_level, program = Part("mechanisms.algorithm.client_level"), Part("program")
    shard_width, tap_fn = Part("program.sharded_examples"), Part("program.tap_fn")

    def __init__(self, config: ExperimentConfig, *, progress: bool = True, **parts: Any) -> None:
        if not isinstance(config, ExperimentConfig):
            raise ValueError(f"config={config!r} is invalid; allowed: an ExperimentConfig (fedjaxpriv.config.from_dict"
                             "(dict), load_config(path) or ExperimentConfig()).")
        if config.topology.decentralized and not self.runs_topology:
            raise ValueError(f"topology.graph={config.topology.graph!r} is a decentralized run: build it with "
                             "fedjaxpriv.experiment.build_experiment(config) (or decentralized."
                             "DecentralizedExperiment); Experiment runs federated learning with a server.")
        from fedjaxpriv.distributed import check_same_everywhere

        check_same_everywhere({"config": config.config_hash()})  # a multi-process run: before any collective
        progress, started = progress and jax.process_index() == 0, time.perf_counter()
        if progress:
            say(building_line(config, None if parts.get("population") is None or parts.get("data_from_config")
                              else parts["population"], parts.get("model")))
        # Decentralized rounds read a copy of the data (the config refuses run.shard_data=true for them).
        self.parts = build_run(config, may_split=not self.runs_topology, **parts)
        self.root_key, self.num_params = jax.random.key(self.config.run.seed), count_params(self.initial_params)
        self.privacy, self.round_fn = self.new_privacy_tracker(), self.program.compiled_round()
        # Tap rounds run the same round, built to emit the tapped clients' messages too (compiled when one comes).
        self.tap_width = len(self.config.run.tap_clients) if self.config.run.tap_rounds else 0
        self.device_population = self.program.place_population(self.population)  # the data and settings on devices
        self.device_settings = self.program.place_settings(self.settings)
        if progress:
            say(built_line(self, time.perf_counter() - started))

    def new_privacy_tracker(self) -> PrivacyTracker:
        """A fresh tracker of this run's mechanisms (nothing spent yet: ``privacy_tracker``)."""
        return privacy_tracker(self.parts)

    @property
    def initial_state(self) -> ServerState:
        """A fresh round-0 server state (a new copy each time: ``step`` donates the state it is given), on the mesh
        as the round returns it (``RoundProgram.place_state``), so that every round reuses one compiled program."""
        return self.place_state(self.fresh_state(self.initial_params))

    def fresh_state(self, params: Any) -> ServerState:
        """A round-0 server state of this run from ``params`` (every client's states at their initial values)."""
        return self.program.init_state(params, self.population.num_clients)

    def place_state(self, state: ServerState) -> ServerState:
        """``state`` with one row per client (as ``fresh_state`` makes it and a checkpoint holds it) on the mesh as
        the round returns it (``RoundProgram.place_state``: client rows padded and split where the data are)."""
        return self.program.place_state(state)

    def released_params(self, state: ServerState) -> Any:
        """The model a round releases: the global model (a decentralized run: every node's, one row per node).
        Evaluation, callbacks (``latest_params``) and ``Results.params`` read it."""
        return state.params

    def saved_state(self, state: ServerState) -> ServerState:
        """``state`` with one row per client, ``place_state`` undone (``program.client_rows``): what a checkpoint
        holds, so that a run resumes on any number of devices."""
        return client_rows(state, self.population.num_clients)

    # -- one round -------------------------------------------------------------------------------------------
    def cohort(self, round_index: int) -> Cohort:
        """The clients sampled for round ``round_index`` (seeded; before privacy budgets)."""
        s = self.config.server
        return sample_cohort(self.config.run.seed, round_index, self.population.num_clients, s.clients_per_round,
                             s.client_sampling, self.cohort_slots)

    def round_cohort(self, round_index: int, tracker: PrivacyTracker | None = None) -> tuple[Cohort, int]:
        """The cohort that trains in round ``round_index``: ``cohort`` without the clients whose privacy budget
        (planned participations) is spent in ``tracker`` (default the run's own, ``privacy``). Returns (cohort,
        number of sampled clients excluded by budgets)."""
        cohort = self.cohort(round_index)
        allowed = (self.privacy if tracker is None else tracker).allowed(cohort.ids)
        skipped = int(np.sum(cohort.mask & ~allowed))
        return cohort._replace(mask=cohort.mask & allowed), skipped

    def annotate(self, record: Record, cohort: Cohort) -> Record:
        """Extra history fields of a round (subclasses add device costs)."""
        del cohort
        return record

    def step(self, state: ServerState, round_index: int, cohort: Cohort | None = None) -> tuple[ServerState, Record]:
        """Runs round ``round_index`` from ``state``; returns the new state and the round's training record.

        ``state`` is donated to the compiled round (its buffers are reused): do not use it afterwards.
        ``cohort`` defaults to ``round_cohort(round_index)``; the privacy tracker records its participants.
        """
        state, record, _ = self.observed_step(state, round_index, cohort)
        return state, record

    def observed_step(self, state: ServerState, round_index: int, cohort: Cohort | None = None,
                      tapped: Sequence[int] = ()) -> tuple[ServerState, Record, Tap | None]:
        """``step``, and what an observer sees of the clients ``tapped`` (ids in the cohort, at most
        ``len(run.tap_clients)`` of them): their messages as the round itself computed and aggregated them (a
        ``Tap``; None without ``tapped``)."""
        skipped = 0
        if cohort is None:
            cohort, skipped = self.round_cohort(round_index)
        start = time.perf_counter()
        state, out, tap = self.program.observe(state, self.device_population, self.device_settings, cohort,
                                               self.root_key, tapped, self.tap_width)
        record = round_record(out, cohort, round_index, float(state.clip_norm), time.perf_counter() - start)
        return state, self.finish_round(record, cohort, skipped), tap

    def finish_round(self, record: Record, cohort: Cohort, skipped: int) -> Record:
        """``record`` of a round that trained ``cohort``, completed: its participations recorded by the privacy
        tracker, the epsilons so far, the clients budgets excluded (``skipped``) and ``annotate``'s fields."""
        if skipped:
            record["budget_skipped"] = skipped
        self.privacy.record_round(cohort.ids[cohort.mask])  # participations and steps are kept in every run
        if self.privacy.active:
            record.update(self.privacy.summary())
        return self.annotate(record, cohort)

    def tap(self, state: ServerState, client_ids: Sequence[int]) -> Tap:
        """What ``client_ids`` would send in the round that starts from ``state``, trained again
        (``RoundProgram.replay_tap``, padded to the run's tap width): for replays and probes."""
        return self.program.replay_tap(state, self.device_population, self.device_settings, client_ids,
                                       self.population.num_clients, self.root_key, len(self.config.run.tap_clients))

    @property
    def headline_metric(self) -> str:
        """The history key of the task's primary test metric: ``test_accuracy`` for classification,
        ``test_label_accuracy`` for multi-label, ``test_loss`` for a bare loss."""
        return f"test_{self.task.primary}"

    def evaluate(self, params: Any, state: ServerState | None = None) -> Record:
        """``evaluate_run`` of the global model ``params`` (and of the personal models in ``state``)."""
        return evaluate_run(self.parts, params, state)

    run = run_experiment  # ``experiment.run(out_dir, ...)``: the run loop (``runner``) over this experiment


def build_experiment(config: ExperimentConfig, **kwargs: Any) -> Experiment:
    """The experiment a config describes: a ``DeviceExperiment`` when ``devices.policy`` is set."""
    if config.topology.decentralized:
        from fedjaxpriv.decentralized import DecentralizedExperiment

        return DecentralizedExperiment(config, **kwargs)
    if config.devices.policy != "none":
        from fedjaxpriv.devices import DeviceExperiment

        return DeviceExperiment.from_config(config, **kwargs)
    return Experiment(config, **kwargs)


def run(config: ExperimentConfig, out_dir: str | None = None, **kwargs: Any) -> Results:
    """Builds and runs an experiment: ``fedjaxpriv.run(config)``."""
    return build_experiment(config, progress=kwargs.get("progress", True)).run(out_dir, **kwargs)
