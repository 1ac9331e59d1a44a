"""Differential tests: jquant's fake-quantize MODULES against torch 2.13's, over multi-step sequences.

FakeQuantize (MinMax / MovingAverage / per-channel observers; several dtypes, qschemes,
``reduce_range``, ``ch_axis`` and quant_min / quant_max overrides), FusedMovingAvgObsFakeQuantize,
FixedQParamsFakeQuantize and LearnableFakeQuantize (torch's ``_LearnableFakeQuantize``; per
tensor and per channel, ``use_grad_scaling``) see the same batches as their torch twins.
jquant's step (``y, state = fq(state, x)`` plus its VJP) runs under ``jax.jit`` with the
flags traced, so toggling them never recompiles. After every step these must equal torch's
bit for bit:

* the output ``y`` and the input gradient,
* every state buffer: the whole state dict (flags, scale, zero point, observer eps / min /
  max, the learnable module's parameters), in torch's key order,
* for LearnableFakeQuantize the scale / zero-point gradients, with one documented rule
  (the same one as tests/test_parity_ops.py): they are sums over the elements of a batch
  (of a channel), and torch's CPU kernel sums in a different order from XLA's reduction, so a
  sum of several terms is compared within ``1e-5 * sum(|term_i|)`` (the float32
  summation-order bound at these sizes); a single-term sum must be bit-exact, and a
  gradient torch does not compute (learning off: ``requires_grad=False``) must be all zeros.

Between steps the flags are toggled on both sides: jquant's tree-level functions
(``jq.enable_observer`` ...) against ``module.apply(torch.ao.quantization.enable_observer)``,
and the modules' own methods (``fq.disable_fake_quant(state)`` ...,
``enable_param_learning`` / ``enable_static_estimate`` / ``enable_static_observation``)
against torch's methods.

Deviations documented and tested here (they cannot be matched by a stateless module):

* LearnableFakeQuantize gates its scale / zero-point gradients on the ``learning_enabled``
  flag. torch gates them on the parameters' ``requires_grad``, which only
  ``toggle_qparam_learning`` (so the three mode methods) sets: a freshly built torch module
  has ``learning_enabled == 0`` yet ``requires_grad == True`` and computes qparam gradients
  until the first mode call; jquant's are zero then (``requires_grad`` is module state, not
  state-dict state). Everywhere else the two agree (``test_learnable_grads_follow_learning_enabled``).
* A per-channel FakeQuantize state loaded from a never-run torch module has torch's ``(1,)``
  scale / zero point. Stepped with the observer *disabled* under ``jax.jit`` (traced flags,
  static shapes), jquant returns them broadcast to ``(C,)`` (same values), where torch keeps
  ``(1,)``; eagerly (concrete flags) it keeps ``(1,)`` as torch does. The first observed step
  sizes both to ``(C,)``.

Other documented rules used here (each has its own tests elsewhere): XLA:CPU flushes
float32 denormal results to zero (outputs compared with ``ftz=True``); a sequence ends
where torch raises in forward, in the two documented cases only (``_check_torch_rejection``):
a non-finite batch that gives a per-channel zero point torch rejects (``INT32_MIN``), and a
moving average that rounds min above max (torch asserts; jquant's concrete
``calculate_qparams`` raises ValueError; tests/test_bad_input.py). torch's FakeQuantize
rejects a negative ``ch_axis`` in forward, so only non-negative axes are compared.

The same sequences also run eagerly (concrete flags, where the disabled work is skipped)
and with float16 inputs. State dicts go both ways (jquant -> torch ``load_state_dict`` and
torch -> jquant ``load_state_dict``), for fixed and drawn configs, and both sides then
continue identically; a mismatched state dict (missing key, unexpected key, wrong shape)
raises :class:`jquant._state_dict.StateDictError` (a ValueError). ``@pytest.mark.slow``
variants draw more examples.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.ao.quantization as tq
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import jquant as jq
from jquant._state_dict import StateDictError
from jquant.fake_quant_ops import _lsq_grads
from torch_oracle import (arrays, assert_bitexact, assert_state_dict_bitexact, jq_sd_to_torch,
                          torch_fake_quant)

F32 = np.float32
SHAPE = (3, 4, 2)  # one input shape: every config compiles its step once
_CUSTOM = {"uint8": (0, 255), "int8": (-128, 127), "int32": (-(2 ** 31), 2 ** 31 - 1),
           "uint4": (0, 15)}
#: flag toggles shared by every module; the learnable module adds its three modes.
TOGGLES = ("enable_observer", "disable_observer", "enable_fake_quant", "disable_fake_quant")
LEARNABLE_MODES = ("enable_param_learning", "enable_static_estimate", "enable_static_observation")


# ----------------------------------------------------------------------------------------
# Stepping both sides
# ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _step(fq, eager=False):
    """jit(forward + VJP) for one config: (y, new_state, dx[, dscale, dzero_point]).

    ``eager``: the same without jit (concrete flags take the static, skip-the-work paths).
    """
    learnable = isinstance(fq, jq.LearnableFakeQuantize)

    def step(state, x, g):
        if learnable:
            def f(s, z, v):
                return fq(state._replace(scale=s, zero_point=z), v)
            y, vjp, new = jax.vjp(f, state.scale, state.zero_point, x, has_aux=True)
            gs, gz, gx = vjp(g)
            return y, new, gx, gs, gz
        y, vjp, new = jax.vjp(lambda v: fq(state, v), x, has_aux=True)
        return y, new, vjp(g)[0]
    return step if eager else jax.jit(step)


def _torch_step(tmod, x, g):
    """torch's forward + backward: (y, dx, [param grads]), or the exception torch raised."""
    params = list(tmod.parameters())
    for p in params:
        p.grad = None
    tx = torch.tensor(x, requires_grad=True)
    try:
        ty = tmod(tx)
    except (RuntimeError, AssertionError) as e:
        return e
    ty.backward(torch.from_numpy(g))
    return ty.detach(), tx.grad, [p.grad for p in params]


