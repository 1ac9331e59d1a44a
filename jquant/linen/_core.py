"""The Linen front end's machinery: plans, the method interceptor, per-module quant state.

Internal. A :class:`Plan` holds what ``prepare`` / ``prepare_qat`` were asked to do (mode,
resolved qconfig spec, fusions, options) plus what tracing found (which configs sit at
which module path: the registry behind ``get_observer_dict``). While a prepared model
runs, :func:`intercept` sees every submodule call of the unmodified model and routes the
ones it quantizes through the shared building blocks in :mod:`jquant.layers`.

State lives in the ``"quant_stats"`` collection under the module's own scope, named as
torch names the submodules: ``weight_fake_quant``, ``activation_post_process`` (and
``freeze_bn`` on a conv / dense fused with a BatchNorm). A LearnableFakeQuantize keeps
its trainable ``scale`` / ``zero_point`` in ``"params"`` under the same name.
"""
from __future__ import annotations

import contextvars
import dataclasses
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from jquant import _numerics as nm
from jquant import layers
from jquant.observers import NoopObserver, PlaceholderObserver

QUANT_STATS = "quant_stats"
WEIGHT = "weight_fake_quant"
ACT = "activation_post_process"
FREEZE_BN = "freeze_bn"

# ----------------------------------------------------------------------------------------
# fusion specification
# ----------------------------------------------------------------------------------------


def _is_relu_marker(v) -> bool:
    return v is jax.nn.relu or v is nn.relu or (isinstance(v, str) and v.lower() == "relu")


@dataclasses.dataclass(frozen=True)
class FuseEntry:
    """One fused group: a Dense / Conv at ``layer``, optionally the BatchNorm at ``bn``, then ReLU.

    ``relu_path``: a module path whose call becomes the identity (a ReLU *module*, as
    torch's fused ReLU slot becomes ``nn.Identity``); ``None`` when ReLU is a function.
    """
    layer: str
    bn: Optional[str]
    relu: bool
    relu_path: Optional[str]


def _as_path(v, what) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, tuple) and all(isinstance(p, str) for p in v):
        return ".".join(v)
    raise ValueError(f"fuse: {what} must be a module path (dotted str or tuple of names), got {v!r}")


def parse_fuse(fuse) -> tuple:
    """Normalises the ``fuse`` argument (torch's ``fuse_modules_qat`` module lists).

    Each entry is ``(layer, bn)``, ``(layer, bn, relu)`` or ``(layer, relu)``: module paths
    (``"block.Conv_0"``) of a Flax ``Dense`` / ``Conv`` and the ``BatchNorm`` it feeds;
    ``relu`` is ``"relu"`` / ``nn.relu`` (a function call after the group) or the path of
    a ReLU module or of an ``nn.Sequential`` slot (see :func:`fused_relu_slots`). Module
    types are only known when the model runs, so a two-entry group's second path is read
    as the BatchNorm: write a ReLU *module* without a BatchNorm as
    ``(layer, None, relu_path)``.
    """
    if fuse is None:
        return ()
    if isinstance(fuse, (str, tuple)) and fuse and isinstance(fuse[0], str) and not isinstance(fuse, str):
        fuse = [fuse]
    entries = []
    for item in fuse:
        if isinstance(item, FuseEntry):
            entries.append(item)
            continue
        if not isinstance(item, (list, tuple)) or len(item) not in (2, 3):
            raise ValueError(f"fuse: each entry must be (layer, bn), (layer, bn, relu) or "
                             f"(layer, relu); got {item!r}")
        layer = _as_path(item[0], "the first entry")
        if len(item) == 3:
            bn = None if item[1] is None else _as_path(item[1], "the BatchNorm entry")
            relu_v = item[2]
        elif _is_relu_marker(item[1]):
            bn, relu_v = None, item[1]
        else:
            bn, relu_v = _as_path(item[1], "the BatchNorm entry"), None
        relu_path = None
        if relu_v is not None and not _is_relu_marker(relu_v):
            relu_path = _as_path(relu_v, "the ReLU entry")
        entries.append(FuseEntry(layer, bn, relu_v is not None, relu_path))
    seen = set()
    for e in entries:
        for p in (e.layer, e.bn):
            if p is not None and p in seen:
                raise ValueError(f"fuse: module {p!r} appears in more than one fused group")
            seen.add(p)
    return tuple(entries)


