"""Defense-vs-attack evaluation: membership inference where membership leaks (with shadow federations),
passive MIA on the run's taps, inversion of a first-round FedSGD probe, the tables per threat model, the frontier, ROC curves, CLI."""

import dataclasses
import csv
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from fedjaxpriv import cli
from fedjaxpriv.attacks import evaluation
from fedjaxpriv.config import ExperimentConfig, with_overrides
from fedjaxpriv.results import load_records


def assert_drawn(path) -> None:
    """``path`` is a picture with something drawn on it: at least 400 x 300 pixels, and at least 2% of them (axes,
    curves, text) far from the white background."""
    import matplotlib.image

    picture = matplotlib.image.imread(str(path))[..., :3]
    assert picture.shape[0] >= 300 and picture.shape[1] >= 400, (path, picture.shape)
    assert np.mean(np.abs(picture - 1.0).max(axis=-1) > 0.25) > 0.02, path

# The attack-eval base setup (few examples per client, many local epochs, a wide model), scaled down: a pool of
# 200 digits (100 members over 10 clients), 3 rounds of 20 local steps, 4 shadow federations.
BASE = with_overrides(ExperimentConfig(), [*evaluation.MEMBERSHIP_BASE, "run.rounds=3", "run.eval_every=3",
                                           "client.local_steps=20"])
SUITE = evaluation.AttackSuite(pool_size=200, shadow_federations=4, tap_clients=(0, 1, 2, 3), inversion_targets=2)


