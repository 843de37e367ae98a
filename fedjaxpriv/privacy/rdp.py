"""Vectorized Renyi DP of subsampled Gaussian mechanisms at any orders > 1, and RDP -> epsilon.

NumPy + SciPy only. Every function works on many rows at once (one row per (sample rate, noise
multiplier) pair, or one row per RDP curve), so per-client accounting over thousands of distinct rates is
a handful of array operations instead of one Python loop per curve. The default orders are
dp_accounting's own defaults (``DEFAULT_ORDERS``: 1.1-10.9 in steps of 0.1, 11-63, 128, 256, 512, 1024),
and the values are those of ``dp_accounting.rdp.RdpAccountant`` (to floating-point rounding):

* ``poisson_gaussian_rdp``: one step of the Poisson-subsampled Gaussian mechanism, add/remove-one
  neighbours (Mironov, Talwar, Zhang 2019). Integer orders:
  ``A_a = sum_i C(a, i) q^i (1-q)^(a-i) exp((i^2 - i) / (2 sigma^2))``, ``rdp = log(A_a) / (a - 1)``.
  Because the binomial weights sum to one, ``A_a = 1 + sum_{i>=2} C(a, i) q^i (1-q)^(a-i) expm1(.)``;
  the sum is taken in log space and added to 1 with ``log1p``, which keeps tiny RDP values accurate.
  Fractional orders: the two infinite series of Sec. 3.3 of that paper (the integrals of A_a below and
  above z0 = sigma^2 log(1/q - 1) + 1/2), summed term by term for all (row, order) cells at once until
  dp_accounting's own stopping rule holds (both terms decreasing and e^30 below the running sum); a
  cell that has not stopped after ``FRACTIONAL_MAX_TERMS`` terms is ``inf``, as dp_accounting makes it.
* ``swor_gaussian_rdp``: one step of the Gaussian mechanism on a fixed-size sample drawn without
  replacement, replace-one neighbours: the Theorem 27 bound of Wang, Balle, Kasiviswanathan 2019 as
  dp_accounting evaluates it (forward differences of ``exp(cgf)`` for orders <= 256, the cruder
  ``2 exp(cgf(i-1))`` term for larger orders); at a fractional order a, the linear interpolation of
  the cumulant ``(a - 1) rdp(a)`` between floor(a) and ceil(a) (Corollary 10 there; the cumulant at order
  1 is 0).
* ``epsilons_from_rdp``: the improved conversion of Balle et al. 2020 (Prop. 12) exactly as
  ``dp_accounting.rdp.compute_epsilon`` applies it, or the classic conversion of Mironov 2017.

All RDP values are in nats.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple, Union

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as _dp_rdp
from numpy.typing import ArrayLike
from scipy import special

from fedjaxpriv.privacy.validation import check_delta, check_noise_multipliers, check_sample_rates

# dp_accounting's default RDP orders: what ``RdpAccountant()`` uses, and what this package accounts with.
DEFAULT_ORDERS: tuple[float, ...] = tuple(float(a) for a in _dp_rdp.DEFAULT_RDP_ORDERS)

# Terms of the fractional-order series before a cell gives up (``inf``); dp_accounting's limit.
FRACTIONAL_MAX_TERMS = 1000
# The fractional series stops once both terms decrease and are this far (nats) below the running sum.
_FRACTIONAL_STOP_GAP = 30.0

CONVERSIONS: tuple[str, ...] = ("improved", "classic")

# dp_accounting evaluates Theorem 27 exactly up to this order and with its Stirling-branch bound above.
SWOR_EXACT_MAX_ORDER = 256

# Rows per block are chosen so that one [rows, terms] float64 temporary stays near 16 MiB.
_BLOCK_ELEMENTS = 1 << 21

_LOG2 = math.log(2.0)
_LOG4 = math.log(4.0)

OrdersLike = Union[Sequence[float], np.ndarray]


# ----------------------------------------------------------------------------- validation


def _check_orders(orders: OrdersLike) -> tuple[float, ...]:
    """Returns the orders as a tuple of floats; raises ValueError unless all are finite and > 1."""
    array = np.asarray(orders)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"orders={orders!r} is not allowed: it must be a non-empty 1-D sequence.")
    checked = []
    for order in array.tolist():
        value = float(order) if isinstance(order, (int, float)) and not isinstance(order, bool) else math.nan
        if not (math.isfinite(value) and value > 1.0):
            raise ValueError(f"order {order!r} is not allowed: RDP orders must be finite and > 1.")
        checked.append(value)
    return tuple(checked)


def _split_orders(orders: tuple[float, ...]) -> tuple[np.ndarray, tuple[int, ...], np.ndarray, np.ndarray]:
    """(integer-order columns, those orders as ints, fractional-order columns, those orders) of ``orders``."""
    integer = np.array([a.is_integer() for a in orders], dtype=bool)
    array = np.asarray(orders, dtype=np.float64)
    return (np.flatnonzero(integer), tuple(int(a) for a in array[integer]), np.flatnonzero(~integer),
            array[~integer])


def _broadcast_rows(sample_rates: ArrayLike, noise_multipliers: ArrayLike
                    ) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Validated (q, sigma) flattened to 1-D rows, and their broadcast shape."""
    q = check_sample_rates(sample_rates, "sample_rates")
    sigma = check_noise_multipliers(noise_multipliers, "noise_multipliers", zero=False)
    try:
        q, sigma = np.broadcast_arrays(q, sigma)
    except ValueError:
        raise ValueError(f"sample_rates (shape {q.shape}) and noise_multipliers (shape {sigma.shape}) "
                         "do not broadcast.") from None
    return q.ravel(), sigma.ravel(), q.shape


