"""jquant.linen: prepare / prepare_qat on unmodified flax.linen models (issue [3]).

Seed counterparts (torch's test_workflow_module.py): test_embedding_bag_qat_config,
test_embedding_qat_config, test_default_fused_qat_config, test_fake_quant_preserves_buffers,
test_observers_preserve_buffers, test_record_observer, test_save_load_state_dict_script,
test_qat_convbn_fused_syncbn_replacement / test_syncbn_preserves_qconfig /
test_qat_data_parallel (data-parallel BatchNorm and observers via ``axis_name``),
test_device_affinity. torch 2.13 is the oracle wherever numbers are compared.
"""
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.ao.quantization as tq

import jquant as jq
import jquant.linen as jl
import torch_models as tm

KEY = jax.random.key(0)


def _np(a):
    return np.asarray(a)


def init(model, *args):
    """``model.init`` under jit (eager Flax runs every small op on its own: slow)."""
    return jax.jit(model.init)(KEY, *args)


_JITTED = {}


def run(model, variables, *args, mutable=("quant_stats",)):
    """``model.apply(variables, *args, mutable=...)`` under jit (one compile per model and
    ``mutable``); ``mutable=()``: frozen evaluation."""
    key = (model, tuple(mutable))
    if key not in _JITTED:
        if not mutable:
            _JITTED[key] = jax.jit(lambda v, *a: model.apply(v, *a))
        else:
            _JITTED[key] = jax.jit(lambda v, *a: model.apply(v, *a, mutable=list(mutable)))
    return _JITTED[key](variables, *args)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(3)(x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="inner")(x)


class Nested(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = Block(name="block")(x)
        x = nn.LayerNorm(name="ln")(x)
        return nn.Dense(2, name="head")(x)


# ----------------------------------------------------------------------------------------
# structure: names, collections, qconfig spec
# ----------------------------------------------------------------------------------------

def test_prepare_qat_keeps_param_names_and_adds_quant_stats():
    x = jnp.ones((2, 5))
    float_vars = MLP().init(KEY, x)
    qm = jl.prepare_qat(MLP(), jq.get_default_qat_qconfig("x86"))
    v = init(qm, x)
    assert jax.tree.structure(v["params"]) == jax.tree.structure(float_vars["params"])
    for path in ("Dense_0", "Dense_1"):
        st = v["quant_stats"][path]
        assert type(st["weight_fake_quant"]) is jq.FakeQuantizeState
        assert type(st["activation_post_process"]) is jq.FakeQuantizeState
    # per-channel weight state is sized by output channels (torch layout)
    assert v["quant_stats"]["Dense_0"]["weight_fake_quant"].scale.shape == (8,)
    # the float params load into the prepared model unchanged
    y = run(qm, {**v, "params": float_vars["params"]}, x, mutable=())
    assert y.shape == (2, 3)


def test_stubs_are_identities_when_unprepared():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jl.DeQuantStub()(nn.Dense(3)(jl.QuantStub()(x)))
    x = jax.random.normal(KEY, (2, 4))
    v = M().init(KEY, x)
    assert "quant_stats" not in v
    ref = nn.Dense(3).apply({"params": v["params"]["Dense_0"]}, x)
    np.testing.assert_array_equal(M().apply(v, x), ref)
    w = jl.QuantWrapper(MLP())
    vw = init(w, x)
    np.testing.assert_array_equal(w.apply(vw, x), MLP().apply({"params": vw["params"]["module"]}, x))


def test_qconfig_spec_regex_type_none_and_unmatched_warning():
    qc = jq.get_default_qat_qconfig("qnnpack")
    spec = {"": jq.get_default_qat_qconfig("x86"), "block.*": qc, nn.LayerNorm: None,
            "head": None, "nothere": qc, nn.Conv: qc}
    qm = jl.prepare_qat(Nested(), spec)
    with pytest.warns(UserWarning, match="'nothere'.*Conv"):
        v = init(qm, jnp.ones((2, 3)))
    reg = qm.plan.registry
    assert set(reg) == {"block.inner"}   # root Nested has no layer; ln and head are float
    assert reg["block.inner"]["weight_fake_quant"].qscheme == jq.per_tensor_symmetric  # qnnpack
    assert "head" not in v["quant_stats"] and "ln" not in v["quant_stats"]
    assert set(jl.unmatched_spec_entries(qm)) == {"nothere", nn.Conv}
    # warns once per prepared model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(qm, v, jnp.ones((2, 3)), mutable=())


def test_qconfig_spec_priority_path_over_type_over_parent():
    x86, qnn = jq.get_default_qat_qconfig("x86"), jq.get_default_qat_qconfig("qnnpack")
    spec = {"": x86, nn.Dense: qnn, "head": x86}
    qm = jl.prepare_qat(Nested(), spec)
    init(qm, jnp.ones((2, 3)))
    reg = qm.plan.registry
    assert reg["block.inner"]["weight_fake_quant"].qscheme == jq.per_tensor_symmetric  # type
    assert reg["head"]["weight_fake_quant"].qscheme == jq.per_channel_symmetric        # path
    assert reg["ln"]["activation_post_process"].quant_max == 127                      # parent


@pytest.mark.parametrize("bad", [3, {"x": 3}, {1.5: None}, {"(": None}])
def test_invalid_spec_raises_value_error(bad):
    with pytest.raises(ValueError, match="qconfig_spec"):
        jl.prepare_qat(MLP(), bad)


def test_invalid_fuse_and_model_raise_value_error():
    with pytest.raises(ValueError, match="fuse"):
        jl.prepare_qat(MLP(), jq.default_qat_qconfig, fuse=[("a", "b", "c", "d")])
    with pytest.raises(ValueError, match="model"):
        jl.prepare_qat(nn.relu, jq.default_qat_qconfig)
    qm = jl.prepare_qat(MLP(), jq.default_qat_qconfig, fuse=[("Dense_0", "BatchNorm_0")])
    with pytest.raises(ValueError, match="BatchNorm"):
        init(qm, jnp.ones((2, 3)))


class _ReLUModule(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(x)


class _DenseReLUModule(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _ReLUModule(name="act")(nn.Dense(4, name="fc")(x))


class _DenseReLUFunction(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(4, name="fc")(x))


def test_fuse_relu_module_without_batchnorm():
    """``(layer, None, relu_path)`` fuses a ReLU *module* (torch's LinearReLU: the module
    becomes the identity); the two-entry form reads the path as a BatchNorm and says how
    to write a ReLU module instead."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 3)), jnp.float32)
    qc = jq.get_default_qat_qconfig("x86")
    by_module = jl.prepare_qat(_DenseReLUModule(), qc, fuse=[("fc", None, "act")])
    by_function = jl.prepare_qat(_DenseReLUFunction(), qc, fuse=[("fc", "relu")])
    v = init(by_module, x)
    y, _ = by_module.apply(v, x, mutable=["quant_stats"])
    y2, _ = by_function.apply({"params": {"fc": v["params"]["fc"]},
                               "quant_stats": {"fc": v["quant_stats"]["fc"]}}, x,
                              mutable=["quant_stats"])
    np.testing.assert_array_equal(_np(y), _np(y2))
    assert float(jnp.min(y)) >= 0.0
    with pytest.raises(ValueError, match=r"\('fc', None, 'act'\)"):
        init(jl.prepare_qat(_DenseReLUModule(), qc, fuse=[("fc", "act")]), x)


def _sequential_cnn(relu):
    """conv, relu, conv, relu, flatten, dense, relu, dense (``relu``: builds each ReLU)."""
    return nn.Sequential([nn.Conv(4, (3, 3), padding=1), relu(), nn.Conv(6, (3, 3), padding=1),
                          relu(), lambda x: x.reshape(x.shape[0], -1), nn.Dense(5), relu(),
                          nn.Dense(3)])


def test_fuse_relu_function_in_sequential():
    """An ``nn.Sequential`` holds ReLU as the function ``nn.relu``; fused, its slot becomes
    the identity (torch's ConvReLU2d / LinearReLU), found after a ``"relu"`` group or named
    by slot path (``layers_i``). Forward, observer updates, gradients and the converted
    model are bit-identical to the same Sequential with ReLU *modules* fused by path (the
    tested torch-exact form); the model's own relu would zero the gradient of outputs that
    round to 0 (``test_relu_function_fusion_close_to_torch``)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 6, 2)), jnp.float32)
    qc = jq.get_default_qat_qconfig("x86")
    reference = jl.prepare_qat(_sequential_cnn(_ReLUModule), qc,
                               fuse=[("layers_0", None, "layers_1"), ("layers_2", None, "layers_3"),
                                     ("layers_5", None, "layers_6")])
    v = init(reference, x)

    def loss_and_grad(model):
        def loss(p):
            y, upd = model.apply({**v, "params": p}, x, mutable=["quant_stats"])
            return jnp.sum(y ** 2), (y, upd)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])

    (_, (y_ref, u_ref)), g_ref = loss_and_grad(reference)
    c_ref, cv_ref = jl.convert(reference, {**v, **u_ref})
    for fuse in ([("layers_0", "relu"), ("layers_2", nn.relu), ("layers_5", "relu")],
                 [("layers_0", None, "layers_1"), ("layers_2", None, "layers_3"),
                  ("layers_5", None, "layers_6")]):
        model = jl.prepare_qat(_sequential_cnn(lambda: nn.relu), qc, fuse=fuse)
        assert jax.tree.structure(init(model, x)) == jax.tree.structure(v)
        (_, (y, u)), g = loss_and_grad(model)
        np.testing.assert_array_equal(_np(y), _np(y_ref))
        for a, b in zip(jax.tree.leaves((g, u)), jax.tree.leaves((g_ref, u_ref))):
            np.testing.assert_array_equal(_np(a), _np(b))
        c, cv = jl.convert(model, {**v, **u})
        np.testing.assert_array_equal(_np(jax.jit(c.apply)(cv, x)),
                                      _np(jax.jit(c_ref.apply)(cv_ref, x)))


