"""jquant end to end on sklearn's digits: float -> PTQ (MinMax / Histogram) -> QAT -> int8.

A small CNN (quant stub, conv-relu, conv-relu, dense-relu, dense, dequant stub) on the 8x8
digit images bundled with scikit-learn, with either Flax front end (``--front linen|nnx``):

1. float training (optax Adam);
2. post-training quantization: ``prepare`` with MinMax or Histogram activation observers
   and per-channel symmetric int8 weights, calibration on training batches, ``convert``
   (each ReLU fused into its layer first, as torch's ``fuse_modules``: nnx
   ``fuse_modules``, linen ``prepare(..., fuse=...)``), so observers see post-ReLU outputs;
3. quantization-aware training: ``prepare_qat`` with the backend's default QAT qconfig
   (conv/dense + ReLU fused), observers frozen for the last epoch, then ``convert``;
4. integer evaluation of every converted model (``--backend x86|qnnpack`` picks the
   quantized engine whose rules are reproduced: x86 uses 7-bit activations as torch).

Prints a table (test accuracy, parameter bytes, median train / calibration step time and
inference time per 120-image batch) and writes a PNG of the calibration histograms of each
activation with the ranges MinMax and Histogram chose. Deterministic for a given seed.

    python examples/qat_digits.py [--front linen|nnx] [--backend x86|qnnpack]
                                  [--epochs N] [--qat-epochs N] [--seed S] [--png PATH] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn)
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jquant as jq
import jquant.linen as jl
import jquant.nnx as jqn

BATCH = 64
EVAL_BATCH = 120              # the 360 test images in 3 batches
FUSE = [("conv1", "relu1"), ("conv2", "relu2"), ("fc1", "relu3")]   # nnx: ReLU attributes
LINEN_FUSE = [("conv1", "relu"), ("conv2", "relu"), ("fc1", "relu")]  # linen: the relu function


def load_data(seed):
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]          # (N, 8, 8, 1) NHWC
    y = d.target.astype(np.int32)
    return train_test_split(x, y, test_size=360, random_state=seed, stratify=y)


def ptq_qconfig(act_observer, backend):
    """PTQ: the chosen activation observer (quint8, 7-bit on x86), per-channel int8 weights."""
    return jq.QConfig(activation=act_observer.with_args(reduce_range=backend == "x86"),
                      weight=jq.default_per_channel_weight_observer)


def _median_ms(ts):
    return 1e3 * float(np.median(ts)) if ts else float("nan")


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------
# Linen front end
# ------------------------------------------------------------------------------------------

class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jl.QuantStub(name="quant")(x)
        x = nn.relu(nn.Conv(16, (3, 3), padding=1, name="conv1")(x))
        x = nn.relu(nn.Conv(32, (3, 3), padding=1, name="conv2")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64, name="fc1")(x))
        return jl.DeQuantStub(name="dequant")(nn.Dense(10, name="fc2")(x))


class LinenFront:
    """Each stage's state is ``(model, variables)``; every step is a pure jitted function."""

    def __init__(self, seed, backend, lr):
        self.seed, self.backend = seed, backend
        self.tx = optax.adam(lr)
        self.qtx = optax.adam(lr / 3)
        self.model = LinenCNN()

        def loss(model, v, p, x, y, mutable):
            out = model.apply({**v, "params": p}, x, mutable=mutable)
            logits, upd = out if mutable else (out, {})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        @jax.jit
        def float_step(v, opt, x, y):
            (l, _), g = jax.value_and_grad(loss, argnums=2, has_aux=True)(
                self.model, v, v["params"], x, y, False)
            upd, opt = self.tx.update(g, opt, v["params"])
            return {**v, "params": optax.apply_updates(v["params"], upd)}, opt, l
        self._float_step = float_step

        def qat_step(model, v, opt, x, y):
            (l, upd_s), g = jax.value_and_grad(loss, argnums=2, has_aux=True)(
                model, v, v["params"], x, y, ["quant_stats"])
            upd, opt = self.qtx.update(g, opt, v["params"])
            return {**v, **upd_s, "params": optax.apply_updates(v["params"], upd)}, opt, l
        self._qat_step = jax.jit(qat_step, static_argnums=0)
        self._calib = jax.jit(lambda m, v, x: m.apply(v, x, mutable=["quant_stats"])[1],
                              static_argnums=0)
        self._predict = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)

    def float_init(self, x):
        v = jax.jit(self.model.init)(jax.random.PRNGKey(self.seed), x[:1])
        return [self.model, dict(v), self.tx.init(v["params"])]

    def float_step(self, st, x, y):
        st[1], st[2], l = self._float_step(st[1], st[2], x, y)
        return l

    def predict(self, st, x):
        return self._predict(st[0], st[1], x)

    def param_bytes(self, st):
        return jl.parameter_bytes(st[1])

    def observe(self, float_st, act_observer):
        pm = jl.prepare(self.model, ptq_qconfig(act_observer, self.backend), fuse=LINEN_FUSE)
        v = dict(jax.jit(pm.init)(jax.random.PRNGKey(self.seed), jnp.zeros((1, 8, 8, 1))))
        v["params"] = float_st[1]["params"]
        return [pm, v]

    def calibrate(self, st, x):
        st[1] = {**st[1], **self._calib(st[0], st[1], x)}
        return st[1]["quant_stats"]

    def observers(self, st):
        return jl.get_observer_dict(st[0], st[1])

    def convert(self, st):
        return list(jl.convert(st[0], st[1], backend=self.backend))

    def qat_init(self, float_st):
        qm = jl.prepare_qat(self.model, jq.get_default_qat_qconfig(self.backend),
                             fuse=LINEN_FUSE)
        v = dict(jax.jit(qm.init)(jax.random.PRNGKey(self.seed), jnp.zeros((1, 8, 8, 1))))
        v["params"] = float_st[1]["params"]
        return [qm, v, self.qtx.init(v["params"])]

    def qat_step(self, st, x, y):
        st[1], st[2], l = self._qat_step(st[0], st[1], st[2], x, y)
        return l

    def freeze(self, st):
        st[1] = jq.disable_observer(st[1])


