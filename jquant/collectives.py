"""Cross-device reductions for observer statistics (``axis_name`` support).

Inside ``shard_map`` / ``pmap`` an observer's ``update(state, x, axis_name=...)`` reduces its
batch statistics over the named mesh axis (or axes) before touching the state, so the state
comes out identical on every device and equal to the single-device state over the whole
(global) batch. ``axis_name=None`` is the identity. torch has no counterpart (its
``DataParallel`` replicas keep separate observers).
"""
from __future__ import annotations

import functools

import jax
from jax import lax

__all__ = ["all_min", "all_max", "all_sum", "all_gather", "axis_size", "place_like",
           "placed_init", "varying_axes", "match_varying"]


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
    """Concatenates every device's ``x`` along ``axis`` (tiled), in device order.

    The result is device-invariant (``shard_map`` can return it with ``out_specs=P()``).
    """
    if axis_name is None:
        return x
    try:
        return lax.all_gather(x, axis_name, axis=axis, tiled=True, to="invarying")
    except TypeError:  # older jax: no manual-axis types
        return lax.all_gather(x, axis_name, axis=axis, tiled=True)


def axis_size(axis_name=None) -> int:
    """Number of devices along ``axis_name`` (a name or a tuple of names); 1 for ``None``."""
    if axis_name is None:
        return 1
    names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
    n = 1
    for name in names:
        n *= int(lax.axis_size(name))
    return n


def place_like(tree, x):
    """``tree`` (a state) placed where the array ``x`` lives.

    A committed single-device ``x`` puts the state on that device; an ``x`` with a
    ``NamedSharding`` puts it replicated on the same mesh. Anything else (uncommitted
    arrays, tracers, ``jax.ShapeDtypeStruct``, ``None``) leaves ``tree`` as it is.
    """
    if x is None or isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
        return tree
    if not getattr(x, "committed", False):
        return tree
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        target = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    elif len(sharding.device_set) == 1:
        target = jax.sharding.SingleDeviceSharding(next(iter(sharding.device_set)))
    else:
        return tree
    return jax.device_put(tree, target)


def placed_init(init):
    """Wraps an ``init(self, x=None, ...)`` so its state follows ``x``'s placement."""
    if getattr(init, "_jquant_placed", False):
        return init

    @functools.wraps(init)
    def wrapper(self, x=None, *args, **kwargs):
        return place_like(init(self, x, *args, **kwargs), x)

    wrapper._jquant_placed = True
    return wrapper


def varying_axes(x) -> frozenset:
    """Mesh axes along which ``x`` varies inside ``shard_map`` (empty outside of it)."""
    t = jax.typeof(x) if hasattr(jax, "typeof") else getattr(x, "aval", None)
    mat = getattr(t, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(t, "vma", ()) or ())


def match_varying(v, like):
    """``v`` marked as varying along every mesh axis ``like`` varies along.

    Inside ``shard_map`` a replicated parameter (e.g. a learnable scale) combined with a
    sharded input must vary like it before entering a custom VJP, whose per-device
    cotangents would otherwise not type-check; JAX then sums the gradient over devices.
    A no-op outside ``shard_map``.
    """
    missing = varying_axes(like) - varying_axes(v)
    if not missing:
        return v
    axes = tuple(missing)
    pcast = getattr(lax, "pcast", None)
    if pcast is not None:
        return pcast(v, axes, to="varying")
    return lax.pvary(v, axes)
