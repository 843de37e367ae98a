"""Local training of ONE client, written as a pure function and vectorized elsewhere.

``client_update`` runs ``spec.max_steps`` steps under ``lax.scan``; steps past the client's own
``local_steps`` are masked no-ops, padded batch slots carry zero weight, so clients with different data sizes,
step counts, batch sizes, learning rates and defenses share one compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjaxpriv.client import dp as dp_ops, ghost, mixup as mixup_lib, pruning
from fedjaxpriv.client.sampling import sample_batch
from fedjaxpriv.client.settings import ClientSettings
from fedjaxpriv.models.tasks import CLASSIFICATION, PerExampleLoss, Task
from fedjaxpriv.parallel import rewrite_model
from fedjaxpriv.privacy.mechanisms import SampleLevelDpSgd

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class LocalSpec:
    """Static shape and feature switches of local training (hashable; part of the compiled program).

    Attributes:
      max_steps: scan length; each client runs its own ``local_steps`` <= max_steps.
      max_batch: batch slots per step.
      max_count: largest client size (static bound for sampling).
      num_classes: label classes (the size of the task's soft targets, e.g. one-hot width).
      per_example: compute per-example gradients (needed by DP-SGD clipping).
      mixup: enable mixup (per-client alpha; 0 disables it for that client).
      prune: None, "magnitude" or "random" masks (per-client sparsity; 0 disables it).
      prune_scope: "layer" or "global" for magnitude pruning.
      momentum: local SGD momentum (0 = plain SGD).
      prox: add FedProx's proximal term (per-client ``prox_mu``; False skips it when every mu is 0).
      poisson: some client samples Poisson batches (False skips the Poisson draws for everyone).
      slot_chunk: > 0: a step computes its batch slots in chunks of this many, up to the chunk that holds the
        last real example (a while loop), so Poisson batches pay for the slots they fill, not for their tail
        (execution only, equal to float rounding: the loss and gradient are sums over examples, each through its
        own forward pass under DP-SGD; for other steps the model must not mix examples of a batch, which no
        built-in model does). 0: all slots at once (and differentiable in the batch, as the attacks need).
      unroll: scan unroll factor over local steps (execution only; results are unchanged).
      conv_as_matmul: run the model's convolutions as patches x kernel matrix products (execution only;
        fast on CPU inside loops and under vmap, see ``parallel.conv_as_matmul``).
      outer_product_grads: dense layers' weight gradients as sums of per-example outer products (execution
        only; fast on CPU for small batches, see ``parallel.dense_grads_as_outer_products``).
      task: what the model predicts: the loss trained on (``Task.training_loss`` on ``Task.training_targets``);
        default softmax cross-entropy on integer labels.
    """

    max_steps: int
    max_batch: int
    max_count: int
    num_classes: int
    per_example: bool = False
    mixup: bool = False
    prune: str | None = None
    prune_scope: str = "layer"
    momentum: float = 0.0
    prox: bool = True
    unroll: int = 1
    conv_as_matmul: bool = False
    outer_product_grads: bool = False
    poisson: bool = True
    slot_chunk: int = 0
    task: Task = CLASSIFICATION

    def __post_init__(self) -> None:
        if self.mixup and not self.task.mixable:
            raise ValueError(f"client.mixup_alpha > 0 needs a task with soft targets; task {self.task.name!r} has "
                             "none (give it soft_targets and soft_loss, or set client.mixup_alpha=0).")


class ClientOutput(NamedTuple):
    """What one client's local training returns.

    Attributes:
      delta: params_after - params_before (pytree like params); zero for a client with 0 steps.
      num_examples: float32, the client's data size.
      loss: float32, mean training loss over the client's active steps.
      steps: float32, steps actually taken.
      trained_coordinates: int32, coordinates not held at zero by the pruning mask (all of them without
        pruning); the server knows the mask, so only these need sending.
    """

    delta: Params
    num_examples: jax.Array
    loss: jax.Array
    steps: jax.Array
    trained_coordinates: jax.Array


def _tree_where(condition: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree_util.tree_map(lambda a, b: jnp.where(condition, a, b), new, old)


def batch_loss(apply_fn: ApplyFn, params: Params, x: jax.Array, targets: jax.Array, mask: jax.Array,
               loss: PerExampleLoss = CLASSIFICATION.training_loss) -> jax.Array:
    """Mean per-example ``loss`` over real examples. x [B, ...], targets [B, ...], mask [B] -> scalar.

    The default is the classification training loss: soft-label cross-entropy, targets [B, K].
    """
    total = summed_loss(apply_fn, params, x, targets, mask, loss)
    return total / jnp.maximum(jnp.sum(mask.astype(total.dtype)), 1.0)


def summed_loss(apply_fn: ApplyFn, params: Params, x: jax.Array, targets: jax.Array, mask: jax.Array,
                loss: PerExampleLoss = CLASSIFICATION.training_loss) -> jax.Array:
    """Sum of the per-example ``loss`` over the real examples (``mask`` [B]) of a batch or a part of one: scalar."""
    per_example = loss(apply_fn(params, x), targets)
    return jnp.sum(per_example * mask.astype(per_example.dtype))


def _per_example_grads(apply_fn: ApplyFn, params: Params, x: jax.Array, targets: jax.Array,
                       loss: PerExampleLoss) -> Params:
    """Gradients of each example's loss: pytree like params with a leading batch axis [B, ...]."""

    def example_loss(p: Params, xi: jax.Array, ti: jax.Array) -> jax.Array:
        return loss(apply_fn(p, xi[None]), ti[None])[0]

    return jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x, targets)


