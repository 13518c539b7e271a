"""Benchmark the gated-delta-rule and attention kernels.

On a GPU backend: times what the model calls -- each operation through
``jaxpar.kernels_pallas.dispatch`` with the model's arguments and the kernels' default
tiles (decode: a prefix of valid slots in a larger cache, splits chosen for the GPU) --
for every implementation that runs there (Mosaic GPU when registered, Triton, the pure-JAX
reference), beside flash-linear-attention's ``chunk_gated_delta_rule`` and
``jax.nn.dot_product_attention(implementation="cudnn")`` when importable. TFLOP/s for the
compute-bound operations (chunked GDN, prefill attention), GB/s of the bytes actually
needed for the memory-bound ones (decode). ``scripts/gpu_check.py`` is the one-shot check
with correctness and the end-to-end numbers. On CPU: says so, runs a small reference-only version, and times the chunked GDN
reference against Hugging Face's ``torch_chunk_gated_delta_rule`` (tokens/s for both).

Usage:
  python scripts/bench_kernels.py                  # -> results/bench_kernels.json
  python scripts/bench_kernels.py --skip-hf --repeats 3        # quick CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_info import match_torch_threads, write_json  # noqa: E402
from jaxpar.kernels_pallas import attention as attn_ref  # noqa: E402
from jaxpar.kernels_pallas import gated_delta_rule as gdn_ref  # noqa: E402


# --------------------------------------------------------------------------- timing


def time_fn(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> dict:
    """Wall-clock seconds of fn() (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"min_s": min(times), "median_s": statistics.median(times), "repeats": repeats}


def jax_timer(fn: Callable, *args) -> Callable[[], object]:
    jitted = jax.jit(fn)
    return lambda: jax.block_until_ready(jitted(*args))


# ----------------------------------------------------------------------------- inputs


def gdn_inputs(b, t, hk, hv, dk, dv, dtype, seed=0):
    """Random GDN inputs: q, k [B,T,Hk,Dk], v [B,T,Hv,Dv], g <= 0, beta in (0, 1)."""
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (b, t, hk, dk), dtype)
    k = jax.random.normal(keys[1], (b, t, hk, dk), dtype)
    v = jax.random.normal(keys[2], (b, t, hv, dv), dtype)
    g = -jax.nn.softplus(jax.random.normal(keys[3], (b, t, hv))) * 0.5
    beta = jax.nn.sigmoid(jax.random.normal(keys[4], (b, t, hv)))
    return q, k, v, g, beta


def gdn_chunk_flops(b, t, hv, dk, dv, chunk=64) -> float:
    """Matmul FLOPs of the chunked algorithm: per chunk and value head, k.k, q.k, T(beta K),
    attn.Vn and T(beta V) (C^2 terms) plus W S, Q S and K^T Vn (C Dk Dv terms)."""
    n_chunks = -(-t // chunk)
    per_chunk = 2 * chunk * chunk * (3 * dk + 2 * dv) + 6 * chunk * dk * dv
    return float(b * hv * n_chunks * per_chunk)


def attn_inputs(b, t, s, h, kvh, d, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, h, d), dtype)
    k = jax.random.normal(keys[1], (b, s, kvh, d), dtype)
    v = jax.random.normal(keys[2], (b, s, kvh, d), dtype)
    return q, k, v


def record(rows: list, name: str, impl: str, timing: dict | None, *, flops=None, bytes_=None,
           tokens=None, note: str = "") -> None:  # fmt: skip
    """Adds one result row with derived TFLOP/s, GB/s and tokens/s."""
    row = {"kernel": name, "impl": impl, "note": note}
    if timing is not None:
        row.update(timing)
        sec = timing["min_s"]
        if flops:
            row["tflops"] = flops / sec / 1e12
        if bytes_:
            row["gbps"] = bytes_ / sec / 1e9
        if tokens:
            row["tokens_per_s"] = tokens / sec
    rows.append(row)


def print_table(rows: list) -> None:
    header = (f"{'kernel':46s} {'impl':22s} {'min ms':>9s} {'TFLOP/s':>8s} {'GB/s':>8s} "
              f"{'tok/s':>10s}  note")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:
        ms = f"{r['min_s'] * 1e3:9.2f}" if "min_s" in r else f"{'-':>9s}"
        tf = f"{r['tflops']:8.2f}" if "tflops" in r else f"{'':8s}"
        gb = f"{r['gbps']:8.1f}" if "gbps" in r else f"{'':8s}"
        tok = f"{r['tokens_per_s']:10.0f}" if "tokens_per_s" in r else f"{'':10s}"
        print(f"{r['kernel']:46s} {r['impl']:22s} {ms} {tf} {gb} {tok}  {r.get('note', '')}")


