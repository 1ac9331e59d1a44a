"""jquant counterparts of torch's ``test/quantization/core/test_workflow_module.py`` (core parts).

The seed file (``shared/seed/test_workflow_module.annotated.md``) is the behaviour spec.
Every seed test touching observers, fake-quant ops, the fused op, fake-quantize modules or
QConfig has a counterpart named after it (classes mirror the seed's test classes). torch
2.13 itself is the oracle wherever numbers are compared.

========================================================  ===============================================
seed test (class.test)                                    jquant counterpart
========================================================  ===============================================
TestObserver.test_per_tensor_observers                    TestObserver.test_per_tensor_observers
TestObserver.test_per_channel_observers                   TestObserver.test_per_channel_observers
TestObserver.test_observer_scriptable                     TestObserver.test_observer_scriptable
                                                          (torch.jit.script/save/load -> jax.export
                                                          serialize/deserialize; tests/test_export.py
                                                          covers every observer, op and module)
TestObserver.test_state_dict_respects_device_affinity     test_multidevice.py::test_state_dict_respects_
                                                          device_affinity (8 CPU devices, device_put)
TestObserver.test_histogram_observer_* (6 tests),         tests/test_histogram.py (histogram helper)
  TestObserver.test_histogram_observer_save_load_state_dict
TestObserver.test_save_load_state_dict_script             TestObserver.test_save_load_state_dict_script
                                                          (core part: MinMax / MovingAverage state dicts
                                                          of an exported observer, saved and loaded;
                                                          prepare_jit of a model -> Flax front ends;
                                                          HistogramObserver -> histogram helper)
TestObserver.test_observer_qparams_respects_device_       test_multidevice.py::test_observer_qparams_
  affinity                                                respects_device_affinity
TestObserver.test_zero_numel                              TestObserver.test_zero_numel
TestObserver.test_dynamic_quant_observer                  TestObserver.test_dynamic_quant_observer
TestObserver.test_dynamic_quant_observer_matching_        TestObserver.test_dynamic_quant_observer_
  choose_qparams                                          matching_choose_qparams
TestObserver.test_per_channel_observers_load_state_dict   TestObserver.test_per_channel_observers_load_
                                                          state_dict
_ReferenceHistogramObserver                               tests/test_histogram.py (histogram helper)
TestRecordHistogramObserver.test_record_observer          TestRecordHistogramObserver.test_record_observer
                                                          (core part: a RecordingObserver from
                                                          default_debug_qconfig on a linear layer's
                                                          output; prepare() of a model -> Flax helpers)
TestRecordHistogramObserver.test_observer_scriptable      TestRecordHistogramObserver.test_observer_
                                                          scriptable (jax.export round trip)
TestHistogramObserver.* (9 tests)                         tests/test_histogram.py (histogram helper)
TestFakeQuantize.test_fq_module_per_channel               TestFakeQuantize.test_fq_module_per_channel
TestFakeQuantize.test_fq_serializable_per_channel         TestFakeQuantize.test_fq_serializable_per_channel
TestFakeQuantize.test_quant_min_max_override              TestFakeQuantize.test_quant_min_max_override
TestDistributed.test_observers_preserve_buffers           test_state_structure.py::test_observers_
                                                          preserve_buffers (treedef/shapes/dtypes fixed)
TestDistributed.test_fake_quant_preserves_buffers         test_state_structure.py::test_fake_quant_
                                                          preserves_buffers (incl. flag flips)
TestDistributed.test_qat_data_parallel                    test_multidevice.py::test_qat_data_parallel
                                                          (core part: data-parallel QAT scan in
                                                          shard_map with synced fake-quant states;
                                                          conv-bn fusion / convert -> Flax helpers)
TestDistributed.test_qat_convbn_fused_syncbn_replacement  cannot apply: converts torch BatchNorm modules
                                                          to SyncBatchNorm; jquant has no module swap
                                                          (Flax's BatchNorm syncs with axis_name; the
                                                          fused conv-bn QAT modules are the front ends')
TestDistributed.test_syncbn_preserves_qconfig             cannot apply: a torch module attribute surviving
                                                          a module swap; no counterpart in functional JAX
TestDistributed.test_device_affinity                      test_multidevice.py::test_device_affinity
                                                          (default QAT fake-quant states on x's device)
TestFusedObsFakeQuantModule.test_fused_obs_fq_module      TestFusedObsFakeQuantModule.test_fused_obs_fq_
                                                          module
TestFusedObsFakeQuantModule.test_fused_obs_fq_moving_     TestFusedObsFakeQuantModule.test_fused_obs_fq_
  avg_module                                              moving_avg_module
TestFusedObsFakeQuantModule.test_compare_fused_obs_fq_    TestFusedObsFakeQuantModule.test_compare_fused_
  oss_module                                              obs_fq_oss_module
TestFusedObsFakeQuantModule.test_fused_mod_per_channel    TestFusedObsFakeQuantModule.test_fused_mod_per_
                                                          channel
TestFusedObsFakeQuantModule.test_fused_mod_reduce_range   TestFusedObsFakeQuantModule.test_fused_mod_
                                                          reduce_range
TestFusedObsFakeQuantModule.test_embedding_bag_qat_config TestFusedObsFakeQuantModule.test_embedding_bag_
                                                          qat_config (core part: the qconfigs' fake
                                                          quants on an embedding table; prepare_qat /
                                                          convert of EmbeddingBag -> Flax helpers)
TestFusedObsFakeQuantModule.test_embedding_qat_config     TestFusedObsFakeQuantModule.test_embedding_qat_
                                                          config (core part: fake-quant types per
                                                          qengine; the model part -> Flax helpers)
TestFusedObsFakeQuantModule.test_default_fused_qat_config TestFusedObsFakeQuantModule.test_default_fused_
                                                          qat_config (types and ranges of
                                                          get_default_qat_qconfig(..., version=1) on a
                                                          functional linear + relu with 3 fake quants)
========================================================  ===============================================

Device "cuda" parametrisations of the seed run on the CPU backend here; the multi-device
behaviour is tested with 8 forced CPU devices in tests/test_multidevice.py.
"""
from __future__ import annotations

