"""Differential tests of the histogram observers against torch 2.13 (the oracle).

Histogram, min_val and max_val after every batch and the final qparams over random
multi-batch sequences, the seed's against-reference test, torch's summation and linspace
orders, and the exactness statistics of the search (how often a float32 near-tie could
flip a choice: counted over many sequences; expected and observed: never).
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jquant as jq
from jquant import histogram as H

torch = pytest.importorskip("torch")
from torch.ao.quantization import HistogramObserver as TorchHistogramObserver  # noqa: E402

_DT = {"qint8": (jq.qint8, torch.qint8), "quint8": (jq.quint8, torch.quint8)}
_QS = {"affine": (jq.per_tensor_affine, torch.per_tensor_affine),
       "symmetric": (jq.per_tensor_symmetric, torch.per_tensor_symmetric)}


def make_pair(bins, dtype="quint8", qscheme="affine", reduce_range=False):
    obs = jq.HistogramObserver(bins=bins, dtype=_DT[dtype][0], qscheme=_QS[qscheme][0],
                               reduce_range=reduce_range)
    tobs = TorchHistogramObserver(bins=bins, dtype=_DT[dtype][1], qscheme=_QS[qscheme][1],
                                  reduce_range=reduce_range)
    return obs, tobs


def torch_step(tobs, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tobs(torch.from_numpy(np.array(x, np.float32)))
        except RuntimeError:   # NaN batch (histc raises); jquant keeps torch's post-raise state
            pass


def torch_qparams(tobs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s, z = tobs.calculate_qparams()
    return np.float32(s.reshape(-1)[0].item()), int(z.reshape(-1)[0].item())


def same_bits(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.tobytes() == b.tobytes() or (np.all(np.isnan(a)) and np.all(np.isnan(b)))


def check_state(state, tobs, where=""):
    np.testing.assert_array_equal(np.asarray(state.histogram), tobs.histogram.numpy(),
                                  err_msg=f"histogram {where}")
    assert same_bits(state.min_val, tobs.min_val.numpy()), f"min_val {where}"
    assert same_bits(state.max_val, tobs.max_val.numpy()), f"max_val {where}"


# ----------------------------------------------------------------------------------------
# torch's orders of summation and linspace (the building blocks)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3, 5, 7, 8, 9, 31, 33, 100, 255, 256, 513, 2047, 2048,
                               2049, 4100, 32768])
def test_cascade_sum_is_torch_sum(n):
    rng = np.random.default_rng(n)
    f = jax.jit(H._torch_sum)
    xs = [(rng.standard_normal(n) * rng.random(n) ** 8 * 10.0 ** rng.integers(-3, 7))
          .astype(np.float32) for _ in range(6)]
    xs.append((rng.random(n) * 1e4).astype(np.float32).round())    # histogram-like
    batch = np.stack(xs)
    np.testing.assert_array_equal(np.asarray(f(jnp.asarray(batch))),
                                  torch.from_numpy(batch).sum(1).numpy())


def test_cumsum_is_torch_cumsum():
    rng = np.random.default_rng(0)
    x = (rng.random((4, 2048)) ** 4 * 1e5).astype(np.float32)
    x[0, 0] = 1e8                                  # later additions round away
    np.testing.assert_array_equal(np.asarray(jax.jit(H._seq_cumsum)(jnp.asarray(x))),
                                  torch.cumsum(torch.from_numpy(x), 1).numpy())


@pytest.mark.parametrize("n", [4, 2049, 32769])
def test_linspace_is_torch_linspace(n):
    rng = np.random.default_rng(n)
    f = jax.jit(lambda a, b: H._linspace(a, b, n, jnp.arange(n)))
    for _ in range(25):
        a = np.float32(rng.standard_normal() * 10.0 ** rng.uniform(-3, 4))
        b = np.float32(a + abs(rng.standard_normal()) * 10.0 ** rng.uniform(-7, 4))
        if not b > a:
            continue
        np.testing.assert_array_equal(np.asarray(f(a, b)),
                                      torch.linspace(float(a), float(b), n).numpy())


def test_exact_division_and_isolated_products():
    """Guards against XLA rewrites: x / scalar -> x * (1/scalar), a*b + c -> fma."""
    rng = np.random.default_rng(1)
    a = (rng.standard_normal(20000) * 1e3).astype(np.float32)
    b = (rng.standard_normal(20000)).astype(np.float32)
    c = (rng.standard_normal(20000)).astype(np.float32)
    d = np.float32(3.0000002)
    np.testing.assert_array_equal(np.asarray(jax.jit(H._div)(a, d)), a / d)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: H._div(a, np.float32(3)))(a)),
                                  a / np.float32(3))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a, b, c: H._mul(a, b) + c)(a, b, c)),
                                  a * b + c)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a, b, c: c - H._mul(a, b[0]))(a, b, c)),
                                  c - a * b[0])
    f = jax.jit(H._floor_divide)
    for scale, div in [(1e3, d), (1e9, np.float32(3.7e-6)), (1.0, np.float32(7e-3))]:
        x = (rng.standard_normal(20000) * scale).astype(np.float32)
        q = np.asarray(f(x, div))
        want = torch.div(torch.from_numpy(x), float(div), rounding_mode="floor").numpy()
        assert q.tobytes() == want.tobytes()                     # signs of zero included


# ----------------------------------------------------------------------------------------
# torch's test_histogram_observer_against_reference
# ----------------------------------------------------------------------------------------

@settings(max_examples=10)
@given(N=st.sampled_from([10, 1000]), bins=st.sampled_from([256, 512, 1024, 2048]),
       dtype=st.sampled_from(["qint8", "quint8"]), qscheme=st.sampled_from(["affine", "symmetric"]),
       reduce_range=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_histogram_observer_against_reference(N, bins, dtype, qscheme, reduce_range, seed):
    obs, tobs = make_pair(bins, dtype, qscheme, reduce_range)
    rng = np.random.default_rng(seed)
    state = obs.init()
    for i in range(10):
        x = rng.standard_normal(N).astype(np.float32)
        state = obs.update(state, x)
        torch_step(tobs, x)
        check_state(state, tobs, f"batch {i}")
    for i in range(0, bins, 200):
        for j in range(i + 5, bins, 200):
            got = float(obs._compute_quantization_error(state, i, j))
            assert np.float32(got) == np.float32(tobs._compute_quantization_error(i, j)), (i, j)
    s, z = obs.calculate_qparams(state)
    assert (np.float32(s[0]), int(z[0])) == torch_qparams(tobs)


# ----------------------------------------------------------------------------------------
# Random multi-batch sequences (growth, shrinking, constants, infs, NaN, outliers, tiny)
# ----------------------------------------------------------------------------------------

def make_batch(rng, kind, n):
    scale = 10.0 ** rng.uniform(-3, 3)
    if kind == "normal":
        x = rng.standard_normal(n) * scale + rng.standard_normal() * scale
    elif kind == "uniform":
        x = rng.uniform(-1.0, 3.0, n) * scale
    elif kind == "relu":
        x = np.maximum(rng.standard_normal(n), 0) * scale
    elif kind == "exponential":
        x = rng.exponential(1.0, n) * scale * rng.choice([-1.0, 1.0])
    elif kind == "outlier":
        x = rng.standard_normal(n) * scale
        x[rng.integers(n)] = scale * 10.0 ** rng.uniform(1, 4) * rng.choice([-1.0, 1.0])
    elif kind == "constant":
        x = np.full(n, np.float32(rng.standard_normal() * scale))
    elif kind == "integers":
        x = rng.integers(-3, 4, n).astype(np.float64)
    elif kind == "inf":
        x = rng.standard_normal(n) * scale
        x[rng.random(n) < 0.3] = np.inf
        x[0] = -np.inf
    elif kind == "nan":
        x = rng.standard_normal(n) * scale
        x[rng.integers(n)] = np.nan
    elif kind == "tiny":
        x = rng.standard_normal(n) * 1e-39
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


_KINDS = ["normal", "uniform", "relu", "exponential", "outlier", "constant", "integers", "inf",
          "nan", "tiny"]


def run_sequence(obs, tobs, rng, kinds, n):
    state = obs.init()
    for i, kind in enumerate(kinds):
        x = make_batch(rng, kind, n)
        state = obs.update(state, x)
        torch_step(tobs, x)
        check_state(state, tobs, f"batch {i} ({kind})")
    return state


@settings(max_examples=24)
@given(bins=st.sampled_from([3, 256, 2048]), n=st.sampled_from([1, 64]),
       kinds=st.lists(st.sampled_from(_KINDS), min_size=1, max_size=8),
       dtype=st.sampled_from(["qint8", "quint8"]), qscheme=st.sampled_from(["affine", "symmetric"]),
       reduce_range=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_random_sequences_match_torch_after_every_batch(bins, n, kinds, dtype, qscheme,
                                                        reduce_range, seed):
    obs, tobs = make_pair(bins, dtype, qscheme, reduce_range)
    state = run_sequence(obs, tobs, np.random.default_rng(seed), kinds, n)
    s, z = obs.calculate_qparams(state)
    ts, tz = torch_qparams(tobs)
    assert same_bits(s[0], ts) and int(z[0]) == tz


@pytest.mark.parametrize("bins,n", [(3, 1), (3, 64), (256, 1), (256, 64)])
def test_denormal_sequences_match_torch_gradual_underflow(bins, n):
    """Ranges of denormals: the upscale's bin width, half-width and linspace steps round
    as torch's float32 does below 2**-126 (XLA flushes them; jquant emulates it)."""
    obs, _ = make_pair(bins, "qint8")
    upd = jax.jit(obs.update)
    for seed in range(12):
        rng = np.random.default_rng(seed)
        _, tobs = make_pair(bins, "qint8")
        state = obs.init()
        kinds = ["tiny"] * 6 if seed % 3 else ["tiny", "normal", "tiny", "tiny"]
        for i, kind in enumerate(kinds):
            x = make_batch(rng, kind, n)
            state = upd(state, x)
            torch_step(tobs, x)
            check_state(state, tobs, f"seed {seed} batch {i} ({kind})")


