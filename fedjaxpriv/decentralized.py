"""Decentralized learning: every node keeps its own model, trains it locally, and averages with its neighbours.

Decentralized SGD (Lian et al. 2017; Koloskova et al. 2020's unified view) on the FL engine: node i's round is
the same local training and message chain as an FL client's (``simulation.client_message``, vmapped and chunked
over the nodes by ``parallel.map_clients``), started from its own model x_i, and then a gossip step

    x_i <- sum_j W_ij (x_j + m_j),

where m_j is the (defended) update node j sends and W a doubly-stochastic mixing matrix. W is never built densely:
a ``Topology`` holds each node's neighbours and weights, ``[C, D]`` with D the largest in-degree plus one (the
node itself), so that a step costs O(C D P) for P parameters. The complete graph's W is the uniform average,
applied as a mean, O(C P).

CHOCO gossip (Koloskova, Stich & Jaggi, ICML 2019) replaces the gossip step when messages are compressed: node i
sends q_i = Q(x_i + m_i - x_hat_i), every public model moves to x_hat_j + q_j, and x_i <- x_i + m_i + gamma sum_j
W_ij (x_hat_j - x_hat_i).

Topologies: ``ring``, ``torus`` (2-D), ``erdos_renyi`` (Metropolis-Hastings weights, Xiao & Boyd 2004),
``exponential`` (each node i hears i - 2^k mod C, k = 0..floor(log2(C - 1)), with uniform weights: a circulant,
hence doubly stochastic; Ying et al. 2021), ``complete`` and time-varying random matchings
(``random_matching``: a fresh perfect matching each round, W = (I + P) / 2; Boyd et al. 2006).

References:
  Lian, Zhang, Zhang, Hsieh, Zhang, Liu. "Can Decentralized Algorithms Outperform Centralized Algorithms?"
  NeurIPS 2017.
  Koloskova, Loizou, Boreiri, Jaggi, Stich. "A Unified Theory of Decentralized SGD with Changing Topology and
  Local Updates". ICML 2020.
  Xiao, Boyd. "Fast linear iterations for distributed averaging". Systems & Control Letters 2004.
  Boyd, Ghosh, Prabhakar, Shah. "Randomized gossip algorithms". IEEE Trans. Inf. Theory 2006.
  Ying, Yuan, Chen, Hu, Pan, Yin. "Exponential Graph is Provably Efficient for Decentralized Deep Training".
  NeurIPS 2021.
  Koloskova, Stich, Jaggi. "Decentralized Stochastic Optimization and Gossip Algorithms with Compressed
  Communication". ICML 2019.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjaxpriv import evaluation
from fedjaxpriv.client import dp as dp_ops
from fedjaxpriv.client.local import ApplyFn, LocalSpec
from fedjaxpriv.config import TOPOLOGIES
from fedjaxpriv.client.settings import ClientSettings, per_client_array
from fedjaxpriv.experiment import Experiment
from fedjaxpriv.program import Tap
from fedjaxpriv.runner import Record
from fedjaxpriv.models.tasks import CLASSIFICATION
from fedjaxpriv.parallel import CLIENT_AXIS, map_clients, pad_clients, replicate, shard_rows
from fedjaxpriv.server.algorithms import FEDAVG, trains_as_fedavg
from fedjaxpriv.server import Cohort
from fedjaxpriv.simulation import (ClientStates, MessageFn, Population, ServerState, client_keys_base,
                                   client_message, cohort_rows, identity_message, initial_client_states)

Params = Any
class Topology(NamedTuple):
    """A mixing matrix W [C, C] kept sparse: row i is ``sum_d weights[i, d] * e_{neighbors[i, d]}``.

    Attributes:
      name: the topology's name (``TOPOLOGIES``).
      neighbors: int32 [C, D], the nodes node i averages (itself included; unused slots point to i with weight 0).
      weights: float32 [C, D], their weights; every row and every column of W sums to 1.
    """

    name: str
    neighbors: np.ndarray
    weights: np.ndarray

    @property
    def num_nodes(self) -> int:
        return int(self.neighbors.shape[0])

    def dense(self) -> np.ndarray:
        """W as a float64 [C, C] matrix (for small C: tests, spectral gaps, ``privacy.network``); the complete
        graph's is the uniform average (``mix`` takes its mean without neighbour lists). A random matching has a new
        W every round: refused."""
        if self.name == "complete":
            return np.full((self.num_nodes, self.num_nodes), 1.0 / self.num_nodes)
        if self.name == "random_matching":
            raise ValueError("random_matching draws a new mixing matrix every round; allowed: a fixed graph.")
        w = np.zeros((self.num_nodes, self.num_nodes))
        np.add.at(w, (np.repeat(np.arange(self.num_nodes), self.neighbors.shape[1]), self.neighbors.ravel()),
                  self.weights.ravel().astype(np.float64))
        return w


def _check_nodes(num_nodes: int, least: int = 1) -> int:
    if not isinstance(num_nodes, (int, np.integer)) or num_nodes < least:
        raise ValueError(f"num_nodes={num_nodes!r} is invalid; allowed: an integer >= {least}.")
    return int(num_nodes)


def from_edges(name: str, num_nodes: int, edges: np.ndarray) -> Topology:
    """The Metropolis-Hastings mixing matrix of an undirected graph (Xiao & Boyd 2004): w_ij = 1 / (1 + max(d_i,
    d_j)) on every edge, w_ii = 1 - sum_j w_ij. Symmetric, hence doubly stochastic.

    Args:
      edges: int [E, 2] undirected edges (each once; no self-loops).
    """
    edges = np.asarray(edges, np.int64).reshape(-1, 2)
    if edges.size and (edges.min() < 0 or edges.max() >= num_nodes or np.any(edges[:, 0] == edges[:, 1])):
        raise ValueError(f"edges must join two different nodes in [0, {num_nodes}).")
    both = np.concatenate([edges, edges[:, ::-1]])
    degree = np.bincount(both[:, 0], minlength=num_nodes)
    width = 1 + int(degree.max(initial=0))
    neighbors = np.tile(np.arange(num_nodes)[:, None], (1, width))
    weights = np.zeros((num_nodes, width), np.float64)
    # Slot 0 is the node itself; node i's edges take slots 1, 2, ... in the order they come in ``both``.
    both = both[np.argsort(both[:, 0], kind="stable")]
    slot = 1 + np.arange(len(both)) - np.searchsorted(both[:, 0], both[:, 0])
    neighbors[both[:, 0], slot] = both[:, 1]
    weights[both[:, 0], slot] = 1.0 / (1.0 + np.maximum(degree[both[:, 0]], degree[both[:, 1]]))
    weights[:, 0] = 1.0 - weights[:, 1:].sum(axis=1)
    return Topology(name, neighbors.astype(np.int32), weights.astype(np.float32))


def ring(num_nodes: int) -> Topology:
    """Each node averages with its two ring neighbours, weights 1/3 each (C >= 3)."""
    c = _check_nodes(num_nodes, 3)
    return from_edges("ring", c, np.stack([np.arange(c), (np.arange(c) + 1) % c], axis=1))


def torus(rows: int, cols: int) -> Topology:
    """A rows x cols 2-D torus (node r * cols + c; four neighbours, weights 1/5 each; rows, cols >= 3)."""
    _check_nodes(rows, 3), _check_nodes(cols, 3)
    index = np.arange(rows * cols).reshape(rows, cols)
    edges = np.concatenate([np.stack([index.ravel(), np.roll(index, -1, axis=1).ravel()], axis=1),
                            np.stack([index.ravel(), np.roll(index, -1, axis=0).ravel()], axis=1)])
    return from_edges("torus", rows * cols, edges)


def erdos_renyi(num_nodes: int, edge_probability: float, seed: int) -> Topology:
    """A G(C, p) graph drawn with ``seed`` (each edge independently with probability p), Metropolis-Hastings
    weights. Refused when the draw is not connected: its nodes would never agree."""
    c = _check_nodes(num_nodes, 2)
    if not 0.0 < edge_probability <= 1.0:
        raise ValueError(f"edge_probability={edge_probability!r} is invalid; allowed: a number in (0, 1].")
    topology = from_edges("erdos_renyi", c, _random_pairs(c, edge_probability, np.random.default_rng(seed)))
    components = _components(topology)
    if components > 1:
        raise ValueError(f"erdos_renyi(num_nodes={c}, edge_probability={edge_probability}, seed={seed}) drew a graph "
                         f"of {components} separate parts; allowed: a connected draw (raise edge_probability above "
                         f"about log(C)/C = {math.log(c) / c:.3g}, or change the seed).")
    return topology


def _random_pairs(num_nodes: int, probability: float, rng: np.random.Generator) -> np.ndarray:
    """int64 [E, 2]: each of the C (C - 1) / 2 pairs i < j independently with ``probability``, drawn as a
    Binomial number of distinct pair indices (memory O(E), never a C x C array), each index k mapped to its pair in
    row-major order of the upper triangle."""
    pairs = num_nodes * (num_nodes - 1) // 2
    chosen = np.sort(rng.choice(pairs, size=int(rng.binomial(pairs, probability)), replace=False)).astype(np.int64)
    # Row i of the upper triangle starts at index i C - i (i + 1) / 2; invert that with a square root, then fix
    # any float rounding by one row either way.
    def start(i: np.ndarray) -> np.ndarray:
        return i * num_nodes - i * (i + 1) // 2

    c = float(num_nodes)
    rows = np.floor((2 * c - 1 - np.sqrt((2 * c - 1) ** 2 - 8 * chosen)) / 2).astype(np.int64)
    rows = np.where(start(rows) > chosen, rows - 1, rows)
    rows = np.where(start(rows + 1) <= chosen, rows + 1, rows)
    return np.stack([rows, rows + 1 + chosen - start(rows)], axis=1)


def _reach(topology: Topology) -> Any:
    """The sparse [C, C] matrix with a 1 at (j, i) where node i averages node j's model (W_ij > 0, j != i)."""
    from scipy.sparse import csr_matrix

    receivers = np.repeat(np.arange(topology.num_nodes), topology.neighbors.shape[1])
    senders = topology.neighbors.ravel()
    carried = (topology.weights.ravel() > 0) & (senders != receivers)
    return csr_matrix((np.ones(int(carried.sum())), (senders[carried], receivers[carried])),
                      shape=(topology.num_nodes, topology.num_nodes))