import io
import pickle
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.ao.quantization import fake_quantize as tfq
from torch.ao.quantization import observer as tobs

import jquant as jq

warnings.filterwarnings("ignore", category=UserWarning)

TORCH_DTYPE = {"uint8": torch.quint8, "int8": torch.qint8, "int32": torch.qint32}
TOL = 1e-6  # the seed's ``tolerance``


def tdtype(dtype):
    return TORCH_DTYPE[np.dtype(dtype).name]


def tqscheme(qscheme):
    return getattr(torch, jq.QScheme(qscheme).value)


def assert_bits(got, want, what=""):
    """Bit-identical float32 (NaNs alike) / equal integers, shapes included."""
    g = np.asarray(got.detach().numpy() if hasattr(got, "detach") else got)
    w = np.asarray(want.detach().numpy() if hasattr(want, "detach") else want)
    assert g.shape == w.shape, (what, g.shape, w.shape)
    if g.dtype.kind == "f" or w.dtype.kind == "f":
        g, w = g.astype(np.float32), w.astype(np.float32)
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=what)
        np.testing.assert_array_equal(np.where(np.isnan(g), 0, g).view(np.uint32),
                                      np.where(np.isnan(w), 0, w).view(np.uint32), err_msg=what)
    else:
        np.testing.assert_array_equal(g.astype(np.int64), w.astype(np.int64), err_msg=what)


