"""Mistral (sliding window), Phi-3 (fused qkv_proj / gate_up_proj, sliding window) and
GLM-4 (interleaved partial rotary, post-block norms, fused gate_up_proj) against Hugging
Face transformers on tiny random checkpoints, and under the per-layer policy RFC's Llama
table (examples/policies/rfc_3_1_llama_tpa.yaml) on 8 devices."""

import json
import shutil

import numpy as np
import pytest

import jaxpar
from jaxpar.config import ConfigError, config_from_hf_dict
from tests import hf_models
from tests.family_checks import POLICIES, assert_matches_one_device, run_modes

FAMILIES = list(hf_models.LLAMA_DERIVATIVES)
# Longer than the tiny models' window of 6 tokens, so the window masks in every mode.
IDS = np.random.default_rng(0).integers(3, 256, size=(2, 13)).astype(np.int32)
# 7 + 12 generated tokens: decode runs well past the window. One prompt, shared by the HF
# and the sharded checks, so the one-device programs compile once.
PROMPT = [IDS[0, :7].tolist()]


@pytest.fixture(scope="module")
def derivative_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("derivatives")
    return {f: hf_models.save_tiny(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def loaded(derivative_models):
    cache = {}

    def get(family, policy=None):
        key = (family, str(policy))
        if key not in cache:
            cache[key] = jaxpar.load(derivative_models[family], policy=policy, tokenizer=False,
                                     progress=False)
        return cache[key]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_hf(family, derivative_models, loaded):
    ref = hf_models.hf_logits(derivative_models[family], IDS)
    np.testing.assert_allclose(loaded(family).logits(IDS), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_extend_and_decode_equal_full_forward(family, loaded):
    """Prefill 4 tokens, extend by 4 (its last queries' windows start inside the cache),
    decode 5 (windows past the prompt)."""
    model = loaded(family)
    full = model.logits(IDS)
    stepped = run_modes(model, IDS, prompt_len=4, chunks=(4,))
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_hf_generate(family, derivative_models, loaded):
    assert loaded(family).generate(PROMPT, 12, ignore_eos=True).token_ids[0] == \
        hf_models.hf_greedy(derivative_models[family], PROMPT[0], 12)


def test_sliding_window_changes_the_logits(derivative_models, loaded, tmp_path):
    """The window is applied: the same weights without it give other logits past it."""
    src = derivative_models["mistral"]
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "sliding_window": None}))
    full = jaxpar.load(tmp_path / "m", tokenizer=False, progress=False).logits(IDS)
    windowed = loaded("mistral").logits(IDS)
    np.testing.assert_allclose(windowed[:, :6], full[:, :6], rtol=1e-5, atol=1e-5)  # inside it
    assert np.abs(windowed[:, 6:] - full[:, 6:]).max() > 1e-2 * np.abs(full).max()


@pytest.mark.parametrize("family", FAMILIES)
def test_rfc_llama_table_gives_the_one_device_tokens(family, loaded):
    """The RFC's Llama TPA table, reused verbatim by each derivative (scaled to 8 devices:
    attention on 2-way TP x 4-way DCP, the rest plain TP over 8)."""
    model = loaded(family, POLICIES / "rfc_3_1_llama_tpa.yaml")
    plans = {p.kind: p.describe() for p in model.sharding.plans}
    assert plans["attention"] == "tp=2 dcp=4" and plans["mlp"] == "tp=8"
    assert_matches_one_device(model, loaded(family), IDS, PROMPT)


def test_fused_tensors_split_by_heads_and_ffn(loaded):
    """Phi-3's qkv_proj / gate_up_proj are read as regions, each split like a separate tensor."""
    model = loaded("phi3", {"axes": {"tp": 4}})
    layer = model.module.layers[0]
    # 8 q heads and 4 kv heads of 8 dims over 4 ranks; ffn 128 over 4.
    assert {s.data.shape for s in layer.self_attn.q_proj.weight[...].addressable_shards} == {(64, 2, 8)}
    assert {s.data.shape for s in layer.self_attn.v_proj.weight[...].addressable_shards} == {(64, 1, 8)}
    assert {s.data.shape for s in layer.mlp.up_proj.weight[...].addressable_shards} == {(64, 32)}
    ref = loaded("phi3").logits(IDS)
    np.testing.assert_allclose(model.logits(IDS), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_unsupported_rope_is_refused():
    hf = {"model_type": "phi3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 8,
          "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}}
    with pytest.raises(ConfigError, match="rope type 'longrope' is not supported"):
        config_from_hf_dict(hf)
    with pytest.raises(ConfigError, match="sliding_window must be a positive integer"):
        config_from_hf_dict({**hf, "rope_scaling": None, "sliding_window": 0})
