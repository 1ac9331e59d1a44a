"""Functional twin of ``torch.fused_moving_avg_obs_fake_quant``.

torch's op mutates ``running_min``, ``running_max``, ``scale`` and ``zero_point`` in place;
this one returns their new values with the output.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jquant import _numerics as nm
from jquant import collectives
from jquant.fake_quant_ops import fake_quantize_if
from jquant.qparams import choose_quantization_params

__all__ = ["fused_moving_avg_obs_fake_quant", "flag_is_on", "moving_average"]


def flag_is_on(flag):
    """A flag as torch's buffers hold it (shape ``(1,)`` int) or a Python/JAX bool -> bool.

    Python bools stay static; arrays become traced booleans (any nonzero counts as on).
    """
    if isinstance(flag, (bool, int)):
        return bool(flag)
    flag = jnp.asarray(flag)
    return jnp.reshape(flag, (-1,))[0] != 0


def moving_average(running, batch, averaging_constant: float):
    """``running + c * (batch - running)`` with torch's three separate float32 roundings."""
    c = jnp.float32(averaging_constant)
    return running + nm.mul_rounded(c, batch - running)


def _select(pred, a, b):
    if isinstance(pred, bool):
        return a if pred else b
    return jnp.where(pred, a, b)


def fused_moving_avg_obs_fake_quant(x, observer_on, fake_quant_on, running_min, running_max,
                                    scale, zero_point, averaging_const: float, quant_min: int,
                                    quant_max: int, ch_axis: int, per_row_fake_quant: bool = False,
                                    symmetric_quant: bool = False, *, axis_name=None,
                                    _any_axis: bool = False):
    """Observe (moving-average min/max) then fake-quantize in one call.

    Counterpart of ``torch.fused_moving_avg_obs_fake_quant`` (CPU semantics):

    1. If ``observer_on``: batch min/max (per row of ``x`` reshaped to ``(C, -1)`` when
       ``per_row_fake_quant``) update the running stats; an entry that is ``+-inf`` is
       replaced by the batch value, others move by ``averaging_const``.
    2. If ``fake_quant_on``: (scale, zero_point) are recomputed from the running stats with
       fbgemm's rule (:func:`jquant.qparams.choose_quantization_params`) and ``x`` is
       fake-quantized with them; otherwise ``x`` passes through and scale/zero point keep
       their values.

    Args:
      x: float array (cast to float32 for the arithmetic; output keeps ``x.dtype``).
      observer_on, fake_quant_on: Python bools (static) or arrays (shape ``(1,)`` ints as
        torch's buffers, or booleans; traced). With traced flags both paths are computed
        and selected, so the op stays a single jittable graph.
      running_min, running_max: float32, shape ``()`` per-tensor or ``(C,)`` per-row; an
        empty ``(0,)`` per-row state is initialised to ``(C,)`` of ``+-inf`` as torch does.
      scale: float32, shape ``(1,)`` or ``(C,)``; zero_point: int32, same shape.
      averaging_const, quant_min, quant_max: static Python numbers.
      ch_axis: must be 0 when ``per_row_fake_quant`` (as in torch).
      axis_name: optional mesh axis name(s); batch min/max are reduced across it first.
      _any_axis: internal (the Flax front ends, whose kernels keep the output channel
        last): accept any ``ch_axis`` for per-row quantization; rows are the slices along
        it, so the result equals torch's on the array with that axis moved first.
    Returns:
      ``(y, running_min, running_max, scale, zero_point)``. The gradient of ``y`` is
      ``g * mask`` when fake quantization is on and ``g`` otherwise.

    An empty ``x`` returns ``x`` and the state unchanged. NaN inputs propagate into the
    running stats; the scale becomes NaN and the zero point INT32_MIN, as torch on x86.
    """
    x = jnp.asarray(x)
    qmin, qmax = int(quant_min), int(quant_max)
    running_min = nm.f32(running_min)
    running_max = nm.f32(running_max)
    scale = nm.f32(scale)
    zero_point = jnp.asarray(zero_point)
    if x.size == 0:
        return x, running_min, running_max, scale, zero_point
    obs_on = flag_is_on(observer_on)
    fq_on = flag_is_on(fake_quant_on)
    xs = jax.lax.stop_gradient(nm.f32(x))
    if per_row_fake_quant:
        if ch_axis != 0 and not _any_axis:
            raise ValueError(f"ch_axis={ch_axis}: per-channel fused fake quant is only "
                             f"supported on axis 0 (as in torch)")
        ch_axis = int(ch_axis) % x.ndim
        c = x.shape[ch_axis]
        if running_min.size == 0:
            running_min = jnp.full((c,), jnp.inf, jnp.float32)
            running_max = jnp.full((c,), -jnp.inf, jnp.float32)
            scale = jnp.broadcast_to(scale.reshape(-1)[:1], (c,)) if scale.size else jnp.ones((c,), jnp.float32)
            zero_point = (jnp.broadcast_to(zero_point.reshape(-1)[:1], (c,)) if zero_point.size
                          else jnp.zeros((c,), jnp.int32))
        bmin, bmax = nm.aminmax(xs, axis=tuple(i for i in range(x.ndim) if i != ch_axis))
    else:
        bmin, bmax = nm.aminmax(xs)
    if obs_on is not False:
        bmin = collectives.all_min(bmin, axis_name)
        bmax = collectives.all_max(bmax, axis_name)
        new_min = jnp.where(jnp.isinf(running_min), bmin, moving_average(running_min, bmin, averaging_const))
        new_max = jnp.where(jnp.isinf(running_max), bmax, moving_average(running_max, bmax, averaging_const))
        running_min = _select(obs_on, new_min, running_min)
        running_max = _select(obs_on, new_max, running_max)

    if fq_on is False:
        return x, running_min, running_max, scale, zero_point
    new_scale, new_zp = choose_quantization_params(running_min, running_max, qmin, qmax,
                                                   symmetric_quant)
    new_scale = new_scale.reshape(scale.shape) if not per_row_fake_quant else new_scale
    new_zp = new_zp.astype(zero_point.dtype).reshape(zero_point.shape) if not per_row_fake_quant \
        else new_zp.astype(zero_point.dtype)
    zp_op = new_zp.astype(jnp.int32) if per_row_fake_quant else new_zp
    y = fake_quantize_if(x, new_scale, zp_op, fq_on, qmin, qmax,
                         axis=ch_axis if per_row_fake_quant else None)
    if fq_on is True:
        return y, running_min, running_max, new_scale, new_zp
    return (y, running_min, running_max, jnp.where(fq_on, new_scale, scale),
            jnp.where(fq_on, new_zp, zero_point))
