"""Speculative decoding with the model's own multi-token-prediction (MTP) layers.

`LoadedModel.generate(..., speculative="mtp", num_speculative_tokens=k)` (greedy only).

Per row the state is: the main cache holding positions 0..L-1, the pending token t_L (the
main model's latest choice, not yet fed to it), the MTP cache holding MTP positions
0..L-1 (MTP position i reads the main model's final hidden state h_i and the token t_{i+1})
and k draft tokens d_1..d_k for positions L+1..L+k. One step, one compiled program:

1. Verify: the main model runs once over [t_L, d_1, ..., d_k] (positions L..L+k, "extend")
   and picks g_0..g_k greedily. The first m drafts with d_j == g_{j-1} are accepted; the
   step emits g_0..g_m (m + 1 tokens, exactly what plain greedy decoding would emit) and
   g_m becomes the pending token. The cache keeps positions up to L + m: lengths roll
   back; the key/value slots past them are stale and overwritten later. Layers with a
   recurrent state (Gated DeltaNet) cannot roll back, so when a row rejects a draft the
   accepted tokens are run again from the state saved before the step (a second forward
   in the same program, only on such steps).
2. Draft: MTP layer 0 runs over the m + 1 new positions (hidden states h_L..h_{L+m} of the
   verify pass, tokens g_0..g_m), its last position proposes d_1; d_2..d_k come from
   feeding each draft back (the MTP layer's own output as the hidden state) one position
   further. Those extra positions' MTP cache entries are speculative and overwritten by
   the next step's real inputs.

The output equals plain greedy decoding token for token; `acceptance_rate` = accepted
drafts / proposed drafts over the active rows.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.config import LINEAR_ATTENTION
from jaxpar.generate import GenerationResult, bucket, compiled_outputs
from jaxpar.models.cache import Cache
from jaxpar.models.decoder import cache_shapes, init_cache
from jaxpar.models.mtp import CausalLMWithMTP, init_mtp_cache, mtp_cache_shapes
from jaxpar.sampling import SamplingParams
from jaxpar.sharding.host import replicated, to_host
from jaxpar.stopping import SequenceOutput

SPECULATIVE_METHODS = ("mtp",)


class SpeculativeError(ValueError):
    """Speculative decoding was asked for something it cannot do (no MTP layers, sampling)."""


@dataclasses.dataclass
class SpeculativeResult(GenerationResult):
    """A generation result plus the draft statistics of speculative decoding."""

    draft_tokens: int = 0  # drafts proposed to active rows
    accepted_tokens: int = 0  # of which the main model accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else float("nan")

    @property
    def timings(self) -> dict[str, float]:
        return {**super().timings, "acceptance_rate": self.acceptance_rate,
                "tokens_per_step": (sum(len(t) for t in self.token_ids) / max(self.decode_steps, 1))}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _accepted(drafts: jax.Array, greedy: jax.Array) -> jax.Array:
    """Leading drafts equal to the main model's choices: drafts [B, k], greedy [B, k+1] -> [B]."""
    match = (drafts == greedy[:, :-1]).astype(jnp.int32)
    return jnp.sum(jnp.cumprod(match, axis=1), axis=1)


def _mix_states(verified: Cache, before: Cache, recurrent: tuple[bool, ...]) -> Cache:
    """Attention caches of `verified` (their stale slots are masked by length), recurrent
    states and lengths from `before`."""
    layers = tuple(b if r else v for v, b, r in zip(verified.layers, before.layers, recurrent))
    return Cache(layers=layers, lengths=before.lengths)


def _draft_more(model: CausalLMWithMTP, first: jax.Array, hidden: jax.Array, mtp_cache: Cache,
                k: int) -> tuple[jax.Array, Cache]:
    """Drafts 2..k: MTP layer 0 fed its own previous output and draft, one position further
    each time, at speculative positions (lengths are restored afterwards).
    first [B]; hidden [B, 1, E]. -> (drafts [B, k], cache)."""
    drafts = [first]
    cache = mtp_cache
    token = first
    for _ in range(k - 1):
        pos = cache.lengths[:, None]
        logits, out, layer = model.draft(0, token[:, None], hidden, pos, cache.layers[0],
                                         jnp.ones_like(cache.lengths), mode="decode")
        cache = Cache(layers=(layer,) + cache.layers[1:], lengths=cache.lengths + 1)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        hidden = out
        drafts.append(token)
    return jnp.stack(drafts, axis=1), Cache(layers=cache.layers, lengths=mtp_cache.lengths)


