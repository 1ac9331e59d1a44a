"""Multi-device checks, run by tests/test_multidevice.py in a fresh process with 8 CPU devices.

``python tests/multidevice_worker.py OUT.json [CHECK ...]`` forces 8 host CPU devices (the
XLA flag must be set before jax is imported), runs the named checks (default: all) and
writes ``{check: "ok" | traceback}`` to OUT.json. Every check compares, bit for bit, each
device's state after ``update`` / ``apply`` with ``axis_name`` under ``jax.shard_map`` and
``jax.pmap`` with the single-device state over the whole (concatenated) batch, step by step.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _flags:
        os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jquant as jq  # noqa: E402

N_DEV = 8
try:
    _shard_map = jax.shard_map

    def shard_map(f, mesh, in_specs, out_specs):
        return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
except AttributeError:  # older jax
    from jax.experimental.shard_map import shard_map as _exp_shard_map

    def shard_map(f, mesh, in_specs, out_specs):
        return _exp_shard_map(f, mesh, in_specs=in_specs, out_specs=out_specs)

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def bits(a):
    a = np.asarray(a)
    if a.dtype.kind == "f":
        a = a.astype(np.float32)
        out = a.view(np.uint32).copy()
        out[np.isnan(a)] = 0x7FC00000
        return out
    return a.astype(np.int64)


def assert_tree_equal(got, want, what=""):
    gl, gt = jax.tree.flatten(got)
    wl, wt = jax.tree.flatten(want)
    assert gt == wt, (what, gt, wt)
    for i, (g, w) in enumerate(zip(gl, wl)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (what, i, g.shape, g.dtype, w.shape,
                                                           w.dtype)
        np.testing.assert_array_equal(bits(g), bits(w), err_msg=f"{what} leaf {i}")


def host(tree):
    return jax.tree.map(np.asarray, tree)


def row(tree, i):
    return jax.tree.map(lambda a: np.asarray(a)[i], tree)


def mesh1d():
    return Mesh(np.array(jax.devices()[:N_DEV]), ("data",))


def shape_for(shard_axis):
    """Input shape: 16 rows along the sharded axis (2 per device), channels elsewhere."""
    return (16, 3, 8) if shard_axis == 0 else (4, 16, 6)


def batches(shape, steps=3, seed=0, shard_axis=0):
    """Random batches; in step 1 one device's shard holds the global extremes."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        x = rng.standard_normal(shape).astype(np.float32) * (t + 1)
        if t == 1:  # make the last shard's values dominate: local stats would differ
            idx = [slice(None)] * len(shape)
            n = shape[shard_axis] // N_DEV
            idx[shard_axis] = slice(shape[shard_axis] - n, None)
            x[tuple(idx)] *= 25.0
        out.append(x)
    return out


def split(x, axis):
    return np.stack(np.split(x, N_DEV, axis=axis))


# ---------------------------------------------------------------------------------------
# Per-device state == single-device state over the whole batch
# ---------------------------------------------------------------------------------------

def _spec(ndim, axis):
    parts = [None] * ndim
    parts[axis] = "data"
    return P(*parts)