def _toggle(fq, state, tmod, name, tree_level):
    """Apply a flag toggle on both sides (tree-level functions or the modules' methods)."""
    if tree_level and name in TOGGLES:
        tmod.apply(getattr(tq, name))
        return getattr(jq, name)(state)
    getattr(tmod, name)()
    return getattr(fq, name)(state)


def _lsq_bound(fq, tmod, x, g):
    """Per-channel (or whole-tensor) ``sum |term_i|`` of torch's scale / zero-point grads."""
    scale = tmod.scale.detach().numpy()
    zp = tmod.zero_point.detach().numpy()
    if fq.is_per_channel:
        zb = np.clip(np.round(zp), fq.quant_min, fq.quant_max).astype(F32)
    else:
        zb = np.trunc(np.clip(zp + F32(0.5), fq.quant_min, fq.quant_max)).astype(F32)
    gf = 1.0 / (x.size * fq.quant_max) ** 0.5 if fq.use_grad_scaling else 1.0
    bshape = [1] * x.ndim
    if fq.is_per_channel:
        bshape[fq.ch_axis] = x.shape[fq.ch_axis]
    _, ds, dz = _jit_lsq_grads(jnp.asarray(x), jnp.asarray(g), jnp.asarray(scale).reshape(bshape),
                               jnp.asarray(zb).reshape(bshape), fq.quant_min, fq.quant_max,
                               jnp.float32(gf))
    out = []
    for d in (ds, dz):
        d = np.abs(np.asarray(d, np.float64))
        if fq.is_per_channel:
            d = np.moveaxis(d, fq.ch_axis, 0).reshape(x.shape[fq.ch_axis], -1)
        else:
            d = d.reshape(1, -1)
        out.append(d)
    return out


_jit_lsq_grads = jax.jit(_lsq_grads, static_argnums=(4, 5))


def _assert_param_grad(actual, expected, terms, what):
    """The documented rule for the LSQ qparam gradients (module docstring)."""
    a = np.asarray(actual)
    if expected is None:  # learning off: torch computes no gradient, jquant's is zero
        assert np.all(a == 0), f"{what}: learning is off but jquant's gradient is {a}"
        return
    if terms.shape[-1] == 1:
        # torch's sum starts from +0.0, so a single -0.0 term sums to +0.0
        e = expected.numpy()
        assert_bitexact(np.where(a == 0, F32(0), a).astype(F32),
                        np.where(e == 0, F32(0), e).astype(F32), what)
        return
    a64, e64 = a.astype(np.float64), expected.numpy().astype(np.float64)
    bound = 1e-5 * terms.sum(-1) + 1e-30
    ok = (np.abs(a64 - e64) <= bound) | (np.isnan(a64) & np.isnan(e64))
    assert ok.all(), f"{what}: jquant {a64} vs torch {e64} (bound {bound})"


