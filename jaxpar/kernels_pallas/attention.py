"""Pure-JAX reference attention: prefill (causal, ragged), extend (chunked prefill over a
cache), decode with log-sum-exp output, and the merge of partial results over disjoint KV
shards (split-KV and decode context parallelism, DCP).

GQA everywhere: H query heads, KVH key/value heads, H a multiple of KVH; query head h reads
kv head h // (H // KVH). Scores and softmax are float32.

Prefill and extend are blocked (flash-style): an online softmax over blocks of keys, so
the scores never exist as a [T, T] (or [T, S]) array -- at most [block_q, block_k] per query
block and head -- and key blocks past a row's length or past the causal diagonal are not
visited. That makes them usable as the fallback for long prompts on a GPU as well as the
CPU path.

The DCP cache layout: with ``dcp_size`` ranks, the token at position p lives on rank
p % dcp_size at local slot p // dcp_size; :func:`dcp_local_lengths` turns row lengths into
each rank's count of valid slots, which are always a prefix of its slots.

Sliding-window attention (Mistral, Phi-3): with ``window = W`` a query at position i sees
the keys at positions i - W < j <= i (Hugging Face's convention: W keys, itself included).
Prefill and extend take ``window``; decode takes ``kv_starts``, the first valid slot of
each row (under DCP the local count of slots before the window,
``dcp_local_lengths(max(0, n + 1 - W), rank, size)`` for a token at position n), so the
valid slots are the range ``[kv_starts, kv_lens)``. Key blocks wholly before the window
are skipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "prefill_attention",
    "extend_attention",
    "decode_attention",
    "merge_attention_partials",
    "dcp_local_lengths",
    "window_start",
]

_PRECISION = lax.Precision.HIGHEST
_FP8 = jnp.dtype(jnp.float8_e4m3fn)
# Cache dtypes handled through their bits (see `widen`), by the unsigned type of their size.
_BITS = {_FP8: jnp.uint8, jnp.dtype(jnp.bfloat16): jnp.uint16}


def _raw(x: jax.Array) -> jax.Array:
    """fp8 / bf16 viewed as unsigned bits for layout ops (pad, transpose), which XLA:CPU
    would otherwise run by widening the whole array and narrowing it back."""
    bits = _BITS.get(x.dtype)
    return x if bits is None else lax.bitcast_convert_type(x, bits)


def _cooked(x: jax.Array, dtype) -> jax.Array:
    return lax.bitcast_convert_type(x, dtype) if jnp.dtype(dtype) in _BITS else x


def widen(x: jax.Array) -> jax.Array:
    """A cache block as float32, decoded from its bits with integer ops where XLA:CPU's own
    conversion runs element by element in software (several times slower). bfloat16 is the
    top half of a float32. float8_e4m3fn: its exponent and mantissa land in float32's fields
    with the bias moved from 7 to 127, and subnormals (exponent 0) are m * 2^-9; the NaN
    code is never stored (writes clip to +-448) and would read as 480."""
    if x.dtype == jnp.bfloat16:
        return lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16,
                                        jnp.float32)
    if x.dtype != _FP8:
        return x.astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    mag = bits & 0x7F
    normal = lax.bitcast_convert_type((mag << 20) + (120 << 23), jnp.float32)
    value = jnp.where(mag < 8, mag.astype(jnp.float32) * 2.0**-9, normal)
    return jnp.where(bits >= 0x80, -value, value)
# Default block sizes of the blocked references: one block up to 512 tokens (tests and
# short prompts run as plain attention), [512, 512] score tiles beyond.
_BLOCK = 512


def _group_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """[..., H, D] -> [..., KVH, H // KVH, D] (query head h = kvh * G + j)."""
    h = q.shape[-2]
    if h % num_kv_heads:
        raise ValueError(f"query heads {h} must be a multiple of kv heads {num_kv_heads}")
    return q.reshape(*q.shape[:-2], num_kv_heads, h // num_kv_heads, q.shape[-1])


def _check_window(window, causal: bool) -> int | None:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive number of keys or None, got {window!r}")
    if not causal:
        raise ValueError("a sliding window needs causal attention")
    return window


def window_start(positions: jax.Array, window: int | None) -> jax.Array | None:
    """First position a query at `positions` sees under a sliding window (None: no window)."""
    if window is None:
        return None
    return jnp.maximum(positions - window + 1, 0)


def dcp_local_lengths(kv_lens: jax.Array, rank, size: int) -> jax.Array:
    """Valid slots on DCP rank `rank` of `size` for rows holding kv_lens tokens.

    Positions rank, rank + size, ... < kv_len live in local slots 0, 1, ...: their count is
    ceil((kv_len - rank) / size), never negative. size 1 returns kv_lens.
    """
    if size == 1:
        return kv_lens
    return (kv_lens + (size - 1 - rank)) // size


def _online_softmax_step(carry, s, v):
    """One key block of the online softmax. carry = (acc [B, KVH, G, Q, D], m and l
    [B, KVH, G, Q]); s [B, KVH, G, Q, K] scaled scores, -inf where masked; v [B, KVH, K, D]."""
    acc, m, l = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing seen yet
    alpha = jnp.exp(m - m_safe)  # exp(-inf) = 0 for the first block a row sees
    p = jnp.exp(s - m_safe[..., None])
    l = alpha * l + jnp.sum(p, axis=-1)
    acc = alpha[..., None] * acc + jnp.einsum("bhgqk,bhkd->bhgqd", p, v, precision=_PRECISION)
    return acc, m_new, l


def _finish(acc, m, l):
    """Normalised output and lse; rows that saw no key get o = 0, lse = -inf."""
    has_any = l > 0
    o = acc / jnp.where(has_any, l, 1.0)[..., None]
    lse = jnp.where(has_any, m + jnp.log(jnp.where(has_any, l, 1.0)), -jnp.inf)
    return jnp.where(has_any[..., None], o, 0.0), lse


def prefill_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    causal: bool = True,
    window: int | None = None,
    block_q: int = _BLOCK,
    block_k: int = _BLOCK,
) -> jax.Array:
    """Attention over right-padded rows, blocked.

    Args:
      q: [B, T, H, D]; k, v: [B, T, KVH, D].
      lengths: [B] int32, valid tokens per row (the rest is padding).
      scale: score scale (usually D ** -0.5).
      causal: key j is visible to query i only if j <= i.
      window: sliding window W (causal only): key j is visible to query i only if
        i - W < j. None: no window.
      block_q, block_k: tile sizes (clipped to T). Query blocks are mapped with
        ``lax.map``; each walks its key blocks with a ``fori_loop`` that stops at the
        longest row and, if causal, at the diagonal. T <= block is plain masked attention.
    Returns:
      [B, T, H, D] in q.dtype; padding query rows (i >= lengths[b]) are zero.
    """
    b, t, kvh, d = k.shape
    h = q.shape[2]
    window = _check_window(window, causal)
    bq, bk = min(block_q, t), min(block_k, t)
    tq, tk = -(-t // bq) * bq, -(-t // bk) * bk
    qg = _group_queries(q, kvh).astype(jnp.float32)  # [B, T, KVH, G, D]
    qg = jnp.pad(qg, ((0, 0), (0, tq - t), (0, 0), (0, 0), (0, 0)))
    # Key blocks first: [nk, B, KVH, bk, D], so block j is a dynamic index on axis 0.
    kb, vb = (
        jnp.moveaxis(jnp.pad(x, ((0, 0), (0, tk - t), (0, 0), (0, 0))).astype(jnp.float32)
                     .reshape(b, tk // bk, bk, kvh, d), (1, 3), (0, 2))  # fmt: skip
        for x in (k, v)
    )
    # Query blocks: [nq, B, KVH, G, bq, D].
    qb = jnp.moveaxis(qg.reshape(b, tq // bq, bq, kvh, h // kvh, d), (1, 2), (0, 4))
    max_len = jnp.max(lengths)

    def query_block(args):
        qi, q_blk = args
        q_pos = qi * bq + jnp.arange(bq)

        def body(j, carry):
            k_pos = j * bk + jnp.arange(bk)
            s = jnp.einsum("bhgqd,bhkd->bhgqk", q_blk, kb[j], precision=_PRECISION) * scale
            mask = k_pos[None, :] < lengths[:, None]  # [B, bk]
            mask = mask[:, None, :] & (q_pos[None, :, None] < lengths[:, None, None])
            if causal:
                mask = mask & (q_pos[:, None] >= k_pos[None, :])[None]
            if window is not None:
                mask = mask & (q_pos[:, None] - k_pos[None, :] < window)[None]
            s = jnp.where(mask[:, None, None], s, -jnp.inf)
            return _online_softmax_step(carry, s, vb[j])

        init = (
            jnp.zeros(q_blk.shape, jnp.float32),
            jnp.full(q_blk.shape[:-1], -jnp.inf, jnp.float32),
            jnp.zeros(q_blk.shape[:-1], jnp.float32),
        )
        if tk == bk:  # one key block: plain masked attention (no loop to compile)
            return _finish(*body(0, init))[0]
        n_blocks = (max_len + bk - 1) // bk
        if causal:
            n_blocks = jnp.minimum(n_blocks, ((qi + 1) * bq + bk - 1) // bk)
        first = 0 if window is None else jnp.maximum(qi * bq - window + 1, 0) // bk
        with jax.named_scope("prefill_key_blocks"):
            acc, m, l = lax.fori_loop(first, jnp.maximum(n_blocks, first), body, init)
        return _finish(acc, m, l)[0]

    if tq == bq:  # one query block
        o = query_block((0, qb[0]))[None]
    else:
        o = lax.map(query_block, (jnp.arange(tq // bq), qb))  # [nq, B, KVH, G, bq, D]
    o = jnp.moveaxis(o, (0, 4), (1, 2)).reshape(b, tq, h, d)[:, :t]
    return o.astype(q.dtype)


def extend_attention(
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
    block_k: int = _BLOCK,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Chunked prefill: T queries at `q_positions` over a cache that already holds them.

    Args:
      q: [B, T, H, D]; k_cache, v_cache: [B, S, KVH, D] local slots (DCP layout: slot s holds
        position s * dcp_size + dcp_rank).
      q_positions: [B, T] int32 position of each query; kv_lens: [B] int32 tokens in the
        cache (including this chunk). Slot position p is visible to a query at position i
        iff p <= i and p < kv_lens[b]; queries at positions >= kv_lens[b] are padding.
      dcp_rank: this rank (a traced scalar inside ``shard_map``); dcp_size: ranks.
      window: sliding window W: slot position p is visible to a query at i only if
        i - W < p. None: no window.
      block_k: slots per step; the loop stops at this rank's longest valid prefix.
      k_scale, v_scale: [B, S, KVH] per-slot scales of a scaled (fp8) cache (see
        :func:`decode_attention`), applied per key block.
    Returns:
      (o [B, T, H, D] float32, lse [B, T, H] float32); o = 0, lse = -inf where no slot is
      visible (merge ranks with :func:`merge_attention_partials`).
    """
    b, t, h, d = q.shape
    s_len, kvh = k_cache.shape[1], k_cache.shape[2]
    window = _check_window(window, True)
    bk = min(block_k, s_len)
    sp = -(-s_len // bk) * bk
    qg = jnp.moveaxis(_group_queries(q, kvh).astype(jnp.float32), 1, 3)  # [B, KVH, G, T, D]
    cache_dtype = k_cache.dtype
    kb, vb = (
        jnp.moveaxis(jnp.pad(_raw(c), ((0, 0), (0, sp - s_len), (0, 0), (0, 0)))
                     .reshape(b, sp // bk, bk, kvh, d), (1, 3), (0, 2))  # fmt: skip
        for c in (k_cache, v_cache)
    )  # [nk, B, KVH, bk, D] in the cache dtype (fp8 as its bits): each step converts one block
    if k_scale is not None:
        ksb, vsb = (
            jnp.moveaxis(jnp.pad(c.astype(jnp.float32), ((0, 0), (0, sp - s_len), (0, 0)))
                         .reshape(b, sp // bk, bk, kvh), (1, 3), (0, 2))  # fmt: skip
            for c in (k_scale, v_scale)
        )  # [nk, B, KVH, bk]
    n_valid = jnp.max(dcp_local_lengths(kv_lens, dcp_rank, dcp_size))

    def body(j, carry):
        slot_pos = (j * bk + jnp.arange(bk)) * dcp_size + dcp_rank  # [bk]
        s = jnp.einsum("bhgtd,bhkd->bhgtk", qg, widen(_cooked(kb[j], cache_dtype)),
                       precision=_PRECISION) * scale  # fmt: skip
        vj = widen(_cooked(vb[j], cache_dtype))
        if k_scale is not None:
            s = s * ksb[j][:, :, None, None, :]
            vj = vj * vsb[j][..., None]
        ok = (slot_pos[None, None, :] <= q_positions[:, :, None]) & (
            slot_pos[None, None, :] < kv_lens[:, None, None]
        ) & (q_positions < kv_lens[:, None])[:, :, None]  # [B, T, bk]; padding queries: none
        if window is not None:
            ok = ok & (q_positions[:, :, None] - slot_pos[None, None, :] < window)
        s = jnp.where(ok[:, None, None], s, -jnp.inf)
        return _online_softmax_step(carry, s, vj)

    init = (
        jnp.zeros(qg.shape, jnp.float32),
        jnp.full(qg.shape[:-1], -jnp.inf, jnp.float32),
        jnp.zeros(qg.shape[:-1], jnp.float32),
    )
    if sp == bk:  # one block: plain masked attention (no loop to compile)
        acc, m, l = body(0, init)
    else:
        n_blocks = (n_valid + bk - 1) // bk
        first = 0
        if window is not None:  # local slots holding positions before every query's window
            before = jnp.maximum(jnp.min(q_positions) - window + 1, 0)
            first = jnp.minimum(dcp_local_lengths(before, dcp_rank, dcp_size) // bk, n_blocks)
        acc, m, l = lax.fori_loop(first, n_blocks, body, init)
    o, lse = _finish(acc, m, l)  # [B, KVH, G, T, D], [B, KVH, G, T]
    return (jnp.moveaxis(o, 3, 1).reshape(b, t, h, d),
            jnp.moveaxis(lse, 3, 1).reshape(b, t, h))  # fmt: skip


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
    kv_starts: jax.Array | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One query token per row against a KV cache whose first kv_lens[b] slots are valid.

    Args:
      q: [B, H, D]; k_cache, v_cache: [B, S, KVH, D]; kv_lens: [B] int32 valid slots (under
        DCP: :func:`dcp_local_lengths` of the row lengths).
      scale: score scale.
      kv_starts: [B] int32 first valid slot (sliding window), or None (slot 0): the valid
        slots are [kv_starts, kv_lens).
      k_scale, v_scale: [B, S, KVH] per-slot scales of a scaled (fp8) cache: the key is
        k_cache * k_scale. Applied to the scores and to the probabilities, so the cache is
        never dequantised as a whole.
    Returns:
      (o [B, H, D] float32, lse [B, H] float32 log-sum-exp of the scaled scores). A row with
      no valid slot gives o = 0 and lse = -inf.

    Written as broadcast-multiply-reduce over the cache in its own layout: XLA fuses each
    product into its reduction, so the cache is read once (a low-precision cache converted
    inside the loop). The batched-matmul form (``einsum("bhgd,bshd->bhgs")``) needs the KV
    heads major, and XLA:CPU copied every layer's cache into that layout on every step.
    """
    b, s_len, kvh, d = k_cache.shape
    qg = _group_queries(q, kvh).astype(jnp.float32)  # [B, KVH, G, D]
    valid = jnp.arange(s_len)[None, :] < kv_lens[:, None]  # [B, S]
    if kv_starts is not None:
        valid = valid & (jnp.arange(s_len)[None, :] >= kv_starts[:, None])
    with jax.named_scope("decode_scores"):
        s = jnp.sum(qg[:, None] * widen(k_cache)[:, :, :, None, :], axis=-1)  # [B, S, KVH, G]
        if k_scale is not None:
            s = s * k_scale.astype(jnp.float32)[..., None]
        s = jnp.where(valid[:, :, None, None], s * scale, -jnp.inf)
    m = jnp.max(s, axis=1)  # [B, KVH, G]
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe[:, None])  # exactly 0 at invalid slots
    denom = jnp.sum(p, axis=1)
    if v_scale is not None:
        p = p * v_scale.astype(jnp.float32)[..., None]
    o = jnp.sum(p[..., None] * widen(v_cache)[:, :, :, None, :], axis=1)  # [B, KVH, G, D]
    has_any = denom > 0
    o = o / jnp.where(has_any, denom, 1.0)[..., None]
    lse = jnp.where(has_any, m_safe + jnp.log(jnp.where(has_any, denom, 1.0)), -jnp.inf)
    return o.reshape(q.shape).astype(jnp.float32), lse.reshape(q.shape[:2])


def merge_attention_partials(os: jax.Array, lses: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Merges attention computed over disjoint KV shards (KV splits or DCP ranks).

    Args:
      os: [R, ..., D] per-shard outputs (each normalised over its own shard).
      lses: [R, ...] per-shard log-sum-exp (-inf for a shard that saw no valid key).
    Returns:
      (o [..., D] float32, lse [...] float32): m = max_r lse_r, w_r = exp(lse_r - m),
      o = sum_r w_r o_r / sum_r w_r, lse = m + log(sum_r w_r). Where every shard is -inf,
      o = 0 and lse = -inf.
    """
    lses = lses.astype(jnp.float32)
    m = jnp.max(lses, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lses - m_safe)  # 0 for -inf shards
    total = jnp.sum(w, axis=0)
    has_any = total > 0
    o = jnp.sum(w[..., None] * os.astype(jnp.float32), axis=0)
    o = o / jnp.where(has_any, total, 1.0)[..., None]
    lse = jnp.where(has_any, m_safe + jnp.log(jnp.where(has_any, total, 1.0)), -jnp.inf)
    return o, lse
