"""Engine throughput: client-updates/s and achieved GFLOP/s of local training, ours vs per-client loops.

One command, one process::

    python benchmarks/bench_engine.py            # MLP x 1000 clients, CNN x 100 clients
    python benchmarks/bench_engine.py --quick    # MLP x 200, CNN x 16 (about a minute)
    python benchmarks/bench_engine.py --explore  # also the engine's other strategies

Every method trains the same clients (64 examples each, 5 local SGD steps of batch 16) from the same
server model. Rows:
  engine      one round (``build_round``: sampling, local training, weighted aggregation, server step) with
              the strategy/chunk/unroll/conv lowering/devices that ``Experiment`` would pick ("auto") or a
              forced one. "vmap"/"loop" rounds are one compiled program; "host" rounds dispatch one compiled
              call per client from Python over the devices (``parallel.map_clients_host``). The process
              exposes one CPU device per core (``parallel.use_cpu_cores``), as the command line does.
  jax-loop    a jitted single-client update called in a Python loop on one device, plus a jitted running
              sum.
  torch-loop  the same models and steps in PyTorch, one client after another (skipped without torch).
  torch-vmap  PyTorch's vectorized form: ``torch.func.vmap(grad(loss))`` over a chunk of clients' parameters.
GFLOP/s counts the model's forward+backward FLOPs (XLA cost analysis of one gradient step, times steps)
against a float32 matmul peak measured in the same run. Every row is warmed up, then the rows take turns
(A B C A B C ...) for ``--repeats`` rounds; a row's rate is its median, an engine ratio the median (quartiles)
of the per-repeat ratios. The machine's load average is printed because shared machines skew timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import statistics
import sys
import threading
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fedjaxpriv import parallel  # noqa: E402
from fedjaxpriv.client.local import LocalSpec, batch_loss, client_update  # noqa: E402
from fedjaxpriv.client.settings import make_settings  # noqa: E402
from fedjaxpriv.models import get_model  # noqa: E402
from fedjaxpriv.simulation import AggregationSpec, Population, build_round, init_server_state  # noqa: E402

STEPS, BATCH, EXAMPLES, LR, POOL = 5, 16, 64, 0.05, 4096


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    model: str
    input_shape: tuple[int, ...]
    clients: int
    model_kwargs: tuple = ()


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    strategy: str          # "vmap", "loop" (compiled) or "host" (Python loop of compiled chunks)
    chunk: int
    unroll: int
    conv_as_matmul: bool
    devices: int = 1       # clients sharded over a mesh of this many devices (1 = no mesh)
    outer: bool = False    # dense weight gradients as sums of outer products

    def label(self) -> str:
        chunk = "" if self.strategy == "loop" else f" chunk={self.chunk}"  # "loop": one client per iteration
        return (f"{self.strategy}{chunk} unroll={self.unroll}" + (" conv=matmul" if self.conv_as_matmul else "")
                + (" outer" if self.outer else "") + (f" devices={self.devices}" if self.devices > 1 else ""))


def median_seconds(run: Callable[[], Any], repeats: int, stop: threading.Event | None = None) -> float:
    """Median wall time of ``run`` (blocked until ready) after one untimed warm-up call."""
    return statistics.median(interleaved_seconds([run], repeats, stop)[0])


def stop_on_term() -> threading.Event:
    """An event that SIGTERM (``timeout``'s signal) sets: the timed repeats stop after the one under way, and the
    tables print what the finished repeats measured, so a benchmark cut at its time limit still reports."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def interleaved_seconds(runs: list[Callable[[], Any]], repeats: int,
                        stop: threading.Event | None = None) -> list[list[float]]:
    """Wall times (s) of each run, blocked until ready: one untimed warm-up call each, then ``repeats`` rounds
    in which every run goes once in turn (A B C A B C ...), so that load on a shared machine hits them alike.
    Fewer rounds (at least one) when ``stop`` is set."""
    for run in runs:
        jax.block_until_ready(run())
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, spent in zip(runs, times):
            start = time.perf_counter()
            jax.block_until_ready(run())
            spent.append(time.perf_counter() - start)
        if stop is not None and stop.is_set():
            break
    return times


def matmul_peak_gflops(repeats: int, stop: threading.Event | None = None) -> float:
    """Measured float32 matmul throughput (GFLOP/s) of the default backend."""
    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(lambda u, v: jnp.dot(u, v, precision=jax.lax.Precision.HIGHEST))
    return 2 * n**3 / median_seconds(lambda: matmul(a, b), max(repeats, 3), stop) / 1e9


