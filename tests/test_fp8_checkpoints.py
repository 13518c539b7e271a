"""FP8 block-scaled checkpoints: a tiny random Qwen3-MoE block-quantised here (float8_e4m3fn
weights, `<name>_scale_inv` per [16, 32] block, HF's `quantization_config`), loaded kept in
fp8 (the default) and dequantised at load, against the same weights dequantised in numpy
(through jaxpar, and through HF transformers where torch is installed), on one device and
sharded (TP attention, EP experts); and the errors for what cannot load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxpar
from jaxpar.models.fp8 import ScaleBlockSplitError
from tests import hf_models

BLOCK = (16, 32)  # weight_block_size: [rows (out features), cols (in features)]
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
IDS = np.random.default_rng(0).integers(3, 256, size=(2, 12))
# Attention TP 4 (q rows 32, k/v rows 16, o_proj cols 32 per device: whole blocks), experts
# split over 4 devices (2 whole experts each), everything else TP 4.
SHARDED = {"axes": {"tp": 4, "ep": 4}, "rules": [{"match": {"kind": "moe"}, "plan": {"tp_size": "tp", "ep_size": "ep"}}]}
# Experts' ffn (32) split 4 ways: 8 rows per device, through the 16-row scale blocks.
CUTS_BLOCKS = {"axes": {"tp": 4}, "rules": []}


def _quantised(name: str, array: np.ndarray) -> bool:
    """The projections and experts, as in Qwen's FP8 releases; not the router, norms,
    embeddings or lm_head."""
    return (array.ndim == 2 and name.startswith("model.layers.") and name.endswith("_proj.weight"))


def block_quantise(w: np.ndarray, block=BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(float8_e4m3fn weight, float32 scale_inv [ceil(r/bn), ceil(c/bk)]): each block scaled
    so that its largest magnitude maps to the format's max; w ~ q * scale_inv per block."""
    bn, bk = block
    rows, cols = w.shape
    nr, nc = -(-rows // bn), -(-cols // bk)
    padded = np.zeros((nr * bn, nc * bk), np.float32)
    padded[:rows, :cols] = w
    amax = np.abs(padded.reshape(nr, bn, nc, bk)).max(axis=(1, 3))
    scale_inv = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    q = (padded.reshape(nr, bn, nc, bk) / scale_inv[:, None, :, None]).reshape(padded.shape)
    return q[:rows, :cols].astype(ml_dtypes.float8_e4m3fn), scale_inv


def dequantise(q: np.ndarray, scale_inv: np.ndarray, block=BLOCK) -> np.ndarray:
    s = np.repeat(np.repeat(scale_inv, block[0], 0), block[1], 1)[: q.shape[0], : q.shape[1]]
    return q.astype(np.float32) * s


def _copy_configs(src: Path, dst: Path, quantization: dict | None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "generation_config.json", dst / "generation_config.json")
    cfg = json.loads((src / "config.json").read_text())
    if quantization is not None:
        cfg["quantization_config"] = quantization
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def write_fp8(src: Path, fp8_dir: Path, deq_dir: Path, quantization: dict) -> None:
    """`src` block-quantised into `fp8_dir`, and the same weights dequantised (float32) into
    `deq_dir`."""
    tensors = load_file(str(src / "model.safetensors"))
    fp8, deq = {}, {}
    for name, w in tensors.items():
        if _quantised(name, w):
            q, s = block_quantise(w)
            fp8[name], fp8[name[: -len(".weight")] + ".weight_scale_inv"] = q, s
            deq[name] = dequantise(q, s)
        else:
            fp8[name] = deq[name] = w
    _copy_configs(src, fp8_dir, quantization)
    _copy_configs(src, deq_dir, None)
    save_file(fp8, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(deq, str(deq_dir / "model.safetensors"), metadata={"format": "pt"})


QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    # Layer 0 MoE (experts fp8), layer 1 a dense MLP (its projections fp8).
    src = hf_models.save_tiny("qwen3_moe", root / "src", num_hidden_layers=2, mlp_only_layers=[1])
    write_fp8(src, root / "fp8", root / "dequantised", QUANT)
    reference = jaxpar.load(root / "dequantised", tokenizer=False).logits(IDS)
    return root, reference


def _close(got, want, rtol):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()))


