"""Friendly errors on a newcomer's paths (issue [5]): each message says what to do.

(a) a bad qconfig_spec (key / value / whole spec) in jquant.linen and jquant.nnx
    prepare / prepare_qat, and spec entries that match nothing;
(b) observers / fake quants used before ``init`` (None or a foreign state), factories used
    as configs, a prepared Linen model applied with the float model's variables;
(c) convert before calibration: one error naming every observer that never saw data
    (torch 2.13 only warns and uses scale=1, zero_point=0: checked here too);
(d) a model with no quantizable module (or every module resolved to None): a UserWarning
    at prepare / prepare_qat (torch warns "None of the submodule got qconfig applied") and
    at convert.

Cheap: tiny models, no training; Linen models are initialised eagerly once each.
"""
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant as jq
import jquant.linen as jl
import jquant.nnx as jqn

X = jnp.ones((2, 4))
PTQ = jq.get_default_qconfig("x86")
QAT = jq.get_default_qat_qconfig("x86")


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jl.QuantStub(name="quant")(x)
        return jl.DeQuantStub(name="dequant")(nn.Dense(3, name="fc")(x))


class LinenNothing(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.tanh(x) * self.param("w", nn.initializers.ones, (4,))


class NNXNet(nnx.Module):
    def __init__(self):
        self.quant = jqn.QuantStub()
        self.fc = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        self.dequant = jqn.DeQuantStub()

    def __call__(self, x):
        return self.dequant(self.fc(self.quant(x)))


class NNXNothing(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones(4))

    def __call__(self, x):
        return jnp.tanh(x) * self.w


def _init(model):
    return model.init(jax.random.key(0), X)


def _prepare(front, qat, spec, model=None):
    if front == "linen":
        return (jl.prepare_qat if qat else jl.prepare)(model or LinenNet(), spec)
    return (jqn.prepare_qat if qat else jqn.prepare)(model or NNXNet(), spec)


def _jq_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, UserWarning)
            and "jquant" in str(w.message)]


# ------------------------------------------------------------------------------------------
# (a) bad qconfig_spec
# ------------------------------------------------------------------------------------------

BAD_SPECS = {
    "value str": ({"fc": "x86"}, r"qconfig_spec\['fc'\] must be a QConfig or None.*"
                                 r"the string 'x86'.*get_default_qconfig\('x86'\)"),
    "value observer class": ({"fc": jq.MinMaxObserver},
                             r"observer / fake-quant class MinMaxObserver.*QConfig\(activation="),
    "value observer instance": ({"fc": jq.MinMaxObserver()}, r"observer / fake-quant MinMaxObserver"),
    "value tuple": ({"fc": (jq.MinMaxObserver, jq.MinMaxObserver)}, r"must be a QConfig or None"),
    "key int": ({3: PTQ}, r"keys must be module paths \(str.*or module types, got 3 \(int\)"),
    "key instance": ({nn.Dense(3): PTQ}, r"got a Dense instance.*use its dotted path"),
    "key non-module type": ({int: PTQ}, r"builtins\.int is not a .*Module type"),
    "bad regex": ({"fc[": PTQ}, r"not a valid regular expression.*re\.escape"),
    "spec str": ("x86", r"qconfig_spec must be a QConfig.*the string 'x86'.*get_default_qconfig"),
    "spec function": (jq.get_default_qconfig, r"the function get_default_qconfig \(call it"),
    "spec QConfig class": (jq.QConfig, r"the QConfig class itself"),
    "spec list": ([PTQ], r"qconfig_spec must be a QConfig.*\(list\)"),
}


@pytest.mark.parametrize("qat", [False, True], ids=["prepare", "prepare_qat"])
@pytest.mark.parametrize("front", ["linen", "nnx"])
@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_qconfig_spec(front, qat, case):
    spec, pattern = BAD_SPECS[case]
    with pytest.raises(ValueError, match=pattern):
        _prepare(front, qat, spec)          # raised at prepare, before any trace


def test_type_key_of_the_other_front_end():
    with pytest.raises(ValueError, match=r"flax\.nnx\..*Linear is not a flax\.linen.*Module type"):
        jl.prepare(LinenNet(), {nnx.Linear: PTQ})
    with pytest.raises(ValueError, match=r"Dense is not a flax\.nnx.*Module type"):
        jqn.prepare_qat(NNXNet(), {nn.Dense: QAT})
    with pytest.raises(ValueError, match=r"not a flax\.nnx.*Module type"):
        jqn.propagate_qconfig(NNXNet(), {int: PTQ})


