"""Defense-vs-attack evaluation (passive MIA, inversion, tables, CLI)."""

import csv
import os

import numpy as np
import pytest

from fedjaxpriv import cli
from fedjaxpriv.attacks import evaluation
from fedjaxpriv.config import ClientConfig, DataConfig, ExperimentConfig, ModelConfig, RunConfig, ServerConfig
from fedjaxpriv.results import load_records

BASE = ExperimentConfig(
    data=DataConfig(dataset="digits", num_clients=30, partition="iid"), model=ModelConfig(name="mlp", hidden=(64,)),
    client=ClientConfig(local_steps=20, batch_size=16, lr=0.2), server=ServerConfig(clients_per_round=5),
    run=RunConfig(rounds=6, eval_every=6, checkpoint_every=0))
SUITE = evaluation.AttackSuite(tap_clients=(0, 1, 2, 3, 4, 5), max_candidates=100, inversion_targets=2,
                               inversion_iterations=60)
STRONG_DP = {"client.dp_clip_norm": 1.0, "client.dp_noise_multiplier": 4.0}


def test_passive_mia_and_inversion_weaken_under_strong_dp(tmp_path):
    # Every client takes part in every round, so the tapped clients send a message each round.
    everyone = evaluation.with_overrides(BASE, ["server.clients_per_round=30"])
    records = evaluation.evaluate_defenses(everyone, {"none": {}, "dpsgd": STRONG_DP}, SUITE, out_dir=str(tmp_path))
    none, dp = records
    # Passive attack pooled over 6 clients x ~2 x 48 candidates: AUC std error <= ~0.025.
    sigma = 0.025
    assert none["attack/passive/auc"] > 0.5 + 5 * sigma, none
    assert dp["attack/passive/auc"] < none["attack/passive/auc"] - 3 * np.sqrt(2) * sigma, (none, dp)
    assert abs(dp["attack/passive/auc"] - 0.5) < abs(none["attack/passive/auc"] - 0.5)
    # DLG recovers batch-1 FedSGD inputs without defense, not through DP-SGD noise.
    assert none["attack/inversion/psnr"] > 30.0 and dp["attack/inversion/psnr"] < 15.0, (none, dp)
    assert none["epsilon"] == np.inf and 0 < dp["epsilon"] < np.inf
    assert none["bytes_uploaded"] > 0
    with open(tmp_path / "attack_eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["defense"] for r in rows] == ["none", "dpsgd"]
    stored = load_records([str(tmp_path)])
    assert [r["label"] for r in stored] == ["none", "dpsgd"]
    assert stored[0]["final"]["attack/passive/auc"] == pytest.approx(none["attack/passive/auc"])
    assert os.path.getsize(tmp_path / "privacy_attack.png") > 0


def test_cli_attack_eval_rejects_unknown_defense(capsys):
    assert cli.main(["attack-eval", "--defenses", "none,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
