"""Epsilons of real runs: each mechanism accounted as it runs, with its basis; budgets kept; resume; taps only of
rounds a client took part in; bad privacy input rejected before training."""

import csv
import math
import warnings

import dp_accounting
import numpy as np
import pytest

from fedjaxpriv.config import from_dict
from fedjaxpriv.experiment import Experiment

BASE = {"data": {"num_clients": 10}, "model": {"hidden": [16]}, "server": {"clients_per_round": 5},
        "run": {"rounds": 3, "eval_every": 3, "checkpoint_every": 0}}
DELTA = 1e-5
Relation = dp_accounting.NeighboringRelation


def _config(**sections):
    raw = {k: dict(v) for k, v in BASE.items()}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw)


def _reference(event, relation=Relation.ADD_OR_REMOVE_ONE):
    return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation).compose(
        event).get_epsilon(DELTA)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_recorded_example_level_epsilon_is_the_event_that_ran(sampling, tmp_path):
    """Each client's epsilon equals dp_accounting on the event its local training runs: fixed-size batches of
    min(16, n_i) without replacement (replace-one, sensitivity 2C) or Poisson at rate 16 / n_i (add/remove)."""
    config = _config(client={"dp_clip_norm": 1.0, "dp_noise_multiplier": 1.5, "local_steps": 4,
                             "sampling": sampling})
    exp = Experiment(config)
    results = exp.run(str(tmp_path), progress=False)
    per_client = exp.privacy.per_client()
    counts = exp.population.counts
    for i in np.flatnonzero(per_client["participations"] > 0):
        steps = 4 * int(per_client["participations"][i])
        if sampling == "fixed":
            n, b = int(counts[i]), min(16, int(counts[i]))
            step = dp_accounting.SampledWithoutReplacementDpEvent(n, b, dp_accounting.GaussianDpEvent(0.75))
            expected = _reference(dp_accounting.SelfComposedDpEvent(step, steps), Relation.REPLACE_ONE)
        else:
            q = float(exp.settings.sample_rate[i])
            step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.5))
            expected = _reference(dp_accounting.SelfComposedDpEvent(step, steps))
        # Poisson batches charge their (< 1e-16 per step) truncation probability to delta: a 1e-6 relative effect.
        assert per_client["epsilon"][i] == pytest.approx(expected, rel=1e-9 if sampling == "fixed" else 1e-6)
    took_part = per_client["participations"] > 0
    assert results.final("epsilon_max") == pytest.approx(per_client["epsilon"][took_part].max(), rel=1e-12)
    basis = results.final("epsilon_basis")
    assert ("replace one example" in basis and "without replacement" in basis) if sampling == "fixed" else (
        "add/remove one example" in basis and "Poisson" in basis)
    assert "delta=1e-05" in basis and "RDP" in basis
    with open(tmp_path / "clients.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["epsilon_basis"] == basis and float(rows[0]["epsilon"]) == pytest.approx(per_client["epsilon"][0])
    # Results carries the same per-client columns as clients.csv.
    assert set(results.clients) == set(rows[0]) - {"client"}
    for i, row in enumerate(rows):
        assert results.clients["epsilon_basis"][i] == row["epsilon_basis"]
        assert results.clients["epsilon"][i] == pytest.approx(float(row["epsilon"]), rel=1e-12)
    np.testing.assert_array_equal(results.clients["local_steps"], 4 * results.clients["participations"])


def test_results_hold_every_clients_participations_and_steps_without_dp(tmp_path):
    """Without DP: 3 rounds of 5 of 10 clients, 2 local steps each; the per-client arrays add up to the cohorts
    the history records and are written to clients.csv."""
    results = Experiment(_config(client={"local_steps": 2})).run(str(tmp_path), progress=False)
    assert set(results.clients) == {"participations", "local_steps"}
    assert results.clients["participations"].sum() == 3 * 5 == sum(r["participants"] for r in results.history)
    np.testing.assert_array_equal(results.clients["local_steps"], 2 * results.clients["participations"])
    with open(tmp_path / "clients.csv") as f:
        assert [int(r["participations"]) for r in csv.DictReader(f)] == results.clients["participations"].tolist()


@pytest.mark.slow
def test_local_noise_gets_its_own_epsilon_per_client():
    config = _config(message={"clip_norm": 0.5, "local_noise_multiplier": [4.0, 0.0]})
    exp = Experiment(config)
    results = exp.run(progress=False)
    per_client = exp.privacy.per_client()
    for i in range(10):
        n = int(per_client["participations"][i])
        if i % 2 == 1 or n == 0:
            assert per_client["local_epsilon"][i] == (math.inf if n else 0.0)
            continue
        expected = _reference(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), n))
        assert per_client["local_epsilon"][i] == pytest.approx(expected, rel=1e-9)
    # The clients without noise took part, so the run's largest local epsilon is inf and its basis says why; the
    # mean is over the private participants.
    exposed = sum(1 for i in range(1, 10, 2) if per_client["participations"][i])
    assert exposed and results.final("local_epsilon_max") == math.inf
    assert results.final("local_nonprivate_participants") == exposed
    assert f"no guarantee: {exposed} participant(s) took part without noise" in results.final("local_epsilon_basis")
    assert results.final("local_epsilon_mean") == pytest.approx(
        np.mean([per_client["local_epsilon"][i] for i in range(0, 10, 2) if per_client["participations"][i]]))


