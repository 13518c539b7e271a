"""DeepSeek-V3.2's lightning indexer: which cached tokens each query attends to.

A small multi-head scorer beside MLA (HF module `self_attn.indexer`, a block of its own in the
rule table, `kind: indexer`). For query token t and key token s:

    q[t, h] = rope(W_qb q_resid[t])[h]            # from the q LoRA latent, index_n_heads heads
    k[s]    = rope(LayerNorm(W_k x[s]))           # one key per token, cached
    w[t, h] = (W_w x[t])[h] * index_n_heads^-0.5
    score[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s] * index_head_dim^-0.5)

and t attends to the `index_topk` visible tokens (s <= t) of highest score, or to all of them
when fewer are visible -- so for sequences up to `index_topk` tokens the result is dense MLA.
Rotary embedding covers the first qk_rope_head_dim dims, half-split (not interleaved, unlike
MLA's). DeepSeek's reference runs the scores in FP8 after a Hadamard rotation of q and k;
the rotation is orthogonal (it leaves q . k unchanged), so this computes the same scores in
the model's dtype, as transformers does.

Its key cache is indexed by position (slot s = position s) and replicated over the block's
devices (the RFC replicates the indexer, `tp_size: 1`; `tp_size > 1` splits its heads and
sums the scores across them): every rank sees the same choice, and under DCP each MLA rank
keeps the chosen positions that live on it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.models.linear import Linear
from jaxpar.models.params import param
from jaxpar.models.rope import apply_rope, attention_scaling, inverse_frequencies
from jaxpar.sharding.axis_rules import AxisRules

LAYER_NORM_EPS = 1e-6
_PRECISION = jax.lax.Precision.HIGHEST


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm with weight and bias, in float32."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = param((dim,), (None,), dtype)
        self.bias = param((dim,), (None,), dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def write_keys(cache: jax.Array, keys: jax.Array, positions: jax.Array, lengths: jax.Array) -> jax.Array:
    """cache [B, S, D]; keys [B, T, D] at positions [B, T], valid t < lengths[b]."""
    rows = jnp.arange(keys.shape[0])[:, None]
    valid = jnp.arange(keys.shape[1])[None] < lengths[:, None]
    slot = jnp.where(valid, positions, cache.shape[1])  # padding tokens: dropped
    return cache.at[rows, slot].set(keys.astype(cache.dtype), mode="drop")


def top_k_mask(scores: jax.Array, visible: jax.Array, k: int) -> jax.Array:
    """The `k` highest visible scores per row (all visible ones when fewer): bool like scores.
    scores, visible: [..., S]."""
    if k >= scores.shape[-1]:
        return visible
    masked = jnp.where(visible, scores, -jnp.inf)
    _, idx = jax.lax.top_k(masked, k)
    chosen = jnp.zeros(scores.shape, bool)
    chosen = jnp.put_along_axis(chosen, idx, True, axis=-1, inplace=False)
    return chosen & visible


class Indexer(nnx.Module):
    """HF module `model.layers.{i}.self_attn.indexer`."""

    def __init__(self, cfg: ModelConfig, dtype, rules: AxisRules):
        e, heads, d = cfg.hidden_size, cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = Linear((cfg.q_lora_rank,), (heads, d), (None,), ("index_heads", None), dtype)
        self.wk = Linear((e,), (d,), ("embed",), (None,), dtype)
        self.k_norm = LayerNorm(d, LAYER_NORM_EPS, dtype)
        self.weights_proj = Linear((e,), (heads,), ("embed",), ("index_heads",), dtype)
        self.rope_dim = cfg.qk_rope_head_dim
        self.inv_freq = tuple(inverse_frequencies(cfg.rope, cfg.qk_rope_head_dim).tolist())
        self.rope_scale = attention_scaling(cfg.rope)
        self.heads, self.top_k = heads, cfg.index_topk
        self.scale = d ** -0.5
        self.rules = rules

    def _rotate(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        r = self.rope_dim
        rotated = apply_rope(x[..., :r], positions, jnp.asarray(self.inv_freq, jnp.float32), self.rope_scale)
        return jnp.concatenate([rotated, x[..., r:]], axis=-1)

    def __call__(self, x: jax.Array, q_resid: jax.Array, positions: jax.Array, cache: jax.Array | None,
                 lengths: jax.Array, *, mode: str) -> tuple[jax.Array, jax.Array | None]:
        """x [B, T, E]; q_resid [B, T, q_lora_rank]; positions [B, T]; cache [B, S, D] (keys by
        position) or None. Returns (chosen [B, T, K] bool over key positions -- K = T for
        "prefill", the cache's S otherwise -- and the cache with the new keys)."""
        rules = self.rules
        x = rules.constrain(x, ("batch", "seq", "embed"))
        positions = rules.constrain(positions, ("batch", "seq"))
        q = rules.constrain(self._rotate(self.wq_b(q_resid), positions), ("batch", "seq", "index_heads", None))
        k = self._rotate(self.k_norm(self.wk(x))[:, :, None, :], positions)[:, :, 0]
        if cache is not None:
            cache = rules.constrain(write_keys(cache, k, positions, lengths), ("batch", None, None))
        if mode == "prefill":
            keys = k
            key_pos = jnp.arange(k.shape[1])
        else:
            if cache is None:
                raise ValueError(f"mode {mode!r} needs the indexer's key cache")
            keys, key_pos = cache, jnp.arange(cache.shape[1])
        s = jnp.einsum("bthd,bsd->bths", q.astype(jnp.float32), keys.astype(jnp.float32), precision=_PRECISION)
        s = jax.nn.relu(s * self.scale)
        w = jnp.dot(x.astype(jnp.float32), self.weights_proj.weight[...].astype(jnp.float32),
                    precision=_PRECISION) * self.heads ** -0.5
        w = rules.constrain(w, ("batch", "seq", "index_heads"))
        score = jnp.einsum("bth,bths->bts", w, s, precision=_PRECISION)
        visible = key_pos[None, None, :] <= positions[:, :, None]
        return top_k_mask(score, visible, self.top_k), cache
