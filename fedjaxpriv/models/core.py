"""Model zoo: Flax linen modules wrapped as pure functions.

Every image model maps ``x: [B, *input_shape]`` float32 to logits ``[B, num_classes]``; the token models
(``TOKEN_MODELS``) map token ids ``[B, T]`` int to next-token logits ``[B, T, V]``, and the token classifiers
(``TOKEN_CLASSIFIERS``) token ids ``[B, T]`` to logits ``[B, num_classes]``. Models hold no mutable
state (normalization is GroupNorm, not BatchNorm), so a client's model is just its parameter pytree.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Any


class Model(NamedTuple):
    """A pure model.

    Attributes:
      init: key -> params pytree.
      apply: (params, x [B, *input_shape]) -> logits [B, num_classes].
      input_shape: per-example input shape, e.g. (28, 28, 1).
      num_classes: number of output classes.
      name: registry name ("user-supplied <name>" for a model passed in, see ``as_model``).
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    input_shape: tuple[int, ...]
    num_classes: int
    name: str


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 (VALID) as a reshape and a max: [B, H, W, C] -> [B, H//2, W//2, C].

    Same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``; its gradient avoids XLA's select-and-scatter,
    which is slow on CPU (a McMahan CNN step runs about 1.6x faster).
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class LogisticRegression(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class MLP(nn.Module):
    num_classes: int
    hidden: Sequence[int] = (200, 200)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class McMahanCNN(nn.Module):
    """The CNN of McMahan et al. 2017 (1,663,370 parameters on 28x28x1, 10 classes)."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = max_pool_2x2(nn.relu(nn.Conv(32, (5, 5), padding="SAME")(x)))
        x = max_pool_2x2(nn.relu(nn.Conv(64, (5, 5), padding="SAME")(x)))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(512)(x))
        return nn.Dense(self.num_classes)(x)


class LeNetSigmoid(nn.Module):
    """The sigmoid LeNet of Zhu et al. 2019 (Deep Leakage from Gradients): twice differentiable, no pooling."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.sigmoid(nn.Conv(12, (5, 5), strides=(2, 2), padding=2)(x))
        x = nn.sigmoid(nn.Conv(12, (5, 5), strides=(2, 2), padding=2)(x))
        x = nn.sigmoid(nn.Conv(12, (5, 5), strides=(1, 1), padding=2)(x))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


class ResidualBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        groups = min(8, self.features)
        y = nn.Conv(self.features, (3, 3), strides=(self.strides, self.strides), padding="SAME", use_bias=False)(x)
        y = nn.relu(nn.GroupNorm(num_groups=groups)(y))
        y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)(y)
        y = nn.GroupNorm(num_groups=groups)(y)
        if x.shape[-1] != self.features or self.strides != 1:
            x = nn.Conv(self.features, (1, 1), strides=(self.strides, self.strides), use_bias=False)(x)
            x = nn.GroupNorm(num_groups=groups)(x)
        return nn.relu(x + y)


class SmallResNet(nn.Module):
    """A ResNet-8 style network (3 stages of one residual block) with GroupNorm."""

    num_classes: int
    widths: Sequence[int] = (16, 32, 64)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False)(x)
        x = nn.relu(nn.GroupNorm(num_groups=min(8, self.widths[0]))(x))
        for stage, width in enumerate(self.widths):
            x = ResidualBlock(width, strides=1 if stage == 0 else 2)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


class LSTMLanguageModel(nn.Module):
    """Next-token LSTM in the style of McMahan et al. 2017's Shakespeare model (an 8-dim embedding, stacked LSTM
    layers, a dense layer to the vocabulary; theirs: two layers of 256): tokens [B, T] int -> logits [B, T, V].

    ``hidden`` gives the width of each LSTM layer."""

    num_classes: int
    hidden: Sequence[int] = (256, 256)
    embedding: int = 8

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(self.num_classes, self.embedding)(tokens.astype(jnp.int32))
        for width in self.hidden:
            x = nn.RNN(nn.OptimizedLSTMCell(width))(x)
        return nn.Dense(self.num_classes)(x)


