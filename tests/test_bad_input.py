"""Bad input: invalid configs, misuse, broken state dicts, NaN / inf / empty / extreme data.

Rules checked here (torch 2.13 is the oracle wherever it defines the behaviour):

* Every constructor argument of every observer / fake-quant class, ``QConfig``,
  ``get_default_qconfig`` and ``get_default_qat_qconfig``: an invalid value raises
  ``ValueError`` at construction and the message names the argument (an unknown keyword is
  Python's ``TypeError``, naming it). Where torch also rejects the config it is checked to.
* Misuse at run time (per-channel input of rank 1, ``ch_axis`` out of range, a changed
  channel count, a state that is ``None`` or made by another observer, a shape the
  RecordingObserver did not record) raises ``ValueError`` with a clear message, eagerly and
  under ``jit``.
* ``load_state_dict`` with missing / unexpected keys or wrong shapes raises
  ``jquant.StateDictError`` (a ``ValueError``) naming the key.
* NaN, +-inf, empty, huge, integer and float64 inputs give bit-identical states, qparams,
  outputs and gradients to torch for observers, fake-quant ops, the fused op and modules.

Deviations from torch, each named in a jquant docstring and tested below (``test_deviation_*``):

1. Subnormals (``jquant.observers`` / ``jquant.fake_quant_ops`` docstrings): XLA on CPU
   flushes float32 subnormals to zero. An observer fed ``[0, 0, 4.58e-41, 4.58e-41]``
   stores ``max_val == 0.0`` where torch stores ``4.58e-41``; the qparams are identical
   (``eps``, 0), and so are the fused op's (0.1, 0). A subnormal input is fake-quantized as
   0 even when ``x / scale`` would round to a nonzero level (``x = 1e-38, scale = 1.5e-38``:
   torch 1.5e-38, jquant 0).
2. Unchecked zero points (``jquant.fake_quant_ops``): a zero point outside
   ``[quant_min, quant_max]`` is used as given (torch raises RuntimeError). This includes the
   per-channel fused op on a NaN / inf row, whose zero point is INT32_MIN: torch raises,
   jquant returns that row as NaN / inf and the other rows exactly as torch would.
3. ``LearnableFakeQuantize`` with a NaN zero point: ``calculate_qparams`` gives INT32_MIN
   (torch INT64_MIN; jquant zero points are int32); its forward gives NaN (torch raises).
4. Per-channel observers start at ``(C,)`` of +-inf, not empty; unobserved channels give
   ``(1.0, 0)`` where torch's calculate_qparams raises for (+inf, -inf) vectors.
5. ``min_val > max_val`` raises ``ValueError`` for concrete states only (not under jit).
6. ``jnp.uint8`` is torch's quint8: symmetric + ``reduce_range`` is rejected for it although
   torch accepts it for ``torch.uint8``.
7. Stricter validation than torch: ``eps <= 0`` / non-finite, ``averaging_constant`` outside
   ``(0, 1]``, a non-positive or non-finite ``scale``, non-integral integer arguments,
   ``FakeQuantize`` with an observer that has no range (torch fails later, in forward).
8. ``load_state_dict`` keeps the given ``eps``; torch resets it to 2**-23 when the dict has
   no version metadata (a plain dict).
9. (No longer a deviation: ``quantize_per_tensor`` / ``quantize_per_channel`` map NaN as
   torch's x86 kernels do; see ``tests/test_parity_ops.py``.)
"""
from __future__ import annotations

import collections
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.ao.quantization import fake_quantize as tfq
from torch.ao.quantization import observer as tobs
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

import jquant as jq
from jquant import StateDictError

warnings.filterwarnings("ignore", category=UserWarning)

INF, NAN = np.inf, np.nan
EPS = float(np.finfo(np.float32).eps)
TORCH_DTYPE = {"uint8": torch.quint8, "int8": torch.qint8, "int32": torch.qint32,
               "uint4": torch.quint4x2}


def bits(a):
    """Comparable bits: float32 bit patterns (all NaNs alike), integers as int64."""
    a = np.asarray(a.detach().numpy() if hasattr(a, "detach") else a)
    if a.dtype.kind == "f":
        a = a.astype(np.float32)
        out = a.view(np.uint32).copy()
        out[np.isnan(a)] = 0x7FC00000
        return out
    return a.astype(np.int64)


def assert_same(jax_value, torch_value, what=""):
    j, t = bits(jax_value), bits(torch_value)
    assert j.shape == t.shape, (what, j.shape, t.shape)
    np.testing.assert_array_equal(j, t, err_msg=what)


# =======================================================================================
# 1. Construction: every argument of every class
# =======================================================================================

MM, MA = jq.MinMaxObserver, jq.MovingAverageMinMaxObserver
PC, MAPC = jq.PerChannelMinMaxObserver, jq.MovingAveragePerChannelMinMaxObserver
FQ, FUSED = jq.FakeQuantize, jq.FusedMovingAvgObsFakeQuantize
LFQ = jq.LearnableFakeQuantize

