"""`jaxpar plan`: what a policy does to a model, computed without loading any weight.

Per block: the plan and the rule that chose it; the rules that change nothing for this
model; per parameter: its PartitionSpec and bytes per device; the KV-cache bytes per
device; and the collectives (count and bytes by kind) of one prefill and one decode step,
read from the compiled HLO of the very programs generation runs
(`jaxpar.generate.model_programs`), in the dtypes they move (`jaxpar.sharding.collectives`).
This module sits above the models (beside `jaxpar.generate`), not with the rest of
`jaxpar.sharding`.

For a pipeline (`pp > 1`), also per stage: its devices and layers, its parameter bytes,
the activation bytes it hands to the next stage per prefill and per decode step, and its
own collectives (compiled from the stage programs, `jaxpar.pipeline.stage_programs`).
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
from jaxpar.config import ATTENTION, LINEAR_ATTENTION, MAMBA, ModelConfig
from jaxpar.generate import model_programs
from jaxpar.models.cache import CacheDtypes, KVCache
from jaxpar.models.decoder import cache_shapes
from jaxpar.models.options import RuntimeOptions
from jaxpar.pipeline import DEFAULT_PREFILL_CHUNK, bubble_fraction, stage_programs
from jaxpar.sharding.collectives import (COLLECTIVES, CollectiveStats, collective_stats,  # noqa: F401
                                         compiled_collectives, summarize)
from jaxpar.sharding.model_sharding import ModelSharding, PipelineSharding

@dataclasses.dataclass
class ParamReport:
    path: str
    shape: tuple[int, ...]
    spec: str
    bytes_total: int
    bytes_per_device: int
    stage: int | None = None  # pipeline stage holding it


@dataclasses.dataclass
class BlockReport:
    block: str
    kind: str
    layer: int | None
    rule: int | None
    plan: str
    stage: int | None = None  # pipeline stage holding it


@dataclasses.dataclass
class StageReport:
    """One pipeline stage: where it runs, what it holds and what it sends on."""

    stage: int
    devices: list[int]
    layers: list[int]  # first and last layer (inclusive)
    embed: bool
    head: bool
    param_bytes: int  # the stage's parameters, all its devices together
    param_bytes_per_device: int
    cache_bytes_per_device: int
    # Hidden states sent to the next stage (0 on the last): the whole prompt of one
    # prefill (in chunks), and one decode step. The last stage sends the tokens back.
    activation_bytes_prefill: int
    activation_bytes_decode: int
    prefill_collectives: dict[str, "CollectiveStats"]
    decode_collectives: dict[str, "CollectiveStats"]


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
    # Pipeline parallelism: one report per stage (empty without), and the schedule of a
    # prefill of `seq` tokens in chunks (chunk, chunks, micro_batches, bubble_fraction).
    stages: list[StageReport] = dataclasses.field(default_factory=list)
    schedule: dict[str, Any] = dataclasses.field(default_factory=dict)
    # What the cache stores ({"kv": ..., "state": ...}) and its bytes per device by part:
    # "kv" (keys / values), "kv_scales" (fp8 only), "state" (GDN conv and recurrent states).
    cache_dtypes: dict[str, str] = dataclasses.field(default_factory=dict)
    cache_bytes_by_part: dict[str, int] = dataclasses.field(default_factory=dict)
    # Attention cache bytes per token of one sequence, all layers, unsharded: as cached, and
    # in a full per-head K/V layout (they differ for MLA, which caches a latent).
    kv_bytes_per_token: int = 0
    full_kv_bytes_per_token: int = 0
    kv_layout: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _format_stages(self) -> list[str]:
        sc = self.schedule
        lines = ["", f"pipeline: {len(self.stages)} stages; prefill of {self.seq} tokens in {sc['chunks']} "
                     f"chunk(s) of {sc['chunk']} x {sc['micro_batches']} micro-batch(es): bubble "
                     f"{sc['bubble_fraction']:.0%} of the stage time",
                 f"{'stage':>5s} {'devices':>9s} {'layers':>7s} {'holds':>11s} {'param bytes':>14s} "
                 f"{'bytes/device':>13s} {'-> next, prefill':>17s} {'-> next, decode':>16s}"]
        for st in self.stages:
            ends = "+".join(n for n, on in (("embed", st.embed), ("head", st.head)) if on) or "-"
            devs = f"{st.devices[0]}-{st.devices[-1]}"
            lines.append(f"{st.stage:>5d} {devs:>9s} {f'{st.layers[0]}-{st.layers[1]}':>7s} {ends:>11s} "
                         f"{st.param_bytes:>14,d} {st.param_bytes_per_device:>13,d} "
                         f"{st.activation_bytes_prefill:>17,d} {st.activation_bytes_decode:>16,d}")
        return lines

    def format(self) -> str:
        lines = [f"policy {self.policy} on mesh {self.mesh} (batch {self.batch}, seq {self.seq})", "",
                 f"{'block':40s} {'kind':17s} {'rule':>5s}  plan"]
        for b in self.blocks:
            stage = "" if b.stage is None else f"  (stage {b.stage})"
            lines.append(f"{b.block:40s} {b.kind:17s} {('-' if b.rule is None else b.rule):>5}  {b.plan}{stage}")
        if self.rule_warnings:
            lines += ["", "rules that change nothing for this model:"]
            lines += [f"  warning: {w}" for w in self.rule_warnings]
        if self.stages:
            lines += self._format_stages()
        lines += ["", f"{'parameter':52s} {'shape':>18s} {'spec':34s} {'bytes/device':>13s}"]
        for p in self.params:
            path = p.path if p.stage is None else f"[{p.stage}] {p.path}"
            lines.append(f"{path:52s} {str(p.shape):>18s} {p.spec:34s} {p.bytes_per_device:>13,d}")
        lines += ["", f"parameters per device: {self.param_bytes_per_device:,d} bytes",
                  f"cache per device:      {self.cache_bytes_per_device:,d} bytes ({self._cache_detail()})"]
        if self.kv_bytes_per_token:
            line = f"KV cache per token:    {self.kv_bytes_per_token:,d} bytes ({self.kv_layout})"
            if self.full_kv_bytes_per_token != self.kv_bytes_per_token:
                line += (f"; full per-head K/V would be {self.full_kv_bytes_per_token:,d} bytes "
                         f"({self.full_kv_bytes_per_token / self.kv_bytes_per_token:.1f}x)")
            lines.append(line)
        for name, stats in (("prefill", self.prefill_collectives), ("decode", self.decode_collectives)):
            summary = ", ".join(f"{k} x{v.count} ({v.bytes:,d} B)" for k, v in sorted(stats.items())) or "none"
            lines.append(f"collectives per {name} step: {summary}")
        return "\n".join(lines)


    def _cache_detail(self) -> str:
        """e.g. "KV float8_e4m3fn 327,680 + scales 81,920; GDN states 65,536 (recurrent float32)"."""
        parts, n = [], self.cache_bytes_by_part
        if "kv" in self.cache_dtypes:
            scales = f" + scales {n['kv_scales']:,d}" if n.get("kv_scales") else ""
            parts.append(f"KV {self.cache_dtypes['kv']} {n.get('kv', 0):,d}{scales}")
        if "state" in self.cache_dtypes:
            parts.append(f"GDN states {n.get('state', 0):,d} (recurrent {self.cache_dtypes['state']})")
        return "; ".join(parts)


def kv_bytes_per_token(cfg: ModelConfig, dtype) -> tuple[int, int, str]:
    """(cached bytes, full per-head K/V bytes, description) per token over the attention
    layers. MLA caches the latent and the rope key (plus DeepSeek-V3.2's indexer key) where
    a full layout would keep every head's key (qk_nope + qk_rope dims) and value."""
    size = jnp.dtype(dtype).itemsize
    n = sum(kind == ATTENTION for kind in cfg.layer_types)
    if cfg.attention_flavor == "mla":
        latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim + (cfg.index_head_dim if cfg.has_indexer else 0)
        full = cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim)
        what = f"MLA: {n} layers x (latent {cfg.kv_lora_rank} + rope key {cfg.qk_rope_head_dim}"
        what += f" + indexer key {cfg.index_head_dim})" if cfg.has_indexer else ")"
        return n * latent * size, n * full * size, what
    per = 2 * cfg.num_kv_heads * cfg.head_dim
    return n * per * size, n * per * size, f"{n} layers x 2 x {cfg.num_kv_heads} KV heads x {cfg.head_dim}"