# ------------------------------------------------------------------------------------------
# NNX front end
# ------------------------------------------------------------------------------------------

class NNXCNN(nnx.Module):
    def __init__(self, seed):
        r = nnx.Rngs(seed)
        self.quant = jqn.QuantStub()
        self.conv1 = nnx.Conv(1, 16, (3, 3), padding=1, rngs=r)
        self.relu1 = nnx.relu
        self.conv2 = nnx.Conv(16, 32, (3, 3), padding=1, rngs=r)
        self.relu2 = nnx.relu
        self.fc1 = nnx.Linear(32 * 16, 64, rngs=r)
        self.relu3 = nnx.relu
        self.fc2 = nnx.Linear(64, 10, rngs=r)
        self.dequant = jqn.DeQuantStub()

    def __call__(self, x):
        x = self.quant(x)
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = nnx.avg_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
        x = self.relu3(self.fc1(x))
        return self.dequant(self.fc2(x))


@nnx.jit
def _nnx_train_step(model, optimizer, x, y):
    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def _nnx_forward(model, x):
    return model(x)


class NNXFront:
    """Each stage's state is ``[model, optimizer]``; the steps update the model in place."""

    def __init__(self, seed, backend, lr):
        self.seed, self.backend, self.lr = seed, backend, lr

    def float_init(self, x):
        m = NNXCNN(self.seed)
        return [m, nnx.Optimizer(m, optax.adam(self.lr), wrt=nnx.Param)]

    def float_step(self, st, x, y):
        return _nnx_train_step(st[0], st[1], x, y)

    qat_step = float_step

    def predict(self, st, x):
        st[0].eval()
        return _nnx_forward(st[0], x)

    def param_bytes(self, st):
        return jqn.parameter_bytes(st[0])

    def observe(self, float_st, act_observer):
        fused = jqn.fuse_modules(float_st[0], FUSE)          # a copy; ReLU folded into the layer
        observed = jqn.prepare(fused, ptq_qconfig(act_observer, self.backend))
        observed.eval()
        return [observed]

    def calibrate(self, st, x):
        return _nnx_forward(st[0], x)

    def observers(self, st):
        return jqn.get_observer_dict(st[0])

    def convert(self, st):
        st[0].eval()
        return [jqn.convert(st[0], backend=self.backend)]

    def qat_init(self, float_st):
        qm = jqn.prepare_qat(float_st[0], jq.get_default_qat_qconfig(self.backend), fuse=FUSE)
        qm.train()
        return [qm, nnx.Optimizer(qm, optax.adam(self.lr / 3), wrt=nnx.Param)]

    def freeze(self, st):
        jq.disable_observer(st[0])                             # in place


