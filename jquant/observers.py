"""Observers: pure configs whose state is a pytree (``init`` / ``update`` / ``calculate_qparams``).

Counterparts: ``torch.ao.quantization.observer`` — MinMaxObserver,
MovingAverageMinMaxObserver, PerChannelMinMaxObserver, MovingAveragePerChannelMinMaxObserver,
FixedQParamsObserver, PlaceholderObserver, NoopObserver, RecordingObserver
(HistogramObserver lives in :mod:`jquant.histogram`).

Where torch mutates buffers in ``forward``, an observer here is a frozen, hashable config::

    obs = MinMaxObserver(dtype=jnp.int8, qscheme=per_tensor_symmetric)
    state = obs.init(x)                 # NamedTuple of arrays named like torch's buffers
    state = obs.update(state, x)        # pure; jittable; shapes and dtypes never change
    scale, zero_point = obs.calculate_qparams(state)
    sd = obs.state_dict(state)          # {name: np.ndarray} with torch's keys
    state = obs.load_state_dict(sd)     # accepts torch's own state_dict

``obs(state, x)`` / ``obs.apply(state, x)`` return ``(x, new_state)`` (torch's forward
returns its input unchanged), the protocol fake-quantize modules share.

Deviations from torch (each tested in ``tests/test_bad_input.py``):

* Subnormal inputs: XLA on CPU flushes float32 subnormals to zero, so an input such as
  ``4.58e-41`` is observed as ``0.0`` (torch stores it in ``max_val``). The qparams agree
  (the scale is clamped to ``eps`` either way).
* Per-channel states are ``(C,)`` of ``+inf``/``-inf`` until observed (static shapes), where
  torch starts from empty buffers; unobserved channels give ``(1.0, 0)`` instead of an error.
* ``min_val > max_val`` raises ``ValueError`` only for concrete states (not under ``jit``).
* ``dtype=jnp.uint8`` is torch's ``quint8``: symmetric + ``reduce_range`` is rejected for it
  (torch rejects it for quint8 but not for ``torch.uint8``).
* Stricter validation: ``eps`` must be positive and finite, ``averaging_constant`` in
  ``(0, 1]``, integer arguments integral (torch accepts these silently).
* ``load_state_dict`` always loads the given ``eps``; torch replaces it with the default
  when the state dict carries no version metadata.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jquant import _numerics as nm
from jquant import collectives
from jquant._config import Config, register_state
from jquant._state_dict import StateDictError, check_keys, expect_shape, to_numpy, with_metadata
from jquant.fused import moving_average
from jquant.qparams import calculate_qparams as _qparams_rule
from jquant.types import (QScheme, as_float, as_int, canonical_dtype, canonical_qscheme,
                          calculate_qmin_qmax, check_observer_dtype, quint8, validate_qrange)

__all__ = [
    "ObserverBase", "UniformQuantizationObserverBase", "MinMaxState", "FixedQParamsState",
    "RecordingState", "EmptyState",
    "MinMaxObserver", "MovingAverageMinMaxObserver", "PerChannelMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver", "FixedQParamsObserver", "PlaceholderObserver",
    "NoopObserver", "RecordingObserver", "DEFAULT_EPS",
]

DEFAULT_EPS = float(np.finfo(np.float32).eps)  # 2**-23, torch's default observer eps


@register_state
class MinMaxState(NamedTuple):
    """State of the min/max observers (torch buffers ``eps, min_val, max_val``).

    ``eps``: float32 ``(1,)``. ``min_val``/``max_val``: float32 ``()`` per-tensor (``+inf`` /
    ``-inf`` until the first batch) or ``(C,)`` per-channel.
    """
    eps: jax.Array
    min_val: jax.Array
    max_val: jax.Array


@register_state
class FixedQParamsState(NamedTuple):
    """State of :class:`FixedQParamsObserver`: ``scale`` float32 ``(1,)``, ``zero_point`` int32 ``(1,)``."""
    scale: jax.Array
    zero_point: jax.Array


@register_state
class RecordingState(NamedTuple):
    """State of :class:`RecordingObserver`: ``values`` ``(capacity, *shape)``, ``count`` int32 ``()``."""
    values: jax.Array
    count: jax.Array


@register_state
class EmptyState(NamedTuple):
    """State of observers that keep none (placeholder / noop)."""


def _as_float32(x):
    return jax.lax.stop_gradient(nm.f32(jnp.asarray(x)))


class ObserverBase(Config):
    """Protocol shared by every observer; ``torch.ao.quantization.ObserverBase``."""

    dtype: np.dtype
    is_dynamic: bool = False
    #: torch's state_dict keys, in order.
    state_keys: tuple = ()
    #: NamedTuple class of the state (its fields are checked by ``_check_state``).
    _state_type: Any = None
    #: rank of ``state.min_val`` (0 per-tensor, 1 per-channel) where it matters.
    _state_ndim: Any = None

    def _check_state(self, state, method: str = "update") -> None:
        """``ValueError`` unless ``state`` looks like one from :meth:`init` (e.g. ``None``)."""
        t = self._state_type
        if t is None:
            return
        owner = f"{type(self).__name__}.{method}"
        if not all(hasattr(state, f) for f in t._fields):
            raise ValueError(f"{owner}: state must be the {t.__name__} returned by init() (fields "
                             f"{', '.join(t._fields)}), got {type(state).__name__}")
        if self._state_ndim is not None and jnp.ndim(state.min_val) != self._state_ndim:
            kind = "per-channel (C,)" if self._state_ndim == 1 else "per-tensor ()"
            raise ValueError(f"{owner}: state.min_val has shape {jnp.shape(state.min_val)}, but "
                             f"this observer keeps a {kind} state (was it made by another observer?)")

    def __init_subclass__(cls, **kwargs):
        if "init" in cls.__dict__:  # every subclass's init places its state like x
            cls.init = collectives.placed_init(cls.__dict__["init"])
        super().__init_subclass__(**kwargs)  # then Config's checks wrap it

    def init(self, x=None):
        """A fresh state. ``x``: an array or ``jax.ShapeDtypeStruct`` (needed for per-channel).

        The state lives where a committed ``x`` lives (its device, or replicated on its
        mesh); ``update`` keeps it there.
        """
        raise NotImplementedError

    def update(self, state, x, *, axis_name=None):
        """Observes ``x``; returns the new state (pure, jittable)."""
        raise NotImplementedError

    def apply(self, state, x, *, axis_name=None):
        """torch's ``forward``: returns ``(x, update(state, x))`` — ``x`` untouched."""
        return x, self.update(state, x, axis_name=axis_name)

    def __call__(self, state, x, *, axis_name=None):
        return self.apply(state, x, axis_name=axis_name)

    def calculate_qparams(self, state):
        """``(scale, zero_point)`` for the observed range."""
        raise NotImplementedError(f"calculate_qparams should not be called for {type(self).__name__}")

    #: the ``_version`` of torch's module (written into the state dict's ``_metadata``).
    _torch_version: int = 1

    def state_dict(self, state) -> dict:
        """``{name: np.ndarray}`` with torch's buffer names, loadable by torch's module.

        An ``OrderedDict`` with torch's ``_metadata`` (module version), so that torch keeps
        its ``eps`` when loading it.
        """
        return with_metadata({k: np.asarray(v) for k, v in state._asdict().items()},
                             {"": {"version": self._torch_version}})

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True):
        """A state from a state dict (jquant's or torch's; tensors or arrays)."""
        check_keys(state_dict, self.state_keys, type(self).__name__, strict=strict)
        return self._state_from_arrays({k: to_numpy(state_dict[k]) for k in self.state_keys})

    def _state_from_arrays(self, arrays: dict):
        raise NotImplementedError

    def reset_min_max_vals(self, state):
        """A state with the observed statistics cleared (shape kept)."""
        return self.init(jax.ShapeDtypeStruct((0,), jnp.float32))


