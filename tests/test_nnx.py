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
    return torch.from_numpy(np.array(a, np.float32))


def _tree_equal(a, b, msg=""):
    assert jax.tree.structure(a) == jax.tree.structure(b), msg
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=msg)


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
ADAM = optax.adam(1e-2)  # one object: the transformation is static data of the optimizer graph,
#                          so tests training the same model share one compiled step


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
    optimizer = nnx.Optimizer(model, ADAM, wrt=nnx.Param)
    graphdef = nnx.graphdef(model)
    var_ids = {k: id(v) for k, v in nnx.to_flat_state(nnx.state(model))}
    shapes = jax.tree.map(lambda v: (v.shape, v.dtype), nnx.state(model))
    x, y = _small_data()
    TRACES.clear()
    losses = [float(_step(model, optimizer, x, y)) for _ in range(3)]
    assert len(TRACES) <= 1 and losses[-1] < losses[0]
    app = model.fc.activation_post_process
    before = app.state
    jq.disable_observer(model)  # in place on an NNX module, no retrace (flags are arrays)
    assert int(app.state.observer_enabled[0]) == 0
    assert int(model.conv.weight_fake_quant.state.observer_enabled[0]) == 0
    _step(model, optimizer, x, y)
    assert len(TRACES) <= 1  # toggling flags never retraces
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
    assert int(flat[("fc", "weight_fake_quant", "buffers")].get_value().fake_quant_enabled[0]) == 0
    assert int(model.fc.weight_fake_quant.state.fake_quant_enabled[0]) == 1
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
    with pytest.warns(UserWarning, match="zero derivative"):  # the model's own relu call stays
        f = jqn.fuse_modules_qat(NNXFused(), [["c2", "b2", "relu"]])
    assert type(f.c2) is jqn.ConvBnReLU and callable(f.r2) and not isinstance(f.r2, nnx.Module)
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
    assert qmodel.emb1.weight_fake_quant.state.zero_point.dtype == jnp.float32
    assert qmodel.emb2.weight_fake_quant.state.zero_point.dtype == jnp.float32
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
    assert qmodel.emb.weight_fake_quant.state.zero_point.dtype == jnp.float32
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
    scale, zp = np.asarray(wfq.state.scale), np.asarray(wfq.state.zero_point)
    ref = jq.fake_quantize_per_channel_affine(table, scale, zp, 0, 0, 15)
    np.testing.assert_array_equal(y, ref[jnp.asarray([[0, 5], [2, 2]])])
    assert len(np.unique(np.asarray(ref[0]))) <= 16
    att = nnx.jit(lambda m, a: m.attend(a))(q, jnp.ones((1, 4)))
    np.testing.assert_allclose(att, jnp.ones((1, 4)) @ ref.T, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# learnable qparams, mixed precision
# ---------------------------------------------------------------------------------------

LEARNABLE = jq.QConfig(
    activation=jq.LearnableFakeQuantize.with_args(observer=jq.MovingAverageMinMaxObserver,
                                                  quant_min=0, quant_max=255),
    weight=jq.LearnableFakeQuantize.with_args(
        observer=jq.MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
        dtype=jnp.int8, qscheme=jq.per_channel_symmetric))


class MLP(nnx.Module):
    def __init__(self, **kw):
        self.fc1 = _lin(6, 8, **kw)
        self.fc2 = _lin(8, 3, **kw)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


@nnx.jit
def _mlp_step(model, optimizer, x, y):
    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x).astype(jnp.float32), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def test_learnable_fake_quantize_trains_with_optax_and_checkpoints():
    model = jqn.prepare_qat(MLP(), LEARNABLE)
    scale = model.fc1.activation_post_process.scale
    assert isinstance(scale, jqn.QuantParam) and isinstance(scale, nnx.Param)
    assert model.fc1.weight_fake_quant.scale[...].shape == (8,)  # per output channel
    x = jnp.asarray(_rand(16, 6))
    y = jnp.asarray(RNG.integers(0, 3, 16).astype(np.int32))
    _forward(model, x)  # static estimate: qparams from the observers
    s0 = np.asarray(scale[...]).copy()
    jqn.enable_param_learning(model)
    assert int(model.fc2.weight_fake_quant.state.learning_enabled[0]) == 1
    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
    for _ in range(3):
        _mlp_step(model, optimizer, x, y)
    s1 = np.asarray(scale[...]).copy()
    assert not np.array_equal(s0, s1)  # optax moved the learnable scale
    # the gradient optax saw is the core op's
    g = nnx.jit(lambda m: nnx.grad(lambda mm: mm(x).sum(),
                                   argnums=nnx.DiffState(0, jqn.QuantParam))(m))(model)
    assert float(jnp.abs(g["fc2"]["activation_post_process"]["scale"][...]).sum()) > 0
    # checkpoint round trip (flax.serialization) into a freshly prepared model
    blob = serialization.to_bytes(nnx.to_pure_dict(nnx.state(model)))
    other = jqn.prepare_qat(MLP(), LEARNABLE)
    state = nnx.state(other)
    nnx.replace_by_pure_dict(state, serialization.from_bytes(nnx.to_pure_dict(state), blob))
    nnx.update(other, state)
    np.testing.assert_array_equal(other.fc1.activation_post_process.scale[...], s1)
    assert isinstance(other.fc1.activation_post_process.scale, jqn.QuantParam)
    np.testing.assert_array_equal(_forward(other, x), _forward(model, x))


