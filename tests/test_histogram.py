"""HistogramObserver: torch 2.13's seed tests, edge cases, API, FakeQuantize/QAT, per-channel.

torch 2.13 is the oracle wherever numbers are compared (REFERENCE.md §3).
"""
import io
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant as jq
from jquant._state_dict import StateDictError

torch = pytest.importorskip("torch")
from torch.ao.quantization import HistogramObserver as TorchHistogramObserver  # noqa: E402

_DT = {jq.quint8: torch.quint8, jq.qint8: torch.qint8}
_QS = {jq.per_tensor_affine: torch.per_tensor_affine,
       jq.per_tensor_symmetric: torch.per_tensor_symmetric}


def torch_obs(bins=2048, dtype=jq.quint8, qscheme=jq.per_tensor_affine, **kw):
    return TorchHistogramObserver(bins=bins, dtype=_DT[dtype], qscheme=_QS[qscheme], **kw)


def feed(obs, state, tobs, batches):
    """Feeds both observers; returns the jquant state."""
    for b in batches:
        b = np.asarray(b, np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                tobs(torch.from_numpy(b.copy()))
            except RuntimeError:   # NaN batches: torch raises inside histc
                pass
        state = obs.update(state, jnp.asarray(b))
    return state


def assert_same_state(state, tobs):
    np.testing.assert_array_equal(np.asarray(state.histogram), tobs.histogram.numpy())
    for name in ("min_val", "max_val"):
        got = np.asarray(getattr(state, name), np.float32)
        want = getattr(tobs, name).numpy()
        assert got.tobytes() == want.tobytes() or (np.isnan(got) and np.isnan(want)), name


def assert_same_qparams(obs, state, tobs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts, tz = tobs.calculate_qparams()
    s, z = obs.calculate_qparams(state)
    assert s.shape == (1,) and s.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(s), ts.numpy().astype(np.float32))
    assert int(z[0]) == int(tz.reshape(-1)[0])


# ----------------------------------------------------------------------------------------
# torch's seed tests (TestHistogramObserver, TestObserver)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("qdtype", [jq.qint8, jq.quint8])
@pytest.mark.parametrize("qscheme", [jq.per_tensor_affine, jq.per_tensor_symmetric])
@pytest.mark.parametrize("reduce_range", [False, True])
def test_histogram_observer_bins3(qdtype, qscheme, reduce_range):
    obs = jq.HistogramObserver(bins=3, dtype=qdtype, qscheme=qscheme, reduce_range=reduce_range)
    state = obs.init()
    s0, z0 = obs.calculate_qparams(state)            # empty observer: torch's default
    assert float(s0[0]) == 1.0 and int(z0[0]) == 0
    tobs = torch_obs(3, qdtype, qscheme, reduce_range=reduce_range)
    state = feed(obs, state, tobs, [[2.0, 3.0, 4.0, 5.0], [5.0, 6.0, 7.0, 8.0]])
    assert float(state.min_val) == 2.0 and float(state.max_val) == 8.0
    np.testing.assert_array_equal(np.asarray(state.histogram), [2.0, 3.0, 3.0])
    assert_same_state(state, tobs)
    scale, zp = obs.calculate_qparams(state)
    # the seed's reference values
    if reduce_range:
        ref_scale = (0.0470588 if qscheme.is_symmetric else 0.0235294) * 255 / 127
        ref_zp = {True: 0 if qdtype == jq.qint8 else 128,
                  False: -64 if qdtype == jq.qint8 else 0}[qscheme.is_symmetric]
    else:
        ref_scale = 0.0470588 if qscheme.is_symmetric else 0.0235294
        ref_zp = {True: 0 if qdtype == jq.qint8 else 128,
                  False: -128 if qdtype == jq.qint8 else 0}[qscheme.is_symmetric]
    assert int(zp[0]) == ref_zp
    assert abs(float(scale[0]) - ref_scale) < 1e-5
    assert_same_qparams(obs, state, tobs)

    # serialisation: through torch.save/load, into a fresh jquant and a fresh torch observer
    sd = obs.state_dict(state)
    assert list(sd) == ["eps", "histogram", "min_val", "max_val"]
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, buf)
    buf.seek(0)
    loaded_dict = torch.load(buf)
    loaded = obs.load_state_dict(loaded_dict)
    for k in sd:
        np.testing.assert_array_equal(np.asarray(getattr(loaded, k)), sd[k])
    s2, z2 = obs.calculate_qparams(loaded)
    assert float(s2[0]) == float(scale[0]) and int(z2[0]) == int(zp[0])
    tloaded = torch_obs(3, qdtype, qscheme, reduce_range=reduce_range)
    tloaded.load_state_dict(loaded_dict)
    assert_same_qparams(obs, loaded, tloaded)
    # and torch's own state dict loads into jquant
    again = obs.load_state_dict(tobs.state_dict())
    assert_same_state(again, tobs)