@pytest.mark.slow
def test_targets_are_promises_at_full_participation():
    """Every client takes part every round (so it reaches its planned participations): each ends within 2% below
    its target; the stricter tier gets more noise."""
    config = _config(client={"dp_clip_norm": 1.0, "target_epsilon": [1.0, 4.0], "local_steps": 3},
                     server={"clients_per_round": 10}, run={"rounds": 4, "eval_every": 4})
    exp = Experiment(config)
    exp.run(progress=False)
    eps = exp.privacy.per_client()["epsilon"]
    targets = np.where(np.arange(10) % 2 == 0, 1.0, 4.0)
    assert np.all(exp.privacy.participations == 4)
    assert np.all(eps <= targets) and np.all(eps >= 0.98 * targets), eps
    sigma = exp.settings.dp_noise_multiplier
    assert np.all(sigma[0::2] > sigma[1::2])


@pytest.mark.slow
def test_a_spent_budget_keeps_the_client_out_of_later_rounds():
    config = _config(client={"dp_clip_norm": 1.0, "target_epsilon": 3.0, "local_steps": 2},
                     run={"rounds": 6, "eval_every": 6})
    exp = Experiment(config)
    plan = int(exp.participation_budget[0])
    assert np.all(exp.participation_budget == plan) and 3 <= plan <= 6
    budget = exp.parts.budget._replace(participation_budget=np.where(np.arange(10) < 5, 1, plan))
    exp.parts = exp.parts._replace(budget=budget)  # clients 0-4: one participation each
    with pytest.raises(AttributeError, match=r"parts\.budget\.participation_budget"):
        exp.participation_budget = budget.participation_budget  # one source: the parts
    results = exp.run(progress=False)
    assert np.all(exp.privacy.participations[:5] <= 1)
    assert sum(r.get("budget_skipped", 0) for r in results.history) > 0
    assert np.all(exp.privacy.per_client()["epsilon"] <= 3.0)


