"""jquant.nnx: prepare / prepare_qat by graph surgery on unmodified flax.nnx models.

torch 2.13 is the oracle where a number is compared (single QAT layers, fused nniqat
modules, embedding QAT, PTQ observers); seed counterparts of torch's
test_workflow_module.py are named after the torch test.
"""
import io
import warnings

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
import torch
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.qat as nnqat
import torch.ao.quantization as tq
from flax import nnx, serialization

import jquant as jq
import jquant.nnx as jqn
import torch_models as tm

RNG = np.random.default_rng(0)
Z = nnx.initializers.zeros  # deterministic weights are written in (random init compiles slowly)


def _rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _lin(i, o, **kw):
    m = nnx.Linear(i, o, kernel_init=Z, rngs=nnx.Rngs(0), **kw)
    m.kernel[...] = jnp.asarray(_rand(i, o, scale=1 / np.sqrt(i)), m.kernel[...].dtype)
    if m.bias is not None:
        m.bias[...] = jnp.asarray(_rand(o, scale=0.1), m.bias[...].dtype)
    return m


def _conv(i, o, k, **kw):
    m = nnx.Conv(i, o, k, kernel_init=Z, rngs=nnx.Rngs(0), **kw)
    shape = m.kernel[...].shape
    m.kernel[...] = jnp.asarray(_rand(*shape, scale=1 / np.sqrt(np.prod(shape[:-1]))), m.kernel[...].dtype)
    if m.bias is not None:
        m.bias[...] = jnp.asarray(_rand(o, scale=0.1), m.bias[...].dtype)
    return m


def _bn(c, **kw):
    m = nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0), **kw)
    m.scale[...] = jnp.asarray(RNG.uniform(0.5, 1.5, c).astype(np.float32))
    m.bias[...] = jnp.asarray(RNG.uniform(-0.2, 0.2, c).astype(np.float32))
    return m


def _np(a):
    return np.asarray(a, np.float64)


def _rel(a, b):
    a, b = _np(a), _np(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) if b.size else 0.0


def _params(model):
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32)))


# ---------------------------------------------------------------------------------------
# stubs, structure, spec
# ---------------------------------------------------------------------------------------

class Net(nnx.Module):
    def __init__(self):
        self.quant = jqn.QuantStub()
        self.encoder = nnx.List([_lin(6, 8), _lin(8, 8)])
        self.conv = _conv(2, 4, (3,), padding="VALID")
        self.bn = _bn(4)
        self.drop = nnx.Dropout(0.0, deterministic=True)
        self.head = _lin(8, 3)
        self.dequant = jqn.DeQuantStub()

    def __call__(self, x, s):
        x = self.quant(x)
        for layer in self.encoder:
            x = nnx.relu(layer(x))
        s = self.bn(self.conv(s), use_running_average=False)
        return self.dequant(self.head(self.drop(x)) + s.mean(axis=(1, 2))[:, None])


def test_stubs_are_identities_until_prepared():
    x = jnp.asarray(_rand(2, 6))
    assert jqn.QuantStub()(x) is x and jqn.DeQuantStub()(x) is x
    w = jqn.QuantWrapper(_lin(6, 3))
    np.testing.assert_array_equal(w(x), w.module(x))
    p = jqn.prepare(w, jq.default_qconfig)
    assert isinstance(p.quant.activation_post_process, jqn.PostProcess)
    assert not hasattr(p.dequant, "activation_post_process")  # DeQuantStub never observes
    np.testing.assert_array_equal(p(x), w(x))  # observers return their input
    assert float(p.quant.activation_post_process.state.max_val) == float(jnp.max(x))