def test_fuse_sequential_slot_errors():
    """A slot named as the ReLU that holds another function, or named as a BatchNorm, is a
    ValueError naming the slot."""
    x = jnp.ones((2, 6, 6, 2), jnp.float32)
    qc = jq.get_default_qat_qconfig("x86")
    gelu = jl.prepare_qat(_sequential_cnn(lambda: nn.gelu), qc, fuse=[("layers_0", None, "layers_1")])
    with pytest.raises(ValueError, match="layers_1.*not relu"):
        init(gelu, x)
    as_bn = jl.prepare_qat(_sequential_cnn(lambda: nn.relu), qc, fuse=[("layers_0", "layers_1")])
    with pytest.raises(ValueError, match=r"layers_1.*not a BatchNorm.*'relu'"):
        init(as_bn, x)


class _SequentialPlusOne(nn.Sequential):
    def __call__(self, x):
        return super().__call__(x) + 1.0


def test_sequential_subclass_with_own_call_runs_as_written():
    """A Sequential subclass that overrides ``__call__`` is not replaced by the fused-slot
    loop: its own code runs (here ``+ 1``), and the fused group still quantizes."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5)), jnp.float32)
    qc = jq.get_default_qat_qconfig("x86")
    fuse = [("layers_0", "relu")]
    plain = jl.prepare_qat(nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(3)]), qc, fuse=fuse)
    sub = jl.prepare_qat(_SequentialPlusOne([nn.Dense(4), nn.relu, nn.Dense(3)]), qc, fuse=fuse)
    v = init(plain, x)
    apply = lambda m: jax.jit(lambda v, x: m.apply(v, x, mutable=["quant_stats"]))(v, x)  # noqa: E731
    (y, u), (y_sub, u_sub) = apply(plain), apply(sub)
    np.testing.assert_array_equal(_np(y_sub), _np(y) + np.float32(1.0))
    assert "weight_fake_quant" in u_sub["quant_stats"]["layers_0"]


@pytest.mark.filterwarnings("ignore:jquant.linen.*(no module was prepared|nothing to convert)")
@pytest.mark.parametrize("prepare", [jl.prepare, jl.prepare_qat])
@pytest.mark.parametrize("form", ["function", "module"])
def test_fused_relu_of_a_float_layer_still_applies(prepare, form):
    """A fused group whose layer stays float (qconfig ``None``) still applies its ReLU when
    the ReLU layer became the identity (an nn.Sequential slot or a ReLU module), in the
    prepared and in the converted model."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5)), jnp.float32)
    relu = (lambda: nn.relu) if form == "function" else _ReLUModule
    fuse = [("layers_0", "relu")] if form == "function" else [("layers_0", None, "layers_1")]
    model = prepare(nn.Sequential([nn.Dense(4), relu()]),
                    {"": jq.get_default_qat_qconfig("x86"), "layers_0": None}, fuse=fuse)
    v = init(model, x)
    want = jax.nn.relu(nn.Dense(4).apply({"params": v["params"]["layers_0"]}, x))
    assert float(jnp.min(want)) == 0.0  # some outputs are clipped
    y, upd = jax.jit(lambda v, x: model.apply(v, x, mutable=["quant_stats"]))(v, x)
    np.testing.assert_array_equal(_np(y), _np(want))
    converted, cv = jl.convert(model, {**v, **upd})
    np.testing.assert_array_equal(_np(jax.jit(converted.apply)(cv, x)), _np(want))


