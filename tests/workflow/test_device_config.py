"""Devices from the config: the CLI/sweep path builds a DeviceExperiment whose cohorts exclude stragglers."""

import numpy as np
import pytest

from fedjaxpriv.config import with_overrides, ExperimentConfig
from fedjaxpriv.devices import DeviceExperiment, apply_policy
from fedjaxpriv.experiment import Experiment, build_experiment, client_settings


def _config(policy):
    return with_overrides(ExperimentConfig(), [
        f"devices.policy={policy}", "devices.round_deadline_s=0.5", "devices.jitter=0.3",
        "devices.train_memory_factor=40", "data.num_clients=20", "run.rounds=3", "run.eval_every=3"])


def test_none_builds_a_plain_experiment():
    assert type(build_experiment(with_overrides(ExperimentConfig(), ["data.num_clients=10"]))) is Experiment


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["uniform", "device_aware"])
def test_config_policy_sets_settings_and_removes_stragglers(policy):
    exp = build_experiment(_config(policy))
    assert isinstance(exp, DeviceExperiment) and exp.policy.kind == policy
    expected = apply_policy(exp.policy, exp.profiles, client_settings(exp.config, exp.population.counts),
                            exp.population.counts)
    for field in ("local_steps", "prune_sparsity", "quant_bits"):
        np.testing.assert_array_equal(getattr(exp.settings, field), getattr(expected, field))
    results = exp.run(progress=False)
    for r, record in enumerate(results.history):
        cohort = exp.cohort(r)
        assert not np.any(exp.stragglers[cohort.ids[cohort.mask]])
        assert record["participants"] == int(cohort.mask.sum())
        assert record["cost_wall_time_s"] <= exp.policy.round_deadline_s
    if policy == "uniform":
        assert exp.stragglers.any()  # the slow tiers cannot finish the config's 10 steps in 0.5 s


def test_bad_device_policy_is_named():
    with pytest.raises(ValueError, match="devices.policy"):
        with_overrides(ExperimentConfig(), ["devices.policy=fast"])


def test_custom_tiers_from_the_config():
    tiers = ("devices.tiers=[{name: slow, probability: 0.5, flops_per_s: 1.0e+6, memory_bytes: 1.0e+9, "
             "uplink_bps: 1.0e+9}, {name: fast, probability: 0.5, flops_per_s: 1.0e+12, memory_bytes: 1.0e+9, "
             "uplink_bps: 1.0e+9}]")
    config = with_overrides(_config("uniform"), [tiers, "devices.jitter=0"])
    exp = build_experiment(config)
    slow = exp.profiles.flops_per_s == 1e6
    assert set(np.unique(exp.profiles.flops_per_s)) == {1e6, 1e12}
    # 10 steps of batch 16 on a 1 MFLOP/s device take far longer than the 0.5 s deadline; on 1 TFLOP/s they fit.
    np.testing.assert_array_equal(exp.stragglers, slow)
    with pytest.raises(ValueError, match="sum of 1"):
        with_overrides(config, ["devices.tiers=[{name: a, probability: 0.4, flops_per_s: 1, memory_bytes: 1, "
                                "uplink_bps: 1}]"])
    with pytest.raises(ValueError, match="devices.tiers"):
        with_overrides(config, ["devices.tiers=[{name: a, probability: 1, speed: 3}]"])
