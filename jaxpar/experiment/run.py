"""Runs an experiment spec: every (model, policy, workload) compiled abstractly, per mode.

For each combination: the sharding (a table that does not fit the model is reported with
its error, not dropped), the per-device parameter / cache / temporary bytes, and per step
the compiled costs, the ideal costs, the collectives against their analytic minimum, and
the roofline time on the spec's hardware. TTFT is the prefill step's time, TPOT the decode
step's (the last token: the cache holds prompt + output tokens); a pipeline combines its
stages' times (`roofline.PIPELINE_FORMULA`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.config import ModelConfig
from jaxpar.experiment import comm_model, roofline as rl
from jaxpar.experiment.analysis import CompiledCosts, inference_step, local_bytes, train_step
from jaxpar.experiment.cost_model import step_cost, train_activation_bytes
from jaxpar.experiment.models import even_partition, load_model_config, slice_layers
from jaxpar.experiment.spec import ExperimentSpec, PolicySpec, SpecError, WorkloadSpec
from jaxpar.sharding.collectives import ring_wire_bytes, summarize
from jaxpar.assembly import abstract_model
from jaxpar.sharding.model_sharding import ModelSharding
from jaxpar.sharding.resolve import build_sharding
from jaxpar.sharding.rules import RuleTable, load_rule_table

log = logging.getLogger("jaxpar.experiment")
MAX_CPU_DEVICES = 64


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def required_devices(spec: ExperimentSpec) -> int:
    """The most devices one compile of the spec needs (a pipeline compiles one stage)."""
    need = 1
    for p in spec.policies:
        if p.devices is not None:
            need = max(need, p.devices)
        elif not isinstance(p.table, str) or p.table.endswith((".yaml", ".yml", ".json")):
            need = max(need, _table(p, spec.base_dir).devices)
    return need


def ensure_cpu_devices(n: int) -> None:
    """Makes JAX start with `n` CPU devices, or checks that it has them (it can be set only
    before JAX initialises its backends)."""
    if n > MAX_CPU_DEVICES:
        raise SpecError(f"the spec needs {n} devices; compile-only runs use at most {MAX_CPU_DEVICES}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        have = len(jax.devices("cpu"))
        if have < n:
            raise SpecError(f"the spec needs {n} CPU devices but JAX already started with {have}; "
                            "run it in a fresh process (`jaxpar experiment` does)") from None


def _table(policy: PolicySpec, base: Path) -> RuleTable:
    table = policy.table
    if isinstance(table, str) and table.endswith((".yaml", ".yml", ".json")) and not Path(table).is_absolute():
        table = str(base / table)
    loaded = load_rule_table(table, policy.devices or 1)
    if isinstance(policy.table, str) and not loaded.name.startswith("custom"):
        loaded = dataclasses.replace(loaded, name=policy.name)
    if policy.devices is not None and loaded.devices != policy.devices:
        raise SpecError(f"policy {policy.name!r}: its table uses {loaded.devices} devices (tp * dp), "
                        f"but `devices` says {policy.devices}")
    return loaded


def _dtype_name(spec: ExperimentSpec, cfg: ModelConfig) -> str:
    if spec.dtype:
        return spec.dtype
    return cfg.checkpoint_dtype if cfg.checkpoint_dtype in ("bfloat16", "float16", "float32") else "float32"


def _fits(params: float, cache: float, temp: float, capacity: float) -> str:
    if params + cache > capacity:
        return "no"
    return "yes" if params + cache + temp <= capacity else "no (XLA:CPU temp)"


@dataclasses.dataclass
class _Stage:
    cfg: ModelConfig
    sharding: ModelSharding
    graphdef: Any
    state: Any
    first: bool
    last: bool
    param_bytes: int


def _stages(cfg: ModelConfig, table: RuleTable, policy: PolicySpec, devices, dtype) -> list[_Stage]:
    """One stage per pipeline stage (the whole model without a pipeline)."""
    if policy.pipeline is None:
        sharding = build_sharding(table, cfg, devices)
        graphdef, state = abstract_model(cfg, sharding, dtype)
        return [_Stage(cfg, sharding, graphdef, state, True, True, local_bytes(state))]
    pipe = policy.pipeline
    sizes = list(pipe.layer_partition) if pipe.layer_partition else even_partition(cfg.num_layers, pipe.stages)
    if sum(sizes) != cfg.num_layers:
        raise SpecError(f"policy {policy.name!r}: layer_partition {sizes} sums to {sum(sizes)}, "
                        f"the model has {cfg.num_layers} layers")
    stages, start, built = [], 0, {}
    for s, n in enumerate(sizes):
        stage_cfg = slice_layers(cfg, start, start + n)
        start += n
        key = (stage_cfg.layer_types, stage_cfg.mlp_types)
        if key not in built:
            sharding = build_sharding(table, stage_cfg, devices)
            built[key] = (sharding, *abstract_model(stage_cfg, sharding, dtype))
        sharding, graphdef, state = built[key]
        first, last = s == 0, s == len(sizes) - 1
        params = local_bytes(state)
        # a stage holds the embedding only if first, the head only if last (tied: both ends)
        embed = local_bytes(state["embed_tokens"])
        head = local_bytes(state["lm_head"]) if "lm_head" in state else 0
        if not first and not (last and cfg.tie_word_embeddings):
            params -= embed
        if not last:
            params -= head
        stages.append(_Stage(stage_cfg, sharding, graphdef, state, first, last, params))
    return stages


def _collective_rows(costs: CompiledCosts) -> list[tuple[str, float, int]]:
    return [(c.kind, c.result_bytes, c.group) for c in costs.collectives]


def _mode_shape(mode: str, w: WorkloadSpec, prompt: int, chunk: int) -> tuple[int, int]:
    """(new tokens per row, tokens cached before) of a step."""
    if mode == "prefill":
        return prompt, 0
    if mode == "extend":
        return chunk, prompt
    return 1, prompt + w.output - 1


def run_combination(spec: ExperimentSpec, model_name: str, cfg: ModelConfig, policy: PolicySpec,
                    workload: WorkloadSpec, cpu_devices) -> dict[str, Any]:
    """One (model, policy, workload): the row of results.json."""
    row: dict[str, Any] = {"model": model_name, "policy": policy.name, "workload": workload.name}
    try:
        table = _table(policy, spec.base_dir)
    except ValueError as e:
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    n = table.devices
    stages_n = policy.pipeline.stages if policy.pipeline else 1
    total = n * stages_n
    row.update(devices=total, devices_per_stage=n, stages=stages_n)
    dtype_name = _dtype_name(spec, cfg)
    dtype = jnp.dtype(dtype_name)
    itemsize = dtype.itemsize
    hw = spec.hardware
    capacity = spec.memory_fraction * hw.hbm_bytes
    try:
        stages = _stages(cfg, table, policy, cpu_devices[:n], dtype)
    except ValueError as e:  # RuleTableError: the table does not fit this model
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    sharding = stages[0].sharding
    batch = _round_up(workload.rows(total), sharding.batch_multiple)
    seq_multiple = sharding.seq_multiple
    prompt = _round_up(workload.prompt, seq_multiple)
    chunk = _round_up(spec.extend_chunk, seq_multiple)
    cache_len = _round_up(prompt + max(workload.output, chunk), seq_multiple)
    row.update(mesh=dict(sharding.mesh.shape), dtype=dtype_name, batch=batch, prompt=prompt,
               output=workload.output, extend_chunk=chunk, cache_len=cache_len,
               plans=sorted({p.describe() + f" [{p.kind}]" for p in sharding.plans}))
    if batch != workload.rows(total) or prompt != workload.prompt:
        row["note"] = (f"padded to batch {batch} / prompt {prompt} (multiples of the batch / sequence "
                       "splits)")
    modes = [m for m in spec.modes if m != "train"]
    compiled: dict[tuple, tuple[CompiledCosts, Any]] = {}  # stages of one layer pattern compile once
    infos, seen = [], {}
    for stage in stages:
        key = (id(stage.graphdef), stage.first, stage.last)
        if key not in seen:
            seen[key] = _analyse_stage(spec, stage, modes, compiled, workload, batch=batch, prompt=prompt,
                                       chunk=chunk, cache_len=cache_len, dtype=dtype, devices=n,
                                       label=f"{model_name} / {policy.name} / {workload.name}")
        infos.append(seen[key])
    row["stage_layers"] = [s.cfg.num_layers for s in stages]
    row.update(_summarise(row, stages, infos, modes, hw, capacity, itemsize, cfg, batch, prompt, chunk,
                          policy))
    row["stage_details"] = list(seen.values())  # one per distinct stage
    keys = list(seen)
    row["stage_of"] = [keys.index((id(s.graphdef), s.first, s.last)) for s in stages]  # per stage
    if "train" in spec.modes:
        if policy.pipeline is not None:
            row["train"] = {"error": "training through a pipeline is not modelled"}
        else:
            row["train"] = _train_analysis(spec, cfg, stages[0].sharding, dtype, capacity, total)
    return row


def _train_analysis(spec: ExperimentSpec, cfg: ModelConfig, sharding: ModelSharding, dtype, capacity: float,
                    devices: int) -> dict[str, Any]:
    """Memory (parameters, optimizer state, temporaries incl. activations) and roofline step
    time of one AdamW training step."""
    t = spec.train
    batch = _round_up(t.batch, sharding.batch_multiple)
    seq = _round_up(t.seq, sharding.seq_multiple)
    remat = tuple(k for k, on in t.remat if on)
    t0 = time.perf_counter()
    costs, params, opt_state = train_step(cfg, sharding, dtype, batch=batch, seq=seq, remat=remat,
                                          zero1=t.optimizer_sharding == "zero1")
    log.info("train step compiled in %.1f s", time.perf_counter() - t0)
    param_bytes, opt_bytes = local_bytes(params), local_bytes(opt_state)
    remat_blocks = sum(k in remat for k in cfg.layer_types) + sum(k in remat for k in cfg.mlp_types)
    ideal = step_cost(cfg, sharding, params, None, batch=batch, tokens=seq, context=0, mode="train",
                      itemsize=dtype.itemsize, remat_blocks=remat_blocks, optimizer_bytes=opt_bytes)
    collectives = _collective_rows(costs)
    hw = spec.hardware
    ideal_rl = rl.roofline(ideal.flops, ideal.bytes, collectives, hw, dtype.name)
    compiled_rl = rl.roofline(costs.flops, costs.bytes_accessed, collectives, hw, dtype.name)
    # ideal: parameters, gradients (one more copy of the parameters), optimizer state and the
    # activations kept for the backward pass; XLA:CPU's temporaries are reported beside
    activations = train_activation_bytes(cfg, sharding, batch=batch, seq=seq, itemsize=dtype.itemsize, remat=remat)
    ideal_peak = 2 * param_bytes + opt_bytes + activations
    fits = "no" if ideal_peak > capacity else (
        "yes" if param_bytes + opt_bytes + costs.temp_bytes <= capacity else "no (XLA:CPU temp)")
    return {"batch": batch, "seq": seq, "remat": list(remat), "optimizer_sharding": t.optimizer_sharding,
            "memory": {"param_bytes": param_bytes, "optimizer_bytes": opt_bytes, "temp_bytes": costs.temp_bytes,
                       "activation_bytes": activations, "ideal_peak_bytes": ideal_peak,
                       "peak_bytes": param_bytes + opt_bytes + costs.temp_bytes, "fits": fits},
            "compiled": costs.to_json(), "ideal": {"flops": ideal.flops, "bytes": ideal.bytes, **ideal.terms},
            "collectives": {k: dataclasses.asdict(v) for k, v in summarize(costs.collectives).items()},
            "roofline": ideal_rl.to_json(), "roofline_compiled": compiled_rl.to_json(),
            "tokens_per_s_per_device": batch * seq / ideal_rl.time_s / devices}


def _analyse_stage(spec, stage: _Stage, modes, compiled, workload, *, batch, prompt, chunk, cache_len,
                   dtype, devices, label) -> dict[str, Any]:
    hw, dtype_name, itemsize = spec.hardware, dtype.name, dtype.itemsize
    info: dict[str, Any] = {"layers": stage.cfg.num_layers, "first": stage.first, "last": stage.last,
                            "param_bytes": stage.param_bytes, "modes": {}}
    replicas = stage.sharding.mesh.shape.get("dp", 1)
    for mode in modes:
        tokens, context = _mode_shape(mode, workload, prompt, chunk)
        key = (id(stage.graphdef), mode)
        if key not in compiled:
            t0 = time.perf_counter()
            compiled[key] = inference_step(stage.cfg, stage.sharding, dtype, mode=mode, batch=batch,
                                           tokens=tokens, cache_len=cache_len, state=stage.state,
                                           graphdef=stage.graphdef)
            log.info("%s / %s: compiled in %.1f s", label, mode, time.perf_counter() - t0)
        costs, cache = compiled[key]
        ideal = step_cost(stage.cfg, stage.sharding, stage.state, cache, batch=batch, tokens=tokens,
                          context=context, mode=mode, itemsize=itemsize, embed=stage.first, head=stage.last)
        info["cache_bytes"] = local_bytes(cache)
        collectives = _collective_rows(costs)
        terms = comm_model.analytic_collectives(
            stage.cfg, stage.sharding.plans, devices=devices // replicas, batch=batch, seq=tokens,
            decode=mode == "decode", itemsize=itemsize, replicas=replicas)
        info["modes"][mode] = {
            "tokens": tokens, "context": context,
            "compiled": costs.to_json(),
            "ideal": {"flops": ideal.flops, "bytes": ideal.bytes, **ideal.terms},
            "collectives": {k: dataclasses.asdict(v) for k, v in summarize(costs.collectives).items()},
            "collective_bytes": sum(c.result_bytes for c in costs.collectives),
            "collective_wire_bytes": sum(ring_wire_bytes(*c) for c in collectives),
            "analytic_min_bytes": sum(t.result_bytes for t in terms),
            "analytic_min_wire_bytes": sum(ring_wire_bytes(t.kind, t.result_bytes, t.group) for t in terms),
            "roofline": rl.roofline(ideal.flops, ideal.bytes, collectives, hw, dtype_name).to_json(),
            "roofline_compiled": rl.roofline(costs.flops, costs.bytes_accessed, collectives, hw,
                                             dtype_name).to_json(),
        }
    return info


def _summarise(row, stages, infos, modes, hw, capacity, itemsize, cfg, batch, prompt, chunk, policy):
    """Memory verdict and TTFT / TPOT of the whole (possibly pipelined) policy."""
    out: dict[str, Any] = {}
    worst = max(range(len(stages)), key=lambda i: infos[i]["param_bytes"] + infos[i].get("cache_bytes", 0))
    info = infos[worst]
    temps = {m: info["modes"][m]["compiled"]["temp_bytes"] for m in modes}
    params, cache = info["param_bytes"], info.get("cache_bytes", 0)
    temp = max(temps.values(), default=0)
    out["memory"] = {"param_bytes": params, "cache_bytes": cache, "temp_bytes": temps,
                     "peak_bytes": params + cache + temp, "capacity_bytes": capacity,
                     "fits": _fits(params, cache, temp, capacity)}
    pipelined = len(stages) > 1
    for kind in ("roofline", "roofline_compiled"):
        times = {m: [i["modes"][m][kind]["time_s"] for i in infos] for m in modes}
        result = {}
        if "prefill" in times:
            if pipelined:
                n_chunks = rl.chunks_for(prompt, policy.pipeline.chunk)
                rows_per_chunk = batch * -(-prompt // n_chunks)
                send = rl.p2p_time(rows_per_chunk * cfg.hidden_size * itemsize, hw)
                result["ttft_s"] = rl.pipeline_prefill(times["prefill"], n_chunks, send)
            else:
                result["ttft_s"] = times["prefill"][0]
        for mode, key in (("decode", "tpot_s"), ("extend", "extend_s")):
            if mode in times:
                send = rl.p2p_time(batch * (1 if mode == "decode" else chunk) * cfg.hidden_size * itemsize, hw)
                result[key] = rl.pipeline_decode(times[mode], send) if pipelined else times[mode][0]
        if "tpot_s" in result:
            result["tokens_per_s_per_device"] = batch / result["tpot_s"] / row["devices"]
        out[kind.replace("roofline", "predicted")] = result
    if pipelined:
        out["pipeline_formula"] = rl.PIPELINE_FORMULA
    return out


def run_experiment(spec: ExperimentSpec, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Runs every combination; returns the results (see `report.write_report`)."""
    need = required_devices(spec)
    cpu = jax.devices("cpu")
    if len(cpu) < need:
        raise SpecError(f"the spec needs {need} CPU devices, JAX has {len(cpu)} "
                        "(`ensure_cpu_devices` before JAX starts, as `jaxpar experiment` does)")
    rows = []
    t_start = time.perf_counter()
    for m in spec.models:
        cfg = load_model_config(m.ref, dict(m.overrides), spec.base_dir)
        spec.hardware.flops(_dtype_name(spec, cfg))  # the roofline needs the dtype's peak: check first
        for policy in spec.policies:
            for workload in spec.workloads:
                t0 = time.perf_counter()
                row = run_combination(spec, m.name, cfg, policy, workload, cpu)
                row["elapsed_s"] = time.perf_counter() - t0
                rows.append(row)
                if progress:
                    progress(f"[{time.perf_counter() - t_start:7.1f}s] {m.name} / {policy.name} / "
                             f"{workload.name}: {row.get('error', 'ok')} ({row['elapsed_s']:.1f}s)")
    return {"spec": spec.name, "hardware": spec.hardware.to_json(), "modes": list(spec.modes),
            "memory_fraction": spec.memory_fraction, "formula": rl.FORMULA, "rows": rows,
            "elapsed_s": time.perf_counter() - t_start, "jax": jax.__version__,
            "numpy": np.__version__}
