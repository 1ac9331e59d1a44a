"""QAT suite: a jitted QAT train step vs the float train step, jquant and torch side by side.

Models (sklearn-digits-shaped input, 8x8x1, 10 classes; Adam, cross-entropy):

* digits CNN, batch 64: conv 16 - relu - conv 32 - relu - flatten - dense 64 - relu - dense 10;
* larger CNN, batch 256: conv 64 - relu - conv 128 - relu - flatten - dense 256 - relu - dense 10.

For each: the float train step and the QAT train step (``get_default_qat_qconfig("x86")``,
conv+relu / dense+relu fused as torch's ``fuse_modules_qat`` does) of

* jquant Linen: the unmodified flax model, ``jquant.linen.prepare_qat``, one jitted
  ``value_and_grad`` + optax step with ``quant_stats`` / params carried. The model is an
  ``nn.Sequential`` whose ReLUs are ``nn.relu`` layers, as the torch twin's are ReLU
  modules: fused, the ReLU slot becomes the identity (torch's ConvReLU2d). A second row
  times the same network written with ``@nn.compact`` and ``nn.relu`` *calls*: the fused
  op applies the ReLU and the model's own call runs again on its output (one more pass,
  which XLA:CPU also fuses into the convolution's weight-gradient transposes);
* torch eager: ``fuse_modules_qat`` + ``prepare_qat`` on the twin module.

Rows report median step times; the note gives QAT/float ratios (targets: jquant <= 1.10
on the larger model, <= 1.3 on the digits CNN), each the median over rounds in which the
float and QAT steps run back to back (robust to load on a shared machine). Jitted steps
donate their state buffers, as training loops do. The NNX front end may append its rows.
"""
from __future__ import annotations

import functools
import statistics
import time

import numpy as np

from jquant._bench import Context, Row

MODELS = {
    # name: (batch, conv channels, dense width)
    "digits CNN": (64, (16, 32), 64),
    "larger CNN": (256, (64, 128), 256),
}