def run_sync(step_sharded, step_single, state0, xs, shard_axis, has_output, flips=None):
    """Runs a step function three ways (shard_map, pmap, one device) and compares.

    ``step_sharded(state, x, axis_name)`` and ``step_single(state, x)`` return the new state,
    or ``(y, state)`` when ``has_output``. ``flips[t]`` (optional) maps a state to the
    state used at step t (flag flips).
    """
    mesh = mesh1d()
    xspec = _spec(xs[0].ndim, shard_axis)

    def per_device(state, x):
        out = step_sharded(state, x, "data")
        y, new = out if has_output else (None, out)
        stacked = jax.tree.map(lambda a: a[None], new)
        return (y, stacked) if has_output else stacked

    out_specs = (xspec, P("data")) if has_output else P("data")
    sm = jax.jit(shard_map(per_device, mesh, in_specs=(P(), xspec), out_specs=out_specs))
    # replicated (P()) output: check_vma proves the state is device-invariant
    sm_rep = jax.jit(shard_map(lambda s, x: step_sharded(s, x, "data"), mesh,
                               in_specs=(P(), xspec),
                               out_specs=(xspec, P()) if has_output else P()))
    pm = jax.pmap(lambda s, x: step_sharded(s, x, "data"), axis_name="data", in_axes=(None, 0),
                  devices=jax.devices()[:N_DEV])
    single = jax.jit(step_single)
    s_sm = s_rep = s_pm = s_one = host(state0)
    for t, x in enumerate(xs):
        if flips and t in flips:
            s_sm, s_rep, s_pm, s_one = (host(flips[t](s)) for s in (s_sm, s_rep, s_pm, s_one))
        out_one = single(s_one, jnp.asarray(x))
        y_one, s_one = out_one if has_output else (None, out_one)
        out_sm = sm(s_sm, x)
        y_sm, stacked = out_sm if has_output else (None, out_sm)
        out_pm = pm(s_pm, split(x, shard_axis))
        y_pm, pstacked = out_pm if has_output else (None, out_pm)
        out_rep = sm_rep(s_rep, x)
        y_rep, s_rep = out_rep if has_output else (None, out_rep)
        for d in range(N_DEV):
            assert_tree_equal(row(stacked, d), s_one, f"step {t} shard_map device {d}")
            assert_tree_equal(row(pstacked, d), s_one, f"step {t} pmap device {d}")
        for shard in jax.tree.leaves(s_rep)[0].addressable_shards if jax.tree.leaves(s_rep) else []:
            np.testing.assert_array_equal(bits(shard.data), bits(jax.tree.leaves(s_one)[0]))
        assert_tree_equal(s_rep, s_one, f"step {t} replicated out_specs")
        if has_output:
            assert_tree_equal(y_sm, y_one, f"step {t} y shard_map")
            assert_tree_equal(y_rep, y_one, f"step {t} y replicated")
            y_pm = np.concatenate(list(np.asarray(y_pm)), axis=shard_axis)
            assert_tree_equal(y_pm, y_one, f"step {t} y pmap")
        s_sm, s_pm, s_rep, s_one = (host(row(stacked, 0)), host(row(pstacked, 3)), host(s_rep),
                                    host(s_one))
    return s_one


OBSERVERS = {
    "MinMaxObserver": (lambda: jq.MinMaxObserver(dtype=jq.qint8), 0),
    "MovingAverageMinMaxObserver": (lambda: jq.MovingAverageMinMaxObserver(averaging_constant=0.3),
                                    0),
    "PerChannelMinMaxObserver": (lambda: jq.PerChannelMinMaxObserver(ch_axis=1), 0),
    "MovingAveragePerChannelMinMaxObserver": (lambda: jq.MovingAveragePerChannelMinMaxObserver(
        averaging_constant=0.5, ch_axis=-1, dtype=jq.qint8, qscheme=jq.per_channel_symmetric), 0),
    "PerChannelMinMaxObserver_float_qparams_ch0_batch_axis1": (
        lambda: jq.PerChannelMinMaxObserver(qscheme=jq.per_channel_affine_float_qparams), 1),
    "FixedQParamsObserver": (lambda: jq.FixedQParamsObserver(1 / 256, 0), 0),
    "PlaceholderObserver": (lambda: jq.PlaceholderObserver(dtype=jnp.float16), 0),
    "NoopObserver": (lambda: jq.NoopObserver(), 0),
    "RecordingObserver": (lambda: jq.RecordingObserver(capacity=4), 0),
}


def _observer_check(name):
    make, shard_axis = OBSERVERS[name]

    def fn():
        obs = make()
        xs = batches(shape_for(shard_axis), shard_axis=shard_axis)
        state0 = obs.init(jax.ShapeDtypeStruct(xs[0].shape, jnp.float32))
        final = run_sync(lambda s, x, a: obs.update(s, x, axis_name=a),
                         lambda s, x: obs.update(s, x), state0, xs, shard_axis, False)
        if name == "RecordingObserver":  # all-gathered: the whole batch, in device order
            vals = obs.get_tensor_value(final)
            assert len(vals) == len(xs)
            for v, x in zip(vals, xs):
                np.testing.assert_array_equal(v, x)
        elif name not in ("PlaceholderObserver", "NoopObserver"):
            obs.calculate_qparams(final)

    fn.__name__ = f"sync_observer_{name}"
    return check(fn)


