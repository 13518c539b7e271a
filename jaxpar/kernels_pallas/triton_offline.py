"""Compile the Pallas Triton kernels for a GPU on a machine without one.

Two steps, both offline:

1. ``lower_for_cuda``: ``jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",))``
   under an abstract mesh whose device is an H100 (jax >= 0.11 asks for an abstract GPU
   device when none is attached; jax 0.10 accepts it too). The Pallas -> Triton lowering
   runs for real and every kernel's Triton IR (TTIR) is captured, with the ``num_warps`` /
   ``num_stages`` / grid that the ``__gpu$xla.gpu.triton`` custom call carries.
2. ``compile_kernel``: the captured TTIR is compiled by the ``triton`` PyPI package
   (TTIR -> TTGIR -> LLVM -> PTX -> cubin, with its bundled ``ptxas``) for
   ``GPUTarget("cuda", 90, 32)``; its ``ptxas -v`` log gives registers and spills.

On a GPU, XLA compiles the same TTIR with the Triton it links, so these figures are
estimates of what runs there (same IR and launch options, possibly another Triton commit).
The ``triton`` package is optional (``pip install -e ".[test]"`` installs it): without it
``triton_unavailable_reason()`` says why and callers skip.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import re
import tempfile
import warnings
from typing import Callable, Iterator

import jax

__all__ = [
    "H100",
    "SHARED_MEMORY_LIMIT",
    "CapturedKernel",
    "KernelResources",
    "triton_unavailable_reason",
    "abstract_gpu",
    "capture_triton_kernels",
    "lower_for_cuda",
    "compile_kernel",
]

TRITON_CALL = "__gpu$xla.gpu.triton"
H100 = "NVIDIA H100 80GB HBM3"
# Shared memory a CTA may use on sm_90 (H100/H200): 227 KB.
SHARED_MEMORY_LIMIT = 227 * 1024


@dataclasses.dataclass(frozen=True)
class CapturedKernel:
    """One Pallas Triton kernel as lowered: its TTIR text and launch options."""

    name: str
    ttir: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one compiled kernel."""

    name: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    shared_bytes: int

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def ctas_per_sm(self, registers_per_sm: int = 65536, shared_per_sm: int = 228 * 1024) -> int:
        """Resident CTAs per SM allowed by registers and shared memory (sm_90 limits)."""
        threads = 32 * self.num_warps
        by_regs = registers_per_sm // max(1, self.registers * threads)
        by_smem = shared_per_sm // self.shared_bytes if self.shared_bytes else 32
        return max(0, min(by_regs, by_smem, 32))

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "grid": list(self.grid), "programs": self.programs,
                "ctas_per_sm": self.ctas_per_sm()}  # fmt: skip


@functools.cache
def triton_unavailable_reason() -> str | None:
    """None when the triton package can compile for CUDA here, else why not."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler as nvidia
        import triton.knobs  # noqa: F401  (triton >= 3.4: compile options and ptxas log)
        try:
            ptxas = nvidia.get_ptxas(90)  # triton >= 3.6: the ptxas for an arch
        except TypeError:
            ptxas = nvidia.get_ptxas()
        if not os.path.exists(ptxas.path):
            return "triton's bundled ptxas is missing"
    except Exception as err:  # ImportError, or a broken install
        return f"the triton package cannot be used ({type(err).__name__}: {err})"
    return None


def abstract_gpu(device_kind: str = H100, num_cores: int = 132):
    """An abstract one-device mesh on an NVIDIA GPU: lowering under it targets that GPU."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=num_cores,
                                         platform="gpu")  # fmt: skip
    return jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=device)
    )


@contextlib.contextmanager
def capture_triton_kernels() -> Iterator[list[str]]:
    """Collects the TTIR text of every Pallas Triton kernel lowered inside the block."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    captured: list[str] = []
    lowering = registration.lowering
    original = lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield captured
    finally:
        lowering.lower_jaxpr_to_triton_module = original


def _triton_calls(module) -> list[dict]:
    """The backend configs of the Triton custom calls in a lowered StableHLO module."""
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.operation.name == "stablehlo.custom_call":
                        target = inner.operation.attributes["call_target_name"]
                        if str(target).strip('"') == TRITON_CALL:
                            cfg = inner.operation.attributes["mhlo.backend_config"]
                            calls.append({key: cfg[key] for key in
                                          ("name", "num_warps", "num_stages", "grid_x", "grid_y",
                                           "grid_z")})  # fmt: skip
                    walk(inner.operation)

    walk(module.operation)
    return calls


def _attr_int(attr) -> int:
    return int(re.match(r"\s*(-?\d+)", str(attr)).group(1))


def lower_for_cuda(fn: Callable, *avals, device_kind: str = H100) -> list[CapturedKernel]:
    """Lowers fn(*avals) for CUDA and returns its Pallas Triton kernels, in call order."""
    with warnings.catch_warnings():
        # jax >= 0.11: "The Pallas Triton backend is deprecated": known, see dispatch.py.
        warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
        with capture_triton_kernels() as ttirs, abstract_gpu(device_kind):
            lowered = jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",))
    calls = _triton_calls(lowered.compiler_ir("stablehlo"))
    if len(calls) != len(ttirs):
        raise RuntimeError(f"{len(ttirs)} Triton modules lowered but {len(calls)} custom calls")
    return [
        CapturedKernel(
            name=str(c["name"]).strip('"'),
            ttir=ttir,
            num_warps=_attr_int(c["num_warps"]),
            num_stages=_attr_int(c["num_stages"]),
            grid=(_attr_int(c["grid_x"]), _attr_int(c["grid_y"]), _attr_int(c["grid_z"])),
        )
        for c, ttir in zip(calls, ttirs)
    ]


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
}


def compile_kernel(kernel: CapturedKernel, capability: int = 90) -> KernelResources:
    """Compiles captured TTIR to a cubin with the triton package and reads ptxas -v.

    Raises whatever Triton raises when the kernel cannot compile (e.g. out of shared memory
    is only checked here, not by Triton: see ``SHARED_MEMORY_LIMIT``).
    """
    reason = triton_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    import triton
    from triton.backends.compiler import GPUTarget

    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, triton.knobs.nvidia.scope(), \
            triton.knobs.compilation.scope(), triton.knobs.cache.scope(), \
            warnings.catch_warnings():
        # Compile every time (a cache hit prints no ptxas log), caching only in tmp.
        triton.knobs.cache.dir = tmp
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True
        warnings.filterwarnings("ignore", message=".*FP_FUSION.*")
        src = os.path.join(tmp, f"{kernel.name}.ttir")
        with open(src, "w") as f:
            f.write(kernel.ttir)
        options = dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages, num_ctas=1,
                       enable_fp_fusion=True)  # fmt: skip
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                      options=options)  # fmt: skip
    log = log.getvalue()
    found = {key: int(m.group(1)) if (m := rx.search(log)) else 0 for key, rx in _PTXAS_RE.items()}
    return KernelResources(name=kernel.name, num_warps=kernel.num_warps,
                           num_stages=kernel.num_stages, grid=kernel.grid,
                           shared_bytes=int(compiled.metadata.shared), **found)  # fmt: skip
