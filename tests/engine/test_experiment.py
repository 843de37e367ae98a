"""End to end: accuracy on digits, no recompilation, interrupt/resume, config validation, CLI."""

import json
import os
import subprocess
import warnings
import sys

import jax
import numpy as np
import pytest

from fedjaxpriv.cli import main as cli_main
from fedjaxpriv.config import ExperimentConfig, from_dict, with_overrides
from fedjaxpriv.experiment import Experiment
from fedjaxpriv import parallel
from fedjaxpriv.parallel import use_cpu_cores

SHORT = {"data": {"num_clients": 20}, "run": {"rounds": 6, "eval_every": 3}, "server": {"clients_per_round": 5}}


@pytest.mark.slow
def test_fedavg_on_digits_reaches_90_percent():
    config = from_dict({"data": {"num_clients": 30, "partition": "dirichlet", "dirichlet_alpha": 0.5},
                        "client": {"local_steps": 10, "batch_size": 16, "lr": 0.1},
                        "server": {"clients_per_round": 10}, "run": {"rounds": 40, "eval_every": 40}})
    experiment = Experiment(config)
    results = experiment.run(progress=False)
    assert results.final("test_accuracy") >= 0.90
    # The per-client figures: the final model's accuracy on each client's own examples, computed here directly.
    p = experiment.population
    own = [np.mean(np.argmax(np.asarray(experiment.model.apply(results.params, p.x[o:o + c])), -1) == p.y[o:o + c])
           for o, c in zip(p.offsets, p.counts) if c > 0]
    recorded = [results.final(f"client_accuracy_{k}") for k in ("mean", "p10", "p50", "p90")]
    np.testing.assert_allclose(recorded, [np.mean(own), *np.percentile(own, [10, 50, 90])], atol=1e-6)


@pytest.mark.slow
def test_rounds_never_recompile():
    experiment = Experiment(from_dict(SHORT))
    experiment.run(progress=False)
    assert experiment.round_fn._cache_size() == 1


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    config = from_dict({**SHORT, "run": {"rounds": 6, "eval_every": 1, "checkpoint_every": 2}})
    full = Experiment(config).run(str(tmp_path / "full"), progress=False)

    def stop_after_round_3(_, record):
        if record["round"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Experiment(config).run(str(tmp_path / "cut"), progress=False, callbacks=[stop_after_round_3])
    saved = [json.loads(l)["round"] for l in open(tmp_path / "cut" / "history.jsonl")]
    assert saved == [1, 2, 3]  # the interrupt saved the finished third round although checkpoint_every=2
    resumed = Experiment(config).run(str(tmp_path / "cut"), progress=False)
    assert [r["round"] for r in resumed.history] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full.history, resumed.history):
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)
    np.testing.assert_allclose(np.asarray(resumed.params["Dense_0"]["kernel"]),
                               np.asarray(full.params["Dense_0"]["kernel"]), atol=1e-6)


@pytest.mark.parametrize("override,field", [
    ("client.prune_sparsity=1.0", "client.prune_sparsity"),
    ("client.lr=-0.1", "client.lr"),
    ("client.lr=[0.1, -2]", "client.lr"),
    ("server.clients_per_round=500", "server.clients_per_round"),
    ("data.partition=bogus", "data.partition"),
    ("run.delta=1.5", "run.delta"),
    ("client.dp_noise_multiplier=-1", "client.dp_noise_multiplier"),
    ("client.target_epsilon=0", "client.target_epsilon"),
    ("server.central_noise_multiplier=1.0", "server.central_clip_norm"),
    ("client.nonsense=3", "client.nonsense"),
])
def test_bad_config_names_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        with_overrides(ExperimentConfig(), [override])


def test_unknown_dataset_fails_before_training():
    with pytest.raises(ValueError, match="data.dataset='mnist3' is invalid; allowed: one of"):
        Experiment(with_overrides(ExperimentConfig(), ["data.dataset=mnist3"]))


