"""Mosaic GPU (Hopper) gated-delta-rule kernels against the pure-JAX references, in GPU
interpret mode on CPU with the race detector on (a race raises), and lowered for CUDA
without a GPU.

Interpreted: all three chunked kernels (prepare with the blocked triangular inverse, the
serial state pass with its TMA pipeline and its 2-slot ring of output tiles, the parallel
output pass) and the decode step, with their real TMA copies, barriers, swizzled shared
memory, wgmma, column reductions and masks. Lowered for CUDA only: the state pass's
in-place accumulation into S (``pl.run_state``, not interpreted). Only a GPU proves:
asynchronous wgmma completion (synchronous in the interpreter), ``approx_math`` exp,
register allocation and spills (ptxas), the shared-memory limit (counted by the
wrappers) and speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar.kernels_pallas import gated_delta_rule as ref
from tests.mosaic_interpret import lower_for_cuda, mosaic_kernel_count, requires_interpret

pytestmark = requires_interpret

BF16 = jnp.bfloat16

# Jitted references: one compile each instead of op-by-op dispatch.
chunk_ref = jax.jit(ref.chunk_gated_delta_rule)
step_ref = jax.jit(ref.gated_delta_rule_step, static_argnames=("use_qk_l2norm", "scale"))


def _gm():
    from jaxpar.kernels_pallas import gated_delta_rule_mgpu

    return gated_delta_rule_mgpu


def gdn_inputs(rng, b, t, hk, hv, d=128, dtype=BF16):
    def x(*shape):
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    g = -jnp.asarray(rng.uniform(0.01, 0.4, (b, t, hv)), jnp.float32)  # log decay <= 0
    beta = jnp.asarray(rng.uniform(0.0, 1.0, (b, t, hv)), jnp.float32)
    return x(b, t, hk, d), x(b, t, hk, d), x(b, t, hv, d), g, beta


def assert_close(x, x_ref, rel):
    """Within rel of the reference's largest magnitude (bf16 operands, float32 maths)."""
    x, x_ref = np.asarray(x, np.float32), np.asarray(x_ref, np.float32)
    np.testing.assert_allclose(x, x_ref, atol=rel * float(np.abs(x_ref).max()), rtol=0)


# (B, T, Hk, Hv, lengths, with initial state, dtype): T = 100 (a partial second chunk) with
# ragged rows and GQA 2, bf16; T = 200 (4 chunks: the state pipeline past its 2 stages)
# without extras, f16.
CHUNKED_CASES = [
    (2, 100, 1, 2, [100, 37], True, BF16),
    (1, 200, 2, 2, None, False, jnp.float16),
]


@pytest.mark.parametrize("b,t,hk,hv,lengths,with_state,dtype", CHUNKED_CASES)
def test_chunked_matches_reference(b, t, hk, hv, lengths, with_state, dtype):
    rng = np.random.default_rng(t)
    q, k, v, g, beta = gdn_inputs(rng, b, t, hk, hv, dtype=dtype)
    kw = dict(
        initial_state=jnp.asarray(rng.standard_normal((b, hv, 128, 128)) * 0.1, jnp.float32)
        if with_state
        else None,
        lengths=None if lengths is None else jnp.asarray(lengths, jnp.int32),
    )
    o, state = jax.jit(lambda *a: _gm().chunk_gated_delta_rule_mgpu(*a, interpret=True, **kw))(
        q, k, v, g, beta
    )
    o_ref, state_ref = chunk_ref(q, k, v, g, beta, **kw)
    assert o.dtype == dtype and o.shape == v.shape and state.dtype == jnp.float32
    assert_close(o, o_ref, 2e-2)
    assert_close(state, state_ref, 2e-2)
    if lengths is not None:
        for row, n in enumerate(lengths):
            assert not np.any(np.asarray(o[row, n:], np.float32))  # padding outputs zero


@pytest.mark.parametrize("hk,hv,block_v,l2", [(2, 4, 64, True), (2, 2, 128, False)])
def test_decode_step_matches_reference(hk, hv, block_v, l2):
    rng = np.random.default_rng(hv)
    b, d = 2, 128
    x = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32)).astype(BF16)  # noqa: E731
    q, k, v = x(b, hk, d), x(b, hk, d), x(b, hv, d)
    g = -jnp.asarray(rng.uniform(0.01, 0.4, (b, hv)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.0, 1.0, (b, hv)), jnp.float32)
    state = jnp.asarray(rng.standard_normal((b, hv, d, d)) * 0.1, jnp.float32)
    kw = dict(use_qk_l2norm=l2, scale=None if l2 else 0.05)
    o, new_state = jax.jit(lambda *a: _gm().gated_delta_rule_step_mgpu(
        *a, block_v=block_v, interpret=True, **kw
    ))(q, k, v, g, beta, state)  # fmt: skip
    o_ref, state_ref = step_ref(q, k, v, g, beta, state, **kw)
    assert o.dtype == BF16 and new_state.dtype == jnp.float32
    assert_close(o, o_ref, 1e-2)
    np.testing.assert_allclose(new_state, state_ref, atol=1e-5, rtol=1e-5)  # float32 all through


def test_rejections_raise_unsupported_shape():
    gm = _gm()
    rng = np.random.default_rng(0)
    q, k, v, g, beta = gdn_inputs(rng, 1, 64, 1, 1)
    with pytest.raises(gm.UnsupportedShapeError, match="chunk_size=32"):
        gm.chunk_gated_delta_rule_mgpu(q, k, v, g, beta, chunk_size=32)
    with pytest.raises(gm.UnsupportedShapeError, match="bfloat16 or float16"):
        f = lambda x: x.astype(jnp.float32)  # noqa: E731
        gm.chunk_gated_delta_rule_mgpu(f(q), f(k), f(v), g, beta)
    with pytest.raises(gm.UnsupportedShapeError, match="shared memory"):
        gm.chunk_gated_delta_rule_mgpu(q, k, v, g, beta, block_v=128)
    q96, k96, v96, _, _ = gdn_inputs(rng, 1, 64, 1, 1, d=96)
    with pytest.raises(gm.UnsupportedShapeError, match="Dk=96"):
        gm.chunk_gated_delta_rule_mgpu(q96, k96, v96, g, beta)


# ------------------------------------------------------------------ CUDA lowering


def spec(*shape, dtype=BF16):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("hk,hv", [(2, 8), (16, 32)])
def test_chunked_lowers_for_cuda(hk, hv):
    b, t, d = 2, 200, 128
    f32 = jnp.float32

    def f(q, k, v, g, beta, s0, lengths):
        return _gm().chunk_gated_delta_rule_mgpu(q, k, v, g, beta, initial_state=s0,
                                                 lengths=lengths)  # fmt: skip

    text = lower_for_cuda(f, spec(b, t, hk, d), spec(b, t, hk, d), spec(b, t, hv, d),
                          spec(b, t, hv, dtype=f32), spec(b, t, hv, dtype=f32),
                          spec(b, hv, d, d, dtype=f32), spec(b, dtype=jnp.int32))  # fmt: skip
    assert mosaic_kernel_count(text) == 3  # prepare, state pass, output pass


def test_decode_step_lowers_for_cuda():
    b, hk, hv, d = 4, 4, 8, 128
    f32 = jnp.float32
    text = lower_for_cuda(_gm().gated_delta_rule_step_mgpu, spec(b, hk, d), spec(b, hk, d),
                          spec(b, hv, d), spec(b, hv, dtype=f32), spec(b, hv, dtype=f32),
                          spec(b, hv, d, d, dtype=f32))  # fmt: skip
    assert mosaic_kernel_count(text) == 1
