"""Helpers for torch-compatible state dicts (internal)."""
from __future__ import annotations

import collections
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["to_numpy", "check_keys", "sub_dict", "StateDictError", "with_metadata"]


def with_metadata(entries: Mapping[str, Any], metadata: dict) -> "collections.OrderedDict":
    """An ordered state dict carrying torch's ``_metadata`` (``{module_prefix: {"version": v}}``).

    torch's ``load_state_dict`` reads the version from it: without one, observers treat the
    dict as version-1 state and reset ``eps`` to 2**-23, so jquant's state dicts carry the
    versions torch's own modules write.
    """
    sd = collections.OrderedDict(entries)
    sd._metadata = metadata
    return sd


class StateDictError(ValueError):
    """A state dict that does not fit the observer or fake-quantize module loading it."""


def to_numpy(v: Any) -> np.ndarray:
    """A torch tensor, JAX array, numpy array or number as a numpy array (on host)."""
    if hasattr(v, "detach") and hasattr(v, "cpu"):
        v = v.detach().cpu()
        if hasattr(v, "is_quantized") and v.is_quantized:
            raise StateDictError("quantized tensors are not observer state")
        # A copy: ``Tensor.numpy()`` on the module's own buffer would make its storage
        # non-resizable, breaking torch's later in-place ``resize_`` of per-channel buffers.
        return v.clone().numpy()
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