def _components(topology: Topology) -> int:
    from scipy.sparse.csgraph import connected_components

    return int(connected_components(_reach(topology), directed=False)[0])


def exponential(num_nodes: int) -> Topology:
    """The static exponential graph: node i averages itself and nodes i - 2^k (mod C), k = 0..floor(log2(C-1)),
    each with weight 1 / (1 + number of k). W is circulant, so every column sums to 1 too."""
    c = _check_nodes(num_nodes, 2)
    hops = 2 ** np.arange(int(math.floor(math.log2(c - 1))) + 1)
    neighbors = np.concatenate([np.arange(c)[:, None], (np.arange(c)[:, None] - hops[None, :]) % c], axis=1)
    weights = np.full(neighbors.shape, 1.0 / neighbors.shape[1], np.float32)
    return Topology("exponential", neighbors.astype(np.int32), weights)


def complete(num_nodes: int) -> Topology:
    """Every node averages every node with weight 1/C (mixed as a mean: no [C, C] array is stored)."""
    c = _check_nodes(num_nodes, 1)
    return Topology("complete", np.zeros((c, 0), np.int32), np.zeros((c, 0), np.float32))


def random_matching(num_nodes: int) -> Topology:
    """Time-varying: each round a uniformly random perfect matching (an odd node out keeps its model), and each
    matched pair averages, W_t = (I + P_t) / 2. Its neighbours are drawn inside the round (``matching``)."""
    c = _check_nodes(num_nodes, 2)
    return Topology("random_matching", np.zeros((c, 0), np.int32), np.zeros((c, 0), np.float32))


def matching(key: jax.Array, num_nodes: int) -> tuple[jax.Array, jax.Array]:
    """One random perfect matching as (neighbours int32 [C, 2], weights float32 [C, 2]): node i averages itself
    and its partner with weights 1/2 (an unmatched node, C odd, itself with weight 1)."""
    order = jax.random.permutation(key, num_nodes)
    pairs = num_nodes // 2
    partner = jnp.arange(num_nodes, dtype=jnp.int32)
    partner = partner.at[order[:2 * pairs:2]].set(order[1:2 * pairs:2].astype(jnp.int32))
    partner = partner.at[order[1:2 * pairs:2]].set(order[:2 * pairs:2].astype(jnp.int32))
    neighbors = jnp.stack([jnp.arange(num_nodes, dtype=jnp.int32), partner], axis=1)
    return neighbors, jnp.full((num_nodes, 2), 0.5, jnp.float32)


