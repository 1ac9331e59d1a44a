"""Differential tests: jquant's qparams rules against torch 2.13.

* :func:`jquant.calculate_qparams` (through every uniform observer's ``calculate_qparams``)
  against torch observers' ``calculate_qparams`` on the same (min, max) buffers;
* :func:`jquant.choose_quantization_params` against the scale / zero point that
  ``torch.fused_moving_avg_obs_fake_quant`` stores (fbgemm's ChooseQuantizationParams);
* :func:`jquant.choose_qparams_per_tensor` against ``torch._choose_qparams_per_tensor``
  (ATen's quant_utils variant, which keeps a float64 scale).

Scales and zero points are compared bit for bit; the only tolerance is XLA:CPU's flushing of
float32 denormal *results* to zero (``ftz=True``: torch's denormal counts as a signed zero).
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
from torch_oracle import (QSCHEMES_PER_CHANNEL, QSCHEMES_PER_TENSOR, assert_bitexact, torch_observer)

F32 = np.float32
SPECIALS = (np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30, 1e30, 3e38, -3e38, 1e-5, -1e-5)
EPS_VALUES = (2.0 ** -23, 2.0 ** -12, 1e-3, 1e-10, 0.5)
#: torch.iinfo-like bounds used to draw custom ranges per dtype.
_CUSTOM_BOUNDS = {"uint8": (0, 255), "int8": (-128, 127), "int32": (-(2 ** 31), 2 ** 31 - 1),
                  "uint4": (0, 15)}


@st.composite
def observer_configs(draw, per_channel: bool):
    """(jquant observer config, its torch twin) over dtype/qscheme/reduce_range/range/eps."""
    dtype = draw(st.sampled_from((jq.quint8, jq.qint8, jq.qint32, jq.quint4x2)))
    qscheme = draw(st.sampled_from(QSCHEMES_PER_CHANNEL if per_channel else QSCHEMES_PER_TENSOR))
    reduce_range = draw(st.booleans())
    kw = dict(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range,
              eps=draw(st.sampled_from(EPS_VALUES)))
    if draw(st.booleans()):
        lo, hi = _CUSTOM_BOUNDS[np.dtype(dtype).name]
        qmin = draw(st.integers(lo, 0))
        qmax = draw(st.integers(1, hi))
        kw.update(quant_min=qmin, quant_max=qmax)
    if per_channel:
        kw["ch_axis"] = draw(st.sampled_from((0, 1, -1)))
    cls = jq.PerChannelMinMaxObserver if per_channel else jq.MinMaxObserver
    try:
        obs = cls(**kw)
    except ValueError:  # symmetric + reduce_range + quint8: torch raises as well
        assume(False)
    return obs, torch_observer(obs)


@st.composite
def min_max(draw, shape):
    """(min, max) float32 arrays with min <= max, including NaN / inf / signed zeros."""
    n = int(np.prod(shape)) if shape else 1
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    lo_exp, hi_exp = draw(st.sampled_from([(-38, 38), (-3, 3), (-30, -20), (20, 38), (0, 0)]))
    mags = 10.0 ** rng.uniform(lo_exp, hi_exp, size=(2, n))
    a = rng.standard_normal(n) * mags[0]
    b = rng.standard_normal(n) * mags[1]
    style = draw(st.sampled_from(["mixed", "positive", "negative", "grid", "equal"]))
    if style == "positive":
        a, b = np.abs(a), np.abs(b)
    elif style == "negative":
        a, b = -np.abs(a), -np.abs(b)
    elif style == "grid":  # ranges like [-1.125, 0.125]: zero points land on exact .5 ties
        a = rng.integers(-64, 1, n) / 8.0
        b = rng.integers(0, 65, n) / 8.0
    elif style == "equal":
        b = a
    with np.errstate(over="ignore"):
        mn = np.minimum(a, b).astype(F32)
        mx = np.maximum(a, b).astype(F32)
    if draw(st.integers(0, 2)) == 0:
        k = draw(st.integers(0, n - 1))
        which = draw(st.sampled_from(["min", "max", "both"]))
        if which in ("min", "both"):
            mn[k] = draw(st.sampled_from(SPECIALS))
        if which in ("max", "both"):
            mx[k] = draw(st.sampled_from(SPECIALS))
        bad = mn > mx
        mn[bad], mx[bad] = mx[bad], mn[bad]
    for v in (mn, mx):  # inputs are normal floats (XLA:CPU flushes denormal inputs too)
        v[np.abs(v) < np.finfo(F32).tiny] = 0.0
    return mn.reshape(shape), mx.reshape(shape)


def _torch_qparams(tobs, mn, mx):
    tobs.min_val.resize_(mn.shape)
    tobs.max_val.resize_(mx.shape)
    tobs.min_val.copy_(torch.from_numpy(np.array(mn)))
    tobs.max_val.copy_(torch.from_numpy(np.array(mx)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tobs.calculate_qparams()


@functools.lru_cache(maxsize=None)
def _jit_qparams(obs):
    return jax.jit(obs.calculate_qparams)


def _check_observer_qparams(obs, tobs, mn, mx, eager=False):
    state = obs.init(jax.ShapeDtypeStruct((max(mn.size, 1), 2), jnp.float32)
                     if mn.ndim else None)
    state = state._replace(min_val=jnp.asarray(mn), max_val=jnp.asarray(mx))
    try:
        ts, tz = _torch_qparams(tobs, mn, mx)
    except AssertionError:
        # torch asserts min <= max (e.g. a per-channel (+inf, -inf) entry); jquant raises
        # ValueError on concrete input, and under jit gives (1, 0) for unset channels.
        if not np.all(np.isinf(mn[mn > mx])) or mn.ndim == 0:
            with pytest.raises(ValueError):
                obs.calculate_qparams(state)
        return
    # jit is where XLA rewrites arithmetic (FMA contraction, reciprocal division): always
    # tested; eager op-by-op execution only on the fixed edge cases.
    for fn in ((obs.calculate_qparams, _jit_qparams(obs)) if eager else (_jit_qparams(obs),)):
        js, jz = fn(state)
        assert_bitexact(js, ts, "scale", ftz=True)
        assert_bitexact(jz, tz, "zero_point", ftz=True)
        assert js.dtype == jnp.float32
        assert jz.dtype == (jnp.float32 if obs.qscheme == jq.per_channel_affine_float_qparams
                            else jnp.int32)


@settings(max_examples=40)
@given(observer_configs(per_channel=False), min_max(()))
def test_calculate_qparams_per_tensor(cfg, mm):
    obs, tobs = cfg
    _check_observer_qparams(obs, tobs, *mm)


@settings(max_examples=40)
@given(observer_configs(per_channel=True), st.integers(1, 6).flatmap(lambda c: min_max((c,))))
def test_calculate_qparams_per_channel(cfg, mm):
    obs, tobs = cfg
    _check_observer_qparams(obs, tobs, *mm)


EDGE_CASES = {
    "nan_min": (np.nan, 1.0), "nan_max": (-1.0, np.nan), "nan_both": (np.nan, np.nan),
    "inf_max": (-1.0, np.inf), "neg_inf_min": (-np.inf, 1.0), "inf_both": (-np.inf, np.inf),
    "all_zero": (0.0, 0.0), "neg_zero": (-0.0, 0.0), "constant_pos": (2.0, 2.0),
    "constant_neg": (-3.0, -3.0), "uninitialised": (np.inf, -np.inf), "tiny": (-1e-38, 1e-38),
    "huge": (-3.4e38, 3.4e38),
}


@pytest.mark.parametrize("qscheme", QSCHEMES_PER_TENSOR + QSCHEMES_PER_CHANNEL,
                         ids=lambda q: q.value)
@pytest.mark.parametrize("dtype", (jq.quint8, jq.qint8, jq.qint32, jq.quint4x2),
                         ids=lambda d: np.dtype(d).name)
def test_calculate_qparams_edge_values(dtype, qscheme):
    """REFERENCE 1.3 edge values, per tensor and (one value per channel) per channel."""
    cls = jq.PerChannelMinMaxObserver if qscheme.is_per_channel else jq.MinMaxObserver
    obs = cls(dtype=dtype, qscheme=qscheme)
    tobs = torch_observer(obs)
    if qscheme.is_per_channel:
        cases = [v for k, v in EDGE_CASES.items() if k != "uninitialised"]
        mn = np.array([c[0] for c in cases], F32)
        mx = np.array([c[1] for c in cases], F32)
        _check_observer_qparams(obs, tobs, mn, mx, eager=True)
    else:
        for name, (lo, hi) in EDGE_CASES.items():
            _check_observer_qparams(obs, tobs, F32(lo), F32(hi), eager=True)


def test_calculate_qparams_uninitialised_and_empty():
    """Unobserved state: torch returns the default (1.0, 0); per-channel empty buffers too."""
    for obs in (jq.MinMaxObserver(), jq.MovingAverageMinMaxObserver(dtype=jq.qint8),
                jq.PerChannelMinMaxObserver(), jq.PerChannelMinMaxObserver(
                    qscheme=jq.per_channel_affine_float_qparams)):
        tobs = torch_observer(obs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts, tz = tobs.calculate_qparams()
        state = obs.init(jax.ShapeDtypeStruct((0,), jnp.float32))
        for fn in (obs.calculate_qparams, jax.jit(obs.calculate_qparams)):
            js, jz = fn(state)
            assert_bitexact(js, ts, "scale")
            assert_bitexact(jz, tz, "zero_point", ints_as_values=False)


def test_calculate_qparams_invalid_range_raises_like_torch():
    """min > max (and a half-initialised pair) raise: torch AssertionError, jquant ValueError."""
    obs = jq.MinMaxObserver()
    tobs = torch_observer(obs)
    for lo, hi in ((1.0, -1.0), (1.0, -np.inf), (np.inf, 3.0)):
        with pytest.raises(AssertionError):
            _torch_qparams(tobs, F32(lo), F32(hi))
        state = obs.init()._replace(min_val=jnp.float32(lo), max_val=jnp.float32(hi))
        with pytest.raises(ValueError, match="min_val"):
            obs.calculate_qparams(state)


# ----------------------------------------------------------------------------------------
# fbgemm rule (fused op)
# ----------------------------------------------------------------------------------------

RANGES = ((0, 255), (0, 127), (-128, 127), (-64, 63), (0, 15), (-127, 127), (0, 1000),
          (-1000, 100000), (-(2 ** 31), 2 ** 31 - 1), (0, 1))


def _torch_fused_qparams(mn, mx, qmin, qmax, sym):
    """Scale / zero point torch's fused op stores for running (min, max), observer off."""
    c = mn.shape[0]
    scale = torch.ones(c)
    zp = torch.zeros(c, dtype=torch.int32)
    try:
        torch.fused_moving_avg_obs_fake_quant(
            torch.zeros(c, 2), torch.tensor([0]), torch.tensor([1]), torch.from_numpy(mn.copy()),
            torch.from_numpy(mx.copy()), scale, zp, 0.01, qmin, qmax, 0, True, sym)
        return scale, zp
    except RuntimeError:  # per-channel fake quant rejects a NaN's zero point: go per tensor
        out_s, out_z = [], []
        for i in range(c):
            s1, z1 = torch.ones(1), torch.zeros(1, dtype=torch.int32)
            torch.fused_moving_avg_obs_fake_quant(
                torch.zeros(2), torch.tensor([0]), torch.tensor([1]), torch.tensor(mn[i]),
                torch.tensor(mx[i]), s1, z1, 0.01, qmin, qmax, 0, False, sym)
            out_s.append(s1)
            out_z.append(z1)
        return torch.cat(out_s), torch.cat(out_z)


