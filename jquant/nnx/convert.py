"""``convert`` for prepared NNX models: real integer inference by graph surgery.

Counterpart: ``torch.ao.quantization.convert`` (eager mode)::

    qmodel = jquant.nnx.convert(prepared)          # after calibration (PTQ) or training (QAT)
    y = nnx.jit(lambda m, x: m(x))(qmodel, x)
    jquant.nnx.parameter_bytes(qmodel)

Swaps (same paths as in the prepared model):

* QAT / observed ``nnx.Linear`` and ``nnx.Conv`` (1-3D), and the fused modules
  (ConvBn[ReLU], ConvReLU, LinearBn, LinearReLU; BatchNorm folded into the weights as
  torch's ``from_float``) -> :class:`QuantizedLinear` / :class:`QuantizedConv`
  (``nnq.Linear`` / ``nnq.ConvNd`` / ``nniq.*ReLU``): int8 weights with per-tensor or
  per-channel qparams in :class:`QuantizedWeight` Variables, output qparams from the
  module's activation observer / fake quant.
* QAT / observed ``nnx.Embed`` and :class:`~jquant.nnx.EmbeddingBag` whose weight config is
  ``per_channel_affine_float_qparams`` -> :class:`QuantizedEmbedding` /
  :class:`QuantizedEmbeddingBag` (8-bit or 4-bit packed rows); other configs stay float
  (torch's convert raises for them).
* ``QuantStub`` -> :class:`Quantize`, ``DeQuantStub`` -> :class:`DeQuantize`.
* Other observed modules (norms, ...) stay float; their output is quantized with their
  observer's qparams (:class:`QuantizedOutput`). Everything else stays as it was.

Activations between modules follow :func:`jquant.quantized.activation_flow`: the root
module's class is swapped for a ``Converted<Root>`` subclass whose ``__call__`` opens the
flow scope (other methods of the root run without it: a converted layer then quantizes a
float input dynamically). Between modules, quantized activations travel as their exact
dequantized values; each converted layer recovers the integers with the qparams of the
module that produced its input (the preceding observer, as torch's eager model passes
quantized tensors).
"""
from __future__ import annotations

import functools
import warnings

import jax.numpy as jnp
from flax import nnx
from flax.nnx import pytreelib

from jquant import layers as _L
from jquant import quantized as Q
from jquant.nnx import modules as M
from jquant.nnx._state import PostProcess
from jquant.observers import NoopObserver, PlaceholderObserver
from jquant.types import canonical_dtype

__all__ = ["convert", "parameter_bytes", "QuantizedWeight", "Quantize", "DeQuantize",
           "QuantizedLinear", "QuantizedConv", "QuantizedEmbedding", "QuantizedEmbeddingBag",
           "QuantizedOutput"]


class QuantizedWeight(nnx.Variable):
    """Integer weights / packed rows and the qparams of a converted module (not trained)."""


def _var(v):
    return None if v is None else QuantizedWeight(jnp.asarray(v))


def _val(v):
    return None if v is None else v.get_value()


class _PackedModule(nnx.Module):
    _packed_type = None

    def _store(self, packed):
        for f in packed._fields:
            setattr(self, f, _var(getattr(packed, f)))

    def packed(self):
        """The :mod:`jquant.quantized` container of this module's parameters."""
        return self._packed_type(**{f: _val(getattr(self, f)) for f in self._packed_type._fields})


class Quantize(nnx.Module):
    """A converted QuantStub; ``nnq.Quantize``: ``quantize_per_tensor(x, scale, zero_point)``."""

    def __init__(self, scale, zero_point, dtype=jnp.uint8):
        self.scale = QuantizedWeight(jnp.asarray(scale))
        self.zero_point = QuantizedWeight(jnp.asarray(zero_point))
        self.dtype = dtype

    def __call__(self, x):
        return Q.emit(Q.quantize(x, self.scale[...], self.zero_point[...], self.dtype))


class DeQuantize(nnx.Module):
    """A converted DeQuantStub; ``nnq.DeQuantize`` (activations are already float carriers)."""

    def __call__(self, x):
        if isinstance(x, Q.QTensor):
            return Q.dequantize(x)
        Q.leave_quantized()
        return x


