"""Compile-only analysis of one inference step: nothing of the model is ever allocated.

The weights and the cache are `jax.ShapeDtypeStruct`s carrying their shardings; each step is
lowered and compiled ahead of time (`jit(...).lower(...).compile()`) for the devices of the
sharding — abstract CPU devices are enough. From the compiled program come the per-device
memory (`memory_analysis`), FLOPs and bytes accessed (`cost_analysis`, loops corrected by
`hlo_cost`), and the collectives in the dtypes they move (`jaxpar.sharding.collectives`).

What XLA:CPU reports is jaxpar's program *as compiled for the CPU*: pure-JAX reference
kernels (attention materialises its float32 scores; MoE takes the CPU's tiled grouped
matmul, or the dense path below 32 rows per expert) and float32 copies of bfloat16 operands (XLA:CPU has no bf16 matmul). Its
temporaries and bytes accessed are therefore upper bounds for a GPU; the roofline also gets
the ideal costs of `jaxpar.experiment.cost_model`.

Steps (the programs `jaxpar.generate` runs, greedy): "prefill" fills an empty cache with
`tokens` per row; "extend" appends `tokens` per row to a cache already holding `context`;
"decode" appends one token per row. All three use a cache of `cache_len` slots, donated.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.experiment.hlo_cost import loop_dot_flops
from jaxpar.models.decoder import cache_shapes
from jaxpar.models.options import RuntimeOptions
from jaxpar.sharding.collectives import CollectiveOp, compiled_collectives
from jaxpar.assembly import abstract_model
from jaxpar.sharding.model_sharding import ModelSharding

INFERENCE_MODES = ("prefill", "extend", "decode")
# What compiles for the CPU anyway, said explicitly: the pure-JAX reference kernels.
REFERENCE = RuntimeOptions(kernel_impl="reference")


@dataclasses.dataclass
class CompiledCosts:
    """What one compiled program reports, per device."""

    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    flops: float  # cost analysis + dot FLOPs of loop iterations it leaves out
    bytes_accessed: float
    loops: int  # while loops with a trip count > 1 (their dot FLOPs are corrected)
    collectives: list[CollectiveOp]
    compile_s: float

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["collectives"] = [dataclasses.asdict(c) for c in self.collectives]
        return d


def local_bytes(tree) -> int:
    """Bytes one device holds of an abstract pytree (the largest shard of each leaf)."""
    total = 0
    for a in jax.tree.leaves(tree):
        shape = a.sharding.shard_shape(a.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
    return total


def _prefill(graphdef, state, tokens, lengths, cache):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, cache = model(tokens, positions, cache, lengths, mode="prefill", last_only=True)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


def _extend(graphdef, state, tokens, cache):
    model = nnx.merge(graphdef, state)
    positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    lengths = jnp.full_like(cache.lengths, tokens.shape[1])
    logits, cache = model(tokens, positions, cache, lengths, mode="extend", last_only=True)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


def _decode(graphdef, state, tokens, cache):
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens[:, None], cache.lengths[:, None], cache, jnp.ones_like(cache.lengths),
                          mode="decode", last_only=True)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


def compile_costs(lowered, num_devices: int) -> CompiledCosts:
    t0 = time.perf_counter()
    compiled, ops = compiled_collectives(lowered, num_devices)
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    extra, loops, unknown = loop_dot_flops(compiled.as_text())
    if unknown:
        raise RuntimeError(f"{unknown} while loop(s) without a known trip count: their FLOPs cannot "
                           "be counted")
    return CompiledCosts(temp_bytes=int(mem.temp_size_in_bytes), argument_bytes=int(mem.argument_size_in_bytes),
                         output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
                         flops=float(cost.get("flops", 0.0)) + extra,
                         bytes_accessed=float(cost.get("bytes accessed", 0.0)), loops=loops,
                         collectives=ops, compile_s=seconds)


def inference_step(cfg: ModelConfig, sharding: ModelSharding, dtype, *, mode: str, batch: int,
                   tokens: int, cache_len: int, state=None, graphdef=None) -> tuple[CompiledCosts, Any]:
    """Compiles one step abstractly; returns (its costs, the abstract cache)."""
    if mode not in INFERENCE_MODES:
        raise ValueError(f"mode must be one of {INFERENCE_MODES}, got {mode!r}")
    if graphdef is None or state is None:
        graphdef, state = abstract_model(cfg, sharding, dtype, REFERENCE)
    cache = cache_shapes(cfg, sharding, batch, cache_len, dtype)
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())

    def arr(shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=replicated)

    if mode == "prefill":
        fn = jax.jit(functools.partial(_prefill, graphdef), donate_argnums=3)
        lowered = fn.lower(state, arr((batch, tokens)), arr((batch,)), cache)
    elif mode == "extend":
        fn = jax.jit(functools.partial(_extend, graphdef), donate_argnums=2)
        lowered = fn.lower(state, arr((batch, tokens)), cache)
    else:
        fn = jax.jit(functools.partial(_decode, graphdef), donate_argnums=2)
        lowered = fn.lower(state, arr((batch,)), cache)
    return compile_costs(lowered, sharding.mesh.size), cache


def train_step(cfg: ModelConfig, sharding: ModelSharding, dtype, *, batch: int, seq: int,
               remat: tuple[str, ...] = (), zero1: bool = False) -> tuple[CompiledCosts, Any, Any]:
    """Compiles one training step (loss, gradients, AdamW update) abstractly; returns (its
    costs, the abstract parameters, the abstract optimizer state)."""
    from jaxpar.training.data import Batch
    from jaxpar.training.optimizer import OptimizerConfig, make_optimizer
    from jaxpar.training.step import model_graph, optimizer_shardings, train_step as step_fn

    graphdef = model_graph(cfg, sharding, dtype, remat=remat, kernel_impl="reference")
    _, params = abstract_model(cfg, sharding, dtype, REFERENCE)
    tx, _ = make_optimizer(OptimizerConfig())
    shardings = optimizer_shardings(tx, params, zero1=zero1)
    opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             jax.eval_shape(tx.init, params), shardings)
    mesh = sharding.mesh
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("dp") if mesh.shape.get("dp", 1) > 1
                                      else jax.sharding.PartitionSpec())
    data = Batch(inputs=jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=rows),
                 targets=jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=rows),
                 weights=jax.ShapeDtypeStruct((batch, seq), jnp.float32, sharding=rows),
                 lengths=jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows))
    fn = jax.jit(functools.partial(step_fn, graphdef, tx), donate_argnums=(0, 1))
    return compile_costs(fn.lower(params, opt_state, data), mesh.size), params, opt_state
