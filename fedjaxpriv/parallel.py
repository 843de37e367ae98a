"""``map_clients``: the one place that knows about vmap, chunking and sharding.

A per-client function returns ``(summed, kept)``: ``summed`` is a pytree that is added up over clients
(e.g. weighted model deltas), ``kept`` is a small pytree returned per client (e.g. losses). Clients run in
chunks of ``chunk_size``: within a chunk they are vectorized with ``vmap`` (strategy "vmap") or run one at a
time (strategy "loop"); chunks run in a ``lax.scan`` whose carry is the running sum, so memory is
O(chunk x params), never O(cohort x params). With a mesh, each chunk's client axis is split over the
mesh's "clients" axis: each device runs the program of its own clients (``shard_map``) and the sums are added
across devices.

``map_clients_host`` runs the same chunks from a Python loop, one compiled call per chunk plus a compiled
running sum: on XLA:CPU native convolutions inside compiled loops (``while``) run an order of magnitude
slower than outside loops. ``conv_as_matmul`` rewrites a model's convolutions as patch extraction plus one
matrix product, which stays fast inside loops and under ``vmap`` (where a vmapped convolution would become a
slow grouped convolution on CPU); with it the compiled "loop" strategy matches the host loop for convnets.

``plan`` makes these choices (strategy, chunk, unroll, lowering) from the model's structure as its jaxpr shows
it (``model_structure``: does it convolve, on how large feature maps, does it have dense layers, how many
parameters), never from its name, so a user's model is run like a built-in model of the same shape.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jax_core
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


CACHE_ENV = "FEDJAXPRIV_COMPILATION_CACHE"


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache, so that a second run of the same shapes (a resumed run,
    the next sweep point) loads its compiled programs instead of compiling them again.

    The directory is ``path``, else ``$FEDJAXPRIV_COMPILATION_CACHE`` ("off" turns the cache off), else
    ``~/.cache/fedjaxpriv/jax``; a cache directory already set in JAX (``JAX_COMPILATION_CACHE_DIR``) is kept.
    Programs that compile in under 0.1 s are not stored. The directory grows with every new program shape (a few
    kB to MB each; delete it to clear it). Returns the directory in use, or None when off.
    """
    configured = jax.config.jax_compilation_cache_dir
    if path is None and configured:
        return configured
    chosen = path or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fedjaxpriv", "jax")
    if chosen.lower() == "off":
        return None
    jax.config.update("jax_compilation_cache_dir", chosen)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return chosen


def host_cores() -> int:
    """CPU cores this process may run on (its affinity set where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


MAX_AUTO_CPU_DEVICES = 8


def use_cpu_cores(num_devices: int | None = None) -> int:
    """Exposes the host's CPU cores as ``num_devices`` JAX CPU devices (default: one per core, at most
    ``MAX_AUTO_CPU_DEVICES``: every device holds its own copy of the population's data).

    XLA:CPU runs one compiled program on one core for small operations (a 9.6k-parameter MLP's batched
    matmuls use ~1.1 cores), so a client mesh over one device per core runs chunks of clients side by side:
    1.4-1.5x more client updates/s on 2 cores. Call it right after ``import jax``, before any JAX operation;
    ``fedjaxpriv``'s command line does. An ``XLA_FLAGS=--xla_force_host_platform_device_count`` already set
    wins.

    Returns:
      The number of CPU devices.

    Raises:
      ValueError: ``num_devices`` < 1.
      RuntimeError: JAX already started its CPU backend with a different device count.
    """
    if num_devices is not None and num_devices < 1:
        raise ValueError(f"num_devices={num_devices} is invalid; allowed: an integer >= 1 (or None: one per core).")
    wanted = num_devices or min(host_cores(), MAX_AUTO_CPU_DEVICES)
    forced = re.search(r"xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if forced:  # read from the flag: asking JAX would start its backend (too early for jax.distributed)
        return int(forced.group(1))
    try:
        jax.config.update("jax_num_cpu_devices", wanted)
    except RuntimeError:
        have = len(jax.devices("cpu"))
        if have != wanted:
            raise RuntimeError(f"JAX already started with {have} CPU device(s), so {wanted} cannot be set; call "
                               "use_cpu_cores right after `import jax`, before any JAX operation.") from None
    return wanted


def local_mesh(num_devices: int = 0) -> Mesh | None:
    """The default client mesh: ``num_devices`` of the default backend's devices (0 = all of them).

    Returns None (no sharding) when that is a single device.
    """
    available = len(jax.devices())
    if not 0 <= num_devices <= available:
        raise ValueError(f"num_devices={num_devices} is invalid; allowed: 0 (all) to {available} (the devices "
                         f"of the {jax.default_backend()} backend).")
    n = num_devices or available
    return make_mesh(n) if n > 1 else None


# A full copy of the population and of the clients' states on every device is faster than splitting them (each
# chunk's examples are then fetched across devices: 2.25x the round time on 8 CPU devices,
# ``benchmarks/bench_shard_data.py``), so by default (``run.shard_data: null``) they are split only when such a copy
# would take more than this fraction of one device's memory.
SPLIT_ABOVE_FRACTION = 0.25


def device_memory_bytes(mesh: Mesh) -> int | None:
    """One device's memory in bytes, the smallest over the processes of a multi-process run (they must choose
    alike): an accelerator's own limit (``memory_stats``), or on CPU the host's physical memory divided among its
    local devices (they share it); None when unknown on some process."""
    from fedjaxpriv.distributed import smallest_everywhere

    device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    mine = None
    if stats and stats.get("bytes_limit"):
        mine = int(stats["bytes_limit"])
    elif device.platform == "cpu" and hasattr(os, "sysconf"):
        try:
            mine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, jax.local_device_count())
        except (ValueError, OSError):
            mine = None
    mebibytes = smallest_everywhere(-1 if mine is None else min(mine >> 20, 2**31 - 1))
    return None if mebibytes < 0 else mebibytes << 20


def tree_bytes(tree: Any) -> int:
    """Bytes of a pytree's leaves (arrays or ``jax.ShapeDtypeStruct``s), as one full copy."""
    return int(sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(tree)))


