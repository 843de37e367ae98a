"""Privacy bookkeeping of a running simulation (host side): what the history records each round.

Sample-level DP-SGD: ``ClientPrivacyAccountant`` composes each client's steps over the rounds it took part
in, with amplification by example subsampling at rate q_i = batch_i / n_i (exact for Poisson example
sampling; fixed-size batches are accounted with the same q, the usual approximation). Client-level DP-FedAvg:
``dpfedavg_epsilon`` with amplification by client sampling (Poisson rate K/C, or a fixed cohort of K out of C
via sampled-without-replacement RDP). Each figure is reported with and without amplification.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedjaxpriv.privacy.accounting import ClientPrivacyAccountant, dpfedavg_epsilon, participation_bound
from fedjaxpriv.privacy.calibration import calibrate_clients


def calibrate_noise_for_targets(target_epsilons: np.ndarray, sample_rates: np.ndarray, steps_per_round: np.ndarray,
                                client_rate: float, rounds: int, delta: float, accountant: str = "rdp",
                                tail_probability: float = 1e-3) -> tuple[np.ndarray, int]:
    """Per-client noise multipliers so that each client's epsilon stays within its target.

    The budget covers ``participation_bound(client_rate, rounds, tail_probability)`` participations: with
    probability at least 1 - tail_probability a client takes part in no more rounds than that. The achieved
    epsilons are reported during the run.

    Returns:
      (noise multipliers [C], the planned number of participations).
    """
    participations = rounds if client_rate >= 1.0 else participation_bound(client_rate, rounds, tail_probability)
    sigmas = calibrate_clients(target_epsilons, sample_rates, steps_per_round, participations, delta, accountant)
    return np.asarray(sigmas, np.float64), int(participations)


class PrivacyTracker:
    """Per-round epsilons of a run; ``record_round`` is called with the cohort after each round."""

    def __init__(self, *, num_clients: int, sample_rates: np.ndarray, noise_multipliers: np.ndarray,
                 steps_per_round: np.ndarray, delta: float, accountant: str = "rdp",
                 central_noise_multiplier: float = 0.0, client_rate: float = 1.0,
                 fixed_cohort: bool = False) -> None:
        self.delta = delta
        self.accountant_kind = accountant
        self.dp_clients = np.asarray(noise_multipliers) > 0
        self.sample_level = (ClientPrivacyAccountant(sample_rates, noise_multipliers, steps_per_round, delta,
                                                     accountant) if np.any(self.dp_clients) else None)
        self.central_noise_multiplier = central_noise_multiplier
        self.client_rate = client_rate
        self.population = num_clients if fixed_cohort else None
        self.num_clients = num_clients
        self.rounds = 0

    @property
    def active(self) -> bool:
        return self.sample_level is not None or self.central_noise_multiplier > 0

    def record_round(self, participants: np.ndarray) -> None:
        """participants: int ids of the clients that took part in the round."""
        self.rounds += 1
        if self.sample_level is not None:
            self.sample_level.record_round(np.asarray(participants, np.int64))

    def summary(self) -> dict[str, Any]:
        """History fields: sample-level epsilon over DP clients that took part so far, client-level epsilon."""
        record: dict[str, Any] = {}
        if self.sample_level is not None:
            took_part = self.dp_clients & (self.sample_level.participations > 0)
            eps = self.sample_level.epsilons()
            eps_plain = self.sample_level.epsilons(amplification=False)
            if np.any(took_part):
                record.update(epsilon_max=float(eps[took_part].max()), epsilon_mean=float(eps[took_part].mean()),
                              epsilon_unamplified_max=float(eps_plain[took_part].max()))
            else:
                record.update(epsilon_max=0.0, epsilon_mean=0.0, epsilon_unamplified_max=0.0)
            record["nonprivate_participants"] = int(np.sum(~self.dp_clients & (self.sample_level.participations > 0)))
        if self.central_noise_multiplier > 0:
            kwargs = dict(accountant=self.accountant_kind if self.population is None else "rdp")
            record["client_level_epsilon"] = dpfedavg_epsilon(self.client_rate, self.central_noise_multiplier,
                                                              self.rounds, self.delta, population=self.population,
                                                              **kwargs)
            record["client_level_epsilon_unamplified"] = dpfedavg_epsilon(
                self.client_rate, self.central_noise_multiplier, self.rounds, self.delta, amplification=False,
                **kwargs)
        return record

    def per_client(self) -> dict[str, np.ndarray]:
        """Per-client arrays for the final report (empty without sample-level DP)."""
        if self.sample_level is None:
            return {}
        return {"participations": self.sample_level.participations.copy(),
                "dp_steps": self.sample_level.total_steps.copy(),
                "sample_rate": self.sample_level.sample_rates.copy(),
                "noise_multiplier": self.sample_level.noise_multipliers.copy(),
                "epsilon": self.sample_level.epsilons(),
                "epsilon_unamplified": self.sample_level.epsilons(amplification=False)}
