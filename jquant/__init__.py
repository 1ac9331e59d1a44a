"""jquant: PyTorch's ``torch.ao.quantization`` observer / fake-quant / QAT workflow for JAX.

Observers and fake-quantize modules are frozen configs with pure, jittable ``init`` /
``update`` / ``calculate_qparams``; their state is a pytree. Numbers match PyTorch 2.13.
Flax front ends live in :mod:`jquant.linen` and :mod:`jquant.nnx`.
"""
from jquant.types import (QScheme, per_channel_affine, per_channel_affine_float_qparams,
                          per_channel_symmetric, per_tensor_affine, per_tensor_symmetric, qint8,
                          qint32, quint4x2, quint8)
from jquant.qparams import calculate_qparams, choose_qparams_per_tensor, choose_quantization_params
from jquant.fake_quant_ops import (dequantize, fake_quantize_learnable_per_channel_affine,
                                   fake_quantize_learnable_per_tensor_affine,
                                   fake_quantize_per_channel_affine, fake_quantize_per_tensor_affine,
                                   quantize_per_channel, quantize_per_tensor)
from jquant.fused import fused_moving_avg_obs_fake_quant
from jquant.observers import (EmptyState, FixedQParamsObserver, FixedQParamsState, MinMaxObserver,
                              MinMaxState, MovingAverageMinMaxObserver,
                              MovingAveragePerChannelMinMaxObserver, NoopObserver, ObserverBase,
                              PerChannelMinMaxObserver, PlaceholderObserver, RecordingObserver,
                              RecordingState, UniformQuantizationObserverBase)
from jquant.histogram import *  # noqa: F401,F403  (HistogramObserver, ...)
from jquant.histogram import __all__ as _histogram_all
from jquant.fake_quantize import (FakeQuantize, FakeQuantizeBase, FakeQuantizeState,
                                  FixedQParamsFakeQuantize, FusedMovingAvgObsFakeQuantize,
                                  LearnableFakeQuantize, LearnableFakeQuantizeState)
from jquant.flags import disable_fake_quant, disable_observer, enable_fake_quant, enable_observer
from jquant._config import Factory
from jquant._state_dict import StateDictError
from jquant.qconfig import *  # noqa: F401,F403
from jquant import qconfig as _qconfig_module
# integer inference (registers the packed-weight pytrees that exported converted models take)
from jquant import quantized  # noqa: F401

__version__ = "0.1.0"

_qconfig_names = [n for n in dir(_qconfig_module)
                  if n.startswith(("default_", "float", "per_channel_", "weight_", "fused_"))
                  or n in ("QConfig", "get_default_qconfig", "get_default_qat_qconfig")]
globals().update({n: getattr(_qconfig_module, n) for n in _qconfig_names})

__all__ = [
    "QScheme", "per_tensor_affine", "per_tensor_symmetric", "per_channel_affine",
    "per_channel_symmetric", "per_channel_affine_float_qparams", "quint8", "qint8", "qint32",
    "quint4x2", "calculate_qparams", "choose_qparams_per_tensor", "choose_quantization_params",
    "fake_quantize_per_tensor_affine", "fake_quantize_per_channel_affine",
    "fake_quantize_learnable_per_tensor_affine", "fake_quantize_learnable_per_channel_affine",
    "quantize_per_tensor", "quantize_per_channel", "dequantize", "fused_moving_avg_obs_fake_quant",
    "ObserverBase", "UniformQuantizationObserverBase", "MinMaxObserver",
    "MovingAverageMinMaxObserver", "PerChannelMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver", "FixedQParamsObserver", "PlaceholderObserver",
    "NoopObserver", "RecordingObserver", "MinMaxState", "FixedQParamsState", "RecordingState",
    "EmptyState", *_histogram_all,
    "FakeQuantizeBase", "FakeQuantize", "FusedMovingAvgObsFakeQuantize",
    "FixedQParamsFakeQuantize", "LearnableFakeQuantize", "FakeQuantizeState",
    "LearnableFakeQuantizeState", "enable_observer", "disable_observer", "enable_fake_quant",
    "disable_fake_quant", "Factory", "StateDictError", *_qconfig_names,
]
