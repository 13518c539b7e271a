"""Gated-delta-rule and attention kernels: Pallas GPU kernels beside pure-JAX references with
the same signatures, and a dispatcher that picks one per operation.

Modules:
  gated_delta_rule          pure-JAX GDN references (chunked, recurrent, decode step)
  gated_delta_rule_pallas   Pallas Triton GDN kernels (prepare / state / output, decode step)
  ssd                       pure-JAX Mamba2 SSD references (chunked, recurrent, decode step);
                            no Pallas kernel yet, so not a dispatch operation
  attention                 pure-JAX attention references (blocked prefill and extend,
                            decode + lse, split / DCP merge)
  attention_pallas          Pallas Triton attention kernels (flash prefill / extend,
                            split-KV decode)
  *_mgpu                    Pallas Mosaic GPU kernels, registered in dispatch.MOSAIC_KERNELS
  dispatch                  impl="auto" | "mosaic" | "triton" | "reference" entry points
  errors                    the errors and warning every implementation shares
  triton_common             tile rules, compiler params, in-kernel matmul, SM count
  triton_offline            lower + compile the Triton kernels for sm_90 without a GPU
"""

from jaxpar.kernels_pallas.attention import (
    dcp_local_lengths,
    decode_attention,
    extend_attention,
    merge_attention_partials,
    prefill_attention,
)
from jaxpar.kernels_pallas.dispatch import (
    IMPLS,
    OPS,
    KernelImpl,
    attention_decode,
    attention_extend,
    attention_prefill,
    gated_delta_rule_chunked,
    gated_delta_rule_decode,
    implementations,
    resolve_impl,
)
from jaxpar.kernels_pallas.errors import (
    KernelCompileError,
    KernelFallbackWarning,
    KernelUnavailableError,
    PallasUnavailableError,
    UnsupportedShapeError,
)
from jaxpar.kernels_pallas.gated_delta_rule import (
    chunk_gated_delta_rule,
    gated_delta_rule_step,
    recurrent_gated_delta_rule,
)
from jaxpar.kernels_pallas.ssd import ssd_chunked, ssd_recurrent, ssd_step

__all__ = [
    "KernelImpl",
    "OPS",
    "IMPLS",
    "KernelFallbackWarning",
    "KernelUnavailableError",
    "KernelCompileError",
    "PallasUnavailableError",
    "UnsupportedShapeError",
    "resolve_impl",
    "implementations",
    "gated_delta_rule_chunked",
    "gated_delta_rule_decode",
    "attention_prefill",
    "attention_extend",
    "attention_decode",
    "ssd_chunked",
    "ssd_recurrent",
    "ssd_step",
    "chunk_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "gated_delta_rule_step",
    "prefill_attention",
    "extend_attention",
    "decode_attention",
    "merge_attention_partials",
    "dcp_local_lengths",
]
