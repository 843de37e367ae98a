"""One name and one rule per knob, one list of names per concept: config knobs, ``ClientSettings`` fields,
message stages, topologies and server optimizers agree."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv.client.settings import NOT_SETTINGS, SETTING_KNOBS, ClientSettings, make_settings
from fedjaxpriv.config import STAGES, ClientConfig, ExperimentConfig, MessageConfig, with_overrides
from fedjaxpriv.experiment import configured_settings
from fedjaxpriv.transforms.pipeline import message_pipeline, stage_transform

DERIVED = ("poisson", "sample_rate", "extra")  # settings fields that are not knobs of their own


def _per_client_knobs(config_class: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)
            if f.metadata.get("rule") is not None and f.metadata["rule"].shape == "per_client"}


def test_every_per_client_knob_is_the_settings_field_of_the_same_name_and_nothing_else_is():
    knobs = (_per_client_knobs(ClientConfig) | _per_client_knobs(MessageConfig)) - set(NOT_SETTINGS)
    assert set(SETTING_KNOBS) == knobs
    assert set(ClientSettings._fields) - set(DERIVED) == knobs


# A value other than the default for each knob, allowed by its rule (and, together, by the config's checks).
CHANGED = {"local_steps": 3, "batch_size": 7, "lr": 0.25, "prox_mu": 0.5, "mixup_alpha": 0.3, "prune_sparsity": 0.2,
           "dp_clip_norm": 1.5, "dp_noise_multiplier": 0.8, "sparsity": 0.1, "topk_fraction": 0.5,
           "randk_fraction": 0.75, "clip_norm": 2.0, "local_noise_multiplier": 0.4, "quant_bits": 4,
           "qsgd_levels": 6}


def test_configured_settings_carry_each_knob_under_its_own_name():
    assert set(CHANGED) == set(SETTING_KNOBS)
    overrides = {f"{SETTING_KNOBS[name][0]}.{name}": value for name, value in CHANGED.items()}
    config = with_overrides(ExperimentConfig(), {**overrides, "message.order": ["prune", "topk", "randk", "clip",
                                                                                "noise", "round", "qsgd"]})
    settings = configured_settings(config, np.array([20, 30]))
    for name, value in CHANGED.items():
        np.testing.assert_allclose(getattr(settings, name), [value, value], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("name", sorted(SETTING_KNOBS))
def test_a_value_the_config_refuses_the_settings_refuse_with_the_knobs_name(name):
    section, rule = SETTING_KNOBS[name]
    bad = rule.low if rule.low_open else rule.low - 1  # every per-client knob has a lower bound
    with pytest.raises(ValueError, match=f"{section}.{name}"):
        with_overrides(ExperimentConfig(), {f"{section}.{name}": bad})
    with pytest.raises(ValueError, match=f"{name}=.*{section}.{name}"):
        make_settings(2, np.array([10, 10]), **{name: bad})


def _message(key: jax.Array) -> dict:
    return {"w": jax.random.normal(key, (6, 5)), "b": jax.random.normal(jax.random.fold_in(key, 1), (5,))}


@pytest.mark.parametrize("stage", STAGES, ids=[stage.name for stage in STAGES])
def test_a_stage_at_an_off_value_sends_the_message_unchanged_and_is_left_out_of_the_pipeline(stage):
    message = _message(jax.random.key(0))
    for off in stage.off:
        fields = {stage.strengths[0]: off}
        if stage.name == "noise":
            fields["clip_norm"] = 1.0
        settings = make_settings(1, np.array([10]), **fields)
        row = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), settings)
        transform = stage_transform(stage)
        out, _, _ = transform.update(message, transform.init(message), jax.random.key(1), row)
        for name in message:
            np.testing.assert_array_equal(out[name], message[name], err_msg=f"{stage.name} at {off}")
        assert message_pipeline((stage.name,), settings)[1] == ()


@pytest.mark.parametrize("stage", STAGES, ids=[stage.name for stage in STAGES])
def test_a_stage_switched_on_changes_the_message_and_runs_in_the_pipeline(stage):
    message = _message(jax.random.key(2))
    on = {"sparsity": 0.5, "topk_fraction": 0.2, "randk_fraction": 0.2, "clip_norm": 0.5,
          "local_noise_multiplier": 1.0, "quant_bits": 2, "qsgd_levels": 2}
    fields = {stage.strengths[0]: on[stage.strengths[0]]}
    if stage.name == "noise":
        fields["clip_norm"] = 100.0  # the noise stage alone: it scales its noise to this clip
    settings = make_settings(1, np.array([10]), **fields)
    row = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), settings)
    transform = stage_transform(stage)
    out, _, _ = transform.update(message, transform.init(message), jax.random.key(3), row)
    changed = max(float(jnp.max(jnp.abs(out[name] - message[name]))) for name in message)
    assert changed > 1e-3, stage.name
    if stage.name != "noise":  # noise alone is refused by the pipeline (no clip before it)
        assert message_pipeline((stage.name,), settings)[1] == (stage.name,)


def test_each_name_the_config_allows_builds_the_part_of_that_name_and_no_other_name_does():
    """One list of names per concept: every topology and server optimizer the config accepts is built by that
    name, and a name outside the list is refused by the builder as by the config."""
    from fedjaxpriv.config import SERVER_OPTIMIZERS, TOPOLOGIES
    from fedjaxpriv.decentralized import topology_for
    from fedjaxpriv.server import server_optimizer

    for name in TOPOLOGIES:
        assert topology_for(name, 16, edge_probability=0.5).name == name
    params = {"w": jnp.ones(3)}
    steps = {name: server_optimizer(name, 0.5).update({"w": jnp.ones(3)}, server_optimizer(name, 0.5).init(params),
                                                      params)[0]["w"] for name in SERVER_OPTIMIZERS}
    np.testing.assert_allclose(steps["sgd"], -0.5)  # plain SGD: -lr g
    np.testing.assert_allclose(steps["momentum"], -0.5)  # the first momentum step is the SGD step
    np.testing.assert_allclose(steps["adam"], -0.5 / (1 + 1e-3), rtol=1e-6)  # the first Adam step: -lr g/(|g|+eps)
    for build, section, bad in ((lambda n: topology_for(n, 16), "topology.graph", "star"),
                                (lambda n: server_optimizer(n, 0.5), "server.optimizer", "lamb")):
        with pytest.raises(ValueError, match=repr(bad)):
            build(bad)
        with pytest.raises(ValueError, match=f"{section}='{bad}' is invalid"):
            with_overrides(ExperimentConfig(), {section: bad})
