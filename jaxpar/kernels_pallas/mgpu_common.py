"""Shared pieces of the Pallas Mosaic GPU (Hopper) kernels: the jax-version gate, the
interpret-mode parameters, shared-memory tile transforms and shape checks.

Mosaic GPU kernels are written against Hopper's asynchronous hardware: TMA bulk copies
(``plgpu.copy_gmem_to_smem`` / ``emit_pipeline``) land tiles in swizzled shared memory,
``plgpu.wgmma`` multiplies them on the tensor cores into a float32 accumulator, and
barriers order the two. From jax 0.11 the same kernels run on CPU in *GPU interpret mode*
(``plgpu.InterpretGPUParams``), which simulates shared memory, TMA, barriers and wgmma and,
with ``detect_races=True``, checks every access against a happens-before race detector.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxpar.kernels_pallas.errors import UnsupportedShapeError

__all__ = [
    "MOSAIC_MIN_JAX",
    "MosaicUnavailableError",
    "UnsupportedShapeError",
    "mosaic_unavailable_reason",
    "interpret_params",
    "tile_transforms",
    "require_16bit",
    "require_multiple",
    "check_smem",
    "SMEM_LIMIT",
    "MASK",
    "LOG2E",
    "LN2",
]

# Mosaic GPU interpret mode, and the Mosaic GPU API these kernels use, need jax >= 0.11.
MOSAIC_MIN_JAX = (0, 11)

# Finite stand-in for -inf in the online softmax: exp2(MASK - m) underflows to 0 for any
# real m and MASK - MASK = 0 never makes a NaN (rows that saw no key are fixed at the end).
MASK = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Shared memory one CTA may use on H100 / H200 (the 227 KiB dynamic limit). The CUDA
# compile enforces it; interpret mode and the CPU lowering do not, so the wrappers count
# their tiles and reject what would not fit.
SMEM_LIMIT = 227 * 1024


class MosaicUnavailableError(RuntimeError):
    """A Mosaic GPU kernel was asked for where it cannot run (the message says why)."""


def _jax_version() -> tuple[int, int]:
    major, minor = jax.__version__.split(".")[:2]
    return int(major), int(minor)


def mosaic_unavailable_reason(interpret: bool = False) -> str | None:
    """Why the Mosaic GPU kernels cannot run here, or None if they can.

    Compiled: jax >= 0.11 and a CUDA GPU of compute capability >= 9.0 (wgmma and TMA are
    Hopper instructions). Interpreted: jax >= 0.11 (GPU interpret mode), any backend.
    """
    if _jax_version() < MOSAIC_MIN_JAX:
        return (
            f"the Mosaic GPU kernels need jax >= {'.'.join(map(str, MOSAIC_MIN_JAX))} "
            f"(GPU interpret mode and the plgpu API they use); installed jax "
            f"{jax.__version__}"
        )
    if interpret:
        return None
    if jax.default_backend() != "gpu":
        return (
            f"the Mosaic GPU kernels compile only for CUDA GPUs and the default JAX backend "
            f"is {jax.default_backend()!r} (pass interpret=True to run them in GPU "
            f"interpret mode on CPU)"
        )
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if capability is None or tuple(map(int, str(capability).split("."))) < (9, 0):
        return (
            f"the Mosaic GPU kernels use Hopper instructions (wgmma, TMA) and need compute "
            f"capability >= 9.0; {device.device_kind} has {capability}"
        )
    return None


def interpret_params(interpret) -> object | None:
    """Maps a kernel's ``interpret`` argument to what ``plgpu.kernel`` takes.

    False/None: compile for the GPU. True: GPU interpret mode with the race detector on
    (a race raises). An ``InterpretGPUParams`` instance is passed through unchanged.
    """
    if interpret is None or interpret is False:
        return None
    reason = mosaic_unavailable_reason(interpret=True)
    if reason is not None:
        raise MosaicUnavailableError(reason)
    if interpret is True:
        return plgpu.InterpretGPUParams(
            detect_races=True,
            on_race="raise",
            # The interpreter models the TMA engine as this many in-order units, copies
            # assigned round-robin: waiting on one copy also orders every earlier copy on
            # its unit. With the default 5, a wait on a K/V load could "order" an earlier
            # TMA store and hide a missing wait_smem_to_gmem (a reused output slot); with
            # 64, units are reused only after more copies than any of these kernels keeps
            # in flight, so such a missing wait is reported.
            num_tma_threads_per_device=64,
        )
    return interpret


def tile_transforms(minor: int, dtype) -> tuple:
    """Tiling + swizzle for a shared-memory tile whose minor dimension has ``minor`` items.

    The widest swizzle that the row fits (128 bytes = 64 bf16 items for head_dim >= 64):
    wgmma reads its operands from shared memory in exactly this layout, and TMA writes it.
    """
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    return (
        plgpu.TilingTransform((8, swizzle // itemsize)),
        plgpu.SwizzleTransform(swizzle),
    )


def require_16bit(what: str, dtype) -> None:
    """wgmma takes 16-bit operands (bf16 / f16) with a float32 accumulator."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise UnsupportedShapeError(
            f"{what} dtype {jnp.dtype(dtype).name} is not supported by the Mosaic GPU kernel: "
            f"wgmma operands must be bfloat16 or float16 (use the Triton kernel or the "
            f"reference for float32)"
        )


def require_multiple(what: str, value: int, of: int, why: str) -> None:
    if value % of or value <= 0:
        raise UnsupportedShapeError(
            f"{what}={value} is not supported by the Mosaic GPU kernel: it must be a positive "
            f"multiple of {of} ({why})"
        )


def check_smem(kernel: str, nbytes: int, hint: str) -> None:
    """Raises UnsupportedShapeError when a kernel's shared-memory tiles exceed SMEM_LIMIT."""
    if nbytes > SMEM_LIMIT:
        raise UnsupportedShapeError(
            f"{kernel}: these tiles need {nbytes / 1024:.0f} KiB of shared memory, more than "
            f"the {SMEM_LIMIT // 1024} KiB of a Hopper CTA ({hint})"
        )
