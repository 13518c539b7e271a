"""Pure-JAX reference attention: prefill (causal, ragged), decode with log-sum-exp output,
and the decode-context-parallel (DCP) merge of partial results.

GQA everywhere: H query heads, KVH key/value heads, H a multiple of KVH; query head h reads
kv head h // (H // KVH). Scores and softmax are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["prefill_attention", "decode_attention", "merge_attention_partials"]

_PRECISION = lax.Precision.HIGHEST


def _group_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """[..., H, D] -> [..., KVH, H // KVH, D] (query head h = kvh * G + j)."""
    h = q.shape[-2]
    if h % num_kv_heads:
        raise ValueError(f"query heads {h} must be a multiple of kv heads {num_kv_heads}")
    return q.reshape(*q.shape[:-2], num_kv_heads, h // num_kv_heads, q.shape[-1])


def prefill_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    causal: bool = True,
) -> jax.Array:
    """Attention over right-padded rows.

    Args:
      q: [B, T, H, D]; k, v: [B, T, KVH, D].
      lengths: [B] int32, valid tokens per row (the rest is padding).
      scale: score scale (usually D ** -0.5).
      causal: key j is visible to query i only if j <= i.
    Returns:
      [B, T, H, D] in q.dtype; padding query rows (i >= lengths[b]) are zero.
    """
    b, t, kvh, d = k.shape
    qg = _group_queries(q, kvh)  # [B, T, KVH, G, D]
    with jax.named_scope("prefill_scores"):
        s = jnp.einsum(
            "bqhgd,bkhd->bhgqk",
            qg.astype(jnp.float32),
            k.astype(jnp.float32),
            precision=_PRECISION,
        )
        s = s * scale
    pos = jnp.arange(t)
    key_ok = pos[None, :] < lengths[:, None]  # [B, Tk]
    mask = key_ok[:, None, :]  # [B, Tq, Tk]
    if causal:
        mask = mask & (pos[:, None] >= pos[None, :])[None]
    mask = mask & (pos[None, :, None] < lengths[:, None, None])  # padding queries see nothing
    mask = mask[:, None, None]  # [B, 1, 1, Tq, Tk]
    with jax.named_scope("prefill_softmax"):
        s = jnp.where(mask, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        # Rows with no visible key have m = -inf: use 0 so exp gives 0 instead of NaN.
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        p = p / jnp.where(denom > 0, denom, 1.0)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32), precision=_PRECISION)
    return o.reshape(q.shape).astype(q.dtype)


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
    slot_positions: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One query token per row against a KV cache.

    Args:
      q: [B, H, D]; k_cache, v_cache: [B, S, KVH, D]; kv_lens: [B] int32.
      scale: score scale.
      slot_positions: optional [S] int32 token position held by each cache slot (a DCP
        shard holds positions rank, rank + dcp, ...); default slot s holds position s.
        Slot s is valid for row b iff its position < kv_lens[b].
    Returns:
      (o [B, H, D] float32, lse [B, H] float32 log-sum-exp of the scaled scores). A row with
      no valid slot gives o = 0 and lse = -inf.
    """
    b, s_len, kvh, d = k_cache.shape
    qg = _group_queries(q, kvh)  # [B, KVH, G, D]
    pos = jnp.arange(s_len) if slot_positions is None else slot_positions
    valid = pos[None, :] < kv_lens[:, None]  # [B, S]
    with jax.named_scope("decode_scores"):
        s = jnp.einsum(
            "bhgd,bshd->bhgs",
            qg.astype(jnp.float32),
            k_cache.astype(jnp.float32),
            precision=_PRECISION,
        )
        s = jnp.where(valid[:, None, None, :], s * scale, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)  # exactly 0 at invalid slots
    denom = jnp.sum(p, axis=-1)
    o = jnp.einsum("bhgs,bshd->bhgd", p, v_cache.astype(jnp.float32), precision=_PRECISION)
    has_any = denom > 0
    o = o / jnp.where(has_any, denom, 1.0)[..., None]
    lse = jnp.where(has_any, m_safe[..., 0] + jnp.log(jnp.where(has_any, denom, 1.0)), -jnp.inf)
    return o.reshape(q.shape).astype(jnp.float32), lse.reshape(q.shape[:2])


def merge_attention_partials(os: jax.Array, lses: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Merges attention computed over disjoint KV shards (DESIGN.md section 5, DCP merge).

    Args:
      os: [R, ..., D] per-rank outputs (each normalised over its own shard).
      lses: [R, ...] per-rank log-sum-exp (-inf for a rank that saw no valid key).
    Returns:
      (o [..., D] float32, lse [...] float32): m = max_r lse_r, w_r = exp(lse_r - m),
      o = sum_r w_r o_r / sum_r w_r, lse = m + log(sum_r w_r). Where every rank is -inf,
      o = 0 and lse = -inf.
    """
    lses = lses.astype(jnp.float32)
    m = jnp.max(lses, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lses - m_safe)  # 0 for -inf ranks
    total = jnp.sum(w, axis=0)
    has_any = total > 0
    o = jnp.sum(w[..., None] * os.astype(jnp.float32), axis=0)
    o = o / jnp.where(has_any, total, 1.0)[..., None]
    lse = jnp.where(has_any, m_safe + jnp.log(jnp.where(has_any, total, 1.0)), -jnp.inf)
    return o, lse
