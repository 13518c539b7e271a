"""Rule-table loading and checks: each invalid table fails with its own message; rules that
change nothing for a model warn (and `jaxpar plan` lists them); specs never drop an axis."""

import warnings

import jax
import numpy as np
import pytest

import jaxpar
from jaxpar.config import config_from_hf_dict
from jaxpar.sharding.axis_rules import AxisRules, ShardingSpecError
from jaxpar.sharding.inspect import plan_report
from jaxpar.sharding.resolve import RuleTableWarning, build_sharding, resolve_plans
from jaxpar.sharding.rules import RuleTableError, load_rule_table, parse_rule_table, preset

ATTN = {"kind": "attention"}
# The tiny Llama of tests/hf_models as a config (no weights, no torch needed).
_LLAMA = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
LLAMA = config_from_hf_dict(_LLAMA)
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
    "partition parts != pp": ({**_table(tp=2, pp=2), "layer_partition": "1,1,1"},
                              "layer_partition 1,1,1 has 3 part(s), but axes.pp=2"),
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
    "flavor on another kind": (_table([{"match": {"kind": "mlp", "attention_flavor": "gqa"}, "plan": {"tp_size": 2}}]),
                               "rule 0: attention_flavor applies to kind: attention only, not kind: mlp"),
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
                                 "multiply to 16 devices (tp_size=4, dcp_size=4, dp_size=1), which does not divide the tp=8"),
    "feature not for kind": (_table([{"match": {"kind": "mlp"}, "plan": {"dcp_size": 2}}]),
                             "mlp blocks of llama do not support plan key(s) ['dcp_size']"),
    "kind not in arch": (_table([{"match": {"kind": "moe"}, "plan": {"ep_size": 2}}], tp=2, ep=2),
                         "rule 0 (match {kind: moe}): llama has no moe blocks"),
    "linear attention on llama": (_table([{"match": {"kind": "linear_attention"}, "plan": {"tp_size": 1}}]),
                                  "rule 0 (match {kind: linear_attention}): llama has no linear_attention blocks"),
    "norm kind": (_table([{"match": {"kind": "norm"}, "plan": {"tp_size": 1}}]),
                  "rule 0 (match {kind: norm}): llama has no norm blocks with a plan of their own"),
    "flavor not in arch": (_table([{"match": ATTN, "plan": {"tp_size": 8}},
                                   {"match": {"attention_flavor": "mla"}, "plan": {"tp_size": 2}}]),
                           "rule 1 (match {attention_flavor: mla}): llama has no mla attention (its attention "
                           "layers are gqa)"),
    "too few devices": (_table(tp=8, dp=2), "needs dp * tp = 2 * 8 = 16 devices, but only 8 are available"),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_table_fails_at_parse(name):
    raw, message = INVALID[name]
    with pytest.raises(RuleTableError) as e:
        parse_rule_table(raw)
    assert message in str(e.value)


@pytest.mark.parametrize("name", list(INVALID_FOR_MODEL))
def test_invalid_table_fails_against_model(name):
    raw, message = INVALID_FOR_MODEL[name]
    with pytest.raises(RuleTableError) as e:
        build_sharding(parse_rule_table(raw), LLAMA, jax.devices())
    assert message in str(e.value)


def test_messages_are_all_distinct():
    messages = [m for _, m in INVALID.values()] + [m for _, m in INVALID_FOR_MODEL.values()]
    assert len(set(messages)) == len(messages) >= 15


def test_kv_heads_neither_dividing_nor_divisible():
    cfg = config_from_hf_dict({**_LLAMA, "num_attention_heads": 12, "num_key_value_heads": 3, "hidden_size": 96})
    with pytest.raises(RuleTableError, match="num_key_value_heads=3 neither divides nor is divisible by tp_size=4"):
        build_sharding(parse_rule_table(_table([{"match": ATTN, "plan": {"tp_size": 4}}], tp=4)), cfg, jax.devices())


def test_first_matching_rule_wins_and_default_is_plain_tp():
    cfg = LLAMA
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


def test_mesh_axes_are_whole_groups():
    cfg = LLAMA
    s = build_sharding(preset("tpa-dcp", 8), cfg, jax.devices())
    assert dict(s.mesh.shape) == {"dp": 1, "attn_tp": 4, "dcp": 2}
    s = build_sharding(preset("tp", 8), cfg, jax.devices())
    assert dict(s.mesh.shape) == {"dp": 1, "tp": 8}
    s = build_sharding(parse_rule_table(_table([{"match": ATTN, "plan": {"dp_size": 4, "tp_size": 2}}])),
                       cfg, jax.devices())
    assert sorted(s.mesh.shape.values()) == [1, 2, 4]
    attn = s.layers[0].mixer
    assert attn.size("batch") == 4 and attn.size("q_heads") == 2 and s.layers[0].ffn.size("ffn") == 8