def test_prepare_qat_keeps_parameter_paths_and_values():
    model = Net()
    before = _params(model)
    q = jqn.prepare_qat(model, jq.get_default_qat_qconfig("x86"))
    assert _params(q).keys() == before.keys()
    for k, v in _params(q).items():
        np.testing.assert_array_equal(v, before[k], err_msg=str(k))
    assert type(q.encoder[0]) is jqn.Linear and isinstance(q.encoder[0], nnx.Linear)
    assert type(q.conv) is jqn.Conv and type(q.head) is jqn.Linear
    assert type(q.bn).__name__ == "ObservedBatchNorm"  # torch observes BatchNorm outputs too
    assert type(q.drop) is nnx.Dropout  # skipped, as torch's Dropout
    assert type(model.head) is nnx.Linear  # not in place: the float model is untouched
    s = jnp.asarray(_rand(2, 5, 2))
    x = jnp.asarray(_rand(2, 6))
    assert nnx.jit(lambda m, a, b: m(a, b))(q, x, s).shape == (2, 3)
    paths = jqn.get_observer_dict(q)
    assert "head.weight_fake_quant" in paths and "quant.activation_post_process" in paths
    assert "dequant.activation_post_process" not in paths and "drop.activation_post_process" not in paths


def test_qconfig_spec_paths_types_none_and_unmatched_warning():
    qc_a = jq.get_default_qat_qconfig("x86")
    qc_b = jq.get_default_qat_qconfig("qnnpack")
    model = Net()
    spec = {r"encoder\.1": qc_b, "encoder": qc_a, nnx.Conv: qc_b, "head": None, "nowhere.*": qc_a,
            nnx.Embed: qc_a}
    with pytest.warns(UserWarning, match="nowhere.*Embed|Embed.*nowhere"):
        q = jqn.prepare_qat(model, spec)
    assert q.encoder[0].qconfig == qc_a and q.encoder[1].qconfig == qc_b  # path beats parent
    assert q.conv.qconfig == qc_b  # type entry
    assert type(q.head) is nnx.Linear  # None leaves it float
    assert not hasattr(q.quant, "activation_post_process") or q.quant.activation_post_process is None
    # a module's own qconfig attribute wins (torch's priority)
    model = Net()
    model.head.qconfig = qc_b
    q = jqn.prepare_qat(model, qc_a)
    assert q.head.qconfig == qc_b and q.encoder[0].qconfig == qc_a
    table = jqn.propagate_qconfig(Net(), {"head": None, "": qc_a})
    assert table["head"] is None and table["encoder.0"] == qc_a and table[""] == qc_a


def test_invalid_specs_raise_value_error():
    with pytest.raises(ValueError, match="qconfig_spec"):
        jqn.prepare_qat(Net(), "x86")
    with pytest.raises(ValueError, match="regular expression"):
        jqn.prepare_qat(Net(), {"(": jq.default_qat_qconfig})
    with pytest.raises(ValueError, match="qconfig_spec"):
        jqn.prepare_qat(Net(), {"head": "x86"})
    with pytest.raises(ValueError, match="float_qparams"):
        jqn.Embed(4, 3, qconfig=jq.default_qat_qconfig, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="issue"):
        jqn.convert(Net())


# ---------------------------------------------------------------------------------------
# single QAT layers vs torch nnqat
# ---------------------------------------------------------------------------------------

def _torch_layer_qat(layer, backend):
    seq = torch.nn.Sequential(layer).train()
    seq.qconfig = tq.get_default_qat_qconfig(backend)
    # torch's default eager QAT mapping lacks Conv1d (jquant swaps every nnx.Conv): add it
    mapping = {**tq.get_default_qat_module_mappings(), torch.nn.Conv1d: nnqat.Conv1d}
    tq.prepare_qat(seq, mapping=mapping, inplace=True)
    return seq


@nnx.jit
def _grad_and_out(model, x):
    def loss(m):
        y = m(x)
        return y.sum(), y
    return nnx.grad(loss, has_aux=True)(model)


@pytest.mark.parametrize("kind,backend", [("linear", "x86"), ("conv1d", "x86"), ("conv2d", "qnnpack"),
                                          ("conv3d", "x86")])
