"""Model-based attribute inference (Driouich, Xu, Neglia et al. 2022, "A Novel Model-Based Attribute
Inference Attack in Federated Learning").

The server (or anyone holding a client's model) knows, for each of the client's examples, the
non-sensitive features and the label but not a sensitive attribute. For every candidate value of the
attribute it completes the example, evaluates the loss under the client's local model
(``server_params + message``) and guesses the value with the lowest loss: the model was fitted to the
client's true attribute values, so it explains the labels best with them.

``attribute_population`` builds an honest tabular setup: a binary attribute ``s`` that shifts the labels'
distribution (and is a model input), with client-specific group proportions, stored in
``FederatedData.attributes``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv.data.federated import Dataset, FederatedData, from_client_lists
from fedjaxpriv.data.synthetic import SeedLike, as_generator

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]


def attribute_population(seed: SeedLike, num_clients: int = 20, examples_per_client: int = 64, dim: int = 10,
                         num_classes: int = 2, attribute_effect: float = 1.0, group_concentration: float = 0.5,
                         num_test: int = 1000) -> tuple[FederatedData, Dataset, np.ndarray]:
    """Tabular population with a binary sensitive attribute that is an input and shifts the labels.

    Client c draws its group share ``p_c ~ Beta(g, g)`` (g = ``group_concentration``; small g gives clients
    a clear majority group); each example draws ``s ~ Bernoulli(p_c)``, features ``z ~ N(0, I_dim)`` and a
    label ``y ~ softmax(z W + attribute_effect (2 s - 1) (u + z V))`` with global ``W, V [dim, K]`` and
    ``u [K]`` ~ N(0, 1): the attribute shifts the labels and changes how the features act on them (an
    interaction only a nonlinear model captures). The model input is ``x = [z, s]`` (the attribute is the LAST column), float32 [dim + 1].

    Returns:
      (population with ``attributes`` = s [T], test set drawn with p = 0.5, test attributes [num_test]).
    """
    if num_clients < 1 or examples_per_client < 1 or dim < 1 or num_classes < 2:
        raise ValueError(f"need num_clients ({num_clients}), examples_per_client ({examples_per_client}), "
                         f"dim ({dim}) >= 1 and num_classes ({num_classes}) >= 2.")
    if group_concentration <= 0:
        raise ValueError(f"group_concentration={group_concentration} must be > 0.")
    rng = as_generator(seed)
    weights = rng.normal(size=(dim, num_classes))
    shift = rng.normal(size=num_classes)
    interaction = rng.normal(size=(dim, num_classes))

    def draw(n: int, share: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = (rng.random(n) < share).astype(np.int32)
        z = rng.normal(size=(n, dim))
        logits = z @ weights + attribute_effect * (2 * s[:, None] - 1) * (shift + z @ interaction)
        y = np.argmax(logits + rng.gumbel(size=logits.shape), axis=-1).astype(np.int32)
        return np.concatenate([z, s[:, None]], axis=1).astype(np.float32), y, s

    shares = rng.beta(group_concentration, group_concentration, size=num_clients)
    xs, ys, ss = zip(*(draw(examples_per_client, p) for p in shares))
    population = from_client_lists(xs, ys, ss)
    test_x, test_y, test_s = draw(num_test, 0.5)
    return population, Dataset(test_x, test_y), test_s


def with_attribute(x: jax.Array, column: int, value: jax.Array) -> jax.Array:
    """Flat examples x [N, d] with column ``column`` set to ``value`` (scalar) -> [N, d]."""
    return x.at[:, column].set(value)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("column",))
def attribute_losses(apply_fn: ApplyFn, params: Params, x: jax.Array, y: jax.Array, values: jax.Array, *,
                     column: int) -> jax.Array:
    """Loss of every example completed with every candidate attribute value.

    Args:
      apply_fn: (params, x [B, d]) -> logits.
      params: the client's (local) model.
      x: [N, d] flat examples (the attribute column's content is ignored).
      y: [N] labels.
      values: [A] candidate attribute values.
      column: the attribute's column in x.

    Returns:
      [A, N] cross-entropy (nats).
    """

    def losses(value: jax.Array) -> jax.Array:
        logits = apply_fn(params, with_attribute(x, column, value)).astype(jnp.float32)
        return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0]

    return jax.vmap(losses)(values)


def infer_attributes(apply_fn: ApplyFn, params: Params, x: jax.Array, y: jax.Array, values: jax.Array, *,
                     column: int) -> jax.Array:
    """The attack: for each example, the index in ``values`` of the lowest-loss completion -> [N] int32.

    Pure and jittable: ``jax.vmap`` over clients (params [C, ...], x [C, N, d], y [C, N]) for many targets.
    """
    return jnp.argmin(attribute_losses(apply_fn, params, x, y, jnp.asarray(values, jnp.float32), column=column),
                      axis=0).astype(jnp.int32)


def client_majority(predicted: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """A client's inferred majority group from per-example binary guesses [N] (ties -> 1)."""
    weights = jnp.ones_like(predicted, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return (jnp.sum(predicted * weights) * 2 >= jnp.sum(weights)).astype(jnp.int32)


def attribute_report(predicted: np.ndarray, true: np.ndarray, prior: np.ndarray | None = None) -> dict[str, float]:
    """Attack accuracy against the majority-class baseline.

    Args:
      predicted: [N] guessed attribute values.
      true: [N] true values.
      prior: attribute values the adversary may know the distribution of (default ``true``): the baseline
        always guesses the most common value of ``prior`` and is scored on ``true``.

    Returns:
      dict with "accuracy", "baseline" and their difference "advantage", plus "num_examples".
    """
    predicted, true = np.asarray(predicted).ravel(), np.asarray(true).ravel()
    if predicted.shape != true.shape or true.size == 0:
        raise ValueError(f"predicted {predicted.shape} and true {true.shape} must be equal, non-empty.")
    prior = true if prior is None else np.asarray(prior).ravel()
    values, counts = np.unique(prior, return_counts=True)
    majority = values[np.argmax(counts)]
    accuracy = float(np.mean(predicted == true))
    baseline = float(np.mean(true == majority))
    return {"accuracy": accuracy, "baseline": baseline, "advantage": accuracy - baseline,
            "num_examples": int(true.size)}