def topology_for(name: str, num_nodes: int, *, seed: int = 0, edge_probability: float = 0.2) -> Topology:
    """The topology ``name`` over ``num_nodes`` nodes (a torus needs a square number of nodes here)."""
    if name not in TOPOLOGIES:
        raise ValueError(f"topology={name!r} is invalid; allowed: one of {list(TOPOLOGIES)}.")
    if name == "torus":
        side = math.isqrt(num_nodes)
        if side * side != num_nodes:
            raise ValueError(f"topology 'torus' with num_nodes={num_nodes}: allowed: a square number of nodes "
                             "(or call torus(rows, cols)).")
        return torus(side, side)
    builders: dict[str, Callable[[], Topology]] = {
        "ring": lambda: ring(num_nodes), "exponential": lambda: exponential(num_nodes),
        "complete": lambda: complete(num_nodes), "random_matching": lambda: random_matching(num_nodes),
        "erdos_renyi": lambda: erdos_renyi(num_nodes, edge_probability, seed)}
    return builders[name]()


def spectral_gap(topology: Topology) -> float:
    """1 - |lambda_2|, lambda_2 the second largest eigenvalue of W in modulus (W symmetric or normal here; dense,
    for small C). Consensus contracts by |lambda_2| per gossip step."""
    eigenvalues = np.sort(np.abs(np.linalg.eigvals(topology.dense())))[::-1]
    return float(1.0 - eigenvalues[1]) if eigenvalues.size > 1 else 1.0


def _mixing_slots(topology: Topology, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """This step's neighbours and weights [C, D] (a random matching draws them from ``key``)."""
    if topology.name != "random_matching":
        return jnp.asarray(topology.neighbors), jnp.asarray(topology.weights)
    if key is None:
        raise ValueError("mix with a random_matching topology needs the step's key.")
    return matching(key, topology.num_nodes)


def mix(models: Params, topology: Topology, key: jax.Array | None = None, online: jax.Array | None = None) -> Params:
    """One gossip step: node i's new model is ``sum_d weights[i, d] * models[neighbors[i, d]]`` (leaves [C, ...]),
    applied one neighbour slot at a time (memory of one [C, ...] gather, never [C, C] or [C, D, ...]). The complete
    graph is the mean; random matchings draw this step's matching from ``key``.

    ``online`` [C] bool: only online nodes take part; an offline node keeps its model, and an online node gives the
    weight of each offline neighbour to its own model (``W'_ij = W_ij`` for online i and j, ``W'_ii = W_ii + sum``
    of its offline neighbours' weights, ``W'`` = identity on offline rows): rows still sum to 1, and a symmetric W
    stays symmetric, so the online nodes' average is kept. The complete graph: the online nodes' mean.

    ``models`` may hold more rows than nodes (rows padded to a multiple of the devices): the extra rows are offline
    nodes that keep their values and that no node reads."""
    num_nodes = topology.num_nodes
    rows = jax.tree_util.tree_leaves(models)[0].shape[0]
    if online is not None or rows > num_nodes:
        online = jnp.ones(num_nodes, bool) if online is None else jnp.asarray(online, bool)
        return _mix_online(models, topology, key, jnp.pad(online, (0, rows - num_nodes)))
    if topology.name == "complete":
        return jax.tree_util.tree_map(
            lambda x: jnp.broadcast_to(jnp.mean(x.astype(jnp.float32), axis=0), x.shape).astype(x.dtype), models)
    neighbors, weights = _mixing_slots(topology, key)

    def mix_leaf(x: jax.Array) -> jax.Array:
        total = jnp.zeros(x.shape, jnp.float32)
        for d in range(neighbors.shape[1]):
            w = weights[:, d].reshape((-1,) + (1,) * (x.ndim - 1))
            total = total + w * jnp.take(x, neighbors[:, d], axis=0).astype(jnp.float32)
        return total.astype(x.dtype)

    return jax.tree_util.tree_map(mix_leaf, models)


def gossip_averaging(values: jax.Array, topology: Topology, steps: int, clip_norm: float, noise_multiplier: float,
                     key: jax.Array) -> jax.Array:
    """Gaussian gossip averaging (the averaging primitive of Muffliato, Cyffers et al. 2022): node i clips its
    value ``values[i]`` ([C, d]) to L2 norm ``clip_norm``, adds N(0, (noise_multiplier clip_norm)^2 I) once, then
    the nodes take ``steps`` gossip steps (``mix``). Returns every step's values ``y^0 .. y^steps`` [steps + 1, C,
    d] float32: what node v receives in step t is ``y^t[j]`` for the j it hears; ``privacy.network`` gives each
    node's pairwise network DP against each other node. A fixed graph only (random matchings are refused)."""
    if topology.name == "random_matching":
        raise ValueError("gossip_averaging needs a fixed graph (its privacy is computed from W); allowed: ring, torus, "
                         "erdos_renyi, exponential, complete.")
    values = jnp.asarray(values, jnp.float32)
    clipped, _ = dp_ops.clip_per_example(values, clip_norm)
    noisy = clipped + noise_multiplier * clip_norm * dp_ops.standard_normal(key, values.shape)

    def step(current: jax.Array, _: None) -> tuple[jax.Array, jax.Array]:
        return mix(current, topology), current

    final, sent = jax.lax.scan(step, noisy, None, length=int(steps))
    return jnp.concatenate([sent, final[None]])


def _mix_online(models: Params, topology: Topology, key: jax.Array | None, online: jax.Array) -> Params:
    """``mix`` among the ``online`` nodes ([rows] bool, rows >= C: see ``mix``)."""
    if topology.name == "complete":
        share = online.astype(jnp.float32) / jnp.maximum(jnp.sum(online), 1)

        def mean_of_online(x: jax.Array) -> jax.Array:
            mean = jnp.tensordot(share, x.astype(jnp.float32), axes=1)
            mask = online.reshape((-1,) + (1,) * (x.ndim - 1))
            return jnp.where(mask, mean[None], x.astype(jnp.float32)).astype(x.dtype)

        return jax.tree_util.tree_map(mean_of_online, models)
    neighbors, weights = _mixing_slots(topology, key)
    extra = online.shape[0] - topology.num_nodes
    if extra:  # padding rows: offline nodes whose only neighbour is themselves
        padding = jnp.arange(topology.num_nodes, online.shape[0], dtype=neighbors.dtype)
        neighbors = jnp.concatenate([neighbors, jnp.broadcast_to(padding[:, None], (extra, neighbors.shape[1]))])
        weights = jnp.concatenate([weights, jnp.zeros((extra, weights.shape[1]), weights.dtype)])
    weights = jnp.where(online[:, None] & online[neighbors], weights, 0.0)
    own = 1.0 - jnp.sum(weights, axis=1)  # the weight of the offline neighbours, and all of it offline

    def mix_leaf(x: jax.Array) -> jax.Array:
        shape = (-1,) + (1,) * (x.ndim - 1)
        total = own.reshape(shape) * x.astype(jnp.float32)
        for d in range(neighbors.shape[1]):
            total = total + weights[:, d].reshape(shape) * jnp.take(x, neighbors[:, d], axis=0).astype(jnp.float32)
        return total.astype(x.dtype)

    return jax.tree_util.tree_map(mix_leaf, models)


def consensus_distance(models: Params) -> jax.Array:
    """Mean over nodes of the squared L2 distance of a node's model to the nodes' average (float32 scalar)."""
    leaves = jax.tree_util.tree_leaves(models)
    return sum(jnp.sum(jnp.mean((x - jnp.mean(x, axis=0)) ** 2, axis=0)) for x in leaves)


def node_metrics(apply_fn: ApplyFn, models: Params, x: np.ndarray, y: np.ndarray, chunk: int = 32
                 ) -> dict[str, float]:
    """The nodes' models (leaves [C, ...]) on a test set (x [N, ...], y [N] labels): the average model's loss and
    accuracy (``average_test_loss``, ``average_test_accuracy``), the distribution of each node's own accuracy
    (``node_test_accuracy_mean`` ... ``_p90``) and the consensus distance."""
    average = jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), models)
    test = evaluation.evaluate(apply_fn, average, x, y)
    per_node = evaluation.models_accuracy(apply_fn, models, x, y, chunk)
    return {"average_test_loss": test["loss"], "average_test_accuracy": test["accuracy"],
            **evaluation.distribution_summary(per_node, "node_test_accuracy"),
            "consensus_distance": float(consensus_distance(models))}


