"""Core suite: fused observe+fake-quant, FakeQuantize, MinMaxObserver (issue [1])."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jquant as jq
from jquant._bench import Context, Row, copy_time, timeit


def size_label(n: int) -> str:
    """1000000 -> '1e6', 16000000 -> '1.6e7'."""
    exp = len(str(int(n))) - 1
    mant = n / 10 ** exp
    return f"{mant:g}e{exp}"


def run(ctx: Context) -> list[Row]:
    rows = []
    torch = ctx.torch
    for n in ctx.sizes:
        label = size_label(n)
        x_np = np.random.default_rng(0).standard_normal(n).astype(np.float32)
        x = jnp.asarray(x_np)
        copy_ms = copy_time(n, ctx)
        xt = torch.from_numpy(x_np.copy()) if torch else None

        # fused observe + fake quant (per-tensor, observer and fake quant on, traced flags)
        on = jnp.ones((1,), jnp.int32)
        state = (jnp.array(jnp.inf), jnp.array(-jnp.inf), jnp.ones((1,), jnp.float32),
                 jnp.zeros((1,), jnp.int32))

        def fused(a, flag, *s):
            return jq.fused_moving_avg_obs_fake_quant(a, flag, flag, *s, 0.01, 0, 255, -1)

        fused_fwd = jax.jit(fused)
        fused_fb = jax.jit(lambda a, flag, *s: jax.vjp(lambda b: fused(b, flag, *s)[0], a)[1](a)[0])
        t_fwd = timeit(lambda: fused_fwd(x, on, *state), ctx)
        t_fb = timeit(lambda: fused_fb(x, on, *state), ctx)
        tt_fwd = tt_fb = None
        if torch:
            ton = torch.tensor([1])
            tst = [torch.tensor(float("inf")), torch.tensor(float("-inf")), torch.ones(1),
                   torch.zeros(1, dtype=torch.int32)]
            with torch.no_grad():
                tt_fwd = timeit(lambda: torch.fused_moving_avg_obs_fake_quant(
                    xt, ton, ton, *tst, 0.01, 0, 255, -1, False, False), ctx)
            xg = xt.clone().requires_grad_(True)

            def torch_fb():
                y = torch.fused_moving_avg_obs_fake_quant(xg, ton, ton, *tst, 0.01, 0, 255, -1,
                                                          False, False)
                y.backward(xt)
                return None

            tt_fb = timeit(torch_fb, ctx)
        rows.append(Row("fused obs+fq fwd", label, t_fwd, tt_fwd, copy_ms))
        rows.append(Row("fused obs+fq fwd+bwd", label, t_fb, tt_fb, copy_ms))

        # FakeQuantize (MovingAverageMinMaxObserver) fwd + bwd
        fq = jq.FakeQuantize()
        fq_state = fq.init(x)
        fq_fb = jax.jit(lambda s, a: jax.vjp(lambda b: fq.apply(s, b)[0], a)[1](a)[0])
        t = timeit(lambda: fq_fb(fq_state, x), ctx)
        tt = None
        if torch:
            import torch.ao.quantization as tq
            tfq = tq.FakeQuantize()
            xg2 = xt.clone().requires_grad_(True)

            def torch_fq_fb():
                y = tfq(xg2)
                y.backward(xt)
                return None

            tt = timeit(torch_fq_fb, ctx)
        rows.append(Row("FakeQuantize fwd+bwd", label, t, tt, copy_ms))

        # MinMaxObserver update
        obs = jq.MinMaxObserver()
        ostate = obs.init()
        upd = jax.jit(obs.update)
        t = timeit(lambda: upd(ostate, x), ctx)
        tt = None
        if torch:
            import torch.ao.quantization as tq
            tobs = tq.MinMaxObserver()
            tt = timeit(lambda: tobs(xt), ctx)
        rows.append(Row("MinMaxObserver update", label, t, tt, copy_ms))
    return rows
