"""Orbax checkpoints of jaxpar's parameter tree: written from HF safetensors or GGUF,
restored straight into any mesh and policy, read back in HF names and layouts.

The folder layout and the reading side (manifest, restoring into shardings) are in
`jaxpar.loading.orbax_reader`, which `jaxpar.load` uses. This module writes checkpoints
(`hf_to_orbax`) and adds, in `OrbaxCheckpoint`, reading the parameters back as the HF
tensors they came from (for `orbax_to_hf` and as a `TensorSource`).

The parameter tree is saved in groups of whole tensors (at most `group_bytes` each, a
tensor larger than that alone) so a conversion never holds more than one group in host
memory. The source is checked and each parameter is placed on its sharding by the same
code that loads models (`jaxpar.loading.loader`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (bfloat16 for numpy)
import numpy as np
from flax import nnx

from jaxpar.assembly import (ALIASES, OpenedCheckpoint, abstract_model, make_sharding,
                             open_checkpoint, resolve_dtype, resolve_path)
from jaxpar.checkpoint.atomic import (ConversionError, UnsupportedModelError, atomic_directory,
                                      check_destination)
from jaxpar.config import ConfigError, ModelConfig
from jaxpar.loading.loader import ParamRead, param_sharding, place_param, plan_reads, skipped_tensors
from jaxpar.loading.orbax_reader import (FORMAT, HF_CONFIG, MARKER, PARAMS_DIR,  # noqa: F401
                                         TOKENIZER_FILES, VERSION, OrbaxReader, ParamEntry,
                                         is_orbax_checkpoint, nested, orbax_module, path_key)
from jaxpar.loading.sources import CheckpointError, TensorSource
from jaxpar.sharding.model_sharding import ModelSharding
from jaxpar.sharding.resolve import plain_tp
from jaxpar.version import __version__

DEFAULT_GROUP_BYTES = 128 * 2**20
# Orbax chunk size: a device restoring one shard of a tensor reads only the chunks it needs.
CHUNK_BYTES = 8 * 2**20
# Source tensor dtypes a conversion accepts (safetensors names).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}


def dtype_name(dtype) -> str:
    return np.dtype(jnp.dtype(dtype)).name


# --------------------------------------------------------------------------- writing


def _open_source(src: str | Path) -> OpenedCheckpoint:
    path = resolve_path(src).absolute()
    if not path.exists():
        raise ConversionError(f"{src}: no such file or folder (expected an HF model folder, "
                              f"a .gguf file or an alias: {', '.join(sorted(ALIASES))})")
    if is_orbax_checkpoint(path):
        raise ConversionError(f"{path} is already a jaxpar Orbax checkpoint (convert it with "
                              "orbax-to-hf, or load it directly)")
    try:
        opened = open_checkpoint(path)
    except ConfigError as e:  # no config.json, or not JSON
        raise ConversionError(str(e)) from e
    except FileNotFoundError as e:
        raise ConversionError(f"{path} is neither an HF model folder nor a .gguf file") from e
    if opened.kind == "gguf" and opened.hf_config.get("model_type") in GGUF_ARCHITECTURES:
        # So that the exported config.json names its class for transformers.
        opened.hf_config.setdefault("architectures", [GGUF_ARCHITECTURES[opened.hf_config["model_type"]]])
    return opened


def _plan(cfg: ModelConfig, state: nnx.State, source: TensorSource, dtype: str, group_bytes: int):
    """Checks every parameter against the source before anything is written (the loader's
    checks, plus floating-point source dtypes) and assigns the parameters to groups.

    Returns ([(ParamEntry, ParamRead)], {hf name: (shape, source dtype)}, skipped HF names)."""
    try:
        reads = plan_reads(state, cfg, source)
    except CheckpointError as e:
        raise ConversionError(str(e)) from e
    src_dtype = getattr(source, "dtype", None)
    hf_tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    planned = []
    group, group_size = 0, 0
    itemsize = np.dtype(dtype).itemsize
    for r in reads:
        for n in r.hf_names:
            sd = src_dtype(n) if callable(src_dtype) else "F32"
            if sd not in FLOAT_DTYPES:
                raise ConversionError(f"tensor {n} has dtype {sd}; expected a floating dtype "
                                      f"({', '.join(FLOAT_DTYPES)})")
            hf_tensors.setdefault(n, (tuple(int(x) for x in source.shape(n)), sd))
        nbytes = int(np.prod(r.shape, dtype=np.int64)) * itemsize
        if group_size and group_size + nbytes > group_bytes:
            group, group_size = group + 1, 0
        group_size += nbytes
        planned.append((ParamEntry(r.key, r.hf_base, r.hf_names, r.shape, dtype, group, repr(r.layout)), r))
    return planned, hf_tensors, skipped_tensors(cfg, source)


def _save_group(directory: Path, tree: dict[str, Any], compress: bool = False) -> None:
    """Writes one group (a nested dict of jax.Arrays) as an Orbax PyTree checkpoint
    (restorable by `StandardCheckpointHandler` / `PyTreeCheckpointHandler`)."""
    ocp = orbax_module()
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), tree)
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=compress))
    try:
        ckptr.save(directory, args=ocp.args.PyTreeSave(tree, save_args=save_args))
    finally:
        ckptr.close()


def release_host_memory() -> None:
    """Returns freed heap memory to the OS between groups (glibc's allocator otherwise keeps
    what the reader and writer threads freed, and RSS creeps up group after group)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _copy_tokenizer(src: OpenedCheckpoint, dst: Path) -> list[str]:
    if src.kind == "gguf":
        from jaxpar.tokenizer import load_tokenizer

        tok = load_tokenizer(src.tokenizer_dir, src.gguf_file)
        tok.save_pretrained(str(dst))
        return sorted(f for f in TOKENIZER_FILES if (dst / f).is_file())
    copied = []
    for name in TOKENIZER_FILES:
        if (src.path / name).is_file():
            shutil.copyfile(src.path / name, dst / name)
            copied.append(name)
    return copied


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def hf_to_orbax(src: str | Path, dst: str | Path, *, dtype: str | None = "auto", policy=None,
                devices: Sequence[jax.Device] | None = None, overwrite: bool = False,
                group_bytes: int = DEFAULT_GROUP_BYTES, compress: bool = False,
                progress: bool = True) -> Path:
    """Converts an HF folder (safetensors), a Llama GGUF file or an alias to an Orbax checkpoint.

    Tensors are read and written group by group (`group_bytes`), each parameter placed on
    its sharding under `policy` (default: one device) and saved by Orbax. The result is
    written into a temporary folder beside `dst` and renamed into place at the end.
    `dtype` "auto" keeps the source's dtype (float32 for GGUF). `compress` stores zstd-
    compressed chunks (a little smaller on disk, several times slower to restore).
    Host memory peaks near three times the larger of `group_bytes` and the largest tensor
    (the jax.Array, Orbax's host copy and TensorStore's write buffers).
    """
    opened = _open_source(src)
    dst = check_destination(Path(dst).absolute(), overwrite, src=opened.path)
    if group_bytes <= 0:
        raise ConversionError(f"group_bytes must be positive, got {group_bytes}")
    cfg = opened.cfg
    jdtype = resolve_dtype(dtype, cfg)
    stored = dtype_name(jdtype)
    sharding = make_sharding(cfg, policy, devices=devices)
    if not isinstance(sharding, ModelSharding):
        raise ConversionError("conversion places whole tensors on one mesh: a pipeline policy (pp > 1) does "
                              "not apply (convert with pp: 1; any policy, pipelines too, loads the result)")
    try:
        _, state = abstract_model(cfg, sharding, jdtype)
    except NotImplementedError as e:
        raise UnsupportedModelError(f"{cfg.model_type} cannot be converted: {e}") from e
    source = opened.tensors()
    planned, hf_tensors, skipped = _plan(cfg, state, source, stored, group_bytes)
    entries = [e for e, _ in planned]
    n_groups = entries[-1].group + 1 if entries else 0
    total = sum(e.nbytes for e in entries)

    with atomic_directory(dst, overwrite=overwrite, src=opened.path) as tmp:
        if opened.kind == "gguf":
            (tmp / HF_CONFIG).write_text(json.dumps(opened.hf_config, indent=2,
                                                    default=_json_default) + "\n")
        else:
            shutil.copyfile(opened.path / HF_CONFIG, tmp / HF_CONFIG)
        (tmp / PARAMS_DIR).mkdir()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"converting to {dst.name}",
                       leave=False)
        try:
            for g in range(n_groups):
                if g:
                    source = opened.reopen_tensors()
                members = [(e, r) for e, r in planned if e.group == g]
                tree = {e.path: _place(source, r, param_sharding(sharding, r), jdtype) for e, r in members}
                _save_group(tmp / PARAMS_DIR / f"{g:05d}", nested(tree), compress)
                del tree
                release_host_memory()
                if bar is not None:
                    bar.update(sum(e.nbytes for e, _ in members))
        finally:
            if bar is not None:
                bar.close()
        del source
        opened.close()
        # Last: transformers' GGUF tokenizer conversion keeps ~200 MB, which would otherwise
        # add to the tensors' peak.
        tokenizer_files = _copy_tokenizer(opened, tmp)
        manifest = {
            "format": FORMAT, "version": VERSION, "jaxpar_version": __version__,
            "dtype": stored,
            "source": {"path": str(opened.path), "kind": opened.kind},
            "model_config": dataclasses.replace(cfg, checkpoint_dtype=stored).to_dict(),
            "hf_config": HF_CONFIG,
            "tokenizer_files": tokenizer_files,
            "total_bytes": total,
            "compressed": bool(compress),
            "groups": [{"dir": f"{PARAMS_DIR}/{g:05d}",
                        "bytes": sum(e.nbytes for e in entries if e.group == g),
                        "tensors": sum(1 for e in entries if e.group == g)} for g in range(n_groups)],
            "params": [e.to_json() for e in entries],
            "hf_tensors": {n: {"shape": list(shape), "source_dtype": sd} for n, (shape, sd) in hf_tensors.items()},
            # Tensors of the source the config does not load (vision tower, MTP head): not stored.
            "skipped_tensors": skipped,
        }
        (tmp / MARKER).write_text(json.dumps(manifest, indent=1, default=_json_default) + "\n")
    return dst