def test_qat_layer_matches_torch(kind, backend):
    if kind == "linear":
        j = _lin(6, 5)
        t = torch.nn.Linear(6, 5)
        x = _rand(4, 6)
        tw = tm.dense_kernel_to_torch(j.kernel[...])
        to_t, from_t = (lambda a: a), (lambda a: a)
    else:
        nd = int(kind[-2])
        groups = 2 if nd == 2 else 1
        j = _conv(4, 6, (3,) * nd, padding="VALID", feature_group_count=groups)
        t = getattr(torch.nn, f"Conv{nd}d")(4, 6, 3, groups=groups)
        x = _rand(2, *([6] * nd), 4)
        tw = tm.conv_kernel_to_torch(j.kernel[...])
        perm = (0, nd + 1) + tuple(range(1, nd + 1))
        to_t = lambda a: np.transpose(a, perm)
        from_t = lambda a: np.transpose(a, np.argsort(perm))
    with torch.no_grad():
        t.weight.copy_(_t(tw))
        t.bias.copy_(_t(j.bias[...]))
    tseq = _torch_layer_qat(t, backend)
    q = jqn.prepare_qat(j, jq.get_default_qat_qconfig(backend))
    assert type(q) is (jqn.Linear if kind == "linear" else jqn.Conv)
    for step in range(2):
        xt = _t(to_t(x * (step + 1))).requires_grad_(True)
        yt = tseq(xt)
        yt.sum().backward()

        g, y = _grad_and_out(q, jnp.asarray(x * (step + 1)))
        np.testing.assert_allclose(from_t(yt.detach().numpy()), y, rtol=1e-5, atol=1e-6)
        tg = tseq[0].weight.grad.numpy()
        jg = (tm.dense_kernel_to_torch if kind == "linear" else tm.conv_kernel_to_torch)(g["kernel"][...])
        assert _rel(jg, tg) <= 1e-5
        tseq[0].weight.grad = None
    tobs = {k: v.detach().numpy() for k, v in tseq.state_dict().items()
            if "fake_quant" in k or "post_process" in k}
    jobs = {k.replace("weight_fake_quant", "0.weight_fake_quant").replace(
        "activation_post_process", "0.activation_post_process", 1) if not k.startswith("weight") else
        "0." + k: v for k, v in jqn.get_observer_state_dict(q).items()}
    assert set(tobs) == set(jobs), set(tobs) ^ set(jobs)
    for k in tobs:
        assert _rel(jobs[k], tobs[k]) <= 1e-5, k


# ---------------------------------------------------------------------------------------
# nnx.jit training loops, flags, structure
# ---------------------------------------------------------------------------------------

class Small(nnx.Module):
    def __init__(self):
        self.conv = _conv(1, 4, (3, 3), padding="SAME")
        self.bn = _bn(4)
        self.act = nnx.relu
        self.fc = _lin(4 * 4 * 4, 3)

    def __call__(self, x):
        x = self.act(self.bn(self.conv(x)))
        return self.fc(x.reshape(x.shape[0], -1))


TRACES = []


@nnx.jit
def _step(model, optimizer, x, y):
    TRACES.append(1)

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def _small_data(n=4):
    return jnp.asarray(_rand(n, 4, 4, 1)), jnp.asarray(RNG.integers(0, 3, n).astype(np.int32))