def graph_distances(topology: Topology, source: int) -> np.ndarray:
    """[C] int: the rounds of gossip it takes node ``source``'s model to reach each node (0 for ``source``; -1 for
    a node it never reaches): hops along the edges j -> i with W_ij > 0. The complete graph: 1 hop to every other
    node. A random matching changes every round, so it has no fixed distances (refused)."""
    c = topology.num_nodes
    if not 0 <= source < c:
        raise ValueError(f"source={source} is invalid; allowed: a node in [0, {c}).")
    if topology.name == "random_matching":
        raise ValueError("random_matching draws a new graph every round: it has no fixed graph distances.")
    if topology.name == "complete":
        return np.where(np.arange(c) == source, 0, 1)
    from scipy.sparse.csgraph import shortest_path

    hops = shortest_path(_reach(topology), directed=True, unweighted=True, indices=source)
    return np.where(np.isfinite(hops), hops, -1).astype(np.int64)


def membership_by_distance(apply_fn: ApplyFn, models: Params, population: Any, test: Any, topology: Topology,
                           victims: Sequence[int]) -> tuple[list[dict[str, float]], dict[int, float]]:
    """What a node learns of another's training data from the model it holds, by graph distance: for each
    ``victim``, the loss-threshold membership attack (Yeom et al. 2018: lower loss, member) on every node's model
    (leaves [C, ...]), with the victim's training examples as members and as many test examples as non-members
    (the first ones). Returns (one row per (victim, node): ``victim``, ``node``, ``distance``, ``auc``; the mean
    AUC at each distance)."""
    from fedjaxpriv.attacks.membership import example_loss
    from fedjaxpriv.attacks.metrics import auc, roc_curve

    losses_of = jax.jit(lambda m, x, y: jax.vmap(lambda p: example_loss(apply_fn(p, x), y))(m))
    rows = []
    for victim in victims:
        offset, count = int(population.offsets[victim]), int(population.counts[victim])
        if count == 0 or count > len(test.y):
            raise ValueError(f"victim {victim} holds {count} examples; allowed: 1 to {len(test.y)} (the test set's "
                             "size, for as many non-members).")
        x = np.concatenate([population.x[offset:offset + count], test.x[:count]])
        y = np.concatenate([population.y[offset:offset + count], test.y[:count]])
        labels = np.concatenate([np.ones(count, bool), np.zeros(count, bool)])
        losses = np.asarray(losses_of(models, jnp.asarray(x), jnp.asarray(y)))
        distance = graph_distances(topology, victim)
        for node in range(topology.num_nodes):
            fpr, tpr, _ = roc_curve(-losses[node], labels)
            rows.append({"victim": int(victim), "node": node, "distance": int(distance[node]),
                         "auc": float(auc(fpr, tpr))})
    by_distance = {d: float(np.mean([r["auc"] for r in rows if r["distance"] == d]))
                   for d in sorted({r["distance"] for r in rows})}
    return rows, by_distance


class ObserverView(NamedTuple):
    """How the curious neighbour of each tapped node computes the model the node starts a round from.

    Node v starts round t from x_v^t = sum_j W_vj S_j^{t-1}, S_j^{t-1} being the model node j sent in round t-1
    (every node starts round 1 from the public initial model). Its observer u, the node of smallest id other
    than v that hears v directly (W_uv > 0), has heard S_j^{t-1} from every j with W_uj > 0 and knows its own
    S_u^{t-1}; a model it has not heard is replaced by S_u^{t-1}, the closest one it holds. So its estimate is
    ``sum_n weights[k, n] * S_{heard[n]}^{t-1}``, exact when every j with W_vj > 0 is heard by u (always in round
    1). On the complete graph u hears everyone and x_v^t is u's own model x_u^t (``own_model``).

    Attributes:
      victims: [V] the tapped nodes.
      observers: [V] their curious neighbours.
      heard: [N] the nodes whose last sent models the estimates read (kept in ``NodesState.heard``).
      weights: float64 [V, N].
      exact: [V] bool, the estimate is the node's start in every round.
      own_model: the complete graph: the estimate is the observer's own model.
    """

    victims: np.ndarray
    observers: np.ndarray
    heard: np.ndarray
    weights: np.ndarray
    exact: np.ndarray
    own_model: bool


