"""Registers, spills and shared memory of every Pallas Triton kernel at production shapes,
compiled offline for sm_90 (H100/H200) with the ``triton`` package -- no GPU needed.

Each case calls a kernel wrapper exactly as the model does (default tiles) on the shapes
of a real model: Qwen3-Next / Qwen3.5 per tensor-parallel rank (head_dim 256 attention
with 8 query heads per kv head; GDN Dk = Dv = 128, Hk = 16, Hv = 32), Llama / Qwen3
(head_dim 128) and SmolLM2 (head_dim 64, 3 query heads per kv head). Every kernel's TTIR
is compiled to a cubin; the table shows ptxas's registers and spills, Triton's shared
memory (limit 227 KB per CTA) and resident CTAs per SM, beside the numbers before this
branch's kernel rework (``scripts/kernel_resources_before.json``, from commit 02ad991).

Usage:
  python scripts/kernel_resources.py                     # all cases -> results/kernel_resources.json
  python scripts/kernel_resources.py --only bfloat16     # cases whose label contains a string
  python scripts/kernel_resources.py --lower-only        # lowering only (no triton needed)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from jaxpar.kernels_pallas import attention_pallas as attn  # noqa: E402
from jaxpar.kernels_pallas import gated_delta_rule_pallas as gdn  # noqa: E402
from jaxpar.kernels_pallas import triton_offline  # noqa: E402

BASELINE = Path(__file__).resolve().parent / "kernel_resources_before.json"


class Case(NamedTuple):
    label: str
    fn: Callable
    avals: tuple


def _s(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _i32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def cases() -> list[Case]:
    """Production shapes, one case per kernel configuration the models call."""
    out = []
    T, S = 4096, 32768  # prompt / chunk tokens, cache slots per rank
    for d, h, kvh, dt in [(64, 9, 3, jnp.bfloat16), (128, 32, 8, jnp.bfloat16),
                          (256, 16, 2, jnp.bfloat16), (96, 32, 8, jnp.bfloat16),
                          (128, 32, 8, jnp.float32)]:  # fmt: skip
        name = jnp.dtype(dt).name

        def prefill(q, k, v, n, d=d):
            return attn.prefill_attention_pallas(q, k, v, n, scale=d**-0.5)

        out.append(Case(f"attention_prefill D{d} {name}", prefill,
                        (_s(1, T, h, d, dtype=dt), _s(1, T, kvh, d, dtype=dt),
                         _s(1, T, kvh, d, dtype=dt), _i32(1))))  # fmt: skip
    for d, h, kvh, dt in [(64, 9, 3, jnp.bfloat16), (128, 32, 8, jnp.bfloat16),
                          (256, 16, 2, jnp.bfloat16), (128, 32, 8, jnp.float32),
                          (256, 16, 2, jnp.float32)]:  # fmt: skip
        name = jnp.dtype(dt).name
        g = h // kvh

        def decode(q, k, v, n, d=d):
            return attn.decode_attention_pallas(q, k, v, n, scale=d**-0.5)

        out.append(Case(f"attention_decode D{d} G{g} {name}", decode,
                        (_s(1, h, d, dtype=dt), _s(1, S, kvh, d, dtype=dt),
                         _s(1, S, kvh, d, dtype=dt), _i32(1))))  # fmt: skip
    for d, h, kvh in [(128, 32, 8), (256, 16, 2)]:

        def extend(q, k, v, pos, n, rank, d=d):
            return attn.extend_attention_pallas(q, k, v, pos, n, scale=d**-0.5, dcp_rank=rank,
                                                dcp_size=2)  # fmt: skip

        out.append(Case(f"attention_extend D{d} DCP2 bfloat16", extend,
                        (_s(1, 512, h, d), _s(1, S, kvh, d), _s(1, S, kvh, d), _i32(1, 512),
                         _i32(1), _i32())))  # fmt: skip
    # An fp8 KV cache (float8_e4m3fn values, bf16 per-slot scales [B, S, KVH]), bf16 queries.
    fp8, d, h, kvh = jnp.float8_e4m3fn, 128, 32, 8

    def decode_fp8(q, k, v, n, ks, vs, d=d):
        return attn.decode_attention_pallas(q, k, v, n, scale=d**-0.5, k_scale=ks, v_scale=vs)

    def extend_fp8(q, k, v, pos, n, rank, ks, vs, d=d):
        return attn.extend_attention_pallas(q, k, v, pos, n, scale=d**-0.5, dcp_rank=rank, dcp_size=2,
                                            k_scale=ks, v_scale=vs)  # fmt: skip

    out.append(Case(f"attention_decode D{d} G{h // kvh} fp8", decode_fp8,
                    (_s(1, h, d), _s(1, S, kvh, d, dtype=fp8), _s(1, S, kvh, d, dtype=fp8), _i32(1),
                     _s(1, S, kvh), _s(1, S, kvh))))  # fmt: skip
    out.append(Case(f"attention_extend D{d} DCP2 fp8", extend_fp8,
                    (_s(1, 512, h, d), _s(1, S, kvh, d, dtype=fp8), _s(1, S, kvh, d, dtype=fp8),
                     _i32(1, 512), _i32(1), _i32(), _s(1, S, kvh), _s(1, S, kvh))))  # fmt: skip
    for d, dt in [(128, jnp.bfloat16), (256, jnp.bfloat16), (128, jnp.float32),
                  (256, jnp.float32)]:  # fmt: skip
        name = jnp.dtype(dt).name

        def chunked(q, k, v, g, b, s0, n):
            return gdn.chunk_gated_delta_rule_pallas(q, k, v, g, b, initial_state=s0, lengths=n)

        hk, hv = 16, 32
        out.append(Case(f"gdn_chunked Dk=Dv={d} {name}", chunked,
                        (_s(1, T, hk, d, dtype=dt), _s(1, T, hk, d, dtype=dt),
                         _s(1, T, hv, d, dtype=dt), _s(1, T, hv, dtype=jnp.float32),
                         _s(1, T, hv, dtype=jnp.float32), _s(1, hv, d, d, dtype=jnp.float32),
                         _i32(1))))  # fmt: skip
    for d, dt in [(128, jnp.bfloat16), (128, jnp.float32), (256, jnp.bfloat16)]:
        name = jnp.dtype(dt).name
        b, hk, hv = 32, 16, 32
        out.append(Case(f"gdn_decode D{d} {name}", gdn.gated_delta_rule_step_pallas,
                        (_s(b, hk, d, dtype=dt), _s(b, hk, d, dtype=dt), _s(b, hv, d, dtype=dt),
                         _s(b, hv, dtype=jnp.float32), _s(b, hv, dtype=jnp.float32),
                         _s(b, hv, d, d, dtype=jnp.float32))))  # fmt: skip
    return out


def measure(case: Case, lower_only: bool = False) -> list[dict]:
    """Lowers one case and compiles each of its kernels; one row per kernel."""
    rows = []
    for kernel in triton_offline.lower_for_cuda(case.fn, *case.avals):
        row = dict(config=case.label, name=kernel.name, num_warps=kernel.num_warps,
                   num_stages=kernel.num_stages, grid=list(kernel.grid), error=None)  # fmt: skip
        if not lower_only:
            t0 = time.perf_counter()
            try:
                row.update(triton_offline.compile_kernel(kernel).as_dict())
                row["fits_shared_memory"] = row["shared_bytes"] <= triton_offline.SHARED_MEMORY_LIMIT
            except Exception as err:  # a kernel that does not compile is a result here
                row["error"] = f"{type(err).__name__}: {str(err)[:500]}"
            row["compile_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    return rows


def _baseline() -> dict:
    if not BASELINE.exists():
        return {}
    rows = json.loads(BASELINE.read_text())["kernels"]
    return {(r["config"], r["name"]): r for r in rows}


def _fmt(row: dict | None) -> str:
    if not row:
        return f"{'':>27s}"
    if row.get("error"):
        return f"{'compile error':>27s}"
    if "registers" not in row:
        return f"{'lowered':>27s}"
    return (f"{row['registers']:4d} {row['spill_store_bytes']:6d} {row['shared_bytes'] // 1024:5d}K "
            f"{row['num_warps']:2d}w {row.get('ctas_per_sm', 0):2d}/SM")  # fmt: skip


def print_table(rows: list[dict], baseline: dict) -> None:
    print(f"{'config':36s} {'kernel':26s} {'before: regs spill smem warps':>27s}   "
          f"{'after: regs spill smem warps':>27s}  programs")  # fmt: skip
    for r in rows:
        before = baseline.get((r["config"], r["name"]))
        programs = r["grid"][0] * r["grid"][1] * r["grid"][2]
        print(f"{r['config']:36s} {r['name']:26s} {_fmt(before)}   {_fmt(r)}  "
              f"{programs}{'  ' + r['error'][:60] if r.get('error') else ''}")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("results/kernel_resources.json"))
    parser.add_argument("--only", default=None, help="cases whose label contains this string")
    parser.add_argument("--lower-only", action="store_true", help="lower, do not compile")
    args = parser.parse_args(argv)
    reason = triton_offline.triton_unavailable_reason()
    if reason and not args.lower_only:
        print(f"cannot compile: {reason}; use --lower-only or pip install triton")
        return 2
    rows = []
    for case in cases():
        if args.only and args.only not in case.label:
            continue
        rows.extend(measure(case, args.lower_only))
        print(f"  {case.label}: done", file=sys.stderr, flush=True)
    baseline = _baseline()
    print_table(rows, baseline)
    from run_info import write_json

    path = write_json(args.out, {"target": "cuda sm_90 (GPUTarget('cuda', 90, 32))",
                                 "shared_memory_limit": triton_offline.SHARED_MEMORY_LIMIT,
                                 "kernels": rows, "before": list(baseline.values())})  # fmt: skip
    print(f"wrote {path}")
    failed = [r for r in rows if r.get("error") or r.get("fits_shared_memory") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