def test_nnx_jit_training_flags_and_state_structure():
    model = jqn.prepare_qat(Small(), jq.get_default_qat_qconfig("x86"),
                            fuse=[("conv", "bn", "act")])
    model.train()
    assert type(model.conv) is jqn.qat.ConvBnReLU and type(model.bn) is jqn.Identity
    assert type(model.act) is jqn.Identity
    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
    graphdef = nnx.graphdef(model)
    var_ids = {k: id(v) for k, v in nnx.to_flat_state(nnx.state(model))}
    shapes = jax.tree.map(lambda v: (v.shape, v.dtype), nnx.state(model))
    x, y = _small_data()
    TRACES.clear()
    losses = [float(_step(model, optimizer, x, y)) for _ in range(3)]
    assert len(TRACES) == 1 and losses[-1] < losses[0]
    app = model.fc.activation_post_process
    before = app.state
    jq.disable_observer(model)  # in place on an NNX module, no retrace (flags are arrays)
    assert int(app.observer_enabled[...][0]) == 0
    assert int(model.conv.weight_fake_quant.observer_enabled[...][0]) == 0
    _step(model, optimizer, x, y)
    assert len(TRACES) == 1
    np.testing.assert_array_equal(app.state.scale, before.scale)
    np.testing.assert_array_equal(app.state.activation_post_process.min_val,
                                  before.activation_post_process.min_val)
    jq.enable_observer(model)
    _step(model, optimizer, x, y)
    assert float(app.state.activation_post_process.min_val) != float(before.activation_post_process.min_val)
    # fake quant off: the prepared model computes the float function (observers still run)
    jq.disable_fake_quant(model)
    jqn.freeze_bn_stats(model)
    model.eval()
    out_q = _forward(model, x)
    jq.enable_fake_quant(model)
    # "fake quant preserves buffers": same Variable objects, graph and shapes after all that
    assert nnx.graphdef(model) != graphdef  # freeze_bn / eval are static changes ...
    jqn.update_bn_stats(model)
    model.train()
    assert nnx.graphdef(model) == graphdef  # ... and undoing them restores the graph
    assert {k: id(v) for k, v in nnx.to_flat_state(nnx.state(model))} == var_ids
    assert jax.tree.map(lambda v: (v.shape, v.dtype), nnx.state(model)) == shapes
    float_model = Small()
    c = model.conv
    float_model.conv.kernel[...] = c.kernel[...]
    float_model.conv.bias[...] = c.bias[...]
    for name in ("scale", "bias", "mean", "var"):
        getattr(float_model.bn, name)[...] = getattr(c.bn, name)[...]
    float_model.fc.kernel[...] = model.fc.kernel[...]
    float_model.fc.bias[...] = model.fc.bias[...]
    float_model.eval()
    np.testing.assert_allclose(out_q, _forward(float_model, x), rtol=1e-5, atol=1e-6)


@nnx.jit
def _forward(model, x):
    return model(x)


def test_flags_on_nnx_state_and_freeze_bn():
    model = jqn.prepare_qat(Small(), jq.get_default_qat_qconfig("qnnpack"),
                            fuse=[("conv", "bn", "act")])
    model.train()
    state = nnx.state(model)
    off = jq.disable_fake_quant(state)  # an nnx.State: a new State, the model is untouched
    flat = dict(nnx.to_flat_state(off))
    assert int(flat[("fc", "weight_fake_quant", "fake_quant_enabled")].get_value()[0]) == 0
    assert int(model.fc.weight_fake_quant.fake_quant_enabled[...][0]) == 1
    x, _ = _small_data()
    _forward(model, x)
    mean = np.asarray(model.conv.bn.mean[...])
    jqn.freeze_bn_stats(model)
    _forward(model, x)
    np.testing.assert_array_equal(model.conv.bn.mean[...], mean)
    model.train()  # does not unfreeze (as torch)
    _forward(model, x)
    np.testing.assert_array_equal(model.conv.bn.mean[...], mean)
    jqn.update_bn_stats(model)
    _forward(model, x)
    assert not np.array_equal(model.conv.bn.mean[...], mean)


# ---------------------------------------------------------------------------------------
# fusion (torch.ao.nn.intrinsic.qat)
# ---------------------------------------------------------------------------------------

class TorchFused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c2, self.b2, self.r2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()
        self.c1, self.b1 = nn.Conv1d(3, 4, 3, bias=False), nn.BatchNorm1d(4)
        self.c3, self.r3 = nn.Conv3d(2, 3, 2), nn.ReLU()
        self.l1, self.bl = nn.Linear(6, 5), nn.BatchNorm1d(5)
        self.l2, self.rl = nn.Linear(6, 4), nn.ReLU()

    def forward(self, x2, x1, x3, xl):
        return (self.r2(self.b2(self.c2(x2))), self.b1(self.c1(x1)), self.r3(self.c3(x3)),
                self.bl(self.l1(xl)), self.rl(self.l2(xl)))