@pytest.mark.slow
def test_membership_leaks_undefended_and_dp_closes_it_beyond_the_intervals(tmp_path):
    records = evaluation.evaluate_defenses(
        BASE, {"none": {}, "dpsgd": {"eps=4": {"client.dp_clip_norm": 1.0, "client.target_epsilon": 4.0}}},
        SUITE, out_dir=str(tmp_path))
    none, dp = records
    # (4 + 1) models x 200 candidates pooled: 1000 pairs, half of them non-members. The models' memberships are
    # independent coins, so a pair whose 4 references all hold the candidate (probability 1/16) has no offline
    # score and is dropped: about 470 non-members remain, so TPR at 1% FPR is resolvable (0.1% is not).
    offline = {k: none[f"attack/lira_offline/{k}"] for k in ("num_members", "num_nonmembers", "dropped")}
    assert sum(offline.values()) == 1000 and 0 < offline["dropped"] < 1000 / 16 + 4 * np.sqrt(1000 / 16)
    assert none["attack/lira_offline/min_resolvable_fpr"] == pytest.approx(1 / offline["num_nonmembers"])
    assert np.isnan(none["attack/lira_offline/tpr@0.1%fpr"]) and not np.isnan(none["attack/lira_offline/tpr@1%fpr"])
    # Undefended, the global model leaks membership; DP-SGD at epsilon 4 removes it beyond both intervals. The
    # loss attack has no per-example calibration, so its pooled AUC depends more on which halves the shadows drew
    # (0.61-0.65 over three draws of this setup; the target alone: 0.68): its bar is lower than LiRA's.
    for attack, bar in (("lira_offline", 0.6), ("loss_threshold", 0.55)):
        assert none[f"attack/{attack}/auc_low"] > bar, (attack, none[f"attack/{attack}/auc"])
        assert dp[f"attack/{attack}/auc_high"] < none[f"attack/{attack}/auc_low"], attack
    # RMIA separates the same way (undefended 0.69 [0.66, 0.73], DP 0.52 [0.49, 0.56]); online LiRA, with only 2
    # "in" models per candidate out of 4 shadows, is weaker (0.58 [0.52, 0.63]) and is only ordered.
    assert none["attack/rmia/auc_low"] > 0.6 and dp["attack/rmia/auc_high"] < none["attack/rmia/auc_low"]
    assert dp["attack/lira_online/auc"] < none["attack/lira_online/auc"]
    # The server's passive attack on the tapped messages of clients that took part.
    assert none["attack/passive/auc_low"] > 0.6 and dp["attack/passive/auc"] < none["attack/passive/auc"]
    # Inversion of the first-round FedSGD probe (one step over 8 examples of each tapped client): undefended it
    # reconstructs the batches (above 30 dB), through DP-SGD's noise not one example passes 20 dB.
    assert none["attack/inversion/psnr_median"] > 30.0 and none["attack/inversion/batch"] == 8
    assert none["attack/inversion/fraction_above_threshold"] > 0.5 and none["attack/inversion/targets"] == 2
    assert dp["attack/inversion/fraction_above_threshold"] == 0.0
    assert none["attack/inversion/attacker"].split(" (")[0] in ("l2", "cosine"), none["attack/inversion/attacker"]
    assert none["epsilon"] == np.inf and 0.98 * 4.0 <= dp["epsilon"] <= 4.0
    assert "replace one example" in dp["epsilon_basis"] and none["bytes_uploaded"] > 0
    assert dp["epsilon_level"] == "example" and none["epsilon_level"] == ""
    with open(tmp_path / "attack_eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["none", "dpsgd eps=4"]
    table = (tmp_path / "attack_eval.md").read_text()
    assert "### participant" in table and "### server" in table and "epsilon_basis" in table
    assert f"| {dp['epsilon']:.2f} (example) |" in table and none["attack/inversion/attacker"] in table
    stored = load_records([str(tmp_path)])
    assert [r["label"] for r in stored] == ["none", "dpsgd eps=4"]
    assert stored[0]["final"]["attack/passive/auc"] == pytest.approx(none["attack/passive/auc"])
    for name in ("frontier.png", "roc_lira_offline.png", "roc_passive.png", "roc_rmia.png", "inversion_none.png"):
        assert_drawn(tmp_path / name)


def test_defense_points_expand_strengths_and_single_overrides():
    points = evaluation.defense_points({"dpsgd": "dpsgd", "mine": {"client.mixup_alpha": 2.0}})
    assert [(f, s) for f, s, _ in points] == [("dpsgd", "eps=1.0"), ("dpsgd", "eps=4.0"), ("dpsgd", "eps=8.0"),
                                              ("mine", "")]
    assert points[-1][2] == {"client.mixup_alpha": 2.0}
    with pytest.raises(ValueError, match="unknown defense"):
        evaluation.defense_points({"x": "bogus"})


def test_cli_attack_eval_rejects_unknown_defense(capsys, tmp_path):
    assert cli.main(["attack-eval", "--defenses", "none,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    # A decentralized base: the server's defense and the server's view are refused before anything trains.
    out = str(tmp_path / "out")
    assert cli.main(["attack-eval", "--set", "topology.graph=ring", "--defenses", "dpfedavg", "--out", out]) == 2
    assert "a decentralized run has no server" in capsys.readouterr().err
    assert cli.main(["attack-eval", "--set", "topology.graph=ring", "--defenses", "none", "--threat-models", "server",
                     "--out", out]) == 2
    assert "threat model 'server' was asked for, but nothing can attack it" in capsys.readouterr().err


@pytest.mark.slow
def test_attribute_inference_and_reconstruction_beat_their_baselines_undefended_not_under_dp(tmp_path):
    """The attribute population (client-specific shares of a sensitive input column): the server's attribute
    inference beats the better message-free baseline and the eavesdropper's reconstruction beats the released
    model, both with the interval's lower end above 0; DP-SGD at epsilon 1 removes both beyond the intervals."""
    base = with_overrides(ExperimentConfig(), [
        "data.dataset=attribute", "data.num_clients=20", "data.partition=natural", "model.name=mlp",
        "model.hidden=[32]", "client.local_steps=20", "client.batch_size=16", "client.lr=0.1",
        "server.clients_per_round=20", "run.rounds=5", "run.eval_every=5", "run.delta=1e-3"])
    suite = evaluation.AttackSuite(threat_models=("server", "eavesdropper"), tap_clients=tuple(range(8)),
                                   tap_from_round=1, inversion_targets=0, shadow_federations=0)
    none, dp = evaluation.evaluate_defenses(
        base, {"none": {}, "dpsgd": {"eps=1": {"client.dp_clip_norm": 1.0, "client.target_epsilon": 1.0}}},
        suite, out_dir=str(tmp_path))
    assert none["attack/attribute/num_examples"] == 8 * 64
    assert none["attack/attribute/advantage_low"] > 0.05, none["attack/attribute/advantage"]
    assert dp["attack/attribute/advantage_high"] < none["attack/attribute/advantage_low"]
    assert none["attack/reconstruction/accuracy_gain_global_low"] > 0.05
    assert dp["attack/reconstruction/accuracy_gain_global"] < none["attack/reconstruction/accuracy_gain_global_low"]
    assert "attack/auc" not in none and not any(k.startswith("attack/loss_threshold") for k in none)
    table = (tmp_path / "attack_eval.md").read_text()
    assert "### eavesdropper" in table and "reconstruction/accuracy_gain_global" in table
    assert "attribute/advantage" in table and "### participant" not in table


@pytest.mark.slow
def test_secure_aggregation_view_inverts_whole_cohorts_and_recovers_less_than_single_messages(tmp_path):
    """Behind secure aggregation the server inverts the sum of a 4-client cohort (about 14 digits in all, one
    full-batch step each): every cohort client is scored, and the median PSNR falls below that of inverting
    each client's own message (the honest-but-curious server's view of the same run)."""
    base = with_overrides(ExperimentConfig(), [
        "data.partition=iid", "data.num_clients=400", "model.hidden=[64]", "client.local_steps=1",
        "client.batch_size=8", "server.clients_per_round=4", "run.rounds=1", "run.eval_every=1"])
    suite = evaluation.AttackSuite(threat_models=("server", "secure_aggregation"), pool_size=0, shadow_federations=0,
                                   tap_clients=tuple(range(400)), tap_from_round=1, inversion_targets=4,
                                   inversion_batch=0, max_candidates=4)
    record = evaluation.evaluate_defense(base, "none", {}, suite, attacks=(*evaluation.BUILTIN_ATTACKS, *USER_ATTACKS)
                                         ).record
    assert record["attack/aggregate_inversion/targets"] == 4 == record["attack/inversion/targets"]
    assert record["attack/aggregate_inversion/psnr_median"] < record["attack/inversion/psnr_median"] - 3.0, record
    # A user's attack runs beside the built-in ones on the same run, in its view's table; one whose view is not
    # selected does not run.
    assert record["attack/released_model/accuracy"] == pytest.approx(record["test_accuracy"], abs=1e-6)
    assert record["attack/released_model/taps"] == 1 and not any(k.startswith("attack/unselected") for k in record)
    tables = evaluation.threat_model_tables([record], evaluation.attack_views(USER_ATTACKS))
    assert "### server" in tables and "released_model/accuracy" in tables


def _released_model(context):
    """A user attack: re-evaluates the released model on the run's test set and counts the tapped rounds."""
    from fedjaxpriv.evaluation import evaluate

    test = context.experiment.test
    return evaluation.AttackOutcome({"accuracy": evaluate(context.experiment.model.apply, context.results.params,
                                                          test.x, test.y)["accuracy"],
                                     "taps": len(context.results.taps)})


USER_ATTACKS = (evaluation.Attack("released_model", "server", _released_model),
                evaluation.Attack("unselected", "eavesdropper", _released_model))


def test_attack_with_an_unknown_view_is_refused():
    with pytest.raises(ValueError, match="view='cloud'"):
        evaluation.Attack("mine", "cloud", _released_model)


@pytest.mark.slow
def test_an_interrupted_evaluation_resumes_after_its_last_finished_point(tmp_path, monkeypatch):
    """Each point is kept as it finishes: a rerun into the same directory evaluates only the points not kept,
    gives the same records and stores each point once."""
    base = with_overrides(ExperimentConfig(), ["data.num_clients=4", "model.hidden=[8]", "server.clients_per_round=2",
                                               "run.rounds=2", "client.local_steps=2", "run.eval_every=2"])
    suite = evaluation.AttackSuite(pool_size=0, shadow_federations=0, inversion_targets=0, max_candidates=20,
                                   threat_models=("participant", "server"))
    first = {"none": {}, "pruning": {"sparsity=0.5": {"client.prune_sparsity": 0.5}}}
    original, evaluated = evaluation.evaluate_defense, []

    def counted(base, name, *args, **kwargs):
        evaluated.append(name)
        if name == "stop":
            raise KeyboardInterrupt("interrupted")
        return original(base, name, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_defense", counted)
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate_defenses(base, {**first, "stop": {}}, suite, out_dir=str(tmp_path))
    assert evaluated == ["none", "pruning sparsity=0.5", "stop"]
    again = evaluation.evaluate_defenses(base, first, suite, out_dir=str(tmp_path))
    assert evaluated == ["none", "pruning sparsity=0.5", "stop"]  # nothing evaluated twice
    assert [r["label"] for r in again] == ["none", "pruning sparsity=0.5"]
    assert not np.isnan(again[0]["attack/loss_threshold/auc"])
    assert [r["label"] for r in load_records([str(tmp_path)])] == ["none", "pruning sparsity=0.5"]
    with_more = evaluation.evaluate_defenses(base, {**first, "mixup": {"client.mixup_alpha": 1.0}}, suite,
                                             out_dir=str(tmp_path))
    assert evaluated[3:] == ["mixup"]
    assert json.dumps(with_more[:2], sort_keys=True) == json.dumps(again, sort_keys=True)  # NaN-safe equality
    assert [r["label"] for r in load_records([str(tmp_path)])] == ["none", "pruning sparsity=0.5", "mixup"]
    assert_drawn(tmp_path / "frontier.png")
    # `fedjaxpriv report` on the store redraws the ROC curves from the kept figures, the same file byte for byte.
    assert cli.main(["report", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    drawn = sorted(name for name in os.listdir(tmp_path) if name.startswith("roc_"))
    assert drawn == ["roc_loss_threshold.png", "roc_passive.png"], drawn
    for name in drawn:
        assert (tmp_path / "report" / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_point_figures_are_kept_portably_and_redraw_the_same_files(tmp_path):
    """A point's scores and reconstructions survive the .npz exactly; drawn from the file or from memory, the
    ROC curves and grids are the same bytes; a garbled file is an error naming it."""
    rng = np.random.default_rng(0)
    grid = (rng.uniform(size=(3, 8, 8, 1)).astype(np.float32), rng.uniform(size=(3, 8, 8, 1)).astype(np.float32),
            ["r1 c0\n12.0 dB", "r1 c0\n9.5 dB", "r1 c2\n31.2 dB\nSSIM 0.91"])
    scores = {"passive": (rng.normal(size=40), np.r_[np.zeros(20, int), np.ones(20, int)]),
              "loss_threshold": (rng.normal(size=30).astype(np.float32), rng.integers(0, 2, 30))}
    views = {"passive": "server", "loss_threshold": "participant"}
    point = evaluation.PointFigures("pruning sparsity=0.9", scores, views, grid)
    path = evaluation.save_point_figures(point, str(tmp_path), "abc123")
    assert path == str(tmp_path / "figures" / "abc123.npz")
    (kept,) = evaluation.figures_for([{"config_hash": "zzz"}, {"config_hash": "abc123"}], [str(tmp_path)])
    assert kept.label == point.label and kept.views == point.views and kept.grid[2] == grid[2]
    for attack, (values, labels) in scores.items():
        np.testing.assert_array_equal(kept.scores[attack][0], values)
        np.testing.assert_array_equal(kept.scores[attack][1], labels)
        assert kept.scores[attack][0].dtype == values.dtype
    np.testing.assert_array_equal(kept.grid[1], grid[1])
    direct = evaluation.draw_point_figures([point], str(tmp_path / "direct"))
    from_file = evaluation.draw_point_figures([kept], str(tmp_path / "from_file"))
    assert sorted(direct) == ["inversion_pruning sparsity=0.9", "roc_loss_threshold", "roc_passive"]
    for name, file in direct.items():
        with open(file, "rb") as a, open(from_file[name], "rb") as b:
            assert a.read() == b.read(), name
    with open(path, "wb") as f:
        f.write(b"not a zip")
    with pytest.raises(ValueError, match="abc123.npz: not a defense point's figures file"):
        evaluation.figures_for([{"config_hash": "abc123"}], [str(tmp_path)])


def test_a_threat_model_nothing_can_attack_is_an_error_before_training_naming_the_knob():
    """At the default preset a cohort holds 10 clients x 30 examples: over the secure-aggregation attack's cap;
    and DP-FedAvg points hide the aggregate. Both are found from the configs alone, before any training."""
    base = with_overrides(ExperimentConfig(), list(evaluation.MEMBERSHIP_BASE))
    suite = evaluation.AttackSuite(threat_models=("secure_aggregation",))
    points = evaluation.defense_points({"none": {}, "dpfedavg": "dpfedavg"})
    with pytest.raises(ValueError, match=r"'secure_aggregation'.*300 examples > aggregate_max_examples=64 \(raise "
                                         r"--aggregate-max-examples to 300.*DP-FedAvg's clipped, noised sum"):
        evaluation.check_threat_models(base, points, suite, evaluation.BUILTIN_ATTACKS)
    evaluation.check_threat_models(base, points, dataclasses.replace(suite, aggregate_max_examples=300),
                                   evaluation.BUILTIN_ATTACKS)  # applies to the undefended point: no error
    with pytest.raises(ValueError, match="'secure_aggregation'.*no attack observes it"):
        evaluation.check_threat_models(base, points, suite, USER_ATTACKS)


def test_tables_say_why_an_attack_did_not_apply():
    attack = evaluation.Attack("inversion", "server", _released_model)
    records = [{"defense": "none", "strength": "", "test_accuracy": 0.9, "epsilon": math.inf,
                "attack/inversion/psnr_median": 31.5, "attack/inversion/fraction_above_threshold": 0.5},
               {"defense": "topk", "strength": "0.1", "test_accuracy": 0.8, "epsilon": math.inf,
                **attack.not_applicable("skipped (inversion_targets=0, --inversion-targets)")}]
    table = evaluation.threat_model_tables(records, {"inversion": "server"}).splitlines()
    assert "| none |  | 0.900 | no DP | 31.5 | 0.5 |" in table
    assert "| topk | 0.1 | 0.800 | no DP | n/a: skipped (inversion_targets=0, --inversion-targets) | n/a |" in table
    only = evaluation.threat_model_tables(records[1:], {"inversion": "server"}).splitlines()
    assert "| defense | strength | test accuracy | epsilon | inversion/n/a |" in only


def test_membership_intervals_say_whether_they_separate_from_chance_and_from_the_undefended_run():
    none = {"defense": "none", "strength": "", "test_accuracy": 0.9, "epsilon": math.inf,
            "attack/rmia/auc": 0.66, "attack/rmia/auc_low": 0.64, "attack/rmia/auc_high": 0.68,
            "attack/rmia/tpr@1%fpr": 0.02, "attack/rmia/tpr@1%fpr_low": 0.005, "attack/rmia/tpr@1%fpr_high": 0.04}
    strong = {**none, "defense": "dpsgd", "strength": "eps=1", "attack/rmia/auc": 0.5,
              "attack/rmia/auc_low": 0.48, "attack/rmia/auc_high": 0.52}
    weak = {**none, "defense": "pruning", "strength": "0.5", "attack/rmia/auc": 0.63,
            "attack/rmia/auc_low": 0.61, "attack/rmia/auc_high": 0.65}
    table = evaluation.threat_model_tables([none, strong, weak], {"rmia": "participant"}).splitlines()
    assert "| none |  | 0.900 | no DP | 0.660 [0.640, 0.680] * | 0.020 [0.005, 0.040] |" in table
    assert "| dpsgd | eps=1 | 0.900 | no DP | 0.500 [0.480, 0.520] + | 0.020 [0.005, 0.040] |" in table
    assert "| pruning | 0.5 | 0.900 | no DP | 0.630 [0.610, 0.650] * | 0.020 [0.005, 0.040] |" in table
    assert any(line.startswith("Marks on 95% intervals") for line in table)
    assert evaluation.chance_level("tpr@0.1%fpr") == pytest.approx(0.001) and evaluation.chance_level("psnr") is None


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_attack_eval_stopped_by_a_signal_says_so_in_one_line_and_keeps_finished_points(tmp_path, signum):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fedjaxpriv.cli", "attack-eval", "--defenses", "none,pruning",
               "--shadow-federations", "0", "--pool-size", "40", "--inversion-targets", "0", "--set", "run.rounds=2",
               "--set", "client.local_steps=2", "--set", "model.hidden=[16]", "--out", str(out)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    while not any(line.startswith("defense 2/4") for line in lines):  # the first point is finished and kept
        line = child.stderr.readline()
        assert line, "".join(lines)
        lines.append(line)
    child.send_signal(signum)
    _, rest = child.communicate(timeout=120)
    log = "".join(lines) + rest
    assert child.returncode == 128 + signum, log
    assert rest.strip().splitlines()[-1].startswith(
        f"fedjaxpriv: attack-eval interrupted by {signal.Signals(signum).name}; the finished defense points are kept")
    assert "Traceback" not in log
    assert len(os.listdir(out / "points")) == 1


def test_time_left_is_each_points_family_mean_or_the_overall_mean():
    assert evaluation.time_left({}, ["none"] * 5) == "time left known after the first point"
    assert evaluation.time_left({"none": [100.0, 140.0]}, ["none"] * 3) == "about 6 min left"
    assert evaluation.time_left({"none": [20.0]}, ["none"] * 2) == "about 40 s left"
    # dpsgd timed at 240 s, pruning at 20 s; quantization untimed: the mean of all three finished points (100 s).
    durations = {"dpsgd": [240.0], "pruning": [20.0, 40.0]}
    assert evaluation.time_left(durations, ["dpsgd", "pruning", "quantization"]) == (
        "about 6 min left, quantization not yet timed")


def test_a_presets_estimate_sums_each_familys_measured_point_time_scaled_by_federations():
    preset = dataclasses.replace(evaluation.PRESETS["membership"], point_seconds={"none": 30.0, "dpsgd": 240.0})
    assert "about 5 min on 2 CPU cores" in preset.estimate(["none"] * 10, 16)  # 10 x 30 s
    assert "about 12 min" in preset.estimate(["none"] + ["dpsgd"] * 3, 16)  # 30 s + 3 x 4 min = 12.5 min
    assert "about 1 min" in preset.estimate(["none"] * 17, 0)  # 17 points of 1 federation = 1 of 17: 30 s, at least 1
    assert "about 15 min" in preset.estimate(["none"] * 10, 16 * 3 + 2)  # 51 federations per point: 3 x 5 min
    # A family not measured counts as the slowest measured one, and is named.
    assert "about 4 min" in (text := preset.estimate(["none", "mixup"], 16)) and "mixup not measured" in text
    assert dataclasses.replace(preset, point_seconds={}).estimate(["none"], 16) == "time known after the first point"


def test_defenses_are_compared_at_matched_utility_without_extrapolating():
    def point(defense, accuracy, auc, width=0.02):
        return {"defense": defense, "test_accuracy": accuracy, "attack/rmia/auc": auc,
                "attack/rmia/auc_low": auc - width, "attack/rmia/auc_high": auc + width}

    records = [point("none", 0.9, 0.70),
               point("dpsgd", 0.85, 0.60), point("dpsgd", 0.65, 0.52),      # brackets 0.81 and 0.72
               point("pruning", 0.88, 0.68), point("pruning", 0.80, 0.64),  # brackets 0.81, never down to 0.72
               point("mixup", 0.5, 0.55)]                                   # never up to 0.81
    at_90 = evaluation.matched_utility(records, "attack/rmia/auc", 0.9)
    # target 0.81: dpsgd between 0.65 (0.52) and 0.85 (0.60), 80 % of the way: 0.584, its interval +-0.02.
    assert at_90["dpsgd"] == pytest.approx((0.584, 0.564, 0.604))
    assert at_90["pruning"] == pytest.approx((0.645, 0.625, 0.665))  # 1/8 of the way from 0.80 to 0.88
    assert at_90["mixup"].startswith("n/a: no strength reaches accuracy 0.810 (best 0.500)")
    at_80 = evaluation.matched_utility(records, "attack/rmia/auc", 0.8)
    assert at_80["pruning"].startswith("n/a: every strength is more accurate than 0.720 (least 0.800)")
    assert at_80["dpsgd"] == pytest.approx((0.548, 0.528, 0.568))  # 35 % of the way from 0.65 to 0.85
    table = evaluation.matched_utility_table(records).splitlines()
    assert "| defense | rmia/auc at 90% accuracy | rmia/auc at 80% accuracy |" in table
    assert "| dpsgd | 0.584 [0.564, 0.604] | 0.548 [0.528, 0.568] |" in table
    # A reason is written once per row: the second metric's cell of the same fraction only says "n/a".
    records = [{**r, "attack/lira_online/auc": r["attack/rmia/auc"]} for r in records]
    mixup = next(line for line in evaluation.matched_utility_table(records).splitlines() if line.startswith("| mixup"))
    cells = [cell.strip() for cell in mixup.strip("|").split("|")]
    assert mixup.count("no strength reaches accuracy 0.810") == 1 and cells.count("n/a") == 2, mixup
    assert evaluation.matched_utility_table([point("dpsgd", 0.8, 0.6)]) == ""  # no undefended run: no table


def test_presets_are_the_cli_choices_and_one_base_at_a_time(capsys, tmp_path):
    parser = cli._build_parser()
    action = next(a for a in parser._subparsers._group_actions[0].choices["attack-eval"]._actions
                  if a.dest == "preset")
    assert tuple(action.choices) == tuple(evaluation.PRESETS)
    config = tmp_path / "c.yaml"
    config.write_text("run: {rounds: 1}\n")
    assert cli.main(["attack-eval", "--preset", "equal_utility", "--config", str(config)]) == 2
    assert "--preset equal_utility and --config" in capsys.readouterr().err
    # The equal-utility preset's cohorts hold 20 clients x 4 examples: the secure-aggregation cap says so.
    base = with_overrides(ExperimentConfig(), list(evaluation.PRESETS["equal_utility"].overrides))
    suite = evaluation.AttackSuite(threat_models=("secure_aggregation",),
                                   pool_size=evaluation.PRESETS["equal_utility"].pool_size)
    with pytest.raises(ValueError, match="a cohort holds 80 examples"):
        evaluation.check_threat_models(base, evaluation.defense_points({"none": {}}), suite,
                                       evaluation.BUILTIN_ATTACKS)


@pytest.mark.parametrize("defenses", ["", ",,"])
def test_an_empty_defense_list_is_an_error(defenses, capsys, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["attack-eval", "--defenses", defenses, "--shadow-federations", "0", "--out", str(out)]) == 2
    assert "names no defense point" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match="names no defense point"):
        evaluation.evaluate_defenses(BASE, {}, SUITE)


@pytest.mark.slow
def test_attack_eval_on_the_keyboard_task_reads_typed_words_and_says_why_inversion_does_not_apply(tmp_path):
    """On text the server's table gains the bag-of-words attack (exact undefended: every typed word's row
    changed, no other), gradient inversion says why it cannot apply, the membership attacks score sequences
    with the next-token loss, and the ROC curves include the words'."""
    base = with_overrides(ExperimentConfig(), [
        "data.dataset=keyboard", "data.num_clients=20", "model.name=lstm", "model.hidden=[32]", "client.lr=1.0",
        "client.local_steps=5", "server.clients_per_round=10", "run.rounds=3", "run.eval_every=3",
        "run.checkpoint_every=0"])
    suite = evaluation.AttackSuite(shadow_federations=0)
    none, quantized = evaluation.evaluate_defenses(base, {"none": {}, "quantization": {"bits=4": {
        "message.quant_bits": 4}}}, suite, out_dir=str(tmp_path))
    assert none["attack/bag_of_words/support_precision"] == none["attack/bag_of_words/support_recall"] == 1.0
    assert none["attack/bag_of_words/auc"] == 1.0 and quantized["attack/bag_of_words/auc"] < 1.0
    assert none["attack/inversion/n/a"].startswith("the inputs are token ids")
    assert 0.0 < none["attack/loss_threshold/auc"] < 1.0 and 0.0 < none["test_accuracy"] < 1.0
    table = (tmp_path / "attack_eval.md").read_text()
    assert "bag_of_words/support_precision" in table and "Inversion: the run's own" not in table
    assert_drawn(tmp_path / "roc_bag_of_words.png")


@pytest.mark.slow
def test_attack_eval_of_a_decentralized_run_attacks_from_the_curious_neighbour():
    """A ring of 8 digit clients under attack-eval: the default observer is the curious neighbour; its inversion
    of round-1 messages (every node starts from the public initial model: the start it computes is exact)
    reconstructs the undefended clients' images and not those under DP-SGD noise; the membership attack on the
    nodes' models is strongest on the victim's own model and fades with graph distance; a federated threat model
    is refused before anything trains."""
    base = with_overrides(ExperimentConfig(), ["topology.graph=ring", "data.num_clients=8",
                                               "server.clients_per_round=8", "run.rounds=3", "client.local_steps=10",
                                               "client.batch_size=16"])
    assert evaluation.default_threat_models(base) == ("neighbour",)
    suite = evaluation.AttackSuite(threat_models=("neighbour",), pool_size=200, shadow_federations=0,
                                   tap_from_round=1, inversion_targets=2, inversion_iterations=200)
    defenses = {"none": {}, "dpsgd": {"client.dp_clip_norm": 0.5, "client.dp_noise_multiplier": 2.0}}
    records = {r["defense"]: r for r in evaluation.evaluate_defenses(base, defenses, suite)}
    none, dp = records["none"], records["dpsgd"]
    assert none["attack/neighbour_inversion/exact_fraction"] == 1.0
    assert none["attack/neighbour_inversion/psnr_median"] > suite.psnr_threshold, none
    assert dp["attack/neighbour_inversion/psnr_median"] < none["attack/neighbour_inversion/psnr_median"] - 10.0, dp
    by_distance = [none[f"attack/membership_by_distance/auc_distance_{d}"] for d in range(5)]
    assert by_distance[0] > 0.65 and by_distance[0] > by_distance[4] + 0.1, by_distance
    assert "attack/neighbour_passive/auc" in none and math.isfinite(none["attack/neighbour_passive/auc"])
    with pytest.raises(ValueError, match="threat model 'server' was asked for, but nothing can attack it"):
        evaluation.evaluate_defenses(base, {"none": {}}, dataclasses.replace(suite, threat_models=("server",)))
