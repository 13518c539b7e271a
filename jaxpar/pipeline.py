"""Pipeline parallelism at run time: stage models, their programs, and generation with
chunked prefill and micro-batched decode flowing through the stages.

A `PipelineSharding` (`jaxpar.sharding.model_sharding`) gives every stage its own mesh
and the part of the model it holds; each stage is the one decoder (`CausalLM`) built for
that part. Work moves through the stages in units: a unit is one micro-batch of rows and,
during prefill, one chunk of the prompt (prefill of a long prompt is split into chunks
run with `mode="extend"`, so that stage s+1 works on chunk c while stage s works on chunk
c+1). Between stages the hidden states [B, T, E] are moved onto the next stage's devices
with `jax.device_put`; the chosen tokens go from the last stage back to the first. Every
call is dispatched asynchronously and each device runs its queue in order, so once the
pipeline is full all stages are busy (docs/ARCHITECTURE.md, section 10.1).

Decode keeps `pp` micro-batches of rows in flight, each with its own cache on every stage:
while the last stage computes micro-batch m's tokens, the first stage already runs
micro-batch m+1.

Under `jax.distributed` a process builds, loads and runs only the stages that hold some
of its devices; between stages of different processes `jax.device_put` sends the
activations across (the CPU backend needs `jax_cross_host_transfer_socket_address` set;
see the README), and a process that does not hold a stage stands in for its outputs with
empty arrays of the right shape (`jax.make_array_from_single_device_arrays`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpar.assembly import OpenedCheckpoint, ReadStats, abstract_model
from jaxpar.config import ModelConfig
from jaxpar.generate import Generator, sampling_program
from jaxpar.models.decoder import CausalLM, init_cache
from jaxpar.models.options import RuntimeOptions
from jaxpar.sampling import SamplingParams
from jaxpar.sharding.host import to_host
from jaxpar.sharding.model_sharding import ModelSharding, PipelineSharding

# Prompt tokens per prefill chunk when none is given: long prompts flow through the stages
# in chunks of this size (a prompt no longer than one chunk is one prefill step).
DEFAULT_PREFILL_CHUNK = 256


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def holds(sharding: ModelSharding) -> bool:
    """Whether this process holds any device of the stage (always, in one process)."""
    me = jax.process_index()
    return any(d.process_index == me for d in sharding.mesh.devices.flat)


def bubble_fraction(stages: int, units: int) -> float:
    """Idle share of a pipeline of `stages` equal stages that runs `units` equal units of
    work in order (GPipe's (p - 1) / (m + p - 1))."""
    return (stages - 1) / (units + stages - 1)


@dataclasses.dataclass
class PipelineModel:
    """A model split into pipeline stages: `stages[s]` is stage s's `CausalLM`, or None
    where this process holds none of that stage's devices. `read[s]`: what loading stage
    s read from the checkpoint (None where not loaded here)."""

    cfg: ModelConfig
    sharding: PipelineSharding
    stages: list[CausalLM | None]
    read: list[ReadStats | None]

    @classmethod
    def load(cls, ckpt: OpenedCheckpoint, sharding: PipelineSharding, dtype,
             options: RuntimeOptions = RuntimeOptions(),
             progress: Callable[[Iterable], Iterable] | None = None) -> "PipelineModel":
        """Builds and loads the stages this process holds, each reading only its own
        tensors (its layers; the embedding on the first, the final norm and head on the
        last) and only its devices' blocks of them."""
        stages, read = [], []
        for stage in sharding.stages:
            if not holds(stage):
                stages.append(None)
                read.append(None)
                continue
            graphdef, state = abstract_model(ckpt.cfg, stage, dtype, options,
                                             fp8_from=None if ckpt.dequantize else ckpt)
            stats = ReadStats()
            state = ckpt.load_state(state, stage, dtype, progress=progress, stats=stats)
            stages.append(nnx.merge(graphdef, state))
            read.append(stats)
        return cls(ckpt.cfg, sharding, stages, read)


# --------------------------------------------------------------------------- programs


def _stage_step(graphdef, treedef, last: bool, activation: NamedSharding, mode: str,
                leaves, inputs, lengths, cache, prev_logits=None):
    """One stage's part of a step. `inputs`: token ids [B, T] ([B] at decode) on the first
    stage, the previous stage's hidden states [B, T, E] on the others. Returns the hidden
    states (laid out for the hand-over) and the cache, or on the last stage the greedy
    tokens, the logits of each row's last valid token and the cache. In a prefill chunk
    (`prev_logits` given) a row with no token in the chunk keeps its earlier logits."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    if inputs.ndim == 1:
        inputs = inputs[:, None]
    b, t = inputs.shape[:2]
    steps = jnp.arange(t, dtype=jnp.int32)
    if mode == "prefill":
        positions = jnp.broadcast_to(steps, (b, t))
    elif mode == "extend":
        positions = cache.lengths[:, None] + steps
    else:
        positions = cache.lengths[:, None]
        lengths = jnp.ones_like(cache.lengths)
    out, cache = model(inputs, positions, cache, lengths, mode=mode, last_only=last)
    if not last:
        return jax.lax.with_sharding_constraint(out, activation), cache
    if prev_logits is not None:
        out = jnp.where((lengths > 0)[:, None], out, prev_logits)
    # Tokens leave replicated: the layout the first stage (and every process) reads them in.
    greedy = jax.lax.with_sharding_constraint(jnp.argmax(out, axis=-1).astype(jnp.int32),
                                              NamedSharding(activation.mesh, P()))
    return greedy, out, cache


def _stage_forward(graphdef, treedef, last: bool, activation: NamedSharding, leaves, inputs):
    """A stage without a cache over whole sequences: hidden states, or all logits [B, T, V]."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    b, t = inputs.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out, _ = model(inputs, positions, None, jnp.full((b,), t, jnp.int32), mode="prefill")
    return out if last else jax.lax.with_sharding_constraint(out, activation)


@dataclasses.dataclass(frozen=True)
class StagePrograms:
    """A stage's jitted programs over its weights as a flat list of leaves:

    - prefill(leaves, inputs [B, T(, E)], lengths [B], cache), the first chunk of a prompt
    - extend(leaves, inputs, lengths, cache[, prev_logits on the last stage]), later chunks
    - decode(leaves, inputs [B] or [B, 1, E], None, cache), one token
    - forward(leaves, inputs), whole sequences without a cache

    Each returns the hidden states and the cache, or on the last stage the greedy tokens,
    the logits and the cache. The cache is donated (and a chunk's earlier logits).
    `jaxpar plan` compiles these same programs on abstract inputs."""

    prefill: Callable
    extend: Callable
    decode: Callable
    forward: Callable


def stage_programs(graphdef, treedef, sharding: ModelSharding) -> StagePrograms:
    last, activation = sharding.head is not None, sharding.activation_sharding()
    step = functools.partial(_stage_step, graphdef, treedef, last, activation)
    return StagePrograms(
        prefill=jax.jit(functools.partial(step, "prefill"), donate_argnums=3),
        extend=jax.jit(functools.partial(step, "extend"), donate_argnums=(3, 4) if last else 3),
        decode=jax.jit(functools.partial(step, "decode"), donate_argnums=3),
        forward=jax.jit(functools.partial(_stage_forward, graphdef, treedef, last, activation)))


class Stage:
    """One pipeline stage at run time: its sharding, and if this process holds it, its
    weights (`leaves`) and its programs (`StagePrograms`, as attributes)."""

    def __init__(self, module: CausalLM | None, sharding: ModelSharding):
        self.sharding = sharding
        self.mesh = sharding.mesh
        self.index = sharding.stage
        self.first = sharding.embed is not None
        self.last = sharding.head is not None
        self.held = module is not None
        self.activation = sharding.activation_sharding()
        self.replicated = NamedSharding(self.mesh, P())
        if not self.held:
            return
        graphdef, state = nnx.split(module)
        self.leaves, treedef = jax.tree.flatten(state)
        programs = stage_programs(graphdef, treedef, sharding)
        self.prefill, self.extend = programs.prefill, programs.extend
        self.decode, self.forward = programs.decode, programs.forward

    def put(self, x: np.ndarray) -> jax.Array | None:
        """A host value (token ids, lengths) replicated on the stage's devices."""
        if not self.held:
            return None
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, self.replicated, lambda index: x[index])


