"""torch twins of the Flax test models (the oracle side of the front-end parity tests).

Shared by the Linen and NNX tests (owned by the Linen tests; read-only for others).
Weights travel as a dict of numpy arrays in **Flax layout**, keyed by torch's module names::

    {"conv1": {"kernel": (kh, kw, in, out), "bias": (out,)},
     "bn1":   {"scale": (C,), "bias": (C,), "mean": (C,), "var": (C,)},
     "conv2": {...}, "fc": {"kernel": (in, out), "bias": (out,)}}

so a Flax model whose modules carry the same names (``name="conv1"`` ...) maps 1:1.
Flatten order: the torch models flatten NHWC (``permute(0, 2, 3, 1)``) as Flax does, so
dense kernels need no row permutation. torch is the oracle only; jquant never imports it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.ao.quantization as tq
from torch import nn


# ----------------------------------------------------------------------------------------
# layout conversion
# ----------------------------------------------------------------------------------------

def conv_kernel_to_torch(k):
    """Flax ``(*spatial, in, out)`` -> torch ``(out, in, *spatial)``."""
    k = np.asarray(k)
    nd = k.ndim
    return np.ascontiguousarray(np.transpose(k, (nd - 1, nd - 2) + tuple(range(nd - 2))))


def conv_kernel_from_torch(w):
    """torch ``(out, in, *spatial)`` -> Flax ``(*spatial, in, out)``."""
    w = np.asarray(w)
    nd = w.ndim
    return np.ascontiguousarray(np.transpose(w, tuple(range(2, nd)) + (1, 0)))


def dense_kernel_to_torch(k):
    return np.ascontiguousarray(np.asarray(k).T)


def dense_kernel_from_torch(w):
    return np.ascontiguousarray(np.asarray(w).T)


def _t(a):
    return torch.tensor(np.asarray(a, np.float32))


# ----------------------------------------------------------------------------------------
# the parity CNN: quant -> conv-bn-relu -> conv -> relu -> flatten (NHWC) -> fc -> dequant
# ----------------------------------------------------------------------------------------

class ParityCNN(nn.Module):
    """The small CNN of the end-to-end parity tests (NHWC input, like the Flax twin).

    Modules: ``quant, conv1, bn1, relu1, conv2, relu2, fc, dequant``. Input ``(N, H, W,
    in_ch)`` float32; output ``(N, n_out)`` logits.
    """

    def __init__(self, in_ch=1, c1=8, c2=8, hw=8, n_out=10):
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = nn.Conv2d(in_ch, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(c2 * hw * hw, n_out)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        x = self.quant(x.permute(0, 3, 1, 2))
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        x = x.permute(0, 2, 3, 1).flatten(1)
        return self.dequant(self.fc(x))


def parity_cnn_weights(rng: np.random.Generator, in_ch=1, c1=8, c2=8, hw=8, n_out=10):
    """Random weights for :class:`ParityCNN` in Flax layout (torch-like init scales)."""
    def u(shape, fan_in):
        b = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-b, b, shape).astype(np.float32)
    return {
        "conv1": {"kernel": u((3, 3, in_ch, c1), 9 * in_ch), "bias": u((c1,), 9 * in_ch)},
        "bn1": {"scale": rng.uniform(0.5, 1.5, c1).astype(np.float32),
                "bias": rng.uniform(-0.2, 0.2, c1).astype(np.float32),
                "mean": np.zeros(c1, np.float32), "var": np.ones(c1, np.float32)},
        "conv2": {"kernel": u((3, 3, c1, c2), 9 * c1), "bias": u((c2,), 9 * c1)},
        "fc": {"kernel": u((c2 * hw * hw, n_out), c2 * hw * hw), "bias": u((n_out,), c2 * hw * hw)},
    }


def build_parity_cnn(weights, backend: str, in_ch=1, c1=8, c2=8, hw=8, n_out=10):
    """torch's prepared QAT twin: fuse_modules_qat(conv1, bn1, relu1) + prepare_qat.

    ``weights``: Flax-layout dict (see module docstring). Qconfig:
    ``get_default_qat_qconfig(backend)`` (version 1, the fused fake quants). Returns the
    model in training mode.
    """
    m = float_parity_cnn(weights, in_ch, c1, c2, hw, n_out)
    m.train()
    m = tq.fuse_modules_qat(m, [["conv1", "bn1", "relu1"]])
    m.qconfig = tq.get_default_qat_qconfig(backend)
    tq.prepare_qat(m, inplace=True)
    return m


def float_parity_cnn(weights, in_ch=1, c1=8, c2=8, hw=8, n_out=10):
    """The float :class:`ParityCNN` with ``weights`` (Flax layout) loaded."""
    m = ParityCNN(in_ch, c1, c2, hw, n_out)
    with torch.no_grad():
        m.conv1.weight.copy_(_t(conv_kernel_to_torch(weights["conv1"]["kernel"])))
        m.conv1.bias.copy_(_t(weights["conv1"]["bias"]))
        m.bn1.weight.copy_(_t(weights["bn1"]["scale"]))
        m.bn1.bias.copy_(_t(weights["bn1"]["bias"]))
        m.bn1.running_mean.copy_(_t(weights["bn1"]["mean"]))
        m.bn1.running_var.copy_(_t(weights["bn1"]["var"]))
        m.conv2.weight.copy_(_t(conv_kernel_to_torch(weights["conv2"]["kernel"])))
        m.conv2.bias.copy_(_t(weights["conv2"]["bias"]))
        m.fc.weight.copy_(_t(dense_kernel_to_torch(weights["fc"]["kernel"])))
        m.fc.bias.copy_(_t(weights["fc"]["bias"]))
    return m


def parity_cnn_state(m) -> dict:
    """The prepared torch twin's float weights in Flax layout, keyed like :func:`parity_cnn_weights`."""
    sd = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    return {
        "conv1": {"kernel": conv_kernel_from_torch(sd["conv1.weight"]), "bias": sd["conv1.bias"]},
        "bn1": {"scale": sd["conv1.bn.weight"], "bias": sd["conv1.bn.bias"],
                "mean": sd["conv1.bn.running_mean"], "var": sd["conv1.bn.running_var"]},
        "conv2": {"kernel": conv_kernel_from_torch(sd["conv2.weight"]), "bias": sd["conv2.bias"]},
        "fc": {"kernel": dense_kernel_from_torch(sd["fc.weight"]), "bias": sd["fc.bias"]},
    }


