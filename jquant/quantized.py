"""Converted-module math: real integer inference as torch's quantized modules compute it.

Counterparts: ``torch.ao.nn.quantized`` — ``nnq.Quantize`` / ``nnq.DeQuantize``,
``nnq.Linear`` and ``nniq.LinearReLU``, ``nnq.Conv1d/2d/3d`` and ``nniq.ConvReLU1d/2d/3d``,
``nnq.Embedding`` / ``nnq.EmbeddingBag`` — with their ``from_float`` (weight observation and
quantization, BN folding through ``torch.nn.utils.fusion.fuse_conv_bn_weights`` /
``fuse_linear_bn_weights``) and the packed-weight kernels behind them (fbgemm / x86,
qnnpack, onednn; ``quantized::embedding_bag_byte`` / ``_4bit``).

This module is the single place that defines what a converted module computes; the Linen
and NNX ``convert`` call these functions. It is Flax-agnostic: pure functions over arrays
and NamedTuple containers (pytrees; they cross ``jax.jit`` and ``jax.export``).

Containers:

* :class:`QTensor` ``(q, scale, zero_point)`` — a quantized activation (torch's quantized
  tensor): integer array plus its per-tensor qparams.
* :class:`PackedLinear` / :class:`PackedConv` — int8 weight (Linear in torch's ``(out,
  in)`` layout, Conv in Flax's ``(*kernel, in / groups, out)``: the layouts XLA:CPU's int8
  kernels are fast with) with per-tensor or per-channel qparams (one per output channel),
  float bias, and the module's output ``(scale, zero_point)``.
* :class:`PackedEmbedding` — quantized embedding rows as torch's
  ``embedding_bag_prepack`` stores them: 8-bit (uint8 rows, float32 scale and bias) or
  4-bit (two values per byte, element ``2k`` in the low nibble, float16 scale and bias).

Converting a module (what a front end's ``convert`` calls)::

    w = kernel_to_torch(kernel, "dense")                     # Flax (in, out) -> (out, in)
    # (Conv: kernel_to_torch(kernel, "conv"), pack_conv, quantized_conv)
    # fused Linear/Conv + BN: w, b = fuse_linear_bn_weights(...) / fuse_conv_bn_weights(...)
    out_qparams = activation_qparams(act_post_process, act_state)
    p = pack_linear(w, b, weight_post_process, weight_state, output_qparams=out_qparams)
    x = quantize(x_float, *activation_qparams(stub_post_process, stub_state))   # QuantStub
    y = quantized_linear(x, p, relu=False)                   # -> QTensor
    y_float = dequantize(y)                                  # DeQuantStub

Requantization (``requant=``; REFERENCE §9.4, verified against torch 2.13 on this CPU):

* ``"fbgemm"`` (default; torch's x86 / fbgemm Linear, and x86 Conv where torch routes it
  to fbgemm): ``acc = sum((x - zx) * (w - zw))`` exactly in int32;
  ``m = f32(sx * sw[j])``; ``raw = fma(b[j], f32(1 / m), f32(acc))`` (one rounding: the
  compiled fbgemm kernel behaves as a fused multiply-add by the reciprocal; the plain
  ``f32(acc) + f32(b / m)`` of REFERENCE §9.4 disagrees with torch on outputs within an
  ulp of a rounding boundary — found by adversarial search, ~1 in 1000 of those — and on
  none of ~10^6 random outputs); ``y = clamp(rne(f32(raw * f32(m / so))) + zo, 0, 255)``.
* ``"qnnpack"``: the bias is first quantized to int32 with scale ``m``
  (``rne(b * f32(1 / m))``), added to ``acc``, and ``y = clamp(rne(f32(f32(acc + qb) *
  f32(m * f32(1 / so)))) + zo, 0, 255)``. (REFERENCE §9.4 says qnnpack matches the fbgemm
  formula; torch's qnnpack differs from it on ~0.05% of random outputs — this rule matches
  every one.)
* ``"onednn"`` (torch's onednn engine, and the x86 engine's Conv on CPUs with
  AVX512-VNNI, see :func:`x86_conv_requant`): ``s = f32(1 / f32(1 / sx))`` (torch hands
  oneDNN reciprocal scales), ``t = f32(f32(f32(acc) * s) * w[j]) + b[j]`` with
  ``w = sw`` for Conv and ``w = f32(1 / f32(1 / sw))`` for Linear (matmul),
  ``y = clamp(rne(f32(t * f32(1 / so))) + zo, 0, 255)`` — fitted to torch 2.13 on
  outputs next to rounding boundaries, where every other candidate failed.

Fused ReLU variants clamp the low end at ``zo``. The integer accumulation is exact
(``preferred_element_type=jnp.int32``), so torch deviates from these rules only where its
kernels do: fbgemm's u8 x s8 pairwise int16 accumulation saturates when activations use
all 8 bits (the x86/fbgemm qconfigs use ``reduce_range`` activations for that reason).

Numerics: XLA:CPU contracts ``a * b + c`` into FMAs and rewrites divisions by broadcast
operands into reciprocal multiplies, while torch rounds each op on its own except where a
kernel fuses (the rules above). Products that feed an addition, divisions, and the fused
multiply-adds torch's kernels perform are therefore formed in float64 and rounded once to
float32 (round-to-odd for the FMA), which is IEEE float32 bit for bit. The rounding is
done with ``lax.reduce_precision`` inside float64 before the cast, because XLA (excess
precision allowed) deletes ``f64 -> f32 -> f64`` convert pairs between two such ops.
Denormal results flush to zero, as XLA:CPU does everywhere.

Embedding differences from torch (documented and tested):

* ``nnq.EmbeddingBag`` always sums (it passes mode 0 to its kernel): ``mode="mean"`` and
  ``"max"`` return bag sums in torch. :func:`quantized_embedding_bag` honours ``mode``;
  ``mode="sum"`` is torch's computation bit for bit.
* A 4-bit ``nnq.Embedding`` fails at forward in torch; :func:`quantized_embedding` looks
  up 4-bit rows as the 4-bit bag kernel does.
* For an odd embedding dim, torch's 4-bit path is broken: its ``quint4x2`` tensor packs
  the values across row boundaries, so every row after the first is misaligned in the
  packed rows, and the kernel returns ``dim + 1`` columns. jquant packs each row
  byte-aligned (a zero padding nibble) and returns ``dim`` columns (pass
  ``embedding_dim``).
* ``padding_idx`` (float ``EmbeddingBag`` semantics: left out of its bag and of the mean's
  count) is honoured; ``nnq.EmbeddingBag`` has none.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import re
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant import _numerics as nm
from jquant._config import Factory, register_state
from jquant.fake_quant_ops import quantize_per_channel, quantize_per_tensor
from jquant.fake_quantize import FakeQuantizeBase
from jquant.layers import torch_weight_perm
from jquant.observers import ObserverBase
from jquant.types import QScheme, canonical_dtype, dtype_name

__all__ = [
    "QTensor", "PackedLinear", "PackedConv", "PackedEmbedding", "REQUANT_RULES",
    "kernel_to_torch", "torch_to_kernel", "activation_qparams", "quantize_weight",
    "fuse_conv_bn_weights", "fuse_linear_bn_weights", "pack_linear", "pack_conv",
    "quantize", "dequantize", "quantized_linear", "quantized_conv", "x86_conv_requant",
    "pack_embedding", "unpack_embedding", "quantized_embedding", "quantized_embedding_bag",
    "param_bytes", "BACKENDS", "requant_rule", "check_observed", "unobserved_field",
    "unobserved_error", "pack_layer",
    "activation_flow", "emit", "emit_float", "leave_quantized", "take",
]

REQUANT_RULES = ("fbgemm", "qnnpack", "onednn")
_F32 = jnp.float32


# ----------------------------------------------------------------------------------------
# containers
# ----------------------------------------------------------------------------------------

@register_state
class QTensor(NamedTuple):
    """A quantized activation; torch's per-tensor quantized tensor (``quint8`` / ``qint8``).

    ``q``: uint8 or int8 array (any shape). ``scale``: float32 ``()``. ``zero_point``: int32
    ``()``. The real value is ``(q - zero_point) * scale`` (:meth:`dequantize`).
    """
    q: jax.Array
    scale: jax.Array
    zero_point: jax.Array

    def dequantize(self):
        """``(q - zero_point) * scale`` in float32; ``Tensor.dequantize``."""
        return dequantize(self)

    @property
    def shape(self):
        return self.q.shape

    @property
    def dtype(self):
        return self.q.dtype


@register_state
class PackedLinear(NamedTuple):
    """Parameters of a converted Linear / Dense (``nnq.Linear``, ``nniq.LinearReLU``).

    ``weight``: int8 ``(out, in)`` (torch layout). ``weight_scale``: float32 ``(1,)``
    (per-tensor) or ``(out,)`` (per-channel). ``weight_zero_point``: int32, same shape.
    ``bias``: float32 ``(out,)`` or ``None``. ``scale`` / ``zero_point``: the output
    qparams, float32 ``()`` / int32 ``()``.
    """
    weight: jax.Array
    weight_scale: jax.Array
    weight_zero_point: jax.Array
    bias: Optional[jax.Array]
    scale: jax.Array
    zero_point: jax.Array


@register_state
class PackedConv(NamedTuple):
    """Parameters of a converted Conv1d/2d/3d (``nnq.ConvNd``, ``nniq.ConvReLUNd``).

    Same fields as :class:`PackedLinear`, but ``weight`` is int8 in Flax's layout
    ``(*kernel_size, in / groups, out)`` (``kernel_to_torch(weight, "conv")`` gives torch's
    ``(out, in / groups, *kernel_size)``): XLA:CPU's fast int8 convolution needs that
    physical layout, and a transpose inside ``jit`` is folded into the convolution (1000x
    slower measured). Stride, padding, dilation and groups are static arguments of
    :func:`quantized_conv`.
    """
    weight: jax.Array
    weight_scale: jax.Array
    weight_zero_point: jax.Array
    bias: Optional[jax.Array]
    scale: jax.Array
    zero_point: jax.Array


@register_state
class PackedEmbedding(NamedTuple):
    """Quantized embedding rows, packed as torch's ``embedding_bag_prepack`` stores them.

    8-bit: ``weight`` uint8 ``(num, dim)``, ``scale`` and ``bias`` float32 ``(num,)``.
    4-bit: ``weight`` uint8 ``(num, ceil(dim / 2))`` holding two values per byte (element
    ``2k`` in the low nibble), ``scale`` and ``bias`` float16 ``(num,)``. The bit width is
    read from ``scale.dtype``. ``bias = -(zero_point * scale)`` (rounded to float16 for
    4-bit), so a row element is ``fma(q, scale, bias)``.
    """
    weight: jax.Array
    scale: jax.Array
    bias: jax.Array

    @property
    def bits(self) -> int:
        return 4 if np.dtype(self.scale.dtype) == np.dtype(jnp.float16) else 8


# ----------------------------------------------------------------------------------------
# exact float32 arithmetic helpers (see module docstring, "Numerics")
# ----------------------------------------------------------------------------------------

def _mul(a, b):
    return nm.exact_f32(lambda u, v: u * v, a, b)


def _scalar(v, name, dtype):
    v = jnp.asarray(v)
    if v.size != 1:
        raise ValueError(f"{name} must hold one value, got shape {v.shape}")
    return jnp.reshape(v, ()).astype(dtype)


# ----------------------------------------------------------------------------------------
# layouts, qparams, weight quantization, BN folding
# ----------------------------------------------------------------------------------------

def kernel_to_torch(kernel, layout: str):
    """A Flax kernel in torch's weight layout (output channel first).

    ``layout``: ``"dense"`` (``(in, out) -> (out, in)``), ``"conv"`` (``(*spatial, in/groups,
    out) -> (out, in/groups, *spatial)``) or ``"embedding"`` (``(num, dim)``, unchanged).
    """
    kernel = jnp.asarray(kernel)
    perm = torch_weight_perm(layout, kernel.ndim)
    return kernel if perm is None else jnp.transpose(kernel, perm)


def torch_to_kernel(weight, layout: str):
    """Inverse of :func:`kernel_to_torch`: a torch-layout weight in Flax's layout."""
    weight = jnp.asarray(weight)
    perm = torch_weight_perm(layout, weight.ndim)
    if perm is None:
        return weight
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return jnp.transpose(weight, inv)