def test_histogram_observer_one_sided():
    obs = jq.HistogramObserver(bins=8, dtype=jq.quint8, qscheme=jq.per_tensor_affine,
                               reduce_range=True)
    tobs = torch_obs(8, reduce_range=True)
    state = feed(obs, obs.init(), tobs, [[0.0, 0.3, 1.2, 1.7], [0.1, 1.3, 2.0, 2.7]])
    assert float(state.min_val) == 0.0
    assert int(obs.calculate_qparams(state)[1][0]) == 0
    assert_same_state(state, tobs)
    assert_same_qparams(obs, state, tobs)


def test_histogram_observer_same_inputs_as_torch_2_13_behaves():
    # The upstream test expects [2, 3, 3] with min 2; torch 2.13 gives min 0 (REFERENCE §3.4).
    obs = jq.HistogramObserver(bins=3, dtype=jq.qint8, qscheme=jq.per_tensor_symmetric)
    tobs = torch_obs(3, jq.qint8, jq.per_tensor_symmetric)
    batches = [np.ones(4), np.zeros(4), np.zeros(4), [2.0, 3.0, 4.0, 5.0], [5.0, 6.0, 7.0, 8.0]]
    state = feed(obs, obs.init(), tobs, batches)
    assert float(state.min_val) == 0.0 and float(state.max_val) == 8.0
    np.testing.assert_array_equal(np.asarray(state.histogram), [13.25, 3.75, 3.0])
    assert_same_state(state, tobs)
    assert_same_qparams(obs, state, tobs)


def test_histogram_observer_consistent_buffer_shape():
    obs = jq.HistogramObserver()
    state = obs.init()
    shapes = (state.min_val.shape, state.max_val.shape, state.histogram.shape)
    x = np.random.default_rng(0).standard_normal((4, 4, 4, 4)).astype(np.float32)
    for _ in range(2):
        state = obs.update(state, x)
    assert (state.min_val.shape, state.max_val.shape, state.histogram.shape) == shapes
    assert shapes == ((), (), (2048,))