# (id, constructor, argument the message must name, torch counterpart or None when torch
# accepts the config: a documented stricter check, deviation 7)
INVALID = [
    # --- uniform observers: dtype / qscheme / reduce_range ---
    ("mm-dtype-float16", lambda: MM(dtype=jnp.float16), "dtype",
     lambda: tobs.MinMaxObserver(dtype=torch.float16)),
    ("mm-dtype-float32", lambda: MM(dtype=jnp.float32), "dtype",
     lambda: tobs.MinMaxObserver(dtype=torch.float32)),
    ("mm-dtype-name", lambda: MM(dtype="bogus"), "dtype", None),
    ("mm-dtype-none", lambda: MM(dtype=None), "dtype", None),
    ("mm-qscheme-per-channel", lambda: MM(qscheme=jq.per_channel_affine), "qscheme",
     lambda: tobs.MinMaxObserver(qscheme=torch.per_channel_affine)),
    ("mm-qscheme-name", lambda: MM(qscheme="bogus"), "qscheme", None),
    ("mm-qscheme-none", lambda: MM(qscheme=None), "qscheme", None),
    ("mm-sym-rr-quint8", lambda: MM(qscheme=jq.per_tensor_symmetric, reduce_range=True),
     "reduce_range",
     lambda: tobs.MinMaxObserver(qscheme=torch.per_tensor_symmetric, reduce_range=True)),
    ("ma-sym-rr-quint8", lambda: MA(qscheme=jq.per_tensor_symmetric, reduce_range=True),
     "reduce_range",
     lambda: tobs.MovingAverageMinMaxObserver(qscheme=torch.per_tensor_symmetric,
                                              reduce_range=True)),
    ("pc-sym-rr-quint8", lambda: PC(qscheme=jq.per_channel_symmetric, reduce_range=True),
     "reduce_range",
     lambda: tobs.PerChannelMinMaxObserver(qscheme=torch.per_channel_symmetric,
                                           reduce_range=True)),
    ("mapc-sym-rr-quint8", lambda: MAPC(qscheme=jq.per_channel_symmetric, reduce_range=True),
     "reduce_range",
     lambda: tobs.MovingAveragePerChannelMinMaxObserver(qscheme=torch.per_channel_symmetric,
                                                        reduce_range=True)),
    # --- quant_min / quant_max ---
    ("mm-range-excludes-0-pos", lambda: MM(quant_min=1, quant_max=255), "quant_min",
     lambda: tobs.MinMaxObserver(quant_min=1, quant_max=255)),
    ("mm-range-excludes-0-neg", lambda: MM(dtype=jq.qint8, quant_min=-5, quant_max=-1),
     "quant_min", lambda: tobs.MinMaxObserver(dtype=torch.qint8, quant_min=-5, quant_max=-1)),
    ("mm-range-not-strict", lambda: MM(quant_min=0, quant_max=0), "quant_min",
     lambda: tobs.MinMaxObserver(quant_min=0, quant_max=0)),
    ("mm-range-qint8-too-wide", lambda: MM(dtype=jq.qint8, quant_min=-128, quant_max=128),
     "quant_min", lambda: tobs.MinMaxObserver(dtype=torch.qint8, quant_min=-128, quant_max=128)),
    ("mm-range-qint8-much-too-wide", lambda: MM(dtype=jq.qint8, quant_min=-200, quant_max=100),
     "quant_min", lambda: tobs.MinMaxObserver(dtype=torch.qint8, quant_min=-200, quant_max=100)),
    ("mm-range-qint32-too-wide",
     lambda: MM(dtype=jq.qint32, quant_min=-2 ** 31, quant_max=2 ** 31), "quant_min",
     lambda: tobs.MinMaxObserver(dtype=torch.qint32, quant_min=-2 ** 31, quant_max=2 ** 31)),
    ("pc-range-excludes-0", lambda: PC(quant_min=2, quant_max=200), "quant_min",
     lambda: tobs.PerChannelMinMaxObserver(quant_min=2, quant_max=200)),
    ("mm-quant-min-str", lambda: MM(quant_min="a", quant_max=3), "quant_min", None),
    ("mm-quant-max-fraction", lambda: MM(quant_min=0, quant_max=127.5), "quant_max", None),
    # --- eps ---
    ("mm-eps-zero", lambda: MM(eps=0.0), "eps", None),
    ("mm-eps-negative", lambda: MM(eps=-1e-3), "eps", None),
    ("mm-eps-nan", lambda: MM(eps=float("nan")), "eps", None),
    ("mm-eps-inf", lambda: MM(eps=float("inf")), "eps", None),
    ("mm-eps-str", lambda: MM(eps="abc"), "eps", None),
    ("pc-eps-zero", lambda: PC(eps=0.0), "eps", None),
    # --- averaging_constant / is_dynamic ---
    ("ma-c-zero", lambda: MA(averaging_constant=0.0), "averaging_constant", None),
    ("ma-c-negative", lambda: MA(averaging_constant=-0.5), "averaging_constant", None),
    ("ma-c-above-1", lambda: MA(averaging_constant=1.5), "averaging_constant", None),
    ("ma-c-nan", lambda: MA(averaging_constant=float("nan")), "averaging_constant", None),
    ("ma-c-str", lambda: MA(averaging_constant="a"), "averaging_constant", None),
    ("ma-dynamic-needs-c1", lambda: MA(averaging_constant=0.01, is_dynamic=True),
     "averaging_constant",
     lambda: tobs.MovingAverageMinMaxObserver(averaging_constant=0.01, is_dynamic=True)),
    ("mapc-c-zero", lambda: MAPC(averaging_constant=0.0), "averaging_constant", None),
    ("mapc-c-above-1", lambda: MAPC(averaging_constant=2.0), "averaging_constant", None),
    ("pc-dynamic", lambda: PC(is_dynamic=True), "is_dynamic",
     lambda: tobs.PerChannelMinMaxObserver(is_dynamic=True)),
    ("mapc-dynamic", lambda: MAPC(averaging_constant=1.0, is_dynamic=True), "is_dynamic",
     lambda: tobs.MovingAveragePerChannelMinMaxObserver(averaging_constant=1.0,
                                                        is_dynamic=True)),
    # --- ch_axis / per-channel qscheme ---
    ("pc-qscheme-per-tensor", lambda: PC(qscheme=jq.per_tensor_affine), "qscheme",
     lambda: tobs.PerChannelMinMaxObserver(qscheme=torch.per_tensor_affine)),
    ("mapc-qscheme-per-tensor", lambda: MAPC(qscheme=jq.per_tensor_symmetric), "qscheme",
     lambda: tobs.MovingAveragePerChannelMinMaxObserver(qscheme=torch.per_tensor_symmetric)),
    ("pc-ch-axis-str", lambda: PC(ch_axis="a"), "ch_axis", None),
    ("pc-ch-axis-fraction", lambda: PC(ch_axis=1.5), "ch_axis", None),
    ("mapc-ch-axis-none", lambda: MAPC(ch_axis=None), "ch_axis", None),
    # --- FixedQParamsObserver ---
    ("fixed-scale-zero", lambda: jq.FixedQParamsObserver(0.0, 0), "scale", None),
    ("fixed-scale-negative", lambda: jq.FixedQParamsObserver(-0.1, 0), "scale", None),
    ("fixed-scale-nan", lambda: jq.FixedQParamsObserver(float("nan"), 0), "scale", None),
    ("fixed-scale-inf", lambda: jq.FixedQParamsObserver(float("inf"), 0), "scale", None),
    ("fixed-scale-str", lambda: jq.FixedQParamsObserver("a", 0), "scale", None),
    ("fixed-zp-str", lambda: jq.FixedQParamsObserver(0.1, "a"), "zero_point", None),
    ("fixed-zp-fraction", lambda: jq.FixedQParamsObserver(0.1, 0.5), "zero_point", None),
    ("fixed-dtype", lambda: jq.FixedQParamsObserver(0.1, 0, dtype="bogus"), "dtype", None),
    ("fixed-qscheme-per-channel",
     lambda: jq.FixedQParamsObserver(0.1, 0, qscheme=jq.per_channel_affine), "qscheme", None),
    ("fixed-qscheme-name", lambda: jq.FixedQParamsObserver(0.1, 0, qscheme="x"), "qscheme",
     None),
    ("fixed-range-reversed", lambda: jq.FixedQParamsObserver(0.1, 0, quant_min=10, quant_max=2),
     "quant_min", None),
    ("fixed-quant-max-str", lambda: jq.FixedQParamsObserver(0.1, 0, quant_max="z"),
     "quant_max", None),
    ("fixed-dynamic", lambda: jq.FixedQParamsObserver(0.1, 0, is_dynamic=True), "is_dynamic",
     lambda: tobs.FixedQParamsObserver(0.1, 0, is_dynamic=True)),
    # --- Placeholder / Noop / Recording ---
    ("placeholder-dtype", lambda: jq.PlaceholderObserver(dtype="bogus"), "dtype", None),
    ("placeholder-qscheme", lambda: jq.PlaceholderObserver(qscheme="bogus"), "qscheme", None),
    ("placeholder-eps", lambda: jq.PlaceholderObserver(eps="a"), "eps", None),
    ("noop-dtype", lambda: jq.NoopObserver(dtype="bogus"), "dtype", None),
    ("recording-dtype", lambda: jq.RecordingObserver(dtype="bogus"), "dtype", None),
    ("recording-capacity-zero", lambda: jq.RecordingObserver(capacity=0), "capacity", None),
    ("recording-capacity-str", lambda: jq.RecordingObserver(capacity="a"), "capacity", None),
    # --- FakeQuantize ---
    ("fq-range-reversed", lambda: FQ(quant_min=5, quant_max=3), "quant_min",
     lambda: tfq.FakeQuantize(quant_min=5, quant_max=3)),
    ("fq-range-equal", lambda: FQ(quant_min=0, quant_max=0), "quant_min",
     lambda: tfq.FakeQuantize(quant_min=0, quant_max=0)),
    ("fq-quant-max-out-of-bound", lambda: FQ(quant_min=0, quant_max=300), "quant_max",
     lambda: tfq.FakeQuantize(quant_min=0, quant_max=300)),
    ("fq-quant-min-out-of-bound", lambda: FQ(quant_min=-1, quant_max=255), "quant_min",
     lambda: tfq.FakeQuantize(quant_min=-1, quant_max=255)),
    ("fq-qint8-quant-max-out-of-bound", lambda: FQ(quant_min=0, quant_max=255, dtype=jq.qint8),
     "quant_max", lambda: tfq.FakeQuantize(quant_min=0, quant_max=255, dtype=torch.qint8)),
    ("fq-factory-dtype-out-of-bound",
     lambda: FQ(MA.with_args(dtype=jq.qint8), quant_min=0, quant_max=255), "quant_max",
     lambda: tfq.FakeQuantize(tobs.MovingAverageMinMaxObserver.with_args(dtype=torch.qint8),
                              quant_min=0, quant_max=255)),
    ("fq-range-excludes-0", lambda: FQ(quant_min=2, quant_max=200), "quant_min",
     lambda: tfq.FakeQuantize(quant_min=2, quant_max=200)),
    ("fq-quant-min-str", lambda: FQ(quant_min="a", quant_max=3), "quant_min", None),
    ("fq-observer-instance", lambda: FQ(observer=MA()), "observer", None),
    ("fq-observer-not-callable", lambda: FQ(observer=42), "observer", None),
    ("fq-observer-builds-other", lambda: FQ(observer=lambda **kw: object()), "observer", None),
    ("fq-observer-without-range", lambda: FQ(observer=jq.PlaceholderObserver), "observer",
     None),
    ("fq-dynamic-default-observer", lambda: FQ(is_dynamic=True), "averaging_constant",
     lambda: tfq.FakeQuantize(is_dynamic=True)),
    ("fq-dtype", lambda: FQ(dtype=jnp.float16), "dtype",
     lambda: tfq.FakeQuantize(dtype=torch.float16)),
    ("fq-qscheme", lambda: FQ(qscheme="bogus"), "qscheme", None),
    ("fq-ch-axis", lambda: FQ(MAPC, ch_axis="x"), "ch_axis", None),
    ("fq-averaging-constant", lambda: FQ(averaging_constant=-1.0), "averaging_constant", None),
    ("fq-eps", lambda: FQ(eps=0.0), "eps", None),
    # --- FusedMovingAvgObsFakeQuantize ---
    ("fused-observer-minmax", lambda: FUSED(observer=MM), "observer",
     lambda: tfq.FusedMovingAvgObsFakeQuantize(observer=tobs.MinMaxObserver)),
    ("fused-observer-per-channel-minmax", lambda: FUSED(observer=PC,
                                                        qscheme=jq.per_channel_symmetric),
     "observer", lambda: tfq.FusedMovingAvgObsFakeQuantize(
         observer=tobs.PerChannelMinMaxObserver, qscheme=torch.per_channel_symmetric)),
    ("fused-ch-axis-1", lambda: FUSED(observer=MAPC, ch_axis=1), "ch_axis", None),
    ("fused-quant-max-out-of-bound", lambda: FUSED(quant_min=0, quant_max=300), "quant_max",
     lambda: tfq.FusedMovingAvgObsFakeQuantize(quant_min=0, quant_max=300)),
    ("fused-qint8-out-of-bound", lambda: FUSED(dtype=jq.qint8), "quant_max",
     lambda: tfq.FusedMovingAvgObsFakeQuantize(dtype=torch.qint8)),
    ("fused-averaging-constant", lambda: FUSED(averaging_constant=0.0), "averaging_constant",
     None),
    # --- FixedQParamsFakeQuantize ---
    ("fixedfq-observer-minmax", lambda: jq.FixedQParamsFakeQuantize(MM), "observer",
     lambda: tfq.FixedQParamsFakeQuantize(tobs.MinMaxObserver)),
    ("fixedfq-observer-instance",
     lambda: jq.FixedQParamsFakeQuantize(jq.FixedQParamsObserver(0.1, 0)), "observer", None),
    # --- LearnableFakeQuantize ---
    ("lfq-range-equal", lambda: LFQ(MA, quant_min=3, quant_max=3), "quant_min",
     lambda: _LearnableFakeQuantize(tobs.MovingAverageMinMaxObserver, quant_min=3, quant_max=3)),
    ("lfq-quant-min-out-of-bound", lambda: LFQ(MA, quant_min=-1, quant_max=255), "quant_min",
     lambda: _LearnableFakeQuantize(tobs.MovingAverageMinMaxObserver, quant_min=-1,
                                    quant_max=255)),
    ("lfq-quant-max-out-of-bound", lambda: LFQ(MA, quant_min=0, quant_max=256), "quant_max",
     lambda: _LearnableFakeQuantize(tobs.MovingAverageMinMaxObserver, quant_min=0,
                                    quant_max=256)),
    ("lfq-quant-max-str", lambda: LFQ(MA, quant_max="x"), "quant_max", None),
    ("lfq-scale-zero", lambda: LFQ(MA, scale=0.0), "scale", None),
    ("lfq-scale-nan", lambda: LFQ(MA, scale=float("nan")), "scale", None),
    ("lfq-scale-str", lambda: LFQ(MA, scale="a"), "scale", None),
    ("lfq-zero-point-nan", lambda: LFQ(MA, zero_point=float("nan")), "zero_point", None),
    ("lfq-zero-point-str", lambda: LFQ(MA, zero_point="a"), "zero_point", None),
    ("lfq-channel-len-zero", lambda: LFQ(MA, channel_len=0), "channel_len", None),
    ("lfq-channel-len-negative", lambda: LFQ(MA, channel_len=-2), "channel_len", None),
    ("lfq-channel-len-str", lambda: LFQ(MA, channel_len="a"), "channel_len", None),
    ("lfq-observer-instance", lambda: LFQ(MA()), "observer", None),
    ("lfq-dtype", lambda: LFQ(MA, dtype=jnp.float16), "dtype", None),
    # --- QConfig and the default getters ---
    ("qconfig-activation-instance", lambda: jq.QConfig(MM(), MM), "activation",
     lambda: torch.ao.quantization.QConfig(tobs.MinMaxObserver(), tobs.MinMaxObserver)),
    ("qconfig-weight-instance", lambda: jq.QConfig(MM, jq.default_weight_fake_quant()),
     "weight", lambda: torch.ao.quantization.QConfig(
         tobs.MinMaxObserver, torch.ao.quantization.default_weight_fake_quant())),
    ("get-default-qconfig-backend", lambda: jq.get_default_qconfig("tpu"), "backend",
     lambda: torch.ao.quantization.get_default_qconfig("tpu")),
    ("get-default-qconfig-version", lambda: jq.get_default_qconfig("x86", 1), "version",
     lambda: torch.ao.quantization.get_default_qconfig("x86", 1)),
    ("get-default-qat-qconfig-backend", lambda: jq.get_default_qat_qconfig("cuda"), "backend",
     lambda: torch.ao.quantization.get_default_qat_qconfig("cuda")),
    ("get-default-qat-qconfig-version", lambda: jq.get_default_qat_qconfig("fbgemm", 2),
     "version", lambda: torch.ao.quantization.get_default_qat_qconfig("fbgemm", 2)),
    ("get-default-qat-qconfig-version-neg", lambda: jq.get_default_qat_qconfig("qnnpack", -1),
     "version", lambda: torch.ao.quantization.get_default_qat_qconfig("qnnpack", -1)),
]


