"""The parallelism rule table: schema, loading (YAML / dict / preset) and checks.

```yaml
parallelism_rules:
  axes: {tp: 8, attn_tp: 4, dcp: 2, ep: 8, dp: 1, pp: 1}
  layer_partition: "15,15,15,15"   # only with pp > 1; omitted = as even as possible
  rules:
    - match: {kind: attention}
      plan: {tp_size: attn_tp, dcp_size: dcp}
```
With `pp > 1` the layers are split into `pp` pipeline stages of consecutive layers, each on
its own `dp * tp` devices; every rule applies inside a stage (`layers` are global indices).
First matching rule wins; a block no rule matches gets plain TP over `tp`. A plan's
`tp_size` is the number of devices the block runs on (the rest of the `tp` devices hold
copies); for `kind: moe`, `ep_size` splits the experts among those devices. Everything that
can be checked without a model is checked here; checks against a model's shapes, and
warnings for rules that change nothing, happen when the table is resolved for it
(`jaxpar.sharding.resolve`). docs/ARCHITECTURE.md describes the semantics in full.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path
from typing import Any, Mapping

import yaml

AXIS_NAMES = ("tp", "attn_tp", "dcp", "ep", "dp", "pp")
KINDS = ("attention", "linear_attention", "mamba", "mlp", "moe", "embed", "lm_head", "norm",
         # DeepSeek-V3.2's lightning indexer; a multi-token-prediction layer's input projection
         "indexer", "mtp")
ATTENTION_FLAVORS = ("gqa", "gated", "mla")
MATCH_KEYS = ("kind", "attention_flavor", "prefix_pattern", "layers")
PLAN_KEYS = ("tp_size", "dcp_size", "dp_size", "ep_size", "sp")


class RuleTableError(ValueError):
    """A rule table is malformed or does not fit the model / devices."""


@dataclasses.dataclass(frozen=True)
class Match:
    kind: str | None = None
    attention_flavor: str | None = None
    prefix_pattern: str | None = None
    layers: tuple[int, ...] | None = None

    def matches(self, *, kind: str, prefix: str, layer: int | None, flavor: str | None) -> bool:
        if self.kind is not None and self.kind != kind:
            return False
        if self.attention_flavor is not None and self.attention_flavor != flavor:
            return False
        if self.prefix_pattern is not None and not fnmatch.fnmatchcase(prefix, self.prefix_pattern):
            return False
        if self.layers is not None and layer not in self.layers:
            return False
        return True


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """A rule's plan with axis names already replaced by their sizes."""

    tp_size: int | None = None
    dcp_size: int = 1
    dp_size: int = 1
    ep_size: int = 1
    sp: bool = False
    # Which keys the rule set, and the axis names it used (for error messages / mesh naming).
    keys: tuple[str, ...] = ()
    axis_refs: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Rule:
    index: int
    match: Match
    plan: PlanSpec

    def describe(self) -> str:
        return f"rule {self.index} (match {_compact(dataclasses.asdict(self.match))})"


@dataclasses.dataclass(frozen=True)
class RuleTable:
    axes: tuple[tuple[str, int], ...]
    rules: tuple[Rule, ...] = ()
    name: str = "custom"
    # Presets are written for every model: their rules on kinds a model lacks are no news.
    preset: bool = False
    # Layers per pipeline stage (pp parts, each >= 1); None = as even as possible
    # (`jaxpar.sharding.resolve.stage_partition` checks it against the model).
    layer_partition: tuple[int, ...] | None = None

    def axis(self, name: str) -> int:
        return dict(self.axes)[name]

    @property
    def devices(self) -> int:
        a = dict(self.axes)
        return a["tp"] * a["dp"] * a["pp"]

    def first_match(self, **where) -> Rule | None:
        for rule in self.rules:
            if rule.match.matches(**where):
                return rule
        return None


def _compact(d: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items() if v is not None) + "}"


# --------------------------------------------------------------------------- parsing


