"""The DP mechanisms of a run, each owning its JAX step and the ``DpEvent`` that describes it.

A mechanism object answers two questions from one set of parameters, so the code that adds the noise and the
accountant that charges for it cannot drift apart:

* the JAX step (clip, noise std, denominator) that runs inside the compiled round, written for ONE client (or
  the server) with traced scalars; and
* the ``dp_accounting.DpEvent`` of one step (one local step, one round, or one message), its neighbouring
  relation and sampling scheme, and the ``EpsilonBasis`` written next to every epsilon.

Mechanisms:

* ``SampleLevelDpSgd``: per-example clipping and Gaussian noise in every local step (Abadi et al. 2016).
  Poisson example sampling is accounted as a Poisson-subsampled Gaussian under add/remove-one-example
  neighbours; fixed-size batches (sampling without replacement) as a sampled-without-replacement Gaussian
  (Wang, Balle, Kasiviswanathan 2019) under replace-one-example neighbours, where replacing an example moves the
  clipped sum by up to 2C. With mixup inside a DP-SGD batch one example enters two mixed examples, so the
  clipped sum moves by up to 3C (add/remove: the new example's own mixed example, and the one partner whose
  mix now uses it, under a coupling of the pairing permutation) or 4C (replace-one).
* ``ClientLevelDpFedAvg``: DP-FedAvg (McMahan et al. 2018) with fixed or adaptive clipping (Andrew et al. 2021):
  clipped client updates, Gaussian noise on their sum, a fixed denominator (the expected cohort), and with
  adaptive clipping a second Gaussian release, the noisy count of unclipped updates, whose centred indicators
  (b_i - 1/2) have sensitivity 1/2. Poisson client sampling: add/remove one client; a fixed-size cohort:
  sampled without replacement, replace one client. Both releases share the round's sample, so the round is
  one Gaussian with ``z_eff^-2 = (z / s)^-2 + (sigma_b / s_b)^-2`` (s, s_b the two sensitivities).
* ``LocalGaussian``: local DP on the message: the client clips its whole message to norm C and adds
  N(0, (z C)^2) before sending. Any two datasets of the client give clipped messages at most 2C apart, so each
  message is a Gaussian with multiplier z / 2 against the server, composed over the rounds the client sends.

References:
  Abadi et al. "Deep Learning with Differential Privacy". CCS 2016.
  McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent Language Models". ICLR 2018.
  Andrew, Thakkar, McMahan, Ramaswamy. "Differentially Private Learning with Adaptive Clipping". NeurIPS 2021.
  Wang, Balle, Kasiviswanathan. "Subsampled Renyi Differential Privacy and Analytical Moments Accountant".
  AISTATS 2019.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv.client import dp as dp_ops
from fedjaxpriv.privacy.basis import EpsilonBasis

PyTree = Any


def gaussian_std(noise_multiplier: jax.Array | float, clip_norm: jax.Array | float) -> jax.Array:
    """Noise std ``z * C`` (0 when z = 0, so an infinite clip norm with no noise is not NaN)."""
    z = jnp.asarray(noise_multiplier, jnp.float32)
    return jnp.where(z > 0, z * jnp.asarray(clip_norm, jnp.float32), 0.0)


# ----------------------------------------------------------------------------- example level


@dataclasses.dataclass(frozen=True, eq=False)
class SampleLevelDpSgd:
    """DP-SGD inside each client; per-client parameters are arrays [C].

    Attributes:
      noise_multipliers: z_i (noise std / per-example clip norm), float64 [C]; 0 = not private.
      poisson: True for Poisson example sampling, False for fixed-size batches (one scheme for all clients).
      sample_rates: Poisson inclusion probability q_i per step (the client's data size is treated as public).
      batch_sizes: fixed batch b_i = min(batch_size, n_i) per step.
      counts: n_i, the clients' data sizes.
      mixup: clients that mix examples inside their DP-SGD batches (bool [C]).
      truncation_probabilities: per step, the probability that a Poisson batch overflows the static batch slots
        (charged to delta); 0 for fixed-size batches.
    """

    noise_multipliers: np.ndarray
    poisson: bool
    sample_rates: np.ndarray
    batch_sizes: np.ndarray
    counts: np.ndarray
    mixup: np.ndarray
    truncation_probabilities: np.ndarray

    @property
    def relation(self) -> str:
        return "add/remove one example" if self.poisson else "replace one example (data size fixed)"

    @property
    def sensitivities(self) -> np.ndarray:
        """L2 sensitivity of the clipped sum in units of the clip norm, per client: 1 (Poisson) or 2 (replace-one),
        3 / 4 with mixup."""
        base = 1.0 if self.poisson else 2.0
        return base + np.where(self.mixup, 2.0, 0.0)

    @property
    def private(self) -> np.ndarray:
        """Clients whose steps are private (z > 0)."""
        return self.noise_multipliers > 0

    def _event(self, noise_multiplier: float, sensitivity: float, rate: float, count: int, batch: int,
               amplified: bool) -> dp_accounting.DpEvent:
        gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / sensitivity)
        if not amplified:
            return gaussian
        if self.poisson:
            return gaussian if rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(rate, gaussian)
        return gaussian if batch >= count else dp_accounting.SampledWithoutReplacementDpEvent(count, batch, gaussian)

    def step_event(self, client: int, noise_multiplier: float | None = None,
                   amplified: bool = True) -> dp_accounting.DpEvent:
        """One local step of ``client`` (with its own noise multiplier unless one is given); ``amplified=False``:
        the same Gaussian without amplification by example sampling."""
        z = float(self.noise_multipliers[client] if noise_multiplier is None else noise_multiplier)
        sensitivity = (1.0 if self.poisson else 2.0) + (2.0 if self.mixup[client] else 0.0)
        return self._event(z, sensitivity, float(self.sample_rates[client]), int(self.counts[client]),
                           int(self.batch_sizes[client]), amplified)

    def step_events(self, amplified: bool = True) -> tuple[list[dp_accounting.DpEvent], np.ndarray, np.ndarray]:
        """Distinct one-step events, each client's event index [C], and each event's truncation probability
        (one event per distinct (rate or data and batch size, noise, sensitivity), so 10^5 clients are cheap).
        The truncation applies with or without amplification: a batch truncated to its slots can drop an example
        when one is added, so both bounds are charged for it."""
        sensitivities = self.sensitivities
        columns = [self.noise_multipliers, sensitivities, self.sample_rates, self.counts, self.batch_sizes]
        rows, ids = np.unique(np.stack(columns, axis=1).astype(np.float64), axis=0, return_inverse=True)
        ids = np.reshape(ids, -1).astype(np.int64)
        events = [self._event(float(z), float(f), float(q), int(n), int(b), amplified) for z, f, q, n, b in rows]
        truncation = np.zeros(len(events))
        np.maximum.at(truncation, ids, self.truncation_probabilities)
        return events, ids, truncation

    def sampling(self, amplified: bool = True) -> str:
        if not amplified:
            return "none claimed: every local step treated as using the whole client dataset"
        if self.poisson:
            return ("Poisson example sampling in every local step (rate q_i = batch / n_i, n_i public), batches "
                    "truncated at the static batch slots with the truncation probability charged to delta; client "
                    "participation revealed, no amplification by client sampling")
        return ("fixed-size batches without replacement in every local step (sampled-without-replacement "
                "Gaussian); client participation revealed, no amplification by client sampling")

    def basis(self, accountant: str, delta: float, amplified: bool = True) -> EpsilonBasis:
        mix = "; mixup inside batches: sensitivity 3C / 4C" if bool(np.any(self.mixup & self.private)) else ""
        return EpsilonBasis("example", self.relation + mix, self.sampling(amplified), accountant, delta)

    @staticmethod
    def denominator(batch_size: jax.Array, count: jax.Array) -> jax.Array:
        """The denominator of a step, ``max(min(b, n), 1)``: the fixed batch, or under Poisson sampling at rate
        q = b / n the expected batch q n. It depends on the public batch size and data size only, never on
        which examples were sampled."""
        return jnp.maximum(jnp.minimum(batch_size, count).astype(jnp.float32), 1.0)

    @staticmethod
    def noisy_gradient(per_example_grads: PyTree, mask: jax.Array, clip_norm: jax.Array | float,
                       noise_multiplier: jax.Array | float, key: jax.Array,
                       denominator: jax.Array | float) -> PyTree:
        """(sum of clipped real per-example gradients + N(0, (z C)^2 I)) / denominator, for one client's step.

        Args:
          per_example_grads: pytree with leading batch axis B.
          mask: [B] bool, True for the sampled examples.
          clip_norm: traced scalar C (inf = no clipping, then z must be 0).
          noise_multiplier: traced scalar z (0 = no noise).
          key: PRNG key of the noise.
          denominator: traced scalar > 0 (``SampleLevelDpSgd.denominator``).
        """
        total = dp_ops.clipped_sum(per_example_grads, mask, clip_norm)
        return SampleLevelDpSgd.noised_mean(total, clip_norm, noise_multiplier, key, denominator)

    @staticmethod
    def noised_mean(clipped_sum: PyTree, clip_norm: jax.Array | float, noise_multiplier: jax.Array | float,
                    key: jax.Array, denominator: jax.Array | float) -> PyTree:
        """(``clipped_sum`` + N(0, (z C)^2 I)) / denominator: ``noisy_gradient`` from a sum of gradients each
        already clipped to ``clip_norm`` (local training forms it in one backward pass, ``client.local``)."""
        noise = dp_ops.gaussian_noise_like(key, clipped_sum, gaussian_std(noise_multiplier, clip_norm))
        denominator = jnp.asarray(denominator, jnp.float32)
        return jax.tree_util.tree_map(lambda s, n: (s + n) / denominator.astype(s.dtype), clipped_sum, noise)


def sample_level_dpsgd(noise_multipliers: np.ndarray, poisson: np.ndarray, sample_rates: np.ndarray,
                       batch_sizes: np.ndarray, counts: np.ndarray, mixup: np.ndarray,
                       truncation_probabilities: np.ndarray | None = None) -> SampleLevelDpSgd | None:
    """The example-level mechanism of a population, or None when no client adds noise.

    Raises ValueError when private clients mix Poisson and fixed-size sampling (different neighbouring
    relations cannot be compared in one guarantee).
    """
    z = np.asarray(noise_multipliers, np.float64)
    private = z > 0
    if not np.any(private):
        return None
    schemes = np.unique(np.asarray(poisson, bool)[private])
    if schemes.size > 1:
        raise ValueError("DP-SGD clients mix Poisson and fixed-size example sampling; their guarantees use "
                         "different neighbouring relations: give all DP clients the same client.sampling.")
    counts = np.asarray(counts, np.int64)
    truncation = (np.zeros(z.shape[0]) if truncation_probabilities is None
                  else np.asarray(truncation_probabilities, np.float64))
    return SampleLevelDpSgd(noise_multipliers=z, poisson=bool(schemes[0]),
                            sample_rates=np.asarray(sample_rates, np.float64),
                            batch_sizes=np.minimum(np.asarray(batch_sizes, np.int64), np.maximum(counts, 1)),
                            counts=counts, mixup=np.asarray(mixup, bool) & private,
                            truncation_probabilities=np.where(bool(schemes[0]), truncation, 0.0))


# ----------------------------------------------------------------------------- client level


@dataclasses.dataclass(frozen=True)
class ClientLevelDpFedAvg:
    """DP-FedAvg at the server: client-level clipping, central Gaussian noise, optional adaptive clipping.

    Hashable (all fields are numbers), so it can be part of a compiled round's static configuration.

    Attributes:
      noise_multiplier: z, noise std on the sum / clip norm (0 = clipping only, no guarantee).
      num_clients: C, the population size (public).
      expected_cohort: K, the fixed denominator (cohort size, or expected cohort size with Poisson sampling).
      poisson: Poisson client sampling (rate K / C) instead of a fixed-size cohort of K.
      adaptive_quantile: target quantile of the update norms (None = fixed clip norm).
      adaptive_lr: geometric step size of the clip norm.
      count_noise_std: sigma_b, std of the Gaussian noise on the count of unclipped updates (count units).
      cohort_truncation_probability: per round, the probability that a Poisson cohort overflows its static
        slots (charged to delta).
    """

    noise_multiplier: float
    num_clients: int
    expected_cohort: int
    poisson: bool
    adaptive_quantile: float | None = None
    adaptive_lr: float = 0.2
    count_noise_std: float = 0.0
    cohort_truncation_probability: float = 0.0

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def relation(self) -> str:
        return "add/remove one client" if self.poisson else "replace one client (population size fixed)"

    def effective_noise_multiplier(self) -> float:
        """The one Gaussian equivalent to the round's releases under the relation: the sum (sensitivity C, or
        2C replace-one) and, with adaptive clipping, the centred count (sensitivity 1/2, or 1 replace-one)."""
        if self.noise_multiplier <= 0:
            return 0.0
        scale = 1.0 if self.poisson else 2.0
        inverse_square = (self.noise_multiplier / scale) ** -2
        if self.adaptive_quantile is not None:
            if self.count_noise_std <= 0:
                return 0.0  # the count is released without noise: no guarantee
            inverse_square += (self.count_noise_std / (0.5 * scale)) ** -2
        return float(inverse_square ** -0.5)

    def round_event(self, amplified: bool = True) -> dp_accounting.DpEvent:
        """One round: the Gaussian, subsampled as the cohort is drawn (``amplified=False``: cohort revealed)."""
        gaussian = dp_accounting.GaussianDpEvent(self.effective_noise_multiplier())
        if not amplified or self.expected_cohort >= self.num_clients:
            return gaussian
        if self.poisson:
            return dp_accounting.PoissonSampledDpEvent(self.expected_cohort / self.num_clients, gaussian)
        return dp_accounting.SampledWithoutReplacementDpEvent(self.num_clients, self.expected_cohort, gaussian)

    def basis(self, accountant: str, delta: float, amplified: bool = True) -> EpsilonBasis:
        releases = "noisy clipped sum" + (" and noisy count of unclipped updates (adaptive clipping)"
                                          if self.adaptive_quantile is not None else "")
        if not amplified:
            sampling = "none claimed: cohort revealed, every round the client took part in composed"
        elif self.poisson:
            sampling = (f"Poisson client sampling at rate {self.expected_cohort}/{self.num_clients}, hidden from the "
                        "observer (trusted server or secure aggregation); cohort truncation charged to delta")
        else:
            sampling = (f"fixed cohort of {self.expected_cohort} of {self.num_clients} clients without replacement, "
                        "hidden from the observer (trusted server or secure aggregation)")
        return EpsilonBasis("client", f"{self.relation}; releases: {releases}", sampling, accountant, delta)

    # -- JAX steps (server side, inside the compiled round) --------------------------------------------------
    @staticmethod
    def clip(message: PyTree, norm: jax.Array, clip_norm: jax.Array) -> PyTree:
        """Scales one client's message (global L2 norm ``norm``) to norm at most ``clip_norm``."""
        scale = dp_ops.clip_scale(norm, clip_norm)
        return jax.tree_util.tree_map(lambda m: m * scale.astype(m.dtype), message)

    def noisy_mean(self, clipped_sum: PyTree, clip_norm: jax.Array, key: jax.Array) -> PyTree:
        """(sum + N(0, (z C)^2 I)) / K: the fixed denominator keeps one client's influence below C / K."""
        noise = dp_ops.gaussian_noise_like(key, clipped_sum, gaussian_std(self.noise_multiplier, clip_norm))
        denominator = jnp.float32(self.expected_cohort)
        return jax.tree_util.tree_map(lambda s, n: (s + n) / denominator, clipped_sum, noise)

    def next_clip_norm(self, clip_norm: jax.Array, norms: jax.Array, mask: jax.Array, key: jax.Array) -> jax.Array:
        """Adaptive clipping: ``b = (sum_i (1[norm_i <= C] - 1/2) + N(0, sigma_b^2)) / K + 1/2`` over the real
        participants, then ``C <- C exp(-lr (b - quantile))``. The denominator is the EXPECTED cohort K, so the
        released clip norm does not reveal the realised cohort size."""
        if self.adaptive_quantile is None:
            return clip_norm
        return dp_ops.adaptive_clip_update(clip_norm, norms, mask, self.adaptive_quantile, self.adaptive_lr,
                                           self.count_noise_std, key, expected_count=float(self.expected_cohort))