def test_histogram_observer_ignore_infinity():
    obs = jq.HistogramObserver()
    x = np.random.default_rng(1).standard_normal((4, 4, 4, 4)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        xinf = x * np.float32(np.inf)
    state = obs.update(obs.init(), xinf)             # all infinite: ignored
    assert float(state.min_val) == np.inf and float(state.max_val) == -np.inf
    state = obs.update(state, x)
    state2 = obs.update(obs.init(), x)
    state = obs.update(state, xinf)
    assert float(state.min_val) != -np.inf and float(state.max_val) != np.inf
    np.testing.assert_array_equal(np.asarray(state.histogram), np.asarray(state2.histogram))
    # partial infinities are dropped, the rest counted
    tobs = torch_obs()
    part = feed(obs, obs.init(), tobs, [[1.0, np.inf, -2.0, -np.inf, 3.0]])
    assert float(part.min_val) == -2.0 and float(part.max_val) == 3.0
    assert float(jnp.sum(part.histogram)) == 3.0
    assert_same_state(part, tobs)


@pytest.mark.parametrize("big", [3.4028234663852886e30, 3.4028234663852886e38])
@pytest.mark.parametrize("sign", [-1, 1])
def test_histogram_observer_handle_close_to_infinity(sign, big):
    obs = jq.HistogramObserver.with_args(reduce_range=False)()
    tobs = TorchHistogramObserver.with_args(reduce_range=False)()
    mask = (np.array([-big, 0, 0, 0]) * sign).astype(np.float32)
    state = feed(obs, obs.init(), tobs, [mask, mask - np.float32(sign)])
    assert_same_state(state, tobs)
    assert_same_qparams(obs, state, tobs)
    scale, zp = obs.calculate_qparams(state)
    inp = torch.randn(1, 4)
    tmask = torch.from_numpy(mask)
    ref = torch.softmax(inp + tmask, dim=1)
    deq = torch.quantize_per_tensor(tmask, float(scale[0]), int(zp[0]), torch.quint8).dequantize()
    torch.testing.assert_close(torch.softmax(inp + deq, dim=1), ref)


def test_histogram_observer_handle_OOM_due_to_close_min_max_value():
    obs = jq.HistogramObserver.with_args(reduce_range=False)()
    tobs = TorchHistogramObserver.with_args(reduce_range=False)()
    state = feed(obs, obs.init(), tobs, [[0.0, 1e-9]])
    assert_same_state(state, tobs)
    state = feed(obs, state, tobs, [[2.0, 3.0]])
    assert_same_state(state, tobs)
    nz = {int(i): float(state.histogram[i]) for i in np.nonzero(np.asarray(state.histogram))[0]}
    assert nz == {0: 2.0, 1365: 1.0, 2047: 1.0}
    assert_same_qparams(obs, state, tobs)


def test_histogram_observer_handle_OOM_due_to_large_upsample_rate():
    # torch 2.13 cannot construct this (TypeError) and OOMs if the attribute is set; jquant
    # takes upsample_rate -> inf (exact overlap split) beyond 2**22 sub-bins: bounded memory.
    obs = jq.HistogramObserver.with_args(upsample_rate=(8000 ** 2), reduce_range=False)()
    state = obs.update(obs.init(), jnp.array([0.0, 1.0]))
    upd = jax.jit(obs.update)
    x2 = jnp.array([2.0, 2.0 + 1e-9])
    mem = upd.lower(state, x2).compile().memory_analysis()
    if mem is not None:
        assert mem.temp_size_in_bytes < 2 ** 22
    state = upd(state, x2)
    assert float(state.min_val) == 0.0 and float(state.max_val) == 2.0
    hist = np.asarray(state.histogram)
    assert hist.sum() == 4.0
    assert {int(i): float(hist[i]) for i in np.nonzero(hist)[0]} == {0: 1.0, 1023: 1.0, 2047: 2.0}
    scale, zp = obs.calculate_qparams(state)
    assert np.isfinite(float(scale[0])) and 0 < float(scale[0]) <= 2.0 / 255 + 1e-7
    assert int(zp[0]) == 0


def test_histogram_observer_extreme_inputs():
    # 4.58e-41 is a denormal: XLA flushes it, jquant keeps it (exact scaling; REFERENCE §3.8)
    obs = jq.HistogramObserver()
    tobs = torch_obs()
    x = [0.0, 0.0, 4.58e-41, 4.58e-41]
    state = feed(obs, obs.init(), tobs, [x])
    assert_same_state(state, tobs)
    assert float(state.histogram[0]) == 2.0 and float(state.histogram[2047]) == 2.0
    state = feed(obs, state, tobs, [x])
    assert_same_state(state, tobs)
    assert float(state.histogram[0]) == 4.0 and float(state.histogram[2047]) == 4.0
    assert_same_qparams(obs, state, tobs)
    # a denormal range that grows (combine path) also matches torch here
    tobs2 = torch_obs()
    state = feed(obs, obs.init(), tobs2, [[-1e-40, 2e-40], [5e-40, 1e-41]])
    assert_same_state(state, tobs2)
    assert_same_qparams(obs, state, tobs2)


def test_histogram_observer_correct_numel():
    obs = jq.HistogramObserver()
    rng = np.random.default_rng(2)
    for i in range(1, 10):
        state = obs.update(obs.init(), rng.standard_normal((i, i)).astype(np.float32))
        assert float(jnp.sum(state.histogram)) == i ** 2


def test_histogram_observer_save_load_state_dict():
    obs1 = jq.HistogramObserver()
    state = obs1.update(obs1.init(), np.random.default_rng(3).standard_normal((4, 4, 4, 4)))
    obs2 = jq.HistogramObserver()
    loaded = obs2.load_state_dict(obs1.state_dict(state))
    assert loaded.min_val.shape == () and loaded.max_val.shape == ()
    # torch loads jquant's state dict, jquant loads torch's (including an unobserved one)
    t = TorchHistogramObserver()
    sd = obs1.state_dict(state)
    t.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
    assert_same_state(state, t)
    fresh = obs2.load_state_dict(TorchHistogramObserver().state_dict())
    assert float(fresh.min_val) == np.inf and float(fresh.max_val) == -np.inf
    # torch < 3 stored an unobserved range as empty tensors
    old = dict(obs1.state_dict(obs1.init()), min_val=np.zeros((0,)), max_val=np.zeros((0,)))
    old_state = obs2.load_state_dict(old)
    assert float(old_state.min_val) == np.inf and float(old_state.max_val) == -np.inf
    with pytest.raises(StateDictError, match="histogram"):
        jq.HistogramObserver(bins=256).load_state_dict(obs1.state_dict(state))
    with pytest.raises(StateDictError, match="missing"):
        obs2.load_state_dict({"eps": np.ones(1), "min_val": np.zeros(()), "max_val": np.ones(())})


@pytest.mark.parametrize("make", [
    lambda: jq.HistogramObserver(dtype=jq.qint8, qscheme=jq.per_tensor_symmetric),
    jq.default_histogram_observer])
def test_histogram_observer_scriptable_is_exportable(make):
    """torch's test_observer_scriptable: here the counterpart is a jax.export round trip."""
    from jax import export
    obs = make()
    x = jnp.asarray(np.random.default_rng(4).random((3, 4)), jnp.float32)
    state = obs.init()
    exp_upd = export.deserialize(export.export(jax.jit(obs.update))(state, x).serialize())
    got = exp_upd.call(state, x)
    want = obs.update(state, x)
    np.testing.assert_array_equal(np.asarray(got.histogram), np.asarray(want.histogram))
    exp_q = export.deserialize(export.export(jax.jit(obs.calculate_qparams))(want).serialize())
    for g, w in zip(exp_q.call(want), obs.calculate_qparams(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_zero_numel_leaves_state():
    obs = jq.HistogramObserver()
    state = obs.update(obs.init(), jnp.zeros((0,)))
    assert float(state.min_val) == np.inf
    state = obs.update(obs.update(obs.init(), jnp.arange(4.0)), jnp.zeros((2, 0)))
    assert float(state.max_val) == 3.0


# ----------------------------------------------------------------------------------------
# Edge cases beyond the seed (REFERENCE §3.8)
# ----------------------------------------------------------------------------------------

def test_nan_batches_keep_torchs_post_raise_state():
    """torch raises inside histc on NaN; jquant keeps the state torch is left with."""
    obs = jq.HistogramObserver()
    tobs = torch_obs()
    state = feed(obs, obs.init(), tobs, [[1.0, np.nan, 3.0]])   # first batch: min/max = NaN
    assert np.isnan(float(state.min_val)) and np.isnan(float(state.max_val))
    assert_same_state(state, tobs)
    assert_same_qparams(obs, state, tobs)
    tobs2 = torch_obs()
    state = feed(obs, obs.init(), tobs2, [[1.0, 2.0, 3.0], [1.0, np.nan, 5.0]])   # later: ignored
    assert float(state.max_val) == 3.0
    assert_same_state(state, tobs2)


@pytest.mark.parametrize("batches", [
    [[3.0] * 5], [[3.0] * 5, [3.0] * 2], [[3.0] * 5, [1.0, 5.0]], [[1e10] * 3],
    [[1e10] * 3, [0.0]], [[-7.5] * 4, [-7.5]], [[0.0] * 3, [0.0, 1.0]],
])
def test_constant_inputs_match_torch(batches):
    obs = jq.HistogramObserver()
    tobs = torch_obs()
    state = feed(obs, obs.init(), tobs, batches)
    assert_same_state(state, tobs)
    assert_same_qparams(obs, state, tobs)


def test_constant_input_qparams():
    obs = jq.HistogramObserver()
    state = obs.update(obs.init(), jnp.full((7,), 3.0))
    assert float(state.histogram[1024]) == 7.0
    scale, zp = obs.calculate_qparams(state)
    assert np.float32(scale[0]) == np.float32(3.0) / np.float32(255) and int(zp[0]) == 0


def test_configuration_errors():
    with pytest.raises(ValueError, match="bins"):
        jq.HistogramObserver(bins=0)
    with pytest.raises(ValueError, match="upsample_rate"):
        jq.HistogramObserver(upsample_rate=0)
    with pytest.raises(ValueError, match="is_dynamic"):
        jq.HistogramObserver(is_dynamic=True)
    with pytest.raises(ValueError, match="qscheme"):
        jq.HistogramObserver(qscheme=jq.per_channel_affine)
    with pytest.raises(ValueError, match="qscheme"):
        jq.PerChannelHistogramObserver(qscheme=jq.per_tensor_affine)
    with pytest.raises(ValueError, match="bins"):
        jq.HistogramObserver(bins="many")
    # torch has no symmetric + reduce_range + quint8 check for this observer
    obs = jq.HistogramObserver(qscheme=jq.per_tensor_symmetric, reduce_range=True)
    assert (obs.quant_min, obs.quant_max) == (0, 127)
    state = obs.update(obs.init(), jnp.array([-1.0, 2.0]))
    assert int(obs.calculate_qparams(state)[1][0]) == 128
    assert jq.HistogramObserver(dtype=jq.quint4x2).dst_nbins == 256
    assert jq.default_histogram_observer().dst_nbins == 256
    assert jq.HistogramObserver.with_args(bins=64)() == jq.HistogramObserver(bins=64)


def test_wrong_state_is_rejected():
    with pytest.raises(ValueError, match="state"):
        jq.HistogramObserver().update(jq.MinMaxObserver().init(), jnp.ones(3))
    with pytest.raises(ValueError, match="per-tensor"):
        jq.HistogramObserver().update(jq.PerChannelHistogramObserver().init(num_channels=2),
                                      jnp.ones(3))


def test_jit_one_trace_for_every_branch():
    """first batch, same range, growth (upscale), single point, all-inf, NaN: one compile."""
    obs = jq.HistogramObserver(bins=256)
    traces = []

    def upd(state, x):
        traces.append(1)
        return obs.update(state, x)

    f = jax.jit(upd)
    tobs = torch_obs(256)
    state = obs.init()
    batches = [[2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0], [0.5, 1.0, 2.0, 3.0],
               [1.0, 1.5, 2.5, 2.9], [np.inf, -np.inf, np.inf, np.inf],
               [-4.0, 0.0, 7.0, np.inf], [1.0, 2.0, np.nan, 0.0], [-9.0, 1.0, 2.0, 3.0]]
    for b in batches:
        b = np.asarray(b, np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                tobs(torch.from_numpy(b))
            except RuntimeError:
                pass
        state = f(state, b)
        assert_same_state(state, tobs)
    assert len(traces) == 1
    assert_same_qparams(obs, state, tobs)
    # calculate_qparams compiles to one program too
    s, z = jax.jit(obs.calculate_qparams)(state)
    assert float(s[0]) == float(obs.calculate_qparams(state)[0][0])


def test_vmap_over_states():
    obs = jq.HistogramObserver(bins=32)
    xs = jnp.asarray(np.random.default_rng(5).standard_normal((3, 50)), jnp.float32)
    states = jax.vmap(lambda x: obs.update(obs.init(), x))(xs)
    qs = jax.vmap(obs.calculate_qparams)(states)
    for i in range(3):
        one = obs.update(obs.init(), xs[i])
        np.testing.assert_array_equal(np.asarray(states.histogram[i]), np.asarray(one.histogram))
        assert float(qs[0][i, 0]) == float(obs.calculate_qparams(one)[0][0])


# ----------------------------------------------------------------------------------------
# FakeQuantize and a jitted QAT step (torch's histogram observer cannot be scripted there)
# ----------------------------------------------------------------------------------------

def test_histogram_fake_quantize_matches_observer_qparams():
    fq = jq.default_histogram_fake_quant()
    assert isinstance(fq.activation_post_process, jq.HistogramObserver)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((8, 16)), jnp.float32)
    state = fq.init(x)
    y, state = fq.apply(state, x)          # eager (the jitted path: the QAT test below)
    app = fq.activation_post_process
    ref_state = app.update(app.init(), x)
    scale, zp = app.calculate_qparams(ref_state)
    np.testing.assert_array_equal(np.asarray(state.scale), np.asarray(scale))
    np.testing.assert_array_equal(np.asarray(state.zero_point), np.asarray(zp))
    want = jq.fake_quantize_per_tensor_affine(x, scale, zp, fq.quant_min, fq.quant_max)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    # same state as torch's FakeQuantize(HistogramObserver) after the same batch
    tfq = torch.ao.quantization.default_histogram_fake_quant()
    tfq(torch.from_numpy(np.asarray(x)))
    np.testing.assert_array_equal(np.asarray(state.scale), tfq.scale.numpy())
    np.testing.assert_array_equal(np.asarray(state.zero_point), tfq.zero_point.numpy())
    sd = fq.state_dict(state)
    assert "activation_post_process.histogram" in sd
    fq.load_state_dict(tfq.state_dict())


def test_histogram_fake_quantize_in_jitted_qat_step():
    fq = jq.FakeQuantize(observer=jq.HistogramObserver.with_args(bins=256), quant_min=0,
                         quant_max=255)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 4)) * 0.3, jnp.float32)
    t = jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)

    def loss(w, fq_state, x):
        h, fq_state = fq.apply(fq_state, x @ w)
        return jnp.mean((h - t) ** 2), fq_state

    @jax.jit
    def step(w, fq_state, x):
        (l, fq_state), g = jax.value_and_grad(loss, has_aux=True)(w, fq_state, x)
        return w - 0.1 * g, fq_state, l

    state = fq.init(x @ w)
    losses = []
    for i in range(5):
        w, state, l = step(w, state, x * (1 + 0.2 * i))
        losses.append(float(l))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] * 2
    assert float(jnp.sum(state.activation_post_process.histogram)) == 5 * 32 * 4
    # straight-through gradient: inside the range the gradient equals the float one's
    g = jax.grad(lambda a: jnp.sum(fq.apply(state, a)[0]))(x @ w)
    s, z = state.scale[0], state.zero_point[0]
    lo, hi = (0 - z) * s, (255 - z) * s
    inside = np.asarray(((x @ w) >= lo) & ((x @ w) <= hi))
    assert np.all(np.asarray(g)[inside] == 1.0)


