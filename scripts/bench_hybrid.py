"""Decode speed of a small Qwen3.5 (Gated DeltaNet 3 : 1 gated attention) in jaxpar vs
Hugging Face transformers (PyTorch eager, CPU), same random weights, same run.

    python scripts/bench_hybrid.py [--new-tokens 64] [--out results/bench_hybrid.json]

Before anything is timed, jaxpar's and HF's greedy tokens must agree for every prompt
(the script stops with an error otherwise: a speed figure of a wrong model means
nothing). HF runs with as many torch threads as XLA uses (`--torch-threads` overrides).
Decode tokens/s = generated tokens (batch x new tokens, prefill excluded) / decode time.
jaxpar compiles ahead of time on a warm-up call (compilation excluded); each figure is
the median of --repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_info import match_torch_threads, write_json, xla_cpu_threads  # noqa: E402

CONFIG = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=2, head_dim=64,
              linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
              linear_value_head_dim=64, linear_conv_kernel_dim=4,
              layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
              max_position_embeddings=4096, tie_word_embeddings=False,
              rope_parameters={"rope_theta": 1e6, "partial_rotary_factor": 0.25, "rope_type": "default"})
# Initial weights' spread: HF's default (0.02) leaves the logits of a random model nearly
# flat, so greedy choices would hinge on rounding; this makes them clear-cut.
WEIGHT_STD = 0.1


def make_model(path: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3_5TextConfig(**CONFIG),
                                                         dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, WEIGHT_STD)
    model.save_pretrained(path)
    return path


class Jaxpar:
    def __init__(self, path: Path):
        import jaxpar

        self.model = jaxpar.load(path, tokenizer=False, progress=False)

    def greedy(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        return self.model.generate(prompts, new_tokens, ignore_eos=True).token_ids

    def tokens_per_s(self, prompts: list[list[int]], new_tokens: int) -> float:
        return self.model.generate(prompts, new_tokens, ignore_eos=True).decode_tokens_per_s


class HF:
    def __init__(self, path: Path):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def _generate(self, prompts: list[list[int]], n: int):
        with self.torch.no_grad():
            return self.model.generate(self.torch.tensor(prompts), max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=0)

    def greedy(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        return self._generate(prompts, new_tokens)[:, len(prompts[0]):].tolist()

    def tokens_per_s(self, prompts: list[list[int]], new_tokens: int) -> float:
        t0 = time.perf_counter()
        self._generate(prompts, 1)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._generate(prompts, new_tokens)
        total = time.perf_counter() - t0
        return len(prompts) * (new_tokens - 1) / max(total - prefill, 1e-9)


def check_agreement(ours: list[list[int]], ref: list[list[int]], batch: int) -> None:
    if ours != ref:
        row = next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
        step = next(i for i, (a, b) in enumerate(zip(ours[row], ref[row])) if a != b)
        raise SystemExit(f"bench_hybrid: jaxpar's and HF's greedy tokens differ (batch {batch}, row {row}, "
                         f"from step {step}: jaxpar {ours[row][step:step + 5]} vs HF {ref[row][step:step + 5]}); "
                         "refusing to time two different computations")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch threads for HF (default: as many as XLA uses, one per available core)")
    ap.add_argument("--out", default="results/bench_hybrid.json")
    args = ap.parse_args()
    threads = match_torch_threads(args.torch_threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp) / "qwen3_5_small")
        ours, hf = Jaxpar(path), HF(path)
        rng = np.random.default_rng(0)
        for batch in args.batches:
            prompts = rng.integers(3, CONFIG["vocab_size"], size=(batch, args.prompt_len)).tolist()
            check_agreement(ours.greedy(prompts, args.new_tokens), hf.greedy(prompts, args.new_tokens), batch)
            hf.tokens_per_s(prompts, 2)  # warm-up
            rates = {"jaxpar": [], "hf": []}
            for _ in range(args.repeats):  # interleaved: both see the same machine load
                rates["jaxpar"].append(ours.tokens_per_s(prompts, args.new_tokens))
                rates["hf"].append(hf.tokens_per_s(prompts, args.new_tokens))
            mine, theirs = statistics.median(rates["jaxpar"]), statistics.median(rates["hf"])
            rows.append({"batch": batch, "jaxpar_tok_s": mine, "hf_tok_s": theirs, "speedup": mine / theirs,
                         "greedy_tokens_agree": True, "runs": rates})

    print(f"Qwen3.5-style model: hidden 512, 8 layers (3 GDN : 1 attention), float32, CPU; "
          f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens; greedy tokens agree; "
          f"torch threads {threads}, XLA threads {xla_cpu_threads()}")
    print(f"{'batch':>5} {'jaxpar tok/s':>13} {'HF tok/s':>10} {'speedup':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['jaxpar_tok_s']:>13.1f} {r['hf_tok_s']:>10.1f} {r['speedup']:>7.2f}x")
    out = write_json(args.out, {"config": CONFIG, "weight_std": WEIGHT_STD, "prompt_len": args.prompt_len,
                                "new_tokens": args.new_tokens, "torch_threads": threads, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
