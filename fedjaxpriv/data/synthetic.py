"""The Synthetic(alpha, beta) federated benchmark of FedProx.

Device k has its own linear softmax model and its own feature distribution:

    u_k ~ N(0, alpha^2),  B_k ~ N(0, beta^2)
    W_k [d, K] ~ N(u_k, 1),  b_k [K] ~ N(u_k, 1),  v_k [d] ~ N(B_k, 1)
    x ~ N(v_k, Sigma),  Sigma = diag(j^-1.2), j = 1..d
    y = argmax softmax(x W_k + b_k)

alpha controls how much the devices' models differ and beta how much their features differ; as in the
reference implementation, alpha and beta are standard deviations. Since u_k shifts all of device k's logits
by the same amount, it never changes a label: p(y | x) differs across devices through the per-device draw of
W_k and b_k (present even at alpha = 0), and p(x) through v_k and B_k. Device sizes are
``int(lognormal(size_mean, size_sigma)) + size_offset``, optionally capped. The IID variant shares one model
W, b ~ N(0, 1) and feature mean v = 0 across devices. The natural partition is by device.

Generation is vectorized NumPy over examples (one small matmul per device for the labels); drawing the
T x d Gaussian features dominates the time. Memory is O(devices * d * K + examples * d).

References:
  Li et al., "Federated Optimization in Heterogeneous Networks" (FedProx), MLSys 2020.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from fedjaxpriv.data.federated import Dataset, FederatedData

SeedLike = Any  # an int seed, a np.random.Generator or a jax PRNG key


class SyntheticDevices(NamedTuple):
    """Per-device generative parameters.

    Attributes:
      weights: [C, d, K] float32 linear model W_k.
      biases: [C, K] float32 b_k.
      feature_means: [C, d] float32 v_k.
      sizes: [C] int64 examples per device (train + test).
    """

    weights: np.ndarray
    biases: np.ndarray
    feature_means: np.ndarray
    sizes: np.ndarray


def as_generator(key_or_seed: SeedLike) -> np.random.Generator:
    """A NumPy generator from an int seed, a generator (returned as is) or a jax PRNG key."""
    if isinstance(key_or_seed, (int, np.integer, np.random.Generator, np.random.SeedSequence)):
        return np.random.default_rng(key_or_seed)
    import jax

    key = key_or_seed
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, np.uint32).ravel())


def feature_variances(dim: int) -> np.ndarray:
    """[dim] diagonal of Sigma: j^-1.2 for j = 1..dim."""
    return np.arange(1, dim + 1, dtype=np.float64) ** -1.2


def device_sizes(rng: np.random.Generator, num_devices: int, size_mean: float = 4.0, size_sigma: float = 2.0,
                 size_offset: int = 50, max_size: int | None = None) -> np.ndarray:
    """[num_devices] sizes ``int(lognormal(size_mean, size_sigma)) + size_offset``, capped at ``max_size``."""
    sizes = rng.lognormal(size_mean, size_sigma, num_devices).astype(np.int64) + size_offset
    return np.minimum(sizes, max_size) if max_size is not None else sizes


def synthetic_devices(rng: np.random.Generator, num_devices: int, alpha: float, beta: float, dim: int,
                      num_classes: int, *, iid: bool = False, size_mean: float = 4.0, size_sigma: float = 2.0,
                      size_offset: int = 50, max_size: int | None = None) -> SyntheticDevices:
    """Draws every device's model, feature mean and size (see the module docstring)."""
    sizes = device_sizes(rng, num_devices, size_mean, size_sigma, size_offset, max_size)
    if iid:
        weights = np.broadcast_to(rng.standard_normal((dim, num_classes), np.float32),
                                  (num_devices, dim, num_classes))
        biases = np.broadcast_to(rng.standard_normal(num_classes, np.float32), (num_devices, num_classes))
        means = np.zeros((num_devices, dim), np.float32)
        return SyntheticDevices(weights, biases, means, sizes)
    model_means = rng.normal(0.0, alpha, num_devices).astype(np.float32)
    feature_centres = rng.normal(0.0, beta, num_devices).astype(np.float32)
    weights = model_means[:, None, None] + rng.standard_normal((num_devices, dim, num_classes), np.float32)
    biases = model_means[:, None] + rng.standard_normal((num_devices, num_classes), np.float32)
    means = feature_centres[:, None] + rng.standard_normal((num_devices, dim), np.float32)
    return SyntheticDevices(weights, biases, means, sizes)


