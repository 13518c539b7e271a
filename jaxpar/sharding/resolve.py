"""Rule table + model config -> a `LayerPlan` for every block -> mesh + `ModelSharding`.

Every block of the model (embedding, each layer's mixer and feed-forward block, LM head)
takes the plan of the first rule that matches it, or plain TP over `tp` when none does.
Plans are checked against the model's shapes here, each error naming the rule, the block
and the numbers. Rules that change nothing for this model (they match no block, or earlier
rules take every block they match) are reported as `RuleTableWarning`s (not for presets)
and listed on the `ModelSharding` for `jaxpar plan`.

For `kind: moe`, `tp_size` is the block's device count like for every other kind, and
`ep_size` splits the experts among those devices: `{tp_size: 16, ep_size: 8}` is 8 expert
groups of 2 devices, each expert's ffn split 2 ways (the per-layer policy RFC's reading).

A table with `pp > 1` resolves to a `PipelineSharding` (`build_pipeline`): the layers split
by `layer_partition` into stages of consecutive layers, every stage a mesh of the same
shape over its own `dp * tp` devices, with the same plans (rules match global layer
indices); the embedding is on the first stage, the final norm and LM head on the last.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import jax

from jaxpar.config import ATTENTION, MLP, MOE, NO_BLOCK, ModelConfig
from jaxpar.sharding.axis_rules import AxisRules, MeshAxes
from jaxpar.sharding.mesh import Group, build_mesh
from jaxpar.sharding.model_sharding import LayerSharding, ModelSharding, PipelineSharding
from jaxpar.sharding.rules import Rule, RuleTable, RuleTableError, preset

# Plan keys each kind of block accepts.
KIND_FEATURES = {
    "attention": ("tp_size", "dcp_size", "dp_size", "sp"),
    "linear_attention": ("tp_size",),
    "mamba": ("tp_size",),
    "mlp": ("tp_size", "sp"),
    "moe": ("tp_size", "ep_size", "sp"),
    "embed": ("tp_size",),
    "lm_head": ("tp_size",),
    "indexer": ("tp_size",),
    "mtp": ("tp_size",),
}
# Block kinds per architecture: a rule on a kind the architecture lacks is an error.
# (Norms have no plan of their own: they follow the residual stream, replicated or, under
# `sp`, split on the sequence.)
_DENSE = ("attention", "mlp", "embed", "lm_head")
_HYBRID = ("attention", "linear_attention", "mlp", "embed", "lm_head")
ARCH_KINDS = {
    "llama": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    # MoE families ("mlp" too: mlp_only_layers / decoder_sparse_step give dense layers).
    "qwen3_moe": _DENSE + ("moe",),
    "qwen3_next": _HYBRID + ("moe",),
    "qwen3_5_moe_text": _HYBRID + ("moe",),
    "qwen3_5_moe": _HYBRID + ("moe",),
    "qwen3_5_text": _HYBRID,
    "qwen3_5": _HYBRID,
    # Llama derivatives and Nemotron-H (Mamba2 + attention + MLP layers).
    "mistral": _DENSE,
    "phi3": _DENSE,
    "glm4": _DENSE,
    "nemotron_h": ("attention", "mamba", "mlp", "embed", "lm_head"),
    "deepseek_v3": _DENSE + ("moe",),
    "deepseek_v32": _DENSE + ("moe", "indexer"),
}


def arch_kinds(cfg: ModelConfig) -> tuple[str, ...]:
    """The block kinds of this model: its architecture's, plus `mtp` when it has MTP layers."""
    kinds = ARCH_KINDS.get(cfg.model_type)
    if kinds is None:
        raise RuleTableError(f"no sharding whitelist for model_type {cfg.model_type!r}")
    return kinds + (("mtp",) if cfg.mtp_num_layers else ())


