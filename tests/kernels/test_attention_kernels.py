"""Attention references against a naive numpy softmax, the DCP merge, and the Pallas
attention kernels (interpret mode) against the references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar.kernels_pallas import attention as ref
from jaxpar.kernels_pallas import attention_pallas as attn_pallas
from jaxpar.kernels_pallas import dispatch

RTOL, ATOL = 1e-4, 1e-5

# Jitted references: one compile instead of one per op (much faster on CPU).
prefill_ref = jax.jit(ref.prefill_attention, static_argnames=("scale", "causal"))
decode_ref = jax.jit(ref.decode_attention, static_argnames=("scale",))
merge_ref = jax.jit(ref.merge_attention_partials)


def randn(rng, *shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def naive_attention(q, k, v, visible, scale):
    """Per-row softmax in float64 numpy. q [H, D]; k, v [S, KVH, D]; visible [S] bool.
    Returns (o [H, D], lse [H]) with o = 0, lse = -inf when nothing is visible."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    h, kvh = q.shape[0], k.shape[1]
    o = np.zeros(q.shape)
    lse = np.full(h, -np.inf)
    if not visible.any():
        return o, lse
    for head in range(h):
        kv = head // (h // kvh)
        s = (k[visible, kv] @ q[head]) * scale
        m = s.max()
        p = np.exp(s - m)
        o[head] = p @ v[visible, kv] / p.sum()
        lse[head] = m + np.log(p.sum())
    return o, lse


def naive_prefill(q, k, v, lengths, scale, causal):
    b, t = q.shape[:2]
    out = np.zeros(q.shape)
    for row in range(b):
        for i in range(int(lengths[row])):
            visible = np.arange(t) < lengths[row]
            if causal:
                visible &= np.arange(t) <= i
            out[row, i] = naive_attention(q[row, i], k[row], v[row], visible, scale)[0]
    return out


def naive_decode(q, k, v, kv_lens, scale, positions=None):
    b, s = k.shape[:2]
    pos = np.arange(s) if positions is None else np.asarray(positions)
    res = [naive_attention(q[i], k[i], v[i], pos < kv_lens[i], scale) for i in range(b)]
    return np.stack([r[0] for r in res]), np.stack([r[1] for r in res])


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_reference_matches_naive(causal):
    rng = np.random.default_rng(0)
    q, k, v = randn(rng, 2, 13, 4, 8), randn(rng, 2, 13, 2, 8), randn(rng, 2, 13, 2, 8)
    lengths = np.array([13, 6], np.int32)
    o = prefill_ref(q, k, v, jnp.asarray(lengths), scale=0.35, causal=causal)
    np.testing.assert_allclose(o, naive_prefill(q, k, v, lengths, 0.35, causal), RTOL, ATOL)
    assert not np.any(np.asarray(o[1, 6:]))  # padding queries are zero


def test_decode_reference_matches_naive_with_lse():
    rng = np.random.default_rng(1)
    q, kc, vc = randn(rng, 3, 4, 8), randn(rng, 3, 16, 2, 8), randn(rng, 3, 16, 2, 8)
    kv_lens = np.array([16, 5, 0], np.int32)
    o, lse = decode_ref(q, kc, vc, jnp.asarray(kv_lens), scale=0.3)
    o_n, lse_n = naive_decode(q, kc, vc, kv_lens, 0.3)
    assert o.dtype == jnp.float32 and lse.dtype == jnp.float32
    np.testing.assert_allclose(o, o_n, RTOL, ATOL)
    np.testing.assert_allclose(lse, lse_n, RTOL, ATOL)
    assert np.all(np.isneginf(np.asarray(lse[2]))) and not np.any(np.asarray(o[2]))


@pytest.mark.parametrize("layout", ["round_robin", "contiguous"])
def test_dcp_merge_equals_full_attention(layout):
    """Each of R ranks holds S/R slots; merged partials equal attention over everything."""
    rng = np.random.default_rng(2)
    ranks, b, s, h, kvh, d = 4, 2, 32, 4, 2, 8
    q, kc, vc = randn(rng, b, h, d), randn(rng, b, s, kvh, d), randn(rng, b, s, kvh, d)
    kv_lens = jnp.array([27, 3], jnp.int32)
    full_o, full_lse = decode_ref(q, kc, vc, kv_lens, scale=0.4)
    partials = []
    for r in range(ranks):
        if layout == "round_robin":  # token p lives on rank p % R, slot p // R
            positions = jnp.arange(s // ranks) * ranks + r
        else:
            positions = jnp.arange(s // ranks) + r * (s // ranks)
        shard = lambda c: c[:, positions]  # gather this rank's tokens into its slots
        partials.append(
            decode_ref(
                q, shard(kc), shard(vc), kv_lens, scale=0.4, slot_positions=positions
            )
        )
    o, lse = merge_ref(
        jnp.stack([p[0] for p in partials]), jnp.stack([p[1] for p in partials])
    )
    np.testing.assert_allclose(o, full_o, RTOL, ATOL)
    np.testing.assert_allclose(lse, full_lse, RTOL, ATOL)


def test_merge_handles_all_empty_ranks():
    os = jnp.ones((3, 2, 4, 8))
    lses = jnp.full((3, 2, 4), -jnp.inf).at[1, 0].set(0.5)
    o, lse = merge_ref(os, lses)
    assert np.all(np.isfinite(np.asarray(o)))
    np.testing.assert_allclose(o[0], 1.0)
    assert not np.any(np.asarray(o[1])) and np.all(np.isneginf(np.asarray(lse[1])))
    np.testing.assert_allclose(lse[0], 0.5)


# ------------------------------------------------------------------------ Pallas kernels


@pytest.mark.parametrize(
    "dtype,tol,causal",
    [(jnp.float32, 1e-5, True), (jnp.bfloat16, 3e-2, True), (jnp.float32, 1e-5, False)],
)
def test_pallas_prefill_matches_reference(dtype, tol, causal):
    rng = np.random.default_rng(3)
    b, t, h, kvh, d = 2, 40, 4, 2, 16  # T = 40 is not a multiple of the blocks
    q = randn(rng, b, t, h, d, dtype=dtype)
    k, v = randn(rng, b, t, kvh, d, dtype=dtype), randn(rng, b, t, kvh, d, dtype=dtype)
    lengths = jnp.array([40, 17], jnp.int32)
    kw = dict(scale=d**-0.5, causal=causal)
    run = jax.jit(lambda *a: attn_pallas.prefill_attention_pallas(
        *a, block_q=16, block_k=32, interpret=True, **kw
    ))  # fmt: skip
    o = run(q, k, v, lengths)
    o_r = prefill_ref(q, k, v, lengths, **kw)
    assert o.dtype == dtype
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_r, np.float32), tol, tol)


