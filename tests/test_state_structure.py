"""State structure: what torch's "buffers are modified in place" tests protect, in JAX terms.

torch's ``test_observers_preserve_buffers`` / ``test_fake_quant_preserves_buffers`` check that
observers and fake quants only modify their buffers in place (``nn.DataParallel`` relies on
it). A jquant state is an immutable pytree; the counterpart property is that ``update`` /
``apply`` (and flag flips) never change the state's treedef, leaf shapes or dtypes, so a
state can be the carry of ``lax.scan`` / ``fori_loop``, a jitted step never retraces, and
replicated / sharded states keep their layout. States made by ``init(x)`` have this property
from the first call (``RecordingObserver.init()`` without ``x`` and a per-channel state loaded
from an empty torch buffer are sized by their first update, outside a carried loop).
HistogramObserver is covered by the histogram tests.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant as jq

RNG = np.random.default_rng(3)
BATCHES = jnp.asarray(RNG.random((5, 4, 4, 4), dtype=np.float32) * 4.0 - 1.0)

# torch's seed list (dtype=qint8 via with_args), HistogramObserver excepted.
OBSERVERS = {
    "MinMaxObserver": jq.MinMaxObserver.with_args(dtype=jq.qint8),
    "MovingAverageMinMaxObserver": jq.MovingAverageMinMaxObserver.with_args(dtype=jq.qint8),
    "PerChannelMinMaxObserver": jq.PerChannelMinMaxObserver.with_args(dtype=jq.qint8),
    "MovingAveragePerChannelMinMaxObserver":
        jq.MovingAveragePerChannelMinMaxObserver.with_args(dtype=jq.qint8),
    "RecordingObserver": jq.RecordingObserver.with_args(dtype=jq.qint8, capacity=3),
    "PlaceholderObserver": jq.PlaceholderObserver.with_args(dtype=jnp.float16),
    "NoopObserver": jq.NoopObserver,
    "FixedQParamsObserver": jq.default_fixed_qparams_range_0to1_observer,
    "PerChannelMinMaxObserver_ch2_float_qparams": jq.PerChannelMinMaxObserver.with_args(
        ch_axis=2, qscheme=jq.per_channel_affine_float_qparams),
}
FAKE_QUANTS = {
    "FakeQuantize": jq.FakeQuantize,
    "default_fake_quant": jq.default_fake_quant,
    "default_weight_fake_quant": jq.default_weight_fake_quant,
    "default_per_channel_weight_fake_quant": jq.default_per_channel_weight_fake_quant,
    "default_embedding_fake_quant_4bit": jq.default_embedding_fake_quant_4bit,
    "default_fused_act_fake_quant": jq.default_fused_act_fake_quant,
    "default_fused_per_channel_wt_fake_quant": jq.default_fused_per_channel_wt_fake_quant,
    "default_fixed_qparams_range_neg1to1_fake_quant":
        jq.default_fixed_qparams_range_neg1to1_fake_quant,
    "LearnableFakeQuantize": jq.LearnableFakeQuantize.with_args(
        observer=jq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255),
    "LearnableFakeQuantize_per_channel": jq.LearnableFakeQuantize.with_args(
        observer=jq.MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
        dtype=jq.qint8, qscheme=jq.per_channel_symmetric),
}


def structure(tree):
    """(treedef, [(shape, dtype), ...]) of a pytree; leaves must all be arrays."""
    leaves, treedef = jax.tree.flatten(tree)
    for leaf in leaves:
        assert isinstance(leaf, jax.Array), type(leaf)  # no Python scalars in a state
    return treedef, [(leaf.shape, leaf.dtype) for leaf in leaves]


def _sd_layout(obj, state):
    return {k: (np.shape(v), np.asarray(v).dtype) for k, v in obj.state_dict(state).items()}


def _flip_flags(fq, state):
    """Every flag toggle of torch's test (module functions and methods), in turn."""
    out = [jq.enable_fake_quant(state), jq.disable_fake_quant(state),
           jq.enable_observer(state), jq.disable_observer(state),
           fq.disable_fake_quant(state), fq.enable_observer(state, False)]
    if isinstance(fq, jq.LearnableFakeQuantize):
        out += [fq.enable_param_learning(state), fq.enable_static_estimate(state),
                fq.enable_static_observation(state)]
    return out


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_observers_preserve_buffers(name):
    """Five updates (eager and jitted) keep treedef, shapes, dtypes and state_dict layout.

    (The state dict of a never-observed per-channel state has torch's empty buffers, so
    its layout is taken after the first update.)"""
    obs = OBSERVERS[name]()
    state0 = obs.init(BATCHES[0])
    ref, sd_ref = structure(state0), _sd_layout(obs, obs.update(state0, BATCHES[0]))
    update = jax.jit(obs.update)
    eager = jitted = state0
    for x in BATCHES:
        eager, jitted = obs.update(eager, x), update(jitted, x)
        assert structure(eager) == ref
        assert structure(jitted) == ref
        assert _sd_layout(obs, jitted) == sd_ref
    jax.tree.map(np.testing.assert_array_equal, eager, jitted)
    if name in ("PlaceholderObserver", "NoopObserver", "FixedQParamsObserver"):
        jax.tree.map(np.testing.assert_array_equal, jitted, state0)  # identity observers
    if name.startswith(("MinMax", "MovingAverage", "PerChannel")):
        s0, z0 = obs.calculate_qparams(state0)
        s1, z1 = obs.calculate_qparams(jitted)
        assert (s0.shape, s0.dtype, z0.shape, z0.dtype) == (s1.shape, s1.dtype, z1.shape, z1.dtype)