# -------------------------------------------------------------------------------- GPU


def gpu_configs(args) -> dict:
    """Shapes per kernel: model-sized by default, tiny with --smoke (a quick run that the
    whole script works, e.g. after a JAX upgrade)."""
    if args.smoke:
        return dict(gdn_chunk=[(1, 128, 1, 2, 64)], gdn_decode=[(4, 1, 2, 64)],
                    prefill=[(1, 128, 4, 2, 64)], decode=[(2, 256, 4, 2, 64, 100)])  # fmt: skip
    t, ta = args.gdn_tokens, args.attn_tokens
    return dict(
        gdn_chunk=[(1, t, 16, 32, 128), (4, t, 16, 32, 128)],  # (B, T, Hk, Hv, D): Qwen3-Next
        gdn_decode=[(32, 16, 32, 128), (128, 16, 32, 128)],  # (B, Hk, Hv, D)
        prefill=[(1, ta, 32, 8, 128), (1, ta, 16, 2, 256)],  # (B, T, H, KVH, D)
        # (B, S, H, KVH, D, kv_len): cache capacity S, kv_len tokens held
        decode=[(1, 32768, 16, 2, 256, 1024), (1, 32768, 16, 2, 256, 32768),
                (32, 8192, 32, 8, 128, 4096), (128, 4096, 16, 2, 256, 2048)],
    )


def _impls(op: str) -> list[str]:
    """Every implementation of op that runs here (auto = what the model gets is the first)."""
    from jaxpar.kernels_pallas import dispatch

    return list(dispatch.implementations(op))


def bench_gpu(args, rows: list) -> None:
    from jaxpar.kernels_pallas import dispatch

    dtype = jnp.bfloat16
    rep = args.repeats
    cfg = gpu_configs(args)
    for b, t, hk, hv, d in cfg["gdn_chunk"]:
        name = f"gdn_chunk B{b} T{t} Hk{hk} Hv{hv} D{d}"
        x = gdn_inputs(b, t, hk, hv, d, d, dtype)
        lengths = jnp.full((b,), t, jnp.int32)
        state = jnp.zeros((b, hv, d, d), jnp.float32)
        flops = gdn_chunk_flops(b, t, hv, d, d)
        for impl in _impls("gated_delta_rule_chunked"):
            fn = lambda *a, impl=impl: dispatch.gated_delta_rule_chunked(
                *a, initial_state=state, lengths=lengths, impl=impl)  # fmt: skip
            record(rows, name, impl, time_fn(jax_timer(fn, *x), repeats=rep), flops=flops,
                   tokens=b * t)  # fmt: skip
        bench_fla(rows, name, x, flops, b * t, rep)

    for b, hk, hv, d in cfg["gdn_decode"]:
        name = f"gdn_decode B{b} Hk{hk} Hv{hv} D{d}"
        q, k, v, g, beta = (a[:, 0] for a in gdn_inputs(b, 1, hk, hv, d, d, dtype))
        state = jnp.zeros((b, hv, d, d), jnp.float32)
        state_bytes = 2 * state.size * 4  # read + write: the state dominates traffic
        for impl in _impls("gated_delta_rule_decode"):
            fn = lambda *a, impl=impl: dispatch.gated_delta_rule_decode(*a, impl=impl)
            record(rows, name, impl, time_fn(jax_timer(fn, q, k, v, g, beta, state), repeats=rep),
                   bytes_=state_bytes, tokens=b)  # fmt: skip

    for b, t, h, kvh, d in cfg["prefill"]:
        name = f"attn_prefill B{b} T{t} H{h} KVH{kvh} D{d}"
        q, k, v = attn_inputs(b, t, t, h, kvh, d, dtype)
        lengths = jnp.full((b,), t, jnp.int32)
        flops = 4.0 * b * h * t * t * d / 2  # causal: half of QK^T and PV
        scale = d**-0.5
        runs = [(impl, lambda q, k, v, n, impl=impl: dispatch.attention_prefill(
                    q, k, v, n, scale=scale, impl=impl)) for impl in _impls("attention_prefill")]
        runs.append(("cudnn", lambda q, k, v, n: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, query_seq_lengths=n,
            key_value_seq_lengths=n, implementation="cudnn")))  # fmt: skip
        for impl, fn in runs:
            try:
                timing = time_fn(jax_timer(fn, q, k, v, lengths), repeats=rep)
                record(rows, name, impl, timing, flops=flops, tokens=b * t)
            except Exception as err:  # cuDNN may reject a shape or be missing: say so
                record(rows, name, impl, None, note=f"failed: {type(err).__name__}: {err}"[:200])

    for b, s, h, kvh, d, kv_len in cfg["decode"]:
        name = f"attn_decode B{b} S{s} kv_len{kv_len} H{h} KVH{kvh} D{d}"
        q, kc, vc = attn_inputs(b, 1, s, h, kvh, d, dtype)
        q = q[:, 0]
        kv_lens = jnp.full((b,), kv_len, jnp.int32)  # the model: a prefix of valid slots
        kv_bytes = 2 * b * kv_len * kvh * d * kc.dtype.itemsize  # what must be read
        for impl in _impls("attention_decode"):
            fn = lambda *a, impl=impl: dispatch.attention_decode(*a, scale=d**-0.5, impl=impl)
            record(rows, name, impl, time_fn(jax_timer(fn, q, kc, vc, kv_lens), repeats=rep),
                   bytes_=kv_bytes, tokens=b)  # fmt: skip


