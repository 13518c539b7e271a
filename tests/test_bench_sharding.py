"""Fast checks of scripts/bench_sharding.py's analytic model and HLO parsing (no compile)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from jaxpar.config import config_from_hf_dict
from jaxpar.sharding.resolve import resolve_plans
from jaxpar.sharding.rules import parse_rule_table

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_sharding.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sharding", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


CFG = config_from_hf_dict(dict(
    model_type="llama", vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=8, head_dim=32, max_position_embeddings=2048,
    rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))
B, S, E, L, ITEM = 8, 128, 512, 8, 4


def _analytic(bench, name, decode):
    table = parse_rule_table(bench.POLICIES[name], name=name)
    plans = resolve_plans(table, CFG)
    return bench.analytic_collectives(CFG, plans, devices=table.axis("tp"), batch=B, seq=S,
                                      decode=decode, itemsize=ITEM)


def _total(terms, kind=None):
    return sum(t.result_bytes for t in terms if kind is None or t.kind == kind)


def test_plain_tp_decode(bench):
    terms = _analytic(bench, "tp8", decode=True)
    # embed + per layer o_proj and down_proj all-reduces of B*E, + the argmax all-gathers.
    assert _total(terms, "all-reduce") == (1 + 2 * L) * B * E * ITEM
    assert _total(terms, "all-gather") == 2 * B * 8 * 4
    wire = sum(bench.wire_bytes(t.kind, t.result_bytes, t.group) for t in terms)
    assert wire == pytest.approx((1 + 2 * L) * B * E * ITEM * 2 * 7 / 8 + 2 * B * 8 * 4 * 7 / 8)


def test_dcp_adds_lse_merge(bench):
    tp = _total(_analytic(bench, "tp8", decode=True))
    dcp = _total(_analytic(bench, "tpa4-dcp2", decode=True))
    h_local = 16 // 4
    assert dcp - tp == L * (B * h_local * 32 * 4 + 2 * B * h_local * 4)
    # prefill: nothing extra (each DCP rank keeps its slots of the replicated k / v)
    assert _total(_analytic(bench, "tpa4-dcp2", decode=False)) == _total(_analytic(bench, "tp8", decode=False))


def test_dp_attention_gathers_the_output(bench):
    terms = _analytic(bench, "dp-attention", decode=True)
    assert _total(terms, "all-gather") == L * B * E * ITEM + 2 * B * 8 * 4
    o_proj = [t for t in terms if "o_proj" in t.what]
    assert {(t.result_bytes, t.group) for t in o_proj} == {(B // 4 * E * ITEM, 2)}


def test_sp_prefill_reduce_scatter_plus_all_gather(bench):
    act = B * S * E * ITEM
    terms = _analytic(bench, "sp4", decode=False)
    assert _total(terms, "reduce-scatter") == (1 + 2 * L) * act // 4  # embed + 2 per layer
    assert _total(terms, "all-gather") == 2 * L * act + 2 * B * 4 * 4
    assert _total(terms, "all-reduce") == B * E * ITEM  # the last token of each row
    # RS + AG send what the all-reduce they replace sends; the last layer's output is never
    # gathered (only each row's last token is), which saves one all-gather's (n-1)/n * act.
    sp_wire = sum(bench.wire_bytes(t.kind, t.result_bytes, t.group) for t in terms
                  if t.result_bytes >= act // 4)
    tp_wire = sum(bench.wire_bytes(t.kind, t.result_bytes, t.group)
                  for t in _analytic(bench, "tp4", decode=False) if t.result_bytes >= act // 4)
    assert sp_wire == pytest.approx(tp_wire - 3 / 4 * act)
    # decode: SP does not apply
    assert _total(_analytic(bench, "sp4", decode=True)) == _total(_analytic(bench, "tp4", decode=True))


def test_kv_bytes(bench):
    table = parse_rule_table(bench.POLICIES["tpa2-dcp4"])
    plans = resolve_plans(table, CFG)
    assert bench.analytic_kv_bytes(CFG, plans, batch=B, seq=S, itemsize=ITEM) == \
        2 * L * B * (S // 4) * (8 // 2) * 32 * ITEM + B * 4


def test_group_size_spellings(bench):
    mesh = ("%ar = f32[8,512]{1,0} all-reduce(%x), channel_id=2, "
            "replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, to_apply=%add")
    assert bench.group_size(mesh, 8) == 4
    assert bench.group_size("all-gather(%x), replica_groups=[2,4]<=[8], dimensions={0}", 8) == 4
    assert bench.group_size("all-reduce(%x), replica_groups={{0,1},{2,3}}, to_apply=%a", 4) == 2
    assert bench.group_size("all-reduce(%x), to_apply=%a", 8) == 8
    ops = bench.collective_ops(mesh, 8)
    assert [(o.kind, o.result_bytes, o.group) for o in ops] == [("all-reduce", 8 * 512 * 4, 4)]