def _bytes_per_device(aval: jax.ShapeDtypeStruct) -> int:
    shard = aval.sharding.shard_shape(aval.shape)
    return int(np.prod(shard, dtype=np.int64)) * jnp.dtype(aval.dtype).itemsize


def step_collectives(cfg: ModelConfig, sharding: ModelSharding, dtype, batch: int, seq: int,
                     options: RuntimeOptions = RuntimeOptions(), cache_dtypes: CacheDtypes | None = None):
    """Compiles generation's prefill (`seq` tokens) and decode programs on abstract inputs
    (the cache in `cache_dtypes`, default all in `dtype`); returns their collectives."""
    graphdef, state = abstract_model(cfg, sharding, dtype, options)
    leaves, treedef = jax.tree.flatten(state)
    prefill, decode = model_programs(graphdef, treedef)
    # Room for the prefill plus one decoded token, kept a multiple of the DCP / SP degree.
    cache = cache_shapes(cfg, sharding, batch, seq + sharding.seq_multiple,
                         dtype if cache_dtypes is None else cache_dtypes)
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())

    def arr(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=replicated)

    n = sharding.mesh.size
    # Counted in the dtypes the program moves (XLA:CPU promotes bf16 collectives to f32).
    _, pre = compiled_collectives(prefill.lower(leaves, arr((batch, seq), jnp.int32), arr((batch,), jnp.int32),
                                                cache), n)
    _, dec = compiled_collectives(decode.lower(leaves, arr((batch,), jnp.int32), cache), n)
    return summarize(pre), summarize(dec)