def _weighted_gradient_sum(apply_fn: ApplyFn, params: Params, x: jax.Array, targets: jax.Array,
                           loss: PerExampleLoss, weights: jax.Array) -> tuple[jax.Array, Params]:
    """Each example's loss [B] and ``sum_i weights_i * grad loss_i`` (pytree like params) in one forward and one
    backward pass, ``loss_i`` being example i's loss from its own forward pass (the single-example model vmapped
    over the batch, as ``_per_example_grads`` runs it): by linearity the weighted sum of the per-example
    gradients, without a [B, params] array, and no example's gradient can reach another's, whatever the model does
    across a batch."""
    weights = jax.lax.stop_gradient(weights)

    def weighted_loss(p: Params) -> tuple[jax.Array, jax.Array]:
        losses = jax.vmap(lambda xi, ti: loss(apply_fn(p, xi[None]), ti[None])[0])(x, targets)
        return jnp.sum(weights.astype(losses.dtype) * losses), losses

    (_, losses), total = jax.value_and_grad(weighted_loss, has_aux=True)(params)
    return losses, total


def dp_sgd_gradient(apply_fn: ApplyFn, params: Params, x: jax.Array, targets: jax.Array, loss: PerExampleLoss,
                    mask: jax.Array, settings: ClientSettings, key: jax.Array,
                    denominator: jax.Array) -> tuple[jax.Array, Params]:
    """One DP-SGD step: the batch's mean loss over real examples (as ``batch_loss``, each example through its own
    forward pass) and the gradient ``SampleLevelDpSgd.noisy_gradient`` of the batch: (sum over real examples of
    each gradient clipped to ``settings.dp_clip_norm`` + Gaussian noise) / ``denominator``. The per-example norms
    come from one backward pass without per-example weight gradients (``ghost.per_example_norms``), the clipped
    sum and the losses from one forward and backward pass weighted by the clipping multipliers
    (``_weighted_gradient_sum``): the same sum to float rounding as clipping [B, params] per-example gradients,
    without forming them (``benchmarks/bench_dpsgd.py``)."""
    loss_sum, total = _clipped_sums(apply_fn, params, x, targets, loss, mask, settings.dp_clip_norm)
    return _step_means(True, loss_sum, total, mask, settings, key, denominator)