def splits_data(requested: bool | None, mesh: Mesh | None, strategy: str, copy_bytes: int,
                device_bytes: int | None) -> bool:
    """Whether a run splits its examples and its clients' states over ``mesh`` (``run.shard_data``).

    True or False as ``requested``; None: split when a full copy (``copy_bytes``: the examples and every client's
    state) would take more than ``SPLIT_ABOVE_FRACTION`` of one device's memory (``device_bytes``; None: unknown,
    copy) and the strategy fetches chunks ('vmap' or 'loop'). Never on a single device (``mesh`` None): there the
    copy is the data.
    """
    if mesh is None:
        return False
    if requested is not None:
        return bool(requested)
    return (strategy != "host" and device_bytes is not None
            and copy_bytes > SPLIT_ABOVE_FRACTION * device_bytes)


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


def shard_rows(tree: Any, mesh: Mesh) -> Any:
    """Leaves [N, ...] (examples client by client, or one row per client) padded with zero rows to a multiple of
    the mesh's "clients" devices D and split over them: device d holds rows [d N/D, (d + 1) N/D), O(N / D) of
    them. Padding rows are never read as data (offsets and counts, or cohort ids, stay below N) and never
    written (``simulation.scatter_clients`` drops slots past the end)."""
    devices = mesh.shape[CLIENT_AXIS]

    def split(leaf: Any) -> jax.Array:
        leaf = np.asarray(leaf)
        total = int(math.ceil(max(1, leaf.shape[0]) / devices) * devices)
        padded = np.concatenate([leaf, np.zeros((total - leaf.shape[0], *leaf.shape[1:]), leaf.dtype)])
        return jax.device_put(padded, NamedSharding(mesh, P(CLIENT_AXIS)))

    return jax.tree_util.tree_map(split, tree)


def gather_examples(data: Any, offsets: jax.Array, counts: jax.Array, width: int, mesh: Mesh) -> Any:
    """Clients' examples from ``data`` split over the mesh by ``shard_rows``: leaves [K, width, ...], row k
    the examples [offsets[k], offsets[k] + counts[k]) and zeros after them, the K rows split over the mesh's
    "clients" axis (K a multiple of its size D; ``counts`` <= ``width``).

    Each device's rows travel once around the ring of devices, each adding the examples of those rows it holds
    (zeros where it holds none: an example lies on one device only): exact, and the working set is one block of
    rows, O(K / D x width) examples per device, never the whole population.
    """
    devices = mesh.shape[CLIENT_AXIS]

    def per_device(data: Any, offsets: jax.Array, counts: jax.Array) -> Any:
        block = jax.tree_util.tree_leaves(data)[0].shape[0]
        me = jax.lax.axis_index(CLIENT_AXIS)
        rows = offsets.shape[0] // devices

        def held_rows(target: jax.Array) -> Any:
            """The examples of device ``target``'s rows that this device holds, zeros elsewhere."""
            first = jax.lax.dynamic_slice_in_dim(offsets, target * rows, rows)
            count = jax.lax.dynamic_slice_in_dim(counts, target * rows, rows)
            positions = first[:, None] + jnp.arange(width)[None, :] - me * block
            held = (jnp.arange(width)[None, :] < count[:, None]) & (positions >= 0) & (positions < block)

            def take(leaf: jax.Array) -> jax.Array:
                values = jnp.take(leaf, jnp.clip(positions, 0, block - 1), axis=0)
                return jnp.where(held.reshape(held.shape + (1,) * (leaf.ndim - 1)), values, jnp.zeros((), leaf.dtype))

            return jax.tree_util.tree_map(take, data)

        def step(index: jax.Array, travelling: Any) -> Any:
            # The rows of device t start at t + 1 and travel one device a step, each adding what it holds, so in
            # step ``index`` this device adds to device (me - 1 - index)'s rows and passes them on.
            travelling = jax.tree_util.tree_map(jnp.add, travelling, held_rows((me - 1 - index) % devices))
            return jax.lax.ppermute(travelling, CLIENT_AXIS, [(d, (d + 1) % devices) for d in range(devices)])

        own = held_rows(me)
        arrived = jax.lax.fori_loop(0, devices - 1, step, jax.tree_util.tree_map(jnp.zeros_like, own))
        return jax.tree_util.tree_map(jnp.add, arrived, own)

    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(CLIENT_AXIS), P(), P()), out_specs=P(CLIENT_AXIS),
                         check_vma=False)(data, offsets, counts)


