"""Per-example gradient norms without per-example weight gradients ("ghost" norms).

DP-SGD clips each example's gradient, so it needs every example's gradient norm. Forming the per-example
gradients (``[B, params]``) costs B times the memory writes of a batch gradient and dominated DP-SGD's step (10x
a plain step on the MLP). For a weight W used once, as ``y = X W`` with X ``[T, K]`` (T the positions of one
example: 1 for a dense layer on a vector, the output pixels of a convolution run as patches x kernel, the tokens
of a sequence), the example's gradient is ``X^T G`` with G = dL/dy ``[T, N]``, and its squared norm is

    ||X^T G||_F^2 = <X X^T, G G^T>_F        (= ||x||^2 ||g||^2 for T = 1)

(Goodfellow 2015; Li, Tramer, Liang & Hashimoto 2022; Bu et al. 2023). So one backward pass that carries only
the activations' cotangents gives every such weight's per-example squared norm; the other parameters (biases,
embeddings, weights used more than once or in a nested program) get per-example gradients as before, small next to
the weights. The sum over both is each example's squared gradient norm, to float rounding.

``per_example_norms`` reads the model's jaxpr for one example: a parameter whose only use (possibly through
reshapes and casts) is as the right operand ``[K, N]`` of a ``dot_general`` that contracts the left operand's last
axis runs through ``_ghost_dot``, whose backward rule returns the squared norm as the cotangent of a probe input;
the Gram form is used when it is cheaper than forming ``X^T G`` inside the rule (``T (K + N) < K N``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jax_core

from fedjaxpriv.parallel import evaluate_jaxpr

Params = Any
PASS_THROUGH = ("reshape", "convert_element_type")  # a weight may reach its product through these


def _square_norm_of_product(x: jax.Array, g: jax.Array) -> jax.Array:
    """``||x^T g||_F^2`` for x [T, K], g [T, N] (float32), by the cheaper of the Gram form and the product."""
    t, k = x.shape
    n = g.shape[1]
    x, g = x.astype(jnp.float32), g.astype(jnp.float32)
    if t == 1:
        return jnp.sum(x * x) * jnp.sum(g * g)
    if t * (k + n) < k * n:
        return jnp.sum((x @ x.T) * (g @ g.T))
    return jnp.sum(jnp.square(x.T @ g))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ghost_dot(lhs: jax.Array, rhs: jax.Array, probe: jax.Array, dimension_numbers: Any) -> jax.Array:
    """``dot_general(lhs [..., K], rhs [K, N])``; its backward rule gives the cotangent of ``lhs``, zero for
    ``rhs`` (only ever called with a weight that is not differentiated) and the squared norm of the weight's
    gradient, ``||X^T G||^2``, as the cotangent of the scalar ``probe``."""
    del probe
    return lax.dot_general(lhs, rhs, dimension_numbers)


def _ghost_dot_fwd(lhs, rhs, probe, dimension_numbers):
    return _ghost_dot(lhs, rhs, probe, dimension_numbers), (lhs, rhs, probe)


def _ghost_dot_bwd(dimension_numbers, residuals, g):
    lhs, rhs, probe = residuals
    lhs_cotangent = jnp.tensordot(g, rhs, axes=((g.ndim - 1,), (1,))).astype(lhs.dtype)
    square = _square_norm_of_product(lhs.reshape(-1, lhs.shape[-1]), g.reshape(-1, g.shape[-1]))
    return lhs_cotangent, jnp.zeros_like(rhs), square.astype(probe.dtype)


_ghost_dot.defvjp(_ghost_dot_fwd, _ghost_dot_bwd)


def _is_plain_product(eqn: Any) -> bool:
    """``lhs [..., K] @ rhs [K, N]``: contracting lhs's last axis with rhs's first, no batch axes."""
    if eqn.primitive is not lax.dot_general_p:
        return False
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    lhs_ndim, rhs_ndim = eqn.invars[0].aval.ndim, eqn.invars[1].aval.ndim
    return (rhs_ndim == 2 and tuple(rhs_contract) == (0,) and tuple(lhs_contract) == (lhs_ndim - 1,)
            and not lhs_batch and not rhs_batch and eqn.params.get("preferred_element_type") in (
                None, eqn.invars[0].aval.dtype))


def ghost_products(jaxpr: Any, num_params: int) -> dict[int, int]:
    """{equation index: parameter index} of the products whose weight is a parameter used nowhere else (top
    level of ``jaxpr``, whose first ``num_params`` inputs are the parameters)."""
    uses: dict[Any, list[tuple[int, int]]] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for position, var in enumerate(eqn.invars):
            if not isinstance(var, jax_core.Literal):
                uses.setdefault(var, []).append((i, position))
    returned = {v for v in jaxpr.outvars if not isinstance(v, jax_core.Literal)}
    found: dict[int, int] = {}
    for index, var in enumerate(jaxpr.invars[:num_params]):
        while var not in returned and len(uses.get(var, ())) == 1:
            i, position = uses[var][0]
            eqn = jaxpr.eqns[i]
            if eqn.primitive.name in PASS_THROUGH and len(eqn.invars) == 1:
                var = eqn.outvars[0]
                continue
            if position == 1 and _is_plain_product(eqn):
                found[i] = index
            break
    return found


def per_example_norms(apply_fn: Callable[[Params, jax.Array], jax.Array], params: Params, x: jax.Array,
                      targets: jax.Array, loss: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """[B] float32: the L2 norm of each example's gradient of ``loss(apply_fn(params, x_i[None]), t_i[None])[0]``
    (each example through its own forward pass, as DP-SGD clips it), x [B, ...], targets [B, ...]: the weights of
    ``ghost_products`` by their ghost norms, the other parameters from their per-example gradients. The norms are
    values, not a differentiable function of ``params`` (the ghost products' backward rule gives their weights
    no cotangent): DP-SGD stops gradients at its clipping multipliers."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    num = len(leaves)

    def one_example(leaves_: list[Any], xi: jax.Array) -> Any:
        return apply_fn(jax.tree_util.tree_unflatten(treedef, leaves_), xi[None])

    closed, out_shape = jax.make_jaxpr(one_example, return_shape=True)(leaves, x[0])
    ghosts = ghost_products(closed.jaxpr, num)
    slots = {i: k for k, i in enumerate(sorted(ghosts))}  # equation index -> its probe
    rest = [k for k in range(num) if k not in set(ghosts.values())]

    def example_loss(rest_leaves: list[Any], probes: jax.Array, xi: jax.Array, ti: jax.Array) -> jax.Array:
        merged = list(leaves)
        for k, leaf in zip(rest, rest_leaves):
            merged[k] = leaf

        def ghost_dot(index: int, eqn: Any, values: list[Any]) -> list[Any] | None:
            if index not in slots:
                return None
            return [_ghost_dot(values[0], values[1], probes[slots[index]], eqn.params["dimension_numbers"])]

        outputs = evaluate_jaxpr(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves((merged, xi)), ghost_dot)
        return loss(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outputs), ti[None])[0]

    probes = jnp.zeros((len(ghosts),), jnp.float32)
    rest_grads, ghost_squares = jax.vmap(jax.grad(example_loss, argnums=(0, 1)), in_axes=(None, None, 0, 0))(
        [leaves[k] for k in rest], probes, x, targets)
    squares = jnp.sum(ghost_squares, axis=1)
    for grad in rest_grads:
        squares = squares + jnp.sum(jnp.square(grad.astype(jnp.float32)).reshape(grad.shape[0], -1), axis=1)
    return jnp.sqrt(squares)