for _name in OBSERVERS:
    _observer_check(_name)


MODULES = {
    "FakeQuantize": (lambda: jq.default_fake_quant(), 0),
    "FakeQuantize_per_channel": (lambda: jq.FakeQuantize(
        jq.MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=jq.qint8,
        qscheme=jq.per_channel_symmetric, ch_axis=1), 0),
    "FakeQuantize_embedding_float_qparams": (lambda: jq.default_embedding_fake_quant(), 1),
    "FusedMovingAvgObsFakeQuantize": (lambda: jq.default_fused_act_fake_quant(), 0),
    "FusedMovingAvgObsFakeQuantize_symmetric": (lambda: jq.default_fused_wt_fake_quant(), 0),
    "FusedMovingAvgObsFakeQuantize_per_channel": (
        lambda: jq.default_fused_per_channel_wt_fake_quant(), 1),
    "FixedQParamsFakeQuantize": (lambda: jq.default_fixed_qparams_range_neg1to1_fake_quant(), 0),
    "LearnableFakeQuantize": (lambda: jq.LearnableFakeQuantize(
        jq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, use_grad_scaling=True), 0),
    "LearnableFakeQuantize_per_channel": (lambda: jq.LearnableFakeQuantize(
        jq.MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=jq.qint8,
        qscheme=jq.per_channel_symmetric, ch_axis=1), 0),
}


def _module_check(name):
    make, shard_axis = MODULES[name]

    def fn():
        fq = make()
        xs = batches(shape_for(shard_axis), steps=4, seed=1, shard_axis=shard_axis)
        state0 = fq.init(jax.ShapeDtypeStruct(xs[0].shape, jnp.float32))
        # step 2 with the observer frozen, step 3 with fake quant off and observer back on
        flips = {2: jq.disable_observer,
                 3: lambda s: jq.disable_fake_quant(jq.enable_observer(s))}
        run_sync(lambda s, x, a: fq.apply(s, x, axis_name=a), lambda s, x: fq.apply(s, x),
                 state0, xs, shard_axis, True, flips)

    fn.__name__ = f"sync_module_{name}"
    return check(fn)


for _name in MODULES:
    _module_check(_name)


@check
def sync_fused_op_functional():
    """``jq.fused_moving_avg_obs_fake_quant(..., axis_name=)`` directly, per-row."""
    def op(st, x, axis_name=None):
        y, mn, mx, s, z = jq.fused_moving_avg_obs_fake_quant(
            x, jnp.array([1]), jnp.array([1]), st[0], st[1], st[2], st[3], 0.05, -128, 127, 0,
            True, True, axis_name=axis_name)
        return y, (mn, mx, s, z)

    xs = batches((4, 32), shard_axis=1)
    state0 = (jnp.full((4,), jnp.inf), jnp.full((4,), -jnp.inf), jnp.ones(4),
              jnp.zeros(4, jnp.int32))
    run_sync(lambda s, x, a: op(s, x, a), lambda s, x: op(s, x), state0, xs, 1, True)


@check
def sync_two_axis_mesh():
    """A 4x2 mesh; ``axis_name=("data", "model")`` reduces over both axes."""
    mesh = Mesh(np.array(jax.devices()[:N_DEV]).reshape(4, 2), ("data", "model"))
    axes = ("data", "model")
    xspec = P(axes)
    for obj in (jq.MinMaxObserver(), jq.MovingAveragePerChannelMinMaxObserver(ch_axis=1),
                jq.default_fake_quant(), jq.default_fused_act_fake_quant()):
        is_fq = isinstance(obj, jq.FakeQuantizeBase)
        xs = batches((16, 3, 4), seed=2)
        state = host(obj.init(jax.ShapeDtypeStruct(xs[0].shape, jnp.float32)))
        ref = state

        def step(s, x, obj=obj, is_fq=is_fq):
            out = obj.apply(s, x, axis_name=axes) if is_fq else obj.update(s, x, axis_name=axes)
            new = out[1] if is_fq else out
            return jax.tree.map(lambda a: a[None, None], new)

        f = jax.jit(shard_map(step, mesh, in_specs=(P(), xspec), out_specs=P("data", "model")))
        single = jax.jit(obj.apply if is_fq else obj.update)
        for x in xs:
            stacked = f(state, x)
            out = single(ref, jnp.asarray(x))
            ref = host(out[1] if is_fq else out)
            for i in range(4):
                for j in range(2):
                    assert_tree_equal(jax.tree.map(lambda a: np.asarray(a)[i, j], stacked), ref,
                                      f"{type(obj).__name__} device ({i},{j})")
            state = jax.tree.map(lambda a: np.asarray(a)[0, 0], stacked)