@pytest.mark.parametrize("ctor,argname,torch_ctor", [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_invalid_config_raises_value_error_naming_argument(ctor, argname, torch_ctor):
    with pytest.raises(ValueError, match=re.escape(argname)):
        ctor()
    if torch_ctor is not None:  # torch rejects it too (AssertionError, NotImplementedError ...)
        with pytest.raises(Exception):
            torch_ctor()


def test_unknown_keyword_is_a_type_error_naming_it():
    for ctor in (lambda: MM(bogus=1), lambda: FQ(bogus=1), lambda: FUSED(bogus=1),
                 lambda: LFQ(MA, bogus=1), lambda: MM.with_args(bogus=1)()):
        with pytest.raises(TypeError, match="bogus"):
            ctor()


def test_configs_torch_accepts_are_accepted():
    """Edge configs torch accepts work the same way (range rules of REFERENCE 1.1/1.2, 4.1)."""
    only_min = MM(quant_min=5)  # one bound alone is ignored
    assert (only_min.quant_min, only_min.quant_max, only_min.has_customized_qrange) == (0, 255, False)
    only_max = MM(dtype=jq.qint8, quant_max=5)
    assert (only_max.quant_min, only_max.quant_max) == (-128, 127)
    wide = MM(quant_min=0, quant_max=1000)  # no width check for quint8
    assert (wide.quant_min, wide.quant_max) == (0, 1000)
    assert MM(dtype=jnp.int16, quant_min=-100000, quant_max=100000).quant_max == 100000
    assert MM(dtype=jq.qint32, quant_min=-2 ** 31, quant_max=2 ** 31 - 1).quant_max == 2 ** 31 - 1
    assert MM(is_dynamic=True).is_dynamic  # MinMaxObserver accepts is_dynamic
    assert MA(averaging_constant=1, is_dynamic=True).is_dynamic
    assert MM(quant_min=0.0, quant_max=127.0).quant_max == 127  # integral floats
    hist_sym_rr = MM(dtype=jq.qint8, qscheme=jq.per_tensor_symmetric, reduce_range=True)
    assert (hist_sym_rr.quant_min, hist_sym_rr.quant_max) == (-64, 63)
    # quint4x2's torch.iinfo is 8-bit, so FakeQuantize accepts [0, 16] for it (as torch)
    assert FQ(dtype=jq.quint4x2, quant_min=0, quant_max=16).quant_max == 16
    tfq.FakeQuantize(dtype=torch.quint4x2, quant_min=0, quant_max=16)
    # reduce_range halves a custom FakeQuantize range after the bound check
    rr = FQ(quant_min=0, quant_max=255, reduce_range=True)
    assert (rr.quant_min, rr.quant_max) == (0, 127)


def test_deviation_uint8_symmetric_reduce_range_rejected():
    """Deviation 6: torch accepts torch.uint8 (not quint8) with symmetric + reduce_range."""
    tobs.MinMaxObserver(dtype=torch.uint8, qscheme=torch.per_tensor_symmetric, reduce_range=True)
    with pytest.raises(ValueError, match="reduce_range"):
        MM(dtype=jnp.uint8, qscheme=jq.per_tensor_symmetric, reduce_range=True)
    # int8 is fine in both
    MM(dtype=jnp.int8, qscheme=jq.per_tensor_symmetric, reduce_range=True)


def test_deviation_stricter_validation_torch_accepts():
    """Deviation 7: configs torch builds silently, jquant rejects at construction."""
    tobs.MinMaxObserver(eps=0.0)
    tobs.MovingAverageMinMaxObserver(averaging_constant=1.5)
    tobs.FixedQParamsObserver(scale=-0.1, zero_point=0)
    tfq.FakeQuantize(observer=tobs.PlaceholderObserver)
    for ctor, arg in ((lambda: MM(eps=0.0), "eps"), (lambda: MA(averaging_constant=1.5),
                                                     "averaging_constant"),
                      (lambda: jq.FixedQParamsObserver(-0.1, 0), "scale"),
                      (lambda: FQ(observer=jq.PlaceholderObserver), "observer")):
        with pytest.raises(ValueError, match=arg):
            ctor()


# =======================================================================================
# 2. Misuse at run time
# =======================================================================================

X34 = jnp.arange(12.0).reshape(3, 4) - 5.0
X44 = jnp.arange(16.0).reshape(4, 4) - 7.0
PER_CHANNEL_OBSERVERS = [PC, MAPC]


@pytest.mark.parametrize("cls", PER_CHANNEL_OBSERVERS, ids=lambda c: c.__name__)
def test_per_channel_observer_rejects_1d_input(cls):
    obs = cls()
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        obs.init(jnp.ones(3))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        obs.update(obs.init(X34), jnp.ones(3))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        jax.jit(obs.update)(obs.init(X34), jnp.ones(3))
    with pytest.raises(IndexError):  # torch: IndexError
        getattr(tobs, cls.__name__)()(torch.ones(3))


@pytest.mark.parametrize("cls", PER_CHANNEL_OBSERVERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("ch_axis", [2, 5, -3])
def test_per_channel_observer_ch_axis_out_of_range(cls, ch_axis):
    obs = cls(ch_axis=ch_axis)
    with pytest.raises(ValueError, match=f"ch_axis={ch_axis}"):
        obs.init(X34)
    with pytest.raises(ValueError, match=f"ch_axis={ch_axis}"):
        obs.update(obs.init(num_channels=3), X34)
    with pytest.raises(IndexError):  # torch: IndexError
        getattr(tobs, cls.__name__)(ch_axis=ch_axis)(torch.ones(3, 4))


@pytest.mark.parametrize("cls", PER_CHANNEL_OBSERVERS, ids=lambda c: c.__name__)
def test_per_channel_observer_channel_count_change(cls):
    obs = cls()
    state = obs.update(obs.init(X34), X34)
    for update in (obs.update, jax.jit(obs.update)):
        with pytest.raises(ValueError, match="4 channels .* state has 3"):
            update(state, X44)
    t = getattr(tobs, cls.__name__)()
    t(torch.ones(3, 4))
    with pytest.raises(RuntimeError):  # torch: size mismatch RuntimeError
        t(torch.ones(4, 4))


@pytest.mark.parametrize("fq", [
    lambda: jq.default_per_channel_weight_fake_quant(),
    lambda: jq.default_fused_per_channel_wt_fake_quant(),
    lambda: jq.default_embedding_fake_quant(),
    lambda: LFQ(MAPC, quant_min=-128, quant_max=127, dtype=jq.qint8,
                qscheme=jq.per_channel_symmetric),
], ids=["fake_quantize", "fused", "embedding", "learnable"])
def test_per_channel_fake_quantize_channel_count_change(fq):
    fq = fq()
    _, state = fq.apply(fq.init(X34), X34)
    with pytest.raises(ValueError, match="channels"):
        fq.apply(state, X44)
    with pytest.raises(ValueError, match="channels"):
        jax.jit(fq.apply)(state, X44)


OBSERVER_FACTORIES = {
    "MinMaxObserver": MM, "MovingAverageMinMaxObserver": MA, "PerChannelMinMaxObserver": PC,
    "MovingAveragePerChannelMinMaxObserver": MAPC,
    "FixedQParamsObserver": lambda: jq.FixedQParamsObserver(0.1, 0),
    "RecordingObserver": jq.RecordingObserver,
}
MODULE_FACTORIES = {
    "FakeQuantize": FQ, "FusedMovingAvgObsFakeQuantize": FUSED,
    "FixedQParamsFakeQuantize": jq.default_fixed_qparams_range_0to1_fake_quant,
    "LearnableFakeQuantize": lambda: LFQ(MA),
}


@pytest.mark.parametrize("name", sorted(OBSERVER_FACTORIES))
def test_observer_used_before_init_raises(name):
    obs = OBSERVER_FACTORIES[name]()
    with pytest.raises(ValueError, match="init()"):
        obs.update(None, X34)
    with pytest.raises(ValueError, match="init()"):
        obs.update({"min_val": 0.0}, X34)
    if name != "RecordingObserver":
        with pytest.raises(ValueError, match="init()"):
            obs.calculate_qparams(None)


@pytest.mark.parametrize("name", sorted(MODULE_FACTORIES))
def test_fake_quantize_used_before_init_raises(name):
    fq = MODULE_FACTORIES[name]()
    with pytest.raises(ValueError, match="init()"):
        fq.apply(None, X34)
    with pytest.raises(ValueError, match="init()"):  # an observer's state is not enough
        fq.apply(MM().init(), X34)


def test_state_from_another_observer_is_rejected():
    pt_state = MM().init()
    pc_state = PC().init(X34)
    for obs, state in ((MM(), pc_state), (MA(), pc_state), (PC(), pt_state), (MAPC(), pt_state)):
        with pytest.raises(ValueError, match="state"):
            obs.update(state, X34)
        with pytest.raises(ValueError, match="state"):
            jax.jit(obs.update)(state, X34)
    fq_pt, fq_pc = jq.default_fake_quant(), jq.default_per_channel_weight_fake_quant()
    with pytest.raises(ValueError, match="state"):
        fq_pt.apply(fq_pc.init(X34), X34)
    with pytest.raises(ValueError, match="state"):
        fq_pc.apply(fq_pt.init(), X34)
    fused_pt, fused_pc = jq.default_fused_act_fake_quant(), jq.default_fused_per_channel_wt_fake_quant()
    with pytest.raises(ValueError, match="state"):
        fused_pt.apply(fused_pc.init(X34), X34)
    with pytest.raises(ValueError, match="state"):
        fused_pc.apply(fused_pt.init(), X34)


def test_recording_observer_shape_change():
    obs = jq.RecordingObserver()
    state = obs.update(obs.init(), X34)
    with pytest.raises(ValueError, match="shape"):
        obs.update(state, X44)


def test_calculate_qparams_before_any_data_is_torch_default():
    """Observed nothing: (1.0, 0) like torch (which also warns)."""
    for cls, tcls in ((MM, tobs.MinMaxObserver), (MA, tobs.MovingAverageMinMaxObserver)):
        for dtype, qscheme in ((jq.quint8, jq.per_tensor_affine), (jq.qint8, jq.per_tensor_symmetric)):
            obs = cls(dtype=dtype, qscheme=qscheme)
            s, z = obs.calculate_qparams(obs.init())
            ts, tz = tcls(dtype=TORCH_DTYPE[np.dtype(dtype).name],
                          qscheme=getattr(torch, qscheme.value)).calculate_qparams()
            assert_same(s, ts)
            assert_same(z, tz)
            assert s.dtype == jnp.float32 and z.dtype == jnp.int32 and z.shape == (1,)
    for name in ("PlaceholderObserver", "NoopObserver", "RecordingObserver"):
        obs = getattr(jq, name)()
        with pytest.raises(NotImplementedError):
            obs.calculate_qparams(obs.init())
        with pytest.raises(Exception):
            getattr(tobs, name)().calculate_qparams()


def test_deviation_min_greater_than_max_checked_eagerly_only():
    """Deviation 5: torch asserts min <= max; jquant raises for concrete states only."""
    obs = MM()
    bad = obs.init()._replace(min_val=jnp.float32(3.0), max_val=jnp.float32(1.0))
    with pytest.raises(ValueError, match="less than or equal"):
        obs.calculate_qparams(bad)
    half = obs.init()._replace(min_val=jnp.float32(1.0))  # (1, -inf): torch asserts too
    with pytest.raises(ValueError, match="less than or equal"):
        obs.calculate_qparams(half)
    t = tobs.MinMaxObserver()
    t.min_val.fill_(3.0)
    t.max_val.fill_(1.0)
    with pytest.raises(AssertionError):
        t.calculate_qparams()
    s, z = jax.jit(obs.calculate_qparams)(bad)  # traced: not checked
    assert s.shape == (1,) and z.shape == (1,)


def test_deviation_unobserved_channels_give_default_qparams():
    """Deviation 4: the per-channel state starts at (C,) of +-inf, not empty."""
    obs = PC()
    state = obs.init(X34)
    assert state.min_val.shape == (3,) and bool(jnp.all(state.min_val == jnp.inf))
    s, z = obs.calculate_qparams(state)
    np.testing.assert_array_equal(s, np.ones(3, np.float32))
    np.testing.assert_array_equal(z, np.zeros(3, np.int32))
    # torch: empty buffers give the default; a vector of (+inf, -inf) raises
    t = tobs.PerChannelMinMaxObserver()
    assert t.min_val.shape == (0,)
    assert_same(s[:1], t.calculate_qparams()[0])
    t.min_val.resize_(3).fill_(INF)  # torch with jquant's unobserved (+inf, -inf) vectors
    t.max_val.resize_(3).fill_(-INF)
    with pytest.raises(AssertionError):
        t.calculate_qparams()
    # partly observed: observed channels get their qparams, the others the default
    mixed = state._replace(min_val=state.min_val.at[1].set(-1.0),
                           max_val=state.max_val.at[1].set(2.0))
    s, z = obs.calculate_qparams(mixed)
    assert float(s[0]) == 1.0 and float(s[2]) == 1.0 and float(s[1]) == pytest.approx(3 / 255)


def test_fake_quant_ops_reject_bad_arguments():
    with pytest.raises(ValueError, match="quant_min"):
        jq.fake_quantize_per_tensor_affine(X34, 0.1, 0, 5, 3)
    with pytest.raises(RuntimeError):
        torch.fake_quantize_per_tensor_affine(torch.ones(3), 0.1, 0, 5, 3)
    with pytest.raises(ValueError, match="scale"):
        jq.fake_quantize_per_tensor_affine(X34, jnp.ones(2), 0, 0, 255)
    with pytest.raises(ValueError, match="axis"):
        jq.fake_quantize_per_channel_affine(X34, jnp.ones(3), jnp.zeros(3, jnp.int32), 2, 0, 255)
    with pytest.raises(ValueError, match="shape"):
        jq.fake_quantize_per_channel_affine(X34, jnp.ones(4), jnp.zeros(4, jnp.int32), 0, 0, 255)
    with pytest.raises(ValueError, match="scale and zero_point"):
        jq.fake_quantize_learnable_per_tensor_affine(X34, jnp.ones(2), jnp.zeros(2), 0, 255)
    with pytest.raises(ValueError, match="ch_axis"):
        jq.fused_moving_avg_obs_fake_quant(X34, 1, 1, jnp.zeros(0), jnp.zeros(0), jnp.ones(1),
                                           jnp.zeros(1, jnp.int32), 0.01, 0, 255, 1, True)
    with pytest.raises(RuntimeError, match="axis"):
        torch.fused_moving_avg_obs_fake_quant(
            torch.ones(3, 4), torch.tensor([1]), torch.tensor([1]), torch.empty(0),
            torch.empty(0), torch.ones(1), torch.zeros(1, dtype=torch.int32), 0.01, 0, 255, 1,
            True, False)


# =======================================================================================
# 3. load_state_dict
# =======================================================================================

def _fq_pc():
    return jq.default_per_channel_weight_fake_quant()


SD_CASES = {
    "MinMaxObserver": (MM, lambda o: o.update(o.init(), X34)),
    "MovingAverageMinMaxObserver": (MA, lambda o: o.update(o.init(), X34)),
    "PerChannelMinMaxObserver": (PC, lambda o: o.update(o.init(X34), X34)),
    "MovingAveragePerChannelMinMaxObserver": (MAPC, lambda o: o.update(o.init(X34), X34)),
    "FixedQParamsObserver": (lambda: jq.FixedQParamsObserver(0.1, 3), lambda o: o.init()),
    "FakeQuantize": (FQ, lambda o: o.apply(o.init(), X34)[1]),
    "FakeQuantize_per_channel": (_fq_pc, lambda o: o.apply(o.init(X34), X34)[1]),
    "FusedMovingAvgObsFakeQuantize": (FUSED, lambda o: o.apply(o.init(), X34)[1]),
    "FixedQParamsFakeQuantize": (jq.default_fixed_qparams_range_neg1to1_fake_quant,
                                 lambda o: o.init()),
    "LearnableFakeQuantize": (lambda: LFQ(MA), lambda o: o.apply(o.init(), X34)[1]),
}


@pytest.mark.parametrize("name", sorted(SD_CASES))
def test_load_state_dict_missing_and_unexpected_keys(name):
    make, run = SD_CASES[name]
    obj = make()
    sd = obj.state_dict(run(obj))
    jax.tree.map(np.testing.assert_array_equal, obj.load_state_dict(sd), run(obj))  # sanity
    for key in sd:
        broken = {k: v for k, v in sd.items() if k != key}
        with pytest.raises(StateDictError, match=re.escape(repr(key))):
            obj.load_state_dict(broken)
        assert issubclass(StateDictError, ValueError)
    extra = dict(sd, bogus_buffer=np.zeros(1))
    with pytest.raises(StateDictError, match="bogus_buffer"):
        obj.load_state_dict(extra)
    obj.load_state_dict(extra, strict=False)  # non-strict ignores extra keys
    obj.load_state_dict(dict(sd, _metadata={"": {"version": 3}}))  # torch-style metadata ok


WRONG_SHAPES = [
    ("MinMaxObserver", "eps", np.ones(2, np.float32)),
    ("MinMaxObserver", "min_val", np.zeros(3, np.float32)),
    ("MinMaxObserver", "max_val", np.zeros((1, 1), np.float32)),
    ("PerChannelMinMaxObserver", "min_val", np.zeros(4, np.float32)),
    ("PerChannelMinMaxObserver", "max_val", np.zeros((3, 1), np.float32)),
    ("PerChannelMinMaxObserver", "eps", np.ones(3, np.float32)),
    ("MovingAveragePerChannelMinMaxObserver", "min_val", np.float32(0.0)),
    ("FixedQParamsObserver", "scale", np.ones(2, np.float32)),
    ("FixedQParamsObserver", "zero_point", np.zeros(3, np.int32)),
    ("FakeQuantize", "scale", np.ones(2, np.float32)),
    ("FakeQuantize", "zero_point", np.zeros(0, np.int32)),
    ("FakeQuantize", "observer_enabled", np.ones(2, np.uint8)),
    ("FakeQuantize", "activation_post_process.min_val", np.zeros(2, np.float32)),
    ("FakeQuantize_per_channel", "scale", np.ones(4, np.float32)),
    ("FakeQuantize_per_channel", "activation_post_process.max_val", np.ones(2, np.float32)),
    ("FusedMovingAvgObsFakeQuantize", "fake_quant_enabled", np.ones((1, 1, 2), np.int64)),
    ("LearnableFakeQuantize", "zero_point", np.zeros(2, np.float32)),
]


@pytest.mark.parametrize("name,key,value", WRONG_SHAPES,
                         ids=[f"{n}-{k}" for n, k, _ in WRONG_SHAPES])
def test_load_state_dict_wrong_shape(name, key, value):
    make, run = SD_CASES[name]
    obj = make()
    sd = dict(obj.state_dict(run(obj)))
    sd[key] = value
    leaf = key.split(".")[-1]
    with pytest.raises(StateDictError, match=leaf):
        obj.load_state_dict(sd)


def test_load_state_dict_resizes_like_torch():
    """Per-channel buffers and FakeQuantize scale / zero_point load at any length (torch too)."""
    obs = PC()
    state = obs.load_state_dict({"eps": np.array([EPS], np.float32),
                                 "min_val": np.zeros(5, np.float32),
                                 "max_val": np.ones(5, np.float32)})
    assert state.min_val.shape == (5,)
    fq = FQ()
    sd = fq.state_dict(fq.init())
    sd.update(scale=np.ones(3, np.float32), zero_point=np.zeros(3, np.int32))
    loaded = fq.load_state_dict(sd)
    assert loaded.scale.shape == (3,)
    # observing again makes it per-tensor (1,) as torch resizes back
    _, after = fq.apply(loaded, X34)
    assert after.scale.shape == (1,)
    # torch's own state dicts: tensors, an uninitialised per-channel observer, version < 3
    t = tobs.PerChannelMinMaxObserver()
    st = obs.load_state_dict(t.state_dict())
    assert st.min_val.shape == (0,)
    assert obs.update(st, X34).min_val.shape == (3,)
    old = {"eps": torch.tensor([EPS]), "min_vals": torch.zeros(2), "max_vals": torch.ones(2)}
    assert obs.load_state_dict(old).max_val.shape == (2,)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_load_state_dict_rejects_quantized_tensors():
    q = torch.quantize_per_tensor(torch.ones(1), 0.1, 0, torch.quint8)
    with pytest.raises(StateDictError, match="quantized"):
        MM().load_state_dict({"eps": q, "min_val": torch.tensor(0.0), "max_val": torch.tensor(1.0)})


def test_deviation_versionless_state_dict_keeps_eps():
    """Deviation 8: torch resets eps to 2**-23 for a dict without version metadata."""
    sd = {"eps": np.array([2.0 ** -12], np.float32), "min_val": np.float32(-1.0),
          "max_val": np.float32(2.0)}
    t = tobs.MinMaxObserver()
    t.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()})
    assert float(t.eps) == EPS  # torch's quirk
    assert float(MM().load_state_dict(sd).eps[0]) == 2.0 ** -12
    with_meta = collections.OrderedDict((k, torch.as_tensor(v)) for k, v in sd.items())
    with_meta._metadata = {"": {"version": 3}}
    t.load_state_dict(with_meta)
    assert float(t.eps) == 2.0 ** -12  # with metadata both keep it


# =======================================================================================
# 4. NaN / inf / empty / extreme data, against torch
# =======================================================================================

OBS_CONFIGS = [
    ("MinMaxObserver", "uint8", "per_tensor_affine"),
    ("MinMaxObserver", "int8", "per_tensor_affine"),
    ("MinMaxObserver", "int8", "per_tensor_symmetric"),
    ("MinMaxObserver", "int32", "per_tensor_affine"),
    ("MovingAverageMinMaxObserver", "uint8", "per_tensor_affine"),
    ("MovingAverageMinMaxObserver", "int8", "per_tensor_symmetric"),
    ("PerChannelMinMaxObserver", "uint8", "per_channel_affine"),
    ("PerChannelMinMaxObserver", "int8", "per_channel_symmetric"),
    ("PerChannelMinMaxObserver", "uint8", "per_channel_affine_float_qparams"),
    ("MovingAveragePerChannelMinMaxObserver", "int8", "per_channel_affine"),
]
SEQUENCES = {
    "nan": [[1.0, NAN, -2.0]],
    "pos_inf": [[1.0, INF, -2.0]],
    "neg_inf": [[1.0, -INF, -2.0]],
    "both_inf": [[-INF, INF]],
    "nan_then_finite": [[NAN, 1.0], [1.0, 2.0]],
    "inf_then_finite": [[INF, 1.0], [1.0, 2.0]],  # moving average: inf + c*(x-inf) = NaN
    "both_inf_then_finite": [[-INF, INF], [1.0, 2.0]],
    "huge_range": [[-3.4e38, 3.4e38]],  # max - min overflows: scale inf
    "huge_positive": [[3.0e38, 3.4e38]],
    "zeros": [[0.0, 0.0]],  # scale = eps
    "constant": [[2.0, 2.0]],
    "empty_then_data": [[], [1.0, -1.0]],
    "negative_only": [[-3.0, -1.0]],
    "tiny_normal": [[1e-30, 2e-30]],
    "far_from_zero": [[-1000.0, 1.0]],  # qint32 affine: |min/scale| >= 2**31 -> INT_MIN cast
}


def _torch_observer(name, dtype, qscheme):
    return getattr(tobs, name)(dtype=TORCH_DTYPE[dtype], qscheme=getattr(torch, qscheme))


@pytest.mark.parametrize("name,dtype,qscheme", OBS_CONFIGS,
                         ids=["-".join(c) for c in OBS_CONFIGS])
def test_observer_special_values_match_torch(name, dtype, qscheme):
    obs = getattr(jq, name)(dtype=getattr(jnp, dtype), qscheme=jq.QScheme(qscheme))
    update, qparams = jax.jit(obs.update), jax.jit(obs.calculate_qparams)
    per_channel = "PerChannel" in name
    for seq_name, seq in SEQUENCES.items():
        tob = _torch_observer(name, dtype, qscheme)
        state = obs.init(jax.ShapeDtypeStruct((2, 2), jnp.float32)) if per_channel else obs.init()
        for batch in seq:
            a = np.array(batch, np.float32)
            if per_channel:  # two channels: the batch and a scaled, reversed copy
                a = np.stack([a, a[::-1] * 0.5]) if a.size else a.reshape(0, 2)
            state = update(state, jnp.asarray(a))
            tob(torch.from_numpy(a))
        what = f"{seq_name}"
        assert_same(state.min_val, tob.min_val, what + " min_val")
        assert_same(state.max_val, tob.max_val, what + " max_val")
        s, z = qparams(state)
        ts, tz = tob.calculate_qparams()
        assert_same(s, ts, what + " scale")
        assert_same(z, tz, what + " zero_point")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("name", ["MinMaxObserver", "MovingAverageMinMaxObserver",
                                  "PerChannelMinMaxObserver"])
def test_observer_integer_and_float64_inputs_cast_to_float32_like_torch(name):
    obs = getattr(jq, name)()
    tob = getattr(tobs, name)()
    batches = [np.array([[3, -7], [1, 2]], np.int32),
               np.array([[1e300, -2.0], [0.5, -1e300]], np.float64),  # beyond float32: +-inf
               np.array([[0.25, 1e-3], [2.0, -0.5]], np.float64)]
    state = obs.init(jax.ShapeDtypeStruct((2, 2), jnp.float32))
    for b in batches:
        state = obs.update(state, np.asarray(b))
        tob(torch.from_numpy(b))
    assert_same(state.min_val, tob.min_val)
    assert_same(state.max_val, tob.max_val)


X_SPECIAL = np.array([[NAN, INF, -INF, 1.3, 300.0, -300.0, 0.05, -0.0]] * 3, np.float32)


def _grad_and_value(fn, x):
    y, vjp = jax.vjp(fn, jnp.asarray(x))
    return y, vjp(jnp.ones_like(y))[0]


def _torch_grad_and_value(fn, x):
    xt = torch.tensor(x, requires_grad=True)
    y = fn(xt)
    y.backward(torch.ones_like(y))
    return y.detach(), xt.grad


@pytest.mark.parametrize("case", ["per_tensor_quint8", "per_tensor_qint8", "per_channel_int_zp",
                                  "per_channel_float_zp"])
def test_fake_quant_ops_special_values_match_torch(case):
    sc = np.array([0.1, 0.2, 0.3], np.float32)
    if case == "per_tensor_quint8":
        j = lambda x: jq.fake_quantize_per_tensor_affine(x, 0.1, 3, 0, 255)
        t = lambda x: torch.fake_quantize_per_tensor_affine(x, 0.1, 3, 0, 255)
    elif case == "per_tensor_qint8":
        j = lambda x: jq.fake_quantize_per_tensor_affine(x, 0.05, 0, -128, 127)
        t = lambda x: torch.fake_quantize_per_tensor_affine(x, 0.05, 0, -128, 127)
    elif case == "per_channel_int_zp":
        zp = np.array([0, 5, -3], np.int32)
        j = lambda x: jq.fake_quantize_per_channel_affine(x, sc, zp, 0, -128, 127)
        t = lambda x: torch.fake_quantize_per_channel_affine(
            x, torch.tensor(sc), torch.tensor(zp), 0, -128, 127)
    else:
        zp = np.array([0.5, 5.25, 100.0], np.float32)
        j = lambda x: jq.fake_quantize_per_channel_affine(x, sc, zp, 0, 0, 255)
        t = lambda x: torch.fake_quantize_per_channel_affine(
            x, torch.tensor(sc), torch.tensor(zp), 0, 0, 255)
    y, g = _grad_and_value(j, X_SPECIAL)
    ty, tg = _torch_grad_and_value(t, X_SPECIAL)
    assert_same(y, ty, "forward")
    assert_same(g, tg, "gradient")
    # empty input: empty output
    assert j(jnp.zeros((3, 0))).shape == (3, 0)


@pytest.mark.parametrize("batch", [[[NAN, 1.0]], [[INF, 1.0]], [[-INF, 1.0]], [[1.0, -300.0]],
                                   [[NAN, 1.0], [1.0, 2.0]], [[INF, 2.0], [-1.0, 2.0]]],
                         ids=["nan", "pos_inf", "neg_inf", "finite", "nan_then", "inf_then"])
def test_fused_op_special_values_match_torch(batch):
    """Per-tensor fused op: NaN gives scale NaN and zero point INT32_MIN, as torch on x86."""
    rmin, rmax = torch.tensor(INF), torch.tensor(-INF)
    s, z = torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32)
    on = torch.tensor([1])
    jstate = (jnp.float32(INF), jnp.float32(-INF), jnp.ones(1), jnp.zeros(1, jnp.int32))
    fused = jax.jit(lambda x, *st: jq.fused_moving_avg_obs_fake_quant(
        x, jnp.array([1]), jnp.array([1]), *st, 0.01, 0, 255, -1))
    for b in batch:
        x = np.array(b * 3, np.float32)
        ty = torch.fused_moving_avg_obs_fake_quant(torch.tensor(x), on, on, rmin, rmax, s, z,
                                                   0.01, 0, 255, 0, False, False)
        y, *jstate = fused(jnp.asarray(x), *jstate)
        for got, want, what in zip((y, *jstate), (ty, rmin, rmax, s, z),
                                   ("y", "running_min", "running_max", "scale", "zero_point")):
            assert_same(got, want, what)


