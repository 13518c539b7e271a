"""`jaxpar plan`: what a policy does to a model, computed without loading any weight.

Per block: the plan and the rule that chose it; the rules that change nothing for this
model; per parameter: its PartitionSpec and bytes per device; the KV-cache bytes per
device; and the collectives (count and bytes by kind) of one prefill and one decode step,
read from the compiled HLO of the very programs generation runs
(`jaxpar.generate.model_programs`), in the dtypes they move (`jaxpar.sharding.collectives`).
This module sits above the models (beside `jaxpar.generate`), not with the rest of
`jaxpar.sharding`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.assembly import abstract_model, make_sharding, open_config, resolve_dtype
from jaxpar.config import ModelConfig
from jaxpar.generate import model_programs
from jaxpar.models.decoder import cache_shapes
from jaxpar.models.options import RuntimeOptions
from jaxpar.sharding.collectives import (COLLECTIVES, CollectiveStats, collective_stats,  # noqa: F401
                                         compiled_collectives, summarize)
from jaxpar.sharding.model_sharding import ModelSharding

@dataclasses.dataclass
class ParamReport:
    path: str
    shape: tuple[int, ...]
    spec: str
    bytes_total: int
    bytes_per_device: int


@dataclasses.dataclass
class BlockReport:
    block: str
    kind: str
    layer: int | None
    rule: int | None
    plan: str


@dataclasses.dataclass
class PlanReport:
    policy: str
    mesh: dict[str, int]
    batch: int
    seq: int
    blocks: list[BlockReport]
    params: list[ParamReport]
    param_bytes_per_device: int
    cache_bytes_per_device: int
    prefill_collectives: dict[str, CollectiveStats]
    decode_collectives: dict[str, CollectiveStats]
    # Rules that change nothing for this model (no block matched, or shadowed).
    rule_warnings: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        lines = [f"policy {self.policy} on mesh {self.mesh} (batch {self.batch}, seq {self.seq})", "",
                 f"{'block':40s} {'kind':17s} {'rule':>5s}  plan"]
        for b in self.blocks:
            lines.append(f"{b.block:40s} {b.kind:17s} {('-' if b.rule is None else b.rule):>5}  {b.plan}")
        if self.rule_warnings:
            lines += ["", "rules that change nothing for this model:"]
            lines += [f"  warning: {w}" for w in self.rule_warnings]
        lines += ["", f"{'parameter':52s} {'shape':>18s} {'spec':34s} {'bytes/device':>13s}"]
        for p in self.params:
            lines.append(f"{p.path:52s} {str(p.shape):>18s} {p.spec:34s} {p.bytes_per_device:>13,d}")
        lines += ["", f"parameters per device: {self.param_bytes_per_device:,d} bytes",
                  f"KV cache per device:   {self.cache_bytes_per_device:,d} bytes"]
        for name, stats in (("prefill", self.prefill_collectives), ("decode", self.decode_collectives)):
            summary = ", ".join(f"{k} x{v.count} ({v.bytes:,d} B)" for k, v in sorted(stats.items())) or "none"
            lines.append(f"collectives per {name} step: {summary}")
        return "\n".join(lines)


def _bytes_per_device(aval: jax.ShapeDtypeStruct) -> int:
    shard = aval.sharding.shard_shape(aval.shape)
    return int(np.prod(shard, dtype=np.int64)) * jnp.dtype(aval.dtype).itemsize


def step_collectives(cfg: ModelConfig, sharding: ModelSharding, dtype, batch: int, seq: int,
                     options: RuntimeOptions = RuntimeOptions()):
    """Compiles generation's prefill (`seq` tokens) and decode programs on abstract inputs;
    returns their collectives."""
    graphdef, state = abstract_model(cfg, sharding, dtype, options)
    leaves, treedef = jax.tree.flatten(state)
    prefill, decode = model_programs(graphdef, treedef)
    # Room for the prefill plus one decoded token, kept a multiple of the DCP / SP degree.
    cache = cache_shapes(cfg, sharding, batch, seq + sharding.seq_multiple, dtype)
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())

    def arr(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=replicated)

    n = sharding.mesh.size
    # Counted in the dtypes the program moves (XLA:CPU promotes bf16 collectives to f32).
    _, pre = compiled_collectives(prefill.lower(leaves, arr((batch, seq), jnp.int32), arr((batch,), jnp.int32),
                                                cache), n)
    _, dec = compiled_collectives(decode.lower(leaves, arr((batch,), jnp.int32), cache), n)
    return summarize(pre), summarize(dec)


def plan_report(cfg: ModelConfig, sharding: ModelSharding, *, batch: int = 1, seq: int = 128,
                dtype=jnp.bfloat16, collectives: bool = True) -> PlanReport:
    seq = -(-seq // sharding.seq_multiple) * sharding.seq_multiple
    batch = -(-batch // sharding.batch_multiple) * sharding.batch_multiple
    _, state = abstract_model(cfg, sharding, dtype)
    params = []
    for path, var in nnx.to_flat_state(state):
        aval = var.get_value()
        params.append(ParamReport(path="/".join(map(str, path)), shape=tuple(aval.shape),
                                  spec=str(tuple(aval.sharding.spec)),
                                  bytes_total=int(np.prod(aval.shape, dtype=np.int64)) * jnp.dtype(aval.dtype).itemsize,
                                  bytes_per_device=_bytes_per_device(aval)))
    cache = cache_shapes(cfg, sharding, batch, seq, dtype)
    cache_bytes = sum(_bytes_per_device(a) for a in jax.tree.leaves(cache))
    blocks = [BlockReport(p.block, p.kind, p.layer, p.rule, p.describe()) for p in sharding.plans]
    pre, dec = step_collectives(cfg, sharding, dtype, batch, seq) if collectives else ({}, {})
    return PlanReport(policy=sharding.table_name, mesh=dict(sharding.mesh.shape), batch=batch, seq=seq,
                      blocks=blocks, params=params,
                      param_bytes_per_device=sum(p.bytes_per_device for p in params),
                      cache_bytes_per_device=cache_bytes, prefill_collectives=pre,
                      decode_collectives=dec, rule_warnings=list(sharding.rule_warnings))


def plan(model: str | Path, policy=None, *, batch: int = 1, seq: int = 128, dtype: str = "bfloat16",
         devices: Sequence[jax.Device] | None = None, collectives: bool = True) -> PlanReport:
    """`jaxpar plan` as a function: reads only the model's config, never its weights."""
    cfg = open_config(model)
    sharding = make_sharding(cfg, policy, devices=devices)
    return plan_report(cfg, sharding, batch=batch, seq=seq, dtype=resolve_dtype(dtype, cfg),
                       collectives=collectives)
