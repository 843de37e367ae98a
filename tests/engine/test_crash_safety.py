"""Crash safety of run directories: what a crash can leave is reconciled on resume, one writer at a time,
divergence stops a run, and real processes interrupted (SIGINT, SIGTERM) or killed (SIGKILL) when their files
reach a given state resume to exactly the run that was never interrupted.

The processes are forked, one per fault, from a helper process that has imported fedjaxpriv (JAX's backend starts
only in each child) and uses a persistent compilation cache, so a fault costs a fork and a cached compile rather
than a Python start. A signal is sent when a file appears or history.jsonl reaches a line count, or when the run
reports (``guards.PAUSE_ENV``) that it waits at a named point: never after a sleep.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

from fedjaxpriv.cli import main as cli_main
from fedjaxpriv.config import from_dict
from fedjaxpriv.experiment import Experiment
from fedjaxpriv.guards import PAUSE_ENV, DivergenceError
from fedjaxpriv.results import parse_history
from fedjaxpriv.storage import RunDirectoryLocked, RunStore

ROUNDS = 12
# Evaluated at rounds 4, 8, 12; checkpointed at 3, 6, 9, 12 (the latest two kept).
CONFIG = {"data": {"num_clients": 8}, "model": {"name": "logreg"}, "client": {"local_steps": 2, "batch_size": 8},
          "server": {"clients_per_round": 4}, "run": {"rounds": ROUNDS, "eval_every": 4, "checkpoint_every": 3}}


# -- helpers ---------------------------------------------------------------------------------------------------
def strict_json(line: str):
    """Parses one JSON line, refusing the NaN / Infinity that strict JSON does not have."""
    def refuse(constant):
        raise ValueError(f"bare {constant} in {line!r}")

    return json.loads(line, parse_constant=refuse)


def history_rounds(run_dir) -> list[int]:
    """The rounds in history.jsonl; every line must be a whole strict-JSON record."""
    path = os.path.join(run_dir, "history.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    assert text == "" or text.endswith("\n"), f"torn last line: {text[-80:]!r}"
    return [strict_json(line)["round"] for line in text.splitlines()]


def checkpoint_steps(run_dir) -> list[int]:
    path = os.path.join(run_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def assert_consistent(run_dir) -> None:
    """A directory left by an interrupt: the rounds 1..k, each once, and the latest checkpoint is round k."""
    rounds = history_rounds(run_dir)
    assert rounds == list(range(1, len(rounds) + 1))
    assert (checkpoint_steps(run_dir) or [0])[-1] == len(rounds)


def without_time(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "round_time_s"}


def assert_same_run(results, reference) -> None:
    """Every round once, the same records (but timing) and bit-identical final parameters."""
    assert [r["round"] for r in results.history] == list(range(1, ROUNDS + 1))
    assert history_rounds(results.out_dir) == list(range(1, ROUNDS + 1))
    for got, want in zip(results.history, reference.history):
        assert without_time(got) == without_time(want)
    leaves = zip(_leaves(results.params), _leaves(reference.params))
    for got, want in leaves:
        assert got.dtype == want.dtype and np.array_equal(got, want)


def _leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def wait_until(predicate, child=None, timeout: float = 120.0) -> None:
    """Polls the file state until ``predicate()`` holds (failing if ``child`` exited first)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if child is not None and child.exited():
            raise AssertionError(f"the run exited before the awaited state:\n{child.log()}")
        if time.monotonic() > deadline:
            raise AssertionError("the awaited file state never came")
        time.sleep(0.001)


# -- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def experiment():
    return Experiment(from_dict(CONFIG))


@pytest.fixture(scope="module")
def reference(experiment, tmp_path_factory):
    return experiment.run(str(tmp_path_factory.mktemp("reference") / "run"), progress=False)