@pytest.mark.parametrize("module", ["FakeQuantize", "FusedMovingAvgObsFakeQuantize"])
def test_fake_quantize_module_special_values_match_torch(module):
    jf, tf = getattr(jq, module)(), getattr(tfq, module)()
    state = jf.init()
    apply = jax.jit(jf.apply)
    for b in ([1.0, NAN], [1.0, 2.0], [-1.0, INF], [0.5, -0.5]):
        x = np.array(b, np.float32)
        ty = tf(torch.tensor(x))
        y, state = apply(state, jnp.asarray(x))
        assert_same(y, ty, "y")
        assert_same(state.scale, tf.scale, "scale")
        assert_same(state.zero_point, tf.zero_point, "zero_point")
        assert_same(state.activation_post_process.min_val, tf.activation_post_process.min_val)


def test_learnable_fake_quantize_nan_input_matches_torch():
    tl = _LearnableFakeQuantize(tobs.MovingAverageMinMaxObserver, quant_min=0, quant_max=255)
    jl = LFQ(MA, quant_min=0, quant_max=255)
    state = jl.init()
    for b in ([1.0, NAN, -1.0], [1.0, 2.0]):
        x = np.array(b, np.float32)
        ty = tl(torch.tensor(x))
        y, state = jl(state, jnp.asarray(x))
        assert_same(y, ty.detach(), "y")
        assert_same(state.scale, tl.scale.detach(), "scale")
        assert_same(state.zero_point, tl.zero_point.detach(), "zero_point")
        ts, tz = tl.calculate_qparams()
        s, z = jl.calculate_qparams(state)
        assert_same(s, ts)
        assert_same(z, tz)


