"""Multi-host runs: every process runs the same program over a global mesh (JAX multi-controller).

Each host calls ``initialize`` first, then builds the same ``Experiment`` with ``mesh=make_mesh()``; the
mesh spans all processes' devices, the population and settings are replicated on every device and each
chunk of clients is split over all devices. Only process 0 should write the run directory.

    import fedjaxpriv.distributed as dist
    dist.initialize("10.0.0.1:1234", num_processes=2, process_id=RANK)
    results = Experiment(config, mesh=make_mesh()).run(out_dir if dist.is_main_process() else None)

On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import jax


def initialize(coordinator_address: str, num_processes: int, process_id: int,
               local_device_ids: list[int] | None = None) -> None:
    """Connects this process to the others (``jax.distributed.initialize``); call before any JAX work."""
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be >= 1.")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, {num_processes}).")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)


def is_main_process() -> bool:
    return jax.process_index() == 0


def shutdown() -> None:
    jax.distributed.shutdown()
