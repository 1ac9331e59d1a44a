"""Smoke tests: the public API imports and the documented examples run."""
import jax
import jax.numpy as jnp
import numpy as np

import jquant as jq


def test_public_names_exist():
    for name in jq.__all__:
        assert hasattr(jq, name), name


def test_fake_quant_doc_example_matches_reference():
    # REFERENCE §4.2: default_fake_quant on [-1, 0, 0.5, 2].
    fq = jq.default_fake_quant()
    x = jnp.array([-1.0, 0.0, 0.5, 2.0])
    state = fq.init(x)
    y, state = fq(state, x)
    np.testing.assert_array_equal(np.asarray(state.zero_point), [42])
    np.testing.assert_allclose(np.asarray(y), [-0.992126, 0.0, 0.496063, 2.007874], rtol=1e-6)
    _, state = jax.jit(fq.apply)(state, 10 * x)
    np.testing.assert_allclose(float(state.activation_post_process.min_val), -1.09, rtol=1e-6)
    np.testing.assert_allclose(float(state.activation_post_process.max_val), 2.18, rtol=1e-6)
