"""Real data with jquant.nnx: sklearn digits, float training -> PTQ -> QAT (accuracy, NLL).

An unmodified flax.nnx CNN (quant stub, conv-bn-relu, conv-relu, dense-relu, dense,
dequant stub) is trained in float; then

* PTQ: ``fuse_modules`` (BN folded) + ``prepare(get_default_qconfig("x86"))`` (histogram
  activation observers) + calibration on training batches, then ``convert`` (integer
  inference); also simulated with fake quantization at the calibrated activation qparams
  (which lets the slow variant try 4-bit weights);
* QAT: ``prepare_qat(get_default_qat_qconfig("x86"), fuse=...)`` fine-tuning with optax in
  an ``nnx.jit`` loop, observers disabled and BN frozen for the last epoch; evaluated with
  fake quantization and after ``convert``.

The 8-bit task is saturated (torch and qwix scored 357/360 everywhere), so the slow variant
also runs 4-bit weights, where PTQ and QAT differ. The tables are printed (pytest -s).
"""
import numpy as np
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jquant as jq
import jquant.nnx as jqn

FUSE = [("conv1", "bn1", "act1"), ("conv2", "act2"), ("fc1", "act3")]
BATCH = 64


class DigitsCNN(nnx.Module):
    def __init__(self, c1=16, c2=32, width=64, seed=0):
        rng = np.random.default_rng(seed)
        r = nnx.Rngs(0)
        z = nnx.initializers.zeros

        def he(shape, fan_in):
            b = np.sqrt(6.0 / fan_in)
            return jnp.asarray(rng.uniform(-b, b, shape).astype(np.float32))
        self.quant = jqn.QuantStub()
        self.conv1 = nnx.Conv(1, c1, (3, 3), padding=1, kernel_init=z, rngs=r)
        self.bn1 = nnx.BatchNorm(c1, momentum=0.9, rngs=r)
        self.act1 = nnx.relu
        self.conv2 = nnx.Conv(c1, c2, (3, 3), padding=1, kernel_init=z, rngs=r)
        self.act2 = nnx.relu
        self.fc1 = nnx.Linear(c2 * 64, width, kernel_init=z, rngs=r)
        self.act3 = nnx.relu
        self.fc2 = nnx.Linear(width, 10, kernel_init=z, rngs=r)
        self.dequant = jqn.DeQuantStub()
        self.conv1.kernel[...] = he((3, 3, 1, c1), 9)
        self.conv2.kernel[...] = he((3, 3, c1, c2), 9 * c1)
        self.fc1.kernel[...] = he((c2 * 64, width), c2 * 64)
        self.fc2.kernel[...] = he((width, 10), width) / 2

    def __call__(self, x):
        x = self.quant(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.conv2(x))
        x = self.act3(self.fc1(x.reshape(x.shape[0], -1)))
        return self.dequant(self.fc2(x))


def load():
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    return train_test_split(x, d.target.astype(np.int32), test_size=360, random_state=0,
                            stratify=d.target)


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def forward(model, x):
    return model(x)


def evaluate(model, x, y):
    model.eval()
    logits = forward(model, jnp.asarray(x))
    model.train()
    acc = float(jnp.mean(jnp.argmax(logits, -1) == y))
    nll = float(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean())
    return acc, nll


def train(model, tx, x, y, epochs, seed, on_epoch=None):
    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    for e in range(epochs):
        if on_epoch is not None:
            on_epoch(e, model)
        idx = rng.permutation(len(x))
        for i in range(0, len(idx) - BATCH + 1, BATCH):
            j = idx[i:i + BATCH]
            train_step(model, optimizer, jnp.asarray(x[j]), jnp.asarray(y[j]))
    return model


def weight_fq(bits):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return jq.FusedMovingAvgObsFakeQuantize.with_args(
        observer=jq.MovingAveragePerChannelMinMaxObserver, quant_min=lo, quant_max=hi,
        dtype=jq.qint8, qscheme=jq.per_channel_symmetric)


def calibrate(float_model, xtr, n_calib=8):
    """PTQ: fold BN (torch's fuse_modules), observe (histograms) on training batches."""
    float_model.eval()
    fused = jqn.fuse_modules(float_model, FUSE)
    observed = jqn.prepare(fused, jq.get_default_qconfig("x86"))
    for i in range(n_calib):
        forward(observed, jnp.asarray(xtr[i * BATCH:(i + 1) * BATCH]))
    return fused, observed