@pytest.mark.parametrize("dtype,qscheme,rate", [
    ("qint32", "affine", 16), ("quint4x2", "affine", 1), ("qint8", "symmetric", 3),
    pytest.param("qint32", "symmetric", 100, marks=pytest.mark.slow)])
def test_other_dtypes_and_upsample_rates_match_torch(dtype, qscheme, rate):
    """dst_nbins 2**32 (qint32) and 256 (quint4x2); upsample_rate set as torch's attribute."""
    jdt = {"qint32": jq.qint32, "quint4x2": jq.quint4x2, "quint8": jq.quint8, "qint8": jq.qint8}
    tdt = {"qint32": torch.qint32, "quint4x2": torch.quint4x2, "quint8": torch.quint8,
           "qint8": torch.qint8}
    obs = jq.HistogramObserver(bins=256, dtype=jdt[dtype], qscheme=_QS[qscheme][0],
                               upsample_rate=rate)
    tobs = TorchHistogramObserver(bins=256, dtype=tdt[dtype], qscheme=_QS[qscheme][1])
    tobs.upsample_rate = rate
    rng = np.random.default_rng(rate)
    state = obs.init()
    for i, kind in enumerate(["relu", "normal", "outlier", "exponential", "normal"]):
        x = make_batch(rng, kind, 200)
        state = obs.update(state, x)
        torch_step(tobs, x)
        check_state(state, tobs, f"batch {i}")
    for i, j in [(0, 255), (10, 200), (100, 101), (37, 250)]:
        assert (np.float32(obs._compute_quantization_error(state, i, j))
                == np.float32(tobs._compute_quantization_error(i, j))), (i, j)
    s, z = obs.calculate_qparams(state)
    assert (np.float32(s[0]), int(z[0])) == torch_qparams(tobs)


