"""Converted-module math (jquant.quantized) against torch 2.13's quantized modules.

Every parity test builds the torch float module and the jquant inputs from the same float
weights and the same calibration batches, converts the torch module with torch's own eager
workflow (QuantWrapper / prepare / calibrate / convert, or prepare_qat / train / convert),
computes qparams on the jquant side with jquant's observers, and compares integers
(``int_repr``) and float outputs bit for bit.

The activation observer of a module watches the float module's output. That float output
is taken from torch (a forward hook during calibration): the float GEMM's summation order
(MKL vs XLA) is not part of the converted module's math, and a one-ulp different maximum
would change the output scale. The jquant observer still computes the qparams itself.

Requantization rules (see jquant/quantized.py): torch's x86 engine runs Linear through
fbgemm and Conv through oneDNN on AVX512-VNNI CPUs (fbgemm elsewhere) —
``Q.x86_conv_requant`` tells which. With full 8-bit activations fbgemm's pairwise int16
accumulation can saturate: there jquant is checked against the exact formula (an
independent numpy implementation) and torch's deviations are counted and printed.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.ao.nn.quantized as nnq
import torch.ao.quantization as tq
import torch.nn as tnn

import jquant as jq
from jquant import _numerics as nm
from jquant import quantized as Q

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
F32 = np.float32
RNG = np.random.default_rng(1234)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def engine(name):
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def npa(t):
    return t.detach().cpu().numpy()


def bits_equal(a, b):
    """Same shape and the same float32 bit patterns (integers: the same values)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return np.array_equal(a.astype(F32).view(np.uint32), b.astype(F32).view(np.uint32))
    return np.array_equal(a.astype(np.int64), b.astype(np.int64))


def torch_ptq(float_mod, qconfig, calib, eng, fuse=None):
    """torch eager PTQ of ``float_mod`` wrapped in QuantWrapper; returns (qmodel, float outputs)."""
    with engine(eng):
        model = tq.QuantWrapper(copy.deepcopy(float_mod)).eval()
        if fuse:
            tq.fuse_modules(model.module, fuse, inplace=True)
        model.qconfig = qconfig
        tq.prepare(model, inplace=True)
        outs = []
        h = model.module.register_forward_hook(lambda m, i, o: outs.append(npa(o).copy()))
        with torch.no_grad():
            for x in calib:
                model(torch.from_numpy(x))
        h.remove()
        return tq.convert(model), outs, model


@functools.partial(jax.jit, static_argnums=0)
def _obs_update(obs, st, x):
    return obs.update(st, x)


def jq_observe(factory, arrays):
    """jquant observer on the calibration arrays -> (scale, zero_point) as torch's from_float."""
    obs = factory()
    st = obs.init(jnp.asarray(arrays[0]))
    for a in arrays:
        st = _obs_update(obs, st, jnp.asarray(a))
    return Q.activation_qparams(obs, st)


def torch_weight_q(qw):
    """(int values, scale, zero_point) of torch's quantized weight."""
    iv = npa(qw.int_repr())
    if qw.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return iv, npa(qw.q_per_channel_scales()).astype(F32), npa(qw.q_per_channel_zero_points())
    return iv, np.array([qw.q_scale()], F32), np.array([qw.q_zero_point()])


def jq_qconfig(act, weight):
    return jq.QConfig(activation=act, weight=weight)


# configurations: (torch engine, torch qconfig, jquant qconfig)
MINMAX_X86 = ("x86",
              tq.QConfig(activation=tq.MinMaxObserver.with_args(reduce_range=True),
                         weight=tq.default_per_channel_weight_observer),
              jq_qconfig(jq.MinMaxObserver.with_args(reduce_range=True),
                         jq.default_per_channel_weight_observer))
MINMAX_QNNPACK = ("qnnpack",
                  tq.QConfig(activation=tq.MinMaxObserver, weight=tq.default_weight_observer),
                  jq_qconfig(jq.MinMaxObserver, jq.default_weight_observer))
DEFAULT_X86 = ("x86", tq.get_default_qconfig("x86"), jq.get_default_qconfig("x86"))
DEFAULT_QNNPACK = ("qnnpack", tq.get_default_qconfig("qnnpack"), jq.get_default_qconfig("qnnpack"))
MINMAX_FBGEMM_8BIT = ("fbgemm",
                      tq.QConfig(activation=tq.MinMaxObserver,
                                 weight=tq.default_per_channel_weight_observer),
                      jq_qconfig(jq.MinMaxObserver, jq.default_per_channel_weight_observer))


def rule_for(eng, conv=False, groups=1):
    if eng == "qnnpack":
        return "qnnpack"
    if eng == "onednn":
        return "onednn"
    if eng == "x86" and conv:
        return Q.x86_conv_requant(groups)
    return "fbgemm"


def calib_batches(shape, n=3, scale=2.0, shift=0.3):
    return [(RNG.standard_normal(shape) * scale + shift).astype(F32) for _ in range(n)]


def convert_and_compare(float_mod, cfg, calib, test_x, *, conv_kw=None, fuse=None, relu=False,
                        folded=None):
    """Converts ``float_mod`` with torch and jquant; returns (jquant q, torch q, rule)."""
    eng, tqc, jqc = cfg
    qm, outs, _ = torch_ptq(float_mod, tqc, calib, eng, fuse=fuse)
    # stub (input) and output qparams from jquant observers on identical data
    sx, zx = jq_observe(jqc.activation, calib)
    so, zo = jq_observe(jqc.activation, outs)
    assert float(sx) == qm.quant.scale.item() and int(zx) == qm.quant.zero_point.item()
    tmod = qm.module if not fuse else qm.module[0]
    assert float(so) == tmod.scale and int(zo) == tmod.zero_point
    lin = float_mod if not fuse else float_mod[0]
    w, b = folded if folded is not None else (npa(lin.weight), npa(lin.bias))
    conv = conv_kw is not None
    pack = Q.pack_conv if conv else Q.pack_linear
    p = pack(jnp.asarray(w), jnp.asarray(b), jqc.weight, output_qparams=(so, zo))
    with engine(eng):  # unpacking qnnpack conv1d weights under another engine breaks them
        tw, tws, twz = torch_weight_q(tmod.weight())
    pw = Q.kernel_to_torch(p.weight, "conv") if conv else p.weight
    assert np.array_equal(np.asarray(pw), tw)
    assert bits_equal(np.asarray(p.weight_scale), tws)
    assert np.array_equal(np.asarray(p.weight_zero_point), twz)
    with engine(eng):
        xt = torch.from_numpy(test_x)
        txq = qm.quant(xt)
        ty = tmod(txq)
        tdeq = npa(qm(xt))
    xq = Q.quantize(test_x, sx, zx)
    assert np.array_equal(np.asarray(xq.q), npa(txq.int_repr()))
    groups = (conv_kw or {}).get("groups", 1)
    rule = rule_for(eng, conv, groups)
    if conv:
        y = Q.quantized_conv(xq, p, channels_last=False, relu=relu, requant=rule, **conv_kw)
    else:
        y = Q.quantized_linear(xq, p, relu=relu, requant=rule)
    return y, ty, tdeq, rule, (xq, p)


