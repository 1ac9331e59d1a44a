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
from typing import Any

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
# Per-tensor affine (torch.fake_quantize_per_tensor_affine)
# ----------------------------------------------------------------------------------------

def _fq_per_tensor_fwd_math(x, scale, zp, qmin, qmax):
    inv = jnp.float32(1.0) / scale
    qf = zp + nm.rne(x * inv)
    qc = jnp.where(jnp.isnan(qf), jnp.float32(qmin), jnp.clip(qf, qmin, qmax))
    y = (qc - zp) * scale
    mask = (qf >= qmin) & (qf <= qmax)
    return y, mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fq_per_tensor(x, scale, zp, qmin, qmax):
    return _fq_per_tensor_fwd_math(x, scale, zp, qmin, qmax)[0]


def _fq_per_tensor_fwd(x, scale, zp, qmin, qmax):
    y, mask = _fq_per_tensor_fwd_math(x, scale, zp, qmin, qmax)
    return y, (mask, jnp.zeros_like(scale), jnp.zeros_like(zp))


def _fq_mask_bwd(qmin, qmax, res, g):
    mask, zs, zz = res
    return jnp.where(mask, g, jnp.zeros((), g.dtype)), zs, zz


_fq_per_tensor.defvjp(_fq_per_tensor_fwd, _fq_mask_bwd)


def fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min: int, quant_max: int):
    """Per-tensor fake quantization; ``torch.fake_quantize_per_tensor_affine``.

    ``y = (clamp(zp + round(x * (1/scale)), qmin, qmax) - zp) * scale``.

    Args:
      x: float array of any shape.
      scale: float, or an array with one element (shape ``()`` or ``(1,)``).
      zero_point: int, or an array with one element (any integer or float dtype).
      quant_min, quant_max: static Python ints.
    Returns:
      An array of ``x``'s shape and dtype. Gradient w.r.t. ``x`` is ``g * mask`` with
      ``mask = qmin <= zp + round(x/scale) <= qmax`` (inclusive, on the unclamped value);
      ``scale`` and ``zero_point`` get zero gradient. NaN maps to ``(qmin - zp) * scale``,
      ``+inf`` to ``(qmax - zp) * scale``, ``-inf`` to ``(qmin - zp) * scale``, as in torch.
    """
    qmin, qmax = _check_range(quant_min, quant_max)
    x = jnp.asarray(x)
    scale = nm.f32(_scalar_param(scale, "scale"))
    zp = nm.f32(_scalar_param(zero_point, "zero_point"))
    y = _fq_per_tensor(nm.f32(x), scale, zp, qmin, qmax)
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------
# Per-channel affine (torch.fake_quantize_per_channel_affine)
# ----------------------------------------------------------------------------------------

def _fq_per_channel_int_math(x, scale, zp, qmin, qmax):
    # torch: q = int64(zp + nearbyint(x * inv)); NaN/inf -> INT64_MIN -> clamps to qmin.
    inv = jnp.float32(1.0) / scale
    qf = zp + nm.rne(x * inv)
    ok = nm.in_int64_range(qf)
    qc = jnp.where(ok, jnp.clip(qf, qmin, qmax), jnp.float32(qmin))
    y = (qc - zp) * scale
    mask = ok & (qf >= qmin) & (qf <= qmax)
    return y, mask


def _dequant_f64(qc, zp, scale):
    # torch computes (double(q) - double(zp)) * double(scale), rounded once to float32.
    with nm.enable_x64():
        y = (qc.astype(jnp.float64) - zp.astype(jnp.float64)) * scale.astype(jnp.float64)
        return y.astype(jnp.float32)


def _dequant_float_zp(qc, zp, scale):
    return lax.platform_dependent(qc, zp, scale, cpu=_dequant_f64, cuda=_dequant_f64,
                                  default=lambda q, z, s: (q - z) * s)


def _fq_per_channel_float_math(x, scale, zp, qmin, qmax):
    # torch: q = lrintf(zp + x * inv) (round after adding the float zero point).
    inv = jnp.float32(1.0) / scale
    qf = nm.rne(zp + x * inv)
    ok = nm.in_int64_range(qf)
    qc = jnp.where(ok, jnp.clip(qf, qmin, qmax), jnp.float32(qmin))
    y = _dequant_float_zp(qc, zp, scale)
    mask = ok & (qf >= qmin) & (qf <= qmax)
    return y, mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fq_per_channel(x, scale, zp, qmin, qmax, float_zp):
    math = _fq_per_channel_float_math if float_zp else _fq_per_channel_int_math
    return math(x, scale, zp, qmin, qmax)[0]


def _fq_per_channel_fwd(x, scale, zp, qmin, qmax, float_zp):
    math = _fq_per_channel_float_math if float_zp else _fq_per_channel_int_math
    y, mask = math(x, scale, zp, qmin, qmax)
    return y, (mask, jnp.zeros_like(scale), jnp.zeros_like(zp))


def _fq_per_channel_bwd(qmin, qmax, float_zp, res, g):
    return _fq_mask_bwd(qmin, qmax, res, g)