def _check_torch_rejection(fq, err, x, new_state, where):
    """torch raised in forward: only in the two documented cases, where the sequence ends.

    * RuntimeError: a non-finite batch gave a per-channel zero point out of range (or a
      non-finite scale), which torch's per-channel op rejects.
    * AssertionError ``min ... should be less than max``: a moving average rounded the
      observed min above the max (e.g. a constant batch with ``averaging_constant=1``);
      torch's ``calculate_qparams`` asserts, jquant's raises ValueError for a concrete state
      (under jit it cannot raise; tests/test_bad_input.py).
    """
    if isinstance(err, RuntimeError):
        zp = np.asarray(new_state.zero_point, np.float64)
        bad = ~np.isfinite(np.asarray(new_state.scale)) | (zp < fq.quant_min) | (zp > fq.quant_max)
        assert fq.is_per_channel and bad.any(), (where, err)
        return
    assert "should be less than max" in str(err), (where, err)
    app = new_state.activation_post_process
    assert np.any(np.asarray(app.min_val) > np.asarray(app.max_val)), where
    with pytest.raises(ValueError):
        fq.activation_post_process.calculate_qparams(app)


def _compare_state(fq, state, tmod, where):
    assert_state_dict_bitexact(fq.state_dict(state), tmod.state_dict(), where)


def _run(fq, tmod, state, steps, start=0, eager=False):
    """Run ``steps`` = [(toggle or None, tree_level, x, g)] on both sides, comparing after each.

    Returns the final jquant state (or None when torch rejected a batch, see the docstring).
    """
    step = _step(fq, eager)
    learnable = isinstance(fq, jq.LearnableFakeQuantize)
    for i, (toggle, tree_level, x, g) in enumerate(steps):
        where = f"step {start + i}"
        if toggle is not None:
            state = _toggle(fq, state, tmod, toggle, tree_level)
            where += f" after {toggle}{' (tree)' if tree_level else ''}"
            _compare_state(fq, state, tmod, where + " state before")
        ref = _torch_step(tmod, x, g)
        out = step(state, jnp.asarray(x), jnp.asarray(g))
        if isinstance(ref, Exception):
            _check_torch_rejection(fq, ref, x, out[1], where)
            return None
        ty, tgx, tgrads = ref
        y, state, gx = out[:3]
        assert_bitexact(y, ty, f"{where} y", ftz=True)
        assert_bitexact(gx, tgx, f"{where} dx", ftz=True)
        _compare_state(fq, state, tmod, f"{where} state")
        if learnable:
            if not tmod.learning_enabled[0]:  # torch's grads, if any, are the documented deviation
                tgrads = [None, None]
            ds_terms, dz_terms = _lsq_bound(fq, tmod, x, g)
            _assert_param_grad(out[3], tgrads[0], ds_terms, f"{where} dscale")
            _assert_param_grad(out[4], tgrads[1], dz_terms, f"{where} dzero_point")
    return state


# ----------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------

OBSERVERS = (jq.MinMaxObserver, jq.MovingAverageMinMaxObserver, jq.PerChannelMinMaxObserver,
             jq.MovingAveragePerChannelMinMaxObserver)


@st.composite
def fake_quantizes(draw):
    obs = draw(st.sampled_from(OBSERVERS))
    per_channel = issubclass(obs, jq.PerChannelMinMaxObserver)
    dtype = draw(st.sampled_from((jq.quint8, jq.qint8, jq.qint32, jq.quint4x2)))
    schemes = ((jq.per_channel_affine, jq.per_channel_symmetric, jq.per_channel_affine_float_qparams)
               if per_channel else (jq.per_tensor_affine, jq.per_tensor_symmetric))
    kw = dict(observer=obs, dtype=dtype, qscheme=draw(st.sampled_from(schemes)),
              reduce_range=draw(st.booleans()))
    if draw(st.booleans()):
        lo, hi = _CUSTOM[np.dtype(dtype).name]
        kw.update(quant_min=draw(st.integers(lo, 0)), quant_max=draw(st.integers(1, hi)))
    if "MovingAverage" in obs.__name__:
        kw["averaging_constant"] = draw(st.sampled_from((0.01, 0.5, 1.0)))
    if per_channel:
        kw["ch_axis"] = draw(st.integers(0, len(SHAPE) - 1))
    if draw(st.booleans()):
        kw["eps"] = draw(st.sampled_from((2.0 ** -12, 1e-4)))
    try:
        return jq.FakeQuantize(**kw)
    except ValueError:  # e.g. symmetric + reduce_range + quint8 (torch raises as well)
        assume(False)


