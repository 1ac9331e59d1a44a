"""QAT module classes of the NNX front end (``torch.ao.nn.qat`` / ``torch.ao.nn.intrinsic.qat``).

``Linear`` (``Dense``), ``Conv``, ``Embed``, ``EmbeddingBag`` and the fused ``ConvBn``,
``ConvBnReLU``, ``ConvReLU``, ``LinearBn``, ``LinearReLU``. Each subclasses the float
flax / jquant module, shares its Variables and adds ``weight_fake_quant`` and
``activation_post_process`` children; ``from_float`` builds one from a float module.
"""
from jquant.nnx.modules import Conv, Dense, Embed, Linear
from jquant.nnx.modules import QATConvBn as ConvBn
from jquant.nnx.modules import QATConvBnReLU as ConvBnReLU
from jquant.nnx.modules import QATConvReLU as ConvReLU
from jquant.nnx.modules import QATEmbeddingBag as EmbeddingBag
from jquant.nnx.modules import QATLinearBn as LinearBn
from jquant.nnx.modules import QATLinearReLU as LinearReLU

__all__ = ["Linear", "Dense", "Conv", "Embed", "EmbeddingBag", "ConvBn", "ConvBnReLU",
           "ConvReLU", "LinearBn", "LinearReLU"]