def _linear_and_relu():
    torch.manual_seed(0)
    return tnn.Linear(24, 16)


# ----------------------------------------------------------------------------------------
# exact-arithmetic helpers
# ----------------------------------------------------------------------------------------

def test_fma_is_correctly_rounded():
    from fractions import Fraction
    rng = np.random.default_rng(0)
    n = 400
    a, b, c = ((rng.standard_normal(n) * np.exp(rng.uniform(-15, 15, n))).astype(F32) for _ in range(3))
    got = np.asarray(jax.jit(nm.fma_f32)(a, b, c))  # the FMA of the quantized modules
    for i in range(n):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        g = got[i]
        err = abs(Fraction(float(g)) - exact)
        for nb in (np.nextafter(g, F32(np.inf)), np.nextafter(g, F32(-np.inf))):
            assert err <= abs(Fraction(float(nb)) - exact)


# ----------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [MINMAX_X86, MINMAX_QNNPACK, DEFAULT_X86, DEFAULT_QNNPACK],
                         ids=["minmax-x86", "minmax-qnnpack", "default-x86", "default-qnnpack"])
def test_linear_parity(cfg):
    torch.manual_seed(0)
    lin = tnn.Linear(48, 20)
    calib = calib_batches((32, 48))
    x = (RNG.standard_normal((64, 48)) * 2.5 + 0.3).astype(F32)
    y, ty, tdeq, rule, _ = convert_and_compare(lin, cfg, calib, x)
    assert np.array_equal(np.asarray(y.q), npa(ty.int_repr())), rule
    assert bits_equal(np.asarray(Q.dequantize(y)), tdeq)


@pytest.mark.parametrize("cfg", [MINMAX_X86, MINMAX_QNNPACK], ids=["x86", "qnnpack"])
def test_linear_relu_fused_and_batched_input(cfg):
    torch.manual_seed(1)
    m = tnn.Sequential(tnn.Linear(16, 12), tnn.ReLU())
    calib = calib_batches((5, 7, 16))
    x = (RNG.standard_normal((3, 7, 16)) * 2).astype(F32)
    y, ty, _, _, (xq, p) = convert_and_compare(m, cfg, calib, x, fuse=[["0", "1"]], relu=True)
    assert np.array_equal(np.asarray(y.q), npa(ty.int_repr()))
    assert int(np.asarray(y.q).min()) >= int(p.zero_point)
    # jit gives the same integers
    yj = jax.jit(lambda a, b: Q.quantized_linear(a, b, relu=True, requant=rule_for(cfg[0])))(xq, p)
    assert np.array_equal(np.asarray(yj.q), np.asarray(y.q))


def test_linear_affine_weight_zero_point():
    """qint8 per_tensor_affine weights (non-zero weight zero point), fbgemm."""
    torch.manual_seed(2)
    lin = tnn.Linear(20, 10)
    with torch.no_grad():
        lin.weight.add_(0.2)
    cfg = ("fbgemm",
           tq.QConfig(activation=tq.MinMaxObserver.with_args(reduce_range=True),
                      weight=tq.MinMaxObserver.with_args(dtype=torch.qint8)),
           jq_qconfig(jq.MinMaxObserver.with_args(reduce_range=True),
                      jq.MinMaxObserver.with_args(dtype=jnp.int8)))
    calib = calib_batches((16, 20))
    x = (RNG.standard_normal((32, 20)) * 2).astype(F32)
    y, ty, _, _, (xq, p) = convert_and_compare(lin, cfg, calib, x)
    assert int(np.asarray(p.weight_zero_point)[0]) != 0
    assert np.array_equal(np.asarray(y.q), npa(ty.int_repr()))
    yj = jax.jit(Q.quantized_linear)(xq, p)  # traced zero point: lax.cond path
    assert np.array_equal(np.asarray(yj.q), np.asarray(y.q))


# ----------------------------------------------------------------------------------------
# Conv
# ----------------------------------------------------------------------------------------

CONV_CASES = [
    ("conv2d", lambda: tnn.Conv2d(6, 8, 3, padding=1), (2, 6, 9, 9), {}),
    ("conv2d-s2-d2-g2-pad", lambda: tnn.Conv2d(6, 8, 3, stride=2, padding=(2, 1), dilation=2,
                                               groups=2), (2, 6, 11, 10), {}),
    ("conv2d-depthwise", lambda: tnn.Conv2d(6, 6, 3, padding=1, groups=6), (2, 6, 8, 8), {}),
    ("conv1d", lambda: tnn.Conv1d(5, 7, 3, padding=1, stride=2), (3, 5, 17), {}),
    ("conv3d", lambda: tnn.Conv3d(3, 4, 3, padding=1), (2, 3, 5, 6, 5), {}),
]


