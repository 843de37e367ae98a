"""What an epsilon means: the basis every reported epsilon carries.

An epsilon alone says little: the same training gives different numbers for one example or one client, for
add/remove or replace-one neighbours, for Poisson or fixed-size sampling, and for RDP or PLD accounting. Every
figure the simulator reports (history, ``clients.csv``, results store, report) comes with an ``EpsilonBasis``
written out as one line by ``describe``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

LEVELS = ("example", "client", "local", "pairwise")
LEVEL_MEANING = {
    "example": "example-level (one example of one client), against the server and anyone who sees the messages",
    "client": "client-level (all data of one client), against anyone who sees the global models",
    "local": "local (all data of one client), against the server and anyone who sees that client's messages",
    "pairwise": "pairwise network DP (all data of one node), against one other node that sees only what is sent to it",
}

# The largest epsilon of each level in a run's records, and the key of its basis line.
EPSILON_KEYS = ("epsilon_max", "local_epsilon_max", "client_level_epsilon")
BASIS_KEYS = tuple(f"{key.removesuffix('_max')}_basis" for key in EPSILON_KEYS)
LEVEL_OF_EPSILON = dict(zip(EPSILON_KEYS, ("example", "local", "client")))
BASIS_OF_EPSILON = dict(zip(EPSILON_KEYS, BASIS_KEYS))


def largest_epsilon(record: dict) -> tuple[float, str, str] | None:
    """The largest epsilon a record reports over its levels: (epsilon, level, basis line); None without any
    (a level at 0, nothing spent yet, counts only when no level has more)."""
    present = [(float(record[k]), LEVEL_OF_EPSILON[k], str(record.get(BASIS_OF_EPSILON[k], "")))
               for k in EPSILON_KEYS if k in record]
    return max(present, key=lambda p: p[0]) if present else None


@dataclasses.dataclass(frozen=True)
class EpsilonBasis:
    """The conditions under which an (epsilon, delta) guarantee holds.

    Attributes:
      level: "example", "client" or "local" (see ``LEVEL_MEANING``).
      relation: the neighbouring datasets, e.g. "add/remove one example".
      sampling: how the protected unit is sampled and what is claimed from it.
      accountant: accountant and conversion, e.g. "RDP (orders 1.1-1024), improved conversion".
      delta: the delta of the guarantee (including any part charged to sampling truncation).
    """

    level: str
    relation: str
    sampling: str
    accountant: str
    delta: float

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level={self.level!r} is not allowed: use one of {LEVELS}.")

    def describe(self) -> str:
        """One line: ``level; neighbours: ...; sampling: ...; accountant: ...; delta=...``."""
        return (f"{LEVEL_MEANING[self.level]}; neighbours: {self.relation}; sampling: {self.sampling}; "
                f"accountant: {self.accountant}; delta={self.delta:g}")


def level_of(line: str) -> str:
    """The level ("example", "client" or "local") of a basis line written by ``EpsilonBasis.describe``; "" when
    the line names none."""
    return next((level for level, meaning in LEVEL_MEANING.items() if line.startswith(meaning)), "")


def describe_accountant(accountant: str, conversion: str, orders: Sequence[float] | None = None,
                        pld_discretization: float | None = None) -> str:
    """Names the accountant and its conversion, e.g. "RDP (orders 1.1-1024), improved conversion (Balle et al.
    2020)" or "PLD (dp_accounting, pessimistic, discretization 0.0001)"."""
    if accountant == "pld":
        step = "" if pld_discretization is None else f", discretization {pld_discretization:g}"
        return f"PLD (dp_accounting, pessimistic{step})"
    span = "" if not orders else f" (orders {min(orders):g}-{max(orders):g})"
    name = ("improved conversion (Balle et al. 2020)" if conversion == "improved"
            else "classic conversion (Mironov 2017)")
    return f"RDP{span}, {name}"