def bench_fla(rows, name, x, flops, tokens, repeats) -> None:
    """flash-linear-attention's Triton chunk_gated_delta_rule on the same inputs, if present."""
    try:
        import torch
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

        if not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA")
    except Exception as err:
        record(rows, name, "fla", None, note=f"skipped: {type(err).__name__}: {err}"[:200])
        return
    q, k, v, g, beta = (torch.from_numpy(np.asarray(a, np.float32)).cuda() for a in x)
    q, k, v = (a.to(torch.bfloat16) for a in (q, k, v))

    def run():
        fla_chunk(q=q, k=k, v=v, g=g, beta=beta, output_final_state=True,
                  use_qk_l2norm_in_kernel=True)  # fmt: skip
        torch.cuda.synchronize()

    try:
        record(rows, name, "fla", time_fn(run, repeats=repeats), flops=flops, tokens=tokens)
    except Exception:  # older FLA without Hv > Hk: expand the key heads
        ratio = v.shape[2] // q.shape[2]
        q, k = (a.repeat_interleave(ratio, dim=2) for a in (q, k))
        record(rows, name, "fla", time_fn(run, repeats=repeats), flops=flops, tokens=tokens,
               note="q/k repeat_interleaved to Hv heads")  # fmt: skip


# -------------------------------------------------------------------------------- CPU


def bench_cpu(args, rows: list) -> None:
    """Small reference-only runs (the Pallas kernels need a GPU), then JAX vs HF."""
    rep = args.repeats
    b, t, hk, hv, d = 1, 256, 2, 4, 64
    x = gdn_inputs(b, t, hk, hv, d, d, jnp.float32)
    name = f"gdn_chunk B{b} T{t} Hk{hk} Hv{hv} D{d}"
    record(rows, name, "jax_reference", time_fn(jax_timer(gdn_ref.chunk_gated_delta_rule, *x),
           repeats=rep), flops=gdn_chunk_flops(b, t, hv, d, d), tokens=b * t)  # fmt: skip
    q, k, v, g, beta = (a[:, 0] for a in x)
    state = jnp.zeros((b, hv, d, d), jnp.float32)
    record(rows, f"gdn_decode B{b} Hk{hk} Hv{hv} D{d}", "jax_reference",
           time_fn(jax_timer(gdn_ref.gated_delta_rule_step, q, k, v, g, beta, state), repeats=rep),
           bytes_=2 * state.size * 4, tokens=b)  # fmt: skip
    q, k, v = attn_inputs(2, 128, 128, 4, 2, 64, jnp.float32)
    n = jnp.full((2,), 128, jnp.int32)
    record(rows, "attn_prefill B2 T128 H4 KVH2 D64", "jax_reference",
           time_fn(jax_timer(lambda *a: attn_ref.prefill_attention(*a, scale=0.125), q, k, v, n),
                   repeats=rep), flops=4.0 * 2 * 4 * 128 * 128 * 64 / 2, tokens=256)  # fmt: skip
    record(rows, "attn_decode B2 S128 H4 KVH2 D64", "jax_reference",
           time_fn(jax_timer(lambda *a: attn_ref.decode_attention(*a, scale=0.125), q[:, 0], k, v, n),
                   repeats=rep), bytes_=2 * k.size * 4, tokens=2)  # fmt: skip
    if not args.skip_hf:
        bench_vs_hf(args, rows)