class CausalTransformer(nn.Module):
    """A small decoder-only transformer: token and learned position embeddings, pre-LayerNorm blocks of causal
    self-attention and a 4x MLP, tokens [B, T] int -> logits [B, T, V]; position t sees tokens 0..t only.

    ``hidden`` has one entry per block, each the model width (all equal); ``heads`` divides it."""

    num_classes: int
    hidden: Sequence[int] = (64, 64)
    heads: int = 4
    max_length: int = 512

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        width, length = self.hidden[0], tokens.shape[-1]
        if any(w != width for w in self.hidden) or width % self.heads:
            raise ValueError(f"transformer widths {list(self.hidden)} must be equal and divisible by {self.heads} "
                             "heads.")
        if length > self.max_length:
            raise ValueError(f"sequences of {length} tokens exceed the transformer's max_length={self.max_length}.")
        x = nn.Embed(self.num_classes, width)(tokens.astype(jnp.int32))
        x = x + self.param("positions", nn.initializers.normal(0.02), (self.max_length, width))[:length]
        mask = nn.make_causal_mask(jnp.ones(tokens.shape, jnp.int32))
        for _ in self.hidden:
            y = nn.LayerNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, deterministic=True)(y, y, mask=mask)
            y = nn.LayerNorm()(x)
            x = x + nn.Dense(width)(nn.gelu(nn.Dense(4 * width)(y)))
        return nn.Dense(self.num_classes)(nn.LayerNorm()(x))


class LSTMClassifier(nn.Module):
    """A token-sequence classifier in the style of LEAF's Sent140 model (an embedding, stacked LSTM layers, a dense
    layer on the state after the last real token): tokens [B, T] int, the text first and padding (id 0) after it
    -> logits [B, num_classes]. ``vocabulary`` embedding rows; ``hidden`` the width of each LSTM layer."""

    num_classes: int
    vocabulary: int = 10_000
    hidden: Sequence[int] = (100, 100)
    embedding: int = 32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        tokens = tokens.astype(jnp.int32)
        x = nn.Embed(self.vocabulary, self.embedding)(tokens)
        for width in self.hidden:
            x = nn.RNN(nn.OptimizedLSTMCell(width))(x)
        last = jnp.maximum(jnp.sum(tokens != 0, axis=-1) - 1, 0)  # the LSTM is causal: later padding is unseen
        return nn.Dense(self.num_classes)(jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0])


_MODULES: dict[str, Callable[..., nn.Module]] = {
    "logreg": LogisticRegression,
    "mlp": MLP,
    "cnn": McMahanCNN,
    "lenet": LeNetSigmoid,
    "resnet": SmallResNet,
    "lstm": LSTMLanguageModel,
    "transformer": CausalTransformer,
    "lstm_classifier": LSTMClassifier,
}
MODEL_NAMES: tuple[str, ...] = tuple(_MODULES)
_NEEDS_IMAGE = {"cnn", "lenet", "resnet"}
# Models of token sequences: inputs [B, T] int token ids, logits [B, T, V] (V = num_classes, the vocabulary).
TOKEN_MODELS = ("lstm", "transformer")
# Models that classify token sequences: inputs [B, T] int token ids, logits [B, num_classes]; their embedding has
# ``vocabulary`` rows (the data's vocabulary size).
TOKEN_CLASSIFIERS = ("lstm_classifier",)
READS_TOKENS = TOKEN_MODELS + TOKEN_CLASSIFIERS
# The models whose widths ``model.hidden`` sets.
WIDTH_MODELS = ("mlp", *READS_TOKENS)


def get_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> Model:
    """Builds a registered model as a pure ``Model``.

    Args:
      name: one of ``MODEL_NAMES``.
      input_shape: per-example input shape; image models need (H, W, C).
      num_classes: number of classes (>= 2).
      **kwargs: module fields, e.g. ``hidden=(64,)`` for the MLP.
    """
    if name not in _MODULES:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}.")
    input_shape = tuple(int(d) for d in input_shape)
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be >= 2.")
    if name in _NEEDS_IMAGE and len(input_shape) != 3:
        raise ValueError(f"model {name!r} needs image inputs (H, W, C); got input_shape={input_shape}.")
    if name in READS_TOKENS and len(input_shape) != 1:
        raise ValueError(f"model {name!r} needs token sequences (T,); got input_shape={input_shape}.")
    module = _MODULES[name](num_classes=num_classes, **kwargs)
    init, apply = module_functions(module, input_shape, jnp.int32 if name in READS_TOKENS else jnp.float32)
    return Model(init=init, apply=apply, input_shape=input_shape, num_classes=num_classes, name=name)


