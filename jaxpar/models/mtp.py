"""Multi-token prediction (MTP) layers: DeepSeek-V3's `model.layers.{num_hidden_layers + k}`
and Qwen3-Next / Qwen3.5's `mtp.*`, loaded as part of the model and used as draft heads.

MTP layer k predicts the token two places ahead of its inputs. At position i it reads the
main model's final (normalised) hidden state h_i and the embedding of the next token
t_{i+1}:

    u   = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)])       # [2E] -> [E]
    u   = decoder_layer(u)                                    # attention + MLP / MoE, own cache
    p   = lm_head(final_norm(u))                              # logits for t_{i+2}

The embedding and LM head are the main model's. Qwen's checkpoints name the pieces
`mtp.fc`, `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`, `mtp.layers.{k}.*`,
`mtp.norm`; DeepSeek's `eh_proj`, `enorm`, `hnorm`, `shared_head.norm` plus the decoder
layer under `model.layers.{N + k}` (its copies of the embedding and head are not loaded).
Their blocks are named `mtp.layers.{k}.*` for the rule table (`prefix_pattern: "mtp*"`).
Speculative decoding with them is `jaxpar.speculative`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.config import ATTENTION, ModelConfig
from jaxpar.models.cache import Cache
from jaxpar.models.decoder import DECODE_RESIDUAL, PREFILL_RESIDUAL, CausalLM, DecoderLayer, layer_cache_shapes
from jaxpar.models.linear import Linear
from jaxpar.models.norms import RMSNorm
from jaxpar.models.options import RuntimeOptions
from jaxpar.sharding.model_sharding import LayerSharding, ModelSharding
from jaxpar.sharding.resolve import mtp_ffn_kind


class MTPLayer(DecoderLayer):
    """One MTP layer: a decoder layer (full attention) with the input projection around it."""

    def __init__(self, cfg: ModelConfig, k: int, dtype, sharding: LayerSharding, options: RuntimeOptions):
        super().__init__(cfg, f"mtp_{k}", dtype, sharding, options, kinds=(ATTENTION, mtp_ffn_kind(cfg)))
        e = cfg.hidden_size
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, zero_centred=cfg.zero_centred_norm)
        self.enorm = RMSNorm(e, **norm)
        self.hnorm = RMSNorm(e, **norm)
        self.eh_proj = Linear((2 * e,), (e,), ("mtp_in",), ("embed",), dtype)
        self.final_norm = RMSNorm(e, **norm)

    def step(self, embeds: jax.Array, hidden: jax.Array, positions: jax.Array, cache, lengths: jax.Array,
             *, mode: str):
        """embeds: embeddings of the tokens one place ahead of `hidden` [B, T, E] (the previous
        stage's final hidden states); returns (this layer's final-normalised hidden [B, T, E],
        cache)."""
        residual = DECODE_RESIDUAL if mode == "decode" else PREFILL_RESIDUAL
        proj = self.sharding.proj
        u = jnp.concatenate([self.enorm(embeds), self.hnorm(hidden.astype(embeds.dtype))], axis=-1)
        u = proj.constrain(self.eh_proj(proj.constrain(u, ("batch", "seq", "mtp_in"))), residual)
        u, cache = DecoderLayer.__call__(self, u, positions, cache, lengths, mode=mode)
        return self.final_norm(u), cache


class MTPHead(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, sharding: ModelSharding, options: RuntimeOptions):
        self.layers = nnx.List([MTPLayer(cfg, k, dtype, sharding.mtp[k], options)
                                for k in range(cfg.mtp_num_layers)])


class CausalLMWithMTP(CausalLM):
    """The causal LM plus its MTP layers (attribute `mtp`, parameters `mtp/layers/{k}/...`)."""

    def __init__(self, cfg: ModelConfig, dtype, sharding: ModelSharding,
                 options: RuntimeOptions = RuntimeOptions()):
        super().__init__(cfg, dtype, sharding, options)
        if not cfg.mtp_num_layers:
            raise ValueError(f"{cfg.model_type}: the config declares no multi-token-prediction layers")
        self.mtp = MTPHead(cfg, dtype, sharding, options)

    def draft(self, k: int, tokens: jax.Array, hidden: jax.Array, positions: jax.Array, cache,
              lengths: jax.Array, *, mode: str, last_only: bool = True):
        """MTP layer k over T positions: `hidden` [B, T, E] at `positions` [B, T], `tokens`
        [B, T] the tokens one place ahead. Returns (logits [B, V] of each row's last valid
        position, or [B, T, V] without `last_only`; final hidden [B, T, E]; cache)."""
        x = self.embed_tokens(tokens)
        x = self.sharding.embed.constrain(x, DECODE_RESIDUAL if mode == "decode" else PREFILL_RESIDUAL)
        out, cache = self.mtp.layers[k].step(x, hidden, positions, cache, lengths, mode=mode)
        last = jnp.take_along_axis(out, (lengths - 1)[:, None, None], axis=1)[:, 0] if last_only else out
        return self.logits(last), out, cache


def mtp_cache_shapes(cfg: ModelConfig, sharding: ModelSharding, batch: int, max_len: int, dtype) -> Cache:
    """The MTP layers' caches (one attention layer each) and their own lengths."""
    layers = tuple(layer_cache_shapes(cfg, ATTENTION, sharding.mtp[k], batch, max_len, dtype)
                   for k in range(cfg.mtp_num_layers))
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec()))
    return Cache(layers=layers, lengths=lengths)


def init_mtp_cache(cfg: ModelConfig, sharding: ModelSharding, batch: int, max_len: int, dtype) -> Cache:
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding),
                        mtp_cache_shapes(cfg, sharding, batch, max_len, dtype))
