"""Sweep processes sharing one store: every point runs once, a killed sweep's points are taken over, its workers
die with it, and a rerun completes exactly the missing points with clean histories."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from fedjaxpriv.results import ResultsStore
from fedjaxpriv.sweep import load_grid

BASE = {"data": {"num_clients": 4}, "model": {"name": "logreg"}, "client": {"local_steps": 1, "batch_size": 8},
        "server": {"clients_per_round": 2}, "run": {"rounds": 2, "checkpoint_every": 1, "eval_every": 2}}
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _sweep(grid: str, store: str, jobs: int = 1) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "fedjaxpriv.cli", "sweep", grid, "--store", store,
                             "--jobs", str(jobs)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _holders(store: ResultsStore, hashes: list[str]) -> set[int]:
    return {pid for h in hashes if (pid := store.claim_holder(h)) is not None}


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with open(path) as f:
            for child in map(int, f.read().split()):
                found |= {child} | _descendants(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _check_store(store: ResultsStore, hashes: list[str]) -> None:
    records = store.records()
    counts = Counter(r["config_hash"] for r in records)
    assert counts == Counter(hashes), counts  # every point recorded exactly once, nothing else
    for r in records:
        assert [h["round"] for h in r["history"]] == [1, 2]


def _grid(path, lrs: list[float]) -> tuple[str, list[str]]:
    path.write_text(json.dumps({"base": BASE, "grid": {"client.lr": lrs}}))
    return str(path), [p.config_hash for p in load_grid(str(path))]


@pytest.mark.slow
def test_concurrent_sweeps_kill_and_rerun(tmp_path):
    store_dir = str(tmp_path / "store")
    store = ResultsStore(os.path.join(store_dir, "results.jsonl"))
    shared, shared_hashes = _grid(tmp_path / "shared.yaml", [0.05, 0.1, 0.2])
    wider, hashes = _grid(tmp_path / "wider.yaml", [0.3, 0.4, 0.05, 0.1, 0.2])

    # Three sweeps on one store: two over the shared points, one with two workers over those and two more. The
    # third is killed while one of its workers runs a point: its workers die with it.
    victim = _sweep(wider, store_dir, jobs=2)
    others = [_sweep(shared, store_dir), _sweep(shared, store_dir)]
    _wait_for(lambda: _holders(store, hashes) & _descendants(victim.pid), timeout=120,
              what="a worker of the third sweep to claim a point")
    workers = _descendants(victim.pid)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    _wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=10, what="the workers to die")
    for sweep in others:
        out, err = sweep.communicate(timeout=300)
        assert sweep.returncode == 0, err
        assert json.loads(out.splitlines()[-1])["failed"] == 0
    _check_store(store, shared_hashes)

    # A rerun of the killed sweep runs exactly the points still missing (resuming any it had begun).
    missing = set(hashes) - store.completed_hashes()
    assert missing
    rerun = _sweep(wider, store_dir)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert (summary["ran"], summary["skipped"], summary["failed"]) == (len(missing), 5 - len(missing), 0)
    _check_store(store, hashes)


def test_a_hung_claim_holder_is_named_and_given_up_after_the_wait_limit(tmp_path):
    from fedjaxpriv.sweep import run_sweep

    store_dir = str(tmp_path / "store")
    store = ResultsStore(os.path.join(store_dir, "results.jsonl"))
    grid, (held, free) = _grid(tmp_path / "grid.yaml", [0.05, 0.1])
    os.makedirs(f"{store.path}.claims")
    # A live process that holds one point's claim as a sweep worker does (flock, its PID in the file) and never
    # finishes it; plain Python, so that it starts at once.
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                               "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
                               "os.write(fd, f'{os.getpid()}\\n'.encode()); print('held', flush=True); time.sleep(600)",
                               store._claim_path(held)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert store.claim_holder(held) == holder.pid
        waited: list[tuple[str, int | None]] = []
        start = time.monotonic()
        summary = run_sweep(load_grid(grid), store_dir, wait_limit_s=1.0, poll_s=0.1,
                            on_wait=lambda h, pid: waited.append((h, pid)))
        assert time.monotonic() - start < 120
    finally:
        holder.kill()
        holder.wait()
    assert waited == [(held, holder.pid)]  # named once, with its PID
    assert summary.ran == [free] and list(summary.failed) == [held]
    assert f"PID {holder.pid}" in summary.failed[held] and "wait_limit_s=1.0" in summary.failed[held]
    assert [r["config_hash"] for r in store.records()] == [free]
    assert store.claim_holder(held) is None  # the kernel released the dead holder's claim


@pytest.mark.slow
def test_sigterm_to_a_sweep_stops_its_workers_at_a_round_end_and_exits_with_the_signals_code(tmp_path):
    """SIGTERM to the parent of a 2-worker sweep: it forwards the signal, each worker's run checkpoints the round
    it is in and stops, the parent exits 143 with one line, no worker outlives it, and each interrupted run's
    history ends at its latest checkpoint (resumable)."""
    store_dir = str(tmp_path / "store")
    store = ResultsStore(os.path.join(store_dir, "results.jsonl"))
    # One point ends at once (its worker then waits, and must survive the forwarded signal), one runs long.
    long = {**BASE, "run": {"checkpoint_every": 100000, "eval_every": 100000}}
    grid = tmp_path / "long.yaml"
    grid.write_text(json.dumps({"base": long, "grid": {"run.rounds": [3, 100000]}}))
    short, long_hash = [p.config_hash for p in load_grid(str(grid))]
    sweep = _sweep(str(grid), store_dir, jobs=2)
    history = os.path.join(store_dir, "runs", long_hash, "history.jsonl")
    _wait_for(lambda: store.completed_hashes() == {short} and os.path.exists(history), timeout=180,
              what="the short point to be stored and the long one to finish a round")
    workers = _descendants(sweep.pid)
    sweep.send_signal(signal.SIGTERM)
    out, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("fedjaxpriv: sweep ") and "SIGTERM" in err.strip().splitlines()[-1]
    _wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=10, what="the workers to end")
    assert [r["config_hash"] for r in store.records()] == [short]  # the interrupted point is not recorded
    with open(history) as f:
        rounds = [json.loads(line)["round"] for line in f]
    steps = sorted(int(n) for n in os.listdir(os.path.join(store_dir, "runs", long_hash, "checkpoints"))
                   if n.isdigit())
    assert 0 < len(rounds) < 100000 and steps[-1] == rounds[-1] == len(rounds)
