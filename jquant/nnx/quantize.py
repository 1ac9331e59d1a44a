"""Eager-mode workflow for NNX models: fuse, prepare, prepare_qat, observer dicts.

Counterparts: ``torch.ao.quantization.fuse_modules_qat``, ``prepare``, ``prepare_qat``,
``convert`` (issue [4]), ``torch.ao.nn.intrinsic.qat.freeze_bn_stats`` /
``update_bn_stats``, ``_get_observer_dict``, ``get_observer_state_dict``,
``load_observer_state_dict``.

Graph surgery: the model's module graph is walked from the root; flax's own
``nnx.Linear`` / ``nnx.Conv`` / ``nnx.Embed`` (exact types), jquant's ``EmbeddingBag`` and
the fused modules are replaced by QAT / observed twins that share their Variables, so
parameter paths do not change (fusion moves the BatchNorm under the layer as ``bn``, as
torch's ``fuse_modules_qat`` does).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

from flax import nnx
from flax.nnx import graphlib

from jquant import layers as _L
from jquant._state_dict import StateDictError, sub_dict
from jquant.nnx import modules as M
from jquant.nnx._state import PostProcess
from jquant.nnx.convert import convert  # noqa: F401  (issue [4]; re-exported)

__all__ = ["prepare", "prepare_qat", "convert", "fuse_modules_qat", "fuse_modules", "freeze_bn_stats",
           "update_bn_stats", "get_observer_dict", "get_observer_state_dict",
           "load_observer_state_dict", "propagate_qconfig", "enable_param_learning",
           "enable_static_estimate", "enable_static_observation"]


# ---------------------------------------------------------------------------------------
# graph walking
# ---------------------------------------------------------------------------------------

def _copy(model):
    """A deep copy with its own array buffers (``jit(donate_argnums=...)`` on the prepared
    model's state must not delete the float model's arrays)."""
    return nnx.clone(model, arrays=True)


def _path_str(parts) -> str:
    return ".".join(str(p) for p in parts)


def _child_items(node):
    impl = graphlib.get_node_impl(node)
    if impl is None:
        return []
    out = []
    for k, v in impl.node_dict(node).items():
        if isinstance(k, str) and k.startswith("_pytree__"):
            continue
        if isinstance(v, nnx.Variable) or isinstance(v, PostProcess):
            continue
        if isinstance(v, nnx.Module) or graphlib.is_node(v):
            out.append((k, v))
    return out


def _set_child(parent, key, value):
    impl = graphlib.get_node_impl(parent)
    if getattr(impl, "set_key", None) is None:
        raise ValueError(f"cannot replace child {key!r} of immutable container "
                         f"{type(parent).__name__}; use a list or nnx.List")
    if isinstance(parent, nnx.Pytree) and isinstance(value, nnx.Module):
        # nnx.data: the slot may have held static data (e.g. a relu function attribute)
        value = nnx.data(value)
    if isinstance(parent, nnx.Pytree) and isinstance(key, str):
        setattr(parent, key, value)
    else:
        impl.set_key(parent, key, value)


def _split_path(path) -> list:
    if isinstance(path, (tuple, list)):
        return list(path)
    if path in ("", None):
        return []
    return [int(p) if p.lstrip("-").isdigit() else p for p in str(path).split(".")]


def _get_child(node, key):
    if isinstance(node, nnx.Sequential) and isinstance(key, int):
        return node.layers[key]
    if isinstance(key, int):
        return node[key]
    if isinstance(node, Mapping):
        return node[key]
    if not hasattr(node, key):
        raise KeyError(key)
    return getattr(node, key)


def _resolve(root, path):
    parts = _split_path(path)
    parent, key, node = None, None, root
    for i, p in enumerate(parts):
        try:
            child = _get_child(node, p)
        except (KeyError, IndexError, TypeError, AttributeError):
            raise KeyError(f"no module at path {_path_str(parts[:i + 1])!r}") from None
        if isinstance(node, nnx.Sequential) and isinstance(p, int):
            node = node.layers
        parent, key, node = node, p, child
    return parent, key, node


def _replace(root, path, new):
    parent, key, _ = _resolve(root, path)
    if parent is None:
        return new
    _set_child(parent, key, new)
    return root


# ---------------------------------------------------------------------------------------
# qconfig spec
# ---------------------------------------------------------------------------------------

def _module_qconfig(spec: _L.QConfigSpec, path: str, mod, inherited):
    """torch's priority: the module's own ``qconfig`` attribute, path, type, then the parent's."""
    own = vars(mod).get("qconfig", _L._UNSET)
    if own is not _L._UNSET:
        return own
    v = spec.own(path, type(mod))
    return inherited if v is _L._UNSET else v


