"""Every Pallas Triton kernel, lowered for CUDA and compiled for sm_90 on a machine without a
GPU (``jaxpar.kernels_pallas.triton_offline``).

Lowering (jax 0.10 to 0.12) runs under an abstract H100 mesh -- jax >= 0.11 refuses to
lower a Triton kernel without a GPU or an abstract GPU device -- and checks that the Pallas
-> Triton lowering accepts each kernel at the production shapes of
``scripts/kernel_resources.py``. Compiling takes the captured Triton IR through the
``triton`` package down to a cubin for ``GPUTarget("cuda", 90, 32)`` and checks shared
memory (<= 227 KB) and that the bf16 production configurations do not spill; skipped when
the triton package cannot be used.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxpar.kernels_pallas import triton_common, triton_offline

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "kernel_resources.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("kernel_resources", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


CASES = {case.label: case for case in _load_script().cases()}
# Compiled here (the rest by the script): each kernel at a production tile, bf16, about
# 25 s in all. float32 compiles take minutes (IEEE dots unroll on CUDA cores).
COMPILED = [
    "attention_prefill D256 bfloat16",
    "attention_decode D256 G8 bfloat16",
    "attention_extend D128 DCP2 bfloat16",
    "attention_decode D128 G4 fp8",  # fp8 KV cache with per-slot scales
    "attention_extend D128 DCP2 fp8",
    "gdn_chunked Dk=Dv=128 bfloat16",
    "gdn_decode D128 bfloat16",
]
EXPECTED_KERNELS = {"gdn_chunked": 5}


@pytest.fixture(scope="module")
def lowered():
    """Lowers every case once (each is also compiled by the tests below)."""
    return {label: triton_offline.lower_for_cuda(case.fn, *case.avals)
            for label, case in CASES.items()}  # fmt: skip


def test_every_kernel_lowers_at_production_shapes(lowered):
    for label, kernels in lowered.items():
        assert len(kernels) == EXPECTED_KERNELS.get(label.split()[0], 1), label
        for kernel in kernels:
            assert "tt.func" in kernel.ttir and kernel.name.startswith("jaxpar_"), label
            assert kernel.num_warps in (4, 8) and kernel.num_stages in (1, 2), label


@pytest.mark.skipif(triton_offline.triton_unavailable_reason() is not None,
                    reason=f"{triton_offline.triton_unavailable_reason()}")  # fmt: skip
@pytest.mark.parametrize("label", COMPILED)
def test_production_kernels_compile_for_sm90(label, lowered):
    for kernel in lowered[label]:
        res = triton_offline.compile_kernel(kernel)
        assert res.shared_bytes <= triton_offline.SHARED_MEMORY_LIMIT, (label, res)
        assert res.spill_store_bytes == 0 and res.spill_load_bytes == 0, (label, res)
        assert 0 < res.registers <= 255 and res.ctas_per_sm() >= 1, (label, res)


def test_lowering_rejects_what_triton_cannot_do():
    """Guards this file's premise: a kernel Triton cannot lower fails here, on CPU."""
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + x_ref[...][:, 0][:, None]  # static value slice: no Triton rule

    def f(x):
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            compiler_params=triton_common.triton_params(num_warps=4, num_stages=1),
        )(x)

    with pytest.raises(NotImplementedError, match="Pallas Triton lowering: slice"):
        triton_offline.lower_for_cuda(f, jax.ShapeDtypeStruct((16, 16), jnp.float32))
