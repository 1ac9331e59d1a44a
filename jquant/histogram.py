"""HistogramObserver (torch 2.13) and PerChannelHistogramObserver, pure and jittable.

Counterpart: ``torch.ao.quantization.HistogramObserver`` as of torch 2.13 (REFERENCE.md §3):
a running histogram over the union of the observed ranges (no range rounding), widened by
upsampling each old bin ``upsample_rate`` times and rebinning, and ``calculate_qparams`` by
the L2 "norm minimisation" search over the histogram. Everything runs under ``jax.jit``
with static shapes and no host round trip, and reproduces torch's float32 arithmetic bit
for bit: ``torch.histc``'s op order (and its x86 quirks), ``torch.linspace``'s fused
multiply-add, the sequential float32 scatter-add of the rebinning, ``torch.sum``'s cascade
order, ``torch.cumsum``'s double accumulator, and the double-precision ``alpha``/``beta``
walk of the search. Where XLA would round differently (it contracts ``a*b + c`` into an
FMA, rewrites ``x / scalar`` into ``x * (1/scalar)`` and flushes denormals), the code
works around it; the few documented deviations are listed on each class.

:class:`PerChannelHistogramObserver` (no torch counterpart) keeps one histogram per
channel and runs the same machinery batched over channels: channel ``c``'s qparams equal
those of a per-tensor :class:`HistogramObserver` fed only channel ``c``.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant import _numerics as nm
from jquant import collectives
from jquant._config import register_state
from jquant._state_dict import StateDictError, expect_shape
from jquant.observers import DEFAULT_EPS, UniformQuantizationObserverBase
from jquant.types import QScheme, as_int, quint8, torch_iinfo

__all__ = ["HistogramState", "HistogramObserver", "PerChannelHistogramObserver"]

F32, I32 = jnp.float32, jnp.int32
_INT32_MAX = np.int32(2 ** 31 - 1)
_INT32_MIN = np.int32(-(2 ** 31))
#: Ranges whose endpoints are all below 2**-64 in magnitude are binned after an exact
#: scaling by 2**64 (XLA on CPU flushes denormals, torch does not; the scaling keeps every
#: intermediate of the histc formula normal, and the formula is invariant under it).
_TINY_EXP = 64
_TINY_BITS = np.int32((127 - _TINY_EXP) << 23)
#: In the scaled domain torch's float32 denormals (spacing 2**-149 below 2**-126) have
#: spacing 2**-85 below 2**-62: results there are rounded to that grid (gradual underflow).
_GRID = 2.0 ** (_TINY_EXP - 149)
_SMALL = 2.0 ** (_TINY_EXP - 126)
#: ``bins * upsample_rate`` up to this many sub-bins: torch's upscale, bit for bit.
#: Beyond (where torch allocates tens of MB per call, or runs out of memory, as for the
#: seed's 8000**2 case) the upsampled histogram is replaced by its limit for
#: ``upsample_rate -> inf``: each old bin's mass split by exact overlap (O(bins) memory).
_EXACT_UPSCALE_MAX = 1 << 22
#: Length of the precomputed alpha/beta tables of the search (the loop ends by ~1e5 steps).
_AB_LEN = 100_010


@register_state
class HistogramState(NamedTuple):
    """State of the histogram observers (torch's buffers, in state_dict order).

    ``eps``: float32 ``(1,)``. ``histogram``: float32 ``(bins,)`` per-tensor, ``(C, bins)``
    per-channel. ``min_val``/``max_val``: float32 ``()`` per-tensor, ``(C,)`` per-channel;
    ``+inf``/``-inf`` until the first batch.
    """
    eps: jax.Array
    histogram: jax.Array
    min_val: jax.Array
    max_val: jax.Array


# ----------------------------------------------------------------------------------------
# Bit-level helpers (exact under XLA's denormal flushing)
# ----------------------------------------------------------------------------------------

def _zeros(shape, dtype, *refs):
    """``zeros(shape, dtype)`` typed like ``refs`` (their shard_map "varying" axes), for
    loop carries whose body mixes in ``refs``."""
    z = jnp.zeros(shape, dtype)
    for r in refs:
        z = z + jnp.zeros_like(jnp.ravel(r)[0], dtype=dtype)
    return z


def _bits(x):
    return lax.bitcast_convert_type(nm.f32(x), I32)


def _key(x):
    """int32 key whose signed order is the float order (-0 sorts below +0); NaN excluded."""
    b = _bits(x)
    return jnp.where(b < 0, b ^ np.int32(0x7FFFFFFF), b)


def _from_key(k):
    b = jnp.where(k < 0, k ^ np.int32(0x7FFFFFFF), k)
    return lax.bitcast_convert_type(b, F32)


def _feq(a, b):
    """``a == b`` as torch compares floats (denormals not flushed, +0 == -0, NaN unequal)."""
    zeros = ((_bits(a) | _bits(b)) & np.int32(0x7FFFFFFF)) == 0
    return ((_key(a) == _key(b)) | zeros) & ~jnp.isnan(a) & ~jnp.isnan(b)


def _is_tiny(x):
    return (_bits(x) & np.int32(0x7FFFFFFF)) < _TINY_BITS


def _scale_up(x):
    """``x * 2**64`` exactly for ``|x| < 2**-64``, denormals included (bit decoding)."""
    b = _bits(x)
    mant = (b & np.int32(0x7FFFFF)).astype(F32)
    den = mant * np.float32(2.0 ** (_TINY_EXP - 149))
    den = jnp.where(b < 0, -den, den)
    return jnp.where((b & np.int32(0x7F800000)) == 0, den, x * np.float32(2.0 ** _TINY_EXP))


def _round_gradual(s, err=None):
    """float64 ``s`` (a value in the 2**64-scaled domain, plus the exact error ``err`` of
    ``s`` when it is a rounded sum) rounded to float32 as torch rounds ``s * 2**-64``
    below 2**-126: to the denormal grid, ties to even (``err`` breaks exact ties).
    Correct for ``|s| < 2**-62``; the caller selects it there."""
    with nm.enable_x64():
        q = s * (1.0 / _GRID)
        fl = jnp.floor(q)
        frac = q - fl
        odd = fl - 2.0 * jnp.floor(0.5 * fl) == 1.0
        tie_up = odd if err is None else (err > 0) | ((err == 0) & odd)
        up = (frac > 0.5) | ((frac == 0.5) & tie_up)
        return ((fl + up.astype(fl.dtype)) * _GRID).astype(F32)


def _div_gradual(a, d, gradual):
    """``_div(a, d)`` for a divisor ``d`` an integer below 2**22; where ``gradual``, ``a``
    is in the scaled domain and quotients below 2**-62 round to torch's denormal grid
    (from the float64 quotient: no double-rounding tie is possible for such ``d``)."""
    plain = _div(a, d)
    if not gradual:
        return plain
    with nm.enable_x64():
        q = _div(jnp.asarray(a).astype(jnp.float64), np.float64(d))
        small = jnp.abs(q) < _SMALL
    return jnp.where(small, _round_gradual(q), plain)


def _half_gradual(x, gradual):
    """``0.5 * x`` (float32) with torch's denormal rounding where ``gradual`` (scaled)."""
    h = np.float32(0.5) * x
    if not gradual:
        return h
    with nm.enable_x64():
        g = _round_gradual(h.astype(jnp.float64))
    return jnp.where(jnp.abs(h) < _SMALL, g, h)


def _div(a, d):
    """``a / d`` correctly rounded where ``d`` broadcasts (a scalar or constant).

    XLA rewrites a division by a broadcast scalar into a multiplication by its rounded
    reciprocal; a divisor that depends elementwise on ``a`` (``d + 0*a``, equal to ``d``
    for finite ``a``) keeps the true division. Non-finite ``a`` divides by ``d`` itself.
    """
    a = jnp.asarray(a)
    d = jnp.asarray(d, a.dtype)
    exact = a / (d + jnp.zeros((), a.dtype) * a)
    return jnp.where(jnp.isfinite(a), exact, a / d)


def _mul(a, b):
    """``f32(a * b)`` rounded on its own (torch rounds every tensor op separately).

    XLA:CPU contracts ``a * b + c`` into one FMA; :func:`jquant._numerics.unfused` keeps
    them apart at no cost. (``mul_rounded`` does the same with a conditional, which is
    much slower to compile; the search has a dozen such products.)
    """
    return nm.unfused(jnp.asarray(a) * jnp.asarray(b))


def _floor_divide(a, b):
    """``torch.div(a, b, rounding_mode='floor')`` for float32 ``a`` and a positive scalar ``b``.

    torch's algorithm (REFERENCE §0.7) on float32: ``mod = fmod(a, b)``, ``div = (a - mod)
    / b``, minus one when ``mod`` is negative, then ``floor`` with a ``+1`` correction
    above one half. ``fmod`` (a slow libm call in XLA) is replaced by its exact value from
    a float64 quotient estimate corrected by the exact remainder; the rest is torch's
    float32 arithmetic, so even huge quotients round as torch's do.
    """
    b = jnp.asarray(b, F32)
    with nm.enable_x64():
        a64 = a.astype(jnp.float64)
        b64 = b.astype(jnp.float64)
        q = jnp.trunc(a64 / b64)
        rem = a64 - q * b64     # exact while |a/b| < 2**29 (and beyond with XLA:CPU's FMA)
        pos = a64 >= 0
        q = q + jnp.where(pos, (rem >= b64).astype(q.dtype) - (rem < 0).astype(q.dtype),
                          (rem > 0).astype(q.dtype) - (rem <= -b64).astype(q.dtype))
        mod = (a64 - q * b64).astype(F32)   # == fmod(a, b), exactly representable
    div = _div(a - mod, b)
    div = jnp.where((mod != 0) & (mod < 0), div - 1, div)
    fl = jnp.floor(div)
    fl = jnp.where(div - fl > 0.5, fl + 1, fl)
    return jnp.where(div != 0, fl, jnp.where(_div(a, b) < 0, -0.0, 0.0).astype(F32))


def _round_fma(a, j, c, gradual: bool = False):
    """``f32(a * j + c)`` rounded once (torch's FMA-contracted linspace), for f32 ``a``, ``c``.

    ``j`` is an integer array (< 2**29 so that ``a * j`` is exact in float64). The sum is
    formed in float64 with its rounding error (TwoSum). Rounding that double to float32 is
    correct unless it lies exactly halfway between two floats while the error is not zero;
    then the error's sign picks the side. (``s`` is halfway iff ``2s - f32(s)`` is itself a
    float32 other than ``f32(s)``.)
    """
    with nm.enable_x64():
        f64 = jnp.float64
        A = jnp.asarray(a).astype(f64)
        C = jnp.asarray(c).astype(f64)
        p = A * jnp.asarray(j).astype(f64)
        s = C + p
        bb = s - C
        err = (C - (s - bb)) + (p - bb)
        f = s.astype(F32)
        d = s - f.astype(f64)
        other = 2.0 * s - f.astype(f64)
        g = other.astype(F32)
        halfway = (d != 0) & (g.astype(f64) == other)
        flip = halfway & (err != 0) & ((err > 0) == (d > 0))
        out = jnp.where(flip, g, f)
        if gradual:   # scaled domain: torch's denormal rounding below 2**-62
            out = jnp.where(jnp.abs(s) < _SMALL, _round_gradual(s, err), out)
        return out


def _linspace(start, end, n: int, idx, gradual: bool = False):
    """Elements ``idx`` of ``torch.linspace(start, end, n)`` (float32, CPU, REFERENCE §0.5).

    ``gradual`` (static): the endpoints are 2**64-scaled and every step rounds as
    torch's float32 does in the denormal range."""
    start, end = nm.f32(start), nm.f32(end)
    step = _div_gradual(end - start, n - 1, gradual)
    half = n // 2
    first = _round_fma(step, idx, start, gradual)
    second = _round_fma(-step, (n - 1) - idx, end, gradual)
    return jnp.where(idx < half, first, second)


def _searchsorted(a, v, right: bool):
    """Insertion points of ``v`` into the sorted vector ``a`` (``torch.bucketize`` /
    ``np.searchsorted``): the count of ``a <= v`` (``right``) or of ``a < v``, int32.
    Binary lifting in a ``fori_loop`` of ``ceil(log2(len(a) + 1))`` steps."""
    n = a.shape[-1]
    nbits = n.bit_length()

    def step(it, pos):
        cand = pos + jnp.left_shift(jnp.int32(1), nbits - 1 - it)
        val = a[jnp.minimum(cand, n) - 1]
        ok = (cand <= n) & ((val <= v) if right else (val < v))
        return jnp.where(ok, cand, pos)

    return lax.fori_loop(0, nbits, step, _zeros(jnp.shape(v), I32, a, v))


# ----------------------------------------------------------------------------------------
# torch's summation orders
# ----------------------------------------------------------------------------------------

def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


def _multi_row_sum(rows):
    """at::native multi_row_sum over ``rows`` ``(..., size, 4, L)`` -> ``(..., 4, L)``."""
    size = rows.shape[-3]
    batch = rows.shape[:-3]
    lp = max(4, _ceil_log2(size) // 4)
    step, mask = 1 << lp, (1 << lp) - 1
    zero = jnp.zeros(batch + rows.shape[-2:], rows.dtype)
    acc = [zero] * 4
    nfull = size // step
    i = 0
    if nfull:
        ch = rows[..., :nfull * step, :, :].reshape(batch + (nfull, step) + rows.shape[-2:])
        s = jnp.zeros(batch + (nfull,) + rows.shape[-2:], rows.dtype) + ch[..., 0, :, :]
        for t in range(1, step):
            s = s + ch[..., t, :, :]
        for c in range(nfull):
            i += step
            acc[0] = s[..., c, :, :]
            for j in range(1, 4):
                acc[j] = acc[j] + acc[j - 1]
                acc[j - 1] = zero
                if i & (mask << (j * lp)):
                    break
    for r in range(nfull * step, size):
        acc[0] = acc[0] + rows[..., r, :, :]
    for j in range(1, 4):
        acc[0] = acc[0] + acc[j]
    return acc[0]


def _row_sum(data):
    """at::native row_sum (ilp 4) over ``data`` ``(..., size, L)`` -> ``(..., L)``."""
    size = data.shape[-2]
    size_ilp = size // 4
    rows = data[..., :size_ilp * 4, :].reshape(data.shape[:-2] + (size_ilp, 4, data.shape[-1]))
    partial = _multi_row_sum(rows)
    p0 = partial[..., 0, :]
    for i in range(size_ilp * 4, size):
        p0 = p0 + data[..., i, :]
    for k in range(1, 4):
        p0 = p0 + partial[..., k, :]
    return p0


def _torch_sum(x):
    """``torch.sum`` of float32 vectors along the last axis, in torch's CPU cascade order.

    Exact (bit for bit) for lengths up to 32768 (one reduction chunk; REFERENCE §0.6):
    8-lane vectors summed by the 4-way-ILP multi-level cascade, the scalar tail added
    sequentially, then the lanes in order. Shorter than 8 runs the scalar cascade.
    """
    x = nm.f32(x)
    n = x.shape[-1]
    zero = jnp.zeros(x.shape[:-1], F32)
    if n == 0:
        return zero
    if n < 8:
        return zero + _row_sum(x[..., None])[..., 0]
    nv = n // 8
    vacc = _row_sum(x[..., :nv * 8].reshape(x.shape[:-1] + (nv, 8)))
    acc = zero
    for k in range(nv * 8, n):
        acc = acc + x[..., k]
    for lane in range(8):
        acc = acc + vacc[..., lane]
    return zero + acc


def _seq_cumsum(x):
    """``torch.cumsum`` of float32 vectors on CPU: a sequential double accumulator, each
    output rounded to float32 (``acc_type<float>`` is double there)."""
    with nm.enable_x64():
        def step(c, v):
            c = c + v
            return c, c.astype(F32)
        xs = jnp.moveaxis(nm.f32(x).astype(jnp.float64), -1, 0)
        _, out = lax.scan(step, _zeros(x.shape[:-1], jnp.float64, x), xs)
    return jnp.moveaxis(out, 0, -1)


# ----------------------------------------------------------------------------------------
# torch.histc
# ----------------------------------------------------------------------------------------

def _histc_range(lo, hi):
    """torch.histc's edges for ``[lo, hi]`` (float32 input).

    A single point ``c`` widens (in double, then rounded to float32 by linspace) to
    ``[min(prev_f32(c), c - 1), max(next_f32(c), c + 1)]`` (torch's
    ``bins_edges_correction``), so a large constant still gets two distinct edges.
    """
    with nm.enable_x64():
        f64 = jnp.float64
        below = jnp.nextafter(lo, jnp.float32(-jnp.inf)).astype(f64)
        above = jnp.nextafter(hi, jnp.float32(jnp.inf)).astype(f64)
        wl = jnp.minimum(below, lo.astype(f64) - 1.0).astype(F32)
        wh = jnp.maximum(above, hi.astype(f64) + 1.0).astype(F32)
    point = _feq(lo, hi)
    return jnp.where(point, wl, lo), jnp.where(point, wh, hi)


def _positions_core(v, lo, hi, bins: int):
    a = (v - lo) * np.float32(bins)
    q = a / ((hi - lo) + jnp.zeros((), F32) * a)   # true division (see _div)
    # x86: a non-finite quotient converts to INT64_MIN and lands in bin 0 (REFERENCE §3.2)
    q = jnp.where(jnp.isfinite(q), jnp.minimum(q, np.float32(bins - 1)), 0.0)
    return q.astype(I32)


def _positions_at(v, lo, hi, bins: int, scaled: bool):
    """:func:`_positions_core`, on values and range scaled up exactly when ``scaled``
    (static: the range is within 2**-64 of zero)."""
    if scaled:
        v, lo, hi = _scale_up(v), _scale_up(lo), _scale_up(hi)
    return _positions_core(v, lo, hi, bins)


def _positions(v, lo, hi, bins: int):
    """torch.histc's bin of each ``v`` in ``[lo, hi]`` (float32 op order of the kernel).

    ``pos = trunc(f32(f32(f32(v - lo) * bins) / f32(hi - lo)))``, the closed last bin, a
    non-finite quotient in bin 0. Ranges below 2**-64 are scaled up exactly first (XLA
    flushes the denormals torch keeps).
    """
    tiny = jnp.any(_is_tiny(lo) & _is_tiny(hi))
    return lax.cond(tiny, functools.partial(_positions_at, bins=bins, scaled=True),
                    functools.partial(_positions_at, bins=bins, scaled=False), v, lo, hi)


#: Elements binned per step of the counting loop (keeps the bin indices in cache).
_COUNT_CHUNK = 1 << 18


#: Batches of at least this many elements are counted by two independent scatter-adds per
#: step (XLA:CPU runs independent ops side by side: ~25% faster at 1.6e7 elements on 2
#: cores; below, the second thread's start-up makes timings erratic).
_TWO_LANES_MIN = 1 << 22


def _count_block(acc, xb, lo, hi, bins: int, scaled: bool):
    """Adds the finite elements of ``xb`` ``(C, n)`` into ``acc`` ``(lanes, C * (bins + 1))``:
    one scatter-add per lane over its share of ``xb``. ``scaled``: the range is within
    2**-64 of zero (values and range scaled up exactly, see :func:`_positions_at`)."""
    c = xb.shape[0]
    pos = _positions_at(xb, lo[:, None], hi[:, None], bins, scaled)
    width = bins + 1
    flat = (jnp.where(jnp.isfinite(xb), pos, bins)
            + (jnp.arange(c, dtype=I32) * width)[:, None]).reshape(-1)
    lanes = acc.shape[0]
    m = -(-flat.shape[0] // lanes)
    return jnp.stack([acc[j].at[flat[j * m:(j + 1) * m]].add(1, mode="promise_in_bounds")
                      for j in range(lanes)])


def _counts(x2d, lo, hi, bins: int, axis_name):
    """Per-row histograms ``(C, bins)`` float32 of ``x2d`` ``(C, N)`` over ``[lo, hi]`` ``(C,)``.

    Counts the finite elements (the range always covers the batch). Counts are exact
    int32 (a chunked scatter-add), summed over ``axis_name``, then cast to float32.
    """
    c, n = x2d.shape
    tiny = jnp.any(_is_tiny(lo) & _is_tiny(hi))
    lanes = 2 if c * n >= _TWO_LANES_MIN else 1
    cols = max(1, _COUNT_CHUNK // c)
    steps = n // cols if c * n > 2 * _COUNT_CHUNK else 0

    def count(x2d, lo, hi, scaled):
        acc = _zeros((lanes, c * (bins + 1)), I32, x2d, lo, hi)
        if steps:
            def body(i, acc):   # slices x2d in place (a reshaped prefix would be a copy)
                xb = lax.dynamic_slice_in_dim(x2d, i * cols, cols, axis=1)
                return _count_block(acc, xb, lo, hi, bins, scaled)

            acc = lax.fori_loop(0, steps, body, acc)
        if steps * cols < n:
            acc = _count_block(acc, x2d[:, steps * cols:], lo, hi, bins, scaled)
        return acc

    # one branch for the whole batch: the bin positions fuse into the scatter-add
    acc = lax.cond(tiny, functools.partial(count, scaled=True),
                   functools.partial(count, scaled=False), x2d, lo, hi)
    counts = jnp.sum(acc, axis=0).reshape(c, bins + 1)[:, :bins]
    return collectives.all_sum(counts, axis_name).astype(F32)


# ----------------------------------------------------------------------------------------
# Combining histograms (the range grew)
# ----------------------------------------------------------------------------------------

def _upscale_exact(hist, omin, omax, umin, umax, bins: int, rate: int, gradual: bool = False):
    """torch's ``_upscale_histogram``: ``hist`` on ``[omin, omax]`` rebinned into ``[umin, umax]``.

    Each bin is split into ``rate`` sub-bins of ``hist / rate``, whose float32 midpoints
    (FMA-exact linspace) are bucketized into the new edges and added into the new bins one
    by one in sub-bin order (torch's float32 ``bincount``), so the result is bit-exact.
    ``gradual``: the range is 2**64-scaled and torch's denormal rounding is emulated.
    """
    k = bins * rate
    h = _div(hist, np.float32(rate))

    def grids(omin, omax, umin, umax):
        width = _div_gradual(omax - omin, k, gradual)
        idx = jnp.arange(k, dtype=I32)
        mids = _linspace(omin, omax, k + 1, idx, gradual) + _half_gradual(width, gradual)
        edges = _linspace(umin, umax, bins + 1, jnp.arange(bins + 1, dtype=I32), gradual)
        return mids, edges

    # computed once (XLA would fuse the float64 linspace into every reader of it)
    mids, edges = nm.isolate(grids, omin, omax, umin, umax)
    return _add_in_order(mids, edges, h, bins, rate)


#: Longest run of sub-bins per new bin for which :func:`_add_in_order` adds the runs of
#: all bins side by side (one vector step per run position) instead of one by one.
_RUN_MAX = 256


def _add_in_order(mids, edges, h, bins: int, rate: int):
    """torch's bincount: ``out[b[i]] += h[i // rate]`` in sub-bin order ``i``, float32, with
    ``b = clip(searchsorted(edges, mids, right) - 1, 0, bins - 1)``.

    Bins do not interact, so only each bin's own order matters. Sorted midpoints make
    bin ``j``'s sub-bins the run ``P[j] <= i < P[j + 1]`` (``P[j]``: midpoints below edge
    ``j``; ``P[0] = 0`` and ``P[bins] = len(mids)`` take the clipped ends): when every run
    is short, the runs of all bins are added side by side, position by position (adding
    ``+0.0`` past a run's end changes nothing: the sums are non-negative). Otherwise (one
    bin takes most of a much narrower old range, or unsorted midpoints) the plain loop.
    """
    k = mids.shape[0]
    inner = _searchsorted(mids, edges[1:bins], right=False)
    p = jnp.concatenate([jnp.zeros((1,), I32), inner.astype(I32), jnp.full((1,), k, I32)])
    start, n = p[:-1], p[1:] - p[:-1]
    longest = jnp.max(n)
    ok = jnp.all(mids[1:] >= mids[:-1]) & jnp.all(edges[1:] >= edges[:-1])

    def by_runs(mids, edges, h):
        def step(t, out):
            i = jnp.minimum(start + t, k - 1)
            return out + jnp.where(t < n, h[i // rate], np.float32(0))
        return lax.fori_loop(0, longest, step, _zeros((bins,), F32, mids, h))

    def one_by_one(mids, edges, h):
        b = jnp.clip(_searchsorted(edges, mids, right=True) - 1, 0, bins - 1)

        def body(i, out):
            return out.at[b[i]].add(h[i // rate])
        return lax.fori_loop(0, k, body, _zeros((bins,), F32, b, h))

    return lax.cond(ok & (longest <= _RUN_MAX), by_runs, one_by_one, mids, edges, h)


def _upscale_limit(hist, omin, omax, umin, umax, bins: int):
    """The ``upsample_rate -> inf`` limit of the upscale: old bins split by exact overlap."""
    with nm.enable_x64():
        f64 = jnp.float64
        o0, o1, u0, u1 = (v.astype(f64) for v in (omin, omax, umin, umax))
        ws = (o1 - o0) / bins
        wd = (u1 - u0) / bins
        j = jnp.arange(bins, dtype=f64)
        lo = o0 + j * ws
        p0 = (lo - u0) / wd
        p1 = (lo + ws - u0) / wd
        d0 = jnp.clip(jnp.floor(p0), 0, bins - 1)
        frac = jnp.where(p1 > p0, jnp.clip((jnp.minimum(p1, d0 + 1) - p0) / (p1 - p0), 0, 1), 1)
        m = hist.astype(f64)
        d0 = d0.astype(I32)
        out = jnp.zeros((bins + 1,), f64).at[d0].add(m * frac).at[d0 + 1].add(m * (1 - frac))
        out = out[:bins].at[bins - 1].add(out[bins])
        return out.astype(F32)


def _upscale(hist, omin, omax, umin, umax, bins: int, rate: int):
    # Ranges within 2**-64 of zero: scale the endpoints up exactly (XLA flushes the
    # denormal steps torch computes) and round the steps as torch's gradual underflow does.
    tiny = _is_tiny(omin) & _is_tiny(omax) & _is_tiny(umin) & _is_tiny(umax)
    if bins * rate > _EXACT_UPSCALE_MAX:
        omin, omax, umin, umax = (jnp.where(tiny, _scale_up(v), v) for v in (omin, omax, umin, umax))
        return _upscale_limit(hist, omin, omax, umin, umax, bins)

    def scaled(hist, *ends):
        ends = [_scale_up(v) for v in ends]
        return _upscale_exact(hist, *ends, bins, rate, gradual=True)

    def plain(hist, *ends):
        return _upscale_exact(hist, *ends, bins, rate)

    return lax.cond(tiny, scaled, plain, hist, omin, omax, umin, umax)


# ----------------------------------------------------------------------------------------
# The update (rows = channels; per-tensor is one row)
# ----------------------------------------------------------------------------------------

def _observe_rows(mn, mx, x2d, bins: int, axis_name):
    """The batch-dependent half of torch's ``forward`` on each row (``x2d`` ``(C, N)``).

    Returns the batch's counts ``(C, bins)`` over the new histc range, the new range
    ``(C,)`` and the branch flags ``(C,)``: ``active`` (the state changes), ``nan_init``
    (a NaN first batch), ``uninit``, ``same`` (range unchanged), ``point`` (the old range
    is a single point).
    """
    # one pass: NaN flag, min/max keys of the finite elements (exact for denormals)
    fin = jnp.isfinite(x2d)
    k = _key(x2d)
    kmin, kmax, nan_count = lax.reduce(
        (jnp.where(fin, k, _INT32_MAX), jnp.where(fin, k, _INT32_MIN),
         jnp.isnan(x2d).astype(I32)),
        (_INT32_MAX, _INT32_MIN, np.int32(0)),
        lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1]), jnp.maximum(a[2], b[2])),
        (1,))
    any_nan = nan_count > 0
    any_fin = kmin <= kmax
    if axis_name is not None:
        any_nan = collectives.all_max(any_nan.astype(I32), axis_name) > 0
        any_fin = collectives.all_max(any_fin.astype(I32), axis_name) > 0
        kmin = collectives.all_min(kmin, axis_name)
        kmax = collectives.all_max(kmax, axis_name)
    bmin, bmax = _from_key(kmin), _from_key(kmax)

    uninit = (mn == jnp.inf) | (mx == -jnp.inf)          # torch: OR here
    state_nan = jnp.isnan(mn) | jnp.isnan(mx)
    new_min = jnp.where(uninit, bmin, _from_key(jnp.minimum(_key(mn), kmin)))
    new_max = jnp.where(uninit, bmax, _from_key(jnp.maximum(_key(mx), kmax)))
    finite_range = jnp.isfinite(new_min) & jnp.isfinite(new_max)
    # torch raises inside histc for a NaN batch or a non-finite range; an all-inf batch is
    # ignored. Only a NaN first batch changes the state (min/max are set before the raise).
    active = any_fin & ~any_nan & (uninit | (~state_nan & finite_range))
    nan_init = uninit & any_nan
    same = ~uninit & _feq(new_min, mn) & _feq(new_max, mx)
    point = ~uninit & ~same & _feq(mn, mx)

    lo, hi = _histc_range(new_min, new_max)
    counts = _counts(x2d, lo, hi, bins, axis_name)
    return counts, new_min, new_max, jnp.stack([active, nan_init, uninit, same, point])


def _merge_rows(hist, mn, mx, counts, new_min, new_max, flags, bins: int, rate: int,
                batched: bool):
    """The state-dependent half: the new histogram and range of each row."""
    active, nan_init, uninit, same, point = flags
    grow = active & ~uninit & ~same & ~point
    # single-point old histogram: one-hot at its value's bin, scaled by its total
    onehot = jnp.arange(bins, dtype=I32)[None, :] == _positions(mn[:, None], new_min[:, None],
                                                                 new_max[:, None], bins)
    point_hist = onehot.astype(F32) * _torch_sum(hist)[:, None] + counts

    def upscale_rows(h, a, b, c, d):
        fn = functools.partial(_upscale, bins=bins, rate=rate)
        if batched:
            return jax.vmap(fn)(h, a, b, c, d)
        return fn(h[0], a[0], b[0], c[0], d[0])[None]

    up = lax.cond(jnp.any(grow), upscale_rows, lambda *a: jnp.zeros_like(hist),
                  hist, mn, mx, new_min, new_max)
    grown = counts + up

    sel = lambda m: m[:, None]  # noqa: E731
    merged = jnp.where(sel(uninit), counts,
                       jnp.where(sel(same), hist + counts,
                                 jnp.where(sel(point), point_hist, grown)))
    keep_range = ~uninit & same
    out_min = jnp.where(keep_range, mn, new_min)
    out_max = jnp.where(keep_range, mx, new_max)
    nan = jnp.float32(jnp.nan)
    hist_out = jnp.where(sel(active), merged, hist)
    min_out = jnp.where(active, out_min, jnp.where(nan_init, nan, mn))
    max_out = jnp.where(active, out_max, jnp.where(nan_init, nan, mx))
    return hist_out, min_out, max_out


def _update_rows(hist, mn, mx, x2d, bins: int, rate: int, axis_name, batched: bool):
    """torch's ``forward`` on each row of ``x2d`` ``(C, N)``; ``hist`` ``(C, bins)``.

    Two compiled halves when called eagerly: the batch-shaped one (``_observe_rows``) and
    the shape-independent merge, so a new input shape recompiles only the cheap half.
    """
    observed = _observe_kernel(mn, mx, x2d, bins=bins, axis_name=axis_name)
    return _merge_kernel(hist, mn, mx, *observed, bins=bins, rate=rate, batched=batched)


# ----------------------------------------------------------------------------------------
# calculate_qparams: the L2 search
# ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _alpha_beta_tables():
    """``alpha``/``beta`` after k steps of torch's double accumulation (``+-1e-5``)."""
    a_tab = np.empty(_AB_LEN, np.float64)
    b_tab = np.empty(_AB_LEN, np.float64)
    alpha, beta = 0.0, 1.0
    for i in range(_AB_LEN):
        a_tab[i], b_tab[i] = alpha, beta
        alpha = alpha + 1e-5
        beta = beta - 1e-5
    return a_tab, b_tab


def _bin_width64(mn, mx, bins: int):
    """``(max_val.item() - min_val.item()) / bins`` in double."""
    with nm.enable_x64():
        return _div(mx.astype(jnp.float64) - mn.astype(jnp.float64), np.float64(bins))


def _norm_term(a, b, density):
    """torch's ``_get_norm``: ``density * ((b*b*b - a*a*a) / 3)``, each op rounded alone."""
    cubes = _mul(b * b, b) - _mul(a * a, a)
    return _mul(density, _div(cubes, np.float32(3)))


def _quantization_error(hist, bw, s, e, bins: int, dst_nbins: int):
    """torch's ``_compute_quantization_error(s, e)`` (float32 result, REFERENCE §3.6)."""
    with nm.enable_x64():
        dw = bw * (e - s + 1).astype(jnp.float64) / np.float64(dst_nbins)
        f_bw = bw.astype(F32)
        f_dw = dw.astype(F32)
        half = (dw * 0.5).astype(F32)
        zero_width = dw == 0
    i = jnp.arange(bins, dtype=I32)
    beg = _mul((i - s).astype(F32), f_bw)
    end = beg + f_bw
    top = np.float32(dst_nbins - 1)
    db = jnp.clip(_floor_divide(beg, f_dw), 0, top)
    de = jnp.clip(_floor_divide(end, f_dw), 0, top)
    db_center = _mul(db + np.float32(0.5), f_dw)
    density = _div(hist, f_bw)
    norm = _norm_term(beg - db_center, half, density)
    norm = norm + _mul(de - db - 1, _norm_term(-half, half, density))
    de_center = _mul(de, f_dw) + half
    norm = norm + _norm_term(-half, end - de_center, density)
    return jnp.where(zero_width, jnp.float32(0), _torch_sum(norm))


def _search_bins(hist, mn, mx, bins: int, dst_nbins: int):
    """torch's ``_non_linear_param_search`` loop -> final ``(start_bin, end_bin)``.

    The greedy loop moves ``alpha`` up or ``beta`` down by 1e-5 per iteration (double
    accumulation, compared in float32 against the cumulative sum). Iterations that move
    neither bin (``r == end``, the only ``continue``) are skipped in one jump: with
    ``alpha`` fixed, the left bin stays put and the first ``beta`` step that moves the
    right bin is found by bisection over the monotone ``f32(beta * total)``. The loop
    condition ``alpha < beta`` is checked at the jump target, where torch checks it, so
    each iteration here is one of torch's error evaluations, with exactly its choices.
    """
    a_tab, b_tab = _alpha_beta_tables()
    total32 = _torch_sum(hist)
    csum = _seq_cumsum(hist)
    bw = _bin_width64(mn, mx, bins)
    with nm.enable_x64():
        A = jnp.asarray(a_tab)
        B = jnp.asarray(b_tab)
        total = total32.astype(jnp.float64)

    def target(tab, i):
        with nm.enable_x64():
            return (tab[i] * total).astype(F32)

    def cond(c):
        a, b, _, _, _, done = c
        with nm.enable_x64():
            return ~done & (A[a] < B[b])

    def count_le(t):   # torch's linear scans are counts: csum is non-decreasing
        return jnp.sum(csum <= t, dtype=I32)

    def body(c):
        a, b, start, end, norm_min, done = c
        l = jnp.clip(jnp.sum(csum < target(A, a + 1), dtype=I32), start, end)
        r = jnp.clip(count_le(target(B, b + 1)) - 1, start, end)
        move_start = (l - start) > (end - r)
        idle = ~move_start & (r == end)
        # An idle run (torch's `continue`: only beta moves, l stays at start) ends at the
        # first b' > b whose step moves the right bin: f32(B[b'+1] * total) < csum[end].
        ce = csum[end]
        lo_, hi_ = b + 1, b * 0 + (_AB_LEN - 1)
        for _ in range(int(_AB_LEN).bit_length()):     # unrolled scalar bisection
            mid = (lo_ + hi_) // 2
            ok = (end > start) & (target(B, mid + 1) < ce)
            more = lo_ < hi_
            lo_, hi_ = jnp.where(more & ~ok, mid + 1, lo_), jnp.where(more & ok, mid, hi_)
        b = jnp.where(idle, lo_, b)
        with nm.enable_x64():
            alive = A[a] < B[b]            # torch's loop test, at the end of the idle run
        r = jnp.where(idle, jnp.clip(count_le(target(B, b + 1)) - 1, start, end), r)
        ns = jnp.where(move_start, l, start)
        ne = jnp.where(move_start, end, r)
        norm = _quantization_error(hist, bw, ns, ne, bins, dst_nbins)
        brk = norm > norm_min
        keep = brk | ~alive
        return (a + (alive & move_start).astype(I32), b + (alive & ~move_start).astype(I32),
                jnp.where(keep, start, ns), jnp.where(keep, end, ne),
                jnp.where(keep, norm_min, norm), brk | ~alive)

    refs = (hist, mn, mx)
    zero = _zeros((), I32, *refs)
    init = (zero, zero, zero, zero + (bins - 1), _zeros((), F32, *refs) + jnp.inf, zero != 0)
    _, _, start, end, _, _ = lax.while_loop(cond, body, init)
    return start, end


def _search_range(hist, mn, mx, bins: int, dst_nbins: int, skip_tiny: bool):
    """``(new_min, new_max)`` of torch's search; float32 scalars."""
    def run(hist, mn, mx):
        start, end = _search_bins(hist, mn, mx, bins, dst_nbins)
        bw = _div(mx - mn, np.float32(bins))
        return (mn + _mul(bw, start.astype(F32)),
                mn + _mul(bw, (end + 1).astype(F32)))

    if not skip_tiny:
        return run(hist, mn, mx)
    tiny = _is_tiny(mn) & _is_tiny(mx)
    return lax.cond(tiny, lambda h, a, b: (a, b), run, hist, mn, mx)


# One compiled kernel per (bins, upsample_rate, ...) shared by every observer config (the
# dtype/qscheme only enter the cheap qparams rule); inlined when called under a user's jit.
_observe_kernel = jax.jit(_observe_rows, static_argnames=("bins", "axis_name"))
_merge_kernel = jax.jit(_merge_rows, static_argnames=("bins", "rate", "batched"))
_qerr_kernel = jax.jit(
    lambda h, mn, mx, s, e, bins, dst_nbins: _quantization_error(
        h, _bin_width64(mn, mx, bins), s, e, bins, dst_nbins),
    static_argnames=("bins", "dst_nbins"))
_search_kernel = jax.jit(_search_range, static_argnames=("bins", "dst_nbins", "skip_tiny"))
_search_kernel_rows = jax.jit(
    lambda h, a, b, bins, dst_nbins, skip_tiny: jax.vmap(functools.partial(
        _search_range, bins=bins, dst_nbins=dst_nbins, skip_tiny=skip_tiny))(h, a, b),
    static_argnames=("bins", "dst_nbins", "skip_tiny"))


# ----------------------------------------------------------------------------------------
# Observers
# ----------------------------------------------------------------------------------------

class HistogramObserver(UniformQuantizationObserverBase):
    """Running histogram + L2 range search; ``torch.ao.quantization.HistogramObserver`` (2.13).

    Args:
      bins: number of histogram bins (torch default 2048).
      dtype, qscheme (per_tensor_affine / per_tensor_symmetric), reduce_range, quant_min,
        quant_max, eps: as torch's; no symmetric+reduce_range check (torch has none).
      is_dynamic: must be False (torch rejects it too).
      upsample_rate: sub-bins per old bin when the range grows (torch keeps it as an
        attribute, default 16). Memory stays bounded for any value: up to
        ``bins * upsample_rate <= 2**22`` the rebinning is torch's, bit for bit; beyond it
        (where torch allocates that many floats, e.g. OOM at 8000**2) it is the
        ``upsample_rate -> inf`` limit, each old bin split by exact overlap.

    State :class:`HistogramState`: ``histogram`` float32 ``(bins,)``, 0-d ``min_val`` /
    ``max_val``. ``update(state, x)`` follows torch's ``forward`` step by step (first
    batch, same-range accumulation, growth by upscaling, the single-point branch, infs
    dropped); with ``axis_name`` every device takes the global range, bins its shard and
    the counts are summed, which equals the histogram of the concatenated batch.
    ``calculate_qparams`` runs torch's search (a ``lax.while_loop`` making exactly torch's
    choices) and torch's qparams rule: ``(scale float32 (1,), zero_point int32 (1,))``.
    ``dst_nbins = 2 ** bits(dtype)`` (256 for 8-bit dtypes and quint4x2), as in torch.

    Deviations (documented, tested): torch raises on a NaN batch (RuntimeError from
    histc) — here the state keeps torch's post-raise value (a NaN first batch sets
    ``min_val``/``max_val`` to NaN, later NaN batches change nothing). Inputs are cast to
    float32 (torch bins float64/half inputs in their own precision). Bin counts are
    exact integers (torch's float32 per-thread counts saturate at 2**24 per bin). For
    ranges within 2**-64 of zero, the search is skipped (torch runs it on denormal bin
    widths, which XLA flushes; the qparams are the same, ``scale == eps``); when such a
    tiny range grows, the rebinning runs on exactly scaled-up endpoints and rounds each
    step as torch's gradual underflow does (same histogram). A batch holding both ``-0.0`` and
    ``+0.0`` as its minimum takes ``-0.0`` (torch's pick depends on its vector lanes).
    ``bins`` above 32768 (torch sums in parallel chunks) may differ in the last bit of
    the search's error sums.
    """

    _accepts_dynamic = False
    state_keys = ("eps", "histogram", "min_val", "max_val")
    _state_type = HistogramState
    _state_ndim = 0

    def __init__(self, bins=2048, dtype=quint8, qscheme=QScheme.PER_TENSOR_AFFINE,
                 reduce_range=False, quant_min=None, quant_max=None, eps=DEFAULT_EPS,
                 is_dynamic=False, upsample_rate=16):
        self._record(locals())
        self._setup(dtype, qscheme, reduce_range, quant_min, quant_max, eps, is_dynamic)
        self._setup_histogram(bins, upsample_rate)

    def _setup_histogram(self, bins, upsample_rate):
        bins = as_int(bins, "bins")
        if bins < 1:
            raise ValueError(f"bins={bins} must be >= 1")
        rate = as_int(upsample_rate, "upsample_rate")
        if rate < 1:
            raise ValueError(f"upsample_rate={rate} must be >= 1")
        if bins * rate >= 2 ** 52:
            raise ValueError(f"bins * upsample_rate = {bins * rate} must be below 2**52")
        try:
            bits = torch_iinfo(self.dtype)[2]
        except ValueError:
            raise ValueError(f"dtype={self.dtype.name}: HistogramObserver needs an integer "
                             f"quantized dtype (torch.iinfo fails for it too)") from None
        self._set(bins=bins, upsample_rate=rate, dst_nbins=2 ** bits)

    # -- state --------------------------------------------------------------------------

    def init(self, x=None) -> HistogramState:
        return HistogramState(self._eps_array(), jnp.zeros((self.bins,), F32),
                              jnp.array(jnp.inf, F32), jnp.array(-jnp.inf, F32))

    def reset_min_max_vals(self, state):
        return self.init()

    def _state_from_arrays(self, arrays):
        owner = type(self).__name__
        eps = expect_shape("eps", np.asarray(arrays["eps"], np.float32).reshape(-1), (1,), owner)
        hist = expect_shape("histogram", np.asarray(arrays["histogram"], np.float32),
                            (self.bins,), owner)
        mn = np.asarray(arrays["min_val"], np.float32)
        mx = np.asarray(arrays["max_val"], np.float32)
        if mn.shape == (0,):   # torch state dicts before version 3
            mn = np.float32(np.inf)
        if mx.shape == (0,):
            mx = np.float32(-np.inf)
        expect_shape("min_val", np.asarray(mn), (), owner)
        expect_shape("max_val", np.asarray(mx), (), owner)
        return HistogramState(jnp.asarray(eps), jnp.asarray(hist), jnp.asarray(mn),
                              jnp.asarray(mx))

    # -- update ---------------------------------------------------------------------------

    def update(self, state: HistogramState, x, *, axis_name=None) -> HistogramState:
        self._check_state(state)
        x = jnp.asarray(x)
        if x.size == 0:
            return state
        xf = lax.stop_gradient(x.astype(F32)).reshape(1, -1)
        h, mn, mx = _update_rows(state.histogram[None], state.min_val[None],
                                   state.max_val[None], xf, bins=self.bins,
                                   rate=self.upsample_rate, axis_name=axis_name, batched=False)
        return state._replace(histogram=h[0], min_val=mn[0], max_val=mx[0])

    # -- qparams --------------------------------------------------------------------------

    def _skip_tiny(self) -> bool:
        return self.eps >= 2.0 ** -40

    def _non_linear_param_search(self, state: HistogramState):
        """torch's ``_non_linear_param_search``: ``(new_min, new_max)`` float32 scalars."""
        self._check_state(state, "_non_linear_param_search")
        return _search_kernel(state.histogram, state.min_val, state.max_val, bins=self.bins,
                              dst_nbins=self.dst_nbins, skip_tiny=self._skip_tiny())

    def _compute_quantization_error(self, state: HistogramState, next_start_bin,
                                    next_end_bin):
        """torch's ``_compute_quantization_error``: L2 error (float32 scalar) of ``[s, e]``."""
        return _qerr_kernel(state.histogram, state.min_val, state.max_val,
                            jnp.asarray(next_start_bin, I32), jnp.asarray(next_end_bin, I32),
                            bins=self.bins, dst_nbins=self.dst_nbins)

    def calculate_qparams(self, state: HistogramState):
        """``(scale float32 (1,), zero_point int32 (1,))``: the search, then torch's rule.

        An unobserved state gives ``(1.0, 0)`` as in torch (which also warns).
        """
        self._check_state(state, "calculate_qparams")
        mn, mx = state.min_val, state.max_val
        uninit = (mn == jnp.inf) & (mx == -jnp.inf)
        new_min, new_max = self._non_linear_param_search(state)
        new_min = jnp.where(uninit, mn, new_min)
        new_max = jnp.where(uninit, mx, new_max)
        return self._calculate_qparams(new_min, new_max, state.eps)


class PerChannelHistogramObserver(HistogramObserver):
    """One histogram and one L2 search per channel (no torch counterpart).

    Args: ``ch_axis`` (default 0), then as :class:`HistogramObserver`, with ``qscheme``
    per_channel_affine (default) or per_channel_symmetric.

    State :class:`HistogramState` with ``histogram`` ``(C, bins)`` and ``min_val`` /
    ``max_val`` ``(C,)`` (``+inf``/``-inf`` until observed), sized by ``init(x)`` (an
    array or ``jax.ShapeDtypeStruct``) or ``init(num_channels=C)``; the state_dict keys
    are the per-tensor ones. Channel ``c`` evolves exactly as a per-tensor
    :class:`HistogramObserver` fed only channel ``c`` (``x`` moved to ``ch_axis`` first and
    flattened per channel), and ``calculate_qparams`` returns ``(scale (C,), zero_point
    (C,))`` whose entry ``c`` equals that observer's qparams (the per-channel rule is the
    per-tensor one, entry by entry). The update and the search are batched over channels
    (``vmap``); an unobserved channel gives ``(1.0, 0)``.
    """

    _allowed_qschemes = (QScheme.PER_CHANNEL_AFFINE, QScheme.PER_CHANNEL_SYMMETRIC)
    _state_ndim = 1

    def __init__(self, ch_axis=0, bins=2048, dtype=quint8, qscheme=QScheme.PER_CHANNEL_AFFINE,
                 reduce_range=False, quant_min=None, quant_max=None, eps=DEFAULT_EPS,
                 is_dynamic=False, upsample_rate=16):
        self._record(locals())
        self._setup(dtype, qscheme, reduce_range, quant_min, quant_max, eps, is_dynamic)
        self._setup_histogram(bins, upsample_rate)
        self._set(ch_axis=as_int(ch_axis, "ch_axis"))

    def _num_channels(self, x) -> int:
        shape = tuple(x.shape)
        if len(shape) < 1:
            raise ValueError(f"{type(self).__name__} needs inputs with at least 1 dimension")
        if not -len(shape) <= self.ch_axis < len(shape):
            raise ValueError(f"ch_axis={self.ch_axis} is out of range for input shape {shape}")
        return shape[self.ch_axis]

    def init(self, x=None, *, num_channels: int | None = None) -> HistogramState:
        if num_channels is None:
            if x is None:
                raise ValueError(f"{type(self).__name__}.init needs x (an array or "
                                 f"jax.ShapeDtypeStruct) or num_channels to size its state")
            num_channels = self._num_channels(x)
        c = as_int(num_channels, "num_channels")
        return HistogramState(self._eps_array(), jnp.zeros((c, self.bins), F32),
                              jnp.full((c,), jnp.inf, F32), jnp.full((c,), -jnp.inf, F32))

    def reset_min_max_vals(self, state):
        return self.init(num_channels=state.min_val.shape[0])

    def _state_from_arrays(self, arrays):
        owner = type(self).__name__
        eps = expect_shape("eps", np.asarray(arrays["eps"], np.float32).reshape(-1), (1,), owner)
        hist = np.asarray(arrays["histogram"], np.float32)
        mn = np.asarray(arrays["min_val"], np.float32)
        mx = np.asarray(arrays["max_val"], np.float32)
        if mn.ndim != 1 or mn.shape != mx.shape:
            raise StateDictError(f"Error loading state dict into {owner}: min_val and max_val must "
                                 f"be vectors of equal length, got {mn.shape} and {mx.shape}")
        expect_shape("histogram", hist, (mn.shape[0], self.bins), owner)
        return HistogramState(jnp.asarray(eps), jnp.asarray(hist), jnp.asarray(mn),
                              jnp.asarray(mx))

    def update(self, state: HistogramState, x, *, axis_name=None) -> HistogramState:
        self._check_state(state)
        x = jnp.asarray(x)
        if x.size == 0:
            return state
        c = self._num_channels(x)
        if state.min_val.shape != (c,):
            raise ValueError(f"{type(self).__name__}: input has {c} channels along "
                             f"ch_axis={self.ch_axis} but the state has {state.min_val.shape[0]}")
        xf = lax.stop_gradient(jnp.moveaxis(x.astype(F32), self.ch_axis, 0)).reshape(c, -1)
        h, mn, mx = _update_rows(state.histogram, state.min_val, state.max_val, xf,
                                   bins=self.bins, rate=self.upsample_rate, axis_name=axis_name,
                                   batched=True)
        return state._replace(histogram=h, min_val=mn, max_val=mx)

    def _non_linear_param_search(self, state: HistogramState):
        """Per channel: ``(new_min (C,), new_max (C,))``."""
        self._check_state(state, "_non_linear_param_search")
        return _search_kernel_rows(state.histogram, state.min_val, state.max_val,
                                   bins=self.bins, dst_nbins=self.dst_nbins,
                                   skip_tiny=self._skip_tiny())

    def _compute_quantization_error(self, state: HistogramState, next_start_bin,
                                    next_end_bin):
        """Per channel ``(C,)`` float32 errors of ``[s, e]``."""
        one = functools.partial(_qerr_kernel, s=jnp.asarray(next_start_bin, I32),
                                e=jnp.asarray(next_end_bin, I32), bins=self.bins,
                                dst_nbins=self.dst_nbins)
        return jax.vmap(one)(state.histogram, state.min_val, state.max_val)

    def calculate_qparams(self, state: HistogramState):
        """``(scale float32 (C,), zero_point int32 (C,))``."""
        return super().calculate_qparams(state)
