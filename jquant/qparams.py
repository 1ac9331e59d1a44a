"""Quantization-parameter rules: the observer rule and the fused op's rule.

torch has two different functions that turn a (min, max) range into (scale, zero_point);
jquant keeps both, exact, and never mixes them up:

* :func:`calculate_qparams` — ``UniformQuantizationObserverBase._calculate_qparams``, used by
  every observer's ``calculate_qparams``, by ``FakeQuantize`` buffers and by ``convert``.
* :func:`choose_quantization_params` — fbgemm's ``ChooseQuantizationParams``, used inside
  ``torch.fused_moving_avg_obs_fake_quant`` and ``torch._choose_qparams_per_tensor``.
"""
from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
import numpy as np

from jquant import _numerics as nm
from jquant.types import QScheme, dtype_name

__all__ = ["calculate_qparams", "choose_quantization_params", "choose_qparams_per_tensor",
           "SMALL_SCALE_THRESHOLD"]

SMALL_SCALE_THRESHOLD = float(np.float32(6.1e-5))


def _symmetric_zero_point(dtype, quant_min: int, quant_max: int, has_customized_qrange: bool) -> int:
    name = dtype_name(dtype)
    if name == "uint8":
        return (quant_min + quant_max) // 2 if has_customized_qrange else 128
    if name == "uint16":
        return 32768
    return 0


def calculate_qparams(min_val, max_val, *, qscheme: QScheme, dtype: Any, quant_min: int,
                      quant_max: int, has_customized_qrange: bool = False,
                      eps=float(np.finfo(np.float32).eps)):
    """(scale, zero_point) from a range: torch's observer rule ``_calculate_qparams``.

    Args:
      min_val, max_val: float32 arrays of shape ``()`` (per-tensor) or ``(C,)`` (per-channel).
      qscheme, dtype: the observer's scheme and quantized dtype.
      quant_min, quant_max: the effective range (after ``reduce_range``).
      has_customized_qrange: whether the user gave both bounds (changes the symmetric
        uint8 zero point from 128 to ``(quant_min + quant_max) // 2``).
      eps: smallest scale, a float or a shape-``(1,)`` array.

    Returns:
      ``scale`` float32 and ``zero_point`` int32 (float32 for
      ``per_channel_affine_float_qparams``), shape ``(1,)`` per-tensor or ``(C,)``.

    An uninitialised range (``min == +inf and max == -inf``) gives ``(1.0, 0)`` as in torch;
    per channel this holds entry by entry (torch raises for such a vector: a static-shape
    deviation). Given concrete (non-traced) arrays, ``min > max`` raises ``ValueError``
    like torch's assertion; under ``jit`` it is not checked. NaN gives NaN scale and the
    zero point torch computes on x86 (``int32(NaN) == INT32_MIN``, then clamped).
    """
    min_val = nm.f32(min_val)
    max_val = nm.f32(max_val)
    eps = jnp.reshape(nm.f32(eps), (-1,))[:1]
    per_tensor = min_val.ndim == 0
    float_zp = qscheme == QScheme.PER_CHANNEL_AFFINE_FLOAT_QPARAMS
    if min_val.size == 0 or max_val.size == 0:
        return jnp.ones((1,), jnp.float32), jnp.zeros((1,), jnp.float32 if float_zp else jnp.int32)
    uninit = (min_val == jnp.inf) & (max_val == -jnp.inf)
    if nm.is_concrete(min_val, max_val):
        bad = np.asarray((min_val > max_val) & ~uninit)
        if bad.any():
            raise ValueError(f"min_val {np.asarray(min_val)} should be less than or equal to "
                             f"max_val {np.asarray(max_val)}")
    return nm.isolate(functools.partial(_observer_rule, qscheme=qscheme, dtype=dtype,
                                        quant_min=int(quant_min), quant_max=int(quant_max),
                                        has_customized_qrange=has_customized_qrange,
                                        per_tensor=per_tensor, float_zp=float_zp),
                      min_val, max_val, eps)


