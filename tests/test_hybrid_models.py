"""Qwen3.5 / Qwen3-Next / Qwen3-MoE against Hugging Face transformers on tiny random
checkpoints, and their sharding policies (GDN replicated / split, EP, mixed tables)."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxpar
from jaxpar.assembly import make_sharding
from jaxpar.models.decoder import init_cache
from jaxpar.sharding.rules import RuleTableError
from tests import hf_models
from tests.family_checks import run_modes

FAMILIES = list(hf_models.HYBRID_FAMILIES)


@pytest.fixture(scope="module")
def hybrid_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    # Qwen3-Next without an EOS id in its config (test_folder_without_tokenizer_generates_like_hf).
    return {f: hf_models.save_tiny(f, root / f, **({"eos_token_id": None} if f == "qwen3_next" else {}))
            for f in FAMILIES}


@pytest.fixture(scope="module")
def loaded(hybrid_models):
    cache = {}

    def get(family, policy=None):
        key = (family, json.dumps(policy, sort_keys=True))
        if key not in cache:
            cache[key] = jaxpar.load(hybrid_models[family], policy=policy, tokenizer=False, progress=False)
        return cache[key]
    return get


IDS = np.random.default_rng(0).integers(3, 256, size=(2, 11)).astype(np.int32)


@pytest.fixture(scope="module")
def hf_refs(hybrid_models):
    return {f: hf_models.hf_logits(p, IDS) for f, p in hybrid_models.items()}


@hf_models.needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_hf(family, loaded, hf_refs):
    ref = hf_refs[family]
    np.testing.assert_allclose(loaded(family).logits(IDS), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_extend_and_decode_equal_full_forward(family, loaded):
    model = loaded(family)
    ids = np.random.default_rng(1).integers(3, 256, size=(2, 20)).astype(np.int32)
    full = model.logits(ids)
    stepped = run_modes(model, ids, prompt_len=5, chunks=(4, 3))
    # float32, chunked vs recurrent GDN: up to 1.2e-5 of the largest logit over random draws.
    np.testing.assert_allclose(stepped, full, rtol=3e-5, atol=3e-5 * np.abs(full).max())


@hf_models.needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_hf_generate(family, hybrid_models, loaded):
    prompt = IDS[0, :7].tolist()
    assert loaded(family).generate(prompt, 10, ignore_eos=True).token_ids[0] == \
        hf_models.hf_greedy(hybrid_models[family], prompt, 10)


# After this prompt the tiny Qwen3-Next greedily emits 0 and 2 (ids that a fallback
# tokenizer or the usual configs take for EOS) among its first 12 tokens.
NO_EOS_PROMPT, NO_EOS_STEPS = [86, 228, 69, 60, 183, 160], 12


def test_folder_without_tokenizer_loads_without_one(hybrid_models, caplog):
    """A folder saved by save_pretrained (no tokenizer files) whose config has no EOS id
    loads without a tokenizer and without stop ids, says so, and refuses text prompts."""
    path = hybrid_models["qwen3_next"]
    assert not any(p.name.startswith("tokenizer") for p in path.iterdir())
    with caplog.at_level(logging.WARNING, logger="jaxpar"):
        bare = jaxpar.load(path, progress=False)
    assert bare.tokenizer is None and bare.stop_ids == set()
    assert any("no tokenizer files" in r.getMessage() and "loaded without a tokenizer" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ValueError, match="loaded without a tokenizer: pass token ids"):
        bare.generate("hello", 4)


@hf_models.needs_torch
def test_folder_without_tokenizer_generates_like_hf(hybrid_models, loaded):
    """Without stop ids the tokenizer-less folder generates what HF generates."""
    import torch

    path = hybrid_models["qwen3_next"]
    hf = hf_models.hf_model(path)
    with torch.no_grad():  # HF's own stopping rules: none apply to this folder
        ref = hf.generate(torch.tensor([NO_EOS_PROMPT]), max_new_tokens=NO_EOS_STEPS,
                          do_sample=False)[0, len(NO_EOS_PROMPT):].tolist()
    assert len(ref) == NO_EOS_STEPS and 0 in ref[:-1] and 2 in ref[:-1]
    # The same weights and stop ids, with programs the greedy test above compiled already.
    model = loaded("qwen3_next")
    assert model.stop_ids == set()
    result = model.generate(NO_EOS_PROMPT, NO_EOS_STEPS)
    assert result.token_ids == [ref] and result.finish_reasons == ["length"]


def test_batched_ragged_prompts_equal_one_by_one(loaded):
    model = loaded("qwen3_5")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (3, 17, 9)]
    assert model.generate(prompts, 6, ignore_eos=True).token_ids == \
        [model.generate(p, 6, ignore_eos=True).token_ids[0] for p in prompts]


GDN_POLICIES = {
    "gdn-replicated-tp4": {"axes": {"tp": 4}, "rules": [{"match": {"kind": "linear_attention"},
                                                         "plan": {"tp_size": 1}}]},
    "gdn-tp2": {"axes": {"tp": 2}},
    "gdn-tp4": {"axes": {"tp": 4}},
    "tpa-dcp+gdn-tp4": {"axes": {"tp": 8, "attn_tp": 2, "dcp": 4},
                        "rules": [{"match": {"kind": "attention"}, "plan": {"tp_size": "attn_tp", "dcp_size": "dcp"}},
                                  {"match": {"kind": "linear_attention"}, "plan": {"tp_size": 4}},
                                  {"match": {"kind": "mlp"}, "plan": {"tp_size": 8}}]},
}


# MoE plans as the per-layer policy RFC reads them: tp_size = the block's devices, ep_size =
# expert groups among them, each expert's ffn split tp_size / ep_size ways.
EP_POLICIES = {
    "ep2": {"axes": {"tp": 2, "ep": 2}, "rules": [{"match": {"kind": "moe"}, "plan": {"tp_size": "tp", "ep_size": "ep"}}]},
    "ep4-gdn-replicated": {"axes": {"tp": 4, "ep": 4},
                           "rules": [{"match": {"kind": "moe"}, "plan": {"tp_size": "tp", "ep_size": "ep"}},
                                     {"match": {"kind": "linear_attention"}, "plan": {"tp_size": 1}}]},
    "ep8": {"axes": {"tp": 8, "ep": 8},
            "rules": [{"match": {"kind": "moe"}, "plan": {"tp_size": "tp", "ep_size": "ep"}},
                      {"match": {"kind": "linear_attention"}, "plan": {"tp_size": 4}},
                      {"match": {"kind": "attention"}, "plan": {"tp_size": 4}}]},
    # Attention TPA+DCP, GDN split by key heads and MoE EP with TP inside each expert
    # (8 devices, 4 expert groups, 2 devices per expert), in one table.
    "mixed": {"axes": {"tp": 8, "attn_tp": 4, "dcp": 2, "ep": 4},
              "rules": [{"match": {"kind": "attention"}, "plan": {"tp_size": "attn_tp", "dcp_size": "dcp"}},
                        {"match": {"kind": "linear_attention"}, "plan": {"tp_size": 4}},
                        {"match": {"kind": "moe"}, "plan": {"tp_size": "tp", "ep_size": "ep"}}]},
}


@pytest.mark.parametrize("family,policy", [("qwen3_5", p) for p in GDN_POLICIES] +
                         [("qwen3_next", p) for p in EP_POLICIES] + [("qwen3_5_moe", "ep4-gdn-replicated")])
def test_policies_match_one_device(family, policy, loaded):
    base = loaded(family)
    model = loaded(family, {**GDN_POLICIES, **EP_POLICIES}[policy])
    ref = base.logits(IDS)
    # float32 partial sums in another order (experts / heads over ranks): 1.2e-5 of the largest
    # logit seen for some random draws.
    np.testing.assert_allclose(model.logits(IDS), ref, rtol=3e-5, atol=3e-5 * np.abs(ref).max())
    prompts = [IDS[0, :5].tolist(), IDS[1].tolist()]
    assert model.generate(prompts, 8, ignore_eos=True).token_ids == \
        base.generate(prompts, 8, ignore_eos=True).token_ids


def test_gdn_split_by_key_head_groups(loaded):
    model = loaded("qwen3_5", GDN_POLICIES["gdn-tp4"])
    gdn = model.module.layers[0].linear_attn
    # 4 key heads over 4 ranks: each rank holds one key head's q, k and its 2 value heads' v.
    assert {s.data.shape for s in gdn.in_proj_q.weight[...].addressable_shards} == {(64, 1, 16)}
    assert {s.data.shape for s in gdn.conv_v[...].addressable_shards} == {(1, 32, 4)}
    assert {s.data.shape for s in gdn.out_proj.weight[...].addressable_shards} == {(1, 32, 64)}


def test_gdn_tp_prefill_moves_only_what_replicated_gdn_moves(loaded):
    """GDN under TP communicates only through out_proj's all-reduce (its TP contract): the
    prefill of a GDN-split model has the all-gathers of the GDN-replicated one, and one
    more all-reduce per GDN layer."""
    from jaxpar.sharding.inspect import step_collectives

    model = loaded("qwen3_5")
    stats = {}
    for name in ("gdn-tp4", "gdn-replicated-tp4"):
        sharding = make_sharding(model.cfg, GDN_POLICIES[name], devices=jax.devices()[:4])
        stats[name] = step_collectives(model.cfg, sharding, jnp.float32, 2, 64)[0]
    split, replicated = stats["gdn-tp4"], stats["gdn-replicated-tp4"]
    n_gdn = model.cfg.layer_types.count("linear_attention")
    assert split["all-gather"].count == replicated["all-gather"].count
    assert split["all-reduce"].count == replicated["all-reduce"].count + n_gdn


def test_gdn_tp_not_dividing_key_heads_is_refused(hybrid_models):
    with pytest.raises(RuleTableError, match="tp_size=8 must divide linear_num_key_heads=4"):
        jaxpar.load(hybrid_models["qwen3_5"], policy={"axes": {"tp": 8}}, tokenizer=False, progress=False)


def test_recurrent_state_dtype_is_selectable(loaded):
    model = loaded("qwen3_5")
    cache = init_cache(model.cfg, model.sharding, 1, 16, model.dtype, state_dtype=jnp.bfloat16)
    assert cache.layers[0].recurrent.dtype == jnp.bfloat16
    assert init_cache(model.cfg, model.sharding, 1, 16, model.dtype).layers[0].recurrent.dtype == jnp.float32


def test_conditional_generation_folder_loads_text_model(hybrid_models, tmp_path, loaded):
    """A Qwen3.5 image-text folder: text config under text_config, weights under
    model.language_model.*, vision and MTP weights skipped (and reported)."""
    src = hybrid_models["qwen3_5"]
    text_cfg = json.loads((src / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5", "text_config": text_cfg,
                                                      "tie_word_embeddings": False}))
    tensors = {(k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
               for k, v in load_file(src / "model.safetensors").items()}
    tensors["model.visual.patch_embed.weight"] = np.zeros((4, 4), np.float32)
    tensors["mtp.fc.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    model = jaxpar.load(tmp_path, tokenizer=False, progress=False)
    assert sorted(model.skipped_weights) == ["model.visual.patch_embed.weight", "mtp.fc.weight"]
    np.testing.assert_array_equal(model.logits(IDS), loaded("qwen3_5").logits(IDS))