@check
def learnable_grads_sum_to_single_device_grads():
    """LSQ with use_grad_scaling under axis_name: the gradient of a replicated scale / zero
    point (which shard_map sums over the devices) == the single-device gradient; the grad
    factor counts the global batch."""
    mesh = mesh1d()
    for fq in (MODULES["LearnableFakeQuantize"][0](), MODULES["LearnableFakeQuantize_per_channel"][0]()):
        xs = batches((16, 3, 8), seed=3)
        state = fq.apply(fq.init(jnp.asarray(xs[0])), jnp.asarray(xs[0]))[1]
        state = host(fq.enable_param_learning(state))
        w = np.random.default_rng(4).standard_normal(xs[0].shape).astype(np.float32)

        def loss(scale, zp, x, w_, axis_name=None, state=state, fq=fq):
            y, _ = fq.apply(state._replace(scale=scale, zero_point=zp), x, axis_name=axis_name)
            return jnp.sum(y * w_)

        def sharded(scale, zp, x, w_):
            # replicated inputs: jax.grad already returns the sum over devices
            return jax.grad(loss, argnums=(0, 1, 2))(scale, zp, x, w_, "data")

        f = jax.jit(shard_map(sharded, mesh, in_specs=(P(), P(), P("data"), P("data")),
                              out_specs=(P(), P(), P("data"))))
        gs, gz, gx = f(state.scale, state.zero_point, xs[1], w)
        rs, rz, rx = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(state.scale, state.zero_point,
                                                                jnp.asarray(xs[1]), jnp.asarray(w))
        np.testing.assert_array_equal(bits(gx), bits(rx))
        np.testing.assert_allclose(gs, rs, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(gz, rz, rtol=2e-5, atol=1e-6)
        assert float(jnp.abs(rs).sum()) > 0


@check
def qat_data_parallel():
    """A jitted data-parallel QAT loop: weights, a weight fake quant and an activation fake
    quant carried through lax.scan inside shard_map; observers frozen for the second phase.
    States stay identical on every device and match the single-device loop."""
    mesh = mesh1d()
    act_fq, wt_fq = jq.default_fused_act_fake_quant(), jq.default_weight_fake_quant()
    rng = np.random.default_rng(5)
    steps, batch, feat = 6, 32, 5
    xs = rng.standard_normal((steps, batch, feat)).astype(np.float32)
    ts = rng.standard_normal((steps, batch)).astype(np.float32)
    w0 = rng.standard_normal(feat).astype(np.float32)
    carry0 = (jnp.asarray(w0), wt_fq.init(jnp.asarray(w0)), act_fq.init(jnp.asarray(xs[0])))

    def loss_fn(w, wst, ast, x, t, axis_name):
        wq, wst = wt_fq.apply(wst, w)  # weights are replicated: no reduction needed
        h, ast = act_fq.apply(ast, x * wq, axis_name=axis_name)
        return jnp.sum((jnp.sum(h, axis=1) - t) ** 2) / batch, (wst, ast)

    def train(carry, xs, ts, axis_name=None):
        def body(carry, xt):
            w, wst, ast = carry
            # inside shard_map the gradient of the replicated w is already summed over devices
            g, (wst, ast) = jax.grad(loss_fn, has_aux=True)(w, wst, ast, *xt, axis_name)
            return (w - 0.05 * g, wst, ast), ast.scale
        return jax.lax.scan(body, carry, (xs, ts))

    def per_device(carry, xs, ts):
        carry, scales = train(carry, xs, ts, "data")
        return jax.tree.map(lambda a: a[None], carry), scales[None]

    dp = jax.jit(shard_map(per_device, mesh, in_specs=(P(), P(None, "data"), P(None, "data")),
                           out_specs=(P("data"), P("data"))))
    single = jax.jit(train)
    half = steps // 2
    c_dp, c_one = host(carry0), carry0
    for phase, sl in enumerate((slice(0, half), slice(half, steps))):
        if phase == 1:  # torch's loop: disable_observer after the first epoch
            c_dp, c_one = jq.disable_observer(c_dp), jq.disable_observer(c_one)
        stacked, scales = dp(c_dp, xs[sl], ts[sl])
        c_one, ref_scales = single(c_one, jnp.asarray(xs[sl]), jnp.asarray(ts[sl]))
        for d in range(1, N_DEV):  # identical on every device
            assert_tree_equal(row(stacked, d), row(stacked, 0), f"phase {phase} device {d}")
        c_dp = host(row(stacked, 0))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     c_dp, host(c_one))
        if phase == 1:  # frozen observers: the qparams did not move
            np.testing.assert_array_equal(np.asarray(scales)[0], np.asarray(scales)[0][:1].repeat(
                np.asarray(scales).shape[1], axis=0))
            np.testing.assert_array_equal(np.asarray(ref_scales), np.asarray(scales)[0])


