"""Sparse mixture-of-experts feed-forward block (Qwen3-MoE, Qwen3-Next, Qwen3.5-MoE).

    probs   = softmax(float32(x @ W_router))           # [N, experts]
    w, idx  = top_k(probs, k)   (w /= sum(w) when norm_topk_prob; w cast to x's dtype)
    y       = sum_j w_j * down_e(silu(gate_e(x)) * up_e(x)),  e = idx_j
    y      += sigmoid(x @ w_shared_gate) * shared_mlp(x)     (Qwen3-Next / 3.5 only)

Parallelism (the block's `AxisRules`, from a plan `{tp_size: T, ep_size: ep}`: the block runs
on T devices, the experts split ep ways among them): the stacked expert weights
`[experts, ...]` are split over the plan's ep axes ("experts", ep ways) and each expert's ffn
over the rest of the block's axes ("expert_ffn", T / ep ways). The expert computation runs in
`shard_map`: every rank sees all tokens of its batch shard (the router is replicated), computes
its local experts' share of the output for them, and the partial outputs are summed over the
ep and expert-tp axes (one all-reduce of `[tokens, hidden]`, as a TP MLP has). Tokens are never
exchanged (no all-to-all), so the result is exact and independent of how the batch is split.
The router and the shared expert (a TP MLP over all T devices, "ffn") run outside `shard_map`
as ordinary layers. Under sequence parallelism (`scatter_seq=True`, prefill) the partial sums
are reduce-scattered over the sequence instead, when they are summed over exactly the
sequence-parallel axes (T = all tp devices).

Local computation, chosen per call from the (static) token count:
- "dense": every local expert on every token, weighted by the combine weights (0 for experts
  a token did not select — exact). Per rank: N * (E/ep) * 3*H*(I*ep/T) MACs and an
  `[N, E/ep, I*ep/T]` intermediate; in all, E/k times the FLOPs of a sparse dispatch (e.g. 51x
  for 512 experts, top-10), but it streams each local weight exactly once, so it is the
  right choice while the step is weight-bandwidth bound (N * k >= E/ep).
- "gather": for decode with few tokens (N * k < E/ep), gather the N*k selected experts'
  weight slices (non-local selections read expert 0 with weight 0) and compute only those:
  N*k slices read instead of all E/ep local experts.
- "grouped": every (token, expert) pair computed once, tokens sorted by expert and the
  experts run as grouped matmuls (`jaxpar.models.grouped_matmul`: `jax.lax.ragged_dot` on
  GPU/TPU, a tiled batched matmul on CPU), capacity-free. The default ("auto") for prefill.
"auto" is "gather" when N * k < E/ep (decode), else "grouped" — except on CPU below
`TILED_MIN_ROWS` rows per expert, where "dense" is faster (`scripts/bench_moe_flops.py --time`
times all paths and auto's choice).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.loading.layouts import ExpertStack, HFLayout
from jaxpar.models.fp8_weights import dequantize
from jaxpar.models.grouped_matmul import GROUPED_BODIES, default_body, grouped_experts
from jaxpar.models.linear import Linear
from jaxpar.models.mlp import MLP
from jaxpar.models.params import param
from jaxpar.sharding.axis_rules import AxisRules

# Ours: gate/up [experts, hidden, ffn], down [experts, ffn, hidden] (x @ w per expert).
IN_AXES = ("experts", "embed", "expert_ffn")
OUT_AXES = ("experts", "expert_ffn", "embed")
IMPLS = ("auto", "dense", "gather", "grouped")
# With the CPU's tiled grouped matmul, "auto" keeps the dense path below this many rows per
# expert on average (N * k / E): each tile gathers its expert's weights, which costs more than
# the dense path's extra FLOPs there (scripts/bench_moe_flops.py --time, 128 experts top-8:
# 128 tokens (8 rows/expert) grouped 293 ms vs dense 84 ms; 512 tokens (32) 298 vs 329 ms).
TILED_MIN_ROWS = 32


def _in_stack(kind: str, ffn: int) -> ExpertStack:
    """gate_proj / up_proj: per-expert `experts.{e}.<kind>_proj.weight` [I, H], or rows
    [0, I) (gate) / [I, 2I) (up) of the fused `experts.gate_up_proj` [E, 2I, H]."""
    start = 0 if kind == "gate" else ffn
    return ExpertStack(per_expert=f"{{e}}.{kind}_proj.weight", per_layout=HFLayout(perm=(1, 0)),
                       fused="gate_up_proj",
                       fused_layout=HFLayout(perm=(0, 2, 1), region=(1, start, start + ffn)))


# down_proj: per-expert `experts.{e}.down_proj.weight` [H, I], or fused `experts.down_proj` [E, H, I].
DOWN_STACK = ExpertStack(per_expert="{e}.down_proj.weight", per_layout=HFLayout(perm=(1, 0)),
                         fused="down_proj", fused_layout=HFLayout(perm=(0, 2, 1)))


class Experts(nnx.Module):
    """The stacked expert weights (HF module `mlp.experts`)."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, dtype):
        shape_in, shape_out = (num_experts, hidden, ffn), (num_experts, ffn, hidden)
        self.gate_proj = param(shape_in, IN_AXES, dtype, _in_stack("gate", ffn))
        self.up_proj = param(shape_in, IN_AXES, dtype, _in_stack("up", ffn))
        self.down_proj = param(shape_out, OUT_AXES, dtype, DOWN_STACK)

    def weights(self, dtype) -> list[jax.Array]:
        """gate, up, down in `dtype` (kept-fp8 ones multiplied by their block scales,
        `jaxpar.models.fp8`)."""
        out = []
        for name in ("gate_proj", "up_proj", "down_proj"):
            scale = getattr(self, name + "_scale_inv", None)
            w = getattr(self, name)[...]
            out.append(w.astype(dtype) if scale is None else
                       dequantize(w, scale[...], getattr(self, name + "_fp8_view"), dtype))
        return out


