"""Differential tests: jquant's fake-quant / quantize ops and their gradients against torch 2.13.

Forward outputs, quantized integers and straight-through gradients are compared bit for bit
(float32 bit patterns, signed zeros included). The LSQ scale / zero-point gradients are
sums over elements: torch sums with its own cascade order and XLA with another, so sums of
many terms are compared within ``1e-5 * sum(|term_i|)`` (the float32 summation-order bound
for these sizes), while single-element sums (which isolate the per-element formula) must
be bit-exact.
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
from jquant.fake_quant_ops import _lsq_grads
from torch_oracle import arrays, assert_bitexact

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")

F32 = np.float32
RANGES = ((0, 255), (0, 127), (-128, 127), (-64, 63), (0, 15), (-127, 127),
          (-1000, 100000), (-(2 ** 31), 2 ** 31 - 1))
SHAPES = ((7,), (3, 5), (2, 3, 4))  # few shapes: each (shape, static args) compiles once


@st.composite
def scales(draw, n=None):
    """Normal float32 scales from 1e-8 to 1e4 (and a few extreme ones up to 2**126)."""
    kind = draw(st.sampled_from(["log", "log", "log", "extreme"]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    size = 1 if n is None else n
    if kind == "log":
        v = 10.0 ** rng.uniform(-8, 4, size)
    else:
        v = rng.choice([1e-30, 1e-20, 1e20, 1e30, 2.0 ** 126], size)
    v = v.astype(F32)
    return v[0] if n is None else v


@st.composite
def grid_or_random(draw, shape, scale):
    """Data on (and half-way between) the quantization grid of ``scale``, or random data."""
    if draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
        k = rng.integers(-600, 600, shape)
        jitter = rng.choice([0.0, 0.0, 1e-7, -1e-7, 3e-6], shape)
        x = ((k / 2 + jitter) * np.asarray(scale, np.float64)).astype(F32)
        x[np.abs(x) < np.finfo(F32).tiny] = 0
        return x
    return draw(arrays(shape, special=True))


# ----------------------------------------------------------------------------------------
# fake_quantize_per_tensor_affine
# ----------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("qmin", "qmax"))
def _jq_per_tensor(x, scale, zp, g, *, qmin, qmax):
    y, vjp = jax.vjp(lambda v: jq.fake_quantize_per_tensor_affine(v, scale, zp, qmin, qmax), x)
    return y, vjp(g)[0]


@settings(max_examples=60)
@given(st.sampled_from(RANGES), st.sampled_from(SHAPES[::2]), scales(), st.data())
def test_fake_quantize_per_tensor_forward_and_grad(qrange, shape, scale, data):
    qmin, qmax = qrange
    x = data.draw(grid_or_random(shape, scale))
    zp = data.draw(st.integers(qmin, qmax))
    g = data.draw(arrays(shape, kinds=("normal",), magnitudes=(1.0,)))
    assume(scale <= 2.0 ** 126 or not np.isinf(x).any())  # documented deviation below
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.fake_quantize_per_tensor_affine(tx, float(scale), zp, qmin, qmax)
    ty.backward(torch.from_numpy(g))
    # torch's tensor-qparams overload gives the same numbers
    ty2 = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), torch.tensor([scale]),
                                                torch.tensor([zp], dtype=torch.int32), qmin, qmax)
    assert_bitexact(ty2, ty, "torch overloads")
    zp_kind = data.draw(st.sampled_from(["int", "int32", "int64", "float"]))
    zp_arg = {"int": zp, "int32": jnp.array([zp], jnp.int32), "int64": np.array([zp], np.int64),
              "float": jnp.array([zp + (0.25 if zp >= 0 else -0.25)], jnp.float32)}[zp_kind]
    if zp_kind == "float" and abs(zp) > 2 ** 24:
        zp_arg = jnp.array([zp], jnp.int32)  # (float32 cannot hold it)
    scale_arg = float(scale) if data.draw(st.booleans()) else jnp.array([scale])
    y, gx = _jq_per_tensor(x, scale_arg, zp_arg, g, qmin=qmin, qmax=qmax)
    assert_bitexact(y, ty, "y", ftz=True)
    assert_bitexact(gx, tx.grad, "dx")


def test_fake_quantize_per_tensor_float_zero_point_truncates_like_torch():
    x = np.array([-1.0, 0.3, 0.5, 1.7, 2.5, -2.6], F32)
    for z in (2.7, -2.7, 0.99, -0.99):
        ty = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), torch.tensor([0.5]),
                                                   torch.tensor([z]), -8, 7)
        y = jq.fake_quantize_per_tensor_affine(x, jnp.array([0.5]), jnp.array([z], jnp.float32), -8, 7)
        assert_bitexact(y, ty, f"zp={z}")


def test_fake_quantize_per_tensor_huge_scale_deviation():
    """Documented: scale > 2**126 has a float32-subnormal reciprocal that XLA:CPU flushes.

    Finite inputs below 2**100 still match torch bit for bit; +-inf map like NaN (to
    ``(qmin - zp) * scale``) where torch maps +inf to ``(qmax - zp) * scale``.
    """
    scale = F32(3e38)
    x = np.array([0.0, 1.0, -5.0, 1e20, -1e30, 2.0 ** 99], F32)
    for qmin, qmax, zp in ((0, 255, 3), (-128, 127, 0)):
        ty = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), float(scale), zp, qmin, qmax)
        y = jax.jit(lambda v: jq.fake_quantize_per_tensor_affine(v, scale, zp, qmin, qmax))(x)
        assert_bitexact(y, ty, "finite")
        special = np.array([np.inf, -np.inf, np.nan], F32)
        y = jax.jit(lambda v: jq.fake_quantize_per_tensor_affine(v, scale, zp, qmin, qmax))(special)
        expected = np.full(3, F32(qmin - zp) * scale, F32)
        assert_bitexact(y, expected, "non-finite (documented)")


def test_fake_quantize_per_tensor_mask_boundaries():
    """REFERENCE 4.3: x = 1.27 -> grad 1, x = 1.275 -> 0 (rne(127.5) = 128), NaN/inf -> 0."""
    x = np.array([1.27, 1.275, -1.28, -1.285, np.nan, np.inf, -np.inf], F32)
    g = -np.arange(1, 8, dtype=F32)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.fake_quantize_per_tensor_affine(tx, 0.01, 0, -128, 127)
    ty.backward(torch.from_numpy(g))
    y, gx = _jq_per_tensor(x, 0.01, 0, g, qmin=-128, qmax=127)
    assert_bitexact(y, ty, "y")
    assert_bitexact(gx, tx.grad, "dx")  # -0.0 where masked, as torch's dY * mask


# ----------------------------------------------------------------------------------------
# fake_quantize_per_channel_affine
# ----------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("axis", "qmin", "qmax"))
def _jq_per_channel(x, scale, zp, g, *, axis, qmin, qmax):
    y, vjp = jax.vjp(lambda v: jq.fake_quantize_per_channel_affine(v, scale, zp, axis, qmin, qmax), x)
    return y, vjp(g)[0]


@settings(max_examples=60)
@given(st.sampled_from(RANGES), st.sampled_from(SHAPES[1:]), st.booleans(), st.data())
def test_fake_quantize_per_channel_forward_and_grad(qrange, shape, float_zp, data):
    qmin, qmax = qrange
    ndim = len(shape)
    axis = data.draw(st.integers(-ndim, ndim - 1))
    c = shape[axis]
    scale = data.draw(scales(c))
    assume(scale.max() <= 2.0 ** 126)
    x = data.draw(grid_or_random(shape, np.median(scale)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    if float_zp:  # embedding float qparams: any float, often .5 ties
        assume(qmax - qmin < 2 ** 20)
        zp = (np.round(rng.uniform(qmin, qmax, c) * 2) / 2).astype(F32)
        zp[::2] = rng.uniform(qmin, qmax, zp[::2].shape).astype(F32)
    else:
        zp = rng.integers(qmin, qmax, c, endpoint=True).astype(np.int32)
    g = data.draw(arrays(shape, kinds=("normal",), magnitudes=(1.0,)))
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.fake_quantize_per_channel_affine(tx, torch.from_numpy(scale), torch.from_numpy(zp),
                                                axis % ndim, qmin, qmax)
    ty.backward(torch.from_numpy(g))
    y, gx = _jq_per_channel(x, scale, zp, g, axis=axis, qmin=qmin, qmax=qmax)
    assert_bitexact(y, ty, "y", ftz=True)
    assert_bitexact(gx, tx.grad, "dx")


def test_fake_quantize_per_channel_reference_mask():
    """REFERENCE 4.4: per-tensor maps +inf to qmax, the int per-channel path to qmin."""
    x = np.array([[np.inf, -np.inf, np.nan, 1.0], [0.3, 300.0, -300.0, 2.5]], F32)
    g = -np.ones_like(x)
    for zp in (np.array([3, 200], np.int32), np.array([3.5, 0.25], F32)):
        tx = torch.tensor(x, requires_grad=True)
        ty = torch.fake_quantize_per_channel_affine(tx, torch.tensor([0.5, 0.25]),
                                                    torch.from_numpy(zp), 0, 0, 255)
        ty.backward(torch.from_numpy(g))
        y, gx = _jq_per_channel(x, np.array([0.5, 0.25], F32), zp, g, axis=0, qmin=0, qmax=255)
        assert_bitexact(y, ty, "y")
        assert_bitexact(gx, tx.grad, "dx")


# ----------------------------------------------------------------------------------------
# Learnable (LSQ) ops
# ----------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("qmin", "qmax"))
def _jq_lsq_tensor(x, scale, zp, g, gf, *, qmin, qmax):
    f = lambda v, s, z: jq.fake_quantize_learnable_per_tensor_affine(v, s, z, qmin, qmax, gf)
    y, vjp = jax.vjp(f, x, scale, zp)
    return (y, *vjp(g))


@functools.partial(jax.jit, static_argnames=("axis", "qmin", "qmax"))
def _jq_lsq_channel(x, scale, zp, g, gf, *, axis, qmin, qmax):
    f = lambda v, s, z: jq.fake_quantize_learnable_per_channel_affine(v, s, z, axis, qmin, qmax, gf)
    y, vjp = jax.vjp(f, x, scale, zp)
    return (y, *vjp(g))


def _assert_grad_sum(actual, expected, terms, what):
    """A sum of per-element terms: bit-exact for one term, else within the summation bound."""
    a = np.asarray(actual, np.float64)
    e = expected.detach().numpy().astype(np.float64)
    n_terms = terms.shape[-1]
    if n_terms == 1:
        # torch's sum starts from +0.0, so a single -0.0 term sums to +0.0.
        assert_bitexact(np.where(a == 0, 0.0, a).astype(F32), np.where(e == 0, 0.0, e).astype(F32), what)
        return
    bound = 1e-5 * np.abs(terms).sum(-1) + 1e-30
    assert np.all((np.abs(a - e) <= bound) | (np.isnan(a) & np.isnan(e))), (what, a, e, bound)


_jit_lsq_grads = jax.jit(_lsq_grads, static_argnums=(4, 5))


def _abs_terms(x, g, scale, zb, qmin, qmax, gf, axis=None):
    """|dScale_i|, |dZeroPoint_i| per element (jquant's per-element formula), reduced layout."""
    bshape = [1] * x.ndim
    if axis is not None:
        bshape[axis] = x.shape[axis]
    _, ds, dz = _jit_lsq_grads(jnp.asarray(x), jnp.asarray(g), jnp.asarray(scale).reshape(bshape),
                               jnp.asarray(zb).reshape(bshape), qmin, qmax, jnp.float32(gf))
    ds, dz = np.abs(np.asarray(ds)), np.abs(np.asarray(dz))
    if axis is None:
        return ds.reshape(1, -1), dz.reshape(1, -1)
    return (np.moveaxis(ds, axis, 0).reshape(x.shape[axis], -1),
            np.moveaxis(dz, axis, 0).reshape(x.shape[axis], -1))


LSQ_RANGES = ((0, 255), (-128, 127), (0, 15), (-8, 7))


@settings(max_examples=50)
@given(st.sampled_from(LSQ_RANGES[:3]), st.sampled_from(((1,), (2, 3, 4))),
       st.sampled_from((1.0, 0.5, 0.037)), st.data())
def test_learnable_per_tensor_forward_and_grads(qrange, shape, gf, data):
    qmin, qmax = qrange
    scale = np.array([data.draw(scales())], F32)
    assume(1e-6 < scale[0] < 1e3)
    x = data.draw(grid_or_random(shape, scale[0]))
    z = data.draw(st.sampled_from([qmin - 2.0, qmin, (qmin + qmax) / 2, qmax + 3.0, 2.5,
                                   qmin + 0.4999, qmax - 0.5]))
    zp = np.array([z], F32)
    g = data.draw(arrays(shape, kinds=("normal",), magnitudes=(1.0,)))
    tx, ts, tz = (torch.tensor(v, requires_grad=True) for v in (x, scale, zp))
    ty = torch._fake_quantize_learnable_per_tensor_affine(tx, ts, tz, qmin, qmax, gf)
    ty.backward(torch.from_numpy(g))
    y, gx, gs, gz = _jq_lsq_tensor(x, scale, zp, g, gf, qmin=qmin, qmax=qmax)
    assert_bitexact(y, ty, "y", ftz=True)
    assert_bitexact(gx, tx.grad, "dx")
    zb = np.trunc(np.clip(zp + F32(0.5), qmin, qmax)).astype(F32)  # torch's backward zero point
    ads, adz = _abs_terms(x, g, scale, zb, qmin, qmax, gf)
    _assert_grad_sum(gs, ts.grad, ads, "dscale")
    _assert_grad_sum(gz, tz.grad, adz, "dzero_point")


@settings(max_examples=40)
@given(st.sampled_from(LSQ_RANGES[::3]), st.sampled_from(((3, 1), (2, 3, 4))),
       st.sampled_from((1.0, 0.25)), st.data())
def test_learnable_per_channel_forward_and_grads(qrange, shape, gf, data):
    qmin, qmax = qrange
    axis = data.draw(st.integers(0, len(shape) - 1))
    c = shape[axis]
    scale = data.draw(scales(c))
    assume(1e-6 < scale.min() and scale.max() < 1e3)
    x = data.draw(grid_or_random(shape, np.median(scale)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    zp = (np.round(rng.uniform(qmin - 3, qmax + 3, c) * 2) / 2).astype(F32)
    g = data.draw(arrays(shape, kinds=("normal",), magnitudes=(1.0,)))
    tx, ts, tz = (torch.tensor(v, requires_grad=True) for v in (x, scale, zp))
    ty = torch._fake_quantize_learnable_per_channel_affine(tx, ts, tz, axis, qmin, qmax, gf)
    ty.backward(torch.from_numpy(g))
    y, gx, gs, gz = _jq_lsq_channel(x, scale, zp, g, gf, axis=axis, qmin=qmin, qmax=qmax)
    assert_bitexact(y, ty, "y", ftz=True)
    assert_bitexact(gx, tx.grad, "dx")
    zb = np.clip(np.round(zp), qmin, qmax).astype(F32)
    ads, adz = _abs_terms(x, g, scale, zb, qmin, qmax, gf, axis)
    _assert_grad_sum(gs, ts.grad, ads, "dscale")
    _assert_grad_sum(gz, tz.grad, adz, "dzero_point")


def test_learnable_reference_check_case():
    """REFERENCE 4.5: X, s = 0.1, zp = 2.5, range [0, 15], dY = 1..9 -> dX, dS 103.6, dZ -1."""
    x = np.array([-1, -.26, -.05, 0, .03, .26, .5, 1, 2], F32)
    g = np.arange(1, 10, dtype=F32)
    s, z = np.array([0.1], F32), np.array([2.5], F32)
    tx, ts, tz = (torch.tensor(v, requires_grad=True) for v in (x, s, z))
    torch._fake_quantize_learnable_per_tensor_affine(tx, ts, tz, 0, 15, 1.0).backward(torch.from_numpy(g))
    y, gx, gs, gz = _jq_lsq_tensor(x, s, z, g, 1.0, qmin=0, qmax=15)
    assert_bitexact(gx, tx.grad, "dx")
    np.testing.assert_array_equal(np.asarray(gx), [0, 2, 3, 4, 5, 6, 7, 8, 0])
    np.testing.assert_allclose(np.asarray(gs), ts.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gs), [103.6], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gz), tz.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gz), [-1.0], rtol=1e-6)
    # the same data per channel (zero point 3 = torch's rounded 2.5 + 0.5) gives the same grads
    x2, g2, z2 = x.reshape(1, 9), g.reshape(1, 9), np.array([3.0], F32)
    tx, ts, tz = (torch.tensor(v, requires_grad=True) for v in (x2, s, z2))
    torch._fake_quantize_learnable_per_channel_affine(tx, ts, tz, 0, 0, 15, 1.0).backward(torch.from_numpy(g2))
    y, gx, gs, gz = _jq_lsq_channel(x2, s, z2, g2, 1.0, axis=0, qmin=0, qmax=15)
    assert_bitexact(gx, tx.grad, "dx")
    np.testing.assert_allclose(np.asarray(gs), ts.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gz), tz.grad.numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------------------
