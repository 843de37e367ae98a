"""Each reported epsilon is the smaller of the valid bounds the tracker computes (amplified, unamplified), with the
basis of the one chosen, checked against dp_accounting's RDP accountant at the same orders."""

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp as dp_rdp

from fedjaxpriv.privacy.mechanisms import ClientLevelDpFedAvg, sample_level_dpsgd
from fedjaxpriv.privacy.tracking import PrivacyTracker

Relation = dp_accounting.NeighboringRelation
DELTA = 1e-5


def _reference(event, count, relation) -> float:
    accountant = dp_rdp.RdpAccountant(neighboring_relation=relation)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, count))
    return accountant.get_epsilon(DELTA)


def test_example_level_reports_the_unamplified_bound_where_it_is_smaller():
    """Fixed-size batches of 3 of 4 examples: the sampled-without-replacement bound (85-ish) is looser than the
    plain Gaussian's; client 1 (batch 1 of 400) is the other way round. Each gets its smaller bound and its basis."""
    counts, batches, z, steps = np.array([4, 400]), np.array([3, 1]), 1.0, 200
    mechanism = sample_level_dpsgd(np.full(2, z), np.zeros(2, bool), batches / counts, batches, counts,
                                   np.zeros(2, bool))
    tracker = PrivacyTracker(num_clients=2, steps_per_round=np.full(2, steps), delta=DELTA, sample_level=mechanism)
    tracker.record_round(np.array([0, 1]))
    gaussian = dp_accounting.GaussianDpEvent(z / 2)  # replace-one: the clipped sum moves by 2C
    plain = _reference(gaussian, steps, Relation.REPLACE_ONE)
    amplified = [_reference(dp_accounting.SampledWithoutReplacementDpEvent(int(n), int(b), gaussian), steps,
                            Relation.REPLACE_ONE) for n, b in zip(counts, batches)]
    assert amplified[0] > plain > amplified[1]  # the setup has one client on each side
    np.testing.assert_allclose(tracker.example_epsilons(), [plain, amplified[1]], rtol=1e-9)
    np.testing.assert_allclose(tracker.example_epsilons(amplified=True), amplified, rtol=1e-9)
    rows = tracker.per_client()
    assert "none claimed" in rows["epsilon_basis"][0] and "without replacement" in rows["epsilon_basis"][1]
    summary = tracker.summary()
    assert summary["epsilon_max"] == pytest.approx(plain, rel=1e-9)
    assert summary["epsilon_basis"] == rows["epsilon_basis"][0]
    assert summary["epsilon_mean_basis"].startswith("mean over clients of the smaller of two bounds")


def test_client_level_reports_the_unamplified_bound_for_a_client_that_took_part_rarely():
    """DP-FedAvg, fixed cohort of 2 of 10 clients over 30 rounds: a client that took part once is better described
    by its one round; one that took part in all 30 keeps the amplified bound (smaller than its 30 plain rounds)."""
    mechanism = ClientLevelDpFedAvg(noise_multiplier=4.0, num_clients=10, expected_cohort=2, poisson=False)
    tracker = PrivacyTracker(num_clients=10, steps_per_round=np.ones(10, np.int64), delta=DELTA,
                             client_level=mechanism)
    for t in range(30):
        tracker.record_round(np.array([0, 1] if t == 0 else [1, 2 + t % 8]))
    gaussian = dp_accounting.GaussianDpEvent(4.0 / 2)
    amplified = _reference(dp_accounting.SampledWithoutReplacementDpEvent(10, 2, gaussian), 30, Relation.REPLACE_ONE)
    plain = [_reference(gaussian, n, Relation.REPLACE_ONE) for n in (1, 30)]
    assert plain[0] < amplified < plain[1]
    eps = tracker.client_level_epsilons()
    np.testing.assert_allclose(eps[:2], [plain[0], amplified], rtol=1e-9)
    assert np.all(eps[2:] < amplified)  # each of the others took part in 3 or 4 rounds
    assert tracker.client_level_epsilon() == pytest.approx(amplified, rel=1e-9)
    rows = tracker.per_client()
    assert "none claimed" in rows["client_level_epsilon_basis"][0]
    assert "fixed cohort" in rows["client_level_epsilon_basis"][1]
    assert tracker.summary()["client_level_epsilon_basis"] == rows["client_level_epsilon_basis"][1]


def _poisson_tracker(slots_fn, z: float, steps: int):
    from fedjaxpriv.client.settings import make_settings
    from fedjaxpriv.privacy.tracking import dpsgd_mechanism

    counts = np.array([64, 200])
    settings = make_settings(2, counts, local_steps=steps, batch_size=16, poisson=True, dp_clip_norm=1.0,
                             dp_noise_multiplier=z)
    slots = slots_fn(settings, counts)
    mechanism = dpsgd_mechanism(settings, counts, slots)
    tracker = PrivacyTracker(num_clients=2, steps_per_round=settings.local_steps, delta=DELTA, sample_level=mechanism)
    tracker.record_round(np.array([0, 1]))
    return tracker, slots, settings


