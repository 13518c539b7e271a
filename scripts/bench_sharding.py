#!/usr/bin/env python
"""Benchmark jaxpar's sharding policies on 8 (fake) CPU devices.

For every policy (written as a rule-table dict, like tests/test_sharding_policies.py):

* per-device parameter and KV-cache bytes from `jaxpar.sharding.inspect.plan_report`,
  with the parameter bytes cross-checked against the loaded model's addressable shards;
* the collectives of one decode step and one prefill step, by kind, from `plan_report`
  (which compiles both programs and reads their HLO), beside an analytic minimum derived
  from the policy's resolved per-block plans (`analytic_collectives`), with the
  measured / analytic ratio and a note read from the HLO when the ratio exceeds 1.5;
* decode tokens/s of `model.generate(prompts, N, ignore_eos=True)` at batch 8 and batch 1
  (one warm-up call first, so compilation is excluded; median of 3).

Bytes convention. The primary comparison is in RESULT-BUFFER bytes: for each collective
op, the bytes of its result on one device (an all-reduce of [B, E] f32 counts B*E*4, a
reduce-scatter counts its 1/n-sized output, an all-gather its full output). This is what
`plan_report` counts, and the analytic minimum is written in the same unit. As a second,
independent view both sides are also converted to ON-THE-WIRE bytes sent per device under
a ring model (`wire_bytes`): all-reduce 2(n-1)/n * size, all-gather (n-1)/n * result,
reduce-scatter (n-1) * result, all-to-all (n-1)/n * size, collective-permute = size, with
n the op's group size (read from `replica_groups` in the HLO for the measured side).

Usage (from the repository root):
    python scripts/bench_sharding.py                       # random Llama-like model
    python scripts/bench_sharding.py --model ../shared/models/stories260K
    python scripts/bench_sharding.py --policies tp8,sp4 --no-throughput
"""

from __future__ import annotations

import os
import sys


if __name__ == "__main__":
    from cpu_devices import force_cpu_devices_from_argv

    force_cpu_devices_from_argv(8)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The HLO reading (collectives counted in the dtypes the program moves, group sizes) and the
# ring model of wire bytes live in the library.
from jaxpar.sharding.collectives import CollectiveOp as Op  # noqa: E402,F401
from jaxpar.sharding.collectives import collective_ops, group_size  # noqa: E402,F401
from jaxpar.sharding.collectives import ring_wire_bytes as wire_bytes  # noqa: E402

# --------------------------------------------------------------------------- policies

ATTN = {"kind": "attention"}
MLP = {"kind": "mlp"}

# None = the one-device baseline (plain TP over a single device).
POLICIES: dict[str, dict[str, Any] | None] = {
    "tp1": None,
    "tp2": {"axes": {"tp": 2}},
    "tp4": {"axes": {"tp": 4}},
    "tp8": {"axes": {"tp": 8}},
    "tpa4-dcp2": {"axes": {"tp": 8, "attn_tp": 4, "dcp": 2},
                  "rules": [{"match": ATTN, "plan": {"tp_size": "attn_tp", "dcp_size": "dcp"}}]},
    "tpa2-dcp4": {"axes": {"tp": 8, "attn_tp": 2, "dcp": 4},
                  "rules": [{"match": ATTN, "plan": {"tp_size": "attn_tp", "dcp_size": "dcp"}}]},
    "dp-attention": {"axes": {"tp": 8},
                     "rules": [{"match": ATTN, "plan": {"dp_size": 4, "tp_size": 2}}]},
    "sp4": {"axes": {"tp": 4},
            "rules": [{"match": ATTN, "plan": {"tp_size": "tp", "sp": True}},
                      {"match": MLP, "plan": {"tp_size": "tp", "sp": True}}]},
    "mixed": {"axes": {"tp": 8, "attn_tp": 4, "dcp": 2},
              "rules": [{"match": {"kind": "attention", "layers": [0]},
                         "plan": {"tp_size": "attn_tp", "dcp_size": "dcp"}},
                        {"match": {"prefix_pattern": "model.layers.1.self_attn"},
                         "plan": {"dp_size": 2, "tp_size": 4}},
                        {"match": {"kind": "mlp", "layers": "1-2"}, "plan": {"tp_size": 8, "sp": True}},
                        {"match": MLP, "plan": {"tp_size": 4}},
                        {"match": {"kind": "embed"}, "plan": {"tp_size": 1}}]},
}
DEFAULT_POLICIES = tuple(POLICIES)
# Variants for models whose ffn does not split 8 ways (e.g. stories260K, ffn 172): the
# MLP on 4 devices. Not run unless named in --policies.
POLICIES.update({
    "tpa4-dcp2-mlp4": {"axes": {"tp": 8, "attn_tp": 4, "dcp": 2},
                       "rules": [{"match": ATTN, "plan": {"tp_size": "attn_tp", "dcp_size": "dcp"}},
                                 {"match": MLP, "plan": {"tp_size": 4}}]},
    "dp-attention-mlp4sp": {"axes": {"tp": 8},
                            "rules": [{"match": ATTN, "plan": {"dp_size": 2, "tp_size": 4}},
                                      {"match": MLP, "plan": {"tp_size": 4, "sp": True}}]},
})

