"""Differential tests: jquant observers against torch 2.13's, over multi-batch sequences.

Every MinMax-family observer (MinMax, MovingAverage, PerChannel, MovingAveragePerChannel)
runs the same batches as its torch twin, ``update`` under ``jax.jit``; ``min_val`` /
``max_val`` after every batch and the qparams are compared bit for bit (NaN / inf /
empty batches and float16 / float64 / integer inputs included). The simple observers
(FixedQParams, Placeholder, Noop, Recording) are compared behaviour by behaviour. State
dicts go both ways: jquant -> torch and torch -> jquant, and both continue identically.
HistogramObserver has its own tests (tests/test_histogram*.py).
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import jquant as jq
from torch_oracle import (arrays, assert_bitexact, assert_state_dict_bitexact, jq_sd_to_torch,
                          torch_observer)

F32 = np.float32
MINMAX_CLASSES = (jq.MinMaxObserver, jq.MovingAverageMinMaxObserver, jq.PerChannelMinMaxObserver,
                  jq.MovingAveragePerChannelMinMaxObserver)
_CUSTOM = {"uint8": (0, 255), "int8": (-128, 127), "int32": (-(2 ** 31), 2 ** 31 - 1),
           "uint4": (0, 15)}


@st.composite
def minmax_observers(draw, classes=MINMAX_CLASSES):
    cls = draw(st.sampled_from(classes))
    per_channel = issubclass(cls, jq.PerChannelMinMaxObserver)
    dtype = draw(st.sampled_from((jq.quint8, jq.qint8, jq.qint32, jq.quint4x2)))
    schemes = ((jq.per_channel_affine, jq.per_channel_symmetric, jq.per_channel_affine_float_qparams)
               if per_channel else (jq.per_tensor_affine, jq.per_tensor_symmetric))
    kw = dict(dtype=dtype, qscheme=draw(st.sampled_from(schemes)),
              reduce_range=draw(st.booleans()),
              eps=draw(st.sampled_from((2.0 ** -23, 2.0 ** -12, 1e-4))))
    if draw(st.booleans()):
        lo, hi = _CUSTOM[np.dtype(dtype).name]
        kw.update(quant_min=draw(st.integers(lo, 0)), quant_max=draw(st.integers(1, hi)))
    if "MovingAverage" in cls.__name__:
        kw["averaging_constant"] = draw(st.sampled_from((0.01, 0.1, 0.5, 1.0)))
    if per_channel:
        kw["ch_axis"] = draw(st.sampled_from((0, 1, 2, -1, -2)))
    try:
        return cls(**kw)
    except ValueError:  # symmetric + reduce_range + quint8 (torch raises as well)
        assume(False)


@functools.lru_cache(maxsize=None)
def _jit(fn):
    return jax.jit(fn)


def _torch_qparams(tobs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tobs.calculate_qparams()


def _compare(obs, tobs, state, what):
    assert_bitexact(state.eps, tobs.eps, f"{what} eps")
    assert_bitexact(state.min_val, tobs.min_val, f"{what} min_val")
    assert_bitexact(state.max_val, tobs.max_val, f"{what} max_val")
    try:
        ts, tz = _torch_qparams(tobs)
    except AssertionError:  # e.g. a NaN-free channel with min > max cannot happen; inf/-inf
        return
    js, jz = _jit(obs.calculate_qparams)(state)
    assert_bitexact(js, ts, f"{what} scale", ftz=True)
    assert_bitexact(jz, tz, f"{what} zero_point", ftz=True)


def _run(obs, tobs, state, batches, start=0):
    update = _jit(obs.update)
    for i, x in enumerate(batches):
        tobs(torch.from_numpy(np.array(x)))
        state = update(state, x) if x.size else obs.update(state, x)
        if not (isinstance(obs, jq.PerChannelMinMaxObserver) and tobs.min_val.numel() == 0):
            _compare(obs, tobs, state, f"batch {start + i}")
    return state


@st.composite
def batch_sequences(draw, shape=(3, 4, 2)):
    n = draw(st.integers(1, 5))
    out = []
    offset = draw(st.sampled_from([0.0, 0.5, -2.0, 1e3]))
    for i in range(n):
        if i and draw(st.integers(0, 6)) == 0:
            out.append(np.zeros((0,) + shape[1:], F32))  # empty batch: no-op
            continue
        x = draw(arrays(shape, special=True)) + F32(offset)
        out.append(x.astype(F32))
    return out


@settings(max_examples=60)
@given(minmax_observers(), batch_sequences())
def test_minmax_family_sequences(obs, batches):
    """min_val / max_val after every batch and the qparams, under jit, as torch."""
    tobs = torch_observer(obs)
    state = obs.init(jax.ShapeDtypeStruct((3, 4, 2), jnp.float32))
    _run(obs, tobs, state, batches)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("cls", MINMAX_CLASSES, ids=lambda c: c.__name__)
def test_minmax_family_input_dtypes(cls):
    """Inputs are cast to float32 (float64 beyond its range -> +-inf, ints, float16)."""
    kw = {"ch_axis": 1} if issubclass(cls, jq.PerChannelMinMaxObserver) else {}
    obs = cls(**kw)
    tobs = torch_observer(obs)
    rng = np.random.default_rng(0)
    state = obs.init(jax.ShapeDtypeStruct((2, 3), jnp.float32))
    for x in (rng.standard_normal((2, 3)).astype(np.float16),
              np.array([[1e300, -2.0, 0.5], [3.0, -1e300, 1e-300]]),
              rng.integers(-1000, 1000, (2, 3)).astype(np.int32),
              np.array([[7, 1, 2], [3, 250, 9]], np.uint8)):
        tobs(torch.from_numpy(x))
        state = obs.update(state, jnp.asarray(x) if x.dtype != np.float64 else x)
        _compare(obs, tobs, state, f"input {x.dtype}")


def test_moving_average_reference_examples():
    """REFERENCE 2.2: [-1,2] then [-3,4] with c=0.01; a +inf batch then a finite one is NaN."""
    for seq in ([[-1.0, 2.0], [-3.0, 4.0]], [[1.0, np.inf], [0.0, 1.0]],
                [[-np.inf, np.inf], [0.0, 1.0]], [[np.nan, 1.0], [0.0, 1.0]]):
        obs = jq.MovingAverageMinMaxObserver()
        tobs = torch_observer(obs)
        _run(obs, tobs, obs.init(), [np.array(b, F32) for b in seq])


def test_per_channel_changing_channel_count_raises_like_torch():
    obs = jq.PerChannelMinMaxObserver()
    tobs = torch_observer(obs)
    tobs(torch.zeros(3, 2))
    with pytest.raises(RuntimeError):
        tobs(torch.zeros(4, 2))
    state = obs.update(obs.init(jnp.zeros((3, 2))), jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="channels"):
        obs.update(state, jnp.zeros((4, 2)))


# ----------------------------------------------------------------------------------------
# Simple observers
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale, zp", [(1 / 256, 0), (2 / 256, 128), (0.1, 3)])
def test_fixed_qparams_observer(scale, zp):
    obs = jq.FixedQParamsObserver(scale=scale, zero_point=zp)
    tobs = torch_observer(obs)
    x = np.array([-1.0, 0.3, 2.0], F32)
    state = obs.init()
    y, state = jax.jit(obs.apply)(state, x)
    ty = tobs(torch.from_numpy(x))
    assert_bitexact(y, ty, "identity")
    for a, b in zip(obs.calculate_qparams(state), tobs.calculate_qparams()):
        assert_bitexact(a, b, "qparams")
        assert a.dtype == (jnp.float32 if a.dtype.kind == "f" else jnp.int32)
    assert_state_dict_bitexact(obs.state_dict(state), tobs.state_dict(), "state_dict")


@pytest.mark.parametrize("make", [lambda: jq.PlaceholderObserver(),
                                  lambda: jq.PlaceholderObserver(dtype=jq.quint8, quant_min=0,
                                                                 quant_max=255, is_dynamic=True),
                                  lambda: jq.PlaceholderObserver(dtype=jnp.float16),
                                  lambda: jq.NoopObserver(), lambda: jq.NoopObserver(jnp.float32)])
def test_placeholder_and_noop_observers(make):
    obs = make()
    tobs = torch_observer(obs)
    x = np.array([[-1.0, 0.3], [np.nan, 2.0]], F32)
    y, state = jax.jit(obs.apply)(obs.init(), x)
    assert_bitexact(y, tobs(torch.from_numpy(x)), "identity")
    with pytest.raises(Exception):
        tobs.calculate_qparams()
    with pytest.raises(Exception):
        obs.calculate_qparams(state)
    assert obs.dtype == np.dtype(jnp.float16 if tobs.dtype == torch.float16 else
                                 jnp.uint8 if tobs.dtype == torch.quint8 else jnp.float32)
    assert list(obs.state_dict(state)) == list(tobs.state_dict()) == []
    for attr in ("quant_min", "quant_max", "is_dynamic"):
        if hasattr(tobs, attr):
            assert getattr(obs, attr) == getattr(tobs, attr), attr


def test_recording_observer():
    obs = jq.RecordingObserver(capacity=8)
    tobs = torch_observer(obs)
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((2, 3)).astype(F32) for _ in range(4)]
    state = obs.init(batches[0])
    update = jax.jit(obs.apply)
    for x in batches:
        y, state = update(state, x)
        assert_bitexact(y, tobs(torch.from_numpy(x)), "identity")
    got, want = obs.get_tensor_value(state), tobs.get_tensor_value()
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert_bitexact(a, b, "recorded")
    with pytest.raises(Exception):
        tobs.calculate_qparams()
    with pytest.raises(Exception):
        obs.calculate_qparams(state)
    assert list(obs.state_dict(state)) == list(tobs.state_dict()) == []


# ----------------------------------------------------------------------------------------
# State dict interop, both directions
# ----------------------------------------------------------------------------------------

@settings(max_examples=40)
@given(minmax_observers(), batch_sequences(), batch_sequences(), st.booleans())
def test_state_dict_jquant_to_torch_and_back(obs, first, then, jquant_first):
    """Observe ``first`` on one side, move the state dict to the other, continue both."""
    tobs = torch_observer(obs)
    state = obs.init(jax.ShapeDtypeStruct((3, 4, 2), jnp.float32))
    if jquant_first:
        for x in first:
            state = obs.update(state, x)
        sd = obs.state_dict(state)
        tobs.load_state_dict(jq_sd_to_torch(sd))
        assert_state_dict_bitexact(sd, tobs.state_dict(), "after load into torch")
    else:
        for x in first:
            tobs(torch.from_numpy(x))
        state = obs.load_state_dict(tobs.state_dict())
        assert_state_dict_bitexact(obs.state_dict(state), tobs.state_dict(), "after load into jquant")
    state = _run(obs, tobs, state, then, start=len(first))
    assert_state_dict_bitexact(obs.state_dict(state), tobs.state_dict(), "final state_dict")


@pytest.mark.parametrize("cls", MINMAX_CLASSES[2:], ids=lambda c: c.__name__)
def test_state_dict_per_channel_resize_and_uninitialised(cls):
    """torch's [0]-shaped buffers and another channel count load (torch resizes); a never
    observed jquant state writes torch's empty buffers, so torch continues as jquant."""
    obs = cls(ch_axis=1)
    rng = np.random.default_rng(3)
    x5 = rng.standard_normal((2, 5, 3)).astype(F32)
    # torch's uninitialised observer -> jquant
    tobs = torch_observer(obs)
    state = obs.load_state_dict(tobs.state_dict())
    assert state.min_val.shape == (0,)
    _run(obs, tobs, state, [x5, x5 * 2 + 1])
    # a 5-channel torch state into a jquant observer built for 3 channels
    tobs = torch_observer(obs)
    tobs(torch.from_numpy(x5))
    state = obs.load_state_dict(tobs.state_dict())
    assert state.min_val.shape == (5,)
    _run(obs, tobs, state, [x5 - 3, x5 * 0.5])
    # jquant's never-observed (C,) state -> torch: written as torch's empty buffers
    state = obs.init(jnp.zeros((2, 4, 3)))
    sd = obs.state_dict(state)
    assert sd["min_val"].shape == sd["max_val"].shape == (0,)
    tobs = torch_observer(obs)
    tobs.load_state_dict(jq_sd_to_torch(sd))
    x4 = rng.standard_normal((2, 4, 3)).astype(F32)
    _run(obs, tobs, state, [x4, x4 + 5, x4 * 3])