def _cache_bytes_by_part(cache) -> dict[str, int]:
    parts = {"kv": 0, "kv_scales": 0, "state": 0}
    for layer in cache.layers:
        if isinstance(layer, KVCache):
            parts["kv"] += sum(_bytes_per_device(a) for a in (layer.k, layer.v))
            if layer.scaled:
                parts["kv_scales"] += sum(_bytes_per_device(a) for a in (layer.k_scale, layer.v_scale))
        elif layer is not None:
            parts["state"] += sum(_bytes_per_device(a) for a in jax.tree.leaves(layer))
    return parts


def _param_reports(state, stage: int | None = None) -> list[ParamReport]:
    params = []
    for path, var in nnx.to_flat_state(state):
        aval = var.get_value()
        params.append(ParamReport(path="/".join(map(str, path)), shape=tuple(aval.shape),
                                  spec=str(tuple(aval.sharding.spec)),
                                  bytes_total=int(np.prod(aval.shape, dtype=np.int64)) * jnp.dtype(aval.dtype).itemsize,
                                  bytes_per_device=_bytes_per_device(aval), stage=stage))
    return params


def stage_collectives(cfg: ModelConfig, stage: ModelSharding, dtype, batch: int, seq: int,
                      options: RuntimeOptions = RuntimeOptions()):
    """Compiles one pipeline stage's prefill (`seq` tokens) and decode programs on abstract
    inputs (token ids on the first stage, hidden states on the others); returns their
    collectives."""
    graphdef, state = abstract_model(cfg, stage, dtype, options)
    leaves, treedef = jax.tree.flatten(state)
    programs = stage_programs(graphdef, treedef, stage)
    cache = cache_shapes(cfg, stage, batch, seq + stage.seq_multiple, dtype)
    replicated = jax.sharding.NamedSharding(stage.mesh, jax.sharding.PartitionSpec())
    act = stage.activation_sharding()

    def inputs(t):
        if stage.embed is not None:
            return jax.ShapeDtypeStruct((batch, t), jnp.int32, sharding=replicated)
        return jax.ShapeDtypeStruct((batch, t, cfg.hidden_size), dtype, sharding=act)

    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=replicated)
    n = stage.mesh.size
    # Counted in the dtypes the program moves (XLA:CPU promotes bf16 collectives to f32).
    _, pre = compiled_collectives(programs.prefill.lower(leaves, inputs(seq), lengths, cache), n)
    tok = (jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=replicated) if stage.embed is not None
           else inputs(1))
    _, dec = compiled_collectives(programs.decode.lower(leaves, tok, None, cache), n)
    return summarize(pre), summarize(dec)