@pytest.mark.parametrize("num_splits,positions", [(1, False), (2, False), (2, True)])
def test_pallas_decode_matches_reference(num_splits, positions):
    rng = np.random.default_rng(4)
    b, s, h, kvh, d = 3, 64, 4, 2, 16
    q, kc, vc = randn(rng, b, h, d), randn(rng, b, s, kvh, d), randn(rng, b, s, kvh, d)
    kv_lens = jnp.array([64, 19, 0], jnp.int32)  # last row: nothing valid
    slot_positions = jnp.arange(s) * 2 + 1 if positions else None  # a dcp=2 rank-1 shard
    kw = dict(scale=0.25, slot_positions=slot_positions)
    run = jax.jit(lambda *a: attn_pallas.decode_attention_pallas(
        *a, block_k=16, num_splits=num_splits, interpret=True, **kw
    ))  # fmt: skip
    o, lse = run(q, kc, vc, kv_lens)
    o_r, lse_r = decode_ref(q, kc, vc, kv_lens, **kw)
    np.testing.assert_allclose(o, o_r, RTOL, ATOL)
    np.testing.assert_allclose(lse, lse_r, RTOL, ATOL)
    assert np.all(np.isneginf(np.asarray(lse[2]))) and not np.any(np.asarray(o[2]))


def test_pallas_decode_bf16_cache():
    rng = np.random.default_rng(5)
    b, s, h, kvh, d = 2, 32, 8, 2, 32
    shapes = [(b, h, d), (b, s, kvh, d), (b, s, kvh, d)]
    q, kc, vc = (randn(rng, *sh, dtype=jnp.bfloat16) for sh in shapes)
    kv_lens = jnp.array([32, 9], jnp.int32)
    run = jax.jit(lambda *a: attn_pallas.decode_attention_pallas(
        *a, scale=d**-0.5, block_k=16, interpret=True
    ))  # fmt: skip
    o, lse = run(q, kc, vc, kv_lens)
    o_r, lse_r = decode_ref(q, kc, vc, kv_lens, scale=d**-0.5)
    np.testing.assert_allclose(o, o_r, 3e-2, 3e-2)
    np.testing.assert_allclose(lse, lse_r, 3e-2, 3e-2)


def test_pallas_rejects_unsupported_shapes():
    rng = np.random.default_rng(6)
    q, k = randn(rng, 1, 8, 2, 24), randn(rng, 1, 8, 2, 24)
    with pytest.raises(dispatch.UnsupportedShapeError, match="head_dim=24"):
        dispatch.attention_prefill(q, k, k, jnp.array([8]), scale=0.2, impl="pallas", interpret=True)
    qd, kc = randn(rng, 1, 2, 16), randn(rng, 1, 48, 2, 16)
    with pytest.raises(dispatch.UnsupportedShapeError, match="S=48"):
        attn_pallas.decode_attention_pallas(qd, kc, kc, jnp.array([5]), scale=0.2, block_k=32)
    with pytest.raises(dispatch.UnsupportedShapeError, match="block_q=24"):
        attn_pallas.prefill_attention_pallas(
            randn(rng, 1, 8, 2, 16), randn(rng, 1, 8, 2, 16), randn(rng, 1, 8, 2, 16),
            jnp.array([8]), scale=0.2, block_q=24,
        )  # fmt: skip


def test_dispatch_attention():
    rng = np.random.default_rng(7)
    qd, kc, vc = randn(rng, 2, 4, 16), randn(rng, 2, 32, 2, 16), randn(rng, 2, 32, 2, 16)
    kv_lens = jnp.array([32, 7], jnp.int32)
    o_r, lse_r = dispatch.attention_decode(qd, kc, vc, kv_lens, scale=0.25, impl="reference")
    o_p, lse_p = dispatch.attention_decode(
        qd, kc, vc, kv_lens, scale=0.25, impl="pallas", interpret=True, block_k=16
    )
    np.testing.assert_allclose(o_p, o_r, RTOL, ATOL)
    np.testing.assert_allclose(lse_p, lse_r, RTOL, ATOL)
    if jax.default_backend() != "gpu":
        with pytest.raises(dispatch.PallasUnavailableError, match="impl='reference'"):
            dispatch.attention_decode(qd, kc, vc, kv_lens, scale=0.25, impl="pallas")
    with pytest.raises(ValueError, match="impl must be"):
        dispatch.attention_decode(qd, kc, vc, kv_lens, scale=0.25, impl="triton")
