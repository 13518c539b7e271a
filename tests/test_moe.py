"""Sparse MoE block: parity with HF's sparse MoE blocks (loaded through the real loader from
per-expert and fused checkpoints), expert parallelism on 2 and 8 devices under the RFC's
reading of a MoE plan (`tp_size` = the block's devices, `ep_size` = expert groups among them,
each expert's ffn split tp_size / ep_size ways), and the rule-table checks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from jaxpar.config import config_from_hf_dict
from jaxpar.loading import loader
from jaxpar.loading.sources import SafetensorsSource
from jaxpar.models.moe import SparseMoE
from jaxpar.sharding.resolve import build_sharding, plain_tp, resolve_plans
from jaxpar.sharding.rules import RuleTableError, parse_rule_table, preset
from tests import hf_models

PREFIX = "model.layers.0.mlp."
# 16 experts, top-4, expert ffn 16, shared expert ffn 24 (Qwen3-Next); other blocks sized so
# that every plan below is valid for them on 8 devices.
_COMMON = dict(hidden_size=32, intermediate_size=64, num_experts=16, num_experts_per_tok=4,
               moe_intermediate_size=16, num_hidden_layers=1, vocab_size=64, num_attention_heads=8,
               num_key_value_heads=8, head_dim=8)
X = np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32)  # prefill-like: N*k = 40


def _config(family: str):
    """The block's model config from a dict, for the checks that need no weights (no torch)."""
    hf = {"model_type": family, **_COMMON, "norm_topk_prob": family == "qwen3_next"}
    if family == "qwen3_next":
        hf.update(shared_expert_intermediate_size=24, layer_types=["full_attention"], linear_num_key_heads=4,
                  linear_num_value_heads=8, linear_key_head_dim=8, linear_value_head_dim=8)
    return config_from_hf_dict(hf)


CONFIGS = {family: _config(family) for family in ("qwen3_moe", "qwen3_next")}
X_DECODE = X[:, :1]  # decode-like: N*k = 8


def _hf_config(family: str, norm_topk_prob: bool):
    import transformers

    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(norm_topk_prob=norm_topk_prob, **_COMMON)
    return transformers.Qwen3NextConfig(norm_topk_prob=norm_topk_prob, shared_expert_intermediate_size=24,
                                        layer_types=["full_attention"], **_COMMON)


def _hf_block(family: str, norm_topk_prob: bool):
    """(ModelConfig, HF block or None without torch, its weights in HF's fused layout:
    experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I], gate, shared expert)."""
    hf_cfg = _hf_config(family, norm_topk_prob)
    cfg = config_from_hf_dict(hf_cfg.to_dict())
    if not hf_models.HAS_TORCH:
        return cfg, None, _random_fused_weights(hf_cfg.to_dict())
    import torch

    if family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
    else:
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock as Block
    torch.manual_seed(0)
    block = Block(hf_cfg).float().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return cfg, block, {k: v.detach().numpy().copy() for k, v in block.state_dict().items()}


def _random_fused_weights(hf_cfg: dict) -> dict[str, np.ndarray]:
    """The block's tensors (names and shapes from tests/hf_models), N(0, 0.3), experts fused."""
    rng = np.random.default_rng(0)
    sd = {k[len(PREFIX):]: rng.normal(0.0, 0.3, shape).astype(np.float32)
          for k, shape in hf_models.hf_tensor_shapes(hf_cfg).items() if k.startswith(PREFIX)}
    n = hf_cfg.get("num_experts") or hf_cfg["num_local_experts"]
    sd["experts.gate_up_proj"] = np.stack([np.concatenate([sd.pop(f"experts.{e}.gate_proj.weight"),
                                                           sd.pop(f"experts.{e}.up_proj.weight")]) for e in range(n)])
    sd["experts.down_proj"] = np.stack([sd.pop(f"experts.{e}.down_proj.weight") for e in range(n)])
    return sd


