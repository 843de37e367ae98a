"""Defense-vs-attack evaluation.

``evaluate_defenses`` trains one experiment per defense (dotted config overrides on a base config) and
attacks each one:

* membership inference on the final global model: loss threshold (Yeom et al.) and optionally LiRA with
  shadows trained in one vectorized call (members: a sample of the population's training examples;
  non-members: as many test examples);
* passive update-based membership inference (Zari et al.) on the taps of ``suite.tap_clients`` over the
  tapped rounds (members: the client's examples; non-members: test examples);
* gradient inversion (DLG with iDLG labels) on a probe: the same defense on a FedSGD round of batch-1
  clients, messages tapped before the server, PSNR of the reconstructions.

Each defense gives one record with ``test_accuracy``, ``epsilon``, ``bytes_uploaded`` and
``attack/<name>/<metric>`` keys; ``write_tables`` writes them as CSV + markdown, a privacy-utility plot,
and a ``results.jsonl`` store that ``fedjaxpriv report`` reads.

Canary audits beside the accountant live in ``fedjaxpriv.attacks.canary_audit``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv.attacks import audit, inversion, membership, metrics, shadow
from fedjaxpriv.config import ExperimentConfig, with_overrides
from fedjaxpriv.data.federated import Dataset, FederatedData, from_client_lists
from fedjaxpriv.results import cumulative

Record = dict[str, Any]

DEFENSES: dict[str, dict[str, Any]] = {
    "none": {},
    "pruning": {"client.prune_sparsity": 0.8},
    "quantization": {"message.quant_bits": 2},
    "topk": {"message.topk_fraction": 0.05},
    "mixup": {"client.mixup_alpha": 1.0},
    "poisson": {"client.sampling": "poisson"},
    "dpsgd": {"client.dp_clip_norm": 1.0, "client.target_epsilon": 8.0},
    "dpfedavg": {"server.central_clip_norm": 1.0, "server.central_noise_multiplier": 1.0},
    "pruning+quantization": {"client.prune_sparsity": 0.8, "message.quant_bits": 2},
    "dpsgd+topk": {"client.dp_clip_norm": 1.0, "client.target_epsilon": 8.0, "message.topk_fraction": 0.05},
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttackSuite:
    """Which attacks run on each defense, and their budgets.

    Attributes:
      tap_clients: clients whose messages the passive attack observes (every round from ``tap_from_round``).
      tap_from_round: first observed round (1-based).
      max_candidates: members (and as many non-members) scored by the model-level attacks.
      lira_shadows: LiRA shadow models (0 = skip LiRA).
      lira_steps: shadow SGD steps (0 = rounds x local_steps of the config).
      inversion_targets: batch-1 clients of the inversion probe (0 = skip inversion).
      inversion_iterations: L-BFGS iterations of DLG.
      seed: seed of the attacks' own randomness.
    """

    tap_clients: tuple[int, ...] = (0, 1)
    tap_from_round: int = 2
    max_candidates: int = 300
    lira_shadows: int = 0
    lira_steps: int = 0
    inversion_targets: int = 4
    inversion_iterations: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lira_shadows not in (0,) and self.lira_shadows < 2:
            raise ValueError(f"lira_shadows={self.lira_shadows}; allowed: 0 (off) or >= 2.")
        for name in ("max_candidates", "tap_from_round"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        for name in ("lira_steps", "inversion_targets", "inversion_iterations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")


def final_epsilon(history: Sequence[Mapping[str, Any]]) -> tuple[float, str]:
    """The largest final epsilon of a history over the levels it tracks (example, local, client) and that
    epsilon's basis; (inf, "") without any DP."""
    from fedjaxpriv.report import BASIS_KEYS, EPSILON_KEYS

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


