"""jquant.linen.convert (issue [4]): integer inference from prepared Linen models.

* A small CNN (quant -> conv-bn-relu -> conv -> relu -> dense -> dequant), PTQ and QAT:
  the converted model matches the fake-quant (QAT) / float (PTQ) model within a
  quantization step on most elements, with int8 weights, ~4x fewer parameter bytes.
* One Linear / Conv layer in a QuantWrapper vs torch eager's converted ``nnq`` module, bit
  for bit (x86 with reduce_range activations, qnnpack). Weights and inputs are dyadic
  rationals, so the float GEMM is exact in both libraries and the calibrated output ranges
  agree (torch is the oracle, run here).
* Embedding / EmbeddingBag convert halves of the seed's embedding QAT tests.
* Friendly error before calibration; jax.export round trip in a fresh process.
"""
from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import textwrap
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.ao.quantization as tq

import jquant as jq
import jquant.linen as jl
from jquant import quantized as Q
from linen_models import ParityCNN

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
F32 = np.float32


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(F32))


def _calibrate(model, v, xs, train=True):
    step = jax.jit(lambda v_, x_: model.apply(v_, x_, train,
                                              mutable=["quant_stats", "batch_stats"])[1])
    for x in xs:
        v = {**v, **step(v, x)}
    return v


def _within_step(y, ref, step, frac=0.9):
    d = np.abs(np.asarray(y) - np.asarray(ref))
    return float(np.mean(d <= step * 1.001 + 1e-6)), d.max()


@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_cnn_convert(mode):
    xs = [_x((8, 8, 8, 1), s) for s in range(3)]
    if mode == "qat":
        model = jl.prepare_qat(ParityCNN(), jq.get_default_qat_qconfig("x86"),
                               fuse=[("conv1", "bn1", "relu1")])
    else:
        model = jl.prepare(ParityCNN(), jq.QConfig(
            activation=jq.MinMaxObserver.with_args(reduce_range=True),
            weight=jq.default_per_channel_weight_observer))
    v = model.init(jax.random.key(0), xs[0])
    with pytest.raises(ValueError, match="has not seen any data"):
        jl.convert(model, v)
    v = _calibrate(model, v, xs)
    ref = jax.jit(lambda a, b: model.apply(a, b, False))(v, xs[0])   # fake quant / float, frozen
    qm, qv = jl.convert(model, v)
    y = jax.jit(lambda a, b: qm.apply(a, b, False))(qv, xs[0])
    packed = qv["quantized"]["fc"]["packed"]
    assert packed.weight.dtype == jnp.int8 and packed.weight.shape == (10, 512)
    assert qv["quantized"]["conv1"]["packed"].weight.dtype == jnp.int8
    if mode == "qat":
        assert "bn1" not in qv["params"] and "batch_stats" not in qv   # folded
    step = float(packed.scale)
    # the dequantized output lies on the output grid
    k = (np.asarray(y) / step) + int(packed.zero_point)
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)
    frac, dmax = _within_step(y, ref, step)
    assert frac >= (0.9 if mode == "qat" else 0.6), (frac, dmax)
    assert dmax <= 6 * step
    fb, qb = jl.parameter_bytes(v), jl.parameter_bytes(qv)
    print(f"\n{mode}: within one step {frac:.3f}, max |diff| {dmax:.4f} (step {step:.4f}); "
          f"bytes float {fb} -> converted {qb} ({fb / qb:.2f}x)")
    assert fb / qb > 3.0


