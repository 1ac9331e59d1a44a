"""Quantized dtypes, quantization schemes and quantization ranges.

Counterparts: ``torch.quint8`` / ``torch.qint8`` / ``torch.qint32`` /
``torch.quint4x2``, ``torch.qscheme`` and
``torch.ao.quantization.utils.calculate_qmin_qmax``.
"""
from __future__ import annotations

import enum
import operator
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = [
    "quint8", "qint8", "qint32", "quint4x2",
    "QScheme", "per_tensor_affine", "per_tensor_symmetric", "per_channel_affine",
    "per_channel_symmetric", "per_channel_affine_float_qparams",
    "canonical_dtype", "canonical_qscheme", "dtype_name", "torch_iinfo",
    "calculate_qmin_qmax", "as_int", "as_float",
]

# Quantized dtypes are plain JAX dtypes (torch's quantized dtypes in brackets).
quint8 = jnp.uint8      # torch.quint8
qint8 = jnp.int8        # torch.qint8
qint32 = jnp.int32      # torch.qint32
quint4x2 = jnp.uint4    # torch.quint4x2 (two 4-bit values per byte when packed)


class QScheme(enum.Enum):
    """Quantization scheme; counterpart of ``torch.qscheme``."""

    PER_TENSOR_AFFINE = "per_tensor_affine"
    PER_TENSOR_SYMMETRIC = "per_tensor_symmetric"
    PER_CHANNEL_AFFINE = "per_channel_affine"
    PER_CHANNEL_SYMMETRIC = "per_channel_symmetric"
    PER_CHANNEL_AFFINE_FLOAT_QPARAMS = "per_channel_affine_float_qparams"

    @property
    def is_per_channel(self) -> bool:
        return self.value.startswith("per_channel")

    @property
    def is_symmetric(self) -> bool:
        return self.value.endswith("symmetric")

    def __repr__(self) -> str:
        return f"jquant.{self.value}"


per_tensor_affine = QScheme.PER_TENSOR_AFFINE
per_tensor_symmetric = QScheme.PER_TENSOR_SYMMETRIC
per_channel_affine = QScheme.PER_CHANNEL_AFFINE
per_channel_symmetric = QScheme.PER_CHANNEL_SYMMETRIC
per_channel_affine_float_qparams = QScheme.PER_CHANNEL_AFFINE_FLOAT_QPARAMS

# torch.iinfo of each supported dtype (torch reports 8 bits, 0..255 for quint4x2).
_IINFO = {
    "uint8": (0, 255, 8),
    "int8": (-128, 127, 8),
    "int16": (-32768, 32767, 16),
    "uint16": (0, 65535, 16),
    "int32": (-(2 ** 31), 2 ** 31 - 1, 32),
    "uint4": (0, 255, 8),
}
_OBSERVER_DTYPES = ("uint8", "int8", "int16", "uint16", "int32", "uint4",
                    "float8_e5m2", "float8_e4m3fn")
_TORCH_NAMES = {"quint8": "uint8", "qint8": "int8", "qint32": "int32", "quint4x2": "uint4"}


def canonical_dtype(dtype: Any, *, argname: str = "dtype") -> np.dtype:
    """Returns ``dtype`` as a numpy dtype; accepts JAX/numpy dtypes, torch dtypes and names."""
    if dtype is None:
        raise ValueError(f"{argname} must be a dtype, got None")
    name = str(dtype)
    if name.startswith("torch."):
        name = name[len("torch."):]
        name = _TORCH_NAMES.get(name, name)
        if name in ("float", "half", "double"):
            name = {"float": "float32", "half": "float16", "double": "float64"}[name]
    name = _TORCH_NAMES.get(name, name)
    try:
        return np.dtype(getattr(jnp, name) if hasattr(jnp, name) else name)
    except TypeError:
        pass
    try:
        return np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"{argname}={dtype!r} is not a dtype") from e


def dtype_name(dtype: Any) -> str:
    """Short name of a dtype, e.g. ``'uint8'``."""
    return np.dtype(dtype).name