def _global(spec: _L.QConfigSpec):
    return None if spec.global_qconfig is _L._UNSET else spec.global_qconfig


# ---------------------------------------------------------------------------------------
# prepare / prepare_qat
# ---------------------------------------------------------------------------------------

_OBSERVE_ONLY = (nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm, nnx.InstanceNorm,
                 nnx.ConvTranspose, nnx.PReLU)
_PREPARED = (M.Linear, M.Conv, M.Embed, M.QATEmbeddingBag, M._ObservedMixin, M._QATFusedMixin)
_SKIP = (nnx.Dropout, M.DeQuantStub, M.Identity, PostProcess)
_LEAF = object()


def _is_float_qparams_weight(qconfig):
    return qconfig is not None and _L.is_float_qparams(_L.build(qconfig.weight))


def _swap(mod, qconfig, qat: bool, axis_name, bn_unbiased=False, root_ref=None):
    """The replacement for ``mod``, ``_LEAF`` (stop, keep), or None (recurse)."""
    t = type(mod)
    if isinstance(mod, _PREPARED) or isinstance(mod, _SKIP):
        return _LEAF
    if t is M.QuantStub:
        if qconfig is not None:
            mod.activation_post_process = M.make_post_process(qconfig.activation, axis_name=axis_name,
                                                              like=root_ref)
        return _LEAF
    fused = t in M.FLOAT_TO_QAT_FUSED
    known = t in (nnx.Linear, nnx.Conv, nnx.Embed, M.EmbeddingBag) or fused or t in _OBSERVE_ONLY
    if not known:
        return None
    if qconfig is None:
        return _LEAF
    if not qat:
        return M.observe(mod, qconfig, axis_name=axis_name)
    if t is nnx.Linear:
        return M.Linear.from_float(mod, qconfig, axis_name=axis_name)
    if t is nnx.Conv:
        return M.Conv.from_float(mod, qconfig, axis_name=axis_name)
    if fused:
        return M.FLOAT_TO_QAT_FUSED[t].from_fused(mod, qconfig, axis_name=axis_name,
                                                  bn_unbiased_running_var=bn_unbiased)
    if t in (nnx.Embed, M.EmbeddingBag) and _is_float_qparams_weight(qconfig):
        cls = M.Embed if t is nnx.Embed else M.QATEmbeddingBag
        return cls.from_float(mod, qconfig, axis_name=axis_name)
    return M.observe(mod, qconfig, axis_name=axis_name)


def _prepare_graph(root, spec: _L.QConfigSpec, qat: bool, axis_name, bn_unbiased=False,
                   report=None):
    """Swaps the quantizable modules of ``root``; ``report`` (a dict, optional) receives
    ``known`` (paths of quantizable modules) and ``prepared`` (how many got a qconfig)."""
    replaced: dict[int, Any] = {}
    visited: set[int] = set()
    root_ref = M.first_param(root)  # stubs' state goes where the model's params are
    report = {} if report is None else report
    report.setdefault("known", [])
    report.setdefault("prepared", 0)

    def visit(node, path, inherited):
        for key, child in _child_items(node):
            cpath = path + (key,)
            if id(child) in replaced:
                _set_child(node, key, replaced[id(child)])
                continue
            if id(child) in visited:
                continue
            visited.add(id(child))
            new = handle(child, cpath, inherited)
            if new is not None and new is not child:
                replaced[id(child)] = new
                _set_child(node, key, new)

    def handle(mod, path, inherited):
        if isinstance(mod, nnx.Module):
            qc = _module_qconfig(spec, _path_str(path), mod, inherited)
            new = _swap(mod, qc, qat, axis_name, bn_unbiased, root_ref)
            if new is not None and not isinstance(mod, _SKIP):
                report["known"].append(_path_str(path))
                if isinstance(mod, _PREPARED) or (new is not _LEAF or (
                        type(mod) is M.QuantStub and qc is not None)):
                    report["prepared"] += 1
            if new is _LEAF:
                return None
            if new is not None:
                return new
        else:
            qc = inherited
        visit(mod, path, qc)
        return None

    visited.add(id(root))
    new_root = handle(root, (), _global(spec))
    return root if new_root is None else new_root