def test_kept_fp8_matches_dequantised_weights(fp8_model):
    root, reference = fp8_model
    model = jaxpar.load(root / "fp8", tokenizer=False)
    q = model.module.layers[0].self_attn.q_proj
    assert q.weight[...].dtype == jax.numpy.float8_e4m3fn and q.weight[...].shape == (64, 8, 16)
    # q_proj [128, 64] in HF: scales [128 / 16, 64 / 32], ours transposed.
    assert q.weight_scale_inv[...].shape == (2, 8)
    experts = model.module.layers[0].mlp.experts
    assert experts.gate_proj[...].dtype == jax.numpy.float8_e4m3fn
    assert experts.down_proj_scale_inv[...].shape == (8, 32 // 32, 64 // 16)
    assert model.module.layers[0].mlp.gate.weight[...].dtype == jax.numpy.float32  # the router is not fp8
    _close(model.logits(IDS), reference, 1e-5)


@hf_models.needs_torch
def test_matches_hf_dequantised(fp8_model):
    """HF transformers reads the fp8 folder itself (its FineGrainedFP8 loader dequantises on
    a machine without a GPU): the same logits as HF on the numpy-dequantised weights (so the
    checkpoint follows HF's conventions), and as jaxpar's."""
    root, _ = fp8_model
    want = hf_models.hf_logits(root / "fp8", IDS)
    np.testing.assert_array_equal(hf_models.hf_logits(root / "dequantised", IDS), want)
    _close(jaxpar.load(root / "fp8", tokenizer=False).logits(IDS), want, 1e-4)


def test_sharded_tp_and_ep(fp8_model):
    root, reference = fp8_model
    model = jaxpar.load(root / "fp8", policy=SHARDED, devices=jax.devices()[:4], tokenizer=False)
    experts = model.module.layers[0].mlp.experts
    # Each device holds 2 of the 8 experts, and the scales of those 2 only.
    assert {s.data.shape for s in experts.gate_proj[...].addressable_shards} == {(2, 64, 32)}
    assert {s.data.shape for s in experts.gate_proj_scale_inv[...].addressable_shards} == {(2, 2, 2)}
    k = model.module.layers[0].self_attn.k_proj
    assert {s.data.shape for s in k.weight_scale_inv[...].addressable_shards} == {(2, 1)}
    _close(model.logits(IDS), reference, 1e-5)


def test_split_through_scale_block(fp8_model):
    root, reference = fp8_model
    with pytest.raises(ScaleBlockSplitError, match="experts/gate_proj: a 4-way split of its 32-long dim"):
        jaxpar.load(root / "fp8", policy=CUTS_BLOCKS, devices=jax.devices()[:4], tokenizer=False)
    # Dequantised at load, any split works: each device reads the scale blocks it cuts through.
    model = jaxpar.load(root / "fp8", policy=CUTS_BLOCKS, devices=jax.devices()[:4], tokenizer=False,
                        dequantize=True)
    experts = model.module.layers[0].mlp.experts
    assert experts.gate_proj[...].dtype == jax.numpy.float32 and getattr(experts, "gate_proj_scale_inv", None) is None
    _close(model.logits(IDS), reference, 1e-5)


@pytest.mark.parametrize("quantization, message", [
    ({"quant_method": "gptq", "bits": 4}, "quantization method 'gptq' is not supported"),
    ({**QUANT, "activation_scheme": "static"}, "activation_scheme 'static' is not supported"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "without a 2-d weight_block_size"),
])
def test_unsupported_quantization(fp8_model, tmp_path, quantization, message):
    root, _ = fp8_model
    shutil.copytree(root / "fp8", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "quantization_config": quantization}))
    for dequantize in (False, True):
        with pytest.raises(jaxpar.UnsupportedQuantizationError, match=message):
            jaxpar.load(tmp_path / "m", tokenizer=False, dequantize=dequantize)


def _same_fp8(got, want, attrs=("weight",)):
    """The same fp8 weights, scales and scale layout (hence the same dequantised matmul)."""
    for attr in attrs:
        assert getattr(got, attr)[...].dtype == jax.numpy.float8_e4m3fn
        assert getattr(got, attr + "_fp8_view") == getattr(want, attr + "_fp8_view")
        for name in (attr, attr + "_scale_inv"):
            np.testing.assert_array_equal(np.asarray(getattr(got, name)[...]).view(np.uint8),
                                          np.asarray(getattr(want, name)[...]).view(np.uint8))


EXPERT_ATTRS = ("gate_proj", "up_proj", "down_proj")


def test_pipeline_stages_and_engine_placement(fp8_model):
    """Kept fp8 through pipeline stages (each stage reads its layers' weights and scales), and
    a loaded model placed on another sharding (the engine's prefill / decode stages) keeps
    its fp8 weights and their scales: the same arrays as one device's."""
    from jaxpar.assembly import make_sharding
    from jaxpar.engine.placement import place

    root, _ = fp8_model
    one = jaxpar.load(root / "fp8", tokenizer=False).module
    stages = jaxpar.load(root / "fp8", policy={"axes": {"pp": 2}}, devices=jax.devices()[:2],
                         tokenizer=False).module.stages
    _same_fp8(stages[0].layers[0].mlp.experts, one.layers[0].mlp.experts, EXPERT_ATTRS)
    _same_fp8(stages[1].layers[1].mlp.down_proj, one.layers[1].mlp.down_proj)
    placed = place(one, make_sharding(one.cfg, SHARDED, devices=jax.devices()[:4]), jax.numpy.float32)
    experts = placed.layers[0].mlp.experts
    assert {s.data.shape for s in experts.up_proj_scale_inv[...].addressable_shards} == {(2, 2, 2)}
    _same_fp8(experts, one.layers[0].mlp.experts, EXPERT_ATTRS)
    _same_fp8(placed.layers[1].self_attn.o_proj, one.layers[1].self_attn.o_proj)