def test_jitted_update_matches_torch():
    obs, tobs = make_pair(256)
    upd = jax.jit(obs.update)
    rng = np.random.default_rng(11)
    state = obs.init()
    for i, kind in enumerate(["relu", "normal", "outlier", "normal", "inf", "uniform"]):
        x = make_batch(rng, kind, 300)
        state = upd(state, x)
        torch_step(tobs, x)
        check_state(state, tobs, f"batch {i}")
    s, z = jax.jit(obs.calculate_qparams)(state)
    assert (np.float32(s[0]), int(z[0])) == torch_qparams(tobs)


def test_per_channel_matches_torch_per_channel_slices():
    """Channel c of PerChannelHistogramObserver == torch's HistogramObserver fed channel c."""
    pc = jq.PerChannelHistogramObserver(ch_axis=1, bins=256, dtype=jq.qint8,
                                        qscheme=jq.per_channel_symmetric)
    rng = np.random.default_rng(12)
    xs = [make_batch(rng, k, 60).reshape(4, 3, 5) for k in ("normal", "outlier", "inf", "relu")]
    state = pc.init(xs[0])
    for x in xs:
        state = pc.update(state, x)
    scale, zp = pc.calculate_qparams(state)
    for c in range(3):
        tobs = TorchHistogramObserver(bins=256, dtype=torch.qint8,
                                      qscheme=torch.per_tensor_symmetric)
        for x in xs:
            torch_step(tobs, x[:, c, :])
        np.testing.assert_array_equal(np.asarray(state.histogram[c]), tobs.histogram.numpy())
        assert (np.float32(scale[c]), int(zp[c])) == torch_qparams(tobs)