def test_ptq_fuse_conv_bn_relu_matches_torch_fuse_modules():
    """PTQ with ``fuse`` (torch's eval-mode ``fuse_modules`` + ``prepare`` + ``convert``):
    one observer after conv1-bn1-relu1, BatchNorm folded at convert; the same qparams and
    converted outputs as torch within float rounding (torch observes the folded conv's
    float output, jquant conv then BatchNorm: equal up to an ulp or so)."""
    import torch_models as tm
    from linen_models import parity_variables
    rng = np.random.default_rng(5)
    w = tm.parity_cnn_weights(rng)
    w["bn1"]["mean"] = rng.normal(0, 0.3, 8).astype(F32)
    w["bn1"]["var"] = rng.uniform(0.5, 2.0, 8).astype(F32)
    xs = [np.asarray(_x((8, 8, 8, 1), s)) for s in range(3)]
    jqc = jq.QConfig(activation=jq.MinMaxObserver.with_args(reduce_range=True),
                     weight=jq.default_per_channel_weight_observer)
    model = jl.prepare(ParityCNN(), jqc, fuse=[("conv1", "bn1", "relu1")])
    params, stats = parity_variables(w)
    v = model.init(jax.random.key(0), jnp.asarray(xs[0]), False)
    v = {**v, "params": params, "batch_stats": stats}
    v = _calibrate(model, v, [jnp.asarray(x) for x in xs], train=False)
    assert "bn1" not in v["quant_stats"] and "relu1" not in v["quant_stats"]
    with pytest.raises(ValueError, match="use_running_average=True"):
        model.apply(v, jnp.asarray(xs[0]), True, mutable=["quant_stats", "batch_stats"])
    qm, qv = jl.convert(model, v)
    assert "bn1" not in qv["params"] and "batch_stats" not in qv
    y = np.asarray(jax.jit(lambda a, b: qm.apply(a, b, False))(qv, jnp.asarray(xs[0])))

    t = tm.float_parity_cnn(w).eval()
    t = tq.fuse_modules(t, [["conv1", "bn1", "relu1"]])
    t.qconfig = tq.QConfig(activation=tq.MinMaxObserver.with_args(reduce_range=True),
                           weight=tq.default_per_channel_weight_observer)
    with engine("x86"), torch.no_grad():
        tq.prepare(t, inplace=True)
        for x in xs:
            t(torch.from_numpy(x))
        ts, tz = t.conv1.activation_post_process.calculate_qparams()
        tqm = tq.convert(t)
        ty = tqm(torch.from_numpy(xs[0])).numpy()
    js, jz = jl.get_observer_dict(model, v)["conv1.activation_post_process"].calculate_qparams()
    np.testing.assert_allclose(np.asarray(js), ts.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(jz), tz.numpy())
    step = float(qv["quantized"]["fc"]["packed"].scale)
    frac, dmax = _within_step(y, ty, step)
    assert frac >= 0.95 and dmax <= 2 * step, (frac, dmax, step)


# ----------------------------------------------------------------------------------------
# single-layer torch parity
# ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def engine(name):
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def dyadic(rng, shape, denom, k):
    return (rng.integers(-k, k + 1, size=shape) / denom).astype(F32)


def qconfigs(backend):
    if backend == "x86":
        return (tq.QConfig(activation=tq.MinMaxObserver.with_args(reduce_range=True),
                           weight=tq.default_per_channel_weight_observer),
                jq.QConfig(activation=jq.MinMaxObserver.with_args(reduce_range=True),
                           weight=jq.default_per_channel_weight_observer))
    return (tq.QConfig(activation=tq.MinMaxObserver, weight=tq.default_weight_observer),
            jq.QConfig(activation=jq.MinMaxObserver, weight=jq.default_weight_observer))


def layer_case(kind, rng):
    """(torch module, flax module, flax params, input shape NHWC/NC, to_torch_x, from_torch_y)."""
    if kind == "linear":
        w, b = dyadic(rng, (8, 16), 64, 32), dyadic(rng, (8,), 64, 32)
        tm = torch.nn.Linear(16, 8)
        fm = nn.Dense(8)
        params = {"kernel": w.T.copy(), "bias": b}
        return tm, fm, params, (6, 16), w, b, (lambda a: a), (lambda a: a)
    w, b = dyadic(rng, (4, 3, 3, 3), 64, 32), dyadic(rng, (4,), 64, 32)
    tm = torch.nn.Conv2d(3, 4, 3, padding=1)
    fm = nn.Conv(4, (3, 3), padding=1)
    params = {"kernel": np.transpose(w, (2, 3, 1, 0)).copy(), "bias": b}
    return (tm, fm, params, (2, 6, 6, 3), w, b, (lambda a: np.transpose(a, (0, 3, 1, 2))),
            (lambda a: np.transpose(a, (0, 2, 3, 1))))