def _dense_local(x, combine, wg, wu, wd):
    """x [N, H]; combine [N, El] (0 where not selected); w* the local experts. -> [N, H] f32."""
    g = jnp.einsum("nh,ehi->nei", x, wg)
    u = jnp.einsum("nh,ehi->nei", x, wu)
    h = jax.nn.silu(g) * u * combine[:, :, None]
    return jnp.einsum("nei,eih->nh", h, wd, preferred_element_type=jnp.float32)


def _gather_local(x, top_i, top_w, wg, wu, wd, first_expert):
    """x [N, H]; top_i, top_w [N, k] (global expert ids); w* the local experts, the first of
    which is global expert `first_expert`. -> [N, H] f32 (this rank's experts only)."""
    local = top_i - first_expert
    mine = (local >= 0) & (local < wg.shape[0])
    local = jnp.where(mine, local, 0)
    w = jnp.where(mine, top_w, jnp.zeros_like(top_w))
    g = jnp.einsum("nh,nkhi->nki", x, jnp.take(wg, local, axis=0))
    u = jnp.einsum("nh,nkhi->nki", x, jnp.take(wu, local, axis=0))
    h = jax.nn.silu(g) * u * w[:, :, None]
    return jnp.einsum("nki,nkih->nh", h, jnp.take(wd, local, axis=0),
                      preferred_element_type=jnp.float32)


