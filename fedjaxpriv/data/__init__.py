"""Federated data: sources, partitioners and containers."""

from fedjaxpriv.data.federated import Dataset, FederatedArrays, FederatedData, from_client_lists, from_partition
from fedjaxpriv.data.partition import PARTITION_SCHEMES, dirichlet, iid, natural, partition, quantity_skew, shards
from fedjaxpriv.data.sources import DATASET_NAMES, DatasetInfo, load_dataset, load_digits
from fedjaxpriv.data.synthetic import synthetic_federated, synthetic_iid

__all__ = [
    "Dataset", "FederatedArrays", "FederatedData", "from_client_lists", "from_partition",
    "DATASET_NAMES", "DatasetInfo", "load_dataset", "load_digits",
    "PARTITION_SCHEMES", "partition", "iid", "dirichlet", "shards", "quantity_skew", "natural",
    "synthetic_federated", "synthetic_iid",
]