@jax.tree_util.register_pytree_node_class
class SlotRows:
    """One client's part of a ``[width, ...]`` output of ``map_clients``: ``value`` (a pytree) goes to row ``slot``
    (int32 scalar; no row when it is outside [0, width)). Summed over clients, each row holds the value of the one
    client whose slot it is, exactly (the others add nothing), and zeros where no client has that slot.

    Memory per chunk is that of the chunk's values, not ``chunk x width`` of them."""

    def __init__(self, slot: jax.Array, value: Any, width: int) -> None:
        self.slot, self.value, self.width = slot, value, width

    def tree_flatten(self) -> tuple[tuple[Any, Any], int]:
        return (self.slot, self.value), self.width

    @classmethod
    def tree_unflatten(cls, width: int, children: tuple[Any, Any]) -> SlotRows:
        return cls(*children, width)


def sum_clients(summed: Any, batched: bool = True) -> Any:
    """The sum over the leading client axis of a chunk's ``summed`` outputs (``batched``; else one client's), a
    ``SlotRows`` placed in its rows (leaves [width, ...])."""

    def reduce(part: Any) -> Any:
        if not isinstance(part, SlotRows):
            return jnp.sum(part, axis=0) if batched else part
        slot = jnp.atleast_1d(part.slot)
        rows = jnp.where((slot >= 0) & (slot < part.width), slot, part.width)  # outside: dropped by segment_sum
        return jax.tree_util.tree_map(
            lambda v: jax.ops.segment_sum(v if batched else v[None], rows, num_segments=part.width), part.value)

    return jax.tree_util.tree_map(reduce, summed, is_leaf=lambda x: isinstance(x, SlotRows))


def _chunk_program(fn: Callable[[Any, Any], tuple[Any, Any]], shared: Any, rows: Any) -> tuple[Any, Any]:
    """One chunk of clients on one device: the plain one-client program for a chunk of 1, ``vmap`` otherwise."""
    if jax.tree_util.tree_leaves(rows)[0].shape[0] == 1:  # no batching rules involved
        summed, kept = fn(shared, jax.tree_util.tree_map(lambda a: a[0], rows))
        return sum_clients(summed, batched=False), jax.tree_util.tree_map(lambda a: a[None], kept)
    summed, kept = jax.vmap(fn, in_axes=(None, 0))(shared, rows)
    return sum_clients(summed), kept


def _per_device(run_chunk: Callable[[Any, Any], tuple[Any, Any]], mesh: Mesh) -> Callable[[Any, Any], tuple[Any, Any]]:
    """``run_chunk`` ((shared, rows) -> (sum over the rows, kept rows)) on each device's rows of a chunk split over
    the mesh's "clients" axis, ``shared`` replicated (``shard_map``); the sums are added over the devices
    (``psum``), kept rows stay split.

    Each device compiles and runs the program of its own clients only. Left to the partitioner (a sharding
    constraint on the chunk), a vmapped ``top_k`` (the batch sampler) has no partitioning rule: every step
    all-gathered the chunk's sampling scores and ran every device's clients' ``top_k`` on each device.
    """

    def per_device(shared: Any, rows: Any) -> tuple[Any, Any]:
        chunk_sum, kept = run_chunk(shared, rows)
        return jax.lax.psum(chunk_sum, CLIENT_AXIS), kept

    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(CLIENT_AXIS)), out_specs=(P(), P(CLIENT_AXIS)),
                         check_vma=False)


