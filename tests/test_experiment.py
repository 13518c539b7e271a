"""`jaxpar experiment`: specs, the roofline, compile-only analysis at 1B shape, reports."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar.config import config_from_hf_dict
from jaxpar.experiment import roofline as rl
from jaxpar.experiment.analysis import local_bytes
from jaxpar.experiment.cost_model import train_activation_bytes
from jaxpar.experiment.hardware import PROFILES, HardwareError, load_profile, profile_from_dict
from jaxpar.experiment.models import apply_overrides, load_model_config, shipped_configs
from jaxpar.experiment.report import write_report
from jaxpar.experiment.run import run_experiment
from jaxpar.experiment.spec import SpecError, load_spec, parse_spec
from jaxpar.assembly import abstract_model
from jaxpar.sharding.resolve import build_sharding
from jaxpar.sharding.rules import preset

REPO = Path(__file__).resolve().parents[1]

# The shape of a 1.2B-parameter Llama (Llama-3.2-1B's widths; tied embeddings).
ONE_B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
             num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
             max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
             tie_word_embeddings=True, torch_dtype="bfloat16")


def _analytic_param_bytes(hf, tp, itemsize=2):
    e, f, v, layers = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"], hf["num_hidden_layers"]
    q = hf["num_attention_heads"] * hf["head_dim"]
    kv = hf["num_key_value_heads"] * hf["head_dim"]
    matrices = v * e + layers * (e * q + 2 * e * kv + q * e + 3 * e * f)  # tied: no lm_head
    norms = (2 * layers + 1) * e  # replicated on every device
    return (matrices // tp + norms) * itemsize


def test_1b_param_bytes_per_device_are_the_analytic_share():
    cfg = config_from_hf_dict(ONE_B)
    sharding = build_sharding(preset("tp", 8), cfg, jax.devices()[:8])
    _, state = abstract_model(cfg, sharding, jnp.bfloat16)
    total = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state))
    assert 1.2e9 < total < 1.3e9
    assert local_bytes(state) == _analytic_param_bytes(ONE_B, 8)


SPEC_1B = {
    "name": "one-b", "hardware": "h100", "dtype": "bfloat16",
    "models": [{"name": "1b-2l", "config": "one_b.json", "overrides": {"num_hidden_layers": 2}}],
    "policies": [{"name": "tp8", "table": "tp", "devices": 8},
                 {"name": "pp2-tp4", "table": "tp", "devices": 4, "pipeline": {"stages": 2, "chunk": 64}},
                 {"name": "too-wide", "table": "tp", "devices": 3}],
    "workloads": [{"name": "w", "batch": 8, "prompt": 128, "output": 32}],
    "extend_chunk": 32,
}


@pytest.fixture(scope="module")
def one_b_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exp")
    (folder / "one_b.json").write_text(json.dumps(ONE_B))
    spec = parse_spec(SPEC_1B, base_dir=folder)
    return run_experiment(spec)


def test_compile_only_1b_on_8_devices(one_b_results):
    rows = {r["policy"]: r for r in one_b_results["rows"]}
    # a table that does not fit the model is reported, not dropped
    assert "heads" in rows["too-wide"]["error"] or "divisible" in rows["too-wide"]["error"]
    tp8 = rows["tp8"]
    hf2 = {**ONE_B, "num_hidden_layers": 2}
    assert tp8["memory"]["param_bytes"] == _analytic_param_bytes(hf2, 8)
    assert tp8["memory"]["fits"] == "yes"
    # KV cache: k and v [8 rows, cache_len slots, 1 KV head per device, 64] bf16 per layer + lengths
    assert tp8["memory"]["cache_bytes"] == 2 * 2 * 8 * tp8["cache_len"] * 1 * 64 * 2 + 8 * 4
    modes = tp8["stage_details"][0]["modes"]
    assert set(modes) == {"prefill", "extend", "decode"}
    for d in modes.values():
        # what the compiled program moves is what the sharding needs, in bf16
        assert d["collective_bytes"] == d["analytic_min_bytes"]
        assert d["compiled"]["flops"] > 0 and d["compiled"]["temp_bytes"] > 0
        assert d["roofline"]["time_s"] > 0
    # decode reads the weights (memory over compute); the vocab-parallel embedding + 2
    # row-parallel projections per layer all-reduce [B, E] bf16
    decode = modes["decode"]["roofline"]
    assert decode["memory_s"] > decode["compute_s"] and decode["comm_s"] > 0
    assert modes["decode"]["collectives"]["all-reduce"] == {"count": 1 + 2 * 2, "bytes": 5 * 8 * 2048 * 2}
    # ideal prefill FLOPs per device, by hand: projections, causal attention, the head on
    # each row's last token (tied: the embedding matrix)
    b, t, e, f, layers, v = 8, 128, 2048, 8192, 2, 128256
    q, kv = 32 * 64, 8 * 64
    proj = 2 * b * t * layers * (e * q + 2 * e * kv + q * e + 3 * e * f) / 8
    attention = layers * 4 * 64 * (32 / 8) * b * t * (t + 1) / 2
    head = 2 * b * v * e / 8
    assert modes["prefill"]["ideal"]["flops"] == pytest.approx(proj + attention + head, rel=1e-12)
    # XLA:CPU runs attention over all T x T pairs: the compiled FLOPs are a little higher
    assert 1 < modes["prefill"]["compiled"]["flops"] / (proj + attention + head) < 1.1
    assert tp8["predicted"]["ttft_s"] > tp8["predicted"]["tpot_s"] > 0
    # a 2-stage pipeline: each stage holds one layer, the first the embedding (tied: the last too)
    pp = rows["pp2-tp4"]
    assert pp["stage_layers"] == [1, 1] and pp["devices"] == 8 and pp["stage_of"] == [0, 1]
    assert "ttft_s" in pp["predicted"] and pp["pipeline_formula"]


def test_sp_keeps_a_shard_of_the_residual_for_the_backward():
    cfg = config_from_hf_dict(ONE_B)
    tp = build_sharding(preset("tp", 8), cfg, jax.devices()[:8])
    sp = build_sharding(preset("sp", 8), cfg, jax.devices()[:8])
    b, t, e, layers = 4, 1024, 2048, 16
    act = {name: train_activation_bytes(cfg, sh, batch=b, seq=t, itemsize=2) for name, sh in (("tp", tp), ("sp", sp))}
    # every block's input (2 per layer) is a sequence shard under SP: 1/8 of [B, T, E]
    assert act["tp"] - act["sp"] == pytest.approx(2 * layers * b * t * e * 2 * (1 - 1 / 8))
    # recomputing the MLPs drops their three [B, T, F/8] intermediates
    no_mlp = train_activation_bytes(cfg, tp, batch=b, seq=t, itemsize=2, remat=("mlp",))
    assert act["tp"] - no_mlp == pytest.approx(layers * b * t * 3 * 8192 / 8 * 2)


def test_report_files(one_b_results, tmp_path):
    files = write_report(one_b_results, tmp_path)
    for key in ("memory_plot", "latency_plot", "comm_plot"):
        data = files[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    md = files["markdown"].read_text()
    assert "| tp8 |" in md and "| too-wide |" in md and "error" in md
    assert json.loads(files["json"].read_text())["rows"][0]["policy"] == "tp8"


def test_roofline_hand_checked():
    hw = profile_from_dict({"name": "toy", "hbm_bytes": 100, "hbm_bandwidth": 10, "peak_flops": {"bfloat16": 100},
                            "link_bandwidth": 2, "links": 2, "link_latency": 0.5})
    r = rl.roofline(1000, 50, [("all-reduce", 8, 4), ("all-gather", 4, 2)], hw, "bfloat16")
    assert r.compute_s == 10 and r.memory_s == 5
    # all-reduce: 2*3/4*8 = 12 B at 4 B/s = 3 s + 6 steps * 0.5 s; all-gather: 2 B -> 0.5 s + 0.5 s
    assert r.comm_s == pytest.approx(3 + 3 + 0.5 + 0.5)
    assert r.time_s == pytest.approx(17) and r.bound == "compute"
    # pipeline: stages of 4, 6, 5 s, 4 chunks, 0.25 s per send
    assert rl.pipeline_prefill([4, 6, 5], 4, 0.25) == pytest.approx(15 / 4 + 3 * 6 / 4 + 2 * 0.25)
    assert rl.pipeline_decode([4, 6, 5], 0.25) == pytest.approx(15.5)
    with pytest.raises(HardwareError, match="float32"):
        hw.flops("float32")


def test_shipped_configs_and_profiles():
    assert {"qwen3-32b", "llama-3.1-70b", "qwen3-next-80b-a3b", "qwen3.5-397b-a17b"} <= set(shipped_configs())
    cfg = load_model_config("qwen3.5-397b-a17b", {"num_hidden_layers": 8})
    assert cfg.num_layers == 8 and cfg.layer_types.count("attention") == 2 and cfg.num_experts == 512
    assert apply_overrides({"num_hidden_layers": 4, "layer_types": ["a"] * 4}, {"num_hidden_layers": 2})["layer_types"] == ["a", "a"]
    for name, p in PROFILES.items():
        assert p.sources and p.hbm_bytes > 0 and p.flops("bfloat16") > 0
    assert load_profile("H200").hbm_bytes == 141e9
    with pytest.raises(HardwareError, match="unknown hardware"):
        load_profile("a100")


@pytest.mark.parametrize("raw, match", [
    ({"hardware": "h100", "models": ["qwen3-32b"], "workloads": [{"batch": 1, "prompt": 8, "output": 8}]},
     "needs `policies`"),
    ({**SPEC_1B, "policies": [{"table": "tp"}]}, "needs `devices`"),
    ({**SPEC_1B, "workloads": [{"batch": 1, "batch_per_device": 2, "prompt": 8, "output": 8}]}, "exactly one"),
    ({**SPEC_1B, "modes": ["prefil"]}, "unknown mode"),
    ({**SPEC_1B, "hardware": "h900"}, "unknown hardware"),
    ({**SPEC_1B, "batch": 3}, "unknown key"),
    ({**SPEC_1B, "policies": [{"table": "tp", "devices": 4, "pipeline": {"stages": 2, "layer_partition": [3]}}]},
     "layer_partition"),
])
def test_spec_errors(raw, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(raw)


def test_shipped_example_specs_parse():
    specs = sorted((REPO / "examples" / "experiments").glob("*.yaml"))
    assert len(specs) >= 3
    for path in specs:
        spec = load_spec(path)
        for m in spec.models:
            load_model_config(m.ref, dict(m.overrides), spec.base_dir)


def test_cli_experiment(tmp_path, capsys):
    from jaxpar.cli import main

    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        "hardware: h100\nmodels:\n  - {name: stories, config: " + str(REPO / "tests/data/stories260K") + "}\n"
        "policies:\n  - name: tpa4-dcp2\n    table:\n      axes: {tp: 8, attn_tp: 4, dcp: 2}\n"
        "      rules:\n        - {match: {kind: attention}, plan: {tp_size: attn_tp, dcp_size: dcp}}\n"
        "        - {match: {kind: mlp}, plan: {tp_size: 4}}\n"
        "workloads:\n  - {batch_per_device: 1, prompt: 16, output: 8}\nmodes: [decode, train]\n"
        "train: {batch: 8, seq: 16}\n")
    assert main(["experiment", str(spec), "--out", str(tmp_path / "out"), "--no-plots", "--quiet"]) == 0
    assert "| tpa4-dcp2 | 8 |" in capsys.readouterr().out
    row = json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]
    assert row["batch"] == 8 and row["dtype"] == "float32"
    # DCP splits the cache slots over 2 ranks on top of the 4 KV heads over attn_tp
    assert row["memory"]["cache_bytes"] == 5 * 2 * 8 * (row["cache_len"] // 2) * 1 * 8 * 4 + 8 * 4
    decode = row["stage_details"][0]["modes"]["decode"]
    assert decode["collective_bytes"] == decode["analytic_min_bytes"]
    # train mode: AdamW keeps two moments per parameter (float32 like the parameters) and two
    # int32 step counts (its own and the schedule's)
    train = row["train"]["memory"]
    assert train["optimizer_bytes"] == 2 * train["param_bytes"] + 8
    assert train["activation_bytes"] > 0 and train["temp_bytes"] > 0 and row["train"]["roofline"]["time_s"] > 0
    assert main(["experiment", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    # no float32 peak is published for TPU v5e: refused before any compile
    spec.write_text(spec.read_text().replace("h100", "tpu-v5e"))
    assert main(["experiment", str(spec), "--out", str(tmp_path / "o"), "--no-plots", "--quiet"]) == 2
    assert "no peak FLOP/s for float32" in capsys.readouterr().err
