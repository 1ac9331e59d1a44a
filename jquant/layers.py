"""Flax-agnostic building blocks shared by the Linen and NNX front ends.

Nothing here imports flax: these are pure functions over arrays, core configs and their
states, written once and used by :mod:`jquant.linen` and :mod:`jquant.nnx`.

* qconfig spec resolution (:class:`QConfigSpec`): torch's eager ``qconfig_dict``
  propagation, with regex module paths, module types and ``None``; it records which
  entries matched nothing.
* weight fake quant in torch layout (:func:`weight_init`, :func:`weight_apply`): Flax
  kernels keep the output channel last (Dense ``(in, out)``, Conv ``(*spatial, in/groups,
  out)``); torch's weights are ``(out, in, *spatial)`` and its per-channel weight
  observers use ``ch_axis=0``. The kernel is permuted to torch's layout, run through the
  core observer / fake-quantize config, and permuted back (XLA fuses the transposes).
* activation post-process (:func:`post_process_init`, :func:`post_process_apply`): an
  observer or fake-quantize config on a module output, keeping the input dtype.
* nniqat ConvBn / LinearBn math (:func:`bn_scale_factor`, :func:`bn_stats`,
  :func:`bn_normalize`, :func:`bn_update_running`, :func:`fold_bn`).
* a float, jittable ``embedding_bag`` (offsets or 2-D input, ``include_last_offset``,
  ``per_sample_weights``, sum / mean / max, empty bags give 0).
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from jquant import _numerics as nm
from jquant import collectives
from jquant.fake_quantize import (FakeQuantizeBase, FusedMovingAvgObsFakeQuantize,
                                  LearnableFakeQuantize)
from jquant.flags import disable_observer
from jquant.observers import EmptyState, ObserverBase
from jquant.qconfig import QConfig
from jquant.types import QScheme

__all__ = [
    "QConfigSpec", "build", "is_float_qparams", "torch_weight_perm", "weight_init",
    "weight_apply", "post_process_init", "post_process_apply", "bn_scale_factor", "bn_stats",
    "bn_normalize", "bn_update_running", "fold_bn", "embedding_bag", "EMBEDDING_BAG_MODES",
    "is_learnable", "BNStats",
]


# ----------------------------------------------------------------------------------------
# qconfig spec resolution
# ----------------------------------------------------------------------------------------

_UNSET = object()


def _is_qconfig(v) -> bool:
    return v is None or isinstance(v, QConfig)


class QConfigSpec:
    """A ``qconfig_spec`` — torch's eager ``qconfig_dict`` — resolved per module.

    ``spec`` is one :class:`~jquant.QConfig` (the whole model), ``None`` (nothing), or a
    dict whose keys are

    * strings: regular expressions matched against the whole dotted module path
      (``re.fullmatch``; ``''`` is the root, so ``{'': qconfig}`` is global), or
    * module types (classes): match modules of that type (exact type first, then the
      first key that is a base class),

    and whose values are a ``QConfig`` or ``None`` (leave the module float).

    :meth:`resolve` follows torch's ``propagate_qconfig_`` priority: a module's own
    qconfig, then a path entry (an exact string key before regexes, regexes in insertion
    order), then a type entry, then its parent's qconfig. Every key that matches some
    module is recorded; :meth:`unmatched` lists the others and :meth:`warn_unmatched`
    warns about them (torch silently ignores such keys).
    """

    def __init__(self, spec, *, module_base: Optional[type] = None):
        self.global_qconfig = _UNSET
        self.path_entries: list = []
        self.type_entries: list = []
        if spec is None or isinstance(spec, QConfig):
            self.global_qconfig = spec
            self.keys: tuple = ()
        elif isinstance(spec, Mapping):
            keys = []
            for k, v in spec.items():
                if not _is_qconfig(v):
                    raise ValueError(f"qconfig_spec[{_key_name(k)}] must be a QConfig or None (None "
                                     f"keeps the module float), got {_describe(v)}. {_QCONFIG_HINT}")
                if isinstance(k, str):
                    try:
                        pattern = re.compile(k)
                    except re.error as e:
                        raise ValueError(f"qconfig_spec key {k!r} is not a valid regular "
                                         f"expression: {e}. Keys are matched against whole "
                                         f"dotted module paths (re.fullmatch); escape literal "
                                         f"characters with re.escape") from None
                    self.path_entries.append((k, pattern, v))
                elif isinstance(k, type):
                    if module_base is not None and not issubclass(k, module_base):
                        raise ValueError(
                            f"qconfig_spec key {k.__module__}.{k.__qualname__} is not a "
                            f"{module_base.__module__}.{module_base.__qualname__} type, so it "
                            f"can match no module of this model; use a module type of this "
                            f"front end (e.g. the layer classes the model is built from) or a "
                            f"module path")
                    self.type_entries.append((k, v))
                else:
                    hint = ""
                    if type(k).__module__ != "builtins":
                        hint = (f" (for a module instance use its dotted path, e.g. 'block.fc', "
                                f"or its type {type(k).__name__})")
                    raise ValueError(f"qconfig_spec keys must be module paths (str, a regular "
                                     f"expression over dotted paths; '' is the root) or module "
                                     f"types, got {_describe(k)}{hint}")
                keys.append(k)
            self.keys = tuple(keys)
        else:
            raise ValueError(f"qconfig_spec must be a QConfig (the whole model), None or a dict "
                             f"from module path / type to QConfig or None, got {_describe(spec)}. "
                             f"{_QCONFIG_HINT}")
        self.matched: set = set()

    def own(self, path: str, module_type: type):
        """The entry for this module alone (no inheritance), or ``_UNSET``."""
        for k, _, v in self.path_entries:
            if k == path:
                self.matched.add(k)
                return v
        for k, pattern, v in self.path_entries:
            if pattern.fullmatch(path):
                self.matched.add(k)
                return v
        for k, v in self.type_entries:
            if module_type is k:
                self.matched.add(k)
                return v
        for k, v in self.type_entries:
            if issubclass(module_type, k):
                self.matched.add(k)
                return v
        return _UNSET

    def resolve(self, chain: Sequence[tuple], own_qconfig=_UNSET):
        """The qconfig of the last module of ``chain``.

        ``chain``: ``(path, module_type)`` pairs from the root to the module (paths are
        dotted strings, the root's is ``''``). ``own_qconfig``: the module's own qconfig
        attribute, if it has one (a jquant QAT layer built with ``qconfig=...``).
        """
        q = None if self.global_qconfig is _UNSET else self.global_qconfig
        for path, mtype in chain:
            v = self.own(path, mtype)
            if v is not _UNSET:
                q = v
        if own_qconfig is not _UNSET and own_qconfig is not None:
            q = own_qconfig
        return q

    def unmatched(self) -> list:
        """Keys that matched no module so far."""
        return [k for k in self.keys if k not in self.matched]

    def warn_unmatched(self, extra: Iterable = (), known: Iterable = ()) -> list:
        """Warns (``UserWarning``) about keys that matched nothing; returns them.

        ``known``: the model's quantizable module paths, listed in the message to help fix
        a path key.
        """
        missing = self.unmatched() + list(extra)
        if missing:
            names = ", ".join(k.__name__ if isinstance(k, type) else repr(k) for k in missing)
            msg = f"jquant: qconfig_spec entries matched no module: {names}"
            if any(isinstance(k, str) for k in missing):
                msg += (". String keys are regular expressions matched against the whole dotted "
                        "module path (re.fullmatch, e.g. 'block.fc' or r'block\\..*')")
            known = sorted(set(known))
            if known:
                shown = ", ".join(repr(k) for k in known[:20])
                more = f" (+{len(known) - 20} more)" if len(known) > 20 else ""
                msg += f"; this model's quantizable modules: {shown}{more}"
            warnings.warn(msg, UserWarning, stacklevel=3)
        return missing


_QCONFIG_HINT = ("Pass e.g. jq.get_default_qconfig('x86') (PTQ), jq.get_default_qat_qconfig('x86') "
                 "(QAT) or jq.QConfig(activation=<observer / fake quant class>, weight=<...>)")


def _key_name(k) -> str:
    return repr(k) if isinstance(k, str) else getattr(k, "__name__", type(k).__name__)


def _describe(v) -> str:
    """A short description of a wrong spec entry, with the likely fix when it is a common slip."""
    if isinstance(v, str):
        return f"the string {v!r}"
    if v is QConfig:
        return "the QConfig class itself (build one: QConfig(activation=..., weight=...))"
    if isinstance(v, type) and issubclass(v, (ObserverBase, FakeQuantizeBase)):
        return (f"the observer / fake-quant class {v.__name__} (a QConfig pairs two of them: "
                f"QConfig(activation={v.__name__}, weight=...))")
    if isinstance(v, (ObserverBase, FakeQuantizeBase)):
        return (f"the observer / fake-quant {type(v).__name__} (a QConfig pairs two of them: "
                f"QConfig(activation=..., weight=...))")
    if callable(v) and not isinstance(v, type) and getattr(v, "__name__", "").startswith("get_"):
        return f"the function {v.__name__} (call it: {v.__name__}('x86'))"
    if isinstance(v, type):
        return f"the type {v.__name__}"
    if type(v).__module__ == "builtins":
        r = repr(v)
        return f"{r if len(r) <= 60 else r[:57] + '...'} ({type(v).__name__})"
    return f"a {type(v).__name__} instance"


def build(factory):
    """Builds a config from a QConfig field (class / ``with_args`` factory); ``None`` stays None.

    torch's ``qconfig.activation()`` / ``qconfig.weight()``. An identity placeholder (a
    factory building ``None``, torch's ``nn.Identity``) gives ``None``.
    """
    if factory is None:
        return None
    if isinstance(factory, (ObserverBase, FakeQuantizeBase)):
        return factory
    cfg = factory()
    if cfg is None or isinstance(cfg, (ObserverBase, FakeQuantizeBase)):
        return cfg
    raise ValueError(f"qconfig entry {factory!r} built {type(cfg).__name__}, not an observer "
                     f"or fake-quantize config")


def qscheme_of(cfg) -> Optional[QScheme]:
    return getattr(cfg, "qscheme", None)


def is_float_qparams(cfg) -> bool:
    """True for ``per_channel_affine_float_qparams`` configs (embedding weights)."""
    return qscheme_of(cfg) == QScheme.PER_CHANNEL_AFFINE_FLOAT_QPARAMS


# ----------------------------------------------------------------------------------------
# weight observers / fake quant in torch layout
# ----------------------------------------------------------------------------------------

def torch_weight_perm(layout: str, ndim: int) -> Optional[tuple]:
    """Permutation taking a Flax kernel to torch's weight layout (``None``: already torch's).

    ``layout``: ``"dense"`` (``(in, out)`` -> ``(out, in)``), ``"conv"`` (``(*spatial, in,
    out)`` -> ``(out, in, *spatial)``) or ``"embedding"`` (``(num, dim)``, as torch).
    """
    if layout == "embedding":
        return None
    if layout == "dense":
        if ndim != 2:
            raise ValueError(f"a dense kernel must be 2-D, got {ndim}-D")
        return (1, 0)
    if layout == "conv":
        return (ndim - 1, ndim - 2) + tuple(range(ndim - 2))
    raise ValueError(f"layout={layout!r}: expected 'dense', 'conv' or 'embedding'")


def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _needs_layout(cfg) -> bool:
    # Per-tensor configs see every element alike: no transpose needed.
    qs = qscheme_of(cfg)
    return qs is not None and qs.is_per_channel


def _shape_struct(x):
    return jax.ShapeDtypeStruct(tuple(x.shape), jnp.float32)


def weight_init(cfg, kernel, layout: str):
    """A fresh state of weight observer / fake-quantize ``cfg`` for a Flax ``kernel``.

    ``kernel``: an array or ``jax.ShapeDtypeStruct``; per-channel states are sized from
    the kernel in torch's layout (output channels first).
    """
    if cfg is None:
        return None
    perm = torch_weight_perm(layout, len(kernel.shape))
    shape = tuple(kernel.shape)
    if perm is not None:
        shape = tuple(shape[p] for p in perm)
    return cfg.init(jax.ShapeDtypeStruct(shape, jnp.float32))


def _native_axis(cfg, layout: str, ndim: int):
    """The kernel axis holding torch's ``ch_axis`` of a per-channel config (``None``: not per-channel)."""
    if not _needs_layout(cfg):
        return None
    perm = torch_weight_perm(layout, ndim)
    ch = int(getattr(cfg, "ch_axis", 0))
    ch = ch % ndim
    return ch if perm is None else perm[ch]