# ----------------------------------------------------------------------------------------
# PerChannelHistogramObserver
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("ch_axis,qscheme,dtype", [
    (1, jq.per_channel_symmetric, jq.qint8), (-1, jq.per_channel_affine, jq.quint8)])
def test_per_channel_equals_per_tensor_on_each_channel(ch_axis, qscheme, dtype):
    bins = 256
    pc = jq.PerChannelHistogramObserver(ch_axis=ch_axis, bins=bins, qscheme=qscheme, dtype=dtype)
    pt = jq.HistogramObserver(bins=bins, dtype=dtype, qscheme=(
        jq.per_tensor_symmetric if qscheme.is_symmetric else jq.per_tensor_affine))
    rng = np.random.default_rng(8)
    c = 4
    shape = [3, 3, 3]
    shape[ch_axis] = c
    xs = []
    for i in range(4):
        x = rng.standard_normal(shape) * rng.uniform(0.2, 3.0, c).reshape(
            [c if d == (ch_axis % 3) else 1 for d in range(3)])
        xs.append(x.astype(np.float32))
    xs[1] = np.where(rng.random(shape) < 0.1, np.inf, xs[1]).astype(np.float32)
    sl = [slice(None)] * 3
    sl[ch_axis] = 2
    xs[2][tuple(sl)] = 1.5                              # a constant channel (single point)
    state = pc.init(xs[0])
    for x in xs:
        state = pc.update(state, x)
    scale, zp = pc.calculate_qparams(state)
    assert scale.shape == (c,) and zp.shape == (c,)
    for ch in range(c):
        st = pt.init()
        for x in xs:
            st = pt.update(st, np.take(x, ch, axis=ch_axis))
        np.testing.assert_array_equal(np.asarray(state.histogram[ch]), np.asarray(st.histogram))
        assert float(state.min_val[ch]) == float(st.min_val)
        s1, z1 = pt.calculate_qparams(st)
        assert float(scale[ch]) == float(s1[0]) and int(zp[ch]) == int(z1[0])