_CHUNK = 64


@functools.lru_cache(maxsize=None)
def _jit_choose(qmin, qmax, sym):
    return jax.jit(lambda a, b: jq.choose_quantization_params(a, b, qmin, qmax, sym))


def _jq_choose(mn, mx, qmin, qmax, sym):
    """jit-compiled choose_quantization_params on fixed-size chunks (one compile per rule)."""
    n = mn.shape[0]
    pad = (-n) % _CHUNK
    mn = np.concatenate([mn, np.zeros(pad, F32)])
    mx = np.concatenate([mx, np.zeros(pad, F32)])
    fn = _jit_choose(qmin, qmax, sym)
    outs = [fn(mn[i:i + _CHUNK], mx[i:i + _CHUNK]) for i in range(0, mn.shape[0], _CHUNK)]
    return (np.concatenate([np.asarray(o[0]) for o in outs])[:n],
            np.concatenate([np.asarray(o[1]) for o in outs])[:n])


@settings(max_examples=50)
@given(st.sampled_from(RANGES), st.booleans(), min_max((8,)))
def test_choose_quantization_params_matches_fused_op(qrange, sym, mm):
    qmin, qmax = qrange
    mn, mx = mm
    ts, tz = _torch_fused_qparams(mn, mx, qmin, qmax, sym)
    js, jz = _jq_choose(mn, mx, qmin, qmax, sym)
    assert_bitexact(js, ts, "scale")
    assert_bitexact(jz, tz, "zero_point")


