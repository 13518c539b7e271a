"""Decode-time state: per-layer caches plus how many tokens each row holds, and the
dtypes they are stored in (docs/ARCHITECTURE.md, section 14: KV cache and state dtypes)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

# KV cache dtypes by name ("auto" = the model's dtype).
KV_CACHE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
                   "float8_e4m3fn": jnp.float8_e4m3fn}
# Recurrent-state (GDN) dtypes by name ("auto" = float32, the precision HF keeps it in).
STATE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FP8 = jnp.dtype(jnp.float8_e4m3fn)
FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448
# Scales are stored in bfloat16 (float32's exponent range, 2 bytes per token and head).
# A value is divided by the *stored* scale before the cast, so rounding the scale to
# bfloat16 adds no error: it only moves the row's largest value a little below FP8_MAX.
SCALE_DTYPE = jnp.bfloat16


class CacheDtypeError(ValueError):
    """A KV-cache or state dtype that jaxpar cannot store."""


def _resolve(value, table: dict, default, what: str):
    if value is None or (isinstance(value, str) and value == "auto"):
        return jnp.dtype(default)
    if isinstance(value, str):
        if value in ("fp8", "fp8_e4m3"):  # vLLM's spelling
            value = "float8_e4m3fn"
        if value not in table:
            raise CacheDtypeError(f"{what} {value!r} is not supported; choose one of "
                                  f"{', '.join(sorted(table))} or 'auto'")
        return jnp.dtype(table[value])
    dtype = jnp.dtype(value)
    if dtype not in {jnp.dtype(d) for d in table.values()}:
        raise CacheDtypeError(f"{what} {dtype} is not supported; choose one of {', '.join(sorted(table))}")
    return dtype


@dataclasses.dataclass(frozen=True)
class CacheDtypes:
    """What the decode-time state is stored in.

    kv: attention keys / values (float8_e4m3fn stores scaled values plus one scale per
    token and KV head); conv: the GDN conv inputs (the model's dtype); state: the GDN
    recurrent state (float32 unless asked otherwise)."""

    kv: Any
    conv: Any
    state: Any = jnp.float32

    @classmethod
    def resolve(cls, model_dtype, kv_cache_dtype=None, state_dtype=None) -> "CacheDtypes":
        """Names ("auto", "bfloat16", "float8_e4m3fn" / "fp8", ...) or dtypes -> dtypes."""
        kv = _resolve(kv_cache_dtype, KV_CACHE_DTYPES, model_dtype, "kv_cache_dtype")
        state = _resolve(state_dtype, STATE_DTYPES, jnp.float32, "state_dtype")
        return cls(kv=kv, conv=jnp.dtype(model_dtype), state=state)

    @property
    def kv_scaled(self) -> bool:
        return jnp.dtype(self.kv) == FP8


@struct.dataclass
class KVCache:
    """Keys / values of one attention layer: [batch, slots, kv_heads, head_dim].

    An fp8 cache also holds `k_scale`, `v_scale` [batch, slots, kv_heads]: the stored
    value times its slot's scale is the key / value (None for other dtypes)."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    LOGICAL_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")
    SCALE_AXES = ("batch", "cache_seq", "kv_heads")

    @property
    def scaled(self) -> bool:
        return self.k_scale is not None


def quantize_kv(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array | None]:
    """x [..., D] -> (stored values, scales [...] or None) for a cache of `dtype`.

    fp8: one scale per vector (token and head) = its largest magnitude / 448, computed
    when it is written, so no value saturates and earlier slots never need rescaling.
    Other dtypes: a plain cast, no scales."""
    if jnp.dtype(dtype) != FP8:
        return x.astype(dtype), None
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0).astype(SCALE_DTYPE)
    q = jnp.clip(x / scale.astype(jnp.float32)[..., None], -FP8_MAX, FP8_MAX)
    return q.astype(FP8), scale


def dequantize_kv(values: jax.Array, scales: jax.Array | None, dtype=jnp.float32) -> jax.Array:
    """The inverse of `quantize_kv` (for tests and reports; kernels apply scales inside)."""
    if scales is None:
        return values.astype(dtype)
    return (values.astype(jnp.float32) * scales.astype(jnp.float32)[..., None]).astype(dtype)


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
            if hasattr(layer, "latent"):  # MLA (jaxpar.models.mla.MLACache)
                return layer.latent.shape[1]
        raise ValueError("cache has no attention layer")
