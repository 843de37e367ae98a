"""Command line: ``fedjaxpriv run [--config FILE] [--set section.field=value ...] [--out DIR]``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedjaxpriv", description="Federated learning privacy simulator.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one experiment (default: FedAvg on the embedded digits data)")
    run.add_argument("--config", help="YAML or JSON config file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                     help="override a config field, e.g. --set client.lr=0.05 (repeatable)")
    run.add_argument("--out", default="runs/default", help="output directory (history, checkpoints)")
    run.add_argument("--no-resume", action="store_true", help="start over even if DIR has a checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bar or per-round lines")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def _run(args: argparse.Namespace) -> int:
    from fedjaxpriv.config import ExperimentConfig, load_config, with_overrides

    config = load_config(args.config, args.overrides) if args.config else with_overrides(ExperimentConfig(),
                                                                                           args.overrides)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2, default=str))
        return 0
    from fedjaxpriv.experiment import Experiment

    experiment = Experiment(config)

    def report(_: Experiment, record: dict) -> None:
        if args.quiet or "test_accuracy" not in record:
            return
        from tqdm.auto import tqdm

        tqdm.write(f"round {record['round']:4d}  test_accuracy {record['test_accuracy']:.4f}  "
                   f"test_loss {record['test_loss']:.4f}  train_loss {record['train_loss']:.4f}")

    results = experiment.run(args.out, resume=not args.no_resume, progress=not args.quiet, callbacks=[report])
    last = results.history[-1] if results.history else {}
    summary = {k: last[k] for k in ("round", "test_accuracy", "test_loss") if k in last}
    print(json.dumps({"out_dir": results.out_dir, **summary}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"fedjaxpriv: error: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
