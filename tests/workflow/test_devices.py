"""Device profiles and policies: exact mappings, straggler and dropout statistics, exact costs."""

import dataclasses
import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from fedjaxpriv.client.settings import make_settings
from fedjaxpriv.devices import (DeviceTier, DevicePolicy, apply_policy, availability, profiles_from_tiers,
                                round_cost, sample_profiles, straggler_mask)

# P = 1000 parameters, 6000 FLOPs per example, batch 16: a local step costs 96 000 FLOPs.
SLOW = DeviceTier(name="slow", probability=0.5, flops_per_s=1.536e6, memory_bytes=4000.0, uplink_bps=8000.0,
                  joules_per_flop=1e-9, joules_per_bit=1e-6, dropout_prob=0.3, target_epsilon=2.0)
FAST = DeviceTier(name="fast", probability=0.5, flops_per_s=1e12, memory_bytes=1e9, uplink_bps=1e9,
                  joules_per_flop=2e-9, joules_per_bit=1e-8, dropout_prob=0.0)
COUNTS = np.array([64, 64])


def policy(**kwargs):
    return DevicePolicy(**{"num_params": 1000, "round_deadline_s": 10.0, "max_local_steps": 200, **kwargs})


def base_settings():
    return make_settings(2, COUNTS, local_steps=100, batch_size=16, lr=0.1)


def test_device_aware_policy_maps_a_known_device_exactly():
    profiles = profiles_from_tiers([SLOW, FAST], [0, 1])
    s = apply_policy(policy(), profiles, base_settings(), COUNTS)
    # steps: floor(8 s x 1.536e6 / 96 000) = 128; the fast device hits max_local_steps.
    assert s.local_steps.tolist() == [128, 200]
    # memory: training needs 4 x 4 B x 1000 = 16 000 B; 4000 B fit a quarter of the model.
    assert s.prune_sparsity.tolist() == [0.75, 0.0]
    # bits: floor(2 s x 8000 bit/s / 1000 params) = 16; the fast uplink sends float32 (0 = off).
    assert s.quant_bits.tolist() == [16, 0]
    # privacy: the slow tier needs epsilon 2 over 1 round of 128 fixed-size batches of 16 of its 64 examples
    # (sampled without replacement, replace-one: the Gaussian's multiplier is z / 2); the fast tier none.
    assert s.dp_noise_multiplier[1] == 0 and math.isinf(s.dp_clip_norm[1]) and s.dp_clip_norm[0] == 1.0
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
        64, 16, dp_accounting.GaussianDpEvent(float(s.dp_noise_multiplier[0]) / 2)), 128)
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    epsilon = accountant.compose(event).get_epsilon(1e-5)
    assert 0.98 * 2.0 <= epsilon <= 2.0
    assert s.lr.tolist() == base_settings().lr.tolist()  # fields the policy does not own are kept


def test_uniform_policy_keeps_settings_and_applies_the_strictest_privacy_target():
    profiles = profiles_from_tiers([SLOW, FAST], [0, 1])
    s = apply_policy(policy(kind="uniform"), profiles, base_settings(), COUNTS)
    assert s.local_steps.tolist() == [100, 100] and s.quant_bits.tolist() == [0, 0]
    assert s.prune_sparsity.tolist() == [0.0, 0.0]
    assert s.dp_noise_multiplier[0] == s.dp_noise_multiplier[1] > 0


def test_stragglers_drop_or_do_fewer_steps():
    profiles = profiles_from_tiers([SLOW, FAST], [0, 1])
    no_privacy = profiles._replace(target_epsilon=np.full(2, np.inf))
    dropped = apply_policy(policy(kind="uniform"), no_privacy, base_settings(), COUNTS)
    # slow: 100 steps x 0.0625 s + 32 000 bit / 8000 bit/s = 6.25 + 4 = 10.25 s > 10 s deadline.
    assert straggler_mask(policy(), no_privacy, dropped).tolist() == [True, False]
    fewer = apply_policy(policy(kind="uniform", stragglers="fewer_steps"), no_privacy, base_settings(), COUNTS)
    assert fewer.local_steps.tolist() == [96, 100]  # (10 - 4) s / 0.0625 s
    assert straggler_mask(policy(), no_privacy, fewer).tolist() == [False, False]
    hopeless = no_privacy._replace(uplink_bps=np.array([3000.0, 1e9]))  # upload alone takes 10.7 s
    none_fit = apply_policy(policy(kind="uniform", stragglers="fewer_steps"), hopeless, base_settings(), COUNTS)
    assert none_fit.local_steps.tolist() == [0, 100]
    assert straggler_mask(policy(), hopeless, none_fit).tolist() == [True, False]