@pytest.mark.parametrize("dtype,param_dtype", [
    (jnp.bfloat16, jnp.bfloat16),
    pytest.param(jnp.float16, jnp.float32, marks=pytest.mark.slow)])
def test_mixed_precision(dtype, param_dtype):
    class Mixed(nnx.Module):
        def __init__(self):
            self.conv = _conv(1, 4, (3, 3), dtype=dtype, param_dtype=param_dtype)
            self.bn = _bn(4, dtype=dtype)
            self.act = nnx.relu
            self.fc = _lin(4 * 16, 3, dtype=dtype, param_dtype=param_dtype)

        def __call__(self, x):
            x = self.act(self.bn(self.conv(x)))
            return self.fc(x.reshape(x.shape[0], -1))

    model = jqn.prepare_qat(Mixed(), jq.get_default_qat_qconfig("x86"), fuse=[("conv", "bn", "act")])
    model.train()
    assert model.fc.kernel[...].dtype == param_dtype
    x = jnp.asarray(_rand(4, 4, 4, 1)).astype(dtype)
    out = _forward(model, x)
    assert out.dtype == dtype
    for pp in jqn.get_observer_dict(model).values():
        assert pp.state.scale.dtype == jnp.float32  # observers compute in float32
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert float(model.fc.activation_post_process.state.scale[0]) != 1.0
    optimizer = nnx.Optimizer(model, optax.sgd(0.01), wrt=nnx.Param)
    y = jnp.asarray(RNG.integers(0, 3, 4).astype(np.int32))
    assert np.isfinite(float(_mlp_step(model, optimizer, x, y)))
    assert model.fc.kernel[...].dtype == param_dtype


# ---------------------------------------------------------------------------------------
# observer dicts, state dicts, checkpoints
# ---------------------------------------------------------------------------------------

class AnnotatedSingleLayerLinearModel(nnx.Module):
    def __init__(self):
        self.fc1 = jqn.QuantWrapper(_lin(5, 5))

    def __call__(self, x):
        return self.fc1(x)


def test_record_observer():
    """torch's test_record_observer: a RecordingObserver records every calibration batch."""
    calib = [jnp.asarray(RNG.random((2, 5)).astype(np.float32)) for _ in range(2)]
    for jit in (False, True):
        model = AnnotatedSingleLayerLinearModel()
        model.qconfig = jq.default_debug_qconfig
        model = jqn.prepare(model)
        run = _forward if jit else (lambda m, a: m(a))
        for _ in range(2):
            for x in calib:
                run(model, x)
        observer_dict = jqn.get_observer_dict(model)
        assert "fc1.module.activation_post_process" in observer_dict
        values = observer_dict["fc1.module.activation_post_process"].get_tensor_value()
        assert len(values) == 2 * len(calib)
        np.testing.assert_array_equal(values[0], model(calib[0]))
        np.testing.assert_array_equal(values[3], model(calib[1]))


