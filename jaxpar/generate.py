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
from jaxpar.models.decoder import CausalLM, cache_shapes, init_cache
from jaxpar.sampling import SamplingParams, sample
from jaxpar.sharding.host import replicated, to_host
from jaxpar.stopping import SequenceOutput

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
    # Compiling the programs this call needed (ahead of time, outside prefill and decode).
    compile_ms: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second over the whole batch, prefill excluded."""
        n = sum(max(len(t) - 1, 0) for t in self.token_ids)
        return n / (self.decode_ms / 1e3) if self.decode_ms > 0 else float("nan")

    @property
    def timings(self) -> dict[str, float]:
        return {"compile_ms": self.compile_ms, "prefill_ms": self.prefill_ms, "decode_ms": self.decode_ms,
                "decode_steps": self.decode_steps, "decode_tokens_per_s": self.decode_tokens_per_s}


def _key(seed_step: jax.Array) -> jax.Array:
    """[seed, step] -> the PRNG key of that step (built inside the program, so only plain
    integers cross from the host)."""
    return jax.random.fold_in(jax.random.key(seed_step[0]), seed_step[1])


def _sample(logits, seed_step, temperature, top_k, top_p, mode):
    # mode None: greedy / filtered decided at run time; (greedy, filtered): fixed statically.
    greedy, filtered = mode if mode is not None else (None, None)
    return sample(logits, _key(seed_step), temperature, top_k, top_p, greedy=greedy,
                  filtered=filtered)


def sampling_program() -> Callable:
    """The jitted temperature / top-k / top-p sampler over logits (`mode` static)."""
    return jax.jit(_sample, static_argnames="mode")


def _prefill_logits(graphdef, state, tokens, lengths, cache):
    model: CausalLM = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return model(tokens, positions, cache, lengths, mode="prefill", last_only=True)


def _decode_logits(graphdef, state, tokens, cache: Cache):
    model: CausalLM = nnx.merge(graphdef, state)
    positions = cache.lengths[:, None]
    return model(tokens[:, None], positions, cache, jnp.ones_like(cache.lengths),
                 mode="decode", last_only=True)


def _with_argmax(step, treedef, name: str):
    """A program over the state's leaves (a flat list crosses the jit boundary far faster
    than an nnx.State), returning the greedy tokens, the logits and the cache."""
    def run(leaves, *args):
        logits, cache = step(jax.tree.unflatten(treedef, leaves), *args)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, cache
    run.__name__ = run.__qualname__ = name  # names the compiled module (jit_prefill, jit_decode)
    return run


def model_programs(graphdef, treedef) -> tuple[Callable, Callable]:
    """The two jitted programs generation runs, for a model split into `graphdef` and a
    state whose flattened structure is `treedef`:

    - prefill(leaves, tokens [B, T], lengths [B], cache) -> (greedy [B], logits [B, V], cache)
    - decode(leaves, tokens [B], cache) -> (greedy [B], logits [B, V], cache)

    The cache is donated. `jaxpar plan` compiles these same programs on abstract inputs.
    """
    prefill = jax.jit(_with_argmax(functools.partial(_prefill_logits, graphdef), treedef, "prefill"),
                      donate_argnums=3)
    decode = jax.jit(_with_argmax(functools.partial(_decode_logits, graphdef), treedef, "decode"),
                     donate_argnums=2)
    return prefill, decode


def _compiled_outputs(lowered):
    """Compiles a lowered program; returns its outputs as ShapeDtypeStructs with shardings."""
    compiled = lowered.compile()
    return jax.tree.map(lambda info, sharding: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding),
                        lowered.out_info, compiled.output_shardings)
class MeshSession:
    """The device side of one generate call on one mesh: its cache, the sampling inputs
    and the compiled steps. `prefill` and `decode` return the chosen tokens as a device
    array without waiting for them; `to_host` reads them. (A pipeline has its own session
    with the same three methods: `jaxpar.pipeline`.)"""

    def __init__(self, gen: "Generator", rows: int, cache_len: int, sampling: SamplingParams):
        self.gen = gen
        self.sampling = sampling
        self.mesh = gen.sharding.mesh
        self.params = [replicated(a, self.mesh) for a in sampling.arrays()]
        self.weights = gen._flat_state()
        self.cache = init_cache(gen.cfg, gen.sharding, rows, cache_len, gen.cache_dtype)

    def _choose(self, greedy_tokens, logits, step: int):
        if self.sampling.greedy:
            return greedy_tokens
        seed_step = replicated(np.array([self.sampling.seed, step], np.int32), self.mesh)
        return self.gen.sample(logits, seed_step, *self.params, mode=self.sampling.mode())

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray) -> jax.Array:
        greedy_tokens, logits, self.cache = self.gen.prefill(
            self.weights, replicated(tokens, self.mesh), replicated(lengths, self.mesh), self.cache)
        return self._choose(greedy_tokens, logits, 0)

    def decode(self, tokens: jax.Array, step: int) -> jax.Array:
        greedy_tokens, logits, self.cache = self.gen.decode(self.weights, tokens, self.cache)
        return self._choose(greedy_tokens, logits, step)

    def to_host(self, tokens: jax.Array) -> np.ndarray:
        return to_host(tokens)


class Generator:
    """Compiled prefill and decode programs for one model.

    The model programs return the greedy tokens *and* the logits, so one compiled program
    per (batch, length bucket) serves every sampling setting; temperature / top-k / top-p
    sampling is a separate small program (compiled per batch size and mode, independent
    of lengths). Dispatch is kept cheap, since it is paid on every decode step: the graph
    definition is closed over (hashing it as a static argument costs milliseconds) and
    the weights are passed as a flat list of arrays.
    """

    def __init__(self, model: CausalLM, cache_dtype):
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg
        self.sharding = model.sharding
        self.cache_dtype = cache_dtype
        self.sample = jax.jit(_sample, static_argnames="mode")
        self._flat_of = None
        self._treedef = None
        self._compiled: set = set()  # program signatures compiled ahead of time

    def _flat_state(self) -> list[jax.Array]:
        """The state's leaves; the programs are (re)built if the state was replaced by
        one of another structure."""
        if self._flat_of is not self.state:
            leaves, treedef = jax.tree.flatten(self.state)
            if self._treedef is None or treedef != self._treedef:
                self.prefill, self.decode = model_programs(self.graphdef, treedef)
                self._treedef = treedef
                self._compiled = set()
            self._flat_of, self._leaves = self.state, leaves
        return self._leaves

    def compile(self, rows: int, t_bucket: int, cache_len: int, sampling: SamplingParams | None = None
                ) -> float:
        """Compiles, ahead of time, every program a generate call of this shape runs:
        prefill, decode (for the shardings its inputs arrive with: from prefill, then from
        decode itself) and, when sampling, the sampler. Returns the milliseconds spent (0
        when done before), so prefill and decode timings exclude compilation. The calls
        that follow reuse these executables (JAX caches them by signature)."""
        mode = None if sampling is None or sampling.greedy else sampling.mode()
        key = (rows, t_bucket, cache_len, mode)
        if key in self._compiled:
            return 0.0
        t0 = time.perf_counter()
        weights = self._flat_state()
        rep = jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec())
        tokens = jax.ShapeDtypeStruct((rows, t_bucket), jnp.int32, sharding=rep)
        lengths = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=rep)
        cache = cache_shapes(self.cfg, self.sharding, rows, cache_len, self.cache_dtype)
        pending = [_compiled_outputs(self.prefill.lower(weights, tokens, lengths, cache))]
        seen = []
        while pending:
            next_tokens, logits, cache = pending.pop()
            if mode is not None:
                params = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep) for a in sampling.arrays()]
                seed_step = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=rep)
                self.sample.lower(logits, seed_step, *params, mode=mode).compile()
            signature = [a.sharding for a in jax.tree.leaves((next_tokens, cache))]
            if signature not in seen:
                seen.append(signature)
                pending.append(_compiled_outputs(self.decode.lower(weights, next_tokens, cache)))
        self._compiled.add(key)
        return (time.perf_counter() - t0) * 1e3
    def padded_rows(self, batch: int) -> int:
        """Rows the device batch has for `batch` prompts: batch-split attention needs a
        multiple of its split (padding rows repeat the first prompt; dropped)."""
        return _round_up(batch, self.sharding.batch_multiple)

    @property
    def seq_multiple(self) -> int:
        """Sequence-split layouts (SP, DCP) need prefill lengths that are multiples of this."""
        return self.sharding.seq_multiple

    def session(self, rows: int, cache_len: int, sampling: SamplingParams) -> MeshSession:
        return MeshSession(self, rows, cache_len, sampling)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams, *, stop_ids: set[int],
                 detokenize: Callable[[list[int]], str] | None = None,
                 stop_strings: Sequence[str] = (),
                 stream: Callable[[int, str], None] | None = None) -> GenerationResult:
        if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer))
                or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        if not prompts:
            raise ValueError("no prompts given")
        context = self.cfg.max_position_embeddings
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token id(s) {bad[:5]} outside the vocabulary "
                                 f"[0, {self.cfg.vocab_size})")
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
        rows = self.padded_rows(batch)
        t_bucket = _round_up(bucket(max(len(p) for p in prompts)), self.seq_multiple)
        cache_len = _round_up(bucket(max(t_bucket, max(len(p) for p in prompts) + max_new_tokens)),
                              self.seq_multiple)
        padded = list(prompts) + [prompts[0]] * (rows - batch)
        tokens = np.zeros((rows, t_bucket), np.int32)
        for i, p in enumerate(padded):
            tokens[i, : len(p)] = p
        lengths = np.array([len(p) for p in padded], np.int32)

        compile_ms = self.compile(rows, t_bucket, cache_len, sampling)
        session = self.session(rows, cache_len, sampling)

        t0 = time.perf_counter()
        next_tok = session.prefill(tokens, lengths)
        first = session.to_host(next_tok)
        t1 = time.perf_counter()

        # As HF generate and vLLM: a stop id ends the row and stays in its token ids, but
        # not in its text (jaxpar.stopping, shared with the engine).
        seqs = [SequenceOutput(max_new_tokens=max_new_tokens, stop_ids=stop_ids, stop_strings=stop_strings,
                               detokenize=detokenize, track_text=stream is not None)
                for _ in range(batch)]
        steps = 0

        def accept(row: int, tok: int) -> None:
            delta = seqs[row].add(tok)
            if stream and delta:
                stream(row, delta)

        for row in range(batch):
            accept(row, int(first[row]))
        # Step s+1 is dispatched before step s's tokens are read back, so the host's work
        # (reading, stop checks, detokenising, the next dispatch) overlaps the device's.
        # Only an EOS or a stop string can make that step unneeded; it is then dropped.
        current, ahead = next_tok, None
        while not all(q.done for q in seqs):
            steps += 1
            if ahead is None:
                ahead = session.decode(current, steps)
            current, ahead = ahead, None
            if max(len(q.token_ids) for q in seqs if not q.done) + 1 < max_new_tokens:
                ahead = session.decode(current, steps + 1)
            host = session.to_host(current)
            for row in range(batch):
                if not seqs[row].done:
                    accept(row, int(host[row]))
        t2 = time.perf_counter()

        return GenerationResult(texts=[q.final_text() for q in seqs], token_ids=[q.token_ids for q in seqs],
                                prompt_token_ids=[list(p) for p in prompts],
                                finish_reasons=[q.finish_reason for q in seqs], prefill_ms=(t1 - t0) * 1e3,
                                decode_ms=(t2 - t1) * 1e3, decode_steps=steps, compile_ms=compile_ms)