# quantize / dequantize vs int_repr() / dequantize()
# ----------------------------------------------------------------------------------------

_TORCH_Q = {"uint8": torch.quint8, "int8": torch.qint8, "int32": torch.qint32,
            "uint4": torch.quint4x2}
_STORAGE = {"uint8": (0, 255), "int8": (-128, 127), "int32": (-(2 ** 31), 2 ** 31 - 1),
            "uint4": (0, 15)}


def _int_repr(tq):
    r = tq.int_repr()
    if tq.dtype == torch.quint4x2:  # two 4-bit values per byte, low nibble first
        b = r.numpy().astype(np.int64).reshape(-1)
        return np.stack([b & 15, b >> 4], -1).reshape(-1)[:tq.numel()].reshape(tq.shape)
    return r.numpy()


@functools.partial(jax.jit, static_argnames=("dtype",))
def _jq_quant_tensor(x, scale, zp, *, dtype):
    q = jq.quantize_per_tensor(x, scale, zp, dtype)
    return q, jq.dequantize(q, scale, zp)


@functools.partial(jax.jit, static_argnames=("axis", "dtype"))
def _jq_quant_channel(x, scale, zp, *, axis, dtype):
    q = jq.quantize_per_channel(x, scale, zp, axis, dtype)
    return q, jq.dequantize(q, scale, zp, axis)