def prepare(model, qconfig_spec=None, *, fuse=(), inplace: bool = False, axis_name=None):
    """Attaches activation observers for post-training calibration; ``torch.ao.quantization.prepare``.

    Args:
      model: an NNX module built from flax's own layers (``nnx.Linear``, ``nnx.Conv``,
        ``nnx.Embed``, norms, ...), jquant's stubs / ``EmbeddingBag`` / fused modules.
      qconfig_spec: one ``QConfig`` for the whole model, or a dict from module path
        (regex, full match on dotted paths such as ``"encoder.0.fc"``; ``""`` is the root)
        or module type to ``QConfig`` / ``None`` (leave float). Priority: a module's own
        ``qconfig`` attribute, then path, then type, then its parent's. Entries that
        matched nothing are reported with a ``UserWarning``, and so is a model where no
        module gets an observer (torch: "None of the submodule got qconfig applied"). A
        malformed spec raises ``ValueError``.
      inplace: modify ``model``'s graph (default: work on a deep copy, arrays included, as
        torch's ``copy.deepcopy``; the float model stays usable, also with buffer donation).
      axis_name: mapped axis over which observers reduce batch statistics.
      fuse: groups for :func:`fuse_modules` (eval-mode fusion, BatchNorm folded into the
        weights), applied first, as the Linen front end's ``prepare(..., fuse=...)``.

    Returns the prepared model: every quantizable leaf with a qconfig becomes an
    ``Observed<Type>`` (same Variables and paths) whose output goes through
    ``activation_post_process = qconfig.activation()``; ``QuantStub`` observes its output;
    ``DeQuantStub`` and ``nnx.Dropout`` get nothing. Weights are not observed here (torch
    observes them at ``convert``). Calibrate by calling the model (eagerly or under
    ``nnx.jit``); the observer state lives in :class:`QuantStat` Variables.
    """
    if not inplace:
        model = _copy(model)
    if fuse:
        model = fuse_modules(model, fuse, inplace=True)
    spec = _L.QConfigSpec(qconfig_spec, module_base=nnx.Module)
    report: dict = {}
    out = _prepare_graph(model, spec, qat=False, axis_name=axis_name, report=report)
    _warn_report(spec, report, "prepare")
    return out


def prepare_qat(model, qconfig_spec=None, *, fuse=(), inplace: bool = False, axis_name=None,
                bn_unbiased_running_var: bool = False):
    """Swaps layers for QAT twins with fake quantization; ``torch.ao.quantization.prepare_qat``.

    Same arguments as :func:`prepare`. ``nnx.Linear`` -> :class:`~jquant.nnx.Linear`,
    ``nnx.Conv`` -> :class:`~jquant.nnx.Conv` (weights through ``weight_fake_quant =
    qconfig.weight()``), fused float modules -> their nniqat twins, ``nnx.Embed`` /
    ``EmbeddingBag`` -> QAT versions when the weight qconfig is
    ``per_channel_affine_float_qparams`` (torch's embedding QAT mapping; otherwise they
    only get an output post-process, as torch's default mapping does). Every quantized
    leaf's output passes through ``activation_post_process = qconfig.activation()``.
    Parameter paths are unchanged; train with ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
    inside ``nnx.jit`` as usual.

    ``fuse``: groups for :func:`fuse_modules_qat`, applied first (as the Linen front
    end's ``prepare_qat(..., fuse=...)``). ``bn_unbiased_running_var``: fused BatchNorms
    update ``running_var`` with the unbiased batch variance as torch does (default: the
    biased one, as flax's BatchNorm).
    """
    if not inplace:
        model = _copy(model)
    if fuse:
        model = fuse_modules_qat(model, fuse, inplace=True)
    spec = _L.QConfigSpec(qconfig_spec, module_base=nnx.Module)
    report: dict = {}
    out = _prepare_graph(model, spec, qat=True, axis_name=axis_name,
                         bn_unbiased=bn_unbiased_running_var, report=report)
    _warn_report(spec, report, "prepare_qat")
    return out


