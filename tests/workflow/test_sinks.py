"""Logging sinks (``run.log``, ``fedjaxpriv.sinks``): real runs write real TensorBoard event files and W&B offline
runs, read back with each library's own reader and compared with history.jsonl; bad sinks are clear errors before
anything trains; a user's own sink gets every round once and is always closed."""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import subprocess
import sys
import zlib

import pytest

from fedjaxpriv.config import ExperimentConfig, from_dict, with_overrides
from fedjaxpriv.experiment import Experiment
from fedjaxpriv.sinks import SINK_NAMES, Sink, check_sinks, numeric_metrics, open_sinks

TINY = {"data": {"num_clients": 4}, "model": {"hidden": [8]}, "server": {"clients_per_round": 2},
        "client": {"local_steps": 2}, "run": {"rounds": 3}}


def tiny(log: list[str], **run) -> ExperimentConfig:
    return from_dict({**TINY, "run": {**TINY["run"], "log": log, **run}})


def read_history(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "history.jsonl")) as f:
        return [json.loads(line) for line in f]


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in ``log_dir``, as TensorBoard itself reads the directory (all event files, purges
    applied)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})  # 0: keep every event
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def assert_matches_history(scalars, history, rounds):
    assert {tag: [step for step, _ in series] for tag, series in scalars.items()} == {
        tag: list(rounds) for tag in scalars}, "every series has each round once, in order"
    for key in ("test_accuracy", "train_loss"):
        assert [value for _, value in scalars[key]] == pytest.approx([r[key] for r in history], rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_tensorboard_event_files_hold_each_rounds_metrics(tmp_path):
    run_dir = tmp_path / "run"
    results = Experiment(tiny(["jsonl", "tensorboard"])).run(str(run_dir), progress=False)
    history = read_history(run_dir)
    assert [r["round"] for r in history] == [1, 2, 3] and len(results.history) == 3
    assert glob.glob(str(run_dir / "tensorboard" / "events.out.tfevents.*"))
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert_matches_history(scalars, history, [1, 2, 3])
    # One series per finite numeric metric (strings and the round number are not scalars).
    assert set(scalars) == set().union(*(numeric_metrics(r) for r in results.history))
    assert not {k for r in results.history for k, v in r.items() if isinstance(v, str)} & set(scalars)


@pytest.mark.slow
def test_a_resumed_run_shows_each_round_once_in_tensorboard(tmp_path):
    run_dir = str(tmp_path / "run")
    config = tiny(["tensorboard"], rounds=4, checkpoint_every=2)

    def crash_in_round_3(experiment, record):
        if record["round"] == 3:  # after the sinks logged round 3, which is not checkpointed (every 2 rounds)
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        Experiment(config).run(run_dir, progress=False, callbacks=[crash_in_round_3])
    assert [s for s, _ in tensorboard_scalars(os.path.join(run_dir, "tensorboard"))["train_loss"]] == [1, 2, 3]
    Experiment(config).run(run_dir, progress=False)  # resumes from round 2's checkpoint: rounds 3 and 4 again
    assert len(glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))) == 2
    assert_matches_history(tensorboard_scalars(os.path.join(run_dir, "tensorboard")), read_history(run_dir),
                           [1, 2, 3, 4])


