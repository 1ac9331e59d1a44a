"""``convert`` for prepared Linen models: real integer inference.

Counterpart: ``torch.ao.quantization.convert`` (eager mode). Call shape (API.md)::

    qmodel, qvariables = jquant.linen.convert(prepared, variables)   # after calibration / QAT
    y = qmodel.apply(qvariables, x)                                   # jittable, exportable
    jquant.linen.parameter_bytes(qvariables)

``qvariables`` holds the float ``params`` / ``batch_stats`` of the modules that stay float
and a ``"quantized"`` collection with, per converted module path, its packed integer
parameters (:mod:`jquant.quantized`: int8 weights with their qparams, packed 8/4-bit
embedding rows) and stub qparams. ``qmodel`` runs the unmodified float model under a
method interceptor that swaps each converted module's call for the integer kernel:

* Dense / Conv (1-3D) -> ``nnq.Linear`` / ``nnq.ConvNd`` (``nniq.*ReLU`` when ReLU was
  fused); a fused BatchNorm is folded into the weights and its call becomes the identity.
* Embed / EmbeddingBag with a ``per_channel_affine_float_qparams`` weight config ->
  ``nnq.Embedding`` / ``nnq.EmbeddingBag`` (8-bit, or 4-bit for quint4x2); other embedding
  configs stay float (torch's convert raises for them).
* QuantStub -> quantize (``nnq.Quantize``), DeQuantStub -> dequantize.
* Observed BatchNorm / LayerNorm / GroupNorm run in float and their output is quantized
  with their observer's qparams (what torch's quantized norm modules output).
* Everything else stays float.

Activations between modules: see :func:`jquant.quantized.activation_flow`. They travel as
exact dequantized values of the quantized integers, so the model's own Python code (relu,
reshape, pooling) runs unchanged; each converted layer re-derives the exact integers with
the qparams of the module that produced its input, or, without a stub, of the most recent
quantized output (the preceding observer); a quantized layer with nothing quantized
before it quantizes its input dynamically (``choose_qparams_per_tensor``).
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, Optional

import jax.numpy as jnp
import flax.linen as nn

from jquant import layers
from jquant import quantized as Q
from jquant.linen import _core
from jquant.linen.prepare import PreparedModel
from jquant.types import canonical_dtype

__all__ = ["convert", "ConvertedModel", "parameter_bytes"]

QUANTIZED = "quantized"


@dataclasses.dataclass(frozen=True)
class _Entry:
    kind: str                 # dense | conv | embed | embedding_bag | quant_stub | dequant_stub | post
    relu: bool = False
    weight_symmetric: bool = True
    act_dtype: Any = None
    emits: bool = True         # embeddings: quantize the output with their observer


class ConvertPlan:
    """Static description of a converted model: path -> :class:`_Entry`, identity paths."""

    def __init__(self, entries: dict, identity: frozenset, backend: str,
                 fusion: Optional[_core.Fusion] = None):
        self.entries = dict(entries)
        self.identity = frozenset(identity)
        self.backend = backend
        self.fusion = fusion or _core.Fusion()  # the prepare plan's fused groups

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other

    def __repr__(self):
        return f"ConvertPlan({len(self.entries)} modules, backend={self.backend!r})"


def _get(tree, path: str):
    cur = tree
    for p in path.split(".") if path else []:
        if not isinstance(cur, Mapping) or p not in cur:
            return None
        cur = cur[p]
    return cur


def _to_dict(tree):
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _pop(tree: dict, path: str):
    parts = path.split(".") if path else []
    if not parts:
        return
    stack = [tree]
    cur = tree
    for p in parts[:-1]:
        if not isinstance(cur, dict) or p not in cur:
            return
        cur = cur[p]
        stack.append(cur)
    if isinstance(cur, dict):
        cur.pop(parts[-1], None)
    for i in range(len(parts) - 2, -1, -1):  # drop emptied parents
        parent = stack[i]
        if isinstance(parent.get(parts[i]), dict) and not parent[parts[i]]:
            parent.pop(parts[i])


def _put(tree: dict, path: str, value):
    parts = path.split(".") if path else []
    if not parts:
        raise ValueError("the root module itself cannot be converted in place; wrap it")
    cur = tree
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value


class _Run:
    def __init__(self, cplan, qvars):
        self.cplan, self.qvars = cplan, qvars


_RUN = None  # set while a converted model runs (module-level: one trace at a time per call)


def _intercept(next_fun, args, kwargs, context):
    m = context.module
    run = _RUN
    if run is None or isinstance(m, ConvertedModel):
        return next_fun(*args, **kwargs)
    path = _core.module_path(m)
    cplan = run.cplan
    entry = cplan.entries.get(path)
    if context.method_name == "setup":
        if entry is not None and entry.kind in ("embed", "embedding_bag"):
            return None  # flax's Embed creates its (now removed) float table in setup
        return next_fun(*args, **kwargs)
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    if path in cplan.identity:
        return args[0]
    if isinstance(m, nn.Sequential) and cplan.fusion:
        skip = _core.fused_relu_slots(m, path, cplan.fusion)
        return _core.call_sequential(m, skip, args, kwargs) if skip else next_fun(*args, **kwargs)
    if entry is None:
        return _core.call_float(next_fun, args, kwargs, cplan.fusion.by_layer.get(path))
    qv = _get(run.qvars, path)
    kind = entry.kind
    if kind == "dequant_stub":
        Q.leave_quantized()
        return args[0]
    if kind == "quant_stub":
        return Q.emit(Q.quantize(args[0], qv["scale"], qv["zero_point"], entry.act_dtype))
    if kind == "post":
        y = next_fun(*args, **kwargs)
        return Q.emit_float(y, (qv["scale"], qv["zero_point"]), entry.act_dtype)
    if kind == "dense":
        rule = Q.requant_rule(cplan.backend, "linear")
        x = Q.take(args[0], reduce_range=rule == "fbgemm")
        return Q.emit(Q.quantized_linear(x, qv["packed"], relu=entry.relu, requant=rule))
    if kind == "conv":
        if m.input_dilation not in (None, 1) and any(
                d != 1 for d in ((m.input_dilation,) if isinstance(m.input_dilation, int)
                                 else m.input_dilation)):
            raise NotImplementedError(f"{path}: quantized Conv with input_dilation")
        groups = int(m.feature_group_count)
        rule = Q.requant_rule(cplan.backend, "conv", groups=groups,
                              weight_symmetric=entry.weight_symmetric)
        x = Q.take(args[0], reduce_range=rule == "fbgemm")
        y = Q.quantized_conv(x, qv["packed"], strides=1 if m.strides is None else m.strides,
                             padding=m.padding,
                             dilation=1 if m.kernel_dilation is None else m.kernel_dilation,
                             groups=groups, relu=entry.relu, requant=rule)
        return Q.emit(y)
    if kind == "embed":
        y = Q.quantized_embedding(args[0], qv["packed"], embedding_dim=m.features)
    else:  # embedding_bag (jquant.linen.EmbeddingBag)
        offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
        psw = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
        y = Q.quantized_embedding_bag(args[0], qv["packed"], offsets, mode=m.mode,
                                      per_sample_weights=psw,
                                      include_last_offset=m.include_last_offset,
                                      padding_idx=m.padding_idx, embedding_dim=m.features)
    if entry.emits:
        return Q.emit_float(y, (qv["scale"], qv["zero_point"]), entry.act_dtype)
    return y


class ConvertedModel(nn.Module, _core.ModelWrapper):
    """A converted (integer-inference) Linen model; ``torch.ao.quantization.convert``'s result.

    Attributes: ``model`` (the unmodified float model), ``cplan`` (static plan). Apply with
    the ``qvariables`` from :func:`convert`; :meth:`call_method` runs another method of
    ``model``. Outputs are float32 (dequantized where the model ends in a DeQuantStub or a
    quantized layer).
    """
    model: nn.Module
    cplan: Any

    def setup(self):
        nn.share_scope(self, self.model)

    def _forward(self, fn_name, args, kwargs):
        global _RUN
        fn = self.model if fn_name == "__call__" else getattr(self.model, fn_name)
        qvars = _to_dict(self.variables.get(QUANTIZED, {}))
        prev = _RUN
        _RUN = _Run(self.cplan, qvars)
        try:
            with Q.activation_flow(), nn.intercept_methods(_intercept):
                return fn(*args, **kwargs)
        finally:
            _RUN = prev

    def __call__(self, *args, **kwargs):
        return self._forward("__call__", args, kwargs)

    def call_method(self, name: str, *args, **kwargs):
        """Runs ``model.<name>(*args, **kwargs)`` converted."""
        return self._forward(name, args, kwargs)


def _state(variables, path, name, cfg):
    st = _get(variables.get(_core.QUANT_STATS, {}), path)
    st = None if st is None else st.get(name)
    if st is not None and layers.is_learnable(cfg):
        p = _get(variables.get("params", {}), path)
        p = None if p is None else p.get(name)
        if p is not None:
            st = st._replace(scale=p["scale"], zero_point=p["zero_point"])
    return st


def _act_qparams(cfg, state, path, what="output", problems=None):
    """The output qparams of ``path``'s activation post-process, or None when it has none.

    With ``problems`` (a dict of lists), a missing state / an observer that never saw data
    is recorded there (convert then raises once, naming every such module) and torch's
    default qparams are returned meanwhile.
    """
    if cfg is None or isinstance(cfg, _core.NoopObserver) or \
            isinstance(cfg, _core.PlaceholderObserver):
        return None
    where = f"{path or '<root>'} ({what} activation_post_process)"
    if state is None:
        if problems is None:
            return None
        problems["missing"].append(where)
        return jnp.ones((), jnp.float32), jnp.zeros((), jnp.int32)
    if problems is None:
        Q.check_observed(state, where)
    elif Q.unobserved_field(state) is not None:
        problems["unobserved"].append(where)
    return Q.activation_qparams(cfg, state)


def _raise_problems(problems):
    if problems["missing"]:
        names = ", ".join(problems["missing"][:12])
        raise ValueError(f"convert: variables hold no quant_stats state for {names}. Pass the "
                         f"prepared model's variables (prepared.init(rng, x) gives params plus "
                         f"'quant_stats'; after calibration / training merge the updated "
                         f"collection: variables = {{**variables, **updates}}), not the float "
                         f"model's")
    if problems["unobserved"]:
        raise Q.unobserved_error(problems["unobserved"])


def _act_dtype(cfg):
    d = getattr(cfg, "dtype", jnp.uint8)
    try:
        return canonical_dtype(d)
    except Exception:  # noqa: BLE001
        return jnp.uint8


def _symmetric(packed) -> bool:
    zp = packed.weight_zero_point
    try:
        return not bool(jnp.any(jnp.asarray(zp) != 0))
    except Exception:  # noqa: BLE001 - traced
        return True


def convert(model: PreparedModel, variables, *, backend: str = "x86"):
    """Real integer inference from a calibrated / trained prepared model; ``torch.ao.quantization.convert``.

    Args:
      model: from :func:`jquant.linen.prepare` (after calibration) or
        :func:`jquant.linen.prepare_qat` (after training), traced at least once.
      variables: its variables (``params``, ``batch_stats``, ``quant_stats``).
      backend: the quantized engine whose requantization to reproduce: ``"x86"`` (torch's
        default; Linear via fbgemm, Conv as :func:`jquant.quantized.x86_conv_requant`),
        ``"fbgemm"``, ``"qnnpack"`` or ``"onednn"``.
    Returns:
      ``(qmodel, qvariables)``: a :class:`ConvertedModel` and its variables (module
      docstring). PTQ weights are observed here with ``qconfig.weight()`` as torch's
      ``from_float`` does; QAT weights use their ``weight_fake_quant`` state (run once more
      on the weight, as torch). Raises ``ValueError`` if an activation observer a converted
      module needs never saw data.
    """
    if not isinstance(model, PreparedModel):
        raise ValueError(f"model must come from jquant.linen.prepare / prepare_qat (got "
                         f"{type(model).__name__}): prepared = prepare(model, qconfig); "
                         f"calibrate or train it; then convert(prepared, variables)")
    if backend not in Q.BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {Q.BACKENDS}")
    plan = model.plan
    if not plan.kinds and not plan.warned:
        raise ValueError("the prepared model has not been traced yet: call model.init(...) and "
                         "calibrate / train it before convert")
    if not plan.registry:
        warnings.warn("jquant.linen.convert: nothing to convert: no module of the model got an "
                      "observer or fake quant at prepare (see the warning prepare gave on its "
                      "first trace); the converted model runs float", UserWarning, stacklevel=2)
    problems: dict = {"missing": [], "unobserved": []}
    variables = _to_dict(variables)
    params = _to_dict(variables.get("params", {}))
    stats = _to_dict(variables.get("batch_stats", {}))
    out_params = _to_dict(params)
    out_stats = _to_dict(stats)
    quant: dict = {}
    entries: dict = {}
    identity = set(plan.fusion.relu_paths)
    for path, kind in sorted(plan.kinds.items()):
        reg = plan.registry.get(path, {})
        acfg = reg.get(_core.ACT)
        wcfg = reg.get(_core.WEIGHT)
        qconfig = plan.qconfigs.get(path)
        astate = _state(variables, path, _core.ACT, acfg)
        if kind == "quant_stub":
            qp = _act_qparams(acfg, astate, path, problems=problems)
            if qp is None:
                continue
            entries[path] = _Entry("quant_stub", act_dtype=_act_dtype(acfg))
            _put(quant, path, {"scale": qp[0], "zero_point": qp[1]})
        elif kind == "dequant_stub":
            entries[path] = _Entry("dequant_stub")
        elif kind in ("dense", "conv"):
            qp = _act_qparams(acfg, astate, path, problems=problems)
            if qp is None:
                raise ValueError(f"{path}: a quantized {kind} needs an activation observer / fake "
                                 f"quant with qparams (qconfig.activation), got {acfg!r}")
            p = _get(params, path) or {}
            if "kernel" not in p:
                raise ValueError(f"{path}: no params 'kernel' found in variables")
            entry = plan.fusion.by_layer.get(path)
            bn = None
            if entry is not None and entry.bn is not None:
                bp = _get(params, entry.bn) or {}
                bs = _get(stats, entry.bn) or {}
                bn = (bs["mean"], bs["var"], plan.bn_eps[entry.bn], bp.get("scale"),
                      bp.get("bias"))
                identity.add(entry.bn)
                _pop(out_params, entry.bn)
                _pop(out_stats, entry.bn)
            if wcfg is not None:
                wpp, wstate = wcfg, _state(variables, path, _core.WEIGHT, wcfg)
            else:
                wpp, wstate = layers.build(qconfig.weight), None
            packed = Q.pack_layer(kind, p["kernel"], p.get("bias"), wpp, wstate, qp, bn=bn)
            relu = bool(entry is not None and entry.relu)
            entries[path] = _Entry(kind, relu=relu, weight_symmetric=_symmetric(packed),
                                   act_dtype=_act_dtype(acfg))
            _put(quant, path, {"packed": packed})
            _pop(out_params, path)
        elif kind in ("embed", "embedding_bag"):
            w = wcfg if wcfg is not None else (layers.build(qconfig.weight)
                                               if qconfig is not None else None)
            if w is None or not layers.is_float_qparams(w):
                continue  # stays float (torch's convert requires float_qparams weights)
            p = _get(params, path) or {}
            wstate = _state(variables, path, _core.WEIGHT, w) if wcfg is not None else None
            packed = Q.pack_embedding(p["embedding"], w, wstate)
            qp = _act_qparams(acfg, astate, path, problems=problems)
            rec = {"packed": packed}
            if qp is not None:
                rec.update(scale=qp[0], zero_point=qp[1])
            entries[path] = _Entry(kind, emits=qp is not None, act_dtype=_act_dtype(acfg))
            _put(quant, path, rec)
            _pop(out_params, path)
        elif kind in ("bn", "norm"):
            if path in plan.fusion.by_bn:
                continue
            qp = _act_qparams(acfg, astate, path, problems=problems)
            if qp is None:
                continue
            entries[path] = _Entry("post", act_dtype=_act_dtype(acfg))
            _put(quant, path, {"scale": qp[0], "zero_point": qp[1]})
    _raise_problems(problems)
    qvariables = {k: _to_dict(v) for k, v in variables.items()
                  if k not in ("params", "batch_stats", _core.QUANT_STATS)}
    qvariables["params"] = out_params
    if out_stats:
        qvariables["batch_stats"] = out_stats
    qvariables[QUANTIZED] = quant
    cplan = ConvertPlan(entries, frozenset(identity), backend, plan.fusion)
    return ConvertedModel(model=model.model, cplan=cplan), qvariables


def parameter_bytes(variables) -> int:
    """Bytes of a (float or converted) Linen model's variables, observer state excluded.

    Counts ``params``, ``batch_stats`` and the converted ``"quantized"`` collection (int8
    weights at one byte, 4-bit embedding rows packed two per byte); see
    :func:`jquant.quantized.param_bytes`.
    """
    return Q.param_bytes({k: v for k, v in dict(variables).items() if k != _core.QUANT_STATS})
