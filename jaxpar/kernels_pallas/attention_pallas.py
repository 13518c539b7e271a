"""Pallas (Triton backend) GPU attention kernels: causal flash prefill / extend and split-KV
decode with log-sum-exp output. Same contracts as :mod:`jaxpar.kernels_pallas.attention`,
plus ``interpret`` (run the kernel body through the Pallas interpreter, e.g. on CPU) and
tiles (``None`` = the per-head-dim defaults below).

Flash prefill / extend (one kernel), grid (batch, query head, query block): each program
walks the key blocks of its kv head with an online softmax, and stops at the row's length
and at the causal diagonal, so a query block reads only the keys it can see. Extend reads a
cache in the DCP layout (slot s holds position s * dcp_size + dcp_rank) and returns the
log-sum-exp for the merge across ranks.

Split-KV decode, grid (batch, kv head, split): each program takes all query heads of one
kv head (zero-padded to 16 rows for ``tl.dot``) and an equal share of the row's *valid*
slots, in whole blocks; slots past ``kv_lens`` are never read, so time follows the number
of cached tokens, not the cache's capacity. The split count fills the GPU: about two
programs per SM over batch x kv heads (one sequence at batch 1 still spreads over every
SM). Splits merge by log-sum-exp.

Tiles (sm_90, measured by ``scripts/kernel_resources.py``): head_dim >= 128 uses 8 warps
(128-row query blocks at 128, 64-row at 256, where 128 rows spill); head dims that are not
a supported size are zero-padded (80, 96 -> 128) for prefill; the cache of extend / decode is never copied, so there they must be a
power of two (other shapes raise :class:`UnsupportedShapeError`, which ``impl="auto"``
turns into a loud fallback).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxpar.kernels_pallas.attention import merge_attention_partials
from jaxpar.kernels_pallas.errors import UnsupportedShapeError
from jaxpar.kernels_pallas.triton_common import (
    MASK_VALUE,
    mm,
    padded_head_dim,
    require_power_of_two,
    sm_count,
    triton_params,
)

__all__ = [
    "UnsupportedShapeError",
    "prefill_tiles",
    "decode_tiles",
    "decode_num_splits",
    "prefill_attention_pallas",
    "extend_attention_pallas",
    "decode_attention_pallas",
]


# ------------------------------------------------------------------------------- tiles


def prefill_tiles(head_dim: int, dtype) -> dict:
    """block_q, block_k, num_warps, num_stages of the flash kernel for a (padded) head dim.

    Measured for sm_90 with ``scripts/kernel_resources.py`` (registers / spills): head_dim
    128 takes 128-row query blocks on 8 warps (233 registers, no spills); head_dim 256 keeps
    8 warps but 64-row blocks (128-row ones spill 400-500 bytes with 8 or 16 warps; 4 warps
    spill at any block). float32 (split-bf16 MMA, more registers) takes 64 x 32 tiles.
    """
    if head_dim <= 64:
        tiles = dict(block_q=64, block_k=64, num_warps=4, num_stages=2)
    elif head_dim <= 128:
        tiles = dict(block_q=128, block_k=64, num_warps=8, num_stages=2)
    else:
        tiles = dict(block_q=64, block_k=64, num_warps=8, num_stages=2)
    if jnp.dtype(dtype) == jnp.float32:
        tiles = dict(tiles, block_q=64, block_k=32)
    return tiles


def decode_tiles(head_dim: int, dtype) -> dict:
    """block_k, num_warps, num_stages of the split-KV decode kernel (float32 at head_dim
    256 needs 8 warps not to spill)."""
    warps = 8 if (head_dim > 128 and jnp.dtype(dtype) == jnp.float32) else 4
    return dict(block_k=64 if head_dim <= 128 else 32, num_warps=warps, num_stages=2)


def decode_num_splits(batch: int, kv_heads: int, cache_len: int, block_k: int,
                      sms: int | None = None, max_splits: int = 64) -> int:  # fmt: skip
    """KV splits so batch x kv_heads x splits is about two programs per SM.

    At most one block per split at full capacity and at most ``max_splits`` (the merge
    reads splits x B x H x D floats). Only the splits that cover valid slots do any work.
    """
    sms = sm_count() if sms is None else sms
    want = -(-2 * sms // max(1, batch * kv_heads))
    return int(max(1, min(want, max_splits, cache_len // block_k)))


def _largest_block(length: int, preferred: int) -> int:
    """The largest power of two <= preferred that divides length (0 if none >= 16)."""
    block = preferred
    while block >= 16 and length % block:
        block //= 2
    return block if block >= 16 else 0


# ---------------------------------------------------------------------- flash (prefill)


def _flash_kernel(
    qpos_ref, kvlen_ref, rank_ref, q_ref, k_ref, v_ref, *refs,
    scale, block_k, dcp_size, causal, window, scaled,
):  # fmt: skip
    """One (batch, query head, query block) program.

    qpos_ref: [block_q] positions of the queries; kvlen_ref, rank_ref: scalars (tokens held,
    this DCP rank); q_ref: [block_q, D]; k_ref, v_ref: [S, D] (slot s holds position
    s * dcp_size + rank); with `scaled` (an fp8 cache) then ks_ref, vs_ref: [S] per-slot
    scales. Writes o [block_q, D] and, for extend, lse [block_q].
    `window` (None or W): a query at i sees positions > i - W only; the key blocks wholly
    before the block's earliest window are not visited.
    """
    ks_ref, vs_ref = refs[:2] if scaled else (None, None)
    o_ref, *lse_ref = refs[2:] if scaled else refs
    q = q_ref[...]
    q_pos = qpos_ref[...]
    kv_len = kvlen_ref[...]
    rank = rank_ref[...]
    # Slots holding positions < kv_len are a prefix of length ceil((kv_len - rank) / n).
    n_slots = (kv_len + (dcp_size - 1) - rank) // dcp_size
    if causal:  # and none past the block's last query position
        last = jnp.max(q_pos)
        n_slots = jnp.minimum(n_slots, jnp.maximum(last - rank + dcp_size, 0) // dcp_size)
    n_blocks = pl.cdiv(n_slots, block_k)
    first = 0
    if window is not None:  # local slots holding positions before every query's window
        before = jnp.maximum(jnp.min(jnp.where(q_pos >= 0, q_pos, kv_len)) - window + 1, 0)
        first = jnp.minimum(((before + (dcp_size - 1) - rank) // dcp_size) // block_k, n_blocks)

    def body(j, carry):
        acc, m, l = carry
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :].astype(q.dtype)  # fp8 / bf16 cache -> q's dtype
        v = v_ref[pl.ds(start, block_k), :].astype(q.dtype)
        s = mm(q, k, trans_b=True) * scale  # [block_q, block_k] f32
        if scaled:
            s = s * ks_ref[pl.ds(start, block_k)].astype(jnp.float32)[None, :]
        pos = (start + jnp.arange(block_k)) * dcp_size + rank
        mask = (pos < kv_len)[None, :]
        if causal:
            mask = mask & (pos[None, :] <= q_pos[:, None])
        if window is not None:
            mask = mask & (pos[None, :] > q_pos[:, None] - window)
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        if scaled:  # the value scales weight the probabilities, not the sum l
            p = p * vs_ref[pl.ds(start, block_k)].astype(jnp.float32)[None, :]
        acc = alpha[:, None] * acc + mm(p.astype(v.dtype), v)
        return acc, m_new, l

    block_q = q.shape[0]
    init = (
        jnp.zeros((block_q, q.shape[-1]), jnp.float32),
        jnp.full((block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(first, n_blocks, body, init)
    # m only rises above the mask value once a visible key was seen; queries at positions
    # >= kv_len are padding. Both are written as o = 0, lse = -inf.
    valid = (m > 0.5 * MASK_VALUE) & (q_pos < kv_len)
    l_safe = jnp.where(valid, l, 1.0)
    o_ref[...] = jnp.where(valid[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    if lse_ref:
        lse_ref[0][...] = jnp.where(valid, m + jnp.log(l_safe), -jnp.inf)


def _flash_call(q, k, v, q_positions, kv_lens, ranks, *, scale, causal, dcp_size, tiles,
                out_dtype, with_lse, interpret, name, window=None, k_scale=None,
                v_scale=None):  # fmt: skip
    """q [B, Tq, H, D] (Tq a multiple of block_q); k, v [B, S, KVH, D] (S a multiple of
    block_k); q_positions [B, Tq]; kv_lens, ranks [B]; k_scale, v_scale [B, S, KVH] or None."""
    b, tq, h, d = q.shape
    kvh = k.shape[2]
    group = h // kvh
    bq, bk = tiles["block_q"], tiles["block_k"]
    s_len = k.shape[1]
    row = pl.BlockSpec((None,), lambda bi, hi, qi: (bi,))
    kv = pl.BlockSpec((None, s_len, None, d), lambda bi, hi, qi: (bi, 0, hi // group, 0))
    out_specs = [pl.BlockSpec((None, bq, None, d), lambda bi, hi, qi: (bi, qi, hi, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, tq, h, d), out_dtype)]
    if with_lse:
        out_specs.append(pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, tq), jnp.float32))
    scaled = k_scale is not None
    kernel = functools.partial(_flash_kernel, scale=scale, block_k=bk, dcp_size=dcp_size,
                               causal=causal, window=window, scaled=scaled)  # fmt: skip
    scales = [k_scale, v_scale] if scaled else []
    scale_spec = pl.BlockSpec((None, s_len, None), lambda bi, hi, qi: (bi, 0, hi // group))
    return pl.pallas_call(
        kernel,
        grid=(b, h, tq // bq),
        in_specs=[
            pl.BlockSpec((None, bq), lambda bi, hi, qi: (bi, qi)),
            row,
            row,
            pl.BlockSpec((None, bq, None, d), lambda bi, hi, qi: (bi, qi, hi, 0)),
            kv,
            kv,
        ] + [scale_spec] * len(scales),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=triton_params(tiles["num_warps"], tiles["num_stages"]),
        interpret=interpret,
        name=name,
    )(q_positions.astype(jnp.int32), kv_lens.astype(jnp.int32), ranks.astype(jnp.int32), q, k, v,
      *scales)


def _tiles(defaults: dict, **given) -> dict:
    tiles = dict(defaults, **{key: val for key, val in given.items() if val is not None})
    for key in ("block_q", "block_k"):
        if key in tiles:
            require_power_of_two(key, tiles[key])
    return tiles


def prefill_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    causal: bool = True,
    window: int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Flash-attention prefill. Same contract as ``attention.prefill_attention``.

    q: [B, T, H, D]; k, v: [B, T, KVH, D]; lengths: [B] int32. T is padded to a multiple of
    the blocks and D to the next supported head dim (zeros change no score or output).
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    if h % kvh:
        raise UnsupportedShapeError(f"query heads H={h} must be a multiple of KV heads {kvh}")
    if window is not None and not causal:
        raise UnsupportedShapeError("a sliding window needs causal attention")
    dp = padded_head_dim(d)
    tiles = _tiles(prefill_tiles(dp, q.dtype), block_q=block_q, block_k=block_k,
                   num_warps=num_warps, num_stages=num_stages)  # fmt: skip
    pad_t = -t % max(tiles["block_q"], tiles["block_k"])
    if pad_t or dp != d:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad_t), (0, 0), (0, dp - d))) for x in (q, k, v))
    tp = t + pad_t
    positions = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (b, tp))
    (o,) = _flash_call(
        q, k, v, positions, lengths, jnp.zeros((b,), jnp.int32), scale=scale, causal=causal,
        dcp_size=1, tiles=tiles, out_dtype=q.dtype, with_lse=False, interpret=interpret,
        name="jaxpar_prefill_attention", window=window,
    )  # fmt: skip
    return o[:, :t, :, :d]


def extend_attention_pallas(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_positions: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
    dcp_rank=0,
    dcp_size: int = 1,
    window: int | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Chunked-prefill attention over a cache. Same contract as ``attention.extend_attention``.

    q: [B, T, H, D]; caches [B, S, KVH, D] (S a multiple of a block >= 16, D a power of two:
    the cache is not copied; an fp8 cache with its [B, S, KVH] scales, read per block);
    q_positions [B, T]; kv_lens [B]. Returns (o [B, T, H, D] float32, lse [B, T, H] float32).
    """
    b, t, h, d = q.shape
    s_len, kvh = k_cache.shape[1], k_cache.shape[2]
    if h % kvh:
        raise UnsupportedShapeError(f"query heads H={h} must be a multiple of KV heads {kvh}")
    require_power_of_two("head_dim", d)
    tiles = _tiles(prefill_tiles(d, q.dtype), block_q=block_q, num_warps=num_warps,
                   num_stages=num_stages)  # fmt: skip
    bk = block_k or _largest_block(s_len, tiles["block_k"])
    if not bk or s_len % bk:
        raise UnsupportedShapeError(
            f"KV cache length S={s_len} has no power-of-two block >= 16 that divides it "
            f"(the extend kernel reads the cache in place); use impl='reference'."
        )
    tiles["block_k"] = bk
    pad_t = -t % tiles["block_q"]
    if pad_t:  # padding queries sit at position -1: they see nothing and are written as 0
        q = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
        q_positions = jnp.pad(q_positions, ((0, 0), (0, pad_t)), constant_values=-1)
    ranks = jnp.broadcast_to(jnp.asarray(dcp_rank, jnp.int32), (b,))
    o, lse = _flash_call(
        q, k_cache, v_cache, q_positions, kv_lens, ranks, scale=scale, causal=True,
        dcp_size=dcp_size, tiles=tiles, out_dtype=jnp.float32, with_lse=True,
        interpret=interpret, name="jaxpar_extend_attention", window=window, k_scale=k_scale,
        v_scale=v_scale,
    )  # fmt: skip
    return o[:, :t], jnp.swapaxes(lse, 1, 2)[:, :t]