def map_clients(fn: Callable[..., tuple[Any, Any]], inputs: Any, *, chunk_size: int, strategy: str = "vmap",
                mesh: Mesh | None = None, prepare: Callable[[Any], Any] | None = None,
                shared: Any = None) -> tuple[Any, Any]:
    """Runs ``fn`` on every client row of ``inputs``; sums the first output, stacks the second.

    Args:
      fn: one client's function: input row (pytree of per-client leaves) -> (summed pytree, kept pytree), or
        (shared, row) -> (summed, kept) when ``shared`` is given; a ``SlotRows`` in ``summed`` puts the client's
        value in its row of a [width, ...] output instead.
      inputs: pytree whose leaves have a leading client axis [K, ...]. Rows beyond the real clients must
        make ``fn`` return zeros in ``summed`` (the caller masks them) and no slot of a ``SlotRows``.
      chunk_size: clients per chunk (a multiple of the mesh size is used).
      strategy: "vmap" (vectorize each chunk) or "loop" (one client at a time).
      mesh: optional mesh with a "clients" axis; the chunk axis is sharded over it.
      prepare: optional ``chunk rows -> chunk rows`` run on each chunk before ``fn`` (e.g. fetching the chunk's
        examples with ``gather_examples``), so that what it adds exists for one chunk at a time.
      shared: optional pytree every client reads (e.g. the server model), replicated on every device of the mesh.
        With a mesh, pass what ``fn`` differentiates through here rather than closing over it: each device runs
        its clients' program in a ``shard_map``, and a float array closed over from the enclosing ``jit`` keeps
        that program's sharding in its type, which differentiating through a ``scan`` there refuses.

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

    call = fn if shared is not None else (lambda _, row: fn(row))

    def run_chunk(shared: Any, rows: Any) -> tuple[Any, Any]:
        return _chunk_program(call, shared, rows)

    if mesh is not None:
        run_chunk = _per_device(run_chunk, mesh)

    row_shape = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[2:], a.dtype), chunks)
    if prepare is not None:
        row_shape = jax.eval_shape(lambda c: jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), prepare(c)), jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), chunks))
    summed_shape = jax.eval_shape(lambda r: sum_clients(call(shared, r)[0], batched=False), row_shape)
    init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), summed_shape)

    def scan_body(total: Any, rows: Any) -> tuple[Any, Any]:
        chunk_sum, kept = run_chunk(shared, rows if prepare is None else prepare(rows))
        return jax.tree_util.tree_map(jnp.add, total, chunk_sum), kept

    total, kept = jax.lax.scan(scan_body, init, chunks)
    kept = jax.tree_util.tree_map(lambda a: a.reshape((num_chunks * chunk,) + a.shape[2:])[:num_clients], kept)
    return total, kept


HOST_MAX_STEPS = 16   # "host" unrolls every local step into the client's program; beyond this, compile time grows
HOST_MIN_SPATIAL = 16  # native XLA:CPU convolutions are slow on tiny feature maps (see ``auto_strategy``)


class ModelStructure(NamedTuple):
    """What the execution plan needs to know about a model, read from its jaxpr (never from its name).

    Attributes:
      convolves: the model runs a convolution (``conv_general_dilated``).
      conv_spatial: the largest spatial extent a convolution sees: over the model's convolutions, the max of
        the smallest spatial side of the convolution's input (0 without convolutions).
      dense: the model has a 2-D dense layer ``x [B, K] @ w [K, N]`` (``dense_grads_as_outer_products``
        rewrites those).
      num_params: scalars in the parameter pytree.
    """

    convolves: bool
    conv_spatial: int
    dense: bool
    num_params: int


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
    """The jaxprs nested in an equation's parameters (jit, custom derivatives, scan, while, cond branches)."""
    found = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                found.append(item)
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                found.append(item.jaxpr)
    return found


def _scan_structure(jaxpr: Any) -> tuple[bool, int, bool]:
    """(convolves, conv_spatial, dense) of a jaxpr and the jaxprs nested in it (see ``ModelStructure``)."""
    convolves, spatial, dense = False, 0, False
    for eqn in jaxpr.eqns:
        if eqn.primitive is lax.conv_general_dilated_p:
            lhs_spec = eqn.params["dimension_numbers"].lhs_spec
            shape = eqn.invars[0].aval.shape
            convolves = True
            spatial = max(spatial, min((shape[d] for d in lhs_spec[2:]), default=0))
        elif eqn.primitive is lax.dot_general_p:
            a, b = (v.aval for v in eqn.invars)
            dense = dense or (a.ndim == 2 and b.ndim == 2
                              and eqn.params["dimension_numbers"] == (((1,), (0,)), ((), ())))
        for sub in _sub_jaxprs(eqn.params):
            c, s, d = _scan_structure(sub)
            convolves, spatial, dense = convolves or c, max(spatial, s), dense or d
    return convolves, spatial, dense