def _weight_rows(topology: Topology) -> list[dict[int, float]]:
    """Row i of W as {j: W_ij} over the j with W_ij > 0."""
    rows: list[dict[int, float]] = [{} for _ in range(topology.num_nodes)]
    for i, (neighbors, weights) in enumerate(zip(topology.neighbors, topology.weights)):
        for j, w in zip(neighbors.tolist(), weights.tolist()):
            if w > 0:
                rows[i][j] = rows[i].get(j, 0.0) + w
    return rows


def observer_view(topology: Topology, victims: Sequence[int]) -> ObserverView:
    """The ``ObserverView`` of ``victims`` over ``topology`` (a random matching has no fixed neighbour: refused)."""
    c = topology.num_nodes
    victims = np.asarray([int(v) for v in victims], np.int64)
    if victims.size == 0 or victims.min() < 0 or victims.max() >= c or len(set(victims.tolist())) != victims.size:
        raise ValueError(f"tapped nodes {victims.tolist()} must be distinct nodes in [0, {c}).")
    if topology.name == "random_matching":
        raise ValueError("topology 'random_matching' draws a new neighbour every round: a tapped node has no fixed "
                         "curious neighbour; allowed: a fixed graph (ring, torus, erdos_renyi, exponential, "
                         "complete).")
    if c < 2:
        raise ValueError("a tapped node needs a neighbour: allowed: 2 or more nodes.")
    if topology.name == "complete":
        observers = np.where(victims == 0, 1, 0)
        return ObserverView(victims, observers, np.zeros(0, np.int64), np.zeros((victims.size, 0)),
                            np.ones(victims.size, bool), True)
    rows = _weight_rows(topology)
    observers, plans, exact = [], [], []
    for v in victims.tolist():
        hearers = [u for u in range(c) if u != v and v in rows[u]]
        if not hearers:
            raise ValueError(f"no node hears node {v} in topology {topology.name!r}: it has no curious neighbour.")
        u = min(hearers)
        known = set(rows[u]) | {u}
        plan: dict[int, float] = {}
        for j, w in rows[v].items():
            source = j if j in known else u
            plan[source] = plan.get(source, 0.0) + w
        observers.append(u)
        plans.append(plan)
        exact.append(set(rows[v]) <= known)
    heard = np.asarray(sorted({j for plan in plans for j in plan}), np.int64)
    column = {int(j): n for n, j in enumerate(heard)}
    weights = np.zeros((victims.size, heard.size))
    for k, plan in enumerate(plans):
        for j, w in plan.items():
            weights[k, column[j]] = w
    return ObserverView(victims, np.asarray(observers, np.int64), heard, weights, np.asarray(exact, bool), False)


class NodesState(NamedTuple):
    """Every node's model and what it keeps, leaves [C, ...].

    Attributes:
      params: node i's model x_i.
      round: int32, finished rounds.
      client_state: ``simulation.ClientStates`` of every node (e.g. error-feedback residuals).
      heard: leaves [N, ...]: the models the nodes ``ObserverView.heard`` sent in the last round (the initial
        model before round 1; ``()`` without taps).
      public: CHOCO gossip: leaves [C, ...], every node's public model x_hat_i, which every neighbour holds the same
        copy of (``()`` with exact gossip).
    """

    params: Params
    round: jax.Array
    client_state: ClientStates
    heard: Any = ()
    public: Any = ()


class NodesOutput(NamedTuple):
    """Per-node figures of a round, [C] (zeros for nodes that did not train).

    Attributes:
      loss: mean local training loss.
      steps: local steps taken.
      consensus: consensus distance after the gossip step (scalar).
      tapped: leaves [T, ...]: the models the nodes ``tap_ids`` sent (``()`` without them).
      bits: [C] the bits of what each node sent its neighbours (CHOCO gossip: its compressed message; exact
        gossip: 32 per parameter).
    """

    loss: jax.Array
    steps: jax.Array
    consensus: jax.Array
    tapped: Any = ()
    bits: Any = ()


def _copies(params: Params, count: int) -> Params:
    return jax.tree_util.tree_map(
        lambda p: jnp.array(jnp.broadcast_to(jnp.asarray(p)[None], (count, *jnp.shape(p)))), params)


def init_nodes(params: Params, num_nodes: int, client_state: ClientStates = ClientStates(),
               num_heard: int = 0, public: bool = False) -> NodesState:
    """Every node starts from ``params`` (copied C times); ``num_heard`` models heard before round 1, all
    ``params``; with ``public`` (CHOCO gossip) every node's public model starts at ``params`` too (the initial
    model is public)."""
    return NodesState(_copies(params, num_nodes), jnp.zeros((), jnp.int32), client_state,
                      _copies(params, num_heard) if num_heard else (), _copies(params, num_nodes) if public else ())


