"""Flip observer / fake-quant flags in every fake-quantize state inside any pytree.

Counterparts: ``torch.ao.quantization.enable_observer`` / ``disable_observer`` /
``enable_fake_quant`` / ``disable_fake_quant`` (used with ``model.apply``). Here they take
a pytree (a single state, Linen ``quant_stats``, a whole train state, ...) and return a
new one in which every leaf named ``observer_enabled`` (and ``static_enabled``, the
learnable module's observer switch) or ``fake_quant_enabled`` is set to 1 or 0, keeping
its shape and dtype. As in torch, a learnable module's ``observer_enabled`` buffer (a
sibling of ``static_enabled``) is left untouched. Front ends register handlers for their
own containers (e.g. NNX modules) with :func:`register_flag_handler`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["enable_observer", "disable_observer", "enable_fake_quant", "disable_fake_quant",
           "set_flags", "register_flag_handler"]

_HANDLERS: dict[type, Callable] = {}


def register_flag_handler(cls: type, handler: Callable[[Any, dict], Any]) -> None:
    """``handler(obj, {flag_name: 0|1})`` is used for instances of ``cls``."""
    _HANDLERS[cls] = handler


def _key_name(k) -> Any:
    for attr in ("name", "key"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return None


def set_flags(tree, values: dict):
    """Returns ``tree`` with every leaf named in ``values`` filled with that value."""
    for cls, handler in _HANDLERS.items():
        if isinstance(tree, cls):
            return handler(tree, values)

    # torch's _LearnableFakeQuantize.enable_observer sets static_enabled only: its
    # observer_enabled buffer is left alone in a container that has a static_enabled leaf.
    keep = set()
    if "observer_enabled" in values and "static_enabled" in values:
        keep = {p[:-1] for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
                if p and _key_name(p[-1]) == "static_enabled"}

    def fix(path, leaf):
        if path:
            name = _key_name(path[-1])
            if name == "observer_enabled" and path[:-1] in keep:
                return leaf
            if name in values and hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
                return jnp.full(jnp.shape(leaf), values[name], dtype=leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(fix, tree)


def enable_observer(tree):
    """Turns observers on (``observer_enabled`` / ``static_enabled`` = 1) throughout ``tree``."""
    return set_flags(tree, {"observer_enabled": 1, "static_enabled": 1})


def disable_observer(tree):
    """Freezes observers (``observer_enabled`` / ``static_enabled`` = 0) throughout ``tree``."""
    return set_flags(tree, {"observer_enabled": 0, "static_enabled": 0})


def enable_fake_quant(tree):
    """Turns fake quantization on (``fake_quant_enabled`` = 1) throughout ``tree``."""
    return set_flags(tree, {"fake_quant_enabled": 1})


def disable_fake_quant(tree):
    """Turns fake quantization off (``fake_quant_enabled`` = 0) throughout ``tree``."""
    return set_flags(tree, {"fake_quant_enabled": 0})
