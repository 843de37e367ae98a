"""``map_clients``: the one place that knows about vmap, chunking and sharding.

A per-client function returns ``(summed, kept)``: ``summed`` is a pytree that is added up over clients
(e.g. weighted model deltas), ``kept`` is a small pytree returned per client (e.g. losses). Clients run in
chunks of ``chunk_size``: within a chunk they are vectorized with ``vmap`` (strategy "vmap") or run one at a
time (strategy "loop"); chunks run in a ``lax.scan`` whose carry is the running sum, so memory is
O(chunk x params), never O(cohort x params). With a mesh, each chunk's client axis is sharded over the
mesh's "clients" axis and XLA reduces the sum across devices.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

CLIENT_AXIS = "clients"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (default: all, across hosts) named "clients".

    Uses ``AxisType.Auto`` so that vmap and scan inside the round are partitioned by the compiler.
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices={num_devices} must be in [1, {len(devices)}] (available devices).")
    return jax.make_mesh((n,), (CLIENT_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n])


def chunk_layout(num_clients: int, chunk_size: int, num_devices: int = 1) -> tuple[int, int]:
    """(chunk, num_chunks) such that chunk is a multiple of num_devices and chunk * num_chunks >= num_clients."""
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients} must be >= 1.")
    chunk = max(1, min(chunk_size, num_clients)) if chunk_size > 0 else num_clients
    chunk = int(math.ceil(chunk / num_devices) * num_devices)
    return chunk, int(math.ceil(num_clients / chunk))


def pad_clients(tree: Any, total: int) -> Any:
    """Pads every leaf's leading client axis with zeros up to ``total`` rows."""

    def pad(leaf: Any) -> Any:
        leaf = jnp.asarray(leaf)
        extra = total - leaf.shape[0]
        return jnp.pad(leaf, [(0, extra)] + [(0, 0)] * (leaf.ndim - 1)) if extra > 0 else leaf

    return jax.tree_util.tree_map(pad, tree)


def map_clients(fn: Callable[[Any], tuple[Any, Any]], inputs: Any, *, chunk_size: int, strategy: str = "vmap",
                mesh: Mesh | None = None) -> tuple[Any, Any]:
    """Runs ``fn`` on every client row of ``inputs``; sums the first output, stacks the second.

    Args:
      fn: one client's function: input row (pytree of per-client leaves) -> (summed pytree, kept pytree).
      inputs: pytree whose leaves have a leading client axis [K, ...]. Rows beyond the real clients must
        make ``fn`` return zeros in ``summed`` (the caller masks them).
      chunk_size: clients per chunk (a multiple of the mesh size is used).
      strategy: "vmap" (vectorize each chunk) or "loop" (one client at a time).
      mesh: optional mesh with a "clients" axis; the chunk axis is sharded over it.

    Returns:
      (sum over clients of ``summed``, ``kept`` stacked to [K, ...]).
    """
    if strategy not in ("vmap", "loop"):
        raise ValueError(f"strategy={strategy!r}; allowed: 'vmap' or 'loop'.")
    num_clients = jax.tree_util.tree_leaves(inputs)[0].shape[0]
    num_devices = 1 if mesh is None else mesh.shape[CLIENT_AXIS]
    # "loop" runs one client per device at a time: a chunk is exactly one row per device.
    chunk, num_chunks = chunk_layout(num_clients, num_devices if strategy == "loop" else chunk_size, num_devices)
    padded = pad_clients(inputs, chunk * num_chunks)
    chunks = jax.tree_util.tree_map(lambda a: a.reshape((num_chunks, chunk) + a.shape[1:]), padded)
    if mesh is not None:
        chunks = jax.tree_util.tree_map(
            lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(None, CLIENT_AXIS))), chunks)

    def run_chunk(rows: Any) -> tuple[Any, Any]:
        if chunk == 1:  # the plain single-client program, no batching rules involved
            summed, kept = fn(jax.tree_util.tree_map(lambda a: a[0], rows))
            return summed, jax.tree_util.tree_map(lambda a: a[None], kept)
        summed, kept = jax.vmap(fn)(rows)
        return jax.tree_util.tree_map(lambda s: jnp.sum(s, axis=0), summed), kept

    row_shape = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[2:], a.dtype), chunks)
    summed_shape = jax.eval_shape(lambda r: fn(r)[0], row_shape)
    init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), summed_shape)

    def scan_body(total: Any, rows: Any) -> tuple[Any, Any]:
        chunk_sum, kept = run_chunk(rows)
        return jax.tree_util.tree_map(jnp.add, total, chunk_sum), kept

    total, kept = jax.lax.scan(scan_body, init, chunks)
    kept = jax.tree_util.tree_map(lambda a: a.reshape((num_chunks * chunk,) + a.shape[2:])[:num_clients], kept)
    return total, kept


def auto_strategy(model_name: str, backend: str | None = None) -> str:
    """Picks the client-parallel strategy: per-client loops for convnets on CPU, vmap elsewhere.

    On XLA:CPU a vmapped convolution over clients becomes a grouped convolution that runs far slower than
    the same convolutions issued one client at a time; on accelerators vmap wins.
    """
    backend = backend or jax.default_backend()
    if backend == "cpu" and model_name in ("cnn", "lenet", "resnet"):
        return "loop"
    return "vmap"


def auto_chunk_size(num_clients: int, num_params: int, backend: str | None = None,
                    budget_bytes: float | None = None) -> int:
    """Chunk size bounding per-chunk working memory (about 8 copies of params per client) by a budget."""
    backend = backend or jax.default_backend()
    budget = budget_bytes if budget_bytes is not None else (2e9 if backend != "cpu" else 5e8)
    per_client = max(1, 8 * 4 * num_params)
    return int(max(1, min(num_clients, budget // per_client, 1024)))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Places a pytree replicated on every device of the mesh (no-op without a mesh)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, P()))


def as_numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)
