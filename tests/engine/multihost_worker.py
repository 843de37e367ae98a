"""One process of a 2-process CPU run (started by test_multihost.py): trains over a global mesh, optionally
into a run directory that every process opens (process 0 writes its files; all take part in checkpoints)."""

import os
import sys

import numpy as np


def main() -> None:
    port, process_id, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    out_dir = sys.argv[4] or None if len(sys.argv) > 4 else None
    import fedjaxpriv.distributed as dist

    dist.initialize(f"localhost:{port}", num_processes=2, process_id=process_id,
                    heartbeat_timeout_s=int(os.environ.get("MULTIHOST_HEARTBEAT_S") or dist.HEARTBEAT_TIMEOUT_S))
    import jax

    from fedjaxpriv.config import from_dict
    from fedjaxpriv.experiment import Experiment
    from fedjaxpriv.parallel import make_mesh
    from tests.engine.test_multihost import CONFIG

    assert jax.device_count() == 4 and jax.local_device_count() == 2, (jax.device_count(), jax.local_device_count())
    config = dict(CONFIG)
    if os.environ.get("MULTIHOST_SHARD_DATA"):
        config["run"] = {**config["run"], "shard_data": True}
    if len(sys.argv) > 5 and sys.argv[5] == "mismatch" and process_id == 1:
        config["run"] = {**config["run"], "seed": 1}
    try:
        experiment = Experiment(from_dict(config), mesh=make_mesh())
        if config["run"].get("shard_data"):
            residual = jax.tree_util.tree_leaves(experiment.initial_state.client_state)[0]
            print(f"examples per device: {experiment.device_population.x.addressable_shards[0].data.shape[0]}, "
                  f"client rows per device: {residual.addressable_shards[0].data.shape[0]}", flush=True)
        results = experiment.run(out_dir, progress=False)
    except ValueError as error:
        print(f"refused: {error}", flush=True)
        sys.exit(2)
    if dist.is_main_process():
        leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(results.params)]
        np.savez(out, *leaves, accuracy=results.final("test_accuracy"))
    dist.shutdown()


if __name__ == "__main__":
    main()
