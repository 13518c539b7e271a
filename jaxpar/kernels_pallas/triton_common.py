"""Helpers shared by the Pallas Triton kernels: tile rules, compiler params, in-kernel matmul,
and what the attached GPU looks like (or an H100 when none is attached).

Triton needs every tensor inside a kernel to have power-of-two dimensions and ``tl.dot``
needs each matmul dimension >= 16, so head dims and block sizes are powers of two >= 16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plt

from jaxpar.kernels_pallas.errors import UnsupportedShapeError

__all__ = [
    "MASK_VALUE",
    "H100_SM_COUNT",
    "sm_count",
    "require_power_of_two",
    "padded_head_dim",
    "triton_params",
    "mm",
]

# Finite stand-in for -inf inside kernels: exp(MASK - m) underflows to 0 for any real m and
# never produces inf - inf = NaN in the online softmax.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Streaming multiprocessors of an H100/H200 SXM: the count tile choices assume when no GPU
# is attached (offline compiles, interpret mode).
H100_SM_COUNT = 132

# Head dims the attention kernels take; others are zero-padded up to the next one.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


def sm_count() -> int:
    """SMs of the first GPU, or H100_SM_COUNT without one."""
    if jax.default_backend() == "gpu":
        count = getattr(jax.devices()[0], "core_count", None)
        if count:
            return int(count)
    return H100_SM_COUNT


def require_power_of_two(what: str, value: int, minimum: int = 16) -> None:
    """Raises UnsupportedShapeError unless value is a power of two >= minimum."""
    if value < minimum or value & (value - 1):
        raise UnsupportedShapeError(
            f"{what}={value} is not supported by the Pallas Triton kernel: it must be a power "
            f"of two >= {minimum} (Triton tensors need power-of-two sizes and tl.dot needs "
            f"dimensions >= 16). Use impl='reference' for this shape."
        )


def padded_head_dim(head_dim: int) -> int:
    """The supported head dim a head_dim is zero-padded to (80, 96 -> 128; 192 -> 256)."""
    for size in SUPPORTED_HEAD_DIMS:
        if head_dim <= size:
            return size
    raise UnsupportedShapeError(
        f"head_dim={head_dim} is larger than {SUPPORTED_HEAD_DIMS[-1]}, the largest head dim "
        f"the Pallas Triton attention kernels tile; use impl='reference' for this shape."
    )


def triton_params(num_warps: int, num_stages: int) -> plt.CompilerParams:
    """Triton compiler params. Passing them also pins pallas_call to the Triton backend
    (without them JAX may pick Mosaic GPU, which lacks some ops these kernels use)."""
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def mm(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False,
       exact: bool = False):
    """2-D matmul with float32 accumulation inside a kernel.

    bf16/f16 operands: tensor-core MMA with float32 accumulation. float32 operands: six bf16
    MMAs on the split operands (``BF16_BF16_F32_X6``, error about 1e-6 relative to float32)
    -- IEEE float32 dots run on CUDA cores and spill at every production tile (measured by
    ``scripts/kernel_resources.py``) -- or IEEE float32 with ``exact=True`` (small,
    precision-critical products such as the GDN triangular solve).
    """
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    precision = None
    if a.dtype == jnp.float32:
        precision = lax.Precision.HIGHEST if exact else lax.DotAlgorithmPreset.BF16_BF16_F32_X6
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)
