"""Extending a finished run to more rounds (``Experiment.run(extend=True)``, ``fedjaxpriv run --continue``): the
result equals a run planned that long wherever nothing depended on the planned number of rounds, and is refused,
naming the field, where something did."""

import json

import jax
import numpy as np
import pytest

from fedjaxpriv import cli
from fedjaxpriv.config import from_dict
from fedjaxpriv.experiment import Experiment

BASE = {"data": {"num_clients": 8}, "model": {"hidden": [16]}, "server": {"clients_per_round": 4},
        "client": {"local_steps": 3, "dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0},
        "run": {"eval_every": 2, "checkpoint_every": 1}}


def _config(rounds, **client):
    return from_dict({**BASE, "client": {**BASE["client"], **client}, "run": {**BASE["run"], "rounds": rounds}})


@pytest.mark.slow
def test_an_extended_run_equals_the_longer_run(tmp_path):
    """3 rounds, then extended to 5: the same model bit for bit, the same training and privacy figures every round,
    as a run of 5 rounds from the start; config.json names the 5-round config."""
    Experiment(_config(3)).run(str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match=r"holds a run of a different config .*--continue / extend=True"):
        Experiment(_config(5)).run(str(tmp_path / "run"), progress=False)
    extended = Experiment(_config(5)).run(str(tmp_path / "run"), progress=False, extend=True)
    whole = Experiment(_config(5)).run(str(tmp_path / "whole"), progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(extended.params), jax.tree_util.tree_leaves(whole.params)):
        np.testing.assert_array_equal(a, b)
    assert len(extended.history) == 5
    for got, want in zip(extended.history, whole.history):
        for key in ("round", "train_loss", "participants", "epsilon_max", "epsilon_basis", "update_norm_mean"):
            assert got[key] == want[key], (key, got["round"])
    assert extended.history[-1]["test_accuracy"] == whole.history[-1]["test_accuracy"]
    np.testing.assert_array_equal(extended.clients["epsilon"], whole.clients["epsilon"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["run"]["rounds"] == 5 and saved["config_hash"] == _config(5).config_hash()


@pytest.mark.slow
@pytest.mark.parametrize("change, field", [
    ({"target_epsilon": 4.0}, "client.target_epsilon"),
    ({"sampling": "poisson"}, r"client.sampling='poisson' with DP-SGD"),
])
def test_a_run_planned_over_its_rounds_is_not_extended(tmp_path, change, field):
    Experiment(_config(2, **change)).run(str(tmp_path), progress=False)
    with pytest.raises(ValueError, match=rf"cannot be extended to run.rounds=4: it was planned over "
                                         rf"run.rounds=2: {field}"):
        Experiment(_config(4, **change)).run(str(tmp_path), progress=False, extend=True)


@pytest.mark.slow
def test_extending_changes_only_the_number_of_rounds_and_only_upward(tmp_path):
    Experiment(_config(3)).run(str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="differs from the run's in more than run.rounds"):
        Experiment(_config(4, lr=0.5)).run(str(tmp_path), progress=False, extend=True)
    with pytest.raises(ValueError, match=r"run.rounds=2 is fewer than the run's run.rounds=3"):
        Experiment(_config(2)).run(str(tmp_path), progress=False, extend=True)
    with pytest.raises(ValueError, match="allowed: one of them"):
        Experiment(_config(4)).run(str(tmp_path), progress=False, extend=True, resume=False)


@pytest.mark.slow
def test_the_command_line_continues_a_run(tmp_path, capsys):
    args = ["run", "--out", str(tmp_path), "--quiet", "--set", "data.num_clients=4", "--set", "model.hidden=[8]",
            "--set", "server.clients_per_round=2"]
    assert cli.main([*args, "--set", "run.rounds=2"]) == 0
    assert cli.main([*args, "--set", "run.rounds=3"]) == 2
    assert "--continue" in capsys.readouterr().err
    assert cli.main([*args, "--set", "run.rounds=3", "--continue"]) == 0
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 3