class QuantizedLinear(_PackedModule):
    """``nnq.Linear`` / ``nniq.LinearReLU``: int8 ``weight`` (out, in), qparams, float bias.

    ``__call__(x)``: ``x`` ``(..., in)`` float (quantized with the producer's qparams) or a
    ``QTensor``; returns the dequantized ``(..., out)`` output (float32).
    """
    _packed_type = Q.PackedLinear

    def __init__(self, packed: Q.PackedLinear, *, relu: bool = False, backend: str = "x86"):
        self._store(packed)
        self.relu = bool(relu)
        self.backend = backend

    def __call__(self, x):
        rule = Q.requant_rule(self.backend, "linear")
        xq = Q.take(x, reduce_range=rule == "fbgemm")
        return Q.emit(Q.quantized_linear(xq, self.packed(), relu=self.relu, requant=rule))


class QuantizedConv(_PackedModule):
    """``nnq.Conv{1,2,3}d`` / ``nniq.ConvReLU{1,2,3}d`` (channels-last, Flax's conventions).

    int8 ``weight`` ``(*kernel, in / groups, out)``; ``strides`` / ``padding`` /
    ``dilation`` / ``groups`` as the float ``nnx.Conv``. Returns the dequantized output.
    """
    _packed_type = Q.PackedConv

    def __init__(self, packed: Q.PackedConv, *, strides=1, padding=0, dilation=1, groups=1,
                 relu: bool = False, backend: str = "x86"):
        self._store(packed)
        self.strides = strides
        self.padding = padding
        self.dilation = dilation
        self.groups = int(groups)
        self.relu = bool(relu)
        self.backend = backend
        zp = jnp.asarray(packed.weight_zero_point)
        self.weight_symmetric = not bool(jnp.any(zp != 0))

    def __call__(self, x):
        rule = Q.requant_rule(self.backend, "conv", groups=self.groups,
                              weight_symmetric=self.weight_symmetric)
        xq = Q.take(x, reduce_range=rule == "fbgemm")
        return Q.emit(Q.quantized_conv(xq, self.packed(), strides=self.strides,
                                       padding=self.padding, dilation=self.dilation,
                                       groups=self.groups, relu=self.relu, requant=rule))


class _OutputQParams:
    def _set_out(self, qparams, dtype):
        self.out_scale = None if qparams is None else QuantizedWeight(qparams[0])
        self.out_zero_point = None if qparams is None else QuantizedWeight(qparams[1])
        self.out_dtype = dtype

    def _out(self, y):
        if self.out_scale is None:
            return y
        return Q.emit_float(y, (self.out_scale[...], self.out_zero_point[...]), self.out_dtype)


class QuantizedEmbedding(_PackedModule, _OutputQParams):
    """``nnq.Embedding``: packed 8-bit (or 4-bit) rows; ``__call__(indices)`` -> float32."""
    _packed_type = Q.PackedEmbedding

    def __init__(self, packed, features, qparams=None, dtype=jnp.uint8):
        self._store(packed)
        self.features = int(features)
        self._set_out(qparams, dtype)

    def __call__(self, inputs):
        return self._out(Q.quantized_embedding(inputs, self.packed(), embedding_dim=self.features))


class QuantizedEmbeddingBag(_PackedModule, _OutputQParams):
    """``nnq.EmbeddingBag`` (8/4-bit rows); ``mode`` honoured (torch always sums, see
    :func:`jquant.quantized.quantized_embedding_bag`)."""
    _packed_type = Q.PackedEmbedding

    def __init__(self, packed, features, *, mode="sum", include_last_offset=False,
                 padding_idx=None, qparams=None, dtype=jnp.uint8):
        self._store(packed)
        self.features = int(features)
        self.mode = mode
        self.include_last_offset = bool(include_last_offset)
        self.padding_idx = padding_idx
        self._set_out(qparams, dtype)

    def __call__(self, inputs, offsets=None, per_sample_weights=None):
        y = Q.quantized_embedding_bag(inputs, self.packed(), offsets, mode=self.mode,
                                      per_sample_weights=per_sample_weights,
                                      include_last_offset=self.include_last_offset,
                                      padding_idx=self.padding_idx, embedding_dim=self.features)
        return self._out(y)


class QuantizedOutput(nnx.Module, _OutputQParams):
    """A float module whose output is quantized with its observer's qparams (e.g. a norm)."""

    def __init__(self, module, qparams, dtype=jnp.uint8):
        self.module = module
        self._set_out(qparams, dtype)

    def __call__(self, *args, **kwargs):
        return self._out(self.module(*args, **kwargs))


# ---------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------

