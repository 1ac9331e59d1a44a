"""jquant.nnx.convert (issue [4]): integer inference from prepared NNX models.

Mirrors tests/test_convert_linen.py: a small CNN PTQ / QAT converted vs its fake-quant /
float model, one Linear / Conv vs torch eager's converted module bit for bit (torch run
here as the oracle), embedding convert halves of the seed tests, errors, and the seed's
QAT "convert a copy after each epoch" flow.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jquant as jq
import jquant.nnx as jqn
from jquant import quantized as Q
import importlib

C = importlib.import_module("jquant.nnx.convert")  # the module (jquant.nnx.convert is the function)
from test_convert_linen import dyadic, layer_case, qconfigs, torch_convert
from test_nnx_digits import FUSE, DigitsCNN

warnings.filterwarnings("ignore")
F32 = np.float32


_fwd = nnx.jit(lambda m, x: m(x))


def _x(shape, seed=0, uniform=False):
    rng = np.random.default_rng(seed)
    a = rng.uniform(size=shape) if uniform else rng.normal(size=shape)
    return jnp.asarray(a.astype(F32))


@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_cnn_convert(mode):
    xs = [_x((16, 8, 8, 1), s, uniform=True) for s in range(3)]
    m = DigitsCNN(c1=4, c2=8, width=16)
    if mode == "qat":
        p = jqn.prepare_qat(m, jq.get_default_qat_qconfig("x86"), fuse=FUSE)
    else:
        m.eval()
        p = jqn.prepare(jqn.fuse_modules(m, FUSE), jq.QConfig(
            activation=jq.MinMaxObserver.with_args(reduce_range=True),
            weight=jq.default_per_channel_weight_observer))
    with pytest.raises(ValueError, match="has not seen any data"):
        jqn.convert(p)
    for x in xs:
        _fwd(p, x)
    p.eval()
    ref = _fwd(p, xs[0])
    q = jqn.convert(p)
    assert isinstance(q.quant, C.Quantize) and isinstance(q.dequant, C.DeQuantize)
    assert isinstance(q.conv1, C.QuantizedConv) and q.conv1.relu
    assert isinstance(q.fc2, C.QuantizedLinear) and not q.fc2.relu
    assert q.conv1.weight[...].dtype == jnp.int8 and q.fc1.weight[...].dtype == jnp.int8
    y = _fwd(q, xs[0])
    step = float(q.fc2.scale[...])
    d = np.abs(np.asarray(y) - np.asarray(ref))
    frac = float(np.mean(d <= step * 1.001 + 1e-6))
    assert frac >= (0.9 if mode == "qat" else 0.6), (frac, d.max())
    assert d.max() <= 6 * step
    fb, qb = jqn.parameter_bytes(m), jqn.parameter_bytes(q)
    print(f"\n{mode}: within one step {frac:.3f}; bytes float {fb} -> converted {qb} "
          f"({fb / qb:.2f}x)")
    assert fb / qb > 3.0
    # the prepared model is untouched (convert works on a clone)
    assert isinstance(p.conv1, jqn.modules.QATConvBnReLU if mode == "qat" else nnx.Conv)


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_single_layer_matches_torch_bit_exact(kind, backend):
    rng = np.random.default_rng(7)
    tm, _, params, shape, w, b, to_t, from_t = layer_case(kind, rng)
    calib = [dyadic(rng, shape, 16, 32) for _ in range(2)]
    test_x = dyadic(rng, shape, 16, 40)
    tqc, jqc = qconfigs(backend)
    want = from_t(torch_convert(tm, w, b, tqc, [to_t(c) for c in calib], to_t(test_x), backend))
    r = nnx.Rngs(0)
    layer = nnx.Linear(16, 8, rngs=r) if kind == "linear" else nnx.Conv(3, 4, (3, 3), padding=1,
                                                                         rngs=r)
    layer.kernel[...] = jnp.asarray(params["kernel"])
    layer.bias[...] = jnp.asarray(params["bias"])
    p = jqn.prepare(jqn.QuantWrapper(layer), jqc)
    for c in calib:
        p(jnp.asarray(c))
    q = jqn.convert(p, backend=backend)
    got = np.asarray(q(jnp.asarray(test_x)))
    np.testing.assert_array_equal(got.view(np.uint32), want.astype(F32).view(np.uint32))


class BagPair(nnx.Module):
    def __init__(self):
        r = nnx.Rngs(0)
        self.emb1 = jqn.EmbeddingBag(10, 12, mode="sum", include_last_offset=True, rngs=r)
        self.emb2 = jqn.EmbeddingBag(10, 12, mode="sum", include_last_offset=True, rngs=r)

    def __call__(self, idx):
        return jnp.concatenate([self.emb1(idx), self.emb2(idx)])


@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_bag_qat_convert(bits):
    qc = jq.default_embedding_qat_qconfig if bits == 8 else jq.default_embedding_qat_qconfig_4bit
    idx = jnp.asarray(np.random.default_rng(0).integers(0, 10, (5, 12)), jnp.int32)
    p = jqn.prepare_qat(BagPair(), qc)
    ref = p(idx)
    q = jqn.convert(p)
    for mod in (q.emb1, q.emb2):
        assert isinstance(mod, C.QuantizedEmbeddingBag)
        pk = mod.packed()
        assert pk.bits == bits and pk.weight.dtype == jnp.uint8
        assert pk.weight.shape == ((10, 12) if bits == 8 else (10, 6))
        assert pk.scale.dtype == (jnp.float32 if bits == 8 else jnp.float16)
    y = q(idx)
    assert y.shape == (10, 12)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=(1e-4 if bits == 8 else 0.05) * 12)


class EmbLinear(nnx.Module):
    def __init__(self):
        r = nnx.Rngs(0)
        self.emb = nnx.Embed(10, 12, rngs=r)
        self.quant = jqn.QuantStub()
        self.linear = nnx.Linear(12, 1, rngs=r)
        self.dequant = jqn.DeQuantStub()

    def __call__(self, idx):
        return self.dequant(self.linear(self.quant(self.emb(idx))))


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_embedding_linear_qat_convert(backend):
    spec = {"": jq.get_default_qat_qconfig(backend), "emb": jq.default_embedding_qat_qconfig}
    idx = jnp.asarray(np.random.default_rng(1).integers(0, 10, (5, 12)), jnp.int32)
    p = jqn.prepare_qat(EmbLinear(), spec)
    for _ in range(2):
        _fwd(p, idx)
    jq.disable_observer(p)
    ref = _fwd(p, idx)
    q = jqn.convert(p, backend=backend)
    assert isinstance(q.emb, C.QuantizedEmbedding) and q.emb.packed().bits == 8
    assert isinstance(q.linear, C.QuantizedLinear) and q.linear.weight[...].dtype == jnp.int8
    assert isinstance(q.quant, C.Quantize)
    y = np.asarray(q(idx))
    step = float(q.linear.scale[...])
    assert np.mean(np.abs(y - np.asarray(ref)) <= step * 1.001) >= 0.9


def test_errors():
    with pytest.raises(ValueError, match="backend"):
        jqn.convert(EmbLinear(), backend="cuda")
    # an unprepared model converts to itself (nothing to quantize), stubs become (de)quantize
    q = jqn.convert(EmbLinear())
    assert isinstance(q.linear, nnx.Linear) and isinstance(q.quant, nnx.Module)


# ----------------------------------------------------------------------------------------
# the seed's QAT loop that converts a copy after every epoch (test_qat_data_parallel's model)
# ----------------------------------------------------------------------------------------

class SeedNet(nnx.Module):
    def __init__(self):
        r = nnx.Rngs(0)
        self.quant = jqn.QuantStub()
        self.conv1 = nnx.Conv(3, 1, (1, 1), use_bias=False, rngs=r)
        self.bn1 = nnx.BatchNorm(1, momentum=0.9, rngs=r)
        self.relu = nnx.relu
        self.conv2 = nnx.Conv(1, 2, (3, 3), strides=2, padding=1, use_bias=False, rngs=r)
        self.bn2 = nnx.BatchNorm(2, momentum=0.9, rngs=r)
        self.dequant = jqn.DeQuantStub()

    def __call__(self, x):
        x = self.quant(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        x = jnp.mean(x, axis=(1, 2))          # AvgPool2d(14) on the 14x14 map
        return self.dequant(jax.nn.sigmoid(x))


@nnx.jit
def _step(model, opt, x):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    opt.update(model, grads)
    return loss


def test_qat_convert_after_each_epoch():
    p = jqn.prepare_qat(SeedNet(), jq.get_default_qat_qconfig("fbgemm"),
                        fuse=[("conv1", "bn1", "relu"), ("conv2", "bn2")])
    p.train()
    opt = nnx.Optimizer(p, optax.sgd(0.01), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    for epoch in range(3):
        for _ in range(2):
            _step(p, opt, jnp.asarray(rng.uniform(size=(2, 28, 28, 3)).astype(F32)))
        if epoch == 1:
            jq.disable_observer(p)
        if epoch == 2:
            jqn.freeze_bn_stats(p)
        q = jqn.convert(p, backend="fbgemm")      # a converted copy; training goes on
        assert isinstance(q.conv1, C.QuantizedConv) and isinstance(q.conv2, C.QuantizedConv)
        x = jnp.asarray(rng.uniform(size=(2, 28, 28, 3)).astype(F32))
        y = _fwd(q, x)
        p.eval()
        ref = _fwd(p, x)
        p.train()
        assert y.shape == (2, 2) and np.all(np.isfinite(np.asarray(y)))
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=0.05)
    assert isinstance(p.conv1, jqn.modules.QATConvBnReLU)


@pytest.mark.parametrize("nd", [1, 3])
def test_conv_1d_3d_convert(nd):
    r = nnx.Rngs(0)
    k = (3,) * nd
    model = nnx.Sequential(jqn.QuantStub(), nnx.Conv(2, 4, k, padding="SAME", rngs=r),
                           nnx.Conv(4, 3, k, strides=2, padding="VALID", rngs=r),
                           jqn.DeQuantStub())
    p = jqn.prepare_qat(model, jq.get_default_qat_qconfig("qnnpack"))
    shape = (2,) + ((7,) if nd == 1 else (5, 5, 5)) + (2,)
    for s in range(2):
        _fwd(p, _x(shape, s))
    jq.disable_observer(p)
    ref = _fwd(p, _x(shape, 5))
    q = jqn.convert(p, backend="qnnpack")
    y = _fwd(q, _x(shape, 5))
    step = float(q.layers[2].scale[...])
    assert y.shape == ref.shape
    assert np.mean(np.abs(np.asarray(y) - np.asarray(ref)) <= step * 1.001) >= 0.9
