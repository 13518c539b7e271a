"""Attention references against a naive float64 numpy softmax, the split / DCP merge, and
the Pallas Triton attention kernels (interpret mode) against the references -- at small
tiles and at the production tiles the GPU runs (head_dim 128 and 256, GQA groups 1, 4, 8,
ragged rows, bf16 and f32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:  # jax >= 0.11
    from jax.extend.core import jaxprs_in_params
except ImportError:
    from jax.core import jaxprs_in_params

from jaxpar.kernels_pallas import attention as ref
from jaxpar.kernels_pallas import attention_pallas as attn_pallas
from jaxpar.kernels_pallas import dispatch

RTOL, ATOL = 1e-4, 1e-5

# Jitted references: one compile instead of one per op (much faster on CPU).
prefill_ref = jax.jit(ref.prefill_attention, static_argnames=("scale", "causal", "block_q", "block_k"))
extend_ref = jax.jit(ref.extend_attention, static_argnames=("scale", "dcp_size", "block_k"))
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


def naive_decode(q, k, v, kv_lens, scale):
    s = k.shape[1]
    res = [naive_attention(q[i], k[i], v[i], np.arange(s) < kv_lens[i], scale)
           for i in range(k.shape[0])]  # fmt: skip
    return np.stack([r[0] for r in res]), np.stack([r[1] for r in res])


def naive_extend(q, kc, vc, q_pos, kv_lens, scale, rank, size):
    """Queries at q_pos over local slots holding positions s * size + rank."""
    slot_pos = np.arange(kc.shape[1]) * size + rank
    b, t, h, d = q.shape
    o, lse = np.zeros((b, t, h, d)), np.full((b, t, h), -np.inf)
    for row in range(b):
        for i in range(t):
            if q_pos[row, i] >= kv_lens[row]:
                continue  # padding query
            visible = (slot_pos <= q_pos[row, i]) & (slot_pos < kv_lens[row])
            o[row, i], lse[row, i] = naive_attention(q[row, i], kc[row], vc[row], visible, scale)
    return o, lse


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               rtol=tol, atol=tol)  # fmt: skip


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_reference_matches_naive(causal):
    """Blocks of 8 over T = 13: several query and key blocks, a partial last block."""
    rng = np.random.default_rng(0)
    q, k, v = randn(rng, 2, 13, 4, 8), randn(rng, 2, 13, 2, 8), randn(rng, 2, 13, 2, 8)
    lengths = np.array([13, 6], np.int32)
    expected = naive_prefill(q, k, v, lengths, 0.35, causal)
    for blocks in (dict(block_q=8, block_k=4), dict()):
        o = prefill_ref(q, k, v, jnp.asarray(lengths), scale=0.35, causal=causal, **blocks)
        assert_close(o, expected, RTOL)
        assert not np.any(np.asarray(o[1, 6:]))  # padding queries are zero


def test_prefill_reference_never_builds_t_by_t_scores():
    """At T = 4096 with 512-wide blocks no intermediate has T x T elements."""
    spec = jax.ShapeDtypeStruct((1, 4096, 2, 16), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda q, k, v, n: ref.prefill_attention(q, k, v, n, scale=0.25))(
        spec, spec, spec, jax.ShapeDtypeStruct((1,), jnp.int32))  # fmt: skip
    sizes = []

    def walk(jpr):
        for eqn in jpr.eqns:
            sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert max(sizes) < 4096 * 4096 // 8, max(sizes)


def test_decode_reference_matches_naive_with_lse():
    rng = np.random.default_rng(1)
    q, kc, vc = randn(rng, 3, 4, 8), randn(rng, 3, 16, 2, 8), randn(rng, 3, 16, 2, 8)
    kv_lens = np.array([16, 5, 0], np.int32)
    o, lse = decode_ref(q, kc, vc, jnp.asarray(kv_lens), scale=0.3)
    o_n, lse_n = naive_decode(q, kc, vc, kv_lens, 0.3)
    assert o.dtype == jnp.float32 and lse.dtype == jnp.float32
    assert_close(o, o_n, RTOL)
    assert_close(lse, lse_n, RTOL)
    assert np.all(np.isneginf(np.asarray(lse[2]))) and not np.any(np.asarray(o[2]))


@pytest.mark.parametrize("size", [1, 2])
def test_extend_reference_matches_naive(size):
    """Chunked prefill over a DCP shard (rank 1 of 2) and a plain cache, blocks of 4 slots."""
    rng = np.random.default_rng(11)
    b, t, h, kvh, d, s = 2, 5, 4, 2, 8, 12
    q, kc, vc = randn(rng, b, t, h, d), randn(rng, b, s, kvh, d), randn(rng, b, s, kvh, d)
    start = np.array([7, 2], np.int32)
    q_pos = start[:, None] + np.arange(t)[None, :]
    kv_lens = start + np.array([5, 3])  # row 1: two padding queries
    rank = size - 1
    o, lse = extend_ref(q, kc, vc, jnp.asarray(q_pos), jnp.asarray(kv_lens), scale=0.3,
                        dcp_rank=rank, dcp_size=size, block_k=4)  # fmt: skip
    o_n, lse_n = naive_extend(q, kc, vc, q_pos, kv_lens, 0.3, rank, size)
    assert_close(o, o_n, RTOL)
    assert_close(lse, lse_n, RTOL)


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
            local = ref.dcp_local_lengths(kv_lens, r, ranks)
        else:
            positions = jnp.arange(s // ranks) + r * (s // ranks)
            local = jnp.clip(kv_lens - r * (s // ranks), 0, s // ranks)
        shard = lambda c: c[:, positions]  # gather this rank's tokens into its slots
        partials.append(decode_ref(q, shard(kc), shard(vc), local, scale=0.4))
    o, lse = merge_ref(jnp.stack([p[0] for p in partials]), jnp.stack([p[1] for p in partials]))
    assert_close(o, full_o, RTOL)
    assert_close(lse, full_lse, RTOL)


def test_dcp_local_lengths():
    kv = jnp.array([0, 1, 2, 5, 8])
    got = [np.asarray(ref.dcp_local_lengths(kv, r, 4)).tolist() for r in range(4)]
    assert got == [[0, 1, 1, 2, 2], [0, 0, 1, 1, 2], [0, 0, 0, 1, 2], [0, 0, 0, 1, 2]]
    assert sum(np.asarray(g) for g in got).tolist() == [0, 1, 2, 5, 8]


def test_merge_handles_all_empty_ranks():
    os = jnp.ones((3, 2, 4, 8))
    lses = jnp.full((3, 2, 4), -jnp.inf).at[1, 0].set(0.5)
    o, lse = merge_ref(os, lses)
    assert np.all(np.isfinite(np.asarray(o)))
    np.testing.assert_allclose(o[0], 1.0)
    assert not np.any(np.asarray(o[1])) and np.all(np.isneginf(np.asarray(lse[1])))
    np.testing.assert_allclose(lse[0], 0.5)


# --------------------------------------------------------------- Triton kernels, small


def test_pallas_prefill_non_causal_padded_head_dim():
    """Small tiles, not causal, head_dim 24 zero-padded to 32, T = 40 not a multiple of the
    blocks, a ragged row."""
    rng = np.random.default_rng(3)
    b, t, h, kvh, d = 2, 40, 4, 2, 24
    q, k, v = randn(rng, b, t, h, d), randn(rng, b, t, kvh, d), randn(rng, b, t, kvh, d)
    lengths = jnp.array([40, 17], jnp.int32)
    kw = dict(scale=d**-0.5, causal=False)
    o = jax.jit(lambda *a: attn_pallas.prefill_attention_pallas(
        *a, block_q=16, block_k=32, interpret=True, **kw))(q, k, v, lengths)  # fmt: skip
    assert o.shape == q.shape
    assert_close(o, prefill_ref(q, k, v, lengths, **kw), 1e-5)


def test_pallas_extend_matches_reference_dcp():
    """Extend kernel on a DCP rank-1-of-2 shard with ragged rows and padding queries."""
    rng = np.random.default_rng(12)
    b, t, h, kvh, d, s = 2, 24, 4, 2, 16, 64
    q, kc, vc = randn(rng, b, t, h, d), randn(rng, b, s, kvh, d), randn(rng, b, s, kvh, d)
    start = jnp.array([40, 3], jnp.int32)
    q_pos = start[:, None] + jnp.arange(t)[None, :]
    kv_lens = start + jnp.array([24, 10])
    kw = dict(scale=0.25, dcp_rank=1, dcp_size=2)
    run = jax.jit(lambda *a: attn_pallas.extend_attention_pallas(
        *a, block_q=16, block_k=16, interpret=True, **kw))  # fmt: skip
    o, lse = run(q, kc, vc, q_pos, kv_lens)
    o_r, lse_r = extend_ref(q, kc, vc, q_pos, kv_lens, **kw)
    assert_close(o, o_r, 1e-5)
    assert_close(lse, lse_r, 1e-5)
    assert np.all(np.isneginf(np.asarray(lse[1, 10:])))  # padding queries


def test_pallas_decode_matches_reference():
    """Three splits over uneven spans; an empty row."""
    num_splits = 3
    rng = np.random.default_rng(4)
    b, s, h, kvh, d = 3, 64, 4, 2, 16
    q, kc, vc = randn(rng, b, h, d), randn(rng, b, s, kvh, d), randn(rng, b, s, kvh, d)
    kv_lens = jnp.array([64, 19, 0], jnp.int32)  # last row: nothing valid
    run = jax.jit(lambda *a: attn_pallas.decode_attention_pallas(
        *a, scale=0.25, block_k=16, num_splits=num_splits, interpret=True
    ))  # fmt: skip
    o, lse = run(q, kc, vc, kv_lens)
    o_r, lse_r = decode_ref(q, kc, vc, kv_lens, scale=0.25)
    assert_close(o, o_r, 1e-5)
    assert_close(lse, lse_r, 1e-5)
    assert np.all(np.isneginf(np.asarray(lse[2]))) and not np.any(np.asarray(o[2]))


def test_pallas_decode_never_reads_past_kv_len():
    """NaNs in every slot past kv_len (other splits, other blocks) do not reach the output:
    those blocks are not read at all (a masked read would turn 0 * NaN into NaN)."""
    rng = np.random.default_rng(9)
    b, s, h, kvh, d = 2, 128, 4, 1, 16
    q, kc, vc = randn(rng, b, h, d), randn(rng, b, s, kvh, d), randn(rng, b, s, kvh, d)
    kv_lens = jnp.array([32, 48], jnp.int32)  # whole blocks of 16
    poison = jnp.arange(s)[None, :, None, None] >= kv_lens[:, None, None, None]
    kc_nan, vc_nan = (jnp.where(poison, jnp.nan, c) for c in (kc, vc))
    o, lse = jax.jit(lambda *a: attn_pallas.decode_attention_pallas(
        *a, scale=0.25, block_k=16, num_splits=4, interpret=True))(q, kc_nan, vc_nan, kv_lens)  # fmt: skip
    o_r, lse_r = decode_ref(q, kc, vc, kv_lens, scale=0.25)
    assert_close(o, o_r, 1e-5)
    assert_close(lse, lse_r, 1e-5)


def test_decode_num_splits_fills_the_gpu():
    # One sequence, 2 kv heads on 132 SMs: 64 splits (capped) -> 128 programs.
    assert attn_pallas.decode_num_splits(1, 2, 32768, 64, sms=132) == 64
    # Batch 32 x 8 kv heads already gives 256 programs: no split.
    assert attn_pallas.decode_num_splits(32, 8, 32768, 64, sms=132) == 2
    assert attn_pallas.decode_num_splits(128, 8, 32768, 64, sms=132) == 1
    assert attn_pallas.decode_num_splits(1, 2, 128, 64, sms=132) == 2  # at most one per block


def test_pallas_rejects_unsupported_shapes():
    rng = np.random.default_rng(6)
    qd, kc = randn(rng, 1, 2, 16), randn(rng, 1, 40, 2, 16)
    with pytest.raises(dispatch.UnsupportedShapeError, match="S=40"):
        attn_pallas.decode_attention_pallas(qd, kc, kc, jnp.array([5]), scale=0.2)
    with pytest.raises(dispatch.UnsupportedShapeError, match="head_dim=24"):
        attn_pallas.decode_attention_pallas(randn(rng, 1, 2, 24), randn(rng, 1, 32, 2, 24),
                                            randn(rng, 1, 32, 2, 24), jnp.array([5]), scale=0.2)  # fmt: skip
    with pytest.raises(dispatch.UnsupportedShapeError, match="block_q=24"):
        attn_pallas.prefill_attention_pallas(
            randn(rng, 1, 8, 2, 16), randn(rng, 1, 8, 2, 16), randn(rng, 1, 8, 2, 16),
            jnp.array([8]), scale=0.2, block_q=24,
        )  # fmt: skip
    with pytest.raises(dispatch.UnsupportedShapeError, match="head_dim=512"):
        attn_pallas.prefill_attention_pallas(*(randn(rng, 1, 8, 2, 512) for _ in range(3)),
                                             jnp.array([8]), scale=0.2)  # fmt: skip


# ---------------------------------------------------------- Triton kernels, production tiles


@pytest.mark.parametrize(
    "d,group,dtype",
    [(128, 4, jnp.bfloat16), (256, 8, jnp.bfloat16), (128, 1, jnp.float32)],
    ids=["d128-g4-bf16", "d256-g8-bf16", "d128-g1-f32"],
)
def test_pallas_prefill_production_tiles(d, group, dtype):
    """The default tiles for head_dim d (128-row query blocks, 8 warps) over T = 200: two
    query blocks, a ragged second row and the causal skip."""
    rng = np.random.default_rng(20)
    b, t, kvh = 2, 200, 1
    q = randn(rng, b, t, kvh * group, d, dtype=dtype)
    k, v = randn(rng, b, t, kvh, d, dtype=dtype), randn(rng, b, t, kvh, d, dtype=dtype)
    lengths = jnp.array([200, 77], jnp.int32)
    o = jax.jit(lambda *a: attn_pallas.prefill_attention_pallas(
        *a, scale=d**-0.5, interpret=True))(q, k, v, lengths)  # fmt: skip
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    assert_close(o, prefill_ref(q, k, v, lengths, scale=d**-0.5), tol)


@pytest.mark.parametrize(
    "d,group,dtype", [(256, 8, jnp.bfloat16), (128, 4, jnp.float32)], ids=["d256-g8-bf16", "d128-g4-f32"]
)
def test_pallas_decode_production_tiles(d, group, dtype):
    """Default block and split choice (the GPU's) over a 512-slot cache, ragged rows."""
    rng = np.random.default_rng(21)
    b, s, kvh = 2, 512, 2
    q = randn(rng, b, kvh * group, d, dtype=dtype)
    kc, vc = randn(rng, b, s, kvh, d, dtype=dtype), randn(rng, b, s, kvh, d, dtype=dtype)
    kv_lens = jnp.array([300, 1], jnp.int32)
    o, lse = jax.jit(lambda *a: attn_pallas.decode_attention_pallas(
        *a, scale=d**-0.5, num_splits=4, interpret=True))(q, kc, vc, kv_lens)  # fmt: skip
    o_r, lse_r = decode_ref(q, kc, vc, kv_lens, scale=d**-0.5)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    assert_close(o, o_r, tol)
    assert_close(lse, lse_r, tol)