def _add(into: dict[str, CollectiveStats], more: dict[str, CollectiveStats]) -> None:
    for k, v in more.items():
        s = into.setdefault(k, CollectiveStats())
        s.count += v.count
        s.bytes += v.bytes


def pipeline_report(cfg: ModelConfig, sharding: PipelineSharding, *, batch: int = 1, seq: int = 128,
                    dtype=jnp.bfloat16, collectives: bool = True,
                    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                    cache_dtypes: CacheDtypes | None = None) -> PlanReport:
    """`plan_report` for a pipeline: blocks and parameters tagged with their stage, one
    `StageReport` per stage, totals per step over all stages (parameters and cache per
    device: the largest stage's)."""
    seq = -(-seq // sharding.seq_multiple) * sharding.seq_multiple
    pp = sharding.num_stages
    mb = -(-(-(-batch // pp)) // sharding.batch_multiple) * sharding.batch_multiple
    micro_batches = -(-batch // mb)
    batch = micro_batches * mb
    chunk = -(-min(prefill_chunk, seq) // sharding.seq_multiple) * sharding.seq_multiple
    chunks = -(-seq // chunk)
    itemsize = jnp.dtype(dtype).itemsize
    params, stages = [], []
    pre_total: dict[str, CollectiveStats] = {}
    dec_total: dict[str, CollectiveStats] = {}
    for s, (stage, layers) in enumerate(zip(sharding.stages, sharding.ranges)):
        _, state = abstract_model(cfg, stage, dtype)
        stage_params = _param_reports(state, s)
        params += stage_params
        cache = cache_shapes(cfg, stage, mb, seq, dtype if cache_dtypes is None else cache_dtypes)
        pre, dec = stage_collectives(cfg, stage, dtype, mb, seq) if collectives else ({}, {})
        # Every micro-batch runs each step: the counts of one step are micro_batches times.
        for stats in (pre, dec):
            for v in stats.values():
                v.count *= micro_batches
                v.bytes *= micro_batches
        _add(pre_total, pre)
        _add(dec_total, dec)
        sends = s < pp - 1
        stages.append(StageReport(
            stage=s, devices=[d.id for d in stage.mesh.devices.flat], layers=[layers.start, layers.stop - 1],
            embed=stage.embed is not None, head=stage.head is not None,
            param_bytes=sum(p.bytes_total for p in stage_params),
            param_bytes_per_device=sum(p.bytes_per_device for p in stage_params),
            cache_bytes_per_device=micro_batches * sum(_bytes_per_device(a) for a in jax.tree.leaves(cache)),
            activation_bytes_prefill=batch * seq * cfg.hidden_size * itemsize if sends else 0,
            activation_bytes_decode=batch * cfg.hidden_size * itemsize if sends else batch * 4,
            prefill_collectives=pre, decode_collectives=dec))
    blocks = []
    for p in sharding.plans:
        stage = sharding.stage_of_layer(p.layer) if p.layer is not None else (0 if p.kind == "embed" else pp - 1)
        blocks.append(BlockReport(p.block, p.kind, p.layer, p.rule, p.describe(), stage))
    units = chunks * micro_batches
    return PlanReport(policy=sharding.table_name, mesh={"pp": pp, **dict(sharding.stages[0].mesh.shape)},
                      batch=batch, seq=seq, blocks=blocks, params=params,
                      param_bytes_per_device=max(st.param_bytes_per_device for st in stages),
                      cache_bytes_per_device=max(st.cache_bytes_per_device for st in stages),
                      prefill_collectives=pre_total, decode_collectives=dec_total,
                      rule_warnings=list(sharding.rule_warnings), stages=stages,
                      schedule={"chunk": chunk, "chunks": chunks, "micro_batches": micro_batches,
                                "bubble_fraction": bubble_fraction(pp, units)})


def plan_report(cfg: ModelConfig, sharding: ModelSharding | PipelineSharding, *, batch: int = 1,
                seq: int = 128, dtype=jnp.bfloat16, collectives: bool = True,
                cache_dtypes: CacheDtypes | None = None) -> PlanReport:
    """The plan of `sharding` for `cfg`; the cache in `cache_dtypes` (default: KV in
    `dtype`, recurrent states in float32)."""
    cache_dtypes = cache_dtypes if cache_dtypes is not None else CacheDtypes.resolve(dtype)
    if isinstance(sharding, PipelineSharding):
        return pipeline_report(cfg, sharding, batch=batch, seq=seq, dtype=dtype, collectives=collectives,
                               cache_dtypes=cache_dtypes)
    seq = -(-seq // sharding.seq_multiple) * sharding.seq_multiple
    batch = -(-batch // sharding.batch_multiple) * sharding.batch_multiple
    _, state = abstract_model(cfg, sharding, dtype)
    params = _param_reports(state)
    cache = cache_shapes(cfg, sharding, batch, seq, cache_dtypes)
    cache_bytes = sum(_bytes_per_device(a) for a in jax.tree.leaves(cache))
    has_attention = ATTENTION in cfg.layer_types
    has_state = any(k in (LINEAR_ATTENTION, MAMBA) for k in cfg.layer_types)
    used = {"kv": str(jnp.dtype(cache_dtypes.kv))} if has_attention else {}
    if has_state:
        used["state"] = str(jnp.dtype(cache_dtypes.state))
    blocks = [BlockReport(p.block, p.kind, p.layer, p.rule, p.describe()) for p in sharding.plans]
    pre, dec = step_collectives(cfg, sharding, dtype, batch, seq, cache_dtypes=cache_dtypes) if collectives else ({}, {})
    kv_tok, full_tok, kv_layout = kv_bytes_per_token(cfg, cache_dtypes.kv)
    return PlanReport(policy=sharding.table_name, mesh=dict(sharding.mesh.shape), batch=batch, seq=seq,
                      blocks=blocks, params=params,
                      param_bytes_per_device=sum(p.bytes_per_device for p in params),
                      cache_bytes_per_device=cache_bytes, prefill_collectives=pre,
                      decode_collectives=dec, rule_warnings=list(sharding.rule_warnings),
                      cache_dtypes=used, cache_bytes_by_part=_cache_bytes_by_part(cache),
                      kv_bytes_per_token=kv_tok, full_kv_bytes_per_token=full_tok, kv_layout=kv_layout)


def plan(model: str | Path, policy=None, *, batch: int = 1, seq: int = 128, dtype: str = "bfloat16",
         devices: Sequence[jax.Device] | None = None, collectives: bool = True,
         kv_cache_dtype: str | None = "auto", state_dtype: str | None = "auto") -> PlanReport:
    """`jaxpar plan` as a function: reads only the model's config, never its weights.
    `kv_cache_dtype`, `state_dtype` as in `jaxpar.load`."""
    cfg = open_config(model)
    jdtype = resolve_dtype(dtype, cfg)
    cache_dtypes = CacheDtypes.resolve(jdtype, kv_cache_dtype, state_dtype)
    sharding = make_sharding(cfg, policy, devices=devices)
    return plan_report(cfg, sharding, batch=batch, seq=seq, dtype=jdtype, collectives=collectives,
                       cache_dtypes=cache_dtypes)
