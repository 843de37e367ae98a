"""Federated data: sources, partitioners and containers."""

from fedjaxpriv.data.federated import Dataset, FederatedArrays, FederatedData, from_client_lists, from_partition

__all__ = ["Dataset", "FederatedArrays", "FederatedData", "from_client_lists", "from_partition"]
