"""Sweeps, the results store and the report."""

import csv
import json
import math
import multiprocessing
import os
import shutil

import pytest

from fedjaxpriv.cli import main as cli_main
from fedjaxpriv.results import ResultsStore, load_records
from fedjaxpriv.sweep import expand_grid, load_grid, run_sweep

TINY = {"data": {"num_clients": 10}, "client": {"local_steps": 2},
        "server": {"clients_per_round": 4}, "run": {"rounds": 2, "checkpoint_every": 1}}


def test_grid_expansion_is_exact(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("data: {num_clients: 12}\nserver: {clients_per_round: 3}\n")
    spec = {"base": "base.yaml",
            "variants": [{"name": "plain"}, {"name": "pruned", "client.prune_sparsity": 0.5}],
            "grid": {"client.lr": [0.05, 0.1]},
            "zip": [{"message.quant_bits": [4, 8], "client.local_steps": [3, 6]}],
            "seeds": [0, 1]}
    points = expand_grid(spec, str(tmp_path))
    assert len(points) == 2 * 2 * 2 * 2
    first, last = points[0], points[-1]
    assert first.overrides == {"name": "plain", "client.lr": 0.05, "message.quant_bits": 4,
                               "client.local_steps": 3, "run.seed": 0}
    assert last.overrides == {"name": "pruned", "client.prune_sparsity": 0.5, "client.lr": 0.1,
                              "message.quant_bits": 8, "client.local_steps": 6, "run.seed": 1}
    assert last.label == "pruned,lr=0.1,quant_bits=8,local_steps=6,seed=1"
    c = last.config
    assert (c.name, c.data.num_clients, c.client.prune_sparsity, c.client.lr, c.message.quant_bits,
            c.client.local_steps, c.run.seed) == ("pruned", 12, 0.5, 0.1, 8, 6, 1)
    assert points[1].config.run.seed == 1 and points[1].config.client.lr == 0.05  # seeds vary fastest
    zipped = {(p.config.message.quant_bits, p.config.client.local_steps) for p in points}
    assert zipped == {(4, 3), (8, 6)}  # zip advances together, never crosses
    assert len({p.config_hash for p in points}) == 16


def test_grid_duplicates_collapse_and_bad_grids_fail():
    points = expand_grid({"grid": {"client.lr": [0.1, 0.1, 0.2]}})
    assert [p.config.client.lr for p in points] == [0.1, 0.2]
    with pytest.raises(ValueError, match="zip group"):
        expand_grid({"zip": [{"client.lr": [0.1, 0.2], "client.local_steps": [1]}]})
    with pytest.raises(ValueError, match="grid.client.lr"):
        expand_grid({"grid": {"client.lr": 0.1}})
    with pytest.raises(ValueError, match="client.nonsense"):
        expand_grid({"grid": {"client.nonsense": [1]}})
    with pytest.raises(ValueError, match="unknown grid file key"):
        expand_grid({"grids": {}})


def _append_many(path: str, writer: int, count: int) -> None:
    store = ResultsStore(path)
    for i in range(count):
        store.append({"config_hash": f"{writer}-{i}", "payload": [writer * 1000 + i] * 20000})


@pytest.mark.slow
def test_concurrent_appends_stay_intact(tmp_path):
    path = str(tmp_path / "results.jsonl")
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_append_many, args=(path, w, 15)) for w in range(4)]
    for p in writers:
        p.start()
    for p in writers:
        p.join()
        assert p.exitcode == 0
    with open(path) as f:
        lines = f.read().splitlines()
    assert len(lines) == 60
    records = [json.loads(line) for line in lines]  # every line is whole JSON
    assert sorted(r["config_hash"] for r in records) == sorted(f"{w}-{i}" for w in range(4) for i in range(15))
    for r in records:
        writer, i = map(int, r["config_hash"].split("-"))
        assert r["payload"] == [writer * 1000 + i] * 20000


