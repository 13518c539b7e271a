"""Gated delta rule: pure-JAX references against Hugging Face's torch implementations, the
forms against each other, and every Pallas kernel (interpret mode) against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar.kernels_pallas import gated_delta_rule as ref
from jaxpar.kernels_pallas import gated_delta_rule_pallas as gdn_pallas
from tests import hf_models

RTOL, ATOL = 1e-4, 1e-5  # float32


def make_inputs(b, t, hk, hv, dk, dv, *, seed=0, dtype=np.float32):
    """Random GDN inputs in the model's ranges: g <= 0 (log decay), beta in (0, 1)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, hk, dk)).astype(np.float32)
    k = rng.standard_normal((b, t, hk, dk)).astype(np.float32)
    v = rng.standard_normal((b, t, hv, dv)).astype(np.float32)
    g = -np.logaddexp(0, rng.standard_normal((b, t, hv))).astype(np.float32) * 0.5
    beta = (1 / (1 + np.exp(-rng.standard_normal((b, t, hv))))).astype(np.float32)
    s0 = (0.1 * rng.standard_normal((b, hv, dk, dv))).astype(np.float32)
    cast = lambda x: jnp.asarray(x).astype(dtype)
    return dict(q=cast(q), k=cast(k), v=cast(v), g=jnp.asarray(g), beta=jnp.asarray(beta), s0=s0)


def torch_and_hf():
    """torch and transformers' Qwen3-Next module (the reference); a skip without torch."""
    torch = hf_models.require_torch()
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    return torch, hf


def hf_reference(x, *, chunked: bool):
    """Runs transformers' torch_{chunk,recurrent}_gated_delta_rule on the same inputs."""
    torch, hf = torch_and_hf()
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))
    fn = hf.torch_chunk_gated_delta_rule if chunked else hf.torch_recurrent_gated_delta_rule
    o, s = fn(
        t(x["q"]), t(x["k"]), t(x["v"]), t(x["g"]), t(x["beta"]),
        initial_state=t(x["s0"]), output_final_state=True, use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    return o.numpy(), s.numpy()


def run_ref(fn, x, **kw):
    """Runs a reference under jit (much faster to trace once than to run op by op)."""
    call = lambda x: fn(
        x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=jnp.asarray(x["s0"]), **kw
    )
    return jax.jit(call)(x)


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=rtol, atol=atol)


# (B, T, Hk, Hv, Dk, Dv): GQA with Hv = 2 Hk and T not a multiple of 64; T < 64; Hv = Hk
# with T an exact multiple of the chunk.
SHAPES = [(2, 100, 2, 4, 32, 16), (1, 37, 2, 4, 16, 32), (2, 128, 2, 2, 16, 16)]


@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_matches_hf(shape):
    x = make_inputs(*shape)
    o_hf, s_hf = hf_reference(x, chunked=True)
    o, s = run_ref(ref.chunk_gated_delta_rule, x)
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    assert_close(o, o_hf)
    assert_close(s, s_hf)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_recurrent_matches_hf(shape):
    x = make_inputs(*shape)
    o_hf, s_hf = hf_reference(x, chunked=False)
    o, s = run_ref(ref.recurrent_gated_delta_rule, x)
    assert_close(o, o_hf)
    assert_close(s, s_hf)


@pytest.mark.parametrize(
    "chunk_size,chunks_per_step",
    [(16, None), (64, None), (16, 4), (16, 100)],  # 4: pads 6 chunks to 8; 100: all at once
)
def test_chunked_equals_recurrent(chunk_size, chunks_per_step):
    x = make_inputs(2, 90, 1, 3, 32, 32, seed=3)
    o_c, s_c = run_ref(
        ref.chunk_gated_delta_rule, x, chunk_size=chunk_size, chunks_per_step=chunks_per_step
    )
    o_r, s_r = run_ref(ref.recurrent_gated_delta_rule, x)
    assert_close(o_c, np.asarray(o_r))
    assert_close(s_c, np.asarray(s_r))


def test_no_l2norm_and_custom_scale():
    x = make_inputs(1, 20, 1, 2, 16, 16, seed=4)
    # Without l2norm, keep |k| small so the recurrence stays contractive.
    x["k"] = x["k"] * 0.2
    kw = dict(use_qk_l2norm=False, scale=0.3)
    o_c, s_c = run_ref(ref.chunk_gated_delta_rule, x, chunk_size=16, **kw)
    o_r, s_r = run_ref(ref.recurrent_gated_delta_rule, x, **kw)
    assert_close(o_c, np.asarray(o_r))
    assert_close(s_c, np.asarray(s_r))


def test_zero_initial_state_default():
    x = make_inputs(1, 30, 1, 1, 16, 16, seed=5)
    o1, s1 = jax.jit(ref.chunk_gated_delta_rule)(x["q"], x["k"], x["v"], x["g"], x["beta"])
    x["s0"] = np.zeros_like(x["s0"])
    o2, s2 = run_ref(ref.chunk_gated_delta_rule, x)
    assert_close(o1, np.asarray(o2))
    assert_close(s1, np.asarray(s2))


