"""Dense projections with multi-dimensional in/out features (e.g. `[hidden] -> [heads, head_dim]`)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.loading.layouts import HFLayout
from jaxpar.models.fp8_weights import dequantize
from jaxpar.models.params import AS_IS, LINEAR, param
from jaxpar.sharding.axis_rules import AxisRules


class Linear(nnx.Module):
    """y = x @ W (+ b), contracting x's trailing `in_features` dims.

    The weight is stored `[*in_features, *out_features]`; on disk (HF) it is
    `[prod(out), prod(in)]`, hence the transposing layout.
    """

    # Set by `jaxpar.models.fp8.keep_fp8` when the checkpoint's weight is fp8 block-scaled.
    weight_scale_inv = None
    weight_fp8_view = None

    def __init__(self, in_features: Sequence[int], out_features: Sequence[int],
                 in_axes: Sequence[str | None], out_axes: Sequence[str | None], dtype,
                 *, bias: bool = False, hf_layout: HFLayout = LINEAR, hf_bias_layout: HFLayout = AS_IS):
        self.n_in = len(in_features)
        self.weight = param((*in_features, *out_features), (*in_axes, *out_axes), dtype, hf_layout)
        self.bias = param(tuple(out_features), tuple(out_axes), dtype, hf_bias_layout) if bias else None

    def kernel(self, dtype) -> jax.Array:
        """The weight in `dtype` (a kept-fp8 weight multiplied by its block scales)."""
        if self.weight_scale_inv is not None:
            return dequantize(self.weight[...], self.weight_scale_inv[...], self.weight_fp8_view, dtype)
        return self.weight[...].astype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.tensordot(x, self.kernel(x.dtype), axes=self.n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


def row_parallel_scatter(linear: Linear, x: jax.Array, rules: AxisRules,
                         x_axes: tuple[str | None, ...]) -> jax.Array | None:
    """Sequence parallelism's row-parallel projection: each rank multiplies its slice of
    the contracted dim, then the partial sums are reduce-scattered over the sequence
    (`psum_scatter`) instead of all-reduced — XLA does not make this rewrite from
    sharding constraints alone on every backend. Returns None when the layout does not
    allow it (contracted dim not split over exactly the sequence-parallel axes, or the
    batch split differently from the residual stream); the caller then uses the plain path.
    x: [B, T, *in]; x_axes: its logical axes.
    """
    sp_axes = rules.axes_for("residual_seq")
    contracted = tuple(a for name in x_axes[2:] for a in rules.axes_for(name))
    size = rules.size("residual_seq")
    if (not sp_axes or contracted != sp_axes or x.shape[1] % size
            or rules.axes_for("batch") != rules.axes_for("residual_batch")):
        return None
    w_axes = linear.weight.logical_axes
    out_axes = ("batch", "residual_seq") + tuple(w_axes[linear.n_in:])
    n_in = linear.n_in

    def local(x, w):
        y = jnp.tensordot(x, w, axes=n_in)
        return jax.lax.psum_scatter(y, sp_axes, scatter_dimension=1, tiled=True)

    y = jax.shard_map(local, mesh=rules.mesh, in_specs=(rules.spec(x_axes), rules.spec(w_axes)),
                      out_specs=rules.spec(out_axes), check_vma=False)(x, linear.kernel(x.dtype))
    if linear.bias is not None:
        y = y + linear.bias[...].astype(y.dtype)
    return y