# ---------------------------------------------------------------------------------------
# Device affinity
# ---------------------------------------------------------------------------------------

def devices_of(tree):
    return {d for leaf in jax.tree.leaves(tree) for d in leaf.devices()}


def committed_to(tree, device):
    leaves = jax.tree.leaves(tree)
    return all(leaf.committed and leaf.devices() == {device} for leaf in leaves)


AFFINITY_CLASSES = {
    "MinMaxObserver": jq.MinMaxObserver, "MovingAverageMinMaxObserver": jq.MovingAverageMinMaxObserver,
    "PerChannelMinMaxObserver": jq.PerChannelMinMaxObserver,
    "MovingAveragePerChannelMinMaxObserver": jq.MovingAveragePerChannelMinMaxObserver,
    "PlaceholderObserver": jq.PlaceholderObserver, "RecordingObserver": jq.RecordingObserver,
    "NoopObserver": jq.NoopObserver, "FakeQuantize": jq.FakeQuantize,
}


@check
def state_dict_respects_device_affinity():
    """torch: a state dict saved on one device loads onto the target model's device."""
    devs = jax.devices()
    rng = np.random.default_rng(6)
    for name, cls in AFFINITY_CLASSES.items():
        obj = cls()
        apply = jax.jit(obj.apply)
        for src, tgt in ((devs[0], devs[3]), (devs[3], devs[6])):
            x_src = jax.device_put(jnp.asarray(rng.standard_normal((4, 1, 4, 4)), jnp.float32), src)
            state = obj.init(x_src)
            state = apply(state, x_src)[1]
            assert committed_to(state, src) or not jax.tree.leaves(state), name
            sd = obj.state_dict(state)
            x_tgt = jax.device_put(x_src, tgt)
            # model2.to(target); model2.load_state_dict(...): place the loaded state on target
            target_state = obj.init(x_tgt)
            loaded = jax.device_put(obj.load_state_dict(sd), tgt)
            if not jax.tree.leaves(state):
                continue
            assert committed_to(target_state, tgt), name
            assert committed_to(loaded, tgt), name
            after = apply(loaded, x_tgt)[1]
            assert committed_to(after, tgt), name
            # an unplaced (freshly loaded) state follows the input's device: under jit every
            # leaf, eagerly every leaf that was recomputed (untouched ones stay uncommitted)
            follow = apply(obj.load_state_dict(sd), x_tgt)[1]
            assert devices_of(follow) == {tgt}, name
            if name in ("MinMaxObserver", "PerChannelMinMaxObserver"):
                follow = obj.apply(obj.load_state_dict(sd), x_tgt)[1]
                assert all(leaf.devices() == {tgt} for leaf in jax.tree.leaves(follow)
                           if leaf.committed), name
            if name != "RecordingObserver":
                assert_tree_equal(host(after), host(apply(state, x_src)[1]), name)


