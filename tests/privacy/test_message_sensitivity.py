"""Local DP keeps its accounted sensitivity: for every message chain the config accepts with local noise, what
reaches the noise stage has norm <= clip_norm round after round (transform state included), so two clients'
noised messages differ by at most the 2 clip_norm that ``LocalGaussian`` charges; chains that cannot keep it
are refused by the config and by ``message_pipeline``, and the refused chain really breaks the bound."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxpriv.client.settings import make_settings
from fedjaxpriv.config import MessageConfig
from fedjaxpriv.transforms.pipeline import COMPRESSOR_STAGES, make_message_fn, message_pipeline

CLIP = 0.5
ROUNDS = 40
SHAPES = {"w": (4, 4), "b": (4,)}
DIM = 20
STRENGTHS = dict(sparsity=0.5, topk_fraction=0.5, randk_fraction=0.5, quant_bits=2, qsgd_levels=2)
STAGE_OF = dict(sparsity="prune", topk_fraction="topk", randk_fraction="randk", quant_bits="round", qsgd_levels="qsgd")


def _config(order, feedback):
    return MessageConfig(order=order, error_feedback=feedback, clip_norm=CLIP, local_noise_multiplier=1.0,
                         **{k: v for k, v in STRENGTHS.items() if STAGE_OF[k] in order})  # a stage left out: off


def _accepted(order, feedback) -> bool:
    try:
        _config(order, feedback)
    except ValueError as error:
        assert "message.order" in str(error)
        return False
    return True


def _settings(num_clients: int):
    return make_settings(num_clients, np.full(num_clients, 10), sparsity=STRENGTHS["sparsity"],
                         topk_fraction=0.5, randk_fraction=0.5, clip_norm=CLIP, local_noise_multiplier=1.0,
                         quant_bits=2, qsgd_levels=2)


def _updates() -> np.ndarray:
    """Adversarial per-round updates of 4 clients [4, ROUNDS, DIM]: +-c / sqrt(DIM) in every coordinate (the pair
    whose error-feedback residuals grow apart), Gaussian updates of norm 8 c, and one fixed large coordinate."""
    rng = np.random.default_rng(0)
    constant = np.full((ROUNDS, DIM), CLIP / np.sqrt(DIM))
    gaussian = rng.normal(size=(ROUNDS, DIM))
    gaussian *= 8 * CLIP / np.linalg.norm(gaussian, axis=1, keepdims=True)
    spike = np.zeros((ROUNDS, DIM))
    spike[:, 3] = 3 * CLIP
    return np.stack([constant, -constant, gaussian, spike]).astype(np.float32)


def _as_tree(flat):
    return {"w": flat[:16].reshape(SHAPES["w"]), "b": flat[16:]}


def _noise_inputs(prefix, feedback) -> np.ndarray:
    """What the stages before 'noise' hand to it, per client and round [4, ROUNDS, DIM], with each client's
    transform state (error-feedback residuals) carried from round to round, as a run carries it."""
    settings = _settings(4)
    transform, _ = message_pipeline(prefix, settings, feedback=feedback)
    message_fn = make_message_fn(transform)

    def one_client(updates, row, client):
        def step(state, inputs):
            t, update = inputs
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), t), client)
            message, state, _ = message_fn(_as_tree(update), row, key, jnp.int32(DIM), state)
            return state, jnp.concatenate([message["w"].reshape(-1), message["b"]])

        state = transform.init(_as_tree(updates[0]))
        return jax.lax.scan(step, state, (jnp.arange(ROUNDS), updates))[1]

    run = jax.jit(jax.vmap(one_client))
    return np.asarray(run(jnp.asarray(_updates()), settings, jnp.arange(4)), np.float64)


def _check_bound(prefix, feedback) -> tuple[float, float]:
    """(largest norm reaching 'noise' / clip_norm, largest distance between two clients' / (2 clip_norm))."""
    inputs = _noise_inputs(prefix, feedback)
    norms = np.linalg.norm(inputs, axis=-1)
    pairs = [np.linalg.norm(inputs[i] - inputs[j], axis=-1).max() for i, j in itertools.combinations(range(4), 2)]
    return float(norms.max() / CLIP), float(max(pairs) / (2 * CLIP))


def _orders():
    """Every ordered choice of at most two compressors between 'clip' and 'noise', with the other compressors
    before 'clip' or absent, and a post-processing stage after 'noise' or not."""
    for size in range(3):
        for between in itertools.permutations(COMPRESSOR_STAGES, size):
            rest = tuple(s for s in COMPRESSOR_STAGES if s not in between)
            for before in ((), rest):
                yield before + ("clip",) + between + ("noise",)
                if not before and rest:
                    yield ("clip",) + between + ("noise", rest[0])


def _prefix(order):
    return order[:order.index("noise")]


def test_error_feedback_between_clip_and_noise_is_refused_and_really_breaks_the_bound():
    """[clip, topk, noise] with error feedback: refused by the config and by the pipeline; run anyway, the
    residual fed back after clipping pushes the noised message far past clip_norm."""
    order = ("clip", "topk", "noise")
    with pytest.raises(ValueError, match=r"message.order.*no compressor between 'clip' and 'noise'"):
        _config(order, True)
    with pytest.raises(ValueError, match=r"cannot carry local DP"):
        message_pipeline(order, _settings(2), feedback=True)
    norm, pair = _check_bound(_prefix(order), True)
    assert norm > 1.2 and pair > 1.2  # the refused chain really is unsound on these inputs (1.41 here)


@pytest.mark.parametrize("order, feedback", [
    (("clip", "topk", "noise"), False),
    (("topk", "clip", "noise"), True),
    (("prune", "topk", "randk", "clip", "noise", "round", "qsgd"), True),  # the default order
    (("round", "qsgd", "clip", "prune", "randk", "noise"), False),
])
def test_accepted_chains_keep_the_sensitivity(order, feedback):
    assert _accepted(order, feedback)
    norm, pair = _check_bound(_prefix(order), feedback)
    assert norm <= 1 + 1e-5 and pair <= 1 + 1e-5


def test_an_inactive_stage_between_clip_and_noise_is_no_reason_to_refuse():
    """top-k at fraction 1 is left out of the chain, so [clip, topk, noise] with feedback keeps the bound."""
    MessageConfig(order=("clip", "topk", "noise"), error_feedback=True, clip_norm=CLIP, local_noise_multiplier=1.0)


@pytest.mark.slow
def test_every_accepted_chain_keeps_the_sensitivity():
    """The grid of ``_orders`` with and without error feedback: each accepted chain keeps norm <= clip_norm at the
    noise stage and pairwise distance <= 2 clip_norm over 40 rounds; each refused one names the order."""
    accepted = refused = 0
    for order, feedback in itertools.product(sorted(set(_orders())), (False, True)):
        if not _accepted(order, feedback):
            refused += 1
            continue
        accepted += 1
        norm, pair = _check_bound(_prefix(order), feedback)
        assert norm <= 1 + 1e-5 and pair <= 1 + 1e-5, (order, feedback, norm, pair)
    # 78 orders x 2: accepted are the 3 without a stage between (either way) and, without feedback, the 3 + 6
    # ordered choices of norm-nonincreasing stages between, each in 3 placements of the rest
    assert (accepted, refused) == (6 + 9 + 18, 2 * 78 - 33)
