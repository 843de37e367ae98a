"""Message transforms: what one client sends, as composable pure functions.

Convention
----------
A :class:`MessageTransform` is a pair of pure functions, in the spirit of an optax transformation:

* ``init(params_like) -> state``: the state pytree of ONE client (``()`` for stateless transforms).
* ``update(message, state, key, settings, wire=None) -> (message, state, stats)``.

Per-client strengths. ``settings`` holds the strengths of ONE client: a mapping such as
``{"qsgd_levels": 4, "clip_norm": 1.0}`` or any object with attributes (a row of a ``ClientConfig``).
Every factory argument that is a strength accepts the NAME of a field of ``settings`` (a ``str``: the config's
knob of that name, or a user's own strength in ``ClientSettings.extra``), a function of one client's settings
(``lambda s: 0.5 * s.clip_norm``: typed, and free to derive a strength from others), or a constant number. Names
and functions are read at trace time, so the value is a traced scalar and ``jax.vmap(update)`` over clients with
different strengths compiles once. Each factory documents which value turns it "off" (an exact pass-through that
also leaves the wire cost unchanged).

Randomness. ``key`` is used by this transform only; :func:`chain` gives stage ``i`` ``fold_in(key, i)``.

Wire cost. A message is costed as ``bits = values * value_bits + index_bits + side_bits`` (:class:`Wire`):
the number of transmitted coordinates, the bits of each value, the bits of their positions (a sparsifier
replaces the previous positions, it does not add to them) and other side information (norms, scales).
``wire`` is
the cost of the message as the previous stage left it (``None``: a dense float32 message). Each transform
returns the cost after itself in ``stats`` under the keys ``"bits"``, ``"wire_values"``,
``"wire_value_bits"``, ``"wire_index_bits"`` and ``"wire_side_bits"`` (int32 scalars), so :func:`chain` threads it
from stage to stage; a transform that returns none of them leaves the cost as it was (``wire_after``). Other stats
keys are transform diagnostics (float32 scalars) named ``"<transform>/<quantity>"``.
No entropy coding is assumed anywhere. Counts are int32: a message must cost less than 2^31 bits.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Union

import jax
import jax.numpy as jnp

PyTree = Any
Settings = Any
Strength = Union[str, float, int, Callable[[Any], Any]]
Stats = dict[str, jax.Array]

FLOAT_BITS = 32
WIRE_KEYS = ("bits", "wire_values", "wire_value_bits", "wire_index_bits", "wire_side_bits")


class Wire(NamedTuple):
    """Wire cost of a message: ``bits = values * value_bits + index_bits + side_bits`` (int32 scalars)."""

    values: jax.Array
    value_bits: jax.Array
    index_bits: jax.Array
    side_bits: jax.Array

    @property
    def bits(self) -> jax.Array:
        return self.values * self.value_bits + self.index_bits + self.side_bits

    def as_stats(self) -> Stats:
        """The four wire keys of a stats dict."""
        return {
            "bits": self.bits,
            "wire_values": self.values,
            "wire_value_bits": self.value_bits,
            "wire_index_bits": self.index_bits,
            "wire_side_bits": self.side_bits,
        }

    @classmethod
    def from_stats(cls, stats: Mapping[str, jax.Array]) -> "Wire":
        return cls(*(jnp.asarray(stats[name], jnp.int32) for name in WIRE_KEYS[1:]))


def wire_after(stats: Mapping[str, jax.Array], before: Wire) -> Wire:
    """The wire cost a transform reports in ``stats``, or ``before`` when it reports none (a transform that
    does not change what is sent need not cost it).

    Raises:
      ValueError: ``stats`` holds some of the wire keys but not all of them.
    """
    present = [name for name in WIRE_KEYS[1:] if name in stats]
    if not present:
        return before
    if len(present) != len(WIRE_KEYS) - 1:
        raise ValueError(f"transform stats hold wire keys {present} but not all of {list(WIRE_KEYS[1:])}; return "
                         "all of them (``Wire.as_stats``) or none.")
    return Wire.from_stats(stats)


def num_coordinates(tree: PyTree) -> int:
    """Static number of scalars in a pytree."""
    return int(sum(jnp.size(leaf) for leaf in jax.tree_util.tree_leaves(tree)))


def dense_wire(message: PyTree) -> Wire:
    """Cost of sending every coordinate as a float32."""
    zero = jnp.asarray(0, jnp.int32)
    return Wire(jnp.asarray(num_coordinates(message), jnp.int32), jnp.asarray(FLOAT_BITS, jnp.int32), zero, zero)


def select_wire(condition: jax.Array, if_true: Wire, if_false: Wire) -> Wire:
    """Elementwise ``jnp.where`` over the three wire fields."""
    return Wire(*(jnp.where(condition, a, b).astype(jnp.int32) for a, b in zip(if_true, if_false)))


def lookup(name: str, settings: Settings) -> Any:
    """Field ``name`` of ``settings``: ``settings[name]`` for mappings, else ``settings.name``, else
    ``settings.extra[name]`` (a user's own strengths in ``ClientSettings.extra``).

    Raises:
      ValueError: the field is missing.
    """
    if isinstance(settings, Mapping):
        if name not in settings:
            raise ValueError(f"settings has no field {name!r}; fields: {sorted(settings)}.")
        return settings[name]
    if hasattr(settings, name):
        return getattr(settings, name)
    extra = getattr(settings, "extra", None)
    if isinstance(extra, Mapping) and name in extra:
        return extra[name]
    known = [*getattr(settings, "_fields", ()), *(extra or {})]
    raise ValueError(f"settings of type {type(settings).__name__} has no field {name!r}"
                     + (f"; fields: {sorted(known)}." if known else "."))


def resolve(strength: Strength, settings: Settings, dtype: Any = jnp.float32) -> jax.Array:
    """Value of a strength for this client: the settings field it names, the function of the settings applied to
    them, or the constant itself."""
    if isinstance(strength, str):
        value = lookup(strength, settings)
    elif callable(strength):
        value = strength(settings)
    else:
        value = strength
    return jnp.asarray(value, dtype)


def check_strength(strength: Strength, name: str) -> None:
    """Host-side check that a strength is a field name, a function of the settings or a real number."""
    if isinstance(strength, bool) or not (isinstance(strength, (str, int, float)) or callable(strength)):
        raise ValueError(f"{name}={strength!r} must be a settings field name (str), a function of one client's "
                         "settings, or a number.")


def bit_length(values: jax.Array) -> jax.Array:
    """Bits needed to write non-negative int32 ``values`` in binary (0 -> 0, 1 -> 1, 4 -> 3)."""
    values = jnp.asarray(values, jnp.int32)
    return (32 - jax.lax.clz(values)).astype(jnp.int32)


def index_bits(size: int) -> int:
    """Bits of one position index into a leaf of ``size`` entries: ``ceil(log2(size))`` (0 for size 1)."""
    return max(int(size) - 1, 0).bit_length()


class MessageTransform(NamedTuple):
    """A client-side message transform (see the module docstring for the convention).

    Attributes:
      init: ``params_like -> state``.
      update: ``(message, state, key, settings, wire=None) -> (message, state, stats)``.
    """

    init: Callable[[PyTree], PyTree]
    update: Callable[..., tuple[PyTree, PyTree, Stats]]


def stateless(apply: Callable[[PyTree, jax.Array, Settings, Wire], tuple[PyTree, Stats, Wire]]) -> MessageTransform:
    """Builds a stateless transform from ``apply(message, key, settings, wire) -> (message, stats, wire)``."""

    def init(params_like: PyTree) -> tuple:
        del params_like
        return ()

    def update(
        message: PyTree, state: PyTree, key: jax.Array, settings: Settings, wire: Wire | None = None
    ) -> tuple[PyTree, PyTree, Stats]:
        wire = dense_wire(message) if wire is None else wire
        message, stats, wire = apply(message, key, settings, wire)
        return message, state, {**stats, **wire.as_stats()}

    return MessageTransform(init, update)


def identity() -> MessageTransform:
    """Sends the message unchanged (dense float32 cost unless told otherwise)."""
    return stateless(lambda message, key, settings, wire: (message, {}, wire))


def chain(*transforms: MessageTransform) -> MessageTransform:
    """Applies transforms in order; stage ``i`` gets ``fold_in(key, i)`` and the previous stage's wire.

    The chained stats hold the final wire cost under the wire keys, plus every stage's diagnostics;
    a diagnostic name used by an earlier stage gets the suffix ``"@<stage index>"``.
    """
    for i, transform in enumerate(transforms):
        if not isinstance(transform, MessageTransform):
            raise ValueError(f"chain argument {i} is a {type(transform).__name__}, not a MessageTransform.")

    def init(params_like: PyTree) -> tuple:
        return tuple(transform.init(params_like) for transform in transforms)

    def update(
        message: PyTree, state: tuple, key: jax.Array, settings: Settings, wire: Wire | None = None
    ) -> tuple[PyTree, tuple, Stats]:
        wire = dense_wire(message) if wire is None else wire
        merged: Stats = {}
        new_states = []
        for i, (transform, stage_state) in enumerate(zip(transforms, state)):
            message, stage_state, stats = transform.update(message, stage_state, jax.random.fold_in(key, i), settings,
                                                           wire)
            new_states.append(stage_state)
            wire = wire_after(stats, wire)
            for name, value in stats.items():
                if name in WIRE_KEYS:
                    continue
                merged[f"{name}@{i}" if name in merged else name] = value
        return message, tuple(new_states), {**merged, **wire.as_stats()}

    return MessageTransform(init, update)