@pytest.fixture
def finished(reference, tmp_path):
    """A copy of the reference run's finished directory, to damage."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference.out_dir, run_dir)
    return run_dir


def resume(experiment, run_dir):
    return experiment.run(str(run_dir), progress=False)


def keep_lines(run_dir, count: int, tail: str = "") -> None:
    path = run_dir / "history.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:count]) + tail)


# -- reconciling what a crash leaves ---------------------------------------------------------------------------
@pytest.mark.parametrize("rounds,problems", [
    ([1, 2, 3], 0),
    ([1, 2, 3, 2, 3, 4], 1),  # restarted from round 1's checkpoint without cutting the history
    ([1, 2, 4, 5], 1),  # a missing round ends the history
    ([1, 2, 3, 1], 1),
    ([2, 3], 1),
])
def test_history_keeps_the_rounds_that_form_1_to_k(rounds, problems):
    lines = [json.dumps({"round": r, "seen": i}) + "\n" for i, r in enumerate(rounds)]
    records, found = parse_history(lines)
    assert [r["round"] for r in records] == list(range(1, len(records) + 1))
    assert len(found) == problems
    expected = {(1, 2, 3): 3, (1, 2, 3, 2, 3, 4): 4, (1, 2, 4, 5): 2, (1, 2, 3, 1): 1, (2, 3): 0}[tuple(rounds)]
    assert len(records) == expected
    if rounds == [1, 2, 3, 2, 3, 4]:
        assert [r["seen"] for r in records] == [0, 3, 4, 5]  # the later records of a repeated round win


def test_torn_or_corrupt_lines_end_the_history_with_a_reason():
    whole = [json.dumps({"round": r, "loss": None, "eps": "inf"}) + "\n" for r in (1, 2)]
    records, problems = parse_history([*whole, '{"round": 3, "lo'])
    assert len(records) == 2 and "last line" in problems[0]
    assert np.isnan(records[0]["loss"]) and records[0]["eps"] == float("inf")  # null and "inf" read back
    records, problems = parse_history([whole[0], "garbage\n", whole[1]])
    assert len(records) == 1 and "line 2 of 3" in problems[0]


@pytest.mark.slow
def test_torn_last_line_is_dropped_and_the_uncovered_checkpoint_recomputed(experiment, reference, finished):
    path = finished / "history.jsonl"
    text = path.read_text()
    path.write_text(text[:len(text) - 40])  # round 12's line cut short, as by a crash of the machine
    with pytest.warns(UserWarning) as warned:
        results = resume(experiment, finished)
    messages = " | ".join(str(w.message) for w in warned)
    assert "last line is not a whole record" in messages
    assert "checkpoint of round 12 is ahead of history.jsonl" in messages
    assert_same_run(results, reference)
    assert checkpoint_steps(finished) == [9, 12]


@pytest.mark.slow
@pytest.mark.parametrize("kept", [10, 7, 0])
def test_history_shorter_than_the_checkpoints_falls_back_or_starts_over(experiment, reference, finished, kept):
    keep_lines(finished, kept)
    with pytest.warns(UserWarning) as warned:
        results = resume(experiment, finished)
    messages = [str(w.message) for w in warned]
    assert any("checkpoint of round 12 is ahead of history.jsonl" in m for m in messages)
    assert any("starting over" in m for m in messages) == (0 < kept < 9)  # 9 and 12 uncovered: from round 0
    assert_same_run(results, reference)


@pytest.mark.slow
def test_repeated_rounds_resume_from_the_checkpoint_they_cover(experiment, reference, finished):
    lines = (finished / "history.jsonl").read_text().splitlines(keepends=True)
    (finished / "history.jsonl").write_text("".join(lines + lines[9:]))  # rounds 1..12, 10, 11, 12
    with pytest.warns(UserWarning, match="repeats round 10"):
        results = resume(experiment, finished)
    assert_same_run(results, reference)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(experiment, reference, finished):
    for root, _, files in os.walk(finished / "checkpoints" / "12"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")
    with pytest.warns(UserWarning, match="checkpoint of round 12 is unreadable"):
        results = resume(experiment, finished)
    assert_same_run(results, reference)
    assert checkpoint_steps(finished) == [9, 12] and (finished / "checkpoints" / "12.unreadable").is_dir()


@pytest.mark.slow
def test_half_written_checkpoint_is_removed_and_its_round_recomputed(experiment, reference, finished):
    # A writer killed while saving round 12 leaves orbax's temporary directory and the history of round 12.
    tmp = finished / "checkpoints" / "12.orbax-checkpoint-tmp-1700000000"
    os.rename(finished / "checkpoints" / "12", tmp)
    results = resume(experiment, finished)
    assert not tmp.exists()
    assert_same_run(results, reference)


@pytest.mark.slow
def test_missing_unreadable_or_foreign_config_is_refused(experiment, finished):
    config_path = finished / "config.json"
    original = config_path.read_text()
    config_path.unlink()
    with pytest.raises(ValueError, match="no config.json"):
        resume(experiment, finished)
    config_path.write_text(original[:20])
    with pytest.raises(ValueError, match="config.json is unreadable"):
        resume(experiment, finished)
    other = from_dict({**CONFIG, "client": {**CONFIG["client"], "lr": 0.05}})
    config_path.write_text(json.dumps({"config_hash": other.config_hash(), "config": {}}))
    with pytest.raises(ValueError, match="different config"):
        resume(experiment, finished)
    assert history_rounds(finished) == list(range(1, ROUNDS + 1)) and checkpoint_steps(finished) == [9, 12]


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_holder(experiment, finished):
    store = RunStore(str(finished), experiment.config)
    try:
        with pytest.raises(RunDirectoryLocked, match=f"in use by another run \\(PID {os.getpid()}\\)"):
            resume(experiment, finished)
    finally:
        store.close()
    RunStore(str(finished), experiment.config).close()  # released


# -- interrupts and divergence in this process -----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("where,call", [("annotate", 8), ("evaluate", 2)])
def test_a_signal_inside_the_step_or_evaluation_stops_after_the_round(experiment, reference, tmp_path,
                                                                       monkeypatch, where, call):
    """SIGINT arrives in round 8 at the end of its step (``annotate``: the step has donated round 7's state) or
    while it is evaluated (the second evaluation): round 8 is finished, recorded and checkpointed."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are installed by the main thread only")
    original, calls = getattr(experiment, where), []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args)

    monkeypatch.setattr(experiment, where, interrupted)
    with pytest.raises(KeyboardInterrupt, match="SIGINT"):
        experiment.run(str(tmp_path / "run"), progress=False)
    monkeypatch.undo()
    assert history_rounds(tmp_path / "run") == list(range(1, 9))
    assert checkpoint_steps(tmp_path / "run") == [6, 8]
    assert_same_run(resume(experiment, tmp_path / "run"), reference)


