"""HistogramObserver vs MinMaxObserver on the activations of a small CNN (sklearn digits).

Trains a small Flax (linen) CNN for a few epochs, runs calibration batches through it,
feeds each layer's activations to a MinMaxObserver and to a HistogramObserver (both
quint8, per-tensor affine, as torch's defaults), and prints per layer the quantization
MSE of the activations under each observer's qparams, then the test accuracy of
post-training quantization (every activation fake-quantized with those qparams; weights
stay float so only the observers differ).

What to expect: on the conv layers (dense, long-tailed post-ReLU activations) the
histogram observer's L2 search trims the tail and lowers the quantization MSE by about
5-15%. On ``fc1`` (about half its values are exact ReLU zeros, spread thinly over 2048
bins) and on the logits (no tail) it lands within a few percent of MinMax, either side:
torch's error model spreads each bin's mass uniformly over the bin, so it charges the
zero spike an error it does not have and trims slightly too much. jquant reproduces
torch's choice exactly. On this 8-bit task the PTQ accuracy is saturated for both.

    python examples/histogram_vs_minmax.py [--epochs N] [--seed S] [--quick]
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jquant as jq

LAYERS = ("conv1", "conv2", "fc1", "logits")


class CNN(nn.Module):
    """Two 3x3 convs (ReLU), average pooling, a ReLU dense layer and the logits.

    ``quant`` maps a layer name to a function applied to its activation (fake quant).
    Returns ``(logits, activations)``.
    """

    @nn.compact
    def __call__(self, x, quant=None):
        quant = quant or {}
        acts = {}

        def out(name, h):
            h = quant[name](h) if name in quant else h
            acts[name] = h
            return h

        h = out("conv1", nn.relu(nn.Conv(16, (3, 3))(x)))
        h = out("conv2", nn.relu(nn.Conv(32, (3, 3))(h)))
        h = nn.avg_pool(h, (2, 2), (2, 2)).reshape(h.shape[0], -1)
        h = out("fc1", nn.relu(nn.Dense(64)(h)))
        return out("logits", nn.Dense(10)(h)), acts


def load_data(seed):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    return train_test_split(x, y, test_size=360, random_state=seed, stratify=y)


def train(model, x, y, epochs, seed, batch=32):
    params = model.init(jax.random.PRNGKey(seed), x[:1])["params"]
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss(p):
            logits, _ = model.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        l, g = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(g, opt_state)
        return optax.apply_updates(params, updates), opt_state, l

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i:i + batch]
            params, opt_state, _ = step(params, opt_state, x[idx], y[idx])
    return params


def calibrate(model, params, x_cal, batch):
    """Per layer: the activations on the calibration set and both observers' qparams."""
    minmax = jq.MinMaxObserver()                      # quint8, per_tensor_affine
    hist = jq.HistogramObserver()                     # quint8, per_tensor_affine, 2048 bins
    apply = jax.jit(lambda p, xb: model.apply({"params": p}, xb)[1])
    states = {n: (minmax.init(), hist.init()) for n in LAYERS}
    acts = {n: [] for n in LAYERS}
    for i in range(0, len(x_cal), batch):
        out = apply(params, x_cal[i:i + batch])
        for n in LAYERS:
            mm, hh = states[n]
            states[n] = (minmax.update(mm, out[n]), hist.update(hh, out[n]))
            acts[n].append(np.asarray(out[n]))
    qparams = {n: {"MinMax": minmax.calculate_qparams(states[n][0]),
                   "Histogram": hist.calculate_qparams(states[n][1])} for n in LAYERS}
    return {n: np.concatenate(acts[n]) for n in LAYERS}, qparams


def fake_quant(scale, zp):
    return lambda h: jq.fake_quantize_per_tensor_affine(h, scale, zp, 0, 255)


def accuracy(model, params, x, y, quant=None):
    logits, _ = jax.jit(lambda p, xb: model.apply({"params": p}, xb, quant))(params, x)
    return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="3 epochs, 256 calibration images")
    args = p.parse_args(argv)
    epochs = 3 if args.quick else args.epochs
    n_cal = 256 if args.quick else 512
    t0 = time.time()
    x_tr, x_te, y_tr, y_te = load_data(args.seed)
    model = CNN()
    params = train(model, x_tr, y_tr, epochs, args.seed)
    acts, qparams = calibrate(model, params, x_tr[:n_cal], batch=128)

    result = {"mse": {}, "accuracy": {}}
    print(f"Activation quantization MSE (quint8 affine, {n_cal} calibration images)")
    print(f"{'layer':8} {'range':>22} {'MinMax MSE':>12} {'Histogram MSE':>14} {'ratio':>7}  "
          f"{'Histogram range':>22}")
    for n in LAYERS:
        a = jnp.asarray(acts[n])
        row = {}
        for name, (scale, zp) in qparams[n].items():
            row[name] = float(jnp.mean((fake_quant(scale, zp)(a) - a) ** 2))
        hs, hz = qparams[n]["Histogram"]
        lo, hi = float((0 - hz[0]) * hs[0]), float((255 - hz[0]) * hs[0])
        print(f"{n:8} [{float(a.min()):9.3f}, {float(a.max()):9.3f}] {row['MinMax']:12.3e} "
              f"{row['Histogram']:14.3e} {row['Histogram'] / row['MinMax']:7.3f}  "
              f"[{lo:9.3f}, {hi:9.3f}]")
        result["mse"][n] = row

    result["accuracy"]["float"] = accuracy(model, params, x_te, y_te)
    for name in ("MinMax", "Histogram"):
        quant = {n: fake_quant(*qparams[n][name]) for n in LAYERS}
        result["accuracy"][name] = accuracy(model, params, x_te, y_te, quant)
    print(f"\nTest accuracy ({len(y_te)} images): float {result['accuracy']['float']:.4f}, "
          f"PTQ activations with MinMax {result['accuracy']['MinMax']:.4f}, "
          f"with Histogram {result['accuracy']['Histogram']:.4f}")
    print(f"({epochs} epochs, total {time.time() - t0:.1f} s)")
    return result


if __name__ == "__main__":
    main()