def device_examples(rng: np.random.Generator, devices: SyntheticDevices,
                    counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draws ``counts[k]`` examples of every device k (default: ``devices.sizes``), device by device.

    Returns:
      x [T, d] float32 with x ~ N(v_k, Sigma) and y [T] int32 = argmax(x W_k + b_k), T = sum(counts).
    """
    counts = devices.sizes if counts is None else np.asarray(counts)
    dim = devices.feature_means.shape[1]
    x = np.empty((int(counts.sum()), dim), np.float32)
    rng.standard_normal(dtype=np.float32, out=x)
    x *= np.sqrt(feature_variances(dim)).astype(np.float32)
    y = np.empty(x.shape[0], np.int32)
    stops = np.cumsum(counts)
    for k in np.flatnonzero(counts):  # one vectorized block per device; no per-example Python
        block = x[stops[k] - counts[k]: stops[k]]
        block += devices.feature_means[k]
        y[stops[k] - counts[k]: stops[k]] = np.argmax(block @ devices.weights[k] + devices.biases[k], axis=1)
    return x, y


def synthetic_federated(key_or_seed: SeedLike, num_clients: int = 30, alpha: float = 1.0, beta: float = 1.0,
                        dim: int = 60, num_classes: int = 10, *, iid: bool = False, size_mean: float = 4.0,
                        size_sigma: float = 2.0, size_offset: int = 50, max_size: int | None = None,
                        test_fraction: float = 0.2) -> tuple[FederatedData, Dataset]:
    """FedProx Synthetic(alpha, beta): one client per device, plus a test set from the same devices.

    Device k's n_k examples (``devices.sizes``) are split into floor(test_fraction * n_k) test examples and the
    rest for training; both are i.i.d. draws from the device's distribution.

    Args:
      key_or_seed: int seed, ``np.random.Generator`` or jax PRNG key.
      num_clients: number of devices C.
      alpha: std of u_k (model heterogeneity), >= 0.
      beta: std of B_k (feature heterogeneity), >= 0.
      dim: feature dimension d.
      num_classes: number of classes K.
      iid: the IID variant (one shared model and feature mean; alpha and beta unused).
      size_mean: mean of the log-normal's log.
      size_sigma: std of the log-normal's log.
      size_offset: added to every size.
      max_size: optional cap on a device's size (train + test).
      test_fraction: share of each device's examples held out for testing, in [0, 1).

    Returns:
      (train population with C clients in device order, test ``Dataset`` in device order); x [., d] float32,
      y int32.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients} must be >= 1.")
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha={alpha} and beta={beta} must be >= 0.")
    if dim < 1 or num_classes < 2:
        raise ValueError(f"dim={dim} must be >= 1 and num_classes={num_classes} >= 2.")
    if size_offset < 0 or (max_size is not None and max_size < 1) or size_sigma < 0:
        raise ValueError(f"size_offset={size_offset} must be >= 0, size_sigma={size_sigma} >= 0 and "
                         f"max_size={max_size} None or >= 1.")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in [0, 1).")
    rng = as_generator(key_or_seed)
    devices = synthetic_devices(rng, num_clients, alpha, beta, dim, num_classes, iid=iid, size_mean=size_mean,
                                size_sigma=size_sigma, size_offset=size_offset, max_size=max_size)
    test_counts = np.floor(test_fraction * devices.sizes).astype(np.int64)
    train_counts = devices.sizes - test_counts
    x, y = device_examples(rng, devices, train_counts)
    # Built in place (the layout ``from_partition`` makes) to avoid copying 10^8-sized arrays.
    offsets = np.concatenate([[0], np.cumsum(train_counts)[:-1]]).astype(np.int32)
    train = FederatedData(x, y, offsets, train_counts.astype(np.int32), np.zeros((0,), np.int32))
    return train, Dataset(*device_examples(rng, devices, test_counts))


def synthetic_iid(key_or_seed: SeedLike, num_clients: int = 30, dim: int = 60, num_classes: int = 10,
                  **kwargs: Any) -> tuple[FederatedData, Dataset]:
    """The IID variant of ``synthetic_federated`` (shared W, b and v across devices)."""
    return synthetic_federated(key_or_seed, num_clients, 0.0, 0.0, dim, num_classes, iid=True, **kwargs)
