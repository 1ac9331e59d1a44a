"""sklearn digits end to end with real integer inference (issue [4]).

float CNN -> PTQ (MinMax and Histogram activation observers, BN folded, per-channel int8
weights) -> converted int8 model, and QAT -> converted model. Each converted model is
checked against its fake-quant twin (PTQ: the calibrated qparams frozen in fake quants;
QAT: the trained model in eval) — within 0.5 accuracy points — and is ~4x smaller in
parameter bytes. The table is printed (pytest -s). Quick by default; the slow variant
trains longer.
"""
from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jquant as jq
import jquant.nnx as jqn
from test_nnx_digits import FUSE, DigitsCNN, evaluate, load, qat, train

warnings.filterwarnings("ignore")
BATCH = 64


def _observed(float_model, xtr, act, n_calib):
    from test_nnx_digits import forward
    float_model.eval()
    fused = jqn.fuse_modules(float_model, FUSE)
    qc = jq.QConfig(activation=act.with_args(reduce_range=True),
                    weight=jq.default_per_channel_weight_observer)
    observed = jqn.prepare(fused, qc)
    for i in range(n_calib):
        forward(observed, jnp.asarray(xtr[i * BATCH:(i + 1) * BATCH]))
    return fused, observed


def _fake_quant_twin(fused, observed):
    """The PTQ model simulated with fake quant at the calibrated activation qparams."""
    sim_qconfig = jq.QConfig(
        activation=jq.FakeQuantize.with_args(observer=jq.MinMaxObserver, quant_min=0,
                                             quant_max=127),
        weight=jq.FakeQuantize.with_args(observer=jq.PerChannelMinMaxObserver, quant_min=-128,
                                         quant_max=127, dtype=jq.qint8,
                                         qscheme=jq.per_channel_symmetric))
    sim = jqn.prepare_qat(fused, sim_qconfig)
    sim_obs = jqn.get_observer_dict(sim)
    for path, pp in jqn.get_observer_dict(observed).items():
        scale, zero_point = pp.calculate_qparams()
        target = sim_obs[path]
        target.set_state(target.state._replace(scale=scale, zero_point=zero_point))
        jq.disable_observer(target)
    return sim


def run(float_epochs, qat_epochs, n_calib):
    xtr, xte, ytr, yte = load()
    float_model = train(DigitsCNN(), optax.adam(3e-3), xtr, ytr, float_epochs, seed=0)
    rows = {"float": (evaluate(float_model, xte, yte), jqn.parameter_bytes(float_model))}
    pairs = []
    for name, act in (("MinMax", jq.MinMaxObserver), ("Histogram", jq.HistogramObserver)):
        fused, observed = _observed(float_model, xtr, act, n_calib)
        sim = _fake_quant_twin(fused, observed)
        conv = jqn.convert(observed)
        rows[f"PTQ {name} fake-quant"] = (evaluate(sim, xte, yte), None)
        rows[f"PTQ {name} converted"] = (evaluate(conv, xte, yte), jqn.parameter_bytes(conv))
        pairs.append((f"PTQ {name} converted", f"PTQ {name} fake-quant"))
    q = qat(float_model, xtr, ytr, qat_epochs)  # observers and BN frozen for the last epoch
    rows["QAT fake-quant"] = (evaluate(q, xte, yte), None)
    conv = jqn.convert(q)
    rows["QAT converted"] = (evaluate(conv, xte, yte), jqn.parameter_bytes(conv))
    pairs.append(("QAT converted", "QAT fake-quant"))
    print(f"\nsklearn digits, jquant.nnx convert ({float_epochs} float epochs, {qat_epochs} QAT "
          f"epochs, {n_calib} calibration batches; x86 rules, 7-bit activations, int8 weights)")
    print(f"{'model':<26}{'accuracy':>10}{'correct':>10}{'NLL':>9}{'param bytes':>13}")
    for name, ((acc, nll), nbytes) in rows.items():
        print(f"{name:<26}{acc:>10.4f}{round(acc * len(yte)):>6}/{len(yte)}{nll:>9.4f}"
              f"{'' if nbytes is None else nbytes:>13}")
    return rows, pairs


def _check(rows, pairs):
    fb = rows["float"][1]
    assert rows["float"][0][0] >= 0.9
    for conv, fq in pairs:
        (acc_c, _), qb = rows[conv]
        acc_f = rows[fq][0][0]
        assert abs(acc_c - acc_f) <= 0.005 + 1e-9, (conv, acc_c, acc_f)
        assert acc_c >= rows["float"][0][0] - 0.03, conv
        assert 3.5 <= fb / qb <= 4.1, (conv, fb, qb)


def test_digits_convert_quick():
    _check(*run(float_epochs=3, qat_epochs=2, n_calib=4))


@pytest.mark.slow
def test_digits_convert_full():
    _check(*run(float_epochs=10, qat_epochs=4, n_calib=16))
