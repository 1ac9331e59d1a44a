"""jquant.linen on several (host) devices, in a subprocess with 2 CPU devices.

Seed counterparts: test_device_affinity (params and quant state live on the inputs'
device, no extra changes needed to run there) and the data-parallel / SyncBatchNorm tests
(a fused conv-bn whose BatchNorm has ``axis_name`` plus observers reduced over the same
axis, under ``jax.shard_map``: identical state on every device, equal to one device
seeing the global batch).
"""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from jax.sharding import Mesh, PartitionSpec as P
    import jquant as jq, jquant.linen as jl

    class ConvBN(nn.Module):
        axis_name: str = None
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(3, (3, 3), padding=1, name="conv")(x)
            x = nn.BatchNorm(use_running_average=False, momentum=0.9, name="bn",
                             axis_name=self.axis_name)(x)
            return nn.Dense(2, name="fc")(nn.relu(x).reshape(x.shape[0], -1))

    qc = jq.get_default_qat_qconfig("x86")
    dev = jax.devices()[1]
    x = jax.device_put(jax.random.normal(jax.random.key(1), (4, 5, 5, 2)), dev)
    qm = jl.prepare_qat(ConvBN(), qc, fuse=[("conv", "bn", "relu")])
    v = jax.jit(qm.init)(jax.device_put(jax.random.key(0), dev), x)
    y, upd = jax.jit(lambda v, x: qm.apply(v, x, mutable=["quant_stats", "batch_stats"]))(v, x)
    for leaf in jax.tree.leaves((v, upd, y)):
        assert leaf.devices() == {dev}, leaf.devices()

    # data parallel: shard the batch over a 2-device mesh
    xg = jax.random.normal(jax.random.key(2), (8, 5, 5, 2))
    v = jax.jit(qm.init)(jax.random.key(0), xg)
    y1, upd1 = jax.jit(lambda v, x: qm.apply(v, x, mutable=["quant_stats", "batch_stats"]))(v, xg)
    dp = jl.prepare_qat(ConvBN(axis_name="data"), qc, fuse=[("conv", "bn", "relu")], axis_name="data")
    jax.eval_shape(dp.init, jax.random.key(0), xg)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    try:
        smap = jax.shard_map
    except AttributeError:
        from jax.experimental.shard_map import shard_map as smap

    def local(v, xs):
        y, upd = dp.apply(v, xs, mutable=["quant_stats", "batch_stats"])
        return y, jax.tree.map(lambda a: a[None], upd)

    f = jax.jit(smap(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P("data"))))
    ys, upds = f(v, xg)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(y1), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(upds), jax.tree.leaves(upd1)):
        a = np.asarray(a)
        np.testing.assert_array_equal(a[1], a[0])
        np.testing.assert_allclose(a[0], np.asarray(b), rtol=1e-6, atol=1e-7)
    print("OK")
''')


def test_device_affinity_and_data_parallel_in_subprocess():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-4000:]
