"""NNX modules: quant stubs, QAT layers, the float EmbeddingBag and fused conv/linear + BN.

Counterparts: ``torch.ao.quantization.QuantStub / DeQuantStub / QuantWrapper``,
``torch.ao.nn.qat.Linear / Conv{1,2,3}d / Embedding / EmbeddingBag``,
``torch.nn.EmbeddingBag``, ``torch.ao.nn.intrinsic`` (fused float modules) and
``torch.ao.nn.intrinsic.qat`` (ConvBn / ConvBnReLU / ConvReLU / LinearBn / LinearReLU).

The QAT layers subclass flax's own ``nnx.Linear`` / ``nnx.Conv`` / ``nnx.Embed`` and keep
their Variables (``kernel``, ``bias``, ``embedding``), so a prepared model has the float
model's parameter paths. The weight passes through ``weight_fake_quant`` inside flax's
``promote_dtype`` hook (before any cast to the compute dtype), in torch's layout (output
channel first); the module output passes through ``activation_post_process``. Both are
:class:`~jquant.nnx.PostProcess` children (or ``None``).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import pytreelib

from jquant import _numerics as nm
from jquant import collectives
from jquant import layers as _L
from jquant.nnx._state import PostProcess, QuantStat

__all__ = [
    "QuantStub", "DeQuantStub", "QuantWrapper", "Identity", "EmbeddingBag",
    "Linear", "Dense", "Conv", "Embed", "QATEmbeddingBag",
    "ConvBn", "ConvBnReLU", "ConvReLU", "LinearBn", "LinearReLU",
    "QATConvBn", "QATConvBnReLU", "QATConvReLU", "QATLinearBn", "QATLinearReLU",
    "make_post_process", "swap_class", "observed_class",
]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def make_post_process(factory, example=None, *, axis_name=None, like=None) -> Optional[PostProcess]:
    """A :class:`PostProcess` built from a qconfig entry (class / ``with_args`` factory / None).

    ``example`` (array or ``jax.ShapeDtypeStruct``) sizes per-channel states. ``None`` or
    a factory that builds ``None`` (identity) gives ``None``. ``like``: an array (e.g. the
    module's kernel) whose device the state is put on.
    """
    config = _L.build(factory)
    if config is None:
        return None
    try:
        return PostProcess(config, example=example, axis_name=axis_name, like=like)
    except ValueError as e:
        if example is None:
            raise ValueError(f"{config!r} needs the tensor's shape to build its state (a "
                             f"per-channel activation post-process?): {e}") from e
        raise


def make_weight_post_process(factory, kernel, layout: str, *, axis_name=None):
    """A :class:`PostProcess` for a Flax kernel (state sized in torch's layout, on the
    kernel's device) or None."""
    config = _L.build(factory)
    if config is None:
        return None
    return PostProcess(config, _L.weight_init(config, kernel, layout), axis_name=axis_name,
                       like=kernel)


def first_param(mod):
    """The value of ``mod``'s first Param (its device is the module's), or None."""
    for _, v in nnx.iter_graph(mod):
        if isinstance(v, nnx.Param):
            return v.get_value()
    return None


def swap_class(mod, cls):
    """A new ``cls`` instance sharing every attribute of ``mod`` (same Variables, children, config)."""
    new = object.__new__(cls)
    object.__setattr__(new, "_pytree__state", pytreelib.PytreeState())
    for k, v in vars(mod).items():
        if k != "_pytree__state":
            object.__setattr__(new, k, v)
    return new


def _set(mod, name, value):
    setattr(mod, name, nnx.data(value))


def _apply(pp, x):
    return x if pp is None else pp(x)


class _QuantMixin:
    """Shared plumbing of the QAT layers (weight fake quant + activation post-process)."""

    _layout = "dense"
    _weight_attr = "kernel"

    def _setup_quant(self, qconfig, *, weight=True, axis_name=None):
        if "promote_dtype" in vars(self):
            fn = vars(self)["promote_dtype"]
            delattr(self, "promote_dtype")
            self.float_promote_dtype = fn
        self.qconfig = qconfig
        wfq = None
        kernel = getattr(self, self._weight_attr)[...]
        if weight and qconfig is not None:
            wfq = make_weight_post_process(qconfig.weight, kernel, self._layout, axis_name=axis_name)
        _set(self, "weight_fake_quant", wfq)
        app = None if qconfig is None else make_post_process(qconfig.activation, axis_name=axis_name,
                                                              like=kernel)
        _set(self, "activation_post_process", app)

    def _fq_kernel(self, kernel):
        """``weight_fake_quant`` on a Flax kernel, run in torch's layout (state updated in place)."""
        pp = self.weight_fake_quant
        if pp is None:
            return kernel
        out, new_state = _L.weight_apply(pp.config, pp.state, kernel, self._layout,
                                         axis_name=pp.axis_name)
        pp.set_state(new_state)
        return out

    @classmethod
    def from_float(cls, mod, qconfig, *, axis_name=None):
        """torch's ``from_float``: the QAT module sharing ``mod``'s Variables."""
        new = swap_class(mod, cls)
        new._setup_quant(qconfig, axis_name=axis_name)
        return new

    def to_float(self):
        """The float flax module (same Variables), without post-processes."""
        base = self._float_class
        new = object.__new__(base)
        object.__setattr__(new, "_pytree__state", pytreelib.PytreeState())
        skip = {"_pytree__state", "float_promote_dtype", "qconfig", "weight_fake_quant",
                "activation_post_process", "freeze_bn", "bn_unbiased_running_var"}
        nodes = {k: v for k, v in self._pytree__nodes.items() if k not in skip}
        for k, v in vars(self).items():
            if k not in skip and k != "_pytree__nodes":
                object.__setattr__(new, k, v)
        object.__setattr__(new, "_pytree__nodes", type(self._pytree__nodes)(nodes))
        if "float_promote_dtype" in vars(self):
            new.promote_dtype = self.float_promote_dtype
        return new


# ---------------------------------------------------------------------------------------
# stubs
# ---------------------------------------------------------------------------------------

class Identity(nnx.Module):
    """Returns its input (``torch.nn.Identity``); fills the slots of fused-away modules."""

    def __call__(self, x, *args, **kwargs):
        return x


class QuantStub(nnx.Module):
    """Marks where float inputs become quantized; ``torch.ao.quantization.QuantStub``.

    An identity until ``prepare`` / ``prepare_qat`` give it an ``activation_post_process``
    (which observes / fake-quantizes the network input); ``convert`` turns it into a
    quantize op. ``qconfig`` (optional) overrides the propagated one.
    """

    def __init__(self, qconfig=None):
        if qconfig is not None:
            self.qconfig = qconfig
        self.activation_post_process = nnx.data(None)

    def __call__(self, x):
        return _apply(self.activation_post_process, x)


class DeQuantStub(nnx.Module):
    """Marks where quantized values become float again; ``torch.ao.quantization.DeQuantStub``.

    Always an identity before ``convert`` (it never gets an observer).
    """

    def __init__(self, qconfig=None):
        if qconfig is not None:
            self.qconfig = qconfig

    def __call__(self, x):
        return x


class QuantWrapper(nnx.Module):
    """``dequant(module(quant(x)))``; ``torch.ao.quantization.QuantWrapper``.

    Children ``quant`` (:class:`QuantStub`), ``dequant`` and ``module``; the stubs take
    ``module.qconfig`` when it has one.
    """

    def __init__(self, module):
        qconfig = getattr(module, "qconfig", None)
        self.quant = QuantStub(qconfig)
        self.dequant = DeQuantStub(qconfig)
        self.module = module

    def __call__(self, x, *args, **kwargs):
        return self.dequant(self.module(self.quant(x), *args, **kwargs))


# ---------------------------------------------------------------------------------------
# QAT Linear / Conv / Embed
# ---------------------------------------------------------------------------------------

class Linear(_QuantMixin, nnx.Linear):
    """QAT ``nnx.Linear`` (alias ``Dense``); ``torch.ao.nn.qat.Linear``.

    ``Linear(in_features, out_features, *, qconfig, rngs, **nnx_linear_kwargs)`` or
    ``Linear.from_float(linear, qconfig)``. ``kernel`` (in, out) is fake-quantized as
    torch's (out, in) weight (per-channel axis = out); output ``(..., out)`` in the
    compute dtype goes through ``activation_post_process``.
    """

    _float_class = nnx.Linear
    _layout = "dense"

    def __init__(self, in_features, out_features, *, qconfig, rngs, axis_name=None, **kwargs):
        nnx.Linear.__init__(self, in_features, out_features, rngs=rngs, **kwargs)
        self._setup_quant(qconfig, axis_name=axis_name)

    def promote_dtype(self, arrays, dtype=None, **kwargs):
        x, kernel, bias = arrays
        return self.float_promote_dtype((x, self._fq_kernel(kernel), bias), dtype=dtype, **kwargs)

    def __call__(self, inputs, *args, **kwargs):
        return _apply(self.activation_post_process, nnx.Linear.__call__(self, inputs, *args, **kwargs))


Dense = Linear


class Conv(_QuantMixin, nnx.Conv):
    """QAT ``nnx.Conv`` (1-D, 2-D, 3-D); ``torch.ao.nn.qat.Conv{1,2,3}d``.

    The kernel ``(*spatial, in/groups, out)`` is fake-quantized with the output channel as
    torch's axis 0. torch's eager QAT mapping swaps only Conv2d/Conv3d; here every
    ``nnx.Conv`` is swapped (1-D convs get weight fake quant too).
    """

    _float_class = nnx.Conv
    _layout = "conv"

    def __init__(self, in_features, out_features, kernel_size, *, qconfig, rngs, axis_name=None,
                 **kwargs):
        nnx.Conv.__init__(self, in_features, out_features, kernel_size, rngs=rngs, **kwargs)
        self._setup_quant(qconfig, axis_name=axis_name)

    def promote_dtype(self, arrays, dtype=None, **kwargs):
        x, kernel, bias = arrays
        return self.float_promote_dtype((x, self._fq_kernel(kernel), bias), dtype=dtype, **kwargs)

    def __call__(self, inputs, *args, **kwargs):
        return _apply(self.activation_post_process, nnx.Conv.__call__(self, inputs, *args, **kwargs))


def _check_embedding_qconfig(qconfig, owner):
    w = None if qconfig is None else _L.build(qconfig.weight)
    if w is None:
        raise ValueError(f"qconfig: {owner} needs a qconfig with a weight fake quant")
    if not _L.is_float_qparams(w):
        raise ValueError(f"qconfig: {owner} weight must use per_channel_affine_float_qparams "
                         f"(e.g. default_embedding_qat_qconfig), got {getattr(w, 'qscheme', None)}")


class Embed(_QuantMixin, nnx.Embed):
    """QAT ``nnx.Embed``; ``torch.ao.nn.qat.Embedding``.

    The ``embedding`` table (num_embeddings, features) is fake-quantized per row with
    float zero points (the weight qconfig must be per_channel_affine_float_qparams, e.g.
    ``default_embedding_qat_qconfig`` or its 4-bit twin); ``attend`` uses the same table.
    """

    _float_class = nnx.Embed
    _layout = "embedding"
    _weight_attr = "embedding"

    def __init__(self, num_embeddings, features, *, qconfig, rngs, axis_name=None, **kwargs):
        _check_embedding_qconfig(qconfig, "Embed")
        nnx.Embed.__init__(self, num_embeddings, features, rngs=rngs, **kwargs)
        self._setup_quant(qconfig, axis_name=axis_name)

    @classmethod
    def from_float(cls, mod, qconfig, *, axis_name=None):
        _check_embedding_qconfig(qconfig, cls.__name__)
        return super().from_float(mod, qconfig, axis_name=axis_name)

    def promote_dtype(self, arrays, dtype=None, **kwargs):
        arrays = tuple(arrays)
        arrays = arrays[:-1] + (self._fq_kernel(arrays[-1]),)
        return self.float_promote_dtype(arrays, dtype=dtype, **kwargs)

    def __call__(self, inputs, *args, **kwargs):
        return _apply(self.activation_post_process, nnx.Embed.__call__(self, inputs, *args, **kwargs))


# ---------------------------------------------------------------------------------------
# EmbeddingBag (float and QAT)
# ---------------------------------------------------------------------------------------

class EmbeddingBag(nnx.Module):
    """Float embedding bag; ``torch.nn.EmbeddingBag`` (flax has none).

    ``EmbeddingBag(num_embeddings, features, *, mode="mean", include_last_offset=False,
    padding_idx=None, dtype=None, param_dtype=float32, embedding_init=..., rngs)``; the
    table is the Param ``embedding`` (num_embeddings, features) as in ``nnx.Embed``.
    ``bag(inputs, offsets=None, per_sample_weights=None)``: ``inputs`` 2-D (B, L) (one bag
    per row, ``offsets`` must be None) or 1-D with ``offsets`` (B,) (or B+1 with
    ``include_last_offset``); reduces with sum / mean / max; empty bags give 0;
    ``per_sample_weights`` (same shape as ``inputs``) only with ``mode="sum"``.
    Jittable with static shapes. Output (B, features).
    """

    def __init__(self, num_embeddings: int, features: int, *, mode: str = "mean",
                 include_last_offset: bool = False, padding_idx: Optional[int] = None,
                 dtype=None, param_dtype=jnp.float32,
                 embedding_init=nnx.initializers.normal(stddev=1.0), rngs: nnx.Rngs):
        if mode not in ("sum", "mean", "max"):
            raise ValueError(f"mode={mode!r} must be 'sum', 'mean' or 'max'")
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx={padding_idx} must be within num_embeddings")
        self.embedding = nnx.Param(embedding_init(rngs.params(), (num_embeddings, features),
                                                  param_dtype))
        self.num_embeddings = num_embeddings
        self.features = features
        self.mode = mode
        self.include_last_offset = include_last_offset
        self.padding_idx = None if padding_idx is None else padding_idx % num_embeddings
        self.dtype = dtype
        self.param_dtype = param_dtype

    def _table(self):
        return self.embedding[...]

    def __call__(self, inputs, offsets=None, per_sample_weights=None):
        table = self._table()
        if self.dtype is not None:
            table = table.astype(self.dtype)
        return _L.embedding_bag(table, inputs, offsets, mode=self.mode,
                                include_last_offset=self.include_last_offset,
                                per_sample_weights=per_sample_weights,
                                padding_idx=self.padding_idx)


class QATEmbeddingBag(_QuantMixin, EmbeddingBag):
    """QAT :class:`EmbeddingBag`; ``torch.ao.nn.qat.EmbeddingBag``.

    The table is fake-quantized per row (weight qconfig per_channel_affine_float_qparams,
    8-bit or 4-bit) before the bag reduction.
    """

    _float_class = EmbeddingBag
    _layout = "embedding"
    _weight_attr = "embedding"

    def __init__(self, num_embeddings, features, *, qconfig, rngs, axis_name=None, **kwargs):
        _check_embedding_qconfig(qconfig, "QATEmbeddingBag")
        EmbeddingBag.__init__(self, num_embeddings, features, rngs=rngs, **kwargs)
        self._setup_quant(qconfig, axis_name=axis_name)

    @classmethod
    def from_float(cls, mod, qconfig, *, axis_name=None):
        _check_embedding_qconfig(qconfig, cls.__name__)
        return super().from_float(mod, qconfig, axis_name=axis_name)

    def _table(self):
        return self._fq_kernel(self.embedding[...])

    def __call__(self, inputs, offsets=None, per_sample_weights=None):
        return _apply(self.activation_post_process,
                      EmbeddingBag.__call__(self, inputs, offsets, per_sample_weights))


# ---------------------------------------------------------------------------------------
# PTQ: observed modules (output observer only)
# ---------------------------------------------------------------------------------------

class _ObservedMixin:
    """Adds ``activation_post_process`` on the output of any module (PTQ ``prepare``)."""

    def __call__(self, *args, **kwargs):
        return _apply(self.activation_post_process, super().__call__(*args, **kwargs))


@functools.lru_cache(maxsize=None)
def observed_class(cls):
    """``Observed<cls>``: ``cls`` whose output passes through ``activation_post_process``."""
    return type(cls)(f"Observed{cls.__name__}", (_ObservedMixin, cls),
                     {"__module__": __name__, "__doc__": f"{cls.__name__} with an output observer "
                      "(``activation_post_process``), as torch's ``prepare`` attaches one."})


def observe(mod, qconfig, *, axis_name=None):
    """The observed twin of ``mod`` (same Variables) with ``qconfig.activation`` on its output."""
    new = swap_class(mod, observed_class(type(mod)))
    new.qconfig = qconfig
    _set(new, "activation_post_process", make_post_process(qconfig.activation, axis_name=axis_name,
                                                           like=first_param(mod)))
    return new


# ---------------------------------------------------------------------------------------
# fused modules
# ---------------------------------------------------------------------------------------

def _check_bn(bn, n_out, owner):
    if not isinstance(bn, nnx.BatchNorm):
        raise ValueError(f"{owner}: expected an nnx.BatchNorm, got {type(bn).__name__}")
    if bn.num_features != n_out:
        raise ValueError(f"{owner}: BatchNorm has {bn.num_features} features but the layer has "
                         f"{n_out} output channels")
    if bn.scale is None or bn.bias is None:
        raise ValueError(f"{owner}: BatchNorm must be affine (use_scale and use_bias)")
    if bn.axis not in (-1,):
        raise ValueError(f"{owner}: BatchNorm must normalise the last (feature) axis")


class _FusedMixin:
    """Float fused module (``torch.ao.nn.intrinsic``): layer -> [bn] -> [relu]."""

    _has_bn = False
    _relu = False

    @classmethod
    def fuse(cls, layer, bn=None):
        base = cls._float_base
        if type(layer) is not base:
            raise ValueError(f"{cls.__name__}: expected {base.__name__}, got {type(layer).__name__}")
        new = swap_class(layer, cls)
        if cls._has_bn:
            _check_bn(bn, layer.out_features, cls.__name__)
            new.bn = bn
        return new

    def _float_tail(self, y, use_running_average=None):
        if self._has_bn:
            y = self.bn(y, use_running_average=use_running_average)
        return jax.nn.relu(y) if self._relu else y

    def __call__(self, x, *args, use_running_average=None, **kwargs):
        y = self._float_base.__call__(self, x, *args, **kwargs)
        return self._float_tail(y, use_running_average)


class ConvBn(_FusedMixin, nnx.Conv):
    """Float Conv + BatchNorm; ``torch.ao.nn.intrinsic.ConvBn{1,2,3}d`` (from ``fuse_modules_qat``).

    The conv's Variables stay at the top, the BatchNorm is child ``bn`` (torch: ``conv.bn``).
    """
    _float_base = nnx.Conv
    _has_bn = True


class ConvBnReLU(_FusedMixin, nnx.Conv):
    """Float Conv + BatchNorm + ReLU; ``torch.ao.nn.intrinsic.ConvBnReLU{1,2,3}d``."""
    _float_base = nnx.Conv
    _has_bn = True
    _relu = True


class ConvReLU(_FusedMixin, nnx.Conv):
    """Float Conv + ReLU; ``torch.ao.nn.intrinsic.ConvReLU{1,2,3}d``."""
    _float_base = nnx.Conv
    _relu = True


class LinearBn(_FusedMixin, nnx.Linear):
    """Float Linear + BatchNorm; ``torch.ao.nn.intrinsic.LinearBn1d``."""
    _float_base = nnx.Linear
    _has_bn = True


class LinearReLU(_FusedMixin, nnx.Linear):
    """Float Linear + ReLU; ``torch.ao.nn.intrinsic.LinearReLU``."""
    _float_base = nnx.Linear
    _relu = True


class _QATFusedMixin(_QuantMixin):
    """nniqat semantics: BN folded into the fake-quantized weight, batch stats while training.

    ``w' = weight_fake_quant(w * gamma / sqrt(running_var + eps))``; ``y = layer(x, w') /
    scale_factor (+ bias)``; then batch norm (batch statistics and a running-stat update
    while training, running statistics when frozen or ``use_running_average``), ReLU, and
    the activation post-process. The BatchNorm's ``momentum`` / ``epsilon`` /
    ``axis_name`` are used (flax's momentum convention: torch's 0.1 is flax's 0.9); the
    running variance takes the biased batch variance as flax's BatchNorm does, or the
    unbiased one as torch's with ``bn_unbiased_running_var=True``.
    """

    def _setup_quant(self, qconfig, *, weight=True, axis_name=None):
        super()._setup_quant(qconfig, weight=weight, axis_name=axis_name)
        if self._has_bn:
            if "freeze_bn" not in vars(self):
                # a Variable, not a Python bool: freeze_bn_stats never retraces a jitted step,
                # and the frozen state travels with checkpoints
                like = self.bn.mean[...]
                self.freeze_bn = QuantStat(collectives.place_like(jnp.zeros((1,), jnp.uint8), like))
            if "bn_unbiased_running_var" not in vars(self):
                self.bn_unbiased_running_var = False

    @classmethod
    def from_fused(cls, mod, qconfig, *, axis_name=None, bn_unbiased_running_var=False):
        """The QAT twin of a float fused module (same Variables).

        ``bn_unbiased_running_var``: update ``running_var`` with the unbiased batch
        variance, as torch's BatchNorm does (default: the biased one, as flax's BatchNorm).
        """
        new = swap_class(mod, cls)
        new._setup_quant(qconfig, axis_name=axis_name)
        if cls._has_bn:
            new.bn_unbiased_running_var = bool(bn_unbiased_running_var)
        return new

    def freeze_bn_stats(self):
        """Use and keep the BN running statistics (torch's ``freeze_bn_stats()`` method)."""
        if not self._has_bn:
            raise AttributeError(f"{type(self).__name__} has no BatchNorm")
        self.freeze_bn[...] = jnp.ones_like(self.freeze_bn[...])
        return self

    def update_bn_stats(self):
        """Batch statistics while training again (torch's ``update_bn_stats()`` method)."""
        if not self._has_bn:
            raise AttributeError(f"{type(self).__name__} has no BatchNorm")
        self.freeze_bn[...] = jnp.zeros_like(self.freeze_bn[...])
        return self

    def _scale_factor(self):
        bn = self.bn
        return _L.bn_scale_factor(None if bn.scale is None else bn.scale[...], bn.var[...],
                                  bn.epsilon)

    def promote_dtype(self, arrays, dtype=None, **kwargs):
        x, kernel, bias = arrays
        if self._has_bn:
            sf = self._scale_factor()
            kernel = (kernel.astype(jnp.float32) * sf).astype(kernel.dtype)
            if bias is not None:
                bias = jnp.zeros_like(bias)
        return self.float_promote_dtype((x, self._fq_kernel(kernel), bias), dtype=dtype, **kwargs)

    def _training(self, use_running_average):
        """False (running stats), True (batch stats) or a traced bool (``freeze_bn`` under jit)."""
        ura = self.bn.use_running_average if use_running_average is None else use_running_average
        if ura is None:
            raise ValueError(f"{type(self).__name__}: no use_running_average for the BatchNorm; "
                             f"call model.train() / model.eval() or pass use_running_average")
        if ura:
            return False
        frozen = jnp.reshape(self.freeze_bn[...], (-1,))[0] != 0
        if nm.is_concrete(frozen):
            return not bool(frozen)
        return jnp.logical_not(frozen)

    def __call__(self, x, *args, use_running_average=None, **kwargs):
        y = self._float_base.__call__(self, x, *args, **kwargs)
        if self._has_bn:
            bn = self.bn
            dtype = y.dtype
            y = nm.true_divide(y, self._scale_factor())
            if self.bias is not None:
                y = y + self.bias[...].astype(jnp.float32)
            y = y.astype(dtype)
            gamma = None if bn.scale is None else bn.scale[...]
            beta = None if bn.bias is None else bn.bias[...]
            training = self._training(use_running_average)
            frozen_y = None
            if training is not True:
                frozen_y = _L.bn_normalize(y, bn.mean[...], bn.var[...], gamma, beta, bn.epsilon)
            if training is not False:
                stats = _L.bn_stats(y, tuple(range(y.ndim - 1)), axis_name=bn.axis_name)
                new_mean, new_var = _L.bn_update_running(
                    bn.mean[...], bn.var[...], stats, bn.momentum,
                    unbiased=self.bn_unbiased_running_var)
                y = _L.bn_normalize(y, stats.mean, stats.var, gamma, beta, bn.epsilon)
                if training is not True:  # traced freeze_bn flag: select, keep frozen stats
                    y = jnp.where(training, y, frozen_y)
                    new_mean = jnp.where(training, new_mean, bn.mean[...])
                    new_var = jnp.where(training, new_var, bn.var[...])
                bn.mean[...] = jax.lax.stop_gradient(new_mean)
                bn.var[...] = jax.lax.stop_gradient(new_var)
            else:
                y = frozen_y
        if self._relu:
            y = jax.nn.relu(y)
        return _apply(self.activation_post_process, y)


class QATConvBn(_QATFusedMixin, ConvBn):
    """QAT Conv + BatchNorm; ``torch.ao.nn.intrinsic.qat.ConvBn{1,2,3}d``."""
    _float_class = ConvBn
    _layout = "conv"


class QATConvBnReLU(_QATFusedMixin, ConvBnReLU):
    """QAT Conv + BatchNorm + ReLU; ``torch.ao.nn.intrinsic.qat.ConvBnReLU{1,2,3}d``."""
    _float_class = ConvBnReLU
    _layout = "conv"


class QATConvReLU(_QATFusedMixin, ConvReLU):
    """QAT Conv + ReLU; ``torch.ao.nn.intrinsic.qat.ConvReLU{2,3}d``."""
    _float_class = ConvReLU
    _layout = "conv"


class QATLinearBn(_QATFusedMixin, LinearBn):
    """QAT Linear + BatchNorm; ``torch.ao.nn.intrinsic.qat.LinearBn1d``."""
    _float_class = LinearBn
    _layout = "dense"


class QATLinearReLU(_QATFusedMixin, LinearReLU):
    """QAT Linear + ReLU; ``torch.ao.nn.intrinsic.qat.LinearReLU``."""
    _float_class = LinearReLU
    _layout = "dense"


FLOAT_TO_QAT_FUSED = {ConvBn: QATConvBn, ConvBnReLU: QATConvBnReLU, ConvReLU: QATConvReLU,
                      LinearBn: QATLinearBn, LinearReLU: QATLinearReLU}
