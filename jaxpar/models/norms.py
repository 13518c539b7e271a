"""RMSNorm in both conventions: `w * x` (Llama, Qwen3) and zero-centred `(1 + w) * x`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.loading.layouts import HFLayout
from jaxpar.models.params import AS_IS, param


def rms_normalise(x: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, *, zero_centred: bool = False,
                 axis_name: str | None = "embed", hf_layout: HFLayout = AS_IS):
        self.weight = param((dim,), (axis_name,), dtype, hf_layout)
        self.eps = eps
        self.zero_centred = zero_centred

    def __call__(self, x: jax.Array) -> jax.Array:
        normed = rms_normalise(x, self.eps)
        if self.zero_centred:
            # Qwen3-Next / 3.5 scale in float32, then cast.
            return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        # Llama / Qwen cast back to the input dtype first, then scale.
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)
