"""Sweeps: a grid file expands into configs that run in worker processes and land in one results store.

A grid file (YAML)::

    base: configs/digits.yaml      # or an inline mapping of config sections
    variants:                      # optional named points, each a mapping of dotted overrides
      - {name: baseline}
      - {name: prune50, client.prune_sparsity: 0.5}
    grid:                          # cartesian product over these dotted keys
      client.lr: [0.05, 0.1]
    zip:                           # optional groups whose lists advance together
      - {message.quant_bits: [4, 8], client.local_steps: [5, 10]}
    seeds: [0, 1]                  # sets run.seed

expands to ``variants x grid x zip groups x seeds`` points (in that nesting order, last fastest). Each
point runs in ``STORE/runs/<config_hash>``; a finished run appends one record to ``STORE/results.jsonl``.
Rerunning skips configs already in the store and resumes interrupted ones from their checkpoints.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import multiprocessing
import os
import traceback
from typing import Any, Callable, Mapping, Sequence


from fedjaxpriv.config import ExperimentConfig, from_dict, load_yaml
from fedjaxpriv.parallel import host_cores, use_cpu_cores
from fedjaxpriv.results import ResultsStore, make_record

GRID_KEYS = ("base", "variants", "grid", "zip", "seeds", "name")


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One configuration of a sweep.

    Attributes:
      label: readable name (variant name and the swept values).
      overrides: the dotted overrides that made this point from the base.
      config: the resolved experiment config.
    """

    label: str
    overrides: dict[str, Any]
    config: ExperimentConfig

    @property
    def config_hash(self) -> str:
        return self.config.config_hash()


