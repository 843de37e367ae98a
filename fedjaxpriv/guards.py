"""What stops a run cleanly: divergence, interrupt signals, and the pause points that tests stop a run at.

- ``divergence`` finds a non-finite or absurdly large loss, or non-finite server parameters; the run loop raises
  ``DivergenceError`` (a ``ValueError``: the command line prints it on one line) before checkpointing that state.
- ``Signals`` turns SIGINT and SIGTERM into ``RunInterrupted`` (a ``KeyboardInterrupt``) and holds them back while a
  round runs and is committed (its history record and checkpoint written): the run stops between rounds, never
  with a state the step has donated, a round evaluated but unrecorded, or a checkpoint half-written.
- ``pause_point`` is a test hook: with ``FEDJAXPRIV_PAUSE_AT=<point>:<round>:<marker file>`` in the environment the
  run creates the marker file when it reaches ``point`` ("train", "evaluate" or "checkpoint") of round ``round``
  and waits there (up to a minute) for a signal, so a test can interrupt or kill it exactly at that point.
- ``install_report_hooks`` delivers again a signal whose exception landed where Python swallows it, and keeps
  what orbax reports instead of raising (its abandoned coroutines and threads while a checkpoint fails to read)
  off the terminal unless ``fedjaxpriv --verbose``; ``library_threads_quiet`` does the same for what
  TensorStore's C++ threads print.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# A finite loss above sqrt(float32 max) ~ 1.8e19 counts as divergence: squaring numbers of that size (squared
# norms for clipping and update norms, Adam's second moments, squared errors) overflows float32, so the run is a
# step away from inf/NaN; the library's losses start near log(num_classes) (2.3 for 10 classes), so no run that
# still trains comes within many orders of magnitude of it.
LOSS_LIMIT = float(np.sqrt(np.finfo(np.float32).max))
LOSS_KEYS = ("train_loss", "test_loss")
PAUSE_ENV = "FEDJAXPRIV_PAUSE_AT"


class DivergenceError(ValueError):
    """Training diverged. Attributes: ``round`` (1-based), ``record`` (that round's history record)."""

    def __init__(self, message: str, round_: int, record: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.round, self.record = round_, dict(record)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal (``signum``: SIGINT or SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    def __reduce__(self) -> tuple:  # pickled by signal number (a sweep worker's run reaches the sweep this way)
        return (type(self), (self.signum,))


def interrupt_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The interrupt that ``error`` is, or that caused it: a signal's ``KeyboardInterrupt`` raised inside a
    library's C code can come out as that library's own error (a C extension interrupted while it initialises
    raises ``ImportError("initialization failed")`` from it). Follows ``__cause__`` and ``__context__``; None when
    no interrupt is behind ``error``."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        pending.extend((current.__cause__, current.__context__))
    return None


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in leaves] or [True]))


def divergence(record: Mapping[str, Any], params: Any, loss_limit: float = LOSS_LIMIT) -> str | None:
    """What shows that training diverged (losses in ``record`` that are not finite or exceed ``loss_limit`` in
    magnitude; non-finite ``params``), or None."""
    problems = [f"{key}={record[key]:g}" for key in LOSS_KEYS
                if key in record and not abs(float(record[key])) <= loss_limit]
    if not bool(_all_finite(params)):
        problems.append("the server parameters are not finite")
    return ", ".join(problems) or None


# Rounds in a row with a training loss above run.divergence_factor x the initial model's loss that count as
# divergence when no accuracy says so sooner (``explosion``).
EXPLOSION_ROUNDS = 3


def explosion(history: Sequence[Mapping[str, Any]], record: Mapping[str, Any], baseline: float,
              factor: float | None, at_chance: Callable[[float], bool]) -> str | None:
    """Divergence below overflow: the training loss exceeded ``factor`` x ``baseline`` (the initial model's loss) in
    some round so far, and now the test accuracy is at chance (``at_chance(accuracy)``), or the loss has stayed
    above that for ``EXPLOSION_ROUNDS`` rounds in a row (``record`` is the round just run, after ``history``).
    None: no sign of it, or ``factor`` None (off)."""
    if factor is None or not baseline > 0 or not math.isfinite(baseline):
        return None
    limit = factor * baseline
    rounds = [*history, record]
    peak = next((r for r in rounds if float(r.get("train_loss", 0.0)) > limit), None)
    if peak is None:
        return None
    if "test_accuracy" in record and at_chance(float(record["test_accuracy"])):
        return (f"train_loss {float(peak['train_loss']):.3g} in round {peak.get('round', '?')} exceeded "
                f"{factor:g} x the initial model's loss {baseline:.3g} (run.divergence_factor) and test_accuracy "
                f"{float(record['test_accuracy']):.3f} is at chance")
    recent = rounds[-EXPLOSION_ROUNDS:]
    if len(recent) == EXPLOSION_ROUNDS and all(float(r.get("train_loss", 0.0)) > limit for r in recent):
        return (f"train_loss above {factor:g} x the initial model's loss {baseline:.3g} (run.divergence_factor) for "
                f"{EXPLOSION_ROUNDS} rounds in a row (now {float(record['train_loss']):.3g})")
    return None