def _absent(shape: tuple[int, ...], dtype, sharding: NamedSharding) -> jax.Array:
    """Stands in for a value on devices this process does not hold (for a transfer)."""
    return jax.make_array_from_single_device_arrays(shape, sharding, [], dtype=dtype)


def transfer(x: jax.Array | None, src: Stage, dst: Stage, sharding: NamedSharding,
             shape: tuple[int, ...], dtype) -> jax.Array | None:
    """Moves `x` (on `src`'s devices) onto `sharding` on `dst`'s devices: `jax.device_put`,
    which every process holding either stage takes part in. Returns None in a process
    that does not hold `dst`."""
    if not (src.held or dst.held):
        return None
    if x is None:
        x = _absent(shape, dtype, src.activation if len(shape) == 3 else src.replicated)
    y = jax.device_put(x, sharding)
    return y if dst.held else None


# --------------------------------------------------------------------------- generation


class PipelineSession:
    """The device side of one generate call over a pipeline (the same methods as
    `jaxpar.generate.MeshSession`). Rows are split into micro-batches of `mb_rows`, each
    with its own cache on every stage; tokens are handed around as one array per
    micro-batch, on the last stage."""

    def __init__(self, gen: "PipelineGenerator", rows: int, cache_len: int, sampling: SamplingParams):
        self.gen = gen
        self.stages = gen.stages
        self.sampling = sampling
        self.mb_rows = gen.micro_batch_rows(rows)
        self.micro_batches = rows // self.mb_rows
        last = self.stages[-1]
        self.params = [last.put(a) for a in sampling.arrays()]
        self.caches = [[init_cache(gen.cfg, st.sharding, self.mb_rows, cache_len, gen.cache_dtype)
                        if st.held else None for st in self.stages] for _ in range(self.micro_batches)]

    def _choose(self, greedy_tokens, logits, step: int):
        if self.sampling.greedy or greedy_tokens is None:
            return greedy_tokens
        last = self.stages[-1]
        seed_step = last.put(np.array([self.sampling.seed, step], np.int32))
        tokens = self.gen.sample(logits, seed_step, *self.params, mode=self.sampling.mode())
        return jax.device_put(tokens, last.replicated)

    def _through(self, m: int, x, lengths: np.ndarray | None, t: int, mode: str, prev_logits=None):
        """Runs micro-batch m's unit (`x`: token ids on the first stage) through every
        stage; returns (greedy tokens, logits) on the last stage."""
        hidden = (self.mb_rows, t, self.gen.cfg.hidden_size)
        out = None
        for s, st in enumerate(self.stages):
            if s > 0:
                x = transfer(x, self.stages[s - 1], st, st.activation, hidden, self.gen.cache_dtype)
            if not st.held:
                x = None
                continue
            program = getattr(st, mode)
            cache = self.caches[m][s]
            if mode == "decode":
                out = program(st.leaves, x, None, cache)
            elif st.last and mode == "extend":
                out = program(st.leaves, x, st.put(lengths), cache, prev_logits)
            else:
                out = program(st.leaves, x, st.put(lengths), cache)
            if st.last:
                greedy, logits, self.caches[m][s] = out
                return greedy, logits
            x, self.caches[m][s] = out
        return None, None

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray) -> list:
        """Each micro-batch's prompt rows in chunks (the first chunk a prefill step, the
        rest extend steps), chunks a micro-batch's rows all finished before skipped.
        Everything is dispatched before anything is read back."""
        t = tokens.shape[1]
        chunk = min(self.gen.chunk_for(t), t)
        first = self.stages[0]
        out = []
        for m in range(self.micro_batches):
            rows = slice(m * self.mb_rows, (m + 1) * self.mb_rows)
            tok, lens = tokens[rows], lengths[rows]
            greedy = logits = None
            for c in range(math.ceil(int(lens.max()) / chunk)):
                piece = np.zeros((self.mb_rows, chunk), np.int32)
                width = min(chunk, t - c * chunk)
                piece[:, :width] = tok[:, c * chunk: c * chunk + width]
                valid = np.clip(lens - c * chunk, 0, chunk).astype(np.int32)
                greedy, logits = self._through(m, first.put(piece), valid, chunk,
                                               "prefill" if c == 0 else "extend", logits)
            out.append(self._choose(greedy, logits, 0))
        return out

    def decode(self, tokens: list, step: int) -> list:
        """One decode step of every micro-batch: its tokens go from the last stage to the
        first, then through the stages."""
        first, last = self.stages[0], self.stages[-1]
        out = []
        for m, tok in enumerate(tokens):
            x = tok if len(self.stages) == 1 else transfer(tok, last, first, first.replicated,
                                                           (self.mb_rows,), jnp.int32)
            greedy, logits = self._through(m, x, None, 1, "decode")
            out.append(self._choose(greedy, logits, step))
        return out

    def to_host(self, tokens: list) -> np.ndarray:
        """The tokens of every micro-batch, in row order. Under `jax.distributed` every
        process gets them: they are sent from the last stage to each other stage, and
        each process reads them on a stage it holds."""
        if jax.process_count() == 1:
            return np.concatenate([to_host(t) for t in tokens])
        last = self.stages[-1]
        rows = []
        for tok in tokens:
            mine = tok  # None unless this process holds the last stage
            for st in self.stages[:-1]:
                copy = transfer(tok, last, st, st.replicated, (self.mb_rows,), jnp.int32)
                mine = copy if mine is None else mine
            rows.append(to_host(mine))
        return np.concatenate(rows)