class UniformQuantizationObserverBase(ObserverBase):
    """Validation and the qparams rule shared by the uniform observers.

    ``torch.ao.quantization.observer.UniformQuantizationObserverBase``. Invalid arguments
    raise ``ValueError`` naming the argument (torch raises AssertionError /
    NotImplementedError). ``quant_min``/``quant_max`` hold the effective range after
    ``reduce_range``; ``has_customized_qrange`` is true only when both bounds were given.
    """

    _allowed_qschemes: tuple = (QScheme.PER_TENSOR_AFFINE, QScheme.PER_TENSOR_SYMMETRIC)
    _accepts_dynamic = True
    _torch_version = 3

    def _setup(self, dtype, qscheme, reduce_range, quant_min, quant_max, eps, is_dynamic):
        dtype = check_observer_dtype(dtype)
        qscheme = canonical_qscheme(qscheme)
        if qscheme not in self._allowed_qschemes:
            raise ValueError(f"qscheme={qscheme.value} is not supported by {type(self).__name__}; "
                             f"expected one of {[q.value for q in self._allowed_qschemes]}")
        if is_dynamic and not self._accepts_dynamic:
            raise ValueError(f"is_dynamic=True is not supported by {type(self).__name__}")
        eps = as_float(eps, "eps")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps={eps} must be a positive finite float")
        custom = validate_qrange(quant_min, quant_max, dtype)
        if custom:
            quant_min, quant_max = as_int(quant_min, "quant_min"), as_int(quant_max, "quant_max")
        qmin, qmax = calculate_qmin_qmax(quant_min, quant_max, custom, dtype, bool(reduce_range))
        self._set(dtype=dtype, qscheme=qscheme, reduce_range=bool(reduce_range),
                  quant_min=qmin, quant_max=qmax, has_customized_qrange=custom, eps=eps,
                  is_dynamic=bool(is_dynamic))

    def _check_symmetric_reduce_range(self):
        if (self.qscheme.is_symmetric and self.reduce_range
                and self.dtype == np.dtype(quint8)):
            raise ValueError("reduce_range=True cannot be combined with a symmetric qscheme and "
                             "dtype=quint8 (torch raises NotImplementedError)")

    def _calculate_qparams(self, min_val, max_val, eps=None):
        return _qparams_rule(min_val, max_val, qscheme=self.qscheme, dtype=self.dtype,
                             quant_min=self.quant_min, quant_max=self.quant_max,
                             has_customized_qrange=self.has_customized_qrange,
                             eps=self.eps if eps is None else eps)

    def _eps_array(self):
        return jnp.full((1,), self.eps, jnp.float32)


