"""Rotary position embeddings (half-split convention, as HF `rotate_half`, or interleaved
pairs as GLM), with partial rotation and the linear / llama3 frequency scalings."""

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
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, *,
               interleaved: bool = False) -> jax.Array:
    """x: [..., T, H, D]; positions: [..., T]. Rotates the first 2*len(inv_freq) dims:
    frequency i turns the pair (x[i], x[i + rot/2]), or with `interleaved` the pair
    (x[2i], x[2i + 1])."""
    rot = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [..., T, rot/2]
    cos = jnp.cos(angles)[..., None, :]
    sin = jnp.sin(angles)[..., None, :]
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
