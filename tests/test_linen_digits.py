"""Real data (sklearn digits, 8x8): float training -> PTQ -> QAT with jquant.linen.

Prints accuracy and test NLL for float, 8-bit PTQ (calibrated observers, simulated with
fake quant until ``convert`` lands), 8-bit QAT, and a 4-bit-weight setting where PTQ and
QAT differ (the 8-bit task is saturated: every method scores ~357/360). The model is a
small unmodified flax CNN (conv-bn-relu fused, conv-relu, dense); a quick variant runs by
default, a longer one is marked slow.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jquant as jq
import jquant.linen as jl


class DigitsCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(8, (3, 3), padding=1, name="conv1")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x))
        x = nn.relu(nn.Conv(16, (3, 3), strides=2, padding=1, name="conv2")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10, name="fc")(x)


FUSE = [("conv1", "bn1", "relu"), ("conv2", "relu")]


def _data(seed=0):
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    return train_test_split(x, y, test_size=360, random_state=seed, stratify=y)


def _batches(rng, x, y, bs=64):
    idx = rng.permutation(len(x))
    for i in range(0, len(idx) - bs + 1, bs):
        j = idx[i:i + bs]
        yield jnp.asarray(x[j]), jnp.asarray(y[j])


def _train(model, variables, xtr, ytr, epochs, lr, seed, mutable):
    tx = optax.adam(lr)
    opt = tx.init(variables["params"])

    @jax.jit
    def step(v, opt, x, y):
        def loss_fn(p):
            logits, upd = model.apply({**v, "params": p}, x, mutable=list(mutable))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
        (_, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
        u, opt = tx.update(g, opt, v["params"])
        return {**v, **upd, "params": optax.apply_updates(v["params"], u)}, opt

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for xb, yb in _batches(rng, xtr, ytr):
            variables, opt = step(variables, opt, xb, yb)
    return variables


def _evaluate(model, variables, x, y):
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
    nll = float(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean())
    correct = int(jnp.sum(jnp.argmax(logits, -1) == jnp.asarray(y)))
    return correct, nll


def _qconfigs(bits):
    if bits == 8:
        return (QConfigPair(jq.get_default_qat_qconfig("x86"),
                            jq.QConfig(activation=jq.default_histogram_fake_quant,
                                       weight=jq.default_per_channel_weight_fake_quant)))
    w4 = jq.FusedMovingAvgObsFakeQuantize.with_args(
        observer=jq.MovingAveragePerChannelMinMaxObserver, quant_min=-8, quant_max=7,
        dtype=jq.qint8, qscheme=jq.per_channel_symmetric)
    w4_ptq = jq.FakeQuantize.with_args(
        observer=jq.MovingAveragePerChannelMinMaxObserver, quant_min=-8, quant_max=7,
        dtype=jq.qint8, qscheme=jq.per_channel_symmetric, averaging_constant=1.0)
    return QConfigPair(jq.QConfig(activation=jq.get_default_qat_qconfig("x86").activation, weight=w4),
                       jq.QConfig(activation=jq.default_histogram_fake_quant, weight=w4_ptq))


class QConfigPair:
    def __init__(self, qat, ptq):
        self.qat, self.ptq = qat, ptq


def _ptq(float_vars, qconfig, xcal, calib_batches):
    """Post-training quantization simulated with fake quant: observe calibration batches
    with fake quant off, then freeze the observers and evaluate with fake quant on."""
    model = jl.prepare_qat(DigitsCNN(), qconfig, fuse=FUSE)
    v = jax.jit(model.init)(jax.random.key(0), jnp.asarray(xcal[:64]))
    v = jq.disable_fake_quant({**v, "params": float_vars["params"],
                               "batch_stats": float_vars["batch_stats"]})
    v = jl.freeze_bn_stats(v)
    calib = jax.jit(lambda v, x: model.apply(v, x, mutable=["quant_stats", "batch_stats"]))
    for i in range(calib_batches):
        _, upd = calib(v, jnp.asarray(xcal[i * 64:(i + 1) * 64]))
        v = {**v, "quant_stats": upd["quant_stats"]}
    return model, jq.enable_fake_quant(jq.disable_observer(v))


def _qat(float_vars, qconfig, xtr, ytr, epochs, seed):
    model = jl.prepare_qat(DigitsCNN(), qconfig, fuse=FUSE)
    v = jax.jit(model.init)(jax.random.key(0), jnp.asarray(xtr[:64]))
    v = {**v, "params": float_vars["params"], "batch_stats": float_vars["batch_stats"]}
    v = _train(model, v, xtr, ytr, epochs, 1e-3, seed + 1, ("quant_stats", "batch_stats"))
    return model, jl.freeze_bn_stats(jq.disable_observer(v))


def run_digits(float_epochs, qat_epochs, calib_batches=4, seed=0, plain_prepare=False):
    xtr, xte, ytr, yte = _data(seed)
    model = DigitsCNN()
    v = jax.jit(model.init)(jax.random.key(seed), jnp.asarray(xtr[:64]))
    v = _train(model, v, xtr, ytr, float_epochs, 1e-2, seed, ("batch_stats",))
    results = {"float": _evaluate(model, v, xte, yte)}
    if plain_prepare:
        # PTQ with the default observers (HistogramObserver activations) as plain prepare +
        # calibration (what convert will consume); its observers must have seen data.
        prep = jl.prepare(DigitsCNN(), jq.get_default_qconfig("x86"))
        pv = jax.jit(prep.init)(jax.random.key(0), jnp.asarray(xtr[:64]))
        _, upd = jax.jit(lambda pv, x: prep.apply(pv, x, train=False, mutable=["quant_stats"]))(
            {**pv, "params": v["params"], "batch_stats": v["batch_stats"]}, jnp.asarray(xtr[:64]))
        obs = jl.get_observer_dict(prep, {**pv, **upd})["fc.activation_post_process"]
        assert float(obs.calculate_qparams()[0][0]) > 0
    for bits in (8, 4):
        qcs = _qconfigs(bits)
        m, qv = _ptq(v, qcs.ptq, xtr, calib_batches)
        results[f"PTQ {bits}-bit"] = _evaluate(m, qv, xte, yte)
        m, qv = _qat(v, qcs.qat, xtr, ytr, qat_epochs, seed)
        results[f"QAT {bits}-bit"] = _evaluate(m, qv, xte, yte)
    n = len(yte)
    print(f"\nsklearn digits ({n} test images), float {float_epochs} epochs, QAT {qat_epochs} epochs:")
    for k, (c, nll) in results.items():
        print(f"  {k:12s} {c}/{n} = {c / n:.3f}   test NLL {nll:.4f}")
    return results, n


def _check(results, n):
    f = results["float"][0]
    assert f >= 0.93 * n
    assert results["PTQ 8-bit"][0] >= f - 0.02 * n
    assert results["QAT 8-bit"][0] >= f - 0.02 * n
    assert results["QAT 4-bit"][0] >= 0.9 * n
    # QAT recovers what 4-bit PTQ loses (NLL), as it should
    assert results["QAT 4-bit"][1] <= results["PTQ 4-bit"][1] + 0.05


def test_digits_float_ptq_qat_quick():
    _check(*run_digits(float_epochs=6, qat_epochs=1, calib_batches=2))


@pytest.mark.slow
def test_digits_float_ptq_qat_full():
    _check(*run_digits(float_epochs=30, qat_epochs=10, calib_batches=8, plain_prepare=True))