def _build(post_process):
    if isinstance(post_process, (ObserverBase, FakeQuantizeBase)):
        return post_process
    if isinstance(post_process, Factory) or isinstance(post_process, type):
        built = post_process()
        if isinstance(built, (ObserverBase, FakeQuantizeBase)):
            return built
    raise ValueError(f"post_process={post_process!r} is not an observer / fake-quantize config "
                     f"(or a class / factory building one)")


def activation_qparams(post_process, state):
    """``(scale float32 (), zero_point int32 ())`` of an activation post-process.

    torch's ``float(scale), int(zero_point)`` from
    ``activation_post_process.calculate_qparams()`` in ``from_float`` (for
    ``FusedMovingAvgObsFakeQuantize`` that is the observer's rule, not its buffers, as
    torch).
    """
    pp = _build(post_process)
    scale, zp = _calculate_qparams_jit(state, pp)
    return _scalar(scale, "scale", _F32), _scalar(zp, "zero_point", jnp.int32)


@functools.partial(jax.jit, static_argnums=(1,))
def _calculate_qparams_jit(state, pp):
    return pp.calculate_qparams(state)


def _qscheme(pp):
    qs = getattr(pp, "qscheme", None)
    if qs is None:
        raise ValueError(f"post_process {pp!r} has no qscheme: it cannot quantize a weight")
    return qs


def quantize_weight(weight, post_process, state=None, *, observe: bool = True):
    """Observes and quantizes a float weight as torch's ``from_float`` does.

    torch's ``weight_post_process(mod.weight)`` then ``_quantize_weight``: per-tensor
    (``quantize_per_tensor``), per-channel (``quantize_per_channel`` along the observer's
    ``ch_axis``, integer zero point) or per-channel float qparams (embeddings: the zero
    point is added before rounding), then clamped to the observer's
    ``[quant_min, quant_max]`` (``_clamp_weights``).

    Args:
      weight: float array in torch's layout (output channel / embedding row first).
      post_process: the weight observer / fake-quantize config (instance, class or
        factory), e.g. ``qconfig.weight()``.
      state: its state. ``None`` (PTQ): a fresh one is made (``init(weight)``). A QAT
        ``weight_fake_quant`` state is used as is.
      observe: run the post-process on ``weight`` first (torch's default
        ``use_precomputed_fake_quant=False``; it updates the observer if enabled).
    Returns:
      ``(q, scale, zero_point, new_state)``: ``q`` in the post-process dtype (int8 / uint8;
      ``quint4x2`` values 0..15 as uint8, unpacked); ``scale`` float32 and
      ``zero_point`` int32 (float32 for float qparams), shape ``(1,)`` or ``(C,)``.
    """
    pp = _build(post_process)
    _qscheme(pp)
    return _quantize_weight_impl(jnp.asarray(weight, _F32), state, pp, bool(observe))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _quantize_weight_impl(w, state, pp, observe):
    if state is None:
        state = pp.init(w)
    if observe:
        _, state = pp.apply(state, w)
    scale, zp = pp.calculate_qparams(state)
    qs = _qscheme(pp)
    dtype = canonical_dtype(pp.dtype)
    qmin, qmax = int(pp.quant_min), int(pp.quant_max)
    if qs in (QScheme.PER_TENSOR_AFFINE, QScheme.PER_TENSOR_SYMMETRIC):
        q = quantize_per_tensor(w, scale, zp.astype(jnp.int32), dtype)
        scale = jnp.reshape(scale.astype(_F32), (1,))
        zp = jnp.reshape(zp.astype(jnp.int32), (1,))
    elif qs in (QScheme.PER_CHANNEL_AFFINE, QScheme.PER_CHANNEL_SYMMETRIC):
        q = quantize_per_channel(w, scale, zp.astype(jnp.int32), pp.ch_axis, dtype)
        scale, zp = scale.astype(_F32), zp.astype(jnp.int32)
    elif qs == QScheme.PER_CHANNEL_AFFINE_FLOAT_QPARAMS:
        axis = pp.ch_axis % w.ndim
        shape = [1] * w.ndim
        shape[axis] = w.shape[axis]
        s = scale.astype(_F32).reshape(shape)
        z = zp.astype(_F32).reshape(shape)
        # torch: lrintf(f32(x * f32(1/s)) + zp), the product rounded on its own.
        qf = nm.rne(_mul(w, _F32(1.0) / s) + z)
        lo, hi = (0, 15) if dtype_name(dtype) == "uint4" else (int(np.iinfo(np.dtype(dtype)).min),
                                                                int(np.iinfo(np.dtype(dtype)).max))
        qf = jnp.where(jnp.isnan(qf), jnp.float32(lo), jnp.clip(qf, lo, hi))
        dtype = np.dtype(jnp.uint8) if dtype_name(dtype) == "uint4" else dtype
        q = qf.astype(dtype)
        scale, zp = scale.astype(_F32), zp.astype(_F32)
    else:  # pragma: no cover - QScheme is closed
        raise ValueError(f"qscheme={qs} cannot quantize a weight")
    if dtype_name(q.dtype) == "uint4":
        q = q.astype(jnp.uint8)
    q = jnp.clip(q, qmin, qmax).astype(q.dtype)
    return q, scale, zp, state