def model_attacks(experiment: Any, params: Any, suite: AttackSuite) -> Record:
    """Loss-threshold (and LiRA) membership inference on a trained global model."""
    from fedjaxpriv.attacks.membership import attack_metrics

    rng = np.random.default_rng(suite.seed)
    p = experiment.population
    candidates, labels = _balanced_candidates(Dataset(p.x, p.y), experiment.test, suite.max_candidates, rng)
    apply = experiment.model.apply
    out = _prefixed("loss_threshold", attack_metrics(
        membership.loss_threshold_scores(apply, params, candidates.x, candidates.y), labels))
    if suite.lira_shadows:
        c = experiment.config.client
        steps = suite.lira_steps or experiment.config.run.rounds * int(np.max(experiment.settings.num_steps))
        shadows = shadow.train_shadows(experiment.model, candidates, suite.lira_shadows,
                                       jax.random.key(suite.seed), steps=max(1, steps),
                                       batch_size=int(np.max(experiment.settings.batch_size)),
                                       lr=float(np.max(experiment.settings.lr)), momentum=c.momentum)
        stacked = jax.tree_util.tree_map(lambda a: a[None], params)
        target = membership.stacked_logit_confidence(apply, stacked, candidates.x, candidates.y)[0]
        shadow_conf = membership.stacked_logit_confidence(apply, shadows.params, candidates.x, candidates.y)
        scores = membership.lira_scores(target, shadow_conf, shadows.inclusion, online=True,
                                        global_variance=suite.lira_shadows < 64)
        out.update(_prefixed("lira", attack_metrics(np.asarray(scores), labels)))
    return out


def passive_attack(experiment: Any, taps: Mapping[int, Any], suite: AttackSuite) -> Record:
    """Zari et al. passive attack on each tapped client; scores of all targets pooled into one ROC."""
    observed = [taps[r] for r in sorted(taps)]
    if not observed:
        return {}
    rng = np.random.default_rng(suite.seed + 1)
    all_scores, all_labels = [], []
    clients = sorted({int(c) for tap in observed for c in tap.client_ids})
    for client in clients:
        server, messages = membership.stack_taps(observed, client)
        candidates, labels = _balanced_candidates(experiment.population.client(int(client)), experiment.test,
                                                  suite.max_candidates, rng)
        if labels.size == 0:
            continue
        all_scores.append(np.asarray(membership.passive_scores(experiment.model.apply, server, messages,
                                                               candidates.x, candidates.y)))
        all_labels.append(labels)
    if not all_scores:
        return {}
    return _prefixed("passive", membership.attack_metrics(np.concatenate(all_scores), np.concatenate(all_labels)))


def inversion_probe(config: ExperimentConfig, source: FederatedData, num_classes: int, suite: AttackSuite) -> Record:
    """DLG (iDLG labels) on the FedSGD messages of ``suite.inversion_targets`` batch-1 clients under the
    config's defenses (local training, message transforms); PSNR of the reconstructions (dB)."""
    from fedjaxpriv.experiment import Experiment

    k = min(suite.inversion_targets, source.num_examples)
    xs, ys = source.x[:k], source.y[:k]
    population = from_client_lists([x[None] for x in xs], [y[None] for y in ys])
    probe = with_overrides(config, [f"data.num_clients={k}", "server.algorithm=fedsgd",
                                    f"server.clients_per_round={k}", "server.client_sampling=uniform",
                                    "run.rounds=1", f"run.tap_clients={list(range(k))}", "run.tap_rounds=[1]",
                                    "client.target_epsilon=null", "client.sampling=fixed"])
    experiment = Experiment(probe, population=population, test=Dataset(xs, ys), num_classes=num_classes)
    tap = experiment.tap(experiment.initial_state, list(range(k)))
    gradients = jax.tree_util.tree_map(lambda m: -jnp.asarray(m), tap.messages)   # FedSGD: delta = -1 x grad
    spec = inversion.TargetSpec(input_shape=population.input_shape, num_classes=num_classes, batch_size=1)
    attack = inversion.InversionConfig(method="dlg", num_iterations=suite.inversion_iterations, labels="idlg")
    keys = jax.random.split(jax.random.key(suite.seed + 2), k)
    result = inversion.invert_batch(attack, spec, experiment.model.apply, tap.server_params, gradients, keys)
    psnr = np.asarray(jax.vmap(metrics.psnr)(result.x[:, 0], jnp.asarray(xs)))
    psnr = np.minimum(psnr, 100.0)
    label_acc = float(np.mean(np.asarray(result.y[:, 0]) == ys))
    return _prefixed("inversion", {"psnr": float(np.mean(psnr)), "psnr_max": float(np.max(psnr)),
                                   "label_accuracy": label_acc})


