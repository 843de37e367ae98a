"""Flower Datasets' partitioners (optional extra ``flwr``) driving the split of a centralized dataset.

From Python, any partitioner with any arguments::

    from flwr_datasets.partitioner import DirichletPartitioner
    population = partition_with(DirichletPartitioner(num_partitions=50, partition_by="label", alpha=0.3), train)

From a config, ``data.partition: flwr`` and ``data.flwr_partitioner: <class name>``: the partitioner's arguments
are filled from the config by name (``FROM_CONFIG``); one with another required argument is refused by name.

The partitioner sees a Hugging Face dataset of two columns: ``"label"`` (``dataset.y``, for labels [N]; absent
for next-token targets) and ``"row"`` (the example's index), and each of its partitions becomes one client, in
partition order. Examples that no partition holds (a partitioner may drop some, e.g. incomplete shards) are left
out; an example in two partitions is an error.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import numpy as np

from fedjaxpriv.data.federated import Dataset, FederatedData, from_partition

LABEL, ROW = "label", "row"
# Partitioner arguments filled from the config: name -> (config field, or "" for a fixed value).
FROM_CONFIG = {
    "num_partitions": "data.num_clients",
    "partition_by": f"'{LABEL}' (the labels' column)",
    "alpha": "data.dirichlet_alpha",
    "num_shards_per_partition": "data.shards_per_client",
    "num_classes_per_partition": "data.shards_per_client",
    "seed": "run.seed",
}


def partition_with(partitioner: Any, dataset: Dataset, attributes: np.ndarray | None = None) -> FederatedData:
    """``dataset`` split by a Flower Datasets ``partitioner`` (see the module docstring): one client per
    partition, its examples in the partition's order.

    Raises:
      ValueError: the partitioner fails on this dataset (its message is kept), or puts an example in two
        partitions.
    """
    try:
        import datasets
    except ModuleNotFoundError:
        raise ValueError("Flower Datasets partitioners need flwr-datasets: pip install 'fedjaxpriv[flwr]'.") from None
    from fedjaxpriv.data.huggingface import quiet

    labels = np.asarray(dataset.y)
    columns = {ROW: np.arange(len(labels), dtype=np.int64)}
    if labels.ndim == 1:
        columns[LABEL] = labels
    name = type(partitioner).__name__
    try:
        with quiet():
            partitioner.dataset = datasets.Dataset.from_dict(columns)
            rows = [np.asarray(partitioner.load_partition(i)[ROW], np.int64)
                    for i in range(partitioner.num_partitions)]
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise ValueError(f"{name} could not split the {len(labels)} examples: "
                         f"{' '.join(str(error).split())}") from None
    held = np.bincount(np.concatenate(rows) if rows else np.zeros(0, np.int64), minlength=len(labels))
    if held.max(initial=0) > 1:
        raise ValueError(f"{name} put example {int(np.argmax(held))} in {int(held.max())} partitions; a population "
                         "holds each example once.")
    left_out = int((held == 0).sum())
    if left_out:
        warnings.warn(f"{name} left {left_out} of {len(labels)} examples out of every partition; the population "
                      "holds the rest.", stacklevel=2)
    return from_partition(dataset, rows, attributes)


def configured_partitioner(name: str, num_clients: int, seed: int, *, dirichlet_alpha: float,
                           shards_per_client: int) -> Any:
    """The partitioner class ``name`` of ``flwr_datasets.partitioner``, built with the arguments it takes from
    ``FROM_CONFIG``.

    Raises:
      ValueError: flwr-datasets is missing, ``name`` is no partitioner (the error lists them), or it requires an
        argument the config does not give (named, with the Python route).
    """
    try:
        from flwr_datasets import partitioner as partitioners
    except ModuleNotFoundError:
        raise ValueError("data.partition='flwr' needs flwr-datasets: pip install 'fedjaxpriv[flwr]'.") from None
    known = sorted(n for n in dir(partitioners) if n.endswith("Partitioner") and n != "Partitioner")
    cls = getattr(partitioners, name, None)
    if name not in known or not inspect.isclass(cls):
        raise ValueError(f"data.flwr_partitioner={name!r} is not a Flower Datasets partitioner; allowed: {known}.")
    values = {"num_partitions": num_clients, "partition_by": LABEL, "alpha": dirichlet_alpha,
              "num_shards_per_partition": shards_per_client, "num_classes_per_partition": shards_per_client,
              "seed": seed}
    parameters = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    missing = [k for k, p in parameters.items() if p.default is inspect.Parameter.empty and k not in values
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise ValueError(f"data.flwr_partitioner={name!r} needs {missing}, which the config does not give (it fills "
                         f"{sorted(FROM_CONFIG)}): build it in Python and pass it to "
                         "fedjaxpriv.data.flower.partition_with(partitioner, dataset).")
    return cls(**{k: v for k, v in values.items() if k in parameters})
