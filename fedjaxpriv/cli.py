"""Command line.

    fedjaxpriv run [--config FILE] [--set section.field=value ...] [--out DIR]
    fedjaxpriv sweep GRID.yaml [--jobs N] [--store DIR] [--set section.field=value ...] [--dry-run]
                     [--wait-limit SECONDS]
    fedjaxpriv report STORE_OR_RUN_DIR [...] [--out DIR]
    fedjaxpriv attack-eval [--config FILE] [--set ...] [--defenses none,dpsgd,...|FILE.yaml] [--out DIR]
    fedjaxpriv audit [--config FILE] [--set ...] [--level example|local|client] [--canaries M]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Sequence

from fedjaxpriv.results import jsonable

if TYPE_CHECKING:
    from fedjaxpriv.config import ExperimentConfig


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, as every other error of the command line (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedjaxpriv", description="Federated learning privacy simulator.")
    parser.add_argument("--verbose", action="store_true",
                        help="let XLA's own log lines (e.g. its slow-compilation banner) and the tracebacks that "
                             "libraries report while a checkpoint fails to read or write through to the terminal")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one experiment (default: FedAvg on the embedded digits data)")
    run.add_argument("--config", help="YAML or JSON config file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                     help="override a config field, e.g. --set client.lr=0.05 (repeatable)")
    run.add_argument("--out", default="runs/default", help="output directory (history, checkpoints)")
    run.add_argument("--no-resume", action="store_true", help="start over even if DIR has a checkpoint")
    run.add_argument("--continue", dest="extend", action="store_true",
                     help="extend the run in --out to this config's run.rounds (raise it with --set run.rounds=N; "
                          "refused where the run was planned over its own number of rounds)")
    run.add_argument("--quiet", action="store_true", help="no progress bar or per-round lines")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    run.add_argument("--distributed", action="store_true",
                     help="one process of a multi-process run (start the same command on every process, with the "
                          "same --out on a shared file system): the cluster is found by JAX (SLURM, Open MPI, Cloud "
                          "TPU) unless --coordinator, --num-processes and --process-id name it")
    run.add_argument("--coordinator", metavar="HOST:PORT", help="with --distributed: process 0's address")
    run.add_argument("--num-processes", type=int, help="with --distributed: the number of processes")
    run.add_argument("--process-id", type=int, help="with --distributed: this process's id in [0, N)")
    run.add_argument("--heartbeat-timeout", type=int, metavar="SECONDS", default=None,
                     help="with --distributed: when a process dies, the others stop after missing its heartbeats "
                          "this long (default 100); started again, all resume from the last checkpoint")
    sweep = commands.add_parser("sweep", help="run every config of a grid file into one results store")
    sweep.add_argument("grid", help="grid YAML file (base config + grid/zip/variants/seeds)")
    sweep.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    sweep.add_argument("--store", default=None,
                       help="results store directory (results.jsonl, runs/; default runs/<grid file name>)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override a field of every config of the grid (repeatable)")
    sweep.add_argument("--dry-run", action="store_true", help="list the expanded configs and exit")
    sweep.add_argument("--wait-limit", type=float, default=None, metavar="SECONDS",
                       help="give up on a point another process has been running this long (default: wait)")
    report = commands.add_parser("report", help="plots and a summary table from results stores or run dirs")
    report.add_argument("sources", nargs="+", help="results store (dir or results.jsonl) or run directories")
    report.add_argument("--out", default="report", help="output directory for PNGs and summary.md/csv")
    attack = commands.add_parser("attack-eval", help="train each defense at several strengths, attack it, write the "
                                                     "privacy-utility frontier")
    attack.add_argument("--config", help="base YAML or JSON config file (default: the --preset's)")
    attack.add_argument("--preset", choices=("membership", "equal_utility"), default=None,
                        help="base run without --config: 'membership' (default; membership leaks most, DP trains "
                             "to near chance) or 'equal_utility' (100 clients: DP-FedAvg keeps most of the "
                             "accuracy, so defenses compare at equal utility)")
    attack.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a field of the base config (repeatable)")
    attack.add_argument("--defenses", default=None,
                        help="comma-separated built-in defenses (each run at several strengths), or a YAML file "
                             "{name: {field: value}} or {name: {strength: {field: value}}}; default: none, pruning, "
                             "quantization, topk, mixup, poisson, dpsgd, dpsgd_poisson and dpfedavg (without "
                             "dpfedavg, a server's defense, with topology.graph)")
    attack.add_argument("--shadow-federations", type=int, default=16,
                        help="shadow federations replaying the training, for LiRA/RMIA (0 = skip them)")
    attack.add_argument("--pool-size", type=int, default=None,
                        help="membership pool (half are members; default the preset's: 600 or 800); 0 = the "
                             "config's own train/test data")
    attack.add_argument("--inversion-targets", type=int, default=4,
                        help="tapped messages attacked by gradient inversion (0 = skip)")
    attack.add_argument("--inversion-batch", type=int, default=8,
                        help="examples behind each inverted message: the tapped clients' first-round messages as "
                             "one local step over this many examples, with their defenses (0 = the run's own "
                             "tapped messages: many local steps over minibatches)")
    attack.add_argument("--threat-models", default=None,
                        help="observers to evaluate: server (every message), eavesdropper (one client's link), "
                             "participant (the global models), secure_aggregation (each round's cohort sum: taps "
                             "every client; small cohorts); neighbour (a decentralized run's curious node). Default: "
                             "server,eavesdropper,participant; neighbour with topology.graph")
    attack.add_argument("--aggregate-max-examples", type=int, default=64,
                        help="secure_aggregation: invert cohorts of at most this many examples in all (the attack "
                             "reconstructs them all at once; the default preset's cohort holds 300)")
    attack.add_argument("--out", default="attack_eval", help="output directory (tables, plot, results.jsonl)")
    audit = commands.add_parser("audit", help="canary audit of a run: empirical epsilon beside the accountant's")
    audit.add_argument("--config", help="YAML or JSON config file of the audited run")
    audit.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override a config field (repeatable)")
    audit.add_argument("--level", default="example", choices=["example", "local", "client"],
                       help="example: DP-SGD canaries in one client; local: canary clients' messages (local DP); "
                            "client: canary clients, DP-FedAvg")
    audit.add_argument("--canaries", type=int, default=1000, help="canaries (each in/out by a fair coin)")
    audit.add_argument("--guess-fraction", type=float, default=0.1, help="fraction guessed on each side")
    audit.add_argument("--out", default=None,
                       help="directory to write audit.json (the printed result) and the audited config.json into")
    return parser


def _config(args: argparse.Namespace, defaults: Sequence[str] = ()) -> ExperimentConfig:
    """The config of ``--config`` (or the defaults, with ``defaults`` overrides) and the ``--set`` overrides."""
    from fedjaxpriv.config import ExperimentConfig, load_config, with_overrides

    if args.config:
        return load_config(args.config, args.overrides)
    return with_overrides(ExperimentConfig(), [*defaults, *args.overrides])


def _output_dir(path: str, flag: str = "--out") -> str:
    """Creates the output directory ``path`` (before any work is done) and checks that files can be written in
    it; raises ValueError saying why it cannot be used."""
    import tempfile

    if not path.strip():
        raise ValueError(f"{flag}={path!r} is invalid; allowed: a directory path.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag}={path!r} is invalid: it is a file; allowed: a directory (new or existing).")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise ValueError(f"{flag}={path!r} cannot be used as a directory to write in: "
                         f"{error.strerror or error}.") from None
    return path


def _audit(args: argparse.Namespace) -> int:
    import dataclasses

    config = _config(args)
    out = _output_dir(args.out) if args.out is not None else None
    print(f"fedjaxpriv: {args.level}-level canary audit of {args.canaries} canaries", file=sys.stderr, flush=True)
    from fedjaxpriv.attacks.canary_audit import audit_canaries
    from fedjaxpriv.files import atomic_write

    result = audit_canaries(config, args.level, num_canaries=args.canaries, guess_fraction=args.guess_fraction)
    text = json.dumps({**jsonable(dataclasses.asdict(result)), "can_refute": result.can_refute,
                       "summary": result.describe()}, indent=2)
    if out is not None:
        atomic_write(os.path.join(out, "config.json"), json.dumps(jsonable(config.to_dict()), indent=2))
        atomic_write(os.path.join(out, "audit.json"), text + "\n")
    print(text)
    return 0


def _attack_eval(args: argparse.Namespace) -> int:
    from fedjaxpriv.attacks.evaluation import (DEFAULT_DEFENSES, DEFENSES, PRESETS, SERVER_DEFENSES, AttackSuite,
                                               default_threat_models, evaluate_defenses)
    from fedjaxpriv.config import load_file

    if args.config and args.preset:
        raise ValueError(f"--preset {args.preset} and --config {args.config}: both give the base run; allowed: one.")
    preset = PRESETS[args.preset or "membership"]
    config = _config(args, preset.overrides)
    if args.defenses is None:
        args.defenses = ",".join(name for name in DEFAULT_DEFENSES
                                 if not (config.topology.decentralized and name in SERVER_DEFENSES))
    base = f"--config {args.config}" if args.config else f"the {args.preset or 'membership'} preset"
    print(f"fedjaxpriv: attack-eval of defenses {args.defenses} on {base} into {args.out}", file=sys.stderr,
          flush=True)
    if os.path.isfile(args.defenses):
        defenses = load_file(args.defenses, "defenses file")
    else:
        names = [n.strip() for n in args.defenses.split(",") if n.strip()]
        if not names:
            raise ValueError(f"--defenses {args.defenses!r} names no defense point; allowed: built-in names "
                             f"{sorted(DEFENSES)} or a YAML file.")
        unknown = [n for n in names if n not in DEFENSES]
        if unknown:
            raise ValueError(f"unknown defense(s) {unknown}; allowed: {sorted(DEFENSES)} or a YAML file.")
        defenses = {n: DEFENSES[n] for n in names}
    pool_size = args.pool_size if args.pool_size is not None else (
        preset.pool_size if not args.config else AttackSuite().pool_size)
    suite = AttackSuite(shadow_federations=args.shadow_federations, pool_size=pool_size,
                        inversion_targets=args.inversion_targets, inversion_batch=args.inversion_batch,
                        aggregate_max_examples=args.aggregate_max_examples,
                        threat_models=(default_threat_models(config) if args.threat_models is None else
                                       tuple(t.strip() for t in args.threat_models.split(",") if t.strip())))
    estimate = None if args.config or args.overrides else (  # the preset's measured time, for its own base run
        lambda families: preset.estimate(families, suite.shadow_federations))
    records = evaluate_defenses(config, defenses, suite, out_dir=_output_dir(args.out), estimate=estimate)
    print(json.dumps({"out_dir": args.out, "defense_points": len(records),
                      **{k: os.path.join(args.out, v) for k, v in (("table", "attack_eval.md"),
                                                                    ("frontier", "frontier.png"))}}))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from fedjaxpriv.config import load_file, parse_override
    from fedjaxpriv.sweep import expand_grid, run_sweep

    if args.jobs < 1:
        raise ValueError(f"--jobs={args.jobs} is invalid; allowed: an integer >= 1.")
    if args.wait_limit is not None and not args.wait_limit >= 0:
        raise ValueError(f"--wait-limit={args.wait_limit} is invalid; allowed: a number of seconds >= 0.")
    spec = load_file(args.grid, "grid file")
    if args.overrides:  # --set applies to every point: it joins the grid as a one-value axis
        grid = dict(spec.get("grid") or {})
        for text in args.overrides:
            key, value = parse_override(text)
            grid[key] = [value]
        spec["grid"] = grid
    points = expand_grid(spec, os.path.dirname(os.path.abspath(args.grid)))
    if args.dry_run:
        for point in points:
            print(f"{point.config_hash}  {point.label}")
        return 0

    labels = {point.config_hash: point.label for point in points}

    def done(config_hash: str, error: str | None) -> None:
        print(f"{'FAILED' if error else 'done'} {config_hash}  {labels.get(config_hash, '')}"
              + (f"\n{error}" if error else ""), flush=True)

    def wait(config_hash: str, holder: int | None) -> None:
        pid = holder if holder and holder > 0 else "unknown"
        print(f"waiting {config_hash}  {labels.get(config_hash, '')}: another process (PID {pid}) "
              "is running it", flush=True)

    store = args.store if args.store is not None else os.path.join(
        "runs", os.path.splitext(os.path.basename(args.grid))[0])
    summary = run_sweep(points, _output_dir(store, "--store"), jobs=args.jobs, on_done=done,
                        wait_limit_s=args.wait_limit, on_wait=wait)
    print(json.dumps({"store": store, "points": len(points), "ran": len(summary.ran),
                      "skipped": len(summary.skipped), "failed": len(summary.failed)}))
    return 1 if summary.failed else 0


def _report(args: argparse.Namespace) -> int:
    from fedjaxpriv.attacks.evaluation import figures_for
    from fedjaxpriv.report import write_report
    from fedjaxpriv.results import load_records

    records = load_records(args.sources)
    stores = [os.path.dirname(s) if s.endswith(".jsonl") else s for s in args.sources]
    written = write_report(records, _output_dir(args.out), figures=figures_for(records, stores))
    print(json.dumps(written, indent=2))
    return 0


def _say(args: argparse.Namespace, text: str) -> None:
    """A progress line on stderr (nothing under --quiet)."""
    if not getattr(args, "quiet", False):
        from fedjaxpriv.progress import say

        say(text)


def _run(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2, default=str))
        return 0
    mesh = None
    explicit = [args.coordinator, args.num_processes, args.process_id]
    if any(v is not None for v in explicit) and not (args.distributed and all(v is not None for v in explicit)):
        raise ValueError("--coordinator, --num-processes and --process-id go together, with --distributed.")
    if args.heartbeat_timeout is not None and not args.distributed:
        raise ValueError(f"--heartbeat-timeout {args.heartbeat_timeout} needs --distributed.")
    if args.distributed:
        from fedjaxpriv import distributed
        from fedjaxpriv.parallel import make_mesh

        distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               heartbeat_timeout_s=(distributed.HEARTBEAT_TIMEOUT_S if args.heartbeat_timeout is None
                                                    else args.heartbeat_timeout))
        mesh = make_mesh()  # every device of every process
        args.quiet = args.quiet or not distributed.is_main_process()  # process 0 reports
    created = not os.path.exists(args.out)
    _output_dir(args.out)
    from fedjaxpriv.progress import building_line, built_line

    _say(args, f"{building_line(config)} into {args.out}")
    started = time.perf_counter()
    from fedjaxpriv.experiment import Experiment, build_experiment

    try:
        experiment = build_experiment(config, mesh=mesh, progress=False)
    except Exception:
        if created:  # a run that could not start leaves no empty directory behind
            try:
                os.rmdir(args.out)
            except OSError:
                pass
        raise
    _say(args, f"{built_line(experiment, time.perf_counter() - started)}; compiling the round")
    first = [time.perf_counter()]

    headline = experiment.headline_metric  # test_accuracy, test_label_accuracy, ...

    def report(_: Experiment, record: dict) -> None:
        if first:
            _say(args, f"round {record['round']} done in {time.perf_counter() - first.pop():.1f} s (compilation "
                       "included; later rounds reuse the compiled program)")
        if args.quiet or "test_loss" not in record:
            return
        from tqdm.auto import tqdm

        from fedjaxpriv.privacy.basis import largest_epsilon

        largest = largest_epsilon(record)
        shown = f"{headline} {record[headline]:.4f}  " if headline != "test_loss" and headline in record else ""
        tqdm.write(f"round {record['round']:4d}  {shown}test_loss {record['test_loss']:.4f}  "
                   f"train_loss {record['train_loss']:.4f}"
                   + (f"  epsilon {largest[0]:.3g} ({largest[1]})" if largest else ""))

    from fedjaxpriv.guards import DivergenceError, interrupt_behind

    try:
        results = experiment.run(args.out, resume=not args.no_resume, progress=not args.quiet, callbacks=[report],
                                 extend=args.extend)
    except DivergenceError as error:  # the diverged round's metrics as strict JSON, then the error on one line
        print(json.dumps(jsonable({"out_dir": args.out, **error.record}), allow_nan=False))
        print(f"fedjaxpriv: error: {error}", file=sys.stderr)
        return 3
    except BaseException as error:  # SIGINT or SIGTERM: the last finished round is checkpointed
        interrupt = interrupt_behind(error)
        if interrupt is None:
            raise
        print(f"fedjaxpriv: {str(interrupt) or 'interrupted by SIGINT'}; run the same command again to resume.",
              file=sys.stderr)
        return 128 + getattr(interrupt, "signum", 2)
    from fedjaxpriv.privacy.basis import BASIS_KEYS, EPSILON_KEYS

    last = results.history[-1] if results.history else {}
    keys = dict.fromkeys(("round", headline, "test_loss", "test_perplexity", *EPSILON_KEYS, *BASIS_KEYS))
    summary = {k: last[k] for k in keys if k in last}
    print(json.dumps(jsonable({"out_dir": results.out_dir, **summary})))
    return 0


def _one_device_per_core(num_devices: int | None = None) -> None:
    """Shards clients over the CPU cores (``parallel.use_cpu_cores``) unless JAX is already running, as when
    ``main`` is called from Python: then its devices stay as they are."""
    from fedjaxpriv.parallel import use_cpu_cores

    try:
        use_cpu_cores(num_devices)
    except RuntimeError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if not args.verbose:  # XLA's C++ log lines (read when JAX starts), unless the user chose a level
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    else:  # guards.install_report_hooks: what orbax reports, shown at DEBUG level
        import logging

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fedjaxpriv (verbose): %(message)s"))
        logger = logging.getLogger("fedjaxpriv")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    if args.command != "sweep" or args.jobs == 1:  # sweep workers split the cores among themselves
        _one_device_per_core()
    from fedjaxpriv.parallel import enable_compilation_cache

    enable_compilation_cache()
    replaced = _interrupt_on_sigterm()  # a run holds the signal back while it commits a round (guards.Signals)
    try:
        return _command(args)
    finally:  # a caller in this process gets its own handlers back
        for signum, handler in replaced.items():
            signal.signal(signum, handler)


def _command(args: argparse.Namespace) -> int:
    """Runs the parsed command; bad input and interrupts end in one line on stderr and an exit code."""
    from fedjaxpriv.guards import interrupt_behind  # imported already (``_interrupt_on_sigterm``)

    try:
        if args.command == "run":
            return _run(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "report":
            return _report(args)
        if args.command == "attack-eval":
            return _attack_eval(args)
        if args.command == "audit":
            return _audit(args)
    except BaseException as error:
        # Ctrl-C or SIGTERM (``_interrupt_on_sigterm``), also where a library turned it into its own error
        # (``guards.interrupt_behind``): one line, the signal's code
        interrupt = interrupt_behind(error)
        if interrupt is None and isinstance(error, (ValueError, OSError)):  # bad input or an unusable file
            print(f"fedjaxpriv: error: {' '.join(str(error).split())}", file=sys.stderr)
            return 2
        if interrupt is None:
            raise
        error = interrupt
        kept = (f"; the finished defense points are kept in {os.path.join(args.out, 'points')}: the same command "
                "resumes after them" if args.command == "attack-eval" else "")
        print(f"fedjaxpriv: {args.command} {str(error) or 'interrupted by SIGINT'}{kept}.", file=sys.stderr)
        return 128 + getattr(error, "signum", signal.SIGINT)
    return 1


def _interrupt_on_sigterm() -> dict[int, object]:
    """SIGTERM stops the command as Ctrl-C does, and neither is lost where its exception would be swallowed
    (``guards.raise_interrupted``; a run it trains holds the signal back while it commits a round, as
    ``guards.Signals`` does). Returns the handlers it replaced, by signal number."""
    from fedjaxpriv.guards import install_report_hooks, raise_interrupted

    if threading.current_thread() is not threading.main_thread():
        return {}
    install_report_hooks()
    replaced = {}
    for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
        if signal.getsignal(signum) == default:
            replaced[signum] = signal.signal(signum, raise_interrupted)
    return replaced


def entry(argv: Sequence[str] | None = None, exit: Callable[[int], object] = sys.exit) -> None:
    """The ``fedjaxpriv`` console script: ``exit(main(argv))``. Its signal handlers stay installed until the
    process ends: a signal that arrives as ``main`` returns stops the command in one line with the signal's exit
    code, and one that arrives once ``main``'s outcome is known ends the process at once with that code, without
    the traceback Python would print while it shuts down."""
    _interrupt_on_sigterm()  # main's own then replaces nothing and puts nothing back
    code = None
    try:
        code = main(argv)
    except KeyboardInterrupt as error:  # landed between main's return and the handlers below
        if code is None:
            code = 128 + getattr(error, "signum", signal.SIGINT)
            print(f"fedjaxpriv: {str(error) or 'interrupted by SIGINT'}.", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: os._exit(code))
    exit(code)


if __name__ == "__main__":
    entry()