def _clipped_sums(apply_fn: ApplyFn, params: Params, x: jax.Array, targets: jax.Array, loss: PerExampleLoss,
                  mask: jax.Array, clip_norm: jax.Array) -> tuple[jax.Array, Params]:
    """(sum of the real examples' losses, sum of their gradients each clipped to ``clip_norm``): ghost norms, then
    one weighted forward and backward pass."""
    weights = dp_ops.clip_weights(ghost.per_example_norms(apply_fn, params, x, targets, loss), mask, clip_norm)
    losses, total = _weighted_gradient_sum(apply_fn, params, x, targets, loss, weights)
    return jnp.sum(losses * mask.astype(losses.dtype)), total


def _step_means(private: bool, loss_sum: jax.Array, total: Params, mask: jax.Array, settings: ClientSettings,
                key: jax.Array, denominator: jax.Array) -> tuple[jax.Array, Params]:
    """A step's (mean loss over the real examples, gradient) from the sums over them: DP-SGD's noisy mean
    (``SampleLevelDpSgd.noised_mean``) when ``private``, else the mean gradient."""
    real = jnp.maximum(jnp.sum(mask.astype(loss_sum.dtype)), 1.0)
    if private:
        return loss_sum / real, SampleLevelDpSgd.noised_mean(total, settings.dp_clip_norm,
                                                             settings.dp_noise_multiplier, key, denominator)
    return loss_sum / real, jax.tree_util.tree_map(lambda g: g / real.astype(g.dtype), total)


def _example_sums(spec: LocalSpec, apply_fn: ApplyFn, params: Params, x: jax.Array, targets: jax.Array,
                  mask: jax.Array, clip_norm: jax.Array) -> tuple[jax.Array, Params]:
    """(sum of the real examples' losses, sum of their gradients: clipped to ``clip_norm`` each under DP-SGD,
    ``spec.per_example``) of a batch or a part of one, before any noise or normalisation."""
    if spec.per_example:
        return _clipped_sums(apply_fn, params, x, targets, spec.task.training_loss, mask, clip_norm)
    return jax.value_and_grad(summed_loss, argnums=1)(apply_fn, params, x, targets, mask, spec.task.training_loss)


