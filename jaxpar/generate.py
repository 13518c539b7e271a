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
    # With output_logits: per row, float32 [len(token_ids), V], the logits each token
    # was chosen from.
    logits: list[np.ndarray] | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second over the whole batch, prefill excluded."""
        n = sum(max(len(t) - 1, 0) for t in self.token_ids)
        return n / (self.decode_ms / 1e3) if self.decode_ms > 0 else float("nan")

    @property
    def timings(self) -> dict[str, float]:
        return {"compile_ms": self.compile_ms, "prefill_ms": self.prefill_ms, "decode_ms": self.decode_ms,
                "decode_steps": self.decode_steps, "decode_tokens_per_s": self.decode_tokens_per_s}


def _key(rng: jax.Array) -> jax.Array:
    """rng = [seed, step] -> the PRNG key of that step (built inside the program, so no
    key crosses from the host)."""
    return jax.random.fold_in(jax.random.key(rng[0]), rng[1])


GREEDY = (True, False)  # SamplingParams.mode() of temperature 0


def _sample(logits, rng, temperature, top_k, top_p, mode):
    greedy, filtered = mode
    return sample(logits, _key(rng), temperature, top_k, top_p, greedy=greedy, filtered=filtered)


def sampling_program() -> Callable:
    """A jitted temperature / top-k / top-p sampler over logits (`mode` static), for
    callers whose model programs return logits (pipelines: `jaxpar.pipeline`)."""
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


def _with_selection(step, n_model_args: int, treedef, name: str, mode: tuple[bool, bool],
                    with_logits: bool):
    """A program over the state's leaves (a flat list crosses the jit boundary far faster
    than an nnx.State) that runs the model and picks the next tokens in the same program:
    argmax when greedy, else a draw keyed on device by [seed, step] (the returned rng is
    [seed, step + 1], fed to the next step, so nothing but the program's own outputs
    crosses between steps). The logits leave the program only when `with_logits`."""
    greedy, filtered = mode

    def run(leaves, *args):
        model_args, extra = args[:n_model_args], args[n_model_args:]
        logits, cache = step(jax.tree.unflatten(treedef, leaves), *model_args)
        if greedy:
            out = (jnp.argmax(logits, axis=-1).astype(jnp.int32), cache)
        else:
            rng, temperature, top_k, top_p = extra
            tokens = sample(logits, _key(rng), temperature, top_k, top_p, greedy=False,
                            filtered=filtered)
            out = (tokens, cache, rng.at[1].add(1))
        return out + (logits,) if with_logits else out
    run.__name__ = run.__qualname__ = name  # names the compiled module (jit_prefill, jit_decode)
    return run


def model_programs(graphdef, treedef, mode: tuple[bool, bool] = GREEDY, with_logits: bool = False
                   ) -> tuple[Callable, Callable]:
    """The two jitted programs generation runs, for a model split into `graphdef` and a
    state whose flattened structure is `treedef`, choosing tokens as `mode` says
    (`SamplingParams.mode()`: (greedy, filtered)):

    - greedy: prefill(leaves, tokens [B, T], lengths [B], cache) -> (next [B], cache);
      decode(leaves, tokens [B], cache) -> (next [B], cache)
    - sampled: both take (rng [2] = [seed, step], temperature, top_k, top_p) after the
      cache and return (next [B], cache, rng of the next step)

    and, with `with_logits`, the float32 logits [B, V] the tokens were chosen from as a
    last output. Sampling runs inside the program: one dispatch per step. The cache is
    donated. `jaxpar plan` compiles the greedy programs on abstract inputs.
    """
    suffix = "" if mode == GREEDY else "_sampled"
    prefill = jax.jit(_with_selection(functools.partial(_prefill_logits, graphdef), 3, treedef,
                                      "prefill" + suffix, mode, with_logits), donate_argnums=3)
    decode = jax.jit(_with_selection(functools.partial(_decode_logits, graphdef), 2, treedef,
                                     "decode" + suffix, mode, with_logits), donate_argnums=2)
    return prefill, decode


def compiled_outputs(lowered):
    """Compiles a lowered program; returns its outputs as ShapeDtypeStructs with shardings."""
    compiled = lowered.compile()
    return jax.tree.map(lambda info, sharding: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding),
                        lowered.out_info, compiled.output_shardings)


class MeshSession:
    """The device side of one generate call on one mesh: its cache, the sampling inputs
    and the compiled steps. `prefill` and `decode` return a handle to the chosen tokens
    (and, with `output_logits`, their logits) without waiting; `to_host` /
    `logits_to_host` read them. (A pipeline has its own session with the same methods:
    `jaxpar.pipeline`.) The rng [seed, step] lives on the device: each step's program
    returns the next step's, so `step` is not sent."""

    def __init__(self, gen: "Generator", rows: int, cache_len: int, sampling: SamplingParams,
                 output_logits: bool = False):
        mesh = gen.sharding.mesh
        mode = gen._mode(sampling)
        self.greedy = mode == GREEDY
        self.output_logits = output_logits
        self.weights = gen._flat_state()
        self._prefill, self._decode = gen.programs(mode, output_logits)
        self.cache = init_cache(gen.cfg, gen.sharding, rows, cache_len, gen.cache_dtype)
        self.params = [] if self.greedy else [replicated(a, mesh) for a in sampling.arrays()]
        self.rng = None if self.greedy else replicated(np.array([sampling.seed, 0], np.int32), mesh)
        self.mesh = mesh

    def _sampling_inputs(self) -> list:
        return [] if self.greedy else [self.rng, *self.params]

    def _unpack(self, outputs) -> tuple[jax.Array, jax.Array | None]:
        tokens, self.cache, *rest = outputs
        if not self.greedy:
            self.rng = rest.pop(0)
        return tokens, (rest[0] if self.output_logits else None)

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray):
        return self._unpack(self._prefill(self.weights, replicated(tokens, self.mesh),
                                          replicated(lengths, self.mesh), self.cache,
                                          *self._sampling_inputs()))

    def decode(self, previous, step: int):
        return self._unpack(self._decode(self.weights, previous[0], self.cache, *self._sampling_inputs()))

    def to_host(self, handle) -> np.ndarray:
        return to_host(handle[0])

    def logits_to_host(self, handle) -> np.ndarray:
        return to_host(handle[1])