GRID = np.array(sorted(set([i / 8 for i in range(-40, 41)] + [i / 10 for i in range(-30, 31)]
                           + [i / 3 for i in range(-9, 10)])), F32)


@pytest.mark.parametrize("qrange", RANGES[:6] + RANGES[8:9])
@pytest.mark.parametrize("sym", (False, True))
def test_choose_quantization_params_ties_grid(qrange, sym):
    """'Nice' ranges put fbgemm's zero point on exact .5 ties: the float32 scale, the
    ``|q| + |x/scale|`` error rule and true (not reciprocal) divisions all matter here."""
    qmin, qmax = qrange
    mn, mx = np.meshgrid(GRID[GRID <= 0], GRID[GRID >= 0])
    mn, mx = mn.ravel(), mx.ravel()
    ts, tz = _torch_fused_qparams(mn, mx, qmin, qmax, sym)
    js, jz = _jq_choose(mn, mx, qmin, qmax, sym)
    assert_bitexact(js, ts, "scale")
    assert_bitexact(jz, tz, "zero_point")
    if qrange == (-128, 127):  # eager (op by op) too
        js, jz = jq.choose_quantization_params(mn, mx, qmin, qmax, sym)
        assert_bitexact(js, ts, "scale")
        assert_bitexact(jz, tz, "zero_point")


