"""A run directory: config.json, history.jsonl/history.csv and orbax checkpoints of the server state.

Resuming restores the latest checkpoint and keeps the history records of the rounds it covers; rounds
after it are recomputed (deterministically, since every key derives from the seed and the round).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedjaxpriv.config import ExperimentConfig
from fedjaxpriv.results import jsonable, write_csv


_NON_FINITE = {"inf": float("inf"), "-inf": float("-inf")}


def read_history(path: str) -> list[dict[str, Any]]:
    """Reads a history.jsonl file (one record per round); the "inf" / "-inf" that JSON cannot hold become floats
    again, so a resumed history equals the one that was written."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [{k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in json.loads(line).items()}
                for line in f if line.strip()]


class RunStore:
    """The files of one run. Refuses to resume a directory written by a different config; ``fresh=True``
    deletes what an earlier run left there (history, per-client table, checkpoints) and starts over."""

    def __init__(self, out_dir: str, config: ExperimentConfig, max_to_keep: int = 2, fresh: bool = False) -> None:
        self.out_dir = os.path.abspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.config = config
        config_path = os.path.join(self.out_dir, "config.json")
        if fresh:
            for name in ("config.json", "history.jsonl", "history.csv", "clients.csv"):
                if os.path.exists(os.path.join(self.out_dir, name)):
                    os.remove(os.path.join(self.out_dir, name))
            shutil.rmtree(os.path.join(self.out_dir, "checkpoints"), ignore_errors=True)
        if os.path.exists(config_path):
            with open(config_path) as f:
                previous = json.load(f)
            if previous.get("config_hash") != config.config_hash():
                raise ValueError(f"{self.out_dir} holds a run of a different config (hash "
                                 f"{previous.get('config_hash')} != {config.config_hash()}); choose another --out "
                                 "directory or delete it.")
        else:
            with open(config_path, "w") as f:
                json.dump({"config_hash": config.config_hash(), "config": config.to_dict()}, f, indent=2,
                          default=str)
        self.history_path = os.path.join(self.out_dir, "history.jsonl")
        self.manager = ocp.CheckpointManager(
            os.path.join(self.out_dir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False))

    def restore(self, template: Any) -> tuple[Any, list[dict[str, Any]], dict[str, Any]] | None:
        """(state, history up to the checkpoint, privacy state saved with it) from the latest checkpoint, or None
        if there is none."""
        step = self.manager.latest_step()
        if step is None:
            if os.path.exists(self.history_path):
                os.remove(self.history_path)
            return None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), privacy=ocp.args.JsonRestore()))
        state, privacy = restored["state"], dict(restored["privacy"])
        history = [r for r in read_history(self.history_path) if r["round"] <= step]
        with open(self.history_path, "w") as f:
            for record in history:
                f.write(json.dumps(jsonable(record)) + "\n")
        return state, history, privacy

    def append(self, record: dict[str, Any]) -> None:
        with open(self.history_path, "a") as f:
            f.write(json.dumps(jsonable(record)) + "\n")
            f.flush()

    def save(self, state: Any, privacy: dict[str, Any]) -> None:
        """Checkpoints the server state and the privacy spent so far (``PrivacyTracker.state``) under the round
        number (the number of finished rounds): a resumed run continues both from the same round."""
        self.manager.save(int(state.round), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), privacy=ocp.args.JsonSave(privacy)), force=True)
        self.manager.wait_until_finished()

    def close(self, per_client: dict[str, np.ndarray] | None = None) -> None:
        """Finishes the run files: history.csv, and clients.csv with per-client arrays (e.g. epsilons)."""
        self.manager.close()
        history = read_history(self.history_path)
        if history:
            write_csv(os.path.join(self.out_dir, "history.csv"), history)
        if per_client:
            num_clients = len(next(iter(per_client.values())))
            rows = [{"client": i, **{k: v[i] for k, v in per_client.items()}} for i in range(num_clients)]
            write_csv(os.path.join(self.out_dir, "clients.csv"), rows)