def _strip(mod, base):
    """``mod`` as a plain ``base`` instance (same Variables), without quantization attributes."""
    new = object.__new__(base)
    object.__setattr__(new, "_pytree__state", pytreelib.PytreeState())
    skip = {"_pytree__state", "float_promote_dtype", "qconfig", "weight_fake_quant",
            "activation_post_process", "freeze_bn", "bn_unbiased_running_var"}
    nodes = {k: v for k, v in mod._pytree__nodes.items() if k not in skip}
    for k, v in vars(mod).items():
        if k not in skip and k != "_pytree__nodes":
            object.__setattr__(new, k, v)
    object.__setattr__(new, "_pytree__nodes", type(mod._pytree__nodes)(nodes))
    if "float_promote_dtype" in vars(mod):
        new.promote_dtype = mod.float_promote_dtype
    return new


def _float_version(mod):
    if isinstance(mod, M._ObservedMixin):
        return _strip(mod, type(mod).__mro__[2])
    if hasattr(mod, "to_float"):
        return mod.to_float()
    return mod


def _act(mod, where, unseen=None):
    """``(qparams or None, dtype)`` of ``mod.activation_post_process``.

    An observer that never saw data raises, or with ``unseen`` (a list) is recorded there
    (convert raises once, naming them all) and gives torch's default qparams meanwhile."""
    pp = getattr(mod, "activation_post_process", None)
    if not isinstance(pp, PostProcess) or isinstance(pp.config, (NoopObserver, PlaceholderObserver)):
        return None, jnp.uint8
    st = pp.state
    if unseen is None:
        Q.check_observed(st, f"{where} (activation_post_process)")
    elif Q.unobserved_field(st) is not None:
        unseen.append(f"{where} (activation_post_process)")
    try:
        dtype = canonical_dtype(getattr(pp.config, "dtype", jnp.uint8))
    except Exception:  # noqa: BLE001
        dtype = jnp.uint8
    return Q.activation_qparams(pp.config, st), dtype


def _weight(mod):
    wfq = getattr(mod, "weight_fake_quant", None)
    if isinstance(wfq, PostProcess):
        return wfq.config, wfq.state
    qconfig = getattr(mod, "qconfig", None)
    return (None if qconfig is None else _L.build(qconfig.weight)), None


_CONVERTIBLE = (M.Linear, M.Conv, M.Embed, M.QATEmbeddingBag, M._ObservedMixin, M._QATFusedMixin)


def _convert_module(mod, path, backend, unseen=None):
    """The converted replacement of ``mod``, or None (recurse into it)."""
    where = path or "<root>"
    if isinstance(mod, M.QuantStub):
        qp, dtype = _act(mod, where, unseen)
        return M.Identity() if qp is None else Quantize(*qp, dtype)
    if isinstance(mod, M.DeQuantStub):
        return DeQuantize()
    if not isinstance(mod, _CONVERTIBLE):
        return None
    if isinstance(mod, (nnx.Linear, nnx.Conv)):
        qp, _ = _act(mod, where, unseen)
        if qp is None:
            raise ValueError(f"{where}: a quantized {type(mod).__name__} needs an activation "
                             f"observer / fake quant with qparams (qconfig.activation)")
        wcfg, wstate = _weight(mod)
        bn = None
        if getattr(mod, "_has_bn", False):
            b = mod.bn
            bn = (b.mean[...], b.var[...], b.epsilon, None if b.scale is None else b.scale[...],
                  None if b.bias is None else b.bias[...])
        bias = None if mod.bias is None else mod.bias[...]
        relu = bool(getattr(mod, "_relu", False))
        if isinstance(mod, nnx.Linear):
            packed = Q.pack_layer("dense", mod.kernel[...], bias, wcfg, wstate, qp, bn=bn)
            return QuantizedLinear(packed, relu=relu, backend=backend)
        if mod.input_dilation not in (None, 1) and any(
                d != 1 for d in ((mod.input_dilation,) if isinstance(mod.input_dilation, int)
                                 else mod.input_dilation)):
            raise NotImplementedError(f"{where}: quantized Conv with input_dilation")
        if getattr(mod, "mask", None) is not None:
            raise NotImplementedError(f"{where}: quantized Conv with a kernel mask")
        packed = Q.pack_layer("conv", mod.kernel[...], bias, wcfg, wstate, qp, bn=bn)
        return QuantizedConv(packed, strides=1 if mod.strides is None else mod.strides,
                             padding=mod.padding,
                             dilation=1 if mod.kernel_dilation is None else mod.kernel_dilation,
                             groups=mod.feature_group_count, relu=relu, backend=backend)
    if isinstance(mod, (nnx.Embed, M.EmbeddingBag)):
        wcfg, wstate = _weight(mod)
        if wcfg is None or not _L.is_float_qparams(wcfg):
            return _float_version(mod)  # torch's convert raises here; jquant keeps it float
        qp, dtype = _act(mod, where, unseen)
        packed = Q.pack_embedding(mod.embedding[...], wcfg, wstate)
        if isinstance(mod, nnx.Embed):
            return QuantizedEmbedding(packed, mod.features, qp, dtype)
        return QuantizedEmbeddingBag(packed, mod.features, mode=mod.mode,
                                     include_last_offset=mod.include_last_offset,
                                     padding_idx=mod.padding_idx, qparams=qp, dtype=dtype)
    # observed modules without an integer counterpart: float, output quantized
    qp, dtype = _act(mod, where, unseen)
    fl = _float_version(mod)
    return fl if qp is None else QuantizedOutput(fl, qp, dtype)