def divergence_message(problem: str, round_: int, config: Any, saved: int, out_dir: str | None) -> str:
    """One line: the round, what diverged, what was kept, and the knobs that usually cause it."""
    c, s, m = config.client, config.server, config.message
    kept = (f"the last good checkpoint (round {saved}) is kept in {out_dir}" if out_dir and saved
            else "no checkpoint was saved")
    return (f"training diverged in round {round_}: {problem} (non-finite values, losses beyond {LOSS_LIMIT:.3g}, and "
            "a loss explosion per run.divergence_factor count as divergence; run.divergence_factor: null keeps "
            f"going); {kept}. Lower client.lr (now {c.lr}) or server.lr (now {s.lr}, optimizer {s.optimizer}), or "
            f"bound the updates with message.clip_norm (now {m.clip_norm}), client.dp_clip_norm (now {c.dp_clip_norm}) "
            f"or server.central_clip_norm (now {s.central_clip_norm}).")


def deliver_again(signum: int, delay_s: float = 0.01) -> None:
    """Sends ``signum`` to this process again after ``delay_s`` (from a timer thread): a signal that landed
    where its exception would be lost is handled again once the program has left that place."""
    timer = threading.Timer(delay_s, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def raise_interrupted(signum: int, frame: Any) -> None:
    """A signal handler that raises ``RunInterrupted``: the command line installs it for SIGINT and SIGTERM (with
    ``install_report_hooks``, so that one raised where it would be swallowed is delivered again); a run's
    ``Signals`` replaces it while it trains. It raises once: it hands both signals to ``stop_in_progress`` first,
    so that a second signal (an impatient user's) cannot cut the handling of the first one's exception (its
    ``except`` and ``finally`` blocks, the one line the command prints) with a traceback."""
    del frame
    swap_handlers(raise_interrupted, stop_in_progress)
    raise RunInterrupted(signum)


def stop_in_progress(signum: int, frame: Any) -> None:
    """The handler once an interrupt is on its way out: a further SIGINT or SIGTERM asks for the same stop, and is
    dropped."""
    del signum, frame


def swap_handlers(old: Any, new: Any) -> None:
    """SIGINT's and SIGTERM's handler becomes ``new`` where it is ``old`` (in the main thread; elsewhere nothing
    changes, as Python allows handlers to be set only there)."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is old:
                signal.signal(signum, new)


class Signals:
    """SIGINT and SIGTERM raise ``RunInterrupted`` while installed; inside ``deferred()`` they are held back and
    raised when the block ends. Installs only in the main thread, and only over the default handlers or
    ``raise_interrupted`` (a signal that is ignored, or handled by someone else, stays so)."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.received: int | None = None  # the first signal received while installed, kept
        self._depth = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        install_report_hooks()  # an interrupt raised where it would be swallowed is delivered again
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler, raise_interrupted):
                self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        """Puts back the handlers it replaced; once a signal has stopped the run, the command line's
        ``raise_interrupted`` comes back as ``stop_in_progress`` (the run's interrupt is on its way out)."""
        while self._previous:
            signum, handler = self._previous.popitem()
            if self.received is not None and handler is raise_interrupted:
                handler = stop_in_progress
            signal.signal(signum, handler)

    def check(self) -> None:
        """Raises ``RunInterrupted`` if a signal was received: one whose exception was swallowed where it landed
        (e.g. in a garbage-collection callback, which prints "Exception ignored" and goes on) still stops the
        run at the next check."""
        if self.received is not None:
            raise RunInterrupted(self.received)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.received is None:
            self.received = signum
        if self._depth:
            self.pending = signum
            return
        raise RunInterrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block that signals do not cut: one that arrives meanwhile is raised when the block is done."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if not self._depth and self.pending is not None:
            signum, self.pending = self.pending, None
            raise RunInterrupted(signum)


def pause_point(signals: Signals, point: str, round_: int) -> None:
    """The test hook described in the module docstring; does nothing unless ``FEDJAXPRIV_PAUSE_AT`` names this
    point and round."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    name, number, marker = spec.split(":", 2)
    if name != point or int(number) != round_:
        return
    with open(marker, "w") as f:
        f.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + 60.0
    while signals.pending is None and time.monotonic() < deadline:
        time.sleep(0.005)  # a signal outside a deferred block raises out of here


LOGGER = logging.getLogger("fedjaxpriv")
# Libraries whose abandoned coroutines and threads report failures that they also raise to their caller (orbax
# while a checkpoint fails to read or write: the caller warns or stops, naming the checkpoint).
QUIET_LIBRARIES = ("orbax", "tensorstore")


def _raised_in(traceback: Any, libraries: Sequence[str]) -> bool:
    """Whether any frame of ``traceback`` is in a file under one of ``libraries``' package directories."""
    while traceback is not None:
        path = traceback.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if any(f"/{name}/" in path for name in libraries):
            return True
        traceback = traceback.tb_next
    return False