@pytest.mark.parametrize("name", sorted(FAKE_QUANTS))
def test_fake_quant_preserves_buffers(name):
    fq = FAKE_QUANTS[name]()
    state0 = fq.init(BATCHES[0])
    apply = jax.jit(fq.apply)
    ref, sd_ref = structure(state0), _sd_layout(fq, apply(state0, BATCHES[0])[1])
    state = state0
    for x in BATCHES:
        y, state = apply(state, x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert structure(state) == ref
    for flipped in _flip_flags(fq, state):
        assert structure(flipped) == ref
        assert _sd_layout(fq, flipped) == sd_ref
        _, after = apply(flipped, BATCHES[0])
        assert structure(after) == ref


@pytest.mark.parametrize("name", ["FakeQuantize", "default_fused_per_channel_wt_fake_quant",
                                  "LearnableFakeQuantize"])
def test_flag_flips_do_not_retrace(name):
    fq = FAKE_QUANTS[name]()
    traces = []

    def step(state, x):
        traces.append(1)
        return fq.apply(state, x)

    step = jax.jit(step)
    state = fq.init(BATCHES[0])
    _, state = step(state, BATCHES[0])
    for flipped in _flip_flags(fq, state):
        step(flipped, BATCHES[1])
    assert len(traces) == 1


def _scan_vs_loop(update, state0, xs):
    """Runs update over xs with lax.scan, fori_loop and a Python loop; returns the three."""
    def body(carry, x):
        out = update(carry, x)
        if isinstance(out, tuple) and len(out) == 2 and not hasattr(out, "_fields"):
            y, carry = out
            return carry, y
        return out, None

    scanned, ys = jax.jit(lambda s, xs: jax.lax.scan(body, s, xs))(state0, xs)
    fori = jax.jit(lambda s, xs: jax.lax.fori_loop(
        0, xs.shape[0], lambda i, c: body(c, xs[i])[0], s))(state0, xs)
    step = jax.jit(update)
    state, outs = state0, []
    for x in xs:
        out = step(state, x)
        if isinstance(out, tuple) and len(out) == 2 and not hasattr(out, "_fields"):
            outs.append(out[0])
            state = out[1]
        else:
            state = out
    return scanned, fori, state, ys, outs


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_observer_state_carried_through_scan_and_fori_loop(name):
    obs = OBSERVERS[name]()
    state0 = obs.init(BATCHES[0])
    scanned, fori, looped, _, _ = _scan_vs_loop(obs.update, state0, BATCHES)
    jax.tree.map(np.testing.assert_array_equal, scanned, looped)
    jax.tree.map(np.testing.assert_array_equal, fori, looped)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=() if n in {"FakeQuantize", "default_per_channel_weight_fake_quant",
                                      "default_fused_per_channel_wt_fake_quant",
                                      "default_fixed_qparams_range_neg1to1_fake_quant",
                                      "LearnableFakeQuantize"} else pytest.mark.slow)
    for n in sorted(FAKE_QUANTS)])