def _along(cfg, axis: int):
    """``cfg`` with its channels along ``axis`` (observer / fake-quant configs), or ``None``."""
    if isinstance(cfg, FusedMovingAvgObsFakeQuantize):
        return None  # uses _apply_along
    if axis == cfg.ch_axis:
        return cfg
    try:
        return cfg.replace(ch_axis=axis)
    except (TypeError, ValueError):
        return None


def weight_apply(cfg, state, kernel, layout: str, *, update: bool = True, axis_name=None):
    """Runs the weight post-process ``cfg`` on a Flax ``kernel`` as torch runs it on its weight.

    Returns ``(kernel_out, new_state)``: ``kernel_out`` has the kernel's layout and dtype
    (the fake-quantized kernel, or the kernel itself for an observer). With
    ``update=False`` (evaluation with frozen state) the observer is not run and the stored
    qparams are used; the state comes back unchanged.

    Per-channel configs quantize the kernel in place along the axis that holds torch's
    ``ch_axis`` (the output channels, last in Flax): the same numbers as on torch's
    transposed weight, without transposes (which XLA would otherwise fuse, strided, into
    every consumer of the weight gradient).
    """
    if cfg is None:
        return kernel, state
    axis = _native_axis(cfg, layout, kernel.ndim)
    if axis is None:
        out, new_state = _run(cfg, state, kernel, update, axis_name)
    elif isinstance(cfg, FusedMovingAvgObsFakeQuantize):
        if update:
            out, new_state = cfg._apply_along(state, kernel, axis, axis_name=axis_name)
        else:
            out, new_state = cfg._apply_along(disable_observer(state), kernel, axis)[0], state
    else:
        native = _along(cfg, axis)
        if native is not None:
            out, new_state = _run(native, state, kernel, update, axis_name)
        else:  # unknown config kind: run it on torch's layout
            perm = torch_weight_perm(layout, kernel.ndim)
            w = kernel if perm is None else jnp.transpose(kernel, perm)
            out, new_state = _run(cfg, state, w, update, axis_name)
            if not isinstance(cfg, ObserverBase) and perm is not None:
                out = jnp.transpose(out, _inverse(perm))
    if isinstance(cfg, ObserverBase):
        return kernel, new_state
    return out.astype(kernel.dtype), new_state