# ----------------------------------------------------------------------------- order bookkeeping


class _Terms(NamedTuple):
    """The flattened (order a, index i) pairs with 2 <= i <= a, grouped by order."""

    alphas: np.ndarray      # int64 [A]
    index: np.ndarray       # int64 [K], i of each term
    index_f: np.ndarray     # float64 [K], the same as floats
    rest: np.ndarray        # float64 [K], a - i
    stirling: np.ndarray    # bool [K], the term's order is above SWOR_EXACT_MAX_ORDER
    log_comb: np.ndarray    # float64 [K], log C(a, i)
    starts: np.ndarray      # int64 [A], first term of each order
    counts: np.ndarray      # int64 [A], a - 1 terms per order


@functools.lru_cache(maxsize=16)
def _terms(alphas: tuple[int, ...]) -> _Terms:
    orders = np.asarray(alphas, dtype=np.int64)
    counts = orders - 1
    index = np.concatenate([np.arange(2, a + 1, dtype=np.int64) for a in alphas])
    alpha = np.repeat(orders, counts).astype(np.float64)
    index_f = index.astype(np.float64)
    log_comb = special.gammaln(alpha + 1) - special.gammaln(index_f + 1) - special.gammaln(alpha - index_f + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return _Terms(orders, index, index_f, alpha - index_f, alpha > SWOR_EXACT_MAX_ORDER, log_comb, starts,
                  counts)


def _segment_logsumexp(values: np.ndarray, terms: _Terms) -> np.ndarray:
    """log(sum(exp(values))) over each order's terms: [rows, K] -> [rows, A]. Overwrites ``values``."""
    peak = np.maximum.reduceat(values, terms.starts, axis=1)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    values -= np.repeat(peak, terms.counts, axis=1)
    np.exp(values, out=values)
    with np.errstate(divide="ignore"):
        return np.log(np.add.reduceat(values, terms.starts, axis=1)) + peak


def _rdp_rows(q: np.ndarray, sigma_index: np.ndarray, terms: _Terms, sigma_table: np.ndarray,
              columns: np.ndarray, poisson: bool) -> np.ndarray:
    """log(A_a) / (a - 1) for rows with q < 1: [G] -> [G, A].

    ``sigma_table[sigma_index[g], columns[k]] + log C(a, i)`` is the q-independent log part of term k of
    row g. Rows are taken in blocks in sigma order, so that part is gathered once per distinct sigma of a
    block and shared by its rows. Poisson terms add ``i log q + (a - i) log(1 - q)``, SWOR terms
    ``i log q``; each order's terms are summed in log space and added to the leading 1 of A_a.
    """
    out = np.empty((q.size, terms.alphas.size))
    by_sigma = np.argsort(sigma_index, kind="stable")
    block = max(1, _BLOCK_ELEMENTS // terms.index.size)
    for start in range(0, q.size, block):
        rows = by_sigma[start:start + block]
        block_sigmas, local = np.unique(sigma_index[rows], return_inverse=True)
        base = sigma_table[block_sigmas][:, columns] + terms.log_comb     # [distinct sigmas, K]
        values = np.take(base, local.ravel(), axis=0)                     # [rows, K]
        q_rows = q[rows][:, None]
        scratch = np.multiply(terms.index_f, np.log(q_rows))
        values += scratch
        if poisson:
            values += np.multiply(terms.rest, np.log1p(-q_rows), out=scratch)
        del scratch
        log_a = np.logaddexp(0.0, _segment_logsumexp(values, terms))
        out[rows] = log_a / (terms.alphas - 1)
    return out


def _assemble(q: np.ndarray, sigma: np.ndarray, orders: tuple[float, ...], shape: tuple[int, ...],
              subsampled) -> np.ndarray:
    """Fills q == 1 rows with the Gaussian RDP a / (2 sigma^2) and the others with ``subsampled``."""
    alphas = np.asarray(orders, dtype=np.float64)
    out = np.empty((q.size, alphas.size))
    full = q == 1.0
    out[full] = alphas / (2.0 * sigma[full, None] ** 2)
    if not full.all():
        out[~full] = subsampled(q[~full], sigma[~full])
    return out.reshape(shape + (alphas.size,))


# ----------------------------------------------------------------------------- Poisson sampling


def _log_expm1_table(sigmas: np.ndarray, max_index: int) -> np.ndarray:
    """log(expm1((i^2 - i) / (2 sigma^2))) for i = 0..max_index: [S, max_index + 1] (-inf at i = 0, 1)."""
    i = np.arange(max_index + 1, dtype=np.float64)
    exponent = (i * i - i) / (2.0 * sigmas[:, None] ** 2)
    with np.errstate(divide="ignore"):
        return exponent + np.log(-np.expm1(-exponent))


def _poisson_integer_rdp(q: np.ndarray, sigma: np.ndarray, alphas: tuple[int, ...]) -> np.ndarray:
    """RDP at integer orders >= 2 of rows with q < 1: [G] -> [G, A]."""
    terms = _terms(alphas)
    unique, inverse = np.unique(sigma, return_inverse=True)
    table = _log_expm1_table(unique, max(alphas))                         # [S, max_order + 1]
    return _rdp_rows(q, inverse.ravel(), terms, table, terms.index, poisson=True)


def _fractional_terms(q: np.ndarray, sigma: np.ndarray, alpha: np.ndarray, i: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Log terms i of the two series of A_alpha at fractional alpha: cells [C] x indices [T] -> 2 x [C, T].

    With j = alpha - i and z0 = sigma^2 log(1/q - 1) + 1/2 (|C(alpha, i)| by log-gamma):
      s0 = log|C(alpha, i)| + i log q + j log(1-q) + (i^2 - i) / (2 sigma^2) + log Phi((z0 - i) / sigma)
      s1 = log|C(alpha, i)| + j log q + i log(1-q) + (j^2 - j) / (2 sigma^2) + log Phi((j - z0) / sigma)
    """
    q, sigma, alpha = q[:, None], sigma[:, None], alpha[:, None]
    log_q, log_1mq = np.log(q), np.log1p(-q)
    two_var = 2.0 * sigma**2
    z0 = sigma**2 * np.log(1.0 / q - 1.0) + 0.5
    j = alpha - i
    log_coef = special.gammaln(alpha + 1.0) - special.gammaln(i + 1.0) - special.gammaln(j + 1.0)
    s0 = log_coef + i * log_q + j * log_1mq + (i * i - i) / two_var + special.log_ndtr((z0 - i) / sigma)
    s1 = log_coef + j * log_q + i * log_1mq + (j * j - j) / two_var + special.log_ndtr((j - z0) / sigma)
    return s0, s1


def _poisson_fractional_log_a(q: np.ndarray, sigma: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """log(A_alpha) of cells (q < 1, sigma, fractional alpha > 1): [C] -> [C], ``inf`` where it never stops.

    Terms are taken in chunks of growing length for the cells still running; within a chunk the running
    sum is a cumulative logaddexp, and a cell's value is the running sum at the first index where
    dp_accounting's rule holds (s0 and s1 both below their previous terms, and both more than
    ``_FRACTIONAL_STOP_GAP`` below the running sum), so the same terms are summed as there.
    """
    cells = q.size
    out = np.full(cells, np.inf)
    total = np.full(cells, -np.inf)
    last0 = np.full(cells, -np.inf)
    last1 = np.full(cells, -np.inf)
    running = np.arange(cells)
    start, length = 0, 16
    while running.size and start < FRACTIONAL_MAX_TERMS:
        stop = min(start + length, FRACTIONAL_MAX_TERMS)
        i = np.arange(start, stop, dtype=np.float64)
        block = max(1, _BLOCK_ELEMENTS // i.size)
        finished = np.zeros(running.size, dtype=bool)
        for lo in range(0, running.size, block):
            rows = running[lo:lo + block]
            s0, s1 = _fractional_terms(q[rows], sigma[rows], alpha[rows], i)
            summed = np.logaddexp.accumulate(np.concatenate([total[rows, None], np.logaddexp(s0, s1)], axis=1),
                                             axis=1)[:, 1:]
            previous0 = np.concatenate([last0[rows, None], s0[:, :-1]], axis=1)
            previous1 = np.concatenate([last1[rows, None], s1[:, :-1]], axis=1)
            stops = (s0 < previous0) & (s1 < previous1) & (np.maximum(s0, s1) < summed - _FRACTIONAL_STOP_GAP)
            stopped = stops.any(axis=1)
            first = np.argmax(stops, axis=1)
            out[rows[stopped]] = summed[stopped, first[stopped]]
            finished[lo:lo + block] = stopped
            total[rows], last0[rows], last1[rows] = summed[:, -1], s0[:, -1], s1[:, -1]
        running = running[~finished]
        start, length = stop, 2 * length
    return out


def poisson_gaussian_rdp(sample_rates: ArrayLike, noise_multipliers: ArrayLike,
                         orders: OrdersLike = DEFAULT_ORDERS) -> np.ndarray:
    """RDP (nats) of one step of the Poisson-subsampled Gaussian mechanism, add/remove-one neighbours.

    Args:
      sample_rates: float64 [G] (or anything broadcastable with ``noise_multipliers``), q in (0, 1].
      noise_multipliers: float64 [G], sigma > 0 and finite (noise std / L2 sensitivity).
      orders: RDP orders > 1, [A] (integer and fractional; default dp_accounting's defaults).

    Returns:
      float64 [G, A] (in general ``broadcast shape + (A,)``). Rows with q == 1 are the plain Gaussian
      mechanism ``a / (2 sigma^2)``. Equals dp_accounting's ``RdpAccountant(orders)`` composed with
      ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``, ``inf`` at the same fractional orders.
    """
    alphas = _check_orders(orders)
    q, sigma, shape = _broadcast_rows(sample_rates, noise_multipliers)
    integer_columns, integer_orders, fractional_columns, fractional_orders = _split_orders(alphas)

    def subsampled(q_rows: np.ndarray, sigma_rows: np.ndarray) -> np.ndarray:
        out = np.empty((q_rows.size, len(alphas)))
        if integer_orders:
            out[:, integer_columns] = _poisson_integer_rdp(q_rows, sigma_rows, integer_orders)
        if fractional_orders.size:
            cell_alpha = np.tile(fractional_orders, q_rows.size)
            log_a = _poisson_fractional_log_a(np.repeat(q_rows, fractional_orders.size),
                                              np.repeat(sigma_rows, fractional_orders.size), cell_alpha)
            out[:, fractional_columns] = (log_a / (cell_alpha - 1.0)).reshape(q_rows.size, -1)
        return out

    return _assemble(q, sigma, alphas, shape, subsampled)


# ----------------------------------------------------------------------------- sampling without replacement


def _log_diff_step(log_mag: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One forward difference x[j + 1] - x[j] of signed values stored as (log |x|, x >= 0), along axis 1."""
    a, b = log_mag[:, :-1], log_mag[:, 1:]
    sign_a, sign_b = positive[:, :-1], positive[:, 1:]
    hi, lo = np.maximum(a, b), np.minimum(a, b)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.exp(lo - hi)                      # in [0, 1]; NaN only when both are -inf
        same = sign_a == sign_b
        # Same signs: |e^b - e^a| = e^hi (1 - e^(lo - hi)); opposite signs: e^hi (1 + e^(lo - hi)).
        mag = hi + np.where(same, np.log1p(-ratio), np.log1p(ratio))
    mag = np.where(hi == -np.inf, -np.inf, mag)
    # Same signs: the difference keeps b's sign when |b| >= |a| and flips it otherwise; opposite signs: b's.
    sign = np.where(same & (b < a), ~sign_b, sign_b)
    return mag, sign


def _log_forward_differences(log_values: np.ndarray) -> np.ndarray:
    """log |Delta^k f(0)| for k = 0..N from log f(j) for j = 0..N (f > 0), per row: [S, N+1] -> [S, N+1].

    Iterated first differences of signed values kept as (log magnitude, sign), so magnitudes far beyond
    the float64 range are fine; exact zeros come out as -inf.
    """
    log_mag = np.asarray(log_values, dtype=np.float64)
    positive = np.ones(log_mag.shape, dtype=bool)
    out = np.empty_like(log_mag)
    out[:, 0] = log_mag[:, 0]
    for k in range(1, log_mag.shape[1]):
        log_mag, positive = _log_diff_step(log_mag, positive)
        out[:, k] = log_mag[:, 0]
    return out


def _swor_term_table(sigmas: np.ndarray, alphas: tuple[int, ...]) -> np.ndarray:
    """Sigma-dependent log term b_i of the Theorem 27 bound: [S, 2, max_order + 1], -inf at i = 0, 1.

    ``[:, 0, i]`` is the exact-branch term (orders <= 256), ``[:, 1, i]`` the Stirling-branch term.
    With cgf(x) = x (x + 1) / (2 sigma^2) and g(j) = exp(cgf(j - 1)):
      i = 2:  min(log 4 + log(exp(1/sigma^2) - 1), 1/sigma^2 + log 2)       (both branches)
      i >= 3: min(log 4 + (log|D^(2 floor(i/2))| + log|D^(2 ceil(i/2))|) / 2, log 2 + cgf(i - 1))  (exact)
              log 2 + cgf(i - 1)                                               (Stirling)
    where D^k = Delta^k g(0), the k-th forward difference at 0.
    """
    max_order = max(alphas)
    two_var = 2.0 * sigmas[:, None] ** 2
    i = np.arange(max_order + 1, dtype=np.float64)
    table = np.full((sigmas.size, 2, max_order + 1), -np.inf)
    stirling = _LOG2 + (i - 1.0) * i / two_var                      # log 2 + cgf(i - 1)
    table[:, 1, 3:] = stirling[:, 3:]
    exact_orders = [a for a in alphas if a <= SWOR_EXACT_MAX_ORDER]
    if exact_orders:
        top = max(exact_orders)
        highest = 2 * math.ceil(top / 2)                            # highest difference order used
        j = np.arange(highest + 1, dtype=np.float64)
        log_d = _log_forward_differences((j - 1.0) * j / two_var)    # log|Delta^k g(0)|, k = 0..highest
        k = np.arange(3, top + 1)
        paired = _LOG4 + 0.5 * (log_d[:, 2 * (k // 2)] + log_d[:, 2 * ((k + 1) // 2)])
        table[:, 0, 3:top + 1] = np.minimum(paired, stirling[:, 3:top + 1])
    f2 = 2.0 / two_var[:, 0]                                        # rdp of the Gaussian at order 2
    table[:, :, 2] = np.minimum(_LOG4 + f2 + np.log(-np.expm1(-f2)), f2 + _LOG2)[:, None]
    return table


def swor_gaussian_rdp(sample_rates: ArrayLike, noise_multipliers: ArrayLike,
                      orders: OrdersLike = DEFAULT_ORDERS) -> np.ndarray:
    """RDP (nats) of one step of the Gaussian mechanism on a sample of m = q n drawn without replacement.

    Replace-one neighbours; the Theorem 27 bound of Wang, Balle, Kasiviswanathan 2019 as dp_accounting
    computes it, including its Stirling-branch bound for orders > 256, and at fractional orders the
    interpolation of the cumulant between the neighbouring integer orders.

    Args:
      sample_rates: float64 [G] (or anything broadcastable with ``noise_multipliers``), q = m / n in (0, 1].
      noise_multipliers: float64 [G], sigma > 0 and finite (noise std / replace-one L2 sensitivity).
      orders: RDP orders > 1, [A] (integer and fractional; default dp_accounting's defaults).

    Returns:
      float64 [G, A] (in general ``broadcast shape + (A,)``); rows with q == 1 are ``a / (2 sigma^2)``.
      Equals ``RdpAccountant(orders, neighboring_relation=REPLACE_ONE)`` composed with
      ``SampledWithoutReplacementDpEvent(n, m, GaussianDpEvent(sigma))`` for q = m / n.

    The q-independent part (forward differences, binomial coefficients) is computed once per distinct
    sigma and shared by all rows with that sigma. As in dp_accounting, the forward differences are iterated
    in float64; for sigma above about 10 cancellation makes them (and so the bound at large q and orders)
    larger than their exact values, i.e. the bound is looser, not smaller.
    """
    alphas = _check_orders(orders)
    q, sigma, shape = _broadcast_rows(sample_rates, noise_multipliers)
    integer_columns, integer_orders, fractional_columns, fractional_orders = _split_orders(alphas)
    floors = np.floor(fractional_orders).astype(np.int64)
    # Integer orders needed: the requested ones and both neighbours of every fractional one (order 1 has
    # cumulant 0 and is not computed).
    needed = tuple(sorted(set(integer_orders) | {int(a) for a in np.concatenate([floors, floors + 1]) if a >= 2}))
    position = {a: k for k, a in enumerate(needed)}

    def subsampled(q_rows: np.ndarray, sigma_rows: np.ndarray) -> np.ndarray:
        out = np.empty((q_rows.size, len(alphas)))
        if needed:
            integer_rdp = _swor_integer_rdp(q_rows, sigma_rows, needed)
            out[:, integer_columns] = integer_rdp[:, [position[a] for a in integer_orders]]
            cumulant = integer_rdp * (np.asarray(needed, dtype=np.float64) - 1.0)      # (a - 1) rdp(a)
            cumulant = np.concatenate([np.zeros((q_rows.size, 1)), cumulant], axis=1)  # column 0: order 1
            at = {1: 0, **{a: k + 1 for k, a in enumerate(needed)}}
            low = cumulant[:, [at[int(a)] for a in floors]]
            high = cumulant[:, [at[int(a) + 1] for a in floors]]
            t = fractional_orders - floors
            out[:, fractional_columns] = ((1.0 - t) * low + t * high) / (fractional_orders - 1.0)
        return out

    return _assemble(q, sigma, alphas, shape, subsampled)


def _swor_integer_rdp(q: np.ndarray, sigma: np.ndarray, alphas: tuple[int, ...]) -> np.ndarray:
    """Theorem 27 RDP at integer orders >= 2 of rows with q < 1: [G] -> [G, A]."""
    terms = _terms(alphas)
    unique, inverse = np.unique(sigma, return_inverse=True)
    table = _swor_term_table(unique, alphas).reshape(unique.size, -1)      # [S, 2 (max_order + 1)]
    columns = terms.stirling * (max(alphas) + 1) + terms.index
    return _rdp_rows(q, inverse.ravel(), terms, table, columns, poisson=False)


# ----------------------------------------------------------------------------- conversion


def epsilons_from_rdp(orders: Sequence[float], rdp: ArrayLike, delta: float | ArrayLike,
                      conversion: str = "improved") -> np.ndarray:
    """Epsilon at ``delta`` of every RDP curve: rdp [N, A] (in general [..., A]) -> epsilon [N]. ``delta`` is one
    value or one per curve ([N], in general [...]), e.g. each curve's delta less its truncation charge.

    ``"improved"``: ``dp_accounting.rdp.compute_epsilon`` row by row. Per order a with RDP r: 0 if r < 0
    (numerical noise) or if delta^2 + expm1(-r) > 0 (KL bound); ``r + log(1 - 1/a) - log(delta a)/(a - 1)``
    if a > 1.01 (Balle et al. 2020, Prop. 12); otherwise inf. Epsilon is max(0, min over orders).
    ``"classic"``: Mironov 2017, ``max(0, min_a r + log(1/delta) / (a - 1))`` over orders a > 1.
    Rows that are inf at every order give inf. Orders must be >= 1 (they need not be integers here).
    """
    if conversion not in CONVERSIONS:
        raise ValueError(f"conversion={conversion!r} is not allowed: use one of {CONVERSIONS}.")
    if np.ndim(delta) == 0:
        delta = check_delta(delta)
    else:  # one per curve: a trailing axis so that it broadcasts against the orders
        delta = np.asarray(delta, np.float64)
        if not np.all((delta > 0.0) & (delta < 1.0)):
            bad = delta[~((delta > 0.0) & (delta < 1.0))][:3]
            raise ValueError(f"delta={bad} is not allowed: every delta must satisfy 0 < delta < 1.")
        delta = delta[..., None]
    alphas = np.asarray(orders, dtype=np.float64)
    if alphas.ndim != 1 or alphas.size == 0:
        raise ValueError(f"orders={orders!r} is not allowed: it must be a non-empty 1-D sequence.")
    bad = ~(alphas >= 1.0)
    if bad.any():
        raise ValueError(f"order {float(alphas[bad][0])!r} is not allowed: orders must be >= 1.")
    rdp = np.asarray(rdp, dtype=np.float64)
    if rdp.ndim == 0 or rdp.shape[-1] != alphas.size:
        raise ValueError(f"rdp has shape {rdp.shape}, which does not match the {alphas.size} orders: "
                         f"it must be [..., {alphas.size}].")
    if np.isnan(rdp).any():
        index = [int(i) for i in np.argwhere(np.isnan(rdp))[0]]
        raise ValueError(f"rdp{index}=nan is not allowed: RDP values must be numbers (inf is fine).")
    if isinstance(delta, np.ndarray):
        if delta.shape[:-1] != rdp.shape[:-1]:
            raise ValueError(f"delta has shape {delta.shape[:-1]}: one per curve of rdp {rdp.shape} is needed.")
    if conversion == "classic":
        return _classic_epsilons(alphas, rdp, delta)
    return _improved_epsilons(alphas, rdp, delta)


def _columns(rdp: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """rdp[..., keep] without a copy when every order is kept."""
    return rdp if keep.all() else rdp[..., keep]


def _log(value: float | np.ndarray) -> float | np.ndarray:
    """``math.log`` of one delta, ``np.log`` of one per curve (``epsilons_from_rdp``)."""
    return np.log(value) if isinstance(value, np.ndarray) else math.log(value)


def _classic_epsilons(alphas: np.ndarray, rdp: np.ndarray, delta: float | np.ndarray) -> np.ndarray:
    usable = alphas > 1.0
    if not usable.any():
        return np.full(rdp.shape[:-1], np.inf)
    eps = (_columns(rdp, usable) + _log(1.0 / delta) / (alphas[usable] - 1.0)).min(axis=-1)
    return np.maximum(eps, 0.0)


def _kl_or_negative_rows(rdp: np.ndarray, delta: float | np.ndarray) -> np.ndarray:
    """Rows [...] with an order where r < 0 or delta^2 + expm1(-r) > 0 (compute_epsilon's epsilon-0 cases).

    The exact test runs only on rows that have an r below a slightly widened threshold -log1p(-delta^2),
    which every r passing the test is under.
    """
    flat = rdp.reshape(-1, rdp.shape[-1])
    if isinstance(delta, np.ndarray):  # one per row
        delta = np.broadcast_to(delta, rdp.shape[:-1] + (1,)).reshape(-1, 1)
        threshold = -np.log1p(-(delta**2)) * (1.0 + 1e-6)
    else:
        threshold = -math.log1p(-(delta**2)) * (1.0 + 1e-6)
    candidates = np.flatnonzero((flat < threshold).any(axis=1))
    hit = np.zeros(flat.shape[0], dtype=bool)
    if candidates.size:
        r = flat[candidates]
        d = delta[candidates] if isinstance(delta, np.ndarray) else delta
        hit[candidates] = ((r < 0.0) | (d**2 + np.expm1(-r) > 0.0)).any(axis=1)
    return hit.reshape(rdp.shape[:-1])


def _improved_epsilons(alphas: np.ndarray, rdp: np.ndarray, delta: float | np.ndarray) -> np.ndarray:
    # An order with negative RDP or with the KL shortcut gives epsilon 0, so such a row's epsilon is 0.
    zero = _kl_or_negative_rows(rdp, delta)
    usable = alphas > 1.01
    if usable.any():
        a = alphas[usable]
        eps = (_columns(rdp, usable) + np.log1p(-1.0 / a) - np.log(delta * a) / (a - 1.0)).min(axis=-1)
    else:
        eps = np.full(rdp.shape[:-1], np.inf)
    return np.where(zero, 0.0, np.maximum(eps, 0.0))
