"""One causal decoder for every family, assembled from `ModelConfig.layer_types`.

The same `CausalLM` is a pipeline stage when its `ModelSharding` holds only part of the
model (`jaxpar.sharding.model_sharding`): it then builds only that stage's layers (at their
global indices, so parameter paths stay the checkpoint's names), the embedding on the first
stage, and the final norm and LM head on the last (with tied embeddings, the last stage
holds its own copy of the embedding for the head).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.config import (ATTENTION, LINEAR_ATTENTION, MAMBA, MLP as MLP_KIND, MOE, NO_BLOCK,
                           ModelConfig)
from jaxpar.loading.layouts import HFLayout
from jaxpar.models.attention import Attention
from jaxpar.models.cache import SCALE_DTYPE, Cache, CacheDtypes, KVCache
from jaxpar.models.gdn import GatedDeltaNet, gdn_cache_shapes
from jaxpar.models.linear import matmul
from jaxpar.models.mamba2 import Mamba2Mixer, mamba_cache_shapes
from jaxpar.models.mlp import MLP
from jaxpar.models.norms import RMSNorm
from jaxpar.models.options import RuntimeOptions
from jaxpar.models.params import AS_IS, LINEAR, param
from jaxpar.sharding.model_sharding import LayerSharding, ModelSharding

# The residual stream between blocks: batch over data-parallel replicas only, sequence
# split when the block's plan asks for sequence parallelism (prefill only: T = 1 at decode).
PREFILL_RESIDUAL = ("residual_batch", "residual_seq", "embed")
DECODE_RESIDUAL = ("residual_batch", None, "embed")
MODES = ("prefill", "extend", "decode")


def _renamed(name: str) -> HFLayout:
    """The layout of a top-level parameter whose HF module has another name (Nemotron-H's
    `embeddings`, `norm_f`), or AS_IS when it is the default."""
    return HFLayout(name=f"../{name}.weight")


class Embedding(nnx.Module):
    def __init__(self, vocab: int, hidden: int, dtype, hf_layout: HFLayout = AS_IS):
        self.weight = param((vocab, hidden), ("vocab", "embed"), dtype, hf_layout)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0)


class LMHead(nnx.Module):
    def __init__(self, hidden: int, vocab: int, dtype):
        self.weight = param((hidden, vocab), ("embed", "vocab"), dtype, LINEAR)


def _mixer(cfg: ModelConfig, kind: str, index, dtype, sharding: LayerSharding, options):
    if kind == ATTENTION and cfg.attention_flavor == "mla":  # DeepSeek-V3 / V3.2
        from jaxpar.models.mla import MLAttention

        return MLAttention(cfg, dtype, sharding.mixer, options, sharding.indexer)
    if kind == ATTENTION:
        return Attention(cfg, dtype, sharding.mixer, options)
    if kind == LINEAR_ATTENTION:
        return GatedDeltaNet(cfg, dtype, sharding.mixer, options)
    if kind == MAMBA:
        return Mamba2Mixer(cfg, dtype, sharding.mixer, options)
    raise ValueError(f"layer {index}: unknown mixer kind {kind!r}")


def _ffn(cfg: ModelConfig, kind: str, index, dtype, rules):
    if kind == MLP_KIND:
        return MLP(cfg.hidden_size, cfg.intermediate_size, dtype, rules, bias=cfg.mlp_bias,
                   activation=cfg.mlp_activation, fused_gate_up=cfg.fused_gate_up)
    if kind == MOE and cfg.moe_router == "sigmoid_grouped":  # DeepSeek-V3 / V3.2
        from jaxpar.models.deepseek_moe import DeepseekMoE

        return DeepseekMoE(cfg, dtype, rules)
    if kind == MOE:
        from jaxpar.models.moe import SparseMoE

        return SparseMoE(cfg, dtype, rules)
    raise ValueError(f"layer {index}: unknown feed-forward kind {kind!r}")


class DecoderLayer(nnx.Module):
    """`kinds` = (mixer kind, feed-forward kind), by default the config's for layer `index`
    (multi-token-prediction layers give their own)."""

    def __init__(self, cfg: ModelConfig, index, dtype, sharding: LayerSharding,
                 options: RuntimeOptions, kinds: tuple[str, str] | None = None):
        mixer_kind, ffn_kind = kinds or (cfg.layer_types[index], cfg.mlp_types[index])
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, zero_centred=cfg.zero_centred_norm)
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        # Attribute names follow HF so parameter paths are the checkpoint's names.
        mixer = _mixer(cfg, mixer_kind, index, dtype, sharding, options)
        self.is_attention = mixer_kind == ATTENTION
        if self.is_attention:
            self.self_attn = mixer
        else:
            self.linear_attn = mixer
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = _ffn(cfg, ffn_kind, index, dtype, sharding.ffn)
        # GLM-4 normalises each block's output before its residual add.
        if cfg.post_block_norms:
            self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, **norm)
            self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, **norm)
        else:
            self.post_self_attn_layernorm = self.post_mlp_layernorm = None
        self.sharding = sharding
        # Rematerialised in the backward pass (training): the mixer and / or the ffn.
        self.remat_mixer = mixer_kind in options.remat
        self.remat_ffn = ffn_kind in options.remat

    def __call__(self, x, positions, cache, lengths, *, mode: str):
        residual = DECODE_RESIDUAL if mode == "decode" else PREFILL_RESIDUAL
        mixer, ffn = self.sharding.mixer, self.sharding.ffn

        def run_mixer(block, h, positions, cache, lengths):
            if self.is_attention:
                return block(h, positions, cache, lengths, mode=mode)
            return block(h, cache, lengths, mode=mode)

        def run_ffn(block, h):
            return block(h, scatter_seq=mode != "decode")

        # Only block outputs are constrained: a block's input keeps the previous block's
        # layout (slicing a replicated residual to re-gather it would only cost traffic).
        with jax.named_scope(f"layer_{self.index}"):
            h = self.input_layernorm(x)
            mixer_fn = nnx.remat(run_mixer) if self.remat_mixer else run_mixer
            h, cache = mixer_fn(self.self_attn if self.is_attention else self.linear_attn,
                                h, positions, cache, lengths)
            if self.post_self_attn_layernorm is not None:
                h = self.post_self_attn_layernorm(h)
            x = mixer.constrain(x + h, residual)
            h = self.post_attention_layernorm(x)
            h = (nnx.remat(run_ffn) if self.remat_ffn else run_ffn)(self.mlp, h)
            if self.post_mlp_layernorm is not None:
                h = self.post_mlp_layernorm(h)
            return ffn.constrain(x + h, residual), cache


class SingleBlockLayer(nnx.Module):
    """A layer holding one block (Nemotron-H): norm -> the block -> residual add. The
    block is the layer's mixer (attention, Mamba2) or feed-forward block (MLP, MoE), at
    HF's `layers.{i}.mixer`; its sharding is the block's plan (`LayerSharding.mixer` and
    `.ffn` are the same rules)."""

    def __init__(self, cfg: ModelConfig, index: int, dtype, sharding: LayerSharding,
                 options: RuntimeOptions):
        self.index = index
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype,
                            zero_centred=cfg.zero_centred_norm)
        if cfg.layer_types[index] != NO_BLOCK:
            self.kind = cfg.layer_types[index]
            self.mixer = _mixer(cfg, self.kind, index, dtype, sharding, options)
        else:
            self.kind = cfg.mlp_types[index]
            self.mixer = _ffn(cfg, self.kind, index, dtype, sharding.ffn)
        self.rules = sharding.mixer
        self.remat = self.kind in options.remat  # rematerialised in the backward pass (training)

    def __call__(self, x, positions, cache, lengths, *, mode: str):
        residual = DECODE_RESIDUAL if mode == "decode" else PREFILL_RESIDUAL

        def run(block, h, positions, cache, lengths):
            if self.kind == ATTENTION:
                return block(h, positions, cache, lengths, mode=mode)
            if self.kind in (LINEAR_ATTENTION, MAMBA):
                return block(h, cache, lengths, mode=mode)
            return block(h, scatter_seq=mode != "decode"), cache

        with jax.named_scope(f"layer_{self.index}_{self.kind}"):
            h = self.norm(x)
            h, cache = (nnx.remat(run) if self.remat else run)(self.mixer, h, positions, cache, lengths)
            return self.rules.constrain(x + h, residual), cache


def _layer(cfg: ModelConfig, index: int, dtype, sharding: LayerSharding, options: RuntimeOptions):
    if cfg.layer_layout == "single":
        return SingleBlockLayer(cfg, index, dtype, sharding, options)
    if cfg.layer_layout != "pair":
        raise ValueError(f"unknown layer_layout {cfg.layer_layout!r}")
    return DecoderLayer(cfg, index, dtype, sharding, options)


class CausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, sharding: ModelSharding,
                 options: RuntimeOptions = RuntimeOptions()):
        self.cfg = cfg
        self.sharding = sharding
        renamed = lambda name, default: AS_IS if name == default else _renamed(name)  # noqa: E731
        self.embeds = sharding.embed is not None  # takes token ids (else hidden states)
        self.has_head = sharding.head is not None  # returns logits (else hidden states)
        tied_copy = self.has_head and cfg.tie_word_embeddings
        self.embed_tokens = (Embedding(cfg.vocab_size, cfg.hidden_size, dtype, renamed(cfg.embed_name, "embed_tokens"))
                             if self.embeds or tied_copy else None)
        # Layers another pipeline stage holds are None: indices stay global.
        self.layers = nnx.List([_layer(cfg, i, dtype, sharding.layers[i], options)
                                if sharding.layers[i] is not None else None
                                for i in range(cfg.num_layers)])
        self.norm = (RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, zero_centred=cfg.zero_centred_norm,
                             hf_layout=renamed(cfg.final_norm_name, "norm"))
                     if self.has_head else None)
        self.lm_head = (LMHead(cfg.hidden_size, cfg.vocab_size, dtype)
                        if self.has_head and not cfg.tie_word_embeddings else None)

    def logits(self, h: jax.Array) -> jax.Array:
        """h: [..., E] -> float32 logits [..., V]."""
        if self.lm_head is None:  # tied: the embedding [V, E], contracted on E in place
            logits = matmul(h, self.embed_tokens.weight[...], out_dtype=jnp.float32, w_transposed=True)
        else:
            logits = matmul(h, self.lm_head.weight[...], out_dtype=jnp.float32)
        return self.sharding.head.constrain(logits, ("residual_batch",) + (None,) * (h.ndim - 2) + ("vocab",))

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: Cache | None,
                 lengths: jax.Array, *, mode: str = "prefill", last_only: bool = False,
                 return_hidden: bool = False):
        """tokens, positions: [B, T]; `lengths` [B]: valid (right-padded) tokens per row.

        mode "prefill" starts sequences (cache empty or None), "extend" continues the
        cached ones (chunked prefill, positions = cache.lengths + t), "decode" feeds one
        token (T == 1). Returns (logits, new cache). `last_only` returns logits of each
        row's last valid token [B, V] instead of all positions [B, T, V]. `return_hidden`
        also returns the final-normalised hidden states [B, T, E] (what multi-token
        prediction layers read): (logits, cache, hidden).

        A pipeline stage without the embedding takes the previous stage's hidden states
        [B, T, E] as `tokens`; one without the head returns its hidden states [B, T, E]
        (all positions) instead of logits. The cache holds the stage's own layers only.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        residual = DECODE_RESIDUAL if mode == "decode" else PREFILL_RESIDUAL
        if self.embeds:
            x = self.sharding.embed.constrain(self.embed_tokens(tokens), residual)
        else:
            x = tokens
        new_layers = []
        for k, layer in enumerate(layer for layer in self.layers if layer is not None):
            layer_cache = None if cache is None else cache.layers[k]
            x, layer_cache = layer(x, positions, layer_cache, lengths, mode=mode)
            new_layers.append(layer_cache)
        new_cache = None if cache is None else Cache(layers=tuple(new_layers), lengths=cache.lengths + lengths)
        if not self.has_head:
            return x, new_cache
        hidden = self.norm(x)
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0] if last_only else hidden
        logits = self.logits(last)
        return (logits, new_cache, hidden) if return_hidden else (logits, new_cache)