def grad_step_flops(apply_fn: Callable, params: Any, x: jax.Array) -> float:
    """XLA's FLOP count of one forward+backward pass on a batch."""
    targets = jax.nn.one_hot(jnp.zeros(x.shape[0], jnp.int32), 10)
    mask = jnp.ones(x.shape[0], bool)
    compiled = jax.jit(jax.grad(lambda p: batch_loss(apply_fn, p, x, targets, mask))).lower(params).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def make_problem(work: Workload):
    model = get_model(work.model, work.input_shape, 10, **dict(work.model_kwargs))
    params = model.init(jax.random.key(0))
    x = np.asarray(jax.random.normal(jax.random.key(1), (POOL, *work.input_shape), jnp.float32))
    y = np.asarray(jax.random.randint(jax.random.key(2), (POOL,), 0, 10), np.int32)
    counts = np.full(work.clients, EXAMPLES, np.int32)
    offsets = ((np.arange(work.clients) * 37) % (POOL - EXAMPLES)).astype(np.int32)
    settings = make_settings(work.clients, counts, local_steps=STEPS, batch_size=BATCH, lr=LR)
    return model, params, x, y, offsets, counts, settings


def spec_for(config: EngineConfig) -> LocalSpec:
    return LocalSpec(max_steps=STEPS, max_batch=BATCH, max_count=EXAMPLES, num_classes=10, unroll=config.unroll,
                     conv_as_matmul=config.conv_as_matmul, outer_product_grads=config.outer, poisson=False,
                     prox=False)


def engine_runner(work: Workload, config: EngineConfig) -> Callable[[], Any]:
    model, params, x, y, offsets, counts, settings = make_problem(work)
    spec = spec_for(config)
    ids = jnp.arange(work.clients, dtype=jnp.int32)
    server_tx = optax.sgd(1.0)
    mesh = parallel.make_mesh(config.devices) if config.devices > 1 else None
    round_fn = build_round(model.apply, spec, server_tx, AggregationSpec(), chunk_size=config.chunk,
                           strategy=config.strategy, mesh=mesh)
    population = parallel.replicate(
        Population(jnp.asarray(x), jnp.asarray(y), jnp.asarray(offsets), jnp.asarray(counts)), mesh)
    device_settings = parallel.replicate(jax.tree_util.tree_map(jnp.asarray, settings), mesh)
    params = parallel.replicate(params, mesh)
    mask = jnp.ones(work.clients, bool)
    key = jax.random.key(7)

    def run_round():
        state = init_server_state(params, server_tx)
        return round_fn(state, population, device_settings, ids, mask, key)[0].params

    return run_round


def jax_loop_runner(work: Workload, outer: bool = False) -> Callable[[], Any]:
    """Per-client baseline: the best single-client program (steps unrolled) called in a Python loop."""
    model, params, x, y, offsets, counts, settings = make_problem(work)
    spec = LocalSpec(max_steps=STEPS, max_batch=BATCH, max_count=EXAMPLES, num_classes=10, unroll=STEPS, prox=False,
                     outer_product_grads=outer)
    x, y = jnp.asarray(x), jnp.asarray(y)
    rows = [jax.tree_util.tree_map(lambda a: jnp.asarray(a[i]), settings) for i in range(work.clients)]
    update = jax.jit(lambda p, offset, count, row, key: client_update(spec, model.apply, p, x, y, offset, count,
                                                                       row, key).delta)
    add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b), donate_argnums=(0,))
    keys = jax.random.split(jax.random.key(7), work.clients)

    def run():
        total = jax.tree_util.tree_map(jnp.zeros_like, params)
        for i in range(work.clients):
            total = add(total, update(params, offsets[i], counts[i], rows[i], keys[i]))
        return total

    return run


def torch_problem(work: Workload):
    """The workload's model and data in PyTorch (same architecture, inputs and client offsets), or None."""
    try:
        import torch
    except ImportError:
        return None
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    _, _, x, y, offsets, _, _ = make_problem(work)
    if work.model == "cnn":
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
            torch.nn.Linear(3136, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
        tx = torch.from_numpy(np.array(np.transpose(x, (0, 3, 1, 2))))
    else:
        hidden = dict(work.model_kwargs)["hidden"]
        layers, width = [torch.nn.Flatten()], int(np.prod(work.input_shape))
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))
        tx = torch.from_numpy(np.array(x))
    net = net.to(device)
    return (torch, net, tx.to(device), torch.from_numpy(np.array(y)).long().to(device),
            torch.from_numpy(np.array(offsets)).long(), device)


