#!/usr/bin/env python
"""MoE block: compiled FLOPs (XLA's HLO cost analysis) and wall time of the local expert
paths against the sparse minimum.

For each token count and each path ("dense": every local expert on every token; "grouped":
tokens sorted by expert, grouped matmul, with its "tiled" and "ragged" (`jax.lax.ragged_dot`)
bodies; "gather": the decode path) the MoE block (router + routed experts) is compiled on
abstract weights and its `cost_analysis()["flops"]` read, per device. The sparse minimum is
the router plus 3 matmuls per (token, selected expert) pair (`sparse_flops`), divided by the
devices the experts are split over. With `--time`, each path also runs on random weights
(median of 5 after a warm-up). "auto" is the path the block picks by itself.

Expert parallelism (`--ep N`, N of `--devices` fake CPU devices): without an all-to-all
every rank sees every token and must, capacity-free, provide for all of them choosing its
experts (N_tokens * min(k, E/ep) rows), so its static FLOPs are not divided by ep; the
ratio printed for ep > 1 shows that bound.

Usage (from the repository root):
    python scripts/bench_moe_flops.py                 # Qwen3-30B-A3B-like block, scaled down
    python scripts/bench_moe_flops.py --tokens 1,8,128,512 --time
    python scripts/bench_moe_flops.py --ep 4 --devices 4
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from cpu_devices import force_cpu_devices_from_argv

    force_cpu_devices_from_argv(1)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxpar.config import ModelConfig, config_from_hf_dict  # noqa: E402
from jaxpar.models import grouped_matmul  # noqa: E402
from jaxpar.models.moe import SparseMoE  # noqa: E402
from jaxpar.sharding.resolve import build_sharding, plain_tp  # noqa: E402
from jaxpar.sharding.rules import parse_rule_table  # noqa: E402

# Qwen3-30B-A3B's routing (128 experts, top-8) with hidden 2048 -> 256 and expert ffn 768 -> 96.
DEFAULT_BLOCK = dict(model_type="qwen3_moe", vocab_size=256, hidden_size=256, intermediate_size=96,
                     moe_intermediate_size=96, num_experts=128, num_experts_per_tok=8,
                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, head_dim=64)
PATHS = ("dense", "grouped:tiled", "grouped:ragged", "gather", "auto")


def block_rules(cfg: ModelConfig, ep: int, devices: int):
    if devices == 1:
        return plain_tp(cfg).layers[0].ffn
    table = parse_rule_table({"axes": {"tp": devices, "ep": ep},
                              "rules": [{"match": {"kind": "moe"}, "plan": {"tp_size": "tp", "ep_size": "ep"}}]})
    return build_sharding(table, cfg, jax.devices()[:devices]).layers[0].ffn


def _block(cfg: ModelConfig, rules, path: str):
    """An abstract SparseMoE for `path` ("dense", "gather", "grouped:<body>")."""
    impl, _, body = path.partition(":")
    block = nnx.eval_shape(lambda: SparseMoE(cfg, jnp.float32, rules, impl=impl, grouped_body=body or None))
    graphdef, state = nnx.split(block)
    for _, var in nnx.to_flat_state(state):
        value = var.get_value()
        var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=rules.sharding(var.logical_axes)))
    return graphdef, state


def _forward(graphdef):
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))


def compiled_flops(cfg: ModelConfig, rules, path: str, tokens: int) -> float:
    """Per-device FLOPs of the compiled MoE block on [1, tokens, hidden] float32."""
    graphdef, state = _block(cfg, rules, path)
    x = jax.ShapeDtypeStruct((1, tokens, cfg.hidden_size), jnp.float32,
                             sharding=rules.sharding(("batch", "seq", "embed")))
    cost = _forward(graphdef).lower(state, x).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0]
    return float(cost["flops"])


def minimum_flops(cfg: ModelConfig, tokens: int, expert_devices: int) -> float:
    """Router ([tokens, H] x [H, E]) + the selected experts' matmuls, per device."""
    router = 2 * tokens * cfg.hidden_size * cfg.num_experts
    experts = grouped_matmul.sparse_flops(tokens, cfg.num_experts_per_tok, cfg.hidden_size,
                                          cfg.moe_intermediate_size)
    return router + experts / expert_devices


def wall_ms(cfg: ModelConfig, rules, path: str, tokens: int, repeats: int = 5) -> float:
    graphdef, abstract = _block(cfg, rules, path)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jax.device_put(rng.normal(0, 0.1, s.shape).astype(s.dtype), s.sharding),
                         abstract)
    x = jnp.asarray(rng.normal(size=(1, tokens, cfg.hidden_size)).astype(np.float32))
    fn = _forward(graphdef)
    fn(state, x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(state, x).block_until_ready()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    from run_info import write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,8,128,512", help="comma-separated token counts")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--time", action="store_true", help="also time each path on random weights")
    ap.add_argument("--out", default=str(REPO / "results" / "moe_flops.json"))
    args = ap.parse_args(argv)
    cfg = config_from_hf_dict(DEFAULT_BLOCK)
    rules = block_rules(cfg, args.ep, args.devices)
    expert_devices = rules.size("expert_ffn") * rules.size("experts")
    rows = []
    print(f"MoE block: hidden {cfg.hidden_size}, {cfg.num_experts} experts top-{cfg.num_experts_per_tok}, "
          f"expert ffn {cfg.moe_intermediate_size}; ep={rules.size('experts')} "
          f"expert_tp={rules.size('expert_ffn')} on {args.devices} device(s); FLOPs per device")
    print(f"{'tokens':>6} {'path':>15} {'GFLOP':>9} {'minimum':>9} {'ratio':>7}" + ("  {:>9}".format("ms") if args.time else ""))
    for tokens in [int(t) for t in args.tokens.split(",")]:
        minimum = minimum_flops(cfg, tokens, expert_devices)
        for path in args.paths.split(","):
            flops = compiled_flops(cfg, rules, path, tokens)
            row = {"tokens": tokens, "path": path, "flops": flops, "minimum_flops": minimum,
                   "ratio": flops / minimum}
            if path == "auto":  # which path "auto" takes here
                block = nnx.eval_shape(lambda: SparseMoE(cfg, jnp.float32, rules))
                row["path"] = "auto=" + block.local_impl(tokens)
            if args.time:
                row["ms"] = wall_ms(cfg, rules, path, tokens)
            rows.append(row)
            print(f"{tokens:>6} {row['path']:>15} {flops / 1e9:>9.4f} {minimum / 1e9:>9.4f} {flops / minimum:>7.2f}"
                  + (f"  {row['ms']:>9.2f}" if args.time else ""))
    out = write_json(args.out, {"block": DEFAULT_BLOCK, "ep": rules.size("experts"),
                                "expert_tp": rules.size("expert_ffn"), "devices": args.devices, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