class Fusion:
    """The fused groups (:func:`parse_fuse`) indexed by path: ``by_layer`` (Dense / Conv),
    ``by_bn`` (BatchNorm), ``relu_paths`` (ReLU module or nn.Sequential slot; the identity
    while fused) and ``relu_call_ends`` (the last module of each group whose ReLU is the
    function the model calls after it). Shared by the prepared and the converted model."""

    def __init__(self, fuse=()):
        self.groups = parse_fuse(fuse)
        self.by_layer = {e.layer: e for e in self.groups}
        self.by_bn = {e.bn: e for e in self.groups if e.bn is not None}
        self.relu_paths = {e.relu_path: e for e in self.groups if e.relu_path is not None}
        self.relu_call_ends = frozenset(e.bn if e.bn is not None else e.layer
                                        for e in self.groups if e.relu and e.relu_path is None)

    def __bool__(self):
        return bool(self.groups)


def fused_relu_slots(seq: nn.Sequential, seq_path: str, fusion: Fusion) -> frozenset:
    """Indices of the ReLU *functions* in ``seq.layers`` that a fused group already applies.

    torch's fused ConvReLU / LinearReLU / ConvBnReLU turn the group's ReLU module into the
    identity. A Flax ``nn.Sequential`` holds ReLU as a function, which has no module path;
    its slot ``f"{seq_path}.layers_{i}"`` (the name flax gives a module at index ``i``)
    stands for it. A slot becomes the identity when a group names it as its ReLU, or when
    it holds ``relu`` right after a group fused with ``"relu"`` (the fused op applies the
    ReLU; the model's own call would also zero the gradient of outputs that round to 0).
    Raises ValueError for a slot named as a ReLU that holds another function, or named as
    a BatchNorm. A subclass with its own ``__call__`` runs as it is (empty set).
    """
    if type(seq).__call__ is not nn.Sequential.__call__:
        return frozenset()
    prefix = f"{seq_path}." if seq_path else ""
    skip = set()
    layers_ = tuple(seq.layers)
    for i, fn in enumerate(layers_):
        if isinstance(fn, nn.Module):
            continue
        slot = f"{prefix}layers_{i}"
        if slot in fusion.relu_paths:
            if not _is_relu_marker(fn):
                raise ValueError(f"fuse: {slot} is {getattr(fn, '__name__', fn)!r} in an "
                                 f"nn.Sequential, not relu; only ReLU fuses")
            skip.add(i)
        elif slot in fusion.by_bn:
            raise ValueError(f"fuse: {slot} is the function {getattr(fn, '__name__', fn)!r} "
                             f"in an nn.Sequential, not a BatchNorm; fuse a ReLU function "
                             f"as (layer, 'relu'), (layer, None, {slot!r}) or (layer, bn, "
                             f"{slot!r})")
        elif (i > 0 and _is_relu_marker(fn) and isinstance(layers_[i - 1], nn.Module)
              and module_path(layers_[i - 1]) in fusion.relu_call_ends):
            skip.add(i)
    return frozenset(skip)


def call_float(next_fun, args, kwargs, entry: Optional[FuseEntry]):
    """A layer left float. Its fused group's ReLU still runs here, since the group's ReLU
    slot (a module or an nn.Sequential layer) is the identity."""
    y = next_fun(*args, **kwargs)
    return jax.nn.relu(y) if entry is not None and entry.relu else y


def call_sequential(seq: nn.Sequential, skip: frozenset, args, kwargs):
    """``nn.Sequential.__call__`` with the layers at indices ``skip`` as the identity."""
    if not seq.layers:
        raise ValueError(f"Empty Sequential module {seq.name}.")
    out = args[0] if 0 in skip else seq.layers[0](*args, **kwargs)
    for i, layer in enumerate(seq.layers[1:], start=1):
        if i in skip:
            continue
        if isinstance(out, tuple):
            out = layer(*out)
        elif isinstance(out, dict):
            out = layer(**out)
        else:
            out = layer(out)
    return out


# ----------------------------------------------------------------------------------------
# plan
# ----------------------------------------------------------------------------------------