def _warn_report(spec: _L.QConfigSpec, report: dict, fn: str) -> None:
    """Unmatched spec entries, and a model where nothing got a qconfig (torch's prepare
    warns "None of the submodule got qconfig applied" in the second case)."""
    spec.warn_unmatched(known=report["known"])
    if report["prepared"]:
        return
    if report["known"]:
        why = (f"its quantizable modules ({', '.join(repr(k) for k in report['known'][:10])}) "
               f"all resolved to qconfig None: check qconfig_spec (one QConfig quantizes the "
               f"whole model; dict keys are module path regexes or module types)")
    else:
        why = ("it has no quantizable module: build it from nnx.Linear / nnx.Conv / nnx.Embed / "
               "norms and jquant.nnx's QuantStub / EmbeddingBag (custom layers calling jax.lax "
               "directly are not seen)")
    warnings.warn(f"jquant.nnx.{fn}: no module was prepared (no observer or fake quant was "
                  f"inserted), so the model stays float: {why}", UserWarning, stacklevel=3)


def propagate_qconfig(model, qconfig_spec=None) -> dict:
    """``{path: QConfig | None}`` for every module, as prepare would resolve them (debug aid)."""
    spec = _L.QConfigSpec(qconfig_spec, module_base=nnx.Module)
    out = {}

    def walk(node, path, inherited):
        for key, child in _child_items(node):
            cpath = path + (key,)
            if isinstance(child, nnx.Module):
                qc = _module_qconfig(spec, _path_str(cpath), child, inherited)
                out[_path_str(cpath)] = qc
            else:
                qc = inherited
            walk(child, cpath, qc)

    root_qc = _module_qconfig(spec, "", model, _global(spec))
    out[""] = root_qc
    walk(model, (), root_qc)
    return out


# ---------------------------------------------------------------------------------------
# fusion
# ---------------------------------------------------------------------------------------

def _relu_fns():
    import jax.nn
    return (jax.nn.relu, nnx.relu)


def _warn_functional_relu(entry):
    warnings.warn(
        f"fuse_modules_qat: the ReLU {entry!r} is not a module or attribute, so the model's own "
        f"relu call stays after the fused module. Values are unchanged (relu is idempotent), but "
        f"relu's zero derivative at 0 blocks the straight-through gradient of outputs that "
        f"fake-quantize to exactly 0, where torch (ReLU module -> Identity) passes it. Keep the "
        f"relu as a module attribute (self.act = nnx.relu) or an nnx.Sequential entry and name "
        f"it here to match torch's gradients exactly.", UserWarning, stacklevel=4)


def _relu_entry(model, entry):
    """(is_relu, path_to_replace_or_None) for the last entry of a fusion group."""
    if callable(entry) and not isinstance(entry, nnx.Module):
        if entry in _relu_fns():
            _warn_functional_relu(getattr(entry, "__name__", "relu"))
            return True, None
        return False, None
    if isinstance(entry, str):
        try:
            _, _, obj = _resolve(model, entry)
        except KeyError:
            last = entry.split(".")[-1].lower()
            if last == "relu":
                _warn_functional_relu(entry)
            return (last == "relu"), None
        if callable(obj) and not isinstance(obj, nnx.Module) and obj in _relu_fns():
            return True, entry
        if isinstance(obj, M.Identity):
            return True, None
    return False, None


def fuse_modules_qat(model, modules_to_fuse, *, inplace: bool = False):
    """Fuses conv+bn(+relu), conv+relu, linear+bn and linear+relu for QAT.

    ``torch.ao.quantization.fuse_modules_qat``. ``modules_to_fuse``: a list of groups (or
    one group) of dotted paths, e.g. ``[["conv1", "bn1", "relu"], ["fc", "bn2"]]``.
    The first module becomes the fused one (:class:`ConvBn`, :class:`ConvBnReLU`,
    :class:`ConvReLU`, :class:`LinearBn`, :class:`LinearReLU`; the BatchNorm becomes its
    child ``bn``) and the others become :class:`Identity`. flax applies ReLU as a function:
    a last entry that is ``jax.nn.relu`` / ``nnx.relu``, a path naming such a function
    (an attribute ``self.act = nnx.relu`` or an ``nnx.Sequential`` entry; it becomes an
    :class:`Identity`, as torch's ReLU module does) or a path ending in ``relu`` that
    names nothing (the model calls ``nnx.relu`` itself) marks the ReLU. The fused module
    applies the ReLU before its activation post-process, as torch does. In the last two
    cases the model's own relu stays after the fused module: values are unchanged (relu
    is idempotent) but relu's zero derivative at 0 blocks the straight-through gradient of
    outputs that fake-quantize to exactly 0 (a UserWarning says so for a path naming
    nothing); name a relu attribute / Sequential entry for torch's gradients exactly.
    Requirements (as torch): BatchNorm features == output channels, affine BatchNorm.
    """
    if not inplace:
        model = _copy(model)
    for names, first, bn, relu, relu_path in _groups(model, modules_to_fuse):
        if type(first) is nnx.Conv:
            cls = (M.ConvBnReLU if relu else M.ConvBn) if bn is not None else M.ConvReLU
        else:
            cls = M.LinearBn if bn is not None else M.LinearReLU
        model = _replace_group(model, names, relu_path, cls.fuse(first, bn))
    return model