class _DenseThenModuleNamedRelu(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="relu")(nn.relu(nn.Dense(4, name="fc")(x)))


def test_relu_marker_is_not_a_module_path():
    """``"relu"`` in a group marks the ReLU *function*: a module that happens to be named
    ``relu`` still runs (it was made the identity before)."""
    x = jnp.ones((3, 5), jnp.float32)
    model = jl.prepare_qat(_DenseThenModuleNamedRelu(), jq.get_default_qat_qconfig("x86"),
                           fuse=[("fc", "relu")])
    v = init(model, x)
    y, _ = run(model, v, x)
    assert y.shape == (3, 2)


# ----------------------------------------------------------------------------------------
# layers vs torch's QAT modules
# ----------------------------------------------------------------------------------------

def _torch_qat_forward(tmod, x_nhwc_np, steps=2):
    outs = []
    for s in range(steps):
        xt = torch.from_numpy(x_nhwc_np[s])
        outs.append(tmod(xt).detach().numpy())
    return outs


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_qat_matches_torch_nnqat(nd):
    rng = np.random.default_rng(nd)
    cin, cout, k = 3, 4, 3
    spatial = (6,) * nd
    qc = jq.get_default_qat_qconfig("x86")
    x = rng.standard_normal((2, 2) + spatial + (cin,)).astype(np.float32)
    conv = nn.Conv(cout, (k,) * nd, padding=1)
    qm = jl.prepare_qat(conv, qc)
    v = init(qm, jnp.asarray(x[0]))
    tcls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[nd]
    tconv = tcls(cin, cout, k, padding=1)
    with torch.no_grad():
        tconv.weight.copy_(torch.from_numpy(tm.conv_kernel_to_torch(v["params"]["kernel"])))
        tconv.bias.copy_(torch.from_numpy(_np(v["params"]["bias"])))
    tconv.qconfig = tq.get_default_qat_qconfig("x86")
    qat_cls = {1: torch.ao.nn.qat.Conv1d, 2: torch.ao.nn.qat.Conv2d, 3: torch.ao.nn.qat.Conv3d}[nd]
    tq_conv = qat_cls.from_float(tconv)
    t_act = tq.get_default_qat_qconfig("x86").activation()
    perm_in = (0, nd + 1) + tuple(range(1, nd + 1))
    perm_out = (0,) + tuple(range(2, nd + 2)) + (1,)
    for s in range(2):
        y, upd = run(qm, v, jnp.asarray(x[s]))
        v = {**v, **upd}
        yt = t_act(tq_conv(torch.from_numpy(x[s].transpose(perm_in).copy())))
        yt = yt.detach().numpy().transpose(perm_out)
        np.testing.assert_allclose(_np(y), yt, rtol=1e-5, atol=1e-6)
    st = v["quant_stats"]["weight_fake_quant"]
    np.testing.assert_array_equal(_np(st.scale), tq_conv.weight_fake_quant.scale.numpy())
    np.testing.assert_array_equal(_np(st.activation_post_process.min_val),
                                  tq_conv.weight_fake_quant.activation_post_process.min_val.numpy())


def test_dense_qat_matches_torch_nnqat_and_grads():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    qm = jl.prepare_qat(nn.Dense(4), jq.get_default_qat_qconfig("qnnpack", version=0))
    v = init(qm, jnp.asarray(x))
    lin = torch.nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(tm.dense_kernel_to_torch(v["params"]["kernel"])))
        lin.bias.copy_(torch.from_numpy(_np(v["params"]["bias"])))
    lin.qconfig = tq.get_default_qat_qconfig("qnnpack", version=0)
    tl = torch.ao.nn.qat.Linear.from_float(lin)
    tact = lin.qconfig.activation()

    def f(params):
        y, upd = run(qm, {**v, "params": params}, jnp.asarray(x))
        return jnp.sum(y * jnp.arange(4.0)), (y, upd)
    (_, (y, upd)), g = jax.jit(jax.value_and_grad(f, has_aux=True))(v["params"])
    xt = torch.from_numpy(x)
    yt = tact(tl(xt))
    (yt * torch.arange(4.0)).sum().backward()
    np.testing.assert_allclose(_np(y), yt.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_np(g["kernel"]), tm.dense_kernel_from_torch(tl.weight.grad.numpy()),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(g["bias"]), tl.bias.grad.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qconfig_name", ["default_embedding_qat_qconfig",
                                          "default_embedding_qat_qconfig_4bit"])