# ----------------------------------------------------------------------------------------
# activation post-process
# ----------------------------------------------------------------------------------------

def post_process_init(cfg, x):
    """A fresh state of activation observer / fake-quantize ``cfg`` for output ``x``."""
    if cfg is None:
        return None
    return cfg.init(_shape_struct(x))


def _run(cfg, state, x, update, axis_name):
    if update:
        return cfg.apply(state, x, axis_name=axis_name)
    if isinstance(cfg, ObserverBase):
        return x, state
    y, _ = cfg.apply(disable_observer(state), x)
    return y, state


def post_process_apply(cfg, state, x, *, update: bool = True, axis_name=None):
    """Applies activation post-process ``cfg`` to ``x``; returns ``(y, new_state)``.

    Observers compute in float32 and return ``x`` itself; fake quants compute in float32
    and return ``x``'s dtype (bfloat16 / float16 in, the same out). ``update=False``:
    frozen evaluation (observers not run, stored qparams used, state returned as is).
    ``axis_name``: reduce the observed statistics over that mesh axis.
    """
    if cfg is None:
        return x, state
    if isinstance(state, EmptyState):
        return x, state
    y, new_state = _run(cfg, state, x, update, axis_name)
    if y is not x:
        y = y.astype(x.dtype)
    return y, new_state