def evaluate_defense(base: ExperimentConfig, name: str, overrides: Mapping[str, Any],
                     suite: AttackSuite = AttackSuite()) -> tuple[Record, ExperimentConfig, list[Record]]:
    """Trains ``base`` with one defense's overrides and runs the attack suite.

    Returns:
      (summary record, the config used, the run's history with the attack metrics in its last record).
    """
    from fedjaxpriv.experiment import build_experiment

    texts = [f"{k}={_yaml(v)}" for k, v in overrides.items()]
    rounds = base.run.rounds
    taps = [f"run.tap_clients={list(suite.tap_clients)}",
            f"run.tap_rounds={list(range(min(suite.tap_from_round, rounds), rounds + 1))}"]
    config = with_overrides(base, [*texts, *taps, f"name={name}"])
    experiment = build_experiment(config)
    results = experiment.run(progress=False)
    epsilon, basis = final_epsilon(results.history)
    record: Record = {"defense": name, "test_accuracy": results.final("test_accuracy"), "epsilon": epsilon,
                      "epsilon_basis": basis,
                      "bytes_uploaded": cumulative(results.history, "bytes_total")}
    if "cost_wall_time_s" in results.history[-1]:  # devices: simulated wall time and energy over the run
        record.update(wall_time_s=cumulative(results.history, "cost_wall_time_s"),
                      energy_j=cumulative(results.history, "cost_energy_j"))
    record.update(model_attacks(experiment, results.params, suite))
    record.update(passive_attack(experiment, results.taps, suite))
    if suite.inversion_targets:
        record.update(inversion_probe(config, experiment.population, experiment.num_classes, suite))
    history = [dict(r) for r in results.history]
    history[-1].update({k: v for k, v in record.items() if k.startswith("attack/")})
    return record, config, history


def _yaml(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, float) and math.isinf(value):
        return ".inf"
    return "null" if value is None else str(value)


def evaluate_defenses(base: ExperimentConfig, defenses: Mapping[str, Mapping[str, Any]] | None = None,
                      suite: AttackSuite = AttackSuite(), out_dir: str | None = None) -> list[Record]:
    """Every defense in turn (``DEFENSES`` by default): train, attack, tabulate.

    Args:
      base: the experiment every defense modifies.
      defenses: name -> dotted overrides (``{"client.dp_noise_multiplier": 1.0}``).
      suite: the attacks.
      out_dir: if given, ``write_tables`` writes attack_eval.csv/.md, privacy_attack.png and results.jsonl.

    Returns:
      one record per defense.
    """
    from fedjaxpriv.results import ResultsStore, make_record

    defenses = DEFENSES if defenses is None else defenses
    records, store_records = [], []
    for name, overrides in defenses.items():
        record, config, history = evaluate_defense(base, name, overrides, suite)
        records.append(record)
        store_records.append(make_record(config, history, label=name, overrides=dict(overrides)))
    if out_dir is not None:
        write_tables(records, out_dir)
        store = ResultsStore(out_dir)
        for record in store_records:
            store.append(record)
    return records


def write_tables(records: Sequence[Record], out_dir: str) -> dict[str, str]:
    """``attack_eval.csv`` (full precision), ``attack_eval.md`` and ``privacy_attack.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedjaxpriv.report import write_table

    csv_path, md_path = write_table(records, out_dir, name="attack_eval")
    plot_path = os.path.join(out_dir, "privacy_attack.png")
    attack_keys = [k for k in ("attack/loss_threshold/auc", "attack/lira/tpr@1%fpr", "attack/passive/auc",
                               "attack/inversion/psnr") if any(k in r for r in records)]
    fig, axes = plt.subplots(1, max(1, len(attack_keys)), figsize=(4 * max(1, len(attack_keys)), 3.6), squeeze=False)
    for ax, key in zip(axes[0], attack_keys):
        for record in records:
            if key in record:
                ax.scatter(record[key], record["test_accuracy"])
                ax.annotate(record["defense"], (record[key], record["test_accuracy"]), fontsize=7)
        ax.set(xlabel=key.removeprefix("attack/"), ylabel="test accuracy")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot_path, dpi=110)
    plt.close(fig)
    return {"csv": csv_path, "markdown": md_path, "plot": plot_path}
