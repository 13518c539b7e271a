"""Moving small host values in and out of a (possibly multi-process) mesh.

Under `jax.distributed` every process runs the same program; inputs such as token ids are
given identically by every process and placed replicated, and replicated outputs are
read from the local copy.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def replicated(x: np.ndarray, mesh: Mesh) -> jax.Array:
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    if not x.is_fully_replicated:
        raise ValueError("only replicated values can be read on one process of a multi-process mesh")
    return np.asarray(x.addressable_data(0))