def _place(source: TensorSource, read: ParamRead, sharding, dtype) -> jax.Array:
    """The loader's placement, its read errors reported as conversion errors."""
    try:
        return place_param(source, read, sharding, dtype)
    except ConversionError:
        raise
    except CheckpointError as e:
        raise ConversionError(str(e)) from e


# --------------------------------------------------------------------------- reading back as HF


class OrbaxCheckpoint(OrbaxReader):
    """A checkpoint written by `hf_to_orbax`, readable in HF names and layouts.

    Besides restoring into shardings (`OrbaxReader.restore_state`), it is a `TensorSource`
    (`names`, `shape`, `read` in HF names and layouts), so anything that reads HF tensors can
    read it too, and `iter_hf_tensors` streams it back as HF tensors for `orbax_to_hf`.
    """

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._layouts: dict[str, Any] | None = None
        self._cached: tuple[str, np.ndarray] | None = None

    # --- HF names and layouts

    def layouts(self) -> dict[str, Any]:
        """path -> the layout this jaxpar version declares for each parameter (the model is
        built abstractly from the config); checked against the manifest's HF names."""
        if self._layouts is None:
            try:
                sharding = plain_tp(self.cfg, jax.devices()[:1])
                _, state = abstract_model(self.cfg, sharding, jnp.dtype(self.stored_dtype))
            except NotImplementedError as e:
                raise UnsupportedModelError(f"{self.cfg.model_type}: {e}") from e
            layouts = {path_key(p): var.hf_layout for p, var in nnx.to_flat_state(state)}
            available = set(self.hf_shapes)
            for e in self.entries:
                if e.path not in layouts:
                    raise CheckpointError(f"parameter {e.path} is not part of a {self.cfg.model_type} model")
                names = tuple(layouts[e.path].names(e.hf_base, available))
                if names != e.hf_names:
                    raise CheckpointError(f"parameter {e.path}: the manifest says it came from {list(e.hf_names)}, "
                                          f"the model's layout reads {list(names)}")
            self._layouts = layouts
        return self._layouts

    def hf_order(self) -> list[str]:
        """HF tensor names in the order they complete when parameters are read in manifest order."""
        position = {id(e): i for i, e in enumerate(self.entries)}
        last = {n: max(position[id(c)] for c in cs) for n, cs in self.contributors.items() if cs}
        first = {n: i for i, n in enumerate(self.hf_shapes)}
        return sorted(last, key=lambda n: (last[n], first[n]))

    def iter_hf_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, tensor) in `hf_order()`, one Orbax group (plus any fused tensor still
        being filled) in memory at a time."""
        from jaxpar.checkpoint.inverse import Assembler

        layouts = self.layouts()
        assembler = Assembler(self.hf_shapes, self.stored_dtype)
        done_at: dict[int, list[str]] = {}
        index = {id(e): i for i, e in enumerate(self.entries)}
        for n in self.hf_order():
            done_at.setdefault(max(index[id(c)] for c in self.contributors[n]), []).append(n)
        for g in range(len(self.groups)):
            self.verify_group(g)
            arrays = self.restore_numpy(g)
            for e in self.group_entries(g):
                assembler.add(e.hf_base, layouts[e.path], arrays.pop(e.path))
                for n in done_at.get(index[id(e)], []):
                    yield n, assembler.pop(n)
            del arrays
            release_host_memory()

    # --- TensorSource

    def names(self) -> list[str]:
        return sorted(n for n, cs in self.contributors.items() if cs)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.hf_shapes:
            raise CheckpointError(f"tensor {name} is not in {self.path}")
        return self.hf_shapes[name]

    def dtype(self, name: str) -> str:
        self.shape(name)
        return {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}[self.stored_dtype]

    def read_hf(self, name: str) -> np.ndarray:
        """One whole HF tensor (assembled from the parameter(s) that hold it)."""
        from jaxpar.checkpoint.inverse import Assembler

        self.shape(name)
        layouts = self.layouts()
        entries = self.contributors[name]
        shapes = {n: self.hf_shapes[n] for e in entries for n in e.hf_names}
        assembler = Assembler(shapes, self.stored_dtype)
        for g in sorted({e.group for e in entries}):
            arrays = self.restore_numpy(g, [e for e in entries if e.group == g])
            for e in entries:
                if e.group == g:
                    assembler.add(e.hf_base, layouts[e.path], arrays[e.path])
        return assembler.pop(name)

    def read(self, name: str, index) -> np.ndarray:
        if self._cached is None or self._cached[0] != name:
            self._cached = None
            self._cached = (name, self.read_hf(name))
        return self._cached[1][index]


def orbax_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of an Orbax checkpoint folder (reads only the manifest)."""
    return OrbaxReader(path).cfg
