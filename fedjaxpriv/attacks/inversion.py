"""Gradient inversion: reconstruct a client's training batch from the message it sent.

The victim's message is a *target*: either a FedSGD gradient (``local_steps=0``: the gradient of the mean
cross-entropy over one batch) or a FedAvg update (``local_steps=E >= 1``: ``params_E - params_0`` after E
plain SGD steps with a known learning rate over fixed minibatches of its batch, optionally under a pruning
mask the server knows). The attacker knows the model ``apply``, the server parameters and the
``TargetSpec``; it optimizes dummy inputs (and labels) until the message they would produce matches the
target:

* ``dlg`` (Zhu et al. 2019, "Deep Leakage from Gradients"): squared L2 distance, L-BFGS, labels optimized
  as soft labels or recovered first (iDLG, label counts). The default L-BFGS step is a *batched* line
  search: a fixed grid of step sizes evaluated together, the best kept, so the cost per iteration is
  constant and ``vmap`` over targets runs at the pace of one target (the zoom line search of
  ``optax.lbfgs`` runs data-dependent loops whose vmapped branches all wait for the slowest target);
* ``inverting_gradients`` (Geiping et al. 2020, "Inverting Gradients"): ``1 - cosine similarity`` of the
  flattened messages plus ``tv_weight`` times total variation, Adam on the SIGN of the gradient with
  step decay x0.1 at 3/8, 5/8 and 7/8 of the iterations, inputs projected onto the box after every step.
  For FedAvg updates the dummy data run through the same E local steps (their multi-step setting).

Either distance can be forced (``InversionConfig.distance``) or chosen per target (``scale_invariant``):
the cosine is blind to the scale of the message, so clipping alone does not change it.

Labels: iDLG for batch 1 (Zhao et al. 2020); for larger batches ``counts`` reads the label multiset off
the output-bias part of the message (the bias gradient of softmax cross-entropy is ``mean p - mean y``).

``invert_one`` attacks ONE target; ``invert_batch`` is ``jax.jit(jax.vmap(invert_one))`` over a leading
target axis, so many clients' messages are attacked in one compiled call. ``inversion_eval.invert_taps``
attacks the messages tapped from a run.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from fedjaxpriv.client.local import Batch, LocalSpec, batch_loss, local_sgd
from fedjaxpriv.client.pruning import apply_mask
from fedjaxpriv.client.settings import ClientSettings, make_settings
from fedjaxpriv.models.tasks import CLASSIFICATION

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]

METHODS = ("dlg", "inverting_gradients")
LABEL_MODES = ("idlg", "counts", "soft", "known")
INITS = ("uniform", "gaussian")
DISTANCES = ("l2", "cosine")
LINE_SEARCHES = ("batched", "zoom")
# Dummy inputs whose mean softmax stands in for the victim's mean prediction in label counting.
LABEL_PROBE_INPUTS = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetSpec:
    """How the victim produced its message (static: fixes shapes and the number of simulated steps).

    Attributes:
      input_shape: per-example input shape, e.g. (16, 16, 1).
      num_classes: K, number of classes.
      batch_size: B, examples behind the message.
      local_steps: 0 for a FedSGD gradient; E >= 1 for a FedAvg update after E local SGD steps.
      local_batch_size: examples per local step (divides B; default B). Step s uses the examples
        ``[(s mod (B / b)) b, (s mod (B / b) + 1) b)`` of the batch, in order.
      momentum: the clients' local SGD momentum (``client.momentum``; 0: plain SGD).
    """

    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int
    local_steps: int = 0
    local_batch_size: int | None = None
    momentum: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        if self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes} must be >= 2.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1.")
        if self.local_steps < 0:
            raise ValueError(f"local_steps={self.local_steps} must be >= 0 (0 means a FedSGD gradient).")
        if self.local_batch_size is not None and (
            self.local_batch_size < 1 or self.batch_size % self.local_batch_size != 0
        ):
            raise ValueError(
                f"local_batch_size={self.local_batch_size} must be >= 1 and divide batch_size={self.batch_size}."
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum} must be in [0, 1).")

    @property
    def minibatch_size(self) -> int:
        return self.local_batch_size or self.batch_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class InversionConfig:
    """The attacker's algorithm (static).

    Attributes:
      method: "dlg" (L-BFGS) or "inverting_gradients" (signed Adam, TV prior, box projection).
      num_iterations: optimizer steps (L-BFGS iterations for dlg).
      learning_rate: Adam step size for inverting_gradients (0.1 in the paper); for dlg ``None`` (a line
        search picks each L-BFGS step) or a fixed L-BFGS step size without line search (as in the original
        DLG code, step 1.0).
      tv_weight: weight of the total-variation prior (inverting_gradients only). The default 1e-6 suits 8x8
        digits in [0, 1], where the images are mostly flat strokes and 1e-4 already blurs them (Geiping et
        al. used 1e-4 to 1e-2 on 32x32 natural images).
      labels: "idlg" (recover the label of a batch-1 message first, Zhao et al. 2020), "counts" (the label
        multiset from the output-bias part of the message, any batch; iDLG at batch 1, see
        ``label_counts``), "soft" (optimize label logits jointly, as in DLG) or "known" (labels passed in).
      init: dummy-input initialisation: "uniform" on the box, or "gaussian" N(0, 1).
      box: (low, high) pixel range; inverting_gradients projects onto it every step and both methods
        clip the returned reconstruction to it. ``None`` disables both.
      distance: "l2" or "cosine" matching of messages; ``None`` takes the method's own (dlg: l2,
        inverting_gradients: cosine) unless the caller picks per target (``scale_invariant``).
      line_search: for dlg with ``learning_rate=None``: "batched" (``line_search_trials`` step sizes
        ``2, 1, 1/2, ...`` times the L-BFGS step evaluated at once, the best kept: fixed cost, vectorizes)
        or "zoom" (``optax.lbfgs``'s strong-Wolfe zoom search: data-dependent loops).
      line_search_trials: step sizes per batched line search.
    """

    method: Literal["dlg", "inverting_gradients"] = "dlg"
    num_iterations: int = 300
    learning_rate: float | None = None
    tv_weight: float = 1e-6
    labels: Literal["idlg", "counts", "soft", "known"] = "idlg"
    init: Literal["uniform", "gaussian"] = "uniform"
    box: tuple[float, float] | None = (0.0, 1.0)
    distance: Literal["l2", "cosine"] | None = None
    line_search: Literal["batched", "zoom"] = "batched"
    line_search_trials: int = 4

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; choose one of {METHODS}.")
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels={self.labels!r}; choose one of {LABEL_MODES}.")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}; choose one of {INITS}.")
        if self.distance is not None and self.distance not in DISTANCES:
            raise ValueError(f"distance={self.distance!r}; choose one of {DISTANCES} or None (the method's own).")
        if self.line_search not in LINE_SEARCHES:
            raise ValueError(f"line_search={self.line_search!r}; choose one of {LINE_SEARCHES}.")
        if self.line_search_trials < 1:
            raise ValueError(f"line_search_trials={self.line_search_trials} must be >= 1.")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations={self.num_iterations} must be >= 1.")
        if self.method == "inverting_gradients" and (self.learning_rate is None or self.learning_rate <= 0):
            raise ValueError(f"inverting_gradients needs learning_rate > 0; got {self.learning_rate}.")
        if self.method == "dlg" and self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"dlg needs learning_rate > 0 or None (line search); got {self.learning_rate}.")
        if self.tv_weight < 0:
            raise ValueError(f"tv_weight={self.tv_weight} must be >= 0.")
        if self.box is not None and not self.box[0] < self.box[1]:
            raise ValueError(f"box={self.box} must be (low, high) with low < high.")

    @property
    def default_distance(self) -> str:
        """The distance used when no per-target choice is made: ``distance`` or the method's own."""
        if self.distance is not None:
            return self.distance
        return "l2" if self.method == "dlg" else "cosine"


class InversionResult(NamedTuple):
    """Reconstruction of one target (``invert_batch`` adds a leading target axis T to each field).

    Attributes:
      x: reconstructed inputs ``[B, *input_shape]`` (clipped to the box).
      y: recovered labels ``[B]`` int32 (argmax of the soft labels, the iDLG label, or the known ones).
      loss: the matching objective at the returned iterate, scalar (dlg returns the best iterate seen,
        inverting_gradients the last one).
    """

    x: jax.Array
    y: jax.Array
    loss: jax.Array


# ----------------------------------------------------------------------------------------------------------
# The victim's side: the message a client sends.


def _soft_loss(apply: ApplyFn, params: Params, x: jax.Array, probs: jax.Array) -> jax.Array:
    """The loss a classification client trains on (``client.local.batch_loss`` with the task's soft-target
    cross-entropy), over every row of ``x`` [B, ...] against ``probs`` [B, K]."""
    return batch_loss(apply, params, x, probs, jnp.ones(x.shape[0], bool), CLASSIFICATION.training_loss)


def simulate_message(
    spec: TargetSpec,
    apply: ApplyFn,
    params: Params,
    x: jax.Array,
    label_probs: jax.Array,
    local_lr: jax.Array,
    mask: Params | None = None,
    num_steps: jax.Array | None = None,
) -> Params:
    """The message of one client with batch ``x [B, ...]`` and label distributions ``label_probs [B, K]``.

    Returns the gradient of the mean cross-entropy (``spec.local_steps == 0``; ``local_lr`` unused) or the
    update ``params_E - params_0`` after E SGD steps of size ``local_lr`` (a traced scalar) with ``spec.momentum``,
    a pytree like ``params``, taken by ``client.local.local_sgd``, the code that trains the clients, on the
    minibatches of ``spec`` in order. Differentiable in ``x`` and ``label_probs``.

    Args:
      mask: optional 0/1 pytree like ``params``: the client trains the pruned model, as
        ``client.local.client_update`` does: ``params_0 = params * mask`` and every gradient is masked.
      num_steps: optional traced number of steps taken, ``<= spec.local_steps`` (the rest are no-ops), so
        clients with different step counts share one compiled program; default ``spec.local_steps``.
    """
    if spec.local_steps == 0:
        params = params if mask is None else apply_mask(params, mask)
        grads = jax.grad(_soft_loss, argnums=1)(apply, params, x, label_probs)
        return grads if mask is None else apply_mask(grads, mask)
    size = spec.minibatch_size
    num_minibatches = spec.batch_size // size
    local = LocalSpec(max_steps=spec.local_steps, max_batch=size, max_count=spec.batch_size,
                      num_classes=spec.num_classes, momentum=spec.momentum, prox=False, poisson=False)
    row = _plain_sgd_row(spec.batch_size)._replace(
        lr=local_lr, local_steps=spec.local_steps if num_steps is None else num_steps)
    start = params if mask is None else apply_mask(params, mask)

    def in_order(t: jax.Array, sample_key: jax.Array, mix_key: jax.Array) -> Batch:
        del sample_key, mix_key
        first = (t % num_minibatches) * size
        return Batch(jax.lax.dynamic_slice_in_dim(x, first, size),
                     jax.lax.dynamic_slice_in_dim(label_probs, first, size), jnp.ones(size, bool))

    final, _ = local_sgd(local, apply, start, row, jax.random.PRNGKey(0), in_order, jnp.int32(spec.batch_size),
                         weight_mask=mask)
    return jax.tree_util.tree_map(jnp.subtract, final, start)


def _plain_sgd_row(batch_size: int) -> ClientSettings:
    """One client's settings (scalars) for plain SGD on fixed batches of ``batch_size``: no DP, mixup or prox."""
    return jax.tree_util.tree_map(lambda column: jnp.asarray(column[0]),
                                  make_settings(1, np.array([batch_size]), batch_size=batch_size))


def make_target(
    spec: TargetSpec, apply: ApplyFn, params: Params, x: jax.Array, y: jax.Array, local_lr: float | jax.Array = 0.0
) -> Params:
    """The message a client with inputs ``x [B, ...]`` and integer labels ``y [B]`` sends (see ``simulate_message``)."""
    probs = jax.nn.one_hot(y, spec.num_classes, dtype=jnp.float32)
    return simulate_message(spec, apply, params, jnp.asarray(x, jnp.float32), probs, jnp.asarray(local_lr, jnp.float32))


# ----------------------------------------------------------------------------------------------------------
# Label recovery.


def _path_sort_key(path: tuple) -> tuple:
    """Sort key of a pytree key path in module order: ``Dense_2`` before ``Dense_10`` (Flax numbers the modules
    of one type in creation order; plain string order would put ``Dense_10`` first)."""
    key = []
    for entry in path:
        name = str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))
        stem, _, suffix = name.rpartition("_")
        key.append((stem, int(suffix), "") if stem and suffix.isdigit() else (name, -1, name))
    return tuple(key)