# ------------------------------------------------------------------------------------------
# the workflow
# ------------------------------------------------------------------------------------------

def _train(front, st, step, xtr, ytr, epochs, rng, progress, label, on_epoch=None):
    n_steps = len(xtr) // BATCH
    task = progress.add_task(label, total=epochs * n_steps, info="")
    times = []
    for e in range(epochs):
        if on_epoch is not None:
            on_epoch(e)
        idx = rng.permutation(len(xtr))
        for i in range(n_steps):
            j = idx[i * BATCH:(i + 1) * BATCH]
            loss, dt = _timed(step, st, jnp.asarray(xtr[j]), jnp.asarray(ytr[j]))
            times.append(dt)
            progress.update(task, advance=1, info=f"loss {float(loss):.4f}")
    return times[1:]                                          # the first step compiles


def _evaluate(front, st, x, y):
    """Test accuracy and the median forward time on EVAL_BATCH images (one compiled shape)."""
    xs = [jnp.asarray(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)]
    logits = np.concatenate([np.asarray(front.predict(st, xb)) for xb in xs])
    acc = float(np.mean(np.argmax(logits, -1) == y))
    ts = [_timed(front.predict, st, xs[0])[1] for _ in range(5)]
    return acc, _median_ms(ts)


def _range(obs):
    scale, zp = obs.calculate_qparams()
    s, z = float(np.ravel(scale)[0]), int(np.ravel(zp)[0])
    cfg = obs.config
    return (cfg.quant_min - z) * s, (cfg.quant_max - z) * s


