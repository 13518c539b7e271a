"""Gated-delta-rule and attention kernels: Pallas (Triton) GPU kernels beside pure-JAX
references with the same signatures, and a dispatcher that picks one (DESIGN.md section 6).

Modules:
  gated_delta_rule          pure-JAX GDN references (chunked, recurrent, decode step, fused conv)
  gated_delta_rule_pallas   Pallas GDN kernels
  attention                 pure-JAX attention references (prefill, decode + lse, DCP merge)
  attention_pallas          Pallas attention kernels
  dispatch                  impl="auto" | "pallas" | "reference" entry points
"""

from jaxpar.kernels_pallas.attention import (
    decode_attention,
    merge_attention_partials,
    prefill_attention,
)
from jaxpar.kernels_pallas.dispatch import (
    KernelFallbackWarning,
    KernelImpl,
    PallasUnavailableError,
    UnsupportedShapeError,
    attention_decode,
    attention_prefill,
    gated_delta_rule_chunked,
    gated_delta_rule_conv_decode,
    gated_delta_rule_decode,
    resolve_impl,
)
from jaxpar.kernels_pallas.gated_delta_rule import (
    chunk_gated_delta_rule,
    fused_conv_gdn_decode_step,
    gated_delta_rule_step,
    recurrent_gated_delta_rule,
)

__all__ = [
    "KernelImpl",
    "KernelFallbackWarning",
    "PallasUnavailableError",
    "UnsupportedShapeError",
    "resolve_impl",
    "gated_delta_rule_chunked",
    "gated_delta_rule_decode",
    "gated_delta_rule_conv_decode",
    "attention_prefill",
    "attention_decode",
    "chunk_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "gated_delta_rule_step",
    "fused_conv_gdn_decode_step",
    "prefill_attention",
    "decode_attention",
    "merge_attention_partials",
]
