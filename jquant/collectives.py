"""Cross-device reductions for observer statistics (``axis_name`` support).

Inside ``shard_map`` / ``pmap`` an observer's ``update(state, x, axis_name=...)`` reduces its
batch statistics over the named mesh axis (or axes) before touching the state, so the state
comes out identical on every device and equal to the single-device state over the whole
(global) batch. ``axis_name=None`` is the identity. torch has no counterpart (its
``DataParallel`` replicas keep separate observers).
"""
from __future__ import annotations

from jax import lax

__all__ = ["all_min", "all_max", "all_sum", "all_gather", "axis_size"]


def all_min(x, axis_name=None):
    """Elementwise minimum over ``axis_name`` (NaN-propagating, like ``jnp.minimum``)."""
    return x if axis_name is None else lax.pmin(x, axis_name)


def all_max(x, axis_name=None):
    """Elementwise maximum over ``axis_name`` (NaN-propagating)."""
    return x if axis_name is None else lax.pmax(x, axis_name)


def all_sum(x, axis_name=None):
    """Sum over ``axis_name``."""
    return x if axis_name is None else lax.psum(x, axis_name)


def all_gather(x, axis_name=None, axis: int = 0):
    """Concatenates every device's ``x`` along ``axis`` (tiled), in device order."""
    return x if axis_name is None else lax.all_gather(x, axis_name, axis=axis, tiled=True)


def axis_size(axis_name=None) -> int:
    """Number of devices along ``axis_name`` (a name or a tuple of names); 1 for ``None``."""
    if axis_name is None:
        return 1
    names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
    n = 1
    for name in names:
        n *= int(lax.axis_size(name))
    return n
