"""jquant's flax.nnx front end: eager-mode QAT / PTQ on unmodified NNX models.

Counterparts: ``torch.ao.quantization`` eager mode (``QuantStub``, ``prepare``,
``prepare_qat``, ``fuse_modules_qat``, ...) and the QAT modules of ``torch.ao.nn.qat`` /
``torch.ao.nn.intrinsic.qat``. A thin front end over jquant's core::

    from flax import nnx
    import jquant as jq, jquant.nnx as jqn

    # ReLUs held as attributes (self.act = nnx.relu) fuse exactly as torch's ReLU modules
    qmodel = jqn.prepare_qat(model, jq.get_default_qat_qconfig("x86"),
                             fuse=[("conv", "bn", "act")])
    optimizer = nnx.Optimizer(qmodel, optax.sgd(0.01), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)        # observer state updates in place
        return loss

    jq.disable_observer(qmodel)               # in place on NNX modules
    jqn.freeze_bn_stats(qmodel)

Observer / fake-quant state lives in :class:`PostProcess` children named like torch's
(``weight_fake_quant``, ``activation_post_process``): the core state NamedTuple in a
:class:`QuantStat` Variable ``buffers`` (learnable scales / zero points in
:class:`QuantParam`, an ``nnx.Param``), so ``nnx.state`` / ``nnx.split`` / orbax /
``flax.serialization`` checkpoint it with the parameters; :func:`get_observer_state_dict`
gives torch's keys. Layer paths and parameter names stay those of the float model.
"""
from jquant.nnx._state import PostProcess, QuantParam, QuantStat
from jquant.nnx.modules import (ConvBn, ConvBnReLU, ConvReLU, DeQuantStub, EmbeddingBag, Identity,
                                LinearBn, LinearReLU, QuantStub, QuantWrapper)
from jquant.nnx import qat
from jquant.nnx.convert import parameter_bytes
from jquant.nnx.qat import Conv, Dense, Embed, Linear
from jquant.nnx.quantize import (convert, enable_param_learning, enable_static_estimate,
                                 enable_static_observation, freeze_bn_stats, fuse_modules, fuse_modules_qat,
                                 get_observer_dict, get_observer_state_dict,
                                 load_observer_state_dict, prepare, prepare_qat,
                                 propagate_qconfig, update_bn_stats)

__all__ = [
    "QuantStub", "DeQuantStub", "QuantWrapper", "Identity", "EmbeddingBag",
    "Linear", "Dense", "Conv", "Embed", "qat",
    "ConvBn", "ConvBnReLU", "ConvReLU", "LinearBn", "LinearReLU",
    "prepare", "prepare_qat", "convert", "fuse_modules_qat", "fuse_modules", "freeze_bn_stats",
    "update_bn_stats", "get_observer_dict", "get_observer_state_dict",
    "load_observer_state_dict", "propagate_qconfig", "enable_param_learning",
    "enable_static_estimate", "enable_static_observation",
    "PostProcess", "QuantStat", "QuantParam", "parameter_bytes",
]
