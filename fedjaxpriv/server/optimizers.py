"""Server optimizers (Reddi et al. 2021): the averaged client delta is a pseudo-gradient for optax."""

from __future__ import annotations

import optax

from fedjaxpriv.config import SERVER_OPTIMIZERS


def server_optimizer(name: str, lr: float, *, momentum: float = 0.9, b1: float = 0.9, b2: float = 0.99,
                     eps: float = 1e-3) -> optax.GradientTransformation:
    """FedAvg ("sgd", lr 1 reproduces plain averaging), FedAvgM ("momentum") or FedAdam ("adam").

    The transformation is applied to the pseudo-gradient ``-mean(client deltas)``.
    """
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"server optimizer {name!r} is unknown; allowed: one of {list(SERVER_OPTIMIZERS)}.")
    built = {"sgd": lambda: optax.sgd(lr), "momentum": lambda: optax.sgd(lr, momentum=momentum),
             "adam": lambda: optax.adam(lr, b1=b1, b2=b2, eps=eps)}
    return built[name]()