class SparseMoE(nnx.Module):
    """HF module `model.layers.{i}.mlp` of a MoE layer. x: [B, T, H] -> [B, T, H]."""

    def __init__(self, cfg: ModelConfig, dtype, rules: AxisRules, *, impl: str = "auto",
                 grouped_body: str | None = None):
        """`grouped_body`: the grouped path's matmul ("ragged" / "tiled";
        `jaxpar.models.grouped_matmul`), None = the platform's default."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if grouped_body not in (None, *GROUPED_BODIES):
            raise ValueError(f"grouped_body must be one of {GROUPED_BODIES} or None, got {grouped_body!r}")
        self.grouped_body = grouped_body
        h, n = cfg.hidden_size, cfg.num_experts
        self.gate = Linear((h,), (n,), ("embed",), (None,), dtype)  # router, replicated
        self.experts = Experts(n, h, cfg.moe_intermediate_size, dtype)
        if cfg.shared_expert_intermediate_size > 0:
            self.shared_expert = MLP(h, cfg.shared_expert_intermediate_size, dtype, rules)
            self.shared_expert_gate = Linear((h,), (1,), ("embed",), (None,), dtype)
        else:
            self.shared_expert = self.shared_expert_gate = None
        self.num_experts, self.top_k = n, cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.rules = rules
        self.impl = impl

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [..., H] -> (weights [..., k] in x's dtype, expert ids [..., k] int32), as HF:
        logits in x's dtype, softmax in float32, top-k, optional renormalisation."""
        probs = jax.nn.softmax(self.gate(x).astype(jnp.float32), axis=-1)
        top_w, top_i = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        return top_w.astype(x.dtype), top_i.astype(jnp.int32)

    def add_shared(self, x: jax.Array, y: jax.Array, *, scatter_seq: bool) -> jax.Array:
        """y + the shared expert's output for x (gated by sigmoid(x @ w_shared_gate)), split on
        the sequence like y when `scatter_seq`. Subclasses with other shared experts override it."""
        if self.shared_expert is None:
            return y
        shared = self.shared_expert(x, scatter_seq=scatter_seq)
        return y + jax.nn.sigmoid(self.shared_expert_gate(x)) * shared

    def grouped_matmul_body(self) -> str:
        return self.grouped_body or default_body(self.rules.mesh.devices.flat[0].platform)

    def local_impl(self, tokens: int) -> str:
        """"dense", "gather" or "grouped" for a call on `tokens` tokens (static)."""
        if self.impl != "auto":
            return self.impl
        if tokens * self.top_k < self.num_experts // self.rules.size("experts"):
            return "gather"
        if self.grouped_matmul_body() == "tiled" and tokens * self.top_k < TILED_MIN_ROWS * self.num_experts:
            return "dense"
        return "grouped"

    def _scatter_axes(self, x: jax.Array, reduce_axes: tuple[str, ...]) -> tuple[str, ...]:
        """The sequence-parallel axes when the expert partial sums can be reduce-scattered
        over the sequence instead of all-reduced (they are summed over exactly those axes),
        else ()."""
        rules = self.rules
        sp_axes = rules.axes_for("residual_seq")
        if (not sp_axes or set(sp_axes) != set(reduce_axes) or x.shape[1] % rules.size("residual_seq")
                or rules.axes_for("batch") != rules.axes_for("residual_batch")):
            return ()
        return sp_axes

    def __call__(self, x: jax.Array, *, scatter_seq: bool = False) -> jax.Array:
        """`scatter_seq`: under sequence parallelism (prefill), leave the output split on the
        sequence (reduce-scatter) rather than all-reduced, where the layout allows it."""
        rules = self.rules
        x = rules.constrain(x, ("batch", "seq", "embed"))
        top_w, top_i = self.route(x)
        ep_axes, tp_axes = rules.axes_for("experts"), rules.axes_for("expert_ffn")
        reduce_axes = tuple(ep_axes) + tuple(a for a in tp_axes if a not in ep_axes)
        scatter_axes = self._scatter_axes(x, reduce_axes) if scatter_seq else ()
        weights = self.experts.weights(x.dtype)
        b, t, hidden = x.shape
        impl = self.local_impl(b * t)
        gather = impl != "dense"  # gather and grouped both take the top-k ids and weights
        body = self.grouped_matmul_body()

        def local(x, sel, wts, wg, wu, wd):
            xb, xt = x.shape[:2]
            flat = x.reshape(xb * xt, hidden)
            if gather:
                first = jax.lax.axis_index(ep_axes) * wg.shape[0] if ep_axes else 0
                fn = _gather_local if impl == "gather" else (
                    lambda *a: grouped_experts(*a, body=body))
                y = fn(flat, sel.reshape(xb * xt, -1), wts.reshape(xb * xt, -1), wg, wu, wd, first)
            else:
                y = _dense_local(flat, wts.reshape(xb * xt, -1), wg, wu, wd)
            y = y.astype(x.dtype).reshape(xb, xt, hidden)
            if scatter_axes:
                return jax.lax.psum_scatter(y, scatter_axes, scatter_dimension=1, tiled=True)
            return jax.lax.psum(y, reduce_axes) if reduce_axes else y

        if gather:
            sel, wts = top_i, top_w
            sel_spec = wts_spec = rules.spec(("batch", None, None))
        else:
            # Dense combine weights [B, T, experts]: each rank receives its experts' columns.
            sel = jnp.zeros((), jnp.int32)
            wts = jnp.sum(jax.nn.one_hot(top_i, self.num_experts, dtype=x.dtype) * top_w[..., None], axis=-2)
            sel_spec, wts_spec = rules.spec(()), rules.spec(("batch", None, "experts"))
        if rules.mesh.size == 1:
            y = local(x, sel, wts, *weights)
        else:
            x_spec = rules.spec(("batch", None, None))
            out_spec = rules.spec(("batch", "residual_seq", None)) if scatter_axes else x_spec
            y = jax.shard_map(
                local, mesh=rules.mesh,
                in_specs=(x_spec, sel_spec, wts_spec, rules.spec(IN_AXES), rules.spec(IN_AXES),
                          rules.spec(OUT_AXES)),
                out_specs=out_spec, check_vma=False,
            )(x, sel, wts, *weights)
        y = self.add_shared(x, y, scatter_seq=bool(scatter_axes))
        out_axes = ("batch", "residual_seq", "embed") if scatter_axes else ("batch", "seq", "embed")
        return rules.constrain(y, out_axes)