def is_learnable(cfg) -> bool:
    """True for :class:`~jquant.LearnableFakeQuantize` configs (their scale / zero point train)."""
    return isinstance(cfg, LearnableFakeQuantize)


# ----------------------------------------------------------------------------------------
# nniqat ConvBn / LinearBn math
# ----------------------------------------------------------------------------------------

def bn_scale_factor(gamma, running_var, eps: float):
    """``gamma / sqrt(running_var + eps)`` (float32), torch nniqat's ``scale_factor``.

    ``gamma=None`` (BatchNorm without scale) means ones.
    """
    running_std = jnp.sqrt(jnp.asarray(running_var, jnp.float32) + jnp.float32(eps))
    if gamma is None:
        return jnp.float32(1.0) / running_std
    return jnp.asarray(gamma, jnp.float32) / running_std


class BNStats(NamedTuple):
    """Batch statistics: ``mean``, biased ``var`` (float32, per feature) and the count ``n``."""
    mean: jax.Array
    var: jax.Array
    n: Any


def bn_stats(x, reduction_axes: Sequence[int], axis_name=None) -> BNStats:
    """Per-feature batch mean and biased variance in float32 (two-pass), as BatchNorm trains.

    With ``axis_name`` the sums are reduced across devices (SyncBatchNorm / Flax
    ``BatchNorm(axis_name=...)``), giving the statistics of the global batch.
    """
    xf = jnp.asarray(x, jnp.float32)
    axes = tuple(reduction_axes)
    n_local = 1
    for a in axes:
        n_local *= xf.shape[a]
    if axis_name is None:
        mean = nm.div_const(jnp.sum(xf, axis=axes), n_local)
        var = nm.div_const(jnp.sum(jnp.square(xf - jnp.expand_dims(mean, axes)), axis=axes), n_local)
        return BNStats(mean, var, n_local)
    n = collectives.all_sum(jnp.float32(n_local), axis_name)
    mean = nm.true_divide(collectives.all_sum(jnp.sum(xf, axis=axes), axis_name), n)
    var = nm.true_divide(collectives.all_sum(
        jnp.sum(jnp.square(xf - jnp.expand_dims(mean, axes)), axis=axes), axis_name), n)
    return BNStats(mean, var, n)


