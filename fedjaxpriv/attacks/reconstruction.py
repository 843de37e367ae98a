"""Local-model reconstruction by an eavesdropper (after Xu and Neglia 2021, "What else is leaked when
eavesdropping Federated Learning?").

Threat model: an eavesdropper on one client's uplink records the messages (model updates) the client sends,
with their round numbers, but not the global models the server broadcasts in between. It holds one global
model anyway: the initial model (round 1), or a later public one, e.g. the model released after training.
Its target is the client's local model at the last round R it observed, ``L = theta_R + m_R`` (the global
model the client started round R from plus its message). Without the messages its best guess is the global
model it holds (or the initial model); a reconstruction closer to L than that, or fitting the client's data
better, is what the messages leaked.

Reconstruction: the held model ``theta_g`` of round g plus a model of the global drift between rounds g and R.
The global model moves by the weighted mean of its cohort's updates, a step ``w`` (about server lr / cohort
size, ``default_client_weight``) along each; the client's own updates are known, the other clients' are
unknown and modelled as zero, so ``theta_R ~ theta_g + w (sum_{g <= r < R} m_r - sum_{R <= r < g} m_r)`` over
the observed rounds and ``L ~ theta_R + m_R`` (``drift_weights``). Summing every message from the initial
model with weight 1 instead treats the client as training alone: its drift accumulates, and can end
farther from L than the initial model.

With noise in the messages (DP-SGD, local DP), L holds the client's own noise, which the eavesdropper sees:
the L2 distance to L stays small while the reconstruction says little about the client's data. The accuracy
gain on the client's data over the held model is then the measure of what leaked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv import evaluation
from fedjaxpriv.attacks.attribute import paired_advantage
from fedjaxpriv.attacks.membership import ordered_taps, stack_taps

if TYPE_CHECKING:
    from fedjaxpriv.experiment import Experiment
    from fedjaxpriv.program import Tap

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]


def accumulate_messages(init_params: Params, messages: Params, scale: float | jax.Array = 1.0,
                        mask: jax.Array | None = None) -> Params:
    """``init + scale * sum_r mask_r message_r``: a model plus weighted messages of ONE client.

    Args:
      init_params: the model the messages are added to (e.g. the initial or a held global model).
      messages: the client's observed messages, leaves [R, ...] (updates, as sent).
      scale: multiplies the summed updates (traced scalar).
      mask: [R] bool/float weight of each round's message (default all 1; ``drift_weights`` gives the
        eavesdropper's).

    Returns:
      reconstructed params (``jax.vmap`` over clients for many targets).
    """

    def accumulate(p: jax.Array, m: jax.Array) -> jax.Array:
        weights = jnp.ones(m.shape[:1], p.dtype) if mask is None else jnp.asarray(mask, p.dtype)
        total = jnp.tensordot(weights, m.astype(p.dtype), axes=1)
        return p + jnp.asarray(scale, p.dtype) * total

    return jax.tree_util.tree_map(accumulate, init_params, messages)


def drift_weights(rounds: Sequence[int] | np.ndarray, held_round: int, client_weight: float) -> np.ndarray:
    """Weights of a client's messages in the reconstruction of its local model at its last observed round.

    Args:
      rounds: [R] the (1-based) rounds of its observed messages, strictly increasing.
      held_round: the round whose start the held global model is (1: the initial model; ``run.rounds + 1``:
        the final model).
      client_weight: w >= 0, the step the global model takes along one client update (``default_client_weight``).

    Returns:
      [R] float32: 1 for the last message, plus ``+w`` for rounds in [held_round, R) and ``-w`` for rounds in
      [R, held_round) (the drift model of the module docstring).
    """
    rounds = np.asarray(rounds, np.int64)
    if rounds.ndim != 1 or rounds.size == 0 or np.any(np.diff(rounds) <= 0) or rounds[0] < 1:
        raise ValueError(f"rounds={rounds.tolist()} must be a non-empty, strictly increasing list of rounds >= 1.")
    if held_round < 1:
        raise ValueError(f"held_round={held_round} must be >= 1 (round 1 starts from the initial model).")
    if not (np.isfinite(client_weight) and client_weight >= 0):
        raise ValueError(f"client_weight={client_weight} must be a finite number >= 0.")
    last = rounds[-1]
    forward = (rounds >= held_round) & (rounds < last)
    backward = (rounds >= last) & (rounds < held_round)
    weights = client_weight * (forward.astype(np.float64) - backward.astype(np.float64))
    weights[-1] += 1.0
    return weights.astype(np.float32)


def params_distance(a: Params, b: Params) -> jax.Array:
    """L2 distance between two parameter pytrees over all coordinates -> scalar."""
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda u, v: jnp.sum(jnp.square(u - v)), a, b))
    return jnp.sqrt(sum(leaves))


def reconstruction_report(apply_fn: ApplyFn, reconstructed: Params, local_params: Params, init_params: Params,
                          global_params: Params, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """How well the reconstruction stands in for the client's local model, against the two trivial ones.

    Args:
      apply_fn: (params, x [B, ...]) -> logits.
      reconstructed: the eavesdropper's model.
      local_params: the client's true local model.
      init_params: the initial model.
      global_params: the global model the eavesdropper holds without the messages.
      x, y: the client's examples [N, ...] and labels [N].

    Returns:
      dict: "accuracy" (reconstruction), "local_accuracy", "init_accuracy", "global_accuracy" on the client's
      data; "l2_distance" (to the local model), "init_l2_distance", "global_l2_distance"; "relative_l2"
      (reconstruction / initial distance) and "relative_l2_global" (reconstruction / global distance): < 1
      means closer than that baseline; "accuracy_gain" and "accuracy_gain_global" over the two baselines.
    """
    accuracy = {name: evaluation.evaluate(apply_fn, p, x, y)["accuracy"] for name, p in
                (("accuracy", reconstructed), ("local_accuracy", local_params), ("init_accuracy", init_params),
                 ("global_accuracy", global_params))}
    distance = float(params_distance(reconstructed, local_params))
    init_distance = float(params_distance(init_params, local_params))
    global_distance = float(params_distance(global_params, local_params))
    return {**accuracy, "l2_distance": distance, "init_l2_distance": init_distance,
            "global_l2_distance": global_distance, "relative_l2": distance / max(init_distance, 1e-12),
            "relative_l2_global": distance / max(global_distance, 1e-12),
            "accuracy_gain": accuracy["accuracy"] - accuracy["init_accuracy"],
            "accuracy_gain_global": accuracy["accuracy"] - accuracy["global_accuracy"]}


def default_client_weight(experiment: Experiment, client: int) -> float:
    """w: the global model's step along one update of ``client`` under FedAvg/FedSGD with an SGD server.

    ``server lr x n_c / (n_c + (K - 1) n_other)`` with example weighting (n_c the client's examples, n_other the
    mean over the other clients, K = clients_per_round), else ``server lr / K`` (uniform weighting, and
    client-level DP, whose fixed denominator is K). Exact with full participation (K = all clients);
    approximate with partial participation, server momentum or Adam, or server-side clipping.
    """
    s, counts = experiment.config.server, np.asarray(experiment.population.counts, np.float64)
    if s.weighting == "examples" and experiment.client_level is None and counts.size > 1:
        others = (counts.sum() - counts[client]) / (counts.size - 1)
        return float(s.lr * counts[client] / max(counts[client] + (s.clients_per_round - 1) * others, 1e-12))
    return float(s.lr / s.clients_per_round)


def reconstruction_attack_on_taps(experiment: Experiment, taps: Sequence[Tap] | dict[int, Tap],
                                  clients: Sequence[int] | None = None, *, global_params: Params,
                                  global_round: int | None = None, client_weight: float | None = None,
                                  alpha: float = 0.05) -> dict[str, Any]:
    """Local-model reconstruction by an eavesdropper on each target's link, from a run's taps.

    Args:
      experiment: the run's experiment (model, population, initial model, server config).
      taps: the run's taps (``results.taps`` or a list of ``Tap``); a client's target is its local model at the
        last tapped round it took part in.
      clients: target client ids (default every tapped client); each must appear in some tap.
      global_params: the global model the eavesdropper holds, e.g. the released ``results.params`` (or
        ``experiment.initial_state.params`` with ``global_round=1`` for an eavesdropper without one).
      global_round: the round whose start ``global_params`` is (default ``run.rounds + 1``: the final model).
      client_weight: w of ``drift_weights`` (default ``default_client_weight`` of each client).
      alpha: miscoverage of the accuracy-gain intervals.

    Returns:
      dict: means over clients of "relative_l2_global" and "relative_l2" (vs the initial model) and the fraction
      "closer_than_global" of clients with relative_l2_global < 1; pooled over the clients' examples,
      "accuracy", "local_accuracy", "global_accuracy", "init_accuracy", "accuracy_gain_global" with
      "accuracy_gain_global_low"/"_high" (``attribute.paired_advantage``) and "accuracy_gain"; "num_clients";
      "per_client": {client: ``reconstruction_report`` + "rounds"}.
    """
    init = jax.tree_util.tree_map(np.asarray, experiment.initial_state.params)
    held = jax.tree_util.tree_map(np.asarray, global_params)
    global_round = experiment.config.run.rounds + 1 if global_round is None else int(global_round)
    observed = ordered_taps(taps)
    targets = (sorted({int(c) for tap in observed for c in tap.client_ids}) if clients is None
               else [int(c) for c in clients])
    if not targets:
        raise ValueError("no target clients: the taps hold no client and clients= is empty.")
    apply_fn = experiment.model.apply
    per_client, correct = {}, {"accuracy": [], "local": [], "global": [], "init": []}
    for client in targets:
        server, messages = stack_taps(observed, client)
        rounds = [t.round for t in observed if np.any(np.asarray(t.client_ids) == client)]
        local = jax.tree_util.tree_map(lambda p, m: p[-1] + m[-1], server, messages)
        weight = default_client_weight(experiment, client) if client_weight is None else float(client_weight)
        rebuilt = accumulate_messages(held, messages, mask=drift_weights(rounds, global_round, weight))
        data = experiment.population.client(client)
        per_client[client] = {**reconstruction_report(apply_fn, rebuilt, local, init, held, data.x, data.y),
                              "rounds": rounds}
        for key, params in (("accuracy", rebuilt), ("local", local), ("global", held), ("init", init)):
            correct[key].append(evaluation.per_example_stats(apply_fn, params, data.x, data.y)[1] > 0.5)
    pooled = {key: np.concatenate(v) for key, v in correct.items()}
    gain = paired_advantage(pooled["accuracy"], pooled["global"], alpha)
    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in per_client.values()]))

    return {"relative_l2_global": mean("relative_l2_global"), "relative_l2": mean("relative_l2"),
            "closer_than_global": float(np.mean([r["relative_l2_global"] < 1 for r in per_client.values()])),
            "accuracy": float(np.mean(pooled["accuracy"])), "local_accuracy": float(np.mean(pooled["local"])),
            "global_accuracy": float(np.mean(pooled["global"])), "init_accuracy": float(np.mean(pooled["init"])),
            "accuracy_gain_global": gain["advantage"], "accuracy_gain_global_low": gain["advantage_low"],
            "accuracy_gain_global_high": gain["advantage_high"],
            "accuracy_gain": float(np.mean(pooled["accuracy"]) - np.mean(pooled["init"])),
            "num_clients": len(targets), "per_client": per_client}
