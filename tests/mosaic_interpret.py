"""Helpers for the Mosaic GPU kernel tests: skip markers, GPU interpret mode with the race
detector, and CUDA lowering without a GPU.

GPU interpret mode (jax >= 0.11) runs a Mosaic GPU kernel on CPU: shared memory, TMA
copies (with their out-of-bounds zero fill and clipped stores), barriers and wgmma are
simulated, every grid block runs its warpgroups as threads, and a happens-before race
detector checks each shared/global memory access. The kernels' ``interpret=True`` turns the
detector on with ``on_race="raise"``: a race fails the call.
"""

from __future__ import annotations

import re

import jax
import pytest

from jaxpar.kernels_pallas.mgpu_common import mosaic_unavailable_reason

INTERPRET_SKIP = mosaic_unavailable_reason(interpret=True)
requires_interpret = pytest.mark.skipif(
    INTERPRET_SKIP is not None, reason=f"Mosaic GPU interpret mode unavailable: {INTERPRET_SKIP}"
)

MOSAIC_CALL = "mosaic_gpu"


def lower_for_cuda(fn, *specs) -> str:
    """Lowers fn for CUDA on this (GPU-less) machine and returns the StableHLO text.

    This runs the whole Pallas -> Mosaic GPU lowering in Python: register layout inference,
    wgmma operand/shape checks, TMA descriptor legality (tiling of the global shapes) and
    the lowering of every op to the Mosaic GPU / NVVM dialects. Not covered without a GPU:
    the PTX compile (ptxas: registers, spills) and the shared-memory limit, which the CUDA
    plugin checks at compile time (the wrappers count shared memory themselves).
    """
    return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()


def mosaic_kernel_count(hlo_text: str) -> int:
    """Number of Mosaic GPU custom calls (one per kernel launch) in lowered StableHLO."""
    return len(re.findall(r"stablehlo\.custom_call @mosaic_gpu", hlo_text))


def reset_interpreter() -> None:
    """After a kernel raised inside the interpreter its shared state must be reset."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    interpret_pallas_call.reset_gpu_interpret_mode_state()