def _observer_rule(min_val, max_val, eps, *, qscheme, dtype, quant_min, quant_max,
                   has_customized_qrange, per_tensor, float_zp):
    uninit = (min_val == jnp.inf) & (max_val == -jnp.inf)
    qmin, qmax = int(quant_min), int(quant_max)
    min_neg = jnp.minimum(min_val, 0.0)
    max_pos = jnp.maximum(max_val, 0.0)

    if qscheme.is_symmetric:
        m = jnp.maximum(-min_neg, max_pos)
        scale = nm.div_const(m, np.float32((qmax - qmin) / 2))
        scale = jnp.maximum(scale, eps)
        zp_value = _symmetric_zero_point(dtype, qmin, qmax, has_customized_qrange)
        zero_point = jnp.full(scale.shape, zp_value, jnp.int32)
    elif float_zp:
        scale = nm.div_const(max_val - min_val, np.float32(qmax - qmin))
        scale = jnp.where(scale > eps, scale, jnp.float32(1.0))
        zero_point = (-min_val) / scale
    else:
        scale = nm.div_const(max_pos - min_neg, np.float32(qmax - qmin))
        scale = jnp.maximum(scale, eps)
        zero_point = jnp.int32(qmin) - nm.x86_f32_to_int32(nm.rne(min_neg / scale))
        zero_point = jnp.clip(zero_point, qmin, qmax).astype(jnp.int32)

    scale = jnp.where(uninit, jnp.float32(1.0), scale)
    zero_point = jnp.where(uninit, jnp.zeros((), zero_point.dtype), zero_point)
    if per_tensor:
        scale = jnp.reshape(scale, (1,))
        zero_point = jnp.reshape(zero_point, (1,))
    return scale.astype(jnp.float32), zero_point


def _wrap_int32(v: int) -> int:
    """``v`` wrapped to int32 (C++ ``int`` arithmetic overflows silently on x86)."""
    return (int(v) + 2 ** 31) % 2 ** 32 - 2 ** 31