class PipelineGenerator(Generator):
    """`jaxpar.generate.Generator` over a pipeline: the same generation loop (sampling,
    stop checks, streaming), with prefill and decode run by a `PipelineSession`."""

    def __init__(self, model: PipelineModel, cache_dtype, prefill_chunk: int | None = None):
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be a whole number of tokens >= 1, got {prefill_chunk!r}")
        self.model = model
        self.cfg = model.cfg
        self.sharding = model.sharding
        self.cache_dtype = cache_dtype
        self.prefill_chunk = prefill_chunk or DEFAULT_PREFILL_CHUNK
        self.sample = sampling_program()
        self.stages = [Stage(module, sharding) for module, sharding in zip(model.stages, model.sharding.stages)]

    def compile(self, rows: int, t_bucket: int, cache_len: int, sampling: SamplingParams | None = None,
                with_logits: bool = False) -> float:
        """Stage programs compile on their first call (each stage on its own devices, chunk
        and micro-batch shapes known only then): the first generate call's prefill_ms
        includes that compilation, and this returns 0."""
        return 0.0

    def micro_batch_rows(self, rows: int) -> int:
        """Rows per micro-batch: the batch split into (up to) pp micro-batches, each a
        multiple of the batch split attention needs."""
        return _round_up(-(-rows // len(self.stages)), self.sharding.batch_multiple)

    def padded_rows(self, batch: int) -> int:
        mb = self.micro_batch_rows(batch)
        return -(-batch // mb) * mb

    @property
    def seq_multiple(self) -> int:
        return self.sharding.seq_multiple

    def chunk_for(self, t: int) -> int:
        """The prefill chunk for a padded prompt length `t`: `prefill_chunk` rounded up to
        what sequence-split layouts need."""
        return _round_up(min(self.prefill_chunk, t), self.seq_multiple)

    def session(self, rows: int, cache_len: int, sampling: SamplingParams,
                output_logits: bool = False) -> PipelineSession:
        if output_logits:
            raise ValueError("output_logits is not supported over a pipeline (pp > 1): the "
                             "logits stay on the last stage; use model.logits() for them")
        return PipelineSession(self, rows, cache_len, sampling)

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        """Full forward without a cache through the stages: float32 logits [B, T, V]
        (read on a process that holds the last stage)."""
        tokens = np.asarray(tokens, np.int32)
        hidden = tokens.shape + (self.cfg.hidden_size,)
        x = self.stages[0].put(tokens)
        for s, st in enumerate(self.stages):
            if s > 0:
                x = transfer(x, self.stages[s - 1], st, st.activation, hidden, self.cache_dtype)
            x = st.forward(st.leaves, x) if st.held else None
        if x is None:
            raise ValueError("logits are computed on the last pipeline stage, which this process "
                             "does not hold; read them on a process that holds it")
        return to_host(x)


def stage_param_bytes(model: PipelineModel) -> list[int | None]:
    """Parameter bytes of each stage this process holds (all devices together)."""
    out = []
    for module in model.stages:
        if module is None:
            out.append(None)
            continue
        out.append(sum(int(np.prod(v.shape)) * v.dtype.itemsize
                       for v in jax.tree.leaves(nnx.state(module, nnx.Param))))
    return out


__all__ = ["DEFAULT_PREFILL_CHUNK", "PipelineGenerator", "PipelineModel", "PipelineSession", "Stage",
           "StagePrograms", "bubble_fraction", "holds", "stage_param_bytes", "stage_programs", "transfer"]
