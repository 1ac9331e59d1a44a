"""Bit-level helpers that make XLA arithmetic round the way torch's CPU kernels do.

Internal. Each helper names the torch behaviour it reproduces.
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax import lax

INT32_MIN = -(2 ** 31)
F32 = jnp.float32


def f32(v):
    return jnp.asarray(v, dtype=F32)


def rne(v):
    """Round half to even (``torch.round``, ``std::nearbyint``)."""
    return jnp.round(v)


def x86_f32_to_int32(v):
    """``static_cast<int32_t>(float)`` on x86: NaN, +-inf and out-of-range give INT32_MIN.

    XLA's convert saturates instead; this reproduces torch's CPU result.
    """
    v = f32(v)
    ok = (v >= -2.0 ** 31) & (v < 2.0 ** 31)
    return jnp.where(ok, jnp.where(ok, v, 0.0).astype(jnp.int32), jnp.int32(INT32_MIN))


def in_int64_range(v):
    """True where ``static_cast<int64_t>(v)`` is exact on x86 (finite and |v| < 2**63)."""
    return (v >= -(2.0 ** 63)) & (v < 2.0 ** 63)


def _mul_isolated_cpu(a, b):
    # A conditional is an XLA fusion boundary: its result is materialised, so a following
    # add cannot be contracted with this multiply into an FMA (XLA:CPU contracts otherwise).
    # Both branches compute the same product; the predicate only has to be opaque to the
    # compiler (a constant one would fold the conditional away).
    pred = jnp.all(jnp.isfinite(a)) & jnp.all(jnp.isfinite(b))
    return lax.cond(pred, lambda u, v: u * v, lambda u, v: v * u, a, b)


@jax.custom_batching.custom_vmap
def _mul_isolated(a, b):
    return lax.platform_dependent(a, b, cpu=_mul_isolated_cpu, default=lambda u, v: u * v)


@_mul_isolated.def_vmap
def _mul_isolated_vmap(axis_size, in_batched, a, b):
    # Keep the conditional's predicate unbatched (a batched one becomes a select, which
    # XLA folds away): apply the isolated multiply to the whole batch at once. Each
    # example's operands broadcast against each other (e.g. a scalar constant times a
    # (C,) vector), so both are brought to (axis_size, *broadcast shape) first.
    a_ex = a.shape[1:] if in_batched[0] else a.shape
    b_ex = b.shape[1:] if in_batched[1] else b.shape
    out_ex = tuple(jnp.broadcast_shapes(a_ex, b_ex))

    def lift(x, batched, ex):
        if batched:  # batch axis first, then the example's dims right-aligned
            x = x.reshape((axis_size,) + (1,) * (len(out_ex) - len(ex)) + tuple(ex))
        return jnp.broadcast_to(x, (axis_size,) + out_ex)

    return _mul_isolated(lift(a, in_batched[0], a_ex), lift(b, in_batched[1], b_ex)), True


@jax.custom_jvp
def _mul_isolated_ad(a, b):
    return _mul_isolated(a, b)


@_mul_isolated_ad.defjvp
def _mul_isolated_jvp(primals, tangents):
    # custom_vmap has no reverse-mode rule; the product's derivative is the plain one, so
    # jax.grad / jax.vjp / export(vjp_order=1) work through the moving-average update.
    a, b = primals
    da, db = tangents
    return _mul_isolated(a, b), da * b + a * db


def unfused(p):
    """A product ``p`` kept apart from the following add (rounded on its own, as torch's
    separate tensor ops round), at no cost: XLA:CPU contracts ``p + c`` into one fused
    multiply-add inside a fusion, and a select on ``p == p`` (LLVM cannot see through it
    without fast-math flags) hides the multiply. A NaN stays NaN.
    """
    return jnp.where(p == p, p, -p)


def mul_rounded(a, b):
    """``f32(a * b)`` rounded on its own, as torch's separate tensor ops round.

    XLA:CPU contracts ``c + a * b`` into one fused multiply-add (one rounding) where torch
    rounds twice; this keeps the product separate on CPU. On other platforms (whose
    torch kernels also contract) it is a plain multiply. Meant for small state tensors.
    Differentiable (forward and reverse mode) like ``a * b``.
    """
    a, b = f32(a), f32(b)
    return _mul_isolated_ad(a, b)


def _fma_round_to_odd(a, b, c):
    # float64 operands from float32: a*b is exact; s = RN64(a*b + c); e = its exact error
    # (TwoSum). Round-to-odd (truncate toward zero, set the last bit when inexact), then one
    # rounding to float32, gives the correctly rounded fused multiply-add. Truncating is a
    # one-ulp step of the magnitude (bits - 1) when s was rounded away from zero.
    p = a * b
    s = p + c
    bb = s - p
    e = (p - (s - bb)) + (c - bb)
    inexact = e != 0
    away = inexact & ((e > 0) != (s > 0))
    bits = lax.bitcast_convert_type(s, jnp.int64)
    bits = (bits - away.astype(jnp.int64)) | inexact.astype(jnp.int64)
    return jnp.where(jnp.isfinite(s), lax.bitcast_convert_type(bits, jnp.float64), s)


def via_f64(fn):
    """``fn`` computed on float32 operands in float64, rounded once to float32 (CPU / GPU).

    The float64 result is rounded to float32 precision *inside* float64 (reduce_precision)
    before the cast: XLA (excess precision allowed) drops f64 -> f32 -> f64 convert pairs
    when the next exact op reads the result, which would skip the rounding.
    """
    def wrapped(*args):
        with enable_x64():
            r = fn(*(f32(a).astype(jnp.float64) for a in args))
            return lax.reduce_precision(r, exponent_bits=8, mantissa_bits=23).astype(jnp.float32)
    return wrapped


def fma_f32(a, b, c):
    """float32 ``a * b + c`` with one rounding (``std::fma`` / vfmadd, as torch's and
    fbgemm's CPU kernels compute it). Arguments broadcast against each other.

    Exact through float64 (round-to-odd) on CPU / GPU; on TPU (no float64) the plain
    expression, which XLA contracts into a fused multiply-add there.
    """
    a, b, c = f32(a), f32(b), f32(c)
    return lax.platform_dependent(a, b, c, tpu=lambda u, v, w: u * v + w,
                                  default=via_f64(_fma_round_to_odd))


def enable_x64():
    """Context manager that traces float64 ops (used for torch's double-precision scalars)."""
    fn = getattr(jax, "enable_x64", None)
    if fn is not None:
        return fn(True)
    exp = getattr(getattr(jax, "experimental", None), "enable_x64", None)
    if exp is not None:
        return exp()
    return contextlib.nullcontext()


def is_concrete(*xs) -> bool:
    """True when no argument is a tracer (so values can be inspected eagerly)."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def exact_f32(fn, *args):
    """``f32(fn(*args))`` for one IEEE op on float32 operands, rounded once to float32.

    XLA rewrites some float32 ops (a division by a constant or a broadcast operand becomes a
    multiplication by the rounded reciprocal, off by one ulp for many inputs): on CPU / GPU
    the op runs in float64 (:func:`via_f64`), which is exact for one op on float32 operands;
    on TPU (no native float64) it is the plain float32 op.
    """
    args = [f32(a) for a in args]
    return lax.platform_dependent(*args, tpu=lambda *a: fn(*a).astype(jnp.float32),
                                  default=via_f64(fn))


def true_divide(a, b):
    """``f32(a / b)`` correctly rounded, with broadcasting (torch's tensor division)."""
    a, b = jnp.broadcast_arrays(f32(a), f32(b))
    return exact_f32(lambda u, v: u / v, a, b)


def div_const(a, c: float):
    """``f32(a / c)`` correctly rounded, for a Python constant ``c`` (kept in float64)."""
    c = float(c)
    return exact_f32(lambda u: u / c, a)


def aminmax(x, axis=None):
    """``(min, max)`` of ``x`` in one pass (a variadic reduce); NaN-propagating like torch.aminmax.

    ``axis``: None (all axes) or an int / tuple of ints.
    """
    x = jnp.asarray(x)
    if axis is None:
        axes = tuple(range(x.ndim))
    elif isinstance(axis, int):
        axes = (axis % x.ndim,)
    else:
        axes = tuple(a % x.ndim for a in axis)
    if not axes:
        return x, x
    # XLA:CPU hands large plain min / max reductions (>= ~10k elements) to a library
    # kernel that skips NaN, where torch.aminmax (and XLA's own variadic reduce) propagate
    # it. Whole-array reductions: one variadic reduce (one pass, as fast). Per-channel ones
    # (where the variadic reduce is ~8x slower): the plain reductions, and the variadic
    # one only when a NaN can be present (the sum is NaN: a NaN, or +inf with -inf).
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.min(x, axis=axes), jnp.max(x, axis=axes)
    if len(axes) == x.ndim:
        return _aminmax_variadic(x, axes)
    mn, mx = jnp.min(x, axis=axes), jnp.max(x, axis=axes)
    maybe_nan = jnp.any(jnp.isnan(jnp.sum(x, axis=axes)))
    return lax.cond(maybe_nan, lambda x, mn, mx: _aminmax_variadic(x, axes),
                    lambda x, mn, mx: (mn, mx), x, mn, mx)


def _aminmax_variadic(x, axes):
    hi, lo = jnp.array(jnp.inf, x.dtype), jnp.array(-jnp.inf, x.dtype)
    return lax.reduce((x, x), (hi, lo),
                      lambda a, b: (lax.min(a[0], b[0]), lax.max(a[1], b[1])), axes)


def _isolate_cpu(f, *args, key=0):
    leaf = jax.tree_util.tree_leaves(args[key])[0]
    pred = jnp.all(jnp.isfinite(leaf))
    return lax.cond(pred, f, f, *args)


def isolate(f, *args, key: int = 0):
    """``f(*args)``, computed on CPU in its own XLA computation (a conditional).

    XLA:CPU fuses small computations (per-channel / per-tensor qparams, a few hundred
    float64 ops on a ``(C,)`` vector) into the large elementwise fusions that consume
    them and then recomputes them for every element (here: 5x slower weight fake quant).
    A conditional is a fusion boundary, so the result is computed once and read back.
    Elsewhere (and under ``vmap`` with a batched predicate) it is a plain call.
    ``key``: index of the argument whose finiteness is the (opaque) predicate; pick a small
    one (a scale), since the predicate is a reduction over it.
    """
    return lax.platform_dependent(*args, cpu=functools.partial(_isolate_cpu, f, key=key),
                                  default=f)


@jax.custom_vjp
def select_flag(pred, on, off):
    """``where(pred, on, off)`` for a run-time flag, with signed-zero-exact gradients.

    ``jnp.where``'s cotangents are ``+0.0`` on the unselected side; when ``on`` and ``off``
    both depend on ``x`` (``y = where(fake_quant_on, fq(x), x)``), ``x``'s cotangent is
    their sum and a ``-0.0`` from ``fq`` (torch's ``dY * mask``) becomes ``+0.0``. Here the
    unselected side gets ``-0.0``, the additive identity, so the sum is exact.
    """
    return jnp.where(pred, on, off)


def _select_flag_fwd(pred, on, off):
    return jnp.where(pred, on, off), pred


def _select_flag_bwd(pred, g):
    neg0 = jnp.full((), -0.0, g.dtype)
    return None, jnp.where(pred, g, neg0), jnp.where(pred, neg0, g)


select_flag.defvjp(_select_flag_fwd, _select_flag_bwd)