def fuse_modules(model, modules_to_fuse, *, inplace: bool = False):
    """Fuses for post-training quantization, folding BatchNorm into the weights.

    ``torch.ao.quantization.fuse_modules`` (eval mode, ``fuse_conv_bn_eval``): conv+bn ->
    ``nnx.Conv`` with ``w * gamma / sqrt(var + eps)`` and the folded bias (a bias Param
    is added when the conv had none), conv+bn+relu / conv+relu -> :class:`ConvReLU`,
    linear+bn -> ``nnx.Linear``, linear+relu -> :class:`LinearReLU`; the other slots
    become :class:`Identity`. Groups and the ReLU entry as :func:`fuse_modules_qat`.
    """
    if not inplace:
        model = _copy(model)
    for names, first, bn, relu, relu_path in _groups(model, modules_to_fuse):
        if bn is not None:
            kernel, bias = _L.fold_bn(first.kernel[...], None if first.bias is None else first.bias[...],
                                      None if bn.scale is None else bn.scale[...],
                                      None if bn.bias is None else bn.bias[...], bn.mean[...],
                                      bn.var[...], bn.epsilon)
            first.kernel[...] = kernel
            bias = bias.astype(first.param_dtype)
            if first.bias is None:
                first.bias = nnx.Param(bias)
                first.use_bias = True
            else:
                first.bias[...] = bias
        if relu:
            first = (M.ConvReLU if type(first) is nnx.Conv else M.LinearReLU).fuse(first)
        model = _replace_group(model, names, relu_path, first)
    return model


def _groups(model, modules_to_fuse):
    """Validated fusion groups: ``(names, first, bn | None, relu, relu_path)``."""
    groups = list(modules_to_fuse)
    if groups and (isinstance(groups[0], str) or callable(groups[0])):
        groups = [groups]
    out = []
    for group in groups:
        names = list(group)
        if len(names) < 2:
            raise ValueError(f"modules_to_fuse group {group!r} needs at least two entries")
        relu, relu_path = _relu_entry(model, names[-1])
        if relu:
            names = names[:-1]
        mods = [_resolve(model, n)[2] for n in names]
        first = mods[0]
        bn = None
        if len(mods) == 2:
            bn = mods[1]
            if not isinstance(bn, nnx.BatchNorm):
                raise ValueError(f"cannot fuse {[type(m).__name__ for m in mods]}: the second module "
                                 f"must be an nnx.BatchNorm")
        elif len(mods) != 1:
            raise ValueError(f"cannot fuse group {group!r}: supported patterns are conv-bn(-relu), "
                             f"conv-relu, linear-bn, linear-relu")
        t = type(first)
        if t not in (nnx.Conv, nnx.Linear):
            raise ValueError(f"cannot fuse a {t.__name__}: the first module must be nnx.Conv or nnx.Linear")
        if t is nnx.Linear and bn is not None and relu:
            raise ValueError("linear-bn-relu fusion is not supported (torch has no LinearBnReLU)")
        if bn is None and not relu:
            raise ValueError(f"cannot fuse group {group!r}: nothing to fuse")
        if bn is not None:
            M._check_bn(bn, first.out_features, f"fuse {group!r}")
        out.append((names, first, bn, relu, relu_path))
    return out


def _replace_group(model, names, relu_path, fused):
    model = _replace(model, names[0], fused)
    for n in names[1:]:
        model = _replace(model, n, M.Identity())
    if relu_path is not None:
        model = _replace(model, relu_path, M.Identity())
    return model


def _bn_modules(model):
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (M.QATConvBn, M.QATConvBnReLU)):
            yield node


