"""A run directory records what produced it (run.json, one session per start or resume), and records built from it
carry those versions, not those of the process that reads them."""

import json
import re

import jax
import pytest

from fedjaxpriv.config import ExperimentConfig, with_overrides
from fedjaxpriv.experiment import Experiment
from fedjaxpriv.results import package_versions, record_from_run_dir

TINY = ["data.num_clients=4", "model.name=logreg", "client.local_steps=1", "client.batch_size=8",
        "server.clients_per_round=2", "run.checkpoint_every=1", "run.eval_every=1"]


@pytest.mark.slow
def test_run_json_records_each_session_and_records_read_it(tmp_path):
    out = str(tmp_path / "run")
    config = with_overrides(ExperimentConfig(), [*TINY, "run.rounds=2"])
    Experiment(config).run(out, progress=False, rounds=1)  # interrupted after round 1 ...
    Experiment(config).run(out, progress=False)           # ... and resumed to round 2
    sessions = json.loads((tmp_path / "run" / "run.json").read_text())["sessions"]
    assert [s["last_round"] for s in sessions] == [1, 2]
    first = sessions[0]
    assert first["versions"] == package_versions()
    assert first["backend"] == jax.default_backend() and first["device_count"] == jax.device_count()
    assert first["device_kind"] == jax.devices()[0].device_kind and first["process_count"] == 1
    assert first["started_at"] <= first["ended_at"] <= sessions[1]["started_at"]
    revision = first["code_revision"]
    assert revision is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", revision), revision
    # A record read later takes the versions of the session that finished the run, not the reader's.
    sessions[1]["versions"] = {**sessions[1]["versions"], "jax": "0.0.1-elsewhere"}
    (tmp_path / "run" / "run.json").write_text(json.dumps({"sessions": sessions}))
    record = record_from_run_dir(out)
    assert record["versions"]["jax"] == "0.0.1-elsewhere" and len(record["sessions"]) == 2


def test_an_unreadable_run_json_is_replaced_not_fatal(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{not json")
    config = with_overrides(ExperimentConfig(), [*TINY, "run.rounds=1"])
    Experiment(config).run(str(out), progress=False)
    sessions = json.loads((out / "run.json").read_text())["sessions"]
    assert len(sessions) == 1 and sessions[0]["last_round"] == 1


@pytest.mark.slow
def test_starting_over_forgets_the_old_sessions(tmp_path):
    out = str(tmp_path / "run")
    config = with_overrides(ExperimentConfig(), [*TINY, "run.rounds=1"])
    Experiment(config).run(out, progress=False)
    Experiment(config).run(out, progress=False, resume=False)
    assert len(json.loads((tmp_path / "run" / "run.json").read_text())["sessions"]) == 1