def build_dsgd_round(apply_fn: ApplyFn, spec: LocalSpec, topology: Topology, *,
                     message_fn: MessageFn = identity_message, chunk_size: int, strategy: str = "vmap",
                     mesh: jax.sharding.Mesh | None = None, prune_schedule: tuple[int, int] | None = None,
                     heard: np.ndarray | None = None, tap_width: int = 0, shard_nodes: bool = False,
                     choco_step: float | None = None, dropout: bool = False
                     ) -> Callable[..., tuple[NodesState, NodesOutput]]:
    """Builds ``round_fn(state, population, settings, mask, root_key[, tap_ids][, online]) -> (state, NodesOutput)``:
    every
    node with ``mask`` [C] True trains from its own model as an FL client does (same keys and settings rows, with
    the round's pruning sparsity: node i in round t is client i of FL's round t) and sends ``x_i + m_i`` (m_i its
    update after the message chain); a node that does not train sends its model unchanged. Every node then takes
    the gossip step over ``topology``. ``heard`` [N]: the new state keeps what these nodes sent
    (``NodesState.heard``); ``tap_width=T > 0``: the output holds what the nodes ``tap_ids`` [T] sent (under
    CHOCO gossip: their compressed public-model changes q).
    The state's rows may be padded past C (to a multiple of the devices, ``DecentralizedExperiment.place_state``):
    padding rows neither train nor mix, and the outputs cover the C nodes only. ``shard_nodes`` (with a mesh whose
    clients axis divides the state's rows): every node's model and state come in and go out split over that axis
    (``parallel.shard_rows``), rows / devices per device between rounds.

    ``choco_step=gamma`` runs CHOCO gossip (Koloskova, Stich & Jaggi 2019) instead: node i, at x_i^+ = x_i + its
    update after training, sends q_i, the message chain applied to x_i^+ - x_hat_i (a compressor such as top-k
    makes it small); every public model moves to x_hat_j + q_j, and x_i <- x_i^+ + gamma sum_j W_ij (x_hat_j -
    x_hat_i). Without compression and with gamma = 1 that is exact gossip of x^+. Every node sends, trained or not.
    ``dropout``: the round takes ``online`` [C] bool last; only online nodes gossip (``mix(online=...)``; the caller
    leaves offline nodes out of ``mask``). Exact gossip only. Jitted; ``state`` is donated."""
    if dropout and choco_step is not None:
        raise ValueError("topology.node_dropout > 0 runs with topology.gossip='exact' only; allowed: node_dropout 0 "
                         "with CHOCO gossip.")
    if choco_step is not None and heard is not None:
        raise ValueError("CHOCO gossip keeps no heard models: a curious neighbour reads the tapped node's public "
                         "model (NodesState.public) and hears its compressed change (tap_width).")
    if shard_nodes and mesh is None:
        raise ValueError("shard_nodes needs a mesh to split the nodes over.")
    num_nodes = topology.num_nodes

    def one_node(state: NodesState, population: Population, base_key: jax.Array, row: dict[str, Any]):
        node = ServerState(params=row["params"], opt_state=(), round=state.round, clip_norm=jnp.float32(math.inf),
                           client_state=(), algorithm_state=())
        active = row["mask"] & (row["count"] > 0)

        def trained(x: jax.Array, delta: jax.Array) -> jax.Array:  # x_i^+: the model after this round's training
            return x + jnp.where(active, delta, 0.0).astype(x.dtype)

        def public_change(delta: Params) -> Params:  # CHOCO: what node i's public model lacks of x_i^+
            return jax.tree_util.tree_map(lambda x, d, h: trained(x, d) - h, row["params"], delta, row["public"])

        message, _, client_state, stats, out = client_message(
            spec, apply_fn, message_fn, FEDAVG, node, population, base_key, row,
            message_input=None if choco_step is None else public_change)
        if choco_step is None:
            sent = jax.tree_util.tree_map(trained, row["params"], message)
            bits = jnp.float32(32.0 * sum(leaf.size for leaf in jax.tree_util.tree_leaves(message)))
            kept = ClientStates(*(jax.tree_util.tree_map(lambda new, old: jnp.where(active, new, old), new, old)
                                  for new, old in zip(client_state, row["client_state"])))
            half = ()
        else:  # every node sends q_i and keeps its message state; x_i^+ stays home
            sent, bits, kept = message, stats["bits"], client_state
            half = jax.tree_util.tree_map(trained, row["params"], out.delta)
        return (), (sent, half, kept, jnp.where(active, out.loss, 0.0), jnp.where(active, out.steps, 0), bits)

    def round_fn(state: NodesState, population: Population, settings: ClientSettings, mask: jax.Array,
                 root_key: jax.Array, tap_ids: jax.Array | None = None,
                 online: jax.Array | None = None) -> tuple[NodesState, NodesOutput]:
        round_key = jax.random.fold_in(root_key, state.round)
        base = client_keys_base(round_key)
        total = jax.tree_util.tree_leaves(state.params)[0].shape[0]  # C, or C padded to the devices
        ids = jnp.minimum(jnp.arange(total, dtype=jnp.int32), num_nodes - 1)  # padding rows read node C-1, masked
        mask = jnp.pad(mask, (0, total - num_nodes))
        rows = {**cohort_rows(state, population, settings, ids, mask, prune_schedule), "params": state.params,
                "public": state.public}
        _, (sent, half, kept, loss, steps, bits) = map_clients(
            lambda shared, row: one_node(*shared, row), rows, chunk_size=chunk_size, strategy=strategy, mesh=mesh,
            shared=(NodesState(params=(), round=state.round, client_state=(), heard=(), public=()), population, base))
        public = state.public
        if choco_step is None:
            params = mix(sent, topology, jax.random.fold_in(round_key, 3), online if dropout else None)
        else:
            public = jax.tree_util.tree_map(lambda h, q: h + q.astype(h.dtype), state.public, sent)
            mixed = mix(public, topology, jax.random.fold_in(round_key, 3))
            params = jax.tree_util.tree_map(lambda x, m, h: x + choco_step * (m - h), half, mixed, public)

        def rows_of(nodes: Any) -> Params:
            return jax.tree_util.tree_map(lambda leaf: jnp.take(leaf, jnp.asarray(nodes), axis=0), sent)

        new_heard = rows_of(heard) if heard is not None and len(heard) else ()
        tapped = rows_of(tap_ids) if tap_width else ()
        if shard_nodes:  # every node's rows stay on the device that holds them; the rest is replicated
            params, kept, public = jax.lax.with_sharding_constraint((params, kept, public),
                                                                    NamedSharding(mesh, P(CLIENT_AXIS)))
            new_heard, tapped = jax.lax.with_sharding_constraint((new_heard, tapped), NamedSharding(mesh, P()))
        nodes = jax.tree_util.tree_map(lambda leaf: leaf[:num_nodes], params)
        return (NodesState(params, state.round + 1, kept, new_heard, public),
                NodesOutput(loss[:num_nodes], steps[:num_nodes], consensus_distance(nodes), tapped, bits[:num_nodes]))

    return jax.jit(round_fn, donate_argnums=(0,))


