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
from jaxpar.models.cache import FP8, KVCache, quantize_kv
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


def _kv_for_local_heads(rules: AxisRules, arrays: list, num_heads: int, num_kv_heads: int,
                        local_heads: int) -> list:
    """When KV heads are replicated but q heads split, pick (per local q head) the KV head
    it reads, so the local computation is plain multi-head attention. `arrays`: the local
    cache arrays (keys, values and any scales), KV heads on axis 2."""
    q_axes, kv_axes = rules.axes_for("q_heads"), rules.axes_for("kv_heads")
    if q_axes == kv_axes:
        return arrays
    group = num_heads // num_kv_heads
    needed = (_index(q_axes) * local_heads + jnp.arange(local_heads)) // group
    local = needed - _index(kv_axes) * arrays[0].shape[2]
    return [jnp.take(a, local, axis=2) for a in arrays]


def _cache_arrays(cache: KVCache) -> list:
    """The cache's arrays in a fixed order: k, v, then k_scale, v_scale when scaled."""
    return [cache.k, cache.v] + ([cache.k_scale, cache.v_scale] if cache.scaled else [])


def _cache_specs(rules: AxisRules, cache: KVCache) -> list:
    values, scales = rules.spec(KVCache.LOGICAL_AXES), rules.spec(KVCache.SCALE_AXES)
    return [values, values] + ([scales, scales] if cache.scaled else [])


def _scale_kwargs(arrays: list) -> dict:
    """Kernel keywords of a (local) cache: the scales of an fp8 cache, nothing otherwise
    (so kernels that do not read scaled caches keep their plain signature)."""
    return dict(k_scale=arrays[2], v_scale=arrays[3]) if len(arrays) == 4 else {}


def _quantized(arrays: list, k_new: jax.Array, v_new: jax.Array) -> list:
    """New keys / values as the cache stores them: [k, v] (+ [k_scale, v_scale])."""
    kq, ks = quantize_kv(k_new, arrays[0].dtype)
    vq, vs = quantize_kv(v_new, arrays[1].dtype)
    return [kq, vq] + ([ks, vs] if len(arrays) == 4 else [])


_BITS = {FP8: jnp.uint8, jnp.dtype(jnp.bfloat16): jnp.uint16}


def _bits(x: jax.Array) -> jax.Array:
    """An fp8 / bf16 array viewed as unsigned bits. XLA:CPU has no fp8 or bf16 scatter or
    update-slice: it widens the whole cache, writes and narrows it back, every step; on
    the bits it writes in place."""
    bits = _BITS.get(x.dtype)
    return x if bits is None else jax.lax.bitcast_convert_type(x, bits)


def _unbits(x: jax.Array, dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, dtype) if jnp.dtype(dtype) in _BITS else x


def _put(c: jax.Array, x: jax.Array, start) -> jax.Array:
    """`c` with `x` written from `start` along the slot axis (axis 1)."""
    out = jax.lax.dynamic_update_slice_in_dim(_bits(c), _bits(x.astype(c.dtype)), start, 1)
    return _unbits(out, c.dtype)


def _write_slots(arrays: list, new: list, rows, slot, mine) -> list:
    """Writes each new[i] at [rows, slot] of arrays[i] where `mine` holds. Under DCP n
    consecutive positions share a local slot index, one per rank: another rank's positions
    are sent past the end and dropped (writing them back unchanged would race with this
    rank's write to the same slot)."""
    slot = jnp.where(mine, slot, arrays[0].shape[1])
    return [_unbits(_bits(c).at[rows, slot].set(_bits(x.astype(c.dtype)), mode="drop"), c.dtype)
            for c, x in zip(arrays, new)]


def decode_attention(rules: AxisRules, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
                     cache: KVCache, lengths: jax.Array, *, num_heads: int, num_kv_heads: int,
                     scale: float, impl: str, window: int | None = None) -> tuple[jax.Array, KVCache]:
    """q: [B, H, D]; k_new, v_new: [B, KVH, D]; lengths: [B] tokens cached before this one.
    Writes the new token into its slot (quantised for an fp8 cache: its scales are
    computed here, on every rank alike) and attends over the cache (the last `window`
    positions only, under a sliding window). Returns o [B, H, D] f32."""
    dcp_axes = rules.axes_for("cache_seq")
    n_dcp = rules.size("cache_seq")

    def local(q, k_new, v_new, lengths, *arrays):
        rank = _index(dcp_axes)
        rows = jnp.arange(q.shape[0])
        arrays = _write_slots(list(arrays), _quantized(arrays, k_new, v_new), rows, lengths // n_dcp,
                              lengths % n_dcp == rank)
        read = _kv_for_local_heads(rules, arrays, num_heads, num_kv_heads, q.shape[1])
        # This rank's valid slots are a prefix (under a window, the range from the first
        # local slot inside it): blocks past it are never read.
        local_lens = dcp_local_lengths(lengths + 1, rank, n_dcp)
        starts = None if window is None else dcp_local_lengths(window_start(lengths, window), rank, n_dcp)
        o, lse = dispatch.attention_decode(q, read[0], read[1], local_lens, scale=scale, kv_starts=starts,
                                           impl=impl, **_scale_kwargs(read))
        if n_dcp > 1:
            o = merge_over_ranks(o, lse, dcp_axes)
        return o, *arrays

    arrays = _cache_arrays(cache)
    if rules.mesh.size == 1:
        o, *arrays = local(q, k_new, v_new, lengths, *arrays)
    else:
        specs = _cache_specs(rules, cache)
        q_spec, kv_spec = rules.spec(Q_DECODE_AXES), rules.spec(KV_NEW_AXES)
        o, *arrays = jax.shard_map(
            local, mesh=rules.mesh,
            in_specs=(q_spec, kv_spec, kv_spec, rules.spec(("batch",)), *specs),
            out_specs=(q_spec, *specs), check_vma=False,
        )(q, k_new, v_new, lengths, *arrays)
    return o, KVCache(*arrays)


