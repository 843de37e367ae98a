"""Execution strategies change speed, never results: host loop, conv-as-matmul and unrolling equal the default."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedjaxpriv import parallel
from fedjaxpriv.client.local import LocalSpec, client_update
from fedjaxpriv.client.settings import make_settings
from fedjaxpriv.models import get_model
from fedjaxpriv.server import server_optimizer
from fedjaxpriv.simulation import AggregationSpec, Population, build_round, init_server_state


def _assert_trees_close(a, b, atol, rtol=0.0):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


@pytest.mark.slow
@pytest.mark.parametrize("name,shape,check_grads", [("cnn", (8, 8, 2), True), ("lenet", (8, 8, 1), True)])
def test_conv_as_matmul_matches_native_values_and_gradients(name, shape, check_grads):
    model = get_model(name, shape, 10)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, *shape))
    fast = parallel.conv_as_matmul(model.apply)
    native_logits, fast_logits = jax.jit(model.apply)(params, x), jax.jit(fast)(params, x)
    assert float(jnp.max(jnp.abs(native_logits))) > 1e-2  # a non-trivial output is compared
    np.testing.assert_allclose(np.asarray(fast_logits), np.asarray(native_logits), atol=2e-5, rtol=1e-4)
    if not check_grads:
        return

    def loss(apply_fn, p):
        return jnp.sum(jnp.sin(apply_fn(p, x)))

    _assert_trees_close(jax.jit(jax.grad(functools.partial(loss, fast)))(params),
                        jax.jit(jax.grad(functools.partial(loss, model.apply)))(params), atol=5e-5, rtol=1e-4)


@pytest.mark.slow
def test_conv_as_matmul_second_derivatives_match_native():
    """Gradient matching (as in gradient inversion) differentiates the gradient: the stride-1 convolutions'
    own backward rule must be differentiable too. McMahan CNN: stride-1 convolutions."""
    model = get_model("cnn", (8, 8, 1), 10)
    params = model.init(jax.random.key(0))
    targets = jax.nn.one_hot(jnp.arange(2), 10)
    observed_x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))

    def matching_loss(apply_fn, x):
        def loss(p, inputs):
            return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(apply_fn(p, inputs)), axis=-1))
        diffs = jax.tree_util.tree_map(jnp.subtract, jax.grad(loss)(params, x), jax.grad(loss)(params, observed_x))
        return sum(jnp.sum(d ** 2) for d in jax.tree_util.tree_leaves(diffs))

    guess = 0.5 * observed_x + 0.1
    native = jax.jit(jax.grad(functools.partial(matching_loss, model.apply)))(guess)
    fast = jax.jit(jax.grad(functools.partial(matching_loss, parallel.conv_as_matmul(model.apply))))(guess)
    assert float(jnp.max(jnp.abs(native))) > 1e-4
    np.testing.assert_allclose(np.asarray(fast), np.asarray(native), atol=1e-5 * float(jnp.max(jnp.abs(native))),
                               rtol=1e-4)


@pytest.mark.slow
def test_outer_product_dense_grads_match_native_to_second_order_and_skip_large_batches():
    model = get_model("mlp", (8, 8, 1), 10, hidden=(32, 16))
    params = model.init(jax.random.key(0))
    fast = parallel.dense_grads_as_outer_products(model.apply)
    x = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
    targets = jax.nn.one_hot(jnp.arange(16) % 10, 10)

    def loss(apply_fn, p, inputs):
        return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(apply_fn(p, inputs)), axis=-1))

    native_grads = jax.jit(jax.grad(functools.partial(loss, model.apply)))(params, x)
    _assert_trees_close(jax.jit(jax.grad(functools.partial(loss, fast)))(params, x), native_grads, atol=1e-6,
                        rtol=1e-5)

    def matching(apply_fn, guess):  # gradient inversion differentiates the weight gradient w.r.t. the input
        diffs = jax.tree_util.tree_map(jnp.subtract, jax.grad(functools.partial(loss, apply_fn))(params, guess),
                                       native_grads)
        return sum(jnp.sum(d ** 2) for d in jax.tree_util.tree_leaves(diffs))

    guess = 0.5 * x
    native = jax.jit(jax.grad(functools.partial(matching, model.apply)))(guess)
    assert float(jnp.max(jnp.abs(native))) > 1e-6
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(functools.partial(matching, fast)))(guess)),
                               np.asarray(native), rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(native))))

    def uses_outer_products(batch):
        inputs = jnp.zeros((batch, 8, 8, 1))
        return "custom_vjp_call" in str(jax.make_jaxpr(fast)(params, inputs))

    assert uses_outer_products(parallel.OUTER_PRODUCT_MAX_BATCH)
    assert not uses_outer_products(parallel.OUTER_PRODUCT_MAX_BATCH + 1)  # left to the matrix product
    mlp, cnn = _structure("mlp", (8, 8, 1)), _structure("cnn")
    assert parallel.auto_outer_product_grads(mlp, 16, "cpu") and not parallel.auto_outer_product_grads(mlp, 64, "cpu")
    assert not parallel.auto_outer_product_grads(cnn, 16, "cpu")
    assert not parallel.auto_outer_product_grads(mlp, 16, "gpu")


@pytest.mark.slow
def test_conv_as_matmul_stride_one_gradients_any_padding_and_vmap():
    """The flipped-kernel input gradient with asymmetric, wider-than-kernel and negative-effective padding,
    NCHW layouts, vmapped over per-client kernels: equal to the native convolution's gradients."""
    dims = ("NCHW", "OIHW", "NCHW")
    kernels = jax.random.normal(jax.random.key(0), (3, 4, 2, 3, 2))     # 3 clients, OIHW, kernel 3x2
    x = jax.random.normal(jax.random.key(1), (2, 2, 7, 6))
    for padding in (((0, 0), (0, 0)), ((1, 2), (0, 1)), ((3, 0), (2, 2))):
        def conv(inputs, kernel, padding=padding):
            return lax.conv_general_dilated(inputs, kernel, (1, 1), padding, dimension_numbers=dims)

        def loss(fn, kernel, inputs):
            return jnp.sum(jnp.sin(fn(inputs, kernel)))

        grads = [jax.jit(jax.vmap(jax.grad(functools.partial(loss, fn), argnums=(0, 1)), in_axes=(0, None)))(
            kernels, x) for fn in (conv, parallel.conv_as_matmul(conv))]
        _assert_trees_close(grads[1], grads[0], atol=1e-4, rtol=1e-5)