def _prefill(graphdef, k: int, leaves, treedef, tokens, lengths, cache, mtp_cache):
    """Main prefill + MTP prefill: -> (first token [B], drafts [B, k], cache, mtp_cache)."""
    model: CausalLMWithMTP = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, cache, hidden = model(tokens, positions, cache, lengths, mode="prefill", last_only=True,
                                  return_hidden=True)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # MTP position i reads h_i and the token at i + 1 (the first generated one at the end).
    rows = jnp.arange(tokens.shape[0])
    ahead = jnp.roll(tokens, -1, axis=1).at[rows, lengths - 1].set(first)
    logits, out, layer = model.draft(0, ahead, hidden, positions, mtp_cache.layers[0], lengths, mode="prefill")
    mtp_cache = Cache(layers=(layer,) + mtp_cache.layers[1:], lengths=mtp_cache.lengths + lengths)
    d1 = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    last = jnp.take_along_axis(out, (lengths - 1)[:, None, None], axis=1)
    drafts, mtp_cache = _draft_more(model, d1, last, mtp_cache, k)
    return first, drafts, cache, mtp_cache


def _step(graphdef, k: int, recurrent: tuple[bool, ...], leaves, treedef, pending, drafts, cache, mtp_cache):
    """One verify + draft step: -> (emitted [B, k+1] (the first m+1 valid), m [B], pending,
    drafts, cache, mtp_cache)."""
    model: CausalLMWithMTP = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    b = pending.shape[0]
    tokens = jnp.concatenate([pending[:, None], drafts], axis=1)  # [B, k+1]
    positions = cache.lengths[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None]
    full = jnp.full((b,), k + 1, jnp.int32)
    logits, verified, hidden = model(tokens, positions, cache, full, mode="extend", return_hidden=True)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, k+1]
    m = _accepted(drafts, greedy)
    if any(recurrent):
        def rerun():
            mixed = _mix_states(verified, cache, recurrent)
            return model(tokens, positions, mixed, m + 1, mode="extend")[1]

        new_cache = jax.lax.cond(jnp.all(m == k), lambda: verified, rerun)
    else:
        new_cache = verified
    new_cache = Cache(layers=new_cache.layers, lengths=cache.lengths + m + 1)
    # The MTP layer over the m + 1 new positions: h_{L+j} with the token at L+j+1 = g_j.
    mpos = mtp_cache.lengths[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None]
    mlogits, out, layer = model.draft(0, greedy, hidden, mpos, mtp_cache.layers[0], m + 1, mode="extend")
    mtp_cache = Cache(layers=(layer,) + mtp_cache.layers[1:], lengths=mtp_cache.lengths + m + 1)
    d1 = jnp.argmax(mlogits, axis=-1).astype(jnp.int32)
    last = jnp.take_along_axis(out, m[:, None, None], axis=1)
    new_drafts, mtp_cache = _draft_more(model, d1, last, mtp_cache, k)
    pending = jnp.take_along_axis(greedy, m[:, None], axis=1)[:, 0]
    return greedy, m, pending, new_drafts, new_cache, mtp_cache