class Generator:
    """Compiled prefill and decode programs for one model.

    One pair of programs per token-selection mode (greedy, sampled, sampled with top-k /
    top-p; see `model_programs`) and per whether logits are returned; temperature, top-k,
    top-p and the seed are traced, so one compiled program serves every setting of a
    mode. Dispatch is kept cheap, since it is paid on every decode step: the graph
    definition is closed over (hashing it as a static argument costs milliseconds), the
    weights are passed as a flat list of arrays, and each step is one program whose
    inputs are the previous step's outputs.
    """

    def __init__(self, model: CausalLM, cache_dtype):
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg
        self.sharding = model.sharding
        self.cache_dtype = cache_dtype
        self._flat_of = None
        self._treedef = None
        self._programs: dict = {}  # (mode, with_logits) -> (prefill, decode)
        self._compiled: set = set()  # program signatures compiled ahead of time

    def _flat_state(self) -> list[jax.Array]:
        """The state's leaves; the programs are rebuilt if the state was replaced by one
        of another structure."""
        if self._flat_of is not self.state:
            leaves, treedef = jax.tree.flatten(self.state)
            if self._treedef is None or treedef != self._treedef:
                self._programs, self._compiled = {}, set()
                self._treedef = treedef
            self._flat_of, self._leaves = self.state, leaves
        return self._leaves

    def programs(self, mode: tuple[bool, bool] = GREEDY, with_logits: bool = False
                 ) -> tuple[Callable, Callable]:
        """(prefill, decode) for a selection mode; see `model_programs`."""
        self._flat_state()
        key = (mode, with_logits)
        if key not in self._programs:
            self._programs[key] = model_programs(self.graphdef, self._treedef, mode, with_logits)
        return self._programs[key]

    def compiled_count(self) -> int:
        """Executables compiled so far over all programs (a benchmark checks that timing
        compiles nothing)."""
        return sum(f._cache_size() for pair in self._programs.values() for f in pair)

    @staticmethod
    def _mode(sampling: SamplingParams | None) -> tuple[bool, bool]:
        return GREEDY if sampling is None or sampling.greedy else sampling.mode()

    def compile(self, rows: int, t_bucket: int, cache_len: int, sampling: SamplingParams | None = None,
                with_logits: bool = False) -> float:
        """Compiles, ahead of time, the programs a generate call of this shape runs:
        prefill, then decode for the shardings its inputs arrive with (from prefill, then
        from decode itself). Returns the milliseconds spent (0 when done before), so
        prefill and decode timings exclude compilation. The calls that follow reuse these
        executables (JAX caches them by signature)."""
        mode = self._mode(sampling)
        key = (rows, t_bucket, cache_len, mode, with_logits)
        if key in self._compiled:
            return 0.0
        t0 = time.perf_counter()
        weights = self._flat_state()
        prefill, decode = self.programs(mode, with_logits)
        rep = jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec())
        tokens = jax.ShapeDtypeStruct((rows, t_bucket), jnp.int32, sharding=rep)
        lengths = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=rep)
        cache = cache_shapes(self.cfg, self.sharding, rows, cache_len, self.cache_dtype)
        extra = []
        if mode != GREEDY:
            extra = [jax.ShapeDtypeStruct((2,), jnp.int32, sharding=rep)]
            extra += [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep) for a in sampling.arrays()]
        n_state = 2 if mode == GREEDY else 3  # (tokens, cache[, rng]) carried to the next step
        pending = [compiled_outputs(prefill.lower(weights, tokens, lengths, cache, *extra))]
        seen = []
        while pending:
            carried = pending.pop()[:n_state]
            signature = [a.sharding for a in jax.tree.leaves(carried)]
            if signature not in seen:
                seen.append(signature)
                next_tokens, cache, *rng = carried
                pending.append(compiled_outputs(decode.lower(weights, next_tokens, cache, *rng, *extra[1:])))
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

    def session(self, rows: int, cache_len: int, sampling: SamplingParams,
                output_logits: bool = False) -> MeshSession:
        return MeshSession(self, rows, cache_len, sampling, output_logits)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams, *, stop_ids: set[int],
                 detokenize: Callable[[list[int]], str] | None = None,
                 stop_strings: Sequence[str] = (),
                 stream: Callable[[int, str], None] | None = None,
                 output_logits: bool = False) -> GenerationResult:
        """`output_logits`: also return, per row, the float32 logits each generated token
        was chosen from (as HF generate's `output_logits`); otherwise the programs return
        only tokens."""
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

        compile_ms = self.compile(rows, t_bucket, cache_len, sampling, output_logits)
        session = self.session(rows, cache_len, sampling, output_logits)

        t0 = time.perf_counter()
        next_tok = session.prefill(tokens, lengths)
        first = session.to_host(next_tok)
        t1 = time.perf_counter()

        # As HF generate and vLLM: a stop id ends the row and stays in its token ids, but
        # not in its text (jaxpar.stopping, shared with the engine).
        seqs = [SequenceOutput(max_new_tokens=max_new_tokens, stop_ids=stop_ids, stop_strings=stop_strings,
                               detokenize=detokenize, track_text=stream is not None)
                for _ in range(batch)]
        row_logits: list[list[np.ndarray]] = [[] for _ in range(batch)]
        steps = 0

        def accept(row: int, tok: int, step_logits: np.ndarray | None) -> None:
            delta = seqs[row].add(tok)
            if step_logits is not None:
                row_logits[row].append(step_logits[row])
            if stream and delta:
                stream(row, delta)

        first_logits = session.logits_to_host(next_tok) if output_logits else None
        for row in range(batch):
            accept(row, int(first[row]), first_logits)
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
            host_logits = session.logits_to_host(current) if output_logits else None
            for row in range(batch):
                if not seqs[row].done:
                    accept(row, int(host[row]), host_logits)
        t2 = time.perf_counter()

        return GenerationResult(texts=[q.final_text() for q in seqs], token_ids=[q.token_ids for q in seqs],
                                prompt_token_ids=[list(p) for p in prompts],
                                finish_reasons=[q.finish_reason for q in seqs], prefill_ms=(t1 - t0) * 1e3,
                                decode_ms=(t2 - t1) * 1e3, decode_steps=steps, compile_ms=compile_ms,
                                logits=[np.stack(r) for r in row_logits] if output_logits else None)
