"""Canary audits of real runs: empirical lower bounds on epsilon beside the accountant's, for each mechanism.

One-run auditing (Steinke, Nasr, Jagielski 2023): m canary slots, each set by an independent fair coin S_i; the
run trains once; the auditor scores every canary from what the threat model lets it see and guesses S_i for the
most confident ones (it may abstain on the rest). For a mechanism that is (eps, delta)-DP with respect to
flipping one coin, the number of correct guesses is dominated as ``audit.one_run_p_value`` states, so
``audit.one_run_epsilon_lower_bound`` is a lower bound on eps with probability >= 1 - beta. Flipping a coin must
give neighbouring datasets under the mechanism's own relation:

* add/remove (Poisson sampling): S_i = 0 leaves the canary out (a client-level canary client keeps no data, so
  the population size, and with it every sampling rate, stays public and fixed);
* replace-one (fixed-size sampling, fixed cohorts, local DP): S_i = 0 puts the canary's alternative in its place
  (the same input with another label; for local DP the negated input with another label).

Levels audited, each against the epsilon the run's tracker reports for the audited clients:

* ``"example"``: canary examples in one client's data (DP-SGD); the observer sees the final global model and
  scores a canary by its loss (or the loss difference between the canary and its alternative).
* ``"local"``: m canary clients with one example each (local DP on messages); the server sees their messages
  and scores each canary by the Gaussian log-likelihood ratio of the two messages the client could have sent
  (computed exactly, with the round's keys, from the tapped server model).
* ``"client"``: m one-example canary clients (DP-FedAvg); the observer sees every round's global model and
  clip norm (what the client-level epsilon covers) and knows every client's data and local-training randomness,
  but not the cohorts nor the server's noise. Each round it recomputes the clipped update every client could
  send (a canary's with and without its canary) from the round's global model and regresses the model's change
  on them (least squares): without noise the change is exactly the sum of the cohort's updates, so the
  regression shows which version of each canary took part; a canary's score is its coefficient (in minus out)
  summed over rounds.

``max_certifiable_epsilon`` (every guess correct) is stated next to every result: an audit whose largest
certifiable epsilon is below the accountant's cannot refute it, whatever the accounting does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxpriv.attacks import audit, membership
from fedjaxpriv.client import dp
from fedjaxpriv.config import ExperimentConfig, with_overrides
from fedjaxpriv.data.federated import Dataset, FederatedData, from_client_lists

AUDIT_LEVELS = ("example", "local", "client")


@dataclasses.dataclass(frozen=True)
class CanaryAudit:
    """One-run audit of a training run.

    Attributes:
      level: "example", "local" or "client".
      empirical_epsilon: the lower bound (holds with probability >= 1 - beta).
      max_certifiable_epsilon: the bound if every guess were right: the most this audit could show.
      accountant_epsilon: the largest epsilon the run reports for the audited clients (inf without DP).
      basis: the basis of ``accountant_epsilon`` (empty without DP).
      num_canaries / num_guesses / num_correct: the audit's counts.
      test_accuracy: the audited model's accuracy.
    """

    level: str
    empirical_epsilon: float
    max_certifiable_epsilon: float
    accountant_epsilon: float
    basis: str
    num_canaries: int
    num_guesses: int
    num_correct: int
    test_accuracy: float

    @property
    def can_refute(self) -> bool:
        """True when a strong enough attack could have shown more than the accountant's epsilon."""
        return self.max_certifiable_epsilon > self.accountant_epsilon

    def describe(self) -> str:
        return (f"{self.level}-level canary audit: empirical epsilon >= {self.empirical_epsilon:.3f} "
                f"({self.num_correct}/{self.num_guesses} guesses right of {self.num_canaries} canaries; at most "
                f"{self.max_certifiable_epsilon:.3f} certifiable) vs accountant {self.accountant_epsilon:.3f}")


def max_certifiable_epsilon(num_canaries: int, num_guesses: int, beta: float = 0.05, delta: float = 0.0) -> float:
    """The one-run bound when all ``num_guesses`` guesses are right: the largest epsilon such an audit can show."""
    return audit.one_run_epsilon_lower_bound(num_canaries, num_guesses, num_guesses, beta, delta)


