"""Shared helpers for the differential parity tests (jquant against torch 2.13 as oracle).

* converting jquant dtypes / qschemes / configs to torch (``torch_dtype``, ``torch_qscheme``,
  ``torch_observer``, ``torch_fake_quant``),
* moving state between the two (``jq_sd_to_torch``: a jquant state dict as torch's
  ``load_state_dict`` wants it; ``to_numpy``),
* bit-exact comparison (``assert_bitexact``): float32 bit patterns must be identical
  (signed zeros included; any NaN matches any NaN), integers compare by value (torch keeps
  some zero points as int64 where jquant keeps int32),
* hypothesis strategies for float32 test data (``arrays``) with tiny / huge / special values.

torch is imported here only: it is the test oracle, never a dependency of jquant.
"""
from __future__ import annotations

import collections
import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch
from hypothesis import strategies as st
from torch.ao.quantization import fake_quantize as tfq
from torch.ao.quantization import observer as tobs
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

import jquant as jq
from jquant._config import Factory

warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
warnings.filterwarnings("ignore", message=".*must run observer before calling calculate_qparams.*")

# torch.ao.quantization prints warnings through the warnings module; keep test output clean.
torch.set_num_threads(1)

_TORCH_DTYPE = {"uint8": torch.quint8, "int8": torch.qint8, "int32": torch.qint32,
                "uint4": torch.quint4x2, "int16": torch.int16, "uint16": torch.uint16,
                "float32": torch.float32, "float16": torch.float16}
_TORCH_REAL_DTYPE = {"uint8": torch.uint8, "int8": torch.int8, "int32": torch.int32}

#: quantized dtypes the observers are tested with, and their default ranges.
QDTYPES = (jq.quint8, jq.qint8, jq.qint32, jq.quint4x2)
QSCHEMES_PER_TENSOR = (jq.per_tensor_affine, jq.per_tensor_symmetric)
QSCHEMES_PER_CHANNEL = (jq.per_channel_affine, jq.per_channel_symmetric,
                        jq.per_channel_affine_float_qparams)


def torch_dtype(dtype):
    """torch's quantized dtype for a jquant (JAX) dtype: ``jnp.uint8 -> torch.quint8`` ..."""
    return _TORCH_DTYPE[np.dtype(dtype).name]


def torch_qscheme(qscheme):
    return getattr(torch, jq.QScheme(qscheme).value)


def _torch_value(v):
    if isinstance(v, jq.QScheme):
        return torch_qscheme(v)
    if isinstance(v, type) and issubclass(v, (jq.ObserverBase, jq.FakeQuantizeBase)):
        return torch_class(v)
    if isinstance(v, Factory):
        return torch_class(v.func).with_args(**torch_kwargs(v.keywords, torch_class(v.func)))
    try:
        return torch_dtype(v)
    except (TypeError, KeyError):
        return v


def torch_class(cls):
    """torch's class of the same name (``LearnableFakeQuantize -> _LearnableFakeQuantize``)."""
    if cls is jq.LearnableFakeQuantize:
        return _LearnableFakeQuantize
    return getattr(tobs, cls.__name__, None) or getattr(tfq, cls.__name__)


def torch_kwargs(args: dict, tcls=None) -> dict:
    """jquant constructor keywords as torch keywords (dtypes, qschemes, observers converted).

    Keywords torch's constructor does not take (jquant extras such as RecordingObserver's
    ``capacity``) are dropped.
    """
    out = {k: _torch_value(v) for k, v in args.items()}
    if tcls is not None:
        params = inspect.signature(tcls.__init__).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            out = {k: v for k, v in out.items() if k in params}
    return out