def observer_state(m) -> dict:
    """Every ``weight_fake_quant`` / ``activation_post_process`` buffer of a torch model.

    Keys as in torch's state_dict (``conv1.activation_post_process.scale`` ...), values
    numpy.
    """
    return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()
            if "activation_post_process" in k or "weight_fake_quant" in k}


def sgd_step(m, opt, x, y):
    """One torch SGD step on cross-entropy; returns the logits of that step (numpy)."""
    opt.zero_grad()
    logits = m(torch.from_numpy(np.asarray(x, np.float32)))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(np.asarray(y, np.int64)))
    loss.backward()
    opt.step()
    return logits.detach().numpy().copy()


# ----------------------------------------------------------------------------------------
# seed models (torch.testing._internal.common_quantization)
# ----------------------------------------------------------------------------------------

class EmbeddingBagPair(nn.Module):
    """test_embedding_bag_qat_config's model: two EmbeddingBags (10 x 12, sum,
    include_last_offset) concatenated."""

    def __init__(self):
        super().__init__()
        self.emb1 = nn.EmbeddingBag(10, 12, include_last_offset=True, scale_grad_by_freq=False,
                                    mode="sum")
        self.emb2 = nn.EmbeddingBag(10, 12, include_last_offset=True, scale_grad_by_freq=False,
                                    mode="sum")

    def forward(self, indices):
        return torch.cat((self.emb1(indices), self.emb2(indices)))


class DeFusedEmbeddingBagLinear(nn.Module):
    """torch's ``common_quantization.DeFusedEmbeddingBagLinear`` (re-declared: importing
    torch.testing._internal needs the ``expecttest`` package): Embedding(10, 12) with
    ``default_embedding_qat_qconfig``, QuantStub, Linear(12, 1), DeQuantStub."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(num_embeddings=10, embedding_dim=12)
        self.emb.qconfig = tq.default_embedding_qat_qconfig
        self.quant = tq.QuantStub()
        self.linear = nn.Linear(12, 1).to(dtype=torch.float)
        self.dequant = tq.DeQuantStub()

    def forward(self, indices):
        x = self.emb(indices)
        x = self.quant(x)
        x = self.linear(x)
        return self.dequant(x)


def defused_embedding_bag_linear(qconfig=None):
    m = DeFusedEmbeddingBagLinear()
    m.qconfig = qconfig if qconfig is not None else tq.get_default_qat_qconfig("x86")
    m.emb.qconfig = tq.default_embedding_qat_qconfig
    return m.train()
