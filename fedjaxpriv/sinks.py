"""Logging sinks: where a run's per-round records go besides its history.

``run.log`` selects them by name (``SINK_NAMES``):

- ``jsonl``: the run directory's history.jsonl / history.csv (``storage.RunStore``). Always on: it is what a
  run resumes from, so naming it is optional and the config always lists it.
- ``tensorboard``: TensorBoard event files in ``<out_dir>/tensorboard/`` (tensorboardX; ``pip install
  "fedjaxpriv[tensorboard]"``). One scalar per finite numeric metric, tagged with the metric's name, at step =
  round; strings (``epsilon_basis`` ...) and non-finite values (an infinite epsilon) are left out.
- ``wandb``: a Weights & Biases run in offline mode, in ``<out_dir>/wandb/offline-run-*`` (``pip install
  "fedjaxpriv[wandb]"``; upload it later with ``wandb sync``). It never logs in or touches the network. Its config
  is the experiment's config, its name ``config.name``; it logs the same metrics as TensorBoard at step = round.

A sink is anything with ``write(round, record)`` and ``close()`` (``Sink``). To log elsewhere, pass your own:
``Experiment.run(out_dir, sinks=[MySink()])``. The run calls ``write`` once per finished round (after its record
is in the history and, when due, its checkpoint; the same records callbacks get, the records of a resumed run's
earlier session excluded), with a read-only view of the record, and calls ``close`` exactly once when it ends,
fails or is interrupted: the run owns the sinks it is given.

Checks come first: ``check_sinks`` raises ValueError, before the run directory is opened or anything trains, for
an unknown sink name, a sink whose package is not installed, and a log directory that cannot be written. A run
without a run directory (``out_dir=None``: in memory, as attack evaluations and audits run their models) writes
no files, so file-writing sinks are skipped there with a warning that names them.

Resuming. A run that resumes from a checkpoint after round k gives the sinks rounds k+1 onward only. TensorBoard:
the new session's event file starts with a purge marker at step k+1 (``SummaryWriter(purge_step=k+1)``), so
TensorBoard drops whatever an earlier session logged at rounds > k (rounds it logged but never checkpointed, now
recomputed) and every round shows once; a fresh start (``resume=False``) purges from step 1. W&B offline runs
cannot be resumed or amended, so each session writes a new offline run holding its own rounds (k+1 onward); rounds
an earlier session logged past its last checkpoint stay in that earlier offline run.

tensorboardX and wandb are imported only when their sink is selected: ``import fedjaxpriv`` imports neither.
"""

from __future__ import annotations

import math
import numbers
import os
import time
import types
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from fedjaxpriv.config import ExperimentConfig

SINK_NAMES: tuple[str, ...] = ("jsonl", "tensorboard", "wandb")
# The sinks that write files of their own: their subdirectory of the run directory, the module they import, the
# package that provides it and the pip extra that installs it.
_FILE_SINKS: dict[str, tuple[str, str, str, str]] = {
    "tensorboard": ("tensorboard", "tensorboardX", "tensorboardX", "tensorboard"),
    "wandb": ("wandb", "wandb", "wandb", "wandb"),
}


@runtime_checkable
class Sink(Protocol):
    """Receives each finished round's record (``write``) and is closed once at the end of the run (``close``)."""

    def write(self, round: int, record: Mapping[str, Any]) -> None:
        ...

    def close(self) -> None:
        ...


def numeric_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's finite numbers (bools and the round number itself left out), as floats."""
    return {key: float(value) for key, value in record.items()
            if key != "round" and isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(float(value))}


class TensorBoardSink:
    """TensorBoard event files in ``log_dir``: a scalar per finite numeric metric, tag = its name, step = round.

    Args:
      log_dir: the directory (created if missing).
      first_round: the first round this session writes; TensorBoard drops an earlier session's events from this
        step on (``purge_step``), so a resumed run shows each round once.
    """

    def __init__(self, log_dir: str, *, first_round: int = 1) -> None:
        from tensorboardX import SummaryWriter

        self.log_dir = log_dir
        # A unique suffix: event files are named by the second they were opened in, and two sessions of one run
        # may open in the same second (TensorBoard reads a directory's files in name order: oldest first).
        self._writer = SummaryWriter(log_dir, purge_step=first_round, filename_suffix=f".{time.time_ns()}")

    def write(self, round: int, record: Mapping[str, Any]) -> None:
        for tag, value in numeric_metrics(record).items():
            self._writer.add_scalar(tag, value, global_step=round)
        self._writer.flush()  # a round at a time, for a TensorBoard watching the run

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """A Weights & Biases run in offline mode (never online), under ``<run_dir>/wandb/``.

    Args:
      run_dir: the directory W&B writes under (it adds ``wandb/offline-run-<time>-<id>/``).
      config: the run's config (``ExperimentConfig.to_dict()``), recorded as the W&B run's config.
      name: the W&B run's display name.
    """

    def __init__(self, run_dir: str, config: Mapping[str, Any], name: str) -> None:
        import wandb

        # create_new: a run of its own, never the caller's active W&B run (which W&B would otherwise return or
        # finish); console off: W&B leaves stdout and stderr alone.
        self.run = wandb.init(mode="offline", dir=run_dir, config=dict(config), name=name, reinit="create_new",
                              settings=wandb.Settings(console="off"))
        self.run_dir = self.run.dir

    def write(self, round: int, record: Mapping[str, Any]) -> None:
        self.run.log(numeric_metrics(record), step=round)

    def close(self) -> None:
        self.run.finish()