@pytest.mark.slow
def test_an_exception_inside_a_round_cuts_the_history_back_to_the_checkpoint(experiment, reference, tmp_path,
                                                                             monkeypatch):
    """A KeyboardInterrupt raised in round 8's step (not by a signal) leaves no state of round 7 to save."""
    original = experiment.annotate

    def interrupted(record, cohort):
        if record["round"] == 8:
            raise KeyboardInterrupt
        return original(record, cohort)

    monkeypatch.setattr(experiment, "annotate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(str(tmp_path / "run"), progress=False)
    monkeypatch.undo()
    assert history_rounds(tmp_path / "run") == list(range(1, 7)) and checkpoint_steps(tmp_path / "run") == [3, 6]
    assert_same_run(resume(experiment, tmp_path / "run"), reference)


@pytest.mark.slow
def test_divergence_stops_with_one_line_and_keeps_the_last_good_round(tmp_path, capsys):
    config = tmp_path / "diverges.json"  # round 1 trains; its server step (lr 1e30) wrecks the model
    config.write_text(json.dumps({**CONFIG, "server": {"clients_per_round": 4, "lr": 1e30},
                                  "run": {"rounds": 4, "eval_every": 2, "checkpoint_every": 1}}))
    out = tmp_path / "run"
    code = cli_main(["run", "--quiet", "--config", str(config), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 3
    summary = strict_json(captured.out.strip().splitlines()[-1])
    assert summary["round"] == 2
    error = captured.err.strip()
    assert len(error.splitlines()) == 1
    assert "diverged in round 2" in error and "client.lr" in error and "server.lr" in error
    assert "round 1" in error  # the checkpoint kept
    assert history_rounds(out) == [1, 2]  # the diverged round is recorded, as strict JSON
    assert checkpoint_steps(out) == [1]  # never the diverged state
    with pytest.raises(DivergenceError, match="diverged in round 2") as caught:
        Experiment(from_dict(json.loads(config.read_text()))).run(str(out), progress=False)
    assert caught.value.round == 2 and history_rounds(out) == [1, 2] and checkpoint_steps(out) == [1]


@pytest.mark.slow
def test_a_loss_explosion_below_overflow_that_leaves_accuracy_at_chance_is_divergence():
    """client.lr=50: round 1's training loss is thousands of times the initial model's (2.5) and the model ends at
    chance, though no value overflows: the first evaluation (round 2) stops the run naming both; with
    run.divergence_factor null the run goes on to its end (a study that wants the point)."""
    base = {**CONFIG, "model": {"name": "mlp", "hidden": [16]}, "client": {**CONFIG["client"], "lr": 50.0},
            "run": {"rounds": 3, "eval_every": 2, "checkpoint_every": 0}}
    with pytest.raises(DivergenceError, match=r"diverged in round 2: train_loss \S+ in round 1 exceeded 100 x the "
                                              r"initial model's loss \S+ \(run.divergence_factor\) and test_accuracy "
                                              r"\S+ is at chance") as caught:
        Experiment(from_dict(base)).run(progress=False)
    assert caught.value.round == 2
    kept = {**base, "run": {**base["run"], "divergence_factor": None}}
    assert len(Experiment(from_dict(kept)).run(progress=False).history) == 3


def test_explosion_needs_the_loss_above_the_factor_and_then_chance_or_three_rounds_in_a_row():
    from fedjaxpriv.guards import explosion

    never = lambda accuracy: False  # noqa: E731
    rounds = [{"round": i + 1, "train_loss": v} for i, v in enumerate([2.0, 300.0, 5.0])]
    assert explosion(rounds[:2], rounds[2], 2.5, 100.0, never) is None  # exploded once, recovered
    assert explosion(rounds[:2], {"round": 3, "train_loss": 5.0, "test_accuracy": 0.1}, 2.5, 100.0,
                     lambda a: a < 0.2).startswith("train_loss 300 in round 2 exceeded 100 x")
    high = [{"round": i + 1, "train_loss": 260.0} for i in range(3)]
    assert "for 3 rounds in a row (now 260)" in explosion(high[:2], high[2], 2.5, 100.0, never)
    assert explosion(high[:1], high[1], 2.5, 100.0, never) is None  # only 2 rounds so far
    assert explosion(high[:2], high[2], 2.5, None, never) is None  # off


# -- real processes ----------------------------------------------------------------------------------------------
FORK_SERVER = r"""
import json, os, sys, traceback
import fedjaxpriv.cli, fedjaxpriv.experiment, fedjaxpriv.report  # what `run` imports; no JAX backend yet
for line in sys.stdin:
    job = json.loads(line)
    if "wait" in job:
        _, status = os.waitpid(job["wait"], 0)
        print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        os.environ.update(job["env"])
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        try:  # the console script's path, ending in os._exit (the fork server's own state is not this run's)
            fedjaxpriv.cli.entry(job["argv"], exit=os._exit)
        except BaseException:
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(99)
    print(json.dumps(pid), flush=True)
"""


class Child:
    """A ``fedjaxpriv run`` process forked by the fork server."""

    def __init__(self, server, pid: int, log_path: str) -> None:
        self.server, self.pid, self.log_path, self.code = server, pid, log_path, None

    def exited(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{self.pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"  # a zombie: exited, not yet reaped

    def wait(self) -> int:
        if self.code is None:
            self.code = self.server.ask({"wait": self.pid})
        return self.code

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


class ForkServer:
    def __init__(self, cache_dir: str) -> None:
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        self.process = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, job: dict):
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def start(self, config_path, run_dir, pause: str | None = None) -> tuple[Child, str | None]:
        """Starts ``fedjaxpriv run`` into ``run_dir``; with ``pause`` ("point:round") it waits there once it
        has created the marker file whose path is returned."""
        marker = f"{run_dir}.paused" if pause else None
        env = {PAUSE_ENV: f"{pause}:{marker}"} if pause else {}
        argv = ["run", "--quiet", "--config", str(config_path), "--out", str(run_dir)]
        pid = self.ask({"argv": argv, "env": env, "log": f"{run_dir}.log"})
        return Child(self, pid, f"{run_dir}.log"), marker

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    server = ForkServer(str(tmp_path_factory.mktemp("jax_cache")))
    yield server
    server.close()


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_text(json.dumps(CONFIG))
    return path


def lines_at_least(run_dir, count: int):
    path = os.path.join(run_dir, "history.jsonl")
    return lambda: os.path.exists(path) and open(path).read().count("\n") >= count


@pytest.mark.parametrize("signum,pause,rounds_left", [
    (signal.SIGINT, "evaluate:8", 8),  # evaluating round 8: the round is finished and checkpointed first
    (signal.SIGTERM, "checkpoint:9", 9),  # writing round 9's checkpoint: the write finishes first
    (signal.SIGTERM, "train:5", 4),  # before round 5's step
    (signal.SIGINT, None, None),  # whenever history.jsonl holds 5 rounds (most likely inside a step)
])
@pytest.mark.slow
def test_signal_leaves_a_consistent_directory_that_resumes_exactly(experiment, reference, fork_server, config_file,
                                                                   tmp_path, signum, pause, rounds_left):
    run_dir = tmp_path / "run"
    child, marker = fork_server.start(config_file, run_dir, pause)
    wait_until((lambda: os.path.exists(marker)) if pause else lines_at_least(run_dir, 5), child)
    if pause and pause.startswith("evaluate"):
        with pytest.raises(RunDirectoryLocked, match=f"PID {child.pid}"):
            RunStore(str(run_dir), experiment.config)
    os.kill(child.pid, signum)
    code = child.wait()
    log = child.log()
    assert code == 128 + signum, log
    assert f"interrupted by {signal.Signals(signum).name}" in log and "Traceback" not in log
    assert_consistent(run_dir)
    if rounds_left is not None:
        assert len(history_rounds(run_dir)) == rounds_left
    assert_same_run(resume(experiment, run_dir), reference)


# Ten moments to kill a run at, each when its files reach a state (or it waits at a pause point).
FAULTS = {
    "config written": (None, lambda d: os.path.exists(d / "config.json")),
    "first record": (None, lambda d: lines_at_least(d, 1)()),
    "first checkpoint": (None, lambda d: (d / "checkpoints" / "3").is_dir()),
    # Caught while orbax writes its temporary directory (else, rarely, at the last record).
    "checkpoint being written": (None, lambda d: lines_at_least(d, ROUNDS)() or any(
        ".orbax-checkpoint-tmp" in n for n in (os.listdir(d / "checkpoints") if (d / "checkpoints").is_dir() else ()))),
    "four records": (None, lambda d: lines_at_least(d, 4)()),
    "evaluating round 8": ("evaluate:8", None),
    "before checkpointing round 9": ("checkpoint:9", None),
    "before training round 11": ("train:11", None),
    "eleven records": (None, lambda d: lines_at_least(d, 11)()),
    "closing": (None, lambda d: (d / "history.csv").exists()),
}


@pytest.mark.slow
def test_kill_9_at_ten_moments_resumes_bit_identically(experiment, reference, fork_server, config_file, tmp_path):
    seen, lost = {}, 0
    for number, (name, (pause, reached)) in enumerate(FAULTS.items()):
        run_dir = tmp_path / f"fault{number}"
        child, marker = fork_server.start(config_file, run_dir, pause)
        wait_until((lambda: os.path.exists(marker)) if pause else (lambda: reached(run_dir)), child)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait() in (-signal.SIGKILL, 0), f"{name}: {child.log()}"
        rounds = history_rounds(run_dir)  # whole lines only, rounds 1..k
        assert rounds == list(range(1, len(rounds) + 1)), name
        checkpoints = os.listdir(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []
        seen[name] = (len(rounds), sorted(checkpoints))
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            results = resume(experiment, run_dir)
        # Only a run killed before its first checkpoint has anything to warn about: it starts over.
        assert all("starting over" in str(w.message) for w in warned), (name, [str(w.message) for w in warned])
        lost += ROUNDS - len({r["round"] for r in results.history})
        assert_same_run(results, reference)
    print("".join(f"\nkilled at {name}: {k} records, checkpoints {entries}" for name, (k, entries) in seen.items()))
    assert len(seen) == 10 and lost == 0


LAYOUT_CONFIG = {**CONFIG, "run": {"rounds": 2, "eval_every": 2, "checkpoint_every": 1}}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The directory of a finished 2-round run with a checkpoint per round (each test changes a copy)."""
    out = tmp_path_factory.mktemp("layout") / "run"
    Experiment(from_dict(LAYOUT_CONFIG)).run(str(out), progress=False)
    return out


@pytest.mark.parametrize("name, make", [("checkpoints", "file"), ("history.jsonl", "dir"), (".lock", "dir"),
                                        ("run.json", "dir"), ("config.json", "dir")])
def test_a_wrong_layout_is_refused_before_anything_is_changed(tmp_path, finished_run, name, make):
    """A run directory with a file where its checkpoints belong, or a directory where one of its files belongs:
    resuming names the path and changes nothing (the history and checkpoints of the finished rounds stay)."""
    config = from_dict(LAYOUT_CONFIG)
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    path = out / name
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.mkdir() if make == "dir" else path.write_text("not a directory")
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
    kind = "regular file" if make == "dir" else "directory"
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not a {kind}.*nothing was changed"):
        Experiment(config).run(str(out), progress=False)
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_no_temporary_file_outlives_a_failed_write_or_a_killed_writer(tmp_path):
    from fedjaxpriv import files

    target = tmp_path / "history.csv"
    target.write_text("old")
    with pytest.raises(TypeError):  # the write fails after the temporary file was created
        files.atomic_write(str(target), 5)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["history.csv"]
    # A writer killed mid-write leaves <name>.tmp-<pid>: the next run to open the directory removes it.
    config = from_dict({**CONFIG, "run": {"rounds": 1, "eval_every": 1, "checkpoint_every": 1}})
    out = tmp_path / "run"
    Experiment(config).run(str(out), progress=False)
    (out / "history.jsonl.tmp-999999").write_text("torn")
    Experiment(config).run(str(out), progress=False)
    assert not list(out.glob("*.tmp-*"))


@pytest.mark.slow
def test_a_signal_after_the_command_has_finished_exits_with_its_code_and_no_traceback(tmp_path):
    """The console script: a SIGTERM that lands while the process shuts down (after ``main`` returned) ends it at
    once with ``main``'s exit code, no traceback; ``main`` called in a process gives the caller its handlers back."""
    from fedjaxpriv import cli

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert cli.main(["report", str(tmp_path / "absent")]) == 2
    assert {s: signal.getsignal(s) for s in before} == before
    late = ("import os, signal, sys, time\nfrom fedjaxpriv import cli\n"
            f"cli.entry(['report', {str(tmp_path / 'absent')!r}], exit=lambda code: (os.kill(os.getpid(), "
            "signal.SIGTERM), time.sleep(30), sys.exit(77)))\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", late], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and time.monotonic() - started < 25, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "neither a results store" in done.stderr, done.stderr


def test_a_signal_whose_exception_is_swallowed_still_stops_the_run_at_the_next_round(tmp_path):
    """A real SIGINT whose KeyboardInterrupt lands in code that swallows it (as JAX's garbage-collection callback
    does: "Exception ignored in ...") still stops the run before its next round, checkpointed and resumable;
    RunInterrupted survives pickling (a sweep worker's run reaches the sweep that way)."""
    import pickle

    from fedjaxpriv.guards import RunInterrupted

    def swallow(experiment, record):
        if record["round"] == 1:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)  # the handler runs here and raises; the exception goes nowhere
            except KeyboardInterrupt:
                pass

    config = from_dict({**CONFIG, "run": {"rounds": 3, "eval_every": 3, "checkpoint_every": 3}})
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted, match="SIGINT"):
        Experiment(config).run(str(out), progress=False, callbacks=[swallow])
    assert history_rounds(out) == [1] and checkpoint_steps(out) == [1]
    assert pickle.loads(pickle.dumps(RunInterrupted(signal.SIGTERM))).signum == signal.SIGTERM


def test_a_signal_that_a_library_turns_into_its_own_error_still_checkpoints_and_ends_in_one_line(tmp_path, monkeypatch,
                                                                                                  capsys):
    """A real SIGTERM whose interrupt a library re-raises as its own error (a C extension interrupted while it
    initialises raises ``ImportError("initialization failed")`` from it, as TensorStore's does) still checkpoints
    the finished round; the command line ends such a run in one line with the signal's code, no traceback."""
    from fedjaxpriv import cli
    from fedjaxpriv.guards import RunInterrupted, interrupt_behind

    def converted(experiment, record):
        if record["round"] == 1:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)  # the handler runs here and raises
            except KeyboardInterrupt as interrupt:
                raise ImportError("initialization failed") from interrupt

    config = from_dict({**CONFIG, "run": {"rounds": 3, "eval_every": 3, "checkpoint_every": 3}})
    out = tmp_path / "run"
    with pytest.raises(ImportError) as raised:
        Experiment(config).run(str(out), progress=False, callbacks=[converted])
    assert interrupt_behind(raised.value).signum == signal.SIGTERM
    assert history_rounds(out) == [1] and checkpoint_steps(out) == [1]  # round 1 saved by the interrupt's cleanup
    assert interrupt_behind(ValueError("bad input")) is None

    def interrupted_import(args):
        try:
            raise RunInterrupted(signal.SIGTERM)
        except RunInterrupted as interrupt:
            raise ImportError("initialization failed") from interrupt

    monkeypatch.setattr(cli, "_run", interrupted_import)
    capsys.readouterr()
    assert cli.main(["run", "--out", str(tmp_path / "other")]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err == "fedjaxpriv: run interrupted by SIGTERM.\n", err


@pytest.mark.slow
def test_signals_at_random_times_stop_in_one_line_and_resume_exactly(experiment, reference, fork_server, config_file,
                                                                     tmp_path):
    """Twelve SIGINT / SIGTERM at seeded random times over a whole run (from the fork to past its last round;
    every third one followed by a second signal, as an impatient user sends): each run exits 0 (it had finished)
    or with the code of a signal it got, says "interrupted by" on one line without a traceback, leaves the rounds
    1..k each once with round k checkpointed, and resumes to the run never interrupted."""
    for attempt in range(2):  # the second with the compilation cache warm, as the trials run
        timing, _ = fork_server.start(config_file, tmp_path / f"timing{attempt}")
        started = time.monotonic()
        assert timing.wait() == 0, timing.log()
        whole = time.monotonic() - started
    rng = np.random.default_rng(0)
    outcomes = []
    for trial in range(12):
        run_dir = tmp_path / f"trial{trial}"
        first, second = rng.choice([signal.SIGINT, signal.SIGTERM], size=2)
        delay, gap = rng.uniform(0.0, 1.1 * whole), rng.uniform(0.0, 0.2)
        child, _ = fork_server.start(config_file, run_dir)
        time.sleep(delay)
        sent = [int(first)]
        for signum in ([first, second] if trial % 3 == 2 else [first]):
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:  # exited (finished) already
                break
            time.sleep(gap)
        sent.append(int(second))
        code, log = child.wait(), child.log()
        assert code == 0 or code - 128 in sent, (trial, code, log)
        assert "Traceback" not in log and "Exception ignored" not in log, (trial, log)
        if code != 0:
            assert sum("interrupted by" in line for line in log.splitlines()) == 1, (trial, log)
        assert_consistent(run_dir)
        outcomes.append((round(delay, 2), code, len(history_rounds(run_dir))))
        assert_same_run(resume(experiment, run_dir), reference)
    print(f"\nwhole run {whole:.2f} s; (delay s, exit code, rounds kept): {outcomes}")
    assert sum(code != 0 for _, code, _ in outcomes) >= 6  # most signals landed inside the run
