"""QConfig and torch's default observers, fake quants and qconfigs.

Counterparts: ``torch.ao.quantization.qconfig`` / ``observer`` / ``fake_quantize`` module
defaults, ``get_default_qconfig`` and ``get_default_qat_qconfig``. Every default is a
factory (``Cls.with_args(...)``); call it to build a config, as in torch.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from jquant._config import Factory
from jquant.fake_quantize import (FakeQuantize, FakeQuantizeBase, FixedQParamsFakeQuantize,
                                  FusedMovingAvgObsFakeQuantize)
from jquant.histogram import HistogramObserver
from jquant.observers import (FixedQParamsObserver, MinMaxObserver, MovingAverageMinMaxObserver,
                              MovingAveragePerChannelMinMaxObserver, NoopObserver, ObserverBase,
                              PerChannelMinMaxObserver, PlaceholderObserver, RecordingObserver)
from jquant.types import (per_channel_affine_float_qparams, per_channel_symmetric,
                          per_tensor_affine, per_tensor_symmetric, qint8, quint4x2, quint8)

_EPS_2_12 = 2 ** -12

# -- observers (torch.ao.quantization.observer) ------------------------------------------
default_observer = MinMaxObserver.with_args(quant_min=0, quant_max=127)
default_weight_observer = MinMaxObserver.with_args(dtype=qint8, qscheme=per_tensor_symmetric)
weight_observer_range_neg_127_to_127 = MinMaxObserver.with_args(
    dtype=qint8, qscheme=per_tensor_symmetric, quant_min=-127, quant_max=127, eps=_EPS_2_12)
default_histogram_observer = HistogramObserver.with_args(quant_min=0, quant_max=127)
default_per_channel_weight_observer = PerChannelMinMaxObserver.with_args(
    dtype=qint8, qscheme=per_channel_symmetric)
per_channel_weight_observer_range_neg_127_to_127 = PerChannelMinMaxObserver.with_args(
    dtype=qint8, qscheme=per_channel_symmetric, quant_min=-127, quant_max=127, eps=_EPS_2_12)
default_debug_observer = RecordingObserver
default_placeholder_observer = PlaceholderObserver
default_dynamic_quant_observer = PlaceholderObserver.with_args(
    dtype=quint8, quant_min=0, quant_max=255, is_dynamic=True)
default_float_qparams_observer = PerChannelMinMaxObserver.with_args(
    dtype=quint8, qscheme=per_channel_affine_float_qparams, ch_axis=0)
default_float_qparams_observer_4bit = PerChannelMinMaxObserver.with_args(
    dtype=quint4x2, qscheme=per_channel_affine_float_qparams, ch_axis=0)
default_fixed_qparams_range_neg1to1_observer = FixedQParamsObserver.with_args(
    scale=2.0 / 256.0, zero_point=128, dtype=quint8, quant_min=0, quant_max=255)
default_fixed_qparams_range_0to1_observer = FixedQParamsObserver.with_args(
    scale=1.0 / 256.0, zero_point=0, dtype=quint8, quant_min=0, quant_max=255)
default_symmetric_fixed_qparams_observer = default_fixed_qparams_range_neg1to1_observer
default_affine_fixed_qparams_observer = default_fixed_qparams_range_0to1_observer

# -- fake quants (torch.ao.quantization.fake_quantize) --------------------------------------
default_fake_quant = FakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=quint8,
    qscheme=per_tensor_affine, reduce_range=True)
default_weight_fake_quant = FakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=qint8,
    qscheme=per_tensor_symmetric, reduce_range=False)
default_dynamic_fake_quant = FakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, is_dynamic=True,
    dtype=quint8, averaging_constant=1)
default_per_channel_weight_fake_quant = FakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=qint8,
    qscheme=per_channel_symmetric, reduce_range=False, ch_axis=0)
default_embedding_fake_quant = FakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, qscheme=per_channel_affine_float_qparams,
    dtype=quint8, quant_min=0, quant_max=255, ch_axis=0, averaging_constant=1)
default_embedding_fake_quant_4bit = FakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, qscheme=per_channel_affine_float_qparams,
    ch_axis=0, dtype=quint4x2, averaging_constant=1)
default_histogram_fake_quant = FakeQuantize.with_args(
    observer=HistogramObserver, quant_min=0, quant_max=255, dtype=quint8,
    qscheme=per_tensor_affine, reduce_range=True)
default_fixed_qparams_range_neg1to1_fake_quant = FixedQParamsFakeQuantize.with_args(
    observer=default_fixed_qparams_range_neg1to1_observer)
default_fixed_qparams_range_0to1_fake_quant = FixedQParamsFakeQuantize.with_args(
    observer=default_fixed_qparams_range_0to1_observer)
default_symmetric_fixed_qparams_fake_quant = default_fixed_qparams_range_neg1to1_fake_quant
default_affine_fixed_qparams_fake_quant = default_fixed_qparams_range_0to1_fake_quant
default_fused_act_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=quint8)
default_fused_wt_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=qint8,
    qscheme=per_tensor_symmetric)
default_fused_per_channel_wt_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=qint8,
    qscheme=per_channel_symmetric)
fused_wt_fake_quant_range_neg_127_to_127 = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-127, quant_max=127, dtype=qint8,
    qscheme=per_tensor_symmetric, eps=_EPS_2_12)
fused_per_channel_wt_fake_quant_range_neg_127_to_127 = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, quant_min=-127, quant_max=127, dtype=qint8,
    qscheme=per_channel_symmetric, eps=_EPS_2_12)


class _QConfigFields(NamedTuple):
    activation: Any
    weight: Any


class QConfig(_QConfigFields):
    """How to quantize a module: factories for its activation and weight; ``torch.ao.quantization.QConfig``.

    Each field is an observer / fake-quantize class or ``with_args`` factory (``None`` or an
    identity is allowed for weight-only / activation-only configs). Passing an instance
    raises ``ValueError``, as torch does.
    """
    __slots__ = ()

    def __new__(cls, activation, weight):
        for name, value in (("activation", activation), ("weight", weight)):
            if isinstance(value, (ObserverBase, FakeQuantizeBase)):
                raise ValueError(f"QConfig received an observer instance for {name}; pass a class "
                                 f"or factory instead (e.g. MinMaxObserver.with_args(...))")
        return super().__new__(cls, activation, weight)


def _identity_factory():
    return None


default_qconfig = QConfig(activation=default_observer, weight=default_weight_observer)
default_debug_qconfig = QConfig(activation=default_debug_observer, weight=default_weight_observer)
default_per_channel_qconfig = QConfig(activation=default_observer,
                                      weight=default_per_channel_weight_observer)
default_dynamic_qconfig = QConfig(activation=default_dynamic_quant_observer,
                                  weight=default_weight_observer)
float16_dynamic_qconfig = QConfig(
    activation=PlaceholderObserver.with_args(dtype=jnp.float16, is_dynamic=True),
    weight=PlaceholderObserver.with_args(dtype=jnp.float16))
float16_static_qconfig = QConfig(activation=PlaceholderObserver.with_args(dtype=jnp.float16),
                                 weight=PlaceholderObserver.with_args(dtype=jnp.float16))
per_channel_dynamic_qconfig = QConfig(activation=default_dynamic_quant_observer,
                                      weight=default_per_channel_weight_observer)
float_qparams_weight_only_qconfig = QConfig(
    activation=default_placeholder_observer, weight=default_float_qparams_observer)
float_qparams_weight_only_qconfig_4bit = QConfig(
    activation=default_placeholder_observer, weight=default_float_qparams_observer_4bit)
default_qat_qconfig = QConfig(activation=default_fake_quant, weight=default_weight_fake_quant)
default_dynamic_qat_qconfig = QConfig(activation=default_dynamic_fake_quant,
                                      weight=default_weight_fake_quant)
default_weight_only_qconfig = QConfig(activation=None, weight=default_weight_fake_quant)
default_activation_only_qconfig = QConfig(activation=default_fake_quant, weight=None)
default_qat_qconfig_v2 = QConfig(activation=default_fused_act_fake_quant,
                                 weight=default_fused_wt_fake_quant)
default_symmetric_qnnpack_qconfig = QConfig(
    activation=HistogramObserver.with_args(dtype=qint8, reduce_range=False, eps=_EPS_2_12),
    weight=weight_observer_range_neg_127_to_127)
default_per_channel_symmetric_qnnpack_qconfig = QConfig(
    activation=HistogramObserver.with_args(dtype=qint8, reduce_range=False, eps=_EPS_2_12),
    weight=per_channel_weight_observer_range_neg_127_to_127)
default_symmetric_qnnpack_qat_qconfig = QConfig(
    activation=FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=qint8,
        reduce_range=False, eps=_EPS_2_12),
    weight=fused_wt_fake_quant_range_neg_127_to_127)
default_per_channel_symmetric_qnnpack_qat_qconfig = QConfig(
    activation=FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=qint8,
        reduce_range=False, eps=_EPS_2_12),
    weight=fused_per_channel_wt_fake_quant_range_neg_127_to_127)
default_embedding_qat_qconfig = QConfig(activation=NoopObserver.with_args(dtype=jnp.float32),
                                        weight=default_embedding_fake_quant)
default_embedding_qat_qconfig_4bit = QConfig(activation=NoopObserver.with_args(dtype=jnp.float32),
                                             weight=default_embedding_fake_quant_4bit)
default_quint8_weight_qconfig = QConfig(activation=HistogramObserver, weight=MinMaxObserver)

_BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")


def _check_backend(backend):
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; expected one of {list(_BACKENDS)}")


def get_default_qconfig(backend: str = "x86", version: int = 0) -> QConfig:
    """Default post-training-quantization QConfig; ``torch.ao.quantization.get_default_qconfig``.

    x86/fbgemm: HistogramObserver(reduce_range=True) activations, per-channel symmetric
    int8 weights; qnnpack: HistogramObserver(reduce_range=False), per-tensor symmetric;
    onednn: HistogramObserver(reduce_range=False), per-channel. Only ``version=0`` exists.
    """
    _check_backend(backend)
    if version != 0:
        raise ValueError(f"version={version}: get_default_qconfig only supports version 0")
    if backend in ("x86", "fbgemm"):
        return QConfig(activation=HistogramObserver.with_args(reduce_range=True),
                       weight=default_per_channel_weight_observer)
    if backend == "qnnpack":
        return QConfig(activation=HistogramObserver.with_args(reduce_range=False),
                       weight=default_weight_observer)
    return QConfig(activation=HistogramObserver.with_args(reduce_range=False),
                   weight=default_per_channel_weight_observer)


def get_default_qat_qconfig(backend: str = "x86", version: int = 1) -> QConfig:
    """Default QAT QConfig; ``torch.ao.quantization.get_default_qat_qconfig``.

    ``version=0`` uses FakeQuantize, ``version=1`` (default) the fused module.
    x86/fbgemm: activations reduce_range [0, 127], per-channel weights; qnnpack: [0, 255],
    per-tensor weights; onednn: [0, 255], per-channel weights.
    """
    _check_backend(backend)
    if version not in (0, 1):
        raise ValueError(f"version={version}: get_default_qat_qconfig supports versions 0 and 1")
    act_cls = FakeQuantize if version == 0 else FusedMovingAvgObsFakeQuantize
    rr = backend in ("x86", "fbgemm")
    act = act_cls.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                            reduce_range=rr)
    if version == 0:
        weight = (default_weight_fake_quant if backend == "qnnpack"
                  else default_per_channel_weight_fake_quant)
    else:
        weight = (default_fused_wt_fake_quant if backend == "qnnpack"
                  else default_fused_per_channel_wt_fake_quant)
    if backend == "onednn":
        act = act_cls.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255)
    return QConfig(activation=act, weight=weight)