def make_canaries(seed: int, num_canaries: int, input_shape: tuple[int, ...], num_classes: int, low: float,
                  high: float) -> tuple[Dataset, np.ndarray]:
    """Uniform-noise canary inputs with uniform random labels, and for each an alternative label (never its own).

    Returns:
      (canaries with ``x`` [m, *input_shape] float32 and ``y`` [m] int32, alternative labels [m] int32).
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(low, high, (num_canaries, *input_shape)).astype(np.float32)
    y = rng.integers(0, num_classes, num_canaries).astype(np.int32)
    alternative = ((y + rng.integers(1, num_classes, num_canaries)) % num_classes).astype(np.int32)
    return Dataset(x, y), alternative


def _check(num_canaries: int, guess_fraction: float, beta: float) -> None:
    if num_canaries < 2:
        raise ValueError(f"num_canaries={num_canaries} must be >= 2.")
    if not 0 < guess_fraction <= 0.5:
        raise ValueError(f"guess_fraction={guess_fraction} must lie in (0, 0.5].")
    if not 0 < beta < 1:
        raise ValueError(f"beta={beta} must lie in (0, 1).")


def _one_run(scores: np.ndarray, coins: np.ndarray, observed: np.ndarray, guess_fraction: float, beta: float,
             delta: float) -> audit.OneRunAudit:
    """Guesses "in" for the top and "out" for the bottom ``guess_fraction`` of the observed canaries' scores."""
    m = coins.size
    k = max(1, int(guess_fraction * int(observed.sum())))
    found = audit.one_run_audit(scores[observed], coins[observed], k, k, beta=beta, delta=delta)
    return audit.OneRunAudit(audit.one_run_epsilon_lower_bound(m, found.num_guesses, found.num_correct, beta, delta),
                             found.num_guesses, found.num_correct)


def _draw(config: ExperimentConfig, num_canaries: int) -> tuple[Any, ...]:
    """(population, test, num_classes, canaries, alternative labels [m], coins [m] bool) of an audit."""
    from fedjaxpriv.experiment import load_population

    population, test, num_classes = load_population(config)
    canaries, alternative = make_canaries(config.run.seed + 7919, num_canaries, population.input_shape, num_classes,
                                          float(population.x.min()), float(population.x.max()))
    coins = np.random.default_rng(config.run.seed + 104729).random(num_canaries) < 0.5
    return population, test, num_classes, canaries, alternative, coins


def _model_scores(apply_fn: Any, params: Any, canaries: Dataset, alternative: np.ndarray, replace: bool) -> np.ndarray:
    """Scores from a released model: minus the canary's loss, plus the alternative's loss under replace-one."""
    scores = membership.loss_threshold_scores(apply_fn, params, canaries.x, canaries.y)
    if replace:
        scores = scores - membership.loss_threshold_scores(apply_fn, params, canaries.x, alternative)
    return np.asarray(scores)


def _with_canary_clients(population: FederatedData, xs: list[np.ndarray], ys: list[np.ndarray]) -> FederatedData:
    lists_x = [population.client(c).x for c in range(population.num_clients)] + xs
    lists_y = [population.client(c).y for c in range(population.num_clients)] + ys
    return from_client_lists(lists_x, lists_y)


def _grown_population(config: ExperimentConfig, num_clients: int) -> list[str]:
    """Overrides for a population grown to ``num_clients`` (canary clients added) at the config's sampling rate."""
    rate = config.server.clients_per_round / config.data.num_clients
    return [f"data.num_clients={num_clients}", f"server.clients_per_round={max(1, round(rate * num_clients))}"]


def _flat(tree: Any, rows: int) -> np.ndarray:
    """A pytree with leaves [rows, ...] as one float64 matrix [rows, total size]."""
    return np.concatenate([np.asarray(leaf, np.float64).reshape(rows, -1) for leaf in jax.tree_util.tree_leaves(tree)],
                          axis=1)


def _finish(level, experiment, test_accuracy, found, coins, accountant_epsilon, basis_key, beta, delta) -> CanaryAudit:
    basis = experiment.privacy.bases().get(basis_key, "")
    return CanaryAudit(level=level, empirical_epsilon=float(found.epsilon),
                       max_certifiable_epsilon=max_certifiable_epsilon(coins.size, found.num_guesses, beta, delta),
                       accountant_epsilon=float(accountant_epsilon), basis=basis, num_canaries=int(coins.size),
                       num_guesses=int(found.num_guesses), num_correct=int(found.num_correct),
                       test_accuracy=float(test_accuracy))


