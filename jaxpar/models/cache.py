"""Decode-time state: per-layer caches plus how many tokens each row holds."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """Keys / values of one attention layer: [batch, slots, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array

    LOGICAL_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")


@struct.dataclass
class Cache:
    layers: tuple[Any, ...]
    # [batch] int32: tokens already written for each row (the next token's position).
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        for layer in self.layers:
            if isinstance(layer, KVCache):
                return layer.k.shape[1]
        raise ValueError("cache has no attention layer")