def torch_loop_runner(work: Workload, threads: int) -> Callable[[], Any] | None:
    """PyTorch's per-client loop: load the server model, ``STEPS`` optimizer steps, add the weighted delta."""
    problem = torch_problem(work)
    if problem is None:
        return None
    torch, net, tx, ty, offsets, device = problem
    server = [p.detach().clone() for p in net.parameters()]
    generator = torch.Generator().manual_seed(0)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run():
        torch.set_num_threads(threads)  # per call: the setting is global and the rows take turns
        total = [torch.zeros_like(p) for p in server]
        optimizer = torch.optim.SGD(net.parameters(), lr=LR)
        for i in range(work.clients):
            with torch.no_grad():
                for p, s in zip(net.parameters(), server):
                    p.copy_(s)
            for _ in range(STEPS):
                idx = (offsets[i] + torch.randperm(EXAMPLES, generator=generator)[:BATCH]).to(device)
                optimizer.zero_grad(set_to_none=True)
                loss_fn(net(tx[idx]), ty[idx]).backward()
                optimizer.step()
            with torch.no_grad():
                for t, p, s in zip(total, net.parameters(), server):
                    t.add_(p - s, alpha=float(EXAMPLES))
        if device == "cuda":
            torch.cuda.synchronize()
        return None

    return run