def _last_layer(tree: Params) -> tuple[tuple, jax.Array]:
    paths_and_leaves = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
                        if jnp.ndim(leaf) == 2]
    if not paths_and_leaves:
        raise ValueError("the pytree has no 2-D leaf (no Dense kernel) to recover labels from.")
    return max(paths_and_leaves, key=lambda item: _path_sort_key(item[0]))


def last_layer_kernel(tree: Params) -> jax.Array:
    """The output Dense kernel ``[D, K]`` of a params-shaped pytree: its last 2-D leaf in module order (key paths
    compared with numeric suffixes as numbers, so ``Dense_10`` comes after ``Dense_9``). Right for the Flax
    models of ``fedjaxpriv.models``, whose only 2-D leaves are Dense kernels and whose output layer is last."""
    return _last_layer(tree)[1]


def last_layer_bias(tree: Params) -> jax.Array | None:
    """The bias ``[K]`` beside ``last_layer_kernel`` (same module), or None when that layer has none."""
    path, kernel = _last_layer(tree)
    node = tree
    for entry in path[:-1]:
        node = node[getattr(entry, "key", getattr(entry, "idx", None))]
    bias = node.get("bias") if hasattr(node, "get") else None
    if bias is None or jnp.shape(bias) != (jnp.shape(kernel)[-1],):
        return None
    return bias


