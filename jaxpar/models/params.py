"""Parameter declaration shared by every component.

A parameter is created once, abstractly (the model is built under `nnx.eval_shape`),
with its *logical* axes and a description of how it relates to the Hugging Face tensor
it is loaded from. The loader and the sharding code read both from the metadata; no
component knows about meshes or files.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from jaxpar.loading.layouts import HFLayout


# HF Linear weights are [out, in]; ours are [...in, ...out] (x @ w), column- and
# row-parallel projections alike (which dims are split is the logical axes' business).
LINEAR = HFLayout(perm=(1, 0))
AS_IS = HFLayout()


def param(shape: Sequence[int], logical_axes: Sequence[str | None], dtype,
          hf_layout: HFLayout = AS_IS) -> nnx.Param:
    """An (abstract) parameter; values always come from a checkpoint, so zeros suffice."""
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(logical_axes)} differ in rank")
    return nnx.Param(jnp.zeros(tuple(shape), dtype), logical_axes=tuple(logical_axes),
                     hf_layout=hf_layout)
