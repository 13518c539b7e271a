"""Decode speed of a small Nemotron-H (Mamba2 + MLP layers with two attention layers) in
jaxpar vs Hugging Face transformers (PyTorch eager, CPU), same random weights, same run.

    python scripts/bench_nemotron_h.py [--new-tokens 64] [--batches 1 8] [--out results/bench_nemotron_h.json]

Decode tokens/s = generated tokens (batch x (new tokens - 1), prefill excluded) / decode
time. jaxpar is warmed up first (compilation excluded); each figure is the median of
--repeats. HF runs its pure-PyTorch Mamba2 path (transformers' fallback when the
mamba_ssm / causal_conv1d CUDA packages are absent, as on any CPU). Both use every core
(XLA's CPU client does by default; torch is set to os.cpu_count() threads). The greedy
tokens of both are compared for every batch and reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# 8 layers: 4 Mamba2, 3 relu2 MLP, 1 attention (Nemotron-H's mix, at small scale).
PATTERN = "M-M-M*M-"
CONFIG = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, hybrid_override_pattern=PATTERN,
              num_attention_heads=8, num_key_value_heads=2, head_dim=64, mamba_num_heads=16,
              mamba_head_dim=64, n_groups=8, ssm_state_size=64, conv_kernel=4, chunk_size=128,
              max_position_embeddings=4096, tie_word_embeddings=False, layer_norm_epsilon=1e-5)


def make_model(path: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.NemotronHConfig(**CONFIG),
                                                         dtype=torch.float32)
    model.save_pretrained(path)
    return path


def time_jaxpar(path: Path, prompts: list[list[int]], new_tokens: int, repeats: int):
    import jaxpar

    model = jaxpar.load(path, tokenizer=False, progress=False)
    first = model.generate(prompts, new_tokens, ignore_eos=True)  # compile
    rates = [model.generate(prompts, new_tokens, ignore_eos=True).decode_tokens_per_s for _ in range(repeats)]
    return statistics.median(rates), first.token_ids


def time_hf(path: Path, prompts: list[list[int]], new_tokens: int, repeats: int):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)

    def run(n: int):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0, out[:, ids.shape[1]:].tolist()

    _, tokens = run(new_tokens)  # warm-up, and the tokens to compare
    rates = []
    for _ in range(repeats):
        prefill, _ = run(1)
        total, _ = run(new_tokens)
        rates.append(len(prompts) * (new_tokens - 1) / max(total - prefill, 1e-9))
    return statistics.median(rates), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/bench_nemotron_h.json")
    args = ap.parse_args()

    import torch

    threads = os.cpu_count()
    torch.set_num_threads(threads)  # XLA's CPU client uses every core too
    from run_info import write_json

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp) / "nemotron_h_small")
        rng = np.random.default_rng(0)
        for batch in args.batches:
            prompts = rng.integers(3, CONFIG["vocab_size"], size=(batch, args.prompt_len)).tolist()
            ours, our_tokens = time_jaxpar(path, prompts, args.new_tokens, args.repeats)
            hf, hf_tokens = time_hf(path, prompts, args.new_tokens, args.repeats)
            rows.append({"batch": batch, "jaxpar_tok_s": ours, "hf_tok_s": hf, "speedup": ours / hf,
                         "same_greedy_tokens": our_tokens == hf_tokens})

    print(f"Nemotron-H-style model: hidden 512, pattern {PATTERN} (Mamba2 16 heads x 64, 8 groups, "
          f"state 64), float32, CPU, {threads} threads; {args.prompt_len}-token prompts, "
          f"{args.new_tokens} new tokens")
    print(f"{'batch':>5} {'jaxpar tok/s':>13} {'HF tok/s':>10} {'speedup':>8} {'same tokens':>12}")
    for r in rows:
        print(f"{r['batch']:>5} {r['jaxpar_tok_s']:>13.1f} {r['hf_tok_s']:>10.1f} {r['speedup']:>7.2f}x "
              f"{str(r['same_greedy_tokens']):>12}")
    out = write_json(args.out, {"config": CONFIG, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                                "threads": threads, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
