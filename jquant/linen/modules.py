"""jquant's Linen modules: stubs, QuantWrapper, QAT layers and a float EmbeddingBag.

Counterparts: ``torch.ao.quantization.QuantStub`` / ``DeQuantStub`` / ``QuantWrapper``,
``torch.ao.nn.qat.Linear`` / ``Conv{1,2,3}d`` / ``Embedding`` / ``EmbeddingBag`` and
``torch.nn.EmbeddingBag``. Every module here is an identity / plain float layer until it
has a qconfig: its own ``qconfig`` attribute, or the one a ``prepare`` / ``prepare_qat``
spec gives its path (its own wins, as torch's ``module.qconfig`` does).
"""
from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
import flax.linen as nn
from flax.linen.linear import default_embed_init

from jquant import layers
from jquant.linen import _core

__all__ = ["QuantStub", "DeQuantStub", "QuantWrapper", "Dense", "Linear", "Conv", "Embed",
           "EmbeddingBag"]


def _own(q):
    return layers._UNSET if q is None else q


class QuantStub(nn.Module, _core.JQuantModule):
    """Marks where a float input enters the quantized region; ``torch.ao.quantization.QuantStub``.

    Identity until prepared; then its output gets ``activation_post_process`` (an
    observer under ``prepare``, a fake quant under ``prepare_qat``), whose qparams
    ``convert`` uses to quantize the input. ``x``: any float array; same shape / dtype out.
    """
    qconfig: Any = None

    @nn.compact
    def __call__(self, x):
        trace = _core.current_trace()
        q = _core.resolve_qconfig(self, trace, _own(self.qconfig))
        if q is None:
            return x
        return _core.call_post_only(self, "quant_stub", q, x, trace)


class DeQuantStub(nn.Module, _core.JQuantModule):
    """Marks where the quantized region ends; ``torch.ao.quantization.DeQuantStub``.

    Always the identity before ``convert`` (torch gives it no observer).
    """
    qconfig: Any = None

    @nn.compact
    def __call__(self, x):
        trace = _core.current_trace()
        if trace is not None:
            trace.plan.kinds[_core.module_path(self)] = "dequant_stub"
        return x


class QuantWrapper(nn.Module, _core.JQuantModule):
    """``dequant(module(quant(x)))``; ``torch.ao.quantization.QuantWrapper``.

    Children are named ``quant``, ``dequant`` and ``module`` as in torch, so the wrapped
    module's variables live under ``module``.
    """
    module: nn.Module

    def setup(self):
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def __call__(self, x, *args, **kwargs):
        return self.dequant(self.module(self.quant(x), *args, **kwargs))


class Dense(nn.Dense, _core.JQuantModule):
    """flax ``Dense`` with a ``qconfig``: QAT Linear; ``torch.ao.nn.qat.Linear``.

    With a qconfig the kernel ``(in, out)`` passes through ``weight_fake_quant`` (torch
    layout ``(out, in)`` for per-channel configs) and the output through
    ``activation_post_process``. Without one it is flax's Dense.
    """
    qconfig: Any = None

    def __call__(self, inputs):
        trace = _core.current_trace()
        q = _core.resolve_qconfig(self, trace, _own(self.qconfig))
        if q is None:
            return super().__call__(inputs)
        return _core.call_dense_conv(self, "dense", q, super().__call__, (inputs,), {}, trace)


Linear = Dense


class Conv(nn.Conv, _core.JQuantModule):
    """flax ``Conv`` (1-D, 2-D or 3-D) with a ``qconfig``; ``torch.ao.nn.qat.Conv{1,2,3}d``.

    The kernel ``(*spatial, in/groups, out)`` is fake-quantized in torch's layout
    ``(out, in/groups, *spatial)``; the output gets ``activation_post_process``.
    """
    qconfig: Any = None

    def __call__(self, inputs):
        trace = _core.current_trace()
        q = _core.resolve_qconfig(self, trace, _own(self.qconfig))
        if q is None or not self.shared_weights:
            return super().__call__(inputs)
        return _core.call_dense_conv(self, "conv", q, super().__call__, (inputs,), {}, trace)


class Embed(nn.Embed, _core.JQuantModule):
    """flax ``Embed`` with a ``qconfig``; ``torch.ao.nn.qat.Embedding``.

    The qconfig's weight must be ``per_channel_affine_float_qparams`` (e.g.
    ``default_embedding_qat_qconfig`` or its 4-bit twin): each row of the table
    ``(num_embeddings, features)`` is fake-quantized with its own float scale / zero point.
    """
    qconfig: Any = None

    def __call__(self, inputs):
        trace = _core.current_trace()
        q = _core.resolve_qconfig(self, trace, _own(self.qconfig))
        if q is None:
            return super().__call__(inputs)
        return _core.call_embedding(self, q, lambda: self.embedding,
                                    _core.flax_embed_lookup(self, inputs),
                                    lambda: super(Embed, self).__call__(inputs), trace,
                                    explicit=self.qconfig is not None)


class EmbeddingBag(nn.Module, _core.JQuantModule):
    """Sums / means / maxes of embedding rows per bag; ``torch.nn.EmbeddingBag`` (float).

    With a ``per_channel_affine_float_qparams`` qconfig it is ``torch.ao.nn.qat.EmbeddingBag``.

    Attributes:
      num_embeddings, features: the table is ``(num_embeddings, features)``, param name
        ``embedding`` (as flax's Embed).
      mode: ``"sum"``, ``"mean"`` (torch's default) or ``"max"``.
      include_last_offset: ``offsets`` has ``B + 1`` entries, the last ending the last bag.
      padding_idx: rows with this index are left out of their bag.

    ``__call__(indices, offsets=None, per_sample_weights=None)``: ``indices`` integer
    ``(B, L)`` (one bag per row) or ``(N,)`` with ``offsets``; returns ``(B, features)``;
    empty bags give zeros. See :func:`jquant.layers.embedding_bag`.
    """
    num_embeddings: int
    features: int
    mode: str = "mean"
    include_last_offset: bool = False
    padding_idx: Optional[int] = None
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    embedding_init: Any = default_embed_init
    qconfig: Any = None

    @nn.compact
    def __call__(self, indices, offsets=None, per_sample_weights=None):
        if self.mode not in layers.EMBEDDING_BAG_MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {layers.EMBEDDING_BAG_MODES}")
        table = self.param("embedding", self.embedding_init,
                           (self.num_embeddings, self.features), self.param_dtype)

        def lookup(w):
            if self.dtype is not None:
                w = w.astype(self.dtype)
            return layers.embedding_bag(w, indices, offsets, mode=self.mode,
                                        per_sample_weights=per_sample_weights,
                                        include_last_offset=self.include_last_offset,
                                        padding_idx=self.padding_idx)

        trace = _core.current_trace()
        q = _core.resolve_qconfig(self, trace, _own(self.qconfig))
        if q is None:
            return lookup(table)
        return _core.call_embedding(self, q, lambda: table, lookup, lambda: lookup(table), trace,
                                    explicit=self.qconfig is not None)
