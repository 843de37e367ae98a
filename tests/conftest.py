"""Test configuration: run on CPU with 8 virtual host devices so sharding tests see a mesh.

XLA's backend (LLVM) optimisation level 0: tests compile hundreds of small programs, and compile time dominates
the suite (a warm compilation cache runs a test file in a third of the time). Level 0 compiles fastest; the few
training-heavy tests run slower, but the whole suite is faster (on 2 cores: 596 s at level 0, 687 s at level 1).
Values are compared with tolerances, never with a figure taken at another level. XLA's CPU fusion emitters are
off as well: with them, compilation is slower and so are these small programs (on 2 cores, tests/engine/
test_round.py takes 162 s with them and 98 s without; the DP-SGD canary audits 107 s and 88 s). XLA's multi-threaded
Eigen pool is off: with a worker per core it buys nothing, and on a 2-core machine it can wedge a computation for
good (the main thread then waits inside XLA, where no Python timeout reaches it).

JAX's persistent compilation cache is shared by the test processes of a run (workers and the subprocesses they
start): files that build the same programs compile them once. It lives in a fresh directory per test session
unless FEDJAXPRIV_TEST_CACHE names one.
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                      "--xla_cpu_use_fusion_emitters=false --xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # xdist workers inherit the controller's environment, so the controller's choice is every worker's.
    _SESSION_CACHE = None if os.environ.get("FEDJAXPRIV_TEST_CACHE") else tempfile.mkdtemp(
        prefix="fedjaxpriv-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("FEDJAXPRIV_TEST_CACHE") or _SESSION_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_sessionfinish(session, exitstatus):
    """The process that made the session's cache directory removes it."""
    del session, exitstatus
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


# Files that take minutes. xdist's loadfile hands out files in collection order, so long files collected last
# leave a core idle at the end of the run; they are collected first instead (the order of the rest is kept).
LONG_FILES = ("attacks/test_evaluation.py", "workflow/test_notebooks.py", "engine/test_crash_safety.py",
              "engine/test_experiment.py", "attacks/test_membership.py", "workflow/test_sweep_concurrency.py",
              "workflow/test_sweep.py", "engine/test_multihost.py", "attacks/test_inversion_eval.py")


def pytest_collection_modifyitems(session, config, items):
    """Long files first (see ``LONG_FILES``), each file's tests kept together and in order."""
    del session, config

    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return next((i for i, name in enumerate(LONG_FILES) if path.endswith(name)), len(LONG_FILES))

    items.sort(key=rank)
