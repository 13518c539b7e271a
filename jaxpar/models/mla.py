"""Multi-head latent attention (MLA, DeepSeek-V2/V3/V3.2) with a latent KV cache.

Per token, keys and values of all heads come from one latent `c = RMSNorm(W_dkv x)` of
`kv_lora_rank` (L) dims plus one rotary key `k_r` of `qk_rope_head_dim` (R) dims shared by
the heads. Head h's key is `[c W_uk[h] | k_r]` and its value `c W_uv[h]` (`kv_b_proj`); its
query `[q_nope[h] | q_rope[h]]` (through the q LoRA pair when `q_lora_rank` > 0).

The cache holds only `c` and `k_r`: L + R numbers per token and layer, instead of
H * (2 * qk_head_dim) for the expanded keys and values (DeepSeek-V3: 576 vs 40960).

- Prefill (no cache to read) expands keys and values per head and runs ordinary attention
  (the value head is zero-padded to the key's dims so the shared kernels apply).
- Decode and extend (chunked prefill) attend in the latent space with the projections
  absorbed: `q_lat[h] = q_nope[h] W_uk[h]^T` scores against `c`, `q_rope` against `k_r`,
  the output is taken over `c` and mapped out through `W_uv[h]`. Nothing per head is read
  from the cache: one latent head serves all query heads (multi-query attention).

Parallelism (docs/ARCHITECTURE.md, 15): heads split over the plan's tp axes like GQA; the
latent cache, having one head, is split only by decode context parallelism (DCP,
round-robin: position p on rank p % n at slot p // n). The dcp ranks are carved out of the
heads' devices ("shared" axes split both) or extend them ("dcp"-only axes, heads replicated).
Inside `shard_map` each rank gathers the absorbed queries of its shared group, attends
over its own slots, and the partial results merge by log-sum-exp: a `psum` over dcp-only
axes and a reduce-scatter back to each rank's own heads over the shared axes.

DeepSeek-V3.2 adds a lightning indexer (`jaxpar.models.indexer`, its own block) choosing
`index_topk` keys per query; the choice masks the attention (sparse attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxpar.config import ModelConfig
from jaxpar.kernels_pallas import dispatch
from jaxpar.models.indexer import Indexer
from jaxpar.models.linear import Linear, row_parallel_scatter
from jaxpar.models.norms import RMSNorm
from jaxpar.models.options import RuntimeOptions
from jaxpar.models.rope import apply_rope, attention_scaling, inverse_frequencies, softmax_scale_factor
from jaxpar.sharding.axis_rules import AxisRules

Q_AXES = ("batch", "seq", "q_heads", None)
# HF's q_a_layernorm / kv_a_layernorm use RMSNorm's default epsilon, not rms_norm_eps.
LORA_NORM_EPS = 1e-6
_PRECISION = jax.lax.Precision.HIGHEST


@struct.dataclass
class MLACache:
    """One MLA layer's cache: the normalised latent [B, S, L] and the rotated shared key
    [B, S, R] per slot (DCP layout), and for DeepSeek-V3.2 the indexer's keys
    [B, S_total, index_head_dim] by position (replicated within the indexer block), else None."""

    latent: jax.Array
    k_rope: jax.Array
    index_k: jax.Array | None = None

    LOGICAL_AXES = ("batch", "cache_seq", None)
    INDEX_AXES = ("batch", None, None)


def mla_cache_shapes(cfg: ModelConfig, batch: int, max_len: int, dtype) -> MLACache:
    """(shape, dtype, logical axes) per field; the indexer's keys use the indexer's rules."""
    return MLACache(latent=((batch, max_len, cfg.kv_lora_rank), dtype, MLACache.LOGICAL_AXES),
                    k_rope=((batch, max_len, cfg.qk_rope_head_dim), dtype, MLACache.LOGICAL_AXES),
                    index_k=((batch, max_len, cfg.index_head_dim), dtype, MLACache.INDEX_AXES)
                    if cfg.has_indexer else None)


def _index(axes) -> jax.Array:
    return jax.lax.axis_index(axes) if axes else jnp.int32(0)


def _write(latent, k_rope, new_latent, new_rope, positions, lengths, rank, n):
    """Writes the valid new tokens (t < lengths[b]) that live on this dcp rank. Other tokens
    get an out-of-range slot and are dropped (several share a slot index p // n, and a
    scatter keeps an arbitrary one of duplicate indices)."""
    t = positions.shape[1]
    rows = jnp.arange(positions.shape[0])[:, None]
    mine = (positions % n == rank) & (jnp.arange(t)[None] < lengths[:, None])
    slot = jnp.where(mine, positions // n, latent.shape[1])
    latent = latent.at[rows, slot].set(new_latent.astype(latent.dtype), mode="drop")
    k_rope = k_rope.at[rows, slot].set(new_rope.astype(k_rope.dtype), mode="drop")
    return latent, k_rope


def write_latent(rules: AxisRules, cache: MLACache, new_latent, new_rope, positions, lengths) -> MLACache:
    """Puts the latents of tokens at `positions` [B, T] (valid: t < lengths[b]) into their
    dcp ranks' slots."""
    cache_axes = rules.axes_for("cache_seq")
    n = rules.size("cache_seq")

    def local(lat, kr, nl, nr, positions, lengths):
        return _write(lat, kr, nl, nr, positions, lengths, _index(cache_axes), n)

    if rules.mesh.size == 1:
        lat, kr = local(cache.latent, cache.k_rope, new_latent, new_rope, positions, lengths)
    else:
        c_spec, new_spec = rules.spec(MLACache.LOGICAL_AXES), rules.spec(("batch", None, None))
        lat, kr = jax.shard_map(
            local, mesh=rules.mesh,
            in_specs=(c_spec, c_spec, new_spec, new_spec, rules.spec(("batch", None)), rules.spec(("batch",))),
            out_specs=(c_spec, c_spec), check_vma=False,
        )(cache.latent, cache.k_rope, new_latent, new_rope, positions, lengths)
    return cache.replace(latent=lat, k_rope=kr)


