"""Grouped-query attention (Llama, Qwen2 biases, Qwen3 q/k RMSNorm) with a KV cache.

Family options: Phi-3's fused `qkv_proj` is read as three parameters (row regions of the
one tensor, so tensor parallelism splits each of q, k, v by heads); GLM's interleaved
rotary pairs; Nemotron-H's attention without rotary; Mistral / Phi-3 sliding windows
(docs/ARCHITECTURE.md, "Sliding windows"), masked in every mode over a full-length cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.kernels_pallas import dispatch
from jaxpar.loading.layouts import HFLayout
from jaxpar.models import kv_parallel
from jaxpar.models.cache import KVCache
from jaxpar.models.linear import Linear, row_parallel_scatter
from jaxpar.models.norms import RMSNorm
from jaxpar.models.options import RuntimeOptions
from jaxpar.models.params import LINEAR
from jaxpar.models.rope import apply_rope, attention_scaling, inverse_frequencies
from jaxpar.sharding.axis_rules import AxisRules

Q_AXES = ("batch", "seq", "q_heads", "head_dim")
KV_AXES = ("batch", "seq", "kv_heads", "head_dim")


def _fused_rows(start: int, stop: int) -> HFLayout:
    return HFLayout(perm=LINEAR.perm, name="../qkv_proj.weight", region=(0, start, stop))


class Attention(nnx.Module):
    """GQA attention; with `cfg.attn_output_gate` (gated attention), q_proj yields
    [query | gate] per head and the output is multiplied by sigmoid(gate)."""

    def __init__(self, cfg: ModelConfig, dtype, rules: AxisRules, options: RuntimeOptions):
        e, h, kvh, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.gated = cfg.attn_output_gate
        q_width = 2 * d if self.gated else d
        q_rows, kv_rows = h * q_width, kvh * d
        if cfg.fused_qkv and cfg.qkv_bias:
            raise ValueError("a fused qkv_proj with biases is not supported")
        # Phi-3 stores [q | k | v] rows in one qkv_proj tensor: each is a region of it.
        layouts = ((_fused_rows(0, q_rows), _fused_rows(q_rows, q_rows + kv_rows),
                    _fused_rows(q_rows + kv_rows, q_rows + 2 * kv_rows))
                   if cfg.fused_qkv else (LINEAR,) * 3)
        self.q_proj = Linear((e,), (h, q_width), ("embed",), ("q_heads", "head_dim"), dtype,
                             bias=cfg.qkv_bias, hf_layout=layouts[0])
        self.k_proj = Linear((e,), (kvh, d), ("embed",), ("kv_heads", "head_dim"), dtype,
                             bias=cfg.qkv_bias, hf_layout=layouts[1])
        self.v_proj = Linear((e,), (kvh, d), ("embed",), ("kv_heads", "head_dim"), dtype,
                             bias=cfg.qkv_bias, hf_layout=layouts[2])
        self.o_proj = Linear((h, d), (e,), ("q_heads", "head_dim"), ("embed",), dtype, bias=cfg.o_bias)
        if cfg.qk_norm:
            norm = dict(axis_name="head_dim", zero_centred=cfg.zero_centred_norm)
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, **norm)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, **norm)
        else:
            self.q_norm = self.k_norm = None
        self.inv_freq = tuple(inverse_frequencies(cfg.rope, d).tolist()) if cfg.use_rope else None
        self.rope_scale = attention_scaling(cfg.rope)
        self.rope_interleaved = cfg.rope_interleaved
        self.window = cfg.sliding_window or None
        self.head_dim = d
        self.scale = d ** -0.5
        self.num_heads, self.num_kv_heads = h, kvh
        self.rules = rules
        self.options = options

    def _qkv(self, x: jax.Array, positions: jax.Array):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        gate = None
        if self.gated:
            q, gate = q[..., : self.head_dim], q[..., self.head_dim:]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.inv_freq is not None:
            inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
            # Pin positions to this block's batch layout, so the rotary tables XLA shares
            # across layers are not re-gathered per layer when layouts differ.
            positions = self.rules.constrain(positions, ("batch", "seq"))
            q = apply_rope(q, positions, inv_freq, self.rope_scale, interleaved=self.rope_interleaved)
            k = apply_rope(k, positions, inv_freq, self.rope_scale, interleaved=self.rope_interleaved)
        return (self.rules.constrain(q, Q_AXES), self.rules.constrain(k, KV_AXES),
                self.rules.constrain(v, KV_AXES), gate)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None,
                 lengths: jax.Array, *, mode: str) -> tuple[jax.Array, KVCache | None]:
        """x: [B, T, E]; positions: [B, T]; `lengths` [B] = valid (right-padded) new tokens.

        "prefill": the T tokens start the sequence (the cache, if given, is empty).
        "extend": the T tokens continue the `cache_lengths` tokens already cached
        (chunked prefill). "decode": T == 1 and the token goes at position `positions`.
        """
        x = self.rules.constrain(x, ("batch", "seq", "embed"))
        q, k, v, gate = self._qkv(x, positions)
        kw = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, scale=self.scale,
                  window=self.window)
        impl = self.options.impl_for
        if mode == "prefill":
            with jax.named_scope("prefill_attention"):
                o = dispatch.attention_prefill(q, k, v, lengths, scale=self.scale, window=self.window,
                                               impl=impl("attention_prefill"))
            if cache is not None:
                cache = kv_parallel.write_prefill(self.rules, k, v, cache)
        elif mode == "extend":
            with jax.named_scope("extend_attention"):
                o, cache = kv_parallel.extend_attention(self.rules, q, k, v, cache, positions, lengths,
                                                        impl=impl("attention_extend"), **kw)
        elif mode == "decode":
            with jax.named_scope("decode_attention"):
                o, cache = kv_parallel.decode_attention(self.rules, q[:, 0], k[:, 0], v[:, 0], cache,
                                                        positions[:, 0], impl=impl("attention_decode"), **kw)
            o = o[:, None]
        else:
            raise ValueError(f"unknown mode {mode!r}")
        o = o.astype(x.dtype)
        if gate is not None:
            o = (o.astype(jnp.float32) * jax.nn.sigmoid(gate.astype(jnp.float32))).astype(x.dtype)
        o = self.rules.constrain(o, Q_AXES)
        if mode != "decode":
            y = row_parallel_scatter(self.o_proj, o, self.rules, Q_AXES)
            if y is not None:
                return y, cache
        return self.rules.constrain(self.o_proj(o), ("batch", "seq", "embed")), cache
