"""Report: plots and a summary table from results-store records (``fedjaxpriv report``).

Files written to the output directory (one panel per dataset; every series has its own colour and marker):

* ``accuracy_vs_rounds.png``: test accuracy per evaluated round, one line per run;
* ``epsilon_vs_rounds.png``: example-level (``epsilon_max``), local (``local_epsilon_max``) and client-level
  (``client_level_epsilon``) epsilon per round, for runs that track privacy, one panel per level (levels are
  never mixed on one axis), each panel naming the basis its runs share;
* ``privacy_utility.png``: final accuracy against final epsilon, one panel per level and dataset (runs without a
  guarantee at that level in a "no guarantee" strip beside the epsilon axis);
* ``communication_vs_accuracy.png``: final accuracy against total bytes uploaded (log scale);
* ``attacks.png``: every ``attack/<name>/<metric>`` key found in the records' final metrics, per run;
* ``attacks_vs_<field>.png``: each headline attack metric against a varying config field (numeric fields on a
  numeric axis, categorical ones and seeds on a categorical axis);
* ``frontier.png``: the privacy-utility frontier, attack success (with its interval) against accuracy and
  bytes, one curve per defense family (``defense_family``) over its strengths, each point labelled with its
  strength;
* ``roc_<attack>.png`` / ``inversion_<label>.png``: for the defense points of a ``fedjaxpriv attack-eval`` store,
  log-log ROC curves of each membership attack and reconstruction grids, from the store's ``figures/``;
* ``summary.md`` / ``summary.csv``: one row per run with the config fields that vary and final metrics; every
  epsilon's basis (level, neighbouring relation, sampling, accountant, delta) is a CSV column and is listed
  under the markdown table.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.collections  # noqa: E402
import matplotlib.patches  # noqa: E402
import matplotlib.patheffects  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.text  # noqa: E402

from fedjaxpriv.privacy.basis import BASIS_KEYS, BASIS_OF_EPSILON, EPSILON_KEYS, LEVEL_OF_EPSILON  # noqa: E402
from fedjaxpriv.results import as_float, cumulative, flatten, varying_fields, write_csv  # noqa: E402

Record = Mapping[str, Any]
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


def final_epsilon(record: Record, key: str) -> float:
    """The run's final epsilon at one level (``key`` in ``EPSILON_KEYS``); nan where the run has no guarantee
    there (no DP, or inf: some participant trained without noise)."""
    value = as_float(record["final"].get(key, math.nan))
    return value if 0 < value < math.inf else math.nan


def epsilon_levels(records: Sequence[Record]) -> list[str]:
    """The ``EPSILON_KEYS`` at which some record has a final epsilon, in that order."""
    return [key for key in EPSILON_KEYS if any(not math.isnan(final_epsilon(r, key)) for r in records)]


def _basis_note(records: Sequence[Record], key: str) -> str:
    """The basis the runs with an epsilon at ``key``'s level share, wrapped to a few lines (its level dropped,
    since the axis names it), or where their different bases are listed."""
    bases = sorted({str(r["final"].get(BASIS_OF_EPSILON[key]) or "") for r in records
                    if not math.isnan(final_epsilon(r, key))} - {""})
    if len(bases) == 1:
        return "\n".join(textwrap.wrap(bases[0].split("; ", 1)[-1], 90))
    return f"(runs differ in basis: see the {BASIS_OF_EPSILON[key]} lists in summary.md)"


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


# Series styles: a colour and a marker per series; (colour, marker) pairs repeat only after 90 series.
PALETTE = plt.cm.tab10.colors
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")


def series_style(index: int) -> dict[str, Any]:
    """Colour and marker of the ``index``-th series of a panel (tab10 colours, a 9-marker cycle)."""
    return {"color": PALETTE[index % len(PALETTE)], "marker": MARKERS[index % len(MARKERS)]}


def dataset_of(record: Record) -> str:
    """The record's ``data.dataset`` ("" when its config names none)."""
    data = record.get("config", {}).get("data", {})
    return str(data.get("dataset") or "") if isinstance(data, Mapping) else ""