@settings(max_examples=50)
@given(st.sampled_from(("uint8", "int8", "int32", "uint4")), st.sampled_from(SHAPES[::2]), st.data())
def test_quantize_per_tensor_and_dequantize(dname, shape, data):
    lo, hi = _STORAGE[dname]
    scale = data.draw(scales())
    assume(1e-6 < scale < 1e3)
    x = data.draw(grid_or_random(shape, scale))
    if dname == "int32":  # spread over the int32 range
        x = (x * data.draw(st.sampled_from([1.0, 1e3, 1e5]))).astype(F32)
    zp = data.draw(st.integers(max(lo, -(10 ** 9)), min(hi, 10 ** 9)))
    tq = torch.quantize_per_tensor(torch.from_numpy(x), float(scale), zp, _TORCH_Q[dname])
    q, dq = _jq_quant_tensor(x, scale, zp, dtype=np.dtype(getattr(jnp, dname)))
    assert q.dtype == np.dtype(getattr(jnp, dname))
    assert_bitexact(np.asarray(q).astype(np.int64), _int_repr(tq), "int_repr")
    assert_bitexact(dq, tq.dequantize(), "dequantize", ftz=True)


@settings(max_examples=50)
@given(st.sampled_from(("uint8", "int8", "int32", "uint8f", "uint4f")),
       st.sampled_from(SHAPES[1:]), st.data())