def bench_vs_hf(args, rows: list) -> dict:
    """Chunked GDN: JAX reference vs transformers' torch_chunk_gated_delta_rule (CPU, f32).

    JAX, HF with as many torch threads as XLA uses and HF with one thread are timed alternately for
    several rounds, keeping each one's best time, so load from other processes penalises all
    alike; the one-thread row is the comparison least sensitive to such load.
    """
    import torch
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    b, t, hk, hv, d = 1, args.hf_tokens, 4, 8, 128
    x = gdn_inputs(b, t, hk, hv, d, d, jnp.float32)
    tx = [torch.from_numpy(np.array(a)) for a in x]
    jax_run = jax_timer(gdn_ref.chunk_gated_delta_rule, *x)
    hf_run = lambda: torch_chunk_gated_delta_rule(
        *tx, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    default_threads = match_torch_threads()

    def hf_one_thread():
        torch.set_num_threads(1)
        try:
            hf_run()
        finally:
            torch.set_num_threads(default_threads)

    runs = {"jax": jax_run, "hf": hf_run, "hf_1thread": hf_one_thread}
    timings = {name: [] for name in runs}
    for _ in range(args.rounds):  # alternate, so load changes hit every contender
        for name, fn in runs.items():
            timings[name].append(time_fn(fn, repeats=args.repeats))
    name = f"gdn_chunk B{b} T{t} Hk{hk} Hv{hv} D{d} (CPU f32)"
    flops = gdn_chunk_flops(b, t, hv, d, d)
    labels = {
        "jax": ("jax_reference", ""),
        "hf": ("hf_torch_chunk", f"torch threads={default_threads}"),
        "hf_1thread": ("hf_torch_chunk", "torch threads=1"),
    }
    best = {}
    for key, (label, note) in labels.items():
        timing = min(timings[key], key=lambda r: r["min_s"])
        timing["median_s"] = statistics.median(r["median_s"] for r in timings[key])
        best[key] = timing["min_s"]
        speedup = best[key] / best["jax"]
        if key != "jax":
            note += f"; JAX reference {speedup:.2f}x faster"
        record(rows, name, label, timing, flops=flops, tokens=b * t, note=note)
    print(
        f"JAX chunked reference: {b * t / best['jax']:.0f} tokens/s; HF "
        f"torch_chunk_gated_delta_rule: {b * t / best['hf']:.0f} tokens/s with "
        f"{default_threads} torch threads ({best['hf'] / best['jax']:.2f}x), "
        f"{b * t / best['hf_1thread']:.0f} tokens/s with 1 thread "
        f"({best['hf_1thread'] / best['jax']:.2f}x)"
    )
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench_kernels.json"),
                        help="JSON output")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating JAX/HF rounds (CPU)")
    parser.add_argument("--gdn-tokens", type=int, default=4096, help="GDN prefill length (GPU)")
    parser.add_argument("--attn-tokens", type=int, default=4096, help="attention prefill T (GPU)")
    parser.add_argument("--hf-tokens", type=int, default=2048, help="T for the JAX vs HF CPU run")
    parser.add_argument("--skip-hf", action="store_true", help="skip the JAX vs HF comparison")
    parser.add_argument("--smoke", action="store_true", help="GPU: tiny shapes, checks the script")
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    rows: list = []
    if backend == "gpu":
        print(f"GPU found: {jax.devices()[0].device_kind}")
        bench_gpu(args, rows)
    else:
        print(f"No GPU found (JAX backend: {backend}): the Pallas GPU kernels cannot run here; "
              "timing the pure-JAX references only.")  # fmt: skip
        bench_cpu(args, rows)
    print_table(rows)
    meta = {
        "backend": backend,
        "device": jax.devices()[0].device_kind,
        "gpu_found": backend == "gpu",
    }
    print(f"wrote {write_json(args.out, {'meta': meta, 'results': rows})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