def audit_example_level(config: ExperimentConfig, *, num_canaries: int = 1000, client: int = 0,
                        guess_fraction: float = 0.1, beta: float = 0.05) -> CanaryAudit:
    """Audits DP-SGD: canary examples in ``client``'s data, scored on the final global model.

    With Poisson example sampling (add/remove) a canary is in or out; with fixed-size batches (replace-one) its
    slot holds the canary or its alternative label, so the client's data size never changes. The client's
    Poisson rate is fixed at batch / (n + m) whatever the coins, so the audited mechanism does not depend on them.
    """
    from fedjaxpriv.experiment import Experiment, client_settings

    _check(num_canaries, guess_fraction, beta)
    population, test, num_classes, canaries, alternative, coins = _draw(config, num_canaries)
    if not 0 <= client < population.num_clients:
        raise ValueError(f"client={client} is outside [0, {population.num_clients}).")
    replace = config.client.sampling != "poisson"
    own = population.client(client)
    if replace:
        extra = Dataset(canaries.x, np.where(coins, canaries.y, alternative))
    else:
        extra = Dataset(canaries.x[coins], canaries.y[coins])
    xs = [population.client(c).x for c in range(population.num_clients)]
    ys = [population.client(c).y for c in range(population.num_clients)]
    xs[client], ys[client] = np.concatenate([own.x, extra.x]), np.concatenate([own.y, extra.y])
    audited = from_client_lists(xs, ys)
    settings = client_settings(config, audited.counts)
    if not replace:
        rate = np.array(settings.sample_rate)
        rate[client] = min(1.0, float(settings.batch_size[client]) / (len(own.y) + num_canaries))
        settings = settings._replace(sample_rate=rate.astype(np.float32))
    # The config's data with canaries: the audit records the config.
    experiment = Experiment(config, population=audited, test=test, num_classes=num_classes, settings=settings,
                            data_from_config=True, progress=False)
    results = experiment.run(progress=False)
    scores = _model_scores(experiment.model.apply, results.params, canaries, alternative, replace)
    found = _one_run(scores, coins, np.ones(num_canaries, bool), guess_fraction, beta, config.run.delta)
    per_client = experiment.privacy.per_client()
    accountant = float(per_client["epsilon"][client]) if "epsilon" in per_client else np.inf
    return _finish("example", experiment, results.final("test_accuracy"), found, coins, accountant, "epsilon_basis",
                   beta, config.run.delta)


