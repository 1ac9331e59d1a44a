"""End-to-end torch parity of jquant.nnx QAT (torch 2.13 is the oracle).

The small CNN of tests/torch_models.py (quant stub, conv-bn-relu fused, conv, relu, dense)
as an unmodified flax.nnx model with identical weights, fused and prepared with
``get_default_qat_qconfig(backend)`` for x86 and qnnpack, trained 20 identical SGD steps
(``nnx.jit`` + ``nnx.value_and_grad`` + ``nnx.Optimizer``) on identical sklearn-digits
batches; observers are disabled after step 12 and BatchNorm statistics frozen after step
15 in both frameworks. After every step the logits, every observer / fake-quant buffer
and every float weight / BatchNorm statistic must agree.

Bound achieved (and asserted): max |jquant - torch| <= 1e-5 * max |torch| per tensor,
every step; zero points, flags and quantized ranges equal. Measured: <= ~2.5e-7 relative.
Where it cannot be bit-exact: float32 summation order (XLA's convolution / reduction
order differs from torch's mkldnn / ATen kernels, gradients and BatchNorm statistics
included), so weights drift by ulps. No fake-quant rounding flip occurred in these steps;
a flip (an element within ~1 ulp of a rounding boundary) would move one element by one
quantization step, which is why the bound is per tensor against its largest value.
The fused BatchNorm uses ``bn_unbiased_running_var=True`` (torch's running-variance update).
"""
import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
import torch
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.quantization as tq
from flax import nnx
from sklearn.datasets import load_digits

import jquant as jq
import jquant.nnx as jqn
import torch_models as tm

STEPS = 20
BATCH = 16
RTOL = 1e-5
DISABLE_OBSERVER_AT = 12
FREEZE_BN_AT = 15


class NNXParityCNN(nnx.Module):
    """The NNX twin of ``torch_models.ParityCNN`` (NHWC; module names as torch's)."""

    def __init__(self, weights=None, *, relu_attr=True, c1=8, c2=8, hw=8, n_out=10):
        rngs = nnx.Rngs(0)
        z = nnx.initializers.zeros  # weights are copied in (random init compiles slowly on CPU)
        self.quant = jqn.QuantStub()
        self.conv1 = nnx.Conv(1, c1, (3, 3), padding=1, kernel_init=z, rngs=rngs)
        self.bn1 = nnx.BatchNorm(c1, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.relu_attr = relu_attr
        if relu_attr:
            self.relu1 = nnx.relu  # a relu *attribute*: fusion turns it into Identity, as torch
        self.conv2 = nnx.Conv(c1, c2, (3, 3), padding=1, kernel_init=z, rngs=rngs)
        self.fc = nnx.Linear(c2 * hw * hw, n_out, kernel_init=z, rngs=rngs)
        self.dequant = jqn.DeQuantStub()
        if weights is not None:
            for mod, entries in weights.items():
                for name, value in entries.items():
                    getattr(self, mod).__getattribute__(name)[...] = jnp.asarray(value)

    def __call__(self, x):
        x = self.quant(x)
        x = self.bn1(self.conv1(x))
        x = self.relu1(x) if self.relu_attr else nnx.relu(x)
        x = nnx.relu(self.conv2(x))
        x = x.reshape(x.shape[0], -1)
        return self.dequant(self.fc(x))


def _digits():
    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[..., None], d.target.astype(np.int32)


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) if b.size else 0.0


def _weights_of(model):
    c1 = model.conv1
    return {"conv1": {"kernel": c1.kernel[...], "bias": c1.bias[...]},
            "bn1": {"scale": c1.bn.scale[...], "bias": c1.bn.bias[...], "mean": c1.bn.mean[...],
                    "var": c1.bn.var[...]},
            "conv2": {"kernel": model.conv2.kernel[...], "bias": model.conv2.bias[...]},
            "fc": {"kernel": model.fc.kernel[...], "bias": model.fc.bias[...]}}