# ----------------------------------------------------------------------------------------
# Exactness statistics of the search
# ----------------------------------------------------------------------------------------

def _search_statistics(num_sequences, seed):
    """Runs random sequences; returns (sequences, qparams mismatches, worst relative
    difference of the L2 error between jquant's and torch's chosen ranges)."""
    rng = np.random.default_rng(seed)
    observers = {b: make_pair(b) for b in (256, 2048)}
    mismatches, worst = 0, 0.0
    for _ in range(num_sequences):
        bins = int(rng.choice([256, 2048]))
        obs, _ = observers[bins]
        tobs = TorchHistogramObserver(bins=bins)
        kinds = list(rng.choice(["normal", "relu", "outlier", "uniform", "exponential"],
                                size=int(rng.integers(1, 9))))
        state = run_sequence(obs, tobs, rng, kinds, 256)
        s, z = obs.calculate_qparams(state)
        if (np.float32(s[0]), int(z[0])) != torch_qparams(tobs):
            mismatches += 1
            # compare the L2 error (torch's own function) of the two chosen ranges
            bw = (tobs.max_val.item() - tobs.min_val.item()) / bins
            new_min, new_max = obs._non_linear_param_search(state)
            ours = (int(round((float(new_min) - tobs.min_val.item()) / bw)),
                    int(round((float(new_max) - tobs.min_val.item()) / bw)) - 1)
            tmin, tmax = tobs._non_linear_param_search()
            theirs = (int(round((tmin.item() - tobs.min_val.item()) / bw)),
                      int(round((tmax.item() - tobs.min_val.item()) / bw)) - 1)
            e_ours = tobs._compute_quantization_error(*ours)
            e_theirs = tobs._compute_quantization_error(*theirs)
            worst = max(worst, abs(e_ours - e_theirs) / max(abs(e_theirs), 1e-30))
    return num_sequences, mismatches, worst


def test_search_exactness_statistics(capsys):
    n, mismatches, worst = _search_statistics(20, seed=2024)
    with capsys.disabled():
        print(f"\n[histogram search] {n} random sequences: {mismatches} qparams differ from "
              f"torch; worst relative L2-error difference {worst:.2e}")
    assert mismatches == 0


@pytest.mark.slow
def test_search_exactness_statistics_many(capsys):
    n, mismatches, worst = _search_statistics(400, seed=7)
    with capsys.disabled():
        print(f"\n[histogram search] {n} random sequences: {mismatches} qparams differ from "
              f"torch; worst relative L2-error difference {worst:.2e}")
    assert worst <= 1e-6
    assert mismatches <= n // 100