class Plan:
    """What a prepared model quantizes (static) and what tracing found (registry)."""

    def __init__(self, mode: str, spec, fuse=(), *, axis_name=None, bn_unbiased: bool = False):
        if mode not in ("ptq", "qat"):
            raise ValueError(f"mode={mode!r}")
        self.mode = mode
        self.spec = layers.QConfigSpec(spec, module_base=nn.Module)
        self.fusion = Fusion(fuse)
        self.axis_name = axis_name
        self.bn_unbiased = bool(bn_unbiased)
        self.registry: dict = {}       # path -> {name: config}
        self.kinds: dict = {}          # path -> kind
        self.qconfigs: dict = {}       # path -> resolved QConfig | None
        self.bn_eps: dict = {}         # fused BN path -> epsilon
        self.fused_seen: set = set()
        self.warned = False

    def register(self, path: str, name: str, cfg) -> None:
        if cfg is not None:
            self.registry.setdefault(path, {})[name] = cfg

    def unmatched(self) -> list:
        out = self.spec.unmatched()
        out += [f"fuse {e.layer}" for e in self.fusion.groups if e.layer not in self.fused_seen]
        return out

    def warn_unmatched_once(self) -> None:
        if self.warned:
            return
        self.warned = True
        extra = [f"fuse entry {(e.layer, e.bn) if e.bn else e.layer!r}" for e in self.fusion.groups
                 if e.layer not in self.fused_seen]
        self.spec.warn_unmatched(extra, known=self.qconfigs)
        if self.registry:
            return
        fn = "prepare_qat" if self.mode == "qat" else "prepare"
        if self.qconfigs:   # torch's prepare warns "None of the submodule got qconfig applied"
            why = (f"its quantizable modules ({', '.join(repr(k) for k in sorted(self.qconfigs)[:10])}"
                   f") all resolved to qconfig None: check qconfig_spec (one QConfig quantizes "
                   f"the whole model; dict keys are module path regexes or module types)")
        else:
            why = ("it calls no quantizable module: build it from flax's Dense / Conv / Embed / "
                   "BatchNorm / LayerNorm / GroupNorm and jquant.linen's QuantStub / "
                   "EmbeddingBag (functions such as jnp.dot or nn.tanh are not seen)")
        warnings.warn(f"jquant.linen.{fn}: no module was prepared (no observer or fake quant "
                      f"was inserted), so the model runs float: {why}", UserWarning,
                      stacklevel=3)

    # identity hashing: a plan is a static attribute of the prepared Linen module
    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other

    def __repr__(self):
        return f"Plan(mode={self.mode!r}, fuse={len(self.fusion.groups)} groups)"


class Trace:
    """Per-call context: the plan, the root variables and pending fused BatchNorms."""

    def __init__(self, plan: Plan, root_vars):
        self.plan = plan
        self.root_vars = root_vars
        self.pending: dict = {}


_TRACE: contextvars.ContextVar = contextvars.ContextVar("jquant_linen_trace", default=None)


def current_trace() -> Optional[Trace]:
    return _TRACE.get()


def dotted(path) -> str:
    return ".".join(str(p) for p in path)


# ----------------------------------------------------------------------------------------
# qconfig resolution
# ----------------------------------------------------------------------------------------


class JQuantModule:
    """Marker base of jquant's own Linen modules (they quantize themselves)."""


class ModelWrapper:
    """Marker base of the modules that wrap a user's model (``PreparedModel``,
    ``ConvertedModel``): module paths start below them."""


def _ancestors(m) -> list:
    """``m`` and its parents up to the model root (a wrapper excluded), root first."""
    mods = []
    cur = m
    while isinstance(cur, nn.Module) and not isinstance(cur, ModelWrapper):
        mods.append(cur)
        cur = cur.parent
    return mods[::-1]


def module_path(m) -> str:
    """The dotted path of ``m``'s variables, e.g. ``"block.Dense_0"`` (root: ``""``).

    Built from module names, not ``m.path``: inside a prepared model the wrapped model
    shares the root scope, and submodules bound before that (dataclass fields of a
    setup-style model) keep a scope path that still names the wrapper's field.
    """
    return ".".join(mm.name for mm in _ancestors(m)[1:])


def module_chain(m) -> list:
    """``(path, type)`` from the root to ``m`` (skipping the prepared wrapper)."""
    return [(module_path(mm), type(mm)) for mm in _ancestors(m)]