# ----------------------------------------------------------------------------------------
# Per-tensor min/max
# ----------------------------------------------------------------------------------------

class MinMaxObserver(UniformQuantizationObserverBase):
    """Running min/max over every batch; ``torch.ao.quantization.MinMaxObserver``.

    State :class:`MinMaxState` with 0-d ``min_val``/``max_val``. ``update`` casts ``x`` to
    float32 and takes ``min(batch_min, min_val)`` / ``max(batch_max, max_val)`` (NaN sticks,
    as in torch); an empty ``x`` leaves the state unchanged. With ``axis_name`` the batch
    min/max are reduced over the mesh axis first.
    """

    state_keys = ("eps", "min_val", "max_val")
    _state_type = MinMaxState
    _state_ndim = 0

    def __init__(self, dtype=quint8, qscheme=QScheme.PER_TENSOR_AFFINE, reduce_range=False,
                 quant_min=None, quant_max=None, eps=DEFAULT_EPS, is_dynamic=False):
        self._record(locals())
        self._setup(dtype, qscheme, reduce_range, quant_min, quant_max, eps, is_dynamic)
        self._check_symmetric_reduce_range()

    def init(self, x=None) -> MinMaxState:
        return MinMaxState(self._eps_array(), jnp.array(jnp.inf, jnp.float32),
                           jnp.array(-jnp.inf, jnp.float32))

    def _batch_min_max(self, x, axis_name):
        xf = _as_float32(x)
        bmin, bmax = nm.aminmax(xf)
        return collectives.all_min(bmin, axis_name), collectives.all_max(bmax, axis_name)

    def update(self, state: MinMaxState, x, *, axis_name=None) -> MinMaxState:
        self._check_state(state)
        x = jnp.asarray(x)
        if x.size == 0:
            return state
        bmin, bmax = self._batch_min_max(x, axis_name)
        return self._combine(state, bmin, bmax)

    def _combine(self, state, bmin, bmax):
        return state._replace(min_val=jnp.minimum(bmin, state.min_val),
                              max_val=jnp.maximum(bmax, state.max_val))

    def calculate_qparams(self, state: MinMaxState):
        """``(scale float32 (1,), zero_point int32 (1,))`` by torch's observer rule."""
        self._check_state(state, "calculate_qparams")
        return self._calculate_qparams(state.min_val, state.max_val, state.eps)

    def reset_min_max_vals(self, state):
        return self.init()

    def _state_from_arrays(self, arrays):
        owner = type(self).__name__
        eps = expect_shape("eps", np.asarray(arrays["eps"], np.float32).reshape(-1), (1,), owner)
        mn = np.asarray(arrays["min_val"], np.float32)
        mx = np.asarray(arrays["max_val"], np.float32)
        if mn.shape == (0,) and mx.shape == (0,):  # torch < 3 stored uninitialised as empty
            mn, mx = np.float32(np.inf), np.float32(-np.inf)
        expect_shape("min_val", np.asarray(mn), (), owner)
        expect_shape("max_val", np.asarray(mx), (), owner)
        return MinMaxState(jnp.asarray(eps), jnp.asarray(mn), jnp.asarray(mx))


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of batch min/max; ``torch.ao.quantization.MovingAverageMinMaxObserver``.

    The first batch (state ``+inf``/``-inf``) is taken as is; later ones move by
    ``averaging_constant`` with torch's three separately rounded float32 ops (XLA's
    multiply-add contraction is prevented on CPU). ``is_dynamic=True`` requires
    ``averaging_constant == 1``.
    """

    def __init__(self, averaging_constant=0.01, dtype=quint8, qscheme=QScheme.PER_TENSOR_AFFINE,
                 reduce_range=False, quant_min=None, quant_max=None, eps=DEFAULT_EPS,
                 is_dynamic=False):
        self._record(locals())
        self._setup(dtype, qscheme, reduce_range, quant_min, quant_max, eps, is_dynamic)
        self._check_symmetric_reduce_range()
        c = as_float(averaging_constant, "averaging_constant")
        if not 0.0 < c <= 1.0:
            raise ValueError(f"averaging_constant={averaging_constant} must be in (0, 1]")
        if self.is_dynamic and c != 1.0:
            raise ValueError(f"averaging_constant={averaging_constant}: MovingAverageMinMaxObserver "
                             f"with is_dynamic=True requires averaging_constant=1")
        self._set(averaging_constant=c)

    def _combine(self, state, bmin, bmax):
        uninit = (state.min_val == jnp.inf) & (state.max_val == -jnp.inf)
        c = self.averaging_constant
        new_min = jnp.where(uninit, bmin, moving_average(state.min_val, bmin, c))
        new_max = jnp.where(uninit, bmax, moving_average(state.max_val, bmax, c))
        return state._replace(min_val=new_min, max_val=new_max)


# ----------------------------------------------------------------------------------------
# Per-channel min/max
# ----------------------------------------------------------------------------------------

class PerChannelMinMaxObserver(UniformQuantizationObserverBase):
    """Running min/max per channel along ``ch_axis``; ``torch.ao.quantization.PerChannelMinMaxObserver``.

    The channel count comes from ``init(x)`` (``x`` an array or ``jax.ShapeDtypeStruct``):
    ``min_val``/``max_val`` are float32 ``(C,)`` (``+inf``/``-inf`` until observed, where
    torch starts from empty buffers). Feeding another channel count raises ``ValueError``;
    inputs must have at least 2 dimensions (torch raises IndexError for 1-D).
    ``load_state_dict`` accepts any channel count (torch resizes its buffers): the state
    then has that shape.
    """

    _allowed_qschemes = (QScheme.PER_CHANNEL_AFFINE, QScheme.PER_CHANNEL_SYMMETRIC,
                         QScheme.PER_CHANNEL_AFFINE_FLOAT_QPARAMS)
    _accepts_dynamic = False
    state_keys = ("eps", "min_val", "max_val")
    _state_type = MinMaxState
    _state_ndim = 1

    def __init__(self, ch_axis=0, dtype=quint8, qscheme=QScheme.PER_CHANNEL_AFFINE,
                 reduce_range=False, quant_min=None, quant_max=None, eps=DEFAULT_EPS,
                 is_dynamic=False):
        self._record(locals())
        self._setup(dtype, qscheme, reduce_range, quant_min, quant_max, eps, is_dynamic)
        self._check_symmetric_reduce_range()
        self._set(ch_axis=as_int(ch_axis, "ch_axis"))

    def _num_channels(self, x) -> int:
        shape = tuple(x.shape)
        if len(shape) < 2:
            raise ValueError(f"{type(self).__name__} needs inputs with at least 2 dimensions, "
                             f"got shape {shape}")
        if not -len(shape) <= self.ch_axis < len(shape):
            raise ValueError(f"ch_axis={self.ch_axis} is out of range for input shape {shape}")
        return shape[self.ch_axis]

    def init(self, x=None, *, num_channels: int | None = None) -> MinMaxState:
        if num_channels is None:
            if x is None:
                raise ValueError(f"{type(self).__name__}.init needs x (an array or "
                                 f"jax.ShapeDtypeStruct) or num_channels to size its state")
            if tuple(x.shape) == (0,):
                num_channels = 0
            else:
                num_channels = self._num_channels(x)
        c = int(num_channels)
        return MinMaxState(self._eps_array(), jnp.full((c,), jnp.inf, jnp.float32),
                           jnp.full((c,), -jnp.inf, jnp.float32))

    def reset_min_max_vals(self, state):
        return self.init(num_channels=state.min_val.shape[0])

    def _batch_min_max(self, x, axis_name):
        c = self._num_channels(x)
        y = jnp.moveaxis(_as_float32(x), self.ch_axis, 0).reshape(c, -1)
        bmin, bmax = nm.aminmax(y, axis=1)
        return collectives.all_min(bmin, axis_name), collectives.all_max(bmax, axis_name)

    def update(self, state: MinMaxState, x, *, axis_name=None) -> MinMaxState:
        self._check_state(state)
        x = jnp.asarray(x)
        if x.size == 0:
            return state
        c = self._num_channels(x)
        if state.min_val.shape == (0,):  # e.g. loaded from an uninitialised torch observer
            state = self.init(num_channels=c)._replace(eps=state.eps)
        if state.min_val.shape != (c,):
            raise ValueError(f"{type(self).__name__}: input has {c} channels along "
                             f"ch_axis={self.ch_axis} but the state has {state.min_val.shape[0]}")
        bmin, bmax = self._batch_min_max(x, axis_name)
        return self._combine(state, bmin, bmax)

    def _combine(self, state, bmin, bmax):
        return state._replace(min_val=jnp.minimum(bmin, state.min_val),
                              max_val=jnp.maximum(bmax, state.max_val))

    def calculate_qparams(self, state: MinMaxState):
        """``(scale float32 (C,), zero_point int32 (C,))`` (float32 zero point for float_qparams).

        Channels never observed give ``(1.0, 0)`` (torch raises when some are unset).
        """
        self._check_state(state, "calculate_qparams")
        return self._calculate_qparams(state.min_val, state.max_val, state.eps)

    def state_dict(self, state) -> dict:
        """As torch's: a state that never observed anything (every channel ``+inf`` /
        ``-inf``) is written with empty ``(0,)`` ``min_val``/``max_val``, torch's
        uninitialised buffers, so a torch module loading it starts over as jquant does
        (instead of averaging from infinities)."""
        sd = super().state_dict(state)
        mn, mx = sd["min_val"], sd["max_val"]
        if mn.size and np.all(mn == np.inf) and np.all(mx == -np.inf):
            sd["min_val"] = np.zeros((0,), np.float32)
            sd["max_val"] = np.zeros((0,), np.float32)
        return sd

    def load_state_dict(self, state_dict, strict: bool = True):
        sd = dict(state_dict)
        for old, new in (("min_vals", "min_val"), ("max_vals", "max_val")):  # torch version < 3
            if old in sd and new not in sd:
                sd[new] = sd.pop(old)
        return super().load_state_dict(sd, strict=strict)

    def _state_from_arrays(self, arrays):
        owner = type(self).__name__
        eps = expect_shape("eps", np.asarray(arrays["eps"], np.float32).reshape(-1), (1,), owner)
        mn = np.asarray(arrays["min_val"], np.float32)
        mx = np.asarray(arrays["max_val"], np.float32)
        if mn.ndim != 1 or mn.shape != mx.shape:
            raise StateDictError(f"Error loading state dict into {owner}: min_val and max_val must "
                                 f"be vectors of equal length, got {mn.shape} and {mx.shape}")
        return MinMaxState(jnp.asarray(eps), jnp.asarray(mn), jnp.asarray(mx))


class MovingAveragePerChannelMinMaxObserver(PerChannelMinMaxObserver):
    """Per-channel moving-average min/max; ``torch.ao.quantization.MovingAveragePerChannelMinMaxObserver``.

    The first batch (all channels unset) is taken as is, later ones move by
    ``averaging_constant`` (three separately rounded float32 ops, as torch).
    """

    def __init__(self, averaging_constant=0.01, ch_axis=0, dtype=quint8,
                 qscheme=QScheme.PER_CHANNEL_AFFINE, reduce_range=False, quant_min=None,
                 quant_max=None, eps=DEFAULT_EPS, is_dynamic=False):
        self._record(locals())
        self._setup(dtype, qscheme, reduce_range, quant_min, quant_max, eps, is_dynamic)
        self._check_symmetric_reduce_range()
        c = as_float(averaging_constant, "averaging_constant")
        if not 0.0 < c <= 1.0:
            raise ValueError(f"averaging_constant={averaging_constant} must be in (0, 1]")
        self._set(ch_axis=as_int(ch_axis, "ch_axis"), averaging_constant=c)

    def _combine(self, state, bmin, bmax):
        uninit = jnp.all(state.min_val == jnp.inf) & jnp.all(state.max_val == -jnp.inf)
        c = self.averaging_constant
        new_min = jnp.where(uninit, bmin, moving_average(state.min_val, bmin, c))
        new_max = jnp.where(uninit, bmax, moving_average(state.max_val, bmax, c))
        return state._replace(min_val=new_min, max_val=new_max)


# ----------------------------------------------------------------------------------------
# Fixed, placeholder, noop, recording
# ----------------------------------------------------------------------------------------

class FixedQParamsObserver(ObserverBase):
    """Fixed (scale, zero_point), e.g. for sigmoid/tanh; ``torch.ao.quantization.FixedQParamsObserver``.

    ``update`` is the identity; state :class:`FixedQParamsState` (state_dict keys
    ``scale, zero_point``).
    """

    state_keys = ("scale", "zero_point")
    _state_type = FixedQParamsState

    def __init__(self, scale, zero_point, dtype=quint8, qscheme=QScheme.PER_TENSOR_AFFINE,
                 quant_min=0, quant_max=255, is_dynamic=False):
        self._record(locals())
        if is_dynamic:
            raise ValueError("is_dynamic=True is not supported by FixedQParamsObserver")
        scale = as_float(scale, "scale")
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale={scale} must be a positive finite float")
        zero_point = as_int(zero_point, "zero_point")
        qscheme = canonical_qscheme(qscheme)
        if qscheme.is_per_channel:
            raise ValueError(f"qscheme={qscheme.value}: FixedQParamsObserver is per-tensor only")
        quant_min, quant_max = as_int(quant_min, "quant_min"), as_int(quant_max, "quant_max")
        if quant_min > quant_max:
            raise ValueError(f"quant_min={quant_min} must be <= quant_max={quant_max}")
        self._set(scale=scale, zero_point=zero_point, dtype=canonical_dtype(dtype),
                  qscheme=qscheme, quant_min=quant_min, quant_max=quant_max,
                  is_dynamic=False)

    def init(self, x=None) -> FixedQParamsState:
        return FixedQParamsState(jnp.full((1,), self.scale, jnp.float32),
                                 jnp.full((1,), self.zero_point, jnp.int32))

    def update(self, state, x, *, axis_name=None):
        self._check_state(state)
        return state

    def calculate_qparams(self, state: FixedQParamsState):
        self._check_state(state, "calculate_qparams")
        return state.scale, state.zero_point

    def reset_min_max_vals(self, state):
        return state

    def _state_from_arrays(self, arrays):
        owner = type(self).__name__
        s = expect_shape("scale", np.asarray(arrays["scale"], np.float32).reshape(-1), (1,), owner)
        z = expect_shape("zero_point", np.asarray(arrays["zero_point"]).reshape(-1), (1,), owner)
        return FixedQParamsState(jnp.asarray(s), jnp.asarray(z.astype(np.int32)))


class _StatelessObserver(ObserverBase):
    def init(self, x=None) -> EmptyState:
        return EmptyState()

    def update(self, state, x, *, axis_name=None):
        return state

    def reset_min_max_vals(self, state):
        return state

    def _state_from_arrays(self, arrays):
        return EmptyState()


class PlaceholderObserver(_StatelessObserver):
    """Identity that only carries a dtype (e.g. float16, dynamic quant); ``torch.ao.quantization.PlaceholderObserver``.

    ``calculate_qparams`` raises, as in torch. ``qscheme=None`` means per_tensor_affine,
    ``eps=None`` means 2**-23; ``compute_dtype`` is accepted and ignored (torch only warns).
    """

    def __init__(self, dtype=jnp.float32, custom_op_name="", compute_dtype=None, quant_min=None,
                 quant_max=None, qscheme=None, eps=None, is_dynamic=False):
        self._record(locals())
        self._set(dtype=canonical_dtype(dtype), custom_op=custom_op_name,
                  quant_min=quant_min, quant_max=quant_max,
                  qscheme=QScheme.PER_TENSOR_AFFINE if qscheme is None else canonical_qscheme(qscheme),
                  eps=DEFAULT_EPS if eps is None else as_float(eps, "eps"),
                  is_dynamic=bool(is_dynamic))


class NoopObserver(_StatelessObserver):
    """Identity observer (default float16); ``torch.ao.quantization.NoopObserver``. ``calculate_qparams`` raises."""

    def __init__(self, dtype=jnp.float16, custom_op_name=""):
        self._record(locals())
        self._set(dtype=canonical_dtype(dtype), custom_op=custom_op_name, is_dynamic=False)


class RecordingObserver(ObserverBase):
    """Records every observed tensor; ``torch.ao.quantization.RecordingObserver`` (debugging).

    Works under ``jit``: the state preallocates ``capacity`` slots of the input's shape and
    dtype (float32) and ``update`` writes the tensor into slot ``count`` with a
    ``dynamic_update_slice``, then increments ``count``; batches beyond ``capacity`` are
    counted but not stored. Every recorded tensor must have the shape of the first. The
    state is sized by ``init(x)``; a state from ``init()`` is sized by the first ``update``
    (outside ``jit``'s carried state). :meth:`get_tensor_value` returns the recorded
    tensors as a list (host side). With ``axis_name`` the batch is all-gathered (tiled
    along axis 0) before recording. ``state_dict`` is empty, as torch's has no buffers.
    """

    state_keys = ()
    _state_type = RecordingState

    def __init__(self, dtype=quint8, capacity: int = 64):
        self._record(locals())
        capacity = as_int(capacity, "capacity")
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        self._set(dtype=canonical_dtype(dtype), capacity=capacity, is_dynamic=False)

    def init(self, x=None) -> RecordingState:
        if x is None:
            return RecordingState(jnp.zeros((0,), jnp.float32), jnp.zeros((), jnp.int32))
        return RecordingState(jnp.zeros((self.capacity,) + tuple(x.shape), jnp.float32),
                              jnp.zeros((), jnp.int32))

    def update(self, state: RecordingState, x, *, axis_name=None) -> RecordingState:
        self._check_state(state)
        x = collectives.all_gather(_as_float32(x), axis_name)
        if state.values.shape == (0,):
            state = self.init(x)._replace(count=state.count)
        if state.values.shape[1:] != x.shape:
            raise ValueError(f"RecordingObserver: got a tensor of shape {x.shape}, but the state "
                             f"records shape {state.values.shape[1:]}")
        idx = jnp.minimum(state.count, self.capacity - 1)
        stored = jax.lax.dynamic_update_index_in_dim(state.values, x, idx, axis=0)
        values = jnp.where(state.count < self.capacity, stored, state.values)
        return RecordingState(values, state.count + 1)

    def get_tensor_value(self, state: RecordingState) -> list:
        """The recorded tensors, oldest first (at most ``capacity``)."""
        self._check_state(state, "get_tensor_value")
        n = min(int(state.count), self.capacity) if state.values.shape != (0,) else 0
        return [state.values[i] for i in range(n)]

    def state_dict(self, state) -> dict:
        return with_metadata({}, {"": {"version": self._torch_version}})

    def _state_from_arrays(self, arrays):
        return self.init()
