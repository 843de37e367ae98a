"""The results store: one JSON line per finished run, safe for concurrent writers and interrupted runs.

A record holds everything needed to compare runs later without their run directories::

    {"config_hash", "label", "overrides", "config", "seed", "versions", "sessions", "final", "history", "run_dir",
     "finished_at"}

``final`` maps every metric to its last recorded value; ``history`` is the list of per-round records.
Writers append a whole record with one ``os.write`` under an exclusive ``fcntl`` lock, so lines never
interleave; a line cut short by a killed writer is skipped by readers and sealed by the next writer.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
import uuid
import warnings
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from fedjaxpriv import locks
from fedjaxpriv.files import atomic_write

Record = dict[str, Any]
STORE_FILE = "results.jsonl"
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "dp-accounting", "numpy", "orbax-checkpoint", "fedjaxpriv")


def jsonable(value: Any) -> Any:
    """Converts numpy and JAX scalars/arrays, tuples and non-finite floats into plain JSON values: NaN becomes
    null and +-infinity "inf" / "-inf" (strict JSON holds neither), so ``json.dumps(..., allow_nan=False)`` of the
    result always succeeds for numeric data."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray) or (hasattr(value, "__array__") and hasattr(value, "dtype")):
        return jsonable(np.asarray(value).tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes rows as CSV, columns the union of their keys in first-seen order (missing or None: empty)."""
    import csv

    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(jsonable(dict(row)) for row in rows)


def as_float(value: Any) -> float:
    """Reads a stored metric back as a float ("inf" strings and null included)."""
    if value is None:
        return math.nan
    return float(value)


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine a run's numbers (dp-accounting decides every epsilon)."""
    from importlib import metadata

    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def code_revision() -> str | None:
    """The git commit of the fedjaxpriv source this process runs (``+dirty`` with uncommitted changes), or None
    when it is not a git checkout (an installed wheel) or git is absent."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        top = subprocess.run(["git", "-C", here, "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        if os.path.realpath(os.path.join(top, "fedjaxpriv")) != os.path.realpath(here):
            return None  # installed inside some other repository: its commit is not this code's
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit or None


def run_environment() -> dict[str, Any]:
    """What produced a run, recorded when it starts: package versions, backend, device kind and count, process
    count, Python, the code revision, the command line and the start time (UTC)."""
    import platform
    import sys

    import jax

    devices = jax.devices()
    return {"versions": package_versions(), "backend": jax.default_backend(),
            "device_kind": devices[0].device_kind if devices else "none", "device_count": len(devices),
            "process_count": jax.process_count(), "python": platform.python_version(),
            "code_revision": code_revision(), "command": list(sys.argv),
            "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def final_metrics(history: Sequence[Mapping[str, Any]]) -> Record:
    """The last recorded value of every metric in a history (evaluation keys come from evaluated rounds)."""
    final: Record = {}
    for record in history:
        final.update(record)
    return final


def cumulative(history: Sequence[Mapping[str, Any]], key: str) -> float:
    """Sum of a per-round metric over the history (e.g. total bytes uploaded)."""
    return float(sum(as_float(r[key]) for r in history if key in r))


def make_record(config: Any, history: Sequence[Mapping[str, Any]], *, run_dir: str | None = None,
                label: str | None = None, overrides: Mapping[str, Any] | None = None) -> Record:
    """Builds a store record for a finished run of ``config`` (an ``ExperimentConfig``). With ``run_dir``, its
    ``run.json`` (``storage.RunStore``) gives the versions and the sessions that produced the run; without one,
    the versions are this process's."""
    history = [jsonable(dict(r)) for r in history]
    sessions = read_sessions(run_dir) if run_dir is not None else []
    return {
        "config_hash": config.config_hash(),
        "label": label or config.name,
        "overrides": jsonable(dict(overrides or {})),
        "config": jsonable(config.to_dict()),
        "seed": config.run.seed,
        "versions": sessions[-1]["versions"] if sessions else package_versions(),
        "sessions": sessions,
        "final": final_metrics(history),
        "history": history,
        "run_dir": None if run_dir is None else os.path.abspath(run_dir),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


RUN_INFO_FILE = "run.json"


def read_sessions(run_dir: str) -> list[dict[str, Any]]:
    """The sessions recorded in a run directory's ``run.json`` (one per start or resume: ``run_environment``
    plus ``first_round`` and, once it closed, ``ended_at``); [] when there is none or it is unreadable."""
    try:
        with open(os.path.join(run_dir, RUN_INFO_FILE)) as f:
            sessions = json.load(f).get("sessions", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [s for s in sessions if isinstance(s, dict) and isinstance(s.get("versions"), dict)]


def _parse_lines(data: bytes, require_hash: bool = True) -> list[Record]:
    """The intact JSON objects of a JSON-lines file (with a ``config_hash`` when ``require_hash``)."""
    records = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a record cut short by a killed writer
        if isinstance(record, dict) and ("config_hash" in record or not require_hash):
            records.append(record)
    return records


class ResultsStore:
    """An append-only JSON-lines file of run summaries, each run's history in a file of its own, and claims on
    the configs being run into it.

    A record's ``history`` (one dict per round) is written to ``results.jsonl.histories/<config_hash>-<id>.jsonl``
    before its summary line, which names the file (``history_file``, relative to the store) and the number of
    rounds (``history_rounds``): a sweep's start (``completed_hashes``) and ``to_frame`` read the summaries only,
    and ``records()`` reads the histories too. Records written with their history inline are read as they are.

    A claim (``claim``) is an exclusive ``flock`` on ``results.jsonl.claims/<config_hash>.lock``, decided under a
    store-wide lock on ``results.jsonl.lock``: processes sharing a store run each config once, and a claim ends
    with its process however that ends (the kernel drops the lock), so a killed run is claimable again.

    Attributes:
      path: the ``results.jsonl`` file (created on the first append).
    """

    def __init__(self, path: str) -> None:
        if os.path.isdir(path) or not path.endswith(".jsonl"):
            path = os.path.join(path, STORE_FILE)
        self.path = os.path.abspath(path)

    def append(self, record: Mapping[str, Any]) -> None:
        """Appends one record atomically: its history to a file of its own (written whole, then renamed into
        place), then its summary as one write of one line under an exclusive lock."""
        summary = dict(record)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if "history" in summary:
            history = summary.pop("history")
            name = f"{os.path.basename(self.path)}.histories/{summary['config_hash']}-{uuid.uuid4().hex[:8]}.jsonl"
            path = os.path.join(os.path.dirname(self.path), name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, "".join(json.dumps(jsonable(r), sort_keys=True) + "\n" for r in history))
            summary.update(history_file=name, history_rounds=len(history))
        line = (json.dumps(jsonable(summary), sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # seal a line left unfinished by an interrupted writer
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def records(self, history: bool = True) -> list[Record]:
        """All intact records, in the order they were written; with ``history`` False, the summaries only (no
        ``history`` key unless it was written inline)."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            try:
                data = f.read()
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        records = _parse_lines(data)
        if history:
            for record in records:
                if "history_file" in record and "history" not in record:
                    record["history"] = self._read_history(record)
        return records

    def _read_history(self, record: Record) -> list[Record]:
        path = os.path.join(os.path.dirname(self.path), record["history_file"])
        try:
            with open(path, "rb") as f:
                return _parse_lines(f.read(), require_hash=False)
        except OSError as error:
            warnings.warn(f"results store {self.path}: the history of run {record['config_hash']} is unreadable "
                          f"({error.strerror}: {path}); it is read as empty.", stacklevel=3)
            return []

    def completed_hashes(self) -> set[str]:
        """Config hashes of the runs already in the store (from the summaries alone)."""
        return {r["config_hash"] for r in self.records(history=False)}

    def to_frame(self) -> Any:
        """The store as a pandas DataFrame, one row per run: ``config_hash``, ``label``, ``seed``, ``run_dir``,
        ``finished_at``, ``history_rounds``, every override (dotted config field) and every final metric (the
        last value of each history key, ``final``). Needs pandas (``pip install "fedjaxpriv[frame]"``)."""
        try:
            import pandas
        except ImportError:
            raise ModuleNotFoundError('ResultsStore.to_frame needs pandas: pip install "fedjaxpriv[frame]" (or '
                                      'pandas).') from None
        rows = []
        for record in self.records(history=False):
            row = {key: record.get(key) for key in ("config_hash", "label", "seed", "run_dir", "finished_at")}
            row["history_rounds"] = record.get("history_rounds", len(record.get("history", [])))
            row.update(record.get("overrides", {}))
            row.update(record.get("final", {}))
            rows.append(row)
        return pandas.DataFrame(rows)

    def _claim_path(self, config_hash: str) -> str:
        return os.path.join(f"{self.path}.claims", f"{config_hash}.lock")

    @contextlib.contextmanager
    def claim(self, config_hash: str) -> Iterator[str]:
        """Claims a config for this process while the ``with`` block runs.

        Yields:
          "claimed" (run it and append its record inside the block), "done" (already in the store) or "busy"
          (another live process holds the claim).
        """
        os.makedirs(f"{self.path}.claims", exist_ok=True)
        store_lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(store_lock, fcntl.LOCK_EX)
            claim = locks.try_lock(self._claim_path(config_hash))
            if claim is None:
                state = "busy"
            elif config_hash in self.completed_hashes():
                state = "done"
            else:
                state = "claimed"
        finally:
            os.close(store_lock)
        try:
            yield state
        finally:
            if claim is not None:
                locks.release(claim)

    def claim_holder(self, config_hash: str) -> int | None:
        """The pid of the process holding the claim on a config (-1 if it has not written it yet), or None."""
        return locks.holder(self._claim_path(config_hash))


# What history.jsonl writes for NaN (null) and infinities, read back as floats.
_NON_FINITE = {"inf": float("inf"), "-inf": float("-inf")}


def _decode(value: Any) -> Any:
    if value is None:
        return math.nan
    return _NON_FINITE.get(value, value) if isinstance(value, str) else value


def parse_history(lines: Iterable[str]) -> tuple[list[Record], list[str]]:
    """The records of a history file that form the rounds 1, 2, ..., k, and what was dropped on the way.

    A line that is not a JSON record ends the history (the last line: a torn append). A record of a round
    already seen means the run was restarted from an earlier checkpoint: it replaces that round and everything
    after it. A record that skips rounds ends the history. Values written as null / "inf" / "-inf" (NaN and
    infinities) are floats again, so a resumed history equals the one that was written.

    Returns:
      (records, problems): ``records[i]["round"] == i + 1``; one message per irregularity found.
    """
    raw = [line for line in lines if line.strip()]
    records: list[Record] = []
    problems: list[str] = []
    for number, line in enumerate(raw, 1):
        try:
            record = json.loads(line)
            round_ = record["round"]
            if not isinstance(round_, int) or isinstance(round_, bool):
                raise TypeError("round is not an integer")
        except (ValueError, TypeError, KeyError) as error:
            where = "its last line" if number == len(raw) else f"line {number} of {len(raw)}"
            problems.append(f"{where} is not a whole record ({type(error).__name__}: {error}); dropped it"
                            + ("" if number == len(raw) else " and the lines after it"))
            break
        if round_ == len(records) + 1:
            records.append({k: _decode(v) for k, v in record.items()})
        elif 1 <= round_ <= len(records):
            problems.append(f"line {number} repeats round {round_} after round {len(records)}; kept the later "
                            f"records from round {round_} on")
            records = records[:round_ - 1] + [{k: _decode(v) for k, v in record.items()}]
        else:
            problems.append(f"line {number} holds round {round_} after round {len(records)}; dropped it and the "
                            "lines after it")
            break
    return records, problems


def read_history(path: str, warn: bool = True) -> list[Record]:
    """Reads a history.jsonl file (one record per round, rounds 1..k; see ``parse_history``), warning about
    anything dropped when ``warn``."""
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        records, problems = parse_history(f)
    if warn:
        for problem in problems:
            warnings.warn(f"{path}: {problem}.", stacklevel=2)
    return records


def record_from_run_dir(run_dir: str) -> Record:
    """A store record built from a run directory (config.json + history.jsonl written by ``fedjaxpriv run``)."""
    from fedjaxpriv.config import from_dict, load_file, unwrap_saved

    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{run_dir!r} is not a run directory (no config.json) nor a results store.")
    loaded = load_file(config_path, "run config")
    inner = unwrap_saved(loaded)
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in inner.items()}
    for section in raw.values():  # "inf" strings from JSON back to floats
        if isinstance(section, dict):
            for key, value in section.items():
                if value in ("inf", "Infinity"):
                    section[key] = math.inf
    try:
        # As load_config: fields of a saved run that this version lacks are dropped with a warning; in a bare
        # config (not saved by a run) an unknown field is an error.
        config = from_dict(raw, unknown="warn" if inner is not loaded else "error")
    except ValueError as error:
        raise ValueError(f"run config {config_path!r} does not hold a config this version reads: {error}") from None
    history = read_history(os.path.join(run_dir, "history.jsonl"))
    if not history:
        raise ValueError(f"{run_dir!r} has no finished round (history.jsonl is missing or empty): nothing to report.")
    label = os.path.basename(os.path.normpath(run_dir))
    return make_record(config, history, run_dir=run_dir, label=label)


def load_records(sources: Iterable[str]) -> list[Record]:
    """Records from results stores (``results.jsonl`` files or directories holding one) and run directories.

    Raises:
      ValueError: if a source is neither a store nor a run directory.
    """
    records: list[Record] = []
    for source in sources:
        store_path = source if source.endswith(".jsonl") else os.path.join(source, STORE_FILE)
        if os.path.isfile(store_path):
            records.extend(ResultsStore(store_path).records())
        elif os.path.isdir(source):
            records.append(record_from_run_dir(source))
        else:
            raise ValueError(f"{source!r} is neither a results store (results.jsonl) nor a run directory.")
    return records


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys: {"client": {"lr": 0.1}} -> {"client.lr": 0.1}."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def varying_fields(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Dotted config fields whose values differ between records (sorted)."""
    flats = [flatten(r["config"]) for r in records]
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]