def test_conv_as_matmul_general_layouts_strides_dilation_and_vmap():
    """NCHW/OIHW layouts, stride, kernel dilation and asymmetric padding; vmapped over per-client kernels."""
    dims = ("NCHW", "OIHW", "NCHW")

    def conv(kernel, x):
        return lax.conv_general_dilated(x, kernel, window_strides=(2, 1), padding=((1, 2), (0, 1)),
                                        rhs_dilation=(1, 2), dimension_numbers=dims)

    def transposed(kernel, x):  # input dilation: left to the native convolution
        return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), lhs_dilation=(2, 2),
                                        dimension_numbers=dims)

    kernels = jax.random.normal(jax.random.key(0), (4, 5, 3, 3, 2))     # 4 clients, OIHW
    x = jax.random.normal(jax.random.key(1), (2, 3, 9, 7))
    for fn in (conv, transposed):
        expected = jax.vmap(fn, in_axes=(0, None))(kernels, x)
        got = jax.jit(jax.vmap(parallel.conv_as_matmul(fn), in_axes=(0, None)))(kernels, x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-4, rtol=1e-5)


def _client_problem(population, info, model_name="mlp"):
    kwargs = {"hidden": (16,)} if model_name == "mlp" else {}
    model = get_model(model_name, info.input_shape, info.num_classes, **kwargs)
    settings = make_settings(population.num_clients, population.counts, local_steps=[3, 0, 4, 2],
                             batch_size=[8, 4, 6, 5], lr=[0.1, 0.05, 0.2, 0.1], poisson=[False, True, False, False],
                             mixup_alpha=[0.0, 0.4, 0.0, 1.0], dp_clip_norm=[np.inf, 1.0, 0.5, np.inf],
                             dp_noise_multiplier=[0.0, 1.0, 0.3, 0.0])
    pop = Population(*(jnp.asarray(a) for a in (population.x, population.y, population.offsets, population.counts)))
    return model, jax.tree_util.tree_map(jnp.asarray, settings), pop, model.init(jax.random.key(3))


