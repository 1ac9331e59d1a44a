"""Quantization-parameter rules: the observer rule and the fused op's rule.

torch has two different functions that turn a (min, max) range into (scale, zero_point);
jquant keeps both, exact, and never mixes them up:

* :func:`calculate_qparams` — ``UniformQuantizationObserverBase._calculate_qparams``, used by
  every observer's ``calculate_qparams``, by ``FakeQuantize`` buffers and by ``convert``.
* :func:`choose_quantization_params` — fbgemm's ``ChooseQuantizationParams``, used inside
  ``torch.fused_moving_avg_obs_fake_quant`` and ``torch._choose_qparams_per_tensor``.
"""
from __future__ import annotations

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


def choose_quantization_params(min_val, max_val, quant_min: int, quant_max: int,
                               preserve_sparsity: bool = False):
    """(scale, zero_point) by fbgemm's ``ChooseQuantizationParams``, elementwise.

    This is the rule inside ``torch.fused_moving_avg_obs_fake_quant`` (``preserve_sparsity``
    is its ``symmetric_quant``). It differs from :func:`calculate_qparams`: symmetric
    ranges divide by ``(qmax - qmin) // 2``-based bounds, scales under 6.1e-5 are raised to
    6.1e-5, a zero range gives 0.1. The scale and zero point are computed in float64 as
    fbgemm does (traced with x64 enabled locally), then the scale is rounded to float32.

    Args:
      min_val, max_val: float32 arrays of equal shape.
    Returns:
      ``(scale float32, zero_point int32)`` of that shape.
    """
    qmin, qmax = int(quant_min), int(quant_max)
    min_val = nm.f32(min_val)
    max_val = nm.f32(max_val)
    with nm.enable_x64():
        f64 = jnp.float64
        mn = min_val
        mx = max_val
        if preserve_sparsity:
            sym = (mn < 0) & (mx > 0)
            sqmin = -((qmax - qmin) // 2 + 1)
            sqmax = (qmax - qmin) // 2
            ms = jnp.maximum(jnp.abs(nm.div_const(mn, sqmin)), jnp.abs(nm.div_const(mx, sqmax)))
            ms = ms.astype(f64)
            mn = jnp.where(sym, (ms * sqmin).astype(jnp.float32), mn)
            mx = jnp.where(sym, (ms * sqmax).astype(jnp.float32), mx)
        mn = jnp.minimum(mn, jnp.float32(0.0))
        mx = jnp.maximum(mx, jnp.float32(0.0))
        scale = (mx.astype(f64) - mn.astype(f64)) / f64(qmax - qmin)
        scale_f = scale.astype(jnp.float32)
        degenerate = (scale_f == 0) | jnp.isinf(jnp.float32(1.0) / scale_f)
        scale = jnp.where(degenerate, f64(0.1), scale)
        thr = np.float32(SMALL_SCALE_THRESHOLD)
        small = scale < f64(thr)
        org = scale.astype(jnp.float32)
        amp = thr / org
        mx_small = jnp.where(mn == 0, thr * np.float32(qmax - qmin),
                             jnp.where(mx == 0, mx, mx * amp))
        mn_small = jnp.where(mn == 0, mn,
                             jnp.where(mx == 0, -thr * np.float32(qmax - qmin), mn * amp))
        mn = jnp.where(small, mn_small, mn)
        mx = jnp.where(small, mx_small, mx)
        scale = jnp.where(small, f64(thr), scale)
        mn64 = mn.astype(f64)
        mx64 = mx.astype(f64)
        zp_from_min = qmin - mn64 / scale
        zp_from_max = qmax - mx64 / scale
        err_min = abs(qmin) - jnp.abs(mn64 / scale)
        err_max = abs(qmax) - jnp.abs(mx64 / scale)
        z0 = jnp.where(err_min < err_max, zp_from_min, zp_from_max)
        if preserve_sparsity:
            z0 = jnp.where((mn < 0) & (mx > 0), f64((qmin + qmax) / 2), z0)
        nudged = jnp.where(z0 < qmin, f64(qmin), jnp.where(z0 > qmax, f64(qmax), jnp.round(z0)))
        ok = (nudged >= -2.0 ** 31) & (nudged < 2.0 ** 31)
        zp = jnp.where(ok, jnp.where(ok, nudged, 0.0).astype(jnp.int32), jnp.int32(nm.INT32_MIN))
        scale32 = scale.astype(jnp.float32)
    return scale32, zp


def choose_qparams_per_tensor(x, reduce_range: bool = False):
    """(scale, zero_point) of a tensor's min/max; ``torch._choose_qparams_per_tensor``.

    Uses quint8 range [0, 255] ([0, 127] with ``reduce_range``) and fbgemm's rule.
    Returns 0-d float32 scale and int32 zero point (torch returns Python float and int).
    """
    x = nm.f32(x)
    if x.size == 0:
        mn = mx = jnp.float32(0.0)
    else:
        mn, mx = jnp.min(x), jnp.max(x)
    return choose_quantization_params(mn, mx, 0, 127 if reduce_range else 255)
