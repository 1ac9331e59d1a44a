"""``jax.export`` round trip of a converted model's integer forward, called in a fresh process.

The forward quantizes a float input (QuantStub), runs an integer Conv2d+ReLU, a Linear and
an 8-bit EmbeddingBag (traced offsets, per-sample weights), and dequantizes (DeQuantStub).
It is exported from ``jax.jit``, serialized, deserialized in a subprocess that imports
``jquant.quantized`` (which registers the packed-parameter NamedTuples for serialization),
and called on the same inputs: every output must be bit-identical to the in-process jit.
A second export has a symbolic batch dimension.
"""
from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

import jquant as jq
from jquant import quantized as Q

RNG = np.random.default_rng(11)


def _params():
    wc = RNG.standard_normal((6, 3, 3, 3)).astype(np.float32)
    pc = Q.pack_conv(wc, RNG.standard_normal(6).astype(np.float32),
                     jq.default_per_channel_weight_observer, output_qparams=(0.04, 3))
    wl = RNG.standard_normal((5, 6 * 4 * 4)).astype(np.float32) * 0.1
    pl = Q.pack_linear(wl, RNG.standard_normal(5).astype(np.float32),
                       jq.default_per_channel_weight_observer, output_qparams=(0.07, 131))
    pe = Q.pack_embedding(RNG.standard_normal((20, 8)).astype(np.float32))
    return pc, pl, pe


def forward(x, sx, zx, pc, pl, pe, idx, offsets, psw):
    xq = Q.quantize(x, sx, zx)
    y = Q.quantized_conv(xq, pc, padding="SAME", relu=True)
    y = Q.QTensor(y.q.reshape(y.q.shape[0], -1), y.scale, y.zero_point)
    z = Q.quantized_linear(y, pl)
    e = Q.quantized_embedding_bag(idx, pe, offsets, per_sample_weights=psw, max_bag_size=6)
    return Q.dequantize(z), z.q, e


def _to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def _bits(a):
    a = np.asarray(a)
    return a.view(np.uint32) if a.dtype == np.float32 else a


def test_export_roundtrip_fresh_process(tmp_path):
    pc, pl, pe = _params()
    x = RNG.standard_normal((2, 4, 4, 3)).astype(np.float32)
    idx = RNG.integers(0, 20, 10).astype(np.int32)
    offsets = np.array([0, 3, 3, 8], np.int32)
    psw = RNG.standard_normal(10).astype(np.float32)
    args = (x, np.float32(0.03), np.int32(117), pc, pl, pe, idx, offsets, psw)
    args = _to_numpy(args)
    fn = jax.jit(forward)
    want = _to_numpy(fn(*args))
    exported = jax.export.export(fn)(*args)
    # symbolic batch for the integer path
    b = jax.export.symbolic_shape("b")[0]
    lin = jax.jit(lambda q, s, z, p: Q.quantized_linear(Q.QTensor(q, s, z), p).q)
    xq = np.asarray(Q.quantize(RNG.standard_normal((7, 96)).astype(np.float32), 0.05, 9).q)
    exported_sym = jax.export.export(lin)(
        jax.ShapeDtypeStruct((b, 96), jnp.uint8), np.float32(0.05), np.int32(9), pl)
    want_sym = np.asarray(lin(xq, np.float32(0.05), np.int32(9), pl))

    blob = tmp_path / "model.pkl"
    with open(blob, "wb") as f:
        pickle.dump({"exported": bytes(exported.serialize()), "args": args,
                     "sym": bytes(exported_sym.serialize()),
                     "sym_args": (xq, np.float32(0.05), np.int32(9), _to_numpy(pl))}, f)
    out = tmp_path / "out.pkl"
    script = textwrap.dedent(f"""
        import pickle, jax, numpy as np
        import jquant.quantized  # registers the NamedTuples for deserialization
        with open({str(blob)!r}, "rb") as f:
            d = pickle.load(f)
        got = jax.export.deserialize(bytearray(d["exported"])).call(*d["args"])
        got_sym = jax.export.deserialize(bytearray(d["sym"])).call(*d["sym_args"])
        with open({str(out)!r}, "wb") as f:
            pickle.dump((jax.tree.map(np.asarray, got), np.asarray(got_sym)), f)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out, "rb") as f:
        got, got_sym = pickle.load(f)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.array_equal(_bits(g), _bits(w))
    assert np.array_equal(got_sym, want_sym) and got_sym.shape == (7, 5)