class NNXFused(nnx.Module):
    def __init__(self):
        self.c2, self.b2, self.r2 = _conv(3, 4, (3, 3), padding="VALID"), _bn(4), nnx.relu
        self.c1, self.b1 = _conv(3, 4, (3,), padding="VALID", use_bias=False), _bn(4)
        self.c3, self.r3 = _conv(2, 3, (2, 2, 2), padding="VALID"), nnx.relu
        self.l1, self.bl = _lin(6, 5), _bn(5)
        self.l2, self.rl = _lin(6, 4), nnx.relu

    def __call__(self, x2, x1, x3, xl):
        return (self.r2(self.b2(self.c2(x2))), self.b1(self.c1(x1)), self.r3(self.c3(x3)),
                self.bl(self.l1(xl)), self.rl(self.l2(xl)))


FUSE_GROUPS = [["c2", "b2", "r2"], ["c1", "b1"], ["c3", "r3"], ["l1", "bl"], ["l2", "rl"]]


def _copy_to_torch(j, t):
    with torch.no_grad():
        for name in ("c2", "c1", "c3"):
            getattr(t, name).weight.copy_(_t(tm.conv_kernel_to_torch(getattr(j, name).kernel[...])))
        for name in ("l1", "l2"):
            getattr(t, name).weight.copy_(_t(tm.dense_kernel_to_torch(getattr(j, name).kernel[...])))
        for name in ("c2", "c3", "l1", "l2"):
            getattr(t, name).bias.copy_(_t(getattr(j, name).bias[...]))
        for name in ("b2", "b1", "bl"):
            getattr(t, name).weight.copy_(_t(getattr(j, name).scale[...]))
            getattr(t, name).bias.copy_(_t(getattr(j, name).bias[...]))


def _nchw(a):
    return np.moveaxis(np.asarray(a), -1, 1)


def _nhwc(a):
    return np.moveaxis(np.asarray(a), 1, -1)


COEF = [_rand(4, 4, 4, 4), _rand(4, 5, 4), _rand(2, 3, 3, 3, 3), _rand(4, 5), _rand(4, 4)]


@nnx.jit
def _fused_grad(model, *xs):
    def loss(m):
        outs = m(*xs)
        return sum(jnp.sum(o * c) for o, c in zip(outs, COEF)), outs
    return nnx.grad(loss, has_aux=True)(model)