def torch_iinfo(dtype: Any) -> tuple[int, int, int]:
    """``(min, max, bits)`` as ``torch.iinfo`` reports them for the quantized dtype."""
    name = dtype_name(dtype)
    if name not in _IINFO:
        raise ValueError(f"dtype={name} has no integer range")
    return _IINFO[name]


def as_int(value: Any, argname: str) -> int:
    """``value`` as a Python int; ``ValueError`` naming ``argname`` unless it is integral."""
    try:
        return operator.index(value)
    except TypeError:
        pass
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{argname}={value!r} must be an integer") from None
    if not f.is_integer():
        raise ValueError(f"{argname}={value!r} must be an integer")
    return int(f)


def as_float(value: Any, argname: str) -> float:
    """``value`` as a Python float; ``ValueError`` naming ``argname`` if it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{argname}={value!r} must be a number") from None


def canonical_qscheme(qscheme: Any, *, argname: str = "qscheme") -> QScheme:
    """Returns ``qscheme`` as a :class:`QScheme` (accepts torch qschemes and strings)."""
    if isinstance(qscheme, QScheme):
        return qscheme
    name = str(qscheme)
    if name.startswith("torch."):
        name = name[len("torch."):]
    try:
        return QScheme(name)
    except ValueError as e:
        raise ValueError(
            f"{argname}={qscheme!r} is not a quantization scheme; expected one of "
            f"{[q.value for q in QScheme]}") from e


def check_observer_dtype(dtype: Any) -> np.dtype:
    d = canonical_dtype(dtype)
    if d.name not in _OBSERVER_DTYPES:
        raise ValueError(
            f"dtype={d.name} is not supported by quantization observers; expected one of "
            f"quint8/uint8, qint8/int8, int16, uint16, qint32/int32, quint4x2/uint4, float8")
    return d


def calculate_qmin_qmax(quant_min: int | None, quant_max: int | None,
                        has_customized_qrange: bool, dtype: Any,
                        reduce_range: bool) -> tuple[int, int]:
    """Effective quantization range; counterpart of torch's ``calculate_qmin_qmax``.

    A custom range is halved (floor division) when ``reduce_range``; default ranges are
    [-128, 127] (int8), [0, 255] (uint8), int32/int16/uint16 full range, and [0, 15] for
    every other dtype (quint4x2, float8).
    """
    name = dtype_name(dtype)
    if has_customized_qrange:
        lo, hi = quant_min, quant_max
        if reduce_range:
            lo, hi = lo // 2, hi // 2
        return int(lo), int(hi)
    if name == "int8":
        return (-64, 63) if reduce_range else (-128, 127)
    if name == "uint8":
        return (0, 127) if reduce_range else (0, 255)
    if name == "int32":
        return -(2 ** 31), 2 ** 31 - 1
    if name == "uint16":
        return 0, 65535
    if name == "int16":
        return -32768, 32767
    return 0, 15


def validate_qrange(quant_min: int | None, quant_max: int | None, dtype: Any) -> bool:
    """Checks a user range as torch's observer constructor does; returns has_customized_qrange."""
    if quant_min is None or quant_max is None:
        return False
    quant_min, quant_max = as_int(quant_min, "quant_min"), as_int(quant_max, "quant_max")
    if not quant_min <= 0 <= quant_max:
        raise ValueError(
            f"quant_min={quant_min}, quant_max={quant_max}: the user-specified quantization "
            f"range must include 0")
    if not quant_min < quant_max:
        raise ValueError(f"quant_min={quant_min} must be strictly less than quant_max={quant_max}")
    name = dtype_name(dtype)
    width = quant_max - quant_min + 1
    if name == "int8" and not 0 < width <= 256:
        raise ValueError(f"quant_min/quant_max: quantization range [{quant_min}, {quant_max}] "
                         f"is wider than 8 bits for dtype=int8")
    if name == "int32" and not 0 < width <= 2 ** 32:
        raise ValueError(f"quant_min/quant_max: quantization range [{quant_min}, {quant_max}] "
                         f"is wider than 32 bits for dtype=int32")
    return True
