"""Frozen, hashable configuration objects and torch-style ``with_args`` factories.

Internal base for observers and fake-quantize modules: a config records the keyword
arguments it was built with; equality, hashing, ``repr`` and ``replace`` use them, so a
derived attribute (e.g. a range halved by ``reduce_range``) is never halved twice.
Configs are registered as static pytree nodes: they can sit inside a pytree passed
through ``jax.jit`` and are hashed as static data.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import numpy as np

__all__ = ["Config", "Factory", "register_state"]


def register_state(cls):
    """Class decorator: lets a NamedTuple state cross ``jax.export`` serialization.

    Registers ``cls`` as ``jquant.<ClassName>``, so exported functions taking or returning
    states can be serialized and deserialized (in any process that imported jquant).
    """
    jax.export.register_namedtuple_serialization(cls, serialized_name=f"jquant.{cls.__name__}")
    return cls


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, np.ndarray):
        return ("ndarray", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, type) or callable(v):
        return v
    try:
        hash(v)
    except TypeError:
        return repr(v)
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, type):
        return v.__name__
    if isinstance(v, np.dtype):
        return v.name
    if isinstance(v, float):
        return repr(v)
    return repr(v)


class Factory:
    """A deferred constructor: ``cls`` with preset keyword arguments.

    Counterpart of torch's ``_PartialWrapper`` returned by ``Observer.with_args``. Calling
    it builds a new config (later keywords override preset ones); ``with_args`` chains.
    """

    __slots__ = ("func", "keywords")

    def __init__(self, func, keywords=None):
        object.__setattr__(self, "func", func)
        object.__setattr__(self, "keywords", dict(keywords or {}))

    def __setattr__(self, k, v):
        raise AttributeError("Factory is immutable; use with_args")

    def __getattr__(self, name):
        # only reached for names a Factory lacks: e.g. init / update used on with_args(...)
        if name.startswith("__") or name in Factory.__slots__:
            raise AttributeError(name)
        raise AttributeError(f"{self!r} is a factory (torch's with_args partial), not a config: it "
                             f"has no {name!r}. Build the config first: obs = factory(), then "
                             f"state = obs.init(x)")

    def __call__(self, *args, **kwargs):
        return self.func(*args, **{**self.keywords, **kwargs})

    def with_args(self, **kwargs) -> "Factory":
        return Factory(self.func, {**self.keywords, **kwargs})

    @property
    def p(self):  # torch compatibility: ``factory.p.keywords``
        return self

    def __eq__(self, other):
        return (isinstance(other, Factory) and self.func is other.func
                and _freeze(self.keywords) == _freeze(other.keywords))

    def __hash__(self):
        return hash((self.func, _freeze(self.keywords)))

    def __repr__(self):
        kw = ", ".join(f"{k}={_fmt(v)}" for k, v in self.keywords.items())
        name = getattr(self.func, "__name__", repr(self.func))
        return f"{name}.with_args({kw})"


#: Config methods that a user may mistakenly call on the class (``MinMaxObserver.init(x)``).
_INSTANCE_METHODS = ("init", "update", "calculate_qparams", "apply", "state_dict",
                     "load_state_dict", "enable_fake_quant", "disable_fake_quant",
                     "enable_observer", "disable_observer")


class _InstanceOnly:
    """A config method that, looked up on the class and called with something other than a
    config as ``self`` (``MinMaxObserver.init(x)``), raises a TypeError naming the fix;
    instances get the plain bound method."""

    def __init__(self, fn):
        functools.update_wrapper(self, fn)

    def __get__(self, obj, objtype=None):
        fn = self.__wrapped__
        if obj is not None:
            return fn.__get__(obj, objtype)
        owner = objtype.__name__

        @functools.wraps(fn)
        def unbound(self_, *args, **kwargs):
            if not isinstance(self_, Config):
                raise TypeError(f"{owner}.{fn.__name__}() was called on the class, not on a "
                                f"config: build the config first, then call the method on it, "
                                f"e.g. cfg = {owner}(); cfg.{fn.__name__}(...)")
            return fn(self_, *args, **kwargs)
        return unbound


class Config:
    """Base of frozen configs. Subclasses call ``self._record(locals())`` first in __init__."""

    _args: dict

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register = getattr(jax.tree_util, "register_static", None)
        if register is not None:
            register(cls)
        for name in _INSTANCE_METHODS:
            fn = cls.__dict__.get(name)
            if inspect.isfunction(fn):
                setattr(cls, name, _InstanceOnly(fn))

    def _record(self, local_vars: dict) -> None:
        sig = inspect.signature(type(self).__init__)
        args = {}
        for name, param in sig.parameters.items():
            if name == "self":
                continue
            if param.kind == param.VAR_KEYWORD:
                args.update(local_vars.get(name, {}))
            elif param.kind != param.VAR_POSITIONAL:
                args[name] = local_vars[name]
        object.__setattr__(self, "_args", args)

    def _set(self, **kwargs) -> None:
        for k, v in kwargs.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, k, v):
        raise AttributeError(f"{type(self).__name__} is a frozen config; use .replace({k}=...)")

    def replace(self, **kwargs):
        """A copy built with some constructor arguments changed."""
        return type(self)(**{**self._args, **kwargs})

    @classmethod
    def with_args(cls, **kwargs) -> Factory:
        """A factory with preset keyword arguments; ``torch ... .with_args``."""
        return Factory(cls, kwargs)

    def _key(self):
        return (type(self), _freeze(self._args))

    def __eq__(self, other):
        return isinstance(other, Config) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        sig = inspect.signature(type(self).__init__)
        shown = []
        for k, v in self._args.items():
            p = sig.parameters.get(k)
            if p is not None and p.default is not inspect.Parameter.empty:
                try:
                    if v is p.default or v == p.default:
                        continue
                except Exception:  # noqa: BLE001 - arrays etc.
                    pass
            shown.append(f"{k}={_fmt(v)}")
        return f"{type(self).__name__}({', '.join(shown)})"