def model_structure(apply_fn: Callable[[Any, jax.Array], Any], params: Any, example_input: Any) -> ModelStructure:
    """Reads a model's structure from the jaxpr of ``apply_fn(params, example_input)``.

    Args:
      apply_fn: (params, x [B, ...]) -> logits.
      params: parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
      example_input: a batch x [B, ...] (array or ``jax.ShapeDtypeStruct``), e.g. one local batch.
    """
    closed = jax.make_jaxpr(apply_fn)(params, example_input)
    convolves, spatial, dense = _scan_structure(closed.jaxpr)
    num_params = int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))
    return ModelStructure(convolves=convolves, conv_spatial=int(spatial), dense=dense, num_params=num_params)


def auto_strategy(structure: ModelStructure, backend: str | None = None, max_steps: int = 1) -> str:
    """Picks the client-parallel strategy for a model (its ``ModelStructure``) on a backend.

    - "vmap" everywhere except convnets on CPU.
    - convnets on CPU whose convolutions see feature maps at least ``HOST_MIN_SPATIAL`` pixels on each side
      (``conv_spatial``), up to ``HOST_MAX_STEPS`` local steps, in a single process: "host", one compiled call
      per client with its steps unrolled (native convolutions, fast outside compiled loops), dispatched over the
      devices of the mesh so that one client trains per CPU core (a native convolution step keeps ~1.3 of 2
      cores busy, so two clients side by side nearly double throughput).
    - other convnets on CPU: "loop", one client per compiled loop iteration with ``conv_as_matmul``
      (native convolutions inside compiled loops are an order of magnitude slower on XLA:CPU, and a vmapped
      convolution becomes a slow grouped convolution).

    Measured on 2 CPU cores, 2 CPU devices (McMahan CNN on 28x28, 5 steps of batch 16, 100 clients): host
    20.9-22.5 clients/s (55-61% of matmul peak), host on one device 17.1-17.9, loop with matmul convolutions
    13.7-18.1, vmap chunks with matmul convolutions 12.6-14.1; PyTorch's per-client loop 16.5-20.5. Unrolled gradient
    steps, native vs matmul convolutions (ms): CNN 28x28 11.0 vs 10.5, CNN 32x32x3 15.2 vs 15.7, ResNet
    32x32x3 17.8 vs 21.4, but CNN on 8x8 digits 5.6 vs 1.0, hence ``HOST_MIN_SPATIAL``.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu" or not structure.convolves:
        return "vmap"
    if max_steps <= HOST_MAX_STEPS and structure.conv_spatial >= HOST_MIN_SPATIAL and jax.process_count() == 1:
        return "host"
    return "loop"


def auto_conv_as_matmul(structure: ModelStructure, backend: str | None = None, strategy: str = "loop") -> bool:
    """True for convnets on CPU run by a compiled strategy ("loop"/"vmap"): convolutions as patches x kernel
    matrix products (``conv_as_matmul``); "host" keeps native convolutions."""
    backend = backend or jax.default_backend()
    return backend == "cpu" and structure.convolves and strategy != "host"


CPU_CHUNK_BYTES = 16 * 2**20  # a CPU device's chunk: about 8 copies of params per client within this many bytes


def auto_chunk_size(num_clients: int, num_params: int, backend: str | None = None,
                    budget_bytes: float | None = None) -> int:
    """Clients per chunk on ONE device, bounding its working memory (about 8 copies of params per client).

    ``num_clients`` is the number that device trains per round. On CPU the working set is kept within the caches
    (``CPU_CHUNK_BYTES``) and the chunk at most 128 clients. Measured on 2 cores, one device each, clients per
    device against round time (chunks interleaved in one process): 9.6k-param MLP, 128 -> 1.00, 96 -> 0.96, 64 ->
    0.85, 48 -> 0.84, 32 -> 0.87 (the rule: 54); 22k-param LSTM on the keyboard task, 128 -> 1.00, 64 -> 0.84, 32
    -> 0.69, and in a second run 32 -> 1.00, 16 -> 0.81, 8 -> 0.86 (the rule: 23); 650-parameter logistic
    regression, 128 -> 1.00, 64 -> 1.17 (the rule: 128). On accelerators up to 1024 clients run at once, within
    2 GB.
    """
    backend = backend or jax.default_backend()
    budget = budget_bytes if budget_bytes is not None else (2e9 if backend != "cpu" else CPU_CHUNK_BYTES)
    per_client = max(1, 8 * 4 * num_params)
    cap = 128 if backend == "cpu" else 1024
    return int(max(1, min(num_clients, budget // per_client, cap)))


# -- a Python loop of compiled chunks ------------------------------------------------------------------------

_host_chunk = jax.jit(_chunk_program, static_argnums=(0,))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _mesh_chunk(fn: Callable[[Any, Any], tuple[Any, Any]], mesh: Mesh, shared: Any, rows: Any) -> tuple[Any, Any]:
    """One chunk per device of ``mesh``, side by side, from one program compiled once for all devices.

    rows [devices * chunk, ...] sharded over the "clients" axis; returns each device's partial sum
    [devices, ...] (still sharded) and ``kept`` [devices * chunk, ...].
    """

    def per_device(shared: Any, rows: Any) -> tuple[Any, Any]:
        summed, kept = _chunk_program(fn, shared, rows)
        return jax.tree_util.tree_map(lambda a: a[None], summed), kept

    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(CLIENT_AXIS)),
                         out_specs=(P(CLIENT_AXIS), P(CLIENT_AXIS)), check_vma=False)(shared, rows)


@functools.partial(jax.jit, donate_argnums=(0,))
def _add_trees(total: Any, chunk_sum: Any) -> Any:
    return jax.tree_util.tree_map(jnp.add, total, chunk_sum)


@jax.jit
def _sum_devices(partial_sums: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), partial_sums)


def map_clients_host(fn: Callable[[Any, Any], tuple[Any, Any]], shared: Any, inputs: Any, *,
                     chunk_size: int = 1, mesh: Mesh | None = None) -> tuple[Any, Any]:
    """``map_clients`` driven from Python: one compiled call per chunk plus a compiled running sum.

    Same contract and same results (same keys, float tolerance) as ``map_clients``; call it outside
    ``jax.jit`` with concrete arrays. No compiled loop surrounds a client's program, which matters on
    XLA:CPU, where native convolutions inside loops are an order of magnitude slower. ``fn`` takes ``shared``
    explicitly so that its compiled program is reused across calls: pass the same function object every
    round (a module-level function or one built once), not a fresh lambda. With a mesh each call runs one
    chunk on every device side by side (``shard_map``, compiled once for all devices), e.g. one client per
    CPU core (``use_cpu_cores``).

    Args:
      fn: ``(shared, row) -> (summed, kept)`` for one client.
      shared: pytree passed unchanged to every client (e.g. server params, population data); with a mesh,
        replicate it there (``replicate``) to avoid a transfer per call.
      inputs: pytree of per-client leaves [K, ...].
      chunk_size: clients per device per call (1 = the plain one-client program, no ``vmap``).
      mesh: optional single-process mesh with a "clients" axis.

    Returns:
      (sum over clients of ``summed``, ``kept`` stacked to [K, ...] as NumPy arrays).
    """
    if isinstance(jax.tree_util.tree_leaves(inputs)[0], jax.core.Tracer):
        raise ValueError("map_clients_host runs a Python loop and needs concrete inputs; call it outside "
                         "jax.jit (inside a compiled function use map_clients).")
    if mesh is not None and jax.process_count() > 1:
        raise ValueError("map_clients_host drives this process's devices only; across hosts use map_clients "
                         "with the mesh (run.strategy 'vmap' or 'loop').")
    num_devices = 1 if mesh is None else mesh.shape[CLIENT_AXIS]
    num_clients = jax.tree_util.tree_leaves(inputs)[0].shape[0]
    chunk, num_chunks = chunk_layout(num_clients, max(1, chunk_size) * num_devices, num_devices)
    padded = pad_clients(inputs, chunk * num_chunks)
    if mesh is not None:
        shared = replicate(shared, mesh)
    total, kept_parts = None, []
    for index in range(num_chunks):
        rows = jax.tree_util.tree_map(lambda a: a[index * chunk:(index + 1) * chunk], padded)
        if mesh is None:
            chunk_sum, kept = _host_chunk(fn, shared, rows)
        else:
            rows = jax.device_put(rows, NamedSharding(mesh, P(CLIENT_AXIS)))
            chunk_sum, kept = _mesh_chunk(fn, mesh, shared, rows)
        total = chunk_sum if total is None else _add_trees(total, chunk_sum)
        kept_parts.append(kept)
    if mesh is not None:
        total = _sum_devices(total)
    kept = jax.tree_util.tree_map(lambda *parts: np.concatenate([np.asarray(p) for p in parts])[:num_clients],
                                  *kept_parts)
    return total, kept


# -- convolutions as matrix products ---------------------------------------------------------------------------

def _conv_patches_matmul(lhs: jax.Array, rhs: jax.Array, *, window_strides: Sequence[int],
                         padding: Sequence[tuple[int, int]], rhs_dilation: Sequence[int],
                         dimension_numbers: Any, precision: Any, preferred_element_type: Any,
                         **unused: Any) -> jax.Array:
    """``lax.conv_general_dilated`` (no lhs dilation, no feature/batch groups) as patches @ kernel.

    The input is padded and its kernel-offset windows are taken with strided slices and stacked into
    patches [N, *out_spatial, prod(kernel) * C_in]; one ``dot_general`` with the kernel reshaped to
    [prod(kernel) * C_in, C_out] gives the output. Slices, pads and matmuls differentiate and vmap into
    the same cheap operations.
    """
    del unused
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    num_spatial = len(lhs_spec) - 2
    x = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))    # [N, *spatial, C_in]
    w = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))    # [*kernel, C_in, C_out]
    x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in padding] + [(0, 0, 0)])
    kernel = w.shape[:num_spatial]
    out_size = [(x.shape[1 + d] - (kernel[d] - 1) * rhs_dilation[d] - 1) // window_strides[d] + 1
                for d in range(num_spatial)]
    windows = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        start = [0] + [offset[d] * rhs_dilation[d] for d in range(num_spatial)] + [0]
        limit = ([x.shape[0]] + [start[1 + d] + (out_size[d] - 1) * window_strides[d] + 1
                                 for d in range(num_spatial)] + [x.shape[-1]])
        windows.append(lax.slice(x, start, limit, [1, *window_strides, 1]))
    patches = jnp.stack(windows, axis=-2).reshape((x.shape[0], *out_size, -1))
    y = lax.dot_general(patches, w.reshape((-1, w.shape[-1])), (((num_spatial + 1,), (0,)), ((), ())),
                        precision=precision, preferred_element_type=preferred_element_type)
    source_axis = [0] * (num_spatial + 2)                                  # y is [N, *spatial, C_out]
    source_axis[out_spec[0]], source_axis[out_spec[1]] = 0, num_spatial + 1
    for d in range(num_spatial):
        source_axis[out_spec[2 + d]] = 1 + d
    return jnp.transpose(y, source_axis).astype(lhs.dtype if preferred_element_type is None
                                                 else preferred_element_type)


@jax.custom_vjp
def _outer_product_grad_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [B, K] @ w [K, N]; its weight gradient is a sum of B outer products (``dense_grads_as_outer_products``)."""
    return x @ w