def _c_div(a: int, b: int) -> int:
    """C++ integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _round_f32(v):
    """float64 ``v`` rounded to the nearest float32 value, returned as float64.

    Unlike XLA:CPU's float64 -> float32 conversion, float32 denormal results are kept (not
    flushed to zero), as in fbgemm's scalar C++ code.
    """
    normal = v.astype(jnp.float32).astype(jnp.float64)
    subnormal = jnp.round(v * 2.0 ** 149) * 2.0 ** -149
    return jnp.where(jnp.abs(v) < 2.0 ** -126, subnormal, normal)


def _div_runtime(num, c: float):
    """``num / c`` correctly rounded for a Python constant ``c``.

    XLA rewrites a division by a constant into a multiplication by its reciprocal (off by
    one ulp for many inputs); a divisor selected at run time is divided for real.
    """
    c = float(c)
    return num / jnp.where(num == num, c, c + 1.0)  # NaN / anything is NaN either way


def _choose_qparams(min_val, max_val, qmin: int, qmax: int, preserve_sparsity: bool,
                    float_scale: bool):
    """Both C++ variants of ChooseQuantizationParams (fbgemm's and ATen's quant_utils).

    Computed in float64 (x64 traced locally) with explicit float32 roundings where the C++
    stores floats (float32 denormals kept, which XLA:CPU would flush); divisions by the
    range width are true divisions; ``qmax - qmin`` wraps like C++ ``int``. fbgemm
    (``float_scale``) rounds the scale to float32 before deriving the zero point from it;
    quant_utils keeps it in float64. Returns (float64 scale, int32 zero point).
    """
    span = _wrap_int32(qmax - qmin)
    f64 = jnp.float64
    mn = nm.f32(min_val).astype(f64)
    mx = nm.f32(max_val).astype(f64)
    if preserve_sparsity:
        sym = (mn < 0) & (mx > 0)
        sqmin = -(_c_div(span, 2) + 1)
        sqmax = _c_div(span, 2)
        # float / int in float32 (the int converted to float), then double products
        # stored back into float min/max.
        ms = jnp.maximum(jnp.abs(_round_f32(_div_runtime(mn, float(np.float32(sqmin))))),
                         jnp.abs(_round_f32(_div_runtime(mx, float(np.float32(sqmax))))))
        mn = jnp.where(sym, _round_f32(ms * f64(sqmin)), mn)
        mx = jnp.where(sym, _round_f32(ms * f64(sqmax)), mx)
    mn = jnp.minimum(mn, f64(0.0))
    mx = jnp.maximum(mx, f64(0.0))
    scale = _div_runtime(mx - mn, span)
    if float_scale:
        scale = _round_f32(scale)
    scale_f = _round_f32(scale)
    degenerate = (scale_f == 0) | jnp.isinf(_round_f32(f64(1.0) / scale_f))
    scale = jnp.where(degenerate, f64(np.float32(0.1)) if float_scale else f64(0.1), scale)
    thr = f64(np.float32(SMALL_SCALE_THRESHOLD))
    small = scale < thr
    amp = _round_f32(thr / _round_f32(scale))
    thr_span = f64(np.float32(SMALL_SCALE_THRESHOLD) * np.float32(span))
    mx_small = jnp.where(mn == 0, thr_span, jnp.where(mx == 0, mx, _round_f32(mx * amp)))
    mn_small = jnp.where(mn == 0, mn, jnp.where(mx == 0, -thr_span, _round_f32(mn * amp)))
    mn = jnp.where(small, mn_small, mn)
    mx = jnp.where(small, mx_small, mx)
    scale = jnp.where(small, thr, scale)
    zp_from_min = qmin - mn / scale
    zp_from_max = qmax - mx / scale
    err_min = _wrap_int32(abs(qmin)) + jnp.abs(mn / scale)
    err_max = abs(qmax) + jnp.abs(mx / scale)
    z0 = jnp.where(err_min < err_max, zp_from_min, zp_from_max)
    if preserve_sparsity:
        z0 = jnp.where((mn < 0) & (mx > 0), f64((qmin + qmax) / 2), z0)
    nudged = jnp.where(z0 < qmin, f64(qmin), jnp.where(z0 > qmax, f64(qmax), jnp.round(z0)))
    ok = (nudged >= -2.0 ** 31) & (nudged < 2.0 ** 31)
    zp = jnp.where(ok, jnp.where(ok, nudged, 0.0).astype(jnp.int32), jnp.int32(nm.INT32_MIN))
    return scale, zp


def choose_quantization_params(min_val, max_val, quant_min: int, quant_max: int,
                               preserve_sparsity: bool = False):
    """(scale, zero_point) by fbgemm's ``ChooseQuantizationParams``, elementwise.

    This is the rule inside ``torch.fused_moving_avg_obs_fake_quant`` (``preserve_sparsity``
    is its ``symmetric_quant``). It differs from :func:`calculate_qparams`: symmetric
    ranges divide by ``(qmax - qmin) // 2``-based bounds, scales under 6.1e-5 are raised to
    6.1e-5, a zero range gives 0.1. As fbgemm does, the scale is divided in float64 and
    rounded to float32, and the zero point is derived from that float32 scale in float64
    (float32 denormal intermediates are kept, not flushed as XLA:CPU would; a range wider
    than int32, e.g. the full qint32 range, overflows ``quant_max - quant_min`` as the
    C++ does and gives torch's degenerate results).

    Args:
      min_val, max_val: float32 arrays of equal shape.
    Returns:
      ``(scale float32, zero_point int32)`` of that shape.
    """
    with nm.enable_x64():
        def rule(mn, mx):
            scale, zp = _choose_qparams(mn, mx, int(quant_min), int(quant_max),
                                        bool(preserve_sparsity), float_scale=True)
            return scale.astype(jnp.float32), zp
        return nm.isolate(rule, nm.f32(min_val), nm.f32(max_val))


def choose_qparams_per_tensor(x, reduce_range: bool = False):
    """(scale, zero_point) of a tensor's min/max; ``torch._choose_qparams_per_tensor``.

    Uses the quint8 range [0, 255] ([0, 127] with ``reduce_range``) and ATen's
    ``quant_utils::ChooseQuantizationParams``, which (unlike the fused op's fbgemm rule,
    :func:`choose_quantization_params`) keeps the scale in float64 when deriving the zero
    point. Returns a 0-d float32 scale (the float32 rounding of the float64 scale torch
    returns as a Python float) and a 0-d int32 zero point (exactly torch's).

    An empty ``x`` raises ``ValueError`` (torch raises too); so does a NaN in a concrete
    ``x`` (torch: "min should be less than or equal to max"); under ``jit`` a NaN gives a
    NaN scale and zero point INT32_MIN.
    """
    x = nm.f32(x)
    if x.size == 0:
        raise ValueError("x is empty: choose_qparams_per_tensor needs at least one element")
    mn, mx = nm.aminmax(x)
    if nm.is_concrete(mn, mx) and (bool(jnp.isnan(mn)) or bool(jnp.isnan(mx))):
        raise ValueError("x contains NaN: min should be less than or equal to max")
    with nm.enable_x64():
        scale, zp = _choose_qparams(mn, mx, 0, 127 if reduce_range else 255, False,
                                    float_scale=False)
        return scale.astype(jnp.float32), zp
