"""Ideal FLOPs and HBM bytes of one step on one device, for a given sharding.

"Ideal" means what any implementation of this sharding has to do, with kernels that fuse
well (flash attention, no float32 copies of bf16 weights, grouped expert matmuls): it is
the roofline's compute and memory input, beside the costs XLA:CPU reports for jaxpar's
own program (reference kernels; see `jaxpar.experiment.analysis`). Derived from the
abstract parameters with their shardings, so every plan (TP, TPA + DCP, attention DP, SP,
EP, replication) is accounted for by the shard each device holds:

FLOPs per device
* projections: 2 * tokens_local * (local elements of the block's matrices), tokens_local =
  rows of the block's batch shard * new tokens per row. Depthwise conv weights count the
  same way (2 FLOPs per weight per token).
* MoE experts: the local experts' matrices times k / E (each token uses k of E experts,
  routing assumed balanced over the ranks); router and shared expert like projections.
* attention core (QK^T and PV): 4 * head_dim * local heads * local rows * attended pairs:
  prefill T(T+1)/2 (causal), extend T * (context + (T+1)/2) / dcp, decode (context+1) / dcp.
* Gated DeltaNet core per token and local value head: 6 * dk * dv for the recurrent update
  (decay, S^T k, k delta^T, S^T q), plus 2 * 64 * (2 dk + dv) for the chunked form (prefill
  and extend, chunk 64: intra-chunk scores and their products). An approximation.
* lm_head: 2 * (rows whose logits are computed) * (local head elements).
* train: 3x the forward (backward = 2x), +1x forward for every rematerialised block.

HBM bytes per device
* every local weight read once (MoE experts: the fraction touched, 1 - (1 - k/E)^tokens);
* KV cache: the context read (decode, extend) and the new tokens written; Gated DeltaNet
  conv + recurrent state read and written (written only, at prefill);
* activations: per block, the residual stream read and written twice (norm in, block in,
  block out, residual add; a sequence-parallel block's share of the tokens) plus the block's
  intermediates in and out; f32 logits written;
* train: weights read 3x and written once, gradients written and read, optimizer state read
  and written, activations saved by the forward and read by the backward.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.models.cache import KVCache
from jaxpar.sharding.model_sharding import ModelSharding

GDN_CHUNK = 64
_NOT_MATRICES = ("A_log", "dt_bias")


@dataclasses.dataclass
class IdealCost:
    flops: float
    bytes: float
    terms: dict[str, float]  # FLOPs and bytes by source, for the report


def _local(aval) -> tuple[int, int]:
    """(elements, bytes) of one device's shard of an abstract array."""
    shape = aval.sharding.shard_shape(aval.shape)
    n = int(np.prod(shape, dtype=np.int64))
    return n, n * np.dtype(aval.dtype).itemsize


def _group(path: tuple) -> str:
    """Which part of the model a parameter belongs to."""
    if path[0] == "layers":
        block = path[2]
        if block == "mlp":
            if path[3] == "experts":
                return "experts"
            if path[3] in ("gate", "shared_expert_gate"):
                return "router"
            return "ffn"
        if block in ("self_attn", "linear_attn"):
            return "mixer"
        return "norm"
    return {"embed_tokens": "embed", "lm_head": "head"}.get(path[0], "norm")


def param_groups(state) -> dict[tuple, dict[str, int]]:
    """{(layer or None, group): {matrix_elements, bytes}} of one device's parameters."""
    out: dict[tuple, dict[str, int]] = {}
    for path, var in nnx.to_flat_state(state):
        aval = var.get_value()
        n, nbytes = _local(aval)
        layer = int(path[1]) if path[0] == "layers" else None
        key = (layer, _group(path))
        g = out.setdefault(key, {"matrix_elements": 0, "bytes": 0})
        g["bytes"] += nbytes
        if len(aval.shape) >= 2 and path[-1] not in _NOT_MATRICES:
            g["matrix_elements"] += n
    return out