def _bn_vectors(running_mean, running_var, weight, bias, conv_bias):
    rm = jnp.asarray(running_mean, _F32)
    rv = jnp.asarray(running_var, _F32)
    g = jnp.ones_like(rm) if weight is None else jnp.asarray(weight, _F32)
    be = jnp.zeros_like(rm) if bias is None else jnp.asarray(bias, _F32)
    cb = jnp.zeros_like(rm) if conv_bias is None else jnp.asarray(conv_bias, _F32)
    return rm, rv, g, be, cb


def _rsqrt(v, eps):
    # torch.rsqrt(var + eps) on float32: f32(var + f32(eps)), sqrt, then 1 / sqrt.
    s = jnp.sqrt(v + _F32(eps))
    return nm.true_divide(_F32(1.0), s)


def fuse_conv_bn_weights(conv_w, conv_b, bn_rm, bn_rv, bn_eps, bn_w, bn_b, transpose=False):
    """Folds an eval-mode BatchNorm into conv weights; ``torch.nn.utils.fusion.fuse_conv_bn_weights``.

    ``w' = w * (bn_w * rsqrt(bn_rv + eps))`` (per output channel: axis 0, or axis 1 with
    ``transpose``) and ``b' = ((b - bn_rm) * rsqrt(bn_rv + eps)) * bn_w + bn_b``, every op
    rounded as torch's separate float32 ops. ``conv_b``, ``bn_w``, ``bn_b`` may be
    ``None``. Weights in torch layout; returns ``(w', b')`` with ``w'`` in ``conv_w``'s
    dtype and ``b'`` in ``conv_b``'s (``conv_w``'s when ``None``).
    """
    conv_w = jnp.asarray(conv_w)
    bdtype = conv_w.dtype if conv_b is None else jnp.asarray(conv_b).dtype
    rm, rv, g, be, cb = _bn_vectors(bn_rm, bn_rv, bn_w, bn_b, conv_b)
    rsq = _rsqrt(rv, bn_eps)
    factor = g * rsq
    shape = [1] * conv_w.ndim
    shape[1 if transpose else 0] = -1
    w = (conv_w.astype(_F32) * factor.reshape(shape)).astype(conv_w.dtype)
    b = (_mul(_mul(cb - rm, rsq), g) + be).astype(bdtype)
    return w, b


def fuse_linear_bn_weights(linear_w, linear_b, bn_rm, bn_rv, bn_eps, bn_w, bn_b):
    """Folds an eval-mode BatchNorm1d into a Linear; ``torch.nn.utils.fusion.fuse_linear_bn_weights``.

    ``s = bn_w * rsqrt(bn_rv + eps)``, ``w' = w * s[:, None]``,
    ``b' = (b - bn_rm) * s + bn_b`` (torch's rounding order, which differs from the conv
    version's). ``linear_w``: ``(out, in)``. Returns ``(w', b')``.
    """
    linear_w = jnp.asarray(linear_w)
    bdtype = linear_w.dtype if linear_b is None else jnp.asarray(linear_b).dtype
    rm, rv, g, be, lb = _bn_vectors(bn_rm, bn_rv, bn_w, bn_b, linear_b)
    s = g * _rsqrt(rv, bn_eps)
    w = (linear_w.astype(_F32) * s[:, None]).astype(linear_w.dtype)
    b = (_mul(lb - rm, s) + be).astype(bdtype)
    return w, b


def _output_qparams(output_qparams):
    if output_qparams is None or len(output_qparams) != 2:
        raise ValueError("output_qparams must be (scale, zero_point), e.g. "
                         "activation_qparams(activation_post_process, state)")
    s, z = output_qparams
    return _scalar(s, "output scale", _F32), _scalar(z, "output zero_point", jnp.int32)


def _pack(weight, bias, post_process, state, output_qparams, observe, what):
    pp = _build(post_process)
    if dtype_name(canonical_dtype(pp.dtype)) != "int8":
        raise ValueError(f"post_process: {what} weights must be quantized to qint8 (jnp.int8), "
                         f"got dtype={dtype_name(canonical_dtype(pp.dtype))}")
    qs = _qscheme(pp)
    if qs == QScheme.PER_CHANNEL_AFFINE_FLOAT_QPARAMS:
        raise ValueError(f"post_process: qscheme per_channel_affine_float_qparams is for "
                         f"embeddings, not {what} weights")
    if qs.is_per_channel and pp.ch_axis % jnp.ndim(weight) != 0:
        raise ValueError(f"post_process: per-channel {what} weights need ch_axis=0 (the output "
                         f"channel in torch's layout), got ch_axis={pp.ch_axis}")
    q, scale, zp, _ = quantize_weight(weight, pp, state, observe=observe)
    n_out = q.shape[0]
    b = None
    if bias is not None:
        b = jnp.asarray(bias, _F32)
        if b.shape != (n_out,):
            raise ValueError(f"bias must have shape ({n_out},), got {b.shape}")
    s, z = _output_qparams(output_qparams)
    return q, scale, zp, b, s, z


def pack_linear(weight, bias, post_process, state=None, *, output_qparams,
                observe: bool = True) -> PackedLinear:
    """A converted Linear's parameters; ``nnq.Linear.from_float``.

    Args:
      weight: float ``(out, in)`` in torch's layout (use ``kernel_to_torch(kernel,
        "dense")`` for a Flax kernel; fold BN first with :func:`fuse_linear_bn_weights`).
      bias: float ``(out,)`` or ``None``.
      post_process, state: the weight observer / fake quant (dtype qint8) and its state
        (``None`` for PTQ: ``qconfig.weight()`` is run on ``weight``; the QAT
        ``weight_fake_quant`` state otherwise). See :func:`quantize_weight`.
      output_qparams: the module output's ``(scale, zero_point)`` —
        :func:`activation_qparams` of its activation post-process.
      observe: run the weight post-process on ``weight`` first (torch does).
    """
    return PackedLinear(*_pack(weight, bias, post_process, state, output_qparams, observe,
                               "Linear"))


