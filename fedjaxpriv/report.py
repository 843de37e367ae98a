"""Report: plots and a summary table from results-store records (``fedjaxpriv report``).

Files written to the output directory:

* ``accuracy_vs_rounds.png``: test accuracy per evaluated round, one line per run;
* ``epsilon_vs_rounds.png``: example-level (``epsilon_max``), local (``local_epsilon_max``) and client-level
  (``client_level_epsilon``) epsilon per round, for runs that track privacy;
* ``privacy_utility.png``: final accuracy against final epsilon (runs without DP at the right, "no DP");
* ``communication_vs_accuracy.png``: final accuracy against total bytes uploaded (log scale);
* ``attacks.png``: every ``attack/<name>/<metric>`` key found in the records' final metrics, per run;
* ``frontier.png``: the privacy-utility frontier, attack success (with its interval) against accuracy and
  bytes, one curve per defense family (``defense_family``) over its strengths;
* ``summary.md`` / ``summary.csv``: one row per run with the config fields that vary and final metrics; every
  epsilon's basis (level, neighbouring relation, sampling, accountant, delta) is a CSV column and is listed
  under the markdown table.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedjaxpriv.results import as_float, cumulative, flatten, varying_fields, write_csv  # noqa: E402

Record = Mapping[str, Any]
EPSILON_KEYS = ("epsilon_max", "local_epsilon_max", "client_level_epsilon")
BASIS_KEYS = tuple(f"{key.removesuffix('_max')}_basis" for key in EPSILON_KEYS)
SUMMARY_METRICS = ("test_accuracy", "test_loss", "client_accuracy_p10", *EPSILON_KEYS, "round", "cost_wall_time_s",
                   "cost_energy_j", *BASIS_KEYS)


def attack_keys(records: Sequence[Record]) -> list[str]:
    """The ``attack/<name>/<metric>`` keys present in any record's final metrics (sorted)."""
    return sorted({k for r in records for k in r["final"] if k.startswith("attack/")})


# The metric of each attack that plots and markdown tables show (intervals and counts stay in the CSV).
HEADLINE_ATTACK_METRICS = ("auc", "tpr@1%fpr", "psnr_median", "fraction_above_threshold", "advantage",
                           "accuracy_gain_global")


def is_headline(key: str) -> bool:
    """Whether an ``attack/<name>/<metric>`` key is a headline metric; the membership attacks' "advantage"
    (max TPR - FPR, implied by the ROC) is not, the attribute attack's (over its baseline) is."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "attack" or parts[2] not in HEADLINE_ATTACK_METRICS:
        return False
    return not (parts[2] == "advantage" and parts[1] != "attribute")


def headline_attack_keys(records: Sequence[Record]) -> list[str]:
    """``attack_keys`` restricted to the headline metrics."""
    return [k for k in attack_keys(records) if is_headline(k)]


def final_epsilon(record: Record) -> float:
    """The run's final epsilon: the largest of its example-, local- and client-level epsilons (nan without DP); each
    level's basis is in the summary table."""
    values = [as_float(record["final"][k]) for k in EPSILON_KEYS if k in record["final"]]
    values = [v for v in values if not math.isnan(v) and v > 0]
    return max(values) if values else math.nan


def summary_rows(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One row per run: label, config hash, the varying config fields, final metrics and total bytes."""
    fields = varying_fields(records) if len(records) > 1 else []
    metrics = [m for m in SUMMARY_METRICS if any(m in r["final"] for r in records)] + attack_keys(records)
    rows = []
    for record in records:
        flat = flatten(record["config"])
        row: dict[str, Any] = {"label": record.get("label", ""), "config_hash": record["config_hash"]}
        row.update({f: flat.get(f) for f in fields})
        row.update({m: record["final"].get(m) for m in metrics})
        row["bytes_uploaded"] = cumulative(record["history"], "bytes_total")
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return "" if value is None else str(value)


def write_table(rows: Sequence[Mapping[str, Any]], out_dir: str, name: str = "summary") -> tuple[str, str]:
    """Writes ``NAME.csv`` (full precision) and ``NAME.md`` (4 significant digits) in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    csv_path, md_path = os.path.join(out_dir, f"{name}.csv"), os.path.join(out_dir, f"{name}.md")
    write_csv(csv_path, rows)
    # Bases are long sentences (listed under the table); attack intervals and counts stay in the CSV.
    shown = [k for k in columns if not k.endswith("_basis") and (not k.startswith("attack/") or is_headline(k))]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row.get(k)) for k in shown) + " |" for row in rows]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n" + basis_notes(rows))
    return csv_path, md_path