@pytest.mark.slow
def test_resumed_private_run_spends_exactly_what_an_uninterrupted_one_does(tmp_path):
    config = _config(client={"dp_clip_norm": 1.0, "dp_noise_multiplier": 1.2, "sampling": "poisson"},
                     message={"clip_norm": 1.0, "local_noise_multiplier": 3.0},
                     server={"client_sampling": "poisson", "central_clip_norm": 1.0, "central_noise_multiplier": 1.0,
                             "adaptive_clip_quantile": 0.5, "clip_count_noise_multiplier": 1.0},
                     run={"rounds": 5, "eval_every": 5, "checkpoint_every": 2, "delta": 1e-4})
    full = Experiment(config)
    full_results = full.run(str(tmp_path / "full"), progress=False)

    def stop_after_round_3(_, record):
        if record["round"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Experiment(config).run(str(tmp_path / "cut"), progress=False, callbacks=[stop_after_round_3])
    resumed = Experiment(config)
    resumed_results = resumed.run(str(tmp_path / "cut"), progress=False)
    np.testing.assert_array_equal(resumed.privacy.participations, full.privacy.participations)
    np.testing.assert_array_equal(resumed.privacy.dp_steps, full.privacy.dp_steps)
    assert resumed.privacy.rounds == full.privacy.rounds == 5
    for key in ("epsilon_max", "local_epsilon_max", "client_level_epsilon", "client_level_epsilon_unamplified"):
        assert [r[key] for r in resumed_results.history] == [r[key] for r in full_results.history], key


@pytest.mark.slow
def test_taps_hold_only_clients_that_took_part():
    config = _config(run={"rounds": 4, "eval_every": 4, "tap_rounds": [1, 2, 3, 4], "tap_clients": list(range(10))})
    exp = Experiment(config)
    results = exp.run(progress=False)
    for r, tap in results.taps.items():
        cohort = exp.cohort(r - 1)
        assert sorted(tap.client_ids.tolist()) == sorted(cohort.ids[cohort.mask].tolist())
        assert len(tap.client_ids) == 5


@pytest.mark.parametrize("override, field", [
    ({"run": {"accountant": "pld"}, "client": {"dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0}}, "run.accountant"),
    ({"run": {"accountant": "moments"}}, "run.accountant"),
    ({"run": {"delta": float("nan")}}, "run.delta"),
    ({"run": {"delta": -1e-5}}, "run.delta"),
    ({"client": {"dp_clip_norm": 1.0, "target_epsilon": -1.0}}, "client.target_epsilon"),
    ({"client": {"dp_noise_multiplier": float("nan"), "dp_clip_norm": 1.0}}, "client.dp_noise_multiplier"),
    ({"server": {"central_noise_multiplier": -1.0}}, "server.central_noise_multiplier"),
    ({"message": {"clip_norm": 1.0, "local_noise_multiplier": 1.0, "order": ["noise", "clip"]}}, "message.order"),
    ({"message": {"clip_norm": 1.0, "local_noise_multiplier": 1.0, "order": ["clip", "round", "noise"]},
      }, "message.order"),
    ({"client": {"dp_clip_norm": 1.0, "target_epsilon": 1e-7}, "run": {"rounds": 40}}, "client.target_epsilon"),
])
def test_bad_privacy_input_is_rejected_before_training_naming_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        Experiment(_config(**override))


def test_delta_above_one_over_n_or_c_warns_naming_it():
    with pytest.warns(UserWarning, match=r"run\.delta=0\.05 is >= 1/n"):
        Experiment(_config(client={"dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0}, run={"delta": 0.05}))
    with pytest.warns(UserWarning, match=r"run\.delta=0\.2 is >= 1/C"):
        Experiment(_config(server={"central_clip_norm": 1.0, "central_noise_multiplier": 1.0}, run={"delta": 0.2}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Experiment(_config(client={"dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0}))


@pytest.mark.slow
@pytest.mark.parametrize("server", [{"client_sampling": "uniform"},
                                    {"client_sampling": "poisson", "adaptive_clip_quantile": 0.5,
                                     "clip_count_noise_multiplier": 2.0}])
def test_client_level_target_is_met_within_two_percent(server):
    config = _config(server={"central_clip_norm": 1.0, "target_epsilon": 4.0, **server},
                     run={"rounds": 4, "eval_every": 4})
    results = Experiment(config).run(progress=False)
    assert 0.98 * 4.0 <= results.final("client_level_epsilon") <= 4.0
    with pytest.raises(ValueError, match=r"server\.central_noise_multiplier"):
        _config(server={"central_clip_norm": 1.0, "target_epsilon": 4.0, "central_noise_multiplier": 1.0})


@pytest.mark.parametrize("noise, finite_before", [(0.5, True), (0.3, False)])
def test_poisson_cohorts_at_small_noise_get_a_finite_client_level_epsilon(noise, finite_before):
    """DP-FedAvg with Poisson cohorts (rate 3/30, 20 rounds): the cohort slots are sized from delta, so the overflow
    charge takes at most 1 % of delta; the reported epsilon lies between dp_accounting's epsilon of the untruncated
    mechanism at delta and at 0.99 delta. At z = 0.3 (epsilon 56) the old 1e-16 tail per round gave inf."""
    rounds, rate = 20, 0.1
    config = from_dict({"data": {"num_clients": 30}, "model": {"hidden": [8]},
                        "server": {"clients_per_round": 3, "client_sampling": "poisson", "central_clip_norm": 1.0,
                                   "central_noise_multiplier": noise},
                        "run": {"rounds": rounds, "eval_every": rounds, "checkpoint_every": 0}})
    exp = Experiment(config)
    for r in range(rounds):
        cohort = exp.cohort(r)
        exp.privacy.record_round(cohort.ids[cohort.mask])
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), rounds)
    accountant = dp_accounting.rdp.RdpAccountant().compose(event)
    untruncated, with_charge = accountant.get_epsilon(DELTA), accountant.get_epsilon(0.99 * DELTA)
    assert untruncated <= exp.privacy.client_level_epsilon() <= with_charge
    old_charge = rounds * 1e-16 * (1 + math.exp(accountant.get_epsilon(DELTA / 2)))
    assert (old_charge <= DELTA / 2) == finite_before


def test_every_epsilon_in_history_and_clients_csv_has_a_basis_of_its_own_level(tmp_path):
    config = _config(client={"dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0},
                     message={"clip_norm": 1.0, "local_noise_multiplier": 1.0},
                     server={"central_clip_norm": 1.0, "central_noise_multiplier": 1.0})
    results = Experiment(config).run(str(tmp_path), progress=False)
    levels = {"epsilon": "example-level", "local_epsilon": "local (", "client_level_epsilon": "client-level"}

    def level_of(key):
        return levels[max((k for k in levels if key.startswith(k)), key=len)]

    last = results.history[-1]
    epsilons = [k for k in last if "epsilon" in k and not k.endswith("_basis")]
    assert len(epsilons) == 7
    for key in epsilons:
        basis = last[key.removesuffix("_max") + "_basis"]
        assert basis.startswith(level_of(key)), (key, basis)
    with open(tmp_path / "clients.csv") as f:
        rows = list(csv.DictReader(f))
    columns = [k for k in rows[0] if "epsilon" in k and not k.endswith("_basis")]
    assert len(columns) == 5
    for row in rows:
        for key in columns:
            assert row[f"{key}_basis"].startswith(level_of(key)), (key, row[f"{key}_basis"])


@pytest.mark.slow
def test_a_dp_run_that_learns_nothing_says_so_with_the_knobs_that_matter():
    """DP-SGD with noise 50 leaves the model at chance: the run warns, naming the figures and the knobs; with
    noise 0.3 it learns and says nothing."""
    from fedjaxpriv.evaluation import at_chance

    labels = np.r_[np.zeros(100), np.arange(400) % 9 + 1]  # majority 0.2 of 500: 3 standard errors = 0.0537
    assert at_chance(0.253, labels) == (True, 0.2) and at_chance(0.254, labels) == (False, 0.2)
    noisy = _config(client={"dp_clip_norm": 1.0, "dp_noise_multiplier": 50.0, "local_steps": 5, "lr": 0.5})
    with pytest.warns(UserWarning, match=r"is at chance .*DP-SGD with clip 1.0 and noise multipliers 50-50 "
                                         r"\(client.dp_clip_norm.*client.batch_size"):
        Experiment(noisy).run(progress=False)
    plain = _config(client={"dp_clip_norm": 1.0, "dp_noise_multiplier": 0.3, "local_steps": 20, "lr": 0.5},
                    run={"rounds": 6, "eval_every": 6})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert Experiment(plain).run(progress=False).final("test_accuracy") > 0.5


@pytest.mark.parametrize("change, message", [
    ({"client": {"dp_clip_norm": 1.0}}, r"client.dp_clip_norm=1.0 with no noise .*no example-level epsilon"),
    ({"server": {"clients_per_round": 5, "central_clip_norm": 2.0}},
     r"server.central_clip_norm=2.0 with no noise .*no client-level epsilon"),
])
def test_a_dp_clip_without_noise_says_it_gives_no_guarantee(change, message):
    with pytest.warns(UserWarning, match=message):
        experiment = Experiment(_config(**change))
    assert not [key for key in experiment.run(progress=False).history[-1] if "epsilon" in key]