@pytest.mark.parametrize("obs", ["MinMaxObserver", "MovingAverageMinMaxObserver", "HistogramObserver"])
def test_save_load_observer_state_dict(obs):
    """torch's test_save_load_state_dict_script: observer stats saved and loaded into a
    second prepared model give identical state."""
    qconfig = jq.QConfig(activation=getattr(jq, obs), weight=jq.default_weight_observer)

    def make():
        return jqn.prepare(jqn.QuantWrapper(_lin(5, 5)), {"": qconfig})
    m1 = make()
    for _ in range(2):
        _forward(m1, jnp.asarray(RNG.random((5, 5)).astype(np.float32)))
    obs_dict = jqn.get_observer_state_dict(m1)
    assert "module.activation_post_process.min_val" in obs_dict
    m2 = make()
    jqn.load_observer_state_dict(m2, obs_dict)
    s1 = dict(nnx.to_flat_state(nnx.state(m1, jqn.QuantStat)))
    s2 = dict(nnx.to_flat_state(nnx.state(m2, jqn.QuantStat)))
    assert s1.keys() == s2.keys()
    for k in s1:
        _tree_equal(s1[k].get_value(), s2[k].get_value(), str(k))
    bad = dict(obs_dict)
    bad.pop("module.activation_post_process.min_val")
    with pytest.raises(jq.StateDictError, match="missing"):
        jqn.load_observer_state_dict(make(), bad)
    with pytest.raises(jq.StateDictError, match="unexpected"):
        jqn.load_observer_state_dict(make(), {**obs_dict, "nope.min_val": np.zeros(())})


def test_checkpoint_resume_is_bit_identical():
    """A QAT train state (params, observer / fake-quant state, BN stats, Adam state) saved with
    flax.serialization and restored into a fresh prepared model resumes bit-identically."""
    def fresh():
        m = jqn.prepare_qat(Small(), jq.get_default_qat_qconfig("x86"), fuse=[("conv", "bn", "act")])
        m.train()
        return m, nnx.Optimizer(m, ADAM, wrt=nnx.Param)

    data = [_small_data() for _ in range(5)]
    model, opt = fresh()
    for x, y in data[:2]:
        _step(model, opt, x, y)
    blob = serialization.to_bytes({"model": nnx.to_pure_dict(nnx.state(model)),
                                   "opt": nnx.to_pure_dict(nnx.state(opt))})
    losses = [np.asarray(_step(model, opt, x, y)) for x, y in data[2:]]

    model2, opt2 = fresh()  # different random weights until restored
    target = {"model": nnx.to_pure_dict(nnx.state(model2)), "opt": nnx.to_pure_dict(nnx.state(opt2))}
    restored = jax.tree.map(jnp.asarray, serialization.from_bytes(target, blob))
    for obj, key in ((model2, "model"), (opt2, "opt")):
        st = nnx.state(obj)
        nnx.replace_by_pure_dict(st, restored[key])
        nnx.update(obj, st)
    losses2 = [np.asarray(_step(model2, opt2, x, y)) for x, y in data[2:]]
    np.testing.assert_array_equal(losses2, losses)
    a = dict(nnx.to_flat_state(nnx.state(model)))
    b = dict(nnx.to_flat_state(nnx.state(model2)))
    assert a.keys() == b.keys()
    for k in a:
        _tree_equal(a[k].get_value(), b[k].get_value(), str(k))


class LinearReLUModel(nnx.Module):
    def __init__(self):
        self.linear = _lin(2, 2)

    def __call__(self, x):
        return nnx.relu(self.linear(x))


@pytest.mark.parametrize("engine", ["fbgemm", "qnnpack"])
def test_default_fused_qat_config(engine):
    model = LinearReLUModel()
    model.qconfig = jq.get_default_qat_qconfig(engine, version=1)
    ref_model = jqn.prepare_qat(jqn.QuantWrapper(model))
    _forward(ref_model, jnp.asarray(_rand(2, 2)))
    obs = jqn.get_observer_dict(ref_model)
    assert len(obs) == 3  # quant, linear activation, linear weight
    for name, pp in obs.items():
        assert type(pp.config) is jq.FusedMovingAvgObsFakeQuantize, name
    lower, upper, obs2match = ((0, 127, jq.MovingAveragePerChannelMinMaxObserver) if engine == "fbgemm"
                               else (0, 255, jq.MovingAverageMinMaxObserver))
    app = ref_model.quant.activation_post_process.config.activation_post_process
    assert (app.quant_min, app.quant_max) == (lower, upper)
    pp = ref_model.quant.activation_post_process   # torch-like attributes on the module
    assert (pp.quant_min, pp.quant_max) == (lower, upper) and pp.dtype == jq.quint8
    assert pp.qscheme == jq.per_tensor_affine
    assert type(ref_model.module.linear.weight_fake_quant.config.activation_post_process) is obs2match