@pytest.mark.parametrize("front", ["linen", "nnx"])
def test_unmatched_key_lists_the_model_modules(front):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pm = _prepare(front, True, {"fcc": QAT, "": QAT})
        if front == "linen":
            _init(pm)
    msgs = _jq_warnings(rec)
    assert len(msgs) == 1, msgs             # the global entry prepared the model: no 2nd warning
    assert "matched no module: 'fcc'" in msgs[0]
    assert "regular expressions matched against the whole dotted module path" in msgs[0]
    assert re.search(r"quantizable modules: .*'fc'.*'quant'", msgs[0]), msgs[0]


# ------------------------------------------------------------------------------------------
# (b) used before init
# ------------------------------------------------------------------------------------------

CONFIGS = {
    "MinMaxObserver": jq.MinMaxObserver(),
    "PerChannelMinMaxObserver": jq.PerChannelMinMaxObserver(),
    "HistogramObserver": jq.HistogramObserver(bins=16),
    "FakeQuantize": jq.FakeQuantize(),
    "FusedMovingAvgObsFakeQuantize": jq.FusedMovingAvgObsFakeQuantize(),
    "LearnableFakeQuantize": jq.LearnableFakeQuantize(observer=jq.MovingAverageMinMaxObserver),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_before_init(name):
    cfg = CONFIGS[name]
    run = cfg.update if name.endswith("Observer") else cfg.apply
    for bad in (None, X):                   # no state yet / an array instead of the state
        with pytest.raises(ValueError, match=rf"{name}\.\w+: state must be the \w+ returned by "
                                             rf"init\(\)"):
            run(bad, X)
        with pytest.raises(ValueError, match=r"state must be the \w+ returned by init\(\)"):
            cfg.calculate_qparams(bad)


def test_state_of_another_config():
    fq = jq.FakeQuantize()
    obs_state = jq.MinMaxObserver().init(X)
    with pytest.raises(ValueError, match=r"FakeQuantize.apply: .*got MinMaxState"):
        fq(obs_state, X)
    with pytest.raises(ValueError, match=r"per-tensor \(\) state .*another observer"):
        jq.MinMaxObserver().update(jq.PerChannelMinMaxObserver().init(X), X)
    pc = jq.PerChannelMinMaxObserver(ch_axis=1)
    with pytest.raises(ValueError, match=r"4 channels along ch_axis=1 but the state has 5"):
        pc.update(pc.init(jnp.ones((2, 5))), X)


def test_factory_used_as_a_config():
    factory = jq.MinMaxObserver.with_args(reduce_range=True)
    for attr in ("init", "update", "calculate_qparams"):
        with pytest.raises(AttributeError, match=r"is a factory .*obs = factory\(\)"):
            getattr(factory, attr)
    assert not hasattr(factory, "__deepcopy__")          # protocols still see plain misses
    assert factory().init(X).min_val.shape == ()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_method_called_on_the_class(name):
    """``MinMaxObserver.init(x)`` (the class, not a config) says to build the config first;
    explicit ``Class.method(config, ...)`` calls still work."""
    cls = type(CONFIGS[name])
    for method, args in (("init", (X,)), ("update", (X, X)), ("apply", (X, X)),
                         ("calculate_qparams", (X,))):
        if not hasattr(cls, method):
            continue
        with pytest.raises(TypeError, match=rf"{name}\.{method}\(\) was called on the class, "
                                            rf"not on a config: .*cfg = {name}\(\); "
                                            rf"cfg\.{method}\(\.\.\.\)"):
            getattr(cls, method)(*args)
    state = cls.init(CONFIGS[name], X)
    assert type(state) is type(CONFIGS[name].init(X))


def test_linen_prepared_model_with_float_variables():
    pm = jl.prepare_qat(LinenNet(), QAT)
    float_vars = _init(LinenNet())
    with pytest.raises(ValueError, match=r"no 'quant_stats' collection.*prepared\.init\(rng, x\)"):
        pm.apply(float_vars, X)
    _init(pm)
    with pytest.raises(ValueError, match=r"no quant_stats state for fc .*quant .*not the float "
                                         r"model's"):
        jl.convert(pm, float_vars)


# ------------------------------------------------------------------------------------------
# (c) convert before calibration
# ------------------------------------------------------------------------------------------

UNSEEN = r"convert: 2 activation observer\(s\) / fake quant\(s\) never saw data: {}.*{}.*has not seen any data.*" \
         r"Run calibration batches"


@pytest.mark.parametrize("qat", [False, True], ids=["ptq", "qat"])
def test_linen_convert_before_calibration(qat):
    pm = _prepare("linen", qat, QAT if qat else PTQ)
    v = _init(pm)
    with pytest.raises(ValueError, match=UNSEEN.format("fc", "quant")):
        jl.convert(pm, v)
    with pytest.raises(ValueError, match="has not been traced yet"):
        jl.convert(_prepare("linen", qat, QAT if qat else PTQ), v)
    with pytest.raises(ValueError, match=r"must come from jquant.linen.prepare.*got LinenNet"):
        jl.convert(LinenNet(), v)


@pytest.mark.parametrize("qat", [False, True], ids=["ptq", "qat"])
def test_nnx_convert_before_calibration(qat):
    pm = _prepare("nnx", qat, QAT if qat else PTQ)
    with pytest.raises(ValueError, match=UNSEEN.format("fc", "quant")):
        jqn.convert(pm)
    # inplace: the error leaves the prepared model as it was (not half converted)
    before = jax.tree.map(np.asarray, nnx.state(pm))
    types = [type(m).__name__ for _, m in nnx.iter_graph(pm)]
    with pytest.raises(ValueError, match=UNSEEN.format("fc", "quant")):
        jqn.convert(pm, inplace=True)
    assert [type(m).__name__ for _, m in nnx.iter_graph(pm)] == types
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(pm)), before)