# --------------------------------------------------------------------------- analytic model

# The analytic minimum of each policy's collectives lives in the library (shared with
# `jaxpar experiment`): jaxpar/experiment/comm_model.py.
from jaxpar.experiment.comm_model import (F32, Term, analytic_collectives,  # noqa: E402,F401
                                          analytic_kv_bytes, summarize)


# --------------------------------------------------------------------------- HLO reading

_OP_NAME = re.compile(r'op_name="([^"]*)"')
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?(%[\w.\-]+)\s*=")
_RESULT_SHAPE = re.compile(r"=\s*([a-z]+\d*)\[([\d,]*)\]")


def _elements(line: str) -> int | None:
    """Element count of an instruction's (non-tuple) result, None if it cannot be read."""
    m = _RESULT_SHAPE.search(line)
    if not m:
        return None
    return math.prod(int(x) for x in m.group(2).split(",") if x)


def all_reduces_then_sliced(hlo: str) -> list[str]:
    """All-reduces of which every user reads only a part (each user's result is smaller,
    e.g. a dynamic-slice to the sequence shard, or the last token of each row): work a
    reduce-scatter (1/n of the result bytes) would have done."""
    lines = hlo.splitlines()
    defs = {}
    for line in lines:
        m = _INSTR.match(line)
        if m and (" all-reduce(" in line or " all-reduce-start(" in line):
            defs[m.group(1)] = line
    out = []
    for name, line in defs.items():
        size = _elements(line)
        pat = re.compile(re.escape(name) + r"[,)\s]")
        users = [ln for ln in lines if pat.search(ln) and ln is not line]
        sizes = [_elements(u) for u in users]
        if size and users and all(u is not None and u < size for u in sizes):
            out.append(name)
    return out


def repeated_gathers(hlo: str) -> str:
    """All-gathers of one and the same operand, issued again and again (a value XLA chose
    to keep sharded and then re-gathers at every use)."""
    from collections import Counter

    gathered = Counter()
    where: dict[str, set[str]] = {}
    for line in hlo.splitlines():
        m = re.search(r"\sall-gather(?:-start)?\((%[\w.\-]+)\)", line)
        if m:
            gathered[m.group(1)] += 1
            meta = _OP_NAME.search(line)
            where.setdefault(m.group(1), set()).add(meta.group(1).split("/")[1] if meta and "/" in meta.group(1) else "?")
    parts = []
    for operand, n in gathered.most_common():
        if n < 3:
            break
        hint = " (rotary cos/sin table shared by all layers)" if re.search(r"cos|sin", operand) else ""
        parts.append(f"{n} all-gathers of the same value {operand}{hint} in {len(where[operand])} scopes")
    return "; ".join(parts)


def sp_entries_from_replicated(plans: Sequence[Any]) -> int:
    """Prefill: SP blocks whose input residual is replicated (the block before is not SP).
    The analytic minimum gives them no all-gather (norm the full residual, then
    reduce-scatter); the decoder instead slices the residual to its sequence shard, norms
    it there and all-gathers it back for the column-parallel matmul."""
    n, prev_sp = 0, None
    for p in plans:
        if p.kind in ("attention", "mlp", "moe"):
            if p.sp and prev_sp is False:
                n += 1
            prev_sp = bool(p.sp)
    return n