def module_functions(module: nn.Module, input_shape: Sequence[int], input_dtype: Any = jnp.float32
                     ) -> tuple[Callable[[jax.Array], Params], Callable[[Params, jax.Array], jax.Array]]:
    """A stateless Flax module as pure ``(init, apply)``: init traces it on one zero example of
    ``input_shape`` / ``input_dtype``; apply maps (params, x [B, *input_shape]) -> its output."""
    dummy = jnp.zeros((1,) + tuple(int(d) for d in input_shape), jax.dtypes.canonicalize_dtype(input_dtype))

    def init(key: jax.Array) -> Params:
        return module.init(key, dummy)["params"]

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return module.apply({"params": params}, x)

    return init, apply


ModelLike = Any  # a Model, a Flax nn.Module, or a pair (init: key -> params, apply: (params, x) -> logits)


def as_model(model: ModelLike, input_shape: Sequence[int], input_dtype: Any = jnp.float32) -> Model:
    """A user's model as a pure ``Model`` for examples of ``input_shape`` / ``input_dtype``.

    Args:
      model: a ``Model`` (its functions kept, its input shape checked); a stateless Flax ``nn.Module`` mapping
        x [B, ...] to logits (initialised on one zero example); or a pair ``(init, apply)`` of pure functions,
        ``init: key -> params`` and ``apply: (params, x [B, ...]) -> logits``.
      input_shape / input_dtype: one example's features (the population's).

    Returns:
      the ``Model``; ``num_classes`` is the size of its output's last axis and ``name`` is "user-supplied <name>"
      (the class or function name), so that nothing records a built-in model that did not run.

    Raises:
      TypeError: ``model`` is none of these. ValueError: the model cannot take ``input_shape`` inputs, or the
      module holds mutable state (e.g. BatchNorm statistics) besides its parameters.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if isinstance(model, Model):
        if tuple(model.input_shape) != input_shape:
            raise ValueError(f"model {model.name!r} takes inputs of shape {tuple(model.input_shape)} but the data's "
                             f"examples have shape {input_shape}.")
        return model._replace(name=f"user-supplied {model.name}")
    if isinstance(model, nn.Module):
        dummy = jax.ShapeDtypeStruct((1,) + input_shape, input_dtype)
        try:
            variables = jax.eval_shape(model.init, jax.random.key(0), dummy)
        except Exception as error:  # noqa: BLE001 - any tracing failure means the module does not take these inputs
            raise ValueError(f"module {type(model).__qualname__} cannot be initialised on inputs of shape "
                             f"{dummy.shape} ({dummy.dtype}): {type(error).__name__}: {error}") from error
        state = sorted(set(variables) - {"params"})
        if state:
            raise ValueError(f"module {type(model).__qualname__} holds mutable state {state} besides its params; "
                             "models must be stateless (use GroupNorm or LayerNorm instead of BatchNorm).")
        init, apply = module_functions(model, input_shape, input_dtype)
        name = type(model).__qualname__
    elif isinstance(model, tuple) and len(model) == 2 and all(callable(f) for f in model):
        init, apply = model
        name = getattr(apply, "__qualname__", None) or type(apply).__qualname__
    else:
        raise TypeError(f"model={model!r} must be a Model, a flax.linen Module or a pair (init, apply) of functions.")
    dummy = jax.ShapeDtypeStruct((1,) + input_shape, input_dtype)
    try:
        out = jax.eval_shape(apply, jax.eval_shape(init, jax.random.key(0)), dummy)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"model {name} cannot run on inputs of shape {dummy.shape} ({dummy.dtype}): "
                         f"{type(error).__name__}: {error}") from error
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim < 2:
        raise ValueError(f"model {name} must return one array of logits [B, ..., K]; it returned {out!r}.")
    return Model(init=init, apply=apply, input_shape=input_shape, num_classes=int(out.shape[-1]),
                 name=f"user-supplied {name}")


def count_params(params: Params) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))