def freeze_bn_stats(model):
    """Fused QAT Conv+BN(+ReLU) modules use (and keep) their BN running stats.

    ``torch.ao.nn.intrinsic.qat.freeze_bn_stats`` applied with ``model.apply``: like
    torch's, it acts on ConvBn / ConvBnReLU (1-3D) only, not on LinearBn (call
    ``module.freeze_bn_stats()`` on a LinearBn, as torch's ``LinearBn1d.freeze_bn_stats()``).
    In place; returns ``model``. ``model.train()`` does not undo it (as in torch). The flag
    is a Variable (``<module>.freeze_bn``, uint8 ``(1,)``), so toggling it never retraces a
    jitted step and checkpoints keep it.
    """
    for m in _bn_modules(model):
        m.freeze_bn_stats()
    return model


def update_bn_stats(model):
    """Undoes :func:`freeze_bn_stats` (batch statistics while training again); in place.

    ``torch.ao.nn.intrinsic.qat.update_bn_stats`` (ConvBn / ConvBnReLU only, as torch's).
    """
    for m in _bn_modules(model):
        m.update_bn_stats()
    return model


# ---------------------------------------------------------------------------------------
# observer dicts
# ---------------------------------------------------------------------------------------

def get_observer_dict(model) -> dict:
    """``{path: PostProcess}`` for every observer / fake quant in ``model``.

    Counterpart of torch's ``_get_observer_dict`` (which lists the activation
    post-processes; this includes ``weight_fake_quant`` too), e.g.
    ``{"fc1.module.activation_post_process": ..., "fc1.module.weight_fake_quant": ...}``.
    Each value has ``calculate_qparams()``, ``state_dict()``, ``get_tensor_value()``
    (RecordingObserver), ``config`` and ``state``.
    """
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, PostProcess):
            out[_path_str(path)] = node
    return dict(sorted(out.items()))


def get_observer_state_dict(model) -> dict:
    """Every observer's state dict under its path; ``torch.ao.quantization.get_observer_state_dict``.

    ``{f"{path}.{key}": np.ndarray}`` with torch's buffer names, e.g.
    ``"fc.activation_post_process.min_val"``, ``"fc.weight_fake_quant.scale"``.
    """
    out = {}
    for path, pp in get_observer_dict(model).items():
        for k, v in pp.state_dict().items():
            out[f"{path}.{k}"] = v
    return out


def load_observer_state_dict(model, obs_dict: Mapping[str, Any], strict: bool = True):
    """Loads :func:`get_observer_state_dict` output into ``model`` in place; torch's
    ``load_observer_state_dict``. Missing keys (and, with ``strict``, unexpected ones)
    raise :class:`jquant.StateDictError`. Returns ``model``.
    """
    pps = get_observer_dict(model)
    seen = set()
    missing = []
    loaded = {}
    for path, pp in pps.items():
        prefix = f"{path}."
        sd = sub_dict(obs_dict, prefix)
        seen.update(prefix + k for k in sd)
        required = [k for k in pp.config.state_keys]
        miss = [prefix + k for k in required if k not in sd]
        if miss:
            missing.extend(miss)
            continue
        loaded[path] = pp.config.load_state_dict(sd, strict=strict)
    unexpected = sorted(k for k in obs_dict if k not in seen)
    msgs = []
    if missing:
        msgs.append(f"missing keys {missing}")
    if unexpected and strict:
        msgs.append(f"unexpected keys {unexpected}")
    if msgs:
        raise StateDictError("Error loading observer state dict: " + "; ".join(msgs))
    for path, state in loaded.items():
        pps[path].set_state(state)
    return model


# ---------------------------------------------------------------------------------------
# LearnableFakeQuantize toggles over a whole model
# ---------------------------------------------------------------------------------------

def _learnable(model):
    return [pp for pp in get_observer_dict(model).values() if _L.is_learnable(pp.config)]


def enable_param_learning(model):
    """Every LearnableFakeQuantize learns its scale / zero point (torch's
    ``enable_param_learning``: learning on, fake quant on, static estimate off). In place."""
    for pp in _learnable(model):
        pp.enable_param_learning()
    return model


def enable_static_estimate(model):
    """Every LearnableFakeQuantize takes its qparams from its observer (learning off). In place."""
    for pp in _learnable(model):
        pp.enable_static_estimate()
    return model


def enable_static_observation(model):
    """Every LearnableFakeQuantize only observes (learning and fake quant off). In place."""
    for pp in _learnable(model):
        pp.enable_static_observation()
    return model