def test_embed_and_embedding_bag_qat_match_torch(qconfig_name):
    jqc = getattr(jq, qconfig_name)
    tqc = getattr(tq, qconfig_name)
    rng = np.random.default_rng(3)
    table = rng.standard_normal((10, 12)).astype(np.float32)
    idx = rng.integers(0, 10, (5, 4))
    # Embed (flax's own module, mapped by prepare_qat)
    qm = jl.prepare_qat(nn.Embed(10, 12), jqc)
    v = init(qm, jnp.asarray(idx))
    v = {**v, "params": {"embedding": jnp.asarray(table)}}
    y, upd = run(qm, v, jnp.asarray(idx))
    temb = torch.nn.Embedding(10, 12)
    with torch.no_grad():
        temb.weight.copy_(torch.from_numpy(table))
    temb.qconfig = tqc
    tqe = torch.ao.nn.qat.Embedding.from_float(temb)
    np.testing.assert_array_equal(_np(y), tqe(torch.from_numpy(idx)).detach().numpy())
    assert upd["quant_stats"]["weight_fake_quant"].zero_point.dtype == jnp.float32
    # EmbeddingBag (jquant's module), offsets + include_last_offset, sum
    flat = rng.integers(0, 10, 12)
    offsets = np.array([0, 3, 3, 8, 12])
    bag = jl.EmbeddingBag(10, 12, mode="sum", include_last_offset=True, qconfig=jqc)
    vb = {"params": {"embedding": jnp.asarray(table)},
          "quant_stats": init(bag, jnp.asarray(flat), jnp.asarray(offsets))["quant_stats"]}
    yb, _ = run(bag, vb, jnp.asarray(flat), jnp.asarray(offsets))
    tb = torch.nn.EmbeddingBag(10, 12, mode="sum", include_last_offset=True)
    with torch.no_grad():
        tb.weight.copy_(torch.from_numpy(table))
    tb.qconfig = tqc
    tqb = torch.ao.nn.qat.EmbeddingBag.from_float(tb)
    ytb = tqb(torch.from_numpy(flat), torch.from_numpy(offsets)).detach().numpy()
    np.testing.assert_allclose(_np(yb), ytb, rtol=1e-6, atol=1e-6)


def test_embed_qat_rejects_non_float_qparams_weight():
    m = jl.Embed(10, 4, qconfig=jq.default_qat_qconfig)
    with pytest.raises(ValueError, match="float_qparams"):
        init(m, jnp.zeros((2,), jnp.int32))
    # via prepare_qat a non-embedding qconfig leaves the table float (torch's default mapping)
    qm = jl.prepare_qat(nn.Embed(10, 4), jq.default_qat_qconfig)
    v = init(qm, jnp.zeros((2,), jnp.int32))
    assert "weight_fake_quant" not in v["quant_stats"]


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_float_embedding_bag_matches_torch(mode):
    rng = np.random.default_rng(7)
    table = rng.standard_normal((9, 5)).astype(np.float32)
    flat = rng.integers(0, 9, 11)
    offsets = np.array([0, 2, 2, 7])
    tw = torch.from_numpy(table)
    F = torch.nn.functional
    cases = [dict(offsets=offsets), dict(offsets=np.append(offsets, 11), include_last_offset=True),
             dict(offsets=offsets, padding_idx=3)]
    if mode == "sum":
        cases.append(dict(offsets=offsets, per_sample_weights=rng.standard_normal(11).astype(np.float32)))
    for kw in cases:
        bag = jl.EmbeddingBag(9, 5, mode=mode, include_last_offset=kw.get("include_last_offset", False),
                              padding_idx=kw.get("padding_idx"))
        args = (jnp.asarray(flat), jnp.asarray(kw["offsets"]),
                None if "per_sample_weights" not in kw else jnp.asarray(kw["per_sample_weights"]))
        y = jax.jit(lambda t, *a: bag.apply({"params": {"embedding": t}}, *a))(jnp.asarray(table), *args)
        yt = F.embedding_bag(torch.from_numpy(flat), tw, torch.from_numpy(kw["offsets"]), mode=mode,
                             include_last_offset=kw.get("include_last_offset", False),
                             padding_idx=kw.get("padding_idx"),
                             per_sample_weights=None if args[2] is None else torch.from_numpy(kw["per_sample_weights"]))
        # per_sample_weights: torch accumulates with fma, XLA's segment sum rounds twice
        tol = 3e-7 if "per_sample_weights" in kw else 0
        np.testing.assert_allclose(_np(y), yt.numpy(), rtol=tol, atol=tol)
    two_d = flat[:10].reshape(2, 5)
    y2 = jl.EmbeddingBag(9, 5, mode=mode).apply({"params": {"embedding": jnp.asarray(table)}},
                                                jnp.asarray(two_d))
    np.testing.assert_array_equal(_np(y2), F.embedding_bag(torch.from_numpy(two_d), tw, mode=mode).numpy())
    assert jl.EmbeddingBag(9, 5).mode == torch.nn.EmbeddingBag(9, 5).mode == "mean"


# ----------------------------------------------------------------------------------------
# seed counterparts
# ----------------------------------------------------------------------------------------

class EmbBagPair(nn.Module):
    @nn.compact
    def __call__(self, indices):
        e1 = jl.EmbeddingBag(10, 12, mode="sum", include_last_offset=True, name="emb1")
        e2 = jl.EmbeddingBag(10, 12, mode="sum", include_last_offset=True, name="emb2")
        return jnp.concatenate([e1(indices), e2(indices)])