def _conv_kw(m):
    nsp = m.weight.ndim - 2
    kw = dict(strides=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
    assert len(kw["strides"]) == nsp
    return kw


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
@pytest.mark.parametrize("cfg", [MINMAX_X86, MINMAX_QNNPACK], ids=["x86", "qnnpack"])
def test_conv_parity(case, cfg):
    name, make, shape, _ = case
    torch.manual_seed(3)
    m = make()
    calib = calib_batches(shape)
    x = (RNG.standard_normal(shape) * 2 + 0.2).astype(F32)
    if cfg[0] == "qnnpack" and name == "conv3d":
        # torch's qnnpack cannot unpack 3-D conv weights (weight() raises): compare outputs.
        eng, tqc, jqc = cfg
        qm, outs, _ = torch_ptq(m, tqc, calib, eng)
        sx, zx = jq_observe(jqc.activation, calib)
        so, zo = jq_observe(jqc.activation, outs)
        assert float(so) == qm.module.scale and int(zo) == qm.module.zero_point
        p = Q.pack_conv(jnp.asarray(npa(m.weight)), jnp.asarray(npa(m.bias)), jqc.weight,
                        output_qparams=(so, zo))
        with engine(eng):
            ty = qm.module(qm.quant(torch.from_numpy(x)))
        y = Q.quantized_conv(Q.quantize(x, sx, zx), p, channels_last=False, requant="qnnpack",
                             **_conv_kw(m))
        assert np.array_equal(np.asarray(y.q), npa(ty.int_repr()))
        return
    y, ty, tdeq, rule, (xq, p) = convert_and_compare(m, cfg, calib, x, conv_kw=_conv_kw(m))
    assert np.array_equal(np.asarray(y.q), npa(ty.int_repr())), rule
    assert bits_equal(np.asarray(Q.dequantize(y)), tdeq)
    # channels-last (Flax layout) gives the same integers
    perm = (0,) + tuple(range(2, x.ndim)) + (1,)
    xl = Q.QTensor(jnp.transpose(xq.q, perm), xq.scale, xq.zero_point)
    yl = jax.jit(lambda a, b: Q.quantized_conv(a, b, requant=rule, **_conv_kw(m)))(xl, p)
    assert np.array_equal(np.transpose(np.asarray(yl.q), np.argsort(perm)), np.asarray(y.q))


@pytest.mark.parametrize("cfg", [DEFAULT_X86, DEFAULT_QNNPACK], ids=["x86", "qnnpack"])
def test_conv_bn_relu_ptq_fused_default_qconfig(cfg):
    """fuse_modules(conv, bn, relu) folds BN (torch's fuse_conv_bn_weights): same weights, ints."""
    torch.manual_seed(4)
    m = tnn.Sequential(tnn.Conv2d(4, 6, 3, padding=1), tnn.BatchNorm2d(6), tnn.ReLU()).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.3, 0.3)
    calib = calib_batches((2, 4, 8, 8))
    x = (RNG.standard_normal((2, 4, 8, 8)) * 2).astype(F32)
    conv, bn = m[0], m[1]
    w, b = Q.fuse_conv_bn_weights(npa(conv.weight), npa(conv.bias), npa(bn.running_mean),
                                  npa(bn.running_var), bn.eps, npa(bn.weight), npa(bn.bias))
    tw, tb = torch.nn.utils.fusion.fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                                        bn.running_var, bn.eps, bn.weight, bn.bias)
    assert bits_equal(np.asarray(w), npa(tw)) and bits_equal(np.asarray(b), npa(tb))
    fused_float = copy.deepcopy(m)
    y, ty, _, _, _ = convert_and_compare(fused_float, cfg, calib, x, fuse=[["0", "1", "2"]],
                                         relu=True, folded=(w, b),
                                         conv_kw=dict(strides=1, padding=1))
    assert np.array_equal(np.asarray(y.q), npa(ty.int_repr()))


def test_fuse_bn_weights_bitexact_random():
    rng = np.random.default_rng(5)
    for trial in range(20):
        c = 16
        w = rng.standard_normal((c, 3, 3, 3)).astype(F32)
        b = rng.standard_normal(c).astype(F32) if trial % 3 else None
        rm = rng.standard_normal(c).astype(F32)
        rv = rng.uniform(1e-3, 3, c).astype(F32)
        g = rng.standard_normal(c).astype(F32) if trial % 4 else None
        be = rng.standard_normal(c).astype(F32)
        eps = [1e-5, 1e-3, 0.1][trial % 3]
        T = lambda v: None if v is None else torch.from_numpy(v)  # noqa: E731
        tw, tb = torch.nn.utils.fusion.fuse_conv_bn_weights(T(w), T(b), T(rm), T(rv), eps, T(g), T(be))
        jw, jb = jax.jit(Q.fuse_conv_bn_weights, static_argnums=(4,))(w, b, rm, rv, eps, g, be)
        assert bits_equal(np.asarray(jw), npa(tw)) and bits_equal(np.asarray(jb), npa(tb))
        lw = w[:, :, 0, 0].copy()
        g1 = g if g is not None else np.ones(c, F32)
        tw, tb = torch.nn.utils.fusion.fuse_linear_bn_weights(T(lw), T(b), T(rm), T(rv), eps,
                                                              T(g1), T(be))
        jw, jb = Q.fuse_linear_bn_weights(lw, b, rm, rv, eps, g1, be)
        assert bits_equal(np.asarray(jw), npa(tw)) and bits_equal(np.asarray(jb), npa(tb))


