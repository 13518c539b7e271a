"""The streaming loader: sharded / bf16 / tied checkpoints, block reads, bad checkpoints."""

from __future__ import annotations

import collections
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jaxpar
from jaxpar.config import load_config
from jaxpar.loading import loader
from jaxpar.loading.gguf_source import _unpermute_rotary_rows
from jaxpar.loading.sources import CheckpointError, SafetensorsSource
from jaxpar.models.decoder import CausalLM
from jaxpar.models.options import RuntimeOptions
from jaxpar.models.params import AS_IS, LINEAR, HFLayout
from jaxpar.sharding.resolve import plain_tp
from tests import hf_models

IDS = np.random.default_rng(0).integers(3, 256, size=(2, 9)).astype(np.int32)


def _load(path, **kw):
    return jaxpar.load(path, tokenizer=False, progress=False, **kw)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(folder: Path, edit) -> Path:
    """Rewrites folder/model.safetensors through `edit(dict of numpy arrays)`."""
    f = folder / "model.safetensors"
    tensors = dict(load_file(str(f)))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def llama_ref(tiny_models):
    """The float32 tiny llama: its jaxpar logits and HF model (the reference; None without torch)."""
    hf = hf_models.hf_model(tiny_models["llama"]) if hf_models.HAS_TORCH else None
    return _load(tiny_models["llama"]).logits(IDS), hf


