"""Prefill / decode loop: length buckets, a donated cache, sampling, stopping, streaming."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.models.cache import Cache
from jaxpar.models.decoder import CausalLM, init_cache
from jaxpar.sampling import SamplingParams, sample
from jaxpar.sharding.host import replicated, to_host

MIN_BUCKET = 16


def bucket(n: int) -> int:
    """Smallest power of two >= n (at least MIN_BUCKET): prompt lengths that share a
    bucket share one compiled prefill."""
    return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]
    prompt_token_ids: list[list[int]]
    finish_reasons: list[str]  # "stop" (EOS or a stop string) or "length"
    prefill_ms: float
    decode_ms: float
    decode_steps: int

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second over the whole batch, prefill excluded."""
        n = sum(max(len(t) - 1, 0) for t in self.token_ids)
        return n / (self.decode_ms / 1e3) if self.decode_ms > 0 else float("nan")

    @property
    def timings(self) -> dict[str, float]:
        return {"prefill_ms": self.prefill_ms, "decode_ms": self.decode_ms,
                "decode_steps": self.decode_steps, "decode_tokens_per_s": self.decode_tokens_per_s}


def _key(seed_step: jax.Array) -> jax.Array:
    """[seed, step] -> the PRNG key of that step (built inside the program, so only plain
    integers cross from the host)."""
    return jax.random.fold_in(jax.random.key(seed_step[0]), seed_step[1])


def _prefill(graphdef, state, tokens, lengths, cache, seed_step, temperature, top_k, top_p, *, mode):
    model: CausalLM = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, cache = model(tokens, positions, cache, lengths, decode=False, last_only=True)
    greedy, filtered = mode
    return sample(logits, _key(seed_step), temperature, top_k, top_p, greedy=greedy,
                  filtered=filtered), cache


def _decode(graphdef, state, tokens, cache: Cache, seed_step, temperature, top_k, top_p, *, mode):
    model: CausalLM = nnx.merge(graphdef, state)
    positions = cache.lengths[:, None]
    logits, cache = model(tokens[:, None], positions, cache, cache.lengths, decode=True, last_only=True)
    greedy, filtered = mode
    return sample(logits, _key(seed_step), temperature, top_k, top_p, greedy=greedy,
                  filtered=filtered), cache


class Generator:
    """Compiled prefill and decode programs for one model (cached per sampling mode)."""

    def __init__(self, model: CausalLM, cache_dtype):
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg
        self.sharding = model.sharding
        self.cache_dtype = cache_dtype
        self._prefill = {}
        self._decode = {}

    def _programs(self, mode):
        if mode not in self._prefill:
            self._prefill[mode] = jax.jit(functools.partial(_prefill, mode=mode),
                                          static_argnums=0, donate_argnums=4)
            self._decode[mode] = jax.jit(functools.partial(_decode, mode=mode),
                                         static_argnums=0, donate_argnums=3)
        return self._prefill[mode], self._decode[mode]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams, *, stop_ids: set[int],
                 detokenize: Callable[[list[int]], str] | None = None,
                 stop_strings: Sequence[str] = (),
                 stream: Callable[[int, str], None] | None = None) -> GenerationResult:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompts:
            raise ValueError("no prompts given")
        context = self.cfg.max_position_embeddings
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if len(p) > context:
                raise ValueError(f"prompt {i} has {len(p)} tokens, longer than the model's context "
                                 f"of {context} tokens")
            if len(p) + max_new_tokens > context:
                raise ValueError(f"prompt {i} ({len(p)} tokens) + max_new_tokens ({max_new_tokens}) "
                                 f"exceeds the model's context of {context} tokens")
        if (stop_strings or stream) and detokenize is None:
            raise ValueError("stop strings and streaming need a tokenizer")
        batch = len(prompts)
        # Batch-split attention needs the batch to divide its devices: pad with copies of
        # the first prompt, whose outputs are dropped. Sequence-split layouts need the
        # padded length to divide too.
        rows = -(-batch // self.sharding.batch_multiple) * self.sharding.batch_multiple
        t_bucket = _round_up(bucket(max(len(p) for p in prompts)), self.sharding.seq_multiple)
        cache_len = _round_up(bucket(max(t_bucket, max(len(p) for p in prompts) + max_new_tokens)),
                              self.sharding.seq_multiple)
        padded = list(prompts) + [prompts[0]] * (rows - batch)
        tokens = np.zeros((rows, t_bucket), np.int32)
        for i, p in enumerate(padded):
            tokens[i, : len(p)] = p
        lengths = np.array([len(p) for p in padded], np.int32)

        prefill, decode = self._programs(sampling.mode())
        mesh = self.sharding.mesh
        params = [replicated(a, mesh) for a in sampling.arrays()]

        def seed_step(step: int) -> jax.Array:
            return replicated(np.array([sampling.seed, step], np.int32), mesh)

        cache = init_cache(self.cfg, self.sharding, rows, cache_len, self.cache_dtype)

        t0 = time.perf_counter()
        next_tok, cache = prefill(self.graphdef, self.state, replicated(tokens, mesh),
                                  replicated(lengths, mesh), cache, seed_step(0), *params)
        first = to_host(next_tok)
        t1 = time.perf_counter()

        out: list[list[int]] = [[] for _ in range(batch)]
        texts = [""] * batch
        done = [False] * batch
        reasons = ["length"] * batch
        steps = 0

        def accept(row: int, tok: int) -> None:
            out[row].append(tok)
            if tok in stop_ids:
                out[row].pop()
                done[row], reasons[row] = True, "stop"
            elif detokenize is not None and (stop_strings or stream):
                text = detokenize(out[row])
                for s in stop_strings:
                    cut = text.find(s)
                    if cut >= 0:
                        text = text[:cut]
                        done[row], reasons[row] = True, "stop"
                if stream and len(text) > len(texts[row]) and text.startswith(texts[row]):
                    stream(row, text[len(texts[row]):])
                texts[row] = text
            if not done[row] and len(out[row]) >= max_new_tokens:
                done[row] = True

        for row in range(batch):
            accept(row, int(first[row]))
        current = next_tok
        while not all(done):
            steps += 1
            current, cache = decode(self.graphdef, self.state, current, cache,
                                    seed_step(steps), *params)
            host = to_host(current)
            for row in range(batch):
                if not done[row]:
                    accept(row, int(host[row]))
        t2 = time.perf_counter()

        if detokenize is not None and not (stop_strings or stream):
            texts = [detokenize(o) for o in out]
        return GenerationResult(texts=texts, token_ids=out, prompt_token_ids=[list(p) for p in prompts],
                                finish_reasons=reasons, prefill_ms=(t1 - t0) * 1e3,
                                decode_ms=(t2 - t1) * 1e3, decode_steps=steps)