def resolve_qconfig(m, trace: Optional[Trace], own_qconfig=layers._UNSET):
    """The QConfig of module ``m`` (None: float) under the active plan and its own qconfig."""
    if trace is None:
        return None if own_qconfig is layers._UNSET else own_qconfig
    path = module_path(m)
    plan = trace.plan
    if path in plan.qconfigs and own_qconfig is layers._UNSET:
        return plan.qconfigs[path]
    q = plan.spec.resolve(module_chain(m), own_qconfig)
    plan.qconfigs[path] = q
    return q


# ----------------------------------------------------------------------------------------
# quant state in a module's scope
# ----------------------------------------------------------------------------------------


def _stateless(cfg) -> bool:
    return isinstance(cfg, (NoopObserver, PlaceholderObserver))


def updating(m) -> bool:
    return (not m.is_initializing()) and m.is_mutable_collection(QUANT_STATS)


class Slot:
    """One observer / fake-quant config bound to a variable in a module's scope."""

    def __init__(self, m, name: str, cfg, x, layout: Optional[str] = None):
        self.m, self.name, self.cfg, self.layout = m, name, cfg, layout
        self.var = None
        self.param = None
        if cfg is None or _stateless(cfg):
            return
        if layout is None:
            init = lambda: layers.post_process_init(cfg, x)  # noqa: E731
        else:
            init = lambda: layers.weight_init(cfg, x, layout)  # noqa: E731
        # Through the scope: flax's Embed.__call__ is not compact (its table comes from setup),
        # and Module.variable refuses to create variables outside setup / compact methods.
        self.var = m.scope.variable(QUANT_STATS, name, init)
        if layers.is_learnable(cfg):
            st = self.var.value
            self.param = m.scope.param(name, lambda _rng: {"scale": st.scale,
                                                           "zero_point": st.zero_point})

    def state(self):
        st = self.var.value
        if self.param is not None:
            st = st._replace(scale=self.param["scale"], zero_point=self.param["zero_point"])
        return st

    def __call__(self, x, axis_name=None):
        """Runs the config on ``x`` (updating the stored state when allowed)."""
        if self.cfg is None or self.var is None:
            return x
        if self.m.is_initializing():
            return x
        upd = updating(self.m)
        if self.layout is None:
            y, new = layers.post_process_apply(self.cfg, self.state(), x, update=upd,
                                               axis_name=axis_name)
        else:
            y, new = layers.weight_apply(self.cfg, self.state(), x, self.layout, update=upd)
        if upd:
            self.var.value = new
        return y


# ----------------------------------------------------------------------------------------
# module kinds
# ----------------------------------------------------------------------------------------


def kind_of(m) -> Optional[str]:
    if isinstance(m, JQuantModule):
        return None
    if isinstance(m, nn.Dense):
        return "dense"
    if isinstance(m, nn.Conv):
        return "conv"
    if isinstance(m, nn.Embed):
        return "embed"
    if isinstance(m, nn.BatchNorm):
        return "bn"
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
        return "norm"
    return None


def _get_path(tree, path: str):
    cur = tree
    for p in path.split(".") if path else []:
        if not hasattr(cur, "get") or p not in cur:
            return None
        cur = cur[p]
    return cur


@dataclasses.dataclass
class Pending:
    entry: FuseEntry
    act: Slot
    frozen: Any
    layer_module: Any


# ----------------------------------------------------------------------------------------
# layer calls (shared by the interceptor and jquant's QAT layer classes)
# ----------------------------------------------------------------------------------------


def _override_attr(m, kind):
    if kind == "dense":
        return "dot_general", "dot_general_cls", jax.lax.dot_general
    return "conv_general_dilated", "conv_general_dilated_cls", jax.lax.conv_general_dilated