def test_store_skips_a_torn_line_and_seals_it(tmp_path):
    store = ResultsStore(str(tmp_path))
    store.append({"config_hash": "a", "x": 1})
    with open(store.path, "a") as f:
        f.write('{"config_hash": "b", "x": [1, 2')  # a writer killed mid-record
    assert [r["config_hash"] for r in store.records()] == ["a"]
    store.append({"config_hash": "c", "x": math.inf})
    assert [r["config_hash"] for r in store.records()] == ["a", "c"]
    assert store.records()[1]["x"] == "inf"


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    grid = root / "grid.yaml"
    grid.write_text(json.dumps({"base": TINY, "grid": {"client.lr": [0.05, 0.1, 0.2]}}))
    points = load_grid(str(grid))
    summary = run_sweep(points, str(root / "store"), jobs=2)
    return root, points, summary


@pytest.mark.slow
def test_two_job_sweep_writes_one_record_per_config_and_rerun_skips(sweep_store):
    root, points, summary = sweep_store
    assert summary.failed == {}
    assert sorted(summary.ran) == sorted(p.config_hash for p in points)
    store = ResultsStore(str(root / "store"))
    records = store.records()
    assert sorted(r["config_hash"] for r in records) == sorted(p.config_hash for p in points)
    for r in records:
        assert len(r["history"]) == 2 and r["final"]["round"] == 2
        assert r["final"]["test_accuracy"] == r["history"][-1]["test_accuracy"]
        assert set(r["versions"]) == {"jax", "jaxlib", "flax", "optax", "dp-accounting", "numpy", "orbax-checkpoint",
                                      "fedjaxpriv"}
        assert len(r["sessions"]) == 1 and r["sessions"][0]["last_round"] == 2
        assert os.path.exists(os.path.join(r["run_dir"], "history.jsonl"))
        assert r["run_dir"].endswith(r["config_hash"])
    size = os.path.getsize(store.path)
    code = cli_main(["sweep", str(root / "grid.yaml"), "--jobs", "2", "--store", str(root / "store")])
    assert code == 0
    assert os.path.getsize(store.path) == size  # nothing ran, nothing appended


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint(sweep_store, tmp_path):
    root, points, _ = sweep_store
    point = points[1]
    finished = root / "store" / "runs" / point.config_hash
    store_dir = tmp_path / "store"
    run_dir = store_dir / "runs" / point.config_hash
    shutil.copytree(finished, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "2")  # the run was killed before its round-2 checkpoint
    summary = run_sweep([point], str(store_dir), jobs=1)
    assert summary.ran == [point.config_hash]
    resumed = ResultsStore(str(store_dir)).records()[0]
    reference = next(r for r in ResultsStore(str(root / "store")).records() if r["config_hash"] == point.config_hash)
    assert [h["round"] for h in resumed["history"]] == [1, 2]
    assert resumed["history"][0]["round_time_s"] == reference["history"][0]["round_time_s"]  # kept, not rerun
    assert resumed["history"][1]["round_time_s"] != reference["history"][1]["round_time_s"]  # recomputed
    assert resumed["final"]["test_accuracy"] == pytest.approx(reference["final"]["test_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_report_writes_plots_and_a_table_equal_to_the_store(sweep_store, tmp_path):
    root, points, _ = sweep_store
    records = ResultsStore(str(root / "store")).records()
    records[0]["final"]["attack/dlg/psnr_median"] = 12.5  # headline attack metrics are plotted when present
    records[0]["final"]["attack/dlg/psnr_iqr"] = 3.0  # others only go to the CSV
    fake = tmp_path / "withattack"
    for r in records:
        ResultsStore(str(fake)).append(r)
    out = tmp_path / "report"
    assert cli_main(["report", str(fake), "--out", str(out)]) == 0
    for name in ("accuracy_vs_rounds", "privacy_utility", "communication_vs_accuracy", "attacks"):
        with open(out / f"{name}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not (out / "epsilon_vs_rounds.png").exists()  # no run tracks privacy
    with open(out / "summary.csv") as f:
        rows = {row["config_hash"]: row for row in csv.DictReader(f)}
    assert set(rows) == {r["config_hash"] for r in records}
    for r in records:
        row = rows[r["config_hash"]]
        assert float(row["client.lr"]) == r["config"]["client"]["lr"]
        assert float(row["test_accuracy"]) == r["final"]["test_accuracy"]
        assert float(row["test_loss"]) == r["final"]["test_loss"]
        assert float(row["bytes_uploaded"]) == sum(h["bytes_total"] for h in r["history"])
    assert float(rows[records[0]["config_hash"]]["attack/dlg/psnr_median"]) == 12.5
    assert float(rows[records[0]["config_hash"]]["attack/dlg/psnr_iqr"]) == 3.0
    table = (out / "summary.md").read_text().splitlines()
    assert len(table) == 2 + len(records) and "client.lr" in table[0]
    assert "attack/dlg/psnr_median" in table[0] and "psnr_iqr" not in table[0]


@pytest.mark.slow
def test_report_reads_run_directories(sweep_store, tmp_path):
    root, points, _ = sweep_store
    run_dir = root / "store" / "runs" / points[0].config_hash
    (record,) = load_records([str(run_dir)])
    stored = next(r for r in ResultsStore(str(root / "store")).records() if r["config_hash"] == points[0].config_hash)
    assert record["config_hash"] == stored["config_hash"]
    assert record["final"]["test_accuracy"] == stored["final"]["test_accuracy"]
    with pytest.raises(ValueError, match="neither a results store"):
        load_records([str(tmp_path / "missing")])


def test_attack_success_is_plotted_against_a_varying_defense_strength(tmp_path):
    from fedjaxpriv.config import ExperimentConfig, with_overrides
    from fedjaxpriv.report import attack_strength_series, write_report
    from fedjaxpriv.results import make_record

    records = []
    for noise, auc in ((2.0, 0.55), (0.0, 0.8), (1.0, 0.6)):
        config = with_overrides(ExperimentConfig(), [f"client.dp_noise_multiplier={noise}", "client.dp_clip_norm=1",
                                                     f"name=noise{noise}"])
        history = [{"round": 1, "test_accuracy": 0.5, "attack/passive/auc": auc, "attack/passive/auc_low": auc - 0.1}]
        records.append(make_record(config, history, label=f"noise{noise}"))
    series = attack_strength_series(records)
    # One series (the runs differ in nothing else), named by the field; noise 0 is off: the reference, not a point.
    assert series["client.dp_noise_multiplier"] == {
        "client.dp_noise_multiplier": {"attack/passive/auc": [(1.0, 0.6), (2.0, 0.55)]}}
    assert "name" not in series  # not numeric
    written = write_report(records, str(tmp_path))
    assert os.path.getsize(written["attacks_vs_client_dp_noise_multiplier"]) > 0


def test_numbers_in_exponent_form_are_floats_in_overrides_and_files(tmp_path):
    from fedjaxpriv.config import ExperimentConfig, load_config, with_overrides

    config = with_overrides(ExperimentConfig(), ["run.delta=1e-6", "client.lr=2E-2", "server.lr=1e0"])
    assert (config.run.delta, config.client.lr, config.server.lr) == (1e-6, 0.02, 1.0)
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  delta: 1e-7\nclient:\n  lr: [1e-1, 5e-2]\n")
    loaded = load_config(str(path))
    assert loaded.run.delta == 1e-7 and tuple(loaded.client.lr) == (0.1, 0.05)


@pytest.mark.slow
def test_a_bare_sweep_stores_under_runs_and_names_each_point(tmp_path, monkeypatch, capsys):
    """Without --store the store is runs/<grid file name> under the working directory (not beside the grid file),
    and each finished point is printed with its label."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grids").mkdir()
    (tmp_path / "grids" / "lr.yaml").write_text(json.dumps({"base": TINY, "grid": {"client.lr": [0.05]}}))
    (point,) = load_grid(str(tmp_path / "grids" / "lr.yaml"))
    assert cli_main(["sweep", "grids/lr.yaml"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"done {point.config_hash}  {point.label}" and point.label == "lr=0.05"
    assert json.loads(lines[-1])["store"] == os.path.join("runs", "lr")
    assert [r["config_hash"] for r in ResultsStore(str(tmp_path / "runs" / "lr")).records()] == [point.config_hash]
    assert not os.path.exists(tmp_path / "grids" / "results")