def test_quantize_per_channel_and_dequantize(dname, shape, data):
    float_zp = dname.endswith("f")
    dname = dname.rstrip("f")
    lo, hi = _STORAGE[dname]
    ndim = len(shape)
    axis = data.draw(st.integers(0, ndim - 1))
    c = shape[axis]
    scale = data.draw(scales(c))
    assume(1e-6 < scale.min() and scale.max() < 1e3)
    x = data.draw(grid_or_random(shape, np.median(scale)))
    if dname == "int32":
        x = (x * data.draw(st.sampled_from([1.0, 1e3, 1e5]))).astype(F32)
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    if float_zp:
        zp = (np.round(rng.uniform(lo, hi, c) * 4) / 4).astype(F32)
    else:
        zp = rng.integers(max(lo, -(10 ** 9)), min(hi, 10 ** 9), c, endpoint=True).astype(np.int32)
    t_scale = torch.from_numpy(scale) if float_zp else torch.from_numpy(scale.astype(np.float64))
    tq = torch.quantize_per_channel(torch.from_numpy(x), t_scale, torch.from_numpy(zp), axis,
                                    _TORCH_Q[dname])
    q, dq = _jq_quant_channel(x, scale, zp, axis=axis, dtype=np.dtype(getattr(jnp, dname)))
    assert_bitexact(np.asarray(q).astype(np.int64), _int_repr(tq), "int_repr")
    assert_bitexact(dq, tq.dequantize(), "dequantize", ftz=True)


