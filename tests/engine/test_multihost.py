"""Two JAX processes on localhost (CPU, gloo collectives) train the same model as one process: killed and resumed
with the data and client states split over their devices, and from the command line."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fedjaxpriv import distributed
from fedjaxpriv.config import from_dict
from fedjaxpriv.experiment import Experiment
from fedjaxpriv.guards import PAUSE_ENV

# Top-k with error feedback: every client keeps a model-sized residual, checkpointed with the run.
CONFIG = {"data": {"num_clients": 16}, "server": {"clients_per_round": 8},
          "client": {"local_steps": 3, "batch_size": 8}, "message": {"topk_fraction": 0.3, "error_feedback": True},
          "run": {"rounds": 3, "eval_every": 3, "chunk_size": 4, "checkpoint_every": 1}}
HEARTBEAT_S = 5  # a dead process stops the other within seconds
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_workers(tmp_path, out, out_dir=None, pause=None, mismatch=False, shard_data=False):
    """Two worker processes on a fresh port; with ``pause`` ("point:round") each waits there after creating
    ``<out_dir>.paused<i>``; with ``shard_data`` they run with ``run.shard_data``."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MULTIHOST_SHARD_DATA": "1" if shard_data else "",
           "MULTIHOST_HEARTBEAT_S": str(HEARTBEAT_S),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                        "--xla_cpu_multi_thread_eigen=false",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    workers = []
    for i in range(2):
        extra = {PAUSE_ENV: f"{pause}:{out_dir}.paused{i}"} if pause else {}
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "tests.engine.multihost_worker", str(port), str(i), out,
             *([out_dir or "", "mismatch"] if mismatch else [out_dir] if out_dir else [])], cwd=ROOT,
            env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return workers


def finish(workers):
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(logs)[-4000:]
    return logs


def assert_equals_single(out, single):
    saved = np.load(out)
    leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(single.params)]
    for i, leaf in enumerate(leaves):
        np.testing.assert_allclose(saved[f"arr_{i}"], leaf, atol=2e-5)
    assert float(saved["accuracy"]) == single.final("test_accuracy")


@pytest.fixture(scope="module")
def single():
    return Experiment(from_dict(CONFIG)).run(progress=False)


def history_rounds(run_dir):
    with open(os.path.join(run_dir, "history.jsonl")) as f:
        return [json.loads(line)["round"] for line in f]


@pytest.mark.slow
def test_two_processes_write_one_run_directory_and_resume_after_one_is_killed(tmp_path, single):
    """Both processes open the same run directory: process 0 writes history.jsonl (each round once), CSVs and
    run.json, both take part in the checkpoints. Process 0 (the writer, holding the directory's lock) is killed
    while both wait before round 3: process 1 stops on its own once its heartbeats are missed, and started
    again, the two resume to the run a single process makes, every round recorded once. With run.shard_data:
    each of the 4 devices (2 per process) holds a quarter of the examples and of the clients' residuals, which
    the checkpoints hold split as well."""
    out, run_dir = str(tmp_path / "multihost.npz"), str(tmp_path / "run")
    workers = start_workers(tmp_path, out, run_dir, pause="train:3", shard_data=True)
    deadline = time.monotonic() + 240
    while not all(os.path.exists(f"{run_dir}.paused{i}") for i in range(2)):
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers), [
            w.communicate()[0][-2000:] for w in workers if w.poll() is not None]
        time.sleep(0.05)
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait()
    stopped = time.monotonic()
    log = workers[1].communicate(timeout=120)[0]
    # Not 60 s (its pause point's wait) nor JAX's default 100 s: the heartbeat timeout (here the coordinator died
    # with process 0, which process 1 sees at once).
    assert workers[1].returncode != 0 and time.monotonic() - stopped < 6 * HEARTBEAT_S, log[-2000:]
    assert history_rounds(run_dir) == [1, 2]
    assert sorted(n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.isdigit()) == ["1", "2"]
    logs = finish(start_workers(tmp_path, out, run_dir, shard_data=True))
    assert "examples per device: 360, client rows per device: 4" in logs[0]  # 1437 digits padded to 1440; 16 / 4
    assert history_rounds(run_dir) == [1, 2, 3]
    assert_equals_single(out, single)
    assert os.path.exists(os.path.join(run_dir, "clients.csv")) and os.path.exists(os.path.join(run_dir,
                                                                                              "history.csv"))
    with open(os.path.join(run_dir, "run.json")) as f:
        assert len(json.load(f)["sessions"]) == 2  # one per start, written by process 0 only


def test_initialize_refuses_bad_process_counts_before_connecting():
    """Bad counts are named before ``jax.distributed`` is touched; a single process is the main one."""
    with pytest.raises(ValueError, match=r"num_processes=0 must be >= 1"):
        distributed.initialize("127.0.0.1:1", num_processes=0, process_id=0)
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match=r"heartbeat_timeout_s=0 must be >= 1 \(seconds\)"):
        distributed.initialize("127.0.0.1:1", num_processes=2, process_id=0, heartbeat_timeout_s=0)
    assert distributed.is_main_process() and not jax.distributed.is_initialized()


def test_a_heartbeat_timeout_without_a_distributed_run_is_refused(tmp_path, capsys):
    from fedjaxpriv import cli

    assert cli.main(["run", "--heartbeat-timeout", "5", "--out", str(tmp_path / "run")]) == 2
    assert "--heartbeat-timeout 5 needs --distributed" in capsys.readouterr().err


@pytest.mark.slow
def test_processes_started_with_different_configs_are_refused_naming_what_differs(tmp_path):
    workers = start_workers(tmp_path, str(tmp_path / "x.npz"), str(tmp_path / "run"), mismatch=True)
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [2, 2], logs
    for log in logs:
        assert "processes of this run disagree on ['config']" in log, log[-2000:]


@pytest.mark.slow
def test_the_command_line_runs_one_process_of_a_distributed_run_each(tmp_path, single):
    """``fedjaxpriv run --distributed`` on two processes into one --out: the run a single process makes."""
    port, run_dir = _free_port(), str(tmp_path / "run")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    sets = ["data.num_clients=16", "server.clients_per_round=8", "client.local_steps=3", "client.batch_size=8",
            "message.topk_fraction=0.3", "message.error_feedback=true", "run.rounds=3", "run.eval_every=3",
            "run.chunk_size=4", "run.checkpoint_every=1"]
    command = [sys.executable, "-m", "fedjaxpriv.cli", "run", "--distributed", "--coordinator", f"localhost:{port}",
               "--num-processes", "2", "--out", run_dir, *[a for s in sets for a in ("--set", s)]]
    workers = [subprocess.Popen([*command, "--process-id", str(i)], cwd=str(tmp_path), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-3000:] for _, err in outputs]
    assert history_rounds(run_dir) == [1, 2, 3]
    summary = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert summary["test_accuracy"] == pytest.approx(single.final("test_accuracy"), abs=1e-6)
    assert "fedjaxpriv: building" in outputs[0][1] and "fedjaxpriv: building" not in outputs[1][1]
