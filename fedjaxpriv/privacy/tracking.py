"""Privacy bookkeeping of a running simulation (host side): what the history records each round.

``PrivacyTracker`` composes, per client, the one-step events of the run's mechanisms
(``fedjaxpriv.privacy.mechanisms``) over what the client actually did: the DP-SGD steps of the rounds it took
part in (example level), the messages it sent with local noise (local level), and the rounds of DP-FedAvg
(client level). Every epsilon it reports comes with its basis (``EpsilonBasis.describe``).

Personalised budgets (``client.target_epsilon``) are promises: ``calibrate_targets`` calibrates each client's
noise for a planned number of participations ``participation_plan`` (exceeded with probability at most 1e-3
under the run's client sampling), and the tracker's ``allowed`` stops a client from taking part once it has
used its planned participations, so every client ends at or below its target whatever the cohorts were.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedjaxpriv.client.sampling import DP_OVERFLOW_TAIL, batch_slots, overflow_probability
from fedjaxpriv.client.settings import ClientSettings
from fedjaxpriv.privacy.accounting import participation_bound
from fedjaxpriv.privacy.basis import LEVEL_MEANING, describe_accountant
from fedjaxpriv.privacy.calibration import calibrate_noise
from fedjaxpriv.privacy.composition import DEFAULT_PLD_DISCRETIZATION, EventAccountant
from fedjaxpriv.privacy.mechanisms import (ClientLevelDpFedAvg, LocalGaussian, SampleLevelDpSgd, round_up_float32,
                                           sample_level_dpsgd)
from fedjaxpriv.privacy.rdp import DEFAULT_ORDERS
from fedjaxpriv.server.sampling import max_cohort_size

PARTICIPATION_TAIL = 1e-3
UNLIMITED = np.iinfo(np.int64).max


def dpsgd_mechanism(settings: ClientSettings, counts: np.ndarray, slots: int,
                    noise_multipliers: np.ndarray | None = None) -> SampleLevelDpSgd | None:
    """The example-level mechanism that local training with these settings runs (batch ``slots`` per step)."""
    counts = np.asarray(counts, np.int64)
    z = np.asarray(settings.dp_noise_multiplier if noise_multipliers is None else noise_multipliers, np.float64)
    poisson = np.asarray(settings.poisson, bool)
    rates = np.asarray(settings.sample_rate, np.float64)
    truncation = np.where(poisson, overflow_probability(counts + 1, rates, slots), 0.0)
    return sample_level_dpsgd(z, poisson, rates, np.asarray(settings.batch_size), counts,
                              np.asarray(settings.mixup_alpha) > 0, truncation)


# Share of delta that the overflow of Poisson batches may take over a run's planned steps (``dp_batch_slots``).
OVERFLOW_DELTA_SHARE = 0.01


def overflow_tail(epsilon: float, steps: int, delta: float) -> float:
    """The largest overflow probability per step (or round) whose charge ``steps p (1 + e^eps)`` over ``steps``
    stays within ``OVERFLOW_DELTA_SHARE`` of ``delta`` / 2, with eps the untruncated epsilon at delta / 2; 0 where
    e^eps overflows (then the slots must make an overflow impossible)."""
    with np.errstate(over="ignore"):
        return float(OVERFLOW_DELTA_SHARE * delta / (2.0 * steps * (1.0 + np.exp(epsilon))))


def dp_batch_slots(settings: ClientSettings, counts: np.ndarray, *, planned_steps: np.ndarray, delta: float,
                   accountant: str = "rdp") -> int:
    """``batch_slots`` with the Poisson batches of DP clients sized so that their overflow charge stays finite.

    A batch that overflows its slots is charged to delta as ``n p (1 + e^eps)`` over n steps (the coupling in
    ``composition``), which grows with e^eps: at small noise multipliers the default tail of 1e-16 per step
    gives an infinite epsilon. Here the tail per step is at most ``OVERFLOW_DELTA_SHARE * delta /
    (2 n (1 + e^eps))``, with eps the untruncated epsilon at delta / 2 of each client's ``planned_steps`` [C]
    (so the charge of a run that keeps to its plan is at most 1 % of delta); where e^eps overflows, the slots
    hold the whole client plus one and the batch cannot overflow. Clients with more steps than planned are
    still accounted soundly (their charge is computed from the slots that run), only less tightly.
    """
    private = np.asarray(settings.dp_noise_multiplier) > 0
    slots = batch_slots(settings, counts, private)
    mechanism = dpsgd_mechanism(settings, counts, slots)
    steps = np.asarray(planned_steps, np.int64)
    if mechanism is None or not mechanism.poisson or not np.any(steps[mechanism.private] > 0):
        return slots
    events, ids, _ = mechanism.step_events()
    eps = EventAccountant(events, delta / 2, accountant=accountant).epsilons(ids, steps)
    members = mechanism.private & (steps > 0)
    tail = overflow_tail(float(np.max(eps[members])), int(np.max(steps[members])), delta)
    if tail >= float(np.max(mechanism.truncation_probabilities[members])):
        return slots
    return batch_slots(settings, counts, private, tail=tail)  # tail 0: slots n + 1, no overflow possible


def _largest(epsilons: np.ndarray, private: np.ndarray, exposed: int) -> float:
    """The largest epsilon over the participants: inf when ``exposed`` of them had no noise (no guarantee), else
    the largest over the ``private`` ones (0 before any took part)."""
    if exposed:
        return math.inf
    return float(epsilons[private].max()) if np.any(private) else 0.0


def _no_guarantee(level: str, exposed: int, knob: str) -> str:
    """The basis of an infinite epsilon: ``exposed`` participants trained without noise ("" when none did)."""
    if not exposed:
        return ""
    return (f"{LEVEL_MEANING[level]}; no guarantee: {exposed} participant(s) took part without noise ({knob} 0), "
            "so the largest epsilon is inf (the private participants' are in clients.csv)")


def _without_noise(level: str, knob: str) -> str:
    """The basis of one client's infinite epsilon: it trains (or sends) without noise."""
    return f"{LEVEL_MEANING[level]}; no guarantee: this client takes part without noise ({knob} 0)"


