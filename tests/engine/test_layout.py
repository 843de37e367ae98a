"""Where a run's examples and client states live: a copy per device while it fits, split over the mesh beyond."""

import jax
import numpy as np
import pytest

from fedjaxpriv import parallel
from fedjaxpriv.parallel import SPLIT_ABOVE_FRACTION, device_memory_bytes, make_mesh, splits_data, tree_bytes

GIB = 1 << 30


def test_a_copy_is_split_exactly_when_it_would_take_over_the_fraction_of_a_device():
    mesh = make_mesh(2) if jax.device_count() >= 2 else None
    if mesh is None:
        pytest.skip("needs several devices (tests/conftest.py sets 8 CPU devices)")
    limit = int(SPLIT_ABOVE_FRACTION * 4 * GIB)
    assert not splits_data(None, mesh, "vmap", limit, 4 * GIB)  # at the fraction: still a copy
    assert splits_data(None, mesh, "vmap", limit + 1, 4 * GIB)
    assert splits_data(None, mesh, "loop", limit + 1, 4 * GIB)
    assert not splits_data(None, mesh, "host", 100 * GIB, 4 * GIB)  # the host strategy cannot fetch chunks
    assert not splits_data(None, mesh, "vmap", 100 * GIB, None)  # unknown memory: as before, a copy
    assert splits_data(True, mesh, "vmap", 1, 4 * GIB) and not splits_data(False, mesh, "vmap", 100 * GIB, GIB)
    for requested in (None, True, False):  # one device: the copy is the data
        assert not splits_data(requested, None, "vmap", 100 * GIB, GIB)


def test_a_cpu_device_has_its_share_of_the_hosts_memory_in_whole_mebibytes():
    if jax.device_count() < 2:
        pytest.skip("needs several devices (tests/conftest.py sets 8 CPU devices)")
    with open("/proc/meminfo") as meminfo:  # the kernel's own figure, read independently of os.sysconf
        total_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    expected = (total_kib * 1024 // jax.local_device_count()) >> 20 << 20
    assert device_memory_bytes(make_mesh(jax.device_count())) == expected


def test_tree_bytes_counts_every_leaf_of_arrays_and_shapes_alike():
    tree = {"a": np.zeros((3, 5), np.float32), "b": [np.zeros(7, np.int8), jax.ShapeDtypeStruct((2, 2), np.float64)]}
    assert tree_bytes(tree) == 3 * 5 * 4 + 7 + 2 * 2 * 8
    assert parallel.tree_bytes(()) == 0