@st.composite
def step_sequences(draw, toggles=TOGGLES, special=True, n_max=5,
                   magnitudes=(1e-6, 1e-3, 1.0, 3.0, 100.0, 1e6)):
    """[(toggle, tree_level, x, g)]: the first step observes with the initial flags."""
    n = draw(st.integers(2, n_max))
    offset = draw(st.sampled_from([0.0, 0.0, 0.5, -2.0, 1e3]))
    out = []
    for i in range(n):
        toggle = None if i == 0 else draw(st.sampled_from((None,) + toggles))
        x = draw(arrays(SHAPE, special=special,
                        kinds=("normal", "uniform_pos", "uniform_neg", "grid", "constant"),
                        magnitudes=magnitudes))
        g = draw(arrays(SHAPE, kinds=("normal",), magnitudes=(1.0,)))
        out.append((toggle, draw(st.booleans()), (x + F32(offset)).astype(F32), g))
    return out


def _init(fq):
    return fq.init(jax.ShapeDtypeStruct(SHAPE, jnp.float32))


# ----------------------------------------------------------------------------------------
# FakeQuantize
# ----------------------------------------------------------------------------------------

@settings(max_examples=15)
@given(fake_quantizes(), step_sequences())
def test_fake_quantize_sequences(fq, steps):
    """Output, input grad and the whole state after every step, flags toggled mid-way."""
    tmod = torch_fake_quant(fq)
    _run(fq, tmod, _init(fq), steps)


def test_moving_average_min_above_max_ends_like_torch():
    """A constant batch after a wide one with averaging_constant=1 can round min above max:
    torch's forward asserts, jquant's concrete calculate_qparams raises ValueError."""
    lo, hi = F32(-1.6070081), F32(3.9120002)
    rng = np.random.default_rng(0)
    for c in rng.uniform(0, 1, 10000).astype(F32):
        if lo + (c - lo) > hi + (c - hi):  # float32 arithmetic, as both observers
            break
    else:
        raise AssertionError("no such constant found")
    first = np.linspace(lo, hi, int(np.prod(SHAPE)), dtype=F32).reshape(SHAPE)
    g = np.ones(SHAPE, F32)
    for fq in (jq.FakeQuantize(jq.MovingAverageMinMaxObserver, averaging_constant=1.0),
               jq.LearnableFakeQuantize(jq.MovingAverageMinMaxObserver, averaging_constant=1.0)):
        steps = [(None, False, first, g), (None, False, np.full(SHAPE, c, F32), g)]
        assert _run(fq, torch_fake_quant(fq), _init(fq), steps) is None


# ----------------------------------------------------------------------------------------
# FusedMovingAvgObsFakeQuantize
# ----------------------------------------------------------------------------------------

FUSED_CONFIGS = (
    dict(),
    dict(observer=jq.MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=jq.qint8,
         qscheme=jq.per_tensor_symmetric, averaging_constant=0.5),
    dict(observer=jq.MovingAveragePerChannelMinMaxObserver, quant_min=-8, quant_max=7,
         dtype=jq.qint8, qscheme=jq.per_channel_symmetric, ch_axis=0),
    dict(observer=jq.MovingAveragePerChannelMinMaxObserver, quant_min=0, quant_max=15,
         qscheme=jq.per_channel_affine, ch_axis=0, averaging_constant=1.0),
)


@settings(max_examples=12)
@given(st.sampled_from(FUSED_CONFIGS), step_sequences())
def test_fused_module_sequences(kw, steps):
    fq = jq.FusedMovingAvgObsFakeQuantize(**kw)
    tmod = torch_fake_quant(fq)
    if fq.is_per_channel:  # torch's per-channel buffers start at (1,): observe first, then compare
        steps = [(None, False, np.nan_to_num(x, posinf=1e3, neginf=-1e3), g) for _, _, x, g in steps[:1]] \
            + steps[1:]
    _run(fq, tmod, _init(fq), steps)


