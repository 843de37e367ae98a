"""Gradient inversion: reconstruct a client's training batch from the message it sent.

The victim's message is a *target*: either a FedSGD gradient (``local_steps=0``: the gradient of the mean
cross-entropy over one batch) or a FedAvg update (``local_steps=E >= 1``: ``params_E - params_0`` after E
plain SGD steps with a known learning rate over fixed minibatches of its batch). The attacker knows the
model ``apply``, the server parameters and the ``TargetSpec``; it optimizes dummy inputs (and labels) until
the message they would produce matches the target:

* ``dlg`` (Zhu et al. 2019, "Deep Leakage from Gradients"): squared L2 distance, L-BFGS (``optax.lbfgs``
  with zoom line search), labels optimized as soft labels or recovered first by iDLG;
* ``inverting_gradients`` (Geiping et al. 2020, "Inverting Gradients"): ``1 - cosine similarity`` of the
  flattened messages plus ``tv_weight`` times total variation, Adam on the SIGN of the gradient with
  step decay x0.1 at 3/8, 5/8 and 7/8 of the iterations, inputs projected onto the box after every step.
  For FedAvg updates the dummy data run through the same E local steps (their multi-step setting).

``invert_one`` attacks ONE target; ``invert_batch`` is ``jax.jit(jax.vmap(invert_one))`` over a leading
target axis, so many clients' messages are attacked in one compiled call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]

METHODS = ("dlg", "inverting_gradients")
LABEL_MODES = ("idlg", "soft", "known")
INITS = ("uniform", "gaussian")


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
    """

    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int
    local_steps: int = 0
    local_batch_size: int | None = None

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

    @property
    def minibatch_size(self) -> int:
        return self.local_batch_size or self.batch_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class InversionConfig:
    """The attacker's algorithm (static).

    Attributes:
      method: "dlg" (L2 + L-BFGS) or "inverting_gradients" (cosine + TV, signed Adam, box projection).
      num_iterations: optimizer steps (L-BFGS iterations for dlg).
      learning_rate: Adam step size for inverting_gradients (0.1 in the paper); for dlg ``None`` (a zoom
        line search picks each L-BFGS step) or a fixed L-BFGS step size without line search (as in the
        original DLG code, step 1.0).
      tv_weight: weight of the total-variation prior (inverting_gradients only).
      labels: "idlg" (recover the label of a batch-1 message first, Zhao et al. 2020), "soft" (optimize
        label logits jointly, as in DLG) or "known" (labels passed in).
      init: dummy-input initialisation: "uniform" on the box, or "gaussian" N(0, 1).
      box: (low, high) pixel range; inverting_gradients projects onto it every step and both methods
        clip the returned reconstruction to it. ``None`` disables both.
    """

    method: Literal["dlg", "inverting_gradients"] = "dlg"
    num_iterations: int = 300
    learning_rate: float | None = None
    tv_weight: float = 1e-4
    labels: Literal["idlg", "soft", "known"] = "idlg"
    init: Literal["uniform", "gaussian"] = "uniform"
    box: tuple[float, float] | None = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; choose one of {METHODS}.")
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels={self.labels!r}; choose one of {LABEL_MODES}.")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}; choose one of {INITS}.")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations={self.num_iterations} must be >= 1.")
        if self.method == "inverting_gradients" and (self.learning_rate is None or self.learning_rate <= 0):
            raise ValueError(f"inverting_gradients needs learning_rate > 0; got {self.learning_rate}.")
        if self.tv_weight < 0:
            raise ValueError(f"tv_weight={self.tv_weight} must be >= 0.")
        if self.box is not None and not self.box[0] < self.box[1]:
            raise ValueError(f"box={self.box} must be (low, high) with low < high.")


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
    return jnp.mean(optax.softmax_cross_entropy(apply(params, x), probs))