def test_fused_modules_match_torch_nniqat():
    """ConvBn2d+ReLU, ConvBn1d, ConvReLU3d, LinearBn1d, LinearReLU: train steps, then
    freeze_bn_stats: outputs, gradients, BN running stats and fake-quant state vs torch."""
    j = NNXFused()
    t = TorchFused()
    _copy_to_torch(j, t)
    t.train()
    t = tq.fuse_modules_qat(t, FUSE_GROUPS)
    t.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(t, inplace=True)
    q = jqn.prepare_qat(j, jq.get_default_qat_qconfig("x86"), fuse=FUSE_GROUPS,
                        bn_unbiased_running_var=True)
    q.train()
    names = {"c2": jqn.qat.ConvBnReLU, "c1": jqn.qat.ConvBn, "c3": jqn.qat.ConvReLU,
             "l1": jqn.qat.LinearBn, "l2": jqn.qat.LinearReLU}
    for n, cls in names.items():
        assert type(getattr(q, n)) is cls, n
        assert type(getattr(t, n)).__name__ == {"c2": "ConvBnReLU2d", "c1": "ConvBn1d", "c3": "ConvReLU3d",
                                                "l1": "LinearBn1d", "l2": "LinearReLU"}[n]
    for n in ("b2", "b1", "bl", "r2", "r3", "rl"):
        assert type(getattr(q, n)) is jqn.Identity
    for step in range(3):
        if step == 2:
            t.apply(nniqat.freeze_bn_stats)
            jqn.freeze_bn_stats(q)
        xs = [_rand(4, 6, 6, 3), _rand(4, 7, 3), _rand(2, 4, 4, 4, 2), _rand(4, 6)]
        touts = t(*[_t(_nchw(x)) if i < 3 else _t(x) for i, x in enumerate(xs)])
        tl = sum((o * _t(_nchw(c) if i < 3 else c)).sum() for i, (o, c) in enumerate(zip(touts, COEF)))
        t.zero_grad()
        tl.backward()
        g, outs = _fused_grad(q, *[jnp.asarray(x) for x in xs])
        for i, (o, to) in enumerate(zip(outs, touts)):
            to = to.detach().numpy()
            assert _rel(o, _nhwc(to) if i < 3 else to) <= 1e-5, (step, i)
        for n in ("c2", "c1", "c3"):
            assert _rel(tm.conv_kernel_to_torch(g[n]["kernel"][...]), getattr(t, n).weight.grad) <= 1e-5
        for n in ("l1", "l2"):
            assert _rel(tm.dense_kernel_to_torch(g[n]["kernel"][...]), getattr(t, n).weight.grad) <= 1e-5
        for n in ("c2", "c1", "l1"):
            bn_t = getattr(t, n).bn
            bn_j = getattr(q, n).bn
            assert _rel(g[n]["bn"]["scale"][...], bn_t.weight.grad) <= 1e-5, (step, n)
            assert _rel(bn_j.mean[...], bn_t.running_mean) <= 1e-5, (step, n)
            assert _rel(bn_j.var[...], bn_t.running_var) <= 1e-5, (step, n)
        tobs = tm.observer_state(t)
        jobs = jqn.get_observer_state_dict(q)
        assert set(tobs) == set(jobs)
        for k in tobs:
            assert _rel(jobs[k], tobs[k]) <= 1e-5, (step, k)


def test_fuse_errors_and_sequential():
    with pytest.raises(ValueError, match="features"):
        m = NNXFused()
        m.b2 = _bn(5)
        jqn.fuse_modules_qat(m, [["c2", "b2"]])
    with pytest.raises(ValueError, match="BatchNorm"):
        jqn.fuse_modules_qat(NNXFused(), [["c2", "c1"]])
    with pytest.raises(ValueError, match="nnx.Conv or nnx.Linear"):
        jqn.fuse_modules_qat(NNXFused(), [["b2", "r2"]])
    with pytest.raises(KeyError, match="nope"):
        jqn.fuse_modules_qat(NNXFused(), [["nope", "b2"]])
    seq = nnx.Sequential(_conv(1, 2, (3, 3)), _bn(2), nnx.relu)
    fused = jqn.fuse_modules_qat(seq, ["layers.0", "layers.1", "layers.2"])
    assert [type(l).__name__ for l in fused.layers] == ["ConvBnReLU", "Identity", "Identity"]
    assert type(seq.layers[0]) is nnx.Conv  # not in place
    fused.train()
    q = jqn.prepare_qat(fused, jq.default_qat_qconfig)
    assert type(q.layers[0]) is jqn.qat.ConvBnReLU
    y = _forward(q, jnp.asarray(_rand(2, 5, 5, 1)))
    assert y.shape == (2, 5, 5, 2) and float(jnp.min(y)) >= 0.0


# ---------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------

def _emb_bag(n, d, **kw):
    m = jqn.EmbeddingBag(n, d, embedding_init=Z, rngs=nnx.Rngs(0), **kw)
    m.embedding[...] = jnp.asarray(_rand(n, d))
    return m


class BagPair(nnx.Module):
    """test_embedding_bag_qat_config's model (tests/torch_models.EmbeddingBagPair)."""

    def __init__(self):
        self.emb1 = _emb_bag(10, 12, include_last_offset=True, mode="sum")
        self.emb2 = _emb_bag(10, 12, include_last_offset=True, mode="sum")

    def __call__(self, indices):
        return jnp.concatenate((self.emb1(indices), self.emb2(indices)))


@pytest.mark.parametrize("qconfig_name", ["default_embedding_qat_qconfig",
                                          "default_embedding_qat_qconfig_4bit"])
