"""Grouped-query attention (Llama, Qwen2 biases, Qwen3 q/k RMSNorm) with a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.kernels_pallas import _tmp_dispatch as dispatch
from jaxpar.models import kv_parallel
from jaxpar.models.cache import KVCache
from jaxpar.models.linear import Linear
from jaxpar.models.norms import RMSNorm
from jaxpar.models.options import RuntimeOptions
from jaxpar.models.rope import apply_rope, inverse_frequencies
from jaxpar.sharding.axis_rules import AxisRules

Q_AXES = ("batch", "seq", "q_heads", "head_dim")
KV_AXES = ("batch", "seq", "kv_heads", "head_dim")


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rules: AxisRules, options: RuntimeOptions):
        e, h, kvh, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear((e,), (h, d), ("embed",), ("q_heads", "head_dim"), dtype, bias=cfg.qkv_bias)
        self.k_proj = Linear((e,), (kvh, d), ("embed",), ("kv_heads", "head_dim"), dtype, bias=cfg.qkv_bias)
        self.v_proj = Linear((e,), (kvh, d), ("embed",), ("kv_heads", "head_dim"), dtype, bias=cfg.qkv_bias)
        self.o_proj = Linear((h, d), (e,), ("q_heads", "head_dim"), ("embed",), dtype, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, axis_name="head_dim")
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, axis_name="head_dim")
        else:
            self.q_norm = self.k_norm = None
        self.inv_freq = tuple(inverse_frequencies(cfg.rope, d).tolist())
        self.scale = d ** -0.5
        self.num_heads, self.num_kv_heads = h, kvh
        self.rules = rules
        self.options = options

    def _qkv(self, x: jax.Array, positions: jax.Array):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        return (self.rules.constrain(q, Q_AXES), self.rules.constrain(k, KV_AXES),
                self.rules.constrain(v, KV_AXES))

    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None,
                 lengths: jax.Array, *, decode: bool) -> tuple[jax.Array, KVCache | None]:
        """x: [B, T, E]; positions: [B, T].

        Prefill (decode=False): the T tokens start the sequence (the cache, if given, is
        empty); `lengths` [B] counts the valid (right-padded) tokens of each row.
        Decode (decode=True): T == 1 and `lengths` [B] is how many tokens each row's
        cache already holds; the new token is written at that position.
        """
        x = self.rules.constrain(x, ("batch", "seq", "embed"))
        q, k, v = self._qkv(x, positions)
        if not decode:
            with jax.named_scope("prefill_attention"):
                o = dispatch.attention_prefill(q, k, v, lengths, scale=self.scale,
                                               impl=self.options.kernel_impl)
            if cache is not None:
                cache = kv_parallel.write_prefill(self.rules, k, v, cache)
        else:
            with jax.named_scope("decode_attention"):
                o, cache = kv_parallel.decode_attention(
                    self.rules, q[:, 0], k[:, 0], v[:, 0], cache, lengths,
                    num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, scale=self.scale,
                    impl=self.options.kernel_impl)
            o = o[:, None]
        o = self.rules.constrain(o.astype(x.dtype), Q_AXES)
        return self.rules.constrain(self.o_proj(o), ("batch", "seq", "embed")), cache
