#!/usr/bin/env python
"""Pipeline parallelism beside tensor parallelism on N host CPU devices (default 8).

A random Llama-shaped model (32 layers by default; hidden 256, ffn 704, 8 heads, vocab
4096: about 26 M parameters, 103 MB in float32, so every stage fits comfortably) is written
as safetensors to a temporary folder and loaded under each policy: tp8, pp2 x tp4,
pp4 x tp2 and pp8. For each:

* TTFT: one prompt of `--prompt` tokens (2048), greedy; `GenerationResult.prefill_ms`
  (the prefill through every stage, in chunks of `--chunk` tokens under pp, and reading
  back the first token). Median over `--repeats` runs after a warm-up (compilation apart).
* decode tokens/s, batch 1: the same run's decode (`--new` tokens after the long prompt).
* decode tokens/s, batch `--batch` (8): a `--short`-token prompt per row; under pp the rows
  are split into pp micro-batches that stay in flight.
* the analytic bubble: prefill (p - 1) / (c + p - 1) for p stages and c chunks (GPipe);
  decode with m micro-batches in flight max(0, p - m) / p of the steady state.
* parameter bytes per device (from the sharding, `jaxpar plan`), and under pp the bytes
  each stage read from the checkpoint.

All policies run in one process with the same threads; every greedy output is checked to
equal the tp8 one before its timings count. The machine's load average is recorded: on a
shared machine other processes take cores, and 8 host "devices" share the physical cores,
so stages overlap only as far as free cores allow.

Usage (from the repository root):
    python scripts/bench_pipeline.py                        # full run
    python scripts/bench_pipeline.py --layers 8 --prompt 256 --repeats 1   # quick check
Writes results/bench_pipeline.json and, with matplotlib, results/bench_pipeline.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from cpu_devices import force_cpu_devices_from_argv  # noqa: E402

N_DEVICES = force_cpu_devices_from_argv(8)

import jax  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import jaxpar  # noqa: E402
from jaxpar.pipeline import bubble_fraction  # noqa: E402
from jaxpar.sharding.inspect import plan  # noqa: E402
from run_info import write_json  # noqa: E402


def write_model(folder: Path, layers: int, hidden: int, ffn: int, heads: int, vocab: int, context: int) -> Path:
    """Random float32 Llama weights in HF names and shapes, and their config.json."""
    rng = np.random.default_rng(0)
    head_dim = hidden // heads

    def w(*shape):
        return (rng.standard_normal(shape, np.float32) / np.sqrt(shape[-1])).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": np.ones(hidden, np.float32),
               "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": np.ones(hidden, np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": w(ffn, hidden),
            p + "mlp.up_proj.weight": w(ffn, hidden),
            p + "mlp.down_proj.weight": w(hidden, ffn),
        })
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "head_dim": head_dim, "vocab_size": vocab,
              "max_position_embeddings": context, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def policies(n: int) -> dict[str, dict]:
    out = {f"tp{n}": {"axes": {"tp": n}}}
    pp = 2
    while pp < n:
        out[f"pp{pp}xtp{n // pp}"] = {"axes": {"pp": pp, "tp": n // pp}}
        pp *= 2
    out[f"pp{n}"] = {"axes": {"pp": n, "tp": 1}}
    return out


def run(model, prompts, new: int, repeats: int):
    model.generate(prompts, new, ignore_eos=True)  # warm-up: compiles every program
    runs = [model.generate(prompts, new, ignore_eos=True) for _ in range(repeats)]
    return runs[0].token_ids, {
        "prefill_ms": statistics.median(r.prefill_ms for r in runs),
        "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in runs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=704)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=2048, help="prompt tokens for TTFT")
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens) under pp")
    ap.add_argument("--new", type=int, default=16, help="decode steps after each prompt")
    ap.add_argument("--batch", type=int, default=8, help="rows for the batched decode")
    ap.add_argument("--short", type=int, default=64, help="prompt tokens per row of the batched decode")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated policy names (default: all)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_pipeline.json"))
    args = ap.parse_args()
    if jax.device_count() < args.devices:
        raise SystemExit(f"need {args.devices} devices, JAX sees {jax.device_count()}")

    rng = np.random.default_rng(1)
    long_prompt = [rng.integers(3, args.vocab, size=args.prompt).tolist()]
    short = [rng.integers(3, args.vocab, size=args.short).tolist() for _ in range(args.batch)]
    table = policies(args.devices)
    if args.only:
        table = {k: table[k] for k in args.only.split(",")}
    rows, reference = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(Path(tmp) / "model", args.layers, args.hidden, args.ffn, args.heads, args.vocab,
                           context=max(4096, 2 * args.prompt))
        print(f"model: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}, "
              f"{sum(p.stat().st_size for p in Path(path).iterdir()) / 1e6:.0f} MB on disk")
        header = (f"{'policy':>10s} {'TTFT ms':>9s} {'dec tok/s b1':>12s} {'dec tok/s b' + str(args.batch):>12s} "
                  f"{'bubble pre':>10s} {'bubble dec':>10s} {'param B/device':>15s}")
        print(header)
        for name, policy in table.items():
            pp = policy["axes"].get("pp", 1)
            t0 = time.perf_counter()
            model = jaxpar.load(path, policy=policy, progress=False, tokenizer=False,
                                prefill_chunk=args.chunk if pp > 1 else None)
            load_s = time.perf_counter() - t0
            tokens_long, long = run(model, long_prompt, args.new, args.repeats)
            tokens_short, batched = run(model, short, args.new, args.repeats)
            if not reference:
                reference = {"long": tokens_long, "short": tokens_short, "policy": name}
            agrees = tokens_long == reference["long"] and tokens_short == reference["short"]
            report = plan(path, policy, batch=1, seq=args.prompt, dtype="float32", collectives=False)
            chunks = -(-args.prompt // min(args.chunk, args.prompt)) if pp > 1 else 1
            micro = min(pp, args.batch)
            row = {
                "policy": name, "pp": pp, "tp": args.devices // pp, "policy_table": policy,
                "ttft_ms": long["prefill_ms"], "decode_tokens_per_s_batch1": long["decode_tokens_per_s"],
                f"decode_tokens_per_s_batch{args.batch}": batched["decode_tokens_per_s"],
                "prefill_ms_batch": batched["prefill_ms"],
                "prefill_chunks": chunks, "bubble_prefill": bubble_fraction(pp, chunks),
                "decode_micro_batches": micro, "bubble_decode": max(0, pp - micro) / pp,
                "param_bytes_per_device": report.param_bytes_per_device,
                "stage_bytes_read": [r.bytes for r in model.module.read] if pp > 1 else None,
                "load_s": load_s, "greedy_equals_reference": agrees,
            }
            rows.append(row)
            print(f"{name:>10s} {row['ttft_ms']:9.0f} {row['decode_tokens_per_s_batch1']:12.1f} "
                  f"{row[f'decode_tokens_per_s_batch{args.batch}']:12.1f} {row['bubble_prefill']:10.0%} "
                  f"{row['bubble_decode']:10.0%} {row['param_bytes_per_device']:15,d}"
                  + ("" if agrees else f"   (greedy differs from {reference['policy']}!)"), flush=True)
            del model
    out = write_json(args.out, {"config": vars(args), "rows": rows})
    print(f"wrote {out}")
    if not all(r["greedy_equals_reference"] for r in rows):
        print("warning: some policies' greedy tokens differ from the first policy's", file=sys.stderr)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return 0
    names = [r["policy"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [("ttft_ms", f"TTFT, {args.prompt}-token prompt (ms)"),
              ("decode_tokens_per_s_batch1", "decode tokens/s, batch 1"),
              (f"decode_tokens_per_s_batch{args.batch}", f"decode tokens/s, batch {args.batch}")]
    for ax, (key, title) in zip(axes, panels):
        ax.bar(names, [r[key] for r in rows], color="tab:blue")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    for i, r in enumerate(rows):
        axes[0].annotate(f"bubble {r['bubble_prefill']:.0%}", (i, r["ttft_ms"]), ha="center", va="bottom",
                         fontsize=8)
    fig.suptitle(f"{args.layers}-layer Llama-shaped model on {args.devices} CPU devices "
                 f"(chunk {args.chunk} under pp)")
    fig.tight_layout()
    png = Path(args.out).with_suffix(".png")
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
