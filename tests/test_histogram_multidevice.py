"""``update(state, x, axis_name=...)`` of the histogram observers on 8 CPU devices.

Every device agrees on the range, bins its shard and the counts are summed: the state on
every device equals the single-device state over the concatenated batch, bit for bit,
after every batch (first batch, same range, growth, infs in one shard, a NaN in one shard,
a constant batch). Runs in a fresh process (the device-count flag must precede jax).
"""
import os
import subprocess
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def _worker():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    import jquant as jq

    n_dev = 8
    assert jax.device_count() == n_dev, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # older jax
        from jax.experimental.shard_map import shard_map

    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((8 * 16, 3)) * 0.5, rng.standard_normal((8 * 16, 3)),
               rng.standard_normal((8 * 16, 3)) * 4.0, rng.standard_normal((8 * 16, 3))]
    b = rng.standard_normal((8 * 16, 3))
    b[:16] = np.inf                                   # one device sees only infinities
    batches.append(b)
    b = rng.standard_normal((8 * 16, 3))
    b[20, 1] = np.nan                                 # a NaN on one device: ignored everywhere
    batches.append(b)
    batches.append(np.full((8 * 16, 3), 2.5))
    batches = [x.astype(np.float32) for x in batches]

    for obs in (jq.HistogramObserver(bins=128),
                jq.PerChannelHistogramObserver(ch_axis=1, bins=64,
                                               qscheme=jq.per_channel_symmetric)):
        state = obs.init(batches[0])
        state_sp = jax.tree.map(lambda a: np.stack([np.asarray(a)] * n_dev), state)

        def sharded(st, x):
            st = jax.tree.map(lambda a: a[0], st)
            new = obs.update(st, x, axis_name="data")
            return jax.tree.map(lambda a: a[None], new)

        spec_state = jax.tree.map(lambda _: P("data"), state)
        f = jax.jit(shard_map(sharded, mesh=mesh, in_specs=(spec_state, P("data")),
                              out_specs=spec_state))
        single = jax.jit(obs.update)
        for i, x in enumerate(batches):
            state = single(state, x)
            state_sp = f(state_sp, x)
            for leaf, leaves in zip(jax.tree.leaves(state), jax.tree.leaves(state_sp)):
                for d in range(n_dev):
                    np.testing.assert_array_equal(np.asarray(leaves)[d], np.asarray(leaf),
                                                  err_msg=f"{type(obs).__name__} batch {i}")
        # the qparams agree too
        q = obs.calculate_qparams(state)
        q_sp = obs.calculate_qparams(jax.tree.map(lambda a: a[3], state_sp))
        for a, b in zip(q, q_sp):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("MULTIDEVICE-OK")


def test_axis_name_equals_concatenated_batch():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0 and "MULTIDEVICE-OK" in proc.stdout, proc.stdout + proc.stderr


if __name__ == "__main__":
    _worker()
