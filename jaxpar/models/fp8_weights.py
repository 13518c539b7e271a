"""Kept-fp8 weights in the matmul: `w_fp8 * scale` per block, inside the jitted step.

A block-scaled parameter stays float8_e4m3fn in device memory (1 byte per weight) beside
its float32 scales (`jaxpar.loading.fp8.ScaleView` says how they line up). Each call
multiplies the weight by its block's scale on the fly — the scales are broadcast over their
blocks, `(w.reshape(view) * repeat(scale, blocks)).reshape(w.shape)` — and casts to the
compute dtype; XLA fuses the convert and multiply into the operand of the dot that follows
(on CPU it may materialise one layer's dequantised weight at a time). Activations stay in
the model dtype (weight-only fp8): the result equals the model dequantised at load up to
float rounding order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dequantize(w: jax.Array, scale: jax.Array, view, dtype) -> jax.Array:
    """w (float8, our shape), scale (float32, `view.scale_shape`) -> w * scale in `dtype`."""
    s = scale.astype(jnp.float32)
    for d, b in enumerate(view.blocks):
        if b > 1:
            s = jnp.repeat(s, b, axis=d)
    if s.shape != tuple(view.view):  # a last block shorter than the others
        s = s[tuple(slice(0, n) for n in view.view)]
    return (w.reshape(view.view).astype(jnp.float32) * s).astype(dtype).reshape(w.shape)
