"""Every sharding policy reproduces the one-device logits and greedy tokens (8 CPU devices)."""

import jax
import numpy as np
import pytest

import jaxpar
from jaxpar.sharding.resolve import LayerPlan

ATTN = {"kind": "attention"}
POLICIES = {
    "tp2": {"axes": {"tp": 2}},
    "tp4": {"axes": {"tp": 4}},
    "tp8": {"axes": {"tp": 8}},
    "tpa4-dcp2": {"axes": {"tp": 8, "attn_tp": 4, "dcp": 2},
                  "rules": [{"match": ATTN, "plan": {"tp_size": "attn_tp", "dcp_size": "dcp"}}]},
    "tpa2-dcp4": {"axes": {"tp": 8, "attn_tp": 2, "dcp": 4},
                  "rules": [{"match": ATTN, "plan": {"tp_size": "attn_tp", "dcp_size": "dcp"}}]},
    "dp-attention": {"axes": {"tp": 8},
                     "rules": [{"match": ATTN, "plan": {"dp_size": 4, "tp_size": 2}}]},
    "sp4": {"axes": {"tp": 4},
            "rules": [{"match": ATTN, "plan": {"tp_size": "tp", "sp": True}},
                      {"match": {"kind": "mlp"}, "plan": {"tp_size": "tp", "sp": True}}]},
    "mixed": {"axes": {"tp": 8, "attn_tp": 4, "dcp": 2},
              "rules": [{"match": {"kind": "attention", "layers": [0]},
                         "plan": {"tp_size": "attn_tp", "dcp_size": "dcp"}},
                        {"match": {"prefix_pattern": "model.layers.1.self_attn"},
                         "plan": {"dp_size": 2, "tp_size": 4}},
                        {"match": {"kind": "mlp", "layers": "1-2"}, "plan": {"tp_size": 8, "sp": True}},
                        {"match": {"kind": "mlp"}, "plan": {"tp_size": 4}},
                        {"match": {"kind": "embed"}, "plan": {"tp_size": 1}}]},
}


@pytest.fixture(scope="module")
def references(tiny_models):
    out = {}
    for family in ("llama", "qwen3"):
        m = jaxpar.load(tiny_models[family], tokenizer=False, progress=False)
        out[family] = (m, m.logits(IDS), _greedy(m))
    return out


IDS = np.random.default_rng(0).integers(3, 256, size=(2, 12)).astype(np.int32)
PROMPTS = [[5, 9, 33, 7], [17, 2 + 100, 45, 8, 99, 100, 101, 3, 4]]


def _greedy(model):
    return model.generate(PROMPTS, 8, ignore_eos=True).token_ids


def _analytic_param_bytes(model) -> int:
    """Per-device parameter bytes derived from the plans alone (not from the specs)."""
    cfg, item = model.cfg, np.dtype(model.dtype).itemsize
    e, h, kvh, d, f, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          cfg.intermediate_size, cfg.vocab_size)
    total = 0
    plans: list[LayerPlan] = list(model.sharding.plans)
    for p in plans:
        if p.kind == "attention":
            kv_split = p.tp_size if kvh % p.tp_size == 0 else _kv_split(model, p)
            qo = 2 * e * h * d + (h * d if cfg.qkv_bias else 0) + (e if cfg.o_bias else 0)
            kv = 2 * e * kvh * d + (2 * kvh * d if cfg.qkv_bias else 0)
            total += qo // p.tp_size + kv // kv_split + (2 * d if cfg.qk_norm else 0) + e  # + input norm
        elif p.kind == "mlp":
            total += 3 * e * f // p.tp_size + e  # + post-attention norm
        elif p.kind == "embed":
            total += v * e // p.tp_size + e  # + final norm
        elif p.kind == "lm_head" and not cfg.tie_word_embeddings:
            total += v * e // p.tp_size
    return total * item


def _kv_split(model, plan):
    rules = model.sharding.layers[plan.layer].mixer
    return rules.size("kv_heads")


def _max_device_param_bytes(model) -> int:
    per_device = {}
    for leaf in jax.tree.leaves(model._generator.state):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_policy_matches_one_device(policy, family, tiny_models, references):
    base, ref_logits, ref_tokens = references[family]
    model = jaxpar.load(tiny_models[family], policy=POLICIES[policy], tokenizer=False, progress=False)
    np.testing.assert_allclose(model.logits(IDS), ref_logits, rtol=1e-5,
                               atol=1e-5 * np.abs(ref_logits).max())
    assert _greedy(model) == ref_tokens
    assert _max_device_param_bytes(model) == _analytic_param_bytes(model)


def test_kv_heads_fewer_than_tp_are_replicated(tiny_models):
    # tiny llama: 8 q heads, 4 KV heads on tp=8 -> q split 8 ways, KV replicated.
    model = jaxpar.load(tiny_models["llama"], policy=POLICIES["tp8"], tokenizer=False, progress=False)
    attn = model.module.layers[0].self_attn
    assert {s.data.shape for s in attn.q_proj.weight[...].addressable_shards} == {(64, 1, 8)}
    assert {s.data.shape for s in attn.k_proj.weight[...].addressable_shards} == {(64, 4, 8)}


STORIES_POLICIES = {
    "tp2": {"axes": {"tp": 2}},
    "tp4": {"axes": {"tp": 4}},
    "tpa4-dcp2": {"axes": {"tp": 8, "attn_tp": 4, "dcp": 2},
                  "rules": [{"match": ATTN, "plan": {"tp_size": "attn_tp", "dcp_size": "dcp"}},
                            {"match": {"kind": "mlp"}, "plan": {"tp_size": 4}}]},
    "dp-attention": {"axes": {"tp": 8},
                     "rules": [{"match": ATTN, "plan": {"dp_size": 2, "tp_size": 4}},
                               {"match": {"kind": "mlp"}, "plan": {"tp_size": 4, "sp": True}}]},
}


@pytest.fixture(scope="module")
def stories_reference(stories_dir):
    m = jaxpar.load(stories_dir, progress=False)
    r = m.generate("Once upon a time", 40)
    return m.logits([r.prompt_token_ids[0]]), r.texts[0]


@pytest.mark.parametrize("policy", list(STORIES_POLICIES))
def test_stories_real_weights_under_policy(policy, stories_dir, stories_reference):
    ref_logits, ref_text = stories_reference
    model = jaxpar.load(stories_dir, policy=STORIES_POLICIES[policy], progress=False)
    r = model.generate("Once upon a time", 40)
    assert r.texts[0] == ref_text
    np.testing.assert_allclose(model.logits([r.prompt_token_ids[0]]), ref_logits, rtol=1e-5,
                               atol=1e-5 * np.abs(ref_logits).max())


def test_stories_tp8_refused_with_clear_error(stories_dir):
    with pytest.raises(jaxpar.sharding.rules.RuleTableError, match="intermediate_size=172 is not divisible by tp_size=8"):
        jaxpar.load(stories_dir, policy={"axes": {"tp": 8}}, progress=False)