def _int_axis(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RuleTableError(f"axes.{name} must be a positive integer, got {value!r}")
    return value


def _parse_axes(raw: Any, devices: int | None = None) -> tuple[tuple[str, int], ...]:
    """`devices`: how many devices the table is for, if known; with pp (or dp) given and tp
    omitted, tp is what is left per stage: devices / (pp * dp)."""
    if not isinstance(raw, Mapping):
        raise RuleTableError(f"'axes' must be a mapping of axis sizes, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(AXIS_NAMES))
    if unknown:
        raise RuleTableError(f"unknown axis name(s) {unknown} in 'axes' (known: {', '.join(AXIS_NAMES)})")
    axes = {name: _int_axis(name, raw[name]) for name in raw}
    if "tp" not in raw:
        if devices is None or "pp" not in raw:
            raise RuleTableError("'axes' must give tp (the tensor-parallel size; it may be left out "
                                 "only beside pp, when the device count is known)")
        pp, dp = axes["pp"], axes.get("dp", 1)
        if devices % (pp * dp):
            raise RuleTableError(f"axes: pp={pp} (times dp={dp}) does not divide the {devices} devices, "
                                 "so the stages cannot have equal device counts")
        axes["tp"] = devices // (pp * dp)
    tp = axes["tp"]
    axes.setdefault("attn_tp", tp // axes.get("dcp", 1) if tp % axes.get("dcp", 1) == 0 else tp)
    axes.setdefault("dcp", 1)
    axes.setdefault("ep", 1)
    axes.setdefault("dp", 1)
    axes.setdefault("pp", 1)
    if axes["attn_tp"] * axes["dcp"] != tp:
        raise RuleTableError(
            f"axes: tp must equal attn_tp * dcp, but tp={tp}, attn_tp={axes['attn_tp']}, "
            f"dcp={axes['dcp']} (attn_tp * dcp = {axes['attn_tp'] * axes['dcp']})")
    if (tp * axes["dp"]) % axes["ep"]:
        raise RuleTableError(f"axes: ep={axes['ep']} must divide tp * dp = {tp * axes['dp']}")
    return tuple((n, axes[n]) for n in AXIS_NAMES)


def _parse_match(raw: Any, where: str) -> Match:
    if not isinstance(raw, Mapping) or not raw:
        raise RuleTableError(f"{where}: 'match' must be a non-empty mapping, got {raw!r}")
    unknown = sorted(set(raw) - set(MATCH_KEYS))
    if unknown:
        raise RuleTableError(f"{where}: unknown match key(s) {unknown} (known: {', '.join(MATCH_KEYS)})")
    kind = raw.get("kind")
    if kind is not None and kind not in KINDS:
        raise RuleTableError(f"{where}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    flavor = raw.get("attention_flavor")
    if flavor is not None and flavor not in ATTENTION_FLAVORS:
        raise RuleTableError(f"{where}: unknown attention_flavor {flavor!r} "
                             f"(known: {', '.join(ATTENTION_FLAVORS)})")
    pattern = raw.get("prefix_pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise RuleTableError(f"{where}: prefix_pattern must be a string glob, got {pattern!r}")
    if flavor is not None and kind not in (None, "attention"):
        raise RuleTableError(f"{where}: attention_flavor applies to kind: attention only, not kind: {kind} "
                             "(the rule could never match)")
    layers = raw.get("layers")
    if layers is not None:
        layers = _parse_layers(layers, where)
    return Match(kind=kind, attention_flavor=flavor, prefix_pattern=pattern, layers=layers)


def _parse_layers(raw: Any, where: str) -> tuple[int, ...]:
    """A list of indices, or a range written "a-b" / "a:b" (b exclusive for ':', inclusive for '-')."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return (raw,)
    if isinstance(raw, str):
        for sep, inclusive in ((":", False), ("-", True)):
            if sep in raw:
                a, b = raw.split(sep, 1)
                try:
                    lo, hi = int(a), int(b)
                except ValueError:
                    break
                return tuple(range(lo, hi + 1 if inclusive else hi))
        raise RuleTableError(f"{where}: layers {raw!r} is not a range like '0-3' or '0:4'")
    if isinstance(raw, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in raw):
        return tuple(raw)
    raise RuleTableError(f"{where}: layers must be an index, a list of indices or a range, got {raw!r}")


def _parse_plan(raw: Any, axes: dict[str, int], where: str) -> PlanSpec:
    if not isinstance(raw, Mapping) or not raw:
        raise RuleTableError(f"{where}: 'plan' must be a non-empty mapping, got {raw!r}")
    unknown = sorted(set(raw) - set(PLAN_KEYS))
    if unknown:
        raise RuleTableError(f"{where}: unknown plan key(s) {unknown} (known: {', '.join(PLAN_KEYS)})")
    values: dict[str, Any] = {}
    refs = []
    for key in ("tp_size", "dcp_size", "dp_size", "ep_size"):
        if key not in raw:
            continue
        v = raw[key]
        if isinstance(v, str):
            if v not in axes:
                raise RuleTableError(f"{where}: {key}: {v!r} is neither a number nor an axis name "
                                     f"({', '.join(AXIS_NAMES)})")
            refs.append((key, v))
            v = axes[v]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise RuleTableError(f"{where}: {key} must be a positive integer or an axis name, got {v!r}")
        values[key] = v
    if "sp" in raw:
        if not isinstance(raw["sp"], bool):
            raise RuleTableError(f"{where}: sp must be true or false, got {raw['sp']!r}")
        values["sp"] = raw["sp"]
    if values.get("dcp_size", 1) > 1 and values.get("dp_size", 1) > 1:
        raise RuleTableError(f"{where}: dcp_size and dp_size cannot be combined in one plan "
                             f"(dcp_size={values['dcp_size']}, dp_size={values['dp_size']})")
    return PlanSpec(**values, keys=tuple(sorted(raw)), axis_refs=tuple(refs))


def _parse_partition(raw: Any, pp: int) -> tuple[int, ...] | None:
    """`layer_partition`: "15,15,15,15" or [15, 15, 15, 15], one part per stage, each >= 1
    (its sum is checked against the model's layer count when the table is resolved)."""
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            parts = [int(p) for p in raw.replace(" ", "").split(",")]
        except ValueError:
            raise RuleTableError(f"layer_partition {raw!r} is not a comma-separated list of layer "
                                 "counts like '15,15,15,15'") from None
    elif isinstance(raw, (list, tuple)) and all(isinstance(p, int) and not isinstance(p, bool) for p in raw):
        parts = list(raw)
    elif isinstance(raw, int) and not isinstance(raw, bool):
        parts = [raw]
    else:
        raise RuleTableError(f"layer_partition must be a list of layer counts or a string like "
                             f"'15,15,15,15', got {raw!r}")
    if len(parts) != pp:
        raise RuleTableError(f"layer_partition {','.join(map(str, parts))} has {len(parts)} part(s), "
                             f"but axes.pp={pp} (one part per pipeline stage)")
    empty = [s for s, n in enumerate(parts) if n < 1]
    if empty:
        raise RuleTableError(f"layer_partition {','.join(map(str, parts))}: stage {empty[0]} has "
                             f"{parts[empty[0]]} layers; every pipeline stage needs at least 1")
    return tuple(parts)


def parse_rule_table(raw: Any, name: str = "custom", *, is_preset: bool = False,
                     devices: int | None = None) -> RuleTable:
    if isinstance(raw, Mapping) and "parallelism_rules" in raw:
        extra = sorted(set(raw) - {"parallelism_rules"})
        if extra:
            raise RuleTableError(f"unknown top-level key(s) {extra} beside 'parallelism_rules'")
        raw = raw["parallelism_rules"]
    if not isinstance(raw, Mapping):
        raise RuleTableError(f"a rule table must be a mapping with 'axes' and 'rules', got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"axes", "rules", "layer_partition"})
    if unknown:
        raise RuleTableError(f"unknown key(s) {unknown} in the rule table (expected 'axes', 'rules' "
                             "and, with pp, 'layer_partition')")
    if "axes" not in raw:
        raise RuleTableError("the rule table has no 'axes' block")
    axes = _parse_axes(raw["axes"], devices)
    partition = _parse_partition(raw.get("layer_partition"), dict(axes)["pp"])
    rules_raw = raw.get("rules") or []
    if not isinstance(rules_raw, list):
        raise RuleTableError(f"'rules' must be a list, got {type(rules_raw).__name__}")
    rules = []
    for i, r in enumerate(rules_raw):
        where = f"rule {i}"
        if not isinstance(r, Mapping):
            raise RuleTableError(f"{where}: must be a mapping with 'match' and 'plan', got {r!r}")
        extra = sorted(set(r) - {"match", "plan"})
        if extra:
            raise RuleTableError(f"{where}: unknown key(s) {extra} (expected 'match' and 'plan')")
        if "match" not in r or "plan" not in r:
            raise RuleTableError(f"{where}: needs both 'match' and 'plan'")
        rules.append(Rule(i, _parse_match(r["match"], where), _parse_plan(r["plan"], dict(axes), where)))
    return RuleTable(axes=axes, rules=tuple(rules), name=name, preset=is_preset, layer_partition=partition)


# --------------------------------------------------------------------------- presets


def preset(name: str, devices: int) -> RuleTable:
    """Named policies for `devices` devices, as rule tables."""
    half = max(devices // 2, 1)
    dcp = devices // half
    tables: dict[str, dict[str, Any]] = {
        "tp": {"axes": {"tp": devices}, "rules": []},
        "tpa-dcp": {"axes": {"tp": devices, "attn_tp": half, "dcp": dcp},
                    "rules": [{"match": {"kind": "attention"},
                               "plan": {"tp_size": "attn_tp", "dcp_size": "dcp"}}]},
        "dp-attention": {"axes": {"tp": devices, "attn_tp": half, "dcp": dcp},
                         "rules": [{"match": {"kind": "attention"},
                                    "plan": {"tp_size": "attn_tp", "dp_size": dcp}}]},
        "sp": {"axes": {"tp": devices},
               "rules": [{"match": {"kind": "attention"}, "plan": {"tp_size": "tp", "sp": True}},
                         {"match": {"kind": "mlp"}, "plan": {"tp_size": "tp", "sp": True}}]},
        # The MoE blocks over all devices, one expert group per device (pure EP).
        "ep": {"axes": {"tp": devices, "ep": devices},
               "rules": [{"match": {"kind": "moe"}, "plan": {"tp_size": "tp", "ep_size": "ep"}}]},
        "gdn-replicated": {"axes": {"tp": devices},
                           "rules": [{"match": {"kind": "linear_attention"}, "plan": {"tp_size": 1}}]},
    }
    if name not in tables:
        raise RuleTableError(f"unknown policy preset {name!r} (presets: {', '.join(sorted(tables))}; "
                             "or give a YAML file or a dict)")
    return parse_rule_table(tables[name], name=name, is_preset=True)


PRESETS = ("tp", "tpa-dcp", "dp-attention", "sp", "ep", "gdn-replicated")


def load_rule_table(policy: "str | Path | Mapping[str, Any] | RuleTable | None",
                    devices: int) -> RuleTable:
    """A rule table from a preset name, a YAML file, a dict, or None (plain TP)."""
    if policy is None:
        return preset("tp", devices)
    if isinstance(policy, RuleTable):
        return policy
    if isinstance(policy, Mapping):
        return parse_rule_table(policy, devices=devices)
    text = str(policy)
    if text in PRESETS:
        return preset(text, devices)
    path = Path(text)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise RuleTableError(f"policy file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RuleTableError(f"policy file {path} is not valid YAML: {e}") from e
        return parse_rule_table(raw, name=path.stem, devices=devices)
    return preset(text, devices)  # raises with the list of presets