def torch_vmap_runner(work: Workload, threads: int, chunk: int) -> Callable[[], Any] | None:
    """PyTorch's vectorized form: ``torch.func.vmap(grad(loss))`` over ``chunk`` clients' parameters at a time."""
    problem = torch_problem(work)
    if problem is None:
        return None
    torch, net, tx, ty, offsets, device = problem
    from torch.func import functional_call, grad, vmap

    server = {name: p.detach().clone() for name, p in net.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    loss_fn = torch.nn.CrossEntropyLoss()
    client_grads = vmap(grad(lambda params, xb, yb: loss_fn(functional_call(net, params, (xb,)), yb)))

    def run():
        torch.set_num_threads(threads)
        total = {name: torch.zeros_like(p) for name, p in server.items()}
        for first in range(0, work.clients, chunk):
            ids = offsets[first:first + chunk]
            params = {name: p.expand(len(ids), *p.shape).clone() for name, p in server.items()}
            for _ in range(STEPS):
                order = torch.rand(len(ids), EXAMPLES, generator=generator).argsort(dim=1)[:, :BATCH]
                idx = (ids[:, None] + order).to(device)
                with torch.no_grad():
                    grads = client_grads(params, tx[idx], ty[idx])
                    params = {name: p - LR * grads[name] for name, p in params.items()}
            with torch.no_grad():
                for name, p in params.items():
                    total[name].add_((p - server[name]).sum(0), alpha=float(EXAMPLES))
        if device == "cuda":
            torch.cuda.synchronize()
        return None

    return run


def auto_config(work: Workload) -> EngineConfig:
    """What ``Experiment`` picks for this workload on this backend."""
    model = get_model(work.model, work.input_shape, 10, **dict(work.model_kwargs))
    mesh = parallel.local_mesh()
    devices = 1 if mesh is None else mesh.size
    plan = parallel.plan(model.apply, model.init(jax.random.key(0)), jnp.zeros((BATCH, *work.input_shape)),
                         max_steps=STEPS, max_batch=BATCH, num_clients=work.clients, mesh=mesh)
    return EngineConfig(strategy=plan.strategy, chunk=1 if plan.strategy == "host" else plan.chunk_size,
                        unroll=plan.unroll, devices=devices, conv_as_matmul=plan.conv_as_matmul,
                        outer=plan.outer_product_grads)


def explore_configs(work: Workload) -> list[EngineConfig]:
    n = jax.device_count()
    if work.model == "cnn":
        return [EngineConfig("host", 1, STEPS, False), EngineConfig("host", 1, STEPS, False, n),
                EngineConfig("host", 1, STEPS, True, n), EngineConfig("loop", 1, 1, True),
                EngineConfig("loop", 1, 1, True, n), EngineConfig("vmap", 2 * n, 1, True, n)]
    return [EngineConfig("vmap", c, 1, False) for c in (32, 128, work.clients)] + [
        EngineConfig("vmap", 128, STEPS, False), EngineConfig("loop", 1, 1, False),
        EngineConfig("vmap", 128, 1, False, 1, True)
    ] + [EngineConfig("vmap", c * n, 1, False, n, outer) for c in (64, 128, 256) for outer in (False, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer clients and repeats")
    parser.add_argument("--explore", action="store_true", help="also time other engine strategies")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (median reported)")
    parser.add_argument("--mlp-clients", type=int, default=None, help="MLP clients (default 1000, --quick 200)")
    parser.add_argument("--cnn-clients", type=int, default=None, help="CNN clients (default 100, --quick 16)")
    args = parser.parse_args()
    stop = stop_on_term()
    parallel.use_cpu_cores()  # as the command line does: one CPU device per core for the client mesh
    repeats = args.repeats or (2 if args.quick else 3)
    workloads = {
        "mlp": Workload("MLP 64-128-10 (9.6k params)", "mlp", (64,),
                        args.mlp_clients or (200 if args.quick else 1000), (("hidden", (128,)),)),
        "cnn": Workload("McMahan CNN 28x28 (1.66M params)", "cnn", (28, 28, 1),
                        args.cnn_clients or (16 if args.quick else 100)),
    }
    backend = jax.default_backend()
    print(f"backend={backend} devices={jax.device_count()} cores={os.cpu_count()} jax={jax.__version__} "
          f"load(1,5,15 min)={tuple(round(v, 2) for v in os.getloadavg())}")
    peak = matmul_peak_gflops(repeats, stop)
    print(f"measured fp32 matmul peak: {peak:.0f} GFLOP/s")
    print(f"each client: {EXAMPLES} examples, {STEPS} SGD steps of batch {BATCH}; medians of {repeats} runs\n")
    header = f"{'model':<34} {'method':<11} {'configuration':<38} {'clients/s':>10} {'GFLOP/s':>8} {'%peak':>6}"
    print(header + "\n" + "-" * len(header))
    for key in args.models.split(","):
        work = workloads[key]
        model = get_model(work.model, work.input_shape, 10, **dict(work.model_kwargs))
        params = model.init(jax.random.key(0))
        flops_per_client = STEPS * grad_step_flops(model.apply, params, jnp.zeros((BATCH, *work.input_shape)))
        auto = auto_config(work)
        rows = [("engine", "auto: " + auto.label(), engine_runner(work, auto))]
        if args.explore:
            rows += [("engine*", c.label(), engine_runner(work, c)) for c in explore_configs(work) if c != auto]
        rows.append(("jax-loop", "jit(one client, unroll=5) in Python", jax_loop_runner(work)))
        if work.model == "mlp":  # the ratio uses the faster of the two loops
            rows.append(("jax-loop", "the same, outer-product weight grads", jax_loop_runner(work, outer=True)))
        # Tiny MLP ops only lose to spinning thread pools; for the CNN both settings run, the best one counts.
        cores = os.cpu_count() or 1
        on_gpu = backend == "gpu"  # PyTorch then runs on CUDA too, where its CPU threads change nothing
        for threads in sorted({1} if work.model == "mlp" or on_gpu else {1, cores}):
            rows.append(("torch-loop", f"PyTorch one client at a time, {threads} thr",
                         torch_loop_runner(work, threads)))
        chunk = work.clients if work.model == "mlp" else 25
        for threads in sorted({cores} | ({1} if work.model == "mlp" and not on_gpu else set())):
            rows.append(("torch-vmap", f"torch.func.vmap, {chunk} clients, {threads} thr",
                         torch_vmap_runner(work, threads, chunk)))
        for method, label, runner in rows:
            if runner is None:
                print(f"{work.name:<34} {method:<11} {'skipped: torch not importable':<38}", flush=True)
        rows = [row for row in rows if row[2] is not None]
        times = interleaved_seconds([runner for _, _, runner in rows], repeats, stop)
        if stop.is_set():
            print(f"stopped by SIGTERM after {len(times[0])} of {repeats} repeats; later models not run", flush=True)
        best: dict[str, int] = {}  # method -> index of its fastest row
        for i, (method, label, _) in enumerate(rows):
            rate = work.clients / statistics.median(times[i])
            gflops = rate * flops_per_client / 1e9
            if method not in best or statistics.median(times[i]) < statistics.median(times[best[method]]):
                best[method] = i
            print(f"{work.name:<34} {method:<11} {label:<38} {rate:>10.1f} {gflops:>8.1f} {100 * gflops / peak:>5.1f}%",
                  flush=True)
        engine = np.asarray(times[0])
        ratios = []
        for method in ("jax-loop", "torch-loop", "torch-vmap"):
            if method in best:
                q25, q50, q75 = np.percentile(np.asarray(times[best[method]]) / engine, [25, 50, 75])
                ratios.append(f"engine(auto) / {method} = {q50:.2f}x ({q25:.2f}-{q75:.2f})")
        print(f"{'':<34} speed ratios, median (quartiles) over repeats: " + "; ".join(ratios)
              + f"  ({flops_per_client / 1e9:.3f} GFLOP per client)\n", flush=True)
        if stop.is_set():
            break
    print(f"load after: {tuple(round(v, 2) for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
