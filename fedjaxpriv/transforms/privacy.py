"""Client-level privacy transforms of the message: L2 clipping and local Gaussian noise.

Clipping a client's whole update to norm C bounds it; adding ``N(0, (z C)^2 I)`` on the device is local DP with
the Gaussian mechanism (``privacy.mechanisms.LocalGaussian``: any two datasets of the client give messages at
most 2C apart, so each message is accounted as a Gaussian with multiplier z / 2).

References:
  McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent Language Models". ICLR 2018.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjaxpriv.client.dp import clip_scale
from fedjaxpriv.privacy.mechanisms import LocalGaussian, gaussian_std
from fedjaxpriv.transforms.base import (
    MessageTransform,
    Settings,
    Strength,
    Wire,
    check_strength,
    dense_wire,
    resolve,
    select_wire,
    stateless,
)


def clip_update(clip_norm: Strength = "clip_norm") -> MessageTransform:
    """Scales the whole message to global L2 norm at most ``clip_norm`` (wire cost unchanged).

    Args:
      clip_norm: settings field name or constant C; ``inf`` means off.

    Stats: ``"clip/norm"`` (norm before clipping), ``"clip/clipped"`` (1.0 if it was scaled down).
    """
    check_strength(clip_norm, "clip_norm")

    def apply(message, key, settings: Settings, wire: Wire):
        del key
        c = resolve(clip_norm, settings)
        norm = optax.tree.norm(message)
        scale = clip_scale(norm, c)
        clipped = jax.tree_util.tree_map(lambda leaf: leaf * scale.astype(leaf.dtype), message)
        stats = {"clip/norm": norm, "clip/clipped": (scale < 1.0).astype(jnp.float32)}
        return clipped, stats, wire

    return stateless(apply)


def add_local_noise(noise_multiplier: Strength = "local_noise_multiplier",
                    clip_norm: Strength = "clip_norm") -> MessageTransform:
    """Adds ``N(0, (noise_multiplier * clip_norm)^2)`` to every coordinate of the message.

    Put it after :func:`clip_update` with the same ``clip_norm``. The noisy message is dense float32
    (wire: every coordinate at 32 bits, no side information).

    Args:
      noise_multiplier: settings field name or constant z; ``z <= 0`` means off.
      clip_norm: settings field name or constant C (the sensitivity the noise is scaled to).

    Stats: ``"local_noise/std"``: the per-coordinate noise std actually used.
    """
    check_strength(noise_multiplier, "noise_multiplier")
    check_strength(clip_norm, "clip_norm")

    def apply(message, key, settings: Settings, wire: Wire):
        z = resolve(noise_multiplier, settings)
        c = resolve(clip_norm, settings)
        enabled = z > 0
        noisy = LocalGaussian.privatize(message, key, c, z)
        noisy = jax.tree_util.tree_map(lambda leaf, n: jnp.where(enabled, n, leaf), message, noisy)
        return noisy, {"local_noise/std": gaussian_std(z, c)}, select_wire(enabled, dense_wire(message), wire)

    return stateless(apply)