def _write(sd, folder, fmt: str):
    """Block weights as `model.layers.0.mlp.*` tensors: HF's own fused layout
    (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]) or per-expert tensors."""
    sd = dict(sd)
    if fmt == "per_expert":
        gate_up, down = sd.pop("experts.gate_up_proj"), sd.pop("experts.down_proj")
        ffn = down.shape[2]
        for e in range(gate_up.shape[0]):
            sd[f"experts.{e}.gate_proj.weight"] = np.ascontiguousarray(gate_up[e, :ffn])
            sd[f"experts.{e}.up_proj.weight"] = np.ascontiguousarray(gate_up[e, ffn:])
            sd[f"experts.{e}.down_proj.weight"] = np.ascontiguousarray(down[e])
    folder.mkdir(parents=True, exist_ok=True)
    save_file({PREFIX + k: v for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder


class _BlockSharding:
    """The loader's view of a model sharding, for a lone block: every parameter uses `rules`."""

    def __init__(self, rules):
        self.rules = rules

    def rules_for_param(self, path):
        return self.rules


def _load_block(cfg, folder, rules, impl="auto"):
    abstract = nnx.eval_shape(lambda: SparseMoE(cfg, jnp.float32, rules, impl=impl))
    graphdef, state = nnx.split(abstract)
    block_cfg = dataclasses.replace(cfg, weight_prefix=PREFIX)
    state = loader.load_params(state, block_cfg, SafetensorsSource(folder), _BlockSharding(rules), jnp.float32)
    return nnx.merge(graphdef, state)


_apply = nnx.jit(lambda m, x: m(x))


def _run(block, x):
    return np.asarray(_apply(block, jnp.asarray(x)))


def _hf_out(block, x):
    import torch

    with torch.no_grad():
        return block(torch.from_numpy(x)).numpy()


def _close(got, want, rtol=1e-5):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()))


@pytest.fixture(scope="module")
def moe_setups(tmp_path_factory):
    """family -> (ModelConfig, HF block (None without torch), {format: folder})."""
    out = {}
    for family, norm in (("qwen3_moe", False), ("qwen3_next", True)):
        cfg, block, weights = _hf_block(family, norm)
        root = tmp_path_factory.mktemp(family)
        out[family] = (cfg, block, {fmt: _write(weights, root / fmt, fmt) for fmt in ("fused", "per_expert")})
    return out


def _one_device_rules(cfg):
    return plain_tp(cfg).layers[0].ffn


IMPL_INPUTS = {"dense": X, "gather": X_DECODE, "grouped": X}
GROUPED_FORMAT = {"qwen3_moe": "per_expert", "qwen3_next": "fused"}


@pytest.fixture(scope="module")
def one_device(moe_setups):
    """(family, on-disk format, impl) -> one-device output for IMPL_INPUTS[impl], and also
    (family, format, impl, "decode") for X_DECODE through the dense path."""
    out = {}
    for family, (cfg, _, folders) in moe_setups.items():
        rules = _one_device_rules(cfg)
        for fmt, folder in folders.items():
            for impl, x in IMPL_INPUTS.items():
                if impl == "grouped" and fmt != GROUPED_FORMAT[family]:
                    continue  # the expert path does not depend on the on-disk format
                out[family, fmt, impl] = _run(_load_block(cfg, folder, rules, impl), x)
            out[family, fmt, "dense", "decode"] = _run(_load_block(cfg, folder, rules, "dense"), X_DECODE)
    return out


@hf_models.needs_torch
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_next"])
@pytest.mark.parametrize("fmt", ["fused", "per_expert"])
def test_matches_hf_block(moe_setups, one_device, family, fmt):
    cfg, hf_block, _ = moe_setups[family]
    assert (cfg.shared_expert_intermediate_size > 0) == (family == "qwen3_next")
    for impl, x in IMPL_INPUTS.items():
        if (family, fmt, impl) in one_device:
            _close(one_device[family, fmt, impl], _hf_out(hf_block, x))
    _close(one_device[family, fmt, "dense", "decode"], _hf_out(hf_block, X_DECODE))


@hf_models.needs_torch
def test_torch_free_block_weights_are_hf_shaped():
    for family in ("qwen3_moe", "qwen3_next"):
        hf_weights = {k: v.shape for k, v in _hf_block(family, True)[2].items()}
        ours = _random_fused_weights(_hf_config(family, True).to_dict())
        assert {k: v.shape for k, v in ours.items()} == hf_weights


@hf_models.needs_torch
def test_router_matches_hf(moe_setups):
    """Top-k ids and (renormalised) weights equal HF's router for both norm_topk_prob settings."""
    import torch

    for family in ("qwen3_moe", "qwen3_next"):
        cfg, hf_block, folders = moe_setups[family]
        block = _load_block(cfg, folders["fused"], _one_device_rules(cfg))
        w, i = block.route(jnp.asarray(X.reshape(-1, 32)))
        with torch.no_grad():
            _, hf_w, hf_i = hf_block.gate(torch.from_numpy(X.reshape(-1, 32)))
        np.testing.assert_array_equal(np.asarray(i), hf_i.numpy())
        np.testing.assert_allclose(np.asarray(w), hf_w.numpy(), rtol=1e-6, atol=1e-7)