def basis_notes(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown lists of every ``*_basis`` column's distinct values and the rows (by label) that have them."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k.endswith("_basis") and k not in keys)
    lines: list[str] = []
    for key in keys:
        by_value: dict[str, list[str]] = {}
        for index, row in enumerate(rows):
            if row.get(key):
                by_value.setdefault(str(row[key]), []).append(str(row.get("label") or row.get("defense") or index))
        if by_value:
            lines += ["", f"**{key}** ({key.removesuffix('_basis')}):"]
            lines += [f"- {', '.join(labels)}: {value}" for value, labels in by_value.items()]
    return "\n".join(lines) + ("\n" if lines else "")


def _series(record: Record, key: str) -> tuple[list[float], list[float]]:
    points = [(r["round"], as_float(r[key])) for r in record["history"] if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def _save(fig: plt.Figure, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _axes() -> tuple[plt.Figure, plt.Axes]:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    return fig, ax


def _legend(ax: plt.Axes, count: int) -> None:
    if count:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if count <= 24 else 2)


def plot_metric_vs_rounds(records: Sequence[Record], keys: Sequence[str], ylabel: str, path: str) -> str | None:
    """Lines of ``keys`` against round, one per run and key; None (no file) if no record has the keys."""
    fig, ax = _axes()
    lines = 0
    for record in records:
        for key in keys:
            rounds, values = _series(record, key)
            if rounds:
                suffix = f" ({key})" if len(keys) > 1 else ""
                ax.plot(rounds, values, marker="." if len(rounds) < 30 else None, label=record["label"] + suffix)
                lines += 1
    if not lines:
        plt.close(fig)
        return None
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _legend(ax, lines)
    return _save(fig, path)


def plot_privacy_utility(records: Sequence[Record], path: str) -> str:
    """Final test accuracy against final epsilon; runs without DP sit at the right, above "no DP"."""
    fig, ax = _axes()
    points = [(final_epsilon(r), as_float(r["final"].get("test_accuracy")), r["label"]) for r in records]
    finite = [e for e, _, _ in points if not math.isnan(e)]
    no_dp_x = 2.0 * max(finite) if finite else 1.0
    for eps, acc, label in points:
        private = not math.isnan(eps)
        ax.scatter([eps if private else no_dp_x], [acc], marker="o" if private else "s", label=label)
    ax.set_xscale("log")
    if len(finite) < len(points):
        ax.axvline(no_dp_x / 1.4, color="gray", linewidth=0.8, linestyle=":")
        ax.annotate("no DP", (no_dp_x, 0.0), xycoords=("data", "axes fraction"), xytext=(0, 4),
                    textcoords="offset points", ha="center", fontsize=8)
    ax.set_xlabel("epsilon (final, largest of example/local/client level; log scale; bases in summary.md)")
    ax.set_ylabel("final test accuracy")
    ax.grid(alpha=0.3)
    _legend(ax, len(points))
    return _save(fig, path)


def plot_communication(records: Sequence[Record], path: str) -> str:
    """Final test accuracy against total bytes uploaded by clients over the run."""
    fig, ax = _axes()
    for record in records:
        ax.scatter([max(cumulative(record["history"], "bytes_total"), 1.0)],
                   [as_float(record["final"].get("test_accuracy"))], label=record["label"])
    ax.set_xscale("log")
    ax.set_xlabel("bytes uploaded (total over rounds)")
    ax.set_ylabel("final test accuracy")
    ax.grid(alpha=0.3)
    _legend(ax, len(records))
    return _save(fig, path)


def plot_attacks(records: Sequence[Record], path: str) -> str | None:
    """One panel per headline attack metric: its final value per run (runs ordered as given), with its 95%
    interval where the run recorded one."""
    keys = headline_attack_keys(records)
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        having = [r for r in records if key in r["final"]]
        values = np.array([as_float(r["final"][key]) for r in having])
        low = np.array([as_float(r["final"].get(f"{key}_low", v)) for r, v in zip(having, values)])
        high = np.array([as_float(r["final"].get(f"{key}_high", v)) for r, v in zip(having, values)])
        errors = np.nan_to_num(np.stack([values - low, high - values]).clip(min=0))
        ax.bar(range(len(having)), values, yerr=errors, capsize=3)
        ax.set_xticks(range(len(having)), [r["label"] for r in having], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(key.split("/", 1)[1], fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def attack_strength_series(records: Sequence[Record]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Attack success against defense strength: for every numeric config field that varies between the
    records with attack metrics, ``{field: {attack metric: [(field value, final metric), ...]}}`` sorted by
    the field value (e.g. a grid over ``client.dp_noise_multiplier``)."""
    attacked = [r for r in records if any(k.startswith("attack/") for k in r["final"])]
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for field in varying_fields(attacked) if len(attacked) > 1 else []:
        values = [flatten(r["config"]).get(field) for r in attacked]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        series[field] = {key: sorted((float(v), as_float(r["final"][key])) for v, r in zip(values, attacked)
                                     if key in r["final"]) for key in headline_attack_keys(attacked)}
    return series


def plot_attacks_vs_strength(records: Sequence[Record], out_dir: str) -> dict[str, str]:
    """One PNG per numeric varying field: each attack metric against that field's value."""
    written = {}
    for field, by_key in attack_strength_series(records).items():
        fig, axes = plt.subplots(len(by_key), 1, figsize=(6, 2.4 * len(by_key)), squeeze=False)
        for ax, (key, points) in zip(axes[:, 0], by_key.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
            ax.set_ylabel(key.split("/", 1)[1], fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel(field)
        name = f"attacks_vs_{field.replace('.', '_')}"
        written[name] = _save(fig, os.path.join(out_dir, f"{name}.png"))
    return written


# Membership attacks in order of preference for the frontier (the first one every attacked run has).
MEMBERSHIP_ATTACKS = ("rmia", "lira_offline", "lira_online", "loss_threshold")


def defense_family(record: Record) -> str:
    """The curve a run belongs to on the frontier: its label up to the first space or comma ("dpsgd eps=4" and
    "dpsgd,seed=1" are both "dpsgd")."""
    label = str(record.get("label") or "run")
    return label.replace(",", " ").split(" ")[0]


def frontier_metrics(records: Sequence[Record]) -> list[tuple[str, str]]:
    """(key, axis label) of the attack-success metrics the frontier shows: the membership AUC of the strongest
    attack all attacked runs share, the passive attack's AUC, the inversion success rate, the attribute
    inference advantage and the reconstruction's accuracy gain, those present."""
    attacked = [r for r in records if any(k.startswith("attack/") for k in r["final"])]
    chosen = []
    for attack in MEMBERSHIP_ATTACKS:
        if attacked and all(f"attack/{attack}/auc" in r["final"] for r in attacked):
            chosen.append((f"attack/{attack}/auc", f"membership AUC ({attack}, global model)"))
            break
    for key, label in (("attack/passive/auc", "passive membership AUC (server's view)"),
                       ("attack/inversion/fraction_above_threshold",
                        "inversion: fraction of examples above the PSNR threshold"),
                       ("attack/attribute/advantage", "attribute inference: accuracy over its baseline"),
                       ("attack/reconstruction/accuracy_gain_global",
                        "reconstruction: accuracy gain over the released model")):
        if any(key in r["final"] for r in attacked):
            chosen.append((key, label))
    return chosen


def plot_frontier(records: Sequence[Record], path: str) -> str | None:
    """The privacy-utility frontier: attack success (x, with its 95% interval) against final test accuracy (top
    row) and bytes uploaded (bottom row), one curve per defense family through its strengths; None (no file)
    without attack metrics."""
    metrics = frontier_metrics(records)
    if not metrics:
        return None
    families: dict[str, list[Record]] = {}
    for record in records:
        if any(k in record["final"] for k, _ in metrics):
            families.setdefault(defense_family(record), []).append(record)
    fig, axes = plt.subplots(2, len(metrics), figsize=(4.6 * len(metrics) + 2.2, 7.2), squeeze=False)
    colors = plt.cm.tab10.colors
    for column, (key, label) in enumerate(metrics):
        for index, (family, members) in enumerate(families.items()):
            points = [(as_float(r["final"].get(key)), as_float(r["final"].get(f"{key}_low")),
                       as_float(r["final"].get(f"{key}_high")), as_float(r["final"].get("test_accuracy")),
                       max(cumulative(r["history"], "bytes_total"), 1.0)) for r in members if key in r["final"]]
            if not points:
                continue
            x, low, high, accuracy, sent = (np.array(v, np.float64) for v in zip(*points))
            error = np.where(np.isnan(low), 0.0, np.stack([x - low, high - x]))
            style = dict(color=colors[index % len(colors)], marker="*" if family == "none" else "o",
                         markersize=11 if family == "none" else 5, capsize=2, lw=1.2, label=family)
            strengths = [str(r.get("label", ""))[len(family):].strip(" ,") for r in members if key in r["final"]]
            for row, y in enumerate((accuracy, sent)):
                axes[row, column].errorbar(x, y, xerr=np.maximum(error, 0.0), **style)
                for xi, yi, text in zip(x, y, strengths):
                    if text:
                        axes[row, column].annotate(text, (xi, yi), xytext=(3, 3), textcoords="offset points",
                                                   fontsize=6, color=style["color"])
        axes[0, column].set(xlabel=label, ylabel="final test accuracy")
        axes[1, column].set(xlabel=label, ylabel="bytes uploaded (total)", yscale="log")
        for row in range(2):
            axes[row, column].grid(alpha=0.3)
    handles, names = axes[0, 0].get_legend_handles_labels()
    width = 4.6 * len(metrics) + 2.2
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / width, 0.95))
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1 - 1.95 / width, 0.5), fontsize=8,
               title="defense")
    fig.suptitle("Privacy-utility frontier: each defense over its strengths, 95% intervals (lower attack success "
                 "is better)", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(records: Sequence[Record], out_dir: str) -> dict[str, str]:
    """Writes every plot that the records support and the summary table.

    Returns:
      Mapping of artefact name to file path.

    Raises:
      ValueError: if there are no records.
    """
    if not records:
        raise ValueError("no records to report; run a sweep first or pass run directories.")
    os.makedirs(out_dir, exist_ok=True)
    written: dict[str, str | None] = {
        "accuracy_vs_rounds": plot_metric_vs_rounds(records, ["test_accuracy"], "test accuracy",
                                                    os.path.join(out_dir, "accuracy_vs_rounds.png")),
        "epsilon_vs_rounds": plot_metric_vs_rounds(records, list(EPSILON_KEYS), "epsilon",
                                                   os.path.join(out_dir, "epsilon_vs_rounds.png")),
        "privacy_utility": plot_privacy_utility(records, os.path.join(out_dir, "privacy_utility.png")),
        "communication_vs_accuracy": plot_communication(records,
                                                        os.path.join(out_dir, "communication_vs_accuracy.png")),
        "attacks": plot_attacks(records, os.path.join(out_dir, "attacks.png")),
        "frontier": plot_frontier(records, os.path.join(out_dir, "frontier.png")),
    }
    written.update(plot_attacks_vs_strength(records, out_dir))
    written["summary_csv"], written["summary_md"] = write_table(summary_rows(records), out_dir)
    return {k: v for k, v in written.items() if v is not None}