def dp_cohort_slots(mechanism: ClientLevelDpFedAvg, rounds: int, delta: float, accountant: str = "rdp") -> int:
    """Static slots of a Poisson cohort under DP-FedAvg (``mechanism`` untruncated), sized like ``dp_batch_slots``.

    A cohort that overflows its slots is charged to delta as ``R p (1 + e^eps)`` over R rounds; with the default
    tail of 1e-16 per round a client-level epsilon above about 20 would become infinite. Here the tail per round
    is at most ``OVERFLOW_DELTA_SHARE * delta / (2 R (1 + e^eps))``, eps the mechanism's epsilon at delta / 2
    over ``rounds``, so the charge is at most 1 % of delta; where e^eps overflows, the slots hold the whole
    population plus one and the cohort cannot overflow.
    """
    eps = EventAccountant([mechanism.round_event()], delta / 2, accountant=accountant).epsilon(0, max(1, rounds))
    return max_cohort_size(mechanism.num_clients, mechanism.expected_cohort, "poisson", private=True,
                           tail=min(overflow_tail(eps, max(1, rounds), delta), DP_OVERFLOW_TAIL))


def participation_plan(client_rate: float, rounds: int, tail_probability: float = PARTICIPATION_TAIL) -> int:
    """Participations a calibrated budget covers: every round when all clients take part each round, else the
    count that Binomial(rounds, client_rate) exceeds with probability at most ``tail_probability``."""
    return int(rounds) if client_rate >= 1.0 else participation_bound(client_rate, rounds, tail_probability)