def torch_convert(tm, w, b, tqc, calib, test_x, eng):
    with engine(eng), torch.no_grad():
        tm.weight.copy_(torch.from_numpy(w))
        tm.bias.copy_(torch.from_numpy(b))
        m = tq.QuantWrapper(copy.deepcopy(tm)).eval()
        m.qconfig = tqc
        tq.prepare(m, inplace=True)
        for x in calib:
            m(torch.from_numpy(x))
        qm = tq.convert(m)
        return qm(torch.from_numpy(test_x)).numpy()


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_single_layer_matches_torch_bit_exact(kind, backend):
    rng = np.random.default_rng(7)
    tm, fm, params, shape, w, b, to_t, from_t = layer_case(kind, rng)
    calib = [dyadic(rng, shape, 16, 32) for _ in range(2)]
    test_x = dyadic(rng, shape, 16, 40)            # a little outside the calibrated range
    tqc, jqc = qconfigs(backend)
    want = from_t(torch_convert(tm, w, b, tqc, [to_t(c) for c in calib], to_t(test_x), backend))
    model = jl.prepare(jl.QuantWrapper(module=fm), jqc)
    v = model.init(jax.random.key(0), jnp.asarray(calib[0]))
    v = {**v, "params": {"module": {k: jnp.asarray(a) for k, a in params.items()}}}
    for c in calib:
        _, upd = model.apply(v, jnp.asarray(c), mutable=["quant_stats"])
        v = {**v, **upd}
    qm, qv = jl.convert(model, v, backend=backend)
    got = np.asarray(jax.jit(qm.apply)(qv, jnp.asarray(test_x)))
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.astype(F32).view(np.uint32))


# ----------------------------------------------------------------------------------------
# embeddings (seed: test_embedding_bag_qat_config / test_embedding_qat_config, convert half)
# ----------------------------------------------------------------------------------------

class BagPair(nn.Module):
    @nn.compact
    def __call__(self, idx):
        a = jl.EmbeddingBag(10, 12, mode="sum", include_last_offset=True, name="emb1")(idx)
        b = jl.EmbeddingBag(10, 12, mode="sum", include_last_offset=True, name="emb2")(idx)
        return jnp.concatenate([a, b])


@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_bag_qat_convert(bits):
    qc = jq.default_embedding_qat_qconfig if bits == 8 else jq.default_embedding_qat_qconfig_4bit
    idx = jnp.asarray(np.random.default_rng(0).integers(0, 10, (5, 12)), jnp.int32)
    model = jl.prepare_qat(BagPair(), qc)
    v = model.init(jax.random.key(0), idx)
    ref, upd = model.apply(v, idx, mutable=["quant_stats"])
    v = {**v, **upd}
    qm, qv = jl.convert(model, v)
    for name in ("emb1", "emb2"):
        p = qv["quantized"][name]["packed"]
        assert isinstance(p, Q.PackedEmbedding) and p.bits == bits
        assert p.weight.dtype == jnp.uint8
        assert p.weight.shape == ((10, 12) if bits == 8 else (10, 6))
        assert p.scale.dtype == (jnp.float32 if bits == 8 else jnp.float16)
        assert name not in qv["params"]
    y = qm.apply(qv, idx)
    assert y.shape == (10, 12) and y.dtype == jnp.float32
    tol = 1e-4 if bits == 8 else 0.05   # 4-bit: torch's fp16 scale / bias rounding
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=tol * 12)


