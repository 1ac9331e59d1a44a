"""NNX containers for observer / fake-quantize state (internal module of :mod:`jquant.nnx`).

A core observer or fake-quantize config (frozen, hashable) keeps its state in a NamedTuple
whose field names are torch's buffer names. :class:`PostProcess` is the NNX module that
owns such a state: the NamedTuple lives in one :class:`QuantStat` Variable named
``buffers`` (the learnable fake quant's ``scale`` / ``zero_point`` live beside it as
:class:`QuantParam`, an ``nnx.Param``, so optax trains them). One Variable per observer
keeps the NNX graph small: ``nnx.jit``'s per-call host cost grows with the number of
graph nodes. :func:`jquant.nnx.get_observer_state_dict` gives the torch-keyed view
(``fc.weight_fake_quant.activation_post_process.min_val`` ...).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jquant import collectives
from jquant import flags as _flags
from jquant import layers as _L
from jquant._state_dict import StateDictError
from jquant.fake_quantize import FakeQuantizeBase
from jquant.observers import ObserverBase

__all__ = ["QuantStat", "QuantParam", "PostProcess", "is_namedtuple"]


class QuantStat(nnx.Variable):
    """Observer / fake-quantize buffers (torch: ``min_val``, ``scale``, ``observer_enabled`` ...).

    Holds a core state NamedTuple (or a small flag array). Not a ``Param``: optimizers
    built with ``wrt=nnx.Param`` leave it alone; it changes as the model runs (like
    ``nnx.BatchStat``), also inside ``nnx.jit``.
    """


class QuantParam(nnx.Param):
    """A trainable quantization parameter (LearnableFakeQuantize's ``scale`` / ``zero_point``).

    An ``nnx.Param`` subclass, so ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` updates it;
    filter on ``QuantParam`` to give it its own optax transform. float32 ``(1,)`` or ``(C,)``.
    """


def is_namedtuple(v) -> bool:
    return isinstance(v, tuple) and hasattr(type(v), "_fields")


def _config_attr(name: str) -> property:
    """A read-only attribute forwarded to the module's config (torch's attribute ``name``)."""
    return property(lambda self: getattr(self.config, name),
                    doc=f"The config's ``{name}`` (torch's attribute of the same name).")


class PostProcess(nnx.Module):
    """An observer or fake-quantize module with its state in an NNX Variable.

    Counterpart of the ``activation_post_process`` / ``weight_fake_quant`` children that
    torch's ``prepare`` / ``prepare_qat`` attach. ``config`` is the core config (e.g.
    ``jquant.FusedMovingAvgObsFakeQuantize(...)``, ``jquant.MinMaxObserver()``); its state
    NamedTuple (torch's buffer names) is the :class:`QuantStat` ``buffers`` (learnable
    configs: plus :class:`QuantParam` ``scale`` and ``zero_point``). ``pp(x)`` runs the
    config's ``apply`` (observe and/or fake-quantize), stores the new state in place and
    returns the output with the input's dtype and shape (observers compute in float32).
    ``axis_name`` reduces statistics over a mapped axis (``shard_map`` / ``pmap``).
    """

    def __init__(self, config, state=None, *, example=None, axis_name=None, like=None):
        if not isinstance(config, (ObserverBase, FakeQuantizeBase)):
            raise ValueError(f"config must be an observer or fake-quantize config, got {config!r}")
        if state is None:
            state = config.init(example)
        if not is_namedtuple(state):
            raise ValueError(f"state must be the config's NamedTuple state, got {type(state).__name__}")
        # device affinity: the state lives where the module's (committed) params do
        state = collectives.place_like(state, like)
        self.config = config
        self.axis_name = axis_name
        self.learnable = _L.is_learnable(config)
        if self.learnable:
            self.scale = QuantParam(jnp.asarray(state.scale))
            self.zero_point = QuantParam(jnp.asarray(state.zero_point))
            state = state._replace(scale=None, zero_point=None)
        self.buffers = QuantStat(state)

    def _get_state(self):
        state = self.buffers.get_value()
        if self.learnable:
            state = state._replace(scale=self.scale.get_value(), zero_point=self.zero_point.get_value())
        return state

    def _put_state(self, state):
        if self.learnable:
            self.scale.set_value(state.scale)
            self.zero_point.set_value(state.zero_point)
            state = state._replace(scale=None, zero_point=None)
        self.buffers.set_value(state)

    # -- state access -------------------------------------------------------------------
    @property
    def state(self):
        """The core state NamedTuple (a snapshot of the Variables' values)."""
        return self._get_state()

    def set_state(self, new_state) -> None:
        """Writes a core state NamedTuple into the Variables (in place)."""
        self._put_state(new_state)

    def __call__(self, x):
        y, new_state = _L.post_process_apply(self.config, self._get_state(), x,
                                             axis_name=self.axis_name)
        self._put_state(new_state)
        return y

    # -- torch-like helpers ---------------------------------------------------------------
    # torch's fake-quant / observer modules expose their settings as attributes
    # (``fq.quant_min``, ``fq.dtype``, ...): read here from the config.
    quant_min = _config_attr("quant_min")
    quant_max = _config_attr("quant_max")
    dtype = _config_attr("dtype")
    qscheme = _config_attr("qscheme")

    def calculate_qparams(self):
        """``(scale, zero_point)`` from the config's rule (torch's ``calculate_qparams()``)."""
        return self.config.calculate_qparams(self.state)

    def state_dict(self) -> dict:
        """``{key: np.ndarray}`` with torch's buffer names (this module's part of a state dict)."""
        return self.config.state_dict(self.state)

    def load_state_dict(self, state_dict, strict: bool = True) -> None:
        """Loads a (jquant or torch) state dict into the Variables, in place."""
        new = self.config.load_state_dict(state_dict, strict=strict)
        self._replace_state(new)

    def _replace_state(self, new):
        old = self.state
        if jax.tree.structure(old) == jax.tree.structure(new):
            # shapes may change (torch resizes scale/zero_point on load)
            self._put_state(new)
        else:
            raise StateDictError(f"state structure of {type(self.config).__name__} changed on load")

    def get_tensor_value(self) -> list:
        """RecordingObserver: the recorded tensors (torch's ``get_tensor_value()``)."""
        fn = getattr(self.config, "get_tensor_value", None)
        if fn is None:
            raise AttributeError(f"{type(self.config).__name__} records no tensors")
        return fn(self.state)

    def reset_min_max_vals(self) -> None:
        self._put_state(self.config.reset_min_max_vals(self.state))

    def _call_toggle(self, name):
        fn = getattr(self.config, name, None)
        if fn is None:
            raise AttributeError(f"{type(self.config).__name__} has no {name}")
        self._put_state(fn(self.state))

    def enable_param_learning(self) -> None:
        """LearnableFakeQuantize: learn scale/zero point (learning on, static estimate off)."""
        self._call_toggle("enable_param_learning")

    def enable_static_estimate(self) -> None:
        """LearnableFakeQuantize: qparams from the observer (learning off, fake quant on)."""
        self._call_toggle("enable_static_estimate")

    def enable_static_observation(self) -> None:
        """LearnableFakeQuantize: observe only (learning off, fake quant off)."""
        self._call_toggle("enable_static_observation")

    def __repr__(self):  # compact: config plus paths
        return f"PostProcess({self.config!r})"


# ---------------------------------------------------------------------------------------
# jq.enable_observer / disable_observer / enable_fake_quant / disable_fake_quant on NNX
# ---------------------------------------------------------------------------------------

def _iter_stats(node):
    for path, v in nnx.iter_graph(node):
        if isinstance(v, QuantStat) and path:
            yield path, v


def _set_module_flags(module, values: dict):
    """Sets the flags inside every QuantStat in place and returns the module."""
    for _, var in _iter_stats(module):
        old = var.get_value()
        if is_namedtuple(old):
            var.set_value(_flags.set_flags(old, values))
    return module


def _set_state_flags(state, values: dict):
    """Returns a copy of an ``nnx.State`` with the flags inside its QuantStats set."""
    flat = []
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, QuantStat) and is_namedtuple(var.get_value()):
            var = var.replace(_flags.set_flags(var.get_value(), values))
        flat.append((path, var))
    return nnx.from_flat_state(flat)


_flags.register_flag_handler(nnx.Module, _set_module_flags)
_flags.register_flag_handler(nnx.State, _set_state_flags)