def test_dp_noise_without_clip_is_rejected():
    config = with_overrides(ExperimentConfig(), ["client.dp_noise_multiplier=1.0"])
    with pytest.raises(ValueError, match="dp_clip_norm=inf"):
        Experiment(config)


@pytest.mark.slow
def test_cli_runs_and_writes_history(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["run", "--quiet", "--out", str(out), "--set", "run.rounds=2", "--set", "data.num_clients=10",
                     "--set", "server.clients_per_round=4"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lines = (out / "history.csv").read_text().splitlines()
    assert lines[0].startswith("round,") and len(lines) == 3
    last = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
    assert summary["round"] == last["round"] == 2 and summary["test_accuracy"] == last["test_accuracy"]
    column = lines[0].split(",").index("test_accuracy")
    assert float(lines[-1].split(",")[column]) == pytest.approx(last["test_accuracy"], rel=1e-12)
    code = cli_main(["run", "--quiet", "--out", str(out), "--set", "client.prune_sparsity=2"])
    assert code == 2
    assert "client.prune_sparsity=2" in capsys.readouterr().err


@pytest.mark.slow
def test_no_resume_starts_over_in_the_same_directory(tmp_path):
    out = str(tmp_path / "run")
    Experiment(from_dict({**SHORT, "run": {"rounds": 3}})).run(out, progress=False)
    other = from_dict({**SHORT, "client": {"lr": 0.05}, "run": {"rounds": 2}})
    with pytest.raises(ValueError, match="different config"):
        Experiment(other).run(out, progress=False)
    results = Experiment(other).run(out, progress=False, resume=False)
    rounds = [json.loads(line)["round"] for line in open(tmp_path / "run" / "history.jsonl")]
    assert rounds == [1, 2] and [r["round"] for r in results.history] == [1, 2]


@pytest.mark.slow
def test_clients_are_sharded_over_all_devices_by_default_with_the_same_result(monkeypatch):
    """8 devices equal 1 (Ditto with top-k and error feedback: every client keeps a personal model and a residual);
    with run.shard_data each device holds 1/8 of the examples, of the clients' states and of their settings (20
    clients, padded to 24), and the run is the same bit for bit, personal models' figures included."""
    if jax.device_count() < 2:
        pytest.skip("needs several devices (tests/conftest.py sets 8 CPU devices)")
    config = {**SHORT, "message": {"topk_fraction": 0.3, "error_feedback": True},
              "server": {**SHORT["server"], "algorithm": "ditto"}}
    sharded = Experiment(from_dict(config))
    assert sharded.mesh is not None and sharded.mesh.size == jax.device_count()
    single = Experiment(from_dict({**config, "run": {**SHORT["run"], "num_devices": 1}}))
    assert single.mesh is None
    a, b = sharded.run(progress=False), single.run(progress=False)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    assert a.final("test_accuracy") == b.final("test_accuracy")
    split = Experiment(from_dict({**config, "run": {**SHORT["run"], "shard_data": True}}))
    examples, clients = len(split.population.x), split.population.num_clients
    assert {s.data.shape[0] for s in split.device_population.x.addressable_shards} == {-(-examples // 8)}
    assert {s.data.shape[0] for s in sharded.device_population.x.addressable_shards} == {examples}
    residuals = jax.tree_util.tree_leaves(split.initial_state.client_state)
    assert residuals and all({s.data.shape[0] for s in leaf.addressable_shards} == {-(-clients // 8)}
                             for leaf in residuals)
    settings = jax.tree_util.tree_leaves(split.device_settings)  # split like the states
    assert settings and all({s.data.shape[0] for s in leaf.addressable_shards} == {-(-clients // 8)}
                            for leaf in settings)
    assert sharded.shard_width is None  # by default a copy, while it takes under a quarter of a device
    monkeypatch.setattr(parallel, "SPLIT_ABOVE_FRACTION", 0.0)  # any copy is too large: the default splits
    auto = Experiment(from_dict(config))
    assert auto.shard_width == split.shard_width == int(np.max(auto.population.counts))
    assert {s.data.shape[0] for s in auto.device_population.x.addressable_shards} == {-(-examples // 8)}
    c = split.run(progress=False)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(c.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in c.history]
    personal = [k for k in a.history[-1] if "personal" in k]
    assert personal and all(a.history[-1][k] == c.history[-1][k] for k in personal)
    with pytest.raises(ValueError, match="run.shard_data=true needs run.strategy 'vmap' or 'loop'.*'host'"):
        Experiment(from_dict({**SHORT, "run": {"shard_data": True, "strategy": "host"}}))
    with pytest.raises(ValueError, match="run.num_devices.*num_devices=9"):
        Experiment(from_dict({**SHORT, "run": {"num_devices": jax.device_count() + 1}}))


@pytest.mark.slow
def test_use_cpu_cores_sets_the_device_count_before_jax_starts_and_refuses_after():
    code = ("import jax\nfrom fedjaxpriv.parallel import use_cpu_cores\n"
            "print(use_cpu_cores(3), len(jax.devices('cpu')))\n"
            "print(use_cpu_cores(3))\n"
            "try:\n    use_cpu_cores(2)\nexcept RuntimeError as error:\n    print('refused:', error)\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                         text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert lines[:2] == ["3 3", "3"], out.stderr[-2000:]
    assert lines[2].startswith("refused: JAX already started with 3 CPU device(s), so 2 cannot be set")
    with pytest.raises(ValueError, match="num_devices=0"):
        use_cpu_cores(0)


@pytest.mark.slow
def test_a_checkpoint_resumes_on_another_device_count_and_with_the_data_copied_instead_of_split(tmp_path,
                                                                                                monkeypatch):
    """A checkpoint holds one row per client (not the rows padding to the devices adds): a run split over 8 devices
    (its copy "too large": 20 clients' states padded to 24 rows), stopped after round 2, resumes split over 3
    devices (padded to 21), and with a copy per device (as on a machine with more memory), and each ends exactly
    where the run never stopped ends."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 CPU devices)")
    from fedjaxpriv.guards import RunInterrupted

    config = from_dict({**SHORT, "message": {"topk_fraction": 0.3, "error_feedback": True},
                        "server": {**SHORT["server"], "algorithm": "ditto"},
                        "run": {**SHORT["run"], "rounds": 4, "eval_every": 4}})
    whole = Experiment(config, progress=False).run(progress=False)

    def stop_after_round_2(experiment, record):
        if record["round"] == 2:
            raise RunInterrupted(2)

    for name, mesh, fraction in (("three", parallel.local_mesh(3), 0.0),
                                 ("copied", None, parallel.SPLIT_ABOVE_FRACTION)):
        out = str(tmp_path / name)
        monkeypatch.setattr(parallel, "SPLIT_ABOVE_FRACTION", 0.0)  # any copy is too large: the data are split
        stopped = Experiment(config, progress=False)
        assert stopped.shard_width is not None and stopped.mesh.size == 8
        with pytest.raises(RunInterrupted):
            stopped.run(out, progress=False, callbacks=[stop_after_round_2])
        monkeypatch.setattr(parallel, "SPLIT_ABOVE_FRACTION", fraction)
        resumed_on = Experiment(config, mesh=mesh, progress=False)
        assert (resumed_on.shard_width is None) == (name == "copied")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no checkpoint set aside, no starting over
            resumed = resumed_on.run(out, progress=False)
        assert [r["round"] for r in resumed.history] == [1, 2, 3, 4]
        for x, y in zip(jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(resumed.params)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
        assert resumed.history[-1]["train_loss"] == pytest.approx(whole.history[-1]["train_loss"], abs=1e-6)