def read_wandb_records(path: str) -> list:
    """The records of a ``.wandb`` file, decoded with W&B's own protobuf schema (``wandb_internal_pb2.Record``).

    wandb 0.31 has no Python reader of its own for the file (its writer and reader are in the Go ``wandb-core``),
    so the framing is read here: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks,
    each with a CRC-32 (of its type byte and data), a length and a type (1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, "corrupt chunk"
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.slow
def test_wandb_offline_run_holds_each_rounds_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for variable, folder in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                             ("WANDB_DATA_DIR", "data"), ("XDG_CACHE_HOME", "xdg-cache")):
        monkeypatch.setenv(variable, str(tmp_path / folder))  # W&B's own files (its service's logs) stay in here
    run_dir = tmp_path / "run"
    config = tiny(["jsonl", "wandb"])
    Experiment(config).run(str(run_dir), progress=False)
    history = read_history(run_dir)
    [offline] = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    [store] = glob.glob(os.path.join(offline, "run-*.wandb"))
    records = read_wandb_records(store)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "exit" in kinds, "the run was finished (the sink was closed)"
    [run] = [r.run for r in records if r.HasField("run")]
    assert run.display_name == config.name
    logged_config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert logged_config["run"]["rounds"] == 3 and logged_config["data"]["num_clients"] == 4
    assert logged_config["run"]["log"] == ["jsonl", "wandb"]
    steps = []
    for r in records:
        if r.HasField("history"):
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            steps.append(items)
    assert [s["_step"] for s in steps] == [1, 2, 3]
    for key in ("test_accuracy", "train_loss", "bytes_total"):
        assert [s[key] for s in steps] == pytest.approx([h[key] for h in history], rel=1e-12)
    summary = {}
    for r in records:
        if r.HasField("summary"):
            summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in r.summary.update})
    assert summary["_step"] == 3
    assert summary["test_accuracy"] == pytest.approx(history[-1]["test_accuracy"], rel=1e-12)
    assert summary["train_loss"] == pytest.approx(history[-1]["train_loss"], rel=1e-12)


# -- bad input: clear errors before anything trains ---------------------------------------------------------------
@pytest.mark.parametrize("given", [["jsonl", "mlflow"], "tensorbord", ["csv"]])
def test_an_unknown_sink_is_a_config_error(given):
    allowed = "allowed: a list, each one of ['jsonl', 'tensorboard', 'wandb']"
    with pytest.raises(ValueError, match=r"^run\.log=.* is invalid; " + allowed.replace("[", r"\[").replace(
            "]", r"\]").replace(".", r"\.")):
        from_dict({"run": {"log": given}})
    text = f"run.log=[{','.join(given)}]" if isinstance(given, list) else f"run.log={given}"
    with pytest.raises(ValueError, match=r"run\.log=.*" + (given[-1] if isinstance(given, list) else given)):
        with_overrides(ExperimentConfig(), [text])  # the command line's --set


def test_an_unknown_sink_passed_directly_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"run\.log=\['jsonl', 'mlflow'\] is invalid; allowed: .*'tensorboard'"
                                         r".*unknown: \['mlflow'\]"):
        open_sinks(["jsonl", "mlflow"], str(tmp_path), ExperimentConfig())
    assert not os.listdir(tmp_path)


def test_sink_lists_have_one_spelling():
    assert from_dict({"run": {"log": ["tensorboard", "tensorboard", "wandb"]}}).run.log == (
        "jsonl", "tensorboard", "wandb")
    assert with_overrides(ExperimentConfig(), ["run.log=[wandb,jsonl,tensorboard]"]).run.log == SINK_NAMES
    assert with_overrides(ExperimentConfig(), ["run.log=tensorboard"]).run.log == ("jsonl", "tensorboard")
    for same in (["jsonl"], [], "jsonl"):  # the default: every earlier run's hash is kept
        assert from_dict({"run": {"log": same}}).config_hash() == ExperimentConfig().config_hash()


@pytest.fixture(scope="module")
def experiments():
    """Experiments of the tiny config by sink list, built once (they are not run unless a test means to)."""
    built: dict[tuple[str, ...], Experiment] = {}

    def get(*log: str) -> Experiment:
        config = tiny(list(log))
        if config.run.log not in built:
            built[config.run.log] = Experiment(config)
        return built[config.run.log]

    return get


@pytest.mark.parametrize("sink, module, extra", [("wandb", "wandb", "wandb"),
                                                 ("tensorboard", "tensorboardX", "tensorboard")])
def test_a_sink_without_its_package_fails_before_training(sink, module, extra, tmp_path, monkeypatch,
                                                          experiments):
    monkeypatch.setitem(sys.modules, module, None)  # ``import <module>`` now raises ImportError
    with pytest.raises(ImportError):
        __import__(module)
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError) as error:
        experiments("jsonl", sink).run(str(run_dir), progress=False)
    message = str(error.value)
    assert message.startswith(f"run.log=['jsonl', '{sink}'] is invalid here: the '{sink}' sink needs the {module} "
                              "package, which cannot be imported")
    assert f'pip install "fedjaxpriv[{extra}]"' in message
    assert not run_dir.exists(), "nothing was written: no config.json, no history.jsonl"


def test_an_unwritable_log_directory_fails_before_training(tmp_path, experiments):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file, not a directory")
    run_dir = blocker / "run"
    with pytest.raises(ValueError) as error:
        experiments("jsonl", "tensorboard").run(str(run_dir), progress=False)
    message = str(error.value)
    assert message.startswith("run.log=['jsonl', 'tensorboard'] is invalid here: the tensorboard sink writes to "
                              f"{str(run_dir / 'tensorboard')!r}, which cannot be created ({str(blocker)!r} is not "
                              "a directory)")
    assert blocker.read_text() == "a regular file, not a directory"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes read-only directories")
def test_a_read_only_run_directory_fails_before_training(tmp_path, experiments):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=r"the tensorboard sink writes to .*run/tensorboard.*not writable"):
            experiments("jsonl", "tensorboard").run(str(run_dir), progress=False)
        assert not os.listdir(run_dir)
    finally:
        run_dir.chmod(0o700)


def test_file_sinks_without_a_run_directory_are_skipped_with_a_warning():
    with pytest.warns(UserWarning, match=r"run\.log=\['jsonl', 'tensorboard', 'wandb'\]: this run has no run "
                                         r"directory \(out_dir=None\), so the \['tensorboard', 'wandb'\] sink"):
        assert check_sinks(SINK_NAMES, None) == ["jsonl"]


# -- a user's own sink ----------------------------------------------------------------------------------------------
class ListSink:
    def __init__(self) -> None:
        self.rounds, self.records, self.closed = [], [], 0

    def write(self, round, record):
        self.rounds.append(round)
        self.records.append(dict(record))
        with pytest.raises(TypeError):
            record["round"] = 0  # read-only: the history is not the sink's to change

    def close(self):
        self.closed += 1


def test_a_user_sink_gets_every_round_once(experiments):
    sink = ListSink()
    assert isinstance(sink, Sink)
    results = experiments("jsonl").run(progress=False, sinks=[sink])
    assert sink.rounds == [1, 2, 3]
    assert sink.records == results.history
    assert sink.closed == 1


def test_a_user_sink_is_closed_when_the_run_fails(tmp_path, experiments):
    sink = ListSink()

    def fail(experiment, record):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        experiments("jsonl").run(str(tmp_path / "run"), progress=False, sinks=[sink], callbacks=[fail])
    assert sink.rounds == [1] and sink.closed == 1  # sinks write before the callbacks


def test_a_sink_that_is_not_one_is_refused(experiments):
    with pytest.raises(ValueError, match=r"sinks\[0\]=.* is invalid; allowed: an object with write\(round, record\) "
                                         r"and close\(\)"):
        experiments("jsonl").run(progress=False, sinks=[print])


def test_numeric_metrics_are_the_finite_numbers():
    import numpy as np

    record = {"round": 2, "a": 1, "b": 0.5, "c": np.float32(0.25), "s": "rdp", "inf": math.inf, "nan": math.nan,
              "flag": True}
    assert numeric_metrics(record) == {"a": 1.0, "b": 0.5, "c": 0.25}


@pytest.mark.slow
def test_importing_the_package_imports_neither_logging_library():
    code = ("import sys, fedjaxpriv, fedjaxpriv.config, fedjaxpriv.sinks, fedjaxpriv.experiment; "
            "print(sorted(m for m in ('tensorboardX', 'wandb', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"


def test_logging_sinks_do_not_change_the_config_hash():
    """Where a run reports is not what it computes: the hash (run directories, sweep points) ignores run.log."""
    plain = from_dict({"run": {"rounds": 3}})
    logged = from_dict({"run": {"rounds": 3, "log": ["jsonl", "tensorboard", "wandb"]}})
    assert logged.config_hash() == plain.config_hash() != from_dict({"run": {"rounds": 4}}).config_hash()
