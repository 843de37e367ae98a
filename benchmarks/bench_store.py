"""Results store at sweep scale: a sweep's start and a report over 1,000 runs of 200 rounds each.

Compares, in one process, the store's layout (a summary line per run, each history in a file of its own) with
the same records written with their histories inline in ``results.jsonl``:

  * start: ``completed_hashes()``, what every sweep start reads;
  * frame: ``to_frame()``, a DataFrame of overrides and final metrics (summaries only);
  * report: ``records()``, every history too (what plots of metric against round need).

    python benchmarks/bench_store.py [--runs 1000] [--rounds 200]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from fedjaxpriv.results import ResultsStore

METRICS = ("test_accuracy", "test_loss", "train_loss", "epsilon_max", "bytes_total", "update_norm_mean")


def make_record(index: int, rounds: int) -> dict:
    history = [{"round": r + 1, **{m: 0.001 * (r + index) + k for k, m in enumerate(METRICS)}} for r in range(rounds)]
    return {"config_hash": f"{index:012x}", "label": f"point {index}", "seed": index % 5,
            "overrides": {"client.lr": 0.01 * (1 + index % 7), "message.quant_bits": index % 9},
            "config": {"client": {"lr": 0.01 * (1 + index % 7)}}, "final": dict(history[-1]), "history": history,
            "run_dir": None, "finished_at": "2026-12-01T00:00:00+00:00"}


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        split, inline = ResultsStore(os.path.join(root, "split")), ResultsStore(os.path.join(root, "inline"))
        os.makedirs(os.path.dirname(inline.path))
        with open(inline.path, "w") as f:
            for i in range(args.runs):
                record = make_record(i, args.rounds)
                split.append(record)
                f.write(json.dumps(record, sort_keys=True) + "\n")
        sizes = {name: os.path.getsize(store.path) / 2**20 for name, store in (("split", split), ("inline", inline))}
        print(f"{args.runs} runs x {args.rounds} rounds; results.jsonl: {sizes['split']:.2f} MiB (summaries) vs "
              f"{sizes['inline']:.2f} MiB (histories inline)")
        print(f"{'operation':<28}{'summaries':>12}{'inline':>12}{'ratio':>8}")
        for name, op in (("start (completed_hashes)", lambda s: s.completed_hashes()),
                         ("frame (to_frame)", lambda s: s.to_frame()),
                         ("report (records, histories)", lambda s: s.records())):
            ours, theirs = best_of(lambda: op(split)), best_of(lambda: op(inline))
            print(f"{name:<28}{ours:>11.3f}s{theirs:>11.3f}s{theirs / ours:>7.1f}x")


if __name__ == "__main__":
    main()