EMPTY_CASES = {**{k: (v, None) for k, v in OBSERVER_FACTORIES.items()},
               "PlaceholderObserver": (jq.PlaceholderObserver, None),
               "NoopObserver": (jq.NoopObserver, None),
               **{k: (v, "module") for k, v in MODULE_FACTORIES.items()}}


@pytest.mark.parametrize("name", sorted(EMPTY_CASES))
def test_empty_input_leaves_state_unchanged(name):
    """numel 0: the input comes back and the statistics are untouched (torch test_zero_numel)."""
    make, kind = EMPTY_CASES[name]
    obj = make()
    for empty in (jnp.zeros((0,)), jnp.zeros((0, 4))):
        for first in (None, X34):  # a fresh state and one after data
            if kind == "module":
                state = obj.init(X34)
                if first is not None:
                    state = obj.apply(state, first)[1]
                for apply in (obj.apply, jax.jit(obj.apply)):
                    y, new = apply(state, empty)
                    assert y.shape == empty.shape
                    jax.tree.map(np.testing.assert_array_equal, new, state)
            else:
                state = obj.init(X34)
                if first is not None and name != "RecordingObserver":
                    state = obj.update(state, first)
                if name == "RecordingObserver":
                    continue  # records tensors of one shape; an empty one does not fit
                for update in (obj.update, jax.jit(obj.update)):
                    jax.tree.map(np.testing.assert_array_equal, update(state, empty), state)


