"""Two JAX processes on localhost (CPU, gloo collectives) train the same model as one process."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedjaxpriv import distributed
from fedjaxpriv.config import from_dict
from fedjaxpriv.experiment import Experiment

CONFIG = {"data": {"num_clients": 16}, "server": {"clients_per_round": 8},
          "client": {"local_steps": 3, "batch_size": 8}, "run": {"rounds": 3, "eval_every": 3, "chunk_size": 4}}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    out = str(tmp_path / "multihost.npz")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    workers = [subprocess.Popen([sys.executable, "-m", "tests.engine.multihost_worker", str(port), str(i), out],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(logs)[-4000:]

    single = Experiment(from_dict(CONFIG)).run(progress=False)
    saved = np.load(out)
    leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(single.params)]
    for i, leaf in enumerate(leaves):
        np.testing.assert_allclose(saved[f"arr_{i}"], leaf, atol=2e-5)
    assert float(saved["accuracy"]) == single.final("test_accuracy")


def test_initialize_refuses_bad_process_counts_before_connecting():
    """Bad counts are named before ``jax.distributed`` is touched; a single process is the main one."""
    with pytest.raises(ValueError, match=r"num_processes=0 must be >= 1"):
        distributed.initialize("127.0.0.1:1", num_processes=0, process_id=0)
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)
    assert distributed.is_main_process() and not jax.distributed.is_initialized()
