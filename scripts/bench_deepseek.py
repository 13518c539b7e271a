"""Decode speed of a small DeepSeek-V3 (MLA + DeepSeek MoE) in jaxpar vs Hugging Face
transformers (PyTorch eager, CPU), same random weights, same run; and MLA's cache bytes per
token against a full per-head K/V layout (from `jaxpar plan`'s analytic count).

    python scripts/bench_deepseek.py [--new-tokens 64] [--batches 1 8] [--out results/bench_deepseek.json]

Decode tokens/s = generated tokens (batch x (new tokens - 1), prefill excluded) / decode
time. jaxpar is warmed up first (compilation excluded); each figure is the median of
--repeats. jaxpar decodes in the latent space (absorbed projections over the compressed
cache); HF expands per-head keys and values into its cache. Both use every core
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

# 4 layers (1 dense, 3 MoE of 16 experts, 2 active + 1 shared), DeepSeek-V3's MLA shape at
# small scale: 16 heads, q LoRA 192, latent 128 + rope key 32, no-rope 64, value 64.
CONFIG = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
              num_attention_heads=16, num_key_value_heads=16, q_lora_rank=192, kv_lora_rank=128,
              qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16,
              num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=256,
              n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1, norm_topk_prob=True,
              max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-6)


def make_model(path: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV3Config(**CONFIG),
                                                         dtype=torch.float32)
    model.save_pretrained(path)
    return path


def cache_bytes(path: Path) -> dict[str, int]:
    """Cache bytes per token (bfloat16, all layers): MLA's latent + rope key vs per-head K/V."""
    import jax.numpy as jnp

    from jaxpar.assembly import open_config
    from jaxpar.sharding.inspect import kv_bytes_per_token

    mla, full, _ = kv_bytes_per_token(open_config(path), jnp.bfloat16)
    return {"mla": mla, "full": full}


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
    ap.add_argument("--out", default="results/bench_deepseek.json")
    args = ap.parse_args()

    import torch

    threads = os.cpu_count()
    torch.set_num_threads(threads)  # XLA's CPU client uses every core too
    from run_info import write_json

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp) / "deepseek_v3_small")
        cache = cache_bytes(path)
        rng = np.random.default_rng(0)
        for batch in args.batches:
            prompts = rng.integers(3, CONFIG["vocab_size"], size=(batch, args.prompt_len)).tolist()
            ours, our_tokens = time_jaxpar(path, prompts, args.new_tokens, args.repeats)
            hf, hf_tokens = time_hf(path, prompts, args.new_tokens, args.repeats)
            rows.append({"batch": batch, "jaxpar_tok_s": ours, "hf_tok_s": hf, "speedup": ours / hf,
                         "same_greedy_tokens": our_tokens == hf_tokens})

    print(f"DeepSeek-V3-style model: hidden 512, 4 layers (1 dense, 3 MoE 16 experts top-2 + shared), "
          f"MLA 16 heads, latent 128 + rope 32, float32, CPU, {threads} threads; {args.prompt_len}-token "
          f"prompts, {args.new_tokens} new tokens")
    print(f"cache per token (bf16): MLA {cache['mla']:,d} bytes vs full per-head K/V {cache['full']:,d} bytes "
          f"({cache['full'] / cache['mla']:.1f}x)")
    print(f"{'batch':>5} {'jaxpar tok/s':>13} {'HF tok/s':>10} {'speedup':>8} {'same tokens':>12}")
    for r in rows:
        print(f"{r['batch']:>5} {r['jaxpar_tok_s']:>13.1f} {r['hf_tok_s']:>10.1f} {r['speedup']:>7.2f}x "
              f"{str(r['same_greedy_tokens']):>12}")
    out = write_json(args.out, {"config": CONFIG, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                                "threads": threads, "rows": rows, "cache_bytes_per_token_bf16": cache})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