def test_torch_convert_before_calibration_only_warns():
    """The documented deviation: torch 2.13 warns and converts with scale=1, zero_point=0."""
    torch = pytest.importorskip("torch")
    tq = torch.ao.quantization
    m = torch.nn.Sequential(tq.QuantStub(), torch.nn.Linear(4, 3), tq.DeQuantStub()).eval()
    m.qconfig = tq.get_default_qconfig("x86")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        q = tq.convert(tq.prepare(m))
    assert any("must run observer before calling calculate_qparams" in str(w.message)
               for w in rec)
    assert float(q[0].scale) == 1.0 and int(q[0].zero_point) == 0


# ------------------------------------------------------------------------------------------
# (d) nothing to quantize
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qat", [False, True], ids=["prepare", "prepare_qat"])
@pytest.mark.parametrize("front", ["linen", "nnx"])
def test_no_quantizable_module(front, qat):
    model = LinenNothing() if front == "linen" else NNXNothing()
    fn = "prepare_qat" if qat else "prepare"
    with pytest.warns(UserWarning, match=rf"jquant\.{front}\.{fn}: no module was prepared.*"
                                         r"no quantizable module.*QuantStub"):
        pm = _prepare(front, qat, QAT if qat else PTQ, model)
        if front == "linen":
            v = _init(pm)
    with pytest.warns(UserWarning, match=rf"jquant\.{front}\.convert: nothing to convert"):
        if front == "linen":
            qm, qv = jl.convert(pm, v)
            assert jnp.allclose(qm.apply(qv, X), model.apply(v, X))      # stays float
        else:
            jqn.convert(pm)


@pytest.mark.parametrize("front", ["linen", "nnx"])
def test_every_module_resolved_to_none(front):
    for spec in (None, {}, {"fc": None, "quant": None}):
        with pytest.warns(UserWarning, match=r"no module was prepared.*'fc'.*'quant'.*all "
                                             r"resolved to qconfig None"):
            pm = _prepare(front, False, spec)
            if front == "linen":
                _init(pm)


def test_no_false_alarm():
    """A correctly prepared model (also a weight-only embedding spec) warns about nothing."""
    class Emb(nn.Module):
        @nn.compact
        def __call__(self, i):
            return jl.EmbeddingBag(10, 4, name="bag")(i)

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _init(_prepare("linen", True, QAT))
        jqn.prepare_qat(NNXNet(), {"fc": QAT})
        jl.prepare(Emb(), {jl.EmbeddingBag: jq.float_qparams_weight_only_qconfig_4bit}).init(
            jax.random.key(0), jnp.zeros((2, 3), jnp.int32))
    assert _jq_warnings(rec) == []
