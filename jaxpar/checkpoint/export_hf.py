"""Orbax checkpoint -> Hugging Face folder: safetensors (sharded past a size, with
`model.safetensors.index.json`), config.json and tokenizer files.

Each tensor goes back through the inverse of its parameter's layout
(`jaxpar.checkpoint.inverse`). The safetensors
files are written by a small streaming writer: the header (names, dtypes, shapes,
offsets) is known from the manifest before any data is read, so tensors are appended one
at a time and only one Orbax group is ever in host memory.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxpar.checkpoint.atomic import ConversionError, atomic_directory
from jaxpar.checkpoint.orbax_io import HF_CONFIG, TOKENIZER_FILES, OrbaxCheckpoint

SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB" (HF's convention)."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ConversionError(f"cannot parse the size {size!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ConversionError(f"the shard size must be positive, got {size!r}")
    return value


class SafetensorsWriter:
    """Writes one .safetensors file whose tensors are declared up front, then appended in order."""

    def __init__(self, path: Path, specs: Sequence[tuple[str, tuple[int, ...], str]],
                 metadata: dict[str, str] | None = None):
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, shape, dtype in specs:
            n = math.prod(shape) * np.dtype(dtype).itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self.path = path
        self.size = 8 + len(raw) + offset
        self._pending = list(specs)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, name: str, array: np.ndarray) -> None:
        if not self._pending:
            raise ConversionError(f"{self.path.name}: tensor {name} was not declared")
        want_name, want_shape, want_dtype = self._pending.pop(0)
        if (name, tuple(array.shape), array.dtype.name) != (want_name, tuple(want_shape), want_dtype):
            raise ConversionError(f"{self.path.name}: expected {want_name} {want_dtype}{list(want_shape)}, "
                                  f"got {name} {array.dtype.name}{list(array.shape)}")
        data = np.ascontiguousarray(array)
        if data.dtype.byteorder == ">":
            data = data.byteswap().view(data.dtype.newbyteorder("<"))
        self._file.write(data.reshape(-1).view(np.uint8).data)

    def abort(self) -> None:
        self._file.close()

    def close(self) -> None:
        self._file.close()
        if self._pending:
            raise ConversionError(f"{self.path.name}: {len(self._pending)} tensor(s) were never written")
        if self.path.stat().st_size != self.size:
            raise ConversionError(f"{self.path.name}: wrote {self.path.stat().st_size} bytes, "
                                  f"expected {self.size}")


def plan_shards(tensors: Sequence[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Consecutive (name, bytes) per file, each file at most `max_bytes` (a larger tensor alone)."""
    shards: list[list[str]] = []
    size = 0
    for name, nbytes in tensors:
        if not shards or (size and size + nbytes > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _hf_config_text(ckpt: OrbaxCheckpoint) -> str | bytes:
    """config.json verbatim, unless the stored dtype differs from the one it names."""
    raw = (ckpt.path / HF_CONFIG).read_bytes()
    hf = json.loads(raw)
    named = hf.get("dtype", hf.get("torch_dtype"))
    if named == ckpt.stored_dtype:
        return raw
    keys = [k for k in ("dtype", "torch_dtype") if k in hf] or ["dtype"]
    for k in keys:
        hf[k] = ckpt.stored_dtype
    return json.dumps(hf, indent=2, sort_keys=True) + "\n"


def orbax_to_hf(src: str | Path, dst: str | Path, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                overwrite: bool = False, progress: bool = True) -> Path:
    """Exports an Orbax checkpoint written by `hf_to_orbax` to an HF folder that
    transformers loads (`AutoModelForCausalLM.from_pretrained`)."""
    ckpt = OrbaxCheckpoint(src)
    max_bytes = parse_size(max_shard_size)
    dtype = ckpt.stored_dtype
    if dtype not in SAFETENSORS_DTYPES:
        raise ConversionError(f"{ckpt.path} stores {dtype}, which the safetensors export does not support")
    if not (ckpt.path / HF_CONFIG).is_file():
        raise ConversionError(f"{ckpt.path / HF_CONFIG} is missing; cannot write an HF config")
    ckpt.layouts()  # the model can invert every parameter, before anything is written
    order = ckpt.hf_order()
    itemsize = np.dtype(dtype).itemsize
    nbytes = {n: math.prod(ckpt.hf_shapes[n]) * itemsize for n in order}
    shards = plan_shards([(n, nbytes[n]) for n in order], max_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = sum(nbytes.values())

    dst = Path(dst).absolute()
    with atomic_directory(dst, overwrite=overwrite, src=ckpt.path) as tmp:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"exporting to {dst.name}",
                       leave=False)
        tensors = ckpt.iter_hf_tensors()
        weight_map: dict[str, str] = {}
        try:
            for fname, shard in zip(names, shards):
                writer = SafetensorsWriter(tmp / fname, [(n, ckpt.hf_shapes[n], dtype) for n in shard])
                try:
                    for n in shard:
                        got, array = next(tensors)
                        if got != n:
                            raise ConversionError(f"internal: expected HF tensor {n}, assembled {got}")
                        writer.write(n, array)
                        weight_map[n] = fname
                        del array
                        if bar is not None:
                            bar.update(nbytes[n])
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
        finally:
            tensors.close()
            if bar is not None:
                bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        text = _hf_config_text(ckpt)
        (tmp / HF_CONFIG).write_bytes(text if isinstance(text, bytes) else text.encode())
        for name in TOKENIZER_FILES:
            if (ckpt.path / name).is_file():
                shutil.copyfile(ckpt.path / name, tmp / name)
    return dst
