"""Rotary position embeddings (half-split convention, as HF `rotate_half`, or interleaved
pairs as GLM), with partial rotation and the linear / llama3 / YaRN frequency scalings."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    rot = int(round(head_dim * rope.partial_rotary_factor))
    inv = 1.0 / (rope.theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
    if rope.rope_type == "linear":
        inv = inv / rope.factor
    elif rope.rope_type == "llama3":
        low_wl = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wl = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        scaled = np.where(wavelen > low_wl, inv / rope.factor, inv)
        mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        inv = np.where(mid, (1 - smooth) * inv / rope.factor + smooth * inv, scaled)
    elif rope.rope_type == "yarn":
        inv = _yarn_frequencies(rope, rot)
    return inv.astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_frequencies(rope: RopeConfig, dim: int) -> np.ndarray:
    """YaRN: frequencies that rotate more than beta_fast times over the pretraining context
    are kept (extrapolated), those rotating fewer than beta_slow times are divided by
    `factor` (interpolated), with a linear ramp between (computed in float32 like HF)."""
    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(rope.theta)))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = (rope.theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(np.float32)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (rope.factor * pos_freqs)
    keep = 1 - ramp
    return interpolated * (1 - keep) + extrapolated * keep


def attention_scaling(rope: RopeConfig) -> float:
    """The factor cos / sin are multiplied by (YaRN's attention factor; 1 otherwise)."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.mscale and rope.mscale_all_dim:
        return _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
    return _yarn_mscale(rope.factor)


def softmax_scale_factor(rope: RopeConfig) -> float:
    """DeepSeek's extra softmax scale under YaRN: mscale(factor, mscale_all_dim) ** 2."""
    if rope.rope_type == "default" or not rope.mscale_all_dim:
        return 1.0
    return _yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0, *,
               interleaved: bool = False) -> jax.Array:
    """x: [..., T, H, D]; positions: [..., T]. Rotates the first 2*len(inv_freq) dims:
    frequency i turns the pair (x[i], x[i + rot/2]), or with `interleaved` the pair
    (x[2i], x[2i + 1]); `scale` multiplies cos and sin (YaRN's attention factor)."""
    rot = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [..., T, rot/2]
    cos = jnp.cos(angles)[..., None, :]
    sin = jnp.sin(angles)[..., None, :]
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    x32 = x.astype(jnp.float32)
    rest = x32[..., rot:]
    if interleaved:
        pairs = x32[..., :rot].reshape(*x.shape[:-1], rot // 2, 2)
        x1, x2 = pairs[..., 0], pairs[..., 1]
        turned = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return jnp.concatenate([turned.reshape(*x.shape[:-1], rot), rest], axis=-1).astype(x.dtype)
    x1, x2 = x32[..., : rot // 2], x32[..., rot // 2: rot]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)