@nnx.jit
def _train_step(model, optimizer, x, y):
    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits
    (_, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return logits


def _prepared(weights, backend, relu="relu1", relu_attr=True):
    model = NNXParityCNN(weights, relu_attr=relu_attr)
    qmodel = jqn.prepare_qat(model, jq.get_default_qat_qconfig(backend),
                             fuse=[("conv1", "bn1", relu)], bn_unbiased_running_var=True)
    qmodel.train()
    return qmodel


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_cnn_qat_20_steps_match_torch(backend):
    torch.manual_seed(0)
    X, Y = _digits()
    weights = tm.parity_cnn_weights(np.random.default_rng(0))
    tmodel = tm.build_parity_cnn(weights, backend)
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.01)

    model = _prepared(weights, backend)
    assert type(model.conv1) is jqn.qat.ConvBnReLU and type(model.bn1) is jqn.Identity
    optimizer = nnx.Optimizer(model, optax.sgd(0.01), wrt=nnx.Param)

    worst = {"logits": 0.0, "observers": 0.0, "weights": 0.0}
    for s in range(STEPS):
        if s == DISABLE_OBSERVER_AT:
            tmodel.apply(tq.disable_observer)
            jq.disable_observer(model)
        if s == FREEZE_BN_AT:
            tmodel.apply(nniqat.freeze_bn_stats)
            jqn.freeze_bn_stats(model)
        x, y = X[s * BATCH:(s + 1) * BATCH], Y[s * BATCH:(s + 1) * BATCH]
        t_logits = tm.sgd_step(tmodel, topt, x, y)
        logits = _train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y))

        worst["logits"] = max(worst["logits"], _rel(logits, t_logits))
        assert worst["logits"] <= RTOL, (s, worst)
        t_obs = tm.observer_state(tmodel)
        j_obs = jqn.get_observer_state_dict(model)
        assert set(t_obs) == set(j_obs), set(t_obs) ^ set(j_obs)
        for k, tv in t_obs.items():
            jv = j_obs[k]
            if "zero_point" in k or "enabled" in k:
                np.testing.assert_array_equal(jv.astype(np.int64), tv.astype(np.int64), err_msg=k)
            else:
                worst["observers"] = max(worst["observers"], _rel(jv, tv))
                assert _rel(jv, tv) <= RTOL, (s, k, jv, tv)
        t_w = tm.parity_cnn_state(tmodel)
        j_w = _weights_of(model)
        for mod, entries in t_w.items():
            for name, tv in entries.items():
                worst["weights"] = max(worst["weights"], _rel(j_w[mod][name], tv))
                assert _rel(j_w[mod][name], tv) <= RTOL, (s, mod, name)
    # frozen BN: running stats unchanged since the freeze, in both
    print(f"\nnnx {backend}: worst relative deviation over {STEPS} steps: "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


@pytest.mark.slow
def test_functional_relu_fusion_warns_and_stays_close():
    """Fusing a ReLU the model applies as a function (a path naming nothing): identical
    first forward; the model's own relu blocks the gradient of outputs that fake-quantize to
    exactly 0 (warned, documented), so weights stay close to torch but not within 1e-5."""
    X, Y = _digits()
    weights = tm.parity_cnn_weights(np.random.default_rng(1))
    tmodel = tm.build_parity_cnn(weights, "x86")
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.01)
    with pytest.warns(UserWarning, match="zero derivative"):
        model = _prepared(weights, "x86", relu="relu", relu_attr=False)
    optimizer = nnx.Optimizer(model, optax.sgd(0.01), wrt=nnx.Param)
    for s in range(5):
        x, y = X[s * BATCH:(s + 1) * BATCH], Y[s * BATCH:(s + 1) * BATCH]
        t_logits = tm.sgd_step(tmodel, topt, x, y)
        logits = _train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y))
        if s == 0:
            assert _rel(logits, t_logits) <= RTOL
    t_w = tm.parity_cnn_state(tmodel)
    j_w = _weights_of(model)
    dev = max(_rel(j_w[m][n], t_w[m][n]) for m in t_w for n in t_w[m])
    print(f"\nReLU fused as a function: worst weight deviation after 5 steps {dev:.2e}")
    assert dev <= 1e-2