def _one_client(spec, apply_fn, shared, row):
    params, x, y, base_key = shared
    key = jax.random.fold_in(base_key, row["id"])
    out = client_update(spec, apply_fn, params, x, y, row["offset"], row["count"], row["settings"], key)
    weighted = jax.tree_util.tree_map(lambda d: out.num_examples * d, out.delta)
    return (weighted, out.num_examples), out.loss


@pytest.mark.slow
def test_host_loop_equals_compiled_vmap(digits_population):
    population, _, info = digits_population
    model, settings, pop, params = _client_problem(population, info)
    spec = LocalSpec(max_steps=3, max_batch=8, max_count=population.max_count, num_classes=info.num_classes)
    ids = jnp.array([0, 1, 2, 3, 5, 6, 7, 9], jnp.int32)
    rows = {"id": ids, "offset": pop.offsets[ids], "count": pop.counts[ids],
            "settings": jax.tree_util.tree_map(lambda a: a[ids], settings)}
    shared = (params, pop.x, pop.y, jax.random.key(11))
    fn = functools.partial(_one_client, spec, model.apply)
    expected = jax.jit(lambda s, r: parallel.map_clients(functools.partial(fn, s), r, chunk_size=8))(shared, rows)
    assert float(jnp.max(jnp.abs(expected[0][0]["Dense_0"]["kernel"]))) > 1e-3
    for chunk_size in (1, 3):  # the plain one-client program; vmapped chunks with a padded last chunk
        got = parallel.map_clients_host(fn, shared, rows, chunk_size=chunk_size)
        _assert_trees_close(got, expected, atol=2e-5, rtol=1e-5)
    if jax.device_count() >= 3:  # one (padded) chunk per device per call: plain programs, then vmapped chunks
        for chunk_size in (1, 2):
            got = parallel.map_clients_host(fn, shared, rows, chunk_size=chunk_size, mesh=parallel.make_mesh(3))
            _assert_trees_close(got, expected, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        jax.jit(lambda s, r: parallel.map_clients_host(fn, s, r))(shared, rows)


@pytest.mark.parametrize("per_example,model_name", [(True, "mlp"), pytest.param(False, "mlp", marks=pytest.mark.slow),
                                                    pytest.param(False, "cnn", marks=pytest.mark.slow)])
def test_chunked_batch_slots_equal_all_slots_at_once_and_stop_after_the_last_real_example(digits_population,
                                                                                           per_example, model_name):
    """``LocalSpec.slot_chunk``: a step computes its slots in chunks up to the one holding the last real example.
    Poisson, fixed-size, mixup and DP-SGD clients (``per_example``) and a client with no steps, vmapped together,
    with a dense and a convolutional model:
    the deltas and losses equal those of all slots at once to float rounding, for chunks that divide the slots and
    one that does not. The Poisson batches fill fewer slots than they have, so chunks were skipped."""
    population, _, info = digits_population
    model, settings, pop, params = _client_problem(population, info, model_name)
    ids = jnp.arange(4, dtype=jnp.int32)
    settings = jax.tree_util.tree_map(lambda a: a[ids], settings)._replace(
        poisson=jnp.array([True, True, False, True]), sample_rate=(6.0 / pop.counts[ids]).astype(jnp.float32))
    spec = LocalSpec(max_steps=4, max_batch=24, max_count=population.max_count, num_classes=info.num_classes,
                     per_example=per_example, mixup=True)
    rows = {"id": ids, "offset": pop.offsets[ids], "count": pop.counts[ids], "settings": settings}
    shared = (params, pop.x, pop.y, jax.random.key(11))

    def run(chunk):
        fn = functools.partial(_one_client, dataclasses.replace(spec, slot_chunk=chunk), model.apply)
        return jax.jit(lambda s, r: parallel.map_clients(functools.partial(fn, s), r, chunk_size=4))(shared, rows)

    whole = run(0)
    assert max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree_util.tree_leaves(whole[0][0])) > 1e-3
    assert float(whole[1][1]) == 0.0  # client 1 runs no steps
    for chunk in (4, 5):
        _assert_trees_close(run(chunk), whole, atol=2e-5, rtol=1e-5)
    assert 6 + 4 * np.sqrt(6) < spec.max_batch  # Poisson batches of mean 6 leave the last slots idle


