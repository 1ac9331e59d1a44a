"""QAT on sklearn's digits with jquant's core API (a first, small version of the demo).

Float training of a small MLP, then quantization-aware fine-tuning with per-channel int8
weight fake quant and fused observe+fake-quant activations (torch's default x86 QAT
qconfig), all inside one jit-compiled optax training step. Prints a table of accuracies.

    python examples/qat_digits.py [--epochs N] [--seed S] [--quick]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jquant as jq


def load_data(seed):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    return train_test_split(x, y, test_size=360, random_state=seed, stratify=y)


def init_params(key, sizes=(64, 128, 10)):
    params = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params.append({"kernel": jax.random.normal(sub, (n_in, n_out)) * np.sqrt(2.0 / n_in),
                       "bias": jnp.zeros((n_out,))})
    return params


def forward_float(params, x):
    for i, layer in enumerate(params):
        x = x @ layer["kernel"] + layer["bias"]
        if i < len(params) - 1:
            x = jax.nn.relu(x)
    return x


def make_qat(qconfig):
    """Per layer: a weight fake quant (torch layout: out channel first) and an output post-process."""
    wfq = qconfig.weight()
    afq = qconfig.activation()

    def init(params, x):
        states, h = [], x
        for i, layer in enumerate(params):
            w = layer["kernel"].T
            states.append({"weight_fake_quant": wfq.init(w), "activation_post_process": afq.init(h)})
            h = forward_float(params[i:i + 1], h)
        return states

    def forward(params, states, x):
        new_states = []
        for i, (layer, st) in enumerate(zip(params, states)):
            w_fq, ws = wfq(st["weight_fake_quant"], layer["kernel"].T)
            x = x @ w_fq.T + layer["bias"]
            if i < len(params) - 1:
                x = jax.nn.relu(x)
            x, a_s = afq(st["activation_post_process"], x)
            new_states.append({"weight_fake_quant": ws, "activation_post_process": a_s})
        return x, new_states

    return init, forward


def accuracy(logits, y):
    return float(jnp.mean(jnp.argmax(logits, -1) == y))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--qat-epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few epochs only (CI)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.qat_epochs = 5, 2
    xtr, xte, ytr, yte = load_data(args.seed)
    params = init_params(jax.random.PRNGKey(args.seed))
    opt = optax.adam(1e-2)
    batch = 64

    def batches(rng):
        idx = rng.permutation(len(xtr))
        for i in range(0, len(idx) - batch + 1, batch):
            j = idx[i:i + batch]
            yield xtr[j], ytr[j]

    @jax.jit
    def float_step(params, opt_state, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(forward_float(p, x), y).mean()
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    opt_state = opt.init(params)
    for _ in range(args.epochs):
        for x, y in batches(rng):
            params, opt_state, _ = float_step(params, opt_state, x, y)
    float_time = time.perf_counter() - t0
    float_acc = accuracy(forward_float(params, xte), yte)

    qinit, qforward = make_qat(jq.get_default_qat_qconfig("x86"))
    states = qinit(params, xtr[:batch])
    qopt = optax.adam(1e-3)

    @jax.jit
    def qat_step(params, states, opt_state, x, y):
        def loss_fn(p):
            logits, new_states = qforward(p, states, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_states
        (loss, new_states), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt_state = qopt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), new_states, opt_state, loss

    t0 = time.perf_counter()
    qopt_state = qopt.init(params)
    for _ in range(args.qat_epochs):
        for x, y in batches(rng):
            params, states, qopt_state, _ = qat_step(params, states, qopt_state, x, y)
    qat_time = time.perf_counter() - t0
    frozen = jq.disable_observer(states)
    qat_acc = accuracy(qforward(params, frozen, xte)[0], yte)

    print(f"{'stage':<22}{'test accuracy':>14}{'train time (s)':>16}")
    print(f"{'float':<22}{float_acc:>14.4f}{float_time:>16.2f}")
    print(f"{'QAT (fake-quant int8)':<22}{qat_acc:>14.4f}{qat_time:>16.2f}")
    return {"float": float_acc, "qat": qat_acc}


if __name__ == "__main__":
    main()