def test_fake_quant_state_carried_through_scan_and_fori_loop(name):
    fq = FAKE_QUANTS[name]()
    state0 = fq.init(BATCHES[0])

    def update(state, x):
        y, state = fq.apply(state, x)
        return y, state

    scanned, fori, looped, ys, outs = _scan_vs_loop(update, state0, BATCHES)
    jax.tree.map(np.testing.assert_array_equal, scanned, looped)
    jax.tree.map(np.testing.assert_array_equal, fori, looped)
    np.testing.assert_array_equal(ys, np.stack(outs))
    frozen = jq.disable_observer(looped)
    scanned2, _, looped2, _, _ = _scan_vs_loop(update, frozen, BATCHES[:2])
    jax.tree.map(np.testing.assert_array_equal, scanned2, looped2)
    if not isinstance(fq, jq.FixedQParamsFakeQuantize):  # frozen: qparams kept
        np.testing.assert_array_equal(scanned2.scale, frozen.scale)


@pytest.mark.parametrize("name", ["MinMaxObserver", "MovingAverageMinMaxObserver",
                                  "PerChannelMinMaxObserver",
                                  "MovingAveragePerChannelMinMaxObserver"])
def test_observer_vmap_over_independent_states(name):
    """vmap over a stack of states and batches == each one alone (jitted)."""
    obs = OBSERVERS[name]()
    states = jax.tree.map(lambda a: jnp.stack([a] * 3), obs.init(BATCHES[0]))
    xs = BATCHES[:3]
    upd = jax.jit(obs.update)
    first = jax.vmap(obs.update)(states, xs)
    second = jax.jit(jax.vmap(obs.update))(first, xs[::-1] * 2.0)
    for i in range(3):
        one = jax.tree.map(lambda a: a[i], states)
        one = upd(upd(one, xs[i]), xs[::-1][i] * 2.0)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda a: a[i], second), one)
    qp = jax.vmap(obs.calculate_qparams)(second)
    assert qp[0].shape[0] == 3


@pytest.mark.parametrize("make", [jq.FakeQuantize, jq.FusedMovingAvgObsFakeQuantize],
                         ids=["FakeQuantize", "Fused"])
@pytest.mark.parametrize("n", [24, 1 << 15], ids=["small", "isolated"])
def test_fake_quantize_vmap_over_states_with_different_flags(make, n):
    """vmap over states whose fake_quant_enabled differ (a batched run-time flag): output,
    input gradient and state equal each one alone (jitted), for small inputs and inputs
    large enough for the isolated fake-quant computation."""
    fq = make()
    rng = np.random.default_rng(3)
    xs = jnp.asarray((rng.normal(size=(3, n)) * 4.0).astype(np.float32))
    gs = jnp.asarray(rng.normal(size=(3, n)).astype(np.float32))
    s0 = fq.init(xs[0])
    s0 = fq.apply(s0, xs[0] * 0.25)[1]                    # a range that clips the batches
    states = [s0, fq.disable_fake_quant(s0), fq.disable_observer(s0)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)

    def run(s, x, g):
        y, vjp, new = jax.vjp(lambda v: fq.apply(s, v), x, has_aux=True)
        return y, vjp(g)[0], new
    ys, dxs, news = jax.jit(jax.vmap(run))(stacked, xs, gs)
    one = jax.jit(run)
    for i in range(3):
        y, dx, new = one(states[i], xs[i], gs[i])
        np.testing.assert_array_equal(ys[i], y)
        np.testing.assert_array_equal(np.signbit(dxs[i]), np.signbit(dx))
        np.testing.assert_array_equal(dxs[i], dx)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda a: a[i], news), new)
    assert not np.array_equal(ys[0], xs[0]) and np.array_equal(ys[1], xs[1])
    np.testing.assert_array_equal(dxs[1], gs[1])          # fake quant off: the identity
    assert (dxs[0] == 0).any() and (dxs[0] != 0).any()    # on: clipped entries masked