def _chunked_step(spec: LocalSpec, apply_fn: ApplyFn, params: Params, x: jax.Array, targets: jax.Array,
                  mask: jax.Array, settings: ClientSettings, key: jax.Array,
                  denominator: jax.Array) -> tuple[jax.Array, Params]:
    """A step's (mean loss over real examples, gradient) from ``_example_sums`` over chunks of ``spec.slot_chunk``
    slots, up to the chunk that holds the last real example (the rest is not computed): the same as the whole
    batch at once to float rounding. Under DP-SGD the clipped sum gets its noise once, as in ``dp_sgd_gradient``.
    Under ``vmap`` over clients the loop runs to the longest batch among them."""
    chunk = spec.slot_chunk
    padded = -(-mask.shape[0] // chunk) * chunk
    x, targets, mask = (jnp.pad(a, [(0, padded - a.shape[0])] + [(0, 0)] * (a.ndim - 1)) for a in (x, targets, mask))
    filled = jnp.max(jnp.where(mask, jnp.arange(1, padded + 1), 0))
    part = lambda a, i: jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk)  # noqa: E731

    def add_chunk(i: jax.Array, sums: tuple[jax.Array, Params]) -> tuple[jax.Array, Params]:
        more = _example_sums(spec, apply_fn, params, part(x, i), part(targets, i), part(mask, i),
                             settings.dp_clip_norm)
        return jax.tree_util.tree_map(jnp.add, sums, more)

    shapes = jax.eval_shape(lambda: add_chunk(jnp.int32(0), (jnp.float32(0), params)))
    zero = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    loss_sum, total = jax.lax.fori_loop(0, (filled + chunk - 1) // chunk, add_chunk, zero)
    return _step_means(spec.per_example, loss_sum, total, mask, settings, key, denominator)


def training_mask(spec: LocalSpec, server_params: Params, settings: ClientSettings, key: jax.Array) -> Params | None:
    """The 0/1 weight mask (leaves like params) a client trains under: ``spec.prune``'s mask at the client's
    ``settings.prune_sparsity`` of ``server_params`` (magnitude) or drawn from ``key`` (random); None: no pruning."""
    if spec.prune is None:
        return None
    if spec.prune == "magnitude":
        return pruning.magnitude_mask(server_params, settings.prune_sparsity, scope=spec.prune_scope)
    return pruning.random_mask(key, server_params, settings.prune_sparsity)


class Batch(NamedTuple):
    """One local step's batch.

    Attributes:
      x: [b, ...] inputs.
      targets: [b, ...] the targets the loss is computed on (the task's ``training_targets``, e.g. [b, K] label
        distributions for classification).
      mask: [b] bool, real examples (padding slots carry zero weight).
    """

    x: jax.Array
    targets: jax.Array
    mask: jax.Array


BatchAt = Callable[[jax.Array, jax.Array, jax.Array], Batch]
"""``(step t, sample_key, mixup_key) -> Batch``: the batch local step ``t`` trains on."""


def local_sgd(spec: LocalSpec, apply_fn: ApplyFn, start_params: Params, settings: ClientSettings, key: jax.Array,
              batch_at: BatchAt, count: jax.Array, weight_mask: Params | None = None,
              correction: Params | None = None,
              prox: tuple[Params, jax.Array] | None = None) -> tuple[Params, jax.Array]:
    """The local optimizer steps of one client from ``start_params``: ``spec.max_steps`` steps under ``lax.scan``,
    the ones past ``settings.local_steps`` masked no-ops. Step t trains on ``batch_at(t, ...)`` (with the step's
    keys) with the task's training loss, under DP-SGD when ``spec.per_example`` (``count`` examples: the noise's
    denominator), plus ``correction``, the proximal term and the pruning ``weight_mask`` (``client_update``'s
    arguments), then takes an SGD step (``settings.lr``, ``spec.momentum``). Differentiable in the batches' inputs
    and targets, so the attacks that model a client's training run this same code.

    Returns:
      (the final parameters, each step's mean batch loss [max_steps], 0 past the client's steps).
    """
    # DP-SGD's passes run without the outer-product lowering: vmapped over single examples it would build the
    # [B, params] per-example products they exist to avoid, and the ghost norms read plain products.
    summed_apply = rewrite_model(apply_fn, convs=spec.conv_as_matmul, dense=False)
    apply_fn = rewrite_model(apply_fn, convs=spec.conv_as_matmul, dense=spec.outer_product_grads)
    optimizer = optax.sgd(settings.lr, momentum=spec.momentum or None)
    opt_state = optimizer.init(start_params)
    denominator = SampleLevelDpSgd.denominator(settings.batch_size, count)
    loss_fn = spec.task.training_loss

    def step(carry, t):
        params, opt_state = carry
        sample_key, mix_key, noise_key = jax.random.split(jax.random.fold_in(key, t), 3)
        x, targets, bmask = batch_at(t, sample_key, mix_key)
        active = t < settings.local_steps
        if spec.slot_chunk:
            loss, grads = _chunked_step(spec, summed_apply if spec.per_example else apply_fn, params, x, targets,
                                        bmask, settings, noise_key, denominator)
        elif spec.per_example:
            loss, grads = dp_sgd_gradient(summed_apply, params, x, targets, loss_fn, bmask, settings, noise_key,
                                          denominator)
        else:
            loss, grads = jax.value_and_grad(batch_loss, argnums=1)(apply_fn, params, x, targets, bmask, loss_fn)
        if correction is not None:
            grads = jax.tree_util.tree_map(lambda g, c: g + c.astype(g.dtype), grads, correction)
        if prox is not None:
            centre, mu = prox
            grads = jax.tree_util.tree_map(lambda g, p, p0: g + mu * (p - p0.astype(p.dtype)), grads, params, centre)
        elif spec.prox:
            grads = jax.tree_util.tree_map(lambda g, p, p0: g + settings.prox_mu * (p - p0), grads, params,
                                           start_params)
        if weight_mask is not None:
            grads = pruning.apply_mask(grads, weight_mask)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if weight_mask is not None:
            new_params = pruning.apply_mask(new_params, weight_mask)
        params, opt_state = _tree_where(active, (new_params, new_opt_state), (params, opt_state))
        return (params, opt_state), jnp.where(active, loss, 0.0)

    (final_params, _), losses = jax.lax.scan(step, (start_params, opt_state), jnp.arange(spec.max_steps),
                                             unroll=max(1, min(spec.unroll, spec.max_steps)))
    return final_params, losses


def client_update(spec: LocalSpec, apply_fn: ApplyFn, server_params: Params, data_x: jax.Array,
                  data_y: jax.Array, offset: jax.Array, count: jax.Array, settings: ClientSettings,
                  key: jax.Array, correction: Params | None = None,
                  prox: tuple[Params, jax.Array] | None = None) -> ClientOutput:
    """Trains one client from the server model (or from any start, e.g. its personal model): ``local_sgd`` on
    batches sampled from its examples (``sample_batch``, then mixup).

    Args:
      spec: static switches and shapes.
      apply_fn: model function (params, x [B, ...]) -> logits (the shape ``spec.task`` expects).
      server_params: the model training starts from (the global model, for the message).
      data_x: [T, ...] the population's flat features (shared, not per client).
      data_y: [T, ...] the flat targets ([T] int labels for classification).
      offset: int32 scalar, the client's first example in the flat arrays.
      count: int32 scalar, the client's number of examples.
      settings: this client's row of ``ClientSettings`` (scalars).
      key: the client's PRNG key for this round.
      correction: pytree like params added to every step's gradient (after DP-SGD's clipping and noise), e.g.
        SCAFFOLD's c - c_i; None: none.
      prox: ``(centre, mu)``: the proximal term ``mu / 2 ||params - centre||^2`` in place of FedProx's
        (``settings.prox_mu`` around the start), e.g. Ditto's personal objective around the global model.

    Returns:
      ``ClientOutput`` with the model delta.
    """
    mask_key, train_key = jax.random.split(key)
    weight_mask = training_mask(spec, server_params, settings, mask_key)
    start_params = server_params if weight_mask is None else pruning.apply_mask(server_params, weight_mask)

    def batch_at(t: jax.Array, sample_key: jax.Array, mix_key: jax.Array) -> Batch:
        del t
        idx, bmask = sample_batch(sample_key, count, settings.batch_size, settings.sample_rate, settings.poisson,
                                  max_batch=spec.max_batch, max_count=spec.max_count, allow_poisson=spec.poisson)
        rows = offset + idx
        x = jnp.take(data_x, rows, axis=0, mode="clip")
        targets = spec.task.training_targets(jnp.take(data_y, rows, axis=0, mode="clip"), spec.num_classes)
        if spec.mixup:
            x, targets, _ = mixup_lib.mixup(mix_key, x, targets, bmask, settings.mixup_alpha)
        return Batch(x, targets, bmask)

    final_params, losses = local_sgd(spec, apply_fn, start_params, settings, train_key, batch_at, count,
                                     weight_mask=weight_mask, correction=correction, prox=prox)
    delta = jax.tree_util.tree_map(jnp.subtract, final_params, start_params)
    steps = jnp.minimum(settings.local_steps, spec.max_steps).astype(jnp.float32)
    if weight_mask is None:
        trained = jnp.int32(sum(leaf.size for leaf in jax.tree_util.tree_leaves(server_params)))
    else:
        trained = sum(jnp.sum(m != 0) for m in jax.tree_util.tree_leaves(weight_mask)).astype(jnp.int32)
    return ClientOutput(delta=delta, num_examples=count.astype(jnp.float32),
                        loss=jnp.sum(losses) / jnp.maximum(steps, 1.0), steps=steps, trained_coordinates=trained)
