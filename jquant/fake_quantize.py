"""Fake-quantize modules: observer + fake quantization, pure and jittable.

Counterparts: ``torch.ao.quantization.FakeQuantize``, ``FusedMovingAvgObsFakeQuantize``,
``FixedQParamsFakeQuantize`` and ``_LearnableFakeQuantize``. Same protocol as observers::

    fq = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255)
    state = fq.init(x)          # flags, scale, zero_point, activation_post_process state
    y, state = fq(state, x)     # == fq.apply(state, x); observe -> qparams -> fake-quantize

Flags (``observer_enabled``, ``fake_quant_enabled``, ...) are shape-``(1,)`` integer arrays
as torch's buffers are; they are read at run time, so toggling them never retraces. When a
flag is traced, both paths are computed and selected (a select is fused for free; the
observer's reduction still runs). Concrete (eager) flags skip the disabled work.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jquant import _numerics as nm
from jquant._config import Config, Factory, register_state
from jquant._state_dict import StateDictError, check_keys, sub_dict, to_numpy, with_metadata
from jquant.fake_quant_ops import (fake_quantize_if, fake_quantize_learnable_per_channel_affine,
                                   fake_quantize_learnable_per_tensor_affine)
from jquant.fused import fused_moving_avg_obs_fake_quant
from jquant.observers import (FixedQParamsObserver, MovingAverageMinMaxObserver,
                              MovingAveragePerChannelMinMaxObserver, ObserverBase)
from jquant import collectives
from jquant.types import QScheme, as_float, as_int, canonical_dtype, quint8, torch_iinfo

__all__ = [
    "FakeQuantizeBase", "FakeQuantize", "FusedMovingAvgObsFakeQuantize",
    "FixedQParamsFakeQuantize", "LearnableFakeQuantize", "FakeQuantizeState",
    "LearnableFakeQuantizeState",
]


@register_state
class FakeQuantizeState(NamedTuple):
    """State of :class:`FakeQuantize` and its subclasses (torch's buffer names and order).

    ``fake_quant_enabled``/``observer_enabled``: ``(1,)`` uint8 (int32 for the fused
    module, whose torch buffers are int64). ``scale``: float32 ``(1,)`` or ``(C,)``.
    ``zero_point``: int32 (float32 for ``per_channel_affine_float_qparams``), same shape.
    ``activation_post_process``: the observer's state.
    """
    fake_quant_enabled: jax.Array
    observer_enabled: jax.Array
    scale: jax.Array
    zero_point: jax.Array
    activation_post_process: Any


@register_state
class LearnableFakeQuantizeState(NamedTuple):
    """State of :class:`LearnableFakeQuantize` (torch's parameter and buffer names).

    ``scale``/``zero_point`` are the trainable float32 parameters, ``(1,)`` or ``(C,)``;
    the flags are ``(1,)`` uint8; ``eps`` float32 ``(1,)``.
    """
    scale: jax.Array
    zero_point: jax.Array
    fake_quant_enabled: jax.Array
    observer_enabled: jax.Array
    static_enabled: jax.Array
    learning_enabled: jax.Array
    eps: jax.Array
    activation_post_process: Any


def _flag(value: bool, dtype=jnp.uint8):
    return jnp.full((1,), int(bool(value)), dtype)


def _read_flag(flag):
    """A Python bool for concrete flags (eager), a traced bool otherwise."""
    flag = jnp.asarray(flag)
    on = jnp.reshape(flag, (-1,))[0] != 0
    if nm.is_concrete(on):
        return bool(on)
    return on


def _select(pred, new, old):
    if isinstance(pred, bool):
        return new if pred else old
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


@functools.partial(jax.custom_vjp)
def _value_with_grad_to(param, value):
    """Forward ``value``; backward sends the cotangent to ``param`` (torch's ``.data`` write)."""
    return value


def _vwg_fwd(param, value):
    return value, None


def _vwg_bwd(_, g):
    return g, jnp.zeros_like(g)


_value_with_grad_to.defvjp(_vwg_fwd, _vwg_bwd)


def _check_fq_state(owner, state, state_type, method: str = "apply") -> None:
    """``ValueError`` unless ``state`` looks like a ``state_type`` (e.g. ``None`` before ``init``)."""
    if not all(hasattr(state, f) for f in state_type._fields):
        raise ValueError(f"{owner}.{method}: state must be the {state_type.__name__} returned by "
                         f"init() (state = fq.init(x); y, state = fq(state, x)), got "
                         f"{type(state).__name__}")


def _sized_observer_state(app, app_state, x):
    """A never-run per-channel observer state from torch (empty ``(0,)`` buffers) sized for
    ``x`` (``+-inf``: still unobserved), so that a traced observer flag selects between
    states of one shape; any other state unchanged."""
    mn = getattr(app_state, "min_val", None)
    if mn is None or mn.shape != (0,) or not jnp.size(x) or not hasattr(app, "ch_axis"):
        return app_state
    return app.init(num_channels=x.shape[app.ch_axis])._replace(eps=app_state.eps)


def _build_observer(observer, kwargs):
    if isinstance(observer, ObserverBase):
        raise ValueError("observer must be an observer class or factory (e.g. "
                         "MinMaxObserver.with_args(...)), not an instance")
    if not callable(observer):
        raise ValueError(f"observer={observer!r} is not an observer class or factory")
    obs = observer(**kwargs)
    if not isinstance(obs, ObserverBase):
        raise ValueError(f"observer={observer!r} did not build an observer (got {type(obs).__name__})")
    return obs


def _observer_dtype(observer, observer_kwargs):
    if "dtype" in observer_kwargs:
        return canonical_dtype(observer_kwargs["dtype"])
    if isinstance(observer, Factory) and "dtype" in observer.keywords:
        return canonical_dtype(observer.keywords["dtype"])
    return canonical_dtype(quint8)


class FakeQuantizeBase(Config):
    """Protocol shared by fake-quantize modules; ``torch.ao.quantization.FakeQuantizeBase``."""

    activation_post_process: ObserverBase
    state_keys: tuple = ()

    def __init_subclass__(cls, **kwargs):
        if "init" in cls.__dict__:  # every subclass's init places its state like x
            cls.init = collectives.placed_init(cls.__dict__["init"])
        super().__init_subclass__(**kwargs)  # then Config's checks wrap it

    def init(self, x=None):
        """A fresh state (placed on a committed ``x``'s device / replicated on its mesh)."""
        raise NotImplementedError

    def apply(self, state, x, *, axis_name=None):
        """Returns ``(y, new_state)``."""
        raise NotImplementedError

    def __call__(self, state, x, *, axis_name=None):
        return self.apply(state, x, axis_name=axis_name)

    def calculate_qparams(self, state):
        """The observer's qparams (not the stored buffers), as in torch."""
        _check_fq_state(type(self).__name__, state, FakeQuantizeState, "calculate_qparams")
        return self.activation_post_process.calculate_qparams(state.activation_post_process)

    def enable_fake_quant(self, state, enabled: bool = True):
        return state._replace(fake_quant_enabled=jnp.full_like(state.fake_quant_enabled, int(enabled)))

    def disable_fake_quant(self, state):
        return self.enable_fake_quant(state, False)

    def enable_observer(self, state, enabled: bool = True):
        return state._replace(observer_enabled=jnp.full_like(state.observer_enabled, int(enabled)))

    def disable_observer(self, state):
        return self.enable_observer(state, False)

    def state_dict(self, state) -> dict:
        """``{name: np.ndarray}`` with torch's keys (observer keys under ``activation_post_process.``).

        An ``OrderedDict`` with torch's ``_metadata`` (module versions), loadable by torch's
        module exactly as its own state dict (the observer keeps its ``eps``).
        """
        out = {}
        for k, v in state._asdict().items():
            if k == "activation_post_process":
                for ok, ov in self.activation_post_process.state_dict(v).items():
                    out[f"activation_post_process.{ok}"] = ov
            else:
                out[k] = np.asarray(v, dtype=self._np_dtypes().get(k, None))
        return with_metadata(out, {"": {"version": 1}, "activation_post_process": {
            "version": getattr(self.activation_post_process, "_torch_version", 1)}})

    def _np_dtypes(self) -> dict:
        return {}

    def _observer_keys(self):
        return [f"activation_post_process.{k}" for k in self.activation_post_process.state_keys]


class FakeQuantize(FakeQuantizeBase):
    """Observer + fake quantization; ``torch.ao.quantization.FakeQuantize``.

    Args:
      observer: an observer class or ``with_args`` factory (default
        MovingAverageMinMaxObserver).
      quant_min, quant_max: when both are given they must lie in the dtype's range and are
        passed to the observer (which may halve them with ``reduce_range``).
      is_dynamic: passed to the observer.
      **observer_kwargs: more observer arguments (dtype, qscheme, ch_axis, ...).

    ``apply(state, x)``: if ``observer_enabled``, the observer sees ``x`` (no gradient) and
    ``scale``/``zero_point`` take its fresh qparams; then, if ``fake_quant_enabled``, ``x``
    is fake-quantized per tensor or per channel (``ch_axis``). Attributes ``quant_min``,
    ``quant_max``, ``dtype``, ``qscheme``, ``ch_axis`` (-1 per-tensor), ``is_per_channel``
    mirror torch's. A per-channel state is sized by ``init(x)``.
    """

    def __init__(self, observer=MovingAverageMinMaxObserver, quant_min=None, quant_max=None,
                 is_dynamic=False, **observer_kwargs):
        self._record(locals())
        self._setup(observer, quant_min, quant_max, is_dynamic, observer_kwargs)

    def _setup(self, observer, quant_min, quant_max, is_dynamic, observer_kwargs):
        observer_kwargs = dict(observer_kwargs)
        if quant_min is not None and quant_max is not None:
            quant_min, quant_max = as_int(quant_min, "quant_min"), as_int(quant_max, "quant_max")
            if quant_min > quant_max:
                raise ValueError(f"quant_min={quant_min} must be <= quant_max={quant_max}")
            dtype = _observer_dtype(observer, observer_kwargs)
            lo, hi, _ = torch_iinfo(dtype)
            if quant_min < lo:
                raise ValueError(f"quant_min={quant_min} out of bound for dtype={dtype.name} ([{lo}, {hi}])")
            if quant_max > hi:
                raise ValueError(f"quant_max={quant_max} out of bound for dtype={dtype.name} ([{lo}, {hi}])")
            observer_kwargs.update(quant_min=quant_min, quant_max=quant_max)
        observer_kwargs["is_dynamic"] = bool(is_dynamic)
        app = _build_observer(observer, observer_kwargs)
        qscheme = getattr(app, "qscheme", QScheme.PER_TENSOR_AFFINE)
        self._set(activation_post_process=app, quant_min=getattr(app, "quant_min", None),
                  quant_max=getattr(app, "quant_max", None), dtype=app.dtype, qscheme=qscheme,
                  ch_axis=getattr(app, "ch_axis", -1), is_per_channel=qscheme.is_per_channel,
                  is_dynamic=bool(is_dynamic))
        if self.quant_min is None or self.quant_max is None:
            raise ValueError(f"observer {app!r} has no quantization range; FakeQuantize needs a "
                             f"quantizing observer")

    @property
    def state_keys(self):
        return ("fake_quant_enabled", "observer_enabled", "scale", "zero_point",
                *self._observer_keys())

    def _zp_dtype(self):
        return jnp.float32 if self.qscheme == QScheme.PER_CHANNEL_AFFINE_FLOAT_QPARAMS else jnp.int32

    def _flag_dtype(self):
        return jnp.uint8

    def _np_dtypes(self):
        return {"fake_quant_enabled": np.uint8, "observer_enabled": np.uint8}

    def init(self, x=None) -> FakeQuantizeState:
        app_state = self.activation_post_process.init(x)
        c = app_state.min_val.shape[0] if self.is_per_channel else 1
        return FakeQuantizeState(_flag(1, self._flag_dtype()), _flag(1, self._flag_dtype()),
                                 jnp.ones((c,), jnp.float32), jnp.zeros((c,), self._zp_dtype()),
                                 app_state)

    def _observe(self, state, x, axis_name):
        obs_on = _read_flag(state.observer_enabled)
        if obs_on is False:
            return state
        app = self.activation_post_process
        app_state = _sized_observer_state(app, state.activation_post_process, x)
        state = state._replace(activation_post_process=app_state)
        new_app = app.update(app_state, x, axis_name=axis_name)
        s, z = app.calculate_qparams(new_app)
        new = state._replace(activation_post_process=new_app, scale=s.astype(jnp.float32),
                             zero_point=z.astype(self._zp_dtype()))
        if obs_on is True:
            return new
        if new.scale.shape != state.scale.shape:  # e.g. a (1,) state loaded for (C,) qparams
            state = state._replace(scale=jnp.broadcast_to(state.scale, new.scale.shape),
                                   zero_point=jnp.broadcast_to(state.zero_point, new.zero_point.shape))
        return _select(obs_on, new, state)

    def apply(self, state: FakeQuantizeState, x, *, axis_name=None):
        _check_fq_state(type(self).__name__, state, FakeQuantizeState)
        x = jnp.asarray(x)
        state = self._observe(state, x, axis_name)
        fq_on = _read_flag(state.fake_quant_enabled)
        if fq_on is False or x.size == 0:
            return x, state
        axis = self.ch_axis if self.is_per_channel else None
        return fake_quantize_if(x, state.scale, state.zero_point, fq_on, self.quant_min,
                                self.quant_max, axis=axis), state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True):
        """A state from jquant's or torch's state dict; scale/zero_point of any length load
        (torch resizes them)."""
        owner = type(self).__name__
        check_keys(state_dict, self.state_keys, owner, strict=strict)
        app_state = self.activation_post_process.load_state_dict(
            sub_dict(state_dict, "activation_post_process."), strict=strict)
        arrays = {k: to_numpy(state_dict[k]) for k in self.state_keys
                  if not k.startswith("activation_post_process.")}
        return self._state_from_arrays(arrays, app_state, owner)

    def _state_from_arrays(self, arrays, app_state, owner):
        scale = np.asarray(arrays["scale"], np.float32).reshape(-1)
        zp = np.asarray(arrays["zero_point"]).reshape(-1)
        if scale.shape != zp.shape or scale.size == 0:
            raise StateDictError(f"Error loading state dict into {owner}: scale {scale.shape} and "
                                 f"zero_point {zp.shape} must be non-empty vectors of equal length")
        flags = []
        for k in ("fake_quant_enabled", "observer_enabled"):
            f = np.asarray(arrays[k]).reshape(-1)
            if f.shape != (1,):
                raise StateDictError(f"Error loading state dict into {owner}: {k} has shape "
                                     f"{f.shape}, expected (1,)")
            flags.append(jnp.asarray(f.astype(np.int64), self._flag_dtype()))
        return FakeQuantizeState(flags[0], flags[1], jnp.asarray(scale),
                                 jnp.asarray(zp.astype(np.dtype(self._zp_dtype()))), app_state)


class FusedMovingAvgObsFakeQuantize(FakeQuantize):
    """FakeQuantize backed by :func:`jquant.fused_moving_avg_obs_fake_quant`.

    ``torch.ao.quantization.FusedMovingAvgObsFakeQuantize``. The observer must be a
    MovingAverageMinMaxObserver or MovingAveragePerChannelMinMaxObserver (per-channel on
    ``ch_axis=0``); ``quant_min``/``quant_max`` default to 0/255. The stored scale and zero
    point follow fbgemm's rule (the fused op), while :meth:`calculate_qparams` returns the
    observer's rule, exactly as torch does. Flags are int32 arrays (torch: int64); the
    state dict writes them as int64.
    """

    def __init__(self, observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                 **observer_kwargs):
        self._record(locals())
        self._setup(observer, quant_min, quant_max, observer_kwargs.pop("is_dynamic", False),
                    observer_kwargs)
        app = self.activation_post_process
        if not isinstance(app, (MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver)):
            raise ValueError(f"observer: FusedMovingAvgObsFakeQuantize needs a moving-average "
                             f"min/max observer, got {type(app).__name__}")
        if self.is_per_channel and self.ch_axis != 0:
            raise ValueError(f"ch_axis={self.ch_axis}: the fused per-channel op only supports axis 0")
        self._set(is_symmetric_quant=self.qscheme.is_symmetric)

    def _flag_dtype(self):
        return jnp.int32

    def _np_dtypes(self):
        return {"fake_quant_enabled": np.int64, "observer_enabled": np.int64}

    def apply(self, state: FakeQuantizeState, x, *, axis_name=None):
        return self._apply_along(state, x, self.ch_axis, axis_name=axis_name)

    def _apply_along(self, state: FakeQuantizeState, x, ch_axis: int, *, axis_name=None):
        """``apply`` with the channels of a per-channel config along ``ch_axis`` of ``x``.

        Internal, for the Flax front ends: a kernel whose output channels are last is
        quantized in place, as torch quantizes the same weight with them first (no
        transposes). ``apply`` is ``_apply_along(state, x, self.ch_axis)``.
        """
        _check_fq_state(type(self).__name__, state, FakeQuantizeState)
        app = self.activation_post_process
        x = jnp.asarray(x)
        app_state = state.activation_post_process
        app._check_state(app_state, "apply")
        if self.is_per_channel:
            ch_axis = int(ch_axis) % max(x.ndim, 1)
        if self.is_per_channel and app_state.min_val.shape == (0,):
            app_state = app.init(num_channels=x.shape[ch_axis])._replace(eps=app_state.eps)
        if self.is_per_channel and x.size and app_state.min_val.shape != (x.shape[ch_axis],):
            raise ValueError(f"{type(self).__name__}: input has {x.shape[ch_axis]} channels along "
                             f"ch_axis={ch_axis} but the state has {app_state.min_val.shape[0]}")
        y, rmin, rmax, scale, zp = fused_moving_avg_obs_fake_quant(
            x, _read_flag(state.observer_enabled), _read_flag(state.fake_quant_enabled),
            app_state.min_val, app_state.max_val, state.scale, state.zero_point,
            app.averaging_constant, self.quant_min, self.quant_max,
            ch_axis if self.is_per_channel else -1, self.is_per_channel,
            self.is_symmetric_quant, axis_name=axis_name, _any_axis=True)
        new_app = app_state._replace(min_val=rmin, max_val=rmax)
        return y, state._replace(scale=scale, zero_point=zp.astype(jnp.int32),
                                 activation_post_process=new_app)


class FixedQParamsFakeQuantize(FakeQuantize):
    """Fake quantization with fixed qparams (sigmoid, tanh, ...); ``torch.ao.quantization.FixedQParamsFakeQuantize``.

    ``observer`` must build a :class:`FixedQParamsObserver`. The state dict lists the qparams
    twice (``scale`` and ``activation_post_process.scale``), as torch's does.
    """

    def __init__(self, observer):
        self._record(locals())
        self._setup(observer, None, None, False, {})
        if not isinstance(self.activation_post_process, FixedQParamsObserver):
            raise ValueError(f"observer: {type(self).__name__} needs a FixedQParamsObserver, got "
                             f"{type(self.activation_post_process).__name__}")
        if self.qscheme.is_per_channel:
            raise ValueError(f"qscheme={self.qscheme.value}: only per-tensor schemes are supported")

    def init(self, x=None) -> FakeQuantizeState:
        app_state = self.activation_post_process.init()
        return FakeQuantizeState(_flag(1), _flag(1), app_state.scale, app_state.zero_point, app_state)


class LearnableFakeQuantize(FakeQuantizeBase):
    """LSQ fake quantization with trainable scale and zero point; torch's ``_LearnableFakeQuantize``.

    Args:
      observer: observer class/factory used while static estimation is on.
      quant_min, quant_max: the integer range (passed to the observer; must fit its dtype).
      scale, zero_point: initial values of the trainable parameters.
      channel_len: number of channels for per-channel schemes (``-1``: per-tensor, or sized
        by ``init(x)`` when the observer is per-channel).
      use_grad_scaling: multiply the qparam gradients by ``1/sqrt(x.size * quant_max)``
        (``x.size`` of the global batch when ``apply`` gets an ``axis_name``).

    ``apply(state, x)`` mirrors torch's forward: with ``static_enabled`` the observer sees
    ``x`` and its qparams overwrite scale/zero point (torch writes ``.data``); otherwise
    the scale is clamped to ``eps``. Then, with ``fake_quant_enabled``, the learnable op
    runs (symmetric schemes zero the zero point). Gradients flow to ``state.scale`` and
    ``state.zero_point`` (taken at their overwritten values) only while
    ``learning_enabled``; the returned state carries the overwritten values. Toggles:
    :meth:`enable_param_learning`, :meth:`enable_static_estimate`,
    :meth:`enable_static_observation`.
    """

    state_keys_own = ("scale", "zero_point", "fake_quant_enabled", "observer_enabled",
                      "static_enabled", "learning_enabled", "eps")

    def __init__(self, observer, quant_min=0, quant_max=255, scale=1.0, zero_point=0.0,
                 channel_len=-1, use_grad_scaling=False, **observer_kwargs):
        self._record(locals())
        quant_min, quant_max = as_int(quant_min, "quant_min"), as_int(quant_max, "quant_max")
        if not quant_min < quant_max:
            raise ValueError(f"quant_min={quant_min} must be less than quant_max={quant_max}")
        channel_len = as_int(channel_len, "channel_len")
        if channel_len != -1 and channel_len <= 0:
            raise ValueError(f"channel_len={channel_len} must be a positive int (or -1)")
        scale, zero_point = as_float(scale, "scale"), as_float(zero_point, "zero_point")
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale={scale} must be a positive finite float")
        if not math.isfinite(zero_point):
            raise ValueError(f"zero_point={zero_point} must be finite")
        observer_kwargs = dict(observer_kwargs, quant_min=quant_min, quant_max=quant_max)
        app = _build_observer(observer, observer_kwargs)
        lo, hi, _ = torch_iinfo(app.dtype)
        if quant_min < lo:
            raise ValueError(f"quant_min={quant_min} out of bound for dtype={app.dtype.name}")
        if quant_max > hi:
            raise ValueError(f"quant_max={quant_max} out of bound for dtype={app.dtype.name}")
        qscheme = getattr(app, "qscheme", QScheme.PER_TENSOR_AFFINE)
        self._set(activation_post_process=app, quant_min=quant_min, quant_max=quant_max,
                  init_scale=float(scale), init_zero_point=float(zero_point),
                  channel_len=channel_len, use_grad_scaling=bool(use_grad_scaling),
                  dtype=app.dtype, qscheme=qscheme, ch_axis=getattr(app, "ch_axis", -1),
                  is_per_channel=qscheme in (QScheme.PER_CHANNEL_AFFINE, QScheme.PER_CHANNEL_SYMMETRIC),
                  bitwidth=int(math.log2(quant_max - quant_min + 1)), eps=float(np.finfo(np.float32).eps))

    @property
    def state_keys(self):
        return (*self.state_keys_own, *self._observer_keys())

    def _np_dtypes(self):
        return {k: np.uint8 for k in ("fake_quant_enabled", "observer_enabled",
                                      "static_enabled", "learning_enabled")}

    def init(self, x=None) -> LearnableFakeQuantizeState:
        app_state = self.activation_post_process.init(x)
        c = self.channel_len
        if c == -1 and getattr(app_state, "min_val", None) is not None and app_state.min_val.ndim == 1:
            c = app_state.min_val.shape[0]
        n = 1 if c == -1 else c
        return LearnableFakeQuantizeState(
            jnp.full((n,), self.init_scale, jnp.float32), jnp.full((n,), self.init_zero_point, jnp.float32),
            _flag(1), _flag(1), _flag(1), _flag(0), jnp.full((1,), self.eps, jnp.float32), app_state)

    def enable_param_learning(self, state):
        """Learn scale/zero point: learning on, fake quant on, static estimate off."""
        return state._replace(learning_enabled=_flag(1), fake_quant_enabled=_flag(1), static_enabled=_flag(0))

    def enable_static_estimate(self, state):
        """Observer-driven qparams: learning off, fake quant on, static estimate on."""
        return state._replace(learning_enabled=_flag(0), fake_quant_enabled=_flag(1), static_enabled=_flag(1))

    def enable_static_observation(self, state):
        """Observe only: learning off, fake quant off, static estimate on."""
        return state._replace(learning_enabled=_flag(0), fake_quant_enabled=_flag(0), static_enabled=_flag(1))

    def enable_observer(self, state, enabled: bool = True):
        """torch's ``toggle_observer_update``: sets ``static_enabled``."""
        return state._replace(static_enabled=_flag(enabled))

    def calculate_qparams(self, state):
        """``(max(scale, eps), int32(clamp(round(zero_point))))``, as torch.

        A NaN zero point gives ``INT32_MIN`` (torch: ``INT64_MIN``, x86's NaN cast).
        """
        _check_fq_state(type(self).__name__, state, LearnableFakeQuantizeState, "calculate_qparams")
        scale = jnp.maximum(state.scale, state.eps)
        zp = nm.x86_f32_to_int32(jnp.clip(nm.rne(state.zero_point), self.quant_min, self.quant_max))
        return scale, zp

    def apply(self, state: LearnableFakeQuantizeState, x, *, axis_name=None):
        _check_fq_state(type(self).__name__, state, LearnableFakeQuantizeState)
        x = jnp.asarray(x)
        app = self.activation_post_process
        static_on = _read_flag(state.static_enabled)
        fq_on = _read_flag(state.fake_quant_enabled)
        learn_on = _read_flag(state.learning_enabled)
        clamped = jnp.maximum(state.scale, state.eps)
        app_state = state.activation_post_process
        if static_on is not False:
            app_state = _sized_observer_state(app, app_state, x)
        scale_val, zp_val = clamped, state.zero_point
        if static_on is not False and x.size:
            new_app = app.update(app_state, x, axis_name=axis_name)
            s, z = app.calculate_qparams(new_app)
            s = jnp.broadcast_to(s.astype(jnp.float32), state.scale.shape)
            z = jnp.broadcast_to(z.astype(jnp.float32), state.zero_point.shape)
            scale_val = _select(static_on, s, clamped)
            zp_val = _select(static_on, z, state.zero_point)
            app_state = _select(static_on, new_app, app_state)
        if self.qscheme.is_symmetric and fq_on is not False:
            zp_val = _select(fq_on, jnp.zeros_like(zp_val), zp_val)
        new_state = state._replace(scale=jax.lax.stop_gradient(scale_val),
                                   zero_point=jax.lax.stop_gradient(zp_val),
                                   activation_post_process=app_state)
        if fq_on is False or x.size == 0:
            return x, new_state
        scale_used = _value_with_grad_to(state.scale, jax.lax.stop_gradient(scale_val))
        zp_used = _value_with_grad_to(state.zero_point, jax.lax.stop_gradient(zp_val))
        if learn_on is False:
            scale_used, zp_used = jax.lax.stop_gradient(scale_used), jax.lax.stop_gradient(zp_used)
        elif learn_on is not True:
            scale_used = jnp.where(learn_on, scale_used, jax.lax.stop_gradient(scale_used))
            zp_used = jnp.where(learn_on, zp_used, jax.lax.stop_gradient(zp_used))
        # With axis_name, x is one shard: scale by the global batch's size, so summing the
        # devices' gradients gives the single-device gradient.
        numel = x.size * collectives.axis_size(axis_name)
        grad_factor = 1.0 / math.sqrt(numel * self.quant_max) if self.use_grad_scaling else 1.0
        if self.is_per_channel:
            y = fake_quantize_learnable_per_channel_affine(x, scale_used, zp_used, self.ch_axis,
                                                           self.quant_min, self.quant_max, grad_factor)
        else:
            y = fake_quantize_learnable_per_tensor_affine(x, scale_used, zp_used, self.quant_min,
                                                          self.quant_max, grad_factor)
        if fq_on is not True:
            y = nm.select_flag(fq_on, y, x)  # exact -0.0 gradients
        return y, new_state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True):
        owner = type(self).__name__
        check_keys(state_dict, self.state_keys, owner, strict=strict)
        app_state = self.activation_post_process.load_state_dict(
            sub_dict(state_dict, "activation_post_process."), strict=strict)
        a = {k: to_numpy(state_dict[k]).reshape(-1) for k in self.state_keys_own}
        if a["scale"].shape != a["zero_point"].shape:
            raise StateDictError(f"Error loading state dict into {owner}: scale {a['scale'].shape} "
                                 f"and zero_point {a['zero_point'].shape} differ in shape")
        for k in ("fake_quant_enabled", "observer_enabled", "static_enabled", "learning_enabled", "eps"):
            if a[k].shape != (1,):
                raise StateDictError(f"Error loading state dict into {owner}: {k} has shape "
                                     f"{a[k].shape}, expected (1,)")
        flags = [jnp.asarray(a[k].astype(np.int64), jnp.uint8)
                 for k in ("fake_quant_enabled", "observer_enabled", "static_enabled", "learning_enabled")]
        return LearnableFakeQuantizeState(jnp.asarray(a["scale"], jnp.float32),
                                          jnp.asarray(a["zero_point"], jnp.float32), *flags,
                                          jnp.asarray(a["eps"], jnp.float32), app_state)