def test_fused_op_empty_input_touches_nothing():
    x = jnp.zeros((0,))
    out = jq.fused_moving_avg_obs_fake_quant(x, 1, 1, jnp.float32(-1.0), jnp.float32(2.0),
                                             jnp.array([0.3]), jnp.array([4], jnp.int32),
                                             0.01, 0, 255, -1)
    assert out[0].shape == (0,)
    assert (float(out[1]), float(out[2]), int(out[4][0])) == (-1.0, 2.0, 4)
    assert out[3][0] == np.float32(0.3)


def test_choose_qparams_per_tensor_extreme_ranges_match_torch():
    for x in ([-3.4e38, 3.4e38], [0.0, 1e-3], [0.0, 0.0], [-1e-6, 0.0], [5.0, 5.0],
              [-1e30, 1e30]):
        xt = torch.tensor(x, dtype=torch.float32)
        for rr in (False, True):
            ts, tz = torch._choose_qparams_per_tensor(xt, rr)
            s, z = jq.choose_qparams_per_tensor(jnp.asarray(xt.numpy()), rr)
            assert_same(s, np.float32(ts), f"{x} scale")
            assert int(z) == tz, (x, rr)


# =======================================================================================
# 5. Documented deviations
# =======================================================================================

DENORMAL = np.array([0.0, 0.0, 4.58e-41, 4.58e-41], np.float32)


