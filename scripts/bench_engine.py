#!/usr/bin/env python
"""Serving a request trace: static batching vs the engine (continuous batching) vs
prefill/decode disaggregation, side by side on the same trace and devices.

The trace: `--requests` requests with Poisson arrivals (`--rate` per second), prompt
lengths uniform in [32, 512] tokens and output lengths uniform in [16, 128] (EOS ignored,
so every request produces exactly its output length). Three systems serve it:

* static:   `LoadedModel.generate` on batches of up to `--slots` requests: whatever has
            arrived when the previous batch ends is padded to `--slots` rows and run until
            its longest request is done (a request's tokens come back with its batch);
* engine:   `jaxpar.Engine`, prefill and decode on the same devices (`--colocated-policy`
            over all devices), `--slots` decode slots, chunked prefill;
* pd:       `jaxpar.Engine` with prefill on the first half of the devices
            (`--prefill-policy`) and decode on the second half (`--decode-policy`).

Per system: throughput (output tokens / time from the first arrival to the last token),
TTFT (arrival to first token on the host), TPOT (a request's mean time per output token
after the first) and latency, p50 / p99 over requests, and ITL (the gaps between
consecutive tokens of a request, p50 / p99 over all gaps; static batching returns a
batch's tokens together, so its ITL is its step time). Each system serves each trace once untimed (to
compile) and once timed; programs compiled during the timed pass are counted and
reported. A low rate shows latency under light load; a rate above what the systems can
serve shows their capacity (throughput is then bounded by the system, not the arrivals). The model is a Llama with random weights (`--hidden`, `--layers`, ...) unless
`--model PATH` is given: speed does not depend on the weights' values.

Usage (from the repository root):
    python scripts/bench_engine.py                        # 8 CPU devices, 32 requests, 2 and 8 req/s
    python scripts/bench_engine.py --requests 16 --rate 4 --systems engine,pd
Writes results/bench_engine.json and results/bench_engine.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from cpu_devices import force_cpu_devices_from_argv  # noqa: E402

force_cpu_devices_from_argv(8)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from run_info import write_json  # noqa: E402

SYSTEMS = ("static", "engine", "pd")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=8, help="CPU devices (read before JAX starts)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rate", type=float, nargs="+", default=[2.0, 8.0],
                   help="Poisson arrivals per second; each rate is a trace served by every system")
    p.add_argument("--prompt-range", type=int, nargs=2, default=(32, 512))
    p.add_argument("--output-range", type=int, nargs=2, default=(16, 128))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slots", type=int, default=8, help="decode slots (and the static batch size)")
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--model", default=None, help="an HF folder / GGUF (default: a random-weight Llama)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--colocated-policy", default=None, help="default: TP over all devices")
    p.add_argument("--prefill-policy", default=None, help="default: TP over the first half of the devices")
    p.add_argument("--decode-policy", default=None, help="default: TP over the second half of the devices")
    p.add_argument("--out", default="results/bench_engine.json")
    p.add_argument("--plot", default="results/bench_engine.png")
    return p.parse_args()


def random_llama(args, devices):
    """A Llama of the given shape with random weights, TP over `devices` (a LoadedModel)."""
    from flax import nnx

    from jaxpar.api import LoadedModel
    from jaxpar.config import config_from_hf_dict
    from jaxpar.models.decoder import CausalLM
    from jaxpar.sharding.resolve import build_sharding
    from jaxpar.sharding.rules import load_rule_table

    cfg = config_from_hf_dict({
        "model_type": "llama", "vocab_size": args.vocab, "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "eos_token_id": 2})
    sharding = build_sharding(load_rule_table(args.colocated_policy, len(devices)), cfg, devices)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, np.float32, sharding)))
    key = jax.random.key(args.seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        shape = var.get_value().shape
        named = sharding.rules_for_param(path).sharding(var.logical_axes)
        scale = 0.0 if len(shape) == 1 else 0.02  # norms: ones
        init = jax.jit(lambda k, s=shape, c=scale: c * jax.random.normal(k, s, np.float32) + (len(s) == 1),
                       out_shardings=named)
        var.set_value(init(jax.random.fold_in(key, i)))
    return LoadedModel(nnx.merge(graphdef, state), None, np.float32, set())


def make_trace(args, vocab, rate):
    """The same prompts and output lengths at every rate (one seed); arrivals scale with 1/rate."""
    rng = np.random.default_rng(args.seed)
    gaps = rng.exponential(1.0 / rate, size=args.requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    lo, hi = args.prompt_range
    prompts = [rng.integers(3, vocab, size=int(n)).tolist() for n in rng.integers(lo, hi + 1, size=args.requests)]
    outputs = [int(n) for n in rng.integers(args.output_range[0], args.output_range[1] + 1, size=args.requests)]
    return [float(a) for a in arrivals], prompts, outputs


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def summary(ttft, tpot, itl, latency, tokens, makespan_s, compiles):
    return {"throughput_tok_s": tokens / makespan_s, "makespan_s": makespan_s, "output_tokens": tokens,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99),
            "latency_ms_p50": pct(latency, 50), "latency_ms_p99": pct(latency, 99),
            "compiles_while_timed": compiles}


def run_static(model, trace, slots):
    """Batches of whatever has arrived, padded to `slots` rows, each run to its longest request."""
    arrivals, prompts, outputs = trace
    order = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    ttft, tpot, itl, latency = [], [], [], []
    start = time.perf_counter()
    last = start
    while order:
        now = time.perf_counter() - start
        if arrivals[order[0]] > now:
            time.sleep(arrivals[order[0]] - now)
            now = time.perf_counter() - start
        batch = [i for i in order if arrivals[i] <= now][:slots]
        order = [i for i in order if i not in batch]
        rows = [prompts[i] for i in batch] + [prompts[batch[0]]] * (slots - len(batch))
        t0 = time.perf_counter()
        result = model.generate(rows, max(outputs[i] for i in batch), ignore_eos=True)
        last = time.perf_counter()
        step_ms = result.decode_ms / max(result.decode_steps, 1)
        for i in batch:
            ttft.append((t0 - start + result.prefill_ms / 1e3 - arrivals[i]) * 1e3)
            tpot.append(step_ms)
            itl.extend([step_ms] * (outputs[i] - 1))
            latency.append((last - start - arrivals[i]) * 1e3)
    return ttft, tpot, itl, latency, sum(outputs), last - start


def run_engine(engine, trace, stats_out=None):
    arrivals, prompts, outputs = trace
    before = engine.stats
    result = engine.generate(prompts, outputs, ignore_eos=True, arrival_times=arrivals)
    if stats_out is not None:  # prefill chunks, decode steps, steps overlapping a chunk (PD)
        stats_out.update({k: v - before[k] for k, v in engine.stats.items()})
    assert [len(t) for t in result.token_ids] == outputs
    tpot = [o.tpot_ms for o in result if len(o.token_ids) > 1]
    itl = [b - a for o in result for a, b in zip(o.token_times_ms, o.token_times_ms[1:])]
    return ([o.ttft_ms for o in result], tpot, itl, [o.latency_ms for o in result], sum(outputs),
            result.wall_ms / 1e3)


class CompileCounter:
    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self)

    def __call__(self, name, duration, **_):
        if name.endswith("backend_compile_duration"):
            self.count += 1


def plot(path, results):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    rates = list(results)
    fig, axes = plt.subplots(len(rates), 4, figsize=(17, 3.6 * len(rates)), squeeze=False)
    for row, rate in zip(axes, rates):
        names = list(results[rate])
        x = np.arange(len(names))
        row[0].bar(names, [results[rate][n]["throughput_tok_s"] for n in names], color="tab:blue")
        row[0].set_title(f"{rate} req/s: throughput (output tok/s)")
        for ax, metric in zip(row[1:], ("ttft", "tpot", "itl")):
            ax.bar(x - 0.2, [results[rate][n][f"{metric}_ms_p50"] for n in names], 0.4, label="p50")
            ax.bar(x + 0.2, [results[rate][n][f"{metric}_ms_p99"] for n in names], 0.4, label="p99")
            ax.set_xticks(x, names)
            ax.set_yscale("log")
            ax.set_title(f"{rate} req/s: {metric.upper()} (ms)")
            ax.legend()
    fig.suptitle("static batching vs engine vs prefill/decode disaggregation (same traces)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def build_systems(args, model, devices):
    """name -> serve(trace); engines are built (and compiled) once, for every rate."""
    import jaxpar

    half = len(devices) // 2
    max_len = args.prompt_range[1] + args.output_range[1]
    systems = {}
    for name in [s.strip() for s in args.systems.split(",") if s.strip()]:
        if name == "static":
            systems[name] = lambda trace, stats=None: run_static(model, trace, args.slots)
        elif name == "engine":
            engine = jaxpar.Engine(model, max_slots=args.slots, max_len=max_len, prefill_chunk=args.prefill_chunk)
            systems[name] = lambda trace, stats=None, engine=engine: run_engine(engine, trace, stats)
        elif name == "pd":
            engine = jaxpar.Engine(model, max_slots=args.slots, max_len=max_len, prefill_chunk=args.prefill_chunk,
                                   prefill_policy=args.prefill_policy, prefill_devices=devices[:half],
                                   decode_policy=args.decode_policy, decode_devices=devices[half:])
            systems[name] = lambda trace, stats=None, engine=engine: run_engine(engine, trace, stats)
        else:
            raise SystemExit(f"unknown system {name!r} (choose from {', '.join(SYSTEMS)})")
    return systems


def main():
    args = parse_args()
    import jaxpar

    devices = jax.devices()
    if args.model:
        model = jaxpar.load(args.model, policy=args.colocated_policy or "tp", devices=devices,
                            progress=False, tokenizer=False)
    else:
        model = random_llama(args, devices)
    systems = build_systems(args, model, devices)
    counter = CompileCounter()
    results, traces = {}, {}
    for rate in args.rate:
        trace = make_trace(args, model.cfg.vocab_size, rate)
        traces[str(rate)] = {"arrivals_s": trace[0], "prompt_lengths": [len(p) for p in trace[1]],
                             "output_lengths": trace[2]}
        results[str(rate)] = per_rate = {}
        print(f"rate {rate}/s: {len(trace[1])} requests over {trace[0][-1]:.1f} s, "
              f"{sum(len(p) for p in trace[1])} prompt and {sum(trace[2])} output tokens", flush=True)
        for name, serve in systems.items():
            t = time.perf_counter()
            serve(trace)  # untimed: compiles what this trace needs
            warm = time.perf_counter() - t
            before = counter.count
            stats = {}
            ttft, tpot, itl, latency, tokens, makespan = serve(trace, stats)
            per_rate[name] = r = summary(ttft, tpot, itl, latency, tokens, makespan, counter.count - before)
            r["warmup_s"] = warm
            if stats:
                r["engine_stats"] = stats
            print(f"  {name:7s} {r['throughput_tok_s']:7.1f} tok/s  TTFT p50 {r['ttft_ms_p50']:8.1f} p99 "
                  f"{r['ttft_ms_p99']:8.1f} ms  TPOT p50 {r['tpot_ms_p50']:6.1f} p99 {r['tpot_ms_p99']:6.1f} ms  "
                  f"ITL p99 {r['itl_ms_p99']:6.1f} ms  latency p50 {r['latency_ms_p50']:8.1f} ms  "
                  f"(compiles while timed: {r['compiles_while_timed']})", flush=True)
        if "static" in per_rate and "engine" in per_rate:
            print(f"  engine / static throughput: "
                  f"{per_rate['engine']['throughput_tok_s'] / per_rate['static']['throughput_tok_s']:.2f}x")
        if "pd" in per_rate and "engine" in per_rate:
            print(f"  TPOT p99 pd / engine: {per_rate['pd']['tpot_ms_p99'] / per_rate['engine']['tpot_ms_p99']:.2f}x")
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    config["model_config"] = {"hidden": model.cfg.hidden_size, "layers": model.cfg.num_layers,
                              "heads": model.cfg.num_heads, "kv_heads": model.cfg.num_kv_heads,
                              "vocab": model.cfg.vocab_size}
    out = write_json(args.out, {"config": config, "traces": traces, "results": results})
    print(f"wrote {out}")
    plot(args.plot, results)


if __name__ == "__main__":
    main()