def test_load_error_is_a_value_error_for_the_cli(stories_dir):
    with pytest.raises(ValueError, match="unknown axis name"):
        jaxpar.load(stories_dir, policy={"axes": {"tp": 2, "zz": 1}}, tokenizer=False)


# --------------------------------------------------------------------------- no silent no-ops

# A 4-layer Qwen3 and a 2-layer Qwen3-MoE built from config dicts (no weights needed).
QWEN3 = config_from_hf_dict(dict(
    model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=256))
QWEN3_MOE = config_from_hf_dict(dict(
    model_type="qwen3_moe", vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=4, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    max_position_embeddings=256))


def test_mla_flavor_on_qwen3_is_an_error():
    table = parse_rule_table(_table([{"match": {"kind": "attention", "attention_flavor": "mla"},
                                      "plan": {"tp_size": 2}}]))
    with pytest.raises(RuleTableError, match=r"rule 0 \(match \{kind: attention, attention_flavor: mla\}\): "
                                             r"qwen3 has no mla attention \(its attention layers are gqa\)"):
        build_sharding(table, QWEN3, jax.devices())


# table rules -> (the rule warned about, message fragment); every other rule takes blocks.
NO_OPS = {
    "mistyped prefix_pattern": (
        [{"match": {"prefix_pattern": "model.layer.1.*"}, "plan": {"tp_size": 4}}], 0,
        "rule 0 (match {prefix_pattern: model.layer.1.*}) matches no block of this qwen3 model: prefix_pattern "
        "'model.layer.1.*' matches none of the block prefixes (e.g. model.layers.0.self_attn, model.layers.0.mlp)"),
    "layers past the end": (
        [{"match": {"kind": "mlp", "layers": "4-7"}, "plan": {"tp_size": 4}}], 0,
        "rule 0 (match {kind: mlp, layers: (4, 5, 6, 7)}) matches no block of this qwen3 model: layer index(es) "
        "[4, 5, 6, 7] are past the model's 4 layers"),
    "some layers past the end": (
        [{"match": {"kind": "mlp", "layers": [3, 9]}, "plan": {"tp_size": 4}}], 0,
        "rule 0 (match {kind: mlp, layers: (3, 9)}): layer index(es) [9] are past the model's 4 layers"),
    "shadowed by earlier rules": (
        [{"match": {"kind": "attention", "layers": "0-1"}, "plan": {"tp_size": 4}},
         {"match": {"kind": "attention", "layers": "2:4"}, "plan": {"tp_size": 2}},
         {"match": {"kind": "attention", "layers": [1, 2]}, "plan": {"tp_size": 8}}], 2,
        "rule 2 (match {kind: attention, layers: (1, 2)}) is shadowed: every block it matches is taken by "
        "earlier rule(s) 0, 1"),
}


@pytest.mark.parametrize("name", list(NO_OPS))
def test_rules_that_change_nothing_warn_and_plan_lists_them(name):
    rules, index, message = NO_OPS[name]
    with pytest.warns(RuleTableWarning) as record:
        sharding = build_sharding(parse_rule_table(_table(rules)), QWEN3, jax.devices())
    assert [str(w.message) for w in record] == [message]
    assert sharding.rule_warnings == (message,)
    assert f"rule {index} " in message
    report = plan_report(QWEN3, sharding, collectives=False)
    assert report.rule_warnings == [message]
    assert f"warning: {message}" in report.format()


def test_presets_do_not_warn_but_plan_still_lists():
    """The sp preset has a `kind: mlp` rule, which an all-MoE model never uses."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuleTableWarning)
        sharding = build_sharding(preset("sp", 8), QWEN3_MOE, jax.devices())
    assert sharding.rule_warnings == ("rule 1 (match {kind: mlp}) matches no block of this qwen3_moe model: "
                                      "no block has all the matched properties",)
    with pytest.warns(RuleTableWarning, match="rule 1 .*matches no block"):  # the same table, not a preset
        build_sharding(parse_rule_table({"axes": {"tp": 8}, "rules": [
            {"match": {"kind": "attention"}, "plan": {"tp_size": "tp", "sp": True}},
            {"match": {"kind": "mlp"}, "plan": {"tp_size": "tp", "sp": True}}]}), QWEN3_MOE, jax.devices())


def test_two_logical_axes_on_one_mesh_axis_is_an_error():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("dp", "tp"))
    rules = AxisRules(mesh, (("batch", ("dp",)), ("heads", ("tp",)), ("seq", ("tp",))))
    assert tuple(rules.spec(("batch", "seq", None))) == ("dp", "tp", None)
    with pytest.raises(ShardingSpecError, match="logical axes 'heads' and 'seq' both map to mesh axis 'tp'"):
        rules.spec(("batch", "heads", "seq"))