def test_poisson_dpsgd_at_a_small_noise_multiplier_gets_a_finite_sound_epsilon():
    """sigma 0.5, 50 Poisson steps at q = 16/64 and 16/200: with slots at the fixed 1e-16 overflow tail the
    charge n p (1 + e^eps) exceeds delta (epsilon inf); slots sized from delta give an epsilon between the
    untruncated mechanism's at delta (dp_accounting) and at 0.99 delta (the charge takes at most 1 %)."""
    from fedjaxpriv.client.sampling import batch_slots
    from fedjaxpriv.privacy.tracking import dp_batch_slots

    z, steps = 0.5, 50
    fixed, default_slots, _ = _poisson_tracker(
        lambda s, c: batch_slots(s, c, np.asarray(s.dp_noise_multiplier) > 0), z, steps)
    assert np.all(np.isinf(fixed.example_epsilons(amplified=True)))
    sized, slots, settings = _poisson_tracker(
        lambda s, c: dp_batch_slots(s, c, planned_steps=np.full(2, steps), delta=DELTA), z, steps)
    assert default_slots < slots < 201  # more slots, though fewer than the whole larger client
    for client, n in enumerate((64, 200)):
        event = dp_accounting.PoissonSampledDpEvent(16 / n, dp_accounting.GaussianDpEvent(z))
        accountant = dp_rdp.RdpAccountant()
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        low, high = accountant.get_epsilon(DELTA), accountant.get_epsilon(0.99 * DELTA)
        assert low * (1 - 1e-7) <= sized.example_epsilons(amplified=True)[client] <= high  # RDP sums: 1e-8 rel.
        assert np.isfinite(low) and low > 10  # a regime where e^eps matters


def test_the_unamplified_poisson_bound_is_charged_for_truncation_too():
    """A batch truncated to its slots can drop an example when one is added, so the plain Gaussian bound pays the
    same n p (1 + e^eps(delta / 2)) as the amplified one: computed here with dp_accounting."""
    z, steps, p = 10.0, 200, 1e-12
    mechanism = sample_level_dpsgd(np.array([z]), np.array([True]), np.array([0.05]), np.array([8]),
                                   np.array([160]), np.array([False]), np.array([p]))
    tracker = PrivacyTracker(num_clients=1, steps_per_round=np.array([steps]), delta=DELTA, sample_level=mechanism)
    tracker.record_round(np.array([0]))
    gaussian = dp_accounting.GaussianDpEvent(z)

    def plain(delta):
        accountant = dp_rdp.RdpAccountant()
        accountant.compose(dp_accounting.SelfComposedDpEvent(gaussian, steps))
        return accountant.get_epsilon(delta)

    charge = steps * p * (1 + np.exp(plain(DELTA / 2)))
    assert charge > 1e-3 * DELTA  # large enough to move the epsilon
    reported = tracker.example_epsilons(amplified=False)[0]
    assert reported == pytest.approx(plain(DELTA - charge), rel=1e-8)
    assert reported > plain(DELTA) * (1 + 1e-6)


def test_a_participant_without_noise_makes_the_largest_epsilon_infinite():
    """Two tiers, DP-SGD with noise 1 and without noise: once a noiseless client takes part the run's largest
    example-level epsilon is inf, its basis says why, and the mean stays over the private participants."""
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.experiment import Experiment

    config = from_dict({"data": {"num_clients": 4}, "model": {"hidden": [8]},
                        "client": {"dp_clip_norm": 1.0, "dp_noise_multiplier": [1.0, 0.0]},
                        "server": {"clients_per_round": 4}, "run": {"rounds": 1, "checkpoint_every": 0}})
    exp = Experiment(config)
    exp.privacy.record_round(np.array([0, 2]))  # private clients only
    private_only = exp.privacy.summary()
    assert 0 < private_only["epsilon_max"] < np.inf and private_only["nonprivate_participants"] == 0
    exp.privacy.record_round(np.array([1]))
    summary = exp.privacy.summary()
    assert summary["epsilon_max"] == np.inf == summary["epsilon_unamplified_max"]
    assert summary["nonprivate_participants"] == 1
    assert summary["epsilon_basis"].startswith("example-level") and "no guarantee: 1 participant(s)" in \
        summary["epsilon_basis"]
    assert summary["epsilon_mean"] == pytest.approx(exp.privacy.example_epsilons()[[0, 2]].mean())


def test_each_clients_basis_is_its_own_in_a_run_with_clients_without_noise():
    """clients.csv: a private client keeps its mechanism's basis even when a client without noise took part; the
    client without noise (epsilon inf) says it has no guarantee."""
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.experiment import Experiment

    config = from_dict({"data": {"num_clients": 4}, "model": {"hidden": [8]},
                        "client": {"dp_clip_norm": 1.0, "dp_noise_multiplier": [1.0, 0.0]},
                        "message": {"clip_norm": 1.0, "local_noise_multiplier": [2.0, 0.0]},
                        "server": {"clients_per_round": 4}, "run": {"rounds": 1, "checkpoint_every": 0}})
    exp = Experiment(config)
    exp.privacy.record_round(np.arange(4))
    per_client = exp.privacy.per_client()
    for key in ("epsilon_basis", "epsilon_unamplified_basis", "local_epsilon_basis"):
        private, noiseless = per_client[key][0], per_client[key][1]
        assert "neighbours:" in private and "no guarantee" not in private, (key, private)
        assert "no guarantee: this client takes part without noise" in noiseless, (key, noiseless)
    assert np.isinf(per_client["epsilon"][1]) and np.isfinite(per_client["epsilon"][0])
    assert np.isinf(per_client["local_epsilon"][1]) and np.isfinite(per_client["local_epsilon"][0])
