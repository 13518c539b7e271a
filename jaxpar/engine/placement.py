"""A loaded model placed on another sharding (another policy and / or other devices).

Prefill and decode may run under different policies on different devices; the weights
are loaded once and each stage gets its own copy, moved with `jax.device_put` onto the
shardings that the stage's rules give every parameter (from its logical axes). In a
two-process run each process only ever holds its own stage.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jaxpar.assembly import abstract_model
from jaxpar.models.cache import Cache
from jaxpar.models.decoder import CausalLM, cache_shapes
from jaxpar.models.options import RuntimeOptions
from jaxpar.sharding.model_sharding import ModelSharding


def runtime_options(module: CausalLM) -> RuntimeOptions:
    """The options the module's mixers were built with (kernel choice)."""
    for layer in module.layers:
        mixer = layer.self_attn if layer.is_attention else layer.linear_attn
        return mixer.options
    return RuntimeOptions()


def place(module: CausalLM, sharding: ModelSharding, dtype) -> CausalLM:
    """The same weights as `module`, as a model built for `sharding`."""
    if sharding is module.sharding:
        return module
    graphdef, state = abstract_model(module.cfg, sharding, dtype, runtime_options(module), fp8_like=module)
    source = dict(nnx.to_flat_state(nnx.state(module)))
    for path, var in nnx.to_flat_state(state):
        if path not in source:
            raise KeyError(f"parameter {'/'.join(map(str, path))} is missing from the loaded model")
        var.set_value(jax.device_put(source[path].get_value(), var.get_value().sharding))
    return nnx.merge(graphdef, state)


@dataclasses.dataclass
class Stage:
    """One model on one sharding: what the compiled programs close over and are fed.

    The weights cross the jit boundary as a flat list of arrays (far cheaper to dispatch
    than an nnx.State); the graph definition is closed over, not hashed per call.
    """

    module: CausalLM
    dtype: object
    cache_dtypes: object = None  # a models.cache.CacheDtypes; None: everything in `dtype`

    def __post_init__(self):
        self.graphdef, state = nnx.split(self.module)
        self.weights, self.treedef = jax.tree.flatten(state)
        self.cfg = self.module.cfg
        self.sharding: ModelSharding = self.module.sharding

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.sharding.mesh

    def model(self, weights) -> CausalLM:
        """The module rebuilt from traced weights (inside a program)."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, weights))

    def cache_shapes(self, rows: int, length: int) -> Cache:
        return cache_shapes(self.cfg, self.sharding, rows, length,
                            self.dtype if self.cache_dtypes is None else self.cache_dtypes)


def bytes_per_device(shapes: Cache) -> int:
    """The largest per-device footprint of a cache given as ShapeDtypeStructs with shardings."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(shapes):
        nbytes = leaf.dtype.itemsize
        for n in leaf.sharding.shard_shape(leaf.shape):
            nbytes *= n
        for d in leaf.sharding.device_set:
            per_device[d] = per_device.get(d, 0) + nbytes
    return max(per_device.values())
