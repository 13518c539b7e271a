"""Readers of checkpoint tensors by name and slice, without loading whole files.

A `TensorSource` answers `read(name, index)` with just that block of the tensor, in the
Hugging Face layout and naming. Safetensors are read through `safe_open(...).get_slice`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import ml_dtypes  # (registers bfloat16 & co. with numpy for safetensors)
import numpy as np
from safetensors import safe_open

# Safetensors dtypes read by memory-mapping the file (see SafetensorsSource._raw).
RAW_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or does not match the model."""


Index = tuple[slice, ...]


class TensorSource(Protocol):
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, index: Index) -> np.ndarray: ...


class SafetensorsSource:
    """One `model.safetensors`, or the shards named by `model.safetensors.index.json`."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index_file = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
        elif single.is_file():
            weight_map = None
        else:
            raise CheckpointError(
                f"no weights in {model_dir}: expected model.safetensors or "
                "model.safetensors.index.json")
        self._dir = model_dir
        self._handles = {}
        self._file_of: dict[str, str] = {}
        files = sorted(set(weight_map.values())) if weight_map else [single.name]
        for fname in files:
            path = model_dir / fname
            if not path.is_file():
                raise CheckpointError(f"weight shard {path} named by the index is missing")
            try:
                handle = safe_open(str(path), framework="numpy")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read {path} (truncated or not safetensors): {e}") from e
            self._handles[fname] = handle
            for name in handle.keys():
                self._file_of[name] = fname
        if weight_map:
            for name, fname in weight_map.items():
                if name not in self._file_of:
                    raise CheckpointError(f"tensor {name} is listed in the index under {fname} but is not in it")

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def _slice(self, name: str):
        try:
            return self._handles[self._file_of[name]].get_slice(name)
        except KeyError:
            raise CheckpointError(f"tensor {name} is not in the checkpoint") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def read(self, name: str, index: Index) -> np.ndarray:
        if self.dtype(name) in RAW_DTYPES:
            return self._raw(name)[index]
        return np.asarray(self._slice(name)[index])

    def _raw(self, name: str) -> np.ndarray:
        """The tensor memory-mapped straight from its file: safetensors' numpy reader cannot
        slice dtypes numpy lacks (float8; ml_dtypes provides them). Slicing the map reads
        only the pages of that block."""
        fname = self._dir / self._file_of[name]
        with open(fname, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            entry = json.loads(f.read(header_len))[name]
        start, stop = entry["data_offsets"]
        flat = np.memmap(fname, dtype=np.uint8, mode="r", offset=8 + header_len + start, shape=(stop - start,))
        return flat.view(RAW_DTYPES[entry["dtype"]]).reshape(entry["shape"])


class CountingSource:
    """Wraps a TensorSource and records the tensors touched (shape or data) and the bytes
    read: how a pipeline stage shows it reads only its own tensors."""

    def __init__(self, source: TensorSource):
        self.source = source
        self.touched: set[str] = set()
        self.bytes_read = 0

    def names(self) -> list[str]:
        return self.source.names()

    def shape(self, name: str) -> tuple[int, ...]:
        self.touched.add(name)
        return self.source.shape(name)

    def read(self, name: str, index: Index) -> np.ndarray:
        block = self.source.read(name, index)
        self.touched.add(name)
        self.bytes_read += block.nbytes
        return block