# name -> (axes, moe plan or None for the default, devices,
#          expected (expert groups, ways each expert's ffn is split, shared-expert ffn split)).
EP_PLANS = {
    "default (replicated experts, tp=8 inside)": ({"tp": 8}, None, 8, (1, 8, 8)),
    "{tp_size: tp, ep_size: ep}, ep=2: TP 4 inside each expert": (
        {"tp": 8, "ep": 2}, {"tp_size": "tp", "ep_size": "ep"}, 8, (2, 4, 8)),
    "{tp_size: tp, ep_size: ep}, ep=4: TP 2 inside each expert": (
        {"tp": 8, "ep": 4}, {"tp_size": "tp", "ep_size": "ep"}, 8, (4, 2, 8)),
    "ep=8 over 8 devices (pure EP)": ({"tp": 8, "ep": 8}, {"tp_size": "tp", "ep_size": "ep"}, 8, (8, 1, 8)),
    "{tp_size: 2, ep_size: 2} on 2 devices (pure EP)": ({"tp": 2, "ep": 2}, {"tp_size": 2, "ep_size": 2}, 2, (2, 1, 2)),
    "{tp_size: 2, ep_size: 2} on 8 devices (4 copies)": ({"tp": 8}, {"tp_size": 2, "ep_size": 2}, 8, (2, 1, 2)),
}


GROUPED_PLANS = ("{tp_size: tp, ep_size: ep}, ep=4: TP 2 inside each expert", "ep=8 over 8 devices (pure EP)",
                 "{tp_size: 2, ep_size: 2} on 8 devices (4 copies)")


@pytest.mark.parametrize("name", list(EP_PLANS))
def test_expert_parallel_equals_one_device(moe_setups, one_device, name):
    axes, plan, n_devices, (n_ep, n_expert_tp, n_shared) = EP_PLANS[name]
    table = parse_rule_table({"axes": axes, "rules": [] if plan is None else [{"match": {"kind": "moe"}, "plan": plan}]})
    for family in ("qwen3_moe", "qwen3_next"):
        cfg, _, folders = moe_setups[family]
        rules = build_sharding(table, cfg, jax.devices()[:n_devices]).layers[0].ffn
        assert (rules.size("experts"), rules.size("expert_ffn"), rules.size("ffn")) == (n_ep, n_expert_tp, n_shared)
        fmt = "per_expert" if family == "qwen3_moe" else "fused"
        # The grouped path on qwen3_moe under the plans that differ for it (compile time):
        # experts and their ffn both split, fewer local experts than top-k, a split batch.
        for impl, x in IMPL_INPUTS.items():
            if impl == "grouped" and (family != "qwen3_moe" or name not in GROUPED_PLANS):
                continue
            block = _load_block(cfg, folders[fmt], rules, impl)
            assert block.experts.gate_proj[...].sharding.spec == rules.spec(("experts", "embed", "expert_ffn"))
            _close(_run(block, x), one_device[family, fmt, impl])


def test_rfc_reading_of_tp_size_and_ep_size():
    """The RFC's `{tp_size: tp, ep_size: ep}` with tp 16, ep 8: 16 devices, 8 expert groups,
    TP 2 inside each expert (resolved without devices: only the mesh needs them)."""
    cfg = CONFIGS["qwen3_moe"]
    table = parse_rule_table({"axes": {"tp": 16, "ep": 8}, "rules": [
        {"match": {"kind": "moe"}, "plan": {"tp_size": "tp", "ep_size": "ep"}}] + [
        {"match": {"kind": k}, "plan": {"tp_size": 8}} for k in ("attention", "embed", "lm_head")]})
    (moe,) = [p for p in resolve_plans(table, cfg) if p.kind == "moe"]
    assert (moe.tp_size, moe.ep_size, moe.expert_tp, moe.devices) == (16, 8, 2, 16)
    assert [(g.role, g.size) for g in moe.groups()] == [("ep", 8), ("tp", 2)]
    assert moe.describe() == "tp=16 ep=8 expert_tp=2"
    # Without tp_size, a MoE block runs on all the tp devices, like every other kind.
    table = parse_rule_table({"axes": {"tp": 8, "ep": 4}, "rules": [{"match": {"kind": "moe"}, "plan": {"ep_size": "ep"}}]})
    (moe,) = [p for p in resolve_plans(table, cfg) if p.kind == "moe"]
    assert (moe.tp_size, moe.ep_size, moe.expert_tp) == (8, 4, 2)


def test_ep_preset_is_pure_expert_parallelism():
    cfg = CONFIGS["qwen3_next"]
    sharding = build_sharding(preset("ep", 8), cfg, jax.devices())
    rules = sharding.layers[0].ffn
    assert (rules.size("experts"), rules.size("expert_ffn"), rules.size("ffn")) == (8, 1, 8)
    (moe,) = [p for p in sharding.plans if p.kind == "moe"]
    assert (moe.tp_size, moe.ep_size) == (8, 8)