def pack_conv(weight, bias, post_process, state=None, *, output_qparams,
              observe: bool = True) -> PackedConv:
    """A converted Conv1d/2d/3d's parameters; ``nnq.ConvNd.from_float``.

    ``weight``: float ``(out, in / groups, *kernel_size)`` in torch's layout (use
    ``kernel_to_torch(kernel, "conv")`` for a Flax kernel; fold BN first with
    :func:`fuse_conv_bn_weights`); it is observed and quantized in that layout (per-channel
    along axis 0, as torch) and stored in Flax's layout (see :class:`PackedConv`). Other
    arguments as :func:`pack_linear`.
    """
    if jnp.ndim(weight) not in (3, 4, 5):
        raise ValueError(f"weight must be 3-D, 4-D or 5-D (Conv1d/2d/3d), got shape "
                         f"{jnp.shape(weight)}")
    q, scale, zp, b, so, zo = _pack(weight, bias, post_process, state, output_qparams, observe,
                                    "Conv")
    return PackedConv(torch_to_kernel(q, "conv"), scale, zp, b, so, zo)


# ----------------------------------------------------------------------------------------
# quantize / dequantize stubs
# ----------------------------------------------------------------------------------------

def quantize(x, scale, zero_point, dtype=jnp.uint8) -> QTensor:
    """``nnq.Quantize`` (a converted QuantStub): ``torch.quantize_per_tensor``.

    ``q = clamp(zp + rne(x * f32(1 / scale)), dtype range)``. ``scale`` / ``zero_point``:
    one value each (e.g. :func:`activation_qparams` of the stub's observer). ``dtype``:
    uint8 (quint8) or int8 (qint8). Returns a :class:`QTensor` of ``x``'s shape.
    """
    d = canonical_dtype(dtype, argname="dtype")
    if dtype_name(d) not in ("uint8", "int8"):
        raise ValueError(f"dtype={dtype_name(d)}: activations quantize to uint8 or int8")
    return _quantize_impl(jnp.asarray(x, _F32), jnp.asarray(scale), jnp.asarray(zero_point), d)


@functools.partial(jax.jit, static_argnums=(3,))
def _quantize_impl(x, scale, zero_point, dtype):
    s = _scalar(scale, "scale", _F32)
    z = _scalar(zero_point, "zero_point", jnp.int32)
    return QTensor(quantize_per_tensor(x, s, z, dtype), s, z)


def dequantize(x: QTensor):
    """``nnq.DeQuantize`` / ``Tensor.dequantize``: ``(q - zero_point) * scale`` in float32."""
    if not isinstance(x, QTensor):
        raise ValueError(f"dequantize expects a QTensor, got {type(x).__name__}")
    return _dequantize_impl(x)


@jax.jit
def _dequantize_impl(x):
    return (x.q.astype(_F32) - x.zero_point.astype(_F32)) * x.scale.astype(_F32)


# ----------------------------------------------------------------------------------------
# integer linear / conv
# ----------------------------------------------------------------------------------------

def _check_activation(x):
    if not isinstance(x, QTensor):
        raise ValueError(f"expected a QTensor activation (see quantize), got {type(x).__name__}")
    name = dtype_name(x.q.dtype)
    if name not in ("uint8", "int8"):
        raise ValueError(f"activation dtype must be uint8 or int8, got {name}")
    return name


def _shift_to_int8(q):
    """``(q - shift)`` as int8 and ``shift`` (128 for uint8, 0 for int8)."""
    if dtype_name(q.dtype) == "uint8":
        return lax.bitcast_convert_type(q ^ jnp.uint8(128), jnp.int8), 128
    return q, 0


def _check_requant(requant):
    if requant not in REQUANT_RULES:
        raise ValueError(f"requant={requant!r}: expected one of {REQUANT_RULES}")


def _requantize(acc, axis, sx, sw, bias, so, zo, relu, requant, out_dtype, op):
    """int32 accumulators -> quantized outputs by torch's kernel rule (module docstring)."""
    shape = [1] * acc.ndim
    shape[axis] = -1
    sw = sw.astype(_F32).reshape(shape)
    b = None if bias is None else bias.astype(_F32).reshape(shape)
    so = so.astype(_F32)
    a = acc.astype(_F32)
    if requant == "fbgemm":
        m = sx * sw
        raw = a if b is None else nm.fma_f32(b, nm.true_divide(_F32(1.0), m), a)
        y = nm.rne(raw * nm.true_divide(m, so))
    elif requant == "qnnpack":
        m = sx * sw
        if b is not None:
            qb = nm.rne(b * nm.true_divide(_F32(1.0), m))
            qb = jnp.clip(qb, -2.0 ** 31, 2.0 ** 31 - 128).astype(jnp.int32)
            acc = acc + qb
        mult = _mul(m, nm.true_divide(_F32(1.0), so))
        y = nm.rne(acc.astype(_F32) * mult)
    else:  # onednn
        # torch passes 1.0 / input_scale (double) as a float; oneDNN inverts it again. The
        # Linear (matmul) path does the same to the weight scales; the Conv path does not.
        s_eff = nm.true_divide(_F32(1.0), nm.exact_f32(lambda u: 1.0 / u, sx))
        if op == "linear":
            sw = nm.true_divide(_F32(1.0), nm.exact_f32(lambda u: 1.0 / u, sw))
        t = _mul(_mul(a, s_eff), sw)
        if b is not None:
            t = t + b
        y = nm.rne(t * nm.true_divide(_F32(1.0), so))
    info = np.iinfo(np.dtype(out_dtype))
    lo, hi = int(info.min), int(info.max)
    y = jnp.clip(y, -2.0 ** 24, 2.0 ** 24).astype(jnp.int32) + zo.astype(jnp.int32)
    low = jnp.maximum(zo.astype(jnp.int32), lo) if relu else lo
    return jnp.clip(y, low, hi).astype(out_dtype)


def _wzp_mode(zw):
    """Static weight-zero-point handling: False (all zero), True (some non-zero), None (traced)."""
    if nm.is_concrete(zw):
        return bool(np.any(np.asarray(zw) != 0))
    return None


def _apply_wzp(acc, zw, mode, correction):
    if mode is None:
        return lax.cond(jnp.any(zw != 0), correction, lambda v: v, acc)
    return correction(acc) if mode else acc


def quantized_linear(x: QTensor, p: PackedLinear, *, relu: bool = False,
                     requant: str = "fbgemm") -> QTensor:
    """Integer Linear; ``nnq.Linear`` (``nniq.LinearReLU`` with ``relu=True``).

    Args:
      x: :class:`QTensor` ``(..., in)``, uint8 (quint8, as torch) or int8.
      p: :class:`PackedLinear`.
      relu: fused ReLU (outputs clamp low at the output zero point).
      requant: ``"fbgemm"`` (x86 / fbgemm), ``"qnnpack"`` or ``"onednn"`` — the kernel
        whose requantization to reproduce (module docstring).
    Returns:
      :class:`QTensor` ``(..., out)`` of ``x``'s dtype with ``p.scale`` / ``p.zero_point``.
      The accumulation is ``lax.dot_general`` on int8 operands with int32 results (uint8
      activations are shifted by 128 and the shift folded into a per-output constant).
    """
    _check_activation(x)
    _check_requant(requant)
    w = p.weight
    if dtype_name(w.dtype) != "int8" or w.ndim != 2:
        raise ValueError(f"Linear weight must be int8 (out, in), got {w.dtype} {tuple(w.shape)}")
    if x.q.shape[-1] != w.shape[1]:
        raise ValueError(f"input features {x.q.shape[-1]} != weight in-features {w.shape[1]}")
    return _linear_impl(x, p, bool(relu), requant, _wzp_mode(p.weight_zero_point))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _linear_impl(x, p, relu, requant, wzp):
    xs, shift = _shift_to_int8(x.q)
    zx = x.zero_point.astype(jnp.int32)
    w = p.weight
    acc = lax.dot_general(xs, w, (((xs.ndim - 1,), (1,)), ((), ())),
                          preferred_element_type=jnp.int32)
    colsum = jnp.sum(w, axis=1, dtype=jnp.int32)
    acc = acc + (jnp.int32(shift) - zx) * colsum
    zw = p.weight_zero_point.astype(jnp.int32)

    def correction(acc):
        rows = jnp.sum(xs, axis=-1, dtype=jnp.int32) + (jnp.int32(shift) - zx) * xs.shape[-1]
        return acc - rows[..., None] * zw

    acc = _apply_wzp(acc, zw, wzp, correction)
    y = _requantize(acc, acc.ndim - 1, x.scale.astype(_F32), p.weight_scale, p.bias, p.scale,
                    p.zero_point, relu, requant, x.q.dtype, "linear")
    return QTensor(y, p.scale.astype(_F32), p.zero_point.astype(jnp.int32))


