"""Differential tests: ``jquant.fused_moving_avg_obs_fake_quant`` against torch 2.13's op.

Multi-step sequences with ``observer_on`` / ``fake_quant_on`` toggled at run time (traced
flags under ``jax.jit``, and static Python flags), per tensor and per row, symmetric or
affine, several averaging constants and ranges. After every step the output, the running
min/max, the stored scale / zero point and the input gradient must equal torch's in-place
results bit for bit.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import jquant as jq
from torch_oracle import arrays, assert_bitexact

F32 = np.float32
#: (averaging_const, (quant_min, quant_max), symmetric_quant): a few static configurations,
#: each compiled once (the data and the flag sequences vary freely).
CONFIGS = ((0.01, (0, 255), False), (0.01, (-128, 127), True), (0.5, (0, 127), False),
           (1.0, (-127, 127), True), (0.1, (0, 15), False), (0.01, (0, 255), True))


@functools.lru_cache(maxsize=None)
def _step_fn(c, qmin, qmax, per_row, sym, static_flags=None):
    """jit(op + vjp) for one static configuration (flags traced unless ``static_flags``)."""
    def step(x, obs, fq, rmin, rmax, scale, zp, g):
        if static_flags is not None:
            obs, fq = static_flags

        def f(v):
            return jq.fused_moving_avg_obs_fake_quant(v, obs, fq, rmin, rmax, scale, zp, c, qmin,
                                                      qmax, 0, per_row, sym)
        out, vjp = jax.vjp(f, x)
        cot = (g,) + tuple(jnp.zeros_like(o) if o.dtype != jnp.int32
                           else np.zeros(o.shape, jax.dtypes.float0) for o in out[1:])
        return out, vjp(cot)[0]
    return jax.jit(step)


class _TorchFused:
    """torch's op with its in-place buffers."""

    def __init__(self, per_row, c_rows):
        if per_row:  # the module's buffers after a state-dict load: (C,) qparams
            self.rmin, self.rmax = torch.tensor([]), torch.tensor([])
            self.scale = torch.ones(c_rows)
            self.zp = torch.zeros(c_rows, dtype=torch.int32)
        else:
            self.rmin, self.rmax = torch.tensor(np.inf), torch.tensor(-np.inf)
            self.scale, self.zp = torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32)

    def __call__(self, x, g, obs, fq, c, qmin, qmax, per_row, sym):
        tx = torch.tensor(x, requires_grad=True)
        y = torch.fused_moving_avg_obs_fake_quant(
            tx, torch.tensor([obs]), torch.tensor([fq]), self.rmin, self.rmax, self.scale,
            self.zp, c, qmin, qmax, 0, per_row, sym)
        y.backward(torch.from_numpy(g))
        return y, tx.grad


def _run_sequence(batches, grads, flags, c, qmin, qmax, per_row, sym, static=False):
    c_rows = batches[0].shape[0]
    ref = _TorchFused(per_row, c_rows)
    if per_row:
        state = (jnp.zeros((0,)), jnp.zeros((0,)), jnp.ones(c_rows), jnp.zeros(c_rows, jnp.int32))
    else:
        state = (jnp.float32(np.inf), jnp.float32(-np.inf), jnp.ones(1), jnp.zeros(1, jnp.int32))
    for i, (x, g, (obs, fq)) in enumerate(zip(batches, grads, flags)):
        try:
            ty, tgrad = ref(x, g, obs, fq, c, qmin, qmax, per_row, sym)
        except RuntimeError:
            # torch's per-channel fake quant rejects an out-of-range zero point (an inf/NaN
            # row gives INT32_MIN): a documented jquant deviation (tests/test_bad_input.py).
            assert per_row
            return i
        if static:
            fn = _step_fn(c, qmin, qmax, per_row, sym, static_flags=(bool(obs), bool(fq)))
        else:
            fn = _step_fn(c, qmin, qmax, per_row, sym)
        (y, *state), gx = fn(x, jnp.array([obs]), jnp.array([fq]), *state, g)
        where = f"step {i} (observer_on={obs}, fake_quant_on={fq})"
        assert_bitexact(y, ty, f"{where} y", ftz=True)
        assert_bitexact(state[0], ref.rmin, f"{where} running_min")
        assert_bitexact(state[1], ref.rmax, f"{where} running_max")
        assert_bitexact(state[2], ref.scale, f"{where} scale")
        assert_bitexact(state[3], ref.zp, f"{where} zero_point")
        assert_bitexact(gx, tgrad, f"{where} grad")
    return len(batches)


