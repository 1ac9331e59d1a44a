"""HistogramObserver (placeholder until issue [2] lands)."""
from __future__ import annotations

import numpy as np

from jquant.observers import DEFAULT_EPS, UniformQuantizationObserverBase
from jquant.types import QScheme, quint8

__all__ = ["HistogramObserver"]


class HistogramObserver(UniformQuantizationObserverBase):
    """``torch.ao.quantization.HistogramObserver`` (being implemented)."""

    _accepts_dynamic = False
    state_keys = ("eps", "histogram", "min_val", "max_val")

    def __init__(self, bins=2048, dtype=quint8, qscheme=QScheme.PER_TENSOR_AFFINE,
                 reduce_range=False, quant_min=None, quant_max=None, eps=DEFAULT_EPS,
                 is_dynamic=False, upsample_rate=16):
        self._record(locals())
        self._setup(dtype, qscheme, reduce_range, quant_min, quant_max, eps, is_dynamic)
        self._set(bins=int(bins), upsample_rate=int(upsample_rate))