def _names_text(names: Sequence[str]) -> str:
    return repr(list(names))


def _check_writable(name: str, names: Sequence[str], path: str) -> None:
    """Raises ValueError unless ``path`` is (or can be created as) a directory this process can write."""
    existing = path
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK):
        return
    reason = (f"{existing!r} is not a directory" if os.path.exists(existing) and not os.path.isdir(existing)
              else f"{existing!r} is not writable")
    raise ValueError(f"run.log={_names_text(names)} is invalid here: the {name} sink writes to {path!r}, which "
                     f"cannot be created ({reason}); allowed: a run directory (out_dir, --out) that can be written.")


def check_sinks(names: Sequence[str], run_dir: str | None) -> list[str]:
    """Checks the sinks ``names`` (``run.log``) for a run writing ``run_dir``, without writing anything.

    Returns:
      The names of the sinks that will write (those that write files are left out when ``run_dir`` is None, with
      a warning).

    Raises:
      ValueError: an unknown name (naming ``run.log``, the value and the allowed names), a sink whose package
        cannot be imported (naming the pip extra that installs it), or a log directory that cannot be created or
        written (naming it).
    """
    names = list(names)
    unknown = [n for n in names if n not in SINK_NAMES]
    if unknown:
        raise ValueError(f"run.log={_names_text(names)} is invalid; allowed: a list, each one of {list(SINK_NAMES)} "
                         f"(unknown: {unknown}).")
    active = [n for n in SINK_NAMES if n in names]
    filed = [n for n in active if n in _FILE_SINKS]
    if run_dir is None and filed:
        warnings.warn(f"run.log={_names_text(names)}: this run has no run directory (out_dir=None), so the {filed} "
                      "sink(s) write nothing; pass out_dir (--out) to log there.", stacklevel=3)
        return [n for n in active if n not in _FILE_SINKS]
    for name in filed:
        subdir, module, package, extra = _FILE_SINKS[name]
        try:
            __import__(module)
        except ImportError as error:
            raise ValueError(f"run.log={_names_text(names)} is invalid here: the {name!r} sink needs the {package} "
                             f"package, which cannot be imported ({error}); install it with "
                             f"pip install \"fedjaxpriv[{extra}]\", or leave {name!r} out of run.log.") from None
        _check_writable(name, names, os.path.join(os.path.abspath(run_dir), subdir))
    return active


def open_sinks(names: Sequence[str], run_dir: str | None, config: ExperimentConfig, *,
               first_round: int = 1) -> list[Sink]:
    """The sinks ``names`` (``run.log``) of a run of ``config`` writing ``run_dir``, opened (after
    ``check_sinks``). ``jsonl`` is the run directory's own history and opens nothing here.

    Args:
      first_round: the first round this session will write (k+1 when resuming after round k).

    Raises:
      ValueError: as ``check_sinks``, or a log directory that could not be created after all; any sink opened
        before the failure is closed.
    """
    active = check_sinks(names, run_dir)
    sinks: list[Sink] = []
    try:
        for name in active:
            if name not in _FILE_SINKS:
                continue
            log_dir = os.path.join(os.path.abspath(str(run_dir)), _FILE_SINKS[name][0])
            try:
                os.makedirs(log_dir, exist_ok=True)
            except OSError as error:
                raise ValueError(f"run.log={_names_text(list(names))} is invalid here: the {name} sink writes to "
                                 f"{log_dir!r}, which cannot be created ({error.strerror or error}); allowed: a run "
                                 "directory (out_dir, --out) that can be written.") from None
            if name == "tensorboard":
                sinks.append(TensorBoardSink(log_dir, first_round=first_round))
            else:
                sinks.append(WandbSink(os.path.abspath(str(run_dir)), config.to_dict(), config.name))
    except BaseException:
        close_sinks(sinks)
        raise
    return sinks


def check_user_sinks(sinks: Sequence[Any]) -> None:
    """Raises ValueError unless every entry of ``sinks`` (``Experiment.run(sinks=...)``) is a ``Sink``."""
    for i, sink in enumerate(sinks):
        if not isinstance(sink, Sink):
            raise ValueError(f"sinks[{i}]={sink!r} is invalid; allowed: an object with write(round, record) and "
                             "close() (fedjaxpriv.sinks.Sink).")


def sink_callback(sink: Sink):
    """``sink`` as a run callback ``(experiment, record)``: writes the record (read-only) at its round."""

    def callback(experiment: Any, record: Mapping[str, Any]) -> None:
        del experiment
        sink.write(int(record["round"]), types.MappingProxyType(record))

    return callback


def close_sinks(sinks: Sequence[Sink]) -> None:
    """Closes every sink (each once, all of them even if one fails); re-raises the first failure."""
    failure: BaseException | None = None
    for sink in sinks:
        try:
            sink.close()
        except BaseException as error:  # noqa: BLE001 -- the others still close
            failure = failure or error
    if failure is not None:
        raise failure