@pytest.mark.parametrize("name", ["MinMaxObserver", "MovingAverageMinMaxObserver",
                                  "PerChannelMinMaxObserver",
                                  "MovingAveragePerChannelMinMaxObserver"])
def test_deviation_denormal_inputs_flushed_by_observers(name):
    """Deviation 1: torch keeps 4.58e-41 in max_val, XLA flushes it to 0; qparams agree."""
    x = DENORMAL.reshape(2, 2) if "PerChannel" in name else DENORMAL
    obs, tob = getattr(jq, name)(), getattr(tobs, name)()
    state = obs.init(x)
    for update in (obs.update, jax.jit(obs.update)):
        state = update(state, x)  # observed twice, as torch's extreme-inputs test does
        tob(torch.from_numpy(x))
    assert float(tob.max_val.max()) == pytest.approx(4.58e-41, rel=1e-3)  # torch keeps it
    assert float(jnp.max(state.max_val)) == 0.0  # jquant: flushed
    s, z = obs.calculate_qparams(state)
    ts, tz = tob.calculate_qparams()
    assert_same(s, ts)  # both eps
    assert_same(z, tz)


def test_deviation_denormal_inputs_flushed_by_fused_and_fake_quant():
    # fused op and modules: same qparams and outputs, only the stored max differs
    for module in ("FusedMovingAvgObsFakeQuantize", "FakeQuantize"):
        jf, tf = getattr(jq, module)(), getattr(tfq, module)()
        y, state = jf.apply(jf.init(), jnp.asarray(DENORMAL))
        ty = tf(torch.from_numpy(DENORMAL))
        assert_same(y, ty)
        assert_same(state.scale, tf.scale)
        assert_same(state.zero_point, tf.zero_point)
        assert float(state.activation_post_process.max_val) == 0.0
        assert float(tf.activation_post_process.max_val) > 0.0
    # fake quant: a subnormal x with a tiny normal scale rounds to a level in torch, 0 here
    x = np.array([1e-38, -1e-38, 2.0e-38], np.float32)  # two subnormals and one normal
    scale = float(np.float32(1.5e-38))
    ty = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), scale, 0, -128, 127)
    y = jq.fake_quantize_per_tensor_affine(jnp.asarray(x), scale, 0, -128, 127)
    np.testing.assert_array_equal(ty.numpy()[:2], [scale, -scale])
    np.testing.assert_array_equal(np.asarray(y)[:2], [0.0, 0.0])
    assert_same(y[2:], ty[2:])  # normal inputs agree