def call_dense_conv(m, kind: str, qconfig, call, args, kwargs, trace: Optional[Trace]):
    """Runs a Flax Dense / Conv call with torch's QAT / PTQ semantics.

    QAT: the kernel passes through ``weight_fake_quant`` (the module's ``dot_general`` /
    ``conv_general_dilated`` is swapped for the call), the output through
    ``activation_post_process``. Fused with a BatchNorm (nniqat ConvBn / LinearBn): the
    kernel is scaled by ``gamma / sqrt(running_var + eps)`` before the fake quant and the
    product divided by it after; the BatchNorm call then finishes the group.
    """
    plan = trace.plan if trace is not None else None
    path = module_path(m)
    qat = plan is None or plan.mode == "qat"
    entry = plan.fusion.by_layer.get(path) if plan is not None else None
    if entry is not None:
        plan.fused_seen.add(path)
    wcfg = layers.build(qconfig.weight) if qat else None
    acfg = layers.build(qconfig.activation)
    if plan is not None:
        plan.kinds[path] = kind
        plan.register(path, WEIGHT, wcfg)
        plan.register(path, ACT, acfg)
    layout = "dense" if kind == "dense" else "conv"
    scale_factor = None
    frozen = None
    if entry is not None and entry.bn is not None and qat:
        fv = m.variable(QUANT_STATS, FREEZE_BN, lambda: jnp.zeros((1,), jnp.uint8))
        frozen = fv.value
        scale_factor = _bn_scale_factor(entry, trace)
    if wcfg is None and scale_factor is None:
        y = call(*args, **kwargs)
    else:
        attr, cls_attr, default = _override_attr(m, kind)
        orig = getattr(m, attr)
        orig_cls = getattr(m, cls_attr)
        base = orig_cls() if orig_cls is not None else (orig if orig is not None else default)

        def op(lhs, rhs, *a, **k):
            kernel = rhs
            if scale_factor is not None:
                kernel = (jnp.asarray(rhs, jnp.float32) * scale_factor).astype(rhs.dtype)
            if wcfg is not None:
                kernel = Slot(m, WEIGHT, wcfg, kernel, layout)(kernel)
            out = base(lhs, kernel, *a, **k)
            if scale_factor is not None:
                out = nm.true_divide(out, scale_factor).astype(out.dtype)
            return out

        object.__setattr__(m, attr, op)
        object.__setattr__(m, cls_attr, None)
        try:
            y = call(*args, **kwargs)
        finally:
            object.__setattr__(m, attr, orig)
            object.__setattr__(m, cls_attr, orig_cls)
    if entry is not None and entry.bn is not None:
        act = Slot(m, ACT, acfg, y)
        if entry.bn in trace.pending:
            raise ValueError(f"fuse: {entry.layer} ran twice before its BatchNorm {entry.bn}")
        trace.pending[entry.bn] = Pending(entry, act, frozen, m)
        return y
    if entry is not None and entry.relu:
        y = jax.nn.relu(y)
    return Slot(m, ACT, acfg, y)(y, axis_name=plan.axis_name if plan else None)


def _bn_scale_factor(entry: FuseEntry, trace: Trace):
    plan = trace.plan
    params = _get_path((trace.root_vars or {}).get("params", {}), entry.bn)
    stats = _get_path((trace.root_vars or {}).get("batch_stats", {}), entry.bn)
    if params is None and stats is None:
        return None  # initialising: the BatchNorm has no variables yet
    if stats is None or "var" not in stats:
        raise ValueError(f"fuse: {entry.bn} has no batch_stats 'var'; is it a flax BatchNorm?")
    if entry.bn not in plan.bn_eps:
        raise RuntimeError(f"fuse: the settings of BatchNorm {entry.bn} are unknown; call "
                           f"model.init (or jax.eval_shape(model.init, ...)) once first")
    eps = plan.bn_eps[entry.bn]
    gamma = params.get("scale") if params is not None else None
    return layers.bn_scale_factor(gamma, stats["var"], eps)


def _bn_call_args(m, args, kwargs):
    x = args[0]
    ura = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    if kwargs.get("mask") is not None:
        raise NotImplementedError("fused BatchNorm with mask= is not supported")
    ura = nn.merge_param("use_running_average", m.use_running_average, ura)
    return x, ura