X_SP = np.random.default_rng(1).normal(size=(2, 8, 32)).astype(np.float32)
_apply_scatter = nnx.jit(lambda m, x: m(x, scatter_seq=True))
# (moe plan with sp, ep, whether the partial sums are reduce-scattered over the sequence).
SP_PLANS = {
    "ep=2 x tp=4, sp": ({"ep_size": "ep", "sp": True}, 2, True),
    "ep=8, sp": ({"ep_size": "ep", "sp": True}, 8, True),
    # The block on 2 of the 8 sequence-parallel devices: all-reduce, then constrain.
    "ep=2 on 2 devices, sp": ({"tp_size": 2, "ep_size": "ep", "sp": True}, 2, False),
}


@pytest.mark.parametrize("name", list(SP_PLANS))
def test_sequence_parallel_reduce_scatter(moe_setups, name):
    plan, ep, scattered = SP_PLANS[name]
    table = parse_rule_table({"axes": {"tp": 8, "ep": ep}, "rules": [{"match": {"kind": "moe"}, "plan": plan}]})
    for family in ("qwen3_moe", "qwen3_next"):
        cfg, _, folders = moe_setups[family]
        want = _run(_load_block(cfg, folders["fused"], _one_device_rules(cfg), "dense"), X_SP)
        rules = build_sharding(table, cfg, jax.devices()).layers[0].ffn
        block = _load_block(cfg, folders["fused"], rules, "dense")
        y = _apply_scatter(block, jnp.asarray(X_SP))
        assert y.sharding.is_equivalent_to(
            rules.sharding(("batch", "residual_seq" if scattered else "seq", "embed")), 3)
        _close(np.asarray(y), want)


def _moe_only(plan, **axes):
    """Other blocks replicated so that only the MoE block can fail."""
    rest = [{"match": {"kind": k}, "plan": {"tp_size": 1}} for k in ("attention", "mlp", "embed", "lm_head")]
    return parse_rule_table({"axes": axes, "rules": [{"match": {"kind": "moe"}, "plan": plan}] + rest})


INVALID = {
    "experts not divisible by ep_size": (
        "qwen3_moe", {}, _moe_only({"tp_size": "tp", "ep_size": "ep"}, tp=6, ep=3),
        "rule 0 (match {kind: moe}) at layer 0 (model.layers.0.mlp): num_experts=16 is not divisible by ep_size=3"),
    "ep_size not dividing tp_size": (
        "qwen3_moe", {}, _moe_only({"tp_size": 2, "ep_size": 4}, tp=8),
        "rule 0 (match {kind: moe}) at layer 0 (model.layers.0.mlp): ep_size=4 does not divide tp_size=2 "
        "(for kind: moe, tp_size is the block's device count"),
    "expert ffn not divisible by tp_size / ep_size": (
        "qwen3_moe", {}, _moe_only({"ep_size": 2, "tp_size": 6}, tp=6),
        "rule 0 (match {kind: moe}) at layer 0 (model.layers.0.mlp): moe_intermediate_size=16 is not divisible "
        "by tp_size / ep_size = 6 / 2 = 3"),
    "shared expert ffn not divisible by tp_size": (
        "qwen3_next", {"shared_expert_intermediate_size": 12}, _moe_only({"tp_size": 8, "ep_size": 2}, tp=8),
        "rule 0 (match {kind: moe}) at layer 0 (model.layers.0.mlp): shared_expert_intermediate_size=12 is not "
        "divisible by tp_size=8"),
    "default plan, expert ffn not divisible by tp": (
        "qwen3_moe", {}, parse_rule_table({"axes": {"tp": 3}, "rules": [
            {"match": {"kind": k}, "plan": {"tp_size": 1}} for k in ("attention", "mlp", "embed", "lm_head")]}),
        "the default plan (plain TP) at layer 0 (model.layers.0.mlp): moe_intermediate_size=16 is not divisible "
        "by tp_size=3"),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_moe_plans(name):
    family, overrides, table, message = INVALID[name]
    cfg = dataclasses.replace(CONFIGS[family], **overrides)
    with pytest.raises(RuleTableError) as e:
        resolve_plans(table, cfg)
    assert message in str(e.value)


def test_moe_kind_only_for_moe_architectures():
    cfg = dataclasses.replace(CONFIGS["qwen3_moe"], model_type="qwen3")
    with pytest.raises(RuleTableError, match="qwen3 has no moe blocks"):
        resolve_plans(_moe_only({"ep_size": 2}, tp=2), cfg)
