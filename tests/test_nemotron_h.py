"""Nemotron-H (Mamba2 + attention + relu2 MLP layers from hybrid_override_pattern) against
Hugging Face transformers on a tiny random checkpoint, Mamba2 tensor parallelism, and the
per-layer policy RFC's hybrid attention + SSM table (examples/policies/rfc_3_2_hybrid_ssm.yaml)
on 8 devices."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jaxpar
from jaxpar.config import MAMBA, MLP, NO_BLOCK, ATTENTION, ConfigError, config_from_hf_dict
from jaxpar.models.decoder import init_cache
from jaxpar.sharding.resolve import resolve_plans
from jaxpar.sharding.rules import RuleTableError, parse_rule_table
from tests import hf_models
from tests.family_checks import POLICIES, assert_matches_one_device, run_modes

# 13 tokens: two chunks of 8 and a ragged tail in the SSD scan.
IDS = np.random.default_rng(0).integers(3, 256, size=(2, 13)).astype(np.int32)
PROMPT = [IDS[0, :7].tolist()]


@pytest.fixture(scope="module")
def nemotron_dir(tmp_path_factory):
    return hf_models.save_tiny("nemotron_h", tmp_path_factory.mktemp("nemotron_h") / "tiny")


@pytest.fixture(scope="module")
def loaded(nemotron_dir):
    cache = {}

    def get(policy=None):
        if str(policy) not in cache:
            cache[str(policy)] = jaxpar.load(nemotron_dir, policy=policy, tokenizer=False, progress=False)
        return cache[str(policy)]
    return get


def test_layer_kinds_from_the_pattern(loaded):
    cfg = loaded().cfg
    assert cfg.layer_types == (MAMBA, ATTENTION, MAMBA, NO_BLOCK)
    assert cfg.mlp_types == (NO_BLOCK, NO_BLOCK, NO_BLOCK, MLP)
    assert [p.kind for p in loaded().sharding.plans] == ["embed", "mamba", "attention", "mamba", "mlp",
                                                         "lm_head"]


def test_prefill_logits_match_hf(nemotron_dir, loaded):
    ref = hf_models.hf_logits(nemotron_dir, IDS)
    np.testing.assert_allclose(loaded().logits(IDS), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_prefill_extend_and_decode_equal_full_forward(loaded):
    """Prefill 4, extend by 6 (the conv and SSM states carried across), decode 3."""
    model = loaded()
    full = model.logits(IDS)
    stepped = run_modes(model, IDS, prompt_len=4, chunks=(6,))
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


def test_greedy_tokens_match_hf_generate(nemotron_dir, loaded):
    assert loaded().generate(PROMPT, 12, ignore_eos=True).token_ids[0] == \
        hf_models.hf_greedy(nemotron_dir, PROMPT[0], 12)


def test_batched_ragged_prompts_equal_one_by_one(loaded):
    """Right padding is a no-op for the conv and SSM states (dt = 0 past a row's end)."""
    model = loaded()
    prompts = [IDS[0, :3].tolist(), IDS[1].tolist(), IDS[0, :9].tolist()]
    assert model.generate(prompts, 6, ignore_eos=True).token_ids == \
        [model.generate(p, 6, ignore_eos=True).token_ids[0] for p in prompts]


def test_rfc_hybrid_table_gives_the_one_device_tokens(loaded):
    """The RFC's hybrid attention + SSM table scaled to 8 devices: attention on 2-way TP x
    4-way DCP, Mamba2 split over all 8 (one SSM group of 2 heads per rank), MLP TP 8."""
    model = loaded(POLICIES / "rfc_3_2_hybrid_ssm.yaml")
    plans = {p.kind: p.describe() for p in model.sharding.plans}
    assert plans == {"embed": "tp=8", "mamba": "tp=8", "attention": "tp=2 dcp=4", "mlp": "tp=8",
                     "lm_head": "tp=8"}
    mixer = model.module.layers[0].mixer
    # 16 heads of 8 channels in 8 groups of B / C (state 16) over 8 ranks: a group each.
    assert {s.data.shape for s in mixer.in_proj_x.weight[...].addressable_shards} == {(64, 2, 8)}
    assert {s.data.shape for s in mixer.in_proj_B.weight[...].addressable_shards} == {(64, 1, 16)}
    assert {s.data.shape for s in mixer.conv_C[...].addressable_shards} == {(1, 16, 4)}
    assert {s.data.shape for s in mixer.out_proj.weight[...].addressable_shards} == {(2, 8, 64)}
    assert_matches_one_device(model, loaded(), IDS, PROMPT)


def test_mamba_replicated_next_to_split_attention(loaded):
    policy = {"axes": {"tp": 4}, "rules": [{"match": {"kind": "mamba"}, "plan": {"tp_size": 1}}]}
    model = loaded(policy)
    assert {s.data.shape for s in model.module.layers[2].mixer.D[...].addressable_shards} == {(16,)}
    assert_matches_one_device(model, loaded(), IDS, PROMPT)


def _config(**overrides):
    hf = hf_models.tiny_config("nemotron_h", **overrides).to_dict()
    return config_from_hf_dict(json.loads(json.dumps(hf)))


def test_tp_size_splitting_an_ssm_group_is_refused():
    cfg = _config(n_groups=4)  # 16 heads in 4 groups of 4
    plans = resolve_plans(parse_rule_table({"axes": {"tp": 4}}), cfg)
    assert {p.tp_size for p in plans if p.kind == "mamba"} == {4}
    with pytest.raises(RuleTableError, match="tp_size=8 must divide the Mamba2 mixer's n_groups=4"):
        resolve_plans(parse_rule_table({"axes": {"tp": 8}}), cfg)
    with pytest.raises(RuleTableError, match="nemotron_h has no linear_attention blocks"):
        resolve_plans(parse_rule_table({"axes": {"tp": 2}, "rules": [
            {"match": {"kind": "linear_attention"}, "plan": {"tp_size": 1}}]}), cfg)


def test_legacy_config_fields_read_the_same():
    """Checkpoints before transformers 5 write hybrid_override_pattern and mamba_* names."""
    hf = json.loads(json.dumps(hf_models.tiny_config("nemotron_h").to_dict()))
    legacy = {k: v for k, v in hf.items() if k not in ("layers_block_type", "n_groups", "chunk_size")}
    legacy.update(hybrid_override_pattern="M*M-", mamba_n_groups=8, mamba_chunk_size=8)
    assert config_from_hf_dict(legacy) == config_from_hf_dict(hf)
    with pytest.raises(ConfigError, match="unknown character"):
        config_from_hf_dict({**legacy, "hybrid_override_pattern": "M*X-"})
    with pytest.raises(ConfigError, match="MoE layers"):
        config_from_hf_dict({**legacy, "hybrid_override_pattern": "M*E-"})


def test_ssm_state_dtype_is_selectable(loaded):
    model = loaded()
    cache = init_cache(model.cfg, model.sharding, 1, 16, model.dtype, state_dtype=jnp.bfloat16)
    assert cache.layers[0].ssm.dtype == jnp.bfloat16 and cache.layers[3] is None
    assert init_cache(model.cfg, model.sharding, 1, 16, model.dtype).layers[0].ssm.dtype == jnp.float32
