"""A run directory: config.json, history.jsonl/history.csv and orbax checkpoints of the server state.

Resuming restores the latest checkpoint and keeps the history records of the rounds it covers; rounds
after it are recomputed (deterministically, since every key derives from the seed and the round).

The directory stays resumable if the process dies at any instant:

- one writer at a time: ``RunStore`` holds an exclusive ``locks.try_lock`` on ``.lock`` (holding the writer's PID)
  from opening to ``close``; a second writer gets ``RunDirectoryLocked`` naming that PID;
- ``config.json`` is written first and atomically (new file, fsync, rename); it identifies the run, so a directory
  whose history or checkpoints have no matching ``config.json`` is refused, never adopted;
- ``history.jsonl`` grows by whole records (one ``O_APPEND`` write of a line, then fsync) and only ever shrinks by
  replacing it with a new file; a round's record is appended before its checkpoint is saved, so the history
  covers every checkpoint; orbax writes a checkpoint into a temporary directory and renames it when complete;
- ``restore`` reconciles what a crash can leave: a torn last line is dropped, rounds that break the sequence
  1, 2, 3, ... are cut, temporary checkpoint directories are removed, a checkpoint the history does not cover is
  deleted, an unreadable one is set aside (renamed ``<round>.unreadable``) and an older one used, each with a
  warning; the history is then cut to the checkpoint's round.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedjaxpriv import locks
from fedjaxpriv.files import atomic_write, remove_stale_temporaries
from fedjaxpriv.guards import install_report_hooks, library_threads_quiet
from fedjaxpriv.config import ExperimentConfig, extension_problem, from_dict
from fedjaxpriv.results import (RUN_INFO_FILE, jsonable, parse_history, read_history, read_sessions, run_environment,
                                write_csv)

Record = dict[str, Any]
LOCK_FILE = ".lock"
ORBAX_TMP_MARK = ".orbax-checkpoint-tmp"
UNREADABLE_SUFFIX = ".unreadable"
# JSON holds no NaN or infinity: ``jsonable`` writes them as null and "inf" / "-inf"; reading maps them back.


class RunDirectoryLocked(ValueError):
    """Another process is writing the run directory."""


def append_line(path: str, line: str) -> None:
    """Appends one line with a single ``O_APPEND`` write, then fsyncs: a killed process leaves the line whole
    or absent (a torn line needs a crash of the machine; ``read_history`` drops it)."""
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(errno.EIO, f"short write to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)


def record_line(record: Record) -> str:
    """A history record as one line of strict JSON (non-finite floats as null / "inf" / "-inf")."""
    return json.dumps(jsonable(record), allow_nan=False) + "\n"


# -- the lock --------------------------------------------------------------------------------------------------
# What a run directory holds: the files, and the checkpoints directory (``RunStore``).
RUN_FILES = (LOCK_FILE, "history.jsonl", "history.csv", "clients.csv", RUN_INFO_FILE, "config.json")
CHECKPOINT_DIR = "checkpoints"


def check_layout(out_dir: str) -> None:
    """Raises ValueError naming the path when something in ``out_dir`` is not what a run directory holds there (a
    directory where a run file belongs, a file where the checkpoints directory belongs), before anything in it is
    read, locked or deleted."""
    for name in RUN_FILES:
        path = os.path.join(out_dir, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise ValueError(f"{path} is not a regular file, but a run directory keeps its {name} there: move it "
                             "away (or choose another --out directory); nothing was changed.")
    path = os.path.join(out_dir, CHECKPOINT_DIR)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory, but a run directory keeps its checkpoints there: move it away "
                         "(or choose another --out directory); nothing was changed.")


def lock_run_dir(out_dir: str) -> int:
    """Takes the exclusive lock of a run directory; returns the lock file's descriptor (``locks.release`` it).

    Raises:
      RunDirectoryLocked: another process holds it (the message names its PID).
    """
    path = os.path.join(out_dir, LOCK_FILE)
    fd = locks.try_lock(path)
    if fd is None:
        pid = locks.holder(path)
        raise RunDirectoryLocked(f"{out_dir} is in use by another run (PID {pid if pid and pid > 0 else 'unknown'}); "
                                 "wait for it to finish, or write to another --out directory.")
    return fd


# -- the store -------------------------------------------------------------------------------------------------
class RunStore:
    """The files of one run, locked for this process until ``close``. Refuses to resume a directory written by
    a different config (or whose config.json is missing); ``fresh=True`` deletes what an earlier run left there
    (checkpoints, history, per-client table, config) and starts over.

    Attributes:
      rounds: the number of records in history.jsonl (known after ``restore``, or 0 when ``fresh``).
    """

    def __init__(self, out_dir: str, config: ExperimentConfig, max_to_keep: int = 2, fresh: bool = False,
                 extend: bool = False) -> None:
        self.out_dir = os.path.abspath(out_dir)
        self.config = config
        self.history_path = os.path.join(self.out_dir, "history.jsonl")
        self.checkpoint_dir = os.path.join(self.out_dir, CHECKPOINT_DIR)
        self.rounds: int | None = 0 if fresh else None
        # In a multi-process run every process opens the same directory: process 0 alone locks it and writes its
        # files; all of them take part in orbax's checkpoints (its saves and restores are collective).
        self.writer = jax.process_index() == 0
        self._lock: int | None = None
        if self.writer:
            os.makedirs(self.out_dir, exist_ok=True)
            check_layout(self.out_dir)
            self._lock = lock_run_dir(self.out_dir)
        try:
            if self.writer:
                if fresh:
                    self._delete_run_files()
                self._check_config(extend)
                remove_stale_temporaries(self.out_dir)  # left by a writer killed mid-write; we hold the lock
                self._remove_temporary_checkpoints()
            sync_processes("fedjaxpriv: run directory opened")
            install_report_hooks()  # orbax's own reports of a failed read or write: --verbose
            self.manager = self._new_manager(max_to_keep)
            if self.writer:
                self._record_session(run_environment())
        except BaseException:
            self._unlock()
            raise

    # -- opening ---------------------------------------------------------------------------------------------
    def _delete_run_files(self) -> None:
        # config.json last: until it goes, the directory still names the run its other files belong to.
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        for name in (n for n in RUN_FILES if n != LOCK_FILE):  # the lock is ours; config.json comes last
            if os.path.exists(os.path.join(self.out_dir, name)):
                os.remove(os.path.join(self.out_dir, name))

    def _write_config(self, path: str) -> None:
        atomic_write(path, json.dumps({"config_hash": self.config.config_hash(), "config": self.config.to_dict()},
                                      indent=2, default=str))

    def _check_config(self, extend: bool) -> None:
        """Checks that the directory holds a run of this config (or none); with ``extend``, a run of the same
        config with fewer ``run.rounds`` is taken over (``config.extension_problem`` says when it cannot be), and
        config.json then names this config."""
        config_path = os.path.join(self.out_dir, "config.json")
        expected = self.config.config_hash()
        if not os.path.exists(config_path):
            if self._has_run_files():
                raise ValueError(f"{self.out_dir} holds history.jsonl or checkpoints but no config.json, so the "
                                 "config that wrote them cannot be checked; move them away, or start over "
                                 "with --no-resume (resume=False).")
            self._write_config(config_path)
            return
        try:
            with open(config_path) as f:
                previous = json.load(f)
            found = previous.get("config_hash")
        except (OSError, ValueError, AttributeError) as error:
            raise ValueError(f"{config_path} is unreadable ({error}); it names the config of the run stored "
                             "there: restore it, or start over with --no-resume (resume=False).") from None
        recorded = None
        if found != expected and isinstance(previous.get("config"), dict):
            try:  # a hash written by a version with another hash or other fields: the config itself decides
                recorded = from_dict(previous["config"], unknown="warn")
                found = recorded.config_hash()
            except ValueError:
                pass
        if found != expected and extend and recorded is not None:
            problem = extension_problem(recorded, self.config)
            if problem:
                raise ValueError(f"{self.out_dir}: the run there cannot be extended to run.rounds="
                                 f"{self.config.run.rounds}: {problem}.")
            self._write_config(config_path)
            return
        if found != expected:
            raise ValueError(f"{self.out_dir} holds a run of a different config (hash {found} != {expected}); "
                             "choose another --out directory or delete it (or, to run it for more rounds, raise "
                             "run.rounds and pass --continue / extend=True).")

    def _has_run_files(self) -> bool:
        has_history = os.path.exists(self.history_path) and os.path.getsize(self.history_path) > 0
        return has_history or (os.path.isdir(self.checkpoint_dir) and bool(os.listdir(self.checkpoint_dir)))

    def _remove_temporary_checkpoints(self) -> None:
        """Removes checkpoints a killed writer left half-written (safe: this process holds the lock)."""
        if not os.path.isdir(self.checkpoint_dir):
            return
        for name in os.listdir(self.checkpoint_dir):
            if ORBAX_TMP_MARK in name:
                shutil.rmtree(os.path.join(self.checkpoint_dir, name), ignore_errors=True)

    def _new_manager(self, max_to_keep: int) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.checkpoint_dir,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False))

    # -- resuming --------------------------------------------------------------------------------------------
    def restore(self, template: Any) -> tuple[Any, list[Record], dict[str, Any]] | None:
        """(state, history up to the checkpoint, privacy state saved with it) from the latest checkpoint that
        the history covers and that can be read, or None (the history is then emptied: the run starts over).
        Every fallback warns."""
        history, problems = [], []
        if os.path.exists(self.history_path):
            with open(self.history_path, errors="replace") as f:
                history, problems = parse_history(f)
        for problem in problems:
            warnings.warn(f"{self.history_path}: {problem}.", stacklevel=2)
        ahead = [candidate for candidate in self.manager.all_steps() if candidate > len(history)]
        if ahead and self.writer:
            for candidate in sorted(ahead, reverse=True):
                warnings.warn(f"{self.checkpoint_dir}: the checkpoint of round {candidate} is ahead of "
                              f"history.jsonl (rounds 1..{len(history)}); deleted it, the rounds after "
                              f"{len(history)} are recomputed.", stacklevel=2)
                self.manager.delete(candidate)
        if ahead:
            sync_processes("fedjaxpriv: checkpoints ahead of the history deleted")
            self.manager.reload()
        restored, step = None, 0
        for candidate in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored, step = self._read_checkpoint(candidate, template), candidate
                break
            except Exception as error:  # noqa: BLE001 -- whatever fails to read, the checkpoint is unusable
                aside = self._set_aside(candidate) if self.writer else "aside"
                sync_processes(f"fedjaxpriv: checkpoint {candidate} set aside")
                self.manager.reload()
                if self.writer:
                    warnings.warn(f"{self.checkpoint_dir}: the checkpoint of round {candidate} is unreadable "
                                  f"({type(error).__name__}: {_first_sentence(error)}); moved it to {aside} and "
                                  "fell back to an older one.", stacklevel=2)
        if restored is None and history and self.writer:
            warnings.warn(f"{self.out_dir}: no usable checkpoint for history.jsonl's rounds 1..{len(history)}; "
                          "starting over from round 0.", stacklevel=2)
        # Every process has read history.jsonl before process 0 cuts it.
        sync_processes("fedjaxpriv: history read")
        if self.writer and (problems or len(history) > step):
            self._truncate_history(history[:step])
        self.rounds = step
        if restored is None:
            return None
        return restored["state"], history[:step], dict(restored["privacy"])

    def _read_checkpoint(self, step: int, template: Any) -> Any:
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        with library_threads_quiet():
            return self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), privacy=ocp.args.JsonRestore()))

    def _set_aside(self, step: int) -> str:
        source = os.path.join(self.checkpoint_dir, str(step))
        target, n = source + UNREADABLE_SUFFIX, 1
        while os.path.exists(target):
            target, n = f"{source}{UNREADABLE_SUFFIX}-{n}", n + 1
        os.replace(source, target)
        return target

    def _truncate_history(self, records: list[Record]) -> None:
        atomic_write(self.history_path, "".join(record_line(r) for r in records))

    # -- writing ---------------------------------------------------------------------------------------------
    def append(self, record: Record) -> None:
        """Appends the record of the next round (``rounds + 1``) to history.jsonl, durably."""
        if self.rounds is None:
            raise RuntimeError("call RunStore.restore before appending to a resumed run's history.")
        if record["round"] != self.rounds + 1:
            raise ValueError(f"history.jsonl holds rounds 1..{self.rounds}: round {record['round']} cannot "
                             "follow.")
        if self.writer:
            append_line(self.history_path, record_line(record))
        self.rounds += 1

    def truncate(self, rounds: int) -> None:
        """Cuts history.jsonl back to its first ``rounds`` records (atomically)."""
        if self.rounds is None or not 0 <= rounds <= self.rounds:
            raise ValueError(f"cannot cut history.jsonl (rounds 1..{self.rounds}) to {rounds} rounds.")
        if self.writer:
            self._truncate_history(read_history(self.history_path)[:rounds])
        self.rounds = rounds

    def save(self, state: Any, privacy: dict[str, Any]) -> None:
        """Checkpoints the server state and the privacy spent so far (``PrivacyTracker.state``) under the round
        number (the number of finished rounds): a resumed run continues both from the same round. The round's
        history record must be written first; saving a round already saved does nothing."""
        step = int(state.round)
        if self.rounds is None or step > self.rounds:
            raise ValueError(f"round {step} cannot be checkpointed before its history record (history.jsonl "
                             f"holds rounds 1..{self.rounds}).")
        if step in self.manager.all_steps():
            return
        if self.writer:
            self._remove_temporary_checkpoints()  # a save cut short in this process (without deferred signals)
        sync_processes(f"fedjaxpriv: saving round {step}")
        try:
            with library_threads_quiet():
                self.manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), privacy=ocp.args.JsonSave(privacy)), force=True)
                self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 -- orbax raises ValueError for what the OS reports
            cause = str(error).rsplit(": ", 1)[-1] if "os_error_code" in str(error) else _first_sentence(error)
            raise OSError(f"{self.checkpoint_dir}: could not write the checkpoint of round {step} ({cause}); once "
                          "that is fixed, the same command resumes from the checkpoint of round "
                          f"{self.latest_checkpoint() or 0} (the rounds after it are computed again).") from error

    def latest_checkpoint(self) -> int | None:
        """The round of the latest checkpoint (None if there is none)."""
        return self.manager.latest_step()

    def close(self, per_client: dict[str, np.ndarray] | None = None) -> None:
        """Finishes the run files (history.csv, and clients.csv with per-client arrays, e.g. epsilons) and
        releases the directory's lock. Calling it again does nothing."""
        if not self.writer:  # only process 0 writes the run's files; the others close their checkpoint manager
            if self.manager is not None:
                manager, self.manager = self.manager, None
                manager.close()
            return
        if self._lock is None:
            return
        try:
            self.manager.close()
            history = read_history(self.history_path, warn=False)
            if history:
                _write_csv_atomically(os.path.join(self.out_dir, "history.csv"), history)
            if per_client:
                num_clients = len(next(iter(per_client.values())))
                rows = [{"client": i, **{k: v[i] for k, v in per_client.items()}} for i in range(num_clients)]
                _write_csv_atomically(os.path.join(self.out_dir, "clients.csv"), rows)
            ended = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            self._record_session({"ended_at": ended, "last_round": len(history)}, update_last=True)
        finally:
            self._unlock()

    def _record_session(self, fields: Record, update_last: bool = False) -> None:
        """Adds a session to run.json (or updates the last one), atomically; an unreadable run.json is replaced."""
        sessions = read_sessions(self.out_dir)
        if update_last and sessions:
            sessions[-1].update(fields)
        elif not update_last:
            sessions.append(fields)
        atomic_write(os.path.join(self.out_dir, RUN_INFO_FILE),
                     json.dumps({"sessions": jsonable(sessions)}, indent=2))

    def _unlock(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            locks.release(lock)


def sync_processes(name: str) -> None:
    """Waits until every process of a multi-process run has reached the point called ``name`` (nothing in a
    single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _first_sentence(error: BaseException, limit: int = 200) -> str:
    """An error's message up to its first ". See" (TensorStore appends a dump of its spec) and ``limit``
    characters."""
    return str(error).split(". See ")[0][:limit]


def _write_csv_atomically(path: str, rows: list[Record]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write_csv(tmp, rows)
    os.replace(tmp, path)