def ptq_sim(fused, observed, bits=8):
    """The calibrated network simulated with fake quant at the calibrated activation qparams
    and per-channel ``bits``-bit weights."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    sim_qconfig = jq.QConfig(
        activation=jq.FakeQuantize.with_args(observer=jq.MinMaxObserver, quant_min=0,
                                             quant_max=255, reduce_range=True),
        weight=jq.FakeQuantize.with_args(observer=jq.PerChannelMinMaxObserver, quant_min=lo,
                                         quant_max=hi, dtype=jq.qint8,
                                         qscheme=jq.per_channel_symmetric))
    sim = jqn.prepare_qat(fused, sim_qconfig)
    sim_obs = jqn.get_observer_dict(sim)
    for path, pp in jqn.get_observer_dict(observed).items():
        scale, zero_point = pp.calculate_qparams()
        target = sim_obs[path]
        target.set_state(target.state._replace(scale=scale, zero_point=zero_point))
        jq.disable_observer(target)  # calibrated activation qparams stay fixed
    return sim  # weight observers see the (fixed) weights on the first call


def qat(float_model, xtr, ytr, epochs, bits=8, seed=1):
    qconfig = jq.get_default_qat_qconfig("x86")
    if bits != 8:
        qconfig = jq.QConfig(activation=qconfig.activation, weight=weight_fq(bits))
    model = jqn.prepare_qat(float_model, qconfig, fuse=FUSE)

    def on_epoch(e, m):
        if e == epochs - 1:  # torch's recipe: freeze observers and BN for the last epoch
            jq.disable_observer(m)
            jqn.freeze_bn_stats(m)
    return train(model, optax.adam(1e-3), xtr, ytr, epochs, seed, on_epoch)


def run(float_epochs, qat_epochs, bits_list, simulate_ptq=True):
    xtr, xte, ytr, yte = load()
    float_model = train(DigitsCNN(), optax.adam(3e-3), xtr, ytr, float_epochs, seed=0)
    rows = {"float": evaluate(float_model, xte, yte)}
    fused, observed = calibrate(float_model, xtr)
    rows["PTQ int8 (converted)"] = evaluate(jqn.convert(observed), xte, yte)
    for bits in bits_list:
        if simulate_ptq or bits != 8:
            rows[f"PTQ int{bits} weights (fq)"] = evaluate(ptq_sim(fused, observed, bits), xte, yte)
        qmodel = qat(float_model, xtr, ytr, qat_epochs, bits)
        rows[f"QAT int{bits} weights (fq)"] = evaluate(qmodel, xte, yte)
        qmodel.eval()
        rows[f"QAT int{bits} (converted)"] = evaluate(jqn.convert(qmodel), xte, yte)
    print(f"\nsklearn digits, jquant.nnx ({float_epochs} float epochs, {qat_epochs} QAT epochs; "
          f"8-bit activations, x86 qconfigs)")
    print(f"{'model':<28}{'test accuracy':>14}{'correct':>10}{'test NLL':>10}")
    for name, (acc, nll) in rows.items():
        print(f"{name:<28}{acc:>14.4f}{round(acc * len(yte)):>7}/{len(yte)}{nll:>10.4f}")
    return rows


def test_digits_float_ptq_qat_quick():
    rows = run(float_epochs=5, qat_epochs=2, bits_list=(8,), simulate_ptq=False)
    assert rows["float"][0] >= 0.9
    assert rows["PTQ int8 (converted)"][0] >= rows["float"][0] - 0.03
    assert rows["QAT int8 weights (fq)"][0] >= 0.9
    assert abs(rows["QAT int8 (converted)"][0] - rows["QAT int8 weights (fq)"][0]) <= 0.02


@pytest.mark.slow
def test_digits_float_ptq_qat_full():
    rows = run(float_epochs=20, qat_epochs=4, bits_list=(8, 4))
    assert rows["float"][0] >= 0.95
    assert rows["PTQ int8 (converted)"][0] >= rows["float"][0] - 0.02
    assert rows["PTQ int8 weights (fq)"][0] >= rows["float"][0] - 0.02
    assert rows["QAT int8 weights (fq)"][0] >= 0.95
    assert rows["QAT int4 weights (fq)"][0] >= 0.9
    assert abs(rows["QAT int4 (converted)"][0] - rows["QAT int4 weights (fq)"][0]) <= 0.02
