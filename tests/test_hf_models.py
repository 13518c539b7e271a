"""The torch-free tiny checkpoints (tests/hf_models.write_tiny) are the files HF writes.

On the pass with torch: HF's save_pretrained and write_tiny give the same file set,
config.json, generation_config.json and tensor names, shapes and dtypes for every family
(and for configs with overrides). On both passes: write_tiny's values are drawn as stated
and jaxpar loads what it writes.
"""

import json

import numpy as np
import pytest
from safetensors import safe_open

from tests import hf_models

FAMILIES = (hf_models.TINY_FAMILIES + hf_models.HYBRID_FAMILIES + ("mistral", "phi3", "glm4", "nemotron_h")
            + hf_models.DEEPSEEK_FAMILIES)
OVERRIDES = {  # configs other tests ask for
    "llama-12-heads": ("llama", dict(num_attention_heads=12, num_key_value_heads=3, hidden_size=96)),
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen3_moe-sparse-step": ("qwen3_moe", dict(decoder_sparse_step=2, mlp_only_layers=[2])),
    "deepseek_v3-no-q-lora": ("deepseek_v3", dict(q_lora_rank=None, attention_bias=True)),
}
CASES = {**{f: (f, {}) for f in FAMILIES}, **OVERRIDES}


def _tensors(folder):
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        return f.metadata(), {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def _configs(folder):
    return {name: json.loads((folder / name).read_text()) for name in ("config.json", "generation_config.json")}


@hf_models.needs_torch
@pytest.mark.parametrize("case", list(CASES))
def test_torch_free_checkpoint_has_hf_files_names_and_shapes(case, tmp_path):
    family, overrides = CASES[case]
    hf = hf_models.save_tiny(family, tmp_path / "hf", **overrides)
    ours = hf_models.write_tiny(family, tmp_path / "ours", **overrides)
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in hf.iterdir())
    assert _configs(ours) == _configs(hf)
    assert _tensors(ours) == _tensors(hf)


def test_torch_free_values_and_loading(tmp_path):
    import jaxpar

    path = hf_models.write_tiny("qwen3_5", tmp_path / "m", seed=3)
    assert hf_models.write_tiny("qwen3_5", tmp_path / "again", seed=3).joinpath("model.safetensors").read_bytes() \
        == (path / "model.safetensors").read_bytes()
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
        matrix, vector = f.get_tensor("model.embed_tokens.weight"), f.get_tensor("model.norm.weight")
    assert matrix.dtype == np.float32 and np.abs(matrix).max() <= 1
    assert 0.15 < matrix.std() < 0.25 and 0.5 < vector.std() < 1.0
    model = jaxpar.load(path, tokenizer=False, progress=False)
    assert model.cfg.model_type == "qwen3_5_text" and model.cfg.num_layers == 4


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="no torch-free HF tensor layout for model_type 'gpt2'"):
        hf_models.hf_tensor_shapes({"model_type": "gpt2"})


@pytest.mark.parametrize("how", [dict(max_shard_size="200KB"), dict(dtype="bfloat16")])
def test_save_copy(how, tmp_path):
    """Sharded / bf16 copies, by numpy; on the pass with torch also equal to HF's."""
    src = hf_models.save_tiny("llama", tmp_path / "src")
    dst = hf_models.save_copy_without_torch(src, tmp_path / "dst", **how)
    files = sorted(p.name for p in dst.iterdir())
    if "max_shard_size" in how:
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 2 and "model.safetensors" not in files
        assert sorted(index["weight_map"]) == sorted(_tensors(src)[1])
    else:
        assert _configs(dst)["config.json"]["dtype"] == "bfloat16"
        assert {dtype for _, dtype in _tensors(dst)[1].values()} == {"BF16"}
    if hf_models.HAS_TORCH:
        hf = hf_models.save_copy(src, tmp_path / "hf", **how)
        assert files == sorted(p.name for p in hf.iterdir())
        assert _configs(dst) == _configs(hf)
        if "dtype" in how:
            assert _tensors(dst) == _tensors(hf)