def write_png(path, observers, title):
    """One panel per activation: the Histogram observer's calibration histogram (log
    counts) with the MinMax range and the Histogram observer's chosen range."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, o in observers["Histogram"].items()
            if hasattr(o.state, "histogram") and not k.startswith("quant.")]  # not the input
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ho = observers["Histogram"][k]
        hist = np.asarray(ho.state.histogram).reshape(128, -1).sum(1)   # 2048 -> 128 bins
        lo, hi = float(ho.state.min_val), float(ho.state.max_val)
        edges = np.linspace(lo, hi, len(hist) + 1)
        ax.stairs(np.maximum(hist, 0.5), edges, fill=True, color="0.75", baseline=0.5)
        ax.set_yscale("log")
        for name, color in (("MinMax", "tab:blue"), ("Histogram", "tab:red")):
            a, b = _range(observers[name][k])
            ax.axvline(b, color=color, lw=1.5, label=f"{name} [{a:.2f}, {b:.2f}]")
            ax.axvline(a, color=color, lw=1.5)
        ax.set_title(k.replace(".activation_post_process", ""), fontsize=9)
        ax.set_xlabel("activation")
        ax.legend(fontsize=7, loc="upper right")
    axes[0][0].set_ylabel("count (calibration)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--front", choices=("linen", "nnx"), default="linen")
    p.add_argument("--backend", choices=("x86", "qnnpack"), default="x86")
    p.add_argument("--epochs", type=int, default=12, help="float training epochs")
    p.add_argument("--qat-epochs", type=int, default=4)
    p.add_argument("--calib-batches", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default="qat_digits_histograms.png",
                   help="where to write the activation histograms ('' for none)")
    p.add_argument("--quick", action="store_true",
                   help="4 float epochs, 2 QAT epochs, 4 calibration batches (CI)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.qat_epochs, args.calib_batches = 4, 2, 4
    warnings.filterwarnings("ignore", module="jquant")
    t_start = time.perf_counter()
    xtr, xte, ytr, yte = load_data(args.seed)
    rng = np.random.default_rng(args.seed)
    front = (LinenFront if args.front == "linen" else NNXFront)(args.seed, args.backend, 3e-3)
    rows = {}                       # stage -> (accuracy, param bytes, step ms, step kind, infer ms)
    console = Console(stderr=True)
    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())

    with Progress(*columns, console=console) as progress:
        # 1. float
        fst = front.float_init(xtr)
        t = _train(front, fst, front.float_step, xtr, ytr, args.epochs, rng, progress,
                   "float training")
        acc, inf = _evaluate(front, fst, xte, yte)
        float_bytes = front.param_bytes(fst)
        rows["float"] = (acc, float_bytes, _median_ms(t), "train", inf)

        # 2. PTQ with each activation observer
        observers = {}
        for name, obs in (("MinMax", jq.MinMaxObserver), ("Histogram", jq.HistogramObserver)):
            ost = front.observe(fst, obs)
            task = progress.add_task(f"PTQ {name} calibration", total=args.calib_batches,
                                     info="")
            ts = []
            for i in range(args.calib_batches):
                _, dt = _timed(front.calibrate, ost, jnp.asarray(xtr[i * BATCH:(i + 1) * BATCH]))
                ts.append(dt)
                progress.update(task, advance=1)
            observers[name] = front.observers(ost)
            cst = front.convert(ost)
            acc, inf = _evaluate(front, cst, xte, yte)
            rows[f"PTQ {name} -> int8"] = (acc, front.param_bytes(cst), _median_ms(ts[1:]),
                                          "calibrate", inf)

        # 3. QAT, observers frozen for the last epoch (torch's recipe)
        qst = front.qat_init(fst)

        def on_epoch(e):
            if e == args.qat_epochs - 1 and args.qat_epochs > 1:
                front.freeze(qst)
        t = _train(front, qst, front.qat_step, xtr, ytr, args.qat_epochs, rng, progress,
                   "QAT", on_epoch)
        acc, inf = _evaluate(front, qst, xte, yte)
        rows["QAT (fake quant)"] = (acc, float_bytes, _median_ms(t), "train", inf)
        cst = front.convert(qst)
        acc, inf = _evaluate(front, cst, xte, yte)
        rows["QAT -> int8"] = (acc, front.param_bytes(cst), float("nan"), "", inf)

    if args.png:
        write_png(args.png, observers,
                  f"digits CNN ({args.front}, {args.backend}): activation histograms "
                  f"({args.calib_batches} calibration batches), MinMax vs Histogram ranges")
    total = time.perf_counter() - t_start
    print(f"\nsklearn digits, jquant.{args.front}, backend {args.backend}: {args.epochs} float "
          f"epochs, {args.qat_epochs} QAT epochs, {args.calib_batches} calibration batches, "
          f"seed {args.seed} ({len(yte)} test images)")
    print(f"{'stage':<22}{'accuracy':>9}{'correct':>9}{'param bytes':>13}"
          f"{'step ms':>9}{'(step)':>11}{'infer ms':>10}")
    for name, (acc, nbytes, step, kind, inf) in rows.items():
        step_s = "-" if np.isnan(step) else f"{step:.2f}"
        print(f"{name:<22}{acc:>9.4f}{round(acc * len(yte)):>5}/{len(yte)}{nbytes:>13}"
              f"{step_s:>9}{kind:>11}{inf:>10.2f}")
    print(f"(step ms: median train / calibration step on {BATCH} images; infer ms: median "
          f"forward on {EVAL_BATCH} test images; total {total:.1f} s"
          + (f"; histograms: {args.png})" if args.png else ")"))
    sys.stdout.flush()
    return {"float": rows["float"][0], "ptq_minmax": rows["PTQ MinMax -> int8"][0],
            "ptq_histogram": rows["PTQ Histogram -> int8"][0],
            "qat": rows["QAT (fake quant)"][0], "qat_int8": rows["QAT -> int8"][0],
            "param_bytes": {k: v[1] for k, v in rows.items()}, "seconds": total}


if __name__ == "__main__":
    main()