def test_embedding_bag_qat_config():
    """Seed test_embedding_bag_qat_config: two weight fake quants (FakeQuantize), float zp."""
    idx = jnp.asarray(np.random.default_rng(0).integers(0, 10, (5, 12)))
    for qconfig in (jq.default_embedding_qat_qconfig, jq.default_embedding_qat_qconfig_4bit):
        qm = jl.prepare_qat(EmbBagPair(), qconfig)
        v = init(qm, idx)
        d = jl.get_observer_dict(qm, v)
        wfq = {k: b for k, b in d.items() if k.endswith("weight_fake_quant")}
        assert len(wfq) == 2 and all(type(b.config) is jq.FakeQuantize for b in wfq.values())
        y, upd = run(qm, v, idx)
        assert y.shape == (10, 12)
        for e in ("emb1", "emb2"):
            st = upd["quant_stats"][e]["weight_fake_quant"]
            assert st.zero_point.dtype == jnp.float32
            assert wfq[f"{e}.weight_fake_quant"].dtype == jnp.dtype(qconfig.weight().dtype)


class DeFusedEmbeddingBagLinear(nn.Module):
    """torch's DeFusedEmbeddingBagLinear: emb (embedding QAT qconfig) -> quant -> linear -> dequant."""

    @nn.compact
    def __call__(self, indices):
        x = jl.Embed(10, 12, qconfig=jq.default_embedding_qat_qconfig, name="emb")(indices)
        x = jl.QuantStub(name="quant")(x)
        x = nn.Dense(1, name="linear")(x)
        return jl.DeQuantStub(name="dequant")(x)


def test_embedding_qat_config():
    """Seed test_embedding_qat_config: per-module qconfigs; 2 weight fake quants, 3 post-processes."""
    idx = jnp.asarray(np.random.default_rng(0).integers(0, 10, (5, 12)))
    for backend in ("x86", "qnnpack"):
        qm = jl.prepare_qat(DeFusedEmbeddingBagLinear(), jq.get_default_qat_qconfig(backend))
        v = init(qm, idx)
        d = jl.get_observer_dict(qm, v)
        wfq = [k for k in d if k.endswith("weight_fake_quant")]
        app = [k for k in d if k.endswith("activation_post_process")]
        assert len(wfq) == 2 and len(app) == 3
        assert type(d["emb.weight_fake_quant"].config) is jq.FakeQuantize
        assert d["emb.weight_fake_quant"].zero_point.dtype == jnp.float32
        assert type(d["emb.activation_post_process"].config) is jq.NoopObserver
        assert type(d["linear.weight_fake_quant"].config) is jq.FusedMovingAvgObsFakeQuantize
        assert type(d["linear.activation_post_process"].config) is jq.FusedMovingAvgObsFakeQuantize
        y, _ = run(qm, v, idx)
        assert y.shape == (5, 12, 1)
    # the torch twin counts the same
    tqm = tq.prepare_qat(tm.defused_embedding_bag_linear(),
                         mapping=tq.get_embedding_qat_module_mappings())
    names = [n for n, _ in tqm.named_modules()]
    assert sum(n.endswith("weight_fake_quant") for n in names) == 2
    assert sum(n.count("activation_post_process") == 1 and "weight_fake_quant" not in n
               for n in names) == 3


class LinearReLU(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(2, name="linear")(x))


