"""Client sampling on the host, seeded by (seed, round) so a round's cohort never depends on history."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from fedjaxpriv.client.sampling import DP_OVERFLOW_TAIL, poisson_slots


class Cohort(NamedTuple):
    """A round's cohort, padded to a fixed size so the compiled round never changes shape.

    Attributes:
      ids: [K_max] int32 client ids (padded slots repeat id 0 and are masked).
      mask: [K_max] bool, True for real participants.
      dropped: number of Poisson-sampled clients beyond K_max that could not be included (normally 0; a random
        subset of the sampled clients is kept).
    """

    ids: np.ndarray
    mask: np.ndarray
    dropped: int


def max_cohort_size(num_clients: int, clients_per_round: int, mode: str, tail_sigmas: float = 7.0,
                    private: bool = False, tail: float = DP_OVERFLOW_TAIL) -> int:
    """Static cohort slots: exact for uniform sampling; for Poisson sampling mean + ``tail_sigmas`` std devs, or,
    when the round is client-level private (``private``), the smallest count that a cohort of the population
    plus one client exceeds with probability at most ``tail`` (charged to delta; up to C + 1 slots, since the
    neighbouring population has C + 1 clients; ``privacy.tracking.dp_cohort_slots`` sizes ``tail``)."""
    if mode == "uniform":
        return clients_per_round
    p = clients_per_round / num_clients
    if private:
        return poisson_slots(num_clients, p, tail)
    std = math.sqrt(num_clients * p * (1 - p))
    return int(min(num_clients, math.ceil(clients_per_round + tail_sigmas * std + 1)))


def sample_cohort(seed: int, round_index: int, num_clients: int, clients_per_round: int, mode: str,
                  max_size: int | None = None) -> Cohort:
    """Samples the clients of one round.

    Args:
      seed: experiment seed.
      round_index: round number (0-based).
      num_clients: population size C.
      clients_per_round: cohort size (uniform) or expected cohort size (Poisson, rate K/C per client).
      mode: "uniform" (K distinct clients uniformly) or "poisson" (each client independently).
      max_size: static number of slots (defaults to ``max_cohort_size``).
    """
    if mode not in ("uniform", "poisson"):
        raise ValueError(f"client sampling mode {mode!r} is unknown; allowed: 'uniform', 'poisson'.")
    if not 1 <= clients_per_round <= num_clients:
        raise ValueError(f"clients_per_round={clients_per_round} must be in [1, num_clients={num_clients}].")
    slots = max_size or max_cohort_size(num_clients, clients_per_round, mode)
    rng = np.random.default_rng([seed, round_index, 0x5A3])
    if mode == "uniform":
        chosen = np.sort(rng.choice(num_clients, size=clients_per_round, replace=False))
    else:
        chosen = np.flatnonzero(rng.random(num_clients) < clients_per_round / num_clients)
    dropped = max(0, chosen.size - slots)
    if dropped:  # keep a uniformly random subset of the sampled clients (not the lowest ids)
        chosen = np.sort(rng.choice(chosen, size=slots, replace=False))
    ids = np.zeros(slots, np.int32)
    ids[: chosen.size] = chosen
    mask = np.arange(slots) < chosen.size
    return Cohort(ids=ids, mask=mask, dropped=int(dropped))
