"""DeepSeek-V3's mixture of experts: sigmoid scores, grouped top-k with a bias for the choice
only, routed scaling, and ungated shared experts (HF `DeepseekV3MoE`).

    scores  = sigmoid(float32(x) @ float32(W_router))                # [N, E]
    choice  = scores + e_score_correction_bias                      # load balancing, choice only
    groups  = n_group groups of E / n_group experts; a group's score is the sum of its two
              best choice values; experts outside the topk_group best groups are dropped
    idx     = top_k(choice, k) among the kept experts
    w       = scores[idx] (/ sum when norm_topk_prob) * routed_scaling_factor
    y       = sum_j w_j expert_{idx_j}(x) + shared_experts(x)

The expert computation, its parallel layouts (EP / TP inside experts, `shard_map`) and the
sequence-parallel reduce-scatter are `jaxpar.models.moe.SparseMoE`'s; this module only
routes differently and adds the shared experts (a TP MLP over the block's devices, HF
module `mlp.shared_experts`) without a gate.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.models.mlp import MLP
from jaxpar.models.moe import SparseMoE
from jaxpar.models.params import LINEAR, param
from jaxpar.sharding.axis_rules import AxisRules


class GroupedTopkRouter(nnx.Module):
    """HF module `mlp.gate`: `weight` [E, H] on disk and `e_score_correction_bias` [E]
    (replicated, applied in float32 like HF)."""

    def __init__(self, hidden: int, experts: int, dtype):
        self.weight = param((hidden, experts), ("embed", None), dtype, LINEAR)
        self.e_score_correction_bias = param((experts,), (None,), dtype)


class DeepseekMoE(SparseMoE):
    """HF module `model.layers.{i}.mlp` of a DeepSeek-V3 MoE layer. x: [B, T, H] -> [B, T, H]."""

    def __init__(self, cfg: ModelConfig, dtype, rules: AxisRules, *, impl: str = "auto"):
        # The base class builds the experts (and no Qwen-style gated shared expert).
        super().__init__(dataclasses.replace(cfg, shared_expert_intermediate_size=0), dtype, rules, impl=impl)
        self.gate = GroupedTopkRouter(cfg.hidden_size, cfg.num_experts, dtype)
        shared = cfg.shared_expert_intermediate_size
        self.shared_experts = MLP(cfg.hidden_size, shared, dtype, rules) if shared else None
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.routed_scaling_factor = cfg.routed_scaling_factor

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [..., H] -> (weights [..., k] in x's dtype, expert ids [..., k] int32)."""
        logits = jnp.dot(x.astype(jnp.float32), self.gate.weight[...].astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
        scores = jax.nn.sigmoid(logits)
        choice = scores + self.gate.e_score_correction_bias[...].astype(jnp.float32)
        e, g = self.num_experts, self.n_group
        grouped = choice.reshape(*choice.shape[:-1], g, e // g)
        group_score = jnp.sum(jax.lax.top_k(grouped, min(2, e // g))[0], axis=-1)  # [..., g]
        _, best = jax.lax.top_k(group_score, self.topk_group)
        keep = jnp.any(jax.nn.one_hot(best, g, dtype=bool), axis=-2)  # [..., g]
        keep = jnp.repeat(keep, e // g, axis=-1)
        _, top_i = jax.lax.top_k(jnp.where(keep, choice, -jnp.inf), self.top_k)
        top_w = jnp.take_along_axis(scores, top_i, axis=-1)
        if self.norm_topk_prob:
            top_w = top_w / (jnp.sum(top_w, axis=-1, keepdims=True) + 1e-20)
        top_w = top_w * self.routed_scaling_factor
        return top_w.astype(x.dtype), top_i.astype(jnp.int32)

    def add_shared(self, x: jax.Array, y: jax.Array, *, scatter_seq: bool) -> jax.Array:
        if self.shared_experts is None:
            return y
        return y + self.shared_experts(x, scatter_seq=scatter_seq)
