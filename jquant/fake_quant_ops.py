"""Fake-quantization ops with straight-through gradients, and real (de)quantization.

Counterparts: ``torch.fake_quantize_per_tensor_affine``,
``torch.fake_quantize_per_channel_affine``, ``torch._fake_quantize_learnable_per_tensor_affine``,
``torch._fake_quantize_learnable_per_channel_affine``, ``torch.quantize_per_tensor``,
``torch.quantize_per_channel`` and ``Tensor.dequantize``.

Every op computes in float32 (inputs of other float dtypes are cast, outputs cast back),
multiplies by the reciprocal of the scale and rounds half to even, as torch's CPU kernels
do. The backward passes keep only a boolean mask as residual (never a copy of the input),
except the learnable ops, whose scale/zero-point gradients need the input itself.

Deviations from torch (tested in ``tests/test_bad_input.py``): values are never checked, so
the ops stay traceable. A zero point outside ``[quant_min, quant_max]`` (including the
``INT32_MIN`` a NaN range produces) is used as given, where torch raises RuntimeError. XLA
on CPU flushes float32 subnormal inputs (|x| < 2**-126) to zero before scaling, so they
fake-quantize as 0 even when ``x / scale`` would round to a nonzero level.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant import _numerics as nm
from jquant import collectives
from jquant.types import canonical_dtype, dtype_name

__all__ = [
    "fake_quantize_per_tensor_affine", "fake_quantize_per_channel_affine",
    "fake_quantize_learnable_per_tensor_affine", "fake_quantize_learnable_per_channel_affine",
    "quantize_per_tensor", "quantize_per_channel", "dequantize",
]


def _check_range(quant_min, quant_max):
    quant_min, quant_max = int(quant_min), int(quant_max)
    if quant_min > quant_max:
        raise ValueError(f"quant_min={quant_min} must be <= quant_max={quant_max}")
    return quant_min, quant_max


def _scalar_param(v, name):
    v = jnp.asarray(v)
    if v.size != 1:
        raise ValueError(f"{name} must hold one value for per-tensor quantization, got shape {v.shape}")
    return jnp.reshape(v, ())


def _channel_shape(x, axis):
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return tuple(shape)


def _normalize_axis(axis, ndim):
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for an input of rank {ndim}")
    return axis % ndim


# ----------------------------------------------------------------------------------------
# Exact-arithmetic helpers
# ----------------------------------------------------------------------------------------

_F32_EXACT_INT = 2 ** 24  # integers up to this magnitude are exact in float32


def _is_wide(qmin: int, qmax: int) -> bool:
    """Ranges whose integers are not all exact in float32 (e.g. qint32).

    Narrow ranges form ``clamp(q) - zp`` by a float32 subtraction, which rounds once (as
    torch's int64 difference converted to float) whenever the zero point is a float32
    integer: any in-range zero point, and the INT32_MIN that a NaN range produces.
    """
    return max(abs(qmin), abs(qmax)) > _F32_EXACT_INT


def _unsigned_zero(d):
    """``d`` with -0.0 replaced by +0.0 (torch's integer differences have no signed zero)."""
    return jnp.where(d == 0, jnp.zeros((), d.dtype), d)


def _zp_to_int32(zp):
    """An integer zero point as int32: float values truncate (torch's ``zp.item<int64>``)."""
    zp = jnp.asarray(zp)
    if jnp.issubdtype(zp.dtype, jnp.floating):
        return nm.x86_f32_to_int32(zp)
    return zp.astype(jnp.int32)


def _f32_bounds(qmin: int, qmax: int):
    """Static helpers for clamping integer-valued float32 ``q`` to ``[qmin, qmax]`` exactly.

    Returns ``(below, above, (qmin_hi, qmin_lo), (qmax_hi, qmax_lo))``: ``q < qmin`` iff
    ``q <= below`` and ``q > qmax`` iff ``q >= above`` (float32 thresholds), and each bound
    split into a float32 part plus a small integer remainder (2**31 - 1 is not a float32).
    """
    def split(v):
        hi = float(np.float32(v))
        return hi, float(v - int(hi))
    below = np.float32(qmin - 1)
    if int(below) > qmin - 1:  # round down
        below = np.nextafter(below, np.float32(-np.inf))
    above = np.float32(qmax + 1)
    if int(above) < qmax + 1:  # round up
        above = np.nextafter(above, np.float32(np.inf))
    return float(below), float(above), split(qmin), split(qmax)


def _clamped_diff_parts(qf, zp_i, qmin: int, qmax: int):
    """``(hi, lo)`` float32 with ``hi + lo == clamp(qf, qmin, qmax) - zp`` exactly.

    For wide (e.g. qint32) ranges: ``qf`` is an integer-valued float32 (NaN handled by the
    caller), clamped exactly (torch clamps in int64/double, where ``2**31 - 1`` is exact),
    and the zero point's high bytes (exact in float32) are subtracted with an error-free
    TwoSum; ``lo`` is a small integer.
    """
    below, above, (min_hi, min_lo), (max_hi, max_lo) = _f32_bounds(qmin, qmax)
    is_low = qf <= below
    is_high = qf >= above
    vh = jnp.where(is_high, jnp.float32(max_hi), jnp.where(is_low, jnp.float32(min_hi), qf))
    vl = jnp.where(is_high, jnp.float32(max_lo), jnp.where(is_low, jnp.float32(min_lo),
                                                           jnp.float32(0)))
    zh = (zp_i & jnp.int32(-256)).astype(jnp.float32)  # <= 24 significant bits: exact
    zl = (zp_i & jnp.int32(255)).astype(jnp.float32)
    s = vh - zh
    bb = s - vh
    err = (vh - (s - bb)) + (-zh - bb)  # exact rounding error of vh - zh (an integer)
    return s, err + (vl - zl)


def _mul_f64_cpu(d_hi, d_lo, scale):
    with nm.enable_x64():
        f64 = jnp.float64
        d = _unsigned_zero(d_hi.astype(f64) + d_lo.astype(f64))
        return (d * scale.astype(f64)).astype(jnp.float32)


def _gated(y, mask, x, on):
    """``(y, mask)`` where the run-time flag ``on`` (a traced scalar bool) is true, ``(x,
    all true)`` where it is false: torch's ``if fake_quant_enabled`` inside the op's own
    pass over ``x`` (a select after it would be a further pass). ``on=None``: always on."""
    if on is None:
        return y, mask
    return jnp.where(on, y, x), mask | ~on


# ----------------------------------------------------------------------------------------
# Per-tensor affine (torch.fake_quantize_per_tensor_affine)
# ----------------------------------------------------------------------------------------

def _fq_per_tensor_fwd_math(x, scale, zp_i, qmin, qmax):
    # torch: qf = float(zp) + nearbyint(x * inv); clamp in float (NaN -> qmin); the output
    # is (int64(qc) - zp) * scale; the mask is taken on the unclamped qf.
    inv = jnp.float32(1.0) / scale
    qf = zp_i.astype(jnp.float32) + nm.rne(x * inv)
    if _is_wide(qmin, qmax):
        hi, lo = _clamped_diff_parts(jnp.where(jnp.isnan(qf), -jnp.inf, qf), zp_i, qmin, qmax)
        y = _unsigned_zero(hi + lo) * scale
    else:
        qc = jnp.where(jnp.isnan(qf), jnp.float32(qmin), jnp.clip(qf, qmin, qmax))
        y = _unsigned_zero(qc - zp_i.astype(jnp.float32)) * scale
    mask = (qf >= qmin) & (qf <= qmax)
    return y, mask


#: Per-tensor fake quant of at least this many elements is its own XLA computation on CPU.
_ISOLATE_MIN_SIZE = 1 << 14


def _fq_per_tensor_math(x, scale, zp_i, on, qmin, qmax):
    """``(y, mask)``; ``on``: None, or a traced bool (off: ``y = x``, ``mask`` all true).

    On CPU a large ``x`` is fake-quantized in its own computation: XLA:CPU otherwise fuses
    the op with its producer's broadcast (a Dense / Conv bias) and its consumer's reshape (a
    flatten before the next Dense) into one loop whose indexing defeats vectorization: 3-6x
    slower than the op alone (a QAT step of a small CNN spent ~10% of its time there). A
    conditional is a fusion boundary (``nm.isolate``); its predicate reads only the scale.
    The flag is applied inside it (:func:`_gated`).
    """
    def math(u, s, z, *flag):
        y, mask = _fq_per_tensor_fwd_math(u, s, z, qmin, qmax)
        return _gated(y, mask, u, flag[0] if flag else None)
    args = (x, scale, zp_i) + (() if on is None else (on,))
    if x.size < _ISOLATE_MIN_SIZE:
        return math(*args)
    return nm.isolate(math, *args, key=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fq_per_tensor(x, scale, zp_i, on, qmin, qmax):
    return _fq_per_tensor_math(x, scale, zp_i, on, qmin, qmax)[0]


def _fq_per_tensor_fwd(x, scale, zp_i, on, qmin, qmax):
    y, mask = _fq_per_tensor_math(x, scale, zp_i, on, qmin, qmax)
    return y, (mask, jnp.zeros_like(scale))


def _masked(g, mask):
    """torch's ``dY * mask``: masked-out entries are ``g * 0`` (-0.0 for a negative g, NaN
    for inf/NaN); XLA would turn a multiply by the converted mask into a plain select."""
    return jnp.where(mask, g, g * jnp.zeros((), g.dtype))


def _fq_mask_bwd(qmin, qmax, res, g):
    mask, zs = res
    return _masked(g, mask), zs, None, None


_fq_per_tensor.defvjp(_fq_per_tensor_fwd, _fq_mask_bwd)


def _fq_per_tensor_args(scale, zero_point, quant_min, quant_max):
    qmin, qmax = _check_range(quant_min, quant_max)
    scale = nm.f32(_scalar_param(scale, "scale"))
    zp = _zp_to_int32(_scalar_param(zero_point, "zero_point"))
    return scale, zp, qmin, qmax


def fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min: int, quant_max: int):
    """Per-tensor fake quantization; ``torch.fake_quantize_per_tensor_affine``.

    ``y = (clamp(zp + round(x * (1/scale)), qmin, qmax) - zp) * scale``.

    Args:
      x: float array of any shape.
      scale: float, or an array with one element (shape ``()`` or ``(1,)``).
      zero_point: int, or an array with one element (an integer dtype; a float zero point
        truncates toward zero, as torch's tensor overload does).
      quant_min, quant_max: static Python ints.
    Returns:
      An array of ``x``'s shape and dtype. Gradient w.r.t. ``x`` is ``g * mask`` with
      ``mask = qmin <= zp + round(x/scale) <= qmax`` (inclusive, on the unclamped value);
      ``scale`` and ``zero_point`` get zero gradient. NaN maps to ``(qmin - zp) * scale``,
      ``+inf`` to ``(qmax - zp) * scale``, ``-inf`` to ``(qmin - zp) * scale``, as in torch.
      ``clamp(q) - zp`` is formed exactly (torch: int64), also for qint32 ranges.

    Deviation: a scale above 2**126 has a float32-subnormal reciprocal, which XLA:CPU
    flushes to zero: ``+-inf`` inputs then map like NaN (to ``(qmin - zp) * scale``) and
    inputs above ~2**100 to 0, where torch keeps the subnormal. Finite inputs whose
    quantized value is 0 anyway (everything below ~2**100) match torch.
    """
    x = jnp.asarray(x)
    scale, zp, qmin, qmax = _fq_per_tensor_args(scale, zero_point, quant_min, quant_max)
    return _fq_per_tensor(nm.f32(x), scale, zp, None, qmin, qmax).astype(x.dtype)


# ----------------------------------------------------------------------------------------
# Per-channel affine (torch.fake_quantize_per_channel_affine)
# ----------------------------------------------------------------------------------------

def _in_int64_range_of(qf, qmin: int, qmax: int):
    """``qmin <= q <= qmax`` for an integer-valued float32 ``q``, compared exactly (torch's
    per-channel mask compares the int64 ``q``; a float32 compare would round ``2**31 - 1`` up
    and let ``q = 2**31`` pass)."""
    below, above, _, _ = _f32_bounds(qmin, qmax)
    return (qf > below) & (qf < above)


def _fq_per_channel_int_math(x, scale, zp_i, qmin, qmax):
    # torch: q = int64(float(zp) + nearbyint(x * inv)) (NaN/inf -> INT64_MIN -> qmin),
    # y = float(double(clamp(q) - zp) * double(scale)), mask on the unclamped q.
    inv = jnp.float32(1.0) / scale
    qf = zp_i.astype(jnp.float32) + nm.rne(x * inv)
    ok = nm.in_int64_range(qf)
    if _is_wide(qmin, qmax):
        # clamp(q) - zp exactly as hi + lo, times the scale in float64 (torch's rounding).
        d_hi, d_lo = _clamped_diff_parts(jnp.where(ok, qf, -jnp.inf), zp_i, qmin, qmax)
        y = lax.platform_dependent(d_hi, d_lo, scale, cpu=_mul_f64_cpu, cuda=_mul_f64_cpu,
                                   default=lambda h, l, sc: _unsigned_zero(h + l) * sc)
    else:
        qc = jnp.where(ok, jnp.clip(qf, qmin, qmax), jnp.float32(qmin))
        y = _unsigned_zero(qc - zp_i.astype(jnp.float32)) * scale
    mask = ok & _in_int64_range_of(qf, qmin, qmax)
    return y, mask


def _dequant_f64(q, zp, scale, qmin, qmax):
    # torch computes (double(clamp(q)) - double(zp)) * double(scale), rounded once to
    # float32; the clamp is in int64, where 2**31 - 1 is exact.
    with nm.enable_x64():
        qc = jnp.clip(q.astype(jnp.float64), qmin, qmax)
        y = (qc - zp.astype(jnp.float64)) * scale.astype(jnp.float64)
        return y.astype(jnp.float32)


def _dequant_float_zp(q, zp, scale, qmin, qmax):
    f64 = functools.partial(_dequant_f64, qmin=qmin, qmax=qmax)
    return lax.platform_dependent(q, zp, scale, cpu=f64, cuda=f64,
                                  default=lambda q, z, s: (jnp.clip(q, qmin, qmax) - z) * s)


def _fq_per_channel_float_math(x, scale, zp, qmin, qmax):
    # torch: q = lrintf(x * inv + zp), the multiply-add fused (one rounding; verified against
    # torch's CPU kernel, which differs from two roundings for wide ranges and at ties).
    inv = jnp.float32(1.0) / scale
    qf = nm.rne(nm.fma_f32(x, inv, zp))
    ok = nm.in_int64_range(qf)
    q = _unsigned_zero(jnp.where(ok, qf, jnp.float32(qmin)))
    y = _dequant_float_zp(q, zp, scale, qmin, qmax)
    mask = ok & _in_int64_range_of(qf, qmin, qmax)
    return y, mask


def _fq_per_channel_math(x, scale, zp, on, qmin, qmax, float_zp):
    math = _fq_per_channel_float_math if float_zp else _fq_per_channel_int_math
    y, mask = math(x, scale, zp, qmin, qmax)
    return _gated(y, mask, x, on)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fq_per_channel(x, scale, zp, on, qmin, qmax, float_zp):
    return _fq_per_channel_math(x, scale, zp, on, qmin, qmax, float_zp)[0]


def _fq_per_channel_fwd(x, scale, zp, on, qmin, qmax, float_zp):
    y, mask = _fq_per_channel_math(x, scale, zp, on, qmin, qmax, float_zp)
    return y, (mask, jnp.zeros_like(scale), jnp.zeros_like(zp) if float_zp else None)


def _fq_per_channel_bwd(qmin, qmax, float_zp, res, g):
    mask, zs, zz = res
    return _masked(g, mask), zs, zz, None


_fq_per_channel.defvjp(_fq_per_channel_fwd, _fq_per_channel_bwd)


def _fq_per_channel_args(x, scale, zero_point, axis, quant_min, quant_max):
    """Validated ``(scale, zero_point)`` broadcast along ``axis``, ``qmin, qmax, float_zp``."""
    qmin, qmax = _check_range(quant_min, quant_max)
    axis = _normalize_axis(axis, x.ndim)
    scale = jnp.asarray(scale)
    zero_point = jnp.asarray(zero_point)
    c = x.shape[axis]
    if scale.shape != (c,) or zero_point.shape != (c,):
        raise ValueError(f"scale and zero_point must have shape ({c},) for axis={axis} of an "
                         f"input of shape {x.shape}; got {scale.shape} and {zero_point.shape}")
    float_zp = bool(jnp.issubdtype(zero_point.dtype, jnp.floating))
    bshape = _channel_shape(x, axis)
    s = nm.f32(scale).reshape(bshape)
    z = (nm.f32(zero_point) if float_zp else zero_point.astype(jnp.int32)).reshape(bshape)
    return s, z, qmin, qmax, float_zp


def fake_quantize_per_channel_affine(x, scale, zero_point, axis: int, quant_min: int,
                                     quant_max: int):
    """Per-channel fake quantization; ``torch.fake_quantize_per_channel_affine``.

    Args:
      x: float array; ``x.shape[axis] == C``.
      scale: float32 array of shape ``(C,)``.
      zero_point: shape ``(C,)``. An integer zero point rounds before adding it (torch's
        int32 path, NaN and ``+-inf`` map to ``qmin``); a float zero point (embedding
        ``per_channel_affine_float_qparams``) is added before rounding and the output
        product is formed in float64 as torch does (float32 on TPU: at most 1 ulp apart).
        ``clamp(q) - zp`` is formed exactly for integer zero points (qint32 ranges too).
      axis: the channel axis (static; negative counts from the end, torch needs >= 0).
      quant_min, quant_max: static Python ints.
    Returns:
      An array of ``x``'s shape and dtype; gradient ``g * mask`` w.r.t. ``x``.
    """
    x = jnp.asarray(x)
    s, z, qmin, qmax, float_zp = _fq_per_channel_args(x, scale, zero_point, axis, quant_min,
                                                      quant_max)
    return _fq_per_channel(nm.f32(x), s, z, None, qmin, qmax, float_zp).astype(x.dtype)


def fake_quantize_if(x, scale, zero_point, enabled, quant_min: int, quant_max: int,
                     axis: int | None = None):
    """torch's ``if fake_quant_enabled: X = fake_quantize_per_*_affine(X, ...)`` (the
    fake-quant modules' forward) for a flag known only at run time, in one pass over ``x``.

    ``enabled``: ``True`` (static: the plain op) or a traced boolean (shape ``()`` or
    ``(1,)``). ``axis``: None for per-tensor qparams, else the channel axis of per-channel
    ones. Where the flag is off the output is ``x`` and the gradient ``g``; where it is on,
    the op's output and ``g * mask`` (torch's exact values, ``-0.0`` included).
    Internal to the fake-quant modules.
    """
    x = jnp.asarray(x)
    on = None if enabled is True else jnp.reshape(jnp.asarray(enabled, jnp.bool_), ())
    if axis is None:
        scale, zp, qmin, qmax = _fq_per_tensor_args(scale, zero_point, quant_min, quant_max)
        y = _fq_per_tensor(nm.f32(x), scale, zp, on, qmin, qmax)
    else:
        s, z, qmin, qmax, float_zp = _fq_per_channel_args(x, scale, zero_point, axis,
                                                          quant_min, quant_max)
        y = _fq_per_channel(nm.f32(x), s, z, on, qmin, qmax, float_zp)
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------
# Learnable (LSQ) fake quantization (torch._fake_quantize_learnable_per_*_affine)
# ----------------------------------------------------------------------------------------

def _lsq_grads(x, g, scale, zp, qmin, qmax, grad_factor):
    """Per-element (dX, dScale_i, dZeroPoint_i) of torch's learnable fake-quant backward.

    ``zp`` is the backward's integer-valued zero point. As torch's CPU kernel (compiled
    with multiply-add contraction): ``xq = round(fma(x, inv, zp))`` (add, then round —
    unlike the forward), ``dScale_i = ((g * fma(clamp(xq) - zp, scale, -x)) * inv) * grad_factor``
    inside the range, ``((qmin|qmax - zp) * g) * grad_factor`` outside, and
    ``dZeroPoint_i = ((g * -1) * scale) * grad_factor`` outside.
    """
    inv = jnp.float32(1.0) / scale
    xq = nm.rne(nm.fma_f32(x, inv, zp))
    ok = nm.in_int64_range(xq)
    below = ~ok | (xq < qmin)
    above = ok & (xq > qmax)
    inside = ~(below | above)
    qc = jnp.where(ok, jnp.clip(xq, qmin, qmax), jnp.float32(qmin))
    err = nm.fma_f32(qc - zp, scale, -x)  # xfq - x with one rounding
    zero = jnp.zeros((), jnp.float32)
    dx = _masked(g, inside)
    ds_in = g * err * inv * grad_factor
    ds_out = jnp.where(below, g * (jnp.float32(qmin) - zp), g * (jnp.float32(qmax) - zp)) * grad_factor
    ds = jnp.where(inside, ds_in, ds_out)
    dz = jnp.where(inside, zero, g * jnp.float32(-1.0) * scale * grad_factor)
    return dx, ds, dz


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lsq_per_tensor(x, scale, zp, qmin, qmax, grad_factor):
    zf = nm.x86_f32_to_int32(jnp.clip(nm.rne(zp), qmin, qmax))
    y = _fq_per_tensor_math(x, scale, zf, None, qmin, qmax)[0]
    return jnp.where(jnp.isnan(zp), jnp.float32(jnp.nan), y)  # torch raises for a NaN zp


def _lsq_per_tensor_fwd(x, scale, zp, qmin, qmax, grad_factor):
    return _lsq_per_tensor(x, scale, zp, qmin, qmax, grad_factor), (x, scale, zp, grad_factor)


def _lsq_per_tensor_bwd(qmin, qmax, res, g):
    x, scale, zp, grad_factor = res
    # torch's backward truncates zp + 0.5 (round half up), unlike the forward's half-even.
    zb = jnp.trunc(jnp.clip(zp + jnp.float32(0.5), qmin, qmax))
    dx, ds, dz = _lsq_grads(x, g.astype(jnp.float32), scale, zb, qmin, qmax,
                            nm.f32(grad_factor))
    return dx, jnp.sum(ds).reshape(scale.shape), jnp.sum(dz).reshape(zp.shape), jnp.zeros_like(grad_factor)


_lsq_per_tensor.defvjp(_lsq_per_tensor_fwd, _lsq_per_tensor_bwd)


def fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, quant_min: int,
                                              quant_max: int, grad_factor=1.0):
    """LSQ fake quantization; ``torch._fake_quantize_learnable_per_tensor_affine``.

    Args:
      x: float array.
      scale: float32 array of shape ``(1,)`` (or ``()``) — differentiable.
      zero_point: float32 array of shape ``(1,)`` (or ``()``) — differentiable; the forward
        rounds it half-to-even and clamps it to ``[quant_min, quant_max]``.
      grad_factor: multiplies the scale and zero-point gradients (LSQ's gradient scaling).
    Returns:
      The fake-quantized ``x`` (its shape and dtype). Gradients: ``dx = g * mask``;
      ``dscale = sum(g * (xfq - x) / scale)`` inside the range and ``g * (qmin|qmax - zp)``
      outside; ``dzero_point = sum(-g * scale)`` outside — torch's formulas, including its
      backward rounding the zero point half-up (``int(zp + 0.5)``).
    """
    qmin, qmax = _check_range(quant_min, quant_max)
    x = jnp.asarray(x)
    scale = nm.f32(scale)
    zero_point = nm.f32(zero_point)
    if scale.size != 1 or zero_point.size != 1:
        raise ValueError(f"scale and zero_point must hold one value, got shapes {scale.shape} "
                         f"and {zero_point.shape}")
    # inside shard_map: a replicated scale / zero point varies like x (gradients are summed)
    scale, zero_point = collectives.match_varying(scale, x), collectives.match_varying(zero_point, x)
    y = _lsq_per_tensor(nm.f32(x), scale.reshape(()), zero_point.reshape(()), qmin, qmax,
                        nm.f32(grad_factor))
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _lsq_per_channel(x, scale, zp, axis, qmin, qmax, grad_factor):
    bshape = _channel_shape(x, axis)
    zr = nm.x86_f32_to_int32(jnp.clip(nm.rne(zp), qmin, qmax)).reshape(bshape)
    y = _fq_per_channel_int_math(x, scale.reshape(bshape), zr, qmin, qmax)[0]
    return jnp.where(jnp.isnan(zp.reshape(bshape)), jnp.float32(jnp.nan), y)


def _lsq_per_channel_fwd(x, scale, zp, axis, qmin, qmax, grad_factor):
    y = _lsq_per_channel(x, scale, zp, axis, qmin, qmax, grad_factor)
    return y, (x, scale, zp, grad_factor)


def _lsq_per_channel_bwd(axis, qmin, qmax, res, g):
    x, scale, zp, grad_factor = res
    bshape = _channel_shape(x, axis)
    zr = jnp.clip(nm.rne(zp), qmin, qmax)
    dx, ds, dz = _lsq_grads(x, g.astype(jnp.float32), scale.reshape(bshape), zr.reshape(bshape),
                            qmin, qmax, nm.f32(grad_factor))
    red = tuple(i for i in range(x.ndim) if i != axis)
    return dx, jnp.sum(ds, axis=red), jnp.sum(dz, axis=red), jnp.zeros_like(grad_factor)


_lsq_per_channel.defvjp(_lsq_per_channel_fwd, _lsq_per_channel_bwd)


def fake_quantize_learnable_per_channel_affine(x, scale, zero_point, axis: int, quant_min: int,
                                               quant_max: int, grad_factor=1.0):
    """Per-channel LSQ fake quantization; ``torch._fake_quantize_learnable_per_channel_affine``.

    ``scale`` and ``zero_point`` are float32 arrays of shape ``(C,)``, both differentiable.
    The zero point is rounded half-to-even and clamped in forward and backward. Gradients
    follow :func:`fake_quantize_learnable_per_tensor_affine`, reduced over every axis but
    ``axis``.
    """
    qmin, qmax = _check_range(quant_min, quant_max)
    x = jnp.asarray(x)
    axis = _normalize_axis(axis, x.ndim)
    c = x.shape[axis]
    scale = nm.f32(scale)
    zero_point = nm.f32(zero_point)
    if scale.shape != (c,) or zero_point.shape != (c,):
        raise ValueError(f"scale and zero_point must have shape ({c},), got {scale.shape} "
                         f"and {zero_point.shape}")
    # inside shard_map: a replicated scale / zero point varies like x (gradients are summed)
    scale, zero_point = collectives.match_varying(scale, x), collectives.match_varying(zero_point, x)
    y = _lsq_per_channel(nm.f32(x), scale, zero_point, axis, qmin, qmax, nm.f32(grad_factor))
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------
# Real quantization
# ----------------------------------------------------------------------------------------

def _storage_range(dtype):
    name = dtype_name(dtype)
    if name == "uint4":
        return 0, 15
    info = np.iinfo(np.dtype(name))
    return int(info.min), int(info.max)


def _check_qdtype(dtype):
    d = canonical_dtype(dtype)
    if d.name not in ("uint8", "int8", "int16", "uint16", "int32", "uint4"):
        raise ValueError(f"dtype={d.name} is not a quantized integer dtype")
    return d


def _to_storage(qf, lo: int, hi: int, d, nan_value: int):
    """Integer-valued float32 ``qf`` saturated to ``[lo, hi]`` as ``d``; NaN -> ``nan_value``."""
    below, above, _, _ = _f32_bounds(lo, hi)
    q = jnp.where(qf <= below, lo, jnp.where(qf >= above, hi,
                                              jnp.where(jnp.isnan(qf), 0, qf).astype(jnp.int64
                                                  if d.itemsize > 4 else jnp.int32)))
    q = jnp.where(jnp.isnan(qf), nan_value, q)
    return jnp.clip(q, lo, hi).astype(d)


def _wrap_int32_float(qf):
    """Integer-valued float32 ``qf`` (NaN/inf/beyond int64 -> 0) wrapped modulo 2**32 to
    the int32 range, exactly: ``int32(int64(qf))`` on x86."""
    qf = jnp.where(nm.in_int64_range(qf), qf, jnp.float32(0))
    two32 = jnp.float32(2.0 ** 32)
    r = qf - jnp.floor(qf * jnp.float32(2.0 ** -32)) * two32  # exact for |qf| >= 2**31
    r = jnp.where(r >= jnp.float32(2.0 ** 31), r - two32, r)
    return jnp.where(jnp.abs(qf) < jnp.float32(2.0 ** 31), qf, r)


def quantize_per_tensor(x, scale, zero_point, dtype):
    """Quantizes to integers; ``torch.quantize_per_tensor`` (returns the integer array).

    Rounding follows torch's x86 kernels: uint8/int8 round ``x * (1/scale) + zp`` computed
    with one rounding (fbgemm's fused multiply-add), int32 rounds ``zp + x * (1/scale)``
    with two float32 roundings, and quint4x2 (uint4) adds ``zp`` to the rounded
    ``x * (1/scale)``. Results saturate to the dtype's range. Non-finite inputs as in torch:
    NaN gives the maximum for uint8/int8, INT32_MIN for int32 and 0 for uint4 (whose
    ``+-inf`` also give 0); ``+-inf`` saturate otherwise.
    """
    d = _check_qdtype(dtype)
    lo, hi = _storage_range(d)
    x = nm.f32(x)
    scale = nm.f32(_scalar_param(scale, "scale"))
    zp = nm.f32(_zp_to_int32(_scalar_param(zero_point, "zero_point")))
    inv = jnp.float32(1.0) / scale
    if d.name in ("uint8", "int8"):
        return _to_storage(nm.rne(nm.fma_f32(x, inv, zp)), lo, hi, d, hi)
    if d.name == "uint4":
        qf = zp + nm.rne(x * inv)
        return _to_storage(jnp.where(nm.in_int64_range(qf), qf, jnp.float32(lo)), lo, hi, d, lo)
    qf = nm.rne(zp + nm.unfused(x * inv))
    return _to_storage(qf, lo, hi, d, lo)


def quantize_per_channel(x, scale, zero_point, axis: int, dtype):
    """Per-channel quantization; ``torch.quantize_per_channel`` (returns the integer array).

    ``q = round(zp + x * (1/scale))`` with two float32 roundings, as torch's kernel, for
    integer and float (``per_channel_affine_float_qparams``) zero points alike; saturated to
    the dtype's range. NaN gives 0 for uint8/int8 and INT32_MIN for int32. With a float zero
    point torch keeps the rounded value in an ``int32`` before clamping: values beyond the
    int32 range wrap around (modulo 2**32) and NaN, ``+-inf`` and values beyond int64 give 0
    (then clamped), as here.
    """
    d = _check_qdtype(dtype)
    lo, hi = _storage_range(d)
    x = nm.f32(x)
    axis = _normalize_axis(axis, x.ndim)
    bshape = _channel_shape(x, axis)
    zero_point = jnp.asarray(zero_point)
    s = nm.f32(scale).reshape(bshape)
    float_zp = jnp.issubdtype(zero_point.dtype, jnp.floating)
    z = nm.f32(zero_point if float_zp else _zp_to_int32(zero_point)).reshape(bshape)
    qf = nm.rne(z + nm.unfused(x * (jnp.float32(1.0) / s)))
    if float_zp:
        return _to_storage(_wrap_int32_float(qf), lo, hi, d, lo)
    return _to_storage(qf, lo, hi, d, lo if d.name == "int32" else 0)


def dequantize(q, scale, zero_point, axis: int | None = None):
    """``(q - zero_point) * scale`` in float32; ``Tensor.dequantize``.

    ``axis=None`` is per-tensor (one-element ``scale``/``zero_point``); otherwise they have
    shape ``(q.shape[axis],)``. As torch: per tensor, ``q - zp`` is an int32 subtraction
    (wrapping for extreme int32 values) converted to float32; per channel, ``q`` and ``zp``
    are converted to float32 first. Float zero points subtract in float32.
    """
    q = jnp.asarray(q)
    if axis is None:
        s = nm.f32(_scalar_param(scale, "scale"))
        z = jnp.asarray(_scalar_param(zero_point, "zero_point"))
        if not jnp.issubdtype(z.dtype, jnp.floating):
            return (q.astype(jnp.int32) - z.astype(jnp.int32)).astype(jnp.float32) * s
        return (q.astype(jnp.float32) - z) * s
    axis = _normalize_axis(axis, q.ndim)
    bshape = _channel_shape(q, axis)
    s = nm.f32(scale).reshape(bshape)
    z = nm.f32(zero_point).reshape(bshape)
    return (q.astype(jnp.float32) - z) * s
