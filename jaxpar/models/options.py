"""Runtime choices that change the compiled program but not the weights."""

from __future__ import annotations

import dataclasses
from typing import Literal, Mapping, Union

from jaxpar.kernels_pallas.dispatch import OPS, check_impl

KernelImplName = Literal["auto", "mosaic", "triton", "reference", "pallas"]
# One implementation for every kernel, or a per-operation mapping such as
# {"attention_decode": "reference"} (operations not named use "default", else "auto").
KernelImpl = Union[KernelImplName, Mapping[str, KernelImplName]]


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """kernel_impl: "auto" (Mosaic GPU / Triton kernels on a GPU, pure-JAX references
    elsewhere), "mosaic", "triton", "reference", or a mapping from operation
    (``jaxpar.kernels_pallas.OPS``: attention_prefill, attention_extend, attention_decode,
    gated_delta_rule_chunked, gated_delta_rule_decode, or "default") to one of those.
    A mapping is stored as a sorted tuple of pairs, so the options stay hashable."""

    kernel_impl: KernelImpl = "auto"
    # Block kinds ("attention", "linear_attention", "mlp", "moe") whose activations are
    # recomputed in the backward pass instead of kept (training; no effect on inference).
    remat: tuple[str, ...] = ()

    def __post_init__(self):
        choice = self.kernel_impl
        if isinstance(choice, str):
            check_impl(choice)
            return
        if not isinstance(choice, (Mapping, tuple)):
            raise ValueError(f"kernel_impl must be an impl name or a mapping from operation "
                             f"to impl name, got {choice!r}")  # fmt: skip
        pairs = tuple(sorted(dict(choice).items()))
        for op, impl in pairs:
            if op != "default" and op not in OPS:
                raise ValueError(f"kernel_impl names an unknown operation {op!r}; operations: "
                                 f"{', '.join(OPS)} (or 'default')")  # fmt: skip
            check_impl(impl)
        object.__setattr__(self, "kernel_impl", pairs)

    def impl_for(self, op: str) -> str:
        """The impl requested for operation `op`."""
        if isinstance(self.kernel_impl, str):
            return self.kernel_impl
        table = dict(self.kernel_impl)
        return table.get(op, table.get("default", "auto"))