def test_tier_frequencies_and_dropout_rate_are_right():
    n = 20000
    tiers = [dataclasses.replace(SLOW, probability=0.2), dataclasses.replace(FAST, probability=0.8)]
    profiles = sample_profiles(n, seed=3, tiers=tiers)
    counts = np.bincount(profiles.tier, minlength=2)
    assert stats.chisquare(counts, n * np.array([0.2, 0.8])).pvalue > 1e-4
    assert stats.chisquare(counts, n * np.array([0.3, 0.7])).pvalue < 1e-6  # a wrong mix is rejected
    slow = profiles.tier == 0
    away = np.stack([~availability(profiles, seed=0, round_index=r) for r in range(5)])
    rate = away[:, slow].mean()
    bound = 5 * math.sqrt(0.3 * 0.7 / away[:, slow].size)
    assert abs(rate - 0.3) < bound
    assert not away[:, ~slow].any()  # dropout_prob 0: always available
    # independent across rounds: P(away in both r0 and r1) = 0.09
    both = (away[0, slow] & away[1, slow]).mean()
    assert abs(both - 0.09) < 5 * math.sqrt(0.09 * 0.91 / slow.sum())


def test_jitter_spreads_devices_lognormally():
    profiles = sample_profiles(5000, seed=1, tiers=[dataclasses.replace(FAST, probability=1.0)], jitter=0.5)
    logs = np.log(profiles.flops_per_s / 1e12)
    assert stats.kstest(logs, "norm", args=(0, 0.5)).pvalue > 1e-4
    assert stats.kstest(logs, "norm", args=(0, 0.6)).pvalue < 1e-6


def test_round_cost_is_exact_on_a_known_case():
    profiles = profiles_from_tiers([SLOW, FAST], [0, 1])
    settings = make_settings(2, COUNTS, local_steps=[10, 20], batch_size=16, quant_bits=[8, 0])
    cost = round_cost(policy(), profiles, settings, np.array([True, True]))
    flops = np.array([10 * 16 * 6000.0, 20 * 16 * 6000.0])
    bits = np.array([8000.0, 32000.0])
    assert cost["cost_flops"] == flops.sum()
    assert cost["cost_upload_bits"] == bits.sum()
    assert cost["cost_energy_j"] == pytest.approx(flops[0] * 1e-9 + bits[0] * 1e-6 + flops[1] * 2e-9 + bits[1] * 1e-8,
                                                  rel=1e-12)
    slow_time = flops[0] / 1.536e6 + bits[0] / 8000.0  # 0.625 + 1 s
    assert cost["cost_wall_time_s"] == pytest.approx(slow_time, rel=1e-12)
    # the history's bytes rescale the estimates; a non-participant costs nothing
    scaled = round_cost(policy(), profiles, settings, np.array([0]), bytes_total=2000.0)
    assert scaled["cost_upload_bits"] == 16000.0 and scaled["cost_flops"] == flops[0]
    assert scaled["cost_wall_time_s"] == pytest.approx(0.625 + 2.0, rel=1e-12)
    assert round_cost(policy(), profiles, settings, np.array([False, False]))["cost_wall_time_s"] == 0.0


def test_bad_tiers_and_policies_are_rejected():
    with pytest.raises(ValueError, match="sum to"):
        sample_profiles(10, 0, tiers=[SLOW])
    with pytest.raises(ValueError, match="uplink_bps"):
        DeviceTier(name="x", probability=1.0, flops_per_s=1.0, memory_bytes=1.0, uplink_bps=0.0)
    with pytest.raises(ValueError, match="DevicePolicy.kind"):
        policy(kind="greedy")
    with pytest.raises(ValueError, match="2 clients"):
        apply_policy(policy(), sample_profiles(3, 0), base_settings(), COUNTS)


@pytest.mark.parametrize("stragglers, hint", [("drop", True), ("fewer_steps", False)])
def test_a_deadline_no_client_meets_is_refused_before_training(stragglers, hint):
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.experiment import build_experiment

    config = from_dict({"data": {"num_clients": 10}, "model": {"hidden": [8]}, "server": {"clients_per_round": 5},
                        "devices": {"policy": "uniform", "round_deadline_s": 1e-9, "stragglers": stragglers}})
    with pytest.raises(ValueError, match=r"devices.round_deadline_s=1e-09 is met by no client .*no round would have "
                                         r"a participant; raise devices.round_deadline_s") as error:
        build_experiment(config)
    assert ("fewer_steps" in str(error.value)) == hint