def test_slot_rows_hold_each_clients_value_exactly_in_every_strategy_and_cost_no_width_times_chunk_memory():
    """Clients 3, 7 and 12 of 13 have rows 2, 0 and 1; the others none (-1, or 3 >= the width), two of them with
    inf and NaN values: summed, each row is its client's value bit for bit and nothing else leaks in, with chunks
    of 1, 4 and 13 clients, on a 4-device mesh and in the host loop. The compiled program's temporary memory stays
    that of a chunk's values: 1000 rows of 2410 floats from one chunk of 1000 clients need far less than the
    1000 x 1000 x 2410 floats (9.6 GB) of a one-hot sum."""
    num_clients, width = 13, 3
    values = jax.random.normal(jax.random.key(0), (num_clients, 5)) * 1e3 + 0.1
    values = values.at[5].set(jnp.inf).at[6].set(jnp.nan)
    slots = jnp.full(num_clients, -1, jnp.int32).at[jnp.array([3, 7, 12, 4])].set(jnp.array([2, 0, 1, 3]))
    rows = {"slot": slots, "value": values, "real": jnp.ones(num_clients, bool)}  # padding rows: False
    expected = np.zeros((width, 5), np.float32)
    expected[[2, 0, 1]] = np.asarray(values)[[3, 7, 12]]

    def fn(row):
        slot = jnp.where(row["real"], row["slot"], -1)
        return (parallel.SlotRows(slot, {"v": row["value"]}, width), row["real"].astype(jnp.float32)), row["slot"]

    meshes = [None] + ([parallel.make_mesh(4)] if jax.device_count() >= 4 else [])
    for mesh in meshes:
        for chunk_size in (1, 4, 13):
            (placed, count), kept = jax.jit(lambda r: parallel.map_clients(fn, r, chunk_size=chunk_size, mesh=mesh))(
                rows)
            np.testing.assert_array_equal(np.asarray(placed["v"]), expected)
            assert float(count) == num_clients and np.array_equal(np.asarray(kept), np.asarray(slots))
        for chunk_size in (1, 4):
            (placed, count), _ = parallel.map_clients_host(lambda _, row: fn(row), (), rows, chunk_size=chunk_size,
                                                           mesh=mesh)
            np.testing.assert_array_equal(np.asarray(placed["v"]), expected)

    many, size = 1000, 2410
    big = {"slot": jnp.arange(many, dtype=jnp.int32), "value": jnp.zeros((many, size), jnp.float32)}
    compiled = jax.jit(lambda r: parallel.map_clients(
        lambda row: (parallel.SlotRows(row["slot"], row["value"], many), ()), r, chunk_size=many)).lower(
        big).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 20 * many * size * 4  # 193 MB; one-hot: 9.6 GB