def torch_module(cfg):
    """A torch observer / fake-quantize module built with ``cfg``'s constructor arguments."""
    tcls = torch_class(type(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tcls(**torch_kwargs(cfg._args, tcls))


torch_observer = torch_module
torch_fake_quant = torch_module


def to_numpy(v) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        # a copy: ``.numpy()`` on a module's own buffer would make its storage non-resizable,
        # breaking torch's later in-place ``resize_`` (per-channel FakeQuantize's scale)
        return v.detach().cpu().clone().numpy()
    return np.asarray(v)


def t(x, dtype=torch.float32) -> torch.Tensor:
    """A torch tensor copy of a numpy/JAX array."""
    return torch.tensor(np.array(x), dtype=dtype)


def jq_sd_to_torch(sd: dict, version_map: dict | None = None) -> "collections.OrderedDict":
    """jquant's ``state_dict`` as tensors, for torch's ``load_state_dict``.

    jquant's state dicts are plain dicts of numpy arrays; torch's loader treats a dict
    without ``_metadata`` as version-1 observer state and resets ``eps``, so callers that
    test a custom ``eps`` pass the metadata torch's own state dict carries.
    """
    out = collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in sd.items())
    meta = getattr(sd, "_metadata", None) if version_map is None else version_map
    if meta is not None:
        out._metadata = meta
    return out


def _describe(a):
    return np.array2string(np.asarray(a), precision=10, threshold=40)


def flush_denormals(v: np.ndarray) -> np.ndarray:
    """float32 denormals replaced by a zero of the same sign (what XLA:CPU computes)."""
    v = np.array(v, np.float32)
    tiny = np.abs(v) < np.finfo(np.float32).tiny
    v[tiny] = np.copysign(np.float32(0), v[tiny])
    return v


def assert_bitexact(actual, expected, what: str = "", *, ints_as_values: bool = True,
                    ftz: bool = False):
    """``actual`` (jquant) equals ``expected`` (torch) bit for bit.

    Floats: identical float32 bit patterns (``-0.0 != 0.0``), except that any NaN matches
    any NaN. Integers: equal values (dtype widths may differ: torch's int64 vs int32).
    Shapes must match exactly. ``ftz``: torch's float32 denormals count as signed zeros
    (XLA:CPU flushes denormal results to zero, a documented deviation).
    """
    a = to_numpy(actual)
    e = to_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != torch {e.shape}"
    if np.issubdtype(e.dtype, np.floating):
        assert np.issubdtype(a.dtype, np.floating), f"{what}: dtype {a.dtype}, torch {e.dtype}"
        a32 = a.astype(np.float32)
        e32 = flush_denormals(e) if ftz else e.astype(np.float32)
        both_nan = np.isnan(a32) & np.isnan(e32)
        same = (a32.view(np.uint32) == e32.view(np.uint32)) | both_nan
        if not same.all():
            idx = np.argwhere(~same)[:5]
            raise AssertionError(
                f"{what}: {int((~same).sum())} of {same.size} float32 values differ; first at "
                f"{idx.tolist()}: jquant {a32[tuple(idx.T)]!r} vs torch {e32[tuple(idx.T)]!r}\n"
                f"jquant={_describe(a32)}\ntorch ={_describe(e32)}")
    else:
        if ints_as_values:
            assert not np.issubdtype(a.dtype, np.floating), f"{what}: dtype {a.dtype}, torch {e.dtype}"
        same = a.astype(np.int64) == e.astype(np.int64)
        if not same.all():
            raise AssertionError(f"{what}: integers differ\njquant={_describe(a)}\ntorch ={_describe(e)}")


def assert_close_rel(actual, expected, rtol: float, what: str = ""):
    """Relative closeness with NaN == NaN and equal infinities (for documented deviations)."""
    a = to_numpy(actual).astype(np.float64)
    e = to_numpy(expected).astype(np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != torch {e.shape}"
    np.testing.assert_allclose(a, e, rtol=rtol, atol=0, equal_nan=True, err_msg=what)


def assert_state_dict_bitexact(jq_sd: dict, torch_sd: dict, what: str = ""):
    """Same keys (torch's order) and bit-exact values."""
    assert list(jq_sd.keys()) == list(torch_sd.keys()), f"{what}: keys {list(jq_sd)} vs {list(torch_sd)}"
    for k in torch_sd:
        assert_bitexact(jq_sd[k], torch_sd[k], f"{what}[{k}]")


# ----------------------------------------------------------------------------------------
# hypothesis strategies for float32 data
# ----------------------------------------------------------------------------------------

#: magnitudes (powers of ten) spanning tiny to huge normal float32 values.
MAGNITUDES = (1e-30, 1e-12, 1e-6, 1e-3, 1.0, 3.0, 100.0, 1e6, 1e20, 1e30)


def _fill(rng: np.random.Generator, shape, kind: str, mag: float) -> np.ndarray:
    n = int(np.prod(shape))
    if kind == "normal":
        v = rng.standard_normal(n) * mag
    elif kind == "uniform_pos":
        v = rng.uniform(0, mag, n)
    elif kind == "uniform_neg":
        v = -rng.uniform(0, mag, n)
    elif kind == "grid":  # values on (and half-way between) a quantization grid: ties
        v = rng.integers(-300, 300, n) * (mag / 128) / 2
    elif kind == "constant":
        v = np.full(n, rng.standard_normal() * mag)
    elif kind == "zeros":
        v = np.zeros(n)
    else:
        raise ValueError(kind)
    v = np.asarray(v, np.float64)
    with np.errstate(over="ignore"):
        out = v.astype(np.float32)
    # XLA:CPU flushes denormals to zero (a documented deviation); the bit-exact data avoid them.
    out[np.abs(out) < np.finfo(np.float32).tiny] = 0.0
    return out.reshape(shape)


@st.composite
def arrays(draw, shape=None, *, kinds=("normal", "normal", "uniform_pos", "uniform_neg", "grid",
                                        "constant", "zeros"),
           magnitudes=MAGNITUDES, special: bool = False, min_dims=1, max_dims=3, max_side=5):
    """A float32 numpy array; ``special`` sometimes sprinkles NaN / +-inf into it."""
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims)))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    kind = draw(st.sampled_from(kinds))
    mag = draw(st.sampled_from(magnitudes))
    rng = np.random.default_rng(seed)
    x = _fill(rng, shape, kind, mag)
    if special and x.size and draw(st.integers(0, 3)) == 0:
        which = draw(st.sampled_from(["nan", "inf", "-inf", "mixed"]))
        k = max(1, x.size // 4)
        idx = rng.choice(x.size, size=k, replace=False)
        flat = x.reshape(-1)
        if which == "mixed":
            flat[idx] = rng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), size=k)
        else:
            flat[idx] = np.float32(which)
    return x


def jit_update(obs):
    """``jax.jit`` of an observer's update (one compiled function per config)."""
    return jax.jit(obs.update)


def jnp_f32(x):
    return jnp.asarray(np.asarray(x, np.float32))
