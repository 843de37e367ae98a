"""Multi-host runs: every process runs the same program over a global mesh (JAX multi-controller).

Each process calls ``initialize`` first, then builds the same ``Experiment`` with ``mesh=make_mesh()`` and runs
it into the same run directory (on a file system they share): process 0 locks the directory and writes its
files (config, history, CSVs, run.json, sinks); every process takes part in the checkpoints, whose saves and
restores orbax makes collective. The population and settings are replicated on every device (or, with
``run.shard_data``, the examples split over all devices) and each chunk of clients is split over all devices.

    import fedjaxpriv.distributed as dist
    dist.initialize()                      # on SLURM, Open MPI, Cloud TPU: found by JAX itself
    dist.initialize("10.0.0.1:1234", num_processes=2, process_id=RANK)   # or explicitly
    results = Experiment(config, mesh=make_mesh()).run(out_dir)          # the same out_dir everywhere

``fedjaxpriv run --distributed`` does the same from the command line. On CPU the cross-process collectives
use gloo.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import jax
import numpy as np


HEARTBEAT_TIMEOUT_S = 100  # JAX's default


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> None:
    """Connects this process to the others (``jax.distributed.initialize``); call before any JAX work. Without
    arguments JAX finds the cluster itself (SLURM, Open MPI, Cloud TPU and the other environments it detects);
    given, the coordinator ``host:port``, the number of processes and this one's id are used as they are.

    When a process dies, JAX's coordination service stops the others once it has missed ``heartbeat_timeout_s``
    seconds of its heartbeats (they exit with SIGABRT and its report); started again, all of them resume from
    the run's last checkpoint."""
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be >= 1.")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, {num_processes}).")
    if heartbeat_timeout_s < 1:
        raise ValueError(f"heartbeat_timeout_s={heartbeat_timeout_s} must be >= 1 (seconds).")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               heartbeat_timeout_seconds=int(heartbeat_timeout_s))


def is_main_process() -> bool:
    return jax.process_index() == 0


def check_same_everywhere(values: Mapping[str, Any]) -> None:
    """Raises ValueError, on every process, unless all processes hold the same ``values`` (e.g. the config's
    hash and the run directory): a multi-process run whose processes disagree would deadlock or mix runs.
    Nothing happens in a single process."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digests = {name: int.from_bytes(hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode())
                                    .digest()[:4], "little") & 0x7FFFFFFF for name, value in values.items()}
    mine = np.array(list(digests.values()), np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(mine))  # [processes, len(values)]
    differing = [name for i, name in enumerate(digests) if np.any(everyone[:, i] != everyone[0, i])]
    if differing:
        raise ValueError(f"the {jax.process_count()} processes of this run disagree on {differing} (process "
                         f"{jax.process_index()} has {[values[n] for n in differing]}); start every process with "
                         "the same config and output directory.")


def smallest_everywhere(value: int) -> int:
    """The smallest of ``value`` (an int in [-2^31, 2^31)) over the processes of a multi-process run: a choice that
    every process must make alike (e.g. from its own memory) made from the same number. ``value`` itself in a
    single process."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.min(np.asarray(multihost_utils.process_allgather(np.array([value], np.int32)))))


def shutdown() -> None:
    jax.distributed.shutdown()