def test_per_channel_api():
    pc = jq.PerChannelHistogramObserver(bins=256)
    with pytest.raises(ValueError, match="num_channels"):
        pc.init()
    state = pc.init(num_channels=3)
    assert state.histogram.shape == (3, 256) and state.min_val.shape == (3,)
    s, z = pc.calculate_qparams(state)                 # unobserved: (1.0, 0) per channel
    np.testing.assert_array_equal(np.asarray(s), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="channels"):
        pc.update(state, jnp.ones((2, 5)))
    state = pc.update(state, jnp.arange(15.0).reshape(3, 5))
    sd = pc.state_dict(state)
    assert list(sd) == ["eps", "histogram", "min_val", "max_val"]
    again = pc.load_state_dict(sd)
    np.testing.assert_array_equal(np.asarray(again.histogram), np.asarray(state.histogram))
    with pytest.raises(StateDictError, match="histogram"):
        jq.PerChannelHistogramObserver(bins=8).load_state_dict(sd)
    assert pc.reset_min_max_vals(state).histogram.shape == (3, 256)
    # FakeQuantize with the per-channel histogram observer
    fq = jq.FakeQuantize(observer=jq.PerChannelHistogramObserver.with_args(bins=256, ch_axis=1),
                         quant_min=-128, quant_max=127, dtype=jq.qint8,
                         qscheme=jq.per_channel_symmetric)
    x = jnp.asarray(np.random.default_rng(9).standard_normal((6, 3)), jnp.float32)
    fstate = fq.init(x)
    y, fstate = fq.apply(fstate, x)
    assert fstate.scale.shape == (3,) and y.shape == x.shape