def test_embedding_bag_qat_config(qconfig_name):
    model = BagPair()
    tmodel = tm.EmbeddingBagPair().train()
    with torch.no_grad():
        tmodel.emb1.weight.copy_(_t(model.emb1.embedding[...]))
        tmodel.emb2.weight.copy_(_t(model.emb2.embedding[...]))
    tmodel.qconfig = getattr(tq, qconfig_name)
    tq.prepare_qat(tmodel, mapping=tq.get_embedding_qat_module_mappings(), inplace=True)
    qmodel = jqn.prepare_qat(model, getattr(jq, qconfig_name))
    fqs = {k: v for k, v in jqn.get_observer_dict(qmodel).items() if k.endswith("weight_fake_quant")}
    assert len(fqs) == 2 and all(type(v.config) is jq.FakeQuantize for v in fqs.values())
    assert type(qmodel.emb1) is jqn.qat.EmbeddingBag
    indices = RNG.integers(0, 10, (5, 12))
    out = _forward(qmodel, jnp.asarray(indices))
    tout = tmodel(torch.from_numpy(indices)).detach().numpy()
    assert _rel(out, tout) <= 1e-6
    assert qmodel.emb1.weight_fake_quant.zero_point[...].dtype == jnp.float32
    assert qmodel.emb2.weight_fake_quant.zero_point[...].dtype == jnp.float32
    assert type(qmodel.emb1.activation_post_process.config) is jq.NoopObserver
    t_sd = {k: v.numpy() for k, v in tmodel.state_dict().items() if "fake_quant" in k}
    for k, v in jqn.get_observer_state_dict(qmodel).items():
        np.testing.assert_allclose(v, t_sd[k], rtol=1e-6, err_msg=k)
    assert qconfig_name.endswith("4bit") == (qmodel.emb1.weight_fake_quant.config.quant_max == 15)


class DeFusedEmbeddingBagLinear(nnx.Module):
    """torch's DeFusedEmbeddingBagLinear (common_quantization) as an NNX model."""

    def __init__(self):
        self.emb = nnx.Embed(10, 12, embedding_init=Z, rngs=nnx.Rngs(0))
        self.emb.embedding[...] = jnp.asarray(_rand(10, 12))
        self.emb.qconfig = jq.default_embedding_qat_qconfig
        self.quant = jqn.QuantStub()
        self.dequant = jqn.DeQuantStub()
        self.linear = _lin(12, 1)
        self.qconfig = jq.get_default_qat_qconfig("qnnpack")

    def __call__(self, indices):
        x = jnp.sum(self.emb(indices), axis=1)
        x = self.quant(x)
        x = self.linear(x)
        return self.dequant(x)


class TorchDeFused(torch.nn.Module):
    def __init__(self, j):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 12)
        self.emb.qconfig = tq.default_embedding_qat_qconfig
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.linear = torch.nn.Linear(12, 1)
        self.qconfig = tq.get_default_qat_qconfig("qnnpack")
        with torch.no_grad():
            self.emb.weight.copy_(_t(j.emb.embedding[...]))
            self.linear.weight.copy_(_t(tm.dense_kernel_to_torch(j.linear.kernel[...])))
            self.linear.bias.copy_(_t(j.linear.bias[...]))

    def forward(self, indices):
        return self.dequant(self.linear(self.quant(torch.sum(self.emb(indices), dim=1))))


