"""Rule table + model config -> a `LayerPlan` for every block -> mesh + `ModelSharding`."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax

from jaxpar.config import ATTENTION, ModelConfig
from jaxpar.sharding.axis_rules import AxisRules, MeshAxes
from jaxpar.sharding.mesh import Group, build_mesh
from jaxpar.sharding.model_sharding import LayerSharding, ModelSharding
from jaxpar.sharding.rules import Rule, RuleTable, RuleTableError, preset

# Plan keys each kind of block accepts.
KIND_FEATURES = {
    "attention": ("tp_size", "dcp_size", "dp_size", "sp"),
    "linear_attention": ("tp_size",),
    "mlp": ("tp_size", "sp"),
    "moe": ("tp_size", "ep_size", "sp"),
    "embed": ("tp_size",),
    "lm_head": ("tp_size",),
    "norm": (),
}
# Block kinds per architecture (a plan feature of a kind the architecture lacks is rejected).
ARCH_KINDS = {
    "llama": ("attention", "mlp", "embed", "lm_head", "norm"),
    "qwen2": ("attention", "mlp", "embed", "lm_head", "norm"),
    "qwen3": ("attention", "mlp", "embed", "lm_head", "norm"),
    # MoE families ("mlp" too: mlp_only_layers / decoder_sparse_step give dense layers).
    "qwen3_moe": ("attention", "mlp", "moe", "embed", "lm_head", "norm"),
    "qwen3_next": ("attention", "linear_attention", "mlp", "moe", "embed", "lm_head", "norm"),
    "qwen3_5_moe_text": ("attention", "linear_attention", "mlp", "moe", "embed", "lm_head", "norm"),
    "qwen3_5_moe": ("attention", "linear_attention", "mlp", "moe", "embed", "lm_head", "norm"),
    "qwen3_5_text": ("attention", "linear_attention", "mlp", "embed", "lm_head", "norm"),
    "qwen3_5": ("attention", "linear_attention", "mlp", "embed", "lm_head", "norm"),
}


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    block: str  # HF module prefix, e.g. "model.layers.3.self_attn"
    kind: str
    layer: int | None
    rule: int | None  # index of the matching rule; None = the default (plain TP)
    tp_size: int
    dcp_size: int = 1
    dp_size: int = 1
    ep_size: int = 1
    sp: bool = False

    def groups(self, labels: dict[str, str] | None = None) -> tuple[Group, ...]:
        labels = labels or {}
        gs = [Group("dp", self.dp_size, labels.get("dp_size")),
              Group("ep", self.ep_size, labels.get("ep_size")),
              Group("tp", self.tp_size, labels.get("tp_size")),
              Group("dcp", self.dcp_size, labels.get("dcp_size"))]
        return tuple(g for g in gs if g.size > 1)

    def describe(self) -> str:
        parts = [f"tp={self.tp_size}"]
        for key in ("dcp_size", "dp_size", "ep_size"):
            if getattr(self, key) > 1:
                parts.append(f"{key[:-5]}={getattr(self, key)}")
        if self.sp:
            parts.append("sp")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Block:
    prefix: str
    kind: str
    layer: int | None


def model_blocks(cfg: ModelConfig) -> list[Block]:
    prefix = cfg.weight_prefix
    blocks = [Block(f"{prefix}embed_tokens", "embed", None)]
    for i in range(cfg.num_layers):
        mixer = "self_attn" if cfg.layer_types[i] == ATTENTION else "linear_attn"
        blocks.append(Block(f"{prefix}layers.{i}.{mixer}", cfg.layer_types[i], i))
        blocks.append(Block(f"{prefix}layers.{i}.mlp", cfg.mlp_types[i], i))
    blocks.append(Block("lm_head", "lm_head", None))
    return blocks


def _where(rule: Rule | None, block: Block) -> str:
    at = f"layer {block.layer} ({block.prefix})" if block.layer is not None else block.prefix
    return f"{rule.describe() if rule else 'the default plan (plain TP)'} at {at}"


def _check(cfg: ModelConfig, plan: LayerPlan, rule: Rule | None, block: Block, tp: int) -> None:
    where = _where(rule, block)
    allowed = KIND_FEATURES[block.kind]
    if rule is not None:
        bad = [k for k in rule.plan.keys if k not in allowed]
        if bad:
            raise RuleTableError(f"{where}: {block.kind} blocks of {cfg.model_type} do not support plan "
                                 f"key(s) {bad} (supported: {', '.join(allowed) or 'none'})")
    used = plan.tp_size * plan.dcp_size * plan.dp_size * plan.ep_size
    if tp % used:
        raise RuleTableError(f"{where}: the plan's sizes multiply to {used} devices "
                             f"(tp_size={plan.tp_size}, dcp_size={plan.dcp_size}, dp_size={plan.dp_size}, "
                             f"ep_size={plan.ep_size}), which does not divide the tp={tp} devices it runs on")
    t = plan.tp_size
    if block.kind == "attention":
        if cfg.num_heads % t:
            raise RuleTableError(f"{where}: num_attention_heads={cfg.num_heads} is not divisible by tp_size={t}")
        kv = cfg.num_kv_heads
        if kv % t and t % kv:
            raise RuleTableError(f"{where}: num_key_value_heads={kv} neither divides nor is divisible by "
                                 f"tp_size={t} (KV heads are split, or replicated when fewer than tp_size)")
    elif block.kind == "mlp":
        if cfg.intermediate_size % t:
            raise RuleTableError(f"{where}: intermediate_size={cfg.intermediate_size} is not divisible by "
                                 f"tp_size={t} (jaxpar does not pad the MLP; choose a tp_size that divides it)")
    elif block.kind == "linear_attention":
        if cfg.linear_num_key_heads % t:
            raise RuleTableError(f"{where}: tp_size={t} must divide linear_num_key_heads="
                                 f"{cfg.linear_num_key_heads} (Gated DeltaNet is split by key-head "
                                 "groups; use tp_size: 1 to replicate it)")
    elif block.kind == "moe":
        e = plan.ep_size
        if cfg.num_experts % e:
            raise RuleTableError(f"{where}: num_experts={cfg.num_experts} is not divisible by ep_size={e}")
        if cfg.moe_intermediate_size % t:
            raise RuleTableError(f"{where}: moe_intermediate_size={cfg.moe_intermediate_size} is not divisible "
                                 f"by tp_size={t} (each expert's ffn is split tp_size ways)")
        shared = cfg.shared_expert_intermediate_size
        if shared and shared % t:
            raise RuleTableError(f"{where}: shared_expert_intermediate_size={shared} is not divisible by "
                                 f"tp_size={t} (the shared expert is a TP MLP)")
    elif block.kind in ("embed", "lm_head"):
        if cfg.vocab_size % t:
            raise RuleTableError(f"{where}: vocab_size={cfg.vocab_size} is not divisible by tp_size={t}")


def resolve_plans(table: RuleTable, cfg: ModelConfig) -> list[LayerPlan]:
    tp = table.axis("tp")
    kinds = ARCH_KINDS.get(cfg.model_type)
    if kinds is None:
        raise RuleTableError(f"no sharding whitelist for model_type {cfg.model_type!r}")
    for rule in table.rules:
        k = rule.match.kind
        if k is not None and k not in kinds:
            raise RuleTableError(f"{rule.describe()}: {cfg.model_type} has no {k} blocks "
                                 f"(its blocks: {', '.join(kinds)})")
        if rule.match.layers is not None:
            bad = [i for i in rule.match.layers if not 0 <= i < cfg.num_layers]
            if bad:
                raise RuleTableError(f"{rule.describe()}: layer index(es) {bad} out of range for "
                                     f"{cfg.num_layers} layers")
    plans = []
    for block in model_blocks(cfg):
        rule = table.first_match(kind=block.kind, prefix=block.prefix, layer=block.layer,
                                 flavor=cfg.attention_flavor if block.kind == "attention" else None)
        if rule is None:
            plan = LayerPlan(block.prefix, block.kind, block.layer, None, tp_size=tp)
        else:
            p = rule.plan
            rest = p.dcp_size * p.dp_size * p.ep_size
            tp_size = p.tp_size if p.tp_size is not None else max(tp // rest, 1)
            plan = LayerPlan(block.prefix, block.kind, block.layer, rule.index, tp_size=tp_size,
                             dcp_size=p.dcp_size, dp_size=p.dp_size, ep_size=p.ep_size, sp=p.sp)
        _check(cfg, plan, rule, block, tp)
        plans.append(plan)
    return plans


def _labels(table: RuleTable, plan: LayerPlan) -> dict[str, str]:
    if plan.rule is None:
        return {"tp_size": "tp"}
    return dict(table.rules[plan.rule].plan.axis_refs)


def build_sharding(table: RuleTable, cfg: ModelConfig,
                   devices: Sequence[jax.Device] | None = None) -> ModelSharding:
    plans = resolve_plans(table, cfg)
    tp, dp = table.axis("tp"), table.axis("dp")
    labelled = [(p, p.groups(_labels(table, p))) for p in plans]
    layout = build_mesh(tp, dp, [(p.block, g) for p, g in labelled],
                        devices if devices is not None else jax.devices())
    mesh = layout.mesh

    def rules(plan: LayerPlan, groups) -> AxisRules:
        axes = dict(zip((g.role for g in groups), layout.axes_of(groups)))
        tp_axes: MeshAxes = axes.get("tp", ())
        batch = ("dp",) + axes.get("dp", ())
        r = {"batch": batch, "residual_batch": ("dp",)}
        if plan.sp:
            r["residual_seq"] = layout.tp_axes
        if plan.kind == "attention":
            r["q_heads"] = tp_axes
            r["kv_heads"] = _kv_axes(cfg.num_kv_heads, plan.tp_size, tp_axes, mesh)
            r["cache_seq"] = axes.get("dcp", ())
        elif plan.kind == "linear_attention":
            # Key heads and their value heads split together (GDN TP contract).
            r["lin_k_heads"] = tp_axes
            r["lin_v_heads"] = tp_axes
        elif plan.kind == "mlp":
            r["ffn"] = tp_axes
        elif plan.kind == "moe":
            # Experts over the ep axes, each expert's ffn (and the shared expert's) over the tp
            # axes. With no rule (ep_size 1, tp_size tp) the experts are replicated and TP runs
            # inside every expert.
            r["experts"] = axes.get("ep", ())
            r["expert_ffn"] = tp_axes
            r["ffn"] = tp_axes
        elif plan.kind in ("embed", "lm_head"):
            r["vocab"] = tp_axes
        return AxisRules(mesh, tuple(r.items()))

    by_block = {p.block: rules(p, g) for p, g in labelled}
    layers = []
    for i in range(cfg.num_layers):
        mixer = next(p for p in plans if p.layer == i and p.kind == cfg.layer_types[i])
        ffn = next(p for p in plans if p.layer == i and p.kind == cfg.mlp_types[i])
        layers.append(LayerSharding(mixer=by_block[mixer.block], ffn=by_block[ffn.block]))
    embed = next(p for p in plans if p.kind == "embed")
    head = next(p for p in plans if p.kind == "lm_head")
    return ModelSharding(mesh=mesh, layers=tuple(layers), embed=by_block[embed.block],
                         head=by_block[head.block], plans=tuple(plans), table_name=table.name)


def plain_tp(cfg: ModelConfig, mesh_or_devices: jax.sharding.Mesh | Sequence[jax.Device] | None = None
             ) -> ModelSharding:
    """Every block tensor-parallel over all the given devices (default: one device)."""
    if isinstance(mesh_or_devices, jax.sharding.Mesh):
        devices = list(mesh_or_devices.devices.flat)
    else:
        devices = list(mesh_or_devices or jax.devices()[:1])
    return build_sharding(preset("tp", len(devices)), cfg, devices)


def _kv_axes(kv_heads: int, tp_size: int, tp_axes: MeshAxes, mesh) -> MeshAxes:
    """KV heads split like the q heads when they divide tp_size; otherwise over the
    leading tp axes whose product equals kv_heads, else replicated."""
    if kv_heads % tp_size == 0:
        return tp_axes
    n = 1
    for k, a in enumerate(tp_axes):
        n *= mesh.shape[a]
        if n == kv_heads:
            return tp_axes[: k + 1]
        if n > kv_heads:
            break
    return ()
