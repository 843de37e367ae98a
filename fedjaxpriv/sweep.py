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

A point is run by whoever claims it through the store (``ResultsStore.claim``), so any number of sweep processes
can share one store: each point runs once, in one process at a time. A sweep waits for the points that other
live sweeps are running, and takes over those whose runner died. Workers die with their sweep process.
Rerunning skips configs already in the store and resumes interrupted ones from their checkpoints.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import multiprocessing
import os
import signal
import threading
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

from fedjaxpriv.config import ExperimentConfig, from_dict, load_file, unwrap_saved, with_overrides
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
    """What ``run_sweep`` did: config hashes run now, skipped (already stored, or recorded by another sweep
    meanwhile) and failed (with errors)."""

    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]


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
        base = load_file(base if os.path.isabs(base) else os.path.join(base_dir, base), "base config file")
    if not isinstance(base, Mapping):
        raise ValueError(f"base={base!r} is invalid; allowed: a config mapping or a path to a config file.")
    base_config = from_dict(unwrap_saved(base))
    points, seen = [], set()
    for combo in itertools.product(*_grid_lists(spec)):
        overrides: dict[str, Any] = {}
        for part in combo:
            overrides.update(part)
        config = with_overrides(base_config, overrides)
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
    return expand_grid(load_file(path, "grid file"), os.path.dirname(os.path.abspath(path)))


def run_dir_for(store_dir: str, point: SweepPoint) -> str:
    """The run directory of a point: ``STORE/runs/<config_hash>``."""
    return os.path.join(store_dir, "runs", point.config_hash)


def run_point(config_dict: Mapping[str, Any], run_dir: str, store_path: str, label: str,
              overrides: Mapping[str, Any]) -> str:
    """Claims one point, runs (or resumes) it and appends its record to the store. Executed in a worker process
    (or in the sweep process when it runs one job).

    Returns:
      "ran", "done" (already in the store) or "busy" (another process is running it).
    """
    config = from_dict(config_dict)
    store = ResultsStore(store_path)
    with store.claim(config.config_hash()) as state:
        if state != "claimed":
            return state
        from fedjaxpriv.experiment import build_experiment
        from fedjaxpriv.parallel import enable_compilation_cache

        enable_compilation_cache()  # every point of a sweep shares its compiled programs with the others
        results = build_experiment(config, progress=False).run(run_dir, resume=True, progress=False)
        store.append(make_record(config, results.history, run_dir=run_dir, label=label, overrides=overrides))
    return "ran"


def _die_with_parent(parent_pid: int) -> None:
    """Ends this process when ``parent_pid`` (the sweep that started it) dies, SIGKILL included: the kernel's
    parent-death signal where there is one (Linux), and a thread watching the parent pid as a backstop."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _init_worker(cores: int, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    use_cpu_cores(cores)
    for signum in (signal.SIGINT, signal.SIGTERM):  # an idle worker outlives a signal; a running point does not
        signal.signal(signum, signal.SIG_IGN)


def _run_point_in_worker(*args: Any) -> str:
    """``run_point`` in a pool worker: SIGINT and SIGTERM (forwarded by the sweep) stop the point's run at the end
    of its round while it runs, and are ignored while the worker waits for a point."""
    from fedjaxpriv.guards import raise_interrupted

    previous = {signum: signal.signal(signum, raise_interrupted) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run_point(*args)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_sweep(points: Sequence[SweepPoint], store_dir: str, *, jobs: int = 1,
              on_done: Callable[[str, str | None], None] | None = None, poll_s: float = 0.5,
              wait_limit_s: float | None = None,
              on_wait: Callable[[str, int | None], None] | None = None) -> SweepSummary:
    """Runs the points not yet in ``STORE/results.jsonl``, ``jobs`` at a time, claiming each through the store.

    Args:
      points: from ``expand_grid``/``load_grid``.
      store_dir: directory of the results store and the run directories.
      jobs: worker processes (spawned); 1 runs in this process.
      on_done: called as ``on_done(config_hash, error_or_None)`` as each run of this sweep finishes.
      poll_s: how often points that other processes are running are tried again.
      wait_limit_s: how long to wait for a point another process is running before counting it as failed
        (a holder that hangs while alive keeps its claim); None waits until it is stored.
      on_wait: called as ``on_wait(config_hash, holder_pid)`` when a point is first found held by another process.

    Returns:
      A ``SweepSummary``, once every point is in the store or failed; failed runs keep their partial run
      directory and rerun on the next call.
    """
    if jobs < 1:
        raise ValueError(f"jobs={jobs} is invalid; allowed: an integer >= 1.")
    if wait_limit_s is not None and not wait_limit_s >= 0:
        raise ValueError(f"wait_limit_s={wait_limit_s} is invalid; allowed: seconds >= 0, or None to wait.")
    store = ResultsStore(os.path.join(store_dir, "results.jsonl"))
    done = store.completed_hashes()
    skipped = [p.config_hash for p in points if p.config_hash in done]
    queue = [p for p in points if p.config_hash not in done]
    ran: list[str] = []
    failed: dict[str, str] = {}
    busy: list[SweepPoint] = []
    waiting_since: dict[str, float] = {}

    def settle(point: SweepPoint, state: str | None, error: str | None) -> None:
        if state == "busy":
            first = point.config_hash not in waiting_since
            since = waiting_since.setdefault(point.config_hash, time.monotonic())
            holder = store.claim_holder(point.config_hash)
            if first and on_wait is not None:
                on_wait(point.config_hash, holder)
            if wait_limit_s is None or time.monotonic() - since < wait_limit_s:
                busy.append(point)
                return
            state, error = None, (f"another process (PID {holder if holder and holder > 0 else 'unknown'}) held "
                                  f"this point for more than wait_limit_s={wait_limit_s} s; it is not in the store")
        if state == "done":
            skipped.append(point.config_hash)
            return
        if error:
            failed[point.config_hash] = error
        else:
            ran.append(point.config_hash)
        if on_done is not None:
            on_done(point.config_hash, error)

    def args(p: SweepPoint) -> tuple:
        return p.config.to_dict(), run_dir_for(store_dir, p), store.path, p.label, p.overrides

    pool = None
    if jobs > 1 and queue:
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
            initargs=(max(1, host_cores() // jobs), os.getpid()))
    try:
        while queue:
            if pool is None:
                for point in queue:
                    try:
                        settle(point, run_point(*args(point)), None)
                    except Exception:  # one failed run must not stop the sweep
                        settle(point, None, traceback.format_exc())
            else:
                futures = {pool.submit(_run_point_in_worker, *args(p)): p for p in queue}
                for future in concurrent.futures.as_completed(futures):
                    error = future.exception()
                    settle(futures[future], None if error else future.result(),
                           error and "".join(traceback.format_exception(error)))
            queue = list(busy)  # points other processes are running: try again until they are stored
            busy.clear()
            if queue:
                time.sleep(poll_s)
    except KeyboardInterrupt as error:  # Ctrl-C or SIGTERM: the workers' runs stop at the end of their round too
        if pool is not None:
            signum = getattr(error, "signum", signal.SIGINT)
            for worker in multiprocessing.active_children():
                try:
                    os.kill(worker.pid, signum)
                except ProcessLookupError:
                    pass
            pool.shutdown(wait=True, cancel_futures=True)  # each run checkpoints its round, then its worker is idle
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return SweepSummary(ran, skipped, failed)