def idlg_label(grad_last_layer_weight: jax.Array) -> jax.Array:
    """iDLG label of a batch-1 gradient (Zhao et al. 2020) -> int32 scalar.

    With cross-entropy, ``dL/dW[d, k] = h_d (softmax_k - onehot_k)`` for the output kernel ``W [D, K]``
    (columns = classes, Flax layout) and its input features ``h``. When ``h >= 0`` (sigmoid / ReLU features)
    the true class's column is the only one with non-positive entries (``softmax - 1 < 0``), all others
    non-negative, so the label is the column with the smallest sum.

    Args:
      grad_last_layer_weight: gradient of the output kernel ``[D, K]``. For a FedAvg update pass the
        NEGATED kernel update (updates point against the gradient).
    """
    return jnp.argmin(jnp.sum(grad_last_layer_weight, axis=0)).astype(jnp.int32)


def label_counts(
    bias_message: jax.Array,
    mean_probs: jax.Array,
    batch_size: int,
    step_scale: jax.Array,
    scale_known: jax.Array | bool = True,
) -> jax.Array:
    """The B labels behind a message, read off its output-bias part -> int32 ``[B]`` sorted by class.

    For softmax cross-entropy the bias gradient is ``mean_i p_i - n / B`` (``n [K]``: label counts), so a
    FedAvg update after E steps of size lr has ``delta_b = -lr sum_e (pbar_e - n / B)`` and

        n ~= B (pbar + delta_b / (lr E)),

    with ``pbar`` the victim's mean prediction (unknown: ``mean_probs`` stands in for it; an LLG-style
    estimate, Wainakh et al. 2022). When the message was rescaled (clipped, ``scale_known=False``), the scale
    ``s`` of ``delta_b`` is fitted instead: the classes with ``delta_b > 0`` are taken as the present ones and
    ``s`` makes their counts sum to B. The estimate is clipped at 0, rescaled to sum to B and rounded with
    largest remainders. Exact for untrained models at batch sizes up to about K; worse as ``pbar`` drifts.

    Args:
      bias_message: the message's output-bias leaf ``[K]``: an update (``step_scale = lr x E``) or a
        NEGATED gradient (``step_scale = 1``).
      mean_probs: ``[K]`` stand-in for the mean softmax of the victim's model over its batch.
      batch_size: B (static).
      step_scale: ``lr x E`` (traced scalar).
      scale_known: traced bool; False when the message may have been rescaled.
    """
    num_classes = bias_message.shape[0]
    tiny = jnp.finfo(jnp.float32).tiny
    shift = batch_size * bias_message / jnp.maximum(step_scale, tiny)
    present = shift > 0
    fitted = batch_size * (1.0 - jnp.sum(jnp.where(present, mean_probs, 0.0))) / jnp.maximum(
        jnp.sum(jnp.where(present, shift, 0.0)), tiny)
    scale = jnp.where(scale_known, 1.0, jnp.where(jnp.any(present), fitted, 1.0))
    estimate = jnp.maximum(batch_size * mean_probs + scale * shift, 0.0)
    total = jnp.sum(estimate)
    estimate = jnp.where(total > 0, estimate * batch_size / jnp.maximum(total, tiny), batch_size / num_classes)
    counts = jnp.floor(estimate).astype(jnp.int32)
    missing = batch_size - jnp.sum(counts)  # in [0, K)
    order = jnp.argsort(-(estimate - counts), stable=True)
    bonus = jnp.zeros(num_classes, jnp.int32).at[order].set((jnp.arange(num_classes) < missing).astype(jnp.int32))
    ends = jnp.cumsum(counts + bonus)
    return jnp.searchsorted(ends, jnp.arange(batch_size), side="right").astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------