def save_load(sd):
    """A state dict through bytes: ``np.savez`` and pickle (torch.save / torch.load's role)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in sd.items()})
    buf.seek(0)
    with np.load(buf) as z:
        loaded = {k: z[k] for k in z.files}
    again = pickle.loads(pickle.dumps(loaded))
    for k in sd:
        np.testing.assert_array_equal(again[k], np.asarray(sd[k]))
        assert again[k].dtype == np.asarray(sd[k]).dtype
    return again


def export_roundtrip(fn, *args):
    """jax.export the jitted fn, serialize to bytes, deserialize (torch.jit.script/save/load)."""
    blob = jax.export.export(jax.jit(fn))(*args).serialize()
    buf = io.BytesIO(bytes(blob))  # torch.jit.save(scripted, buf); buf.seek(0)
    return jax.export.deserialize(bytearray(buf.read()))


# =======================================================================================
class TestObserver:
    # torch: @given(qdtype in (qint8, quint8, qint32), qscheme per-tensor, reduce_range)
    @pytest.mark.parametrize("reduce_range", [False, True])
    @pytest.mark.parametrize("qscheme", [jq.per_tensor_affine, jq.per_tensor_symmetric])
    @pytest.mark.parametrize("qdtype", [jq.qint8, jq.quint8, jq.qint32])
    def test_per_tensor_observers(self, qdtype, qscheme, reduce_range):
        # reduce_range cannot be used with symmetric quint8 (and is ignored for qint32)
        if (qdtype == jq.quint8 and qscheme == jq.per_tensor_symmetric) or qdtype == jq.qint32:
            reduce_range = False
        input_scale = 2 ** 16 if qdtype == jq.qint32 else 1
        for cls, tcls, kw in ((jq.MinMaxObserver, tobs.MinMaxObserver, {}),
                              (jq.MovingAverageMinMaxObserver, tobs.MovingAverageMinMaxObserver,
                               {"averaging_constant": 0.5})):
            obs = cls(dtype=qdtype, qscheme=qscheme, reduce_range=reduce_range, **kw)
            tob = tcls(dtype=tdtype(qdtype), qscheme=tqscheme(qscheme), reduce_range=reduce_range,
                       **kw)
            apply, qparams = jax.jit(obs.apply), jax.jit(obs.calculate_qparams)
            state = obs.init()
            s0, z0 = qparams(state)  # no data: torch's default (with a warning)
            assert_bits(s0, tob.calculate_qparams()[0])
            if cls is jq.MinMaxObserver:
                x = np.array([1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 6.0], np.float32) * input_scale
                y = np.array([4.0, 5.0, 5.0, 6.0, 7.0, 8.0], np.float32) * input_scale
            else:  # the moving averages of min / max reach the same extremes
                x = np.array([0.0, 2.0, 2.0, 3.0, 4.0, 5.0, 6.0], np.float32) * input_scale
                y = np.array([2.0, 5.0, 5.0, 6.0, 7.0, 10.0], np.float32) * input_scale
            out, state = apply(state, jnp.asarray(x))
            out, state = apply(state, jnp.asarray(y))
            np.testing.assert_array_equal(out, y)  # the input comes back untouched
            tob(torch.from_numpy(x))
            tob(torch.from_numpy(y))
            assert float(state.min_val) == 1.0 * input_scale
            assert float(state.max_val) == 8.0 * input_scale
            scale, zp = qparams(state)
            ts, tz = tob.calculate_qparams()
            assert_bits(scale, ts, "scale")
            assert_bits(zp, tz, "zero_point")
            # serializable: save / load the state dict into a new observer
            loaded_sd = save_load(obs.state_dict(state))
            loaded_obs = cls(dtype=qdtype, qscheme=qscheme, reduce_range=reduce_range, **kw)
            loaded = loaded_obs.load_state_dict(loaded_sd)
            assert float(loaded.min_val) == float(state.min_val)
            assert float(loaded.max_val) == float(state.max_val)
            for a, b in zip(qparams(loaded), (scale, zp)):  # same config: same function
                np.testing.assert_array_equal(a, b)
            assert loaded_obs == obs
            # torch loads jquant's state dict and agrees
            t2 = tcls(dtype=tdtype(qdtype), qscheme=tqscheme(qscheme), reduce_range=reduce_range,
                      **kw)
            t2.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in loaded_sd.items()})
            assert_bits(t2.calculate_qparams()[0], scale)

    # torch: @given(qdtype in (qint8, quint8), per-channel qschemes, ch_axis 0..3, reduce_range)
    @settings(max_examples=10, deadline=None)
    @given(qdtype=st.sampled_from((jq.qint8, jq.quint8)),
           qscheme=st.sampled_from((jq.per_channel_affine, jq.per_channel_symmetric,
                                    jq.per_channel_affine_float_qparams)),
           ch_axis=st.sampled_from((0, 1, 2, 3)), reduce_range=st.booleans())
    def test_per_channel_observers(self, qdtype, qscheme, ch_axis, reduce_range):
        self._per_channel_observers(qdtype, qscheme, ch_axis, reduce_range)

    @pytest.mark.slow
    @pytest.mark.parametrize("reduce_range", [False, True])
    @pytest.mark.parametrize("ch_axis", [0, 1, 2, 3])
    @pytest.mark.parametrize("qscheme", [jq.per_channel_affine, jq.per_channel_symmetric,
                                         jq.per_channel_affine_float_qparams])
    @pytest.mark.parametrize("qdtype", [jq.qint8, jq.quint8])
    def test_per_channel_observers_all_combinations(self, qdtype, qscheme, ch_axis, reduce_range):
        self._per_channel_observers(qdtype, qscheme, ch_axis, reduce_range)

    @staticmethod
    def _per_channel_observers(qdtype, qscheme, ch_axis, reduce_range):
        if qscheme == jq.per_channel_affine_float_qparams:
            reduce_range = False
        if qdtype == jq.quint8 and qscheme == jq.per_channel_symmetric:
            reduce_range = False
        x = np.array([[[[1.0, 2.0], [2.0, 2.5]], [[3.0, 4.0], [4.5, 6.0]]],
                      [[[-4.0, -3.0], [5.0, 5.0]], [[6.0, 3.0], [7.0, 8.0]]]], np.float32)
        ref_min_vals = [[1.0, -4.0], [-4.0, 3.0], [-4.0, 2.0], [-4.0, -3.0]]
        ref_max_vals = [[6.0, 8.0], [5.0, 8.0], [6.0, 8.0], [7.0, 8.0]]
        for cls, tcls, kw in ((jq.PerChannelMinMaxObserver, tobs.PerChannelMinMaxObserver, {}),
                              (jq.MovingAveragePerChannelMinMaxObserver,
                               tobs.MovingAveragePerChannelMinMaxObserver,
                               {"averaging_constant": 0.5})):
            args = dict(reduce_range=reduce_range, ch_axis=ch_axis, **kw)
            obs = cls(dtype=qdtype, qscheme=qscheme, **args)
            tob = tcls(dtype=tdtype(qdtype), qscheme=tqscheme(qscheme), **args)
            apply, qparams = jax.jit(obs.apply), jax.jit(obs.calculate_qparams)
            # calculate_qparams works for an observer that has seen nothing
            empty = obs.init(jnp.zeros((0,)))
            assert_bits(obs.calculate_qparams(empty)[0], tob.calculate_qparams()[0])
            state = obs.init(x)
            if cls is jq.MovingAveragePerChannelMinMaxObserver:
                for scale_in in (0.5, 1.5):  # min / max drift across batches
                    out, state = apply(state, jnp.asarray(scale_in * x))
                    tob(torch.from_numpy(scale_in * x))
                np.testing.assert_array_equal(out, 1.5 * x)
            else:
                out, state = apply(state, jnp.asarray(x))
                tob(torch.from_numpy(x))
                np.testing.assert_array_equal(out, x)
            np.testing.assert_array_equal(state.min_val, ref_min_vals[ch_axis])
            np.testing.assert_array_equal(state.max_val, ref_max_vals[ch_axis])
            scale, zp = qparams(state)
            ts, tz = tob.calculate_qparams()
            assert_bits(scale, ts, "scale")
            assert_bits(zp, tz, "zero_point")
            assert zp.dtype == (jnp.float32 if qscheme == jq.per_channel_affine_float_qparams
                                else jnp.int32)
            loaded_obs = cls(dtype=qdtype, qscheme=qscheme, **args)
            loaded = loaded_obs.load_state_dict(save_load(obs.state_dict(state)))
            np.testing.assert_array_equal(loaded.min_val, state.min_val)
            np.testing.assert_array_equal(loaded.max_val, state.max_val)
            assert loaded_obs == obs
            for a, b in zip(qparams(loaded), (scale, zp)):
                np.testing.assert_array_equal(a, b)

    def test_observer_scriptable(self):
        for obs in (jq.MinMaxObserver(), jq.MovingAverageMinMaxObserver()):
            x = jnp.asarray(np.random.default_rng(0).random((3, 4), dtype=np.float32))
            state = obs.init()
            update = export_roundtrip(obs.update, state, x)  # "scripted"
            qparams = export_roundtrip(obs.calculate_qparams, obs.update(state, x))
            s_eager = obs.update(state, x)
            s_scripted = update.call(state, x)
            jax.tree.map(np.testing.assert_array_equal, s_scripted, s_eager)
            for a, b in zip(obs.calculate_qparams(s_eager), qparams.call(s_scripted)):
                np.testing.assert_array_equal(a, b)

    def test_save_load_state_dict_script(self):
        """Observer state dicts of exported ("scripted") observers save and load exactly."""
        x = jnp.asarray(np.random.default_rng(1).random((5, 5), dtype=np.float32))
        for make in (jq.MinMaxObserver, jq.MovingAverageMinMaxObserver,
                     jq.default_observer, jq.default_weight_observer):
            obs = make()
            scripted = export_roundtrip(obs.update, obs.init(), x)
            state = scripted.call(obs.init(), x)
            obs_dict = save_load(obs.state_dict(state))
            scripted_2 = make()  # a second prepared model: load the statistics into it
            state_2 = scripted_2.load_state_dict(obs_dict)
            assert scripted_2.state_dict(state_2).keys() == obs.state_dict(state).keys()
            jax.tree.map(np.testing.assert_array_equal, state_2, state)

    def test_zero_numel(self):
        obs_list = [jq.MinMaxObserver, jq.MovingAverageMinMaxObserver,
                    jq.PerChannelMinMaxObserver, jq.MovingAveragePerChannelMinMaxObserver,
                    jq.FakeQuantize, jq.FixedQParamsObserver]
        for obs_cls in obs_list:
            obs = obs_cls(0.1, 0) if obs_cls is jq.FixedQParamsObserver else obs_cls()
            x = jnp.asarray(np.array([], np.float32))
            state = obs.init(x)
            y, new_state = obs(state, x)  # no crash; nothing observed
            assert y.shape == (0,)
            jax.tree.map(np.testing.assert_array_equal, new_state, state)
            y, _ = jax.jit(obs.apply)(state, x)
            assert y.shape == (0,)

    def test_dynamic_quant_observer(self):
        obs = jq.MovingAverageMinMaxObserver(averaging_constant=1, is_dynamic=True)
        rng = np.random.default_rng(2)
        x = jnp.asarray(rng.standard_normal((3, 3)).astype(np.float32))
        update, qparams = jax.jit(obs.update), jax.jit(obs.calculate_qparams)
        state = update(obs.init(), x)
        params = qparams(state)
        for _ in range(20):
            state = update(state, jnp.asarray(10 * rng.standard_normal((3, 3)).astype(np.float32)))
            new = qparams(state)
            assert not all(np.array_equal(a, b) for a, b in zip(params, new))
            state = update(state, x)
            for a, b in zip(params, qparams(state)):
                np.testing.assert_array_equal(a, b)

    def test_dynamic_quant_observer_matching_choose_qparams(self):
        obs = jq.MovingAverageMinMaxObserver(averaging_constant=1, is_dynamic=True)
        torch.manual_seed(0)
        state = obs.init()
        for x in [torch.randn(3, 3), torch.rand(3, 3, 3), torch.randn(3, 3, 3, 3)]:
            xj = jnp.asarray(x.numpy())
            _, state = obs(state, xj)
            params = obs.calculate_qparams(state)
            scale, zero_point = torch._choose_qparams_per_tensor(x)
            # the observer rule agrees with torch's choose_qparams (as the seed asserts) ...
            np.testing.assert_allclose(float(params[0][0]), scale, rtol=1.3e-6, atol=1e-5)
            assert int(params[1][0]) == zero_point
            # ... and jquant's choose_qparams_per_tensor is torch's, exactly
            js, jz = jq.choose_qparams_per_tensor(xj)
            assert float(js) == np.float32(scale) and int(jz) == zero_point

    def test_per_channel_observers_load_state_dict(self):
        torch.manual_seed(3)
        for obs_cls, tcls in ((jq.PerChannelMinMaxObserver, tobs.PerChannelMinMaxObserver),
                              (jq.MovingAveragePerChannelMinMaxObserver,
                               tobs.MovingAveragePerChannelMinMaxObserver)):
            obs = obs_cls()
            x = torch.randn((32, 32))
            state = obs.update(obs.init(x.numpy()), jnp.asarray(x.numpy()))
            new_obs = obs_cls()
            new_state = new_obs.load_state_dict(obs.state_dict(state))  # loads fine
            np.testing.assert_array_equal(new_state.min_val, state.min_val)
            np.testing.assert_array_equal(new_state.max_val, state.max_val)
            # torch's own state dict (uninitialised buffers resize on load) loads too
            tob = tcls()
            tob(x)
            from_torch = new_obs.load_state_dict(tob.state_dict())
            assert_bits(from_torch.min_val, tob.min_val)
            assert_bits(from_torch.max_val, tob.max_val)


# =======================================================================================
class TestRecordHistogramObserver:
    def test_record_observer(self):
        """default_debug_qconfig's RecordingObserver on a linear layer's output."""
        qconfig = jq.default_debug_qconfig
        obs = qconfig.activation()
        assert isinstance(obs, jq.RecordingObserver)
        assert isinstance(qconfig.weight(), jq.MinMaxObserver)
        rng = np.random.default_rng(4)
        w = jnp.asarray(rng.random((5, 5), dtype=np.float32))
        b = jnp.asarray(rng.random(5, dtype=np.float32))
        calib_data = [jnp.asarray(rng.random((2, 5), dtype=np.float32)) for _ in range(2)]

        def model(state, x):  # fc1 followed by its activation_post_process
            y = x @ w.T + b
            return obs(state, y)

        state = obs.init(jax.ShapeDtypeStruct((2, 5), jnp.float32))
        step = jax.jit(model)
        for _ in range(2):  # test_only_eval_fn twice
            for x in calib_data:
                _, state = step(state, x)
        values = obs.get_tensor_value(state)
        assert len(values) == 2 * len(calib_data)
        np.testing.assert_array_equal(values[0], step(obs.init(calib_data[0]), calib_data[0])[0])
        np.testing.assert_array_equal(values[3], calib_data[1] @ w.T + b)

    @pytest.mark.parametrize("qdtype", [jq.qint8, jq.quint8])
    def test_observer_scriptable(self, qdtype):
        obs = jq.RecordingObserver(dtype=qdtype)
        x = jnp.asarray(np.random.default_rng(5).random((3, 4), dtype=np.float32))
        state = obs.init(x)
        scripted = export_roundtrip(obs.update, state, x)
        eager = obs.update(state, x)
        from_scripted = scripted.call(state, x)
        np.testing.assert_array_equal(obs.get_tensor_value(eager)[0],
                                      obs.get_tensor_value(from_scripted)[0])
        np.testing.assert_array_equal(obs.get_tensor_value(from_scripted)[0], x)


# =======================================================================================
def _np_fq_per_channel_reference(x, scale, zp, axis, qmin, qmax):
    """Plain numpy per-channel fake quant and its mask, by REFERENCE 4.4's rule
    (``q = zp + round(f32(x * f32(1 / scale)))``, mask on the unclamped ``q``)."""
    shape = [1] * x.ndim
    shape[axis] = -1
    s = scale.reshape(shape).astype(np.float32)
    z = zp.reshape(shape).astype(np.float64)
    inv = (np.float32(1.0) / s).astype(np.float32)
    q = z + np.round((x * inv).astype(np.float32))
    y = (np.clip(q, qmin, qmax) - z) * s.astype(np.float64)
    return y.astype(np.float32), ((q >= qmin) & (q <= qmax))


@st.composite
def per_channel_tensor(draw):
    """The seed's hu.per_channel_tensor(shapes=array_shapes(2, 5)) with qint8 qparams."""
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(0, ndim - 1))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
    return x, axis


