"""Flax models exposed as pure ``(init, apply)`` pairs, and losses."""

from fedjaxpriv.models.core import Model, count_params, get_model, MODEL_NAMES
from fedjaxpriv.models.losses import cross_entropy, accuracy, soft_cross_entropy

__all__ = ["Model", "count_params", "get_model", "MODEL_NAMES", "cross_entropy", "accuracy", "soft_cross_entropy"]
