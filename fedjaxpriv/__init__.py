"""fedjaxpriv: vectorized federated learning simulation in JAX for privacy research.

The curated entry points; submodules hold the rest (``fedjaxpriv.client``, ``transforms``, ``privacy``,
``attacks``, ``devices``, ``sweep``, ``report``).
"""

__version__ = "0.1.0"

import importlib
from typing import Any

# The curated names, imported on first use (PEP 562): ``import fedjaxpriv`` and the command line's ``--help``
# stay fast, and JAX loads only when something that needs it is touched.
_EXPORTS: dict[str, str] = {
    "CLASSIFICATION": "fedjaxpriv.models.tasks",
    "ClientSettings": "fedjaxpriv.client.settings",
    "Experiment": "fedjaxpriv.experiment",
    "ExperimentConfig": "fedjaxpriv.config",
    "FEDAVG": "fedjaxpriv.server.algorithms",
    "FederatedAlgorithm": "fedjaxpriv.server.algorithms",
    "FederatedData": "fedjaxpriv.data",
    "MULTI_LABEL": "fedjaxpriv.models.tasks",
    "MessageTransform": "fedjaxpriv.transforms",
    "NEXT_TOKEN": "fedjaxpriv.models.tasks",
    "Results": "fedjaxpriv.runner",
    "SCAFFOLD": "fedjaxpriv.server.algorithms",
    "Tap": "fedjaxpriv.program",
    "Task": "fedjaxpriv.models.tasks",
    "chain": "fedjaxpriv.transforms",
    "ditto": "fedjaxpriv.server.algorithms",
    "dp_fedavg": "fedjaxpriv.server.algorithms",
    "error_feedback": "fedjaxpriv.transforms",
    "fedprox": "fedjaxpriv.server.algorithms",
    "fedsgd": "fedjaxpriv.server.algorithms",
    "from_dict": "fedjaxpriv.config",
    "get_model": "fedjaxpriv.models",
    "load_config": "fedjaxpriv.config",
    "load_dataset": "fedjaxpriv.data",
    "make_mesh": "fedjaxpriv.parallel",
    "make_settings": "fedjaxpriv.client.settings",
    "map_clients": "fedjaxpriv.parallel",
    "partition": "fedjaxpriv.data",
    "run": "fedjaxpriv.experiment",
    "synthetic_federated": "fedjaxpriv.data",
    "use_cpu_cores": "fedjaxpriv.parallel",
    "with_overrides": "fedjaxpriv.config",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedjaxpriv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