def bn_normalize(x, mean, var, gamma, beta, eps: float, feature_axis: int = -1):
    """``x * alpha + (beta - mean * alpha)`` with ``alpha = gamma / sqrt(var + eps)``.

    torch's CPU batch-norm transform (float32 statistics; output in ``x``'s dtype).
    ``gamma`` / ``beta`` may be ``None`` (ones / zeros).
    """
    invstd = jnp.float32(1.0) / jnp.sqrt(jnp.asarray(var, jnp.float32) + jnp.float32(eps))
    alpha = invstd if gamma is None else invstd * jnp.asarray(gamma, jnp.float32)
    b = jnp.zeros_like(alpha) if beta is None else jnp.asarray(beta, jnp.float32)
    shift = b - jnp.asarray(mean, jnp.float32) * alpha
    shape = [1] * x.ndim
    shape[feature_axis] = -1
    y = jnp.asarray(x, jnp.float32) * alpha.reshape(shape) + shift.reshape(shape)
    return y.astype(x.dtype)


def bn_update_running(running_mean, running_var, stats: BNStats, momentum: float,
                      unbiased: bool = False):
    """New running ``(mean, var)``: ``momentum * running + (1 - momentum) * batch``.

    ``momentum`` uses Flax's convention (the weight of the old value; torch's
    ``momentum=0.1`` is Flax's ``0.9``). ``unbiased=True`` updates the variance with the
    unbiased batch variance ``var * n / (n - 1)`` as torch's BatchNorm does; Flax's
    BatchNorm uses the biased one.
    """
    var = stats.var
    if unbiased:
        n = jnp.float32(stats.n)
        var = var * (n / jnp.maximum(n - 1, 1))
    m = jnp.float32(momentum)
    one_m = jnp.float32(1.0 - momentum)
    new_mean = one_m * stats.mean + m * jnp.asarray(running_mean, jnp.float32)
    new_var = one_m * var + m * jnp.asarray(running_var, jnp.float32)
    return new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype)


def fold_bn(kernel, bias, gamma, beta, running_mean, running_var, eps: float):
    """Folds an eval-mode BatchNorm into a Flax kernel (output channel last) and bias.

    torch's ``fuse_conv_bn_weights`` / ``fuse_linear_bn_weights``: ``w * (gamma *
    rsqrt(var + eps))`` and ``(b - mean) * rsqrt(var + eps) * gamma + beta``. ``bias``,
    ``gamma``, ``beta`` may be ``None``. Returns ``(kernel, bias)`` (float32 bias).
    """
    rsq = jax.lax.rsqrt(jnp.asarray(running_var, jnp.float32) + jnp.float32(eps))
    g = jnp.ones_like(rsq) if gamma is None else jnp.asarray(gamma, jnp.float32)
    b0 = jnp.zeros_like(rsq) if bias is None else jnp.asarray(bias, jnp.float32)
    be = jnp.zeros_like(rsq) if beta is None else jnp.asarray(beta, jnp.float32)
    k = (jnp.asarray(kernel, jnp.float32) * (g * rsq)).astype(kernel.dtype)
    b = (b0 - jnp.asarray(running_mean, jnp.float32)) * rsq * g + be
    return k, b


# ----------------------------------------------------------------------------------------
# float embedding bag
# ----------------------------------------------------------------------------------------

EMBEDDING_BAG_MODES = ("sum", "mean", "max")


