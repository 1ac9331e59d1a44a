"""Helpers for torch-compatible state dicts (internal)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["to_numpy", "check_keys", "sub_dict", "StateDictError"]


class StateDictError(ValueError):
    """A state dict that does not fit the observer or fake-quantize module loading it."""


def to_numpy(v: Any) -> np.ndarray:
    """A torch tensor, JAX array, numpy array or number as a numpy array (on host)."""
    if hasattr(v, "detach") and hasattr(v, "cpu"):
        v = v.detach().cpu()
        if hasattr(v, "is_quantized") and v.is_quantized:
            raise StateDictError("quantized tensors are not observer state")
        return v.numpy()
    return np.asarray(v)


def check_keys(state_dict: Mapping[str, Any], required: Iterable[str], owner: str,
               optional: Iterable[str] = (), strict: bool = True) -> None:
    keys = set(k for k in state_dict.keys() if not k.startswith("_"))
    required = list(required)
    missing = [k for k in required if k not in keys]
    allowed = set(required) | set(optional)
    unexpected = sorted(k for k in keys if k not in allowed)
    msgs = []
    if missing:
        msgs.append(f"missing keys {missing}")
    if unexpected and strict:
        msgs.append(f"unexpected keys {unexpected}")
    if msgs:
        raise StateDictError(f"Error loading state dict into {owner}: " + "; ".join(msgs)
                             + f" (expected keys {sorted(required)})")


def sub_dict(state_dict: Mapping[str, Any], prefix: str) -> dict:
    """Entries under ``prefix`` (e.g. ``'activation_post_process.'``) with it stripped."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def expect_shape(name: str, value: np.ndarray, shape: tuple, owner: str) -> np.ndarray:
    if tuple(value.shape) != tuple(shape):
        raise StateDictError(f"Error loading state dict into {owner}: {name} has shape "
                             f"{tuple(value.shape)}, expected {tuple(shape)}")
    return value