def calibrate_targets(settings: ClientSettings, counts: np.ndarray, targets: np.ndarray, *, client_rate: float,
                      rounds: int, delta: float, accountant: str = "rdp") -> tuple[ClientSettings, np.ndarray]:
    """Each client's DP-SGD noise multiplier from its target epsilon (inf = no target) and its budget.

    Client i's budget covers ``participation_plan(client_rate, rounds)`` participations of
    ``settings.local_steps[i]`` steps of its own mechanism (Poisson or fixed-size sampling, mixup, truncation
    charged to delta). The float32 multiplier that runs is rounded up, so the run stays within the target.

    Returns:
      (settings with ``dp_noise_multiplier`` set for targeted clients, max participations [C] int64:
      the plan for targeted clients, ``UNLIMITED`` for the others).
    """
    targets = np.asarray(targets, np.float64)
    num_clients = targets.shape[0]
    targeted = np.isfinite(targets)
    if np.any(targets <= 0) or np.any(np.isnan(targets)):
        bad = targets[(targets <= 0) | np.isnan(targets)][:5]
        raise ValueError(f"client.target_epsilon={bad} is not allowed: each target must be > 0 (inf = no target).")
    if not np.any(targeted):
        return settings, np.full(num_clients, UNLIMITED, np.int64)
    if not np.all(np.isfinite(np.asarray(settings.dp_clip_norm)[targeted])):
        raise ValueError("client.target_epsilon needs a finite client.dp_clip_norm (DP-SGD clips per example).")
    plan = participation_plan(client_rate, rounds)
    slots = batch_slots(settings, counts, targeted | (np.asarray(settings.dp_noise_multiplier) > 0))
    mechanism = dpsgd_mechanism(settings, counts, slots, noise_multipliers=np.where(targeted, 1.0, 0.0))
    sigmas = np.array(settings.dp_noise_multiplier, np.float64)
    steps = np.asarray(settings.local_steps, np.int64) * plan
    solved: dict[tuple[Any, ...], float] = {}
    for i in np.flatnonzero(targeted):
        key = (float(targets[i]), mechanism.step_event(int(i), 1.0), int(steps[i]),
               float(mechanism.truncation_probabilities[i]))
        if key not in solved:
            try:
                solved[key] = calibrate_noise(lambda z, i=int(i): mechanism.step_event(i, z), int(steps[i]),
                                              float(targets[i]), delta, accountant,
                                              truncation_probability=key[3])
            except ValueError as error:
                raise ValueError(f"client.target_epsilon={targets[i]:g} (client {i}, {steps[i]} planned steps over "
                                 f"{plan} participations): {error}") from None
        sigmas[i] = solved[key]
    noise = np.where(targeted, round_up_float32(sigmas), np.asarray(settings.dp_noise_multiplier, np.float32))
    budget = np.where(targeted, plan, UNLIMITED).astype(np.int64)
    return settings._replace(dp_noise_multiplier=noise.astype(np.float32)), budget