class EmbLinear(nn.Module):
    """DeFusedEmbeddingBagLinear: Embed(10, 12) -> QuantStub -> Dense(1) -> DeQuantStub."""

    @nn.compact
    def __call__(self, idx):
        x = nn.Embed(10, 12, name="emb")(idx)
        x = jl.QuantStub(name="quant")(x)
        return jl.DeQuantStub(name="dequant")(nn.Dense(1, name="linear")(x))


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_embedding_linear_qat_convert(backend):
    spec = {"": jq.get_default_qat_qconfig(backend), "emb": jq.default_embedding_qat_qconfig}
    idx = jnp.asarray(np.random.default_rng(1).integers(0, 10, (5, 12)), jnp.int32)
    model = jl.prepare_qat(EmbLinear(), spec)
    v = model.init(jax.random.key(0), idx)
    step = jax.jit(lambda a, b: model.apply(a, b, mutable=["quant_stats"])[1])
    for _ in range(2):
        v = {**v, **step(v, idx)}
    ref = jax.jit(model.apply)(v, idx)
    qm, qv = jl.convert(model, v, backend=backend)
    q = qv["quantized"]
    assert isinstance(q["emb"]["packed"], Q.PackedEmbedding) and q["emb"]["packed"].bits == 8
    assert isinstance(q["linear"]["packed"], Q.PackedLinear)
    assert q["linear"]["packed"].weight.dtype == jnp.int8
    assert set(q["quant"]) == {"scale", "zero_point"}
    y = np.asarray(qm.apply(qv, idx))
    step = float(q["linear"]["packed"].scale)
    assert y.shape == (5, 12, 1)
    assert np.mean(np.abs(y - np.asarray(ref)) <= step * 1.001) >= 0.9


def test_errors():
    with pytest.raises(ValueError, match="prepare"):
        jl.convert(ParityCNN(), {})
    model = jl.prepare(ParityCNN(), jq.default_qconfig)
    with pytest.raises(ValueError, match="traced"):
        jl.convert(model, {})
    x = _x((2, 8, 8, 1))
    v = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="backend"):
        jl.convert(model, v, backend="cuda")


# ----------------------------------------------------------------------------------------
# jax.export round trip
# ----------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import sys, numpy as np, jax, jax.numpy as jnp
    from jax import export
    blob = open(sys.argv[1], "rb").read()
    exp = export.deserialize(bytearray(blob))
    data = np.load(sys.argv[2])
    args = [jnp.asarray(data[f"a{i}"]) for i in range(len(data.files) - 1)]
    out = np.asarray(exp.call(*args))
    assert np.array_equal(out.view(np.uint32), data["want"].view(np.uint32)), "mismatch"
    print("OK", out.shape)
""")


def test_export_roundtrip_fresh_process(tmp_path):
    xs = [_x((4, 8, 8, 1), s) for s in range(2)]
    model = jl.prepare_qat(ParityCNN(), jq.get_default_qat_qconfig("x86"),
                           fuse=[("conv1", "bn1", "relu1")])
    v = _calibrate(model, model.init(jax.random.key(0), xs[0]), xs)
    qm, qv = jl.convert(model, v)
    leaves, treedef = jax.tree.flatten(qv)

    def fwd(x, *ls):
        return qm.apply(jax.tree.unflatten(treedef, ls), x, False)

    exp = jax.export.export(jax.jit(fwd))(xs[1], *leaves)
    want = np.asarray(fwd(xs[1], *leaves))
    (tmp_path / "f.bin").write_bytes(exp.serialize())
    np.savez(tmp_path / "d.npz", want=want, a0=np.asarray(xs[1]),
             **{f"a{i + 1}": np.asarray(l) for i, l in enumerate(leaves)})
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "f.bin"),
                        str(tmp_path / "d.npz")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK" in r.stdout