@check
def observer_qparams_respects_device_affinity():
    """torch: the scale and zero point are on the input's device (cuda:1 there)."""
    dev = jax.devices()[1]
    x = jax.device_put(jnp.asarray(np.random.default_rng(7).standard_normal((1, 2)), jnp.float32),
                       dev)
    for obs in (jq.MinMaxObserver(), jq.MovingAverageMinMaxObserver(),
                jq.PerChannelMinMaxObserver(), jq.MovingAveragePerChannelMinMaxObserver()):
        fns = [(jax.jit(obs.update), jax.jit(obs.calculate_qparams))]
        if isinstance(obs, (jq.MovingAverageMinMaxObserver, jq.MovingAveragePerChannelMinMaxObserver)):
            fns.append((obs.update, obs.calculate_qparams))  # eagerly too
        for update, qparams in fns:
            state = update(obs.init(x), x)
            assert committed_to(state, dev), type(obs).__name__
            scale, zero_point = qparams(state)
            assert scale.devices() == {dev} and zero_point.devices() == {dev}
            # a state built without x (uncommitted) also ends up on x's device
            state = update(obs.init(jax.ShapeDtypeStruct(x.shape, x.dtype)), x)
            assert state.min_val.devices() == {dev}


@check
def device_affinity():
    """torch: prepare_qat on a model on cuda:0 keeps every buffer there. Here: the
    fake-quant states of get_default_qat_qconfig(...) made by init(x) sit on x's device,
    and apply keeps them (and y) there."""
    dev = jax.devices()[2]
    x = jax.device_put(jnp.asarray(np.random.default_rng(8).standard_normal((4, 1, 4, 4)),
                                   jnp.float32), dev)
    for backend in ("x86", "qnnpack"):
        for version in (0, 1):
            qconfig = jq.get_default_qat_qconfig(backend, version)
            for factory in (qconfig.activation, qconfig.weight):
                fq = factory()
                state = fq.init(x)
                assert committed_to(state, dev), (backend, version, fq)
                if backend == "x86" and version == 1:  # eagerly as well
                    y, state = fq.apply(state, x)
                    assert committed_to(state, dev) and y.devices() == {dev}
                y, state = jax.jit(fq.apply)(state, x)
                assert committed_to(state, dev) and y.devices() == {dev}


@check
def sharding_affinity():
    """States follow a sharded input: init(x) replicates them on x's mesh; jitted updates
    keep them replicated there and fake-quant outputs keep x's sharding."""
    mesh = mesh1d()
    x = jax.device_put(jnp.asarray(np.random.default_rng(9).standard_normal((16, 4, 3)),
                                   jnp.float32), NamedSharding(mesh, P("data")))
    all_devs = set(mesh.devices.flat)
    for obj in (jq.MinMaxObserver(), jq.PerChannelMinMaxObserver(ch_axis=1),
                jq.default_fake_quant(), jq.default_fused_act_fake_quant(),
                jq.FakeQuantize(jq.MovingAveragePerChannelMinMaxObserver, ch_axis=2)):
        state = obj.init(x)
        for leaf in jax.tree.leaves(state):
            assert leaf.sharding.is_fully_replicated and leaf.sharding.device_set == all_devs
        if isinstance(obj, jq.FakeQuantizeBase):
            y, state = jax.jit(obj.apply)(state, x)
            assert y.sharding.is_equivalent_to(x.sharding, x.ndim), y.sharding
        else:
            state = jax.jit(obj.update)(state, x)
        for leaf in jax.tree.leaves(state):
            assert leaf.sharding.is_fully_replicated and leaf.sharding.device_set == all_devs
        # numerically the same as on one device
        one = jax.device_get(x)
        ref = jax.jit(obj.apply)(obj.init(one), one)[1] if isinstance(obj, jq.FakeQuantizeBase) \
            else jax.jit(obj.update)(obj.init(one), one)
        assert_tree_equal(host(state), host(ref), type(obj).__name__)


def main(argv):
    warnings.filterwarnings("ignore")
    out_path, names = argv[0], argv[1:] or list(CHECKS)
    assert len(jax.devices()) >= N_DEV, jax.devices()
    results, seconds = {}, {}
    for name in names:
        start = time.perf_counter()
        try:
            CHECKS[name]()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the test
            results[name] = traceback.format_exc()
        seconds[name] = round(time.perf_counter() - start, 2)
    if os.environ.get("JQUANT_WORKER_TIMES"):
        print(json.dumps(seconds, indent=1))
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