def _cache_dtypes(dtype, state_dtype) -> CacheDtypes:
    if isinstance(dtype, CacheDtypes):
        return dtype if state_dtype is None else dataclasses.replace(dtype, state=jnp.dtype(state_dtype))
    return CacheDtypes.resolve(dtype, None, state_dtype)


def cache_shapes(cfg: ModelConfig, sharding: ModelSharding, batch: int, max_len: int,
                 dtype, state_dtype=None) -> Cache:
    """The cache's abstract layout: ShapeDtypeStructs carrying their shardings. Attention
    layers get a KV cache of `max_len` slots (MLA: its latent cache); GDN and Mamba2 layers
    their conv and recurrent states; layers without a mixer (Nemotron-H's MLP layers)
    nothing. A pipeline stage's cache holds its own layers only, in order. `dtype`: a
    `CacheDtypes`, or one dtype for KV and conv states (recurrent state in `state_dtype`,
    float32 by default). An fp8 KV cache adds its per-slot scales, sharded like the cache
    without the head dim."""
    dtypes = _cache_dtypes(dtype, state_dtype)
    layers = [layer_cache_shapes(cfg, cfg.layer_types[i], sharding.layers[i], batch, max_len, dtypes)
              for i in sharding.owned_layers]
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32,
                                   sharding=jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    return Cache(layers=tuple(layers), lengths=lengths)