def _outer_product_grad_matmul_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return x @ w, (x, w)


def _outer_product_grad_matmul_bwd(residuals: tuple[jax.Array, jax.Array],
                                   dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    dw = sum(x[b][:, None] * dy[b][None, :] for b in range(x.shape[0]))
    return dy @ w.T, dw


_outer_product_grad_matmul.defvjp(_outer_product_grad_matmul_fwd, _outer_product_grad_matmul_bwd)

OUTER_PRODUCT_MAX_BATCH = 32  # the weight gradient unrolls one outer product per example


def _is_small_dense(primitive: Any, values: Sequence[Any], params: dict[str, Any]) -> bool:
    return (primitive is lax.dot_general_p and values[0].ndim == 2 and values[1].ndim == 2
            and params["dimension_numbers"] == (((1,), (0,)), ((), ()))
            and params.get("precision") is None and params.get("preferred_element_type") in (None, values[0].dtype)
            and values[0].shape[0] <= OUTER_PRODUCT_MAX_BATCH)


def evaluate_jaxpr(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any],
                   replace: Callable[[int, Any, list[Any]], list[Any] | None]) -> list[Any]:
    """Evaluates ``jaxpr`` equation by equation: ``replace(index, eqn, input values)`` gives an equation's outputs
    in place of its primitive's, or None to run the primitive itself."""
    env: dict[Any, Any] = {}

    def read(var: Any) -> Any:
        return var.val if isinstance(var, jax_core.Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for index, eqn in enumerate(jaxpr.eqns):
        values = [read(v) for v in eqn.invars]
        outputs = replace(index, eqn, values)
        if outputs is None:
            outputs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
            outputs = outputs if eqn.primitive.multiple_results else [outputs]
        env.update(zip(eqn.outvars, outputs))
    return [read(v) for v in jaxpr.outvars]


def _eval_rewritten(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], *, convs: bool,
                    dense: bool) -> list[Any]:
    """Evaluates a jaxpr, running plain convolutions through ``_conv_patches_matmul`` (``convs``) and small-batch
    dense layers through ``_outer_product_grad_matmul`` (``dense``), recursing into nested jits."""

    def replace(index: int, eqn: Any, values: list[Any]) -> list[Any] | None:
        del index
        params = eqn.params
        if (convs and eqn.primitive is lax.conv_general_dilated_p and params["feature_group_count"] == 1
                and params["batch_group_count"] == 1 and all(d == 1 for d in params["lhs_dilation"])):
            return [_conv_patches_matmul(*values, **params)]
        if dense and _is_small_dense(eqn.primitive, values, params):
            return [_outer_product_grad_matmul(*values)]
        if eqn.primitive.name in ("pjit", "jit"):
            closed = params["jaxpr"]
            return _eval_rewritten(closed.jaxpr, closed.consts, values, convs=convs, dense=dense)
        return None

    return evaluate_jaxpr(jaxpr, consts, args, replace)