@pytest.mark.parametrize("make", [
    lambda: jq.FakeQuantize(observer=jq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255),
    lambda: jq.FusedMovingAvgObsFakeQuantize(averaging_constant=0.5),
    lambda: jq.FusedMovingAvgObsFakeQuantize(quant_min=-128, quant_max=127, dtype=jq.qint8,
                                             qscheme=jq.per_tensor_symmetric),
], ids=["FakeQuantize", "Fused", "Fused-symmetric"])
def test_large_inputs_with_traced_flags(make):
    """Per-tensor fake quant of >= 16k elements (its own XLA computation on CPU) with the
    flags toggled at run time: output, ``dY * mask`` gradient (-0.0 where masked) and state
    equal torch's, as for small inputs."""
    fq = make()
    tmod = torch_fake_quant(fq)
    rng = np.random.default_rng(7)
    shape = (40, 512)
    steps = []
    for i, toggle in enumerate((None, "disable_fake_quant", "enable_fake_quant", "disable_observer",
                                None, "disable_fake_quant", "enable_observer")):
        x = (rng.normal(size=shape) * (1.0 + 2 * i) + (i - 3)).astype(F32)
        if i:  # outliers beyond the observed range: clipped, their gradient masked
            x[0, :4] = (-0.0, 0.0, 1e6, -1e6)
        g = rng.normal(size=shape).astype(F32)
        steps.append((toggle, False, x, g))
    assert _run(fq, tmod, _init(fq), steps) is not None


# ----------------------------------------------------------------------------------------
# FixedQParamsFakeQuantize
# ----------------------------------------------------------------------------------------

FIXED = (jq.default_fixed_qparams_range_0to1_fake_quant,
         jq.default_fixed_qparams_range_neg1to1_fake_quant,
         jq.FixedQParamsFakeQuantize.with_args(observer=jq.FixedQParamsObserver.with_args(
             scale=0.05, zero_point=-3, dtype=jq.qint8, quant_min=-16, quant_max=15)))


@settings(max_examples=8)
@given(st.sampled_from(FIXED), step_sequences())
def test_fixed_qparams_sequences(make, steps):
    fq = make()
    tmod = torch_fake_quant(fq)
    _run(fq, tmod, fq.init(), steps)


# ----------------------------------------------------------------------------------------
# LearnableFakeQuantize
# ----------------------------------------------------------------------------------------

@st.composite
def learnables(draw):
    per_channel = draw(st.booleans())
    qmin, qmax = draw(st.sampled_from(((0, 255), (0, 15), (-128, 127), (-8, 7))))
    dtype = jq.quint8 if qmin == 0 else jq.qint8
    if per_channel:
        obs = draw(st.sampled_from(OBSERVERS[2:]))
        qscheme = draw(st.sampled_from((jq.per_channel_affine, jq.per_channel_symmetric)))
        ch_axis = draw(st.integers(0, len(SHAPE) - 1))
        kw = dict(ch_axis=ch_axis, channel_len=SHAPE[ch_axis])
    else:
        obs = draw(st.sampled_from(OBSERVERS[:2]))
        qscheme = draw(st.sampled_from((jq.per_tensor_affine, jq.per_tensor_symmetric)))
        kw = {}
    return jq.LearnableFakeQuantize(
        obs, quant_min=qmin, quant_max=qmax, dtype=dtype, qscheme=qscheme,
        scale=draw(st.sampled_from((1.0, 0.05, 1e-9))), zero_point=draw(st.sampled_from((0.0, 3.0))),
        use_grad_scaling=draw(st.booleans()), **kw)


@settings(max_examples=15)
@given(learnables(), step_sequences(toggles=TOGGLES + LEARNABLE_MODES, special=False, n_max=6))
def test_learnable_sequences(fq, steps):
    """Outputs, all grads (dx, dscale, dzero_point) and the state, modes switched mid-way."""
    tmod = torch_fake_quant(fq)
    _run(fq, tmod, _init(fq), steps)


def test_learnable_modes_drive_flags_like_torch():
    """Each mode method sets the same four flags (and nothing else) as torch's."""
    fq = jq.LearnableFakeQuantize(jq.MovingAverageMinMaxObserver)
    tmod = torch_fake_quant(fq)
    state = fq.init()
    for name in LEARNABLE_MODES + ("disable_observer", "enable_param_learning", "enable_observer",
                                   "disable_fake_quant", "enable_static_estimate"):
        for tree_level in (False, True):
            state = _toggle(fq, state, tmod, name, tree_level)
            _compare_state(fq, state, tmod, name)
            assert tmod.scale.requires_grad == bool(state.learning_enabled[0]), name


def test_tree_level_toggles_over_a_container_like_torch_apply():
    """jq.enable_observer & co. over a dict of states == model.apply(tq.enable_observer & co.)."""
    fqs = {"fq": jq.FakeQuantize(), "fused": jq.FusedMovingAvgObsFakeQuantize(),
           "fixed": jq.default_fixed_qparams_range_neg1to1_fake_quant(),
           "lsq": jq.LearnableFakeQuantize(jq.MovingAverageMinMaxObserver)}
    tmodel = torch.nn.ModuleDict({k: torch_fake_quant(v) for k, v in fqs.items()})
    states = {k: v.init() for k, v in fqs.items()}
    for name in ("disable_observer", "disable_fake_quant", "enable_observer", "disable_observer",
                 "enable_fake_quant", "enable_observer"):
        states = getattr(jq, name)(states)
        tmodel.apply(getattr(tq, name))
        for k, fq in fqs.items():
            _compare_state(fq, states[k], tmodel[k], f"{name} {k}")