def audit_local_level(config: ExperimentConfig, *, num_canaries: int = 1000, guess_fraction: float = 0.1,
                      beta: float = 0.05) -> CanaryAudit:
    """Audits local DP on messages: ``num_canaries`` one-example canary clients join the population (sampled at the
    config's rate ``clients_per_round / num_clients``); each holds
    its canary or the alternative (negated input, another label). The server taps their messages in every round
    they take part in; two noiseless replays of the same rounds (same keys, same tapped server models) give the
    two messages each could have sent, and the score is the Gaussian log-likelihood ratio summed over its rounds.
    """
    from fedjaxpriv.experiment import Experiment

    _check(num_canaries, guess_fraction, beta)
    if config.message.error_feedback or config.server.algorithm == "scaffold":
        raise ValueError("message.error_feedback=True and server.algorithm='scaffold' cannot be audited here: the "
                         "audit replays each tapped message alone, and both make a message depend on the client's "
                         "earlier ones.")
    population, test, num_classes, canaries, alternative, coins = _draw(config, num_canaries)
    first = population.num_clients
    ids = list(range(first, first + num_canaries))
    options = {True: [(x[None], y[None]) for x, y in zip(canaries.x, canaries.y)],
               False: [(-x[None], a[None]) for x, a in zip(canaries.x, alternative)]}
    chosen = [options[bool(c)][i] for i, c in enumerate(coins)]
    audited_config = with_overrides(config, [*_grown_population(config, first + num_canaries),
                                             f"run.tap_clients={ids}",
                                             f"run.tap_rounds={list(range(1, config.run.rounds + 1))}"])

    def build(clients: list[tuple[np.ndarray, np.ndarray]], cfg: ExperimentConfig) -> Any:
        data = _with_canary_clients(population, [x for x, _ in clients], [y for _, y in clients])
        return Experiment(cfg, population=data, test=test, num_classes=num_classes, data_from_config=True,
                          progress=False)

    experiment = build(chosen, audited_config)
    results = experiment.run(progress=False)
    noiseless = with_overrides(audited_config, ["message.local_noise_multiplier=0.0"])
    replays = {side: build(options[side], noiseless) for side in (True, False)}
    noise_std = (experiment.local_dp.noise_stds() if experiment.local_dp is not None
                 else np.zeros(experiment.population.num_clients))
    scores, observed = np.zeros(num_canaries), np.zeros(num_canaries, bool)
    for round_number, tap in results.taps.items():
        state = experiment.program.init_state(tap.server_params, experiment.population.num_clients, round_number - 1)
        tapped = jnp.asarray(tap.client_ids)
        candidates = {side: replay.tap_fn(state, replay.device_population, replay.device_settings, tapped,
                                          replay.root_key) for side, replay in replays.items()}
        flat = {name: _flat(tree, len(tap.client_ids))
                for name, tree in (("sent", tap.messages), ("in", candidates[True]), ("out", candidates[False]))}
        variance = np.where(noise_std[tap.client_ids] > 0, noise_std[tap.client_ids] ** 2, 1.0)  # no noise: distances
        log_ratio = (np.sum(flat["sent"] * (flat["in"] - flat["out"]), axis=1)
                     - 0.5 * (np.sum(flat["in"] ** 2, axis=1) - np.sum(flat["out"] ** 2, axis=1))) / variance
        canary = np.asarray(tap.client_ids) - first
        scores[canary] += log_ratio
        observed[canary] = True
    if not np.any(observed):
        raise ValueError("no canary client took part in any round: raise server.clients_per_round or run.rounds.")
    found = _one_run(scores, coins, observed, guess_fraction, beta, config.run.delta)
    per_client = experiment.privacy.per_client()
    accountant = (float(np.max(per_client["local_epsilon"][first:][observed])) if "local_epsilon" in per_client
                  else np.inf)
    return _finish("local", experiment, results.final("test_accuracy"), found, coins, accountant,
                   "local_epsilon_basis", beta, config.run.delta)


def _clipped(updates: np.ndarray, clip_norm: float) -> np.ndarray:
    """Each row scaled to norm at most ``clip_norm`` by the library's own clip (``client.dp.clip_scale``, as
    DP-FedAvg's server applies it): [N, P] -> [N, P]."""
    scale = np.asarray(dp.clip_scale(jnp.asarray(np.linalg.norm(updates, axis=1)), clip_norm), np.float64)
    return updates * scale[:, None]


# Largest regression (model parameters x candidate updates) solved by least squares; larger audits score each
# canary by the inner product of the model's change with its update difference instead.
_REGRESSION_ELEMENTS = 1 << 25


def _round_scores(change: np.ndarray, known: np.ndarray, inside: np.ndarray, outside: np.ndarray | None,
                  ridge: float) -> np.ndarray:
    """One round's canary scores: coefficients (in minus out) of the change of the clipped-update sum [P]
    regressed on the known clients' updates [N, P] and the canaries' two candidate updates [m, P] each (``outside``
    None: an absent canary sends nothing); the inner product with the difference when the regression is too large.

    ``ridge`` = noise variance / prior variance of a coefficient: 0 (no noise) is least squares; with noise the
    ridge estimate keeps the noise from being amplified along the updates' near-dependent directions.
    """
    design = np.concatenate([known, inside] + ([] if outside is None else [outside]), axis=0)   # [N + m (+ m), P]
    m = inside.shape[0]
    if design.size > _REGRESSION_ELEMENTS:
        difference = inside if outside is None else inside - outside
        return difference @ change
    if ridge > 0:
        gram = design @ design.T
        gram[np.diag_indices_from(gram)] += ridge
        coefficients = np.linalg.solve(gram, design @ change)
    else:
        coefficients = np.linalg.lstsq(design.T, change, rcond=None)[0]
    start = known.shape[0]
    score = coefficients[start:start + m]
    return score if outside is None else score - coefficients[start + m:]