@st.composite
def sequences(draw, per_row):
    shape = draw(st.sampled_from(((3, 2, 2),) if per_row else ((2, 3, 2),)))
    n = draw(st.integers(2, 6))
    offset = draw(st.sampled_from([0.0, 0.0, 1.0, -3.0, 100.0]))
    batches = []
    for _ in range(n):
        x = draw(arrays(shape, special=not per_row,
                        kinds=("normal", "uniform_pos", "uniform_neg", "grid", "constant"),
                        magnitudes=(1e-6, 1e-3, 1.0, 3.0, 100.0, 1e6)))
        batches.append((x + F32(offset)).astype(F32))
    grads = [draw(arrays(shape, kinds=("normal",), magnitudes=(1.0,))) for _ in range(n)]
    flags = [(1, 1)] + [draw(st.sampled_from([(1, 1), (1, 1), (1, 0), (0, 1), (0, 0)]))
                        for _ in range(n - 1)]
    if draw(st.booleans()):  # start with fake quant off: qparams from stats observed earlier
        flags[0] = (1, 0)
    return batches, grads, flags


@settings(max_examples=50)
@given(st.sampled_from(CONFIGS), sequences(per_row=False))
def test_fused_per_tensor_sequences(config, seq):
    c, qrange, sym = config
    _run_sequence(*seq, c, *qrange, per_row=False, sym=sym)


@settings(max_examples=40)
@given(st.sampled_from(CONFIGS), sequences(per_row=True))
def test_fused_per_row_sequences(config, seq):
    c, qrange, sym = config
    done = _run_sequence(*seq, c, *qrange, per_row=True, sym=sym)
    assert done >= 1


@settings(max_examples=12)
@given(st.sampled_from(CONFIGS[:2]), st.booleans(), sequences(per_row=False))
def test_fused_static_flags(config, per_row, seq):
    """Python-bool flags take the static (untraced) paths; same numbers."""
    c, qrange, sym = config
    batches, grads, flags = seq
    if per_row:
        batches = [np.nan_to_num(b, nan=0.0, posinf=1e3, neginf=-1e3) for b in batches]
    _run_sequence(batches, grads, flags, c, *qrange, per_row=per_row, sym=sym, static=True)


def test_fused_never_observed_uses_zero_range():
    """REFERENCE 5.2: fake quant on, observer never on: min/max +-inf -> scale 0.1, zp 0."""
    x = np.array([-1.0, 0.05, 0.26, 30.0], F32)
    g = -np.ones_like(x)
    for qmin, qmax in ((0, 255), (-128, 127)):
        _run_sequence([x, x], [g, g], [(0, 1), (0, 1)], 0.01, qmin, qmax, per_row=False, sym=False)


def test_fused_nan_and_inf_batches_per_tensor():
    """NaN gives NaN stats, NaN scale and zero point INT32_MIN; an inf batch then NaN."""
    seqs = [[[np.nan, 1.0]], [[np.inf, 1.0], [-1.0, 2.0]], [[-np.inf, 1.0], [0.5, 0.5]],
            [[1.0, -300.0], [np.nan, 1.0], [1.0, 2.0]]]
    for seq in seqs:
        batches = [np.array(b * 3, F32) for b in seq]
        grads = [np.linspace(-1, 1, len(b)).astype(F32) for b in batches]
        for sym in (False, True):
            _run_sequence(batches, grads, [(1, 1)] * len(batches), 0.01, 0, 255, False, sym)


def test_fused_empty_input_is_a_no_op():
    rmin, rmax, s, z = torch.tensor(-1.0), torch.tensor(2.0), torch.tensor([0.5]), torch.tensor([3], dtype=torch.int32)
    ty = torch.fused_moving_avg_obs_fake_quant(torch.zeros(0), torch.tensor([1]), torch.tensor([1]),
                                               rmin, rmax, s, z, 0.01, 0, 255, 0, False, False)
    y, *st = jq.fused_moving_avg_obs_fake_quant(jnp.zeros(0), jnp.array([1]), jnp.array([1]),
                                                jnp.float32(-1.0), jnp.float32(2.0), jnp.array([0.5]),
                                                jnp.array([3], jnp.int32), 0.01, 0, 255, 0)
    assert y.shape == ty.shape == (0,)
    for a, b in zip(st, (rmin, rmax, s, z)):
        assert_bitexact(a, b, "state")


def test_fused_per_row_requires_axis_0_like_torch():
    x = torch.zeros(2, 3)
    with pytest.raises(RuntimeError):
        torch.fused_moving_avg_obs_fake_quant(x, torch.tensor([1]), torch.tensor([1]), torch.tensor([]),
                                              torch.tensor([]), torch.ones(3), torch.zeros(3, dtype=torch.int32),
                                              0.01, 0, 255, 1, True, False)
    with pytest.raises(ValueError, match="ch_axis"):
        jq.fused_moving_avg_obs_fake_quant(jnp.zeros((2, 3)), 1, 1, jnp.zeros(0), jnp.zeros(0),
                                           jnp.ones(3), jnp.zeros(3, jnp.int32), 0.01, 0, 255, 1, True)
