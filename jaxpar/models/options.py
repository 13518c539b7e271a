"""Runtime choices that change the compiled program but not the weights."""

from __future__ import annotations

import dataclasses
from typing import Literal

KernelImpl = Literal["auto", "pallas", "reference"]


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    # "auto": Pallas kernels on GPU, pure-JAX references elsewhere.
    kernel_impl: KernelImpl = "auto"