def out_degrees(topology: Topology, online: np.ndarray | None = None) -> np.ndarray:
    """[C] the number of other nodes each node's model reaches in a round (the complete graph: C - 1; random
    matchings: 1, except an odd node out); with ``online`` [C] bool, among the online nodes (0 for an offline
    node, which sends nothing)."""
    c = topology.num_nodes
    online = np.ones(c, bool) if online is None else np.asarray(online, bool)
    if topology.name == "complete":
        return np.where(online, int(online.sum()) - 1, 0)
    if topology.name == "random_matching":  # at most 1 (C odd: the node left out this round sends nothing)
        return online.astype(np.int64)
    others = ((topology.neighbors != np.arange(c)[:, None]) & (topology.weights > 0)
              & online[:, None] & online[topology.neighbors])
    return np.bincount(topology.neighbors[others], minlength=c)


class DecentralizedExperiment(Experiment):
    """An ``Experiment`` without a server (``config.topology.graph``): every client is a node holding its own
    model (the state's ``params``, leaves [C, ...]); the nodes sampled each round (``server.clients_per_round``,
    ``client_sampling``) train, and every node takes a gossip step (``build_dsgd_round``). The run loop, store,
    checkpoints, signals and privacy tracking are the ``Experiment``'s: DP-SGD's example-level and local DP's
    message-level epsilons are accounted per node from the rounds it trains in (a node's model is
    post-processing of what it and its neighbours released).

    History: ``train_loss``, ``local_steps_mean`` (over the nodes that trained), ``bytes_per_client`` (what a node
    online sends each neighbour, its float32 model: compressing the update does not shrink it), ``bytes_total``,
    ``consensus_distance``; at evaluations ``test_loss`` / ``test_accuracy`` of the nodes' average model and the
    distribution of each node's own accuracy (``node_test_accuracy_*``; ``node_metrics``).

    With several devices (``shard_nodes``) every node's model and state stay split over them between rounds, their
    rows padded to a multiple of the devices (``node_rows``; ``saved_state`` drops the padding).
    ``topology.gossip='choco'`` runs CHOCO gossip (``build_dsgd_round(choco_step=topology.consensus_step)``):
    ``bytes_per_client`` is then what the message chain makes of each node's public-model change."""

    runs_topology = True

    def __init__(self, config: Any, **kwargs: Any) -> None:
        if not config.topology.decentralized:
            raise ValueError("DecentralizedExperiment needs topology.graph (one of "
                             f"{list(TOPOLOGIES)}); got 'none'.")
        super().__init__(config, **kwargs)
        if self.task is not CLASSIFICATION:
            raise ValueError(f"topology.graph={config.topology.graph!r} evaluates classification only for now; this "
                             f"run's task is {self.task.name!r}.")
        if not trains_as_fedavg(self.algorithm, self.initial_params):
            raise ValueError(f"algorithm {self.algorithm.name!r} with topology.graph: a decentralized run has no "
                             "server to keep its state or take its extra message; allowed: FedAvg, or an algorithm "
                             "that only changes local settings (fedprox, fedsgd).")
        t = config.topology
        self.topology = topology_for(t.graph, self.population.num_clients, seed=config.run.seed,
                                     edge_probability=t.edge_probability)
        tapped = list(config.run.tap_clients) if config.run.tap_rounds else []
        # Each node's probability of being offline in a round (topology.node_dropout), [C].
        self.node_dropout = per_client_array("node_dropout", t.node_dropout, self.population.num_clients)
        self.dropout = bool(np.any(self.node_dropout > 0))  # (the config refuses it with taps and CHOCO gossip)
        # What the tapped nodes' curious neighbours hear (run.tap_clients): kept in the state from round to round.
        self.observer_view = observer_view(self.topology, tapped) if tapped else None
        self.choco_step = t.consensus_step if t.gossip == "choco" else None
        # CHOCO: the observer reads the public models every node keeps of its neighbours, nothing more is kept.
        heard = None if self.observer_view is None or self.choco_step is not None else self.observer_view.heard
        # Every node's model and state split over the devices, their rows padded to a multiple of the devices.
        self.shard_nodes = bool(self.mesh is not None and self.mesh.shape[CLIENT_AXIS] > 1)
        devices = self.mesh.shape[CLIENT_AXIS] if self.shard_nodes else 1
        self.node_rows = -(-self.population.num_clients // devices) * devices

        def build(tap_width: int = 0) -> Callable[..., tuple[NodesState, NodesOutput]]:
            return build_dsgd_round(
                self.model.apply, self.spec, self.topology, message_fn=self.program.message_fn,
                chunk_size=self.chunk_size, strategy="vmap" if self.strategy == "host" else self.strategy,
                mesh=self.mesh, prune_schedule=self.program.prune_schedule, heard=heard, tap_width=tap_width,
                shard_nodes=self.shard_nodes, choco_step=self.choco_step, dropout=self.dropout)

        self.node_round_fn = build()
        self.node_tap_round_fn = build(len(tapped)) if tapped else None

    def nodes_online(self, round_index: int) -> np.ndarray:
        """[C] bool: the nodes online in round ``round_index`` (0-based), each offline with its
        ``topology.node_dropout``; the same draw on every call and after a resume (seeded by ``run.seed`` and the
        round). All online without dropout."""
        if not self.dropout:
            return np.ones(self.population.num_clients, bool)
        rng = np.random.default_rng([self.config.run.seed, round_index, 0x6E6F6465])
        return rng.random(self.population.num_clients) >= self.node_dropout

    def place_state(self, state: NodesState) -> NodesState:
        """``state`` (one row per node) on the mesh as a round returns it: with ``shard_nodes`` its models and
        states padded to ``node_rows`` rows and split over the devices."""
        if not self.shard_nodes:
            return replicate(state, self.mesh)

        def split(rows: Any) -> Any:
            return shard_rows(pad_clients(rows, self.node_rows), self.mesh)

        return NodesState(split(state.params), replicate(state.round, self.mesh), split(state.client_state),
                          replicate(state.heard, self.mesh), split(state.public))

    def _node_rows(self, rows: Any) -> Any:
        """Leaves [rows, ...] cut to one row per node (``place_state``'s padding rows dropped)."""
        return jax.tree_util.tree_map(lambda leaf: leaf[:self.population.num_clients], rows)

    def released_params(self, state: NodesState) -> Params:
        """Every node's model, one row per node."""
        return self._node_rows(state.params)

    def saved_state(self, state: NodesState) -> NodesState:
        """``state`` with one row per node: what a checkpoint holds."""
        return state._replace(params=self._node_rows(state.params), client_state=self._node_rows(state.client_state),
                              public=self._node_rows(state.public))

    def fresh_state(self, params: Any) -> NodesState:
        """Round 0 with every node at ``params`` and every node's message state at its initial value."""
        client_state = initial_client_states(self.program.message_transform, self.algorithm, params,
                                             self.population.num_clients)
        view = self.observer_view
        return init_nodes(params, self.population.num_clients, client_state, 0 if view is None else view.heard.size,
                          public=self.choco_step is not None)

    def tap(self, state: Any, client_ids: Sequence[int]) -> Tap:
        raise ValueError("a decentralized run's taps come out of its rounds (run.tap_clients, run.tap_rounds): what "
                         "each tapped node's curious neighbour hears.")

    def _starts_as_observed(self, state: NodesState, round_index: int,
                            positions: np.ndarray) -> tuple[Params, np.ndarray]:
        """The start models of the tapped nodes at ``positions`` of ``ObserverView.victims`` (leaves [T, ...]) as
        their observers compute them before the round, and whether each is exact ([T] bool); under CHOCO gossip
        the node's public model, which every neighbour holds (exact only before round 1, when it is the initial
        model). Reads ``state`` before it is donated."""
        view = self.observer_view
        if self.choco_step is not None:  # CHOCO: its neighbours know node j's public model x_hat_j, not x_j
            victims = view.victims[positions]
            starts = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[victims], state.public)
            return starts, np.full(len(positions), round_index == 0)  # x_hat_j = x_j = x_0 before round 1
        if round_index == 0:  # every node starts from the public initial model
            starts = jax.tree_util.tree_map(lambda p: np.repeat(np.asarray(p)[None], len(positions), axis=0),
                                            self.initial_params)
            return starts, np.ones(len(positions), bool)
        if view.own_model:
            observers = view.observers[positions]
            return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[observers], state.params), view.exact[positions]
        weights = view.weights[positions]
        starts = jax.tree_util.tree_map(
            lambda leaf: np.tensordot(weights, np.asarray(leaf, np.float64), axes=1).astype(leaf.dtype), state.heard)
        return starts, view.exact[positions]

    def observed_step(self, state: NodesState, round_index: int, cohort: Cohort | None = None,
                      tapped: Sequence[int] = ()) -> tuple[NodesState, Record, Tap | None]:
        """The round, and for the nodes ``tapped`` (run.tap_clients that train in it) what their curious neighbours
        see: a ``Tap`` with the model each sent minus its start as the neighbour computes it (``ObserverView``)."""
        skipped = 0
        if cohort is None:
            cohort, skipped = self.round_cohort(round_index)
        online = self.nodes_online(round_index)
        cohort = cohort._replace(mask=cohort.mask & online[cohort.ids])  # an offline node does not train
        active = np.zeros(self.population.num_clients, bool)
        active[cohort.ids[cohort.mask]] = True
        tapped = [int(v) for v in tapped]
        if tapped and (self.observer_view is None or not set(tapped) <= set(self.observer_view.victims.tolist())):
            raise ValueError(f"tapped={tapped} must be nodes of run.tap_clients="
                             f"{list(self.config.run.tap_clients)} (with run.tap_rounds).")
        arguments = (self.device_population, self.device_settings, jnp.asarray(active), self.root_key)
        start = time.perf_counter()
        if tapped:
            positions = np.asarray([int(np.flatnonzero(self.observer_view.victims == v)[0]) for v in tapped])
            starts, exact = self._starts_as_observed(state, round_index, positions)
            width = self.observer_view.victims.size
            ids = np.asarray(tapped + [tapped[-1]] * (width - len(tapped)), np.int32)
            state, out = self.node_tap_round_fn(state, *arguments, jnp.asarray(ids))
        elif self.dropout:
            state, out = self.node_round_fn(state, *arguments, None, jnp.asarray(online))
        else:
            state, out = self.node_round_fn(state, *arguments)
        out = jax.tree_util.tree_map(np.asarray, out)
        elapsed = time.perf_counter() - start
        tap = None
        if tapped:
            sent = jax.tree_util.tree_map(lambda leaf: leaf[:len(tapped)], out.tapped)
            if self.choco_step is None:  # a node sends its model: its message is that model minus its start
                sent = jax.tree_util.tree_map(np.subtract, sent, starts)
            # (CHOCO: a node sends q_j, already the change of its public model x_hat_j, the start)
            tap = Tap(round=round_index + 1, client_ids=np.asarray(tapped, np.int32), server_params=None,
                      messages=sent, start_params=starts, start_exact=exact,
                      observers=self.observer_view.observers[positions])
        trained = active & (self.population.counts > 0)
        n = max(int(trained.sum()), 1)
        sent_bytes = np.asarray(out.bits, np.float64) / 8.0  # [C] what each node sends each neighbour
        record: Record = {
            "round": round_index + 1, "participants": int(trained.sum()),
            "train_loss": float(np.sum(out.loss[trained])) / n, "local_steps_mean": float(np.sum(out.steps)) / n,
            "bytes_per_client": float(np.mean(sent_bytes[online])) if np.any(online) else 0.0,  # nodes that sent
            "bytes_total": float(np.sum(sent_bytes * out_degrees(self.topology, online))),
            "consensus_distance": float(out.consensus), "round_time_s": elapsed}
        if self.dropout:
            record["nodes_online"] = int(online.sum())
        return state, self.finish_round(record, cohort, skipped), tap

    def membership_by_distance(self, models: Params, victims: Sequence[int] | None = None
                               ) -> tuple[list[dict[str, float]], dict[int, float]]:
        """``membership_by_distance`` of this run's nodes (``models``: e.g. ``Results.params``; default victims:
        every node)."""
        victims = range(self.population.num_clients) if victims is None else victims
        return membership_by_distance(self.model.apply, models, self.population, self.test, self.topology, victims)

    def evaluate(self, params: Any, state: Any = None) -> Record:
        """The nodes' average model on the test set (``test_loss``, ``test_accuracy``), each node's own accuracy
        (``node_test_accuracy_*``) and the consensus distance (``node_metrics``)."""
        del state
        metrics = node_metrics(self.model.apply, params, self.test.x, self.test.y)
        return {"test_loss": metrics.pop("average_test_loss"), "test_accuracy": metrics.pop("average_test_accuracy"),
                **metrics}