@functools.lru_cache(maxsize=None)
def _converted_root_class(cls):
    def __call__(self, *args, **kwargs):
        with Q.activation_flow():
            return cls.__call__(self, *args, **kwargs)
    return type(cls)(f"Converted{cls.__name__}", (cls,),
                     {"__module__": __name__, "__call__": __call__,
                      "__doc__": f"Converted {cls.__name__}: ``__call__`` runs in one "
                                 f"activation-flow scope (jquant.quantized.activation_flow)."})


def convert(model, *, inplace: bool = False, backend: str = "x86"):
    """Integer-inference modules from a calibrated / trained prepared model; ``torch.ao.quantization.convert``.

    Args:
      model: from :func:`jquant.nnx.prepare` (after calibration) or
        :func:`jquant.nnx.prepare_qat` (after training).
      inplace: modify ``model``'s graph (default: convert ``nnx.clone(model)``).
      backend: the quantized engine whose requantization to reproduce: ``"x86"`` (torch's
        default; Linear via fbgemm, Conv as :func:`jquant.quantized.x86_conv_requant`),
        ``"fbgemm"``, ``"qnnpack"`` or ``"onednn"``.
    Returns:
      The converted module (see the module docstring). PTQ weights are observed here with
      ``qconfig.weight()`` as torch's ``from_float`` does; QAT weights use their
      ``weight_fake_quant`` state (run once more on the weight, as torch). Raises
      ``ValueError`` if an activation observer a converted module needs never saw data.
    """
    if backend not in Q.BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {Q.BACKENDS}")
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be an nnx.Module, got {type(model).__name__}")
    if not any(isinstance(node, PostProcess) for _, node in nnx.iter_graph(model)):
        warnings.warn("jquant.nnx.convert: nothing to convert: the model has no observer or fake "
                      "quant (prepare it with jquant.nnx.prepare / prepare_qat, then calibrate "
                      "or train it, before convert); it stays float", UserWarning, stacklevel=2)
    return _convert_graph(model if inplace else nnx.clone(model), backend)


def _convert_graph(model, backend: str):
    """Converts ``model``'s graph in place; returns the converted root. On an error (an
    observer that never saw data, an unsupported layer) every replaced child is put back,
    so ``model`` is left as it was, not half converted."""
    from jquant.nnx.quantize import _child_items, _set_child  # cycle: quantize imports convert
    replaced: dict = {}
    visited: set = set()
    undo: list = []

    def replace(node, key, old, new):
        _set_child(node, key, new)
        undo.append((node, key, old))

    def visit(node, path):
        for key, child in _child_items(node):
            cpath = path + (str(key),)
            if id(child) in replaced:
                replace(node, key, child, replaced[id(child)])
                continue
            if id(child) in visited:
                continue
            visited.add(id(child))
            new = _convert_module(child, ".".join(cpath), backend, unseen) if isinstance(child, nnx.Module) else None
            if new is None:
                visit(child, cpath)
            elif new is not child:
                replaced[id(child)] = new
                replace(node, key, child, new)

    visited.add(id(model))
    unseen: list = []
    try:
        root = _convert_module(model, "", backend, unseen)
        if root is None:
            visit(model, ())
        if unseen:
            raise Q.unobserved_error(unseen)
    except Exception:
        for node, key, old in reversed(undo):
            _set_child(node, key, old)
        raise
    if root is not None:
        return root
    return M.swap_class(model, _converted_root_class(type(model)))


def parameter_bytes(model) -> int:
    """Bytes of a (float or converted) NNX model's parameters and buffers, observer state excluded.

    Counts every ``nnx.Variable`` except the observer / fake-quant state (:class:`QuantStat`):
    float params, BatchNorm statistics, int8 weights at one byte each, 4-bit embedding rows
    packed two per byte (:func:`jquant.quantized.param_bytes`).
    """
    from jquant.nnx._state import QuantStat
    state = nnx.state(model, nnx.Not(QuantStat))
    return Q.param_bytes(state)