def audit_client_level(config: ExperimentConfig, *, num_canaries: int = 1000, guess_fraction: float = 0.1,
                       beta: float = 0.05) -> CanaryAudit:
    """Audits DP-FedAvg: ``num_canaries`` one-example canary clients join the population (sampled at the config's
    rate). With Poisson client sampling (add/remove) an absent canary client keeps no data; with a fixed cohort
    (replace-one) it holds the alternative label. Scored from every round's global model by regressing its change
    on the updates the clients could have sent (module docstring)."""
    from fedjaxpriv.experiment import Experiment

    _check(num_canaries, guess_fraction, beta)
    s = config.server
    if config.message.error_feedback or s.algorithm not in ("fedavg", "fedprox", "fedsgd") or s.optimizer != "sgd":
        raise ValueError(f"server.algorithm={s.algorithm!r}, server.optimizer={s.optimizer!r}, message.error_feedback="
                         f"{config.message.error_feedback} cannot be audited at client level; allowed: fedavg, fedprox "
                         "or fedsgd with the sgd server optimizer and no error feedback (the audit replays each "
                         "round's updates from the global model alone and reads the model's change as their sum).")
    population, test, num_classes, canaries, alternative, coins = _draw(config, num_canaries)
    replace = config.server.client_sampling != "poisson"
    first = population.num_clients
    empty_x = np.zeros((0, *population.input_shape), np.float32)
    options = {True: ([x[None] for x in canaries.x], [y[None] for y in canaries.y]),
               False: ([x[None] for x in canaries.x], [a[None] for a in alternative]) if replace
               else ([empty_x] * num_canaries, [np.zeros(0, np.int32)] * num_canaries)}
    chosen = tuple([options[bool(c)][part][i] for i, c in enumerate(coins)] for part in (0, 1))
    audited_config = with_overrides(config, _grown_population(config, first + num_canaries))

    def build(clients: tuple[list[np.ndarray], list[np.ndarray]]) -> Any:
        return Experiment(audited_config, population=_with_canary_clients(population, *clients), test=test,
                          num_classes=num_classes, data_from_config=True, progress=False)

    experiment = build(chosen)
    replays = {side: build(options[side]) for side in ((True, False) if replace else (True,))}
    known_ids, canary_ids = jnp.arange(first), jnp.arange(first, first + num_canaries)

    def updates(run: Any, state: Any, ids: jax.Array) -> np.ndarray:
        messages = run.tap_fn(state, run.device_population, run.device_settings, ids, run.root_key)
        return _clipped(_flat(messages, int(ids.size)), float(state.clip_norm))

    mechanism = experiment.client_level
    rate = audited_config.server.clients_per_round / experiment.population.num_clients
    state = experiment.initial_state
    scores = np.zeros(num_canaries)
    for round_index in range(config.run.rounds):
        before, clip_norm = _flat(state.params, 1)[0], float(state.clip_norm)
        known = updates(experiment, state, known_ids)
        inside = updates(replays[True], state, canary_ids)
        outside = updates(replays[False], state, canary_ids) if replace else None
        state, _ = experiment.step(state, round_index)
        # With client-level clipping the server's mean is (clipped sum + N(0, (z C)^2)) / K, K the expected cohort.
        denominator = mechanism.expected_cohort if mechanism is not None else 1.0
        noise_std = mechanism.noise_multiplier * clip_norm if mechanism is not None else 0.0
        change = (_flat(state.params, 1)[0] - before) * denominator
        scores += _round_scores(change, known, inside, outside, noise_std**2 / (rate * (1.0 - rate) or 1.0))
    found = _one_run(scores, coins, np.ones(num_canaries, bool), guess_fraction, beta, config.run.delta)
    accountant = experiment.privacy.client_level_epsilon() if experiment.privacy.client_private else np.inf
    accuracy = float(experiment.evaluate(experiment.released_params(state), state)["test_accuracy"])
    return _finish("client", experiment, accuracy, found, coins, accountant, "client_level_epsilon_basis", beta,
                   config.run.delta)


def audit_canaries(config: ExperimentConfig, level: str = "example", **kwargs: Any) -> CanaryAudit:
    """The canary audit of ``level`` ("example", "local" or "client"); keyword arguments as in its function."""
    audits = {"example": audit_example_level, "local": audit_local_level, "client": audit_client_level}
    if level not in audits:
        raise ValueError(f"level={level!r} is not allowed: use one of {AUDIT_LEVELS}.")
    return audits[level](config, **kwargs)