def test_shared_values_reach_every_device_and_a_gradient_through_a_scan_sums_as_on_one_device():
    """``map_clients(..., shared=...)``: each client differentiates a recurrence (a ``scan``) over its row through
    the shared weights; split over 4 devices (each running its own clients' program) the summed gradients and the
    per-client outputs equal a per-client Python loop, for chunks that split evenly over the devices and not."""
    shared = {"w": 0.5 * jax.random.normal(jax.random.key(0), (3, 3)), "scale": jnp.float32(2.0)}
    xs = jax.random.normal(jax.random.key(1), (10, 5, 3))

    def fn(shared, row):
        def loss(w):
            h, _ = lax.scan(lambda h, x: (jnp.tanh(h @ w + x), None), jnp.zeros(3), row)
            return jnp.sum(h)
        grad = jax.grad(loss)(shared["w"]) * shared["scale"]
        return grad, jnp.sum(grad)

    expected = [fn(shared, x) for x in xs]
    total = np.sum([np.asarray(g) for g, _ in expected], axis=0)
    meshes = [None] + ([parallel.make_mesh(4)] if jax.device_count() >= 4 else [])
    for mesh in meshes:
        for chunk_size in (4, 6, 10):
            summed, kept = jax.jit(lambda s, r: parallel.map_clients(fn, r, chunk_size=chunk_size, mesh=mesh,
                                                                     shared=s))(shared, xs)
            np.testing.assert_allclose(np.asarray(summed), total, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(kept), [float(k) for _, k in expected], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_unrolled_conv_as_matmul_round_equals_default_round(digits_population):
    population, _, info = digits_population
    model, settings, pop, params = _client_problem(population, info, "lenet")
    ids, mask = jnp.array([0, 2, 3, 4, 6], jnp.int32), jnp.ones(5, bool)
    results = []
    for unroll, as_matmul in [(1, False), (2, True)]:
        spec = LocalSpec(max_steps=2, max_batch=8, max_count=population.max_count, num_classes=info.num_classes,
                         unroll=unroll, conv_as_matmul=as_matmul)
        tx = server_optimizer("sgd", 1.0)
        round_fn = build_round(model.apply, spec, tx, AggregationSpec(), chunk_size=3)
        state, out = round_fn(init_server_state(params, tx), pop, settings, ids, mask, jax.random.key(5))
        results.append((state.params, out.loss))
    delta = jax.tree_util.tree_map(jnp.subtract, results[0][0], params)
    assert float(optax_norm(delta)) > 1e-3  # training moved the model
    for other in results[1:]:
        _assert_trees_close(other, results[0], atol=3e-5, rtol=1e-4)


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(tree)))


def _structure(name, shape=(28, 28, 1)):
    """A built-in model's structure as ``parallel.model_structure`` reads it from its jaxpr."""
    kwargs = {"hidden": (32, 16)} if name == "mlp" else {}
    model = get_model(name, shape, 10, **kwargs)
    return parallel.model_structure(model.apply, jax.eval_shape(model.init, jax.random.key(0)),
                                    jax.ShapeDtypeStruct((16, *shape), jnp.float32))


def test_auto_choices_per_backend_and_memory_bound():
    cnn, mlp = _structure("cnn"), _structure("mlp")
    assert parallel.auto_conv_as_matmul(cnn, "cpu") and parallel.auto_conv_as_matmul(_structure("resnet"), "cpu")
    assert not parallel.auto_conv_as_matmul(cnn, "gpu") and not parallel.auto_conv_as_matmul(mlp, "cpu")
    assert parallel.auto_strategy(cnn, "cpu") == "host"
    assert parallel.auto_strategy(_structure("lenet"), "cpu", max_steps=16) == "host"
    assert parallel.auto_strategy(cnn, "cpu", max_steps=17) == "loop"  # too many steps to unroll
    assert parallel.auto_strategy(_structure("cnn", (8, 8, 1)), "cpu") == "loop"  # tiny feature maps
    assert not parallel.auto_conv_as_matmul(cnn, "cpu", strategy="host")
    assert parallel.auto_strategy(mlp, "cpu") == "vmap" and parallel.auto_strategy(cnn, "gpu") == "vmap"
    for num_params in (10_000, 1_663_370, 50_000_000):
        chunk = parallel.auto_chunk_size(1000, num_params, "cpu", budget_bytes=5e8)
        assert 1 <= chunk <= 128 and (chunk == 1 or chunk * 8 * 4 * num_params <= 5e8)
    assert parallel.auto_chunk_size(1000, 10_000, "gpu") == 1000
    # On CPU by default the working set stays within CPU_CHUNK_BYTES (16 MiB at 32 bytes per parameter and client):
    # the 9.6k-parameter MLP 54 clients, the 22k LSTM 23, a 650-parameter model the cap of 128, the CNN one.
    assert [parallel.auto_chunk_size(1000, n, "cpu") for n in (9_610, 22_484, 650, 1_663_370)] == [54, 23, 128, 1]
    assert parallel.auto_chunk_size(20, 650, "cpu") == 20