# ------------------------------------------------------------------------------- decode


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, *refs, scale, block_k, num_splits, group,
                   scaled):  # fmt: skip
    """One (batch, kv head, split) program.

    q_ref: [Gp, D] (the query heads of this kv head, zero-padded to Gp rows); k_ref, v_ref:
    [S, D]; with `scaled` (an fp8 cache) then ks_ref, vs_ref: [S] per-slot scales (the
    scores are multiplied by the key scales, the probabilities by the value scales, per
    block). The row's kv_len valid slots are cut into num_splits spans of whole blocks;
    this program walks only its span's valid blocks and writes its normalised output
    [Gp, D] and lse [Gp] (o = 0, lse = -inf when its span is empty). Padding query rows
    are not written.
    """
    ks_ref, vs_ref = refs[:2] if scaled else (None, None)
    o_ref, lse_ref = refs[2:] if scaled else refs
    split = pl.program_id(2)
    kv_len = len_ref[...]
    q = q_ref[...]
    gp = q.shape[0]
    span = pl.cdiv(pl.cdiv(kv_len, num_splits), block_k) * block_k
    start = split * span
    n_blocks = jnp.clip(pl.cdiv(kv_len - start, block_k), 0, span // block_k)

    def body(j, carry):
        acc, m, l = carry
        base = pl.multiple_of(start + j * block_k, block_k)
        k = k_ref[pl.ds(base, block_k), :].astype(q.dtype)  # fp8 / bf16 cache -> q's dtype
        v = v_ref[pl.ds(base, block_k), :].astype(q.dtype)
        s = mm(q, k, trans_b=True) * scale  # [Gp, block_k]
        if scaled:
            s = s * ks_ref[pl.ds(base, block_k)].astype(jnp.float32)[None, :]
        pos = base + jnp.arange(block_k)
        s = jnp.where((pos < kv_len)[None, :], s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        if scaled:
            p = p * vs_ref[pl.ds(base, block_k)].astype(jnp.float32)[None, :]
        acc = alpha[:, None] * acc + mm(p.astype(v.dtype), v)
        return acc, m_new, l

    init = (
        jnp.zeros((gp, q.shape[-1]), jnp.float32),
        jnp.full((gp,), MASK_VALUE, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(0, n_blocks, body, init)
    seen = m > 0.5 * MASK_VALUE
    l_safe = jnp.where(seen, l, 1.0)
    real = jnp.arange(gp) < group  # skip the padding rows' stores
    plt.store(o_ref, jnp.where(seen[:, None], acc / l_safe[:, None], 0.0), mask=real[:, None])
    plt.store(lse_ref, jnp.where(seen, m + jnp.log(l_safe), -jnp.inf), mask=real)


def decode_attention_pallas(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
    kv_starts: jax.Array | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Split-KV decode attention. Same contract as ``attention.decode_attention``.

    q: [B, H, D]; k_cache, v_cache: [B, S, KVH, D] (fp8 with k_scale, v_scale [B, S, KVH]
    per-slot scales, read per block); kv_lens: [B] int32 valid slots (a prefix). Returns
    (o [B, H, D] float32, lse [B, H] float32). num_splits defaults to
    :func:`decode_num_splits`; S must be a multiple of block_k (the default block shrinks
    to a power of two that divides S; the cache is never copied or padded).
    """
    b, h, d = q.shape
    _, s_len, kvh, _ = k_cache.shape
    if kv_starts is not None:
        raise UnsupportedShapeError(
            "the Triton decode kernel reads a prefix of slots and cannot start a row at "
            "kv_starts (sliding-window attention); the reference masks the window")
    if h % kvh:
        raise UnsupportedShapeError(f"query heads H={h} must be a multiple of KV heads {kvh}")
    require_power_of_two("head_dim", d)
    tiles = decode_tiles(d, q.dtype)
    bk = block_k or _largest_block(s_len, tiles["block_k"])
    if not bk or s_len % bk:
        raise UnsupportedShapeError(
            f"KV cache length S={s_len} must be a multiple of block_k={bk or 16} for the "
            f"Pallas decode kernel (the cache is read in place); choose a cache length that "
            f"is, or use impl='reference'."
        )
    require_power_of_two("block_k", bk)
    splits = num_splits or decode_num_splits(b, kvh, s_len, bk)
    group = h // kvh
    gp = max(16, pl.next_power_of_2(group))  # tl.dot needs >= 16 rows

    qg = q.reshape(b, kvh, group, d)
    if gp != group:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - group), (0, 0)))
    kv = pl.BlockSpec((None, s_len, None, d), lambda bi, hi, si: (bi, 0, hi, 0))
    scaled = k_scale is not None
    scales = [k_scale, v_scale] if scaled else []
    kernel = functools.partial(_decode_kernel, scale=scale, block_k=bk, num_splits=splits,
                               group=group, scaled=scaled)  # fmt: skip
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, kvh, splits),
        in_specs=[
            pl.BlockSpec((None,), lambda bi, hi, si: (bi,)),
            pl.BlockSpec((None, None, gp, d), lambda bi, hi, si: (bi, hi, 0, 0)),
            kv,
            kv,
        ] + [pl.BlockSpec((None, s_len, None), lambda bi, hi, si: (bi, 0, hi))] * len(scales),
        out_specs=[
            pl.BlockSpec((None, None, None, gp, d), lambda bi, hi, si: (si, bi, hi, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda bi, hi, si: (si, bi, hi, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, b, kvh, gp, d), jnp.float32),
            jax.ShapeDtypeStruct((splits, b, kvh, gp), jnp.float32),
        ],
        compiler_params=triton_params(num_warps or tiles["num_warps"],
                                      num_stages or tiles["num_stages"]),  # fmt: skip
        interpret=interpret,
        name="jaxpar_decode_attention",
    )(kv_lens.astype(jnp.int32), qg, k_cache, v_cache, *scales)
    o, lse = o[:, :, :, :group], lse[:, :, :, :group]  # padding rows were never written
    if splits > 1:
        o, lse = merge_attention_partials(o, lse)
    else:
        o, lse = o[0], lse[0]
    return o.reshape(b, h, d), lse.reshape(b, h)
