"""Dense projections with multi-dimensional in/out features (e.g. `[hidden] -> [heads, head_dim]`)."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.loading.layouts import HFLayout
from jaxpar.models.fp8_weights import dequantize
from jaxpar.models.params import AS_IS, LINEAR, param
from jaxpar.sharding.axis_rules import AxisRules


def matmul(x: jax.Array, w: jax.Array, n_contract: int = 1, *, out_dtype=None,
           w_transposed: bool = False, float32_products: bool = False) -> jax.Array:
    """x [..., *K] @ w [*K, *N] -> [..., *N] in `out_dtype` (default x's dtype),
    accumulated in float32. `w_transposed`: w is stored [N, K] (a tied embedding read as
    the LM head; one contracted dim), contracted on its last dim without a transpose.

    A weight of another dtype is cast to x's first (a float32 activation times a bfloat16
    weight computes in float32). Half-precision products accumulate in float32 (as HF /
    PyTorch linear layers do) and leave the dot in half precision, unless `out_dtype` is
    float32 or `float32_products` asks for a float32 dot output cast afterwards: under
    tensor parallelism a row-parallel dot's partial sums are all-reduced in the dtype that
    leaves the dot, so float32 there would double every TP all-reduce on a GPU; on one
    XLA:CPU device (no collectives) the float32 output is what sends bfloat16 products to
    its bfloat16 GEMM instead of a float32 copy of the weight (`use_float32_products`). And when the left
    side is a single row (batch-1 decode), a half-precision product is padded to two
    rows: XLA:CPU lowers a bfloat16 matrix-vector product by converting the entire weight
    to float32 first (a weight-sized copy on every call, ~8x slower than float32 on the
    2-core test machine), while two rows go to its bfloat16 GEMM (YNNPACK), which reads
    the weight in place. On a GPU the extra row costs nothing (reading the weight bounds
    the product). For the same reason a transposed weight is contracted in place: a
    `.T` before the product made XLA:CPU convert the tied 49152 x 576 embedding to
    float32 on every step.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    w = w.astype(x.dtype)
    if x.dtype == jnp.float32:
        return jnp.tensordot(x, w.T if w_transposed else w, axes=n_contract).astype(out_dtype)
    w_dims = tuple(range(w.ndim - n_contract, w.ndim)) if w_transposed else tuple(range(n_contract))
    lead = x.shape[: x.ndim - n_contract]
    single = math.prod(lead) == 1
    if single:  # [1, K] -> [2, K] (see above)
        x = x.reshape(1, *x.shape[x.ndim - n_contract:])
        x = jnp.concatenate([x, jnp.zeros_like(x)])
    x_dims = tuple(range(x.ndim - n_contract, x.ndim))
    wide = float32_products or jnp.dtype(out_dtype) == jnp.float32
    y = jax.lax.dot_general(x, w, ((x_dims, w_dims), ((), ())),
                            preferred_element_type=jnp.float32 if wide else x.dtype)
    if single:
        y = y[:1].reshape(*lead, *y.shape[1:])
    return y.astype(out_dtype)


class Linear(nnx.Module):
    """y = x @ W (+ b), contracting x's trailing `in_features` dims.

    The weight is stored `[*in_features, *out_features]`; on disk (HF) it is
    `[prod(out), prod(in)]`, hence the transposing layout.
    """

    # Set by `jaxpar.models.fp8.keep_fp8` when the checkpoint's weight is fp8 block-scaled.
    weight_scale_inv = None
    weight_fp8_view = None
    # Set by `use_float32_products` (a model on one CPU device): see `matmul`.
    float32_products = False

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
        y = matmul(x, self.kernel(x.dtype), self.n_in, float32_products=self.float32_products)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


def use_float32_products(model: nnx.Module) -> None:
    """Marks every Linear of `model` to take its half-precision products out of the dot in
    float32 (see `matmul`): for a model on a single XLA:CPU device, where no collective
    moves them and XLA:CPU's bfloat16 GEMM needs it."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            node.float32_products = True


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
        y = matmul(x, w, n_in)
        return jax.lax.psum_scatter(y, sp_axes, scatter_dimension=1, tiled=True)

    y = jax.shard_map(local, mesh=rules.mesh, in_specs=(rules.spec(x_axes), rules.spec(w_axes)),
                      out_specs=rules.spec(out_axes), check_vma=False)(x, linear.kernel(x.dtype))
    if linear.bias is not None:
        y = y + linear.bias[...].astype(y.dtype)
    return y