@dataclasses.dataclass(frozen=True)
class SweepSummary:
    """What ``run_sweep`` did: config hashes run now, skipped (already stored) and failed (with errors)."""

    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    if key == "name":
        raw["name"] = value
        return
    parts = key.split(".")
    if len(parts) != 2:
        raise ValueError(f"grid key {key!r} must be section.field (e.g. client.lr) or name.")
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ValueError(f"config section {parts[0]!r} must be a mapping, got {section!r}.")
    section[parts[1]] = value


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (_deep_copy(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    return str(value)


def _grid_lists(spec: Mapping[str, Any]) -> list[list[dict[str, Any]]]:
    """Each axis of the product as a list of override dicts (variants, grid keys, zip groups, seeds)."""
    axes: list[list[dict[str, Any]]] = []
    variants = spec.get("variants")
    if variants is not None:
        if not isinstance(variants, list) or not variants or not all(isinstance(v, Mapping) for v in variants):
            raise ValueError(f"variants={variants!r} is invalid; allowed: a non-empty list of mappings.")
        axes.append([dict(v) for v in variants])
    grid = spec.get("grid") or {}
    if not isinstance(grid, Mapping):
        raise ValueError(f"grid={grid!r} is invalid; allowed: a mapping of dotted keys to lists.")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid.{key}={values!r} is invalid; allowed: a non-empty list of values.")
        axes.append([{key: v} for v in values])
    groups = spec.get("zip") or []
    if isinstance(groups, Mapping):
        groups = [groups]
    for group in groups:
        if not isinstance(group, Mapping) or not group:
            raise ValueError(f"zip group {group!r} is invalid; allowed: a mapping of dotted keys to lists.")
        lengths = {k: len(v) if isinstance(v, list) else -1 for k, v in group.items()}
        if len(set(lengths.values())) != 1 or -1 in lengths.values() or 0 in lengths.values():
            raise ValueError(f"zip group {dict(group)!r} is invalid; allowed: non-empty lists of equal length "
                             f"(got lengths {lengths}).")
        n = next(iter(lengths.values()))
        axes.append([{k: v[i] for k, v in group.items()} for i in range(n)])
    seeds = spec.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"seeds={seeds!r} is invalid; allowed: a non-empty list of integers.")
        axes.append([{"run.seed": s} for s in seeds])
    return axes


def expand_grid(spec: Mapping[str, Any], base_dir: str = ".") -> list[SweepPoint]:
    """Expands a grid specification (the parsed grid file) into sweep points.

    Args:
      spec: mapping with ``base`` (inline config mapping or a path, relative to ``base_dir``) and optional
        ``variants``, ``grid``, ``zip``, ``seeds``.
      base_dir: directory that relative ``base`` paths are resolved against.

    Returns:
      The points in expansion order, duplicates (same config hash) removed.
    """
    unknown = set(spec) - set(GRID_KEYS)
    if unknown:
        raise ValueError(f"unknown grid file key(s) {sorted(unknown)}; allowed: {list(GRID_KEYS)}.")
    base = spec.get("base") or {}
    if isinstance(base, str):
        path = base if os.path.isabs(base) else os.path.join(base_dir, base)
        with open(path) as f:
            base = load_yaml(f) or {}
    if not isinstance(base, Mapping):
        raise ValueError(f"base={base!r} is invalid; allowed: a config mapping or a path to a config file.")
    points, seen = [], set()
    for combo in itertools.product(*_grid_lists(spec)):
        overrides: dict[str, Any] = {}
        for part in combo:
            overrides.update(part)
        raw = _deep_copy(base)
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        config = from_dict(raw)
        if config.config_hash() in seen:
            continue
        seen.add(config.config_hash())
        pieces: list[str] = []
        for part in combo:
            if "name" in part:
                pieces.append(str(part["name"]))
            else:
                pieces.extend(f"{k.split('.')[-1]}={_format_value(v)}" for k, v in part.items())
        label = ",".join(pieces)
        points.append(SweepPoint(label or config.name, overrides, config))
    return points


def load_grid(path: str) -> list[SweepPoint]:
    """Reads a grid YAML file and expands it (``base`` paths are relative to the file)."""
    with open(path) as f:
        spec = load_yaml(f) or {}
    if not isinstance(spec, Mapping):
        raise ValueError(f"grid file {path!r} must hold a mapping at top level.")
    return expand_grid(spec, os.path.dirname(os.path.abspath(path)))


def run_dir_for(store_dir: str, point: SweepPoint) -> str:
    """The run directory of a point: ``STORE/runs/<config_hash>``."""
    return os.path.join(store_dir, "runs", point.config_hash)


def run_point(config_dict: Mapping[str, Any], run_dir: str, store_path: str, label: str,
              overrides: Mapping[str, Any]) -> str:
    """Runs (or resumes) one point and appends its record to the store. Executed in a worker process.

    Returns:
      The config hash.
    """
    from fedjaxpriv.experiment import build_experiment

    config = from_dict(config_dict)
    results = build_experiment(config).run(run_dir, resume=True, progress=False)
    ResultsStore(store_path).append(make_record(config, results.history, run_dir=run_dir, label=label,
                                                overrides=overrides))
    return config.config_hash()


def run_sweep(points: Sequence[SweepPoint], store_dir: str, *, jobs: int = 1,
              on_done: Callable[[str, str | None], None] | None = None) -> SweepSummary:
    """Runs the points not yet in ``STORE/results.jsonl``, ``jobs`` at a time.

    Args:
      points: from ``expand_grid``/``load_grid``.
      store_dir: directory of the results store and the run directories.
      jobs: worker processes (spawned); 1 runs in this process.
      on_done: called as ``on_done(config_hash, error_or_None)`` as each run finishes.

    Returns:
      A ``SweepSummary``; failed runs keep their partial run directory and rerun on the next call.
    """
    if jobs < 1:
        raise ValueError(f"jobs={jobs} is invalid; allowed: an integer >= 1.")
    store = ResultsStore(os.path.join(store_dir, "results.jsonl"))
    done = store.completed_hashes()
    todo = [p for p in points if p.config_hash not in done]
    skipped = [p.config_hash for p in points if p.config_hash in done]
    ran: list[str] = []
    failed: dict[str, str] = {}

    def finish(point: SweepPoint, error: str | None) -> None:
        if error:
            failed[point.config_hash] = error
        else:
            ran.append(point.config_hash)
        if on_done is not None:
            on_done(point.config_hash, error)

    args = [(p.config.to_dict(), run_dir_for(store_dir, p), store.path, p.label, p.overrides) for p in todo]
    if jobs == 1:
        for point, arg in zip(todo, args):
            try:
                run_point(*arg)
                finish(point, None)
            except Exception:  # one failed run must not stop the sweep
                finish(point, traceback.format_exc())
        return SweepSummary(ran, skipped, failed)
    context = multiprocessing.get_context("spawn")
    cores_each = max(1, host_cores() // jobs)
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=use_cpu_cores,
                                                initargs=(cores_each,)) as pool:
        futures = {pool.submit(run_point, *arg): point for point, arg in zip(todo, args)}
        for future in concurrent.futures.as_completed(futures):
            error = future.exception()
            finish(futures[future], None if error is None else "".join(traceback.format_exception(error)))
    return SweepSummary(ran, skipped, failed)
