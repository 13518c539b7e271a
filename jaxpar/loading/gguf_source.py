"""GGUF (llama.cpp) checkpoints: Llama-architecture files dequantised tensor by tensor.

GGUF names and layouts differ from HF: names are mapped, and llama.cpp's converter
permutes the rows of q/k projections (interleaved rotary pairs); we undo it so the
tensors are exactly what the HF checkpoint would hold.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxpar.loading.sources import CheckpointError, Index

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def _unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows [h, pair, 2] -> [h, 2, pair]."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


class GGUFSource:
    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file {self.path} does not exist")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:
            raise CheckpointError(f"cannot read GGUF file {self.path}: {e}") from e
        arch = self.field("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"GGUF architecture {arch!r} is not supported (supported: llama)")
        self._tensors = {}
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                raise CheckpointError(f"GGUF tensor {t.name} has no Hugging Face counterpart")
            self._tensors[name] = t
        self._cached: tuple[str, np.ndarray] | None = None

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def hf_config(self) -> dict[str, Any]:
        """The GGUF metadata as an HF `config.json` dict (Llama)."""
        f = self.field
        heads = int(f("llama.attention.head_count"))
        hidden = int(f("llama.embedding_length"))
        vocab = f("llama.vocab_size") or len(self.reader.fields["tokenizer.ggml.tokens"].data)
        return {
            "model_type": "llama",
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(f("llama.feed_forward_length")),
            "num_hidden_layers": int(f("llama.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(f("llama.attention.head_count_kv", heads)),
            "head_dim": int(f("llama.attention.key_length", hidden // heads)),
            "rms_norm_eps": float(f("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(f("llama.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(f("llama.context_length", 2048)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": f("tokenizer.ggml.bos_token_id"),
            "eos_token_id": f("tokenizer.ggml.eos_token_id"),
            "torch_dtype": "float32",
        }

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        t = self._get(name)
        return tuple(int(d) for d in reversed(t.shape))

    def _get(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} is not in {self.path.name}") from None

    def _dequantised(self, name: str) -> np.ndarray:
        # Quantised blocks span whole rows, so a tensor is dequantised whole, once, and
        # kept until the loader moves on to the next tensor.
        if self._cached is not None and self._cached[0] == name:
            return self._cached[1]
        import gguf

        t = self._get(name)
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(self.shape(name))
        if name.endswith("self_attn.q_proj.weight"):
            w = _unpermute_rotary_rows(w, int(self.field("llama.attention.head_count")))
        elif name.endswith("self_attn.k_proj.weight"):
            w = _unpermute_rotary_rows(w, int(self.field("llama.attention.head_count_kv")))
        self._cached = (name, w)
        return w

    def read(self, name: str, index: Index) -> np.ndarray:
        return self._dequantised(name)[index]