def test_default_fused_qat_config():
    """Seed test_default_fused_qat_config: 3 fused fake quants, quant ranges per backend."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2)), jnp.float32)
    for backend in ("fbgemm", "qnnpack"):
        qm = jl.prepare_qat(jl.QuantWrapper(LinearReLU()), jq.get_default_qat_qconfig(backend, version=1))
        v = init(qm, x)
        _, upd = run(qm, v, x)
        d = jl.get_observer_dict(qm, {**v, **upd})
        fq = {k: b for k, b in d.items() if k.endswith(("weight_fake_quant", "activation_post_process"))}
        assert len(fq) == 3
        assert all(type(b.config) is jq.FusedMovingAvgObsFakeQuantize for b in fq.values())
        lo, hi, obs = ((0, 127, jq.MovingAveragePerChannelMinMaxObserver) if backend == "fbgemm"
                       else (0, 255, jq.MovingAverageMinMaxObserver))
        app = d["quant.activation_post_process"].activation_post_process
        assert (app.quant_min, app.quant_max) == (lo, hi)
        assert type(d["module.linear.weight_fake_quant"].activation_post_process.config) is obs


def test_fake_quant_and_observers_preserve_state_structure():
    """Seed test_fake_quant_preserves_buffers / test_observers_preserve_buffers: updates and
    flag toggles never change the quant_stats structure, shapes or dtypes."""
    x = jnp.asarray(np.random.default_rng(0).random((4, 4, 4)), jnp.float32)
    for qm in (jl.prepare_qat(MLP(), jq.default_qat_qconfig),
               jl.prepare(MLP(), jq.QConfig(activation=jq.MovingAverageMinMaxObserver.with_args(dtype=jq.qint8),
                                            weight=jq.default_weight_observer))):
        v = init(qm, x)
        spec = jax.tree.map(lambda a: (a.shape, a.dtype), v["quant_stats"])
        qs = v["quant_stats"]
        for _ in range(5):
            _, upd = run(qm, {**v, "quant_stats": qs}, x)
            qs = upd["quant_stats"]
        for fn in (jq.enable_fake_quant, jq.disable_fake_quant, jq.enable_observer, jq.disable_observer):
            qs = fn(qs)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), qs) == spec
        assert jax.tree.structure(qs) == jax.tree.structure(v["quant_stats"])


def test_disable_observer_and_fake_quant_over_variables():
    x = jax.random.normal(KEY, (4, 5))
    qm = jl.prepare_qat(MLP(), jq.get_default_qat_qconfig("x86"))
    v = init(qm, x)
    _, upd = run(qm, v, x)
    v = {**v, **upd}
    frozen = jq.disable_observer(v)
    _, upd2 = run(qm, frozen, 3 * x)
    for a, b in zip(jax.tree.leaves(upd2["quant_stats"]), jax.tree.leaves(frozen["quant_stats"])):
        np.testing.assert_array_equal(_np(a), _np(b))
    no_fq = jq.disable_fake_quant(jq.disable_observer(v))
    np.testing.assert_array_equal(_np(run(qm, no_fq, x, mutable=())), _np(MLP().apply({"params": v["params"]}, x)))
    # eval with quant_stats immutable: stored qparams, nothing observed, same as frozen
    np.testing.assert_array_equal(_np(run(qm, v, 3 * x, mutable=())), _np(run(qm, frozen, 3 * x, mutable=())))


class SingleLayerLinear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="fc1")(x)


def test_record_observer():
    """Seed test_record_observer: RecordingObserver records every calibration batch."""
    calib = [jax.random.normal(jax.random.key(i), (3, 5)) for i in range(4)]
    qm = jl.prepare(jl.QuantWrapper(SingleLayerLinear()), jq.default_debug_qconfig)
    v = init(qm, calib[0])
    qs = v["quant_stats"]
    for _ in range(2):
        for xb in calib:
            _, upd = run(qm, {**v, "quant_stats": qs}, xb)
            qs = upd["quant_stats"]
    d = jl.get_observer_dict(qm, {**v, "quant_stats": qs})
    key = "module.fc1.activation_post_process"
    assert key in d, "observer is not recorded in the dict"
    rec = d[key].get_tensor_value()
    assert len(rec) == 2 * len(calib)
    np.testing.assert_array_equal(_np(rec[0]), _np(run(qm, {**v, "quant_stats": qs}, calib[0], mutable=())))


def test_save_load_observer_state_dict():
    """Seed test_save_load_state_dict_script: observer state dict round trip (and strictness)."""
    x = jax.random.uniform(KEY, (5, 5))
    for obs in (jq.MinMaxObserver, jq.MovingAverageMinMaxObserver, jq.HistogramObserver):
        qconfig = jq.QConfig(activation=jq.default_observer, weight=obs)
        qm = jl.prepare(SingleLayerLinear(), {"": qconfig})
        v = init(qm, x)
        _, upd = run(qm, v, x)
        v1 = {**v, **upd}
        sd = jl.get_observer_state_dict(qm, v1)
        assert "fc1.activation_post_process.min_val" in sd
        qm2 = jl.prepare(SingleLayerLinear(), {"": qconfig})
        v2 = init(qm2, x)
        v2 = jl.load_observer_state_dict(qm2, v2, sd)
        for a, b in zip(jax.tree.leaves(v2["quant_stats"]), jax.tree.leaves(v1["quant_stats"])):
            np.testing.assert_array_equal(_np(a), _np(b))
        with pytest.raises(jq.StateDictError, match="unexpected"):
            jl.load_observer_state_dict(qm2, v2, {**sd, "fc1.activation_post_process.bogus": np.ones(1)})
        with pytest.raises(jq.StateDictError, match="missing"):
            jl.load_observer_state_dict(qm2, v2, {})
    # a torch observer state dict loads too (torch's key names)
    tobs = tq.MinMaxObserver(quant_min=0, quant_max=127)
    tobs(torch.rand(5, 5) * 3)
    tsd = {f"fc1.activation_post_process.{k}": v for k, v in tobs.state_dict().items()}
    v3 = jl.load_observer_state_dict(qm2, v2, tsd)
    got = v3["quant_stats"]["fc1"]["activation_post_process"]
    np.testing.assert_array_equal(_np(got.max_val), tobs.max_val.numpy())


# ----------------------------------------------------------------------------------------
# fusion, freeze_bn_stats, data parallelism
# ----------------------------------------------------------------------------------------

class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(3, (3, 3), padding=1, name="conv")(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn",
                            axis_name=self.axis_name)(x)
    axis_name: str = None


def test_freeze_bn_stats_matches_torch():
    """freeze_bn_stats mid-training (and disable_observer) follow torch's fused ConvBn2d."""
    rng = np.random.default_rng(4)
    xs = rng.standard_normal((6, 4, 5, 5, 2)).astype(np.float32)
    qm = jl.prepare_qat(ConvBN(), jq.get_default_qat_qconfig("x86"), fuse=[("conv", "bn")],
                        bn_unbiased_running_var=True)
    v = init(qm, jnp.asarray(xs[0]))
    conv, bn = torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(tm.conv_kernel_to_torch(v["params"]["conv"]["kernel"])))
        conv.bias.copy_(torch.from_numpy(_np(v["params"]["conv"]["bias"])))
    tmodel = torch.nn.Sequential(conv, bn).train()
    tmodel = tq.fuse_modules_qat(tmodel, [["0", "1"]])
    tmodel.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(tmodel, inplace=True)
    step = jax.jit(lambda v, x: qm.apply(v, x, mutable=["quant_stats", "batch_stats"]))
    for s in range(6):
        if s == 2:
            v = jl.freeze_bn_stats(v)
            tmodel.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
        if s == 4:
            v = jq.disable_observer(v)
            tmodel.apply(tq.disable_observer)
        y, upd = step(v, jnp.asarray(xs[s]))
        v = {**v, **upd}
        yt = tmodel(torch.from_numpy(xs[s].transpose(0, 3, 1, 2).copy())).detach().numpy()
        np.testing.assert_allclose(_np(y), yt.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_np(v["batch_stats"]["bn"]["var"]),
                                   tmodel[0].bn.running_var.numpy(), rtol=1e-6)
    assert int(v["quant_stats"]["conv"]["freeze_bn"][0]) == 1
    assert int(jl.update_bn_stats(v)["quant_stats"]["conv"]["freeze_bn"][0]) == 0


class DenseBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, name="fc")(x)
        return nn.BatchNorm(use_running_average=False, momentum=0.9, name="bn")(x)


