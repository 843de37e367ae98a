"""The results store: a summary line per run, each history in a file of its own, and a DataFrame view."""

import json
import os

import pytest

from fedjaxpriv.results import ResultsStore


def _record(index: int, rounds: int = 3) -> dict:
    history = [{"round": r + 1, "test_accuracy": 0.1 * r + index / 100, "bytes_total": 1000.0 * (r + 1)}
               for r in range(rounds)]
    return {"config_hash": f"h{index:03d}", "label": f"run {index}", "seed": index,
            "overrides": {"client.lr": 0.01 * (index + 1), "message.quant_bits": index % 3},
            "final": {k: v for k, v in history[-1].items() if k != "round"}, "history": history,
            "run_dir": None, "finished_at": "2026-12-01T00:00:00+00:00"}


def test_summaries_and_histories_round_trip_and_the_summary_line_holds_no_history(tmp_path):
    store = ResultsStore(str(tmp_path))
    written = [_record(i, rounds=2 + i) for i in range(3)]
    for record in written:
        store.append(record)
    lines = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert all("history" not in line for line in lines)
    assert [line["history_rounds"] for line in lines] == [2, 3, 4]
    assert all(os.path.isfile(tmp_path / line["history_file"]) for line in lines)
    read = store.records()
    assert [{k: v for k, v in r.items() if not k.startswith("history_")} for r in read] == written
    assert all("history" not in r for r in store.records(history=False))
    assert store.completed_hashes() == {"h000", "h001", "h002"}


def test_records_written_with_inline_histories_still_read(tmp_path):
    store = ResultsStore(str(tmp_path))
    old = _record(7)
    with open(tmp_path / "results.jsonl", "w") as f:
        f.write(json.dumps(old) + "\n")
    store.append(_record(8))
    assert [r["history"] for r in store.records()] == [old["history"], _record(8)["history"]]


def test_a_lost_history_file_is_named_and_read_as_empty(tmp_path):
    store = ResultsStore(str(tmp_path))
    store.append(_record(1))
    (line,) = [json.loads(x) for x in open(tmp_path / "results.jsonl")]
    os.remove(tmp_path / line["history_file"])
    with pytest.warns(UserWarning, match="history of run h001 is unreadable"):
        (record,) = store.records()
    assert record["history"] == [] and record["final"] == _record(1)["final"]


def test_to_frame_has_a_row_per_run_with_overrides_and_final_metrics(tmp_path):
    pytest.importorskip("pandas")
    store = ResultsStore(str(tmp_path))
    for i in range(4):
        store.append(_record(i, rounds=i + 1))
    frame = store.to_frame()
    assert list(frame["config_hash"]) == ["h000", "h001", "h002", "h003"]
    assert list(frame["history_rounds"]) == [1, 2, 3, 4]
    assert list(frame["client.lr"]) == [0.01, 0.02, 0.03, 0.04]
    assert list(frame["message.quant_bits"]) == [0, 1, 2, 0]
    assert list(frame["test_accuracy"]) == [_record(i, rounds=i + 1)["final"]["test_accuracy"] for i in range(4)]
    assert list(frame["bytes_total"]) == [1000.0, 2000.0, 3000.0, 4000.0]
