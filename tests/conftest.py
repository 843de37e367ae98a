"""Test configuration: run on CPU with 8 virtual host devices so sharding tests see a mesh.

XLA's backend (LLVM) optimisation level 0: tests compile hundreds of small programs, and compile time dominates
the suite (a warm compilation cache runs a test file in a third of the time). Level 0 compiles fastest; the few
training-heavy tests run slower, but the whole suite is faster (on 2 cores: 596 s at level 0, 687 s at level 1).
Values are compared with tolerances, never with a figure taken at another level.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
