"""Message transforms: what a client sends (prune, quantize, clip, noise), composable with ``chain``."""

from fedjaxpriv.transforms.base import (
    MessageTransform,
    Wire,
    chain,
    dense_wire,
    identity,
    resolve,
)
from fedjaxpriv.transforms.feedback import error_feedback
from fedjaxpriv.transforms.privacy import add_local_noise, clip_update
from fedjaxpriv.transforms.quantize import qsgd, stochastic_rounding
from fedjaxpriv.transforms.sparsify import prune_message, random_k, top_k

__all__ = [
    "MessageTransform",
    "Wire",
    "chain",
    "dense_wire",
    "identity",
    "resolve",
    "add_local_noise",
    "clip_update",
    "error_feedback",
    "qsgd",
    "stochastic_rounding",
    "prune_message",
    "random_k",
    "top_k",
]