def explain(kind_excess: dict[str, int], hlo: str, ops: list[Op], *,
            sp_regathers: int = 0, act_bytes: int = 0) -> str:
    """A short note on where the measured collectives exceed the analytic minimum."""
    parts = []
    if sp_regathers and kind_excess.get("all-gather", 0) >= sp_regathers * act_bytes:
        parts.append(f"{sp_regathers} SP block(s) entered with a replicated residual slice it to the "
                     f"sequence shard and all-gather it back (+{sp_regathers} x "
                     f"{act_bytes / 2**10:,.0f} KiB all-gather)")
    sliced = all_reduces_then_sliced(hlo)
    if sliced:
        sliced_bytes = sum(o.result_bytes for o in ops if o.name in sliced)
        parts.append(f"{len(sliced)} all-reduce(s) ({sliced_bytes / 2**10:,.0f} KiB) whose users all read "
                     f"only a slice (sequence shard / last token): all-reduce + dynamic-slice where a "
                     f"reduce-scatter was meant (XLA:CPU does not rewrite it)")
    if "reduce-scatter" not in {o.kind for o in ops} and kind_excess.get("reduce-scatter", 0) < 0:
        parts.append("no reduce-scatter in the HLO")
    repeated = repeated_gathers(hlo)
    if repeated:
        parts.append(repeated)
    extra = ", ".join(f"{k} {v / 2**10:+,.0f} KiB" for k, v in sorted(kind_excess.items()) if v)
    if extra:
        parts.append(f"measured - analytic: {extra}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- model set-up


def make_random_model(path: Path, *, hidden: int = 512, layers: int = 8, heads: int = 16,
                      kv_heads: int = 8, head_dim: int = 32, ffn: int = 1536, vocab: int = 4096,
                      seed: int = 0) -> Path:
    """A random Llama-like checkpoint (float32, safetensors) written with transformers."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return path


def loaded_param_bytes(model) -> tuple[int, int]:
    """(max, min) over devices of the parameter bytes the loaded model holds."""
    import jax
    from flax import nnx

    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(nnx.state(model.module)):
        if not hasattr(leaf, "addressable_shards"):
            continue
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values()), min(per_device.values())


def decode_throughput(model, batch: int, *, prompt_len: int, new_tokens: int, repeats: int,
                      vocab: int, seed: int = 0) -> dict[str, Any]:
    """Median decode tokens/s (and prefill ms) of `repeats` generate calls after a warm-up."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, size=prompt_len).tolist() for _ in range(batch)]
    model.generate(prompts, new_tokens, ignore_eos=True)  # compiles prefill + decode
    tps, pre = [], []
    load = os.getloadavg()[0]
    for _ in range(repeats):
        r = model.generate(prompts, new_tokens, ignore_eos=True)
        assert all(len(t) == new_tokens for t in r.token_ids), [len(t) for t in r.token_ids]
        tps.append(r.decode_tokens_per_s)
        pre.append(r.prefill_ms)
    return {"batch": batch, "decode_tokens_per_s": statistics.median(tps),
            "decode_tokens_per_s_all": tps, "prefill_ms": statistics.median(pre),
            "spread": (max(tps) - min(tps)) / statistics.median(tps),
            "load_avg_1min": max(load, os.getloadavg()[0])}


# --------------------------------------------------------------------------- one policy


class _HloCapture:
    """Keeps the programs `plan_report` compiles (it passes each through
    `compiled_collectives`): their compiled HLO text and their collectives, so the notes read
    the very programs whose collectives were counted."""

    def __init__(self):
        self.texts: list[str] = []
        self.ops: list[list[Op]] = []

    def __enter__(self):
        from jaxpar.sharding import inspect as ins

        self._ins, self._orig = ins, ins.compiled_collectives

        def capture(lowered, num_devices, compiler_options=None):
            compiled, ops = self._orig(lowered, num_devices, compiler_options)
            self.texts.append(compiled.as_text())
            self.ops.append(ops)
            return compiled, ops

        ins.compiled_collectives = capture
        return self

    def __exit__(self, *exc):
        self._ins.compiled_collectives = self._orig

    def by_step(self) -> dict[str, tuple[str, list[Op]]]:
        """{step: (compiled HLO text, collectives)} in the order step_collectives compiles."""
        if len(self.texts) != 2:
            return {}
        return {"prefill": (self.texts[0], self.ops[0]), "decode": (self.texts[1], self.ops[1])}


def _kind_table(stats: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {k: {"count": int(v.count), "bytes": int(v.bytes)} for k, v in sorted(stats.items())}


def bench_policy(name: str, policy, model_path: Path, args, all_devices) -> dict[str, Any]:
    import numpy as np

    import jaxpar
    from jaxpar.assembly import make_sharding, open_config, resolve_dtype
    from jaxpar.sharding.inspect import plan_report

    row: dict[str, Any] = {"policy": name, "table": policy}
    cfg = open_config(model_path)
    devices = all_devices[:1] if policy is None else all_devices
    t0 = time.perf_counter()
    try:
        sharding = make_sharding(cfg, policy, devices=devices)
    except ValueError as e:  # RuleTableError: the policy does not fit this model
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    dtype = resolve_dtype(args.dtype, cfg)
    itemsize = np.dtype(dtype).itemsize
    with _HloCapture() as cap:
        rep = plan_report(cfg, sharding, batch=args.batch, seq=args.seq, dtype=dtype)
    hlo = cap.by_step()
    row["plan_s"] = time.perf_counter() - t0
    n_dev = sharding.mesh.size
    replicas = sharding.mesh.shape.get("dp", 1)
    row.update(mesh=dict(rep.mesh), devices=n_dev, batch=rep.batch, seq=rep.seq,
               plans=[b.plan for b in rep.blocks],
               param_bytes_per_device=rep.param_bytes_per_device,
               cache_bytes_per_device=rep.cache_bytes_per_device,
               cache_bytes_ideal=analytic_kv_bytes(cfg, sharding.plans, batch=rep.batch, seq=rep.seq,
                                                   itemsize=itemsize, replicas=replicas))
    if args.hlo_dir:
        d = Path(args.hlo_dir)
        d.mkdir(parents=True, exist_ok=True)
        for step, (text, _) in hlo.items():
            (d / f"{name}.{step}.hlo.txt").write_text(text)

    for step, stats in (("decode", rep.decode_collectives), ("prefill", rep.prefill_collectives)):
        measured = _kind_table(stats)
        terms = analytic_collectives(cfg, sharding.plans, devices=n_dev // replicas, batch=rep.batch,
                                     seq=rep.seq, decode=step == "decode", itemsize=itemsize,
                                     replicas=replicas)
        analytic = summarize(terms)
        text, ops = hlo.get(step, ("", []))
        m_total = sum(v["bytes"] for v in measured.values())
        a_total = sum(v["bytes"] for v in analytic.values())
        m_wire = sum(wire_bytes(o.kind, o.result_bytes, o.group) for o in ops)
        a_wire = sum(v["wire_bytes"] for v in analytic.values())
        ratio = m_total / a_total if a_total else (1.0 if m_total == 0 else math.inf)
        wratio = m_wire / a_wire if a_wire else (1.0 if m_wire == 0 else math.inf)
        excess = {k: measured.get(k, {}).get("bytes", 0) - int(analytic.get(k, {}).get("bytes", 0))
                  for k in set(measured) | set(analytic)}
        flagged = ratio > args.flag_ratio
        prefill = step == "prefill"
        note = explain(excess, text, ops,
                       sp_regathers=sp_entries_from_replicated(sharding.plans) if prefill else 0,
                       act_bytes=rep.batch // replicas * rep.seq * cfg.hidden_size * itemsize
                       ) if abs(ratio - 1) > 0.02 else ""
        if ops and sum(o.result_bytes for o in ops) != m_total:
            note = (note + "; " if note else "") + "per-op parse disagrees with plan_report"
        row[step] = {"measured": measured, "measured_bytes": m_total, "analytic": analytic,
                     "analytic_bytes": a_total, "ratio": ratio, "measured_wire_bytes": m_wire,
                     "analytic_wire_bytes": a_wire, "wire_ratio": wratio, "flagged": flagged,
                     "note": note, "analytic_terms": [dataclasses.asdict(t) for t in terms],
                     "ops": [dataclasses.asdict(o) for o in ops]}

    if not args.no_throughput:
        t1 = time.perf_counter()
        model = jaxpar.load(model_path, dtype=args.dtype, policy=policy, devices=devices,
                            tokenizer=False, progress=False)
        row["load_s"] = time.perf_counter() - t1
        hi, lo = loaded_param_bytes(model)
        row["loaded_param_bytes_max"], row["loaded_param_bytes_min"] = hi, lo
        row["param_check"] = "ok" if hi == rep.param_bytes_per_device else "MISMATCH"
        row["throughput"] = {}
        for b in args.throughput_batches:
            row["throughput"][str(b)] = decode_throughput(
                model, b, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                repeats=args.repeats, vocab=cfg.vocab_size)
        del model
        gc.collect()
    row["total_s"] = time.perf_counter() - t0
    return row


# --------------------------------------------------------------------------- printing


def _kib(n: float) -> str:
    return f"{n / 2**10:,.1f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f}"


def _kinds(measured: dict[str, Any]) -> str:
    short = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
             "collective-permute": "CP"}
    return " ".join(f"{short.get(k, k)}x{int(v['count'])}:{_kib(v['bytes'])}" for k, v in sorted(measured.items())) or "-"


def format_tables(rows: list[dict[str, Any]], args) -> str:
    out = []
    w = max([13] + [len(r["policy"]) for r in rows])
    tb = args.throughput_batches
    hdr = (f"{'policy':{w}s} {'mesh':26s} {'params/dev MiB':>14s} {'loaded':>8s} "
           f"{'KV/dev MiB':>10s} {'KV ideal':>8s} " +
           " ".join(f"{'tok/s B=' + str(b):>11s}" for b in tb) + f" {'spread':>6s} {'prefill ms B=' + str(tb[0]):>16s}")
    out += [f"Memory and throughput (KV cache for batch {args.batch} x {args.seq} tokens; "
            f"decode of {args.new_tokens} tokens after a {args.prompt_len}-token prompt, median of {args.repeats})",
            hdr, "-" * len(hdr)]
    for r in rows:
        if "error" in r:
            out.append(f"{r['policy']:{w}s} skipped: {r['error']}")
            continue
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1 or k != "dp") or "1"
        thr = r.get("throughput", {})
        cells = " ".join(f"{thr[str(b)]['decode_tokens_per_s']:11.1f}" if str(b) in thr else f"{'-':>11s}"
                         for b in tb)
        pre = f"{thr[str(tb[0])]['prefill_ms']:16.1f}" if str(tb[0]) in thr else f"{'-':>16s}"
        spread = max((v["spread"] for v in thr.values()), default=None)
        pre = (f"{spread * 100:5.0f}%" if spread is not None else f"{'-':>6s}") + " " + pre
        out.append(f"{r['policy']:{w}s} {mesh:26s} {_mib(r['param_bytes_per_device']):>14s} "
                   f"{r.get('param_check', '-'):>8s} {_mib(r['cache_bytes_per_device']):>10s} "
                   f"{_mib(r['cache_bytes_ideal']):>8s} {cells} {pre}")
    loads = [v["load_avg_1min"] for r in rows for v in r.get("throughput", {}).values()]
    if loads:
        cores = os.cpu_count() or 1
        out.append(f"spread = (max - min) / median of the {args.repeats} runs, worst batch; 1-min load "
                   f"average during the runs {min(loads):.1f}..{max(loads):.1f} on {cores} cores"
                   + (" -- the machine was busy, tokens/s are noisy" if max(loads) > cores else ""))
    out.append("")
    hdr = (f"{'policy':{w}s} {'step':7s} {'measured by kind (count:KiB)':34s} {'meas KiB':>10s} "
           f"{'min KiB':>10s} {'ratio':>6s} {'wire meas':>10s} {'wire min':>10s} {'ratio':>6s} flag  note")
    out += [f"Collectives per step on one device, RESULT-BUFFER bytes (what plan_report counts) vs the "
            f"analytic minimum; 'wire' = bytes sent per device, ring model; batch {args.batch}, "
            f"prefill {args.seq} tokens; flag = measured > {args.flag_ratio}x minimum",
            hdr, "-" * len(hdr)]
    for r in rows:
        if "error" in r:
            continue
        for step in ("decode", "prefill"):
            s = r[step]
            ratio = "-" if s["analytic_bytes"] == 0 and s["measured_bytes"] == 0 else f"{s['ratio']:.2f}"
            wr = "-" if s["analytic_wire_bytes"] == 0 and s["measured_wire_bytes"] == 0 else f"{s['wire_ratio']:.2f}"
            out.append(f"{r['policy'] if step == 'decode' else '':{w}s} {step:7s} {_kinds(s['measured']):34s} "
                       f"{_kib(s['measured_bytes']):>10s} {_kib(s['analytic_bytes']):>10s} {ratio:>6s} "
                       f"{_kib(s['measured_wire_bytes']):>10s} {_kib(s['analytic_wire_bytes']):>10s} {wr:>6s} "
                       f"{'!!' if s['flagged'] else '  ':4s}  {s['note']}")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="HF model folder (default: a random Llama-like checkpoint made in a temp dir)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench_sharding.json")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help=f"comma-separated names among: {', '.join(POLICIES)} (default: {', '.join(DEFAULT_POLICIES)})")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices (set before JAX starts)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=8, help="batch of the plan_report steps / KV cache")
    p.add_argument("--seq", type=int, default=128, help="prefill tokens of the plan_report step / KV length")
    p.add_argument("--throughput-batches", default="8,1", help="batches for the tokens/s runs")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--flag-ratio", type=float, default=1.5)
    p.add_argument("--no-throughput", action="store_true", help="skip loading weights and generate()")
    p.add_argument("--hlo-dir", default=None, help="also write each compiled step's HLO here")
    args = p.parse_args(argv)
    args.policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    unknown = [s for s in args.policies if s not in POLICIES]
    if unknown:
        p.error(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
    args.throughput_batches = [int(b) for b in args.throughput_batches.split(",") if b.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    devices = jax.devices()
    if len(devices) < max((POLICIES[n] or {"axes": {"tp": 1}})["axes"]["tp"] for n in args.policies):
        print(f"warning: only {len(devices)} devices ({devices[0].platform}); larger policies will be skipped",
              file=sys.stderr)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jaxpar-bench-") as tmp:
        if args.model is None:
            model_path = make_random_model(Path(tmp) / "random-llama")
            model_desc = "random Llama-like (hidden 512, 8 layers, 16 heads, 8 KV heads, head_dim 32, ffn 1536, vocab 4096)"
        else:
            model_path = args.model.resolve()
            model_desc = str(model_path)
        from jaxpar.api import open_config

        cfg = open_config(model_path)
        print(f"model: {model_desc}\ndevices: {len(devices)} x {devices[0].platform}, dtype {args.dtype}\n",
              flush=True)
        rows = []
        for name in args.policies:
            t0 = time.perf_counter()
            try:
                row = bench_policy(name, POLICIES[name], model_path, args, devices)
            except Exception as e:  # keep going: one broken policy should not hide the others
                import traceback

                traceback.print_exc()
                row = {"policy": name, "table": POLICIES[name], "error": f"{type(e).__name__}: {e}"}
            rows.append(row)
            status = row.get("error", "ok")
            print(f"[{time.perf_counter() - t_start:6.1f}s] {name}: {status} "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
    table = format_tables(rows, args)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": model_desc, "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                                               if isinstance(v, (int, float, str, bool, list, tuple))},
              "devices": len(devices), "platform": devices[0].platform, "jax": jax.__version__,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "bytes_convention": "result-buffer bytes per device (as plan_report); wire = ring model",
              "policies": rows, "table": table, "elapsed_s": time.perf_counter() - t_start}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_info import write_json

    write_json(args.out, result)
    print(f"\nwrote {args.out} ({time.perf_counter() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