def simulate_message(
    spec: TargetSpec, apply: ApplyFn, params: Params, x: jax.Array, label_probs: jax.Array, local_lr: jax.Array
) -> Params:
    """The message of one client with batch ``x [B, ...]`` and label distributions ``label_probs [B, K]``.

    Returns the gradient of the mean cross-entropy (``spec.local_steps == 0``; ``local_lr`` unused) or the
    update ``params_E - params`` after E SGD steps of size ``local_lr`` (a traced scalar), a pytree like
    ``params``. Differentiable in ``x`` and ``label_probs``.
    """
    grad_fn = jax.grad(_soft_loss, argnums=1)
    if spec.local_steps == 0:
        return grad_fn(apply, params, x, label_probs)
    size = spec.minibatch_size
    num_minibatches = spec.batch_size // size

    def local_step(current: Params, step: jax.Array) -> tuple[Params, None]:
        start = (step % num_minibatches) * size
        xb = jax.lax.dynamic_slice_in_dim(x, start, size)
        yb = jax.lax.dynamic_slice_in_dim(label_probs, start, size)
        grads = grad_fn(apply, current, xb, yb)
        return jax.tree_util.tree_map(lambda p, g: p - local_lr * g, current, grads), None

    final, _ = jax.lax.scan(local_step, params, jnp.arange(spec.local_steps))
    return jax.tree_util.tree_map(jnp.subtract, final, params)


def make_target(
    spec: TargetSpec, apply: ApplyFn, params: Params, x: jax.Array, y: jax.Array, local_lr: float | jax.Array = 0.0
) -> Params:
    """The message a client with inputs ``x [B, ...]`` and integer labels ``y [B]`` sends (see ``simulate_message``)."""
    probs = jax.nn.one_hot(y, spec.num_classes, dtype=jnp.float32)
    return simulate_message(spec, apply, params, jnp.asarray(x, jnp.float32), probs, jnp.asarray(local_lr, jnp.float32))


# ----------------------------------------------------------------------------------------------------------
# Label recovery.


def last_layer_kernel(tree: Params) -> jax.Array:
    """The last 2-D leaf of a params-shaped pytree in flattening order: the output Dense kernel ``[D, K]``
    for the Flax models of ``fedjaxpriv.models`` (whose last layer's name sorts last)."""
    matrices = [leaf for leaf in jax.tree_util.tree_leaves(tree) if jnp.ndim(leaf) == 2]
    if not matrices:
        raise ValueError("the pytree has no 2-D leaf (no Dense kernel) to recover labels from.")
    return matrices[-1]


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


# ----------------------------------------------------------------------------------------------------------
# Objectives.