class MTPSpeculator:
    """Compiled programs for MTP speculative decoding of one model (greedy)."""

    def __init__(self, model: CausalLMWithMTP, cache_dtype, num_speculative_tokens: int):
        if not isinstance(model, CausalLMWithMTP):
            raise SpeculativeError(f"speculative='mtp' needs multi-token-prediction layers; this "
                                   f"{model.cfg.model_type} model has none loaded (its checkpoint or "
                                   "config declares none)")
        if model.cfg.mtp_num_layers != 1:
            raise SpeculativeError(f"speculative='mtp' drafts with one MTP layer; chaining "
                                   f"{model.cfg.mtp_num_layers} MTP layers is not implemented")
        k = num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise SpeculativeError(f"num_speculative_tokens must be a whole number >= 1, got {k!r}")
        self.k = int(k)
        self.cfg, self.sharding, self.cache_dtype = model.cfg, model.sharding, cache_dtype
        self.graphdef, self.state = nnx.split(model)
        self.leaves, treedef = jax.tree.flatten(self.state)
        recurrent = tuple(kind == LINEAR_ATTENTION for kind in model.cfg.layer_types)
        self.prefill = jax.jit(lambda leaves, *a: _prefill(self.graphdef, self.k, leaves, treedef, *a),
                               donate_argnums=(3, 4))
        self.step = jax.jit(lambda leaves, *a: _step(self.graphdef, self.k, recurrent, leaves, treedef, *a),
                            donate_argnums=(3, 4))
        self._compiled: set = set()  # (rows, prompt bucket, cache length) compiled ahead of time

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingParams, *,
                 stop_ids: set[int], detokenize: Callable[[list[int]], str] | None = None,
                 stop_strings: Sequence[str] = (),
                 stream: Callable[[int, str], None] | None = None) -> SpeculativeResult:
        if not sampling.greedy:
            raise SpeculativeError("speculative='mtp' decodes greedily: use temperature=0")
        if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer))
                or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        if not prompts:
            raise ValueError("no prompts given")
        cfg, sharding, k = self.cfg, self.sharding, self.k
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token id(s) {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")
            if len(p) + max_new_tokens + k > cfg.max_position_embeddings:
                raise ValueError(f"prompt {i} ({len(p)} tokens) + max_new_tokens ({max_new_tokens}) + "
                                 f"num_speculative_tokens ({k}) exceeds the model's context of "
                                 f"{cfg.max_position_embeddings} tokens")
        if (stop_strings or stream) and detokenize is None:
            raise ValueError("stop strings and streaming need a tokenizer")
        batch = len(prompts)
        rows = _round_up(batch, sharding.batch_multiple)
        longest = max(len(p) for p in prompts)
        t_bucket = _round_up(bucket(longest), sharding.seq_multiple)
        # Room for the prompt, the new tokens and one step's drafts past them.
        cache_len = _round_up(bucket(max(t_bucket, longest + max_new_tokens + k + 1)), sharding.seq_multiple)
        padded = list(prompts) + [prompts[0]] * (rows - batch)
        tokens = np.zeros((rows, t_bucket), np.int32)
        for i, p in enumerate(padded):
            tokens[i, : len(p)] = p
        lengths = np.array([len(p) for p in padded], np.int32)
        mesh = sharding.mesh
        tokens, lengths = replicated(tokens, mesh), replicated(lengths, mesh)
        compile_ms = self.compile(tokens, lengths, rows, cache_len)
        cache = init_cache(cfg, sharding, rows, cache_len, self.cache_dtype)
        mtp_cache = init_mtp_cache(cfg, sharding, rows, cache_len, self.cache_dtype)

        t0 = time.perf_counter()
        pending, drafts, cache, mtp_cache = self.prefill(self.leaves, tokens, lengths, cache, mtp_cache)
        first = to_host(pending)
        t1 = time.perf_counter()

        # The stopping convention of plain generation (jaxpar.stopping): a stop id ends the
        # row and stays in its token ids; tokens verified past the end are dropped.
        seqs = [SequenceOutput(max_new_tokens=max_new_tokens, stop_ids=stop_ids, stop_strings=stop_strings,
                               detokenize=detokenize, track_text=stream is not None)
                for _ in range(batch)]

        def accept(row: int, tok: int) -> None:
            delta = seqs[row].add(tok)
            if stream and delta:
                stream(row, delta)

        for row in range(batch):
            accept(row, int(first[row]))
        steps = proposed = accepted = 0
        while not all(q.done for q in seqs):
            greedy, m, pending, drafts, cache, mtp_cache = self.step(self.leaves, pending, drafts, cache, mtp_cache)
            steps += 1
            greedy, m = to_host(greedy), to_host(m)
            for row in range(batch):
                if seqs[row].done:
                    continue
                proposed += k
                accepted += int(m[row])
                for tok in greedy[row, : int(m[row]) + 1]:
                    accept(row, int(tok))
                    if seqs[row].done:
                        break
        t2 = time.perf_counter()
        return SpeculativeResult(texts=[q.final_text() for q in seqs], token_ids=[q.token_ids for q in seqs],
                                 prompt_token_ids=[list(p) for p in prompts],
                                 finish_reasons=[q.finish_reason for q in seqs], prefill_ms=(t1 - t0) * 1e3,
                                 decode_ms=(t2 - t1) * 1e3, decode_steps=steps, compile_ms=compile_ms,
                                 draft_tokens=proposed, accepted_tokens=accepted)

    def compile(self, tokens: jax.Array, lengths: jax.Array, rows: int, cache_len: int) -> float:
        """Compiles the prefill and step programs for these shapes ahead of time (the step for
        the shardings prefill's outputs arrive with, then its own); returns the milliseconds
        spent (0 when done before), so prefill and decode timings exclude compilation."""
        key = (rows, tokens.shape[1], cache_len)
        if key in self._compiled:
            return 0.0
        t0 = time.perf_counter()
        cache = cache_shapes(self.cfg, self.sharding, rows, cache_len, self.cache_dtype)
        mtp = mtp_cache_shapes(self.cfg, self.sharding, rows, cache_len, self.cache_dtype)
        pending, drafts, cache, mtp = compiled_outputs(self.prefill.lower(self.leaves, tokens, lengths, cache, mtp))
        seen = []
        while True:
            signature = [a.sharding for a in jax.tree.leaves((pending, drafts, cache, mtp))]
            if signature in seen:
                break
            seen.append(signature)
            out = compiled_outputs(self.step.lower(self.leaves, pending, drafts, cache, mtp))
            pending, drafts, cache, mtp = out[2:]
        self._compiled.add(key)
        return (time.perf_counter() - t0) * 1e3