def test_state_dict_metadata_keeps_eps_in_torch():
    """jquant's state dicts carry torch's version metadata: torch keeps a custom eps."""
    obs = jq.MovingAverageMinMaxObserver(eps=2.0 ** -12)
    state = obs.update(obs.init(), jnp.array([1e-5, 2e-5]))
    tobs = torch_observer(jq.MovingAverageMinMaxObserver())  # default eps on the torch side
    tobs.load_state_dict(jq_sd_to_torch(obs.state_dict(state)))
    assert_bitexact(tobs.eps, state.eps, "eps")
    _run(obs, tobs, state, [np.array([3e-5, -1e-5], F32)])


@pytest.mark.parametrize("shape,per_channel", [((40000,), False), ((2000, 16), True),
                                               ((16, 2000), True)])
def test_nan_in_large_batches_propagates_like_torch(shape, per_channel):
    """A NaN in a large batch reaches min_val / max_val as in torch (XLA:CPU's library
    min / max kernels for >= ~10k elements skip NaN; jquant's reductions do not)."""
    x = np.random.default_rng(7).standard_normal(shape).astype(F32)
    x.reshape(-1)[x.size // 3] = np.nan
    if per_channel:
        obs, tob = jq.PerChannelMinMaxObserver(ch_axis=1), torch.ao.quantization.PerChannelMinMaxObserver(ch_axis=1)
    else:
        obs, tob = jq.MinMaxObserver(), torch.ao.quantization.MinMaxObserver()
    state = jax.jit(obs.update)(obs.init(x), jnp.asarray(x))
    tob(torch.from_numpy(x.copy()))
    assert_bitexact(state.min_val, tob.min_val.numpy())
    assert_bitexact(state.max_val, tob.max_val.numpy())
    x_inf = np.random.default_rng(8).standard_normal(shape).astype(F32)
    x_inf.reshape(-1)[0], x_inf.reshape(-1)[-1] = np.inf, -np.inf   # sum is NaN, no NaN
    state = jax.jit(obs.update)(obs.init(x_inf), jnp.asarray(x_inf))
    tob.reset_min_max_vals()
    tob(torch.from_numpy(x_inf.copy()))
    assert_bitexact(state.min_val, tob.min_val.numpy())
    assert_bitexact(state.max_val, tob.max_val.numpy())
    fq = jq.FusedMovingAvgObsFakeQuantize()
    _, fstate = jax.jit(fq)(fq.init(x.reshape(-1)), jnp.asarray(x.reshape(-1)))
    assert np.isnan(np.asarray(fstate.activation_post_process.min_val))