_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _tuple(v, n, name):
    if isinstance(v, (int, np.integer)):
        return (int(v),) * n
    v = tuple(int(e) for e in v)
    if len(v) != n:
        raise ValueError(f"{name} must have {n} entries for a {n}-D conv, got {v}")
    return v


def _conv_pads(padding, spatial, ksize, strides, dilation):
    """Per-spatial-dim ``(lo, hi)`` pads and the padding mode implied by a string."""
    n = len(spatial)
    if isinstance(padding, str):
        s = padding.upper()
        dil_k = [(k - 1) * d + 1 for k, d in zip(ksize, dilation)]
        if s == "VALID":
            return [(0, 0)] * n, None
        if s == "SAME":
            return [tuple(int(v) for v in pr) for pr in
                    lax.padtype_to_pads(spatial, dil_k, strides, "SAME")], None
        if s == "CIRCULAR":  # flax: wrap-pad the dilated kernel, then VALID
            return [((k - 1) // 2, k // 2) for k in dil_k], "circular"
        if s == "CAUSAL":
            if n != 1:
                raise ValueError("padding='CAUSAL' is only defined for 1-D convs")
            return [(dil_k[0] - 1, 0)], None
        raise ValueError(f"padding={padding!r}: expected 'SAME', 'VALID', 'CIRCULAR', 'CAUSAL', "
                         f"an int, or a sequence of ints / (lo, hi) pairs")
    if isinstance(padding, (int, np.integer)):
        return [(int(padding), int(padding))] * n, None
    padding = list(padding)
    if len(padding) != n:
        raise ValueError(f"padding must have {n} entries for a {n}-D conv, got {padding}")
    pads = []
    for pr in padding:
        if isinstance(pr, (int, np.integer)):
            pads.append((int(pr), int(pr)))
        else:
            lo, hi = pr
            pads.append((int(lo), int(hi)))
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        raise ValueError(f"padding={pads}: negative padding is not supported")
    return pads, None


def x86_conv_requant(groups: int = 1, weight_symmetric: bool = True) -> str:
    """The rule torch's ``x86`` engine uses for a quantized Conv on this host.

    torch 2.13 routes x86 Conv (not Linear) to oneDNN when the CPU has AVX512-VNNI (on
    Linux), ``groups <= 100`` and the weight is symmetric (zero points 0); otherwise to
    fbgemm. Returns ``"onednn"`` or ``"fbgemm"`` for :func:`quantized_conv`'s ``requant``.
    jquant's own default stays ``"fbgemm"`` (host-independent results).
    """
    return "onednn" if (_cpu_has_vnni() and groups <= 100 and weight_symmetric) else "fbgemm"


_VNNI = None


def _cpu_has_vnni() -> bool:
    global _VNNI
    if _VNNI is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = re.search(r"^flags\s*:(.*)$", f.read(), re.M)
            _VNNI = bool(flags) and "avx512_vnni" in flags.group(1).split()
        except OSError:
            _VNNI = False
    return _VNNI


def quantized_conv(x: QTensor, p: PackedConv, *, strides=1, padding=0, dilation=1,
                   groups: int = 1, padding_mode: str = "zeros", relu: bool = False,
                   channels_last: bool = True, requant: str = "fbgemm") -> QTensor:
    """Integer Conv1d/2d/3d; ``nnq.ConvNd`` (``nniq.ConvReLUNd`` with ``relu=True``).

    Args:
      x: :class:`QTensor`, uint8 (quint8, as torch) or int8. ``channels_last=True`` (Flax):
        ``(*batch, *spatial, in)`` (any number of batch dims, or none); ``False`` (torch):
        ``(N, in, *spatial)``.
      p: :class:`PackedConv` (weight ``(*kernel, in / groups, out)``).
      strides, dilation: int or one per spatial dim.
      padding: int, ints per dim (symmetric, torch), ``(lo, hi)`` pairs per dim, or
        ``"SAME"`` / ``"VALID"`` / ``"CIRCULAR"`` / ``"CAUSAL"`` (Flax's strings; torch's
        ``"same"`` / ``"valid"`` too).
      groups: feature groups (torch ``groups``, Flax ``feature_group_count``).
      padding_mode: ``"zeros"`` (pads with the input zero point, i.e. real 0),
        ``"reflect"``, ``"replicate"`` or ``"circular"`` (copies of quantized values).
      relu: fused ReLU. requant: see :func:`quantized_linear` and :func:`x86_conv_requant`.
    Returns:
      :class:`QTensor` in the input's layout with ``p.scale`` / ``p.zero_point``.
      The accumulation is ``lax.conv_general_dilated`` on int8 operands with int32 results
      (the input is padded explicitly with its zero point, then shifted to int8), in
      channels-last layout (1-D convs run as 2-D convs of height 1: XLA:CPU's int8 1-D
      convolution is ~70x slower). ``channels_last=False`` transposes in and out, which
      XLA folds into the convolution: correct but slow (torch-layout interop only).
    """
    _check_activation(x)
    _check_requant(requant)
    w = p.weight
    if dtype_name(w.dtype) != "int8" or w.ndim not in (3, 4, 5):
        raise ValueError(f"Conv weight must be int8 with 3-5 dims, got {w.dtype} {tuple(w.shape)}")
    nsp = w.ndim - 2
    if padding_mode not in _PAD_MODES:
        raise ValueError(f"padding_mode={padding_mode!r}: expected one of {tuple(_PAD_MODES)}")
    groups = int(groups)
    shape = tuple(x.q.shape)
    if channels_last:
        if len(shape) < nsp + 1:
            raise ValueError(f"input must have at least {nsp + 1} dims, got shape {shape}")
        spatial, cin = shape[len(shape) - nsp - 1:-1], shape[-1]
    else:
        if len(shape) != nsp + 2:
            raise ValueError(f"input must be (N, C, *spatial) with {nsp} spatial dims, got {shape}")
        spatial, cin = shape[2:], shape[1]
    if groups < 1 or cin % groups or w.shape[-1] % groups or w.shape[-2] * groups != cin:
        raise ValueError(f"groups={groups}: input channels {cin} / weight {tuple(w.shape)} do not "
                         f"match (weight must be (*kernel, in / groups, out))")
    strides = _tuple(strides, nsp, "strides")
    dilation = _tuple(dilation, nsp, "dilation")
    pads, str_mode = _conv_pads(padding, spatial, tuple(w.shape[:-2]), strides, dilation)
    mode = str_mode or padding_mode
    return _conv_impl(x, p, strides, tuple(pads), dilation, groups, mode, bool(relu),
                      bool(channels_last), requant, _wzp_mode(p.weight_zero_point))


@functools.partial(jax.jit, static_argnums=tuple(range(2, 11)))
def _conv_impl(x, p, strides, pads, dilation, groups, mode, relu, channels_last, requant, wzp):
    w = p.weight                      # (*kernel, in / groups, out)
    nsp = w.ndim - 2
    q = x.q if channels_last else jnp.moveaxis(x.q, 1, -1)
    batch = q.shape[:q.ndim - nsp - 1]
    q = q.reshape((-1,) + q.shape[q.ndim - nsp - 1:])
    if nsp == 1:                      # run 1-D as 2-D with a unit height
        q, w = q[:, None], w[None]
        strides, dilation, pads = (1,) + strides, (1,) + dilation, ((0, 0),) + pads
        nsp = 2
    cin, cout = q.shape[-1], w.shape[-1]
    ksize = tuple(w.shape[:-2])
    zx = x.zero_point.astype(jnp.int32)
    if any(lo or hi for lo, hi in pads):
        full = [(0, 0)] + list(pads) + [(0, 0)]
        if mode == "zeros":
            q = jnp.pad(q, full, mode="constant", constant_values=zx.astype(q.dtype))
        else:
            q = jnp.pad(q, full, mode=_PAD_MODES[mode])
    xs, shift = _shift_to_int8(q)
    sp = "DHW"[3 - nsp:]
    dn = lax.conv_dimension_numbers(xs.shape, w.shape, ("N" + sp + "C", sp + "IO", "N" + sp + "C"))
    acc = lax.conv_general_dilated(xs, w, strides, "VALID", rhs_dilation=dilation,
                                   dimension_numbers=dn, feature_group_count=groups,
                                   preferred_element_type=jnp.int32)
    colsum = jnp.sum(w, axis=tuple(range(w.ndim - 1)), dtype=jnp.int32)
    acc = acc + (jnp.int32(shift) - zx) * colsum
    zw = p.weight_zero_point.astype(jnp.int32)

    def correction(acc):
        # zw[o] * sum over o's window of (x - zx): a grouped conv with an all-ones kernel.
        ones = jnp.ones(ksize + (cin // groups, groups), jnp.int8)
        win = lax.conv_general_dilated(xs, ones, strides, "VALID", rhs_dilation=dilation,
                                       dimension_numbers=dn, feature_group_count=groups,
                                       preferred_element_type=jnp.int32)
        win = win + (jnp.int32(shift) - zx) * int(np.prod(ksize) * (cin // groups))
        per_out = jnp.repeat(win, cout // groups, axis=-1)
        return acc - per_out * jnp.broadcast_to(zw, (cout,))

    acc = _apply_wzp(acc, zw, wzp, correction)
    y = _requantize(acc, acc.ndim - 1, x.scale.astype(_F32), p.weight_scale, p.bias, p.scale,
                    p.zero_point, relu, requant, x.q.dtype, "conv")
    if p.weight.ndim == 3:
        y = y[:, 0]
    y = y.reshape(batch + y.shape[1:])
    if not channels_last:
        y = jnp.moveaxis(y, -1, 1)
    return QTensor(y, p.scale.astype(_F32), p.zero_point.astype(jnp.int32))


# ----------------------------------------------------------------------------------------
# embeddings
# ----------------------------------------------------------------------------------------

def pack_embedding(weight, post_process=None, state=None, *, observe: bool = True) -> PackedEmbedding:
    """A converted Embedding / EmbeddingBag's rows; ``nnq.Embedding(Bag).from_float``.

    Args:
      weight: float ``(num_embeddings, dim)``.
      post_process: a per-row float-qparams weight observer / fake quant
        (``per_channel_affine_float_qparams``, ``ch_axis=0``, dtype quint8 or quint4x2),
        e.g. ``default_embedding_qat_qconfig.weight()`` or
        ``float_qparams_weight_only_qconfig.weight()``; ``None`` means the latter (8-bit),
        as torch's fallback.
      state, observe: as :func:`quantize_weight` (QAT: the ``weight_fake_quant`` state).
    Returns:
      :class:`PackedEmbedding`: 8-bit rows with float32 ``scale`` and ``bias =
      f32(-(zero_point * scale))``, or 4-bit rows packed two per byte with both rounded to
      float16 — exactly torch's ``embedding_bag_prepack`` / ``embedding_bag_4bit`` storage.
    """
    if post_process is None:
        from jquant.qconfig import float_qparams_weight_only_qconfig
        post_process = float_qparams_weight_only_qconfig.weight()
    pp = _build(post_process)
    if _qscheme(pp) != QScheme.PER_CHANNEL_AFFINE_FLOAT_QPARAMS:
        raise ValueError(f"post_process: embedding weights need qscheme "
                         f"per_channel_affine_float_qparams, got {_qscheme(pp).value}")
    name = dtype_name(canonical_dtype(pp.dtype))
    if name not in ("uint8", "uint4"):
        raise ValueError(f"post_process: embedding weights quantize to quint8 or quint4x2, got {name}")
    if jnp.ndim(weight) != 2:
        raise ValueError(f"weight must be (num_embeddings, dim), got shape {jnp.shape(weight)}")
    if pp.ch_axis % 2 != 0:
        raise ValueError(f"post_process: embedding qparams must be per row (ch_axis=0), got "
                         f"ch_axis={pp.ch_axis}")
    q, scale, zp, _ = quantize_weight(weight, pp, state, observe=observe)
    return _pack_rows(q, scale, zp, name == "uint4")


@functools.partial(jax.jit, static_argnums=(3,))
def _pack_rows(q, scale, zp, four_bit):
    bias = -(zp.astype(_F32) * scale)
    if not four_bit:
        return PackedEmbedding(q.astype(jnp.uint8), scale, bias)
    num, dim = q.shape
    if dim % 2:
        q = jnp.pad(q, ((0, 0), (0, 1)))
    pairs = q.reshape(num, -1, 2).astype(jnp.uint8)
    packed = pairs[..., 0] | (pairs[..., 1] << 4)
    return PackedEmbedding(packed, scale.astype(jnp.float16), bias.astype(jnp.float16))


def unpack_embedding(p: PackedEmbedding, embedding_dim: Optional[int] = None):
    """The quantized rows as uint8 ``(num, dim)`` (4-bit values 0..15 unpacked)."""
    if p.bits == 8:
        return p.weight
    q = jnp.stack([p.weight & jnp.uint8(15), p.weight >> 4], axis=-1).reshape(p.weight.shape[0], -1)
    return q if embedding_dim is None else q[:, :int(embedding_dim)]


def _rows(p: PackedEmbedding, idx, embedding_dim):
    """Gathered rows ``(..., dim)`` as float32 integers, with float32 scale / bias ``(...)``."""
    w = jnp.take(p.weight, idx, axis=0, mode="clip")
    if p.bits == 4:
        w = jnp.stack([w & jnp.uint8(15), w >> 4], axis=-1).reshape(idx.shape + (-1,))
    if embedding_dim is not None:
        w = w[..., :embedding_dim]
    s = jnp.take(p.scale, idx, axis=0, mode="clip").astype(_F32)
    b = jnp.take(p.bias, idx, axis=0, mode="clip").astype(_F32)
    return w.astype(_F32), s, b


def _check_indices(indices, num):
    indices = jnp.asarray(indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    if nm.is_concrete(indices) and indices.size:
        a = np.asarray(indices)
        if a.min() < 0 or a.max() >= num:
            raise ValueError(f"indices must lie in [0, {num}), got values in [{a.min()}, {a.max()}]")
    return indices


def _check_dim(p, embedding_dim):
    if embedding_dim is None:
        return None
    width = p.weight.shape[1] * (2 if p.bits == 4 else 1)
    embedding_dim = int(embedding_dim)
    if not 0 < embedding_dim <= width:
        raise ValueError(f"embedding_dim={embedding_dim} must lie in [1, {width}]")
    return embedding_dim


def quantized_embedding(indices, p: PackedEmbedding, *, embedding_dim: Optional[int] = None):
    """Quantized embedding lookup; ``nnq.Embedding`` (``quantized::embedding_byte``).

    ``out[..., k] = fma(q[idx, k], scale[idx], bias[idx])`` in float32 (one rounding, as
    torch's kernel; this differs from the exact ``(q - zp) * scale`` by up to an ulp).
    4-bit rows work too (torch's 4-bit ``nnq.Embedding`` fails at forward).

    Args:
      indices: integer array, any shape (out-of-range indices raise when concrete; under
        ``jit`` they are clamped).
      p: :class:`PackedEmbedding`.
      embedding_dim: the true dim for 4-bit rows of odd dim (default ``2 * packed width``).
    Returns:
      float32 ``(*indices.shape, dim)``.
    """
    idx = _check_indices(indices, p.weight.shape[0])
    return _embedding_impl(idx, p, _check_dim(p, embedding_dim))


@functools.partial(jax.jit, static_argnums=(2,))
def _embedding_impl(idx, p, embedding_dim):
    q, s, b = _rows(p, idx, embedding_dim)
    return nm.fma_f32(q, s[..., None], b[..., None])


_BAG_MODES = ("sum", "mean", "max")


def _bag_length(indices, offsets, include_last_offset, max_bag_size):
    """Static bag-loop length; validates offsets when concrete."""
    if indices.ndim == 2:
        if offsets is not None:
            raise ValueError("offsets must be None when indices is 2-D (each row is one bag)")
        return max(int(indices.shape[1]), 1)
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D (with offsets) or 2-D, got shape {indices.shape}")
    if offsets is None:
        raise ValueError("offsets are required when indices is 1-D")
    offsets = jnp.asarray(offsets)
    if offsets.ndim != 1 or not jnp.issubdtype(offsets.dtype, jnp.integer):
        raise ValueError(f"offsets must be a 1-D integer array, got {offsets.dtype} {offsets.shape}")
    if include_last_offset and offsets.shape[0] < 1:
        raise ValueError("include_last_offset=True needs at least one offset")
    n = int(indices.shape[0])
    if max_bag_size is not None:
        return max(int(max_bag_size), 1)
    if nm.is_concrete(offsets):
        o = np.asarray(offsets).astype(np.int64)
        if o.size and (o[0] != 0 or np.any(np.diff(o) < 0) or o[-1] > n):
            raise ValueError(f"offsets must start at 0, be non-decreasing and not exceed the "
                             f"number of indices ({n}); got {o.tolist()}")
        ends = np.append(o[1:], n) if not include_last_offset else o[1:]
        starts = o if not include_last_offset else o[:-1]
        return max(int((ends - starts).max()) if starts.size else 0, 1)
    return max(n, 1)


def _bag_layout(indices, offsets, include_last_offset, per_sample_weights, length):
    """``(idx (B, L), valid (B, L), psw (B, L) or None)`` with bag members in order."""
    if indices.ndim == 2:
        valid = jnp.ones(indices.shape, bool)
        psw = None if per_sample_weights is None else per_sample_weights.astype(_F32)
        return indices, valid, psw
    n = indices.shape[0]
    if include_last_offset:
        starts, end = offsets[:-1], offsets[-1]
    else:
        starts, end = offsets, jnp.asarray(n, offsets.dtype)
    ends = jnp.concatenate([starts[1:], jnp.reshape(end, (1,))]).astype(jnp.int32)
    starts = starts.astype(jnp.int32)
    pos = starts[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    valid = (pos < ends[:, None]) & (pos < n)
    pos = jnp.clip(pos, 0, max(n - 1, 0))
    idx = jnp.take(indices, pos, axis=0) if n else jnp.zeros(pos.shape, indices.dtype)
    psw = None
    if per_sample_weights is not None:
        psw = (jnp.take(per_sample_weights.astype(_F32), pos, axis=0) if n
               else jnp.zeros(pos.shape, _F32))
    return idx, valid, psw


def quantized_embedding_bag(indices, p: PackedEmbedding, offsets=None, *, mode: str = "sum",
                            per_sample_weights=None, include_last_offset: bool = False,
                            padding_idx: Optional[int] = None,
                            embedding_dim: Optional[int] = None,
                            max_bag_size: Optional[int] = None):
    """Quantized EmbeddingBag; ``nnq.EmbeddingBag`` (``quantized::embedding_bag_byte`` / ``_4bit``).

    ``mode="sum"`` is torch's kernel bit for bit: per bag, over its members in order,
    ``acc = fma(s', q, acc + b')`` with ``s' = f32(scale * w)``, ``b' = f32(bias * w)`` for
    per-sample weight ``w`` (``s' = scale``, ``b' = bias`` without). Unlike
    ``nnq.EmbeddingBag`` (which always sums), ``mode="mean"`` divides that sum by the bag's
    size and ``mode="max"`` takes the element-wise max of the rows (``fma(q, scale,
    bias)``), as the float ``EmbeddingBag`` defines them. Empty bags give 0.

    Args:
      indices: integer ``(B, L)`` (each row one bag; ``offsets`` None) or ``(N,)`` with
        ``offsets``.
      p: :class:`PackedEmbedding` (8-bit or 4-bit).
      offsets: ``(B,)`` bag starts (``(B + 1,)`` with ``include_last_offset``: the last
        entry ends the last bag); must start at 0 and be non-decreasing (checked when
        concrete).
      mode: ``"sum"`` (torch's quantized result), ``"mean"`` or ``"max"``.
      per_sample_weights: float, the shape of ``indices``; ``mode="sum"`` only (as torch).
      padding_idx: entries equal to it are skipped (float EmbeddingBag semantics).
      embedding_dim: the true dim for 4-bit rows of odd dim.
      max_bag_size: static bound on bag length for 1-D input under ``jit`` (default: the
        exact maximum when ``offsets`` is concrete, else ``N``); the bag loop runs that many
        sequential steps, over all bags at once.
    Returns:
      float32 ``(B, dim)``.
    """
    if mode not in _BAG_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {_BAG_MODES}")
    if per_sample_weights is not None and mode != "sum":
        raise ValueError(f"per_sample_weights is only supported for mode='sum' (got mode={mode!r})")
    indices = _check_indices(indices, p.weight.shape[0])
    length = _bag_length(indices, offsets, include_last_offset, max_bag_size)
    if per_sample_weights is not None:
        per_sample_weights = jnp.asarray(per_sample_weights)
        if per_sample_weights.shape != indices.shape:
            raise ValueError(f"per_sample_weights must have the shape of indices {indices.shape}")
    if offsets is not None:
        offsets = jnp.asarray(offsets)
    return _bag_impl(indices, p, offsets, per_sample_weights, mode, bool(include_last_offset),
                     None if padding_idx is None else int(padding_idx),
                     _check_dim(p, embedding_dim), length)


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8))
def _bag_impl(indices, p, offsets, psw, mode, include_last_offset, padding_idx, embedding_dim,
              length):
    idx, valid, psw = _bag_layout(indices, offsets, include_last_offset, psw, length)
    if padding_idx is not None:
        valid = valid & (idx != padding_idx)
    q, s, b = _rows(p, idx, embedding_dim)          # (B, L, D), (B, L), (B, L)
    nbags, dim = q.shape[0], q.shape[-1]
    if psw is not None:
        s, b = _mul(s, psw), _mul(b, psw)
    xs = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(s, 1, 0), jnp.moveaxis(b, 1, 0),
          jnp.moveaxis(valid, 1, 0))
    if mode == "max":
        def step(acc, t):
            qt, st, bt, vt = t
            row = nm.fma_f32(qt, st[:, None], bt[:, None])
            return jnp.where(vt[:, None], jnp.maximum(acc, row), acc), None
        init = jnp.full((nbags, dim), -jnp.inf, _F32)
    else:
        def step(acc, t):
            qt, st, bt, vt = t
            new = nm.fma_f32(st[:, None], qt, acc + bt[:, None])
            return jnp.where(vt[:, None], new, acc), None
        init = jnp.zeros((nbags, dim), _F32)
    out, _ = lax.scan(step, init, xs)
    count = jnp.sum(valid, axis=1)
    if mode == "max":
        return jnp.where(count[:, None] > 0, out, _F32(0.0))
    if mode == "mean":
        mean = nm.true_divide(out, jnp.maximum(count, 1).astype(_F32)[:, None])
        return jnp.where(count[:, None] > 0, mean, _F32(0.0))
    return out


# ----------------------------------------------------------------------------------------
# accounting
# ----------------------------------------------------------------------------------------

def param_bytes(tree) -> int:
    """Bytes held by the array leaves of ``tree`` (a float model's params or converted ones).

    Counts ``size * itemsize`` of every array leaf (4-bit embedding rows are stored packed,
    two per uint8, so they count half a byte each; ``jnp.uint4`` leaves count half a byte).
    Python scalars and ``None`` count nothing.
    """
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            continue
        d = np.dtype(leaf.dtype)
        item = 0.5 if dtype_name(d) in ("uint4", "int4") else d.itemsize
        total += math.prod(leaf.shape) * item
    return int(math.ceil(total))


# ----------------------------------------------------------------------------------------
# front-end wiring: shared by jquant.linen.convert and jquant.nnx.convert
# ----------------------------------------------------------------------------------------

BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")


def requant_rule(backend: str, op: str, *, groups: int = 1, weight_symmetric: bool = True) -> str:
    """The ``requant=`` rule of torch's quantized engine ``backend`` for ``op`` ("linear"/"conv").

    ``"x86"``: Linear through fbgemm, Conv as :func:`x86_conv_requant` decides on this host;
    ``"fbgemm"`` / ``"qnnpack"`` / ``"onednn"``: that kernel's rule for both.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend == "x86":
        return x86_conv_requant(groups, weight_symmetric) if op == "conv" else "fbgemm"
    return backend


def _walk_fields(state, prefix=""):
    if isinstance(state, tuple) and hasattr(type(state), "_fields"):
        for name in state._fields:
            yield from _walk_fields(getattr(state, name), f"{prefix}{name}.")
    else:
        yield prefix[:-1], state


def unobserved_field(state) -> Optional[str]:
    """The name of the ``min_val`` field of ``state`` that never saw data (still +inf), or None."""
    if state is None:
        return None
    for name, v in _walk_fields(state):
        if name.split(".")[-1] != "min_val" or not nm.is_concrete(v):
            continue
        a = np.asarray(v)
        if a.size and np.all(np.isposinf(a)):
            return name
    return None


def unobserved_error(wheres) -> ValueError:
    """The error ``convert`` raises for activation observers that never saw data (``wheres``:
    their module descriptions, all listed)."""
    wheres = list(wheres)
    shown = ", ".join(wheres[:12]) + (f" (+{len(wheres) - 12} more)" if len(wheres) > 12 else "")
    return ValueError(
        f"convert: {len(wheres)} activation observer(s) / fake quant(s) never saw data: {shown}. "
        f"An observer that has not seen any data has no qparams. Run calibration batches "
        f"through the prepared model "
        f"first (Linen: _, upd = prepared.apply(variables, x, mutable=['quant_stats']); "
        f"variables = {{**variables, **upd}}; NNX: call the prepared model on data) or train it "
        f"(QAT), then convert. (torch's convert only warns 'must run observer before calling "
        f"calculate_qparams' and uses scale=1, zero_point=0; jquant refuses.)")


def check_observed(state, where: str) -> None:
    """Raises ``ValueError`` when an observer in ``state`` never saw data (``min_val`` still +inf).

    torch's ``convert`` silently uses ``scale=1, zero_point=0`` (with a warning) for such an
    observer; jquant refuses, naming the module: calibrate (PTQ) or train (QAT) first.
    """
    name = unobserved_field(state)
    if name is not None:
        raise unobserved_error([f"{where} [{name}]"])


def pack_layer(kind: str, kernel, bias, weight_post_process, weight_state, output_qparams, *,
               bn=None, observe: bool = True):
    """A Flax Dense / Conv layer's converted parameters (``from_float`` of nnq.Linear / ConvNd).

    ``kernel``: Flax layout (Dense ``(in, out)``, Conv ``(*spatial, in / groups, out)``).
    ``bn``: ``(running_mean, running_var, eps, gamma, beta)`` of a fused BatchNorm, folded
    first (:func:`fuse_linear_bn_weights` / :func:`fuse_conv_bn_weights`), as torch's
    nniqat / nni ``from_float``. Returns :class:`PackedLinear` or :class:`PackedConv`.
    """
    layout = {"dense": "dense", "linear": "dense", "conv": "conv"}.get(kind)
    if layout is None:
        raise ValueError(f"kind={kind!r}: expected 'dense' or 'conv'")
    w = kernel_to_torch(jnp.asarray(kernel, _F32), layout)
    b = None if bias is None else jnp.asarray(bias, _F32)
    if bn is not None:
        rm, rv, eps, gamma, beta = bn
        fold = fuse_linear_bn_weights if layout == "dense" else fuse_conv_bn_weights
        w, b = fold(w, b, rm, rv, eps, gamma, beta)
    pack = pack_linear if layout == "dense" else pack_conv
    return pack(w, b, weight_post_process, weight_state, output_qparams=output_qparams,
                observe=observe)


class _Flow:
    def __init__(self):
        self.by_id = {}
        self.last = None


_FLOW: contextvars.ContextVar = contextvars.ContextVar("jquant_activation_flow", default=None)


@contextlib.contextmanager
def activation_flow():
    """Scope of one converted-model call: records which qparams each quantized output carries.

    Between converted modules, activations travel as their dequantized float32 values
    (exactly ``(q - zero_point) * scale``), so the model's own code (reshape, relu, max
    pooling, ...) runs on them unchanged; :func:`take` recovers the exact integers with
    the qparams of the producing module (by identity of the array, else the most recent
    quantized output in call order: the preceding observer). Nested scopes share one.
    """
    if _FLOW.get() is not None:
        yield _FLOW.get()
        return
    token = _FLOW.set(_Flow())
    try:
        yield _FLOW.get()
    finally:
        _FLOW.reset(token)


def emit(y: QTensor):
    """A quantized module output as its float carrier (``dequantize(y)``), recorded in the flow."""
    f = dequantize(y)
    flow = _FLOW.get()
    if flow is not None:
        flow.by_id[id(f)] = (f, y.scale, y.zero_point, y.q.dtype)
        flow.last = (y.scale, y.zero_point, y.q.dtype)
    return f


def emit_float(y, qparams, dtype=jnp.uint8):
    """A float module output quantized with its observer's ``qparams`` (torch's quantized
    output of a module kept float here), returned as its float carrier."""
    return emit(quantize(y, *qparams, dtype))


def leave_quantized() -> None:
    """A DeQuantStub: later quantized modules get no preceding observer (until a QuantStub)."""
    flow = _FLOW.get()
    if flow is not None:
        flow.last = None


def take(x, *, reduce_range: bool = False) -> QTensor:
    """The quantized input of a converted module.

    ``x``: a :class:`QTensor` (used as is), a carrier from :func:`emit` (its qparams), any
    other float array inside a quantized region (quantized with the qparams of the most
    recent quantized output: the preceding observer), or a float array with no quantized
    output before it: quantized dynamically with ``choose_qparams_per_tensor(x,
    reduce_range)`` (torch's dynamic-quantization rule; torch's eager model would need a
    QuantStub there).
    """
    if isinstance(x, QTensor):
        return x
    flow = _FLOW.get()
    rec = None if flow is None else flow.by_id.get(id(x))
    if rec is not None and rec[0] is x:
        _, s, z, d = rec
    elif flow is not None and flow.last is not None:
        s, z, d = flow.last
    else:
        from jquant.qparams import choose_qparams_per_tensor
        s, z = choose_qparams_per_tensor(jnp.asarray(x, _F32), reduce_range=reduce_range)
        d = jnp.uint8
    return quantize(jnp.asarray(x, _F32), s, z, d)
