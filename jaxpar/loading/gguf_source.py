"""GGUF (llama.cpp) checkpoints: Llama-architecture files dequantised tensor by tensor.

GGUF names and layouts differ from HF: names are mapped, and llama.cpp's converter
permutes the rows of q/k projections (interleaved rotary pairs); we undo it so the
tensors are exactly what the HF checkpoint would hold.

The file is parsed by a small reader of our own (`GGUFFile`): the header, metadata and
tensor table are read once with `struct`, tensor data stays memory-mapped. (`gguf`'s
`GGUFReader` builds a numpy view for every element of every metadata array, which takes
seconds for a 49k-token vocabulary.) Dequantisation uses `gguf.quants`.
"""

from __future__ import annotations

import dataclasses
import re
import struct
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


_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                   10: "Q", 11: "q", 12: "d"}
_SCALAR_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                  10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the fastest-varying (HF's last)
    ggml_type: int
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))


class GGUFFile:
    """GGUF v2/v3 (little-endian): `metadata` (key -> value; arrays of numbers as numpy
    arrays, of strings as lists), `tensors` (name -> GGUFTensor), `raw(tensor)` bytes."""

    def __init__(self, path: str | Path):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        self._buf = np.memmap(self.path, mode="r", dtype=np.uint8)
        buf, pos = self._buf, 0
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3; big-endian files are not)")
        pos = 4 + 4 + 8 + 8
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            (vtype,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            self.metadata[key], pos = self._value(vtype, pos)
        infos = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (n_dims,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
            pos += 8 * n_dims
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            infos.append((name, tuple(int(d) for d in dims), ggml_type, offset))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-pos // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, ggml_type, offset in infos:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (KeyError, ValueError):
                raise ValueError(f"tensor {name} has unknown ggml type {ggml_type}") from None
            nbytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
            if start + offset + nbytes > len(buf):
                raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
            self.tensors[name] = GGUFTensor(name, dims, ggml_type, start + offset, nbytes)

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._buf, pos)
        pos += 8
        return bytes(self._buf[pos:pos + n]).decode("utf-8", errors="replace"), pos + n

    def _value(self, vtype: int, pos: int) -> tuple[Any, int]:
        if vtype in _SCALAR_FORMATS:
            fmt = "<" + _SCALAR_FORMATS[vtype]
            return struct.unpack_from(fmt, self._buf, pos)[0], pos + struct.calcsize(fmt)
        if vtype == _STRING:
            return self._string(pos)
        if vtype == _ARRAY:
            itype, count = struct.unpack_from("<IQ", self._buf, pos)
            pos += 12
            if itype in _SCALAR_DTYPES:
                dt = np.dtype(_SCALAR_DTYPES[itype])
                return np.frombuffer(self._buf, dt, count, pos).copy(), pos + dt.itemsize * count
            out = []
            for _ in range(count):
                item, pos = self._value(itype, pos)
                out.append(item)
            return out, pos
        raise ValueError(f"unknown GGUF value type {vtype}")

    def raw(self, tensor: GGUFTensor) -> np.ndarray:
        return self._buf[tensor.offset:tensor.offset + tensor.nbytes]

    def dequantise(self, tensor: GGUFTensor) -> np.ndarray:
        """float32 in HF's shape."""
        from gguf import quants
        from gguf.constants import GGMLQuantizationType

        qtype = GGMLQuantizationType(tensor.ggml_type)
        raw = self.raw(tensor)
        if qtype == GGMLQuantizationType.F32:
            w = raw.view(np.float32)
        elif qtype == GGMLQuantizationType.F16:
            w = raw.view(np.float16).astype(np.float32)
        elif qtype == GGMLQuantizationType.BF16:
            w = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            rows = int(np.prod(tensor.dims[1:], dtype=np.int64))
            w = quants.dequantize(raw.reshape(rows, -1), qtype)
        return np.asarray(w, np.float32).reshape(tensor.hf_shape)


class GGUFSource:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file {self.path} does not exist")
        try:
            self.file = GGUFFile(self.path)
        except Exception as e:
            raise CheckpointError(f"cannot read GGUF file {self.path}: {e}") from e
        arch = self.field("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"GGUF architecture {arch!r} is not supported (supported: llama)")
        self._tensors: dict[str, GGUFTensor] = {}
        for t in self.file.tensors.values():
            name = _hf_name(t.name)
            if name is None:
                raise CheckpointError(f"GGUF tensor {t.name} has no Hugging Face counterpart")
            self._tensors[name] = t
        self._cached: tuple[str, np.ndarray] | None = None

    def field(self, key: str, default: Any = None) -> Any:
        return self.file.metadata.get(key, default)

    def tokenizer_metadata(self) -> dict[str, Any]:
        """The `tokenizer.*` keys (vocabulary, merges, token types, special ids, chat
        template), from which `jaxpar.tokenizer.tokenizer_from_gguf` builds the tokenizer."""
        return {k: v for k, v in self.file.metadata.items() if k.startswith("tokenizer.")}

    def stop_token_ids(self) -> list[int]:
        """End-of-generation ids: EOS, and end-of-turn / end-of-message where given."""
        ids = [self.field(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        return list(dict.fromkeys(int(i) for i in ids if i is not None))

    def hf_config(self) -> dict[str, Any]:
        """The GGUF metadata as an HF `config.json` dict (Llama)."""
        f = self.field
        heads = int(f("llama.attention.head_count"))
        hidden = int(f("llama.embedding_length"))
        vocab = f("llama.vocab_size") or len(f("tokenizer.ggml.tokens", ()))
        stops = self.stop_token_ids()
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
            "eos_token_id": stops[0] if len(stops) == 1 else (stops or None),
            "torch_dtype": "float32",
        }

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._get(name).hf_shape

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
        w = self.file.dequantise(self._get(name))
        if name.endswith("self_attn.q_proj.weight"):
            w = _unpermute_rotary_rows(w, int(self.field("llama.attention.head_count")))
        elif name.endswith("self_attn.k_proj.weight"):
            w = _unpermute_rotary_rows(w, int(self.field("llama.attention.head_count_kv")))
        self._cached = (name, w)
        return w

    def read(self, name: str, index: Index) -> np.ndarray:
        return self._dequantised(name)[index]