def test_deviation_out_of_range_zero_point_not_checked():
    """Deviation 2: torch raises for a zero point outside [quant_min, quant_max]."""
    with pytest.raises(RuntimeError, match="zero_point"):
        torch.fake_quantize_per_tensor_affine(torch.ones(2), 1.0, 300, 0, 255)
    with pytest.raises(RuntimeError, match="zero_point"):
        torch.fake_quantize_per_channel_affine(torch.ones(2, 2), torch.ones(2),
                                               torch.tensor([0, 300], dtype=torch.int32), 0, 0, 255)
    y = jq.fake_quantize_per_tensor_affine(jnp.ones(2), 1.0, 300, 0, 255)
    np.testing.assert_array_equal(y, [-45.0, -45.0])  # (clamp(300 + 1) - 300) * 1
    y = jq.fake_quantize_per_channel_affine(jnp.ones((2, 2)), jnp.ones(2),
                                            jnp.array([0, 300], jnp.int32), 0, 0, 255)
    np.testing.assert_array_equal(y, [[1.0, 1.0], [-45.0, -45.0]])


@pytest.mark.parametrize("bad", [NAN, INF])
def test_deviation_per_channel_fused_op_nan_row(bad):
    """Deviation 2: a NaN / inf row gets zero point INT32_MIN; torch raises, jquant keeps
    going and the other rows match torch's per-row result exactly."""
    x = np.array([[bad, 1.0, 2.0], [0.5, -1.0, 2.0]], np.float32)

    def run_torch(a):
        st = [torch.empty(0), torch.empty(0), torch.ones(0), torch.zeros(0, dtype=torch.int32)]
        on = torch.tensor([1])
        y = torch.fused_moving_avg_obs_fake_quant(torch.from_numpy(a), on, on, *st, 0.01, 0, 255,
                                                  0, True, False)
        return [y, *st]

    with pytest.raises(RuntimeError, match="zero_point"):
        run_torch(x)
    y, rmin, rmax, scale, zp = jq.fused_moving_avg_obs_fake_quant(
        jnp.asarray(x), 1, 1, jnp.zeros(0), jnp.zeros(0), jnp.ones(0), jnp.zeros(0, jnp.int32),
        0.01, 0, 255, 0, True, False)
    assert int(zp[0]) == np.iinfo(np.int32).min
    assert not np.isfinite(np.asarray(y[0])).any()
    good = run_torch(x[1:])
    for got, want in zip((y[1:], rmin[1:], rmax[1:], scale[1:], zp[1:]), good):
        assert_same(got, want)


def test_deviation_learnable_nan_zero_point():
    """Deviation 3: torch's calculate_qparams gives INT64_MIN, jquant INT32_MIN; torch's
    forward raises, jquant's gives NaN."""
    tl = _LearnableFakeQuantize(tobs.MovingAverageMinMaxObserver, quant_min=0, quant_max=255)
    tl.zero_point.data[:] = float("nan")
    assert int(tl.calculate_qparams()[1]) == np.iinfo(np.int64).min
    tl.enable_param_learning()
    with pytest.raises(RuntimeError):
        tl(torch.ones(3))
    jl = LFQ(MA, quant_min=0, quant_max=255)
    state = jl.enable_param_learning(jl.init()._replace(zero_point=jnp.array([NAN])))
    assert int(jl.calculate_qparams(state)[1][0]) == np.iinfo(np.int32).min
    y, _ = jl(state, jnp.ones(3))
    assert bool(jnp.all(jnp.isnan(y)))
    # +inf clamps to quant_max in both
    tl.zero_point.data[:] = float("inf")
    assert int(tl.calculate_qparams()[1]) == 255
    assert int(jl.calculate_qparams(state._replace(zero_point=jnp.array([INF])))[1][0]) == 255


def test_deviation_quantize_nan_maps_to_lowest_value():
    """Formerly deviation 9; NaN now maps as torch's x86 kernels: the dtype's maximum per
    tensor (fbgemm), 0 per channel."""
    x = jnp.array([NAN, INF, -INF, 1.0])
    np.testing.assert_array_equal(jq.quantize_per_tensor(x, 0.1, 3, jq.quint8), [255, 255, 0, 13])
    np.testing.assert_array_equal(jq.quantize_per_tensor(x, 0.1, 0, jq.qint8), [127, 127, -128, 10])
    np.testing.assert_array_equal(
        jq.quantize_per_channel(x.reshape(1, 4), jnp.array([0.1]), jnp.array([0]), 0, jq.qint8),
        [[0, 127, -128, 10]])
