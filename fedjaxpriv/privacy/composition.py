"""Epsilons of many compositions at once: ``n``-fold self-compositions of one-step ``DpEvent``s (host side).

A run accounts thousands of clients, each composing its own one-step mechanism (a Poisson-subsampled
Gaussian, a Gaussian on a fixed-size sample without replacement, or a plain Gaussian) over the steps or
rounds it took part in. ``EventAccountant`` takes the distinct one-step events once, and answers
``epsilons(groups, counts)`` for any number of (event, count) pairs:

* ``accountant="rdp"``: the one-step RDP curves of all events come from ``fedjaxpriv.privacy.rdp`` in one
  vectorized call per kind (dp_accounting's default orders, fractional ones included; other events fall
  back to dp_accounting's ``RdpAccountant``), an
  ``n``-fold composition is ``n`` times the curve (exact for RDP), and the conversion to epsilon is
  vectorized too.
* ``accountant="pld"``: dp_accounting's ``PLDAccountant`` (pessimistic) per distinct (event, count).

Truncated sampling. A mechanism whose static batch slots can overflow (Poisson sampling truncated at ``B``
slots) differs from the accounted one only when a truncation happens; if that has probability at most ``p``
per step, the two can be coupled to agree except with probability ``n p`` over ``n`` steps, so an
(eps, d)-DP accounting of the untruncated mechanism gives (eps, d + n p (1 + e^eps)) for the truncated one.
``epsilons`` charges that to delta: with ``s = n p``, ``e1 = eps(delta / 2)``, it reports
``eps(delta - s (1 + e^e1))`` (at most ``e1``, so the total delta stays within ``delta``), or ``inf`` when
``s (1 + e^e1) > delta / 2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import dp_accounting
import numpy as np
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp

from fedjaxpriv.privacy import rdp as rdp_lib
from fedjaxpriv.privacy.validation import check_delta, check_kind

NeighboringRelation = dp_accounting.NeighboringRelation
DEFAULT_PLD_DISCRETIZATION = 1e-4


def event_relation(events: Sequence[dp_accounting.DpEvent]) -> NeighboringRelation:
    """The neighbouring relation the events are accounted under: REPLACE_ONE if any samples without replacement,
    else ADD_OR_REMOVE_ONE. Poisson and fixed-size sampling cannot be mixed in one accountant."""
    kinds = {type(e) for e in events}
    if dp_accounting.SampledWithoutReplacementDpEvent in kinds and dp_accounting.PoissonSampledDpEvent in kinds:
        raise ValueError("Poisson-sampled and fixed-size (without replacement) events need different neighbouring "
                         "relations (add/remove vs replace-one) and cannot be composed in one accountant.")
    if dp_accounting.SampledWithoutReplacementDpEvent in kinds:
        return NeighboringRelation.REPLACE_ONE
    return NeighboringRelation.ADD_OR_REMOVE_ONE


def _gaussian_multiplier(event: dp_accounting.DpEvent) -> Optional[float]:
    return float(event.noise_multiplier) if isinstance(event, dp_accounting.GaussianDpEvent) else None


def rdp_curves(events: Sequence[dp_accounting.DpEvent], orders: Sequence[float]) -> np.ndarray:
    """One-step RDP curves [G, A] (nats) of the events at ``orders``.

    Gaussian, Poisson-sampled Gaussian and sampled-without-replacement Gaussian events are computed in one
    vectorized call per kind; anything else through dp_accounting's ``RdpAccountant``. Orders must be > 1.
    """
    orders = tuple(orders)
    curves = np.full((len(events), len(orders)), np.nan)
    rows: dict[str, list[tuple[int, float, float]]] = {"gaussian": [], "poisson": [], "swor": []}
    multipliers = np.ones(len(events))
    for index, event in enumerate(events):
        while isinstance(event, dp_accounting.SelfComposedDpEvent):  # k-fold composition: k times the curve
            multipliers[index] *= event.count
            event = event.event
        kind, q, sigma = None, 1.0, None
        if isinstance(event, dp_accounting.GaussianDpEvent):
            kind, sigma = "gaussian", float(event.noise_multiplier)
        elif isinstance(event, dp_accounting.PoissonSampledDpEvent):
            kind, q, sigma = "poisson", float(event.sampling_probability), _gaussian_multiplier(event.event)
        elif isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent):
            kind, sigma = "swor", _gaussian_multiplier(event.event)
            q = event.sample_size / event.source_dataset_size
        if kind is None or sigma is None:
            accountant = dp_rdp.RdpAccountant(list(orders), neighboring_relation=event_relation([event]))
            curves[index] = accountant.compose(event).rdp
            continue
        if sigma == 0.0:
            curves[index] = np.inf
            continue
        rows[kind].append((index, q, sigma))
    order_array = np.asarray(orders, np.float64)
    for kind, members in rows.items():
        if not members:
            continue
        index, q, sigma = (np.asarray(column) for column in zip(*members))
        if kind == "gaussian":
            curves[index] = order_array[None, :] / (2.0 * sigma[:, None] ** 2)
        elif kind == "poisson":
            curves[index] = rdp_lib.poisson_gaussian_rdp(q, sigma, orders)
        else:
            curves[index] = rdp_lib.swor_gaussian_rdp(q, sigma, orders)
    with np.errstate(invalid="ignore"):  # 0 x inf (a zero-fold composition of a non-private step) is 0
        return np.where(multipliers[:, None] == 0, 0.0, curves * multipliers[:, None])


RDP_COUNTS_AHEAD = 64  # counts converted together with a missing one (see ``EventAccountant.epsilons``)
COUNT_LIMIT = 2**40  # compositions per event an ``EventAccountant`` takes (its memo keys are group * this + count)


class EventAccountant:
    """Epsilons of ``count``-fold self-compositions of a fixed list of one-step events, memoised.

    Attributes:
      events: the G distinct one-step events.
      relation: the neighbouring relation they are accounted under.
      delta: target delta in (0, 1).
    """

    def __init__(self, events: Sequence[dp_accounting.DpEvent], delta: float, accountant: str = "rdp", *,
                 conversion: str = "improved", orders: Optional[Sequence[float]] = None,
                 pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
                 truncation_probabilities: Optional[Sequence[float]] = None) -> None:
        """Args:
          events: one-step events (G of them).
          delta: target delta in (0, 1).
          accountant: "rdp" or "pld".
          conversion: RDP -> DP conversion, "improved" or "classic" (RDP only).
          orders: RDP orders (default ``rdp.DEFAULT_ORDERS``, dp_accounting's defaults).
          pld_discretization: PLD value discretisation interval.
          truncation_probabilities: [G] per-step probability that the implemented mechanism departs from the
            accounted one (sampling truncation); charged to delta (see the module docstring).
        """
        check_kind(accountant, conversion)
        check_delta(delta)
        self.events = list(events)
        if len(self.events) > np.iinfo(np.int64).max // COUNT_LIMIT:
            raise ValueError(f"{len(self.events)} distinct events are not allowed: at most "
                             f"{np.iinfo(np.int64).max // COUNT_LIMIT} (the memo's keys are int64).")
        self.relation = event_relation(self.events)
        self.delta = float(delta)
        self.accountant = accountant
        self.conversion = conversion
        self.orders = tuple(rdp_lib.DEFAULT_ORDERS if orders is None else orders)
        self.pld_discretization = pld_discretization
        if accountant == "pld" and self.relation == NeighboringRelation.REPLACE_ONE:
            raise ValueError("accountant='pld' cannot account fixed-size sampling without replacement "
                             "(dp_accounting's PLD has no such event); use accountant='rdp' or Poisson sampling.")
        probabilities = np.zeros(len(self.events)) if truncation_probabilities is None else np.asarray(
            truncation_probabilities, np.float64)
        if probabilities.shape != (len(self.events),) or np.any(~(probabilities >= 0)) or np.any(probabilities > 1):
            raise ValueError(f"truncation_probabilities must be [G={len(self.events)}] values in [0, 1].")
        self.truncation_probabilities = probabilities
        self._curves = rdp_curves(self.events, self.orders) if accountant == "rdp" else None
        # Memo of computed epsilons: sorted keys ``group * COUNT_LIMIT + count`` (int64 [K]) and their values [K].
        self._known_keys, self._known_values = np.empty(0, np.int64), np.empty(0)

    def _mechanism_epsilons(self, groups: np.ndarray, counts: np.ndarray, deltas: np.ndarray) -> np.ndarray:
        """Epsilon of each (group, count) row at its own delta, without truncation slack."""
        if self.accountant == "pld":
            out = np.empty(groups.shape[0])
            for i, (g, n, d) in enumerate(zip(groups, counts, deltas)):
                pld = dp_pld.PLDAccountant(value_discretization_interval=self.pld_discretization,
                                           neighboring_relation=self.relation)
                pld.compose(dp_accounting.SelfComposedDpEvent(self.events[int(g)], int(n)))
                out[i] = pld.get_epsilon(float(d))
            return out
        curves = self._curves[groups] * counts[:, None].astype(np.float64)
        one = deltas.size and np.all(deltas == deltas[0])  # one delta (no truncation charge): the scalar form
        return rdp_lib.epsilons_from_rdp(self.orders, curves, float(deltas[0]) if one else deltas, self.conversion)

    def _compute(self, groups: np.ndarray, counts: np.ndarray) -> np.ndarray:
        slack_steps = counts * self.truncation_probabilities[groups]
        eps = np.zeros(groups.shape[0])
        nonzero = counts > 0
        if not np.any(nonzero):
            return eps
        g, n, s = groups[nonzero], counts[nonzero], slack_steps[nonzero]
        plain = s == 0
        values = np.empty(g.shape[0])
        if np.any(plain):
            values[plain] = self._mechanism_epsilons(g[plain], n[plain], np.full(plain.sum(), self.delta))
        if np.any(~plain):
            t = ~plain
            half = self._mechanism_epsilons(g[t], n[t], np.full(t.sum(), self.delta / 2))
            with np.errstate(over="ignore"):
                charge = s[t] * (1.0 + np.exp(half))
            ok = charge <= self.delta / 2
            charged = np.full(t.sum(), np.inf)
            if np.any(ok):
                charged[ok] = self._mechanism_epsilons(g[t][ok], n[t][ok], self.delta - charge[ok])
            values[t] = charged
        eps[nonzero] = values
        return eps

    def epsilons(self, groups: Sequence[int] | np.ndarray, counts: Sequence[int] | np.ndarray) -> np.ndarray:
        """Epsilon of ``counts[i]`` compositions of ``events[groups[i]]``, float64 [N] (0 for count 0)."""
        groups = np.asarray(groups, np.int64).reshape(-1)
        counts = np.asarray(counts, np.int64).reshape(-1)
        if groups.shape != counts.shape:
            raise ValueError(f"groups {groups.shape} and counts {counts.shape} must have the same length.")
        if groups.size and (groups.min() < 0 or groups.max() >= len(self.events)):
            raise ValueError(f"group ids must be in [0, {len(self.events)}).")
        if np.any((counts < 0) | (counts >= COUNT_LIMIT)):
            bad = counts[(counts < 0) | (counts >= COUNT_LIMIT)][:5]
            raise ValueError(f"counts={bad} are not allowed: counts must be in [0, {COUNT_LIMIT}).")
        keys = groups * COUNT_LIMIT + counts
        values = self._lookup(keys)
        unknown = np.isnan(values)
        if np.any(unknown):
            # RDP: the next counts of each missing one too, in the same vectorized conversion, so that a run whose
            # counts grow by one a round converts once every RDP_COUNTS_AHEAD rounds (PLD composes each count anew).
            ahead = RDP_COUNTS_AHEAD if self.accountant == "rdp" else 1
            missing = np.unique(keys[unknown])
            wanted = (missing[:, None] + np.arange(ahead)[None, :]).ravel()
            wanted = np.unique(wanted[wanted // COUNT_LIMIT == np.repeat(missing // COUNT_LIMIT, ahead)])
            wanted = wanted[np.isnan(self._lookup(wanted))]
            computed = self._compute(wanted // COUNT_LIMIT, wanted % COUNT_LIMIT)
            at = np.searchsorted(self._known_keys, wanted)
            self._known_keys = np.insert(self._known_keys, at, wanted)
            self._known_values = np.insert(self._known_values, at, computed)
            values[unknown] = self._lookup(keys[unknown])
        return values

    def _lookup(self, keys: np.ndarray) -> np.ndarray:
        """The memoised epsilon of each key (``group * COUNT_LIMIT + count``), float64 [N]; NaN where not
        computed yet."""
        if self._known_keys.size == 0:
            return np.full(keys.shape, np.nan)
        at = np.minimum(np.searchsorted(self._known_keys, keys), self._known_keys.size - 1)
        return np.where(self._known_keys[at] == keys, self._known_values[at], np.nan)

    def epsilon(self, group: int, count: int) -> float:
        """Epsilon of ``count`` compositions of ``events[group]``."""
        return float(self.epsilons([group], [count])[0])


def unique_events(events: Sequence[dp_accounting.DpEvent]) -> tuple[list[dp_accounting.DpEvent], np.ndarray]:
    """The distinct events (first-seen order) and each input's index among them, int64 [N]."""
    index: dict[dp_accounting.DpEvent, int] = {}
    ids = np.empty(len(events), np.int64)
    for i, event in enumerate(events):
        ids[i] = index.setdefault(event, len(index))
    return list(index), ids