# ----------------------------------------------------------------------------------------
# QAT -> convert
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_qat_convbnrelu_and_linear_convert(backend):
    """prepare_qat / train / convert in torch; jquant converts from the same QAT state.

    The fake-quant states (weight_fake_quant, activation post-processes) are loaded into
    jquant's configs from torch's state dicts; the BN is folded with the running stats and
    the weight fake quant runs once more on the folded weight (torch's from_float).
    """
    torch.manual_seed(6)

    class M(tnn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.conv, self.bn, self.relu = tnn.Conv2d(3, 4, 3, padding=1), tnn.BatchNorm2d(4), tnn.ReLU()
            self.fc = tnn.Linear(4 * 6 * 6, 5)

        def forward(self, x):
            x = self.relu(self.bn(self.conv(self.quant(x))))
            return self.dequant(self.fc(x.reshape(x.shape[0], -1)))

    with engine(backend):
        m = M().train()
        m.qconfig = tq.get_default_qat_qconfig(backend)
        tq.fuse_modules_qat(m, [["conv", "bn", "relu"]], inplace=True)
        tq.prepare_qat(m, inplace=True)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for _ in range(4):
            xb = torch.from_numpy((RNG.standard_normal((8, 3, 6, 6)) * 2).astype(F32))
            loss = m(xb).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        x = (RNG.standard_normal((4, 3, 6, 6)) * 2).astype(F32)
        qat_copy = copy.deepcopy(m)
        qm = tq.convert(copy.deepcopy(m))
        tconv_out = qm.conv(qm.quant(torch.from_numpy(x)))
        tfc_out = qm.fc(tconv_out.reshape(4, -1))
    jqc = jq.get_default_qat_qconfig(backend)

    def load(factory, torch_mod, like):
        cfg = factory()
        return cfg, cfg.load_state_dict(torch_mod.state_dict())

    conv = qat_copy.conv
    act_cfg, act_state = load(jqc.activation, qat_copy.quant.activation_post_process, None)
    sx, zx = Q.activation_qparams(act_cfg, act_state)
    wcfg, wstate = load(jqc.weight, conv.weight_fake_quant, None)
    ccfg, cstate = load(jqc.activation, conv.activation_post_process, None)
    w, b = Q.fuse_conv_bn_weights(npa(conv.weight), None if conv.bias is None else npa(conv.bias),
                                  npa(conv.bn.running_mean), npa(conv.bn.running_var), conv.bn.eps,
                                  npa(conv.bn.weight), npa(conv.bn.bias))
    pc = Q.pack_conv(w, b, wcfg, wstate, output_qparams=Q.activation_qparams(ccfg, cstate))
    with engine(backend):
        tw, tws, _ = torch_weight_q(qm.conv.weight())
    assert np.array_equal(np.asarray(Q.kernel_to_torch(pc.weight, "conv")), tw) and bits_equal(np.asarray(pc.weight_scale), tws)
    xq = Q.quantize(x, sx, zx)
    with engine(backend):
        assert np.array_equal(np.asarray(xq.q), npa(qm.quant(torch.from_numpy(x)).int_repr()))
    yc = Q.quantized_conv(xq, pc, padding=1, relu=True, channels_last=False,
                          requant=rule_for(backend, conv=True))
    assert np.array_equal(np.asarray(yc.q), npa(tconv_out.int_repr()))
    fc = qat_copy.fc
    fwcfg, fwstate = load(jqc.weight, fc.weight_fake_quant, None)
    facfg, fastate = load(jqc.activation, fc.activation_post_process, None)
    pf = Q.pack_linear(npa(fc.weight), npa(fc.bias), fwcfg, fwstate,
                       output_qparams=Q.activation_qparams(facfg, fastate))
    yf = Q.quantized_linear(Q.QTensor(yc.q.reshape(4, -1), yc.scale, yc.zero_point), pf,
                            requant=rule_for(backend))
    assert np.array_equal(np.asarray(yf.q), npa(tfc_out.int_repr()))


# ----------------------------------------------------------------------------------------
# fbgemm with full 8-bit activations: jquant == exact formula, torch deviations counted
# ----------------------------------------------------------------------------------------

def _np_fbgemm_formula(acc, sx, sw, b, so, zo, axis, lo=0, hi=255):
    """§9.4 with torch's fused bias multiply-add, in numpy (long double for the FMA)."""
    shape = [1] * acc.ndim
    shape[axis] = -1
    sw = sw.astype(F32).reshape(shape)
    b = b.astype(F32).reshape(shape)
    m = (F32(sx) * sw).astype(F32)
    inv = (F32(1) / m).astype(F32)
    ld = np.longdouble
    raw = (b.astype(ld) * inv.astype(ld) + acc.astype(F32).astype(ld)).astype(F32)
    mult = (m / F32(so)).astype(F32)
    y = np.rint((raw * mult).astype(F32)).astype(np.int64) + int(zo)
    return np.clip(y, lo, hi)


@pytest.mark.parametrize("kind", ["linear", "conv2d-depthwise"])
def test_fbgemm_8bit_activation_saturation_deviations(kind, capsys):
    torch.manual_seed(7)
    if kind == "linear":
        m = tnn.Linear(64, 32)
        shape, conv_kw = (128, 64), None
    else:
        m = tnn.Conv2d(8, 8, 3, padding=1, groups=8)
        shape, conv_kw = (4, 8, 10, 10), dict(strides=1, padding=1, groups=8)
    calib = calib_batches(shape)
    x = (RNG.standard_normal(shape) * 2 + 0.3).astype(F32)
    y, ty, _, rule, (xq, p) = convert_and_compare(m, MINMAX_FBGEMM_8BIT, calib, x, conv_kw=conv_kw)
    assert rule == "fbgemm"
    # exact integer accumulator, computed independently
    xi = np.asarray(xq.q).astype(np.int64) - int(xq.zero_point)
    wi = np.asarray(p.weight if conv_kw is None else Q.kernel_to_torch(p.weight, "conv")).astype(np.int64)
    if conv_kw is None:
        acc, axis = xi @ wi.T, 1
    else:
        acc = torch.nn.functional.conv2d(torch.from_numpy(xi.astype(np.float64)),
                                         torch.from_numpy(wi.astype(np.float64)), None, 1, 1, 1,
                                         8).numpy().astype(np.int64)
        axis = 1
    ref = _np_fbgemm_formula(acc, np.asarray(xq.scale), np.asarray(p.weight_scale),
                             np.asarray(p.bias), np.asarray(p.scale), np.asarray(p.zero_point), axis)
    got = np.asarray(y.q).astype(np.int64)
    assert np.array_equal(got, ref)
    dev = got != npa(ty.int_repr()).astype(np.int64)
    with capsys.disabled():
        print(f"\n[fbgemm 8-bit activations, {kind}] torch deviates from the formula on "
              f"{int(dev.sum())} / {dev.size} outputs (max |diff| "
              f"{int(np.abs(got - npa(ty.int_repr())).max())})")
    assert dev.mean() < 0.5


def _boundary_rows(targets, k1=300, k2=300):
    """uint8 rows x (zero point 0) with x . [127]*k1 + [1]*k2 == target (each target < 127*127*k1)."""
    rows = np.zeros((len(targets), k1 + k2), np.int64)
    for i, t in enumerate(targets):
        a, b = divmod(int(t), 127)
        q, r = divmod(a, 127)
        rows[i, :q], rows[i, q] = 127, r
        q2, r2 = divmod(b, 127)
        rows[i, k1:k1 + q2], rows[i, k1 + q2] = 127, r2
    return rows


def _near_boundary(acc_range, sx, sw, so, b, n):
    """Accumulator values whose outputs sit near a rounding boundary (where rules differ)."""
    acc = np.arange(*acc_range, dtype=np.int64)
    m = F32(sx * sw)
    raw = (acc.astype(F32) + F32(b / m)).astype(F32)
    v = (raw * F32(m / so)).astype(F32)
    frac = np.abs(v - np.floor(v) - F32(0.5))
    return acc[np.argsort(frac, kind="stable")[:n]]


@pytest.mark.parametrize("eng", ["fbgemm", "onednn", "qnnpack", "x86"])
def test_requant_rule_matches_engine_at_rounding_boundaries(eng):
    """Each rule against its engine's torch.ops.quantized.linear / conv2d (1x1), on random
    rows and on rows whose outputs lie within an ulp of .5 (where the rules part ways).
    x86: Linear runs fbgemm, Conv runs x86_conv_requant() (oneDNN on AVX512-VNNI CPUs)."""
    rule = rule_for(eng)
    conv_rule = rule_for(eng, conv=True)
    rng = np.random.default_rng(8)
    w_row = np.array([127] * 300 + [1] * 300, np.int8)
    for trial in range(6):
        sx = F32(np.exp(rng.uniform(-6, -1)))
        sw = F32(np.exp(rng.uniform(-7, -2)))
        so = F32(np.exp(rng.uniform(-5, 1)))
        b = F32(rng.uniform(-1, 1) * np.exp(rng.uniform(-3, 3)))
        lim = int(min(250 / (sx * sw / so), 127 * 127 * 300))
        rows = np.concatenate([_boundary_rows(_near_boundary((0, lim), sx, sw, so, b, 48)),
                               rng.integers(0, 128, (16, 600))])
        xi = rows.astype(np.uint8)
        wq = torch._make_per_tensor_quantized_tensor(torch.from_numpy(w_row[None]), float(sw), 0)
        xt = torch._make_per_tensor_quantized_tensor(torch.from_numpy(xi), float(sx), 0)
        with engine(eng):
            lin = torch.ops.quantized.linear(
                xt, torch.ops.quantized.linear_prepack(wq, torch.tensor([b])), float(so), 0)
            xc = torch._make_per_tensor_quantized_tensor(
                torch.from_numpy(np.ascontiguousarray(xi.T[None, :, :, None])), float(sx), 0)
            wc = torch._make_per_tensor_quantized_tensor(torch.from_numpy(w_row[None, :, None, None].copy()),
                                                         float(sw), 0)
            conv = torch.ops.quantized.conv2d(
                xc.contiguous(memory_format=torch.channels_last),
                torch.ops.quantized.conv2d_prepack(wc, torch.tensor([b]), [1, 1], [0, 0], [1, 1], 1),
                float(so), 0)
        p = Q.PackedLinear(jnp.asarray(w_row[None]), jnp.asarray([sw]), jnp.zeros(1, jnp.int32),
                           jnp.asarray([b]), jnp.float32(so), jnp.int32(0))
        xq = Q.QTensor(jnp.asarray(xi), jnp.float32(sx), jnp.int32(0))
        got = np.asarray(Q.quantized_linear(xq, p, requant=rule).q)[:, 0]
        assert np.array_equal(got, npa(lin.int_repr())[:, 0]), (trial, "linear")
        pc = Q.PackedConv(jnp.asarray(w_row[None, None, :, None]), p.weight_scale,
                          p.weight_zero_point, p.bias, p.scale, p.zero_point)
        xcq = Q.QTensor(jnp.asarray(xi[None, :, None, :]), jnp.float32(sx), jnp.int32(0))
        gotc = np.asarray(Q.quantized_conv(xcq, pc, requant=conv_rule).q)[0, :, 0, 0]
        assert np.array_equal(gotc, npa(conv.int_repr())[0, 0, :, 0]), (trial, "conv")


def test_int8_activations_follow_the_formula():
    """qint8 activations (no torch kernel takes them on x86): the same formula, int8 range."""
    rng = np.random.default_rng(10)
    w = rng.standard_normal((9, 30)).astype(F32)
    p = Q.pack_linear(w, rng.standard_normal(9).astype(F32), jq.default_per_channel_weight_observer,
                      output_qparams=(0.05, -7))
    xq = Q.quantize(rng.standard_normal((40, 30)).astype(F32) * 3, 0.03, 5, jnp.int8)
    y = Q.quantized_linear(xq, p)
    assert y.q.dtype == jnp.int8
    acc = (np.asarray(xq.q).astype(np.int64) - 5) @ np.asarray(p.weight).astype(np.int64).T
    ref = _np_fbgemm_formula(acc, np.asarray(xq.scale), np.asarray(p.weight_scale),
                             np.asarray(p.bias), np.asarray(p.scale), np.asarray(p.zero_point), 1,
                             -128, 127)
    assert np.array_equal(np.asarray(y.q).astype(np.int64), ref)
    yr = Q.quantized_linear(xq, p, relu=True)
    assert np.array_equal(np.asarray(yr.q).astype(np.int64), np.maximum(ref, -7))


def test_requant_rules_differ():
    """The three rules are different functions (each matched by one engine only)."""
    rng = np.random.default_rng(9)
    k, n, bsz = 40, 12, 512
    p = Q.PackedLinear(jnp.asarray(rng.integers(-128, 128, (n, k)).astype(np.int8)),
                       jnp.asarray(np.exp(rng.uniform(-7, -3, n)).astype(F32)),
                       jnp.zeros(n, jnp.int32), jnp.asarray((rng.standard_normal(n) * 3).astype(F32)),
                       jnp.float32(0.0171), jnp.int32(97))
    xq = Q.QTensor(jnp.asarray(rng.integers(0, 128, (bsz, k)).astype(np.uint8)),
                   jnp.float32(0.0313), jnp.int32(61))
    outs = {r: np.asarray(Q.quantized_linear(xq, p, requant=r).q) for r in Q.REQUANT_RULES}
    assert not np.array_equal(outs["fbgemm"], outs["qnnpack"])
    assert np.abs(outs["fbgemm"].astype(int) - outs["qnnpack"]).max() == 1
    assert np.abs(outs["fbgemm"].astype(int) - outs["onednn"]).max() <= 1


# ----------------------------------------------------------------------------------------
# Embedding / EmbeddingBag
# ----------------------------------------------------------------------------------------

def _emb_weight(num, dim, seed):
    r = np.random.default_rng(seed)
    return (r.standard_normal((num, dim)) * 2 + r.uniform(-1, 1, (num, 1))).astype(F32)


def test_embedding_8bit_parity():
    w = _emb_weight(30, 12, 0)
    e = tnn.Embedding(30, 12)
    with torch.no_grad():
        e.weight.copy_(torch.from_numpy(w))
    e.qconfig = tq.float_qparams_weight_only_qconfig
    qe = nnq.Embedding.from_float(e)
    p = Q.pack_embedding(w, jq.float_qparams_weight_only_qconfig.weight())
    assert np.array_equal(np.asarray(Q.unpack_embedding(p)), npa(qe.weight().int_repr()))
    assert bits_equal(np.asarray(p.scale), npa(qe.weight().q_per_channel_scales()).astype(F32))
    idx = RNG.integers(0, 30, (4, 9))
    got = np.asarray(jax.jit(Q.quantized_embedding)(idx, p))
    assert bits_equal(got, npa(qe(torch.from_numpy(idx))))
    assert Q.pack_embedding(w).bits == 8  # default: float_qparams_weight_only (8-bit)


def _torch_bag(bits, num, dim, w, mode="sum", include_last_offset=False, qat=False):
    eb = tnn.EmbeddingBag(num, dim, mode=mode, include_last_offset=include_last_offset)
    with torch.no_grad():
        eb.weight.copy_(torch.from_numpy(w))
    if not qat:
        eb.qconfig = (tq.float_qparams_weight_only_qconfig if bits == 8
                      else tq.float_qparams_weight_only_qconfig_4bit)
        return nnq.EmbeddingBag.from_float(eb), None
    model = tnn.Sequential(eb).train()
    model[0].qconfig = tq.default_embedding_qat_qconfig if bits == 8 else _embedding_qat_4bit_torch()
    tq.prepare_qat(model, mapping=tq.quantization_mappings.get_embedding_qat_module_mappings(),
                   inplace=True)
    for _ in range(2):
        model(torch.from_numpy(RNG.integers(0, num, (5, 3))))
    qat_mod = copy.deepcopy(model[0])
    model.eval()
    qm = tq.convert(model, mapping=tq.quantization_mappings.get_embedding_static_quant_module_mappings())
    return qm[0], qat_mod


def _embedding_qat_4bit_torch():
    from torch.ao.quantization.qconfig import default_embedding_qat_qconfig_4bit
    return default_embedding_qat_qconfig_4bit


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("qat", [False, True], ids=["ptq", "qat"])
def test_embedding_bag_parity(bits, qat):
    num, dim = 40, 10
    w = _emb_weight(num, dim, bits + int(qat))
    tq_bag, qat_mod = _torch_bag(bits, num, dim, w, qat=qat)
    if qat:
        fq = (jq.default_embedding_qat_qconfig if bits == 8 else jq.default_embedding_qat_qconfig_4bit).weight()
        state = fq.load_state_dict(qat_mod.weight_fake_quant.state_dict())
        p = Q.pack_embedding(npa(qat_mod.weight), fq, state)
    else:
        p = Q.pack_embedding(w, (jq.float_qparams_weight_only_qconfig if bits == 8
                                 else jq.float_qparams_weight_only_qconfig_4bit).weight())
    assert p.bits == bits
    tw = tq_bag.weight()
    if bits == 8:
        assert np.array_equal(np.asarray(p.weight), npa(tw.int_repr()))
        assert p.scale.dtype == jnp.float32 and p.bias.dtype == jnp.float32
    else:  # torch's int_repr is the packed bytes: two values per byte, low nibble first
        assert np.array_equal(np.asarray(p.weight).reshape(-1), npa(tw.int_repr()).reshape(-1))
        assert p.scale.dtype == jnp.float16 and p.bias.dtype == jnp.float16
    n = 37
    idx = RNG.integers(0, num, n)
    offsets = np.array([0, 3, 3, 10, 11, 20, 31, 37])  # empty bags included
    psw = RNG.standard_normal(n).astype(F32)
    T = torch.from_numpy
    cases = [
        (dict(offsets=offsets), dict(offsets=T(offsets))),
        (dict(offsets=offsets, per_sample_weights=psw), dict(offsets=T(offsets), per_sample_weights=T(psw))),
    ]
    for jkw, tkw in cases:
        got = np.asarray(Q.quantized_embedding_bag(idx, p, **jkw))
        assert bits_equal(got, npa(tq_bag(T(idx), **tkw)))
    # 2-D input: every row a bag
    idx2 = RNG.integers(0, num, (6, 4))
    psw2 = RNG.standard_normal((6, 4)).astype(F32)
    assert bits_equal(np.asarray(Q.quantized_embedding_bag(idx2, p)), npa(tq_bag(T(idx2))))
    assert bits_equal(np.asarray(Q.quantized_embedding_bag(idx2, p, per_sample_weights=psw2)),
                      npa(tq_bag(T(idx2), per_sample_weights=T(psw2))))
    # jit with traced offsets (static max_bag_size) gives the same bits
    f = jax.jit(lambda i, o, s: Q.quantized_embedding_bag(i, p, o, per_sample_weights=s,
                                                           max_bag_size=12))
    assert bits_equal(np.asarray(f(idx, offsets, psw)),
                      npa(tq_bag(T(idx), offsets=T(offsets), per_sample_weights=T(psw))))


@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_bag_include_last_offset_and_modes(bits):
    num, dim = 25, 8
    w = _emb_weight(num, dim, 11)
    t_mean, _ = _torch_bag(bits, num, dim, w, mode="mean", include_last_offset=True)
    p = Q.pack_embedding(w, (jq.float_qparams_weight_only_qconfig if bits == 8
                             else jq.float_qparams_weight_only_qconfig_4bit).weight())
    idx = RNG.integers(0, num, 20)
    offsets = np.array([0, 4, 4, 9, 15, 20])  # include_last_offset: 5 bags (torch 4-bit needs the last = N)
    T = torch.from_numpy
    torch_out = npa(t_mean(T(idx), T(offsets)))
    # torch's quantized EmbeddingBag ignores mode='mean' and returns bag sums:
    summed = np.asarray(Q.quantized_embedding_bag(idx, p, offsets, include_last_offset=True))
    assert bits_equal(summed, torch_out)
    mean = np.asarray(Q.quantized_embedding_bag(idx, p, offsets, mode="mean",
                                                include_last_offset=True))
    counts = np.diff(offsets).astype(F32)
    want = np.where(counts[:, None] > 0, summed / np.maximum(counts, 1)[:, None], 0).astype(F32)
    assert bits_equal(mean, want)
    assert not np.array_equal(mean, torch_out)  # the documented difference
    # max: element-wise max of the dequantized rows (fma lookups), 0 for empty bags
    mx = np.asarray(Q.quantized_embedding_bag(idx, p, offsets, mode="max", include_last_offset=True))
    rows = np.asarray(Q.quantized_embedding(idx, p))
    for bi in range(len(offsets) - 1):
        lo, hi = offsets[bi], offsets[bi + 1]
        exp = rows[lo:hi].max(0) if hi > lo else np.zeros(dim, F32)
        assert bits_equal(mx[bi], exp)
    # padding_idx (float EmbeddingBag semantics) is skipped
    pid = int(idx[5])
    got = np.asarray(Q.quantized_embedding_bag(idx, p, offsets, include_last_offset=True,
                                               padding_idx=pid, mode="mean"))
    keep = idx != pid
    for bi in range(len(offsets) - 1):
        sel = np.arange(offsets[bi], offsets[bi + 1])
        sel = sel[keep[sel]]
        if len(sel) == 0:
            assert np.all(got[bi] == 0)
        else:
            np.testing.assert_allclose(got[bi], rows[sel].mean(0), rtol=1e-5, atol=1e-6)


def test_embedding_4bit_odd_dim_and_lookup():
    """Odd dims: torch's quint4x2 tensor packs across row boundaries (rows after the first
    are misaligned in its packed rows) and its kernel returns dim + 1 columns; jquant keeps
    each row byte-aligned and returns dim columns. Even dims: bit-exact (other tests)."""
    num, dim = 12, 7
    w = _emb_weight(num, dim, 3)
    tbag, _ = _torch_bag(4, num, dim, w)
    p = Q.pack_embedding(w, jq.float_qparams_weight_only_qconfig_4bit.weight())
    assert p.weight.shape == (num, 4)
    idx = np.array([1, 5, 7, 2, 11])
    off = np.array([0, 2])
    t = npa(tbag(torch.from_numpy(idx), torch.from_numpy(off)))
    assert t.shape == (2, dim + 1)
    got = np.asarray(Q.quantized_embedding_bag(idx, p, off, embedding_dim=dim))
    assert got.shape == (2, dim)
    # row 0 is aligned in torch's packing too: a bag of row 0 alone matches bit for bit
    t0 = npa(tbag(torch.tensor([0]), torch.tensor([0])))[:, :dim]
    assert bits_equal(np.asarray(Q.quantized_embedding_bag(np.array([0]), p, np.array([0]),
                                                           embedding_dim=dim)), t0)
    # jquant's sums are the 4-bit dequantized rows' sums (within 4-bit resolution)
    want = np.stack([w[idx[:2]].sum(0), w[idx[2:]].sum(0)])
    step = (w.max(1) - w.min(1)) / 15
    assert np.all(np.abs(got - want) <= 3 * step.max())
    # single 4-bit lookups (torch's 4-bit nnq.Embedding fails at forward) = one-row bags
    one = np.asarray(Q.quantized_embedding(idx, p, embedding_dim=dim))
    bags = np.asarray(Q.quantized_embedding_bag(idx, p, np.arange(len(idx)), embedding_dim=dim))
    assert bits_equal(one, bags)


def test_embedding_errors():
    p = Q.pack_embedding(_emb_weight(5, 4, 0))
    with pytest.raises(ValueError, match="per_sample_weights"):
        Q.quantized_embedding_bag(np.array([0, 1]), p, np.array([0]), mode="mean",
                                  per_sample_weights=np.ones(2, F32))
    with pytest.raises(ValueError, match="offsets"):
        Q.quantized_embedding_bag(np.array([0, 1]), p)
    with pytest.raises(ValueError, match="offsets"):
        Q.quantized_embedding_bag(np.array([0, 1]), p, np.array([1]))
    with pytest.raises(ValueError, match="indices"):
        Q.quantized_embedding(np.array([5]), p)
    with pytest.raises(ValueError, match="mode"):
        Q.quantized_embedding_bag(np.array([[0]]), p, mode="median")
    with pytest.raises(ValueError, match="qscheme"):
        Q.pack_embedding(_emb_weight(5, 4, 0), jq.default_weight_observer())


# ----------------------------------------------------------------------------------------
# stubs, layouts, errors, accounting
# ----------------------------------------------------------------------------------------

def test_quantize_dequantize_stubs():
    x = (RNG.standard_normal(1000) * 3).astype(F32)
    for s, z, dt, tdt in ((0.0123, 17, jnp.uint8, torch.quint8), (0.05, -3, jnp.int8, torch.qint8)):
        q = Q.quantize(x, s, z, dt)
        t = torch.quantize_per_tensor(torch.from_numpy(x), float(np.float32(s)), z, tdt)
        assert np.array_equal(np.asarray(q.q), npa(t.int_repr()))
        assert bits_equal(np.asarray(q.dequantize()), npa(t.dequantize()))
    with pytest.raises(ValueError, match="dtype"):
        Q.quantize(x, 0.1, 0, jnp.int32)


def test_kernel_layouts_roundtrip():
    k = jnp.asarray(RNG.standard_normal((3, 3, 4, 8)).astype(F32))
    t = Q.kernel_to_torch(k, "conv")
    assert t.shape == (8, 4, 3, 3)
    assert np.array_equal(np.asarray(Q.torch_to_kernel(t, "conv")), np.asarray(k))
    d = jnp.asarray(RNG.standard_normal((5, 7)).astype(F32))
    assert Q.kernel_to_torch(d, "dense").shape == (7, 5)


def test_flax_style_padding_and_modes():
    """'SAME' / 'CIRCULAR' / reflect padding equal explicit integer padding of the ints."""
    w = jnp.asarray(RNG.standard_normal((4, 3, 3, 3)).astype(F32))
    p = Q.pack_conv(w, None, jq.default_per_channel_weight_observer,
                    output_qparams=(0.05, 128))
    xq = Q.quantize(RNG.standard_normal((2, 7, 7, 3)).astype(F32) * 2, 0.02, 120)
    same = Q.quantized_conv(xq, p, padding="SAME")
    explicit = Q.quantized_conv(xq, p, padding=((1, 1), (1, 1)))
    assert np.array_equal(np.asarray(same.q), np.asarray(explicit.q))
    circ = Q.quantized_conv(xq, p, padding="CIRCULAR")
    wrapped = Q.QTensor(jnp.pad(xq.q, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap"), xq.scale,
                        xq.zero_point)
    assert np.array_equal(np.asarray(circ.q), np.asarray(Q.quantized_conv(wrapped, p).q))
    refl = Q.quantized_conv(xq, p, padding=1, padding_mode="reflect")
    rp = Q.QTensor(jnp.pad(xq.q, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect"), xq.scale,
                   xq.zero_point)
    assert np.array_equal(np.asarray(refl.q), np.asarray(Q.quantized_conv(rp, p).q))
    # extra leading batch dims (Flax) and unbatched input
    xb = Q.QTensor(xq.q.reshape(1, 2, 7, 7, 3), xq.scale, xq.zero_point)
    assert np.array_equal(np.asarray(Q.quantized_conv(xb, p).q).reshape(2, 5, 5, 4),
                          np.asarray(Q.quantized_conv(xq, p).q))
    x1 = Q.QTensor(xq.q[0], xq.scale, xq.zero_point)
    assert np.array_equal(np.asarray(Q.quantized_conv(x1, p).q), np.asarray(Q.quantized_conv(xq, p).q)[0])


def test_argument_errors():
    w = RNG.standard_normal((4, 6)).astype(F32)
    with pytest.raises(ValueError, match="qint8"):
        Q.pack_linear(w, None, jq.MinMaxObserver, output_qparams=(0.1, 0))
    with pytest.raises(ValueError, match="output_qparams"):
        Q.pack_linear(w, None, jq.default_weight_observer, output_qparams=None)
    with pytest.raises(ValueError, match="bias"):
        Q.pack_linear(w, np.zeros(3, F32), jq.default_weight_observer, output_qparams=(0.1, 0))
    with pytest.raises(ValueError, match="ch_axis"):
        Q.pack_linear(w, None, jq.PerChannelMinMaxObserver.with_args(
            dtype=jnp.int8, qscheme=jq.per_channel_symmetric, ch_axis=1), output_qparams=(0.1, 0))
    p = Q.pack_linear(w, None, jq.default_weight_observer, output_qparams=(0.1, 0))
    xq = Q.quantize(RNG.standard_normal((2, 6)).astype(F32), 0.1, 3)
    with pytest.raises(ValueError, match="requant"):
        Q.quantized_linear(xq, p, requant="mkl")
    with pytest.raises(ValueError, match="QTensor"):
        Q.quantized_linear(np.zeros((2, 6), np.uint8), p)
    pc = Q.pack_conv(RNG.standard_normal((4, 2, 3, 3)).astype(F32), None,
                     jq.default_weight_observer, output_qparams=(0.1, 0))
    xc = Q.quantize(RNG.standard_normal((1, 5, 5, 4)).astype(F32), 0.1, 3)
    with pytest.raises(ValueError, match="groups"):
        Q.quantized_conv(xc, pc, groups=1)
    assert Q.quantized_conv(xc, pc, groups=2).q.shape == (1, 3, 3, 4)
    with pytest.raises(ValueError, match="padding"):
        Q.quantized_conv(xc, pc, groups=2, padding="FULL")
    with pytest.raises(ValueError, match="padding_mode"):
        Q.quantized_conv(xc, pc, groups=2, padding_mode="mirror")


def test_param_bytes_about_4x_smaller():
    w = RNG.standard_normal((256, 512)).astype(F32)
    b = RNG.standard_normal(256).astype(F32)
    p = Q.pack_linear(w, b, jq.default_per_channel_weight_observer, output_qparams=(0.1, 3))
    fb, qb = Q.param_bytes({"kernel": w, "bias": b}), Q.param_bytes(p)
    assert fb == 4 * (256 * 512 + 256)
    assert qb == 256 * 512 + 4 * 256 * 3 + 4 + 4
    assert 3.9 < fb / qb < 4.0
    e = _emb_weight(100, 64, 0)
    assert Q.param_bytes(Q.pack_embedding(e)) == 100 * 64 + 8 * 100
    assert Q.param_bytes(Q.pack_embedding(e, jq.float_qparams_weight_only_qconfig_4bit.weight())) \
        == 100 * 32 + 4 * 100