def rewrite_model(apply_fn: Callable[..., Any], *, convs: bool, dense: bool) -> Callable[..., Any]:
    """``apply_fn`` with its convolutions as matrix products (``convs``, see ``conv_as_matmul``) and its
    small-batch dense weight gradients as outer products (``dense``, see ``dense_grads_as_outer_products``),
    both in one pass over its jaxpr; ``apply_fn`` itself when neither is asked for."""
    if not (convs or dense):
        return apply_fn

    @functools.wraps(apply_fn)
    def wrapped(*args: Any) -> Any:
        flat, treedef = jax.tree_util.tree_flatten(args)
        closed, out_shape = jax.make_jaxpr(lambda *leaves: apply_fn(*jax.tree_util.tree_unflatten(treedef, leaves)),
                                           return_shape=True)(*flat)
        outputs = _eval_rewritten(closed.jaxpr, closed.consts, flat, convs=convs, dense=dense)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outputs)

    return wrapped


def conv_as_matmul(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a model function so that its convolutions run as patches x kernel matrix products.

    Same values as ``apply_fn`` (float tolerance) and differentiable; other operations are unchanged.
    Convolutions with input dilation or feature/batch groups are left as they are.

    Args:
      apply_fn: e.g. ``Model.apply``: (params, x [B, ...]) -> logits.

    Returns:
      a function with the same signature and outputs.
    """
    return rewrite_model(apply_fn, convs=True, dense=False)


def dense_grads_as_outer_products(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a model function so that its dense layers (x [B, K] @ w [K, N], B <= ``OUTER_PRODUCT_MAX_BATCH``)
    take their weight gradient as a sum of B outer products instead of a matrix product contracting over B.

    Same values and gradients (float tolerance), differentiable twice. On XLA:CPU, for a client's small batch
    under ``vmap``, the contraction over 16 examples is a slow batched matmul while the fused outer products
    are about 2x faster (weight gradient of a 64x128 layer for 125 clients: 503 vs 238 us; of a 128x10
    layer 351 vs 214 us); a whole MLP round ran 1.2-1.8x faster.

    Args:
      apply_fn: (params, x [B, ...]) -> logits.

    Returns:
      a function with the same signature and outputs.
    """
    return rewrite_model(apply_fn, convs=False, dense=True)


def auto_outer_product_grads(structure: ModelStructure, max_batch: int, backend: str | None = None) -> bool:
    """True on CPU for non-convolutional models with 2-D dense layers and local batches of at most
    ``OUTER_PRODUCT_MAX_BATCH``."""
    backend = backend or jax.default_backend()
    return (backend == "cpu" and not structure.convolves and structure.dense
            and max_batch <= OUTER_PRODUCT_MAX_BATCH)


class Plan(NamedTuple):
    """How the clients of a round run (execution only: results are the same, to float tolerance).

    Attributes:
      strategy: "vmap", "loop" or "host" (see ``auto_strategy``).
      chunk_size: clients per chunk over all devices (a multiple of the device count).
      unroll: scan unroll factor over local steps (every step for "host").
      conv_as_matmul: run convolutions as matrix products (``conv_as_matmul``).
      outer_product_grads: dense weight gradients as outer products (``dense_grads_as_outer_products``).
      structure: the model structure the choices were made from.
    """

    strategy: str
    chunk_size: int
    unroll: int
    conv_as_matmul: bool
    outer_product_grads: bool
    structure: ModelStructure


def plan(apply_fn: Callable[[Any, jax.Array], Any], params: Any, example_input: Any, *, max_steps: int,
         max_batch: int, num_clients: int, mesh: Mesh | None = None, backend: str | None = None,
         strategy: str = "auto", chunk_size: int = 0) -> Plan:
    """The execution plan of a round, chosen from the model's structure (``model_structure``).

    Args:
      apply_fn / params / example_input: the model, its parameters and an input batch [B, ...] (arrays or
        ``jax.ShapeDtypeStruct``); only traced.
      max_steps: local steps of the longest client.
      max_batch: batch slots per local step.
      num_clients: clients trained per round (the cohort's slots), over all devices.
      mesh: the client mesh (None: one device).
      backend: default ``jax.default_backend()``.
      strategy: "auto" or a forced "vmap" / "loop" / "host".
      chunk_size: clients per chunk per device (0: ``auto_chunk_size``).
    """
    structure = model_structure(apply_fn, params, example_input)
    if strategy == "auto":
        strategy = auto_strategy(structure, backend, max_steps=max_steps)
    num_devices = 1 if mesh is None else mesh.size
    per_device = chunk_size or auto_chunk_size(math.ceil(num_clients / num_devices), structure.num_params, backend)
    return Plan(strategy=strategy, chunk_size=per_device * num_devices,
                unroll=max_steps if strategy == "host" else 1,
                conv_as_matmul=auto_conv_as_matmul(structure, backend, strategy=strategy),
                outer_product_grads=auto_outer_product_grads(structure, max_batch, backend), structure=structure)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Places a pytree replicated on every device of the mesh (no-op without a mesh)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, P()))
