"""The command line answers at once and says what it builds before the long work starts."""

import subprocess
import sys

import jax

from fedjaxpriv import cli


def test_help_imports_no_numerical_library():
    """``fedjaxpriv --help`` (the package and its command line) loads neither JAX, Flax nor dp-accounting."""
    code = ("import sys, fedjaxpriv, fedjaxpriv.cli\n"
            "print(sorted(m for m in ('jax', 'jaxlib', 'flax', 'optax', 'dp_accounting', 'scipy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_run_says_what_it_builds_then_when_the_first_round_is_compiled(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["run", "--out", str(out), "--set", "data.num_clients=4", "--set", "model.hidden=[8]",
                     "--set", "server.clients_per_round=2", "--set", "run.rounds=2", "--set", "run.num_devices=1"])
    assert code == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedjaxpriv: ")]
    assert lines[0] == (f"fedjaxpriv: building digits over 4 clients (dirichlet partition), model mlp, 2 rounds "
                        f"into {out}")
    assert lines[1].startswith("fedjaxpriv: built in ") and "strategy " in lines[1] and "compiling" in lines[1]
    assert f", 1 {jax.default_backend()} device; compiling" in lines[1]  # one device: no mesh
    assert lines[2].startswith("fedjaxpriv: round 1 done in ") and len(lines) == 3


def test_the_progress_bar_shows_the_loss_the_largest_epsilon_so_far_and_the_last_accuracy():
    from fedjaxpriv.runner import progress_fields

    record = {"train_loss": 1.23456, "epsilon_max": 2.5, "client_level_epsilon": 7.0, "local_epsilon_max": 0.0}
    assert progress_fields(record, 0.91) == {"loss": "1.235", "eps": "7 (client)", "acc": "0.9100"}
    assert progress_fields({"train_loss": 2.0, "epsilon_max": float("inf")}) == {
        "loss": "2.000", "eps": "inf (example: no guarantee)"}
    assert progress_fields({"train_loss": 2.0}) == {"loss": "2.000"}


def test_the_python_apis_bar_says_the_first_round_compiles_then_shows_its_figures(capsys):
    from fedjaxpriv.config import ExperimentConfig, with_overrides
    from fedjaxpriv.experiment import Experiment

    config = with_overrides(ExperimentConfig(), ["data.num_clients=4", "model.hidden=[8]", "server.clients_per_round=2",
                                                 "run.rounds=2"])
    experiment = Experiment(config)
    said = capsys.readouterr().err.splitlines()
    assert said[0] == "fedjaxpriv: building digits over 4 clients (dirichlet partition), model mlp, 2 rounds"
    assert said[1] == (f"fedjaxpriv: built in {said[1].split()[3]} s: {experiment.num_params:,} parameters, strategy "
                       f"{experiment.strategy} (chunks of {experiment.chunk_size} clients), "
                       f"{experiment.mesh.devices.size} {jax.default_backend()} devices") and len(said) == 2
    experiment.run(progress=True)
    frames = capsys.readouterr().err.split("\r")
    first = next(i for i, f in enumerate(frames) if "0/2" in f)
    assert "compiling the round" in frames[first]
    assert "compiling" not in frames[-1] and "2/2" in frames[-1] and "loss=" in frames[-1]


def test_the_python_api_says_nothing_without_progress_and_names_arrays_passed_in(capsys):
    from fedjaxpriv.config import ExperimentConfig, with_overrides
    from fedjaxpriv.data import load_dataset, partition
    from fedjaxpriv.experiment import Experiment

    config = with_overrides(ExperimentConfig(), ["data.num_clients=3", "model.hidden=[8]", "server.clients_per_round=2",
                                                 "run.rounds=1"])
    Experiment(config, progress=False).run(progress=False)
    assert capsys.readouterr().err == ""
    train, test, info = load_dataset("digits")
    Experiment(config, population=partition(train, "iid", 3, seed=0), test=test, num_classes=info.num_classes)
    assert capsys.readouterr().err.splitlines()[0] == ("fedjaxpriv: building the population passed in (3 clients), "
                                                       "model mlp, 1 round")
