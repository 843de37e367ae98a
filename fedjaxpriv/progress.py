"""Progress lines on stderr: what a run builds, what it built (the command line and the Python API say the same).

Light on purpose: the command line says what it builds before JAX is imported.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from fedjaxpriv.config import USER_SUPPLIED, ExperimentConfig

if TYPE_CHECKING:
    from fedjaxpriv.data import FederatedData
    from fedjaxpriv.experiment import Experiment


def say(text: str) -> None:
    """One progress line on stderr ("fedjaxpriv: <text>"), written above any progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(f"fedjaxpriv: {text}", file=sys.stderr)


def building_line(config: ExperimentConfig, population: FederatedData | None = None, model: Any = None) -> str:
    """What a run is about to build: its data (the config's, or the ``population`` passed in), model and rounds."""
    d, r = config.data, config.run
    data = (f"{d.dataset} over {d.num_clients} clients ({d.partition} partition)" if population is None
            else f"the population passed in ({getattr(population, 'num_clients', '?')} clients)")  # checked later
    name = config.model.name if model is None else f"{USER_SUPPLIED} {getattr(model, 'name', type(model).__name__)}"
    return f"building {data}, model {name}, {r.rounds} round{'s' if r.rounds != 1 else ''}"


def built_line(experiment: Experiment, seconds: float) -> str:
    """What was built, in how long (s): parameters, execution strategy and devices."""
    import jax

    devices = 1 if experiment.mesh is None else experiment.mesh.devices.size
    return (f"built in {seconds:.1f} s: {experiment.num_params:,} parameters, strategy {experiment.strategy} "
            f"(chunks of {experiment.chunk_size} clients), {devices} {jax.default_backend()} "
            f"device{'s' if devices != 1 else ''}")