def test_dense_bn_fusion_matches_torch_linearbn1d():
    rng = np.random.default_rng(5)
    xs = rng.standard_normal((3, 8, 6)).astype(np.float32)
    qm = jl.prepare_qat(DenseBN(), jq.get_default_qat_qconfig("qnnpack"), fuse=[("fc", "bn")],
                        bn_unbiased_running_var=True)
    v = init(qm, jnp.asarray(xs[0]))
    lin, bn = torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(tm.dense_kernel_to_torch(v["params"]["fc"]["kernel"])))
        lin.bias.copy_(torch.from_numpy(_np(v["params"]["fc"]["bias"])))
    tmodel = tq.fuse_modules_qat(torch.nn.Sequential(lin, bn).train(), [["0", "1"]])
    tmodel.qconfig = tq.get_default_qat_qconfig("qnnpack")
    tq.prepare_qat(tmodel, inplace=True)
    assert type(tmodel[0]).__name__ == "LinearBn1d"
    for s in range(3):
        y, upd = run(qm, v, jnp.asarray(xs[s]), mutable=("quant_stats", "batch_stats"))
        v = {**v, **upd}
        yt = tmodel(torch.from_numpy(xs[s])).detach().numpy()
        np.testing.assert_allclose(_np(y), yt, rtol=1e-5, atol=1e-5)


def test_data_parallel_bn_and_observers_match_global_batch():
    """Seed syncbn / data-parallel counterparts: a fused conv-bn whose BatchNorm has an
    ``axis_name`` (flax's SyncBatchNorm) and observers reduced over the same axis give, on
    every device, the single-device result on the global batch."""
    x = jax.random.normal(KEY, (8, 5, 5, 2))
    qc = jq.get_default_qat_qconfig("x86")
    single = jl.prepare_qat(ConvBN(), qc, fuse=[("conv", "bn")])
    v = init(single, x)
    y1, upd1 = run(single, v, x, mutable=("quant_stats", "batch_stats"))
    dp = jl.prepare_qat(ConvBN(axis_name="data"), qc, fuse=[("conv", "bn")], axis_name="data")
    init(dp, x)  # learns the fused BatchNorm's settings

    def shard_step(xs):
        return dp.apply(v, xs, mutable=["quant_stats", "batch_stats"])
    ys, upds = jax.jit(jax.vmap(shard_step, axis_name="data"))(x.reshape(4, 2, 5, 5, 2))
    np.testing.assert_allclose(_np(ys).reshape(y1.shape), _np(y1), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(upds), jax.tree.leaves(upd1)):
        a = _np(a)
        for d in range(1, 4):                      # identical on every device
            np.testing.assert_array_equal(a[d], a[0])
        np.testing.assert_allclose(a[0], _np(b), rtol=1e-6, atol=1e-7)
    # a BatchNorm left unfused keeps its own qconfig-driven observer (test_syncbn_preserves_qconfig)
    unf = jl.prepare_qat(ConvBN(axis_name="data"), qc)
    vv = init(unf, x)
    assert "activation_post_process" in vv["quant_stats"]["bn"]


def test_prepared_state_on_the_inputs_device():
    """Seed test_device_affinity: params and quant state live where the inputs are."""
    dev = jax.devices()[-1]
    x = jax.device_put(jnp.ones((2, 6, 6, 2)), dev)
    qm = jl.prepare_qat(ConvBN(), jq.get_default_qat_qconfig("x86"), fuse=[("conv", "bn")])
    v = jax.jit(qm.init)(jax.device_put(KEY, dev), x)
    _, upd = jax.jit(lambda v, x: qm.apply(v, x, mutable=["quant_stats", "batch_stats"]))(v, x)
    for leaf in jax.tree.leaves((v, upd)):
        assert leaf.devices() == {dev}


def test_apply_without_init_traces_fused_settings():
    x = jnp.ones((2, 5, 5, 2))
    v = jl.prepare_qat(ConvBN(), jq.default_qat_qconfig, fuse=[("conv", "bn")]).init(KEY, x)
    fresh = jl.prepare_qat(ConvBN(), jq.default_qat_qconfig, fuse=[("conv", "bn")])
    a = jax.jit(lambda v, x: fresh.apply(v, x, mutable=["quant_stats", "batch_stats"]))(v, x)[0]
    b = jl.prepare_qat(ConvBN(), jq.default_qat_qconfig, fuse=[("conv", "bn")])
    init(b, x)
    np.testing.assert_array_equal(_np(a), _np(run(b, v, x, mutable=("quant_stats", "batch_stats"))[0]))


# ----------------------------------------------------------------------------------------
# LSQ, mixed precision, checkpoints, PTQ
# ----------------------------------------------------------------------------------------

