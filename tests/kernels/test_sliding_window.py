"""Sliding-window attention (a query at i sees keys i - W < j <= i): the references against
a naive float64 softmax in prefill, extend (plain and DCP-sharded caches) and decode; the
Triton flash kernel (interpret mode) against the reference; kernels that cannot mask a
window reject it, and dispatch falls back loudly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar.kernels_pallas import attention as ref
from jaxpar.kernels_pallas import attention_pallas as tr
from jaxpar.kernels_pallas import dispatch

W = 5
SCALE = 0.3


def randn(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


def naive(q, k, v, q_pos, slot_pos, kv_len):
    """q [T, H, D] at positions q_pos [T]; k, v [S, KVH, D] holding slot_pos [S]; o [T, H, D]
    float64 over slots p with q - W < p <= q and p < kv_len (0 where none)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    h, kvh = q.shape[1], k.shape[1]
    o = np.zeros(q.shape)
    for i, pos in enumerate(q_pos):
        ok = (slot_pos <= pos) & (slot_pos > pos - W) & (slot_pos < kv_len)
        if pos >= kv_len or not ok.any():
            continue
        for head in range(h):
            kv = head // (h // kvh)
            s = k[ok, kv] @ q[i, head] * SCALE
            p = np.exp(s - s.max())
            o[i, head] = p @ v[ok, kv] / p.sum()
    return o


def close(a, b, tol=1e-4):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def prefill_case():
    rng = np.random.default_rng(0)
    q, k, v = randn(rng, 2, 21, 4, 16), randn(rng, 2, 21, 2, 16), randn(rng, 2, 21, 2, 16)
    lengths = np.array([21, 12], np.int32)
    want = np.stack([naive(q[b], k[b], v[b], np.arange(21), np.arange(21), lengths[b]) for b in range(2)])
    return q, k, v, jnp.asarray(lengths), want


@pytest.mark.parametrize("block", [512, 8])
def test_prefill_reference(prefill_case, block):
    """One block, and blocks of 8 (key blocks wholly before a query block's window skipped)."""
    q, k, v, lengths, want = prefill_case
    close(ref.prefill_attention(q, k, v, lengths, scale=SCALE, window=W, block_q=block, block_k=block), want)


def test_triton_prefill_interpreted(prefill_case):
    q, k, v, lengths, want = prefill_case
    close(tr.prefill_attention_pallas(q, k, v, lengths, scale=SCALE, window=W, block_q=16, block_k=16,
                                      interpret=True), want)


@pytest.mark.parametrize("size", [1, 2])
def test_extend_over_plain_and_dcp_caches(size):
    """Rank size-1 of `size` holds positions s * size + rank; 32-slot caches, 4 queries."""
    rng = np.random.default_rng(1)
    b, t, s = 2, 4, 32
    q, kc, vc = randn(rng, b, t, 4, 16), randn(rng, b, s, 2, 16), randn(rng, b, s, 2, 16)
    start = np.array([17, 6], np.int32)
    q_pos = start[:, None] + np.arange(t)[None, :]
    kv_lens = start + np.array([4, 2])  # row 1: two padding queries
    rank = size - 1
    slot_pos = np.arange(s) * size + rank
    want = np.stack([naive(q[i], kc[i], vc[i], q_pos[i], slot_pos, kv_lens[i]) for i in range(b)])
    args = (q, kc, vc, jnp.asarray(q_pos), jnp.asarray(kv_lens))
    o, _ = ref.extend_attention(*args, scale=SCALE, dcp_rank=rank, dcp_size=size, window=W, block_k=4)
    close(o, want)
    o, _ = tr.extend_attention_pallas(*args, scale=SCALE, dcp_rank=rank, dcp_size=size, window=W,
                                      block_k=16, interpret=True)
    close(o, want)


def test_decode_reference_reads_from_kv_starts():
    rng = np.random.default_rng(2)
    q, kc, vc = randn(rng, 2, 4, 16), randn(rng, 2, 16, 2, 16), randn(rng, 2, 16, 2, 16)
    kv_lens = np.array([13, 3], np.int32)
    starts = np.asarray(ref.window_start(jnp.asarray(kv_lens - 1), W))
    o, _ = ref.decode_attention(q, kc, vc, jnp.asarray(kv_lens), scale=SCALE, kv_starts=jnp.asarray(starts))
    want = np.stack([naive(q[i][None], kc[i], vc[i], [kv_lens[i] - 1], np.arange(16), kv_lens[i])[0]
                     for i in range(2)])
    close(o, want)
    assert list(starts) == [8, 0]


def test_kernels_without_a_window_mask_reject_it_and_auto_falls_back():
    rng = np.random.default_rng(3)
    q, kc, vc = randn(rng, 1, 4, 16), randn(rng, 1, 32, 2, 16), randn(rng, 1, 32, 2, 16)
    lens, starts = jnp.array([20], jnp.int32), jnp.array([16], jnp.int32)
    with pytest.raises(dispatch.UnsupportedShapeError, match="kv_starts"):
        dispatch.attention_decode(q, kc, vc, lens, scale=SCALE, kv_starts=starts, impl="triton",
                                  interpret=True)
    with pytest.warns(dispatch.KernelFallbackWarning, match="attention_decode.*kv_starts"):
        o, _ = dispatch.attention_decode(q, kc, vc, lens, scale=SCALE, kv_starts=starts, interpret=True)
    close(o, ref.decode_attention(q, kc, vc, lens, scale=SCALE, kv_starts=starts)[0], 1e-6)


def test_mosaic_kernels_reject_a_window():
    mgpu = pytest.importorskip("jaxpar.kernels_pallas.attention_mgpu",
                               reason="the Mosaic GPU kernels need jax >= 0.11")
    x = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(dispatch.UnsupportedShapeError, match="sliding-window"):
        mgpu.prefill_attention_mgpu(x, x, x, jnp.array([64]), scale=SCALE, window=W)
    with pytest.raises(dispatch.UnsupportedShapeError, match="sliding window"):
        mgpu.decode_attention_mgpu(x[:, 0], x, x, jnp.array([64]), scale=SCALE, kv_starts=jnp.array([3]))