def test_choose_quantization_params_denormal_intermediates():
    """Ranges of ~1e-37 give float32-denormal intermediates that torch keeps (XLA would
    flush them): 6.1e-5 instead of the 0.1 fallback, and the symmetric midpoint zero point."""
    mn = np.array([-2.05e-36, -8.69e-38, -1e-37, -3e-38, 0.0], F32)
    mx = np.array([-1.87e-37, 5.88e-38, 1e-37, 0.0, 4e-37], F32)
    for sym in (False, True):
        for qmin, qmax in ((0, 255), (-128, 127), (0, 127)):
            ts, tz = _torch_fused_qparams(mn, mx, qmin, qmax, sym)
            js, jz = _jq_choose(mn, mx, qmin, qmax, sym)
            assert_bitexact(js, ts, "scale")
            assert_bitexact(jz, tz, "zero_point")


# ----------------------------------------------------------------------------------------
# quant_utils rule (torch._choose_qparams_per_tensor)
# ----------------------------------------------------------------------------------------

_jit_per_tensor = jax.jit(jq.choose_qparams_per_tensor, static_argnums=1)


def _check_per_tensor(x, reduce_range, eager=False):
    ts, tz = torch._choose_qparams_per_tensor(torch.from_numpy(x), reduce_range)
    padded = np.concatenate([x, np.full(16 - x.size, x[0], F32)])  # same min/max, one shape
    outs = [_jit_per_tensor(padded, reduce_range)]
    if eager:
        outs.append(jq.choose_qparams_per_tensor(x, reduce_range))
    for js, jz in outs:
        # torch returns the float64 scale as a Python float; jquant its float32 rounding.
        assert_bitexact(js, np.float32(ts), "scale")
        assert js.shape == () and js.dtype == jnp.float32
        assert int(jz) == tz and jz.dtype == jnp.int32


@settings(max_examples=40)
@given(st.integers(1, 8).flatmap(lambda n: min_max((n,))), st.booleans())
def test_choose_qparams_per_tensor_matches_torch(mm, reduce_range):
    x = np.concatenate(mm)
    assume(not np.isnan(x).any())  # torch raises for NaN (tested below)
    _check_per_tensor(x, reduce_range)


@pytest.mark.parametrize("reduce_range", (False, True))
def test_choose_qparams_per_tensor_grid_and_edges(reduce_range):
    mn, mx = np.meshgrid(GRID[GRID <= 0][::3], GRID[GRID >= 0][::3])
    for lo, hi in zip(mn.ravel(), mx.ravel()):
        _check_per_tensor(np.array([lo, hi], F32), reduce_range)
    for x in ([np.inf, 1.0], [-np.inf, 1.0], [0.0, 0.0], [2.0, 3.0], [-3.0, -2.0], [1e-38, 0.0],
              [-1.125, 0.125], [-0.9, 0.1]):
        _check_per_tensor(np.array(x, F32), reduce_range, eager=True)


def test_choose_qparams_per_tensor_bad_input_raises_like_torch():
    for x in (np.array([], F32), np.array([np.nan, 1.0], F32)):
        with pytest.raises(RuntimeError):
            torch._choose_qparams_per_tensor(torch.from_numpy(x), False)
        with pytest.raises(ValueError):
            jq.choose_qparams_per_tensor(x)