def test_embedding_qat_config():
    model = DeFusedEmbeddingBagLinear()
    tmodel = TorchDeFused(model).train()
    tq.prepare_qat(tmodel, mapping=tq.get_embedding_qat_module_mappings(), inplace=True)
    qmodel = jqn.prepare_qat(model)  # qconfigs come from the modules' own attributes
    obs = jqn.get_observer_dict(qmodel)
    assert sum(k.endswith("weight_fake_quant") for k in obs) == 2
    assert sum(k.endswith("activation_post_process") for k in obs) == 3  # emb, quant, linear
    assert type(qmodel.emb) is jqn.Embed
    assert type(qmodel.emb.weight_fake_quant.config) is jq.FakeQuantize
    assert qmodel.emb.weight_fake_quant.zero_point[...].dtype == jnp.float32
    assert type(qmodel.emb.activation_post_process.config) is jq.NoopObserver
    assert type(qmodel.linear.weight_fake_quant.config) is jq.FusedMovingAvgObsFakeQuantize
    assert type(qmodel.linear.activation_post_process.config) is jq.FusedMovingAvgObsFakeQuantize
    indices = RNG.integers(0, 10, (5, 12))
    for _ in range(2):
        out = _forward(qmodel, jnp.asarray(indices))
        tout = tmodel(torch.from_numpy(indices)).detach().numpy()
        assert _rel(out, tout) <= 1e-5
    t_sd = {k: v.numpy() for k, v in tmodel.state_dict().items()
            if "fake_quant" in k or "post_process" in k}
    j_sd = jqn.get_observer_state_dict(qmodel)
    assert set(t_sd) == set(j_sd)
    for k in t_sd:
        assert _rel(j_sd[k], t_sd[k]) <= 1e-5, k


def test_embedding_bag_float_matches_torch():
    F = torch.nn.functional
    w = _rand(9, 4)
    idx = RNG.integers(0, 9, 10)
    offsets = np.array([0, 3, 3, 7], np.int64)  # one empty bag
    psw = _rand(10)
    for mode in ("sum", "mean", "max"):
        bag = _emb_bag(9, 4, mode=mode)
        bag.embedding[...] = jnp.asarray(w)
        out = bag(jnp.asarray(idx), jnp.asarray(offsets))
        ref = F.embedding_bag(torch.from_numpy(idx), _t(w), torch.from_numpy(offsets), mode=mode)
        np.testing.assert_allclose(out, ref.numpy(), rtol=1e-6, atol=1e-7, err_msg=mode)
        out2 = bag(jnp.asarray(idx.reshape(2, 5)))
        ref2 = F.embedding_bag(torch.from_numpy(idx.reshape(2, 5)), _t(w), mode=mode)
        np.testing.assert_allclose(out2, ref2.numpy(), rtol=1e-6, atol=1e-7, err_msg=mode)
    bag = _emb_bag(9, 4, mode="sum", include_last_offset=True, padding_idx=2)
    bag.embedding[...] = jnp.asarray(w)
    out = bag(jnp.asarray(idx), jnp.asarray(np.array([0, 3, 3, 7, 10])), jnp.asarray(psw))
    ref = F.embedding_bag(torch.from_numpy(idx), _t(w), torch.from_numpy(np.array([0, 3, 3, 7, 10])),
                          mode="sum", include_last_offset=True, per_sample_weights=_t(psw),
                          padding_idx=2)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="mode"):
        jqn.EmbeddingBag(3, 2, mode="prod", rngs=nnx.Rngs(0))


def test_embed_qat_4bit_trains_and_attends():
    emb = nnx.Embed(6, 4, embedding_init=Z, rngs=nnx.Rngs(0))
    emb.embedding[...] = jnp.asarray(_rand(6, 4))
    q = jqn.prepare_qat(emb, jq.default_embedding_qat_qconfig_4bit)
    assert type(q) is jqn.Embed
    table = q.embedding[...]
    y = _forward(q, jnp.asarray([[0, 5], [2, 2]]))
    wfq = q.weight_fake_quant
    scale, zp = np.asarray(wfq.scale[...]), np.asarray(wfq.zero_point[...])
    ref = jq.fake_quantize_per_channel_affine(table, scale, zp, 0, 0, 15)
    np.testing.assert_array_equal(y, ref[jnp.asarray([[0, 5], [2, 2]])])
    assert len(np.unique(np.asarray(ref[0]))) <= 16
    att = nnx.jit(lambda m, a: m.attend(a))(q, jnp.ones((1, 4)))
    np.testing.assert_allclose(att, jnp.ones((1, 4)) @ ref.T, rtol=1e-6)
