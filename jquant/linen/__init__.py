"""jquant's Linen front end: quantize unmodified ``flax.linen`` models.

Counterparts: ``torch.ao.quantization`` eager mode (``prepare``, ``prepare_qat``,
``fuse_modules_qat``, ``convert``, stubs, ``QuantWrapper``) and ``torch.ao.nn.qat`` layers::

    qmodel = jquant.linen.prepare_qat(model, jq.get_default_qat_qconfig("x86"),
                                      fuse=[("Conv_0", "BatchNorm_0", "relu")])
    variables = qmodel.init(rng, x)          # params, batch_stats + quant_stats
    y, updates = qmodel.apply(variables, x, mutable=["batch_stats", "quant_stats"])

Observer / fake-quant state lives in the ``"quant_stats"`` collection (torch's buffer
names: ``<module path>/weight_fake_quant``, ``.../activation_post_process``), updated when
the collection is mutable. ``jq.disable_observer(variables)`` and friends flip the flags;
:func:`freeze_bn_stats` freezes fused BatchNorms. Everything numeric is the core's
(:mod:`jquant.layers` and the observers / fake quants).
"""
from jquant.linen.modules import (Conv, DeQuantStub, Dense, Embed, EmbeddingBag, Linear,
                                  QuantStub, QuantWrapper)
from jquant.linen.prepare import PreparedModel, prepare, prepare_qat, unmatched_spec_entries
from jquant.linen.state import (BoundObserver, enable_param_learning, enable_static_estimate,
                                enable_static_observation, freeze_bn_stats, get_observer_dict,
                                get_observer_state_dict, load_observer_state_dict,
                                update_bn_stats)
from jquant.linen.convert import convert, parameter_bytes

__all__ = [
    "QuantStub", "DeQuantStub", "QuantWrapper", "Dense", "Linear", "Conv", "Embed",
    "EmbeddingBag", "PreparedModel", "prepare", "prepare_qat", "convert",
    "unmatched_spec_entries", "get_observer_dict", "get_observer_state_dict",
    "load_observer_state_dict", "freeze_bn_stats", "update_bn_stats", "BoundObserver",
    "enable_param_learning", "enable_static_estimate", "enable_static_observation",
    "parameter_bytes",
]