def test_learnable_fake_quantize_params_train_and_survive_checkpoint():
    from flax import serialization
    lsq = jq.LearnableFakeQuantize.with_args(observer=jq.MovingAverageMinMaxObserver, quant_min=0,
                                             quant_max=255, scale=0.1, zero_point=0.0)
    wlsq = jq.LearnableFakeQuantize.with_args(observer=jq.MovingAverageMinMaxObserver, quant_min=-128,
                                              quant_max=127, dtype=jq.qint8,
                                              qscheme=jq.per_tensor_symmetric, scale=0.05)
    qm = jl.prepare_qat(MLP(), jq.QConfig(activation=lsq, weight=wlsq))
    x = jax.random.normal(KEY, (16, 5))
    y = jax.random.randint(KEY, (16,), 0, 3)
    v = init(qm, x)
    assert set(v["params"]["Dense_0"]) == {"kernel", "bias", "weight_fake_quant", "activation_post_process"}
    # static estimation first (observer), then learning starts from the observed qparams
    _, upd = run(qm, v, x)
    v = jl.enable_param_learning({**v, **upd})
    s0 = float(v["params"]["Dense_0"]["activation_post_process"]["scale"][0])
    np.testing.assert_allclose(s0, float(v["quant_stats"]["Dense_0"]["activation_post_process"].scale[0]))
    tx = optax.adam(1e-2)
    opt = tx.init(v["params"])

    @jax.jit
    def step(v, opt):
        def loss(p):
            out, upd = run(qm, {**v, "params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), upd
        (l, upd), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
        u, opt = tx.update(g, opt, v["params"])
        return {**v, **upd, "params": optax.apply_updates(v["params"], u)}, opt, g

    for _ in range(3):
        v, opt, g = step(v, opt)
    assert float(jnp.abs(g["Dense_0"]["activation_post_process"]["scale"]).sum()) > 0
    s3 = float(v["params"]["Dense_0"]["activation_post_process"]["scale"][0])
    assert s3 != s0
    blob = serialization.to_bytes((v, opt))
    v2, opt2 = serialization.from_bytes((v, opt), blob)
    for a, b in zip(jax.tree.leaves((v, opt)), jax.tree.leaves((v2, opt2))):
        np.testing.assert_array_equal(_np(a), _np(b))
    assert type(v2["quant_stats"]["Dense_0"]["activation_post_process"]) is jq.LearnableFakeQuantizeState
    # the observer state dict carries the learned scale (torch's parameter name) and loads back
    sd = jl.get_observer_state_dict(qm, v2)
    np.testing.assert_allclose(sd["Dense_0.activation_post_process.scale"], [s3])
    v3 = jl.load_observer_state_dict(qm, v, sd)
    np.testing.assert_allclose(_np(v3["params"]["Dense_0"]["activation_post_process"]["scale"]), [s3])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_mixed_precision_keeps_dtypes(dtype):
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), dtype=dtype, param_dtype=dtype, name="conv")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=False, dtype=dtype, name="bn")(x))
            return nn.Dense(3, dtype=dtype, name="fc")(x.reshape(x.shape[0], -1))
    x = jax.random.normal(KEY, (2, 5, 5, 3)).astype(dtype)
    qm = jl.prepare_qat(M(), jq.get_default_qat_qconfig("x86"), fuse=[("conv", "bn", "relu")])
    v = init(qm, x)
    y, upd = run(qm, v, x, mutable=("quant_stats", "batch_stats"))
    assert y.dtype == dtype
    st = upd["quant_stats"]["fc"]["activation_post_process"]
    assert st.scale.dtype == jnp.float32 and st.activation_post_process.min_val.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(st.scale)))
    g = jax.jit(jax.grad(lambda p: jnp.sum(qm.apply({**v, "params": p}, x, mutable=["quant_stats", "batch_stats"])[0]
                                           .astype(jnp.float32))))(v["params"])
    assert g["conv"]["kernel"].dtype == dtype


def test_checkpoint_resume_is_bit_identical(tmp_path):
    from flax import serialization
    qm = jl.prepare_qat(ConvBN(), jq.get_default_qat_qconfig("x86"), fuse=[("conv", "bn")])
    xs = jax.random.normal(KEY, (6, 4, 5, 5, 2))
    v = init(qm, xs[0])
    tx = optax.adam(1e-2)

    @jax.jit
    def step(state, x):
        v, opt = state

        def loss(p):
            out, upd = run(qm, {**v, "params": p}, x, mutable=("quant_stats", "batch_stats"))
            return jnp.mean(out ** 2), upd
        (_, upd), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
        u, opt = tx.update(g, opt, v["params"])
        return {**v, **upd, "params": optax.apply_updates(v["params"], u)}, opt

    state = (v, tx.init(v["params"]))
    straight = state
    for s in range(6):
        straight = step(straight, xs[s])
    for s in range(3):
        state = step(state, xs[s])
    path = tmp_path / "ckpt.msgpack"
    path.write_bytes(serialization.to_bytes(state))
    template = (init(qm, xs[0]), tx.init(v["params"]))
    resumed = serialization.from_bytes(template, path.read_bytes())
    for s in range(3, 6):
        resumed = step(resumed, xs[s])
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(_np(a), _np(b))


def test_ptq_prepare_calibration_matches_torch_observers():
    rng = np.random.default_rng(9)
    calib = [rng.standard_normal((4, 6)).astype(np.float32) * (i + 1) for i in range(3)]
    qm = jl.prepare(jl.QuantWrapper(SingleLayerLinear()), jq.default_qconfig)
    v = init(qm, jnp.asarray(calib[0]))
    assert "weight_fake_quant" not in v["quant_stats"]["module"]["fc1"]   # weights: at convert
    lin = torch.nn.Linear(6, 5)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(tm.dense_kernel_to_torch(v["params"]["module"]["fc1"]["kernel"])))
        lin.bias.copy_(torch.from_numpy(_np(v["params"]["module"]["fc1"]["bias"])))
    twrap = tq.QuantWrapper(lin).eval()
    twrap.qconfig = tq.default_qconfig
    tprep = tq.prepare(twrap)
    qs = v["quant_stats"]
    for xb in calib:
        y, upd = run(qm, {**v, "quant_stats": qs}, jnp.asarray(xb))
        qs = upd["quant_stats"]
        yt = tprep(torch.from_numpy(xb))
        np.testing.assert_allclose(_np(y), yt.detach().numpy(), rtol=1e-6, atol=1e-6)
    sd = jl.get_observer_state_dict(qm, {**v, "quant_stats": qs})
    tsd = tprep.state_dict()
    for k in ("quant.activation_post_process.min_val", "quant.activation_post_process.max_val",
              "module.fc1.activation_post_process.min_val", "module.fc1.activation_post_process.max_val"):
        tkey = k.replace("module.fc1", "module")
        np.testing.assert_allclose(sd[k], tsd[tkey].numpy(), rtol=1e-6)
    d = jl.get_observer_dict(qm, {**v, "quant_stats": qs})
    s, z = d["module.fc1.activation_post_process"].calculate_qparams()
    ts, tz = tprep.module.activation_post_process.calculate_qparams()
    np.testing.assert_allclose(_np(s), ts.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(_np(z), tz.numpy())


def test_ptq_default_qconfig_histogram_calibration_runs():
    x = jax.random.normal(KEY, (8, 5))
    qm = jl.prepare(MLP(), jq.get_default_qconfig("x86"))
    v = init(qm, x)
    _, upd = run(qm, v, x)
    d = jl.get_observer_dict(qm, {**v, **upd})
    assert type(d["Dense_0.activation_post_process"].config) is jq.HistogramObserver
    s, z = d["Dense_0.activation_post_process"].calculate_qparams()
    assert float(s[0]) > 0 and 0 <= int(z[0]) <= 127