class TestFakeQuantize:
    @settings(max_examples=10, deadline=None)
    @given(X=per_channel_tensor())
    def test_fq_module_per_channel(self, X):
        self._fq_module_per_channel(X)

    @pytest.mark.slow
    @settings(max_examples=60, deadline=None)
    @given(X=per_channel_tensor())
    def test_fq_module_per_channel_more_examples(self, X):
        self._fq_module_per_channel(X)

    @staticmethod
    def _fq_module_per_channel(X):
        X, axis = X
        quant_min, quant_max = -128, 127  # torch.iinfo(qint8)
        fq_module = jq.FakeQuantize(jq.default_per_channel_weight_observer, quant_min, quant_max,
                                    ch_axis=axis)
        state0 = fq_module.init(X)
        dout = np.random.default_rng(X.size).random(X.shape, dtype=np.float32)

        @jax.jit
        def forward_backward(x, g):
            y, vjp = jax.vjp(lambda x: fq_module(state0, x)[0], x)
            return y, fq_module(state0, x)[1], vjp(g)[0]

        y_prime, state, dx = forward_backward(jnp.asarray(X), jnp.asarray(dout))
        assert state.scale is not None and state.zero_point is not None
        y_ref, mask = _np_fq_per_channel_reference(X, np.asarray(state.scale),
                                                   np.asarray(state.zero_point), axis,
                                                   quant_min, quant_max)
        np.testing.assert_allclose(np.asarray(y_prime), y_ref, rtol=TOL, atol=TOL)
        np.testing.assert_allclose(np.asarray(dx), dout * mask, rtol=TOL, atol=TOL)
        # torch's module: identical qparams, output and gradient
        t_module = tfq.FakeQuantize(tobs.default_per_channel_weight_observer, quant_min,
                                    quant_max, ch_axis=axis)
        xt = torch.tensor(X, requires_grad=True)
        yt = t_module(xt)
        yt.backward(torch.from_numpy(dout))
        assert_bits(state.scale, t_module.scale)
        assert_bits(state.zero_point, t_module.zero_point)
        assert_bits(y_prime, yt)
        assert_bits(dx, xt.grad)

    def test_fq_serializable_per_channel(self):
        observer = jq.default_per_channel_weight_observer
        quant_min, quant_max = -128, 127
        fq_module = jq.FakeQuantize(observer, quant_min, quant_max)
        X = jnp.array([[-5, -3.5, -2, 0, 3, 5, 7], [1, 3, 2, 5, 6.5, 8, 10]], jnp.float32)
        y_ref, state = fq_module(fq_module.init(X), X)
        state_dict = fq_module.state_dict(state)
        np.testing.assert_allclose(state_dict["scale"], [0.054902, 0.078431], rtol=1.3e-6,
                                   atol=1e-5)
        np.testing.assert_array_equal(state_dict["zero_point"], [0, 0])
        loaded_dict = save_load(state_dict)
        for key in state_dict:
            np.testing.assert_array_equal(state_dict[key], loaded_dict[key])
        reloaded = fq_module.load_state_dict(loaded_dict)
        jax.tree.map(np.testing.assert_array_equal, reloaded, state)
        t_module = tfq.FakeQuantize(tobs.default_per_channel_weight_observer, quant_min, quant_max)
        t_module(torch.from_numpy(np.asarray(X)))
        for key, value in t_module.state_dict().items():
            assert_bits(state_dict[key], value, key)

    def test_quant_min_max_override(self):
        observer = jq.default_per_channel_weight_observer
        fq_module = jq.FakeQuantize(observer)  # no override
        assert fq_module.activation_post_process.quant_min == -128
        assert fq_module.activation_post_process.quant_max == 127
        fq_module = jq.FakeQuantize(observer, quant_min=0, quant_max=127)  # override
        assert fq_module.activation_post_process.quant_min == 0
        assert fq_module.activation_post_process.quant_max == 127


