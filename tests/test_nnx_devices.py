"""jquant.nnx on several (host) devices, in a subprocess with 2 CPU devices.

Counterparts of torch's test_device_affinity (a prepared model's params and quant state
sit on the device of the float model / inputs) and of the SyncBatchNorm tests
(test_qat_convbn_fused_syncbn_replacement / test_syncbn_preserves_qconfig): flax's
synchronised BatchNorm is ``nnx.BatchNorm(axis_name=...)``; a fused ConvBn keeps it and
its qconfig, and under ``shard_map`` the fused BN statistics and every observer
(``prepare_qat(..., axis_name=...)``) equal a single-device run on the whole batch.
"""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r'''
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import numpy as np
    import jax, jax.numpy as jnp, optax
    from jax.sharding import Mesh, PartitionSpec as P
    from flax import nnx
    import jquant as jq, jquant.nnx as jqn

    assert len(jax.devices()) == 2
    rng = np.random.default_rng(0)
    Z = nnx.initializers.zeros
    KC = jnp.asarray(rng.standard_normal((3, 3, 1, 4)).astype(np.float32))
    KF = jnp.asarray(rng.standard_normal((64, 3)).astype(np.float32) / 8)

    class Net(nnx.Module):
        def __init__(self, axis_name=None):
            r = nnx.Rngs(0)
            self.quant = jqn.QuantStub()
            self.conv = nnx.Conv(1, 4, (3, 3), kernel_init=Z, rngs=r)
            self.bn = nnx.BatchNorm(4, momentum=0.9, axis_name=axis_name, rngs=r)
            self.act = nnx.relu
            self.fc = nnx.Linear(4 * 16, 3, kernel_init=Z, rngs=r)
            self.conv.kernel[...] = KC
            self.fc.kernel[...] = KF

        def __call__(self, x):
            x = self.act(self.bn(self.conv(self.quant(x))))
            return self.fc(x.reshape(x.shape[0], -1))

    qconfig = jq.get_default_qat_qconfig("x86")

    # -- device affinity ------------------------------------------------------------------
    dev = jax.devices()[1]
    model = Net()
    nnx.update(model, jax.device_put(nnx.state(model), dev))
    q = jqn.prepare_qat(model, qconfig, fuse=[("conv", "bn", "act")])
    q.train()
    devices = {d for leaf in jax.tree.leaves(nnx.state(q)) for d in leaf.devices()}
    assert devices == {dev}, devices
    opt = nnx.Optimizer(q, optax.sgd(0.01), wrt=nnx.Param)

    @nnx.jit
    def step(m, o, x, y):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        l, g = nnx.value_and_grad(loss)(m)
        o.update(m, g)
        return l

    x = jax.device_put(jnp.asarray(rng.standard_normal((4, 4, 4, 1)).astype(np.float32)), dev)
    y = jax.device_put(jnp.arange(4) % 3, dev)
    step(q, opt, x, y)
    devices = {d for leaf in jax.tree.leaves(nnx.state(q)) for d in leaf.devices()}
    assert devices == {dev}, devices
    print("device affinity ok")

    # -- synchronised BatchNorm / observers across devices --------------------------------
    mesh = Mesh(np.array(jax.devices()), ("data",))
    xs = jnp.asarray(rng.standard_normal((8, 4, 4, 1)).astype(np.float32))
    sync = jqn.prepare_qat(Net(axis_name="data"), qconfig, fuse=[("conv", "bn", "act")],
                           axis_name="data")
    ref = jqn.prepare_qat(Net(), qconfig, fuse=[("conv", "bn", "act")])
    sync.train(); ref.train()
    assert sync.conv.bn.axis_name == "data" and sync.conv.qconfig == qconfig  # qconfig kept
    gdef, state = nnx.split(sync)

    def fwd(state, x):
        m = nnx.merge(gdef, state)
        out = m(x)
        return out, nnx.state(m)

    sharded = jax.jit(jax.shard_map(fwd, mesh=mesh, in_specs=(P(), P("data")),
                                    out_specs=(P("data"), P()), check_vma=False))
    for i in range(2):
        out, new_state = sharded(state, xs * (i + 1))
        state = new_state
        ref_out = nnx.jit(lambda m, a: m(a))(ref, xs * (i + 1))
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    nnx.update(sync, state)
    for name in ("mean", "var"):
        np.testing.assert_allclose(getattr(sync.conv.bn, name)[...], getattr(ref.conv.bn, name)[...],
                                   rtol=1e-5, atol=1e-7)
    a, b = jqn.get_observer_state_dict(sync), jqn.get_observer_state_dict(ref)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)
    print("sync ok")
''')


def test_device_affinity_and_sync_batchnorm_in_subprocess():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), os.getcwd()) if p)
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "device affinity ok" in r.stdout and "sync ok" in r.stdout