def _latent_partial(q, latent, k_rope, visible, scale):
    """Attention of absorbed queries q [B, T, H, L + R] over one rank's slots.
    visible [B, T, S]. Returns o [B, T, H, L] float32 normalised over the slots, lse [B, T, H]."""
    lat = latent.astype(jnp.float32)
    kl = q.shape[-1] - k_rope.shape[-1]
    q = q.astype(jnp.float32)
    s = (jnp.einsum("bthl,bsl->bths", q[..., :kl], lat, precision=_PRECISION)
         + jnp.einsum("bthr,bsr->bths", q[..., kl:], k_rope.astype(jnp.float32), precision=_PRECISION)) * scale
    s = jnp.where(visible[:, :, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    total = jnp.sum(p, axis=-1)
    has_any = total > 0
    o = jnp.einsum("bths,bsl->bthl", p, lat, precision=_PRECISION) / jnp.where(has_any, total, 1.0)[..., None]
    lse = jnp.where(has_any, m_safe + jnp.log(jnp.where(has_any, total, 1.0)), -jnp.inf)
    return o, lse


def latent_attention(rules: AxisRules, q: jax.Array, cache: MLACache, new_latent: jax.Array,
                     new_rope: jax.Array, positions: jax.Array, lengths: jax.Array, *, scale: float,
                     select: jax.Array | None = None) -> tuple[jax.Array, MLACache]:
    """Decode / extend in the latent space: writes the T new tokens, then attends.

    q: [B, T, H, L + R] absorbed queries (heads split like the plan's q_heads); new_latent
    [B, T, L], new_rope [B, T, R] of the tokens at `positions` [B, T] (valid: t < lengths[b]);
    `select` [B, T, S_total]: keys the indexer chose, by position (None: all). A query sees
    the positions up to its own. Returns (o [B, T, H, L] float32, the cache)."""
    cache_axes = rules.axes_for("cache_seq")
    n = rules.size("cache_seq")
    shared = rules.axes_for("mla_shared")
    cache_only = tuple(a for a in cache_axes if a not in shared)

    def local(q, lat, kr, nl, nr, positions, lengths, select):
        rank = _index(cache_axes)
        lat, kr = _write(lat, kr, nl, nr, positions, lengths, rank, n)
        if shared:  # the queries of every head whose keys this rank's slots hold
            q = jax.lax.all_gather(q, shared, axis=2, tiled=True)
        b, t = positions.shape
        slots = lat.shape[1]
        key_pos = jnp.arange(slots) * n + rank
        visible = key_pos[None, None, :] <= positions[:, :, None]
        if select is not None:  # position p = slot * n + rank
            visible = visible & jnp.take(select.reshape(b, t, slots, n), rank, axis=3)
        o, lse = _latent_partial(q, lat, kr, visible, scale)
        if n > 1:
            m = jax.lax.pmax(lse, cache_axes)
            w = jnp.exp(lse - jnp.where(jnp.isfinite(m), m, 0.0))
            num, den = o * w[..., None], w
            if cache_only:
                num, den = jax.lax.psum(num, cache_only), jax.lax.psum(den, cache_only)
            if shared:  # back to this rank's own heads
                num = jax.lax.psum_scatter(num, shared, scatter_dimension=2, tiled=True)
                den = jax.lax.psum_scatter(den, shared, scatter_dimension=2, tiled=True)
            o = num / jnp.where(den > 0, den, 1.0)[..., None]
        return o, lat, kr

    if rules.mesh.size == 1:
        o, lat, kr = local(q, cache.latent, cache.k_rope, new_latent, new_rope, positions, lengths, select)
    else:
        q_spec = rules.spec(("batch", None, "q_heads", None))
        c_spec, new_spec = rules.spec(MLACache.LOGICAL_AXES), rules.spec(("batch", None, None))
        specs = [q_spec, c_spec, c_spec, new_spec, new_spec, rules.spec(("batch", None)), rules.spec(("batch",))]
        args = [q, cache.latent, cache.k_rope, new_latent, new_rope, positions, lengths]
        if select is not None:
            specs.append(rules.spec(("batch", None, None)))
            args.append(select)
            fn = local
        else:
            fn = lambda *a: local(*a, None)  # noqa: E731
        o, lat, kr = jax.shard_map(fn, mesh=rules.mesh, in_specs=tuple(specs),
                                   out_specs=(q_spec, c_spec, c_spec), check_vma=False)(*args)
    return o, cache.replace(latent=lat, k_rope=kr)


def masked_prefill_attention(q, k, v, mask, scale):
    """Expanded-form attention with an explicit mask (sparse prefill under the indexer).
    q, k [B, T, H, D]; v [B, T, H, Dv]; mask [B, T, T] (query, key). Returns [B, T, H, Dv] f32."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32), precision=_PRECISION) * scale
    s = jnp.where(mask[:, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    total = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32), precision=_PRECISION)


class MLAttention(nnx.Module):
    """HF module `model.layers.{i}.self_attn` of DeepSeek-V3 / V3.2."""

    def __init__(self, cfg: ModelConfig, dtype, rules: AxisRules, options: RuntimeOptions,
                 indexer_rules: AxisRules | None = None):
        e, h = cfg.hidden_size, cfg.num_heads
        lora, rope, nope, vd = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
        bias = cfg.qkv_bias
        qk = nope + rope
        if cfg.q_lora_rank:
            ql = cfg.q_lora_rank
            self.q_a_proj = Linear((e,), (ql,), ("embed",), (None,), dtype, bias=bias)
            self.q_a_layernorm = RMSNorm(ql, LORA_NORM_EPS, dtype, axis_name=None)
            self.q_b_proj = Linear((ql,), (h, qk), (None,), ("q_heads", None), dtype)
            self.q_proj = None
        else:
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
            self.q_proj = Linear((e,), (h, qk), ("embed",), ("q_heads", None), dtype)
        self.kv_a_proj_with_mqa = Linear((e,), (lora + rope,), ("embed",), (None,), dtype, bias=bias)
        self.kv_a_layernorm = RMSNorm(lora, LORA_NORM_EPS, dtype, axis_name=None)
        self.kv_b_proj = Linear((lora,), (h, nope + vd), (None,), ("q_heads", None), dtype)
        self.o_proj = Linear((h, vd), (e,), ("q_heads", None), ("embed",), dtype, bias=cfg.o_bias)
        self.indexer = Indexer(cfg, dtype, indexer_rules) if cfg.has_indexer else None
        self.inv_freq = tuple(inverse_frequencies(cfg.rope, rope).tolist())
        self.rope_scale = attention_scaling(cfg.rope)
        self.scale = qk ** -0.5 * softmax_scale_factor(cfg.rope)
        self.interleaved = cfg.rope_interleaved
        self.lora, self.nope, self.v_dim = lora, nope, vd
        self.rules = rules
        self.options = options

    def _rotate(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B, T, H, R] rotary part -> rotated (pairs (2i, 2i+1) when interleaved; HF permutes
        them to halves first, a permutation of q and k alike that leaves q . k unchanged)."""
        return apply_rope(x, positions, jnp.asarray(self.inv_freq, jnp.float32), self.rope_scale,
                          interleaved=self.interleaved)

    def _project(self, x: jax.Array, positions: jax.Array):
        """-> (q_nope [B,T,H,nope], q_rope [B,T,H,R] rotated, latent [B,T,L], k_rope [B,T,R]
        rotated, q_resid [B,T,q_lora] or None)."""
        if self.q_proj is not None:
            q, q_resid = self.q_proj(x), None
        else:
            q_resid = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_resid)
        q = self.rules.constrain(q, Q_AXES)
        ckv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(ckv[..., : self.lora])
        positions = self.rules.constrain(positions, ("batch", "seq"))
        k_rope = self._rotate(ckv[..., None, self.lora:], positions)[:, :, 0]
        q_rope = self._rotate(q[..., self.nope:], positions)
        return q[..., : self.nope], q_rope, latent, k_rope, q_resid

    def _kv_b(self):
        w = self.kv_b_proj.weight[...]  # [L, H, nope + v]
        return w[..., : self.nope], w[..., self.nope:]

    def __call__(self, x: jax.Array, positions: jax.Array, cache: MLACache | None, lengths: jax.Array,
                 *, mode: str) -> tuple[jax.Array, MLACache | None]:
        """As `jaxpar.models.attention.Attention.__call__`: x [B, T, E], positions [B, T],
        lengths [B] valid new tokens; mode prefill / extend / decode."""
        x = self.rules.constrain(x, ("batch", "seq", "embed"))
        q_nope, q_rope, latent, k_rope, q_resid = self._project(x, positions)
        select = None
        if self.indexer is not None:
            index_k = None if cache is None else cache.index_k
            select, index_k = self.indexer(x, q_resid, positions, index_k, lengths, mode=mode)
            if cache is not None:
                cache = cache.replace(index_k=index_k)
        w_uk, w_uv = self._kv_b()
        if mode == "prefill":
            o = self._prefill(q_nope, q_rope, latent, k_rope, lengths, select)
            if cache is not None:
                cache = write_latent(self.rules, cache, latent, k_rope, positions, lengths)
        elif mode in ("extend", "decode"):
            if cache is None:
                raise ValueError(f"mode {mode!r} needs a cache")
            with jax.named_scope(f"{mode}_latent_attention"):
                # Absorb W_uk into the queries (per head, local to the head's rank).
                q_lat = jnp.einsum("bthn,lhn->bthl", q_nope, w_uk.astype(q_nope.dtype))
                q_abs = self.rules.constrain(jnp.concatenate([q_lat, q_rope], axis=-1), Q_AXES)
                o_lat, cache = latent_attention(self.rules, q_abs, cache, latent, k_rope, positions, lengths,
                                                scale=self.scale, select=select)
                o = jnp.einsum("bthl,lhv->bthv", o_lat.astype(x.dtype), w_uv.astype(x.dtype))
        else:
            raise ValueError(f"unknown mode {mode!r}")
        o = self.rules.constrain(o.astype(x.dtype), Q_AXES)
        if mode != "decode":
            y = row_parallel_scatter(self.o_proj, o, self.rules, Q_AXES)
            if y is not None:
                return y, cache
        return self.rules.constrain(self.o_proj(o), ("batch", "seq", "embed")), cache

    def _prefill(self, q_nope, q_rope, latent, k_rope, lengths, select):
        """Expanded keys / values per head from the latent; causal attention over the prompt."""
        kv = self.rules.constrain(self.kv_b_proj(latent), Q_AXES)  # [B, T, H, nope + v]
        k_nope, v = kv[..., : self.nope], kv[..., self.nope:]
        h = k_nope.shape[2]
        k_rope_h = jnp.broadcast_to(k_rope[:, :, None, :], k_rope.shape[:2] + (h, k_rope.shape[-1]))
        q = self.rules.constrain(jnp.concatenate([q_nope, q_rope], axis=-1), Q_AXES)
        k = self.rules.constrain(jnp.concatenate([k_nope, k_rope_h.astype(k_nope.dtype)], axis=-1), Q_AXES)
        if select is not None:
            t = q.shape[1]
            valid = jnp.arange(t)[None, :] < lengths[:, None]
            mask = select[:, :, :t] & jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
            return masked_prefill_attention(q, k, v, mask, self.scale)
        # The shared kernels take one head dim: zero-pad the narrower of keys and values
        # (zero dims change neither the scores nor the output).
        width = max(q.shape[-1], v.shape[-1])

        def pad(a):
            return jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, width - a.shape[-1]))) if a.shape[-1] < width else a

        q, k, v = (self.rules.constrain(pad(a), Q_AXES) for a in (q, k, v))
        with jax.named_scope("prefill_attention"):
            o = dispatch.attention_prefill(q, k, v, lengths, scale=self.scale,
                                           impl=self.options.impl_for("attention_prefill"))
        return o[..., : self.v_dim]