def _placed(spec, rules):
    """(shape, dtype, logical axes) leaves -> ShapeDtypeStructs sharded by `rules`."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[0], s[1], sharding=rules.sharding(s[2])), spec,
                        is_leaf=lambda n: isinstance(n, tuple) and len(n) == 3 and isinstance(n[0], tuple))


def layer_cache_shapes(cfg: ModelConfig, kind: str, sharding: LayerSharding, batch: int, max_len: int,
                       dtype, state_dtype=None):
    """One layer's cache layout (mixer `kind`), sharded by the layer's blocks' rules; `dtype`
    as in `cache_shapes`."""
    dtypes = _cache_dtypes(dtype, state_dtype)
    rules = sharding.mixer
    if kind == ATTENTION and cfg.attention_flavor == "mla":  # latent cache (+ indexer keys)
        from jaxpar.models.mla import MLACache, mla_cache_shapes

        if dtypes.kv_scaled:
            raise ValueError(f"{cfg.model_type}: an fp8 cache is not supported for MLA's latent cache; "
                             "use a bfloat16 or float32 cache dtype")
        spec = mla_cache_shapes(cfg, batch, max_len, dtypes.kv)
        index_k = _placed(spec.index_k, sharding.indexer) if spec.index_k is not None else None
        return MLACache(latent=_placed(spec.latent, rules), k_rope=_placed(spec.k_rope, rules), index_k=index_k)
    if kind == ATTENTION:
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        kv = jax.ShapeDtypeStruct(shape, dtypes.kv, sharding=rules.sharding(KVCache.LOGICAL_AXES))
        scale = None
        if dtypes.kv_scaled:
            scale = jax.ShapeDtypeStruct(shape[:3], SCALE_DTYPE, sharding=rules.sharding(KVCache.SCALE_AXES))
        return KVCache(k=kv, v=kv, k_scale=scale, v_scale=scale)
    if kind == NO_BLOCK:
        return None
    shapes = mamba_cache_shapes if kind == MAMBA else gdn_cache_shapes
    return _placed(shapes(cfg, batch, dtypes.conv, dtypes.state), rules)


def init_cache(cfg: ModelConfig, sharding: ModelSharding, batch: int, max_len: int,
               dtype, state_dtype=None) -> Cache:
    """An empty cache, allocated directly in its sharded layout (`dtype` as in `cache_shapes`)."""
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding),
                        cache_shapes(cfg, sharding, batch, max_len, dtype, state_dtype))
