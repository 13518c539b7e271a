"""Dense projections with multi-dimensional in/out features (e.g. `[hidden] -> [heads, head_dim]`)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.loading.layouts import HFLayout
from jaxpar.models.params import AS_IS, LINEAR, param


class Linear(nnx.Module):
    """y = x @ W (+ b), contracting x's trailing `in_features` dims.

    The weight is stored `[*in_features, *out_features]`; on disk (HF) it is
    `[prod(out), prod(in)]`, hence the transposing layout.
    """

    def __init__(self, in_features: Sequence[int], out_features: Sequence[int],
                 in_axes: Sequence[str | None], out_axes: Sequence[str | None], dtype,
                 *, bias: bool = False, hf_layout: HFLayout = LINEAR):
        self.n_in = len(in_features)
        self.weight = param((*in_features, *out_features), (*in_axes, *out_axes), dtype, hf_layout)
        self.bias = param(tuple(out_features), tuple(out_axes), dtype, AS_IS) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.tensordot(x, self.weight[...].astype(x.dtype), axes=self.n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y