# ----------------------------------------------------------------------------------------
# State dicts, both directions
# ----------------------------------------------------------------------------------------

SD_MODULES = {
    "FakeQuantize": lambda: jq.FakeQuantize(),
    "FakeQuantize_per_channel": lambda: jq.FakeQuantize(
        jq.MovingAveragePerChannelMinMaxObserver, ch_axis=1, dtype=jq.qint8,
        qscheme=jq.per_channel_symmetric, quant_min=-64, quant_max=63),
    "FakeQuantize_float_qparams": lambda: jq.FakeQuantize(
        jq.PerChannelMinMaxObserver, ch_axis=2, qscheme=jq.per_channel_affine_float_qparams),
    "FusedMovingAvgObsFakeQuantize": lambda: jq.FusedMovingAvgObsFakeQuantize(),
    "FusedMovingAvgObsFakeQuantize_per_channel": lambda: jq.FusedMovingAvgObsFakeQuantize(
        jq.MovingAveragePerChannelMinMaxObserver, ch_axis=0, quant_min=-128, quant_max=127,
        dtype=jq.qint8, qscheme=jq.per_channel_symmetric),
    "FixedQParamsFakeQuantize": lambda: jq.default_fixed_qparams_range_0to1_fake_quant(),
    "LearnableFakeQuantize": lambda: jq.LearnableFakeQuantize(
        jq.MovingAverageMinMaxObserver, quant_min=0, quant_max=15, use_grad_scaling=True),
    "LearnableFakeQuantize_per_channel": lambda: jq.LearnableFakeQuantize(
        jq.PerChannelMinMaxObserver, quant_min=-8, quant_max=7, dtype=jq.qint8,
        qscheme=jq.per_channel_affine, ch_axis=1, channel_len=SHAPE[1]),
}


def _sd_steps(seed, n, toggles):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = (rng.standard_normal(SHAPE) * (1 + i) + 0.3 * i).astype(F32)
        g = rng.standard_normal(SHAPE).astype(F32)
        out.append((toggles[i % len(toggles)] if i else None, bool(i % 2), x, g))
    return out


@pytest.mark.parametrize("name", SD_MODULES)
def test_state_dict_round_trips(name):
    """jquant -> torch and torch -> jquant mid-sequence; both continue identically."""
    fq = SD_MODULES[name]()
    learnable = isinstance(fq, jq.LearnableFakeQuantize)
    toggles = ("enable_param_learning", None, "enable_static_estimate") if learnable else \
        (None, "disable_fake_quant", "enable_fake_quant")
    first, then = _sd_steps(0, 2, toggles), _sd_steps(1, 3, toggles[::-1])
    init = fq.init() if isinstance(fq, jq.FixedQParamsFakeQuantize) else _init(fq)

    # jquant observes first; torch loads jquant's state dict (into a fresh module); both go on
    step = _step(fq)
    state = init
    for toggle, tree_level, x, g in first:
        if toggle is not None:
            state = getattr(fq, toggle)(state)
        state = step(state, x, g)[1]
    sd = fq.state_dict(state)
    tmod = torch_fake_quant(fq)
    if learnable and state.learning_enabled[0]:
        tmod.toggle_qparam_learning(True)  # requires_grad is module state, not state-dict state
    tmod.load_state_dict(jq_sd_to_torch(sd))
    _compare_state(fq, state, tmod, "jquant -> torch")
    assert _run(fq, tmod, state, then, start=len(first)) is not None

    # torch observes first; jquant loads torch's state dict; both go on
    tmod = torch_fake_quant(fq)
    for toggle, tree_level, x, g in first:
        if toggle is not None:
            getattr(tmod, toggle)()
        assert _torch_step(tmod, x, g) is not None
    state = fq.load_state_dict(tmod.state_dict())
    _compare_state(fq, state, tmod, "torch -> jquant")
    assert _run(fq, tmod, state, then, start=len(first)) is not None


@settings(max_examples=10)
@given(st.one_of(fake_quantizes(), learnables()), step_sequences(n_max=3), step_sequences(n_max=3),
       st.booleans())