# ----------------------------------------------------------------------------- local


@dataclasses.dataclass(frozen=True, eq=False)
class LocalGaussian:
    """Local DP on each client's message: clip to C_i, add N(0, (z_i C_i)^2) on the device.

    Attributes:
      noise_multipliers: z_i, float64 [C] (0 = no local noise).
      clip_norms: C_i, float64 [C], the message clip the noise is scaled to.
    """

    noise_multipliers: np.ndarray
    clip_norms: np.ndarray

    relation = "any two datasets of the client (replace its data): clipped messages differ by at most 2C"

    @property
    def private(self) -> np.ndarray:
        return self.noise_multipliers > 0

    def noise_stds(self) -> np.ndarray:
        """Per-coordinate noise std z_i C_i of each client's messages, float64 [C] (0 without noise)."""
        return np.where(self.private, self.noise_multipliers * self.clip_norms, 0.0)

    def message_event(self, client: int) -> dp_accounting.DpEvent:
        """One message of ``client``: a Gaussian with multiplier z / 2 (sensitivity 2C)."""
        return dp_accounting.GaussianDpEvent(float(self.noise_multipliers[client]) / 2.0)

    def message_events(self) -> tuple[list[dp_accounting.DpEvent], np.ndarray]:
        """Distinct one-message events and each client's index among them [C]."""
        values, ids = np.unique(self.noise_multipliers, return_inverse=True)
        return [dp_accounting.GaussianDpEvent(float(z) / 2.0) for z in values], np.reshape(ids, -1).astype(np.int64)

    def basis(self, accountant: str, delta: float) -> EpsilonBasis:
        return EpsilonBasis("local", self.relation, "none claimed: every message the client sent is composed",
                            accountant, delta)

    @staticmethod
    def privatize(message: PyTree, key: jax.Array, clip_norm: jax.Array, noise_multiplier: jax.Array) -> PyTree:
        """Adds N(0, (z C)^2) to every coordinate of an already clipped message (z <= 0: unchanged)."""
        noise = dp_ops.gaussian_noise_like(key, message, gaussian_std(noise_multiplier, clip_norm))
        return jax.tree_util.tree_map(jnp.add, message, noise)


def local_gaussian(noise_multipliers: np.ndarray, clip_norms: np.ndarray) -> LocalGaussian | None:
    """The local mechanism of a population (per-client arrays [C]), or None when no client adds noise."""
    z = np.asarray(noise_multipliers, np.float64)
    return LocalGaussian(z, np.asarray(clip_norms, np.float64)) if np.any(z > 0) else None


def round_up_float32(values: np.ndarray) -> np.ndarray:
    """float32 values >= the float64 ones (a calibrated noise multiplier is never rounded down)."""
    values = np.asarray(values, np.float64)
    cast = values.astype(np.float32)
    below = cast.astype(np.float64) < values
    return np.where(below, np.nextafter(cast, np.float32(np.inf)), cast).astype(np.float32)


__all__ = ["ClientLevelDpFedAvg", "LocalGaussian", "SampleLevelDpSgd", "gaussian_std", "local_gaussian",
           "round_up_float32", "sample_level_dpsgd"]
