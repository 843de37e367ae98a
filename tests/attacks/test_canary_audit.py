"""Canary audits of real runs, one per mechanism: the empirical lower bound stays at or below the epsilon the run
reports for the audited clients, in configurations where the audit could certify more than that epsilon
(``can_refute``), and the same audit without the defense certifies a clearly positive epsilon (it has power)."""

import numpy as np
import pytest
from scipy import special

from fedjaxpriv.attacks import canary_audit
from fedjaxpriv.config import from_dict

M = 1000  # canaries: with 10% guessed each side the audit can certify up to 4.17 at beta = 0.05, delta = 1e-5


def _example_config(sampling, rounds=4, local_steps=100, **client):
    return from_dict({"data": {"num_clients": 2, "partition": "iid"}, "model": {"hidden": [256]},
                      "client": {"local_steps": local_steps, "batch_size": 32, "lr": 0.5, "sampling": sampling,
                                 **client},
                      "server": {"clients_per_round": 2},
                      "run": {"rounds": rounds, "eval_every": rounds, "checkpoint_every": 0}})


def test_largest_certifiable_epsilon_is_the_all_correct_bound():
    assert canary_audit.max_certifiable_epsilon(M, 200, 0.05, 1e-5) == pytest.approx(4.166, abs=1e-3)
    # delta = 0: all r guesses right gives logit(beta^(1/r)); 40 guesses can never refute an epsilon above 2.55.
    assert canary_audit.max_certifiable_epsilon(200, 40, 0.05, 0.0) == pytest.approx(special.logit(0.05 ** (1 / 40)),
                                                                                     rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_example_level_audit_of_dpsgd_stays_below_the_clients_epsilon(sampling):
    """Canaries in client 0 (replace-one slots for fixed-size batches, in/out for Poisson), DP-SGD calibrated to
    epsilon 3 for that client over 2 rounds of 50 steps (fewer steps than the undefended run: less noise per
    step, the same guarantee); undefended, 4 rounds of 100 steps, the same audit certifies more than 1."""
    private = canary_audit.audit_example_level(
        _example_config(sampling, rounds=2, local_steps=50, dp_clip_norm=1.0, target_epsilon=3.0), num_canaries=M)
    assert 0.98 * 3.0 <= private.accountant_epsilon <= 3.0
    assert private.can_refute and private.empirical_epsilon <= private.accountant_epsilon, private.describe()
    assert ("replace one example" if sampling == "fixed" else "add/remove one example") in private.basis
    plain = canary_audit.audit_example_level(_example_config(sampling), num_canaries=M)
    assert plain.accountant_epsilon == np.inf and plain.empirical_epsilon > 1.0, plain.describe()


def _local_config(noise):
    return from_dict({"data": {"num_clients": 10, "partition": "iid"}, "model": {"hidden": [32]},
                      "client": {"local_steps": 1, "batch_size": 16, "lr": 0.5},
                      "message": {"clip_norm": 1.0, "local_noise_multiplier": noise},
                      "server": {"clients_per_round": 10}, "run": {"rounds": 1, "eval_every": 1, "checkpoint_every": 0}})


@pytest.mark.slow
def test_local_audit_of_message_noise_has_power_and_stays_below_the_local_epsilon():
    """1000 one-example canary clients, each message seen by the server and scored by the exact likelihood ratio
    of the two messages the client could have sent: noise z = 4 (epsilon 2.17 per message) leaves a positive but
    smaller bound; without noise every guess is right."""
    private = canary_audit.audit_local_level(_local_config(4.0), num_canaries=M)
    assert private.can_refute and 0.0 < private.empirical_epsilon <= private.accountant_epsilon, private.describe()
    assert "2C" in private.basis
    plain = canary_audit.audit_local_level(_local_config(0.0), num_canaries=M)
    assert plain.num_correct == plain.num_guesses and plain.empirical_epsilon == pytest.approx(
        plain.max_certifiable_epsilon)


def _client_config(noise, sampling="uniform", rounds=3):
    return from_dict({"data": {"num_clients": 10, "partition": "iid"}, "model": {"hidden": [32]},
                      "client": {"local_steps": 5, "batch_size": 16, "lr": 0.5},
                      "server": {"clients_per_round": 5, "central_clip_norm": 1.0, "central_noise_multiplier": noise,
                                 "client_sampling": sampling},
                      "run": {"rounds": rounds, "eval_every": rounds, "checkpoint_every": 0}})


@pytest.mark.slow
def test_client_level_audit_of_dpfedavg_could_refute_and_stays_below_the_client_level_epsilon():
    """Fixed cohorts (replace one client), 1000 one-example canary clients, 3 rounds: with z = 4 the audit stays
    below the reported epsilon (3.11), which its 1000 canaries could refute (they certify up to 4.17); that the
    same audit reads every guessed canary without noise is the next test's (at 200 canaries, 2 rounds)."""
    private = canary_audit.audit_client_level(_client_config(4.0), num_canaries=M)
    assert private.can_refute and private.empirical_epsilon <= private.accountant_epsilon, private.describe()
    assert private.max_certifiable_epsilon > 4 and "replace one client" in private.basis


@pytest.mark.slow
def test_client_level_audit_without_noise_reads_every_guessed_canary():
    """The fast version of the power check: 200 canary clients, 2 rounds, no noise: 40 of 40 guesses right, the
    most 200 canaries can certify (2.55)."""
    plain = canary_audit.audit_client_level(_client_config(0.0, rounds=2), num_canaries=200)
    assert plain.num_correct == plain.num_guesses == 40, plain.describe()
    assert plain.empirical_epsilon == pytest.approx(canary_audit.max_certifiable_epsilon(200, 40, 0.05, 1e-5))


@pytest.mark.slow
def test_client_level_audit_with_poisson_cohorts_has_power_and_stays_below_the_client_level_epsilon():
    """Poisson cohorts (add/remove one client; an absent canary client holds no data): with z = 3 the audit stays
    below the reported epsilon (1.45); without noise it certifies more than 2 (a canary that was never sampled
    looks absent, so some "out" guesses are wrong)."""
    private = canary_audit.audit_client_level(_client_config(3.0, "poisson"), num_canaries=M)
    assert private.can_refute and private.empirical_epsilon <= private.accountant_epsilon, private.describe()
    assert "add/remove one client" in private.basis
    plain = canary_audit.audit_client_level(_client_config(0.0, "poisson"), num_canaries=M)
    assert plain.accountant_epsilon == np.inf and plain.empirical_epsilon > 2.0, plain.describe()


def test_client_level_audit_refuses_what_it_cannot_replay():
    config = from_dict({"server": {"central_clip_norm": 1.0, "optimizer": "adam"}})
    with pytest.raises(ValueError, match="server.optimizer='adam'.*allowed: fedavg, fedprox or fedsgd with the sgd"):
        canary_audit.audit_client_level(config, num_canaries=10)


def test_audit_arguments_are_checked():
    with pytest.raises(ValueError, match="level"):
        canary_audit.audit_canaries(_local_config(1.0), level="server")
    with pytest.raises(ValueError, match="guess_fraction"):
        canary_audit.audit_local_level(_local_config(1.0), guess_fraction=0.7)


@pytest.mark.slow
def test_audit_command_writes_what_it_prints_and_the_audited_config(tmp_path, capsys):
    import json

    from fedjaxpriv import cli
    from fedjaxpriv.config import load_config

    args = ["--set", "data.num_clients=10", "--set", "data.partition=iid", "--set", "model.hidden=[32]",
            "--set", "client.local_steps=1", "--set", "message.clip_norm=1.0", "--set",
            "message.local_noise_multiplier=4.0", "--set", "server.clients_per_round=10", "--set", "run.rounds=1"]
    assert cli.main(["audit", "--level", "local", "--canaries", "200", "--out", str(tmp_path), *args]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "audit.json").read_text()) == printed
    assert printed["empirical_epsilon"] <= printed["accountant_epsilon"] and printed["num_canaries"] == 200
    config = load_config(str(tmp_path / "config.json"))
    assert config.message.local_noise_multiplier == 4.0 and config.data.num_clients == 10
