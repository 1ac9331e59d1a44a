"""``prepare`` / ``prepare_qat`` for unmodified Linen models.

Counterparts: ``torch.ao.quantization.prepare``, ``prepare_qat`` and ``fuse_modules_qat``
(eager mode). The returned :class:`PreparedModel` shares its scope with the float model, so
``params`` and ``batch_stats`` keep their names; ``init`` adds the ``"quant_stats"``
collection. Tracing goes through ``nn.intercept_methods``: no module of the float model is
rewritten.
"""
from __future__ import annotations

from typing import Any

import jax
import flax
import flax.linen as nn

from jquant.linen import _core


class PreparedModel(nn.Module, _core.ModelWrapper):
    """A float Linen model run with observers (``prepare``) or fake quant (``prepare_qat``).

    Attributes:
      model: the float model (unmodified; its variables keep their names).
      plan: what to quantize (built by :func:`prepare` / :func:`prepare_qat`).

    ``__call__`` forwards to ``model``; :meth:`call_method` runs another of its methods.
    Update the observers / fake quants by passing ``mutable=["quant_stats", ...]`` to
    ``apply`` (as with ``batch_stats``); with ``quant_stats`` immutable the stored state is
    used and nothing is observed (torch keeps observing in ``eval()`` unless observers
    are disabled; Flax cannot write an immutable collection). ``init`` creates the state
    without observing its input (like torch's ``prepare``), so its forward is float.
    """
    model: nn.Module
    plan: Any

    def setup(self):
        nn.share_scope(self, self.model)

    def _discover(self, fn_name, args, kwargs):
        missing = [e.bn for e in self.plan.fusion.groups if e.bn and e.bn not in self.plan.bn_eps]
        if not missing or self.is_initializing():
            return
        # A fused BatchNorm's epsilon is needed before the BatchNorm runs: trace an init once.
        twin = PreparedModel(model=self.model.clone(parent=None, _deep_clone=True), plan=self.plan,
                             parent=None)
        key = jax.random.key(0)
        rngs = {"params": key, "dropout": key}
        rngs.update({name: key for name in (self.scope.rngs or {})})

        def init(*a):
            return twin.init(rngs, fn_name, *a, method=PreparedModel.call_method, **kwargs)

        try:
            jax.eval_shape(init, *args)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"jquant: could not trace the prepared model to learn the fused "
                               f"BatchNorm settings of {missing}; call model.init (or "
                               f"jax.eval_shape(model.init, ...)) once first") from e

    def _forward(self, fn_name, args, kwargs):
        fn = self.model if fn_name == "__call__" else getattr(self.model, fn_name)
        try:
            return _core.run_prepared(self, fn, *args, **kwargs)
        except flax.errors.ScopeCollectionNotFound as e:
            if f'collection "{_core.QUANT_STATS}"' not in str(e):
                raise
            raise ValueError(
                "jquant.linen: the variables passed to the prepared model have no "
                "'quant_stats' collection (observer / fake-quant state), e.g. they come from "
                "the float model's init. Initialise the prepared model instead: variables = "
                "prepared.init(rng, x) (then variables['params'] = float_params keeps the "
                "trained weights), or pass mutable=['quant_stats'] to create the state") from e

    def __call__(self, *args, **kwargs):
        self._discover("__call__", args, kwargs)
        return self._forward("__call__", args, kwargs)

    def call_method(self, name: str, *args, **kwargs):
        """Runs ``model.<name>(*args, **kwargs)`` under the plan (e.g. an ``encode`` method)."""
        self._discover(name, args, kwargs)
        return self._forward(name, args, kwargs)


def _check_model(model):
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a flax.linen Module, got {type(model).__name__}")
    if model.scope is not None:
        raise ValueError("model must be unbound (pass the module definition, not model.bind(...))")


