"""Flax Linen twins of tests/torch_models.py (module names match torch's)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

import jquant.linen as jl


class ReLU(nn.Module):
    """A ReLU *module* (flax has only the function): fusing it by path gives torch's exact
    ConvBnReLU gradient (the slot becomes the identity, as torch's nn.Identity)."""

    @nn.compact
    def __call__(self, x):
        return nn.relu(x)


class ParityCNN(nn.Module):
    """quant -> conv1-bn1-relu1 -> conv2 -> relu -> flatten -> fc -> dequant (NHWC)."""
    c1: int = 8
    c2: int = 8
    n_out: int = 10
    relu_module: bool = True

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = jl.QuantStub(name="quant")(x)
        x = nn.Conv(self.c1, (3, 3), padding=1, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn1")(x)
        x = ReLU(name="relu1")(x) if self.relu_module else nn.relu(x)
        x = nn.relu(nn.Conv(self.c2, (3, 3), padding=1, name="conv2")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(self.n_out, name="fc")(x)
        return jl.DeQuantStub(name="dequant")(x)


def parity_variables(weights):
    """Flax ``params`` / ``batch_stats`` from tests/torch_models.py's weight dict."""
    params = {k: {kk: jnp.asarray(vv) for kk, vv in weights[k].items()
                  if kk in ("kernel", "bias", "scale")} for k in ("conv1", "conv2", "fc", "bn1")}
    stats = {"bn1": {"mean": jnp.asarray(weights["bn1"]["mean"]),
                     "var": jnp.asarray(weights["bn1"]["var"])}}
    return params, stats


def parity_weights_of(variables):
    """The inverse of :func:`parity_variables` (numpy, same keys as torch_models)."""
    p, s = variables["params"], variables["batch_stats"]
    out = {k: {kk: vv for kk, vv in p[k].items()} for k in ("conv1", "conv2", "fc")}
    out["bn1"] = {**p["bn1"], **s["bn1"]}
    return out


#: :func:`parity_sequential_cnn`'s layer paths, by :class:`ParityCNN`'s module names.
SEQUENTIAL_PATHS = {"quant": "layers_0", "conv1": "layers_1", "bn1": "layers_2",
                    "conv2": "layers_4", "fc": "layers_7", "dequant": "layers_8"}


def parity_sequential_cnn(c1: int = 8, c2: int = 8, n_out: int = 10):
    """:class:`ParityCNN` (training mode) as an ``nn.Sequential`` whose ReLUs are ``nn.relu``
    layers: quant, conv1, bn1, relu, conv2, relu, flatten, fc, dequant (``layers_0`` ..
    ``layers_8``). Fusing ``(layers_1, layers_2, "relu")`` turns the relu after bn1 into the
    identity, as torch's ConvBnReLU2d does with its ReLU module."""
    return nn.Sequential([
        jl.QuantStub(),
        nn.Conv(c1, (3, 3), padding=1),
        nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5),
        nn.relu,
        nn.Conv(c2, (3, 3), padding=1),
        nn.relu,
        lambda x: x.reshape(x.shape[0], -1),
        nn.Dense(n_out),
        jl.DeQuantStub(),
    ])


def rename_top(tree: dict, names: dict) -> dict:
    """``tree`` with its top-level keys renamed by ``names`` (others kept)."""
    return {names.get(k, k): v for k, v in tree.items()}


def rename_paths(flat: dict, names: dict) -> dict:
    """Dotted-path keys (``"layers_1.weight_fake_quant.scale"``) with their first
    component renamed by ``names``."""
    out = {}
    for k, v in flat.items():
        head, _, rest = k.partition(".")
        out[".".join(p for p in (names.get(head, head), rest) if p)] = v
    return out