def embedding_bag(weight, indices, offsets=None, *, mode: str = "mean", per_sample_weights=None,
                  include_last_offset: bool = False, padding_idx: Optional[int] = None):
    """``torch.nn.functional.embedding_bag`` (float), jittable with static shapes.

    Args:
      weight: ``(num_embeddings, dim)``.
      indices: integer ``(B, L)`` (every row one bag of ``L``; ``offsets`` must be None),
        or ``(N,)`` with ``offsets``.
      offsets: integer ``(B,)`` bag starts (``(B + 1,)`` with ``include_last_offset``,
        whose last entry ends the last bag; indices after it are ignored). Offsets must
        be non-decreasing and start at 0, as torch requires.
      mode: ``"sum"``, ``"mean"`` or ``"max"``.
      per_sample_weights: like ``indices`` (float); only with ``mode="sum"``.
      padding_idx: entries equal to it are left out of their bag (and of the mean's count).
    Returns:
      ``(B, dim)`` in ``weight``'s dtype; empty bags give zeros (all modes).
    """
    if mode not in EMBEDDING_BAG_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {EMBEDDING_BAG_MODES}")
    weight = jnp.asarray(weight)
    indices = jnp.asarray(indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    if per_sample_weights is not None and mode != "sum":
        raise ValueError(f"per_sample_weights is only supported for mode='sum' (got mode={mode!r})")
    if indices.ndim == 2:
        if offsets is not None:
            raise ValueError("offsets must be None when indices is 2-D (each row is one bag)")
        b, length = indices.shape
        flat = indices.reshape(-1)
        seg = jnp.repeat(jnp.arange(b, dtype=jnp.int32), length)
        valid = jnp.ones(flat.shape, bool)
        psw = None if per_sample_weights is None else jnp.asarray(per_sample_weights).reshape(-1)
    elif indices.ndim == 1:
        if offsets is None:
            raise ValueError("offsets are required when indices is 1-D")
        offsets = jnp.asarray(offsets)
        if offsets.ndim != 1:
            raise ValueError(f"offsets must be 1-D, got shape {offsets.shape}")
        flat = indices
        n = flat.shape[0]
        pos = jnp.arange(n, dtype=offsets.dtype)
        if include_last_offset:
            if offsets.shape[0] < 1:
                raise ValueError("include_last_offset=True needs at least one offset")
            b = offsets.shape[0] - 1
            starts = offsets[:-1]
            valid = pos < offsets[-1]
        else:
            b = offsets.shape[0]
            starts = offsets
            valid = jnp.ones((n,), bool)
        seg = (jnp.searchsorted(starts, pos, side="right") - 1).astype(jnp.int32)
        valid = valid & (seg >= 0)
        seg = jnp.clip(seg, 0, max(b - 1, 0))
        psw = None if per_sample_weights is None else jnp.asarray(per_sample_weights)
    else:
        raise ValueError(f"indices must be 1-D or 2-D, got shape {indices.shape}")
    if psw is not None and psw.shape != flat.shape:
        raise ValueError(f"per_sample_weights must have the shape of indices {tuple(indices.shape)}")
    if padding_idx is not None:
        valid = valid & (flat != padding_idx)
    if b == 0:
        return jnp.zeros((0, weight.shape[1]), weight.dtype)
    rows = jnp.take(weight, flat, axis=0)
    if psw is not None:
        rows = rows * psw[:, None].astype(rows.dtype)
    vmask = valid[:, None]
    if mode == "max":
        neg = jnp.asarray(-jnp.inf, rows.dtype)
        out = jax.ops.segment_max(jnp.where(vmask, rows, neg), seg, num_segments=b)
        count = jax.ops.segment_sum(valid.astype(jnp.int32), seg, num_segments=b)
        return jnp.where(count[:, None] > 0, out, jnp.zeros((), rows.dtype)).astype(weight.dtype)
    out = jax.ops.segment_sum(jnp.where(vmask, rows, jnp.zeros((), rows.dtype)), seg,
                              num_segments=b)
    if mode == "mean":
        count = jax.ops.segment_sum(valid.astype(jnp.int32), seg, num_segments=b)
        mean = nm.true_divide(out, jnp.maximum(count, 1)[:, None]).astype(out.dtype)
        out = jnp.where(count[:, None] > 0, mean, jnp.zeros((), out.dtype))
    return out.astype(weight.dtype)
