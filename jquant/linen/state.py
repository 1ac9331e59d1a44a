"""Helpers over a prepared Linen model's variables: observer dicts, state dicts, BN freezing, LSQ.

Counterparts: ``torch.ao.quantization.quantize._get_observer_dict``,
``get_observer_state_dict``, ``load_observer_state_dict``,
``torch.ao.nn.intrinsic.qat.freeze_bn_stats`` / ``update_bn_stats`` and the
``_LearnableFakeQuantize`` toggles. All are pure: they take ``variables`` (the dict from
``init`` / a train state's collections) and return new ones.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jquant import flags
from jquant._state_dict import StateDictError
from jquant.fake_quantize import LearnableFakeQuantizeState
from jquant.linen import _core
from jquant.linen.prepare import PreparedModel
from jquant.observers import EmptyState

__all__ = ["BoundObserver", "get_observer_dict", "get_observer_state_dict",
           "load_observer_state_dict", "freeze_bn_stats", "update_bn_stats",
           "enable_param_learning", "enable_static_estimate", "enable_static_observation"]

_BOUND_METHODS = ("calculate_qparams", "get_tensor_value", "state_dict")


class BoundObserver:
    """An observer / fake-quantize config together with its state (torch's stateful module).

    ``config`` and ``state`` are the pure pieces. Attribute access falls through to the
    config (``quant_min``, ``dtype``, ...); ``calculate_qparams()``,
    ``get_tensor_value()`` and ``state_dict()`` run on the bound state;
    ``activation_post_process`` of a fake quant is its bound observer.
    """

    def __init__(self, config, state):
        self.config = config
        self.state = state

    def __getattr__(self, name):
        if name in ("config", "state"):
            raise AttributeError(name)
        if name == "activation_post_process" and hasattr(self.config, "activation_post_process"):
            sub = getattr(self.state, "activation_post_process", EmptyState())
            return BoundObserver(self.config.activation_post_process, sub)
        if name not in _BOUND_METHODS and name in getattr(self.state, "_fields", ()):
            return getattr(self.state, name)
        attr = getattr(self.config, name)
        if name in _BOUND_METHODS:
            return lambda *a, **k: attr(self.state, *a, **k)
        return attr

    def __repr__(self):
        return f"BoundObserver({self.config!r})"


def _check(model):
    if not isinstance(model, PreparedModel):
        raise ValueError("model must come from jquant.linen.prepare / prepare_qat")
    if not model.plan.registry and not model.plan.kinds:
        raise ValueError("the prepared model has not been traced yet: call model.init(...) "
                         "(or jax.eval_shape(model.init, ...)) first")


def _get(tree, path: str):
    cur = tree
    for p in path.split(".") if path else []:
        if not isinstance(cur, Mapping) or p not in cur:
            return None
        cur = cur[p]
    return cur


def _state_of(variables, path, name, cfg):
    stats = _get(variables.get(_core.QUANT_STATS, {}), path)
    if stats is None or name not in stats:
        return EmptyState()
    st = stats[name]
    params = _get(variables.get("params", {}), path)
    if isinstance(st, LearnableFakeQuantizeState) and params is not None and name in params:
        st = st._replace(scale=params[name]["scale"], zero_point=params[name]["zero_point"])
    return st


def _key(path, name):
    return f"{path}.{name}" if path else name


def get_observer_dict(model: PreparedModel, variables) -> dict:
    """``{"<module path>.<weight_fake_quant|activation_post_process>": BoundObserver}``.

    torch's ``_get_observer_dict``: every observer / fake quant of the prepared model by
    its dotted path (stateless ones such as NoopObserver included).
    """
    _check(model)
    out = {}
    for path, entries in model.plan.registry.items():
        for name, cfg in entries.items():
            out[_key(path, name)] = BoundObserver(cfg, _state_of(variables, path, name, cfg))
    return out


def get_observer_state_dict(model: PreparedModel, variables) -> dict:
    """Flat ``{"<path>.<name>.<buffer>": np.ndarray}`` of every observer / fake quant.

    torch's ``get_observer_state_dict`` (buffer names as torch's, e.g.
    ``Dense_0.activation_post_process.min_val``).
    """
    out = {}
    for key, bound in get_observer_dict(model, variables).items():
        if isinstance(bound.state, EmptyState) and getattr(bound.config, "state_keys", ()) :
            continue
        for k, v in bound.config.state_dict(bound.state).items():
            out[f"{key}.{k}"] = np.asarray(v)
    return out


def _set(tree, path_parts, value):
    if not path_parts:
        return value
    d = dict(tree) if isinstance(tree, Mapping) else {}
    d[path_parts[0]] = _set(d.get(path_parts[0], {}), path_parts[1:], value)
    return d


def load_observer_state_dict(model: PreparedModel, variables, state_dict, strict: bool = True):
    """``variables`` with every observer / fake-quant state loaded from ``state_dict``.

    torch's ``load_observer_state_dict``: keys as :func:`get_observer_state_dict` writes
    them (jquant's or torch's values). ``strict``: missing or unexpected observer keys raise
    :class:`~jquant.StateDictError`.
    """
    _check(model)
    variables = dict(variables)
    used = set()
    missing = []
    for path, entries in model.plan.registry.items():
        for name, cfg in entries.items():
            prefix = _key(path, name) + "."
            keys = tuple(getattr(cfg, "state_keys", ()))
            if not keys:
                continue
            sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if not sub:
                missing.append(prefix + "*")
                continue
            used.update(prefix + k for k in sub)
            st = cfg.load_state_dict(sub, strict=strict)
            parts = (path.split(".") if path else []) + [name]
            variables[_core.QUANT_STATS] = _set(variables.get(_core.QUANT_STATS, {}), parts, st)
            if isinstance(st, LearnableFakeQuantizeState):
                variables["params"] = _set(variables.get("params", {}), parts,
                                           {"scale": st.scale, "zero_point": st.zero_point})
    unexpected = sorted(k for k in state_dict if k not in used)
    if strict and (missing or unexpected):
        msg = []
        if missing:
            msg.append(f"missing keys for observers {missing}")
        if unexpected:
            msg.append(f"unexpected keys {unexpected}")
        raise StateDictError("Error loading observer state dict: " + "; ".join(msg))
    return variables


def freeze_bn_stats(tree):
    """Fused Conv/Dense+BatchNorm groups use (and stop updating) the running statistics.

    ``torch.ao.nn.intrinsic.qat.freeze_bn_stats``: sets every ``freeze_bn`` flag in
    ``tree`` (variables, quant_stats or a whole train state) to 1.
    """
    return flags.set_flags(tree, {_core.FREEZE_BN: 1})


def update_bn_stats(tree):
    """Undoes :func:`freeze_bn_stats` (``torch.ao.nn.intrinsic.qat.update_bn_stats``)."""
    return flags.set_flags(tree, {_core.FREEZE_BN: 0})


def _map_learnable(variables, fn, copy_to_params: bool):
    variables = dict(variables)
    params = variables.get("params", {})

    def walk(node, parts):
        nonlocal params
        if isinstance(node, LearnableFakeQuantizeState):
            new = fn(node)
            if copy_to_params:
                params = _set(params, parts, {"scale": new.scale, "zero_point": new.zero_point})
            return new
        if isinstance(node, Mapping):
            return {k: walk(v, parts + [k]) for k, v in node.items()}
        return node

    variables[_core.QUANT_STATS] = walk(variables.get(_core.QUANT_STATS, {}), [])
    if copy_to_params:
        variables["params"] = params
    return variables


def _flag(v):
    return jnp.full((1,), v, jnp.uint8)


def enable_param_learning(variables):
    """Every LearnableFakeQuantize learns its qparams (learning on, fake quant on, static off).

    torch's ``enable_param_learning``. Since static estimation writes the observed qparams
    into quant_stats (torch writes ``scale.data``), they are copied into the trainable
    ``params`` here, so learning starts from them.
    """
    return _map_learnable(variables, lambda s: s._replace(
        learning_enabled=_flag(1), fake_quant_enabled=_flag(1), static_enabled=_flag(0)), True)


def enable_static_estimate(variables):
    """LearnableFakeQuantize qparams come from the observer (learning off, fake quant on)."""
    return _map_learnable(variables, lambda s: s._replace(
        learning_enabled=_flag(0), fake_quant_enabled=_flag(1), static_enabled=_flag(1)), False)


def enable_static_observation(variables):
    """LearnableFakeQuantize only observes (learning off, fake quant off, static on)."""
    return _map_learnable(variables, lambda s: s._replace(
        learning_enabled=_flag(0), fake_quant_enabled=_flag(0), static_enabled=_flag(1)), False)


_ = Any
