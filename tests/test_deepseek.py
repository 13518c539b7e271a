"""DeepSeek-V3 (MLA, grouped sigmoid MoE, MTP) and DeepSeek-V3.2 (plus the lightning
indexer's sparse attention) against Hugging Face transformers on tiny random checkpoints;
the per-layer RFC's tables for them on 8 devices; MTP speculative decoding."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jaxpar
from jaxpar.assembly import make_sharding, open_config
from jaxpar.sharding.inspect import plan_report
from jaxpar.sharding.resolve import resolve_plans
from jaxpar.sharding.rules import RuleTableError, parse_rule_table
from jaxpar.speculative import SpeculativeError
from tests import hf_models
from tests.family_checks import run_modes

FAMILIES = list(hf_models.DEEPSEEK_FAMILIES)
POLICIES = Path(__file__).resolve().parents[1] / "examples" / "policies"
IDS = np.random.default_rng(0).integers(3, 256, size=(2, 20)).astype(np.int32)
PROMPT = IDS[0, :7].tolist()
NEW = 10


@pytest.fixture(scope="module")
def ds_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    v3 = hf_models.add_mtp_layer(hf_models.save_tiny("deepseek_v3", root / "deepseek_v3"), "deepseek_v3")
    # Qwen3.5 with an MTP head (mtp.*): Gated DeltaNet layers cannot roll back rejected drafts.
    qwen = hf_models.add_mtp_layer(hf_models.save_tiny("qwen3_5", root / "qwen3_5", num_hidden_layers=2,
                                                       layer_types=["linear_attention", "full_attention"]),
                                   "qwen3_5")
    return {"deepseek_v3": v3, "deepseek_v32": hf_models.save_tiny("deepseek_v32", root / "deepseek_v32"),
            "qwen3_5": qwen}


@pytest.fixture(scope="module")
def loaded(ds_paths):
    cache = {}

    def get(family, policy=None):
        key = (family, json.dumps(policy, sort_keys=True, default=str))
        if key not in cache:
            cache[key] = jaxpar.load(ds_paths[family], policy=policy, tokenizer=False, progress=False)
        return cache[key]
    return get


@pytest.fixture(scope="module")
def hf_refs(ds_paths):
    return {f: hf_models.hf_logits(ds_paths[f], IDS) for f in FAMILIES}


@hf_models.needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_hf(family, loaded, hf_refs):
    """20 tokens: past index_topk = 8, so V3.2 runs its sparse attention."""
    ref = hf_refs[family]
    np.testing.assert_allclose(loaded(family).logits(IDS), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_prefill_extend_and_decode_equal_full_forward(loaded):
    """Latent-space (absorbed) extend and decode against the expanded prefill, past index_topk
    (DeepSeek-V3's own path without the indexer runs in the speculative tests: verify is
    extend, drafting decode, and their tokens must equal plain greedy decoding)."""
    model = loaded("deepseek_v32")
    full = model.logits(IDS)
    stepped = run_modes(model, IDS, prompt_len=8, chunks=(6,))
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


@hf_models.needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_hf_generate(family, ds_paths, loaded):
    assert loaded(family).generate(PROMPT, NEW, ignore_eos=True).token_ids[0] == \
        hf_models.hf_greedy(ds_paths[family], PROMPT, NEW)


def test_v32_is_dense_mla_up_to_index_topk_and_sparse_past_it(ds_paths, loaded, tmp_path):
    """The same weights without the indexer, as DeepSeek-V3: equal logits while a query sees
    at most index_topk = 8 tokens (positions 0-7), different once the indexer drops keys."""
    cfg = json.loads((ds_paths["deepseek_v32"] / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("index_")}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_v3",
                                                      "architectures": ["DeepseekV3ForCausalLM"]}))
    tensors = load_file(ds_paths["deepseek_v32"] / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".indexer." not in k}, tmp_path / "model.safetensors")
    dense = jaxpar.load(tmp_path, tokenizer=False, progress=False).logits(IDS)
    sparse = loaded("deepseek_v32").logits(IDS)
    scale = np.abs(dense).max()
    np.testing.assert_allclose(sparse[:, :8], dense[:, :8], rtol=1e-5, atol=1e-5 * scale)
    assert np.abs(sparse[:, 8:] - dense[:, 8:]).max() > 1e-2 * scale


# The RFC's DeepSeek-V3.2 table as written (examples/policies/rfc_3_3_mla_indexer_moe.yaml):
# MLA heads and latent cache both over the 8 devices, indexer replicated, EP 8.
def test_rfc_3_3_gives_one_device_tokens(loaded):
    base, model = loaded("deepseek_v32"), loaded("deepseek_v32", POLICIES / "rfc_3_3_mla_indexer_moe.yaml")
    assert model.generate(PROMPT, NEW, ignore_eos=True).token_ids == \
        base.generate(PROMPT, NEW, ignore_eos=True).token_ids


# A mixed MLA plan on 4 of the devices (replicated twice): heads 2 ways, the latent cache 4
# ways, so each head group's 2 ranks hold different slots ("shared" axis: gathered queries,
# reduce-scattered outputs) and 2 more ranks extend them (a psum of the partial results);
# the indexer split over 2, EP 4 with TP 2 inside experts. Prefill, chunked extend and decode
# against the one-device full forward.
MIXED_MLA = {"axes": {"tp": 8, "ep": 4},
             "rules": [{"match": {"kind": "attention"}, "plan": {"tp_size": 2, "dcp_size": 4}},
                       {"match": {"kind": "indexer"}, "plan": {"tp_size": 2}},
                       {"match": {"kind": "moe"}, "plan": {"tp_size": "tp", "ep_size": "ep"}}]}


def test_mixed_mla_plan_prefill_extend_decode_equal_one_device(loaded):
    model = loaded("deepseek_v32", MIXED_MLA)
    assert {p.block: p.describe() for p in model.sharding.plans}["model.layers.0.self_attn"] == "tp=2 dcp=4"
    full = loaded("deepseek_v32").logits(IDS)
    stepped = run_modes(model, IDS, prompt_len=8, chunks=(6,))
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


def test_rfc_3_3_plans_and_latent_cache_layout(loaded):
    model = loaded("deepseek_v32", POLICIES / "rfc_3_3_mla_indexer_moe.yaml")
    plans = {p.block: p.describe() for p in model.sharding.plans}
    assert plans["model.layers.1.self_attn"] == "tp=8 dcp=8"
    assert plans["model.layers.1.self_attn.indexer"] == "tp=1"
    assert plans["model.layers.1.mlp"] == "tp=8 ep=8 expert_tp=1"
    from jaxpar.models.decoder import init_cache

    cache = init_cache(model.cfg, model.sharding, 1, 64, model.dtype).layers[0]
    # One latent head: the 64 slots split 8 ways by DCP; the indexer's keys replicated.
    assert {s.data.shape for s in cache.latent.addressable_shards} == {(1, 8, 32)}
    assert {s.data.shape for s in cache.index_k.addressable_shards} == {(1, 64, 16)}


def test_mla_plan_sizes_must_nest(ds_paths):
    """MLA's dcp ranks are carved out of the heads' devices: tp_size and dcp_size must nest."""
    cfg = open_config(ds_paths["deepseek_v32"])
    others = [{"match": {"kind": k}, "plan": {"tp_size": 2}} for k in ("embed", "mlp", "moe", "indexer", "lm_head")]
    table = parse_rule_table({"axes": {"tp": 6}, "rules": others + [
        {"match": {"kind": "attention"}, "plan": {"tp_size": 2, "dcp_size": 3}}]})
    with pytest.raises(RuleTableError, match="one of tp_size=2 and dcp_size=3 must divide the other"):
        resolve_plans(table, cfg)
    with pytest.raises(RuleTableError, match="has no indexer blocks|indexer"):
        jaxpar.load(ds_paths["deepseek_v3"], tokenizer=False, progress=False,
                    policy={"axes": {"tp": 2}, "rules": [{"match": {"kind": "indexer"}, "plan": {"tp_size": 1}}]})


def test_plan_shows_mla_cache_bytes_per_token(ds_paths):
    cfg = open_config(ds_paths["deepseek_v32"])
    report = plan_report(cfg, make_sharding(cfg), dtype=jnp.bfloat16, collectives=False)
    # 2 layers x (latent 32 + rope key 8 + indexer key 16) x 2 bytes, vs 8 heads x (24 + 16) dims.
    assert report.kv_bytes_per_token == 2 * (32 + 8 + 16) * 2
    assert report.full_kv_bytes_per_token == 2 * 8 * (24 + 16) * 2
    assert "full per-head K/V would be 1,280 bytes (5.7x)" in report.format()


# ---- multi-token prediction (DeepSeek-V3's model.layers.{N}) -------------------------------


def _mtp_logits(model, ids):
    g = model._generator

    @jax.jit
    def run(state, ids):
        m = nnx.merge(g.graphdef, state)
        t = ids.shape[1]
        pos = jnp.broadcast_to(jnp.arange(t), ids.shape)
        lengths = jnp.full((ids.shape[0],), t)
        hidden = m(ids, pos, None, lengths, mode="prefill", return_hidden=True)[2]
        return m.draft(0, ids[:, 1:], hidden[:, :-1], pos[:, :-1], None, lengths - 1, mode="prefill",
                       last_only=False)[0]
    return np.asarray(run(g.state, ids))


MTP_FAMILIES = ["deepseek_v3", "qwen3_5"]
# Drafts per step (fewer compiles for Qwen3.5: k = 1 still covers full acceptance and the
# Gated DeltaNet re-run on a rejection; DeepSeek-V3's k = 2 covers partial acceptance).
DRAFTS = {"deepseek_v3": 2, "qwen3_5": 1}


def test_mtp_layers_load(loaded):
    for family in MTP_FAMILIES:
        assert type(loaded(family).module).__name__ == "CausalLMWithMTP"
    # DeepSeek's MTP layer's copies of the embedding and head duplicate the main model's.
    assert sorted(loaded("deepseek_v3").skipped_weights) == ["model.layers.2.embed_tokens.weight",
                                                             "model.layers.2.shared_head.head.weight"]
    assert loaded("qwen3_5").skipped_weights == []


@hf_models.needs_torch
@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_mtp_layer_matches_torch_reference(family, ds_paths, loaded):
    model = loaded(family)
    ref = hf_models.mtp_reference_logits(ds_paths[family], family, IDS)
    np.testing.assert_allclose(_mtp_logits(model, IDS), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_speculative_mtp_equals_greedy(family, loaded):
    model = loaded(family)
    plain = model.generate(PROMPT, NEW, ignore_eos=True)
    k = DRAFTS[family]
    spec = model.generate(PROMPT, NEW, ignore_eos=True, speculative="mtp", num_speculative_tokens=k)
    assert spec.token_ids == plain.token_ids
    assert spec.draft_tokens == k * spec.decode_steps and 0 <= spec.acceptance_rate <= 1
    assert "acceptance_rate" in spec.timings


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_speculative_verification_rolls_back_rejected_drafts(family, loaded):
    """Drive the verify step with chosen drafts: all right, some right then wrong, all wrong;
    every step must emit exactly the greedy continuation and leave the caches consistent
    (Qwen3.5: the Gated DeltaNet states re-run from before the step on a rejection).
    (The shapes and shardings of test_speculative_mtp_equals_greedy's run: no new compiles.)"""
    model = loaded(family)
    greedy = model.generate(PROMPT, 12, ignore_eos=True).token_ids[0]
    k = DRAFTS[family]
    spec = model._speculator("mtp", k)
    from jaxpar.models.decoder import init_cache
    from jaxpar.models.mtp import init_mtp_cache
    from jaxpar.sharding.host import replicated

    rows, cache_len = 1, 32
    tokens = np.zeros((1, 16), np.int32)
    tokens[0, :len(PROMPT)] = PROMPT
    tokens, lengths = replicated(tokens, model.mesh), replicated(np.array([len(PROMPT)], np.int32), model.mesh)
    spec.compile(tokens, lengths, rows, cache_len)
    cache = init_cache(model.cfg, model.sharding, rows, cache_len, model.dtype)
    mtp = init_mtp_cache(model.cfg, model.sharding, rows, cache_len, model.dtype)
    pending, drafted, cache, mtp = spec.prefill(spec.leaves, tokens, lengths, cache, mtp)
    out = [int(pending[0])]
    wrong = (greedy[0] + 1) % 256
    for right in ((2, 1, 0, 2) if k == 2 else (1, 0, 1)):
        n = len(out)
        drafts = greedy[n:n + k]
        drafts = drafts[:right] + [wrong if greedy[n + j] != wrong else (wrong + 1) % 256 for j in range(right, k)]
        drafts = jax.device_put(np.array([drafts], np.int32), drafted.sharding)
        emitted, m, pending, drafted, cache, mtp = spec.step(spec.leaves, pending, drafts, cache, mtp)
        assert int(m[0]) == right
        out += [int(t) for t in np.asarray(emitted)[0, : right + 1]]
        assert out == greedy[: len(out)]


# The RFC's MTP table (examples/policies/rfc_3_4_mtp_replicate.yaml): MTP blocks replicated.
def test_rfc_3_4_mtp_replicate_gives_one_device_tokens(loaded):
    model = loaded("deepseek_v3", POLICIES / "rfc_3_4_mtp_replicate.yaml")
    mtp_plans = {p.block: p.tp_size for p in model.sharding.plans if p.block.startswith("mtp")}
    assert mtp_plans == {"mtp.layers.0": 1, "mtp.layers.0.self_attn": 1, "mtp.layers.0.mlp": 1}
    assert all(p.tp_size == 8 for p in model.sharding.plans if not p.block.startswith("mtp"))
    spec = model.generate(PROMPT, NEW, ignore_eos=True, speculative="mtp")
    assert spec.token_ids == loaded("deepseek_v3").generate(PROMPT, NEW, ignore_eos=True).token_ids


def test_speculative_errors(loaded):
    with pytest.raises(SpeculativeError, match="multi-token-prediction layers"):
        loaded("deepseek_v32").generate(PROMPT, 4, speculative="mtp")
    with pytest.raises(SpeculativeError, match="temperature=0"):
        loaded("deepseek_v3").generate(PROMPT, 4, speculative="mtp", temperature=0.7)
    with pytest.raises(SpeculativeError, match="not a method"):
        loaded("deepseek_v3").generate(PROMPT, 4, speculative="eagle")
