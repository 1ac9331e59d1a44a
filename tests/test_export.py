"""``jax.export`` round trips: the jquant counterpart of torch's TorchScript save/load.

torch's seed tests script observers (``torch.jit.script``), save them and load them back
(``test_observer_scriptable``). jquant's observers and fake quants are pure functions of
(state, x), so the counterpart is ``jax.export``: every observer's ``update`` /
``calculate_qparams`` / ``apply``, every fake-quant op and every fake-quantize module's
``apply`` / ``calculate_qparams`` is exported from ``jax.jit``, serialized to bytes,
deserialized and called; the outputs must be bit-identical (same pytree of NamedTuple
states, shapes, dtypes and bits) to the jitted function's. States cross
serialization because jquant registers them (``jquant._config.register_state``); a
deserializing process must therefore import jquant (checked in a fresh subprocess).

Flags are run-time arrays, so one export serves every flag setting; gradients survive
with ``serialize(vjp_order=1)``; a batch dimension can be symbolic.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant as jq

RNG = np.random.default_rng(7)
X = jnp.asarray(RNG.standard_normal((4, 3, 5)).astype(np.float32) * 2.0)
X2 = jnp.asarray(RNG.standard_normal((4, 3, 5)).astype(np.float32) * 3.0 + 0.5)


def _bits(a):
    a = np.asarray(a)
    if a.dtype.kind == "f":
        return a.view(np.dtype(f"u{a.dtype.itemsize}"))
    return a


def assert_identical(got, want):
    """Same pytree (NamedTuple types included), shapes, dtypes and bits."""
    gl, gt = jax.tree.flatten(got)
    wl, wt = jax.tree.flatten(want)
    assert gt == wt, (gt, wt)
    for g, w in zip(gl, wl):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        np.testing.assert_array_equal(_bits(g), _bits(w))


def roundtrip(fn, *args, vjp_order=0):
    """Exports jit(fn) at args, serializes, deserializes; checks the call against jit(fn)."""
    jitted = jax.jit(fn)
    exported = jax.export.export(jitted)(*args)
    blob = exported.serialize(vjp_order=vjp_order)
    assert isinstance(blob, (bytes, bytearray)) and len(blob) > 0
    back = jax.export.deserialize(blob)
    assert_identical(back.call(*args), jitted(*args))
    return back, blob


# ---------------------------------------------------------------------------------------
# Observers
# ---------------------------------------------------------------------------------------

OBSERVERS = {
    "minmax": lambda: jq.MinMaxObserver(),
    "minmax_qint8_sym": lambda: jq.MinMaxObserver(dtype=jq.qint8, qscheme=jq.per_tensor_symmetric),
    "minmax_qint32": lambda: jq.MinMaxObserver(dtype=jq.qint32),
    "moving_avg": lambda: jq.MovingAverageMinMaxObserver(),
    "moving_avg_dynamic": lambda: jq.MovingAverageMinMaxObserver(averaging_constant=1,
                                                                 is_dynamic=True),
    "per_channel": lambda: jq.PerChannelMinMaxObserver(ch_axis=1),
    "per_channel_float_qparams": lambda: jq.PerChannelMinMaxObserver(
        qscheme=jq.per_channel_affine_float_qparams),
    "moving_avg_per_channel": lambda: jq.MovingAveragePerChannelMinMaxObserver(
        ch_axis=-1, dtype=jq.qint8, qscheme=jq.per_channel_symmetric),
    "fixed": lambda: jq.FixedQParamsObserver(scale=1 / 256, zero_point=0),
    "placeholder": lambda: jq.PlaceholderObserver(dtype=jnp.float16),
    "noop": lambda: jq.NoopObserver(),
    "recording": lambda: jq.RecordingObserver(capacity=4),
}
def _params(names, fast):
    """pytest params; those not in ``fast`` are marked slow (CI runs them in its slow step)."""
    return [pytest.param(n, marks=() if n in fast else pytest.mark.slow) for n in names]


HAS_QPARAMS = {"minmax", "minmax_qint8_sym", "minmax_qint32", "moving_avg", "moving_avg_dynamic",
               "per_channel", "per_channel_float_qparams", "moving_avg_per_channel", "fixed"}


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_observer_update_roundtrip(name):
    obs = OBSERVERS[name]()
    state = obs.init(X)
    if name in ("minmax", "per_channel", "recording"):
        roundtrip(obs.apply, state, X)  # torch's forward: (x, new state)
    back, _ = roundtrip(obs.update, state, X)
    # The deserialized function keeps working on its own output (multi-step use).
    s1 = back.call(state, X)
    upd = jax.jit(obs.update)
    assert_identical(back.call(s1, X2), upd(upd(state, X), X2))


@pytest.mark.parametrize("name", sorted(HAS_QPARAMS))
def test_observer_calculate_qparams_roundtrip(name):
    obs = OBSERVERS[name]()
    fresh = obs.init(X)
    back, _ = roundtrip(obs.calculate_qparams, obs.update(fresh, X))
    # Same export on an unobserved state: torch's default (1.0, 0).
    assert_identical(back.call(fresh), jax.jit(obs.calculate_qparams)(fresh))


def test_recording_observer_roundtrip_records():
    obs = jq.RecordingObserver(capacity=3)
    back, _ = roundtrip(obs.update, obs.init(X), X)
    state = obs.init(X)
    for x in (X, X2):
        state = back.call(state, x)
    vals = obs.get_tensor_value(state)
    assert len(vals) == 2
    np.testing.assert_array_equal(vals[0], X)
    np.testing.assert_array_equal(vals[1], X2)


def test_observer_symbolic_batch_dimension():
    """A batch dimension exported as a symbol serves every batch size."""
    (b,) = jax.export.symbolic_shape("b")
    for obs in (jq.MinMaxObserver(), jq.MovingAverageMinMaxObserver(),
                jq.PerChannelMinMaxObserver(ch_axis=1)):
        state = obs.init(jax.ShapeDtypeStruct((2, 4), jnp.float32))
        exp = jax.export.export(jax.jit(obs.update))(
            state, jax.ShapeDtypeStruct((b, 4), jnp.float32))
        back = jax.export.deserialize(exp.serialize())
        for n in (1, 3, 7):
            x = jnp.asarray(RNG.standard_normal((n, 4)).astype(np.float32))
            assert_identical(back.call(state, x), jax.jit(obs.update)(state, x))


# ---------------------------------------------------------------------------------------
# Fake-quant ops, the fused op, (de)quantization, qparams rules
# ---------------------------------------------------------------------------------------

def _op_cases():
    s1 = jnp.array([0.03], jnp.float32)
    z1 = jnp.array([7], jnp.int32)
    sc = jnp.array([0.02, 0.05, 0.11], jnp.float32)
    zc = jnp.array([-3, 0, 12], jnp.int32)
    zf = jnp.array([-3.25, 0.5, 12.75], jnp.float32)
    lsq_s = jnp.array([0.04], jnp.float32)
    lsq_z = jnp.array([2.5], jnp.float32)
    on = jnp.array([1], jnp.int32)
    off = jnp.array([0], jnp.int32)
    x2d = X.reshape(3, -1)
    return {
        "fq_per_tensor": (lambda x, s, z: jq.fake_quantize_per_tensor_affine(x, s, z, -128, 127),
                          (X, s1, z1)),
        "fq_per_channel_int_zp": (
            lambda x, s, z: jq.fake_quantize_per_channel_affine(x, s, z, 1, 0, 255), (X, sc, zc)),
        "fq_per_channel_float_zp": (
            lambda x, s, z: jq.fake_quantize_per_channel_affine(x, s, z, 1, 0, 15), (X, sc, zf)),
        "lsq_per_tensor": (
            lambda x, s, z: jq.fake_quantize_learnable_per_tensor_affine(x, s, z, 0, 15, 0.5),
            (X, lsq_s, lsq_z)),
        "lsq_per_channel": (
            lambda x, s, z: jq.fake_quantize_learnable_per_channel_affine(x, s, z, 1, 0, 255),
            (X, sc, zf)),
        "fused_per_tensor": (
            lambda x, o, f, mn, mx, s, z: jq.fused_moving_avg_obs_fake_quant(
                x, o, f, mn, mx, s, z, 0.01, 0, 255, -1),
            (X, on, on, jnp.float32(-1.0), jnp.float32(2.0), s1, z1)),
        "fused_per_tensor_flags_off": (
            lambda x, o, f, mn, mx, s, z: jq.fused_moving_avg_obs_fake_quant(
                x, o, f, mn, mx, s, z, 0.01, -128, 127, -1, False, True),
            (X, off, off, jnp.float32(-1.0), jnp.float32(2.0), s1, z1)),
        "fused_per_channel": (
            lambda x, o, f, mn, mx, s, z: jq.fused_moving_avg_obs_fake_quant(
                x, o, f, mn, mx, s, z, 0.01, -128, 127, 0, True, True),
            (x2d, on, on, jnp.full((3,), jnp.inf), jnp.full((3,), -jnp.inf), sc, zc)),
        "quantize_per_tensor": (lambda x, s, z: jq.quantize_per_tensor(x, s, z, jq.quint8),
                                (X, s1, z1)),
        "quantize_per_channel": (lambda x, s, z: jq.quantize_per_channel(x, s, z, 1, jq.qint8),
                                 (X, sc, zc)),
        "dequantize": (lambda q, s, z: jq.dequantize(q, s, z, axis=1),
                       (jnp.asarray(RNG.integers(-128, 128, X.shape), jnp.int8), sc, zc)),
        "choose_qparams_per_tensor": (lambda x: jq.choose_qparams_per_tensor(x, True), (X,)),
        "calculate_qparams_rule": (
            lambda mn, mx: jq.calculate_qparams(mn, mx, qscheme=jq.per_channel_affine,
                                                dtype=jq.quint8, quant_min=0, quant_max=255),
            (jnp.array([-1.0, 0.5, -3.0]), jnp.array([2.0, 0.75, -1.0]))),
        "choose_quantization_params_rule": (
            lambda mn, mx: jq.choose_quantization_params(mn, mx, -128, 127, True),
            (jnp.array([-1.0, 0.2, -3.0]), jnp.array([1.0, 0.75, -1.0]))),
    }


OP_NAMES = sorted(_op_cases())


@pytest.mark.parametrize("name", OP_NAMES)
def test_op_roundtrip(name):
    fn, args = _op_cases()[name]
    roundtrip(fn, *args)


@pytest.mark.parametrize("name", _params(
    ["fq_per_tensor", "fq_per_channel_int_zp", "fq_per_channel_float_zp", "lsq_per_tensor",
     "lsq_per_channel", "fused_per_tensor", "fused_per_channel"],
    fast={"fq_per_channel_float_zp", "lsq_per_channel", "fused_per_tensor"}))
def test_op_gradient_survives_serialization(name):
    """``serialize(vjp_order=1)``: the deserialized op differentiates like the original."""
    fn, args = _op_cases()[name]
    w = jnp.asarray(RNG.standard_normal(args[0].shape).astype(np.float32))
    n_diff = 3 if name.startswith("lsq") else 1  # LSQ: x, scale, zero_point

    def loss(f):
        def inner(*a):
            y = f(*a)
            y = y[0] if isinstance(y, tuple) else y
            return jnp.sum(y * w)
        return inner

    back, _ = roundtrip(fn, *args, vjp_order=1)
    argnums = tuple(range(n_diff))
    got = jax.grad(loss(back.call), argnums=argnums)(*args)
    # Bit-identical to the jitted gradient (an eager, op-by-op gradient may sum the LSQ
    # scale / zero-point gradients in another order).
    assert_identical(got, jax.jit(jax.grad(loss(fn), argnums=argnums))(*args))


# ---------------------------------------------------------------------------------------
# Fake-quantize modules
# ---------------------------------------------------------------------------------------

MODULES = {
    "default_fake_quant": lambda: jq.default_fake_quant(),
    "default_weight_fake_quant": lambda: jq.default_weight_fake_quant(),
    "default_per_channel_weight_fake_quant": lambda: jq.default_per_channel_weight_fake_quant(),
    "default_embedding_fake_quant": lambda: jq.default_embedding_fake_quant(),
    "default_embedding_fake_quant_4bit": lambda: jq.default_embedding_fake_quant_4bit(),
    "default_fused_act_fake_quant": lambda: jq.default_fused_act_fake_quant(),
    "default_fused_wt_fake_quant": lambda: jq.default_fused_wt_fake_quant(),
    "default_fused_per_channel_wt_fake_quant": lambda: jq.default_fused_per_channel_wt_fake_quant(),
    "fixed_0to1": lambda: jq.default_fixed_qparams_range_0to1_fake_quant(),
    "learnable": lambda: jq.LearnableFakeQuantize(jq.MovingAverageMinMaxObserver, quant_min=0,
                                                  quant_max=255, use_grad_scaling=True),
    "learnable_per_channel": lambda: jq.LearnableFakeQuantize(
        jq.MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=jq.qint8,
        qscheme=jq.per_channel_symmetric),
}


def _module_states(fq, jitted_apply=None):
    """A fresh state, one after a step, and the latter with observer / fake quant toggled."""
    s0 = fq.init(X)
    _, s1 = (jitted_apply or jax.jit(fq.apply))(s0, X)
    out = {"fresh": s0, "stepped": s1, "obs_off": jq.disable_observer(s1),
           "fq_off": jq.disable_fake_quant(s1),
           "both_off": jq.disable_fake_quant(jq.disable_observer(s1))}
    if isinstance(fq, jq.LearnableFakeQuantize):
        out["learning"] = fq.enable_param_learning(s1)
    return out


@pytest.mark.parametrize("name", sorted(MODULES))
def test_fake_quantize_apply_roundtrip(name):
    fq = MODULES[name]()
    jitted = jax.jit(fq.apply)
    states = _module_states(fq, jitted)
    back, _ = roundtrip(fq.apply, states["stepped"], X2)
    # One export serves every flag setting (flags are run-time arrays).
    for st in states.values():
        assert_identical(back.call(st, X2), jitted(st, X2))


@pytest.mark.parametrize("name", _params(sorted(MODULES), fast={
    "default_fake_quant", "default_embedding_fake_quant", "default_fused_per_channel_wt_fake_quant",
    "fixed_0to1", "learnable_per_channel"}))
def test_fake_quantize_calculate_qparams_roundtrip(name):
    fq = MODULES[name]()
    roundtrip(fq.calculate_qparams, _module_states(fq)["stepped"])


def test_learnable_fake_quantize_grads_survive_serialization():
    fq = MODULES["learnable"]()
    state = fq.enable_param_learning(fq.apply(fq.init(X), X)[1])
    w = jnp.asarray(RNG.standard_normal(X.shape).astype(np.float32))

    def loss(apply, st):
        def inner(scale, zp, x):
            y, _ = apply(st._replace(scale=scale, zero_point=zp), x)
            return jnp.sum(y * w)
        return inner

    back, _ = roundtrip(fq.apply, state, X2, vjp_order=1)
    got = jax.grad(loss(back.call, state), argnums=(0, 1, 2))(state.scale, state.zero_point, X2)
    # The exported function sees the flags as (traced) inputs, so the reference traces them
    # too: concrete flags skip the flag select, whose cotangent sum turns a masked -0.0
    # gradient (torch's dY * mask) into +0.0.
    want = jax.jit(lambda st, *a: jax.grad(loss(fq.apply, st), argnums=(0, 1, 2))(*a))(
        state, state.scale, state.zero_point, X2)
    assert_identical(got, want)
    assert float(jnp.abs(got[0]).sum()) > 0


# ---------------------------------------------------------------------------------------
# Fresh process
# ---------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import pickle, sys
    import jax, numpy as np
    import jquant  # registers the state NamedTuples for deserialization
    from jax import export
    with open(sys.argv[1], "rb") as f:
        cases = pickle.load(f)
    for name, (blob, args, want, treedef_repr) in cases.items():
        fn = export.deserialize(blob)
        got = fn.call(*jax.tree.map(jax.numpy.asarray, args))
        leaves, treedef = jax.tree.flatten(got)
        assert repr(treedef) == treedef_repr, (name, treedef, treedef_repr)
        assert len(leaves) == len(want), name
        for g, w in zip(leaves, want):
            g = np.asarray(g)
            assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype)
            assert g.tobytes() == w.tobytes(), (name, g, w)
        print("ok", name)
""")