def test_state_dict_round_trips_drawn(fq, first, then, jquant_first):
    """Drawn configs and sequences: observe ``first`` on one side, move the state dict over,
    continue ``then`` on both."""
    learnable = isinstance(fq, jq.LearnableFakeQuantize)
    if learnable:  # no NaN / inf in the learnable sequences (see test_learnable_sequences)
        first, then = ([(t, tl, np.nan_to_num(x, nan=0.5, posinf=3.0, neginf=-3.0), g)
                        for t, tl, x, g in seq] for seq in (first, then))
        if first[0][0] is None:  # the first mode call sets requires_grad (docstring)
            first[0] = ("enable_static_estimate",) + first[0][1:]
    tmod = torch_fake_quant(fq)
    if jquant_first:
        state = _init(fq)
        for toggle, tree_level, x, g in first:
            if toggle is not None:
                state = getattr(fq, toggle)(state)
                getattr(tmod, toggle)()  # the module's requires_grad follows
            state = _step(fq)(state, x, g)[1]
        sd = fq.state_dict(state)
        tmod.load_state_dict(jq_sd_to_torch(sd))
        where = "jquant -> torch"
    else:
        for toggle, tree_level, x, g in first:
            if toggle is not None:
                getattr(tmod, toggle)()
            if isinstance(_torch_step(tmod, x, g), Exception):
                return  # a documented rejection (see _check_torch_rejection)
        state = fq.load_state_dict(tmod.state_dict())
        where = "torch -> jquant"
    _compare_state(fq, state, tmod, where)
    _run(fq, tmod, state, then, start=len(first))


_EAGER_FAST = ("FakeQuantize_per_channel", "FusedMovingAvgObsFakeQuantize",
               "LearnableFakeQuantize_per_channel")


@pytest.mark.parametrize("name", [n if n in _EAGER_FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in SD_MODULES])
def test_eager_sequences(name):
    """Without jit (concrete flags: the disabled work is skipped) the numbers are the same."""
    fq = SD_MODULES[name]()
    toggles = (LEARNABLE_MODES + ("disable_observer",) if isinstance(fq, jq.LearnableFakeQuantize)
               else TOGGLES)
    init = fq.init() if isinstance(fq, jq.FixedQParamsFakeQuantize) else _init(fq)
    _run(fq, torch_fake_quant(fq), init, _sd_steps(6, 6, toggles[::-1]), eager=True)


@pytest.mark.parametrize("name", ["FakeQuantize", "FakeQuantize_per_channel", "LearnableFakeQuantize",
                                  "FixedQParamsFakeQuantize"])
def test_float16_inputs(name):
    """float16 batches: observed and fake-quantized in float32, returned as float16, as torch."""
    fq = SD_MODULES[name]()
    tmod = torch_fake_quant(fq)
    state = fq.init() if isinstance(fq, jq.FixedQParamsFakeQuantize) else _init(fq)
    rng = np.random.default_rng(7)
    apply = jax.jit(fq.apply)
    for i in range(3):
        x = (rng.standard_normal(SHAPE) * (i + 1)).astype(np.float16)
        ty = tmod(torch.from_numpy(x))
        y, state = apply(state, x)
        assert y.dtype == jnp.float16 and ty.dtype == torch.float16
        assert_bitexact(np.asarray(y).astype(F32), ty.float(), f"step {i} y")
        _compare_state(fq, state, tmod, f"step {i} state")


def test_state_dict_into_untouched_per_channel_torch_module():
    """torch's never-run per-channel FakeQuantize ((1,) qparams, empty min/max) -> jquant."""
    fq = SD_MODULES["FakeQuantize_per_channel"]()
    tmod = torch_fake_quant(fq)
    state = fq.load_state_dict(tmod.state_dict())
    _compare_state(fq, state, tmod, "loaded")
    _run(fq, tmod, state, _sd_steps(2, 3, ("disable_fake_quant", "enable_fake_quant")))
    # observer and fake quant off from the start: (1,) qparams (broadcast under jit; docstring)
    tmod = torch_fake_quant(fq)
    tmod.disable_observer()
    tmod.disable_fake_quant()
    state = fq.load_state_dict(tmod.state_dict())
    x, g = _sd_steps(3, 1, (None,))[0][2:]
    tmod(torch.from_numpy(x))
    eager = fq(state, x)[1]
    _compare_state(fq, eager, tmod, "eager, observer off")
    jitted = _step(fq)(state, x, g)[1]
    assert jitted.scale.shape == jitted.zero_point.shape == (SHAPE[1],)
    assert_bitexact(jitted.scale, np.broadcast_to(tmod.scale.numpy(), (SHAPE[1],)), "scale")
    assert_bitexact(jitted.zero_point, np.broadcast_to(tmod.zero_point.numpy(), (SHAPE[1],)), "zp")