def by_dataset(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Records grouped by ``dataset_of``, datasets in order of first appearance."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(dataset_of(record), []).append(record)
    return groups


def _save(fig: plt.Figure, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _panels(names: Sequence[str], width: float = 9.0, height: float = 4.5, columns: int = 1
            ) -> tuple[plt.Figure, list[plt.Axes]]:
    """One row of panels per dataset, stacked, ``columns`` panels per row (row-major list); each titled with its
    dataset when there are several."""
    fig, axes = plt.subplots(len(names), columns, figsize=(width * columns, height * len(names)), squeeze=False)
    if len(names) > 1:
        for row, name in zip(axes, names):
            for ax in row:
                ax.set_title(f"dataset: {name or '(unnamed)'}", fontsize=9)
    return fig, list(axes.ravel())


def _legend(ax: plt.Axes, count: int, handles: Sequence[Any] | None = None, left: float = 1.01) -> None:
    """A legend of ``count`` entries (``handles``, or the axes' own) outside the axes, ``left`` of their width
    from their left edge."""
    if count:
        ax.legend(**({} if handles is None else {"handles": list(handles)}), fontsize=7, loc="upper left",
                  bbox_to_anchor=(left, 1.0), ncol=1 if count <= 24 else 2)


def plot_metric_vs_rounds(records: Sequence[Record], keys: Sequence[str], ylabel: str, path: str) -> str | None:
    """Lines of ``keys`` against round, one per run and key, one panel per dataset; None (no file) if no record
    has the keys."""
    panels: dict[str, list[tuple[list[float], list[float], str]]] = {}
    for dataset, group in by_dataset(records).items():
        for record in group:
            for key in keys:
                rounds, values = _series(record, key)
                if rounds:
                    suffix = f" ({key})" if len(keys) > 1 else ""
                    panels.setdefault(dataset, []).append((rounds, values, record["label"] + suffix))
    if not panels:
        return None
    fig, axes = _panels(list(panels))
    for ax, lines in zip(axes, panels.values()):
        for index, (rounds, values, label) in enumerate(lines):
            ax.plot(rounds, values, markevery=max(1, len(rounds) // 12), markersize=4, label=label,
                    **series_style(index))
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        _legend(ax, len(lines))
    return _save(fig, path)


def plot_epsilon_vs_rounds(records: Sequence[Record], path: str) -> str | None:
    """Epsilon against round, one line per run, one panel per level (columns) and dataset (rows); each panel's
    y axis names its level and the basis its runs share; a run keeps its colour and marker across a row, whose
    legend is at its right; rounds with an infinite epsilon (no guarantee) are left out. None (no file) if no run
    tracks privacy."""
    keys = [key for key in EPSILON_KEYS if any(_series(r, key)[0] for r in records)]
    if not keys:
        return None
    groups = by_dataset(records)
    fig, axes = _panels(list(groups), width=6.0, columns=len(keys))
    for group, ax_row in zip(groups.values(), _rows(axes, len(keys))):
        handles: dict[str, Any] = {}
        for ax, key in zip(ax_row, keys):
            for index, record in enumerate(group):
                rounds, values = _series(record, key)
                finite = [(r, v) for r, v in zip(rounds, values) if math.isfinite(v)]  # inf: no guarantee to draw
                rounds, values = [r for r, _ in finite], [v for _, v in finite]
                if rounds:
                    (handles[record["label"]],) = ax.plot(rounds, values, markevery=max(1, len(rounds) // 12),
                                                          markersize=4, label=record["label"], **series_style(index))
            ax.set_xlabel(f"round\n{_basis_note(group, key)}", fontsize=7)
            ax.set_ylabel(f"{LEVEL_OF_EPSILON[key]}-level epsilon")
            ax.grid(alpha=0.3)
        _legend(ax_row[-1], len(handles), handles.values())
    return _save(fig, path)


def plot_privacy_utility(records: Sequence[Record], path: str) -> str:
    """Final test accuracy against final epsilon, one panel per privacy level (columns) and dataset (rows). Runs
    without a guarantee at a panel's level (no DP, or an infinite epsilon; hollow markers) sit apart, in a narrow
    "no guarantee" strip at the panel's right, not on the epsilon axis. Each x axis names its level and the basis
    its runs share; the legend is at the right of each row."""
    groups = by_dataset(records)
    keys = epsilon_levels(records) or [EPSILON_KEYS[0]]
    fig, axes = _panels(list(groups), width=6.5 if len(keys) > 1 else 9.0, columns=len(keys))
    for group, ax_row in zip(groups.values(), _rows(axes, len(keys))):
        strips = False
        for ax, key in zip(ax_row, keys):
            points = [(final_epsilon(r, key), as_float(r["final"].get("test_accuracy")), r["label"]) for r in group]
            for index, (eps, acc, label) in enumerate(points):
                if not math.isnan(eps):
                    style = series_style(index)
                    ax.scatter([eps], [acc], marker=style["marker"], label=label, color=style["color"])
            ax.set_xscale("log")
            ax.set_xlabel(f"{LEVEL_OF_EPSILON[key]}-level epsilon (final, log scale)\n{_basis_note(group, key)}",
                          fontsize=7)
            ax.set_ylabel("final test accuracy")
            ax.grid(alpha=0.3)
            without = [(index, acc, label) for index, (eps, acc, label) in enumerate(points) if math.isnan(eps)]
            if without:
                strips = True
                strip = ax.inset_axes((1.02, 0.0, 0.07, 1.0), sharey=ax)
                for index, acc, label in without:
                    style = series_style(index)
                    strip.scatter([0.0], [acc], marker=style["marker"], label=label, facecolors="none",
                                  edgecolors=style["color"])
                strip.set_xlim(-1.0, 1.0)
                strip.set_xticks([0.0], ["no\nguarantee"], fontsize=7)
                strip.tick_params(axis="y", labelleft=False)
                strip.grid(alpha=0.3, axis="y")
        handles = {}  # a run's filled marker where it has an epsilon somewhere, else its hollow one
        for axis in [*ax_row, *(child for ax in ax_row for child in ax.child_axes)]:
            for handle, label in zip(*axis.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        ordered = [handles[r["label"]] for r in group if r["label"] in handles]
        _legend(ax_row[-1], len(ordered), ordered, left=1.12 if strips else 1.01)  # right of the "no guarantee" strip
    return _save(fig, path)


def _rows(axes: Sequence[plt.Axes], columns: int) -> list[list[plt.Axes]]:
    """A row-major panel list cut into rows of ``columns``."""
    return [list(axes[i:i + columns]) for i in range(0, len(axes), columns)]


def plot_communication(records: Sequence[Record], path: str) -> str:
    """Final test accuracy against total bytes uploaded by clients over the run, one panel per dataset."""
    groups = by_dataset(records)
    fig, axes = _panels(list(groups))
    for ax, group in zip(axes, groups.values()):
        for index, record in enumerate(group):
            ax.scatter([max(cumulative(record["history"], "bytes_total"), 1.0)],
                       [as_float(record["final"].get("test_accuracy"))], label=record["label"], **series_style(index))
        ax.set_xscale("log")
        ax.set_xlabel("bytes uploaded (total over rounds)")
        ax.set_ylabel("final test accuracy")
        ax.grid(alpha=0.3)
        _legend(ax, len(group))
    return _save(fig, path)


def plot_attacks(records: Sequence[Record], path: str) -> str | None:
    """One panel per headline attack metric: its final value per run (runs ordered as given), with its 95%
    interval where the run recorded one; bars are coloured by dataset when there are several. The figure widens
    with the number of runs so that the run labels do not overlap."""
    keys = headline_attack_keys(records)
    if not keys:
        return None
    datasets = list(by_dataset(records))
    count = max(sum(key in r["final"] for r in records) for key in keys)
    width = min(max(7.0, 0.25 * count + 2.0), 40.0)
    fig, axes = plt.subplots(len(keys), 1, figsize=(width, 2.8 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        having = [r for r in records if key in r["final"]]
        values = np.array([as_float(r["final"][key]) for r in having])
        low = np.array([as_float(r["final"].get(f"{key}_low", v)) for r, v in zip(having, values)])
        high = np.array([as_float(r["final"].get(f"{key}_high", v)) for r, v in zip(having, values)])
        errors = np.nan_to_num(np.stack([values - low, high - values]).clip(min=0))
        colors = [PALETTE[datasets.index(dataset_of(r)) % len(PALETTE)] for r in having]
        ax.bar(range(len(having)), values, yerr=errors, capsize=3, color=colors)
        ax.set_xticks(range(len(having)), [r["label"] for r in having], rotation=45, ha="right",
                      rotation_mode="anchor", fontsize=7)
        ax.set_xlim(-0.6, len(having) - 0.4)
        ax.set_ylabel(key.split("/", 1)[1], fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        if len(datasets) > 1:
            ax.legend(handles=[matplotlib.patches.Patch(color=PALETTE[i % len(PALETTE)], label=name or "(unnamed)")
                               for i, name in enumerate(datasets)], fontsize=7, title="dataset",
                      title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


# Numeric config fields that name things rather than measure them: plotted on categorical axes.
CATEGORICAL_NUMBER_FIELDS = ("run.seed",)


IDENTIFIER_FIELDS = ("run.seed", "name", "data.dataset")


def _default_config() -> dict[str, Any]:
    """Every config field's default, flattened (a defense knob at its default is off)."""
    from fedjaxpriv.config import ExperimentConfig
    from fedjaxpriv.results import jsonable

    return flatten(jsonable(ExperimentConfig().to_dict()))


def _at_default(value: Any, default: Any) -> bool:
    return json.dumps(value, sort_keys=True, default=str) == json.dumps(default, sort_keys=True, default=str)


def undefended(records: Sequence[Record]) -> list[Record]:
    """The reference runs: those whose varying config fields (identifiers aside) are all at their defaults."""
    defaults = _default_config()
    fields = [f for f in varying_fields(records) if f not in IDENTIFIER_FIELDS] if len(records) > 1 else []
    return [r for r in records
            if all(_at_default(flatten(r["config"]).get(f), defaults.get(f)) for f in fields)]


def attack_strength_series(records: Sequence[Record]) -> dict[str, dict[str, dict[str, list[tuple[float, float]]]]]:
    """Attack success against defense strength, one series per defense: for every numeric config field that
    varies between the records with attack metrics, ``{field: {series: {attack metric: [(field value, final
    metric), ...]}}}`` sorted by the field value (e.g. a grid over ``client.dp_noise_multiplier``). A series holds
    the runs that differ only in that field (and identifiers such as ``run.seed``), so combinations with other
    defenses are series of their own; it is named by its runs' common defense family (``defense_family``), else
    by its other non-default fields, else by the field. A run with the field at its default (the knob off) is
    not a point: the undefended run is the reference (``undefended``). Identifiers are in
    ``attack_category_series`` instead."""
    attacked = [r for r in records if any(k.startswith("attack/") for k in r["final"])]
    defaults = _default_config()
    keys = headline_attack_keys(attacked)
    varying = varying_fields(attacked) if len(attacked) > 1 else []
    flats = [flatten(r["config"]) for r in attacked]
    series: dict[str, dict[str, dict[str, list[tuple[float, float]]]]] = {}
    for field in varying:
        values = [flat.get(field) for flat in flats]
        if field in CATEGORICAL_NUMBER_FIELDS or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        others = [f for f in varying if f != field and f not in IDENTIFIER_FIELDS]
        groups: dict[tuple, list[int]] = {}
        for index, (value, flat) in enumerate(zip(values, flats)):
            if not _at_default(value, defaults.get(field)):
                key = tuple(json.dumps(flat.get(f), sort_keys=True, default=str) for f in others)
                groups.setdefault(key, []).append(index)
        by_series: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for members in groups.values():
            families = {defense_family(attacked[i]) for i in members}
            settings = [f"{f}={flats[members[0]].get(f)}" for f in others
                        if not _at_default(flats[members[0]].get(f), defaults.get(f))]
            name = families.pop() if len(families) == 1 else (", ".join(settings) or field)
            by_series[name] = {key: sorted((float(values[i]), as_float(attacked[i]["final"][key])) for i in members
                                           if key in attacked[i]["final"]) for key in keys}
        if by_series:
            series[field] = by_series
    return series


def reference_levels(records: Sequence[Record]) -> dict[str, float]:
    """The undefended runs' mean final value of every headline attack metric (``undefended``)."""
    attacked = [r for r in records if any(k.startswith("attack/") for k in r["final"])]
    reference = undefended(attacked)
    out = {}
    for key in headline_attack_keys(attacked):
        values = [as_float(r["final"][key]) for r in reference if key in r["final"]]
        values = [v for v in values if not math.isnan(v)]
        if values:
            out[key] = float(np.mean(values))
    return out


def attack_category_series(records: Sequence[Record]) -> dict[str, dict[str, list[tuple[str, float]]]]:
    """Attack success against a categorical config field: for every varying field whose values are all strings or
    booleans (and the fields in ``CATEGORICAL_NUMBER_FIELDS``), ``{field: {attack metric: [(value as text, final
    metric), ...]}}`` in record order; ``name`` (free text, already in every label) is left out."""
    attacked = [r for r in records if any(k.startswith("attack/") for k in r["final"])]
    series: dict[str, dict[str, list[tuple[str, float]]]] = {}
    for field in varying_fields(attacked) if len(attacked) > 1 else []:
        values = [flatten(r["config"]).get(field) for r in attacked]
        if field == "name" or not (field in CATEGORICAL_NUMBER_FIELDS or all(isinstance(v, (str, bool))
                                                                               for v in values)):
            continue
        series[field] = {key: [(str(v), as_float(r["final"][key])) for v, r in zip(values, attacked)
                               if key in r["final"]] for key in headline_attack_keys(attacked)}
    return series


def _has_numbers(points: Sequence[tuple[Any, float]]) -> bool:
    """Whether some point's value is a number (not NaN)."""
    return any(not math.isnan(as_float(y)) for _, y in points)


def _strength_figure(field: str, per_dataset: Mapping[str, Mapping[str, Sequence[tuple[Any, float]]]],
                     categorical: bool, references: Mapping[str, Mapping[str, float]] | None = None,
                     title: str = "dataset") -> plt.Figure:
    """Panels (one per attack metric, shared x) of attack success against ``field``, one series per entry of
    ``per_dataset`` (datasets, or defense families: ``title`` names them), and each reference level
    (``references``: {name: {metric: value}}) as a dashed horizontal line. Categorical values sit at evenly
    spaced ticks, unjoined; numeric values repeated (seeds, other varying knobs) are shown as points joined
    through their mean; a positive field spanning 100x or more is on a log axis."""
    # Metrics with no number anywhere (e.g. a TPR the sample cannot resolve) get no panel.
    keys = list(dict.fromkeys(k for by_key in per_dataset.values() for k, points in by_key.items()
                              if _has_numbers(points)))
    xs_all = [x for by_key in per_dataset.values() for points in by_key.values() for x, _ in points]
    categories = list(dict.fromkeys(xs_all)) if categorical else []
    references = references or {}
    several = len(per_dataset) > 1 or bool(references)
    fig, axes = plt.subplots(len(keys), 1, figsize=(6.0 + 1.6 * several, 2.4 * len(keys)), squeeze=False,
                             sharex=True)
    for ax, key in zip(axes[:, 0], keys):
        for line, (name, levels) in enumerate(references.items()):
            if key in levels:
                ax.axhline(levels[key], color="gray", linewidth=1.0, linestyle=("--", ":", "-.")[line % 3], label=name)
        for index, (dataset, by_key) in enumerate(per_dataset.items()):
            points = list(by_key.get(key, ()))
            if not points:
                continue
            style = dict(series_style(index), label=(dataset or "(unnamed)") if several else None)
            ys = np.array([p[1] for p in points], np.float64)
            if categorical:
                shift = 0.12 * (index - (len(per_dataset) - 1) / 2) if several else 0.0
                ax.plot([categories.index(p[0]) + shift for p in points], ys, linestyle="none", **style)
                continue
            xs = np.array([p[0] for p in points], np.float64)
            unique = np.unique(xs)
            if len(unique) < len(xs):
                ax.plot(xs, ys, linestyle="none", alpha=0.5, color=style["color"], marker=style["marker"],
                        markersize=4)
                means = [float(np.mean(ys[(xs == u) & np.isfinite(ys)])) if np.isfinite(ys[xs == u]).any()
                         else math.nan for u in unique]
                ax.plot(unique, means, **style)
            else:
                ax.plot(xs, ys, **style)
        ax.set_ylabel(key.split("/", 1)[1], fontsize=8)
        ax.grid(alpha=0.3)
        if several:
            ax.legend(fontsize=7, title=title, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    bottom = axes[-1, 0]
    if categorical:
        rotate = len(categories) > 4 or max((len(c) for c in categories), default=0) > 10
        bottom.set_xticks(range(len(categories)), categories, rotation=30 if rotate else 0,
                          ha="right" if rotate else "center", rotation_mode="anchor", fontsize=8)
        bottom.set_xlim(-0.5, len(categories) - 0.5)
    elif xs_all and min(xs_all) > 0 and max(xs_all) >= 100 * min(xs_all):
        bottom.set_xscale("log")
    bottom.set_xlabel(field)
    return fig


def plot_attacks_vs_strength(records: Sequence[Record], out_dir: str) -> dict[str, str]:
    """One PNG per varying config field: each attack metric against that field's value. Numeric fields: one
    series per defense family that turns the knob on (per dataset when there are several), the undefended run
    as a dashed reference line and never as a point at "off"; categorical fields on a categorical axis, one
    series per dataset."""
    numeric: dict[str, dict[str, Any]] = {}
    references: dict[str, dict[str, float]] = {}
    categorical: dict[str, dict[str, Any]] = {}
    groups = by_dataset(records)
    for dataset, group in groups.items():
        prefix = f"{dataset or '(unnamed)'}: " if len(groups) > 1 else ""
        for field, by_family in attack_strength_series(group).items():
            for family, by_key in by_family.items():
                numeric.setdefault(field, {})[prefix + family] = by_key
        levels = reference_levels(group)
        if levels:
            references[f"{prefix}undefended"] = levels
        for field, by_key in attack_category_series(group).items():
            categorical.setdefault(field, {})[dataset] = by_key
    written = {}
    for fields, is_categorical in ((numeric, False), (categorical, True)):
        for field, per_series in fields.items():
            if not any(_has_numbers(points) for by_key in per_series.values() for points in by_key.values()):
                continue
            name = f"attacks_vs_{field.replace('.', '_')}"
            figure = (_strength_figure(field, per_series, True) if is_categorical else
                      _strength_figure(field, per_series, False, references, title="defense"))
            written[name] = _save(figure, os.path.join(out_dir, f"{name}.png"))
    return written


# -- labels that do not overlap ------------------------------------------------------------------------------
LABEL_GAPS_PT = (2.0, 5.0, 9.0, 14.0, 20.0, 28.0, 38.0, 50.0, 65.0)  # label-to-marker gaps tried, in points
LABEL_ANGLES_DEG = (45.0, 135.0, -45.0, -135.0, 0.0, 180.0, 90.0, -90.0,
                    22.5, 157.5, -22.5, -157.5, 67.5, 112.5, -67.5, -112.5)  # directions tried, in this order
LEADER_FROM_PT = 9.0  # labels at least this far from their marker get a leader line
LABEL_PAD_PX = 1.5  # clearance kept around placed labels, in pixels
CROSSING_COST_PT = 10.0  # a candidate crossing a line costs as much as moving this much farther
LEADER_CROSSING_COST_PT = 30.0  # a leader crossing a label, marker or leader costs this much
AMBIGUITY_COST_PT = 15.0  # a label nearer another point than its own costs this much (and gets a leader)
LABEL_CROWDING_PT = 40.0  # points with more neighbours this close are labelled first


def _marker_boxes(ax: plt.Axes) -> tuple[np.ndarray, np.ndarray]:
    """Display boxes ``(x0, y0, x1, y1)`` in pixels of every marker drawn on ``ax`` (lines and scatters), and
    whether each marks a data point (error-bar caps do not)."""
    px = ax.figure.dpi / 72.0
    boxes, is_point = [], []
    for line in ax.lines:
        marker = line.get_marker()
        if marker in (None, "", " ", "none", "None"):
            continue
        xy = np.asarray(line.get_xydata(), np.float64).reshape(-1, 2)
        half = (line.get_markersize() + line.get_markeredgewidth()) / 2.0 * px
        for x, y in line.get_transform().transform(xy) if len(xy) else ():
            boxes.append((x - half, y - half, x + half, y + half))
            is_point.append(marker not in ("|", "_", 0, 1, 2, 3))
    for collection in ax.collections:
        if isinstance(collection, matplotlib.collections.PathCollection):
            sizes = collection.get_sizes()
            offsets = collection.get_offset_transform().transform(collection.get_offsets())
            for index, (x, y) in enumerate(offsets):
                half = math.sqrt(sizes[index % len(sizes)] if len(sizes) else 36.0) / 2.0 * px
                boxes.append((x - half, y - half, x + half, y + half))
                is_point.append(True)
    array, flags = np.array(boxes, np.float64).reshape(-1, 4), np.array(is_point, bool)
    finite = np.isfinite(array).all(axis=1)
    return array[finite], flags[finite]


def _line_segments(ax: plt.Axes) -> np.ndarray:
    """Display segments ``(x0, y0, x1, y1)`` in pixels of every drawn line on ``ax`` (curves and error bars)."""
    segments = []
    for line in ax.lines:
        if line.get_linestyle() in ("None", "none", "", " "):
            continue
        xy = line.get_transform().transform(np.asarray(line.get_xydata(), np.float64).reshape(-1, 2))
        segments.extend(np.concatenate([xy[i], xy[i + 1]]) for i in range(len(xy) - 1))
    for collection in ax.collections:
        if isinstance(collection, matplotlib.collections.LineCollection):
            transform = collection.get_transform()
            for path in collection.get_segments():
                xy = transform.transform(np.asarray(path, np.float64))
                segments.extend(np.concatenate([xy[i], xy[i + 1]]) for i in range(len(xy) - 1))
    array = np.array(segments, np.float64).reshape(-1, 4)
    return array[np.isfinite(array).all(axis=1)]


def _overlaps(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Total overlap area (pixels squared) of each of ``boxes`` with ``others`` (all ``(x0, y0, x1, y1)``)."""
    boxes, others = boxes[:, None, :], others[None, :, :]
    w = np.minimum(boxes[..., 2], others[..., 2]) - np.maximum(boxes[..., 0], others[..., 0])
    h = np.minimum(boxes[..., 3], others[..., 3]) - np.maximum(boxes[..., 1], others[..., 1])
    return np.sum(np.clip(w, 0, None) * np.clip(h, 0, None), axis=1)


def _hits(boxes: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """``[i, j]``: whether segment ``j`` passes through box ``i`` (both ``(x0, y0, x1, y1)``; Liang-Barsky)."""
    boxes, segments = boxes[:, None, :], segments[None, :, :]
    x0, y0 = segments[..., 0], segments[..., 1]
    dx, dy = segments[..., 2] - x0, segments[..., 3] - y0
    shape = (boxes.shape[0], segments.shape[1])
    low, high, hit = np.zeros(shape), np.ones(shape), np.ones(shape, bool)
    for p, q in ((-dx, x0 - boxes[..., 0]), (dx, boxes[..., 2] - x0), (-dy, y0 - boxes[..., 1]),
                 (dy, boxes[..., 3] - y0)):
        p, q = np.broadcast_to(p, shape), np.broadcast_to(q, shape)
        parallel = p == 0
        hit &= ~(parallel & (q < 0))
        t = q / np.where(parallel, 1.0, p)
        low = np.where(~parallel & (p < 0), np.maximum(low, t), low)
        high = np.where(~parallel & (p > 0), np.minimum(high, t), high)
    return hit & (low <= high)


def _crossing_counts(segments: np.ndarray, others: np.ndarray) -> np.ndarray:
    """For each of ``segments``, how many of ``others`` cross it properly (all ``(x0, y0, x1, y1)``)."""
    a, b = segments[:, None, :2], segments[:, None, 2:]
    c, d = others[None, :, :2], others[None, :, 2:]

    def side(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
        return np.sign((q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1])
                       - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0]))

    return np.sum((side(a, b, c) * side(a, b, d) < 0) & (side(c, d, a) * side(c, d, b) < 0), axis=1)


def _box_distances(boxes: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``[i, j]``: distance in pixels from point ``j`` to box ``i`` ``(x0, y0, x1, y1)`` (0 inside)."""
    nearest = np.clip(points[None, :, :], boxes[:, None, :2], boxes[:, None, 2:])
    return np.hypot(*(nearest - points[None, :, :]).transpose(2, 0, 1))


# (gap in points, direction in degrees) of the label spots tried, nearest first; the 8 main directions only at
# the two smallest gaps.
LABEL_CANDIDATES = tuple((gap, angle) for index, gap in enumerate(LABEL_GAPS_PT)
                         for angle in (LABEL_ANGLES_DEG[:8] if index < 2 else LABEL_ANGLES_DEG))


def _candidate_boxes(point: np.ndarray, size: tuple[float, float], clearance: np.ndarray,
                     angles: np.ndarray) -> np.ndarray:
    """Label boxes ``(x0, y0, x1, y1)`` of ``size`` (pixels) on the side ``angles`` (degrees) of ``point``, each
    ``clearance`` pixels clear of the square around it: aligned at their near corner or edge midpoint, so they never
    cover the point."""
    ux, uy = np.cos(np.radians(angles)), np.sin(np.radians(angles))
    scale = clearance / np.maximum(np.abs(ux), np.abs(uy))
    anchor_x, anchor_y = point[0] + ux * scale, point[1] + uy * scale
    w, h = size
    x0 = np.where(ux > 0.3, anchor_x, np.where(ux < -0.3, anchor_x - w, anchor_x - w / 2))
    y0 = np.where(uy > 0.3, anchor_y, np.where(uy < -0.3, anchor_y - h, anchor_y - h / 2))
    return np.column_stack([x0, y0, x0 + w, y0 + h])


def place_labels(ax: plt.Axes, xs: Sequence[float], ys: Sequence[float], texts: Sequence[str],
                 colors: Sequence[Any], renderer: Any = None, *, fontsize: float = 7.0,
                 marker_size: float = 6.0) -> list[matplotlib.text.Annotation]:
    """Writes ``texts[i]`` next to the data point ``(xs[i], ys[i])`` in ``colors[i]``, clear of the other labels,
    of the texts and markers already on ``ax`` and of a ``marker_size``-point square around each labelled point,
    inside the axes.

    Call it once the figure's layout is final (it freezes the axes limits): positions are offsets in points from
    each point. Each label takes, among the free spots of ``LABEL_CANDIDATES``, the one of least cost: its gap,
    plus penalties for crossing drawn lines, for sitting nearer another point than its own, and for a leader
    crossing labels, markers or leaders. Labels placed ``LEADER_FROM_PT`` or farther away or nearer another point,
    and labels with no free spot (then the spot of least overlap inside the axes, the farthest among equals), get
    a thin leader line to their point: an empty-text annotation with the same ``xy``. Points are labelled most
    crowded first.

    Returns:
      The labels in input order (``label.xy`` is the point; none is dropped).
    """
    fig = ax.figure
    renderer = renderer or fig.canvas.get_renderer()
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())
    px = fig.dpi / 72.0
    points = ax.transData.transform(np.column_stack([np.asarray(xs, np.float64), np.asarray(ys, np.float64)]))
    own = marker_size / 2.0 * px
    drawn, is_point = _marker_boxes(ax)
    texts_there = [t.get_window_extent(renderer) for t in ax.texts if t.get_text() and t.get_visible()]
    markers = np.concatenate([drawn, np.column_stack([points - own, points + own]),
                              np.array([[e.x0, e.y0, e.x1, e.y1] for e in texts_there]).reshape(-1, 4)])
    centres = np.concatenate([(drawn[is_point, :2] + drawn[is_point, 2:]) / 2.0, points])
    segments = _line_segments(ax)
    frame = ax.get_window_extent(renderer)
    inner = np.array([frame.x0, frame.y0, frame.x1, frame.y1]) + LABEL_PAD_PX * np.array([1, 1, -1, -1])
    pad = LABEL_PAD_PX * np.array([-1.0, -1.0, 1.0, 1.0])
    gaps = np.array([gap for gap, _ in LABEL_CANDIDATES])
    angles = np.array([angle for _, angle in LABEL_CANDIDATES])
    distances = np.hypot(*(points[:, None, :] - points[None, :, :]).transpose(2, 0, 1))
    crowding = np.sum(distances < LABEL_CROWDING_PT * px, axis=1)
    placed = np.zeros((0, 4))
    leaders = np.zeros((0, 4))
    labels: list[Any] = [None] * len(points)
    for i in sorted(range(len(points)), key=lambda i: -crowding[i]):
        point = points[i]
        label = ax.annotate(texts[i], (xs[i], ys[i]), xytext=(0, 0), textcoords="offset points", ha="center",
                            va="center", fontsize=fontsize, color=colors[i], zorder=5,
                            path_effects=[matplotlib.patheffects.withStroke(linewidth=2, foreground="white")])
        labels[i] = label
        extent = label.get_window_extent(renderer)
        boxes = _candidate_boxes(point, (extent.width, extent.height), own + gaps * px, angles)
        blocked = np.concatenate([markers, placed])
        inside = np.all(boxes[:, :2] + pad[:2] >= inner[:2], axis=1) & np.all(boxes[:, 2:] + pad[2:] <= inner[2:],
                                                                               axis=1)
        overlap = _overlaps(boxes + pad, blocked)
        free = inside & (overlap <= 0)
        if free.any():
            others = centres[np.hypot(*(centres - point).T) > own]
            ambiguous = (_box_distances(boxes, others).min(axis=1) < _box_distances(boxes, point[None])[:, 0]
                         if len(others) else np.zeros(len(boxes), bool))
            leader_needed = (gaps >= LEADER_FROM_PT) | ambiguous
            lines = np.concatenate([segments, leaders])
            ends = np.clip(point, boxes[:, :2], boxes[:, 2:])
            candidate_leaders = np.column_stack([np.broadcast_to(point, ends.shape), ends])
            apart = ~np.all((blocked[:, :2] <= point) & (point <= blocked[:, 2:]), axis=1)  # not under the point
            leader_crossings = (_hits(blocked[apart], candidate_leaders).sum(axis=0)
                                + _crossing_counts(candidate_leaders, leaders))
            cost = (gaps + CROSSING_COST_PT * _hits(boxes, lines).sum(axis=1) + AMBIGUITY_COST_PT * ambiguous
                    + LEADER_CROSSING_COST_PT * leader_crossings * leader_needed)
            choice = int(np.argmin(np.where(free, cost, np.inf)))
            needs_leader = bool(leader_needed[choice])
        else:
            choice, needs_leader = int(np.lexsort((-gaps, overlap, ~inside))[0]), True
        box = boxes[choice]
        label.xyann = tuple(((box[:2] + box[2:]) / 2.0 - point) / px)
        extent = label.get_window_extent(renderer)
        placed = np.concatenate([placed, [np.array([extent.x0, extent.y0, extent.x1, extent.y1]) + pad]])
        if needs_leader:
            end = np.clip(point, [extent.x0, extent.y0], [extent.x1, extent.y1])
            ax.annotate("", (xs[i], ys[i]), xytext=tuple((end - point) / px), textcoords="offset points", zorder=4,
                        arrowprops={"arrowstyle": "-", "color": colors[i], "lw": 0.6, "alpha": 0.8, "shrinkA": 0,
                                    "shrinkB": marker_size / 2.0})
            leaders = np.concatenate([leaders, [np.concatenate([point, end])]])
    return labels


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
    inference advantage, the bag-of-words AUC and the reconstruction's accuracy gain; in decentralized runs the
    curious neighbour's passive AUC and inversion PSNR and the membership AUC of a neighbour's model; those
    present."""
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
                       ("attack/bag_of_words/auc", "typed words from the embedding rows (AUC, server's view)"),
                       ("attack/reconstruction/accuracy_gain_global",
                        "reconstruction: accuracy gain over the released model"),
                       ("attack/neighbour_passive/auc", "passive membership AUC (curious neighbour's view)"),
                       ("attack/neighbour_inversion/psnr_median", "neighbour's inversion: median PSNR (dB)"),
                       ("attack/membership_by_distance/auc_distance_1",
                        "membership AUC of a neighbour's model (1 hop)")):
        if any(key in r["final"] for r in attacked):
            chosen.append((key, label))
    return chosen


def frontier_styles(families: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Colour, marker and marker size (points) of each defense family's frontier curve: a large black star for
    "none" (undefended), ``series_style`` for the others in order, so no two families share a (colour, marker)."""
    styles: dict[str, dict[str, Any]] = {}
    for family in dict.fromkeys(families):
        if family == "none":
            styles[family] = {"color": "black", "marker": "*", "markersize": 12.0}
        else:
            styles[family] = {**series_style(sum(f != "none" for f in styles)), "markersize": 6.0}
    return styles


def frontier_groups(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Records split into blocks of frontier rows: by dataset and by the config fields (seeds and ``name`` aside)
    in which runs with the same label differ, such as a second sweep with more rounds; keys are the blocks'
    titles, e.g. "dataset=digits, rounds=20" ("" for a single block)."""
    same_label: dict[str, list[Record]] = {}
    for record in records:
        same_label.setdefault(str(record.get("label")), []).append(record)
    context = sorted({f for same in same_label.values() if len(same) > 1 for f in varying_fields(same)}
                     - set(IDENTIFIER_FIELDS))
    several = len(by_dataset(records)) > 1
    blocks: dict[tuple[Any, ...], list[Record]] = {}
    for record in records:
        flat = flatten(record.get("config", {}))
        blocks.setdefault((dataset_of(record), *(json.dumps(flat.get(f)) for f in context)), []).append(record)
    if len(blocks) == 1:
        return {"": list(records)}
    names = [f.rsplit(".", 1)[-1] for f in context]
    return {", ".join(([f"dataset={key[0] or '(unnamed)'}"] if several else []) +
                      [f"{name}={value}" for name, value in zip(names, key[1:])]): group
            for key, group in blocks.items()}


FRONTIER_PANEL_IN = (4.6, 3.6)  # width, height of one frontier panel, in inches
FRONTIER_LEGEND_IN = 2.0  # width kept for the legend at the right, in inches


def frontier_figure(records: Sequence[Record]) -> plt.Figure | None:
    """The figure ``plot_frontier`` saves (laid out, labels placed), or None without attack metrics. Columns are
    attack metrics; per block of ``frontier_groups``, a row of test accuracy and a row of bytes uploaded."""
    metrics = frontier_metrics(records)
    if not metrics:
        return None
    attacked = [r for r in records if any(k in r["final"] for k, _ in metrics)]
    styles = frontier_styles([defense_family(r) for r in attacked])
    groups = frontier_groups(attacked)
    width = FRONTIER_PANEL_IN[0] * len(metrics) + FRONTIER_LEGEND_IN + 0.2
    fig, axes = plt.subplots(2 * len(groups), len(metrics), squeeze=False,
                             figsize=(width, FRONTIER_PANEL_IN[1] * 2 * len(groups)))
    pending: list[tuple[plt.Axes, list[tuple[float, float, str, Any, float]]]] = []  # labels to place
    for block, (title, group) in enumerate(groups.items()):
        families: dict[str, list[Record]] = {}
        for record in group:
            families.setdefault(defense_family(record), []).append(record)
        if title:
            axes[2 * block, 0].set_title(title, loc="left", fontsize=9)
        for column, (key, label) in enumerate(metrics):
            cells = [axes[2 * block, column], axes[2 * block + 1, column]]
            to_label: list[list[tuple[float, float, str, Any, float]]] = [[], []]
            for family, members in families.items():
                members = [r for r in members if key in r["final"]]
                if not members:
                    continue
                style = styles[family]
                x = np.array([as_float(r["final"][key]) for r in members])
                low = np.array([as_float(r["final"].get(f"{key}_low")) for r in members])
                high = np.array([as_float(r["final"].get(f"{key}_high")) for r in members])
                error = np.maximum(np.nan_to_num(np.stack([x - low, high - x])), 0.0)
                accuracy = np.array([as_float(r["final"].get("test_accuracy")) for r in members])
                sent = np.array([max(cumulative(r["history"], "bytes_total"), 1.0) for r in members])
                strengths = [str(r.get("label", ""))[len(family):].strip(" ,") for r in members]
                for ax, y, cell in zip(cells, (accuracy, sent), to_label):
                    ax.errorbar(x, y, xerr=error, capsize=2, lw=1.2, label=family,
                                zorder=2.5 if family == "none" else 3.0, **style)
                    cell.extend((xi, yi, text, style["color"], style["markersize"]) for xi, yi, text
                                in zip(x, y, strengths) if text and math.isfinite(xi) and math.isfinite(yi))
            cells[0].set(xlabel=label, ylabel="final test accuracy")
            cells[1].set(xlabel=label, ylabel="bytes uploaded (total)", yscale="log")
            for ax, cell in zip(cells, to_label):
                if not ax.lines:
                    ax.set_yscale("linear")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    ax.text(0.5, 0.5, "no run here has this metric", transform=ax.transAxes, ha="center",
                            va="center", fontsize=8, color="gray")
                    continue
                ax.margins(x=0.08, y=0.12)  # room for the labels of points at the edges
                ax.grid(alpha=0.3)
                if cell:
                    pending.append((ax, cell))
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    fig.tight_layout(rect=(0, 0, 1 - FRONTIER_LEGEND_IN / width, 0.96))
    fig.legend(list(handles.values()), list(handles), loc="center left", fontsize=8, title="defense",
               bbox_to_anchor=(1 - (FRONTIER_LEGEND_IN - 0.05) / width, 0.5))
    fig.suptitle("Privacy-utility frontier: each defense over its strengths, 95% intervals (lower attack success "
                 "is better)", fontsize=10)
    renderer = fig.canvas.get_renderer()
    for ax, cell in pending:
        xs, ys, texts, colors, sizes = zip(*cell)
        place_labels(ax, xs, ys, texts, colors, renderer, marker_size=max(sizes))
    return fig


def plot_frontier(records: Sequence[Record], path: str) -> str | None:
    """The privacy-utility frontier: attack success (x, with its 95% interval) against final test accuracy and
    bytes uploaded (a row each per dataset or repeated sweep, ``frontier_groups``), one curve per defense family
    through its strengths (``frontier_styles``), each strength labelled next to its point (``place_labels``); None
    (no file) without attack metrics."""
    fig = frontier_figure(records)
    if fig is None:
        return None
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(records: Sequence[Record], out_dir: str, figures: Sequence[Any] = ()) -> dict[str, str]:
    """Writes every plot that the records support and the summary table, and the ROC curves and reconstruction
    grids of ``figures`` (``attacks.evaluation.PointFigures``, kept by ``fedjaxpriv attack-eval`` in its store's
    ``figures/``: ``attacks.evaluation.figures_for``).

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
        "epsilon_vs_rounds": plot_epsilon_vs_rounds(records, os.path.join(out_dir, "epsilon_vs_rounds.png")),
        "privacy_utility": plot_privacy_utility(records, os.path.join(out_dir, "privacy_utility.png")),
        "communication_vs_accuracy": plot_communication(records,
                                                        os.path.join(out_dir, "communication_vs_accuracy.png")),
        "attacks": plot_attacks(records, os.path.join(out_dir, "attacks.png")),
        "frontier": plot_frontier(records, os.path.join(out_dir, "frontier.png")),
    }
    written.update(plot_attacks_vs_strength(records, out_dir))
    written["summary_csv"], written["summary_md"] = write_table(summary_rows(records), out_dir)
    if figures:
        from fedjaxpriv.attacks.evaluation import draw_point_figures

        written.update(draw_point_figures(figures, out_dir))
    return {k: v for k, v in written.items() if v is not None}