def test_ragged_lengths_equal_rows_alone():
    x = make_inputs(3, 70, 1, 2, 16, 16, seed=6)
    lengths = jnp.array([70, 33, 0], jnp.int32)
    o, s = run_ref(ref.chunk_gated_delta_rule, x, lengths=lengths)
    for row, n in enumerate(np.asarray(lengths)):
        alone = {key: val[row : row + 1, :n] for key, val in x.items() if key != "s0"}
        alone["s0"] = x["s0"][row : row + 1]
        if n == 0:
            assert_close(s[row], x["s0"][row])  # no real token: state untouched
        else:
            o_a, s_a = run_ref(ref.chunk_gated_delta_rule, alone)
            assert_close(o[row, :n], np.asarray(o_a[0]))
            assert_close(s[row], np.asarray(s_a[0]))
        assert not np.any(np.asarray(o[row, n:]))  # padding outputs are zero


def test_decode_steps_equal_recurrent():
    x = make_inputs(2, 6, 2, 4, 16, 8, seed=7)
    state = jnp.asarray(x["s0"])
    step = jax.jit(ref.gated_delta_rule_step)
    outs = []
    for t in range(6):
        token = [x[name][:, t] for name in ("q", "k", "v", "g", "beta")]
        o, state = step(*token, state)
        outs.append(o)
    o_r, s_r = run_ref(ref.recurrent_gated_delta_rule, x)
    assert_close(jnp.stack(outs, 1), np.asarray(o_r))
    assert_close(state, np.asarray(s_r))


# ------------------------------------------------------------------------ Pallas kernels


def run_pallas_chunk(x, **kw):
    fn = lambda x: gdn_pallas.chunk_gated_delta_rule_pallas(
        x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=jnp.asarray(x["s0"]),
        interpret=True, **kw,
    )  # fmt: skip
    return jax.jit(fn)(x)


def test_pallas_chunk_matches_reference():
    """Small tiles: chunk 16 (a single 16 x 16 inverse block), Dv split in blocks of 16."""
    x = make_inputs(2, 40, 1, 2, 16, 32, seed=9)
    lengths = jnp.array([40, 21], jnp.int32)
    o, s = run_pallas_chunk(x, lengths=lengths, chunk_size=16, block_v=16)
    o_r, s_r = run_ref(ref.chunk_gated_delta_rule, x, lengths=lengths)
    assert_close(o, np.asarray(o_r))
    assert_close(s, np.asarray(s_r))


@pytest.mark.parametrize(
    "d,dtype,tol", [(256, jnp.bfloat16, 4e-2), (128, jnp.float32, 2e-4)], ids=["d256-bf16", "d128-f32"]
)
def test_pallas_chunk_production_tiles(d, dtype, tol):
    """Dk = Dv = d, chunk 64 (4 x 4 inverse blocks, merged), the default tiles, T = 80 (not a
    multiple of the chunk), GQA (Hv = 2 Hk), a ragged second row, a non-zero initial state."""
    x = make_inputs(2, 80, 1, 2, d, d, seed=13, dtype=dtype)
    lengths = jnp.array([80, 50], jnp.int32)
    o, s = run_pallas_chunk(x, lengths=lengths, chunk_size=64)
    o_r, s_r = run_ref(ref.chunk_gated_delta_rule, x, lengths=lengths)
    assert o.dtype == dtype and s.dtype == jnp.float32
    # bf16: bf16 matmul operands (float32 accumulation) against an all-float32 reference.
    assert_close(o, np.asarray(o_r, np.float32), rtol=tol, atol=tol)
    assert_close(s, np.asarray(s_r), rtol=tol, atol=tol)
    assert not np.any(np.asarray(o[1, 50:], np.float32))


def test_chunk_tiles_fill_the_gpu():
    # B x Hv = 32 programs: block_v shrinks until 32 x Dv / block_v >= 132 SMs (or 16).
    assert gdn_pallas.chunk_tiles(128, 128, jnp.bfloat16, 32, sms=132)["block_v"] == 16
    assert gdn_pallas.chunk_tiles(128, 128, jnp.bfloat16, 512, sms=132)["block_v"] == 64
    assert gdn_pallas.chunk_tiles(256, 256, jnp.bfloat16, 512, sms=132)["block_v"] == 32


@pytest.mark.parametrize(
    "d,dtype,tol", [(128, jnp.float32, ATOL), (256, jnp.bfloat16, 2e-2)], ids=["d128-f32", "d256-bf16"]
)
def test_pallas_decode_step_matches_reference(d, dtype, tol):
    x = make_inputs(2, 1, 2, 4, d, d, seed=11, dtype=dtype)
    args = [x[n][:, 0] for n in ("q", "k", "v", "g", "beta")] + [jnp.asarray(x["s0"])]
    run = jax.jit(lambda *a: gdn_pallas.gated_delta_rule_step_pallas(*a, interpret=True))
    o, s = run(*args)
    o_r, s_r = jax.jit(ref.gated_delta_rule_step)(*args)
    assert o.dtype == dtype
    assert_close(o, np.asarray(o_r, np.float32), rtol=tol, atol=tol)
    assert_close(s, np.asarray(s_r), rtol=RTOL, atol=ATOL)
