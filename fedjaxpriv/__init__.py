"""fedjaxpriv: vectorized federated learning simulation in JAX for privacy research.

The curated entry points; submodules hold the rest (``fedjaxpriv.client``, ``transforms``, ``privacy``,
``attacks``, ``devices``, ``sweep``, ``report``).
"""

__version__ = "0.1.0"

from fedjaxpriv.client.settings import ClientSettings, make_settings
from fedjaxpriv.config import ExperimentConfig, from_dict, load_config, with_overrides
from fedjaxpriv.data import FederatedData, load_dataset, partition, synthetic_federated
from fedjaxpriv.experiment import Experiment, Results, Tap, run
from fedjaxpriv.models import get_model
from fedjaxpriv.models.tasks import CLASSIFICATION, MULTI_LABEL, NEXT_TOKEN, Task
from fedjaxpriv.server.algorithms import FEDAVG, SCAFFOLD, FederatedAlgorithm, ditto, dp_fedavg, fedprox, fedsgd
from fedjaxpriv.transforms import MessageTransform, chain, error_feedback
from fedjaxpriv.parallel import make_mesh, map_clients, use_cpu_cores

__all__ = [
    "CLASSIFICATION", "ClientSettings", "Experiment", "ExperimentConfig", "FEDAVG", "FederatedAlgorithm",
    "FederatedData", "MULTI_LABEL", "MessageTransform", "NEXT_TOKEN", "Results", "SCAFFOLD", "Tap", "Task", "chain",
    "ditto", "dp_fedavg", "error_feedback", "fedprox", "fedsgd", "from_dict", "get_model", "load_config", "load_dataset", "make_mesh", "make_settings",
    "map_clients", "partition", "run", "synthetic_federated", "use_cpu_cores", "with_overrides",
]
