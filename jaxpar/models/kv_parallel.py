"""KV-cache writes and decode attention under every attention plan, in `shard_map`.

The cache `[B, S, KVH, D]` may be split over batch (attention DP), KV heads (TP) and
slots (decode context parallelism, DCP). With DCP of size n, the token at position p
lives on rank p % n at local slot p // n (round-robin, so every rank fills evenly); each
rank attends over its slots and returns (out, log-sum-exp), and the ranks merge by LSE
(`merge_over_ranks`; docs/ARCHITECTURE.md, "DCP layout and merge").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpar.kernels_pallas import dispatch
from jaxpar.kernels_pallas.attention import dcp_local_lengths, window_start
from jaxpar.models.cache import KVCache
from jaxpar.sharding.axis_rules import AxisRules

Q_DECODE_AXES = ("batch", "q_heads", "head_dim")
KV_NEW_AXES = ("batch", "kv_heads", "head_dim")


def _index(axes) -> jax.Array:
    return jax.lax.axis_index(axes) if axes else jnp.int32(0)


def merge_over_ranks(o: jax.Array, lse: jax.Array, axes) -> jax.Array:
    """Attention partials of disjoint KV shards, one per rank along mesh `axes`, merged by
    log-sum-exp inside `shard_map`: m = max_r lse_r, w_r = exp(lse_r - m),
    o = sum_r w_r o_r / sum_r w_r. A rank that saw no valid key has lse = -inf and weight
    0; where every rank is -inf (a padding row) the result is 0, not NaN.
    o: [..., D] float32 (normalised over the rank's shard); lse: [...]. Returns [..., D]."""
    m = jax.lax.pmax(lse, axes)
    w = jnp.exp(lse - jnp.where(jnp.isfinite(m), m, 0.0))
    total = jax.lax.psum(w, axes)
    o = jax.lax.psum(o * w[..., None], axes)
    return o / jnp.where(total > 0, total, 1.0)[..., None]


def _kv_for_local_heads(rules: AxisRules, k: jax.Array, v: jax.Array, num_heads: int,
                        num_kv_heads: int, local_heads: int):
    """When KV heads are replicated but q heads split, pick (per local q head) the KV head
    it reads, so the local computation is plain multi-head attention."""
    q_axes, kv_axes = rules.axes_for("q_heads"), rules.axes_for("kv_heads")
    if q_axes == kv_axes:
        return k, v
    group = num_heads // num_kv_heads
    needed = (_index(q_axes) * local_heads + jnp.arange(local_heads)) // group
    local = needed - _index(kv_axes) * k.shape[2]
    return jnp.take(k, local, axis=2), jnp.take(v, local, axis=2)


def decode_attention(rules: AxisRules, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
                     cache: KVCache, lengths: jax.Array, *, num_heads: int, num_kv_heads: int,
                     scale: float, impl: str, window: int | None = None) -> tuple[jax.Array, KVCache]:
    """q: [B, H, D]; k_new, v_new: [B, KVH, D]; lengths: [B] tokens cached before this one.
    Writes the new token into its slot and attends over the cache (the last `window`
    positions only, under a sliding window). Returns o [B, H, D] f32."""
    dcp_axes = rules.axes_for("cache_seq")
    n_dcp = rules.size("cache_seq")

    def local(q, k_new, v_new, kc, vc, lengths):
        rank = _index(dcp_axes)
        rows = jnp.arange(q.shape[0])
        slot = lengths // n_dcp
        mine = (lengths % n_dcp == rank)[:, None, None]
        kc = kc.at[rows, slot].set(jnp.where(mine, k_new.astype(kc.dtype), kc[rows, slot]))
        vc = vc.at[rows, slot].set(jnp.where(mine, v_new.astype(vc.dtype), vc[rows, slot]))
        kk, vv = _kv_for_local_heads(rules, kc, vc, num_heads, num_kv_heads, q.shape[1])
        # This rank's valid slots are a prefix (under a window, the range from the first
        # local slot inside it): blocks past it are never read.
        local_lens = dcp_local_lengths(lengths + 1, rank, n_dcp)
        starts = None if window is None else dcp_local_lengths(window_start(lengths, window), rank, n_dcp)
        o, lse = dispatch.attention_decode(q, kk, vv, local_lens, scale=scale, kv_starts=starts,
                                           impl=impl)
        if n_dcp > 1:
            o = merge_over_ranks(o, lse, dcp_axes)
        return o, kc, vc

    if rules.mesh.size == 1:
        o, kc, vc = local(q, k_new, v_new, cache.k, cache.v, lengths)
    else:
        cache_spec = rules.spec(KVCache.LOGICAL_AXES)
        q_spec, kv_spec = rules.spec(Q_DECODE_AXES), rules.spec(KV_NEW_AXES)
        o, kc, vc = jax.shard_map(
            local, mesh=rules.mesh,
            in_specs=(q_spec, kv_spec, kv_spec, cache_spec, cache_spec, rules.spec(("batch",))),
            out_specs=(q_spec, cache_spec, cache_spec), check_vma=False,
        )(q, k_new, v_new, cache.k, cache.v, lengths)
    return o, KVCache(k=kc, v=vc)


def write_prefill(rules: AxisRules, k: jax.Array, v: jax.Array, cache: KVCache) -> KVCache:
    """Writes prefill keys / values k, v [B, T, KVH, D] (positions 0..T-1) into an empty cache."""
    n_dcp = rules.size("cache_seq")
    if n_dcp == 1:
        put = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), 0, 1)  # noqa: E731
        return KVCache(k=put(cache.k, k), v=put(cache.v, v))
    dcp_axes = rules.axes_for("cache_seq")

    def local(k, v, kc, vc):
        rank = _index(dcp_axes)
        b, t = k.shape[:2]

        def mine(x):  # positions rank, rank + n, rank + 2n, ... -> local slots 0, 1, 2, ...
            x = x.reshape(b, t // n_dcp, n_dcp, *x.shape[2:])
            return jax.lax.dynamic_index_in_dim(x, rank, axis=2, keepdims=False)

        return (jax.lax.dynamic_update_slice_in_dim(kc, mine(k).astype(kc.dtype), 0, 1),
                jax.lax.dynamic_update_slice_in_dim(vc, mine(v).astype(vc.dtype), 0, 1))

    new_spec = rules.spec(("batch", None, "kv_heads", "head_dim"))
    cache_spec = rules.spec(KVCache.LOGICAL_AXES)
    kc, vc = jax.shard_map(local, mesh=rules.mesh, in_specs=(new_spec, new_spec, cache_spec, cache_spec),
                           out_specs=(cache_spec, cache_spec), check_vma=False)(k, v, cache.k, cache.v)
    return KVCache(k=kc, v=vc)


def extend_attention(rules: AxisRules, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
                     cache: KVCache, positions: jax.Array, lengths: jax.Array, *, num_heads: int,
                     num_kv_heads: int, scale: float, impl: str,
                     window: int | None = None) -> tuple[jax.Array, KVCache]:
    """Chunked prefill: T new tokens at `positions` [B, T] continue a filled cache.
    q [B, T, H, D]; k_new, v_new [B, T, KVH, D]; lengths [B] valid new tokens per row."""
    dcp_axes = rules.axes_for("cache_seq")
    n_dcp = rules.size("cache_seq")

    def local(q, k_new, v_new, kc, vc, positions, lengths):
        rank = _index(dcp_axes)
        rows = jnp.arange(q.shape[0])[:, None]
        # n consecutive positions share a local slot index, one per rank: another rank's
        # positions are sent past the end and dropped (writing them back unchanged would
        # race with this rank's write to the same slot).
        slot = jnp.where(positions % n_dcp == rank, positions // n_dcp, kc.shape[1])
        kc = kc.at[rows, slot].set(k_new.astype(kc.dtype), mode="drop")
        vc = vc.at[rows, slot].set(v_new.astype(vc.dtype), mode="drop")
        kk, vv = _kv_for_local_heads(rules, kc, vc, num_heads, num_kv_heads, q.shape[2])
        kv_valid = positions[:, 0] + lengths
        o, lse = dispatch.attention_extend(q, kk, vv, positions, kv_valid, scale=scale,
                                           dcp_rank=rank, dcp_size=n_dcp, window=window, impl=impl)
        if n_dcp > 1:
            o = merge_over_ranks(o, lse, dcp_axes)
        return o, kc, vc

    if rules.mesh.size == 1:
        o, kc, vc = local(q, k_new, v_new, cache.k, cache.v, positions, lengths)
    else:
        cache_spec = rules.spec(KVCache.LOGICAL_AXES)
        q_spec = rules.spec(("batch", None, "q_heads", "head_dim"))
        kv_spec = rules.spec(("batch", None, "kv_heads", "head_dim"))
        row = rules.spec(("batch",))
        o, kc, vc = jax.shard_map(
            local, mesh=rules.mesh,
            in_specs=(q_spec, kv_spec, kv_spec, cache_spec, cache_spec, rules.spec(("batch", None)), row),
            out_specs=(q_spec, cache_spec, cache_spec), check_vma=False,
        )(q, k_new, v_new, cache.k, cache.v, positions, lengths)
    return o, KVCache(k=kc, v=vc)
