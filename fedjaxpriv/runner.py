"""The run loop over an experiment's round program: store, signals, sinks, progress, divergence.

``run_experiment(experiment, out_dir)`` (``Experiment.run``) restores the latest checkpoint of ``out_dir``, then
steps round after round, committing each (history record, then checkpoint when due) with signals deferred from the
step to the commit, so an interrupted run resumes without losing or repeating a finished round.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import jax
import numpy as np

from fedjaxpriv import evaluation
from fedjaxpriv.config import ExperimentConfig
from fedjaxpriv.guards import (LOSS_LIMIT, DivergenceError, Signals, divergence, divergence_message, explosion,
                               interrupt_behind, pause_point)
from fedjaxpriv.parallel import replicate
from fedjaxpriv.privacy.basis import largest_epsilon
from fedjaxpriv.program import Tap
from fedjaxpriv.simulation import ServerState

if TYPE_CHECKING:
    from fedjaxpriv.experiment import Experiment

Record = dict[str, Any]

Callback = Callable[["Experiment", Record], None]


@dataclasses.dataclass
class Results:
    """What a run returns.

    Attributes:
      config: the experiment configuration.
      history: one record per finished round (dicts of floats/ints; evaluation keys on evaluated rounds).
      params: final global model parameters.
      out_dir: where history.jsonl/history.csv/config.json were written (None if not written).
      taps: attack taps by round number (``run.tap_rounds``/``run.tap_clients``).
      clients: per-client arrays [C], the columns of ``clients.csv``: ``participations``, ``local_steps`` and, with
        DP, each level's epsilon beside its basis (``epsilon``, ``epsilon_basis``, ``local_epsilon``,
        ``client_level_epsilon`` ...; ``PrivacyTracker.per_client``).
    """

    config: ExperimentConfig
    history: list[Record]
    params: Any
    out_dir: str | None = None
    taps: dict[int, Tap] = dataclasses.field(default_factory=dict)
    clients: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def final(self, key: str) -> float:
        """The last recorded value of a metric."""
        for record in reversed(self.history):
            if key in record:
                return record[key]
        raise KeyError(f"metric {key!r} was never recorded; recorded: {sorted(self.history[-1])}.")


def run_experiment(experiment: Experiment, out_dir: str | None = None, *, resume: bool = True,
                   progress: bool = True, callbacks: Sequence[Callback] = (), sinks: Sequence[Any] = (),
                   rounds: int | None = None, loss_limit: float = LOSS_LIMIT, extend: bool = False) -> Results:
    """Runs (or resumes) ``experiment`` (``Experiment.run``).

    A round is committed by appending its history record and then, when due, its checkpoint. SIGINT and
    SIGTERM (``guards.Signals``) stop the run at the end of the round they arrive in, as ``RunInterrupted`` (a
    ``KeyboardInterrupt``), after checkpointing it: the directory's latest checkpoint is its last record.

    Args:
      out_dir: directory for config.json, history.jsonl/csv and checkpoints (None: keep in memory).
      resume: continue from the latest checkpoint in ``out_dir`` if its config matches; False deletes
        the earlier run's files there and starts over.
      progress: show a progress bar with the latest accuracy.
      callbacks: functions called as ``cb(experiment, record)`` after every round; ``experiment.latest_params``
        is then the round's global model (valid during the call: the next round may reuse its buffers).
      sinks: the user's own logging sinks (``fedjaxpriv.sinks.Sink``: ``write(round, record)``, ``close()``),
        besides those ``run.log`` names; each gets every round of this session once (before the callbacks) and
        is closed when the run ends, fails or is interrupted.
      rounds: stop after this many rounds, at most ``config.run.rounds`` (the default).
      loss_limit: a loss above it (or a non-finite loss or parameter) stops the run with ``DivergenceError``
        (default ``guards.LOSS_LIMIT``, about 1.8e19).
      extend: ``out_dir`` may hold a run of this config with fewer ``run.rounds``: it resumes from there and
        goes on to this config's rounds, as a run planned that long would (refused, naming the field, where
        something was planned over the old number of rounds: ``config.extension_problem``).

    Raises:
      DivergenceError: training diverged; the diverged round's record ends the history (NaN as null); it is
        never checkpointed, and the checkpoints of earlier rounds are kept.
      RunDirectoryLocked: another process is writing ``out_dir``.
      ValueError: before anything is written, a ``run.log`` sink that cannot log (its package missing, its
        directory unwritable: ``sinks.check_sinks``) or a sink passed in that is not a ``Sink``.
    """
    from fedjaxpriv.sinks import check_sinks, check_user_sinks, close_sinks, open_sinks, sink_callback
    from fedjaxpriv.storage import RunStore

    if out_dir is not None and not isinstance(out_dir, (str, os.PathLike)):
        raise ValueError(f"out_dir={out_dir!r} is not allowed: a directory path, or None to keep the run in "
                         "memory (the number of rounds is rounds=...).")
    out_dir = os.fspath(out_dir) if out_dir is not None else None
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer))
                               or rounds < 1):
        raise ValueError(f"rounds={rounds!r} is not allowed: a positive number of rounds, or None for "
                         f"run.rounds={experiment.config.run.rounds}.")
    if isinstance(loss_limit, bool) or not isinstance(loss_limit, (int, float)) or not loss_limit > 0:
        raise ValueError(f"loss_limit={loss_limit!r} is not allowed: a positive number (default {LOSS_LIMIT:g}).")
    if rounds is not None and rounds > experiment.config.run.rounds:
        raise ValueError(f"rounds={rounds} is more than run.rounds={experiment.config.run.rounds}, the number the run "
                         "is planned and recorded for: raise run.rounds (with extend=True / --continue to go on "
                         "with a finished run in out_dir).")
    if extend and not resume:
        raise ValueError("extend=True (--continue) goes on from the run in out_dir; resume=False (--no-resume) "
                         "deletes it: allowed: one of them.")
    total = int(rounds) if rounds is not None else experiment.config.run.rounds
    check_user_sinks(sinks)
    from fedjaxpriv.distributed import check_same_everywhere

    check_same_everywhere({"out_dir": out_dir and os.path.abspath(out_dir), "resume": resume, "rounds": rounds})
    logs = check_sinks(experiment.config.run.log, out_dir)
    writers: list[Any] = list(sinks)  # closed in the end, whatever happens; the configured ones join them
    signals = Signals()
    signals.install()
    store: RunStore | None = None
    try:
        with signals.deferred():  # the store is opened (locked, reconciled) whole or not at all
            store = RunStore(out_dir, experiment.config, fresh=not resume, extend=extend) if out_dir else None
            state, history = experiment.fresh_state(experiment.initial_params), []  # one row per client
            experiment.privacy = experiment.new_privacy_tracker()
            if store is not None and resume:  # a checkpoint holds what saved_state keeps: read as a copy per device
                restored = store.restore(replicate(state, experiment.mesh))
                if restored is not None:
                    state, history, privacy_state = restored
                    experiment.privacy.restore(privacy_state)
            state = experiment.place_state(state)  # padded and split over the devices as the run needs
            if jax.process_index() == 0:  # a multi-process run logs from process 0, as it writes its files
                writers[:0] = open_sinks(logs, out_dir, experiment.config, first_round=len(history) + 1)
        callbacks = [*map(sink_callback, writers), *callbacks]
        state, taps = run_rounds(experiment, state, history, store, signals, total, progress, callbacks, loss_limit)
    finally:
        try:
            with signals.deferred():
                close_sinks(writers)
        finally:
            try:
                if store is not None:
                    with signals.deferred():
                        clients = experiment.privacy.per_client()
                        store.close(clients)
            finally:
                signals.uninstall()
    problem = dp_at_chance(experiment, history)
    if problem:
        warnings.warn(problem, stacklevel=2)
    return Results(experiment.config, history, experiment.released_params(state), out_dir, taps,
                   clients if store is not None else experiment.privacy.per_client())


def run_rounds(experiment: Experiment, state: ServerState, history: list[Record], store: Any, signals: Signals,
               total: int, progress: bool, callbacks: Sequence[Callback],
               loss_limit: float) -> tuple[ServerState, dict[int, Tap]]:
    """The rounds after ``state``, each committed to ``history`` and ``store``; returns (state, taps).

    From the step (which donates ``state``) to the commit, signals wait: the round finishes, then stops.
    """
    committed = int(state.round)  # rounds whose records are in the history (and history.jsonl)
    saved = committed if store is not None else 0  # the round of the latest checkpoint
    live = True  # whether ``state`` and ``experiment.privacy`` are those of round ``committed``
    taps: dict[int, Tap] = {}
    bar = _progress(range(committed, total), progress and jax.process_index() == 0, initial=committed,
                    total=total)
    # The initial model's loss: the scale a loss explosion is measured against (``guards.explosion``).
    factor = experiment.config.run.divergence_factor
    test = experiment.test
    baseline = (evaluation.evaluate(experiment.model.apply, experiment.initial_params, test.x, test.y,
                                    task=experiment.task)["loss"] if factor is not None else math.nan)

    def at_chance(accuracy: float) -> bool:
        return evaluation.at_chance(accuracy, experiment.test.y)[0]

    headline = experiment.headline_metric
    accuracy = next((r[headline] for r in reversed(history) if headline in r), None)
    try:
        for r in bar:
            signals.check()  # a signal whose exception was swallowed where it landed stops the run here
            pause_point(signals, "train", r + 1)
            cohort, skipped = experiment.round_cohort(r)
            with signals.deferred():
                tapped: list[int] = []
                if r + 1 in experiment.config.run.tap_rounds and experiment.config.run.tap_clients:
                    # Only what the observer can see: the tapped clients that take part in this round.
                    sampled = set(cohort.ids[cohort.mask].tolist())
                    tapped = list(dict.fromkeys(c for c in experiment.config.run.tap_clients if c in sampled))
                live = False
                state, record, tap = experiment.observed_step(state, r, cohort, tapped)
                if tap is not None:
                    taps[r + 1] = tap
                if skipped:
                    record["budget_skipped"] = skipped
                if (r + 1) % experiment.config.run.eval_every == 0 or r + 1 == total:
                    pause_point(signals, "evaluate", r + 1)
                    record.update(experiment.evaluate(experiment.released_params(state), state))
                problem = divergence(record, state.params, loss_limit) or explosion(
                    history, record, baseline, experiment.config.run.divergence_factor, at_chance)
                history.append(record)
                if store is not None:
                    store.append(record)
                if problem is not None:  # the diverged round is recorded, never checkpointed
                    where = store.out_dir if store is not None else None
                    raise DivergenceError(divergence_message(problem, r + 1, experiment.config, saved, where), r + 1,
                                          record)
                committed, live = r + 1, True
                every = experiment.config.run.checkpoint_every
                if store is not None and ((every and (r + 1) % every == 0) or r + 1 == total):
                    pause_point(signals, "checkpoint", r + 1)
                    store.save(experiment.saved_state(state), experiment.privacy.state())
                    saved = r + 1
            experiment.latest_params = experiment.released_params(state)  # what callbacks read of the round's model
            for callback in callbacks:
                callback(experiment, record)
            accuracy = record.get(headline, accuracy)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(progress_fields(record, accuracy), refresh=False)
    except BaseException as error:
        if interrupt_behind(error) is None:
            raise
        # Make the latest checkpoint the history's last round: checkpoint the committed round, or, when an
        # interrupt raised inside a round (not by a signal) has left its state donated, cut the history back
        # to the latest checkpoint. A second signal waits until that is done.
        with signals.deferred():
            if store is not None and committed > saved:
                if live:
                    store.save(experiment.saved_state(state), experiment.privacy.state())
                else:
                    store.truncate(saved)
        raise
    return state, taps


def dp_at_chance(experiment: Experiment, history: Sequence[Record]) -> str | None:
    """What to tell the user when a run with DP ends with a test accuracy at chance (``evaluation.at_chance``):
    the figures and the knobs that usually matter for each mechanism on; None otherwise (no DP, no accuracy)."""
    accuracy = next((r["test_accuracy"] for r in reversed(history) if "test_accuracy" in r), None)
    if accuracy is None:
        return None
    chance, majority = evaluation.at_chance(accuracy, experiment.test.y)
    c, s, m = experiment.config.client, experiment.config.server, experiment.config.message
    knobs = []
    if experiment.sample_level is not None and np.any(experiment.sample_level.private):
        noise = np.asarray(experiment.sample_level.noise_multipliers)[experiment.sample_level.private]
        knobs.append(f"DP-SGD with clip {c.dp_clip_norm} and noise multipliers {np.min(noise):.3g}-{np.max(noise):.3g}"
                     " (client.dp_clip_norm: about the median per-example gradient norm; client.batch_size: the noise"
                     " per example falls as the batch grows; client.lr; client.target_epsilon or dp_noise_multiplier)")
    if experiment.client_level is not None and experiment.client_level.private:
        knobs.append(f"DP-FedAvg with clip {s.central_clip_norm} (server.central_clip_norm; "
                     "server.clients_per_round: the noise per client falls as the cohort grows; server.lr; "
                     "server.target_epsilon or central_noise_multiplier)")
    if experiment.local_dp is not None and np.any(experiment.local_dp.private):
        knobs.append(f"local DP noise with message clip {m.clip_norm} (message.clip_norm, "
                     "message.local_noise_multiplier)")
    if not chance or not knobs:
        return None
    return (f"test_accuracy {accuracy:.3f} after {len(history)} rounds is at chance (always predicting the most "
            f"frequent test label scores {majority:.3f}): the model learned nothing under " + "; ".join(knobs) + ".")


def progress_fields(record: Record, accuracy: float | None = None) -> dict[str, str]:
    """The round's figures beside the progress bar: the training loss and the largest epsilon so far with its
    level (every round), and ``accuracy``, the test accuracy of the last evaluated round (None: none yet)."""
    fields = {"loss": f"{record['train_loss']:.3f}"} if "train_loss" in record else {}
    largest = largest_epsilon(record)
    if largest is not None:
        value, level, _ = largest
        fields["eps"] = f"{value:.3g} ({level})" if math.isfinite(value) else f"inf ({level}: no guarantee)"
    if accuracy is not None:
        fields["acc"] = f"{accuracy:.4f}"
    return fields


def _progress(iterable: Iterable[int], enabled: bool, **kwargs: Any):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    # The first round of a session compiles the round (seconds to a minute): the bar says so until its figures come.
    return tqdm(iterable, desc="rounds", unit="round", postfix="compiling the round", **kwargs)