@pytest.fixture(scope="module")
def sharded_llama(tiny_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded") / "llama"
    return hf_models.save_copy(tiny_models["llama"], path, max_shard_size="200KB")


# --------------------------------------------------------------------------- formats


def test_sharded_checkpoint_equals_single_file(sharded_llama, tiny_models, llama_ref):
    index = json.loads((sharded_llama / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and not (sharded_llama / "model.safetensors").exists()
    assert SafetensorsSource(sharded_llama).names() == SafetensorsSource(tiny_models["llama"]).names()
    np.testing.assert_array_equal(_load(sharded_llama).logits(IDS), llama_ref[0])


@pytest.fixture(scope="module")
def bf16_llama(tiny_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16") / "llama"
    return hf_models.save_copy(tiny_models["llama"], path, dtype="bfloat16")


def _param_dtypes(model) -> set:
    return {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model.module, nnx.Param))}


def test_bf16_checkpoint_auto_dtype_keeps_bf16(bf16_llama, llama_ref):
    assert SafetensorsSource(bf16_llama).dtype("model.embed_tokens.weight") == "BF16"
    model = _load(bf16_llama, dtype="auto")
    assert model.dtype == jnp.bfloat16
    assert _param_dtypes(model) == {jnp.dtype(jnp.bfloat16)}
    logits = model.logits(IDS)
    assert logits.dtype == np.float32
    # bf16 arithmetic: close to the float32 model, not equal.
    ref = llama_ref[0]
    assert np.abs(logits - ref).max() < 0.1 * np.abs(ref).max()


@hf_models.needs_torch
def test_bf16_checkpoint_upcast_to_float32_matches_hf(bf16_llama):
    model = _load(bf16_llama, dtype="float32")
    assert _param_dtypes(model) == {jnp.dtype(jnp.float32)}
    # HF upcasting the same bf16 weights is the reference.
    hf = hf_models.hf_model(bf16_llama)
    ref = hf_models.hf_logits(hf, IDS)
    np.testing.assert_allclose(model.logits(IDS), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    emb = np.asarray(model.module.embed_tokens.weight[...])
    np.testing.assert_array_equal(emb, hf.model.embed_tokens.weight.detach().numpy())


@pytest.fixture(scope="module")
def tied_qwen2(tmp_path_factory):
    return hf_models.save_tiny("qwen2", tmp_path_factory.mktemp("tied") / "qwen2", seed=5,
                               tie_word_embeddings=True)


@hf_models.needs_torch
def test_tied_embeddings(tied_qwen2, tmp_path):
    assert "lm_head.weight" not in SafetensorsSource(tied_qwen2).names()
    model = _load(tied_qwen2)
    assert model.cfg.tie_word_embeddings and model.module.lm_head is None
    ref = hf_models.hf_logits(tied_qwen2, IDS)
    np.testing.assert_allclose(model.logits(IDS), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # Some tied checkpoints also carry lm_head.weight (a copy): accepted, same logits.
    def add_head(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()

    with_head = _edit(_copy(tied_qwen2, tmp_path / "q"), add_head)
    np.testing.assert_array_equal(_load(with_head).logits(IDS), model.logits(IDS))


# --------------------------------------------------------------------------- read_block


class ArraySource:
    """An in-memory TensorSource that records what was read."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors
        self.reads: list[tuple[str, tuple]] = []

    def names(self):
        return sorted(self.tensors)

    def shape(self, name):
        return self.tensors[name].shape

    def read(self, name, index):
        self.reads.append((name, index))
        return self.tensors[name][index]


def _random_index(rng, shape):
    out = []
    for n in shape:
        a = int(rng.integers(0, n))
        b = int(rng.integers(a + 1, n + 1))
        out.append(slice(a, b))
    return tuple(out)


# (hf shape, layout, our shape): q_proj [h*d, e] -> [e, h, d]; o_proj [e, h*d] -> [h, d, e];
# embedding as is; a bias [h*d] -> [h, d]; down_proj [e, f] -> [f, e].
LAYOUTS = [
    ((6 * 4, 10), LINEAR, (10, 6, 4)),
    ((10, 6 * 4), LINEAR, (6, 4, 10)),
    ((12, 10), AS_IS, (12, 10)),
    ((6 * 4,), AS_IS, (6, 4)),
    ((10, 14), HFLayout(perm=(1, 0)), (14, 10)),
]


@pytest.mark.parametrize("hf_shape,layout,our_shape", LAYOUTS)
def test_read_block_equals_numpy_reshape_transpose(hf_shape, layout, our_shape):
    rng = np.random.default_rng(len(hf_shape) * 100 + our_shape[0])
    full = rng.standard_normal(hf_shape).astype(np.float32)
    ours = np.transpose(full, layout.perm).reshape(our_shape) if layout.perm else full.reshape(our_shape)
    source = ArraySource({"w": full})
    for _ in range(40):
        index = _random_index(rng, our_shape)
        block = loader.read_block(source, "w", layout, our_shape, index)
        np.testing.assert_array_equal(block, ours[index])


def test_read_block_of_whole_heads_reads_only_their_rows():
    h, d, e = 8, 4, 10
    full = np.arange(h * d * e, dtype=np.float32).reshape(h * d, e)
    source = ArraySource({"q": full})
    # Heads 2..4 of q_proj ([e, h, d] ours), all of embed and head_dim.
    block = loader.read_block(source, "q", LINEAR, (e, h, d), (slice(None), slice(2, 5), slice(None)))
    assert block.shape == (e, 3, d)
    (_, index), = source.reads
    assert index == (slice(2 * d, 5 * d), slice(0, e))


def test_unpermute_inverts_llama_cpp_permute():
    heads, head_dim, hidden = 3, 8, 5
    w = np.random.default_rng(0).standard_normal((heads * head_dim, hidden)).astype(np.float32)
    # llama.cpp's convert script: rows [h, 2, pair] -> [h, pair, 2].
    permuted = (w.reshape(heads, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(w.shape))
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(_unpermute_rotary_rows(permuted, heads), w)


# --------------------------------------------------------------------------- bad checkpoints


def test_missing_tensor(tiny_models, tmp_path):
    bad = _edit(_copy(tiny_models["llama"], tmp_path / "m"),
                lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight .*missing"):
        _load(bad)


def test_unexpected_tensor(tiny_models, tmp_path):
    def add(t):
        t["model.layers.0.self_attn.extra_proj.weight"] = np.zeros((4, 4), np.float32)

    bad = _edit(_copy(tiny_models["llama"], tmp_path / "u"), add)
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.self_attn\.extra_proj\.weight"):
        _load(bad)


@pytest.mark.parametrize("name,shape", [
    ("model.layers.2.self_attn.q_proj.weight", (64, 32)),  # wrong size
    ("model.layers.0.self_attn.k_proj.weight", (64, 32)),  # right size, transposed: [32, 64] expected
    ("model.norm.weight", (8, 8)),  # right size, wrong rank
])
def test_wrongly_shaped_tensor(tiny_models, tmp_path, name, shape):
    def reshape(t):
        t[name] = np.zeros(shape, np.float32)

    bad = _edit(_copy(tiny_models["llama"], tmp_path / "s"), reshape)
    with pytest.raises(CheckpointError, match=re.escape(f"{name} has shape {shape}")):
        _load(bad)


def test_truncated_safetensors(tiny_models, tmp_path):
    bad = _copy(tiny_models["llama"], tmp_path / "t")
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        _load(bad)


def test_shard_missing_from_index(sharded_llama, tmp_path):
    bad = _copy(sharded_llama, tmp_path / "sh")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (bad / gone).unlink()
    with pytest.raises(CheckpointError, match=rf"{gone}.*missing"):
        _load(bad)


# --------------------------------------------------------------------------- sharded placement


class CountingSource(SafetensorsSource):
    def __init__(self, path):
        super().__init__(path)
        self.reads: collections.Counter = collections.Counter()

    def read(self, name, index):
        self.reads[name] += 1
        return super().read(name, index)


def test_replicated_tensors_are_read_once_on_8_devices(tiny_models):
    assert len(jax.devices()) >= 8
    path = tiny_models["llama"]
    cfg = load_config(path)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("tp",),
                             axis_types=(jax.sharding.AxisType.Auto,))
    sharding = plain_tp(cfg, mesh)
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, jnp.float32, sharding, RuntimeOptions()))
    _, state = nnx.split(abstract)
    source = CountingSource(path)
    state = loader.load_params(state, cfg, source, sharding, jnp.float32)

    arrays = {loader.hf_name(cfg, p): v.get_value() for p, v in nnx.to_flat_state(state)}
    for name, array in arrays.items():
        assert len(array.sharding.device_set) == 8, name
        distinct = {tuple((s.start, s.stop) for s in idx)
                    for idx in array.sharding.devices_indices_map(array.shape).values()}
        # One read per distinct block: replicated blocks are shared, not re-read.
        assert source.reads[name] == len(distinct), name
    for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.2.post_attention_layernorm.weight"):
        assert arrays[name].sharding.is_fully_replicated
        assert source.reads[name] == 1, name
    assert source.reads["model.layers.0.self_attn.q_proj.weight"] == 8  # heads split 8 ways
    # The assembled arrays are the checkpoint's tensors.
    full = load_file(str(path / "model.safetensors"))
    q = np.asarray(arrays["model.layers.1.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(q, full["model.layers.1.self_attn.q_proj.weight"].T.reshape(q.shape))
    np.testing.assert_array_equal(np.asarray(arrays["model.norm.weight"]), full["model.norm.weight"])


# --------------------------------------------------------------------------- GGUF


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's HF -> GGUF converter does to q/k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_llama_gguf(hf_dir: Path, path: Path, qtype=None) -> Path:
    """A GGUF file of an HF llama folder, written the way llama.cpp's converter lays it out."""
    import gguf
    from jaxpar.loading.gguf_source import _GLOBAL_NAMES, _LAYER_NAMES

    cfg = json.loads((hf_dir / "config.json").read_text())
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_token_list([f"<tok{i}>" for i in range(cfg["vocab_size"])])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {v: k for k, v in _GLOBAL_NAMES.items()}
    layer_names = {v: k for k, v in _LAYER_NAMES.items()}
    for name, t in sorted(load_file(str(hf_dir / "model.safetensors")).items()):
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{layer_names[rest]}"
        else:
            gname = names[name]
        if name.endswith("q_proj.weight"):
            t = _llama_cpp_permute(t, heads)
        elif name.endswith("k_proj.weight"):
            t = _llama_cpp_permute(t, kv)
        if qtype is not None and t.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def llama_gguf(tiny_models, tmp_path_factory):
    return _write_llama_gguf(tiny_models["llama"], tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_gguf_file_reader_agrees_with_gguf_package(llama_gguf):
    import gguf
    from jaxpar.loading.gguf_source import GGUFFile

    ours, ref = GGUFFile(llama_gguf), gguf.GGUFReader(str(llama_gguf))
    assert ours.metadata["tokenizer.ggml.tokens"] == ref.fields["tokenizer.ggml.tokens"].contents()
    for key in ("general.architecture", "llama.block_count", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "tokenizer.ggml.eos_token_id"):
        assert ours.metadata[key] == ref.fields[key].contents(), key
    assert sorted(ours.tensors) == sorted(t.name for t in ref.tensors)
    for t in ref.tensors:
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        np.testing.assert_array_equal(ours.dequantise(ours.tensors[t.name]), expected, err_msg=t.name)


@hf_models.needs_torch
def test_gguf_llama_loads_to_the_hf_logits(llama_gguf, llama_ref):
    """Names mapped, q/k rows un-permuted, tied/untied head found: HF's logits."""
    model = _load(llama_gguf)
    assert model.cfg.num_kv_heads == 4 and not model.cfg.tie_word_embeddings
    ref = hf_models.hf_logits(llama_ref[1], IDS)
    np.testing.assert_allclose(model.logits(IDS), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_gguf_quantised_tensors_are_dequantised(tiny_models, tmp_path, llama_ref):
    import gguf
    from gguf.constants import GGMLQuantizationType as Q
    from jaxpar.loading.gguf_source import GGUFSource

    path = _write_llama_gguf(tiny_models["llama"], tmp_path / "q8.gguf", Q.Q8_0)
    source = GGUFSource(path)
    full = load_file(str(tiny_models["llama"] / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.weight"
    expected = gguf.quants.dequantize(gguf.quants.quantize(full[name], Q.Q8_0), Q.Q8_0)
    np.testing.assert_array_equal(source.read(name, (slice(None), slice(None))), expected)
    assert np.abs(expected - full[name]).max() < 0.02  # Q8_0 is close, not exact
    logits, ref = _load(path).logits(IDS), llama_ref[0]
    assert not np.array_equal(logits, ref)
    # Q8_0 moves the logits by about 5 % of the largest one (depends on the random draw).
    assert np.abs(logits - ref).max() < 0.1 * np.abs(ref).max()


def test_truncated_gguf(llama_gguf, tmp_path):
    bad = tmp_path / "cut.gguf"
    data = llama_gguf.read_bytes()
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"cannot read GGUF file .*cut\.gguf.*past the end of the file"):
        _load(bad)