def call_fused_bn(m, pending: Pending, args, kwargs, trace: Trace):
    """The BatchNorm half of a fused group: batch / running statistics, ReLU, post-process.

    Uses the Flax BatchNorm's own variables (``params`` scale / bias, ``batch_stats``
    mean / var) and hyperparameters (epsilon, momentum, axis_name); ``freeze_bn`` (a
    runtime flag in the layer's quant_stats) switches to the running statistics without
    updating them, like torch's ``freeze_bn_stats``.
    """
    plan = trace.plan
    x, use_running = _bn_call_args(m, args, kwargs)
    feature_axes = tuple(a % x.ndim for a in ((m.axis,) if isinstance(m.axis, int) else m.axis))
    if len(feature_axes) != 1:
        raise NotImplementedError("fused BatchNorm needs a single feature axis")
    fa = feature_axes[0]
    if fa != x.ndim - 1:
        raise NotImplementedError("fused BatchNorm needs the feature axis last (channels-last)")
    red = tuple(i for i in range(x.ndim) if i != fa)
    fshape = (x.shape[fa],)
    plan.bn_eps[module_path(m)] = float(m.epsilon)
    stat_dtype = jnp.float32 if m.force_float32_reductions else m.param_dtype
    ra_mean = m.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stat_dtype), fshape)
    ra_var = m.variable("batch_stats", "var", lambda s: jnp.ones(s, stat_dtype), fshape)
    gamma = m.param("scale", m.scale_init, fshape, m.param_dtype) if m.use_scale else None
    beta = m.param("bias", m.bias_init, fshape, m.param_dtype) if m.use_bias else None
    out_dtype = m.dtype or jnp.result_type(*[a for a in (x, gamma, beta) if a is not None])
    xc = x.astype(out_dtype)
    if plan.mode == "ptq" and not use_running and not m.is_initializing():
        raise ValueError(f"fuse: {module_path(m)} runs with batch statistics; post-training "
                         f"fusion folds the running statistics (torch's fuse_modules is eval "
                         f"only): call with use_running_average=True")
    if m.is_initializing():
        y = layers.bn_normalize(xc, ra_mean.value, ra_var.value, gamma, beta, m.epsilon)
    elif use_running:
        y = layers.bn_normalize(xc, ra_mean.value, ra_var.value, gamma, beta, m.epsilon)
    else:
        stats = layers.bn_stats(x, red, axis_name=m.axis_name)
        y_train = layers.bn_normalize(xc, stats.mean, stats.var, gamma, beta, m.epsilon)
        y_eval = layers.bn_normalize(xc, ra_mean.value, ra_var.value, gamma, beta, m.epsilon)
        frozen = jnp.reshape(pending.frozen, (-1,))[0] != 0
        y = jnp.where(frozen, y_eval, y_train)
        new_mean, new_var = layers.bn_update_running(ra_mean.value, ra_var.value, stats,
                                                     m.momentum, unbiased=plan.bn_unbiased)
        if m.is_mutable_collection("batch_stats"):
            ra_mean.value = jnp.where(frozen, ra_mean.value, new_mean)
            ra_var.value = jnp.where(frozen, ra_var.value, new_var)
        else:
            raise ValueError(f"{module_path(m)}: batch_stats must be mutable while training "
                             f"(use_running_average=False), as for flax's BatchNorm")
    if pending.entry.relu:
        y = jax.nn.relu(y)
    return pending.act(y, axis_name=plan.axis_name)


def call_embedding(m, qconfig, weight, lookup, call_float, trace: Optional[Trace], *,
                   explicit: bool = False):
    """An embedding (Flax Embed / jquant EmbeddingBag) call under ``qconfig``.

    QAT with a ``per_channel_affine_float_qparams`` weight config (torch's embedding QAT
    mapping): ``lookup(weight_fake_quant(weight))`` then the activation post-process. Any
    other weight config leaves the weight float as torch's default QAT mapping does (a
    jquant QAT layer built with such a qconfig raises, as torch's nnqat modules assert).
    ``weight``: a thunk returning the float table (num_embeddings, features).
    """
    plan = trace.plan if trace is not None else None
    path = module_path(m)
    qat = plan is None or plan.mode == "qat"
    wcfg = layers.build(qconfig.weight) if qat else None
    acfg = layers.build(qconfig.activation)
    if wcfg is not None and not layers.is_float_qparams(wcfg):
        if explicit:
            raise ValueError("qconfig: Embedding quantization-aware training needs a weight "
                             "qscheme of per_channel_affine_float_qparams (e.g. "
                             "default_embedding_qat_qconfig)")
        wcfg = None
    if plan is not None:
        plan.kinds[path] = "embed" if isinstance(m, nn.Embed) else "embedding_bag"
        plan.register(path, WEIGHT, wcfg)
        plan.register(path, ACT, acfg)
    if wcfg is None:
        y = call_float()
    else:
        w = weight()
        y = lookup(Slot(m, WEIGHT, wcfg, w, "embedding")(w))
    return Slot(m, ACT, acfg, y)(y, axis_name=plan.axis_name if plan else None)


