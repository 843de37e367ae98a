"""Uniform vs device-aware client settings on one simulated device population (accuracy and cost).

    python sweeps/compare_device_policies.py [--rounds 20] [--clients 30] [--out runs/devices]

Each policy runs as a ``DeviceExperiment`` (stragglers and dropouts leave the cohort; every history record
gets cost fields); the records go to ``OUT/results.jsonl`` and ``fedjaxpriv report`` can plot them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np

from fedjaxpriv.config import from_dict
from fedjaxpriv.devices import DevicePolicy, DeviceExperiment, sample_profiles
from fedjaxpriv.results import ResultsStore, make_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--deadline", type=float, default=0.8, help="round deadline, seconds")
    parser.add_argument("--out", default="runs/devices")
    args = parser.parse_args()
    config = from_dict({"name": "devices", "data": {"num_clients": args.clients},
                        "client": {"local_steps": 20, "batch_size": 16, "lr": 0.1},
                        "server": {"clients_per_round": 10}, "run": {"rounds": args.rounds, "eval_every": 5}})
    profiles = sample_profiles(args.clients, seed=0, jitter=0.3)
    # privacy tiers off here: this compares compute/memory/bandwidth adaptation only
    profiles = profiles._replace(target_epsilon=np.full(args.clients, np.inf))
    store = ResultsStore(args.out)
    for kind, stragglers in (("uniform", "drop"), ("uniform", "fewer_steps"), ("device_aware", "drop")):
        policy = DevicePolicy(kind=kind, stragglers=stragglers, num_params=4810, round_deadline_s=args.deadline,
                              max_local_steps=40, train_memory_factor=40.0, rounds=args.rounds,
                              client_rate=10 / args.clients)
        named = dataclasses.replace(config, name=f"devices-{kind}-{stragglers}")
        experiment = DeviceExperiment(named, profiles, policy)
        results = experiment.run(None, progress=False)
        history = results.history
        summary = {
            "policy": f"{kind}/{stragglers}",
            "stragglers": int(experiment.stragglers.sum()),
            "participants_mean": float(np.mean([r["participants"] for r in history])),
            "final_accuracy": results.final("test_accuracy"),
            "wall_time_s_per_round": float(np.mean([r["cost_wall_time_s"] for r in history])),
            "energy_j_total": float(np.sum([r["cost_energy_j"] for r in history])),
            "megabytes_uploaded": float(np.sum([r["bytes_total"] for r in history]) / 1e6),
        }
        print(json.dumps(summary))
        store.append(make_record(named, history, label=summary["policy"], overrides={"policy": summary["policy"]}))
    print(f"records in {os.path.abspath(store.path)}; plot with: fedjaxpriv report {args.out} --out {args.out}/report")


if __name__ == "__main__":
    main()
