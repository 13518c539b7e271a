"""One causal decoder for every family, assembled from `ModelConfig.layer_types`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.config import ATTENTION, MLP as MLP_KIND, ModelConfig
from jaxpar.models.attention import Attention
from jaxpar.models.cache import Cache, KVCache
from jaxpar.models.mlp import MLP
from jaxpar.models.norms import RMSNorm
from jaxpar.models.options import RuntimeOptions
from jaxpar.models.params import LINEAR, param
from jaxpar.sharding.model_sharding import LayerSharding, ModelSharding

# The residual stream between blocks: batch over data-parallel replicas only, sequence
# split when the block's plan asks for sequence parallelism (prefill only: T = 1 at decode).
PREFILL_RESIDUAL = ("residual_batch", "residual_seq", "embed")
DECODE_RESIDUAL = ("residual_batch", None, "embed")


class Embedding(nnx.Module):
    def __init__(self, vocab: int, hidden: int, dtype):
        self.weight = param((vocab, hidden), ("vocab", "embed"), dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0)


class LMHead(nnx.Module):
    def __init__(self, hidden: int, vocab: int, dtype):
        self.weight = param((hidden, vocab), ("embed", "vocab"), dtype, LINEAR)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, index: int, dtype, sharding: LayerSharding,
                 options: RuntimeOptions):
        kind, ffn_kind = cfg.layer_types[index], cfg.mlp_types[index]
        if kind != ATTENTION or ffn_kind != MLP_KIND:
            raise NotImplementedError(f"layer {index}: {kind}/{ffn_kind} blocks are not built yet")
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, zero_centred=cfg.zero_centred_norm)
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Attention(cfg, dtype, sharding.mixer, options)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype, sharding.ffn, bias=cfg.mlp_bias)
        self.sharding = sharding

    def __call__(self, x, positions, cache, lengths, *, decode: bool):
        residual = DECODE_RESIDUAL if decode else PREFILL_RESIDUAL
        mixer, ffn = self.sharding.mixer, self.sharding.ffn
        with jax.named_scope(f"layer_{self.index}"):
            x = mixer.constrain(x, residual)
            h, cache = self.self_attn(self.input_layernorm(x), positions, cache, lengths, decode=decode)
            x = mixer.constrain(x + h, residual)
            x = ffn.constrain(x, residual)
            x = x + self.mlp(self.post_attention_layernorm(x))
            return ffn.constrain(x, residual), cache


class CausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, sharding: ModelSharding,
                 options: RuntimeOptions = RuntimeOptions()):
        self.cfg = cfg
        self.sharding = sharding
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype, sharding.layers[i], options)
                                for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype,
                            zero_centred=cfg.zero_centred_norm)
        self.lm_head = None if cfg.tie_word_embeddings else LMHead(cfg.hidden_size, cfg.vocab_size, dtype)

    def logits(self, h: jax.Array) -> jax.Array:
        """h: [..., E] -> float32 logits [..., V]."""
        if self.lm_head is None:
            w = self.embed_tokens.weight[...].T
        else:
            w = self.lm_head.weight[...]
        logits = jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        return self.sharding.head.constrain(logits, ("residual_batch",) + (None,) * (h.ndim - 2) + ("vocab",))

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: Cache | None,
                 lengths: jax.Array, *, decode: bool, last_only: bool):
        """tokens, positions: [B, T]. Returns (logits, new cache).

        Prefill: `lengths` = valid tokens per row; decode: T == 1 and `lengths` = tokens
        already cached. `last_only` returns logits of each row's last valid token [B, V]
        instead of all positions [B, T, V] (the lm_head is the largest matmul of a step).
        """
        x = self.embed_tokens(tokens)
        x = self.sharding.embed.constrain(x, DECODE_RESIDUAL if decode else PREFILL_RESIDUAL)
        new_layers = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            x, layer_cache = layer(x, positions, layer_cache, lengths, decode=decode)
            new_layers.append(layer_cache)
        if last_only and not decode:
            x = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
        if last_only:
            x = x[:, 0]
        logits = self.logits(self.norm(x))
        if cache is None:
            return logits, None
        new_lengths = cache.lengths + (1 if decode else lengths)
        return logits, Cache(layers=tuple(new_layers), lengths=new_lengths)


def cache_shapes(cfg: ModelConfig, sharding: ModelSharding, batch: int, max_len: int,
                 dtype) -> Cache:
    """The cache's abstract layout: ShapeDtypeStructs carrying their shardings."""
    layers = []
    for i, kind in enumerate(cfg.layer_types):
        if kind != ATTENTION:
            raise NotImplementedError(kind)
        s = sharding.layers[i].mixer.sharding(KVCache.LOGICAL_AXES)
        kv = jax.ShapeDtypeStruct((batch, max_len, cfg.num_kv_heads, cfg.head_dim), dtype, sharding=s)
        layers.append(KVCache(k=kv, v=kv))
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32,
                                   sharding=jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    return Cache(layers=tuple(layers), lengths=lengths)


def init_cache(cfg: ModelConfig, sharding: ModelSharding, batch: int, max_len: int,
               dtype) -> Cache:
    """An empty cache, allocated directly in its sharded layout."""
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding),
                        cache_shapes(cfg, sharding, batch, max_len, dtype))