class PrivacyTracker:
    """Per-client epsilons of a run at every level its mechanisms protect; ``record_round`` after each round.

    Attributes:
      participations: int64 [C], rounds each client took part in.
      dp_steps: int64 [C], local steps each client ran (DP-SGD steps for a DP-SGD client).
      rounds: rounds recorded.
      max_participations: int64 [C], the budget of each client (``UNLIMITED`` without a target).
    """

    def __init__(self, *, num_clients: int, steps_per_round: np.ndarray, delta: float, accountant: str = "rdp",
                 conversion: str = "improved", sample_level: SampleLevelDpSgd | None = None,
                 client_level: ClientLevelDpFedAvg | None = None, local: LocalGaussian | None = None,
                 max_participations: np.ndarray | None = None) -> None:
        self.num_clients = int(num_clients)
        self.steps_per_round = np.asarray(steps_per_round, np.int64)
        self.delta = float(delta)
        self.accountant_name = describe_accountant(
            accountant, conversion, DEFAULT_ORDERS if accountant == "rdp" else None,
            DEFAULT_PLD_DISCRETIZATION if accountant == "pld" else None)
        kwargs = dict(accountant=accountant, conversion=conversion)
        self.sample_level, self.client_level, self.local = sample_level, client_level, local
        self.max_participations = (np.full(self.num_clients, UNLIMITED, np.int64) if max_participations is None
                                   else np.asarray(max_participations, np.int64))
        self.participations = np.zeros(self.num_clients, np.int64)
        self.dp_steps = np.zeros(self.num_clients, np.int64)
        self.rounds = 0
        self._lines: dict[tuple, tuple[Any, str]] = {}  # basis lines by (mechanism id, arguments): ``_line``
        if sample_level is not None:
            events, self._example_ids, truncation = sample_level.step_events()
            self._example = EventAccountant(events, delta, truncation_probabilities=truncation, **kwargs)
            steps_plain, self._example_plain_ids, plain_truncation = sample_level.step_events(amplified=False)
            self._example_plain = EventAccountant(steps_plain, delta, truncation_probabilities=plain_truncation,
                                                  **kwargs)
        if local is not None:
            events, self._local_ids = local.message_events()
            self._local = EventAccountant(events, delta, **kwargs)
        if client_level is not None and client_level.private:
            self._client = EventAccountant([client_level.round_event()], delta,
                                           truncation_probabilities=[client_level.cohort_truncation_probability],
                                           **kwargs)
            self._client_plain = EventAccountant([client_level.round_event(amplified=False)], delta,
                                                 truncation_probabilities=[client_level.cohort_truncation_probability],
                                                 **kwargs)

    @property
    def client_private(self) -> bool:
        return self.client_level is not None and self.client_level.private

    @property
    def active(self) -> bool:
        return self.sample_level is not None or self.local is not None or self.client_private or bool(
            np.any(self.max_participations < UNLIMITED))

    def allowed(self, ids: np.ndarray) -> np.ndarray:
        """bool [len(ids)]: clients that still have planned participations left."""
        ids = np.asarray(ids, np.int64)
        return self.participations[ids] < self.max_participations[ids]

    def record_round(self, participants: np.ndarray) -> None:
        """participants: int ids of the clients that took part in the round (each once)."""
        ids = np.asarray(participants, np.int64).reshape(-1)
        ordered = np.sort(ids)
        if np.any(ordered[1:] == ordered[:-1]):
            raise ValueError("participant ids contain duplicates; each client takes part once a round.")
        self.rounds += 1
        self.participations[ids] += 1
        self.dp_steps[ids] += self.steps_per_round[ids]

    # -- epsilons ------------------------------------------------------------------------------------------
    # Each level with sampling has two valid bounds for every client: amplified by the sampling, and composed
    # without it. The reported epsilon is, per client, the smaller of the two, with the basis of the one chosen.
    def example_epsilons(self, amplified: bool | None = None) -> np.ndarray:
        """Example-level epsilon per client [C] (inf for clients without noise that ran steps): ``None``, the
        smaller of the amplified and unamplified bounds; True / False, that bound alone."""
        if amplified is None:
            return np.minimum(self.example_epsilons(True), self.example_epsilons(False))
        if amplified:
            return self._example.epsilons(self._example_ids, self.dp_steps)
        return self._example_plain.epsilons(self._example_plain_ids, self.dp_steps)

    def local_epsilons(self) -> np.ndarray:
        return self._local.epsilons(self._local_ids, self.participations)

    def client_level_epsilons(self, amplified: bool | None = None) -> np.ndarray:
        """Client-level epsilon per client [C]: amplified by client sampling over the rounds run (the same for
        every client), unamplified over the rounds the client took part in, or (``None``) the smaller of the two."""
        if amplified is None:
            return np.minimum(self.client_level_epsilons(True), self.client_level_epsilons(False))
        if amplified:
            return np.full(self.num_clients, self._client.epsilon(0, self.rounds))
        return self._client_plain.epsilons(np.zeros(self.num_clients, np.int64), self.participations)

    def client_level_epsilon(self) -> float:
        """The run's client-level epsilon: the largest over the clients of the smaller of the two bounds."""
        return float(self.client_level_epsilons().max(initial=0.0))

    def client_level_epsilons_unamplified(self) -> np.ndarray:
        return self.client_level_epsilons(amplified=False)

    def _chosen_bases(self, mechanism: Any, amplified: np.ndarray, plain: np.ndarray) -> np.ndarray:
        """Per client [C], the basis line of the smaller bound (amplified where it is not larger)."""
        return np.where(amplified <= plain, self._line(mechanism, amplified=True),
                        self._line(mechanism, amplified=False)).astype(object)

    def _line(self, mechanism: Any, **kwargs: bool) -> str:
        """``mechanism.basis(accountant, delta, **kwargs).describe()``, built once per run (it never changes)."""
        key = (id(mechanism), tuple(sorted(kwargs.items())))
        if key not in self._lines:  # the entry holds the mechanism, so its id is not reused while cached
            self._lines[key] = (mechanism, mechanism.basis(self.accountant_name, self.delta, **kwargs).describe())
        return self._lines[key][1]

    def _bounds(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per level with two bounds, each client's (amplified, unamplified) epsilon [C], computed once for
        everything a round reports."""
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if self.sample_level is not None:
            out["epsilon"] = (self.example_epsilons(True), self.example_epsilons(False))
        if self.client_private:
            out["client_level_epsilon"] = (self.client_level_epsilons(True), self.client_level_epsilons(False))
        return out

    def _level_bases(self, bounds: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        """Per level with two bounds (``_bounds``), the basis of each client's reported epsilon [C] (object
        strings)."""
        out: dict[str, np.ndarray] = {}
        if self.sample_level is not None:
            out["epsilon"] = np.where(self.sample_level.private,
                                      self._chosen_bases(self.sample_level, *bounds["epsilon"]),
                                      _without_noise("example", "client.dp_noise_multiplier")).astype(object)
        if self.client_private:
            out["client_level_epsilon"] = self._chosen_bases(self.client_level, *bounds["client_level_epsilon"])
        return out

    @staticmethod
    def _basis_of_max(eps: np.ndarray, bases: np.ndarray, members: np.ndarray) -> str:
        """The basis of the largest epsilon among ``members`` (of the first client without any)."""
        index = np.flatnonzero(members)
        return str(bases[index[np.argmax(eps[index])]] if index.size else bases[0])

    @staticmethod
    def _basis_of_mean(bases: np.ndarray, members: np.ndarray) -> str:
        chosen = sorted(set(bases[members].tolist())) if np.any(members) else [str(bases[0])]
        if len(chosen) == 1:
            return chosen[0]
        return "mean over clients of the smaller of two bounds, per client: " + " | ".join(chosen)

    def bases(self, bounds: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
              chosen: dict[str, np.ndarray] | None = None) -> dict[str, str]:
        """The basis line of every epsilon the tracker reports, by history key (``bounds``: ``_bounds()``,
        ``chosen``: ``_level_bases(bounds)``, when the caller has them already)."""
        out: dict[str, str] = {}
        took_part = self.participations > 0
        bounds = self._bounds() if bounds is None else bounds
        chosen = self._level_bases(bounds) if chosen is None else chosen
        if self.sample_level is not None:
            private = self.sample_level.private & took_part
            exposed = _no_guarantee("example", int(np.sum(~self.sample_level.private & took_part)),
                                    "client.dp_noise_multiplier")
            out["epsilon_basis"] = exposed or self._basis_of_max(np.minimum(*bounds["epsilon"]), chosen["epsilon"],
                                                                 private)
            out["epsilon_mean_basis"] = self._basis_of_mean(chosen["epsilon"], private)
            out["epsilon_unamplified_basis"] = exposed or self._line(self.sample_level, amplified=False)
        if self.local is not None:
            line = self._line(self.local)
            exposed = int(np.sum(~self.local.private & took_part))
            out["local_epsilon_basis"] = _no_guarantee("local", exposed, "message.local_noise_multiplier") or line
            out["local_epsilon_mean_basis"] = line  # the mean is over the private participants, one basis for all
        if self.client_private:
            out["client_level_epsilon_basis"] = self._basis_of_max(
                np.minimum(*bounds["client_level_epsilon"]), chosen["client_level_epsilon"],
                np.ones(self.num_clients, bool))
            out["client_level_epsilon_unamplified_basis"] = self._line(self.client_level, amplified=False)
        return out

    def summary(self) -> dict[str, Any]:
        """History fields: epsilons over the clients that took part so far, each with its basis."""
        record: dict[str, Any] = {}
        took_part = self.participations > 0
        bounds = self._bounds()
        if self.sample_level is not None:
            private = self.sample_level.private & took_part
            plain = bounds["epsilon"][1]
            eps = np.minimum(*bounds["epsilon"])
            exposed = int(np.sum(~self.sample_level.private & took_part))
            record.update(epsilon_max=_largest(eps, private, exposed),
                          epsilon_mean=float(eps[private].mean()) if np.any(private) else 0.0,
                          epsilon_unamplified_max=_largest(plain, private, exposed),
                          nonprivate_participants=exposed)
        if self.local is not None:
            private = self.local.private & took_part
            eps = self.local_epsilons()
            exposed = int(np.sum(~self.local.private & took_part))
            record.update(local_epsilon_max=_largest(eps, private, exposed),
                          local_epsilon_mean=float(eps[private].mean()) if np.any(private) else 0.0,
                          local_nonprivate_participants=exposed)
        if self.client_private:
            amplified, plain = bounds["client_level_epsilon"]
            record["client_level_epsilon"] = float(np.minimum(amplified, plain).max(initial=0.0))
            record["client_level_epsilon_unamplified"] = float(plain.max())
        if np.any(self.max_participations < UNLIMITED):
            record["budget_exhausted"] = int(np.sum(self.participations >= self.max_participations))
        record.update(self.bases(bounds))
        return record

    def per_client(self) -> dict[str, np.ndarray]:
        """Per-client arrays for ``clients.csv`` and ``Results.clients``: rounds taken part in and local steps run
        (every run), and with DP each level's epsilon; every epsilon column has a basis column beside it, per
        client where the bound chosen differs between clients."""
        out: dict[str, np.ndarray] = {"participations": self.participations.copy(),
                                      "local_steps": self.dp_steps.copy()}
        if not (self.sample_level is not None or self.local is not None or self.client_private):
            return out
        bounds = self._bounds()
        chosen = self._level_bases(bounds)
        bases = self.bases(bounds, chosen)
        full = lambda key: np.full(self.num_clients, bases[key], object)  # noqa: E731

        def own(private: np.ndarray, line: str, level: str, knob: str) -> np.ndarray:
            """Each client's basis: the mechanism's line, or "no guarantee" for a client without noise."""
            return np.where(private, line, _without_noise(level, knob)).astype(object)

        if self.sample_level is not None:
            unamplified = self._line(self.sample_level, amplified=False)
            out.update(dp_steps=self.dp_steps.copy(), sample_rate=self.sample_level.sample_rates.copy(),
                       noise_multiplier=self.sample_level.noise_multipliers.copy(),
                       epsilon=np.minimum(*bounds["epsilon"]), epsilon_basis=chosen["epsilon"],
                       epsilon_unamplified=bounds["epsilon"][1],
                       epsilon_unamplified_basis=own(self.sample_level.private, unamplified, "example",
                                                     "client.dp_noise_multiplier"))
        if np.any(self.max_participations < UNLIMITED):
            out["max_participations"] = np.where(self.max_participations < UNLIMITED, self.max_participations, -1)
        if self.local is not None:
            out.update(local_noise_multiplier=self.local.noise_multipliers.copy(), local_epsilon=self.local_epsilons(),
                       local_epsilon_basis=own(self.local.private, bases["local_epsilon_mean_basis"], "local",
                                               "message.local_noise_multiplier"))
        if self.client_private:
            out.update(client_level_epsilon=np.minimum(*bounds["client_level_epsilon"]),
                       client_level_epsilon_basis=chosen["client_level_epsilon"],
                       client_level_epsilon_unamplified=bounds["client_level_epsilon"][1],
                       client_level_epsilon_unamplified_basis=full("client_level_epsilon_unamplified_basis"))
        return out

    # -- resume ---------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-able state to checkpoint beside the server state."""
        return {"rounds": self.rounds, "participations": self.participations.tolist(),
                "dp_steps": self.dp_steps.tolist()}

    def restore(self, state: dict[str, Any]) -> None:
        """Restores what ``state`` returned (a checkpoint of the same run)."""
        participations = np.asarray(state["participations"], np.int64)
        dp_steps = np.asarray(state["dp_steps"], np.int64)
        if participations.shape != (self.num_clients,) or dp_steps.shape != (self.num_clients,):
            raise ValueError(f"privacy state holds {participations.shape} participations for "
                             f"{self.num_clients} clients: it belongs to another run.")
        self.participations, self.dp_steps, self.rounds = participations, dp_steps, int(state["rounds"])

