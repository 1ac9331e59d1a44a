"""Histogram suite (issue [2]): HistogramObserver update and calculate_qparams vs torch.

Rows, per size in ``ctx.sizes``:

* ``Histogram update (same range)``: the state was built from the same tensor, so the
  batch is binned into an unchanged range (torch: ``forward`` on an observer in that state).
* ``Histogram update (range growth)``: the state was built from ``0.5 * x``; ``x`` widens
  the range, so the old histogram is upscaled and rebinned (torch: the observer's state
  is restored from a state dict before each call; the restore costs ~0.05 ms).

and ``Histogram calculate_qparams`` (2048 bins, after 8 batches of randn): the L2 search.
jquant runs ``jax.jit``-compiled functions of the pure observer.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jquant as jq
from jquant._bench import Context, Row, copy_time, timeit
from jquant._bench.core import size_label


def run(ctx: Context) -> list[Row]:
    torch = ctx.torch
    rows = []
    obs = jq.HistogramObserver()
    upd = jax.jit(obs.update)
    cq = jax.jit(obs.calculate_qparams)
    for n in ctx.sizes:
        label = size_label(n)
        x_np = np.random.default_rng(0).standard_normal(n).astype(np.float32)
        x = jnp.asarray(x_np)
        copy_ms = copy_time(n, ctx)
        same_state = upd(obs.init(), x)
        grow_state = upd(obs.init(), 0.5 * x)
        t_same = timeit(lambda: upd(same_state, x), ctx)
        t_grow = timeit(lambda: upd(grow_state, x), ctx)
        tt_same = tt_grow = None
        if torch:
            from torch.ao.quantization import HistogramObserver as THO
            xt = torch.from_numpy(x_np.copy())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tsame = THO()
                tsame(xt)
                tt_same = timeit(lambda: tsame(xt), ctx)
                tgrow = THO()
                tgrow(0.5 * xt)
                sd0 = {k: v.clone() for k, v in tgrow.state_dict().items()}

                def torch_grow():
                    tgrow.load_state_dict(sd0)
                    tgrow(xt)

                tt_grow = timeit(torch_grow, ctx)
        rows.append(Row("Histogram update (same range)", label, t_same, tt_same, copy_ms,
                        note="state from the same tensor; torch forward"))
        rows.append(Row("Histogram update (range growth)", label, t_grow, tt_grow, copy_ms,
                        note="state from 0.5*x: upscale+rebin; torch incl. state restore"))

    # calculate_qparams after 8 batches of randn
    n = ctx.sizes[0]
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal(n).astype(np.float32) for _ in range(8)]
    state = obs.init()
    for b in batches:
        state = upd(state, jnp.asarray(b))
    t_q = timeit(lambda: cq(state), ctx)
    tt_q = None
    if torch:
        from torch.ao.quantization import HistogramObserver as THO
        tobs = THO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for b in batches:
                tobs(torch.from_numpy(b))
            tt_q = timeit(lambda: tobs.calculate_qparams(), ctx)
        assert np.float32(tobs.calculate_qparams()[0].item()) == np.float32(cq(state)[0][0])
    rows.append(Row("Histogram calculate_qparams", "2048 bins", t_q, tt_q, None,
                    note=f"after 8x randn({size_label(n)}); same qparams as torch"))
    return rows
