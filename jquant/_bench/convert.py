"""Convert suite: converted (integer) vs float inference of Dense / Conv on CPU (issue [4]).

For each layer and size, four timings (median of jitted calls):

* jquant float: the float layer (``x @ w + b`` / ``lax.conv_general_dilated`` NHWC);
* jquant int8: :func:`jquant.quantized.quantized_linear` / ``quantized_conv`` on a uint8
  :class:`~jquant.quantized.QTensor` (int8 x int8 -> int32 accumulation, fbgemm
  requantization), i.e. what a converted module runs;
* torch float and torch quantized (``nnq.Linear`` / ``nnq.Conv2d`` on a quint8 tensor,
  x86 engine, one intra-op thread — see :data:`TORCH_THREADS`) for context.

Rows: ``jquant ms`` is jquant's time, ``torch ms`` torch's for the same op; the note gives
int8/float time ratios for jquant and torch and the weight bytes (float32 vs the packed
int8 parameters). Nothing here gates on the numbers (XLA's CPU int8 kernels may be slower
than float; the table shows what this machine does).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jquant as jq
from jquant import quantized as Q
from jquant._bench import Context, Row, copy_time, timeit

#: torch runs its ops with one intra-op thread here: on a shared 2-core box its 2-thread
#: OpenMP regions wait for a second core for whole scheduler slices (tens of ms per call
#: were measured for a 64x256x256 Linear), which times the machine, not the kernel.
TORCH_THREADS = 1

DENSE = [(256, 1024, 1024), (64, 256, 256)]          # batch, in, out
CONV = [(32, 32, 64, 64), (8, 16, 16, 32)]          # batch, hw, in, out (3x3, SAME)


def _torch_engine(torch):
    """x86 engine, one intra-op thread; returns what to restore."""
    old = (torch.backends.quantized.engine, torch.get_num_threads())
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    torch.set_num_threads(TORCH_THREADS)
    return old


def _restore(torch, old):
    torch.backends.quantized.engine = old[0]
    torch.set_num_threads(old[1])


def _dense(ctx, batch, din, dout, rng):
    torch = ctx.torch
    x = rng.standard_normal((batch, din)).astype(np.float32)
    w = (rng.standard_normal((dout, din)) / np.sqrt(din)).astype(np.float32)
    b = rng.standard_normal(dout).astype(np.float32) * 0.1
    kernel = jnp.asarray(w.T)
    f_float = jax.jit(lambda a, k, bb: a @ k + bb)
    t_float = timeit(lambda: f_float(x, kernel, b), ctx)
    y = np.asarray(f_float(x, kernel, b))
    so, zo = float((y.max() - y.min()) / 255), int(np.clip(round(-y.min() / ((y.max() - y.min()) / 255)), 0, 255))
    p = Q.pack_linear(w, b, jq.default_per_channel_weight_observer, output_qparams=(so, zo))
    sx = float((x.max() - x.min()) / 255)
    xq = Q.quantize(x, sx, int(round(-x.min() / sx)))
    f_int = jax.jit(lambda a, pp: Q.quantized_linear(a, pp).q)
    t_int = timeit(lambda: f_int(xq, p), ctx)
    tt_float = tt_int = None
    if torch is not None:
        import torch.ao.nn.quantized as nnq
        old = _torch_engine(torch)
        try:
            tx, tw, tb = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)
            with torch.no_grad():
                tt_float = timeit(lambda: torch.nn.functional.linear(tx, tw, tb), ctx)
                qlin = nnq.Linear(din, dout)
                wq = torch.quantize_per_channel(tw, torch.from_numpy(np.asarray(p.weight_scale)).double(),
                                                torch.zeros(dout, dtype=torch.long), 0, torch.qint8)
                qlin.set_weight_bias(wq, tb)
                qlin.scale, qlin.zero_point = so, zo
                txq = torch.quantize_per_tensor(tx, sx, int(xq.zero_point), torch.quint8)
                tt_int = timeit(lambda: qlin(txq), ctx)
        finally:
            _restore(torch, old)
    label = f"{batch}x{din}->{dout}"
    return _rows("Dense", label, t_float, t_int, tt_float, tt_int, w.nbytes + b.nbytes,
                 Q.param_bytes(p), copy_time(batch * dout, ctx))


def _conv(ctx, batch, hw, cin, cout, rng):
    torch = ctx.torch
    x = rng.standard_normal((batch, hw, hw, cin)).astype(np.float32)
    w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32) * 0.1
    kernel = jnp.asarray(np.transpose(w, (2, 3, 1, 0)))
    dn = ("NHWC", "HWIO", "NHWC")
    f_float = jax.jit(lambda a, k, bb: lax.conv_general_dilated(
        a, k, (1, 1), "SAME", dimension_numbers=dn) + bb)
    t_float = timeit(lambda: f_float(x, kernel, b), ctx)
    y = np.asarray(f_float(x, kernel, b))
    so = float((y.max() - y.min()) / 255)
    zo = int(np.clip(round(-y.min() / so), 0, 255))
    p = Q.pack_conv(w, b, jq.default_per_channel_weight_observer, output_qparams=(so, zo))
    sx = float((x.max() - x.min()) / 255)
    xq = Q.quantize(x, sx, int(round(-x.min() / sx)))
    f_int = jax.jit(lambda a, pp: Q.quantized_conv(a, pp, padding="SAME").q)
    t_int = timeit(lambda: f_int(xq, p), ctx)
    tt_float = tt_int = None
    if torch is not None:
        import torch.ao.nn.quantized as nnq
        old = _torch_engine(torch)
        try:
            tx = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))
            tx = tx.contiguous(memory_format=torch.channels_last)
            tw, tb = torch.from_numpy(w), torch.from_numpy(b)
            with torch.no_grad():
                tt_float = timeit(lambda: torch.nn.functional.conv2d(tx, tw, tb, padding=1), ctx)
                qconv = nnq.Conv2d(cin, cout, 3, padding=1)
                wq = torch.quantize_per_channel(tw, torch.from_numpy(np.asarray(p.weight_scale)).double(),
                                                torch.zeros(cout, dtype=torch.long), 0, torch.qint8)
                qconv.set_weight_bias(wq, tb)
                qconv.scale, qconv.zero_point = so, zo
                txq = torch.quantize_per_tensor(tx, sx, int(xq.zero_point), torch.quint8)
                tt_int = timeit(lambda: qconv(txq), ctx)
        finally:
            _restore(torch, old)
    label = f"{batch}x{hw}x{hw}x{cin}->{cout} 3x3"
    return _rows("Conv2d", label, t_float, t_int, tt_float, tt_int, w.nbytes + b.nbytes,
                 Q.param_bytes(p), copy_time(batch * hw * hw * cout, ctx))


def _ratio(a, b):
    return "-" if not a or not b else f"{a / b:.2f}"


def _rows(name, label, t_float, t_int, tt_float, tt_int, fbytes, qbytes, copy_ms):
    note = (f"int8/float: jquant {_ratio(t_int, t_float)}, torch(1 thr) {_ratio(tt_int, tt_float)}; "
            f"weights {fbytes} B float32 -> {qbytes} B int8 ({fbytes / qbytes:.2f}x)")
    return [Row(f"{name} float fwd", label, t_float, tt_float, copy_ms),
            Row(f"{name} int8 (converted) fwd", label, t_int, tt_int, copy_ms, note)]


def run(ctx: Context) -> list:
    rng = np.random.default_rng(0)
    dense = DENSE[1:] if ctx.quick else DENSE
    conv = CONV[1:] if ctx.quick else CONV
    rows = []
    for batch, din, dout in dense:
        rows.extend(_dense(ctx, batch, din, dout, rng))
    for batch, hw, cin, cout in conv:
        rows.extend(_conv(ctx, batch, hw, cin, cout, rng))
    return rows