# Objectives.


def _flat_dot(a: Params, b: Params) -> jax.Array:
    return sum(jnp.vdot(u, v) for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def restrict(tree: Params, support: Params | None) -> Params:
    """``tree`` times a 0/1 ``support`` pytree (the coordinates that count); ``tree`` itself for None."""
    if support is None:
        return tree
    return jax.tree_util.tree_map(lambda leaf, keep: leaf * keep.astype(leaf.dtype), tree, support)


def l2_distance(message: Params, target: Params) -> jax.Array:
    """Squared L2 distance ``sum ||m - t||^2`` over all leaves (DLG)."""
    diff = jax.tree_util.tree_map(jnp.subtract, message, target)
    return _flat_dot(diff, diff)


def cosine_distance(message: Params, target: Params) -> jax.Array:
    """``1 - <m, t> / (|m| |t|)`` of the messages flattened into one vector (Inverting Gradients)."""
    tiny = jnp.finfo(jnp.float32).tiny
    norms = jnp.sqrt(_flat_dot(message, message) * _flat_dot(target, target))
    return 1.0 - _flat_dot(message, target) / jnp.maximum(norms, tiny)


def unsent_excess(message: Params, target: Params, support: Params, bound: Params,
                  relative: jax.Array | bool) -> jax.Array:
    """``sum relu(|m_i| - b_i)^2`` over the coordinates outside ``support`` (0/1 pytree): how far the simulated
    message exceeds what the unsent coordinates of the target can hold. ``relative`` (traced bool): both sides
    are first divided by their norms over the support (for the scale-free cosine objective)."""
    def outside(tree: Params) -> Params:
        return jax.tree_util.tree_map(lambda leaf, keep: leaf * (1.0 - keep.astype(leaf.dtype)), tree, support)

    tiny = jnp.finfo(jnp.float32).tiny
    scale_m = jnp.sqrt(jnp.maximum(_flat_dot(restrict(message, support), restrict(message, support)), tiny))
    scale_t = jnp.sqrt(jnp.maximum(_flat_dot(target, target), tiny))
    relative = jnp.asarray(relative, bool)
    m_scale, b_scale = jnp.where(relative, 1.0 / scale_m, 1.0), jnp.where(relative, 1.0 / scale_t, 1.0)
    excess = jax.tree_util.tree_map(
        lambda m, b: jnp.where(jnp.isfinite(b), jax.nn.relu(jnp.abs(m) * m_scale - b * b_scale), 0.0),
        outside(message), bound)
    return _flat_dot(excess, excess)


def total_variation(x: jax.Array) -> jax.Array:
    """Anisotropic total variation of images ``[B, H, W, C]``: mean |vertical diff| + mean |horizontal diff|."""
    return jnp.mean(jnp.abs(x[:, 1:] - x[:, :-1])) + jnp.mean(jnp.abs(x[:, :, 1:] - x[:, :, :-1]))


# ----------------------------------------------------------------------------------------------------------
# The attack.


def _check_call(config: InversionConfig, spec: TargetSpec) -> None:
    if config.labels == "idlg" and spec.batch_size != 1:
        raise ValueError(f"labels='idlg' recovers batch-1 labels only; batch_size={spec.batch_size} "
                         "(use labels='counts' for larger batches).")
    if config.method == "inverting_gradients" and len(spec.input_shape) != 3 and config.tv_weight > 0:
        raise ValueError(f"total variation needs image inputs (H, W, C); got input_shape={spec.input_shape}.")


def _initial_inputs(config: InversionConfig, spec: TargetSpec, key: jax.Array) -> jax.Array:
    shape = (spec.batch_size,) + spec.input_shape
    if config.init == "uniform":
        low, high = config.box if config.box is not None else (0.0, 1.0)
        return jax.random.uniform(key, shape, jnp.float32, low, high)
    return jax.random.normal(key, shape, jnp.float32)


def _two_loop(grad: jax.Array, steps: jax.Array, changes: jax.Array, rho: jax.Array) -> jax.Array:
    """L-BFGS inverse-Hessian times ``grad`` (Nocedal & Wright, Algorithm 7.4) from the memory ``steps``,
    ``changes`` ``[M, n]`` (oldest first; empty slots have ``rho = 0`` and contribute nothing)."""
    newest_first = jnp.arange(rho.shape[0])[::-1]

    def backward(q: jax.Array, i: jax.Array) -> tuple[jax.Array, jax.Array]:
        alpha = rho[i] * jnp.dot(steps[i], q)
        return q - alpha * changes[i], alpha

    q, alphas = jax.lax.scan(backward, grad, newest_first)
    sy, yy = jnp.dot(steps[-1], changes[-1]), jnp.dot(changes[-1], changes[-1])
    gamma = jnp.where(rho[-1] > 0, sy / jnp.maximum(yy, jnp.finfo(jnp.float32).tiny), 1.0)

    def forward(r: jax.Array, item: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        i, alpha = item
        return r + steps[i] * (alpha - rho[i] * jnp.dot(changes[i], r)), None

    r, _ = jax.lax.scan(forward, gamma * q, (newest_first[::-1], alphas[::-1]))
    return r


def _run_lbfgs_batched(
    objective: Callable[[Any], jax.Array], z0: Any, config: InversionConfig, memory: int = 10
) -> tuple[Any, jax.Array]:
    """L-BFGS whose line search evaluates ``line_search_trials`` step sizes ``2, 1, 1/2, ...`` (times the
    L-BFGS step) in one vectorized call and keeps the best; no data-dependent loop, fixed cost per iteration.

    Without curvature pairs (start, or after an iteration found no decrease, which clears the memory) the
    direction is steepest descent scaled to the last accepted step length (first: unit length); a failed
    steepest-descent iteration shrinks that scale by the whole grid. Returns the best iterate and its value.
    """
    flat0, unravel = ravel_pytree(z0)
    value_and_grad = jax.value_and_grad(lambda flat: objective(unravel(flat)))
    values_at = jax.vmap(lambda flat, direction, alpha: objective(unravel(flat + alpha * direction)),
                         in_axes=(None, None, 0))
    trials = 2.0 * 0.5 ** jnp.arange(config.line_search_trials, dtype=jnp.float32)
    tiny = jnp.finfo(jnp.float32).tiny

    def step(carry: tuple, _: None) -> tuple[tuple, None]:
        flat, value, grad, steps, changes, rho, descent_scale, best, best_value = carry
        have_memory = rho[-1] > 0
        direction = -jnp.where(have_memory, _two_loop(grad, steps, changes, rho), descent_scale * grad)
        direction = jnp.where(jnp.dot(direction, grad) < 0, direction, -descent_scale * grad)
        trial_values = values_at(flat, direction, trials)
        trial_values = jnp.where(jnp.isnan(trial_values), jnp.inf, trial_values)
        pick = jnp.argmin(trial_values)
        improved = trial_values[pick] < value
        new_flat = flat + jnp.where(improved, trials[pick], 0.0) * direction
        new_value, new_grad = value_and_grad(new_flat)
        s, y = new_flat - flat, new_grad - grad
        sy = jnp.dot(s, y)
        store = improved & (sy > 1e-10 * jnp.dot(y, y)) & (sy > 0)

        def remember(memory_array: jax.Array, newest: jax.Array) -> jax.Array:
            pushed = jnp.roll(memory_array, -1, axis=0).at[-1].set(newest)
            return jnp.where(store, pushed, jnp.where(improved, memory_array, 0.0))

        steps, changes = remember(steps, s), remember(changes, y)
        rho = remember(rho, 1.0 / jnp.where(store, sy, 1.0))
        descent_scale = jnp.where(improved, jnp.linalg.norm(s) / jnp.maximum(jnp.linalg.norm(new_grad), tiny),
                                  descent_scale * 0.5 ** config.line_search_trials)
        better = new_value < best_value  # False for NaN
        best = jnp.where(better, new_flat, best)
        best_value = jnp.where(better, new_value, best_value)
        return (new_flat, new_value, new_grad, steps, changes, rho, descent_scale, best, best_value), None

    value0, grad0 = value_and_grad(flat0)
    n = flat0.size
    zeros = jnp.zeros((memory, n), flat0.dtype)
    carry = (flat0, value0, grad0, zeros, zeros, jnp.zeros(memory, flat0.dtype),
             1.0 / jnp.maximum(jnp.linalg.norm(grad0), tiny), flat0,
             jnp.where(jnp.isnan(value0), jnp.inf, value0))
    carry, _ = jax.lax.scan(step, carry, None, length=config.num_iterations)
    return unravel(carry[7]), carry[8]


def _run_lbfgs(objective: Callable[[Any], jax.Array], z0: Any, config: InversionConfig) -> tuple[Any, jax.Array]:
    """L-BFGS for ``num_iterations`` steps; returns the iterate with the lowest objective seen and its value.

    ``config.learning_rate=None``: the batched line search (``_run_lbfgs_batched``) or, with
    ``line_search="zoom"``, optax's zoom line search (strong Wolfe); otherwise steps have that fixed size.
    """
    if config.learning_rate is None and config.line_search == "batched":
        return _run_lbfgs_batched(objective, z0, config)
    line_search = config.learning_rate is None
    solver = optax.lbfgs() if line_search else optax.lbfgs(learning_rate=config.learning_rate, linesearch=None)
    value_and_grad = jax.value_and_grad(objective)
    value0, grad0 = value_and_grad(z0)

    def step(carry: tuple, _: None) -> tuple[tuple, None]:
        z, state, value, grad, best_z, best_value = carry
        improved = value < best_value  # False for NaN
        best_z = jax.tree_util.tree_map(lambda new, old: jnp.where(improved, new, old), z, best_z)
        best_value = jnp.where(improved, value, best_value)
        updates, state = solver.update(grad, state, z, value=value, grad=grad, value_fn=objective)
        z = optax.apply_updates(z, updates)
        if line_search:  # the line search stored the objective and gradient at the new iterate
            value, grad = optax.tree.get(state, "value"), optax.tree.get(state, "grad")
        else:
            value, grad = value_and_grad(z)
        return (z, state, value, grad, best_z, best_value), None

    carry = (z0, solver.init(z0), value0, grad0, z0, jnp.asarray(jnp.inf, jnp.float32))
    (z, _, value, _, best_z, best_value), _ = jax.lax.scan(step, carry, None, length=config.num_iterations)
    improved = value < best_value
    best_z = jax.tree_util.tree_map(lambda new, old: jnp.where(improved, new, old), z, best_z)
    return best_z, jnp.where(improved, value, best_value)


def _run_signed_adam(
    objective: Callable[[Any], jax.Array], z0: Any, config: InversionConfig
) -> tuple[Any, jax.Array]:
    """Adam on sign(gradient) with x0.1 decays at 3/8, 5/8, 7/8; inputs ``z['x']`` projected onto the box."""
    n = config.num_iterations
    schedule = optax.piecewise_constant_schedule(
        config.learning_rate, {int(n * 3 / 8): 0.1, int(n * 5 / 8): 0.1, int(n * 7 / 8): 0.1}
    )
    solver = optax.adam(schedule)

    def project(z: Any) -> Any:
        if config.box is None:
            return z
        return {**z, "x": jnp.clip(z["x"], *config.box)}

    def step(carry: tuple, _: None) -> tuple[tuple, jax.Array]:
        z, state = carry
        value, grad = jax.value_and_grad(objective)(z)
        updates, state = solver.update(jax.tree_util.tree_map(jnp.sign, grad), state, z)
        return (project(optax.apply_updates(z, updates)), state), value

    (z, _), _ = jax.lax.scan(step, (project(z0), solver.init(z0)), None, length=n)
    return z, objective(z)


def _mean_prediction(config: InversionConfig, spec: TargetSpec, apply: ApplyFn, params: Params,
                     key: jax.Array) -> jax.Array:
    """Mean softmax ``[K]`` of the model on ``LABEL_PROBE_INPUTS`` dummy inputs (the attacker has no data)."""
    probe = _initial_inputs(config, dataclasses.replace(spec, batch_size=LABEL_PROBE_INPUTS), key)
    return jnp.mean(jax.nn.softmax(apply(params, probe), axis=-1), axis=0)


def invert_one(
    config: InversionConfig,
    spec: TargetSpec,
    apply: ApplyFn,
    params: Params,
    target: Params,
    key: jax.Array,
    labels: jax.Array | None = None,
    local_lr: jax.Array | float = 0.0,
    *,
    mask: Params | None = None,
    support: Params | None = None,
    unsent_bound: Params | None = None,
    num_steps: jax.Array | None = None,
    scale_invariant: jax.Array | None = None,
) -> InversionResult:
    """Reconstructs the batch behind ONE target message.

    Args:
      config: the attack (static).
      spec: how the target was produced (static).
      apply: ``(params, x [B, ...]) -> logits [B, K]``, twice differentiable.
      params: the parameters the victim started from.
      target: the victim's message, a pytree like ``params`` (see ``make_target``).
      key: PRNG key for the dummy initialisation (and the label-count probe inputs).
      labels: ``[B]`` int labels, required iff ``config.labels == "known"``.
      local_lr: the victim's local SGD step size (traced scalar; used when ``spec.local_steps >= 1``).
      mask: the pruning mask the victim trained under, if the server knows it (see ``simulate_message``).
      support: 0/1 pytree of the message coordinates to match (e.g. those a sparsifier sent); the rest of
        both messages is ignored, unless ``unsent_bound`` bounds them. Default: all.
      unsent_bound: pytree like ``params`` of bounds on the magnitude of the true update where ``support`` is 0
        (e.g. a magnitude sparsifier drops only entries below the smallest one it sends; ``inf``: no bound).
        The simulated message pays the squared excess over the bound there (``unsent_excess``). Default: none.
      num_steps: traced local steps of the victim (``<= spec.local_steps``; default ``spec.local_steps``).
      scale_invariant: traced bool choosing the distance per target (True: cosine, False: l2); default
        ``config.default_distance`` for every target.

    Returns:
      ``InversionResult(x [B, ...], y [B], loss)``.
    """
    _check_call(config, spec)
    if (labels is None) == (config.labels == "known"):
        raise ValueError(f"pass labels exactly when config.labels == 'known' (labels={config.labels!r}).")
    local_lr = jnp.asarray(local_lr, jnp.float32)
    steps = jnp.asarray(spec.local_steps if num_steps is None else num_steps, jnp.float32)
    if scale_invariant is None:
        scale_invariant = jnp.asarray(config.default_distance == "cosine")
        static_distance: str | None = config.default_distance
    else:
        scale_invariant = jnp.asarray(scale_invariant, bool)
        static_distance = None
    target = restrict(target, support)
    key_x, key_y = jax.random.split(key)
    z0: dict[str, jax.Array] = {"x": _initial_inputs(config, spec, key_x)}
    fixed_labels = None
    if config.labels == "soft":
        z0["label_logits"] = jax.random.normal(key_y, (spec.batch_size, spec.num_classes), jnp.float32)
    elif config.labels == "known":
        fixed_labels = jnp.asarray(labels, jnp.int32).reshape(spec.batch_size)
    elif spec.batch_size == 1:  # idlg, or counts at batch 1
        kernel = last_layer_kernel(target)
        fixed_labels = idlg_label(kernel if spec.local_steps == 0 else -kernel)[None]
    else:  # counts
        bias = last_layer_bias(target)
        if bias is None:
            raise ValueError("labels='counts' needs an output-layer bias in the message; the last layer has none.")
        start = params if mask is None else restrict(params, mask)
        step_scale = jnp.float32(1.0) if spec.local_steps == 0 else local_lr * steps
        fixed_labels = label_counts(bias if spec.local_steps else -bias,
                                    _mean_prediction(config, spec, apply, start, key_y), spec.batch_size,
                                    step_scale, ~scale_invariant)

    def label_probs(z: dict[str, jax.Array]) -> jax.Array:
        if fixed_labels is None:
            return jax.nn.softmax(z["label_logits"], axis=-1)
        return jax.nn.one_hot(fixed_labels, spec.num_classes, dtype=jnp.float32)

    def distance(message: Params) -> jax.Array:
        if static_distance == "l2":
            return l2_distance(message, target)
        if static_distance == "cosine":
            return cosine_distance(message, target)
        return jnp.where(scale_invariant, cosine_distance(message, target), l2_distance(message, target))

    def objective(z: dict[str, jax.Array]) -> jax.Array:
        message = simulate_message(spec, apply, params, z["x"], label_probs(z), local_lr, mask=mask,
                                   num_steps=None if num_steps is None else steps)
        value = distance(restrict(message, support))
        if unsent_bound is not None:
            value = value + unsent_excess(message, target, support, unsent_bound, relative=scale_invariant)
        if config.method == "inverting_gradients" and config.tv_weight > 0:
            value = value + config.tv_weight * total_variation(z["x"])
        return value

    run = _run_lbfgs if config.method == "dlg" else _run_signed_adam
    z, loss = run(objective, z0, config)
    x_hat = z["x"] if config.box is None else jnp.clip(z["x"], *config.box)
    y_hat = jnp.argmax(label_probs(z), axis=-1).astype(jnp.int32)
    return InversionResult(x_hat, y_hat, loss)


@functools.partial(jax.jit, static_argnames=("config", "spec", "apply", "params_per_target"))
def invert_batch(
    config: InversionConfig,
    spec: TargetSpec,
    apply: ApplyFn,
    params: Params,
    targets: Params,
    keys: jax.Array,
    labels: jax.Array | None = None,
    local_lr: jax.Array | float = 0.0,
    params_per_target: bool = False,
    *,
    masks: Params | None = None,
    supports: Params | None = None,
    unsent_bounds: Params | None = None,
    num_steps: jax.Array | None = None,
    scale_invariant: jax.Array | None = None,
) -> InversionResult:
    """Attacks T targets in one jitted, vmapped call (``invert_one`` per target).

    Args:
      config, spec, apply: as in ``invert_one`` (static: a new value recompiles).
      params: shared parameters, or per-target ``[T, ...]`` leaves when ``params_per_target``.
      targets: messages with a leading target axis T on every leaf.
      keys: ``[T]`` PRNG keys (e.g. ``jax.random.split(key, T)``); target t's result depends only on
        ``keys[t]`` and its own inputs, not on T or its position.
      labels: ``[T, B]`` int labels when ``config.labels == "known"``.
      local_lr: scalar or ``[T]`` local step sizes.
      masks, supports, unsent_bounds: per-target ``[T, ...]`` pruning masks, matched coordinates and bounds on
        the unmatched ones (see ``invert_one``).
      num_steps: ``[T]`` local steps per target.
      scale_invariant: ``[T]`` bools, cosine (True) or l2 (False) per target.

    Returns:
      ``InversionResult(x [T, B, ...], y [T, B], loss [T])``.
    """
    num_targets = jax.tree_util.tree_leaves(targets)[0].shape[0]
    local_lr = jnp.broadcast_to(jnp.asarray(local_lr, jnp.float32), (num_targets,))

    def one(p: Params, target: Params, key: jax.Array, lab: jax.Array | None, lr: jax.Array, mask: Params | None,
            support: Params | None, bound: Params | None, steps: jax.Array | None,
            invariant: jax.Array | None) -> InversionResult:
        return invert_one(config, spec, apply, p, target, key, lab, lr, mask=mask, support=support,
                          unsent_bound=bound, num_steps=steps, scale_invariant=invariant)

    def axis(value: Any) -> int | None:
        return None if value is None else 0

    in_axes = (0 if params_per_target else None, 0, 0, axis(labels), 0, axis(masks), axis(supports),
               axis(unsent_bounds), axis(num_steps), axis(scale_invariant))
    return jax.vmap(one, in_axes=in_axes)(params, targets, keys, labels, local_lr, masks, supports, unsent_bounds,
                                          num_steps, scale_invariant)


# ----------------------------------------------------------------------------------------------------------
# Reporting.


def save_image_grid(
    path: str,
    originals: np.ndarray,
    reconstructions: np.ndarray,
    titles: Sequence[str] | None = None,
) -> None:
    """Writes a PNG with originals (top row) above reconstructions (bottom row).

    Args:
      path: output file (``.png``).
      originals: ``[N, H, W, C]`` (C in {1, 3}) or ``[N, H, W]`` images in [0, 1].
      reconstructions: same shape as ``originals``.
      titles: optional N captions for the reconstructions (e.g. PSNR values).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    originals = np.clip(np.asarray(originals, np.float32), 0.0, 1.0)
    reconstructions = np.clip(np.asarray(reconstructions, np.float32), 0.0, 1.0)
    if originals.shape != reconstructions.shape or originals.ndim not in (3, 4):
        raise ValueError(
            f"need equal shapes [N, H, W(, C)]; got {originals.shape} and {reconstructions.shape}."
        )
    count = originals.shape[0]
    if titles is not None and len(titles) != count:
        raise ValueError(f"got {len(titles)} titles for {count} images.")
    figure = Figure(figsize=(1.6 * count, 3.4 + 0.15 * max((t.count("\n") for t in titles or [""]), default=0)))
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, count, squeeze=False)
    for column in range(count):
        for row, images in enumerate((originals, reconstructions)):
            image = images[column]
            if image.ndim == 3 and image.shape[-1] == 1:
                image = image[..., 0]
            axis = axes[row, column]
            axis.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0)
            axis.set_xticks([])
            axis.set_yticks([])
        if titles is not None:
            axes[1, column].set_title(titles[column], fontsize=8)
    axes[0, 0].set_ylabel("original")
    axes[1, 0].set_ylabel("reconstruction")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