def test_roundtrip_in_fresh_process(tmp_path):
    """Serialized here, deserialized and called in a new interpreter: identical outputs."""
    cases = {}
    specs = {
        "per_channel_update": (OBSERVERS["per_channel"](), "update"),
        "moving_avg_qparams": (OBSERVERS["moving_avg"](), "calculate_qparams"),
        "fake_quant_apply": (MODULES["default_fake_quant"](), "apply"),
        "learnable_apply": (MODULES["learnable"](), "apply"),
    }
    for name, (obj, method) in specs.items():
        state = obj.init(X)
        args = (obj.update(state, X),) if method == "calculate_qparams" else (state, X2)
        fn = getattr(obj, method)
        blob = jax.export.export(jax.jit(fn))(*args).serialize()
        want_leaves, want_tree = jax.tree.flatten(jax.jit(fn)(*args))
        cases[name] = (bytes(blob), jax.tree.map(np.asarray, args),
                       [np.asarray(w) for w in want_leaves], repr(want_tree))
    op_fn, op_args = _op_cases()["fused_per_tensor"]
    blob = jax.export.export(jax.jit(op_fn))(*op_args).serialize()
    want_leaves, want_tree = jax.tree.flatten(jax.jit(op_fn)(*op_args))
    cases["fused_op"] = (bytes(blob), jax.tree.map(np.asarray, op_args),
                         [np.asarray(w) for w in want_leaves], repr(want_tree))
    path = tmp_path / "cases.pkl"
    with open(path, "wb") as f:
        pickle.dump(cases, f)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == len(cases), proc.stdout