def write_prefill(rules: AxisRules, k: jax.Array, v: jax.Array, cache: KVCache) -> KVCache:
    """Writes prefill keys / values k, v [B, T, KVH, D] (positions 0..T-1) into an empty cache."""
    n_dcp = rules.size("cache_seq")
    arrays = _cache_arrays(cache)
    new = _quantized(arrays, k, v)
    if n_dcp == 1:
        return KVCache(*(_put(c, x, 0) for c, x in zip(arrays, new)))
    dcp_axes = rules.axes_for("cache_seq")

    def local(*args):
        half = len(args) // 2
        new, arrays = args[:half], args[half:]
        rank = _index(dcp_axes)

        def mine(x):  # positions rank, rank + n, rank + 2n, ... -> local slots 0, 1, 2, ...
            b, t = x.shape[:2]
            x = x.reshape(b, t // n_dcp, n_dcp, *x.shape[2:])
            return jax.lax.dynamic_index_in_dim(x, rank, axis=2, keepdims=False)

        return tuple(_put(c, mine(x), 0) for c, x in zip(arrays, new))

    new_specs = [rules.spec(("batch", None, "kv_heads", "head_dim"))] * 2
    if cache.scaled:
        new_specs += [rules.spec(("batch", None, "kv_heads"))] * 2
    specs = _cache_specs(rules, cache)
    out = jax.shard_map(local, mesh=rules.mesh, in_specs=(*new_specs, *specs),
                        out_specs=tuple(specs), check_vma=False)(*new, *arrays)
    return KVCache(*out)


def extend_attention(rules: AxisRules, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
                     cache: KVCache, positions: jax.Array, lengths: jax.Array, *, num_heads: int,
                     num_kv_heads: int, scale: float, impl: str,
                     window: int | None = None) -> tuple[jax.Array, KVCache]:
    """Chunked prefill: T new tokens at `positions` [B, T] continue a filled cache.
    q [B, T, H, D]; k_new, v_new [B, T, KVH, D]; lengths [B] valid new tokens per row."""
    dcp_axes = rules.axes_for("cache_seq")
    n_dcp = rules.size("cache_seq")

    def local(q, k_new, v_new, positions, lengths, *arrays):
        rank = _index(dcp_axes)
        rows = jnp.arange(q.shape[0])[:, None]
        arrays = _write_slots(list(arrays), _quantized(arrays, k_new, v_new), rows,
                              positions // n_dcp, positions % n_dcp == rank)
        read = _kv_for_local_heads(rules, arrays, num_heads, num_kv_heads, q.shape[2])
        kv_valid = positions[:, 0] + lengths
        o, lse = dispatch.attention_extend(q, read[0], read[1], positions, kv_valid, scale=scale,
                                           dcp_rank=rank, dcp_size=n_dcp, window=window, impl=impl,
                                           **_scale_kwargs(read))
        if n_dcp > 1:
            o = merge_over_ranks(o, lse, dcp_axes)
        return o, *arrays

    arrays = _cache_arrays(cache)
    if rules.mesh.size == 1:
        o, *arrays = local(q, k_new, v_new, positions, lengths, *arrays)
    else:
        specs = _cache_specs(rules, cache)
        q_spec = rules.spec(("batch", None, "q_heads", "head_dim"))
        kv_spec = rules.spec(("batch", None, "kv_heads", "head_dim"))
        o, *arrays = jax.shard_map(
            local, mesh=rules.mesh,
            in_specs=(q_spec, kv_spec, kv_spec, rules.spec(("batch", None)), rules.spec(("batch",)), *specs),
            out_specs=(q_spec, *specs), check_vma=False,
        )(q, k_new, v_new, positions, lengths, *arrays)
    return o, KVCache(*arrays)