class RuleTableWarning(UserWarning):
    """A rule that changes nothing for this model (matches no block, or is shadowed)."""


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    block: str  # HF module prefix, e.g. "model.layers.3.self_attn"
    kind: str
    layer: int | None
    rule: int | None  # index of the matching rule; None = the default (plain TP)
    tp_size: int  # the block's devices (for moe too: ep_size splits the experts among them)
    dcp_size: int = 1
    dp_size: int = 1
    ep_size: int = 1
    sp: bool = False
    flavor: str | None = None  # attention only: gqa / gated / mla

    @property
    def devices(self) -> int:
        """Devices one copy of the block runs on (the rest of the tp devices replicate it).
        MLA: the latent cache has one KV head, so its dcp ranks are carved out of the heads'
        devices (one of tp_size / dcp_size divides the other), not added beside them."""
        if self.flavor == "mla":
            return max(self.tp_size, self.dcp_size) * self.dp_size
        return self.tp_size * self.dcp_size * self.dp_size

    @property
    def expert_tp(self) -> int:
        """MoE: ways each expert's ffn is split (tp_size / ep_size)."""
        return self.tp_size // self.ep_size

    def groups(self, labels: dict[str, str] | None = None) -> tuple[Group, ...]:
        """The logical device groups of the plan, for the mesh (`jaxpar.sharding.mesh`).
        MoE: `ep` groups of experts, each spanning `tp_size / ep_size` devices ("tp")."""
        labels = labels or {}
        if self.flavor == "mla":
            # "shared": devices splitting both the heads and the latent cache; "tp" / "dcp":
            # the rest of the bigger of the two groups.
            shared = min(self.tp_size, self.dcp_size)
            gs = [Group("dp", self.dp_size, labels.get("dp_size")),
                  Group("tp", self.tp_size // shared, labels.get("tp_size") if shared == 1 else None),
                  Group("dcp", self.dcp_size // shared, labels.get("dcp_size") if shared == 1 else None),
                  Group("shared", shared, labels.get("dcp_size"))]
            return tuple(g for g in gs if g.size > 1)
        if self.kind == "moe":
            inner_label = labels.get("tp_size") if self.ep_size == 1 else None
            gs = [Group("ep", self.ep_size, labels.get("ep_size")), Group("tp", self.expert_tp, inner_label)]
        else:
            gs = [Group("dp", self.dp_size, labels.get("dp_size")),
                  Group("tp", self.tp_size, labels.get("tp_size")),
                  Group("dcp", self.dcp_size, labels.get("dcp_size"))]
        return tuple(g for g in gs if g.size > 1)

    def describe(self) -> str:
        parts = [f"tp={self.tp_size}"]
        for key in ("dcp_size", "dp_size", "ep_size"):
            if getattr(self, key) > 1:
                parts.append(f"{key[:-5]}={getattr(self, key)}")
        if self.kind == "moe" and self.ep_size > 1:
            parts.append(f"expert_tp={self.expert_tp}")
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
    blocks = [Block(f"{prefix}{cfg.embed_name}", "embed", None)]
    for i in range(cfg.num_layers):
        if cfg.layer_layout == "single":  # Nemotron-H: one block per layer, at layers.{i}.mixer
            kind = cfg.layer_types[i] if cfg.layer_types[i] != NO_BLOCK else cfg.mlp_types[i]
            blocks.append(Block(f"{prefix}layers.{i}.mixer", kind, i))
            continue
        mixer = "self_attn" if cfg.layer_types[i] == ATTENTION else "linear_attn"
        blocks.append(Block(f"{prefix}layers.{i}.{mixer}", cfg.layer_types[i], i))
        if cfg.has_indexer and cfg.layer_types[i] == ATTENTION:
            blocks.append(Block(f"{prefix}layers.{i}.{mixer}.indexer", "indexer", i))
        blocks.append(Block(f"{prefix}layers.{i}.mlp", cfg.mlp_types[i], i))
    blocks.extend(mtp_blocks(cfg))
    blocks.append(Block("lm_head", "lm_head", None))
    return blocks


def mtp_blocks(cfg: ModelConfig) -> list[Block]:
    """Blocks of the multi-token-prediction layers, named `mtp.layers.{k}.*` whatever the
    checkpoint calls them (DeepSeek stores them as model.layers.{num_layers + k}), so that
    one `prefix_pattern: "mtp*"` rule reaches them; they have no layer index."""
    blocks = []
    for k in range(cfg.mtp_num_layers):
        base = f"mtp.layers.{k}"
        blocks.append(Block(base, "mtp", None))
        blocks.append(Block(f"{base}.self_attn", ATTENTION, None))
        if cfg.has_indexer:
            blocks.append(Block(f"{base}.self_attn.indexer", "indexer", None))
        blocks.append(Block(f"{base}.mlp", mtp_ffn_kind(cfg), None))
    return blocks


def mtp_ffn_kind(cfg: ModelConfig) -> str:
    """MTP layers are MoE in MoE models (DeepSeek-V3, Qwen3-Next), dense otherwise."""
    return MOE if cfg.num_experts else MLP

def _flavor(cfg: ModelConfig, block: Block) -> str | None:
    return cfg.attention_flavor if block.kind == ATTENTION else None


def _where(rule: Rule | None, block: Block, stage: str = "") -> str:
    at = f"layer {block.layer} ({block.prefix})" if block.layer is not None else block.prefix
    return f"{rule.describe() if rule else 'the default plan (plain TP)'} at {at}{stage}"


def _check(cfg: ModelConfig, plan: LayerPlan, rule: Rule | None, block: Block, tp: int,
           stage: str = "") -> None:
    where = _where(rule, block, stage)
    allowed = KIND_FEATURES[block.kind]
    if rule is not None:
        bad = [k for k in rule.plan.keys if k not in allowed]
        if bad:
            raise RuleTableError(f"{where}: {block.kind} blocks of {cfg.model_type} do not support plan "
                                 f"key(s) {bad} (supported: {', '.join(allowed) or 'none'})")
    if tp % plan.devices:
        runs_on = f"tp={tp} devices of its pipeline stage" if stage else f"tp={tp} devices it runs on"
        raise RuleTableError(f"{where}: the plan's sizes multiply to {plan.devices} devices "
                             f"(tp_size={plan.tp_size}, dcp_size={plan.dcp_size}, dp_size={plan.dp_size}), "
                             f"which does not divide the {runs_on}")
    t = plan.tp_size
    if block.kind == "attention" and plan.flavor == "mla":
        if cfg.num_heads % t:
            raise RuleTableError(f"{where}: num_attention_heads={cfg.num_heads} is not divisible by tp_size={t}")
        d = plan.dcp_size
        if max(t, d) % min(t, d):
            raise RuleTableError(f"{where}: MLA keeps one latent KV head, so its dcp ranks are taken from the "
                                 f"heads' devices: one of tp_size={t} and dcp_size={d} must divide the other")
    elif block.kind == "attention":
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
    elif block.kind == "mamba":
        g = cfg.mamba_n_groups
        if g % t:
            raise RuleTableError(f"{where}: tp_size={t} must divide the Mamba2 mixer's n_groups={g} "
                                 f"(it is split by heads with each SSM group whole on one rank; "
                                 f"tp_size={t} would split a group of {cfg.mamba_num_heads // g} heads "
                                 "sharing B and C; use tp_size: 1 to replicate it)")
    elif block.kind == "linear_attention":
        if cfg.linear_num_key_heads % t:
            raise RuleTableError(f"{where}: tp_size={t} must divide linear_num_key_heads="
                                 f"{cfg.linear_num_key_heads} (Gated DeltaNet is split by key-head "
                                 "groups; use tp_size: 1 to replicate it)")
    elif block.kind == "moe":
        e = plan.ep_size
        if t % e:
            raise RuleTableError(f"{where}: ep_size={e} does not divide tp_size={t} (for kind: moe, tp_size "
                                 "is the block's device count and ep_size splits the experts among those "
                                 "devices; each expert's ffn is split tp_size / ep_size ways)")
        if cfg.num_experts % e:
            raise RuleTableError(f"{where}: num_experts={cfg.num_experts} is not divisible by ep_size={e}")
        if cfg.moe_intermediate_size % plan.expert_tp:
            ways = f"tp_size={t}" if e == 1 else f"tp_size / ep_size = {t} / {e} = {plan.expert_tp}"
            raise RuleTableError(f"{where}: moe_intermediate_size={cfg.moe_intermediate_size} is not divisible "
                                 f"by {ways} (each expert's ffn is split tp_size / ep_size ways)")
        shared = cfg.shared_expert_intermediate_size
        if shared and shared % t:
            raise RuleTableError(f"{where}: shared_expert_intermediate_size={shared} is not divisible by "
                                 f"tp_size={t} (the shared expert is a TP MLP over the block's devices)")
    elif block.kind == "indexer":
        if cfg.index_n_heads % t:
            raise RuleTableError(f"{where}: index_n_heads={cfg.index_n_heads} is not divisible by tp_size={t} "
                                 "(the indexer splits its heads; tp_size: 1 replicates it)")
    elif block.kind == "mtp":
        if (2 * cfg.hidden_size) % t:
            raise RuleTableError(f"{where}: the MTP projection's input of 2 * hidden_size = {2 * cfg.hidden_size} "
                                 f"is not divisible by tp_size={t}")
    elif block.kind in ("embed", "lm_head"):
        if cfg.vocab_size % t:
            raise RuleTableError(f"{where}: vocab_size={cfg.vocab_size} is not divisible by tp_size={t}")


def _check_rules_fit_architecture(table: RuleTable, cfg: ModelConfig) -> None:
    kinds = arch_kinds(cfg)
    for rule in table.rules:
        k = rule.match.kind
        if k == "norm":
            raise RuleTableError(f"{rule.describe()}: {cfg.model_type} has no norm blocks with a plan of "
                                 "their own (norms follow the residual stream: replicated, or split on "
                                 "the sequence when the neighbouring blocks have sp: true)")
        if k is not None and k not in kinds:
            raise RuleTableError(f"{rule.describe()}: {cfg.model_type} has no {k} blocks "
                                 f"(its blocks: {', '.join(kinds)})")
        flavor = rule.match.attention_flavor
        if flavor is not None and flavor != cfg.attention_flavor:
            raise RuleTableError(f"{rule.describe()}: {cfg.model_type} has no {flavor} attention "
                                 f"(its attention layers are {cfg.attention_flavor})")


def stage_partition(table: RuleTable, cfg: ModelConfig) -> tuple[int, ...]:
    """Layers per pipeline stage: the table's `layer_partition` (checked against the model),
    or as even as possible with the remainder on the first stages."""
    pp, n = table.axis("pp"), cfg.num_layers
    if table.layer_partition is None:
        if pp > n:
            raise RuleTableError(f"axes: pp={pp} stages for a model of {n} layers: stage(s) {n}-{pp - 1} "
                                 "would have 0 layers (every pipeline stage needs at least 1)")
        base, extra = divmod(n, pp)
        return tuple(base + (1 if s < extra else 0) for s in range(pp))
    parts = table.layer_partition
    if sum(parts) != n:
        raise RuleTableError(f"layer_partition {','.join(map(str, parts))} sums to {sum(parts)} layers, "
                             f"but the {cfg.model_type} model has {n} layers")
    return parts


def _stage_note(partition: Sequence[int] | None, block: Block) -> str:
    """" (pipeline stage 1: layers 2-4)" for a block of a pipeline stage, else ""."""
    if partition is None or len(partition) == 1:
        return ""
    starts = [sum(partition[:s]) for s in range(len(partition))]
    if block.layer is None:
        s = 0 if block.kind == "embed" else len(partition) - 1
    else:
        s = max(k for k, a in enumerate(starts) if a <= block.layer)
    return f" (pipeline stage {s}: layers {starts[s]}-{starts[s] + partition[s] - 1})"


def resolve_plans(table: RuleTable, cfg: ModelConfig,
                  partition: Sequence[int] | None = None) -> list[LayerPlan]:
    """The plan of every block; `partition` (layers per pipeline stage) only names the
    stage in error messages."""
    tp = table.axis("tp")
    _check_rules_fit_architecture(table, cfg)
    plans = []
    for block in model_blocks(cfg):
        rule = table.first_match(kind=block.kind, prefix=block.prefix, layer=block.layer,
                                 flavor=_flavor(cfg, block))
        flavor = _flavor(cfg, block)
        if rule is None:
            plan = LayerPlan(block.prefix, block.kind, block.layer, None, tp_size=tp, flavor=flavor)
        else:
            p = rule.plan
            if p.tp_size is not None:
                tp_size = p.tp_size
            elif flavor == "mla":  # the dcp ranks are among the heads' devices
                tp_size = max(tp // p.dp_size, 1)
            else:
                tp_size = max(tp // (p.dcp_size * p.dp_size), 1)
            plan = LayerPlan(block.prefix, block.kind, block.layer, rule.index, tp_size=tp_size,
                             dcp_size=p.dcp_size, dp_size=p.dp_size, ep_size=p.ep_size, sp=p.sp,
                             flavor=flavor)
        _check(cfg, plan, rule, block, tp, _stage_note(partition, block))
        plans.append(plan)
    return plans


def rule_warnings(table: RuleTable, cfg: ModelConfig, plans: Sequence[LayerPlan]) -> list[str]:
    """One message per rule that changes nothing for this model, or names layers it lacks."""
    blocks = model_blocks(cfg)
    taken = {p.block: p.rule for p in plans}
    out = []
    for rule in table.rules:
        matched = [b for b in blocks if rule.match.matches(kind=b.kind, prefix=b.prefix, layer=b.layer,
                                                           flavor=_flavor(cfg, b))]
        past = [i for i in rule.match.layers or () if not 0 <= i < cfg.num_layers]
        past_note = f"layer index(es) {past} are past the model's {cfg.num_layers} layers" if past else ""
        if not matched:
            why = [past_note] if past else []
            if rule.match.prefix_pattern is not None:
                why.append(f"prefix_pattern {rule.match.prefix_pattern!r} matches none of the block "
                           f"prefixes (e.g. {blocks[1].prefix}, {blocks[2].prefix})")
            reason = "; ".join(why) or "no block has all the matched properties"
            out.append(f"{rule.describe()} matches no block of this {cfg.model_type} model: {reason}")
        elif all(taken[b.prefix] != rule.index for b in matched):
            earlier = sorted({taken[b.prefix] for b in matched})
            out.append(f"{rule.describe()} is shadowed: every block it matches is taken by earlier "
                       f"rule(s) {', '.join(map(str, earlier))}")
        elif past:
            out.append(f"{rule.describe()}: {past_note}")
    return out


def _labels(table: RuleTable, plan: LayerPlan) -> dict[str, str]:
    if plan.rule is None:
        return {"tp_size": "tp"}
    return dict(table.rules[plan.rule].plan.axis_refs)


def _warn(table: RuleTable, notes: Sequence[str]) -> None:
    if not table.preset:
        for note in notes:
            warnings.warn(RuleTableWarning(note), stacklevel=3)


def build_sharding(table: RuleTable, cfg: ModelConfig,
                   devices: Sequence[jax.Device] | None = None) -> ModelSharding:
    if table.axis("pp") > 1:
        raise RuleTableError(f"the rule table has pp={table.axis('pp')}: resolve it with build_pipeline "
                             "(jaxpar.assembly.make_sharding does) into one sharding per stage")
    plans = resolve_plans(table, cfg)
    notes = tuple(rule_warnings(table, cfg, plans))
    _warn(table, notes)
    return _model_sharding(table, cfg, plans, notes, devices if devices is not None else jax.devices())


def build_pipeline(table: RuleTable, cfg: ModelConfig,
                   devices: Sequence[jax.Device] | None = None) -> PipelineSharding:
    """One ModelSharding per pipeline stage: stage s gets layers `partition[s]` (in order)
    and devices [s * n, (s + 1) * n) of `devices` (n = dp * tp), every stage's mesh of the
    same shape; the embedding on stage 0, the final norm and LM head on the last."""
    partition = stage_partition(table, cfg)
    plans = resolve_plans(table, cfg, partition)
    notes = tuple(rule_warnings(table, cfg, plans))
    _warn(table, notes)
    pp, tp, dp = table.axis("pp"), table.axis("tp"), table.axis("dp")
    devices = list(devices if devices is not None else jax.devices())
    n = tp * dp
    if len(devices) < pp * n:
        raise RuleTableError(f"the rule table needs pp * dp * tp = {pp} * {dp} * {tp} = {pp * n} devices, "
                             f"but only {len(devices)} are available")
    stages, start = [], 0
    for s, count in enumerate(partition):
        whole = _model_sharding(table, cfg, plans, notes, devices[s * n:(s + 1) * n])
        owned = range(start, start + count)
        stages.append(dataclasses.replace(
            whole, layers=tuple(layer if i in owned else None for i, layer in enumerate(whole.layers)),
            embed=whole.embed if s == 0 else None, head=whole.head if s == pp - 1 else None,
            stage=s, num_stages=pp))
        start += count
    return PipelineSharding(stages=tuple(stages), partition=partition, plans=tuple(plans),
                            table_name=table.name, rule_warnings=notes)


def _model_sharding(table: RuleTable, cfg: ModelConfig, plans: Sequence[LayerPlan],
                    notes: tuple[str, ...], devices: Sequence[jax.Device]) -> ModelSharding:
    tp, dp = table.axis("tp"), table.axis("dp")
    labelled = [(p, p.groups(_labels(table, p))) for p in plans]
    layout = build_mesh(tp, dp, [(p.block, g) for p, g in labelled], devices)
    mesh = layout.mesh

    def in_mesh_order(*axes: MeshAxes) -> MeshAxes:
        wanted = {a for group in axes for a in group}
        return tuple(a for a in mesh.axis_names if a in wanted)

    def rules(plan: LayerPlan, groups) -> AxisRules:
        axes = dict(zip((g.role for g in groups), layout.axes_of(groups)))
        tp_axes: MeshAxes = axes.get("tp", ())
        batch = ("dp",) + axes.get("dp", ())
        r = {"batch": batch, "residual_batch": ("dp",)}
        if plan.sp:
            r["residual_seq"] = layout.tp_axes
        if plan.kind == "attention" and plan.flavor == "mla":
            # Heads over the tp and shared axes (shared last: gathering the queries over the
            # shared axes yields contiguous heads), the latent cache over the dcp and shared axes.
            shared = axes.get("shared", ())
            r["q_heads"] = tp_axes + shared
            r["cache_seq"] = axes.get("dcp", ()) + shared
            r["mla_shared"] = shared
        elif plan.kind == "attention":
            r["q_heads"] = tp_axes
            r["kv_heads"] = _kv_axes(cfg.num_kv_heads, plan.tp_size, tp_axes, mesh)
            r["cache_seq"] = axes.get("dcp", ())
        elif plan.kind == "linear_attention":
            # Key heads and their value heads split together (GDN TP contract).
            r["lin_k_heads"] = tp_axes
            r["lin_v_heads"] = tp_axes
        elif plan.kind == "mamba":
            # Heads split with their groups: each rank holds whole groups and their heads.
            r["ssm_heads"] = tp_axes
            r["ssm_groups"] = tp_axes
        elif plan.kind == "mlp":
            r["ffn"] = tp_axes
        elif plan.kind == "moe":
            # Experts over the ep axes, each expert's ffn over the rest of the block's axes;
            # the shared expert is a TP MLP over all of the block's axes. No rule: ep_size 1,
            # experts replicated and TP inside every expert.
            r["experts"] = axes.get("ep", ())
            r["expert_ffn"] = tp_axes
            r["ffn"] = in_mesh_order(axes.get("ep", ()), tp_axes)
        elif plan.kind in ("embed", "lm_head"):
            r["vocab"] = tp_axes
        elif plan.kind == "indexer":
            r["index_heads"] = tp_axes
        elif plan.kind == "mtp":
            r["mtp_in"] = tp_axes
        return AxisRules(mesh, tuple(r.items()))

    by_block = {p.block: rules(p, g) for p, g in labelled}
    layers = []
    for i in range(cfg.num_layers):
        # A layer holding one block (Nemotron-H) gives both roles the block's rules.
        own = [p for p in plans if p.layer == i]
        mixer = next((p for p in own if p.kind == cfg.layer_types[i]), own[0])
        ffn = next((p for p in own if p.kind == cfg.mlp_types[i]), own[-1])
        indexer = next((p for p in own if p.kind == "indexer"), None)
        layers.append(LayerSharding(mixer=by_block[mixer.block], ffn=by_block[ffn.block],
                                    indexer=by_block[indexer.block] if indexer else None))
    mtp = []
    for k in range(cfg.mtp_num_layers):
        base = f"mtp.layers.{k}"
        mtp.append(LayerSharding(mixer=by_block[f"{base}.self_attn"], ffn=by_block[f"{base}.mlp"],
                                 indexer=by_block.get(f"{base}.self_attn.indexer"), proj=by_block[base]))
    embed = next(p for p in plans if p.kind == "embed")
    head = next(p for p in plans if p.kind == "lm_head")
    return ModelSharding(mesh=mesh, layers=tuple(layers), embed=by_block[embed.block],
                         head=by_block[head.block], plans=tuple(plans), table_name=table.name,
                         rule_warnings=notes, mtp=tuple(mtp))


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