@pytest.mark.parametrize("eager", [False, True])
def test_learnable_from_untouched_per_channel_torch_module(eager):
    """torch's never-run per-channel learnable module (empty observer buffers) -> jquant."""
    fq = SD_MODULES["LearnableFakeQuantize_per_channel"]()
    tmod = torch_fake_quant(fq)
    state = fq.load_state_dict(tmod.state_dict())
    assert state.activation_post_process.min_val.shape == (0,)
    _run(fq, tmod, state, _sd_steps(2, 4, ("enable_param_learning", "enable_static_estimate")),
         eager=eager)


def test_learnable_grads_follow_learning_enabled():
    """The documented rule: jquant's qparam grads follow learning_enabled (torch's
    requires_grad, True at construction until the first mode call)."""
    fq = SD_MODULES["LearnableFakeQuantize"]()
    tmod = torch_fake_quant(fq)
    state = _init(fq)
    x, g = _sd_steps(4, 1, (None,))[0][2:]
    assert not tmod.learning_enabled[0] and tmod.scale.requires_grad  # torch's fresh module
    _, _, tgrads = _torch_step(tmod, x, g)
    y, state, gx, gs, gz = _step(fq)(state, x, g)
    assert tgrads[0] is not None and tgrads[0].abs().sum() > 0  # torch: grads despite the flag
    assert np.all(np.asarray(gs) == 0) and np.all(np.asarray(gz) == 0)  # jquant: the flag
    # after a mode call the two agree (torch: requires_grad follows learning_enabled)
    steps = _sd_steps(5, 4, ("enable_param_learning", "enable_static_estimate",
                             "enable_param_learning", "enable_static_observation"))
    _run(fq, tmod, state, [("enable_static_estimate", False, x, g)] + steps[1:])


@pytest.mark.parametrize("name", SD_MODULES)
def test_state_dict_mismatch_raises(name):
    fq = SD_MODULES[name]()
    init = fq.init() if isinstance(fq, jq.FixedQParamsFakeQuantize) else _init(fq)
    sd = dict(fq.state_dict(init))
    for key in sd:
        bad = {k: v for k, v in sd.items() if k != key}
        with pytest.raises(StateDictError, match=key.split(".")[-1]):
            fq.load_state_dict(bad)
    with pytest.raises(StateDictError, match="unexpected"):
        fq.load_state_dict({**sd, "bogus": np.zeros(1)})
    # wrong shapes: a 2-vector flag, scale / zero point of different lengths, a 2-d min_val
    for key, value in (("fake_quant_enabled", np.ones(2, np.uint8)),
                       ("scale", np.ones(SHAPE[1] + 1, F32)),
                       ("activation_post_process.eps", np.ones(2, F32))):
        if key in sd:
            with pytest.raises(StateDictError, match=key.split(".")[-1]):
                fq.load_state_dict({**sd, key: value})
    assert issubclass(StateDictError, ValueError)


# ----------------------------------------------------------------------------------------
# Slow: the same sequences, more examples (CI's slow step)
# ----------------------------------------------------------------------------------------

#: tiny to huge magnitudes (the default tests keep to 1e-6 .. 1e6)
WIDE = (1e-30, 1e-12, 1e-6, 1.0, 1e6, 1e20, 1e30)


@pytest.mark.slow
@settings(max_examples=100)
@given(fake_quantizes(), step_sequences(n_max=7, magnitudes=WIDE))
def test_fake_quantize_sequences_more(fq, steps):
    _run(fq, torch_fake_quant(fq), _init(fq), steps)


@pytest.mark.slow
@settings(max_examples=100)
@given(learnables(), step_sequences(toggles=TOGGLES + LEARNABLE_MODES, special=False, n_max=8,
                                    magnitudes=WIDE))
def test_learnable_sequences_more(fq, steps):
    _run(fq, torch_fake_quant(fq), _init(fq), steps)


@pytest.mark.slow
@settings(max_examples=60)
@given(st.one_of(fake_quantizes(), learnables()), step_sequences(n_max=4), step_sequences(n_max=4),
       st.booleans())
def test_state_dict_round_trips_drawn_more(fq, first, then, jquant_first):
    test_state_dict_round_trips_drawn.hypothesis.inner_test(fq, first, then, jquant_first)