def _flat_dot(a: Params, b: Params) -> jax.Array:
    return sum(jnp.vdot(u, v) for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def l2_distance(message: Params, target: Params) -> jax.Array:
    """Squared L2 distance ``sum ||m - t||^2`` over all leaves (DLG)."""
    diff = jax.tree_util.tree_map(jnp.subtract, message, target)
    return _flat_dot(diff, diff)


def cosine_distance(message: Params, target: Params) -> jax.Array:
    """``1 - <m, t> / (|m| |t|)`` of the messages flattened into one vector (Inverting Gradients)."""
    tiny = jnp.finfo(jnp.float32).tiny
    norms = jnp.sqrt(_flat_dot(message, message) * _flat_dot(target, target))
    return 1.0 - _flat_dot(message, target) / jnp.maximum(norms, tiny)


def total_variation(x: jax.Array) -> jax.Array:
    """Anisotropic total variation of images ``[B, H, W, C]``: mean |vertical diff| + mean |horizontal diff|."""
    return jnp.mean(jnp.abs(x[:, 1:] - x[:, :-1])) + jnp.mean(jnp.abs(x[:, :, 1:] - x[:, :, :-1]))


# ----------------------------------------------------------------------------------------------------------
# The attack.


def _check_call(config: InversionConfig, spec: TargetSpec) -> None:
    if config.labels == "idlg" and spec.batch_size != 1:
        raise ValueError(f"labels='idlg' recovers batch-1 labels only; batch_size={spec.batch_size}.")
    if config.method == "inverting_gradients" and len(spec.input_shape) != 3 and config.tv_weight > 0:
        raise ValueError(f"total variation needs image inputs (H, W, C); got input_shape={spec.input_shape}.")


def _initial_inputs(config: InversionConfig, spec: TargetSpec, key: jax.Array) -> jax.Array:
    shape = (spec.batch_size,) + spec.input_shape
    if config.init == "uniform":
        low, high = config.box if config.box is not None else (0.0, 1.0)
        return jax.random.uniform(key, shape, jnp.float32, low, high)
    return jax.random.normal(key, shape, jnp.float32)


def _run_lbfgs(objective: Callable[[Any], jax.Array], z0: Any, config: InversionConfig) -> tuple[Any, jax.Array]:
    """L-BFGS for ``num_iterations`` steps; returns the iterate with the lowest objective seen and its value.

    With ``config.learning_rate=None`` a zoom line search (strong Wolfe) picks each step; otherwise steps
    have that fixed size and no line search runs (no data-dependent loops, cheaper under ``vmap``).
    """
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


def invert_one(
    config: InversionConfig,
    spec: TargetSpec,
    apply: ApplyFn,
    params: Params,
    target: Params,
    key: jax.Array,
    labels: jax.Array | None = None,
    local_lr: jax.Array | float = 0.0,
) -> InversionResult:
    """Reconstructs the batch behind ONE target message.

    Args:
      config: the attack (static).
      spec: how the target was produced (static).
      apply: ``(params, x [B, ...]) -> logits [B, K]``, twice differentiable.
      params: the parameters the victim started from.
      target: the victim's message, a pytree like ``params`` (see ``make_target``).
      key: PRNG key for the dummy initialisation.
      labels: ``[B]`` int labels, required iff ``config.labels == "known"``.
      local_lr: the victim's local SGD step size (traced scalar; used when ``spec.local_steps >= 1``).

    Returns:
      ``InversionResult(x [B, ...], y [B], loss)``.
    """
    _check_call(config, spec)
    if (labels is None) == (config.labels == "known"):
        raise ValueError(f"pass labels exactly when config.labels == 'known' (labels={config.labels!r}).")
    local_lr = jnp.asarray(local_lr, jnp.float32)
    key_x, key_y = jax.random.split(key)
    z0: dict[str, jax.Array] = {"x": _initial_inputs(config, spec, key_x)}
    if config.labels == "soft":
        z0["label_logits"] = jax.random.normal(key_y, (spec.batch_size, spec.num_classes), jnp.float32)
        fixed_labels = None
    elif config.labels == "idlg":
        kernel = last_layer_kernel(target)
        fixed_labels = idlg_label(kernel if spec.local_steps == 0 else -kernel)[None]
    else:
        fixed_labels = jnp.asarray(labels, jnp.int32).reshape(spec.batch_size)

    def label_probs(z: dict[str, jax.Array]) -> jax.Array:
        if fixed_labels is None:
            return jax.nn.softmax(z["label_logits"], axis=-1)
        return jax.nn.one_hot(fixed_labels, spec.num_classes, dtype=jnp.float32)

    def objective(z: dict[str, jax.Array]) -> jax.Array:
        message = simulate_message(spec, apply, params, z["x"], label_probs(z), local_lr)
        if config.method == "dlg":
            return l2_distance(message, target)
        prior = total_variation(z["x"]) if config.tv_weight > 0 else 0.0
        return cosine_distance(message, target) + config.tv_weight * prior

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
) -> InversionResult:
    """Attacks T targets in one jitted, vmapped call (``invert_one`` per target).

    Args:
      config, spec, apply: as in ``invert_one`` (static: a new value recompiles).
      params: shared parameters, or per-target ``[T, ...]`` leaves when ``params_per_target``.
      targets: messages with a leading target axis T on every leaf.
      keys: ``[T]`` PRNG keys (e.g. ``jax.random.split(key, T)``); target t's result depends only on
        ``keys[t]``, not on T or its position.
      labels: ``[T, B]`` int labels when ``config.labels == "known"``.
      local_lr: scalar or ``[T]`` local step sizes.

    Returns:
      ``InversionResult(x [T, B, ...], y [T, B], loss [T])``.
    """
    num_targets = jax.tree_util.tree_leaves(targets)[0].shape[0]
    local_lr = jnp.broadcast_to(jnp.asarray(local_lr, jnp.float32), (num_targets,))

    def one(p: Params, target: Params, key: jax.Array, lab: jax.Array | None, lr: jax.Array) -> InversionResult:
        return invert_one(config, spec, apply, p, target, key, lab, lr)

    in_axes = (0 if params_per_target else None, 0, 0, None if labels is None else 0, 0)
    return jax.vmap(one, in_axes=in_axes)(params, targets, keys, labels, local_lr)


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
    figure = Figure(figsize=(1.6 * count, 3.4))
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
