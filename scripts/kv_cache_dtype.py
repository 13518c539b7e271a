"""KV cache dtypes side by side: cache bytes per device (from `jaxpar plan`, no weights
loaded), greedy agreement with a float32 cache over teacher-forced positions, and decode
speed, for float32 / bfloat16 / float8_e4m3fn caches in one run.

    python scripts/kv_cache_dtype.py [--model tests/data/stories260K] \
        [--plan-models tests/data/stories260K smollm2-135m] [--batch 8 --seq 4096] \
        [--out results/kv_cache_dtype.json]

Agreement: STORY's first --positions tokens are fed as given (teacher forcing), one by one
through decode steps and all at once through extend (chunked prefill), each reading every
key and value back from the cache; at each position the next-token argmax is compared with
the float32 cache's. Decode speed: one decode step of --batch rows over a cache of --seq
slots (the last 64 free, the rest attended), median of --repeats runs of 10 steps each
(compilation excluded).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_info import write_json  # noqa: E402

KV_DTYPES = ("float32", "bfloat16", "float8_e4m3fn")
# A story in the style of TinyStories, written for this measurement.
STORY = (
    "Once upon a time, there was a little boy named Tim. Tim had a red kite that he loved very "
    "much. Every day after lunch, he ran to the big hill near his house to fly it. One windy "
    "morning, the kite pulled so hard that the string slipped out of his hand. The kite flew "
    "over the trees and landed on the roof of an old barn. Tim was sad and he did not know what "
    "to do. He walked to the barn and saw a kind farmer feeding the cows. \"Can you help me get "
    "my kite?\" Tim asked. The farmer smiled and said, \"Yes, I have a long ladder.\""
)


def teacher_forced_argmax(model, tokens: list[int], kv_cache_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Next-token argmax at each of len(tokens) positions of a loaded model, the tokens fed
    as given: one by one through decode steps (scanned in one program), and all at once
    through extend. Both read every key and value back from a `kv_cache_dtype` cache."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxpar.models.cache import CacheDtypes
    from jaxpar.models.decoder import init_cache

    graphdef, state = nnx.split(model.module)
    length = -(-len(tokens) // 128) * 128
    cache = init_cache(model.cfg, model.sharding, 1, length, CacheDtypes.resolve(model.dtype, kv_cache_dtype))

    @jax.jit
    def run(state, tokens, cache):
        lm = nnx.merge(graphdef, state)
        one = jnp.ones((1,), jnp.int32)

        def step(cache, tok):
            logits, cache = lm(tok.reshape(1, 1), cache.lengths[:, None], cache, one, mode="decode")
            return cache, jnp.argmax(logits[0, -1]).astype(jnp.int32)

        _, decoded = jax.lax.scan(step, cache, tokens)
        n = tokens.shape[0]
        logits, _ = lm(tokens[None], jnp.arange(n, dtype=jnp.int32)[None], cache, one * n, mode="extend")
        return decoded, jnp.argmax(logits[0], -1).astype(jnp.int32)

    decoded, extended = run(state, jnp.asarray(tokens, jnp.int32), cache)
    return np.asarray(decoded), np.asarray(extended)


def cache_bytes(models: list[str], batch: int, seq: int) -> list[dict]:
    from jaxpar.sharding.inspect import plan

    rows = []
    for name in models:
        for kv in KV_DTYPES:
            rep = plan(name, "tp", batch=batch, seq=seq, dtype="bfloat16", collectives=False,
                       kv_cache_dtype=kv, devices=_one_device())
            rows.append(dict(model=name, kv_cache_dtype=kv, cache_bytes_per_device=rep.cache_bytes_per_device,
                             by_part=rep.cache_bytes_by_part))
    for r in rows:
        bf16 = next(x for x in rows if x["model"] == r["model"] and x["kv_cache_dtype"] == "bfloat16")
        r["vs_bfloat16"] = r["cache_bytes_per_device"] / bf16["cache_bytes_per_device"]
    return rows


def _one_device():
    import jax

    return jax.devices()[:1]


def decode_step_ms(model, kv_cache_dtype: str, batch: int, slots: int, repeats: int) -> float:
    """Milliseconds of one decode step over `batch` rows with `slots - 64` tokens cached."""
    import time

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxpar.models.cache import CacheDtypes
    from jaxpar.models.decoder import init_cache

    graphdef, state = nnx.split(model.module)
    cache = init_cache(model.cfg, model.sharding, batch, slots, CacheDtypes.resolve(model.dtype, kv_cache_dtype))
    cache = cache.replace(lengths=jnp.full((batch,), slots - 64, jnp.int32))

    def step(state, tokens, cache):
        lm = nnx.merge(graphdef, state)
        logits, cache = lm(tokens[:, None], cache.lengths[:, None], cache, jnp.ones_like(tokens), mode="decode",
                           last_only=True)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache

    step = jax.jit(step, donate_argnums=2)
    tokens = jnp.ones((batch,), jnp.int32)
    times = []
    for _ in range(repeats + 1):  # the first run compiles and warms up
        t0 = time.perf_counter()
        for _ in range(10):
            tokens, cache = step(state, tokens, cache)
        jax.block_until_ready(tokens)
        times.append((time.perf_counter() - t0) / 10 * 1e3)
        cache = cache.replace(lengths=jnp.full((batch,), slots - 64, jnp.int32))
    return statistics.median(times[1:])


def agreement(model_path: str, positions: int, batch: int, slots: int, repeats: int) -> list[dict]:
    import jaxpar

    rows = []
    ref = None
    for kv in KV_DTYPES:
        model = jaxpar.load(model_path, kv_cache_dtype=kv, progress=False)
        tokens = model.encode(STORY)[:positions]
        dec, ext = teacher_forced_argmax(model, tokens, kv)
        if ref is None:
            ref = dec, ext
        step_ms = decode_step_ms(model, kv, batch, slots, repeats)
        rows.append(dict(model=model_path, kv_cache_dtype=kv, positions=len(tokens),
                         agree_decode=float(np.mean(dec == ref[0])), agree_extend=float(np.mean(ext == ref[1])),
                         decode_ms_per_step=step_ms))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tests/data/stories260K", help="model for agreement and speed")
    p.add_argument("--plan-models", nargs="+", default=["tests/data/stories260K", "smollm2-135m"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--positions", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/kv_cache_dtype.json")
    args = p.parse_args(argv)

    sizes = cache_bytes(args.plan_models, args.batch, args.seq)
    print(f"cache bytes per device (batch {args.batch}, {args.seq} tokens, one device)")
    print(f"{'model':28s} {'kv cache':14s} {'bytes':>14s} {'vs bf16':>8s}")
    for r in sizes:
        print(f"{Path(r['model']).name:28s} {r['kv_cache_dtype']:14s} {r['cache_bytes_per_device']:>14,d} "
              f"{r['vs_bfloat16']:>8.3f}")
    quality = agreement(args.model, args.positions, args.batch, args.seq, args.repeats)
    print(f"\ngreedy agreement with a float32 cache, teacher-forced ({Path(args.model).name}); "
          f"decode step, batch {args.batch} over {args.seq} slots")
    print(f"{'kv cache':14s} {'positions':>9s} {'decode':>8s} {'extend':>8s} {'ms/step':>8s}")
    for r in quality:
        print(f"{r['kv_cache_dtype']:14s} {r['positions']:>9d} {r['agree_decode']:>8.1%} {r['agree_extend']:>8.1%} "
              f"{r['decode_ms_per_step']:>8.2f}")
    out = write_json(args.out, {"cache_bytes": sizes, "agreement": quality,
                                "args": vars(args)})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