def _data(batch, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (batch, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    return x, y


# ----------------------------------------------------------------------------------------
# jquant Linen
# ----------------------------------------------------------------------------------------

def linen_model(channels, width, style: str = "sequential"):
    """The bench CNN as an unmodified flax.linen model.

    ``style="sequential"``: ``nn.Sequential`` (conv, relu, ..., flatten, dense, relu,
    dense; layer ``i`` is ``layers_i``); ``"compact"``: an ``@nn.compact`` module calling
    ``nn.relu`` (layers ``conv1``, ``conv2``, ``fc1``, ``fc2``).
    """
    import flax.linen as nn

    if style == "sequential":
        layers_ = []
        for c in channels:
            layers_ += [nn.Conv(c, (3, 3), padding=1), nn.relu]
        flatten = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
        return nn.Sequential(layers_ + [flatten, nn.Dense(width), nn.relu, nn.Dense(10)])
    if style != "compact":
        raise ValueError(f"style must be 'sequential' or 'compact', got {style!r}")

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i, c in enumerate(channels):
                x = nn.relu(nn.Conv(c, (3, 3), padding=1, name=f"conv{i + 1}")(x))
            x = x.reshape(x.shape[0], -1)
            x = nn.relu(nn.Dense(width, name="fc1")(x))
            return nn.Dense(10, name="fc2")(x)

    return CNN()


def linen_fuse(channels, style: str = "sequential"):
    """torch's ``fuse_modules_qat`` groups for :func:`linen_model`: each conv / dense with
    the ``relu`` after it."""
    if style == "sequential":
        n = len(channels)
        return [(f"layers_{2 * i}", "relu") for i in range(n)] + [(f"layers_{2 * n + 1}", "relu")]
    return [(f"conv{i + 1}", "relu") for i in range(len(channels))] + [("fc1", "relu")]


def linen_steps(batch, channels, width, style: str = "sequential"):
    """(float_step, qat_step) thunks for the Linen model (each runs one jitted step)."""
    import jax
    import jax.numpy as jnp
    import optax

    import jquant as jq
    import jquant.linen as jl

    x, y = map(jnp.asarray, _data(batch))
    model = linen_model(channels, width, style)
    tx = optax.adam(1e-3)

    params = model.init(jax.random.key(0), x)["params"]
    f_state = [params, tx.init(params)]

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def float_step(params, opt, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, g = jax.value_and_grad(loss_fn)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, loss

    qmodel = jl.prepare_qat(model, jq.get_default_qat_qconfig("x86"), fuse=linen_fuse(channels, style))
    qv = qmodel.init(jax.random.key(0), x)
    q_state = [qv["params"], qv["quant_stats"], tx.init(qv["params"])]

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def qat_step(params, qstats, opt, x, y):
        def loss_fn(p):
            logits, upd = qmodel.apply({"params": p, "quant_stats": qstats}, x,
                                       mutable=["quant_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), upd["quant_stats"], opt, loss

    def run_float():
        out = float_step(f_state[0], f_state[1], x, y)
        f_state[0], f_state[1] = out[0], out[1]
        return out[2]

    def run_qat():
        out = qat_step(q_state[0], q_state[1], q_state[2], x, y)
        q_state[0], q_state[1], q_state[2] = out[0], out[1], out[2]
        return out[3]

    return run_float, run_qat


# ----------------------------------------------------------------------------------------
# torch eager
# ----------------------------------------------------------------------------------------

def torch_model(torch, channels, width):
    nn = torch.nn

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = torch.ao.quantization.QuantStub()
            self.conv1 = nn.Conv2d(1, channels[0], 3, padding=1)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
            self.relu2 = nn.ReLU()
            self.fc1 = nn.Linear(channels[1] * 64, width)
            self.relu3 = nn.ReLU()
            self.fc2 = nn.Linear(width, 10)
            self.dequant = torch.ao.quantization.DeQuantStub()

        def forward(self, x):
            x = self.quant(x)
            x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
            x = self.relu3(self.fc1(x.flatten(1)))
            return self.dequant(self.fc2(x))

    return CNN()


def torch_steps(torch, batch, channels, width):
    import torch.ao.quantization as tq

    xn, yn = _data(batch)
    x = torch.from_numpy(np.ascontiguousarray(xn.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(yn.astype(np.int64))

    def make_step(m):
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)

        def step():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            return None
        return step

    torch.manual_seed(0)
    fm = torch_model(torch, channels, width).train()
    qm = torch_model(torch, channels, width).train()
    qm.load_state_dict(fm.state_dict())
    qm = tq.fuse_modules_qat(qm, [["conv1", "relu1"], ["conv2", "relu2"], ["fc1", "relu3"]])
    qm.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(qm, inplace=True)
    return make_step(fm), make_step(qm)


# ----------------------------------------------------------------------------------------

def interleaved(fns, ctx: Context, repeats: int):
    """Median time (ms) of each thunk, calls interleaved round by round (so load drift on a
    shared machine hits every variant alike), plus the median per-round ratio of each to
    the first."""
    import jax
    for f in fns:
        for _ in range(max(ctx.warmup, 2)):
            jax.block_until_ready(f())
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[i].append(time.perf_counter() - t0)
    med = [1e3 * statistics.median(t) for t in times]
    ratios = [statistics.median(a / b for a, b in zip(t, times[0])) for t in times]
    return med, ratios


def _rounds(name: str, ctx: Context) -> int:
    """Interleaved rounds per model: the ~1.5 ms digits step gets at least 200 (with 20,
    its median ratio moved by +-0.06 between runs on a shared 2-core machine; with 200,
    +-0.02), the ~50 ms larger step at least 8 (fewer came out bimodal)."""
    if name == "digits CNN":
        return max(ctx.repeats, 200)
    return max(8, ctx.repeats // 2)


def run(ctx: Context) -> list[Row]:
    rows = []
    torch = ctx.torch
    for name, (batch, channels, width) in MODELS.items():
        if ctx.quick and name != "digits CNN":
            continue
        reps = _rounds(name, ctx)
        label = f"batch {batch}"
        (jf, jq_), (_, jr) = interleaved(linen_steps(batch, channels, width), ctx, reps)
        tf = tq_ = tr = None
        if torch is not None:
            (tf, tq_), (_, tr) = interleaved(torch_steps(torch, batch, channels, width), ctx, reps)
        rows.append(Row(f"{name} float step (linen)", label, jf, tf))
        note = f"QAT/float: jquant {jr:.2f}"
        if tr is not None:
            note += f", torch {tr:.2f}"
        rows.append(Row(f"{name} QAT step (linen)", label, jq_, tq_, note=note))
        (cf, cq), (_, cr) = interleaved(linen_steps(batch, channels, width, "compact"), ctx, reps)
        rows.append(Row(f"{name} QAT step (linen, nn.relu calls)", label, cq,
                        note=f"QAT/float: jquant {cr:.2f} (float {cf:.2f} ms): the model's "
                             f"own relu runs after the fused one"))
    return rows


# ----------------------------------------------------------------------------------------
# jquant NNX (appended by the NNX front end)
# ----------------------------------------------------------------------------------------

def nnx_model(channels, width):
    """The bench CNN as an unmodified flax.nnx model (ReLUs held as attributes, so
    ``fuse_modules_qat`` gives torch's exact ConvReLU / LinearReLU)."""
    from flax import nnx

    class CNN(nnx.Module):
        def __init__(self):
            r = nnx.Rngs(0)
            self.conv1 = nnx.Conv(1, channels[0], (3, 3), padding=1, rngs=r)
            self.act1 = nnx.relu
            self.conv2 = nnx.Conv(channels[0], channels[1], (3, 3), padding=1, rngs=r)
            self.act2 = nnx.relu
            self.fc1 = nnx.Linear(channels[1] * 64, width, rngs=r)
            self.act3 = nnx.relu
            self.fc2 = nnx.Linear(width, 10, rngs=r)

        def __call__(self, x):
            x = self.act2(self.conv2(self.act1(self.conv1(x))))
            x = self.act3(self.fc1(x.reshape(x.shape[0], -1)))
            return self.fc2(x)

    return CNN()


NNX_FUSE = [("conv1", "act1"), ("conv2", "act2"), ("fc1", "act3")]


def nnx_steps(batch, channels, width, use_nnx_jit: bool = False):
    """(float_step, qat_step) thunks for the NNX model.

    Default: flax's low-overhead recipe, ``nnx.split`` once and a ``jax.jit`` step over
    the state's leaves (donated) with ``nnx.merge`` inside; ``use_nnx_jit``: the
    idiomatic ``@nnx.jit`` step on the module and optimizer (adds flax's per-call graph
    traversal on the host).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import jquant as jq
    import jquant.nnx as jqn

    x, y = map(jnp.asarray, _data(batch))
    tx = optax.adam(1e-3)
    float_model = nnx_model(channels, width)
    qat_model = jqn.prepare_qat(float_model, jq.get_default_qat_qconfig("x86"), fuse=NNX_FUSE)

    def loss_fn(m, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    def make(model):
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        if use_nnx_jit:
            @nnx.jit
            def step(m, o, x, y):
                loss, g = nnx.value_and_grad(loss_fn)(m, x, y)
                o.update(m, g)
                return loss
            return lambda: step(model, optimizer, x, y)
        graphdef, state = nnx.split((model, optimizer))
        leaves, treedef = jax.tree.flatten(state)  # a flat list of arrays: cheap to pass

        @functools.partial(jax.jit, donate_argnums=0)
        def pure_step(leaves, x, y):
            m, o = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            loss, g = nnx.value_and_grad(loss_fn)(m, x, y)
            o.update(m, g)
            return jax.tree.leaves(nnx.state((m, o))), loss

        box = [leaves]

        def run():
            box[0], loss = pure_step(box[0], x, y)
            return loss
        return run

    return make(float_model), make(qat_model)


def run_nnx(ctx: Context) -> list[Row]:
    rows = []
    for name, (batch, channels, width) in MODELS.items():
        if ctx.quick and name != "digits CNN":
            continue
        reps = _rounds(name, ctx)
        label = f"batch {batch}"
        (jf, jq_), (_, jr) = interleaved(nnx_steps(batch, channels, width), ctx, reps)
        (nf, nq), (_, nr) = interleaved(nnx_steps(batch, channels, width, use_nnx_jit=True),
                                        ctx, reps)
        rows.append(Row(f"{name} float step (nnx)", label, jf))
        rows.append(Row(f"{name} QAT step (nnx)", label, jq_,
                        note=f"QAT/float: jquant {jr:.2f} (nnx.split + jax.jit); with @nnx.jit "
                             f"{nr:.2f} ({nf:.2f} / {nq:.2f} ms)"))
    return rows


_run_linen = run


def run(ctx: Context) -> list[Row]:  # noqa: F811 - the Linen rows, then the NNX rows
    return _run_linen(ctx) + run_nnx(ctx)