@pytest.mark.parametrize("dname", ("uint8", "int8", "int32", "uint4"))
def test_quantize_non_finite_like_torch(dname):
    """NaN / inf / out-of-range handling of torch's x86 kernels (per tensor and per channel)."""
    x = np.array([[np.nan, np.inf, -np.inf, 1e30, -1e30, 3e9, -3e9, 0.3, 2.6] * 2] * 2, F32)
    dt = np.dtype(getattr(jnp, dname))
    tq = torch.quantize_per_tensor(torch.from_numpy(x), 0.5, 3, _TORCH_Q[dname])
    q, dq = _jq_quant_tensor(x, F32(0.5), 3, dtype=dt)
    assert_bitexact(np.asarray(q).astype(np.int64), _int_repr(tq), "per tensor")
    assert_bitexact(dq, tq.dequantize(), "per tensor dequantize")
    scale = np.array([0.5, 0.25], F32)
    if dname != "uint4":
        tq = torch.quantize_per_channel(torch.from_numpy(x), torch.from_numpy(scale.astype(np.float64)),
                                        torch.tensor([3, 5]), 0, _TORCH_Q[dname])
        q, dq = _jq_quant_channel(x, scale, np.array([3, 5], np.int32), axis=0, dtype=dt)
        assert_bitexact(np.asarray(q).astype(np.int64), _int_repr(tq), "per channel")
        assert_bitexact(dq, tq.dequantize(), "per channel dequantize")
    if dname in ("uint8", "uint4"):
        zp = np.array([3.5, 1.25], F32)
        tq = torch.quantize_per_channel(torch.from_numpy(x), torch.from_numpy(scale),
                                        torch.from_numpy(zp), 0, _TORCH_Q[dname])
        q, dq = _jq_quant_channel(x, scale, zp, axis=0, dtype=dt)
        assert_bitexact(np.asarray(q).astype(np.int64), _int_repr(tq), "float zp")
        assert_bitexact(dq, tq.dequantize(), "float zp dequantize")