# =======================================================================================
def _randn(*shape):
    return torch.randn(*shape)


@jax.jit
def _fused_op_per_tensor(x, obs_on, fq_on, rmin, rmax, scale, zp, avg_const):
    return jq.fused_moving_avg_obs_fake_quant(x, obs_on, fq_on, rmin, rmax, scale, zp, avg_const,
                                              0, 255, 0, False)


@jax.jit
def _fused_op_per_channel(x, obs_on, fq_on, rmin, rmax, scale, zp, avg_const):
    return jq.fused_moving_avg_obs_fake_quant(x, obs_on, fq_on, rmin, rmax, scale, zp, avg_const,
                                              0, 255, 0, True, False)


class TestFusedObsFakeQuantModule:
    def test_fused_obs_fq_module(self):
        torch.manual_seed(10)
        x = _randn(5, 5)
        xj = jnp.asarray(x.numpy())
        running_min_op, running_max_op = jnp.float32(jnp.inf), jnp.float32(-jnp.inf)
        avg_const = 0.01
        scale, zero_point = jnp.array([1.0]), jnp.array([0], jnp.int32)
        mod = jq.FusedMovingAvgObsFakeQuantize()
        state = jq.enable_observer(jq.enable_fake_quant(mod.init()))
        out, state = jax.jit(mod.apply)(state, xj)
        out_ref, running_min_op, running_max_op, scale, zero_point = \
            _fused_op_per_tensor(xj, state.observer_enabled, state.fake_quant_enabled,
                                 running_min_op, running_max_op, scale, zero_point, avg_const)
        np.testing.assert_array_equal(out, out_ref)
        np.testing.assert_array_equal(running_min_op, state.activation_post_process.min_val)
        np.testing.assert_array_equal(running_max_op, state.activation_post_process.max_val)
        t_mod = tfq.FusedMovingAvgObsFakeQuantize()
        assert_bits(out, t_mod(x))
        assert_bits(state.scale, t_mod.scale)
        assert_bits(state.zero_point, t_mod.zero_point)

    def test_fused_obs_fq_moving_avg_module(self):
        torch.manual_seed(11)
        running_min_op, running_max_op = jnp.float32(jnp.inf), jnp.float32(-jnp.inf)
        avg_const = 0.001
        scale, zero_point = jnp.array([1.0]), jnp.array([0], jnp.int32)
        mod = jq.FusedMovingAvgObsFakeQuantize(averaging_constant=0.001)
        state = mod.init()
        state = state._replace(observer_enabled=state.observer_enabled.at[0].set(0),
                               fake_quant_enabled=state.fake_quant_enabled.at[0].set(0))
        t_mod = tfq.FusedMovingAvgObsFakeQuantize(averaging_constant=0.001)
        t_mod.observer_enabled[0] = 0
        t_mod.fake_quant_enabled[0] = 0
        apply = jax.jit(mod.apply)
        for i in range(10):
            x = _randn(5, 5)
            xj = jnp.asarray(x.numpy())
            if i > 2:
                state = state._replace(observer_enabled=state.observer_enabled.at[0].set(1))
                t_mod.observer_enabled[0] = 1
            if i > 4:
                state = state._replace(fake_quant_enabled=state.fake_quant_enabled.at[0].set(1))
                t_mod.fake_quant_enabled[0] = 1
            out, state = apply(state, xj)  # the module
            out_ref, running_min_op, running_max_op, scale, zero_point = \
                _fused_op_per_tensor(  # the op directly
                    xj, state.observer_enabled, state.fake_quant_enabled, running_min_op,
                    running_max_op, scale, zero_point, avg_const)
            np.testing.assert_array_equal(out, out_ref)
            np.testing.assert_array_equal(running_min_op, state.activation_post_process.min_val)
            np.testing.assert_array_equal(running_max_op, state.activation_post_process.max_val)
            t_out = t_mod(x)
            assert_bits(out, t_out, f"step {i}")
            assert_bits(state.activation_post_process.min_val, t_mod.activation_post_process.min_val)
            assert_bits(state.activation_post_process.max_val, t_mod.activation_post_process.max_val)
            assert_bits(state.scale, t_mod.scale)
            assert_bits(state.zero_point, t_mod.zero_point)

    def test_compare_fused_obs_fq_oss_module(self):
        torch.manual_seed(12)
        mod = jq.FusedMovingAvgObsFakeQuantize()
        state = jq.enable_observer(jq.enable_fake_quant(mod.init()))
        mod_ref = jq.FakeQuantize()
        state_ref = jq.enable_observer(jq.enable_fake_quant(mod_ref.init()))
        t_mod = tfq.FusedMovingAvgObsFakeQuantize()
        apply, apply_ref = jax.jit(mod.apply), jax.jit(mod_ref.apply)
        for _ in range(10):
            x = _randn(5, 5)
            xj = jnp.asarray(x.numpy())
            out, state = apply(state, xj)
            out_ref, state_ref = apply_ref(state_ref, xj)
            np.testing.assert_allclose(out, out_ref, rtol=1.3e-6, atol=1e-5)  # assert_close
            np.testing.assert_allclose(state_ref.activation_post_process.min_val,
                                       state.activation_post_process.min_val, rtol=1.3e-6,
                                       atol=1e-5)
            np.testing.assert_allclose(state_ref.activation_post_process.max_val,
                                       state.activation_post_process.max_val, rtol=1.3e-6,
                                       atol=1e-5)
            assert_bits(out, t_mod(x))

    def test_fused_mod_per_channel(self):
        torch.manual_seed(13)
        m, n = 5, 10
        running_min_op = jnp.full((m,), jnp.inf, jnp.float32)
        running_max_op = jnp.full((m,), -jnp.inf, jnp.float32)
        avg_const = 0.001
        scale = jnp.full((m,), 0.1, jnp.float32)
        zero_point = jnp.zeros((m,), jnp.int32)
        obs = jq.FusedMovingAvgObsFakeQuantize.with_args(
            averaging_constant=avg_const, observer=jq.MovingAveragePerChannelMinMaxObserver)
        mod = obs()
        state = mod.init(jax.ShapeDtypeStruct((m, n), jnp.float32))
        mod_apply = jax.jit(mod.apply)  # torch.jit.script(mod)
        t_mod = torch.jit.script(tfq.FusedMovingAvgObsFakeQuantize.with_args(
            averaging_constant=avg_const, observer=tobs.MovingAveragePerChannelMinMaxObserver)())
        for i in range(10):
            x = _randn(m, n)
            xj = jnp.asarray(x.numpy())
            if i > 2:
                state = state._replace(observer_enabled=state.observer_enabled.at[0].set(1))
            if i > 4:
                state = state._replace(fake_quant_enabled=state.fake_quant_enabled.at[0].set(1))
            out, state = mod_apply(state, xj)
            out_ref, running_min_op, running_max_op, scale, zero_point = \
                _fused_op_per_channel(
                    xj, state.observer_enabled, state.fake_quant_enabled, running_min_op,
                    running_max_op, scale, zero_point, avg_const)
            np.testing.assert_array_equal(out, out_ref)
            if int(state.observer_enabled[0]):
                np.testing.assert_array_equal(running_min_op, state.activation_post_process.min_val)
                np.testing.assert_array_equal(running_max_op, state.activation_post_process.max_val)
            if int(state.fake_quant_enabled[0]):
                np.testing.assert_array_equal(scale, state.scale)
                np.testing.assert_array_equal(zero_point, state.zero_point)
            assert_bits(out, t_mod(x), f"step {i}")
        sd = mod.state_dict(state)
        np.testing.assert_array_equal(sd["activation_post_process.min_val"], running_min_op)
        np.testing.assert_array_equal(sd["activation_post_process.max_val"], running_max_op)
        for key, value in t_mod.state_dict().items():
            assert_bits(sd[key], value, key)

    def test_fused_mod_reduce_range(self):
        obs = jq.FusedMovingAvgObsFakeQuantize(quant_min=0, quant_max=255, dtype=jq.quint8,
                                               reduce_range=True)
        assert obs.activation_post_process.quant_min == 0
        assert obs.activation_post_process.quant_max == 127

    @pytest.mark.parametrize("qconfig_name", ["default_embedding_qat_qconfig",
                                              "default_embedding_qat_qconfig_4bit"])
    def test_embedding_bag_qat_config(self, qconfig_name):
        qconfig = getattr(jq, qconfig_name)
        rng = np.random.default_rng(6)
        for _ in ("emb1", "emb2"):  # two EmbeddingBag(10, 12) weights
            weight = jnp.asarray(rng.standard_normal((10, 12)).astype(np.float32))
            weight_fake_quant = qconfig.weight()
            assert type(weight_fake_quant) is jq.FakeQuantize
            state = weight_fake_quant.init(weight)
            _, state = jax.jit(weight_fake_quant.apply)(state, weight)
            assert state.zero_point.dtype == jnp.float32
            assert state.zero_point.shape == (10,)
        # the converted modules' dtype is the qconfig weight's dtype
        assert qconfig.weight().dtype == (jq.quint8 if qconfig_name.endswith("qconfig")
                                          else jq.quint4x2)
        assert isinstance(qconfig.activation(), jq.NoopObserver)
        assert qconfig.activation().dtype == jnp.float32

    @pytest.mark.parametrize("qengine", ["x86", "fbgemm", "qnnpack", "onednn"])
    def test_embedding_qat_config(self, qengine):
        emb_weight_fq = jq.default_embedding_qat_qconfig.weight()
        assert type(emb_weight_fq) is jq.FakeQuantize
        w = jnp.asarray(np.random.default_rng(7).standard_normal((10, 12)).astype(np.float32))
        _, st_emb = jax.jit(emb_weight_fq.apply)(emb_weight_fq.init(w), w)
        assert st_emb.zero_point.dtype == jnp.float32
        assert isinstance(jq.default_embedding_qat_qconfig.activation(), jq.NoopObserver)
        linear_qconfig = jq.get_default_qat_qconfig(qengine)
        assert type(linear_qconfig.weight()) is jq.FusedMovingAvgObsFakeQuantize
        assert type(linear_qconfig.activation()) is jq.FusedMovingAvgObsFakeQuantize

    @pytest.mark.parametrize("qengine", ["fbgemm", "qnnpack"])
    def test_default_fused_qat_config(self, qengine):
        qconfig = jq.get_default_qat_qconfig(qengine, version=1)
        quant_fq = qconfig.activation()  # QuantWrapper's quant stub
        weight_fake_quant = qconfig.weight()  # linear.weight_fake_quant
        out_fq = qconfig.activation()  # linear's activation_post_process
        fake_quants = [quant_fq, weight_fake_quant, out_fq]
        assert len(fake_quants) == 3
        for mod in fake_quants:
            assert type(mod) is jq.FusedMovingAvgObsFakeQuantize
        if qengine == "fbgemm":
            lower_bnd, upper_bnd = 0, 127
            obs2match = jq.MovingAveragePerChannelMinMaxObserver
        else:
            lower_bnd, upper_bnd = 0, 255
            obs2match = jq.MovingAverageMinMaxObserver
        assert quant_fq.activation_post_process.quant_min == lower_bnd
        assert quant_fq.activation_post_process.quant_max == upper_bnd
        assert type(weight_fake_quant.activation_post_process) is obs2match
        # a functional Linear(2, 2) + ReLU with those fake quants runs, as torch's does
        rng = np.random.default_rng(8)
        w = jnp.asarray(rng.standard_normal((2, 2)).astype(np.float32))
        b = jnp.zeros(2, jnp.float32)
        sample_input = jnp.asarray(rng.standard_normal((2, 2)).astype(np.float32))
        states = [quant_fq.init(sample_input), weight_fake_quant.init(w), out_fq.init(sample_input)]

        @jax.jit
        def ref_model(states, x):
            xq, s0 = quant_fq(states[0], x)
            wq, s1 = weight_fake_quant(states[1], w)
            y, s2 = out_fq(states[2], jax.nn.relu(xq @ wq.T + b))
            return y, [s0, s1, s2]

        y, states = ref_model(states, sample_input)
        assert y.shape == (2, 2)
        t_qconfig = torch.ao.quantization.get_default_qat_qconfig(qengine, version=1)
        t_act, t_wt = t_qconfig.activation(), t_qconfig.weight()
        assert_bits(jax.jit(quant_fq.apply)(quant_fq.init(sample_input), sample_input)[0],
                    t_act(torch.from_numpy(np.asarray(sample_input))))
        assert_bits(states[1].scale, (t_wt(torch.from_numpy(np.asarray(w))), t_wt.scale)[1])