def flax_embed_lookup(m, inputs):
    """flax ``Embed.__call__`` on a given table (same checks, promotion and broadcasting)."""
    def lookup(emb):
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        (emb,) = m.promote_dtype(emb, dtype=m.dtype, inexact=False)
        if m.num_embeddings == 1:
            return jnp.broadcast_to(emb, inputs.shape + (m.features,))
        return jnp.take(emb, inputs, axis=0)
    return lookup


def call_post_only(m, kind, qconfig, y, trace: Optional[Trace]):
    plan = trace.plan if trace is not None else None
    acfg = layers.build(qconfig.activation)
    if plan is not None:
        path = module_path(m)
        plan.kinds[path] = kind
        plan.register(path, ACT, acfg)
    return Slot(m, ACT, acfg, y)(y, axis_name=plan.axis_name if plan else None)


# ----------------------------------------------------------------------------------------
# the interceptor
# ----------------------------------------------------------------------------------------


def intercept(next_fun, args, kwargs, context):
    """``nn.intercept_methods`` hook: quantizes flax's Dense / Conv / Embed / norms by path."""
    m = context.module
    if context.method_name != "__call__" or isinstance(m, JQuantModule):
        return next_fun(*args, **kwargs)
    trace = _TRACE.get()
    if trace is None:
        return next_fun(*args, **kwargs)
    plan = trace.plan
    fusion = plan.fusion
    path = module_path(m)
    group = fusion.by_layer.get(path)  # the fused group this layer leads, if any
    if path in fusion.relu_paths:
        return args[0] if len(args) == 1 else next_fun(*args, **kwargs)
    if isinstance(m, nn.Sequential) and fusion:
        skip = fused_relu_slots(m, path, fusion)
        return call_sequential(m, skip, args, kwargs) if skip else next_fun(*args, **kwargs)
    if path in fusion.by_bn:
        pend = trace.pending.pop(path, None)
        if pend is None:
            raise ValueError(f"fuse: BatchNorm {path} ran without its fused layer "
                             f"{fusion.by_bn[path].layer} running first")
        if not isinstance(m, nn.BatchNorm):
            raise ValueError(f"fuse: {path} is a {type(m).__name__}, expected flax BatchNorm "
                             f"(to fuse {fusion.by_bn[path].layer} with a ReLU module, write "
                             f"({fusion.by_bn[path].layer!r}, None, {path!r}))")
        return call_fused_bn(m, pend, args, kwargs, trace)
    kind = kind_of(m)
    if group is not None:
        plan.fused_seen.add(path)
    if group is not None and kind not in ("dense", "conv"):
        raise ValueError(f"fuse: {path} is a {type(m).__name__}; only Dense and Conv fuse")
    if kind is None:
        return next_fun(*args, **kwargs)
    qconfig = resolve_qconfig(m, trace)
    if qconfig is None:
        if group is not None and group.bn is not None:
            raise ValueError(f"fuse: {path} has no qconfig (None) but is fused with "
                             f"{group.bn}")
        return call_float(next_fun, args, kwargs, group)
    if kind in ("dense", "conv"):
        if kind == "conv" and not m.shared_weights:
            return call_float(next_fun, args, kwargs, group)
        return call_dense_conv(m, kind, qconfig, next_fun, args, kwargs, trace)
    if kind == "embed":
        return call_embedding(m, qconfig, lambda: m.embedding, flax_embed_lookup(m, args[0]),
                              lambda: next_fun(*args, **kwargs), trace)
    y = next_fun(*args, **kwargs)
    if kind == "bn" and jnp.ndim(args[0]) not in (4, 5):
        return y  # torch observes BatchNorm2d / 3d outputs only
    return call_post_only(m, kind, qconfig, y, trace)


def run_prepared(module, fn, *args, **kwargs):
    """Runs ``fn(*args, **kwargs)`` (the wrapped model's method) under the plan."""
    plan = module.plan
    root_vars = None if module.is_initializing() else module.variables
    trace = Trace(plan, root_vars)
    token = _TRACE.set(trace)
    try:
        with nn.intercept_methods(intercept):
            out = fn(*args, **kwargs)
    finally:
        _TRACE.reset(token)
    if trace.pending:
        names = ", ".join(f"{p.entry.layer} -> {bn}" for bn, p in trace.pending.items())
        raise ValueError(f"fuse: these fused layers were not followed by their BatchNorm: {names}")
    plan.warn_unmatched_once()
    return out