def prepare(model: nn.Module, qconfig_spec, *, fuse=(), axis_name=None) -> PreparedModel:
    """Attaches activation observers for post-training calibration; ``torch.ao.quantization.prepare``.

    Args:
      model: an unmodified (unbound) flax.linen model built from flax's Dense / Conv /
        Embed / BatchNorm / LayerNorm / GroupNorm and jquant's QuantStub / EmbeddingBag.
      qconfig_spec: a :class:`~jquant.QConfig`, or a dict from module path (regex, dotted
        like ``"block.Dense_0"``; ``""`` is the root) or module type to ``QConfig`` /
        ``None`` (keep that module float), like torch's ``qconfig_dict``. Entries that
        match no module are reported with a ``UserWarning`` on the first trace, and so is
        a model where no module gets an observer (torch: "None of the submodule got
        qconfig applied"). A malformed spec raises ``ValueError`` here.
      fuse: torch's ``fuse_modules`` groups (eval-mode fusion), written as for
        :func:`prepare_qat`: a group's BatchNorm (running statistics) and ReLU run before
        its single output observer, and ``convert`` folds the BatchNorm into the
        quantized weights (``fuse_conv_bn_eval``). Calibrate with
        ``use_running_average=True``.
      axis_name: reduce observer statistics over this mesh axis (data parallelism).
    Returns:
      A :class:`PreparedModel`. As in torch, outputs of quantizable modules (Dense, Conv,
      Embed, QuantStub, BatchNorm2d/3d-shaped, LayerNorm, GroupNorm) get
      ``activation_post_process = qconfig.activation()``; weights are observed at
      ``convert``. Calibrate with ``apply(..., mutable=["quant_stats"])``.
    """
    _check_model(model)
    return PreparedModel(model=model, plan=_core.Plan("ptq", qconfig_spec, fuse, axis_name=axis_name))


def prepare_qat(model: nn.Module, qconfig_spec, *, fuse=(), axis_name=None,
                bn_unbiased_running_var: bool = False) -> PreparedModel:
    """Quantization-aware training; ``torch.ao.quantization.prepare_qat`` (+ ``fuse_modules_qat``).

    Args:
      model: an unmodified (unbound) flax.linen model.
      qconfig_spec: as for :func:`prepare`.
      fuse: torch's ``fuse_modules_qat`` groups, by module path: ``(conv_or_dense, bn)``,
        ``(conv_or_dense, bn, relu)`` or ``(conv_or_dense, relu)``. ``relu`` is ``"relu"``
        / ``nn.relu`` when the model calls the function after the group, or the path of a
        ReLU module (which then becomes the identity, as torch's fused slots do). In an
        ``nn.Sequential`` the ``nn.relu`` layer right after a ``"relu"`` group becomes the
        identity too; a slot ``"<sequential path>.layers_<i>"`` names its ``i``-th layer.
      axis_name: reduce activation statistics over this mesh axis (data parallelism).
      bn_unbiased_running_var: fused BatchNorms update ``running_var`` with the unbiased
        batch variance as torch does (Flax's BatchNorm, the default here, uses the biased
        one).
    Returns:
      A :class:`PreparedModel`: Dense / Conv (1-3D) kernels go through
      ``weight_fake_quant = qconfig.weight()``; Embed weights too when the weight config
      is ``per_channel_affine_float_qparams`` (torch's embedding QAT mapping); module
      outputs through ``activation_post_process``. Fused groups follow torch's nniqat
      ConvBn / ConvBnReLU / LinearBn / ConvReLU / LinearReLU modules (BatchNorm folded into
      the fake-quantized weight, batch statistics while training, ``freeze_bn_stats``).

    Deviations from torch: 1-D convolutions are swapped too (torch has no nnqat.Conv1d
    mapping); sigmoid / tanh / softmax are functions in Flax and get no fixed-qparams
    fake quant. When ReLU is fused as a function the model calls (``nn.relu(conv(x))``),
    the model's own ``relu`` on the fake-quantized output is a forward no-op but blocks
    the gradient of outputs that round to exactly 0 (torch passes it where the
    pre-activation is positive), and costs a pass over the activation; hold the ReLU as a
    layer (an ``nn.Sequential``'s ``nn.relu``, or a ReLU module named by path) for torch's
    exact gradient.
    """
    _check_model(model)
    plan = _core.Plan("qat", qconfig_spec, fuse, axis_name=axis_name,
                      bn_unbiased=bn_unbiased_running_var)
    return PreparedModel(model=model, plan=plan)


def unmatched_spec_entries(model: PreparedModel) -> list:
    """qconfig_spec keys (and fuse groups) that matched no module in the traces so far."""
    if not isinstance(model, PreparedModel):
        raise ValueError("model must come from jquant.linen.prepare / prepare_qat")
    return model.plan.unmatched()