def test_prepare_ptq_matches_torch_observers():
    """PTQ prepare + calibration: the observers' state and qparams equal torch's eager prepare."""
    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = tq.QuantStub()
            self.fc = torch.nn.Linear(6, 4)
            self.dequant = tq.DeQuantStub()

        def forward(self, x):
            return self.dequant(self.fc(self.quant(x)))

    for qconfig in ("default_qconfig", "x86"):
        j = jqn.QuantWrapper(_lin(6, 4))
        t = TorchNet().eval()
        with torch.no_grad():
            t.fc.weight.copy_(_t(tm.dense_kernel_to_torch(j.module.kernel[...])))
            t.fc.bias.copy_(_t(j.module.bias[...]))
        if qconfig == "x86":
            t.qconfig, jqc = tq.get_default_qconfig("x86"), jq.get_default_qconfig("x86")
        else:
            t.qconfig, jqc = tq.default_qconfig, jq.default_qconfig
        tq.prepare(t, inplace=True)
        q = jqn.prepare(j, jqc)
        for _ in range(3):
            x = _rand(8, 6)
            t(_t(x))
            _forward(q, jnp.asarray(x))
        for jname, tmod in (("quant", t.quant), ("module", t.fc)):
            pp = q.quant.activation_post_process if jname == "quant" else q.module.activation_post_process
            ts, tz = tmod.activation_post_process.calculate_qparams()
            js, jz = pp.calculate_qparams()
            np.testing.assert_allclose(js, ts.numpy(), rtol=1e-6, err_msg=f"{qconfig} {jname}")
            np.testing.assert_array_equal(jz, tz.numpy())
            tsd = {k: v.numpy() for k, v in tmod.activation_post_process.state_dict().items()}
            for k, v in pp.state_dict().items():
                np.testing.assert_allclose(v, tsd[k], rtol=1e-6, err_msg=f"{qconfig} {jname} {k}")


def test_prepare_fuse_argument_equals_fuse_modules_first():
    """``prepare(model, qconfig, fuse=groups)`` is ``prepare(fuse_modules(model, groups))``."""
    j = NNXFused()
    qc = jq.QConfig(activation=jq.MinMaxObserver, weight=jq.default_per_channel_weight_observer)
    a = jqn.prepare(j, qc, fuse=FUSE_GROUPS)
    b = jqn.prepare(jqn.fuse_modules(j, FUSE_GROUPS), qc)
    assert type(a.c2) is type(b.c2) and type(a.b2) is jqn.Identity
    xs = [_rand(4, 6, 6, 3), _rand(4, 7, 3), _rand(2, 4, 4, 4, 2), _rand(4, 6)]
    for oa, ob in zip(a(*[jnp.asarray(x) for x in xs]), b(*[jnp.asarray(x) for x in xs])):
        np.testing.assert_array_equal(np.asarray(oa), np.asarray(ob))
    sa, sb = jqn.get_observer_dict(a), jqn.get_observer_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k].state.min_val, sb[k].state.min_val)


def test_fuse_modules_folds_bn_like_torch():
    """PTQ fusion (torch's fuse_modules in eval mode): BN folded into the weights."""
    j = NNXFused()
    t = TorchFused()
    _copy_to_torch(j, t)
    for name in ("b2", "b1", "bl"):  # non-trivial running stats
        c = getattr(j, name).num_features
        mean, var = _rand(c, scale=0.3), RNG.uniform(0.5, 2.0, c).astype(np.float32)
        getattr(j, name).mean[...] = jnp.asarray(mean)
        getattr(j, name).var[...] = jnp.asarray(var)
        with torch.no_grad():
            getattr(t, name).running_mean.copy_(_t(mean))
            getattr(t, name).running_var.copy_(_t(var))
    t.eval()
    tf = tq.fuse_modules(t, FUSE_GROUPS)
    jf = jqn.fuse_modules(j, FUSE_GROUPS)
    assert type(jf.c2) is jqn.ConvReLU and type(jf.c1) is nnx.Conv and jf.c1.bias is not None
    assert type(jf.l1) is nnx.Linear and type(jf.b2) is jqn.Identity
    xs = [_rand(4, 6, 6, 3), _rand(4, 7, 3), _rand(2, 4, 4, 4, 2), _rand(4, 6)]
    outs = jf(*[jnp.asarray(x) for x in xs])
    touts = tf(*[_t(_nchw(x)) if i < 3 else _t(x) for i, x in enumerate(xs)])
    for i, (o, to) in enumerate(zip(outs, touts)):
        to = to.detach().numpy()
        assert _rel(o, _nhwc(to) if i < 3 else to) <= 1e-5, i
