"""Cross-device observer sync and device affinity, on 8 forced host CPU devices.

The checks live in ``tests/multidevice_worker.py`` and run in one fresh interpreter, because
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax is imported.
Each test below asserts that its check passed there.

* ``update(state, x, axis_name=...)`` of every observer, and ``apply`` of every fake-quantize
  module (``axis_name`` passes through to the observer / fused op), under ``jax.shard_map``
  (also with ``out_specs=P()``, which proves the state device-invariant) and ``jax.pmap``:
  for several steps, with observer / fake-quant flags flipped between steps, each device's
  state is bit-identical to the single-device state over the concatenated batch, and the
  fake-quantized shards concatenate to the single-device output. RecordingObserver
  all-gathers the batch. Also a 4x2 mesh reducing over both axes.
* LSQ gradients: the (device-summed) gradient of a replicated learnable scale / zero point
  equals the single-device gradient, ``use_grad_scaling`` counting the global batch.
* A jitted data-parallel QAT loop: weights plus weight / activation fake-quant states carried
  through ``lax.scan`` inside ``shard_map``, observers frozen for the second phase (torch's
  ``test_qat_data_parallel``): identical on every device, equal to the single-device loop.
* Device affinity (torch's ``test_state_dict_respects_device_affinity``,
  ``test_observer_qparams_respects_device_affinity``, ``test_device_affinity``): states
  made by ``init(x)`` live on ``x``'s device (``jax.device_put``), stay there through
  ``update`` / ``apply`` / ``calculate_qparams``, loaded states placed on a target device
  stay there; with a sharded ``x`` states are replicated on its mesh.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import multidevice_worker as worker

WORKER = Path(__file__).with_name("multidevice_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("multidevice") / "results.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True,
                          text=True, timeout=900, env=env, cwd=WORKER.parent.parent)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def _assert_ok(results, name):
    assert name in results, f"check {name} did not run"
    assert results[name] == "ok", results[name]


def test_worker_ran_every_check(results):
    assert sorted(results) == sorted(worker.CHECKS)


OBSERVER_CHECKS = sorted(n for n in worker.CHECKS if n.startswith("sync_observer_"))
MODULE_CHECKS = sorted(n for n in worker.CHECKS if n.startswith("sync_module_"))


@pytest.mark.parametrize("check", OBSERVER_CHECKS,
                         ids=[n[len("sync_observer_"):] for n in OBSERVER_CHECKS])
def test_observer_update_syncs_across_devices(results, check):
    _assert_ok(results, check)


@pytest.mark.parametrize("check", MODULE_CHECKS,
                         ids=[n[len("sync_module_"):] for n in MODULE_CHECKS])
def test_fake_quantize_apply_syncs_across_devices(results, check):
    _assert_ok(results, check)


def test_fused_op_syncs_across_devices(results):
    _assert_ok(results, "sync_fused_op_functional")


def test_two_axis_mesh(results):
    _assert_ok(results, "sync_two_axis_mesh")


def test_learnable_grads_sum_to_single_device_grads(results):
    _assert_ok(results, "learnable_grads_sum_to_single_device_grads")


def test_qat_data_parallel(results):
    _assert_ok(results, "qat_data_parallel")


def test_state_dict_respects_device_affinity(results):
    _assert_ok(results, "state_dict_respects_device_affinity")


def test_observer_qparams_respects_device_affinity(results):
    _assert_ok(results, "observer_qparams_respects_device_affinity")


def test_device_affinity(results):
    _assert_ok(results, "device_affinity")


def test_sharding_affinity(results):
    _assert_ok(results, "sharding_affinity")
