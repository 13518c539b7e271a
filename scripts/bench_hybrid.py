"""Decode speed of a small Qwen3.5 (Gated DeltaNet 3 : 1 gated attention) in jaxpar vs
Hugging Face transformers (PyTorch eager, CPU), same random weights, same run.

    python scripts/bench_hybrid.py [--new-tokens 64] [--out results/bench_hybrid.json]

Decode tokens/s = generated tokens (batch x new tokens, prefill excluded) / decode time.
jaxpar is warmed up first (compilation excluded); each figure is the median of --repeats.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=2, head_dim=64,
              linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
              linear_value_head_dim=64, linear_conv_kernel_dim=4,
              layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
              max_position_embeddings=4096, tie_word_embeddings=False,
              rope_parameters={"rope_theta": 1e6, "partial_rotary_factor": 0.25, "rope_type": "default"})


def make_model(path: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3_5TextConfig(**CONFIG),
                                                         dtype=torch.float32)
    model.save_pretrained(path)
    return path


def time_jaxpar(path: Path, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    import jaxpar

    model = jaxpar.load(path, tokenizer=False, progress=False)
    model.generate(prompts, new_tokens, ignore_eos=True)  # compile
    rates = [model.generate(prompts, new_tokens, ignore_eos=True).decode_tokens_per_s for _ in range(repeats)]
    return statistics.median(rates)


def time_hf(path: Path, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    run(2)  # warm-up
    rates = []
    for _ in range(repeats):
        prefill = run(1)
        total = run(new_tokens)
        rates.append(len(prompts) * (new_tokens - 1) / max(total - prefill, 1e-9))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/bench_hybrid.json")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp) / "qwen3_5_small")
        rng = np.random.default_rng(0)
        for batch in args.batches:
            prompts = rng.integers(3, CONFIG["vocab_size"], size=(batch, args.prompt_len)).tolist()
            ours = time_jaxpar(path, prompts, args.new_tokens, args.repeats)
            hf = time_hf(path, prompts, args.new_tokens, args.repeats)
            rows.append({"batch": batch, "jaxpar_tok_s": ours, "hf_tok_s": hf, "speedup": ours / hf})

    print(f"Qwen3.5-style model: hidden 512, 8 layers (3 GDN : 1 attention), float32, CPU; "
          f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens")
    print(f"{'batch':>5} {'jaxpar tok/s':>13} {'HF tok/s':>10} {'speedup':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['jaxpar_tok_s']:>13.1f} {r['hf_tok_s']:>10.1f} {r['speedup']:>7.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": CONFIG, "prompt_len": args.prompt_len,
                               "new_tokens": args.new_tokens, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