# What TensorStore's C++ reader threads print (bypassing Python's hooks) when they complete reads that orbax
# abandoned after a failure, by calling into its event loop, closed by then: one traceback per read.
CLOSED_LOOP_LINES = ("Traceback (most recent call last):", "self._check_closed()", "in call_soon_threadsafe",
                     "in _check_closed", "raise RuntimeError('Event loop is closed')",
                     "RuntimeError: Event loop is closed")


def drop_closed_loop_tracebacks(text: str) -> str:
    """``text`` without the lines of its "Event loop is closed" tracebacks (``CLOSED_LOOP_LINES``; they may be
    interleaved, one thread's lines between another's): as many "Traceback" headers are dropped as there are
    such errors, and every other line is kept."""
    lines = text.splitlines(keepends=True)
    headers = sum(line.strip() == CLOSED_LOOP_LINES[-1] for line in lines)
    kept = []
    for line in lines:
        stripped = line.strip()
        if stripped == CLOSED_LOOP_LINES[0]:
            if headers:
                headers -= 1
                continue
        elif any(stripped == mark or stripped.endswith(mark) for mark in CLOSED_LOOP_LINES[1:]):
            continue
        kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def library_threads_quiet(settle_s: float = 0.05, limit_s: float = 1.0) -> Iterator[None]:
    """Inside, file descriptor 2 (stderr, written by Python and by C++ threads alike) goes to a temporary file;
    on exit its text is written back without the closed-loop tracebacks of abandoned reads
    (``drop_closed_loop_tracebacks``; all of it while ``LOGGER`` is enabled for DEBUG: ``fedjaxpriv --verbose``).
    After a failure inside, it waits until nothing has been written for ``settle_s`` seconds (at most
    ``limit_s``), so that the reads still in flight report while it holds the descriptor."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            deadline, size = time.monotonic() + limit_s, -1
            while time.monotonic() < deadline and os.fstat(held.fileno()).st_size != size:
                size = os.fstat(held.fileno()).st_size
                time.sleep(settle_s)
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace")
            if not LOGGER.isEnabledFor(logging.DEBUG):
                text = drop_closed_loop_tracebacks(text)
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()


class _ToDebug(logging.Filter):
    """Turns a logger's records with a traceback through ``QUIET_LIBRARIES`` into DEBUG records of ``LOGGER``
    (dropping them where they were); other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None or not _raised_in(record.exc_info[2], QUIET_LIBRARIES):
            return True
        LOGGER.debug("reported by %s: %s", record.name, record.getMessage(), exc_info=record.exc_info)
        return False


def install_report_hooks() -> None:
    """From now on in this process (calling it again does nothing):

    - an interrupt (``KeyboardInterrupt``, e.g. ``RunInterrupted``) raised where Python can only report it
      ("Exception ignored in" a garbage-collection or weakref callback or a ``__del__``: a signal that landed
      there) is not printed but its signal delivered again a moment later (``deliver_again``), so that it stops
      the program where it can;
    - exceptions that ``QUIET_LIBRARIES`` report instead of raising (unraisable exceptions of their abandoned
      coroutines, uncaught exceptions of their threads, asyncio's "exception was never retrieved" about their
      tasks, absl log records with their tracebacks) are shown only while ``LOGGER`` is enabled for DEBUG
      (``fedjaxpriv --verbose``); their failures are also raised to the caller, which tells the user (e.g. a
      warning naming the unreadable checkpoint).

    Anything else reaches the hooks installed before."""
    if getattr(sys.unraisablehook, "_fedjaxpriv", False):
        return
    previous_unraisable, previous_thread = sys.unraisablehook, threading.excepthook

    def shown(traceback: Any) -> bool:  # some come while the interpreter exits: printed by the hooks, not logged
        return LOGGER.isEnabledFor(logging.DEBUG) or not _raised_in(traceback, QUIET_LIBRARIES)

    def unraisable(info: Any) -> None:
        if info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt):
            swap_handlers(stop_in_progress, raise_interrupted)  # this one was lost: the next must raise
            deliver_again(getattr(info.exc_value, "signum", signal.SIGINT))
        elif shown(info.exc_traceback):
            previous_unraisable(info)

    def thread(args: Any) -> None:
        if shown(args.exc_traceback):
            previous_thread(args)

    unraisable._fedjaxpriv = True  # type: ignore[attr-defined]
    sys.unraisablehook, threading.excepthook = unraisable, thread
    for name in ("asyncio", "absl"):  # orbax logs its threads' failures through absl
        logging.getLogger(name).addFilter(_ToDebug())