_fq_per_channel.defvjp(_fq_per_channel_fwd, _fq_per_channel_bwd)


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
      axis: the channel axis (static).
      quant_min, quant_max: static Python ints.
    Returns:
      An array of ``x``'s shape and dtype; gradient ``g * mask`` w.r.t. ``x``.
    """
    qmin, qmax = _check_range(quant_min, quant_max)
    x = jnp.asarray(x)
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
    z = nm.f32(zero_point).reshape(bshape)
    y = _fq_per_channel(nm.f32(x), s, z, qmin, qmax, float_zp)
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------
# Learnable (LSQ) fake quantization (torch._fake_quantize_learnable_per_*_affine)
# ----------------------------------------------------------------------------------------

def _lsq_grads(x, g, scale, zp, qmin, qmax, grad_factor, round_after_add):
    """Per-element (dX, dScale_i, dZeroPoint_i) of torch's learnable fake-quant backward."""
    inv = jnp.float32(1.0) / scale
    if round_after_add:
        xq = nm.rne(zp + x * inv)
    else:
        xq = zp + nm.rne(x * inv)
    ok = nm.in_int64_range(xq)
    below = ~ok | (xq < qmin)
    above = ok & (xq > qmax)
    inside = ~(below | above)
    xfq = (jnp.where(ok, jnp.clip(xq, qmin, qmax), jnp.float32(qmin)) - zp) * scale
    zero = jnp.zeros((), jnp.float32)
    dx = jnp.where(inside, g, zero)
    ds_in = g * (xfq - x) * inv * grad_factor
    ds_out = jnp.where(below, g * (jnp.float32(qmin) - zp), g * (jnp.float32(qmax) - zp)) * grad_factor
    ds = jnp.where(inside, ds_in, ds_out)
    dz = jnp.where(inside, zero, g * jnp.float32(-1.0) * scale * grad_factor)
    return dx, ds, dz


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lsq_per_tensor(x, scale, zp, qmin, qmax, grad_factor):
    zf = jnp.clip(nm.rne(zp), qmin, qmax)
    return _fq_per_tensor_fwd_math(x, scale, zf, qmin, qmax)[0]


def _lsq_per_tensor_fwd(x, scale, zp, qmin, qmax, grad_factor):
    return _lsq_per_tensor(x, scale, zp, qmin, qmax, grad_factor), (x, scale, zp, grad_factor)


def _lsq_per_tensor_bwd(qmin, qmax, res, g):
    x, scale, zp, grad_factor = res
    # torch's backward truncates zp + 0.5 (round half up), unlike the forward's half-even.
    zb = jnp.trunc(jnp.clip(zp + jnp.float32(0.5), qmin, qmax))
    dx, ds, dz = _lsq_grads(x, g.astype(jnp.float32), scale, zb, qmin, qmax,
                            nm.f32(grad_factor), round_after_add=False)
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
    zr = jnp.clip(nm.rne(zp), qmin, qmax).reshape(bshape)
    return _fq_per_channel_int_math(x, scale.reshape(bshape), zr, qmin, qmax)[0]


def _lsq_per_channel_fwd(x, scale, zp, axis, qmin, qmax, grad_factor):
    y = _lsq_per_channel(x, scale, zp, axis, qmin, qmax, grad_factor)
    return y, (x, scale, zp, grad_factor)


def _lsq_per_channel_bwd(axis, qmin, qmax, res, g):
    x, scale, zp, grad_factor = res
    bshape = _channel_shape(x, axis)
    zr = jnp.clip(nm.rne(zp), qmin, qmax)
    dx, ds, dz = _lsq_grads(x, g.astype(jnp.float32), scale.reshape(bshape), zr.reshape(bshape),
                            qmin, qmax, nm.f32(grad_factor), round_after_add=True)
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


def quantize_per_tensor(x, scale, zero_point, dtype):
    """Quantizes to integers; ``torch.quantize_per_tensor`` (returns the integer array).

    ``q = clamp(zp + round(x * (1/scale)), dtype.min, dtype.max)`` as ``dtype``. Non-finite
    inputs saturate (NaN maps to ``zp``'s lowest storable value; torch leaves them undefined).
    """
    d = _check_qdtype(dtype)
    lo, hi = _storage_range(d)
    scale = nm.f32(_scalar_param(scale, "scale"))
    zp = nm.f32(_scalar_param(zero_point, "zero_point"))
    qf = zp + nm.rne(nm.f32(x) * (jnp.float32(1.0) / scale))
    qf = jnp.where(jnp.isnan(qf), jnp.float32(lo), jnp.clip(qf, lo, hi))
    return qf.astype(d)


def quantize_per_channel(x, scale, zero_point, axis: int, dtype):
    """Per-channel quantization; ``torch.quantize_per_channel`` (returns the integer array).

    An integer zero point rounds then adds; a float zero point (``float_qparams``) adds then
    rounds, as torch's embedding quantization does.
    """
    d = _check_qdtype(dtype)
    lo, hi = _storage_range(d)
    x = nm.f32(x)
    axis = _normalize_axis(axis, x.ndim)
    bshape = _channel_shape(x, axis)
    zero_point = jnp.asarray(zero_point)
    s = nm.f32(scale).reshape(bshape)
    z = nm.f32(zero_point).reshape(bshape)
    inv = jnp.float32(1.0) / s
    if jnp.issubdtype(zero_point.dtype, jnp.floating):
        qf = nm.rne(x * inv + z)
    else:
        qf = z + nm.rne(x * inv)
    qf = jnp.where(jnp.isnan(qf), jnp.float32(lo), jnp.clip(qf, lo, hi))
    return qf.astype(d)


def dequantize(q, scale, zero_point, axis: int | None = None):
    """``(q - zero_point) * scale`` in float32; ``Tensor.dequantize``.

    ``axis=None`` is per-tensor (one-element ``scale``/``zero_point``); otherwise they have
    shape ``(q.shape[axis],)``.
    """
    q = jnp.asarray(q)
    if axis is None:
        s = nm.f32(_scalar_param(scale, "scale"))
        z = nm.f32(_scalar_param(zero_point, "zero_point"))
    else:
        axis = _normalize_axis(axis, q.ndim)
        bshape = _channel_shape(q, axis)
        s = nm.f32(scale).reshape(bshape)
        z = nm.f32(zero_point).reshape(bshape)
    return (q.astype(jnp.float32) - z) * s