def step_cost(cfg: ModelConfig, sharding: ModelSharding, state, cache, *, batch: int, tokens: int,
              context: int, mode: str, itemsize: int, remat_blocks: int = 0,
              optimizer_bytes: float = 0.0, embed: bool = True, head: bool = True) -> IdealCost:
    """Ideal cost of one step: `batch` rows of `tokens` new tokens each after `context`
    cached ones. `mode`: prefill / extend / decode / train. `cache`: the abstract cache
    (None for train). `remat_blocks`: blocks recomputed in the backward (train).
    `embed` / `head`: whether this device runs the embedding / the head (a pipeline stage
    runs only its own)."""
    train = mode == "train"
    groups = param_groups(state)
    if not embed and not (head and cfg.tie_word_embeddings):
        groups.pop((None, "embed"), None)
    if not head:
        groups.pop((None, "head"), None)
    flops: dict[str, float] = {}
    nbytes: dict[str, float] = {}

    def add(d, key, value):
        d[key] = d.get(key, 0.0) + float(value)

    e = cfg.hidden_size
    for i in range(cfg.num_layers):
        ls = sharding.layers[i]
        mixer_rows = batch / ls.mixer.size("batch")
        ffn_rows = batch / ls.ffn.size("batch")
        mix = groups.get((i, "mixer"), {"matrix_elements": 0, "bytes": 0})
        add(flops, "projections", 2 * mixer_rows * tokens * mix["matrix_elements"])
        add(nbytes, "weights", mix["bytes"])
        if cfg.layer_types[i] == "attention":
            heads = cfg.num_heads / ls.mixer.size("q_heads")
            dcp = ls.mixer.size("cache_seq")
            if mode in ("prefill", "train"):
                pairs = tokens * (tokens + 1) / 2
            elif mode == "extend":
                pairs = tokens * (context + (tokens + 1) / 2) / dcp
            else:
                pairs = (context + 1) / dcp
            add(flops, "attention", 4 * cfg.head_dim * heads * mixer_rows * pairs)
        else:
            hv = cfg.linear_num_value_heads / ls.mixer.size("lin_v_heads")
            dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
            per_token = 6 * dk * dv + (0 if mode == "decode" else 2 * GDN_CHUNK * (2 * dk + dv))
            add(flops, "linear_attention", per_token * hv * mixer_rows * tokens)
        ffn_tokens = ffn_rows * tokens
        ffn = groups.get((i, "ffn"), {"matrix_elements": 0, "bytes": 0})
        add(flops, "projections", 2 * ffn_tokens * ffn["matrix_elements"])
        add(nbytes, "weights", ffn["bytes"])
        router = groups.get((i, "router"))
        if router:
            add(flops, "projections", 2 * ffn_tokens * router["matrix_elements"])
            add(nbytes, "weights", router["bytes"])
        experts = groups.get((i, "experts"))
        width = 0.0
        if experts:
            k, n_exp = cfg.num_experts_per_tok, cfg.num_experts
            add(flops, "experts", 2 * ffn_tokens * experts["matrix_elements"] * k / n_exp)
            touched = 1 - (1 - k / n_exp) ** ffn_tokens
            add(nbytes, "weights", experts["bytes"] * touched)
            width = 3 * k * cfg.moe_intermediate_size / ls.ffn.size("expert_ffn")
        if cfg.mlp_types[i] == "mlp" or cfg.shared_expert_intermediate_size:
            size = cfg.intermediate_size if cfg.mlp_types[i] == "mlp" else cfg.shared_expert_intermediate_size
            width += 3 * size / ls.ffn.size("ffn")
        # residual stream in and out around both blocks (under sequence parallelism each
        # device holds 1/n of the tokens: norms and residual adds run on its shard), and the
        # blocks' intermediates
        seq_split = 1 if mode == "decode" else ls.mixer.size("residual_seq")
        ffn_split = 1 if mode == "decode" else ls.ffn.size("residual_seq")
        add(nbytes, "activations", 4 * (mixer_rows / seq_split + ffn_rows / ffn_split) * tokens * e * itemsize)
        add(nbytes, "activations", 2 * ffn_tokens * width * itemsize)

    tied = cfg.tie_word_embeddings  # the head multiplies by the embedding matrix
    head_params = groups.get((None, "embed" if tied else "head")) if head else None
    if head_params:
        head_rows = batch / sharding.head.size("residual_batch")
        logit_rows = head_rows * (tokens if train else 1)
        add(flops, "lm_head", 2 * logit_rows * head_params["matrix_elements"])
        add(nbytes, "weights", head_params["bytes"])
        vocab_local = cfg.vocab_size / sharding.head.size("vocab")
        add(nbytes, "activations", logit_rows * vocab_local * 4)
    add(nbytes, "weights", sum(g["bytes"] for (_, kind), g in groups.items() if kind == "norm"))
    embed_params = groups.get((None, "embed")) if embed else None
    if embed_params and not (tied and head):  # a gather: only the looked-up rows are read
        vocab_shard = cfg.vocab_size / sharding.embed.size("vocab")
        add(nbytes, "weights", embed_params["bytes"] * min(batch * tokens, vocab_shard) / vocab_shard)
    weights_read = sum(g["bytes"] for g in groups.values())

    if cache is not None:
        add(nbytes, "cache", _cache_traffic(cfg, cache, tokens=tokens, context=context, mode=mode))

    if train:
        forward = sum(flops.values())
        per_block = forward / max(2 * cfg.num_layers, 1)
        flops = {k: 3 * v for k, v in flops.items()}
        if remat_blocks:
            add(flops, "recompute", per_block * remat_blocks)
        activations = nbytes.get("activations", 0.0)
        nbytes = {"weights": 3 * weights_read + weights_read, "gradients": 2 * weights_read,
                  "optimizer": 2 * optimizer_bytes, "activations": 3 * activations}
    return IdealCost(flops=sum(flops.values()), bytes=sum(nbytes.values()),
                     terms={**{f"flops_{k}": v for k, v in flops.items()},
                            **{f"bytes_{k}": v for k, v in nbytes.items()}})


