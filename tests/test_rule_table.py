"""Rule-table loading and checks: each invalid table fails with its own message."""

import jax
import pytest

import jaxpar
from jaxpar.config import load_config
from jaxpar.sharding.resolve import build_sharding, resolve_plans
from jaxpar.sharding.rules import RuleTableError, load_rule_table, parse_rule_table, preset

ATTN = {"kind": "attention"}
# Replicate everything else so that only the block under test can fail.
REST_1 = [{"match": {"kind": k}, "plan": {"tp_size": 1}} for k in ("attention", "mlp", "embed", "lm_head")]


def _table(rules=(), **axes):
    return {"axes": axes or {"tp": 8}, "rules": list(rules)}


# (table, message fragment). Tables that fail at parse time and tables that fail only
# against the tiny llama model (8 heads, 4 KV heads, ffn 128, vocab 256, 3 layers).
INVALID = {
    "unknown top-level key": ({"parallelism_rules": _table(), "extra": 1}, "unknown top-level key"),
    "unknown table key": ({"axes": {"tp": 2}, "rulez": []}, "unknown key(s) ['rulez']"),
    "no axes": ({"rules": []}, "has no 'axes' block"),
    "unknown axis": (_table(tq=2, tp=2), "unknown axis name(s) ['tq']"),
    "non-positive axis": (_table(tp=0), "axes.tp must be a positive integer, got 0"),
    "tp != attn_tp*dcp": (_table(tp=8, attn_tp=2, dcp=2), "tp must equal attn_tp * dcp, but tp=8, attn_tp=2, dcp=2"),
    "pipeline": (_table(tp=2, pp=2), "pipeline parallelism is not implemented yet"),
    "ep not dividing": (_table(tp=4, ep=3), "ep=3 must divide tp * dp = 4"),
    "rules not a list": ({"axes": {"tp": 2}, "rules": {"match": {}}}, "'rules' must be a list"),
    "unknown match key": (_table([{"match": {"knd": "mlp"}, "plan": {"tp_size": 2}}]), "rule 0: unknown match key(s) ['knd']"),
    "unknown kind": (_table([{"match": {"kind": "ssm"}, "plan": {"tp_size": 2}}]), "unknown kind 'ssm'"),
    "unknown flavor": (_table([{"match": {"attention_flavor": "mqa"}, "plan": {"tp_size": 2}}]), "unknown attention_flavor 'mqa'"),
    "unknown plan key": (_table([{"match": ATTN, "plan": {"tp": 2}}]), "rule 0: unknown plan key(s) ['tp']"),
    "unknown axis reference": (_table([{"match": ATTN, "plan": {"tp_size": "attn"}}]), "tp_size: 'attn' is neither a number nor an axis name"),
    "bad sp": (_table([{"match": ATTN, "plan": {"sp": "yes"}}]), "sp must be true or false"),
    "dcp with dp": (_table([{"match": ATTN, "plan": {"dcp_size": 2, "dp_size": 2}}]), "dcp_size and dp_size cannot be combined"),
    "bad layer range": (_table([{"match": {"layers": "a-b"}, "plan": {"tp_size": 2}}]), "is not a range"),
    "rule missing plan": (_table([{"match": ATTN}]), "rule 0: needs both 'match' and 'plan'"),
}
INVALID_FOR_MODEL = {
    "heads not divisible": (_table([{"match": ATTN, "plan": {"tp_size": 3}}] + REST_1, tp=3),
                            "rule 0 (match {kind: attention}) at layer 0 (model.layers.0.self_attn): num_attention_heads=8 is not divisible by tp_size=3"),
    "ffn not divisible": (_table([{"match": {"kind": "mlp"}, "plan": {"tp_size": 3}}] + REST_1, tp=3),
                          "intermediate_size=128 is not divisible by tp_size=3"),
    "vocab not divisible": (_table([{"match": ATTN, "plan": {"tp_size": 1}},
                                    {"match": {"kind": "mlp"}, "plan": {"tp_size": 1}}], tp=3),
                            "vocab_size=256 is not divisible by tp_size=3"),
    "plan larger than devices": (_table([{"match": ATTN, "plan": {"tp_size": 4, "dcp_size": 4}}], tp=8, attn_tp=4, dcp=2),
                                 "multiply to 16 devices (tp_size=4, dcp_size=4, dp_size=1, ep_size=1), which does not divide the tp=8"),
    "feature not for kind": (_table([{"match": {"kind": "mlp"}, "plan": {"dcp_size": 2}}]),
                             "mlp blocks of llama do not support plan key(s) ['dcp_size']"),
    "kind not in arch": (_table([{"match": {"kind": "moe"}, "plan": {"ep_size": 2}}], tp=2, ep=2),
                         "llama has no moe blocks"),
    "layer out of range": (_table([{"match": {"layers": [7]}, "plan": {"tp_size": 2}}]),
                           "layer index(es) [7] out of range for 3 layers"),
    "too few devices": (_table(tp=8, dp=2), "needs dp * tp = 2 * 8 = 16 devices, but only 8 are available"),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_table_fails_at_parse(name):
    raw, message = INVALID[name]
    with pytest.raises(RuleTableError) as e:
        parse_rule_table(raw)
    assert message in str(e.value)


@pytest.mark.parametrize("name", list(INVALID_FOR_MODEL))
def test_invalid_table_fails_against_model(name, tiny_models):
    raw, message = INVALID_FOR_MODEL[name]
    cfg = load_config(tiny_models["llama"])
    with pytest.raises(RuleTableError) as e:
        build_sharding(parse_rule_table(raw), cfg, jax.devices())
    assert message in str(e.value)


def test_messages_are_all_distinct():
    messages = [m for _, m in INVALID.values()] + [m for _, m in INVALID_FOR_MODEL.values()]
    assert len(set(messages)) == len(messages) >= 15


def test_kv_heads_neither_dividing_nor_divisible(tmp_path):
    from tests import hf_models

    path = hf_models.save_tiny("llama", tmp_path / "m", num_attention_heads=12, num_key_value_heads=3,
                               hidden_size=96)
    with pytest.raises(RuleTableError, match="num_key_value_heads=3 neither divides nor is divisible by tp_size=4"):
        build_sharding(parse_rule_table(_table([{"match": ATTN, "plan": {"tp_size": 4}}], tp=4)),
                       load_config(path), jax.devices())


def test_first_matching_rule_wins_and_default_is_plain_tp(tiny_models):
    cfg = load_config(tiny_models["llama"])
    table = parse_rule_table(_table([
        {"match": {"kind": "attention", "layers": "0-1"}, "plan": {"tp_size": "attn_tp", "dcp_size": "dcp"}},
        {"match": {"kind": "attention"}, "plan": {"tp_size": 2}},
        {"match": {"prefix_pattern": "model.layers.2.*"}, "plan": {"tp_size": 8}},
    ], tp=8, attn_tp=4, dcp=2))
    plans = {p.block: p for p in resolve_plans(table, cfg)}
    assert (plans["model.layers.0.self_attn"].rule, plans["model.layers.0.self_attn"].dcp_size) == (0, 2)
    assert (plans["model.layers.2.self_attn"].rule, plans["model.layers.2.self_attn"].tp_size) == (1, 2)
    assert (plans["model.layers.2.mlp"].rule, plans["model.layers.2.mlp"].tp_size) == (2, 8)
    assert (plans["model.layers.0.mlp"].rule, plans["model.layers.0.mlp"].tp_size) == (None, 8)


def test_yaml_file_dict_and_preset_load_the_same(tmp_path):
    text = """
parallelism_rules:
  axes: {tp: 8, attn_tp: 4, dcp: 2}
  rules:
    - match: {kind: attention}
      plan: {tp_size: attn_tp, dcp_size: dcp}
"""
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    from_yaml = load_rule_table(path, 8)
    assert from_yaml.rules == preset("tpa-dcp", 8).rules
    assert from_yaml.axes == preset("tpa-dcp", 8).axes
    with pytest.raises(RuleTableError, match="unknown policy preset 'tpx'"):
        load_rule_table("tpx", 8)
    bad = tmp_path / "bad.yaml"
    bad.write_text("parallelism_rules: [unclosed")
    with pytest.raises(RuleTableError, match="not valid YAML"):
        load_rule_table(bad, 8)


def test_mesh_axes_are_whole_groups(tiny_models):
    cfg = load_config(tiny_models["llama"])
    s = build_sharding(preset("tpa-dcp", 8), cfg, jax.devices())
    assert dict(s.mesh.shape) == {"dp": 1, "attn_tp": 4, "dcp": 2}
    s = build_sharding(preset("tp", 8), cfg, jax.devices())
    assert dict(s.mesh.shape) == {"dp": 1, "tp": 8}
    s = build_sharding(parse_rule_table(_table([{"match": ATTN, "plan": {"dp_size": 4, "tp_size": 2}}])),
                       cfg, jax.devices())
    assert sorted(s.mesh.shape.values()) == [1, 2, 4]
    attn = s.layers[0].mixer
    assert attn.size("batch") == 4 and attn.size("q_heads") == 2 and s.layers[0].ffn.size("ffn") == 8


def test_load_error_is_a_value_error_for_the_cli(tiny_models):
    with pytest.raises(ValueError, match="unknown axis name"):
        jaxpar.load(tiny_models["llama"], policy={"axes": {"tp": 2, "zz": 1}}, tokenizer=False)
