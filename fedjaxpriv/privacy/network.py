"""Pairwise network DP of Gaussian gossip averaging, computed exactly from the mixing matrix.

Protocol (``decentralized.gossip_averaging``; the averaging primitive of Muffliato, Cyffers et al. 2022): node u
holds a vector x_u, clips it to L2 norm C, adds N(0, (z C)^2 I) once, and the nodes run T gossip steps
``y^{t+1} = W y^t`` from ``y^0 = clip(x) + noise``, W public.

Threat model (pairwise network DP, Cyffers & Bellet 2022): a curious node v knows W, its own value and noise, every
other node's value except u's, and sees every value sent to it: ``y_j^t`` for each j with ``W_vj != 0`` and
``t = 0 .. T-1`` (hence also its own ``y_v^t``). Neighbouring datasets: node u's data replaced, so its clipped
value moves by at most 2C.

Analysis: v's view is ``A y^0``, A [R, C] holding the rows ``e_j^T W^t`` (``view_matrix``). Given what v knows,
the view is Gaussian with covariance ``(z C)^2 A_{-v} A_{-v}^T`` under both datasets (A_{-v}: A without column v,
whose noise v knows) and a mean that moves by ``A e_u (x_u - x_u')``, a vector in the span of that covariance (it is
column u of A_{-v}). The privacy loss is therefore exactly that of a Gaussian mechanism, mu-GDP (Dong, Roth & Su
2022) with

    mu_{u -> v} = (2 / z) ||P_v e_u||,

P_v the orthogonal projection onto the row space of A_{-v}; coordinates of the vectors are independent copies,
so d dimensions give the same mu. ``||P_v e_u|| <= 1``: never above the local DP of the value itself (mu = 2/z,
``mechanisms.LocalGaussian``), 1 for a node v hears directly, 0 for a node more than T hops from v. The
(eps, delta) of mu-GDP is exact (``dp_accounting.get_epsilon_gaussian``).

Numerics: P_v comes from an SVD in float64; every direction with a singular value above 1e-12 of the largest is
kept, which can only enlarge P_v, hence mu (the error, if any, is on the conservative side).

Not covered (no figure is reported): decentralized SGD, where local training between gossip steps makes the
view a non-linear function of earlier noise, and time-varying graphs (random matchings).

References:
  Cyffers, Bellet. "Privacy Amplification by Decentralization". AISTATS 2022.
  Cyffers, Even, Bellet, Massoulie. "Muffliato: Peer-to-Peer Privacy Amplification for Decentralized
  Optimization and Averaging". NeurIPS 2022.
  Dong, Roth, Su. "Gaussian Differential Privacy". JRSS B 2022.
"""

from __future__ import annotations

import dp_accounting
import numpy as np

from fedjaxpriv.privacy.basis import EpsilonBasis
from fedjaxpriv.privacy.validation import check_delta

RANK_TOLERANCE = 1e-12  # singular values kept, relative to the largest (smaller: larger projections, larger mu)


def _check(mixing: np.ndarray, steps: int, observer: int) -> np.ndarray:
    mixing = np.asarray(mixing, np.float64)
    if mixing.ndim != 2 or mixing.shape[0] != mixing.shape[1] or mixing.shape[0] < 2:
        raise ValueError(f"mixing matrix of shape {mixing.shape}: allowed: a square [C, C] matrix, C >= 2.")
    if not np.all(np.isfinite(mixing)):
        raise ValueError("the mixing matrix has non-finite entries; allowed: finite weights.")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps={steps}: allowed: an integer >= 1 (gossip steps).")
    if int(observer) != observer or not 0 <= observer < mixing.shape[0]:
        raise ValueError(f"observer={observer}: allowed: a node in [0, {mixing.shape[0]}).")
    return mixing


def heard_by(mixing: np.ndarray, observer: int) -> np.ndarray:
    """The nodes whose values ``observer`` receives in every gossip step (``W_vj != 0``), itself included, sorted."""
    mixing = np.asarray(mixing)
    return np.union1d(np.flatnonzero(mixing[observer] != 0), [observer])


def view_matrix(mixing: np.ndarray, steps: int, observer: int) -> np.ndarray:
    """A [steps * H, C] float64: the observer's view as a linear map of ``y^0``; rows ``t * H + k`` are
    ``e_j^T W^t`` for t = 0 .. steps - 1 and j the k-th of the H nodes it hears (``heard_by``)."""
    mixing = _check(mixing, steps, observer)
    heard = heard_by(mixing, observer)
    rows, power = [], np.eye(mixing.shape[0])
    for _ in range(int(steps)):
        rows.append(power[heard])
        power = mixing @ power
    return np.concatenate(rows)


def pairwise_mu(mixing: np.ndarray, steps: int, noise_multiplier: float, observer: int) -> np.ndarray:
    """[C] float64: ``mu_{u -> observer}`` for every node u (module docstring); the observer's own entry is 0 (it
    knows its own value). ``noise_multiplier`` z > 0 (noise std z C on values clipped to C)."""
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier={noise_multiplier}: allowed: > 0 (without noise there is no guarantee).")
    view = view_matrix(mixing, steps, observer)
    others = np.delete(view, observer, axis=1)
    _, singular, vt = np.linalg.svd(others, full_matrices=False)
    basis = vt[singular > RANK_TOLERANCE * max(float(singular[0]), 1e-300)] if singular.size else vt[:0]
    reach = np.sqrt(np.minimum(np.sum(basis ** 2, axis=0), 1.0))  # ||P e_u|| for the nodes other than v
    reach[~np.any(others != 0, axis=0)] = 0.0  # a value that never enters the view: exactly 0, not SVD rounding
    return np.insert(2.0 * reach / float(noise_multiplier), observer, 0.0)


def gaussian_epsilon(mu: np.ndarray | float, delta: float) -> np.ndarray:
    """Exact epsilon at ``delta`` of mu-GDP, elementwise (0 where mu = 0)."""
    check_delta(delta)
    mu = np.asarray(mu, np.float64)
    with np.errstate(divide="ignore"):  # dp_accounting's search takes log(0) on the way
        flat = [0.0 if m == 0 else float(dp_accounting.get_epsilon_gaussian(1.0 / m, delta)) for m in mu.ravel()]
    return np.asarray(flat).reshape(mu.shape)


def pairwise_epsilon(mixing: np.ndarray, steps: int, noise_multiplier: float, observer: int,
                     delta: float) -> np.ndarray:
    """[C] float64: the (eps, ``delta``) pairwise network DP of each node's value against ``observer``."""
    return gaussian_epsilon(pairwise_mu(mixing, steps, noise_multiplier, observer), delta)


def network_basis(topology: str, steps: int, delta: float) -> EpsilonBasis:
    """The basis of ``pairwise_epsilon``'s figures."""
    return EpsilonBasis(
        "pairwise", "replace one node's value (clipped to C: moves by 2C)",
        f"none: Gaussian gossip averaging, noise added once, {steps} gossip steps over the public {topology} "
        "graph; the observer sees the values sent to it (Cyffers & Bellet 2022)",
        "exact Gaussian view (mu-GDP, dp_accounting.get_epsilon_gaussian)", delta)