def _cache_traffic(cfg: ModelConfig, cache, *, tokens: int, context: int, mode: str) -> float:
    total = 0.0
    for layer in cache.layers:
        if isinstance(layer, KVCache):
            slots = layer.k.shape[1]
            local = sum(_local(a)[1] for a in (layer.k, layer.v))
            read = 0 if mode == "prefill" else min(context, slots) / slots
            total += local * (read + min(tokens, slots) / slots)
        else:
            local = sum(_local(a)[1] for a in jax.tree.leaves(layer))
            total += local * (1 if mode == "prefill" else 2)
    return total


def train_activation_bytes(cfg: ModelConfig, sharding: ModelSharding, *, batch: int, seq: int, itemsize: int,
                           remat: tuple[str, ...] = ()) -> float:
    """Activations one device keeps from the forward pass for the backward pass (ideal
    kernels: flash attention keeps its output and log-sum-exp, not its scores).

    Per layer: each block keeps its input (the residual stream: the device's share of the
    tokens under sequence parallelism) and, unless rematerialised, its intermediates:
    attention q, k, v, output and LSE over the block's heads; Gated DeltaNet its projections
    and chunk states are approximated by q, k, v, z and output over its heads; an MLP its gate,
    up and product over its ffn shard; a MoE block the same for the k selected experts (plus the
    shared expert) and the router's probabilities. Plus the final norm's input and the float32
    logits of every token (the head's shard of the vocabulary)."""
    e, total = cfg.hidden_size, 0.0
    for i in range(cfg.num_layers):
        ls = sharding.layers[i]
        for rules, kind in ((ls.mixer, cfg.layer_types[i]), (ls.ffn, cfg.mlp_types[i])):
            tokens = batch * seq / rules.size("batch")
            total += tokens / rules.size("residual_seq") * e * itemsize  # the block's input
            if kind in remat:
                continue
            if kind == "attention":
                heads = cfg.num_heads / rules.size("q_heads")
                kv = max(cfg.num_kv_heads / max(rules.size("kv_heads"), 1), 1)
                total += tokens * ((2 * heads + 2 * kv) * cfg.head_dim * itemsize + heads * 4)
            elif kind == "linear_attention":
                hk = cfg.linear_num_key_heads / rules.size("lin_k_heads")
                hv = cfg.linear_num_value_heads / rules.size("lin_v_heads")
                total += tokens * (2 * hk * cfg.linear_key_head_dim + 3 * hv * cfg.linear_value_head_dim) * itemsize
            elif kind == "mlp":
                total += tokens * 3 * cfg.intermediate_size / rules.size("ffn") * itemsize
            else:
                width = cfg.num_experts_per_tok * cfg.moe_intermediate_size / rules.size("expert_ffn")
                width += cfg.shared_expert_intermediate_size / rules.size("ffn")
                total += tokens * (3 * width * itemsize + cfg.num_experts * 4)
    tokens = batch * seq / sharding.head.size("residual_batch")
    total += tokens * e * itemsize + tokens * cfg.vocab_size / sharding.head.size("vocab") * 4
    return total
