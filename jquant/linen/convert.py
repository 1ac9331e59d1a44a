"""``convert`` for prepared Linen models (issue [4]; not implemented yet).

Counterpart: ``torch.ao.quantization.convert``. Call shape (API.md):
``convert(model, variables) -> (qmodel, qvariables)``, where ``model`` comes from
:func:`jquant.linen.prepare` / :func:`jquant.linen.prepare_qat` and ``variables`` holds its
``params`` (and ``batch_stats``) plus the calibrated / trained ``quant_stats``. What it needs
from the prepared model: ``model.plan.registry`` (path -> {"weight_fake_quant" |
"activation_post_process": config}), ``model.plan.kinds`` (path -> "dense" | "conv" |
"embed" | "embedding_bag" | "quant_stub" | "dequant_stub" | "bn" | "norm"),
``model.plan.fuse`` (fused groups; fold BatchNorms with :func:`jquant.layers.fold_bn`).
"""
from __future__ import annotations

__all__ = ["convert"]


def convert(model, variables, *args, **kwargs):
    """Real integer inference from a prepared model; ``torch.ao.quantization.convert``.

    Not implemented yet (issue [4]).
    """
    raise NotImplementedError("jquant.linen.convert is not implemented yet (issue [4]); "
                              "prepare / prepare_qat and calibration / QAT work")
