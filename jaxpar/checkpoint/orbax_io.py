"""Orbax checkpoints of jaxpar's parameter tree: written from HF safetensors or GGUF,
restored straight into any mesh and policy.

Layout of a checkpoint folder::

    jaxpar_checkpoint.json   marker + manifest: format, dtype, ModelConfig, parameter table
    config.json              the source's HF config.json, verbatim (for exact export to HF)
    tokenizer.json ...       tokenizer files (copied, or saved from a GGUF's tokenizer)
    params/00000/ ...        Orbax PyTree checkpoints; each holds a disjoint subtree of the
                             nnx parameter state (nested dicts, keys = state path parts, e.g.
                             {"layers": {"0": {"self_attn": {"q_proj": {"weight": ...}}}}})

The parameter tree is saved in groups of whole tensors (at most `group_bytes` each, a
tensor larger than that alone) so a conversion never holds more than one group in host
memory; the union of the groups' trees is the model's state (`nnx.to_pure_dict` with
string keys). Restoring passes ShapeDtypeStructs carrying the target `NamedSharding`s, so
Orbax reads each device's block directly in its final layout, for any device count/policy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (bfloat16 for numpy)
import numpy as np
from flax import nnx

from jaxpar.checkpoint.atomic import (ConversionError, UnsupportedModelError, atomic_directory,
                                      check_destination)
from jaxpar.config import ConfigError, ModelConfig, config_from_hf_dict, read_hf_config
from jaxpar.loading.loader import IGNORED_SUFFIXES, hf_name, read_block
from jaxpar.loading.sources import CheckpointError, TensorSource

MARKER = "jaxpar_checkpoint.json"
FORMAT = "jaxpar-orbax"
VERSION = 1
PARAMS_DIR = "params"
HF_CONFIG = "config.json"
DEFAULT_GROUP_BYTES = 128 * 2**20
# Orbax chunk size: a device restoring one shard of a tensor reads only the chunks it needs.
CHUNK_BYTES = 8 * 2**20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
# Source tensor dtypes a conversion accepts (safetensors names).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}


def _ocp():
    import orbax.checkpoint as ocp  # imported on first use: it takes a second

    return ocp


def is_orbax_checkpoint(path: str | Path) -> bool:
    """True for a folder written by `hf_to_orbax` (it holds the marker file)."""
    path = Path(path)
    return path.is_dir() and (path / MARKER).is_file()


def path_key(path: Sequence[Any]) -> str:
    """nnx state path -> "layers/0/self_attn/q_proj/weight"."""
    return "/".join(str(p) for p in path)


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: tree}


def _set_state(state: nnx.State, path: tuple, value: jax.Array) -> None:
    node = state
    for p in path[:-1]:
        node = node[p]
    node[path[-1]].set_value(value)


def dtype_name(dtype) -> str:
    return np.dtype(jnp.dtype(dtype)).name


# --------------------------------------------------------------------------- the manifest


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """One parameter of the checkpoint (a row of the manifest)."""

    path: str  # nnx state path, "/"-joined
    hf_base: str  # the parameter's default HF name (its layout resolves names from it)
    hf_names: tuple[str, ...]  # the HF tensors it was read from
    shape: tuple[int, ...]  # ours (as stored)
    dtype: str
    group: int
    layout: str = ""  # repr of the layout, for people

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "hf_base": self.hf_base, "hf_names": list(self.hf_names),
                "shape": list(self.shape), "dtype": self.dtype, "group": self.group,
                "layout": self.layout}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ParamEntry":
        return cls(path=d["path"], hf_base=d["hf_base"], hf_names=tuple(d["hf_names"]),
                   shape=tuple(d["shape"]), dtype=d["dtype"], group=int(d["group"]),
                   layout=d.get("layout", ""))


# --------------------------------------------------------------------------- sources


@dataclasses.dataclass
class _Source:
    path: Path
    kind: str  # "safetensors" | "gguf"
    hf_config: dict[str, Any]
    reader: TensorSource | None = None

    def open(self) -> TensorSource:
        if self.reader is None:
            if self.kind == "gguf":
                from jaxpar.loading.gguf_source import GGUFSource

                self.reader = GGUFSource(self.path)
            else:
                from jaxpar.loading.sources import SafetensorsSource

                self.reader = SafetensorsSource(self.path)
        return self.reader

    def reopen(self) -> TensorSource:
        """Safetensors are memory-mapped: a fresh reader per group releases the pages the
        previous group touched (they count as resident memory). GGUF files are small next
        to their dequantised tensors and slow to parse, so the reader is kept."""
        if self.kind == "safetensors":
            self.reader = None
        return self.open()

    def close(self) -> None:
        self.reader = None


def _open_source(src: str | Path) -> _Source:
    from jaxpar.api import ALIASES

    path = (ALIASES[src]() if isinstance(src, str) and src in ALIASES else Path(src)).absolute()
    if not path.exists():
        raise ConversionError(f"{src}: no such file or folder (expected an HF model folder, "
                              f"a .gguf file or an alias: {', '.join(sorted(ALIASES))})")
    if is_orbax_checkpoint(path):
        raise ConversionError(f"{path} is already a jaxpar Orbax checkpoint (convert it with "
                              "orbax-to-hf, or load it directly)")
    if path.is_file() and path.suffix == ".gguf":
        from jaxpar.loading.gguf_source import GGUFSource

        reader = GGUFSource(path)
        hf = reader.hf_config()
        if hf.get("model_type") in GGUF_ARCHITECTURES:
            hf.setdefault("architectures", [GGUF_ARCHITECTURES[hf["model_type"]]])
        return _Source(path, "gguf", hf, reader)
    if path.is_dir():
        try:
            hf = read_hf_config(path)
        except ConfigError as e:
            raise ConversionError(str(e)) from e
        return _Source(path, "safetensors", hf)
    raise ConversionError(f"{path} is neither an HF model folder nor a .gguf file")


def _plan(cfg: ModelConfig, state: nnx.State, source: TensorSource, dtype: str, group_bytes: int):
    """Checks every parameter against the source before anything is written; assigns groups.

    Returns (entries, {path: (state path, sharding, layout)}, {hf name: (shape, source dtype)},
    skipped HF names)."""
    available = set(source.names())
    src_dtype = getattr(source, "dtype", None)
    skipped_prefixes = tuple(getattr(cfg, "skipped_weight_prefixes", ()) or ())
    entries: list[ParamEntry] = []
    targets: dict[str, tuple[tuple, Any, Any]] = {}
    hf_tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    group, group_size = 0, 0
    itemsize = np.dtype(dtype).itemsize
    for path, var in nnx.to_flat_state(state):
        aval = var.get_value()
        shape = tuple(aval.shape)
        layout = var.hf_layout
        base, key = hf_name(cfg, path), path_key(path)
        names = list(layout.names(base, available))
        missing = [n for n in names if n not in available]
        if missing or not names:
            raise ConversionError(f"tensor {missing[0] if missing else base} (parameter {key}) is missing "
                                  "from the source")
        problem = layout.mismatch(source, base, shape)
        if problem:
            raise ConversionError(f"tensor {names[0]} has shape {tuple(source.shape(names[0]))}, which does "
                                  f"not fit parameter {key}: the config implies {problem}")
        for n in names:
            sd = src_dtype(n) if callable(src_dtype) else "F32"
            if sd not in FLOAT_DTYPES:
                raise ConversionError(f"tensor {n} has dtype {sd}; expected a floating dtype "
                                      f"({', '.join(FLOAT_DTYPES)})")
            hf_tensors.setdefault(n, (tuple(int(x) for x in source.shape(n)), sd))
        nbytes = math.prod(shape) * itemsize
        if group_size and group_size + nbytes > group_bytes:
            group, group_size = group + 1, 0
        group_size += nbytes
        entries.append(ParamEntry(key, base, tuple(names), shape, dtype, group, repr(layout)))
        targets[key] = (tuple(path), aval.sharding, layout)
    rest = available - set(hf_tensors)
    skipped = sorted(n for n in rest if skipped_prefixes and n.startswith(skipped_prefixes))
    unexpected = sorted(n for n in rest - set(skipped) if not n.endswith(IGNORED_SUFFIXES)
                        and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if unexpected:
        raise UnsupportedModelError(f"the source has {len(unexpected)} tensor(s) the model does not use: "
                                    f"{unexpected[:8]}")
    return entries, targets, hf_tensors, skipped


def _build_array(source: TensorSource, entry: ParamEntry, sharding, layout, np_dtype) -> jax.Array:
    """One parameter, each device's block read from the source (replicated blocks once)."""
    blocks: dict[tuple, np.ndarray] = {}

    def callback(index):
        key = tuple(s.indices(n)[:2] for s, n in zip(index, entry.shape))
        if key not in blocks:
            try:
                block = read_block(source, entry.hf_base, layout, entry.shape, index)
            except CheckpointError:
                raise
            except Exception as e:  # safetensors / gguf readers raise their own types
                raise ConversionError(f"cannot read {entry.hf_names[0]} for {entry.path}: {e}") from e
            blocks[key] = np.ascontiguousarray(block.astype(np_dtype, copy=False))
        return blocks[key]

    return jax.make_array_from_callback(entry.shape, sharding, callback)


def _save_group(directory: Path, tree: dict[str, Any], compress: bool = False) -> None:
    """Writes one group (a nested dict of jax.Arrays) as an Orbax PyTree checkpoint
    (restorable by `StandardCheckpointHandler` / `PyTreeCheckpointHandler`)."""
    ocp = _ocp()
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


def _copy_tokenizer(src: _Source, dst: Path) -> list[str]:
    if src.kind == "gguf":
        from jaxpar.tokenizer import load_tokenizer

        tok = load_tokenizer(src.path.parent, src.path.name)
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
    from jaxpar.api import make_sharding, resolve_dtype
    from jaxpar.sharding.inspect import abstract_model

    source_info = _open_source(src)
    dst = check_destination(Path(dst).absolute(), overwrite, src=source_info.path)
    if group_bytes <= 0:
        raise ConversionError(f"group_bytes must be positive, got {group_bytes}")
    cfg = config_from_hf_dict(source_info.hf_config)
    jdtype = resolve_dtype(dtype, cfg)
    stored = dtype_name(jdtype)
    sharding = make_sharding(cfg, policy, devices=devices)
    try:
        _, state = abstract_model(cfg, sharding, jdtype)
    except NotImplementedError as e:
        raise UnsupportedModelError(f"{cfg.model_type} cannot be converted: {e}") from e
    source = source_info.open()
    entries, targets, hf_tensors, skipped = _plan(cfg, state, source, stored, group_bytes)
    n_groups = entries[-1].group + 1 if entries else 0
    total = sum(e.nbytes for e in entries)
    np_dtype = np.dtype(jdtype)

    with atomic_directory(dst, overwrite=overwrite, src=source_info.path) as tmp:
        if source_info.kind == "gguf":
            (tmp / HF_CONFIG).write_text(json.dumps(source_info.hf_config, indent=2,
                                                    default=_json_default) + "\n")
        else:
            shutil.copyfile(source_info.path / HF_CONFIG, tmp / HF_CONFIG)
        (tmp / PARAMS_DIR).mkdir()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"converting to {dst.name}",
                       leave=False)
        try:
            for g in range(n_groups):
                if g:
                    source = source_info.reopen()
                members = [e for e in entries if e.group == g]
                tree = {e.path: _build_array(source, e, targets[e.path][1], targets[e.path][2], np_dtype)
                        for e in members}
                _save_group(tmp / PARAMS_DIR / f"{g:05d}", _nested(tree), compress)
                del tree
                release_host_memory()
                if bar is not None:
                    bar.update(sum(e.nbytes for e in members))
        finally:
            if bar is not None:
                bar.close()
        del source
        source_info.close()
        # Last: transformers' GGUF tokenizer conversion keeps ~200 MB, which would otherwise
        # add to the tensors' peak.
        tokenizer_files = _copy_tokenizer(source_info, tmp)
        from jaxpar import __version__

        manifest = {
            "format": FORMAT, "version": VERSION, "jaxpar_version": __version__,
            "dtype": stored,
            "source": {"path": str(source_info.path), "kind": source_info.kind},
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


# --------------------------------------------------------------------------- reading


class OrbaxCheckpoint:
    """A checkpoint written by `hf_to_orbax`.

    `restore_state` fills an abstract model state onto its shardings (any mesh, any
    policy). It is also a `TensorSource` (HF names and layouts: `names`, `shape`, `read`),
    so anything that reads HF tensors can read it too.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()  # Orbax wants absolute paths
        marker = self.path / MARKER
        if not marker.is_file():
            raise CheckpointError(f"{self.path} is not a jaxpar Orbax checkpoint (no {MARKER})")
        try:
            meta = json.loads(marker.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{marker} is not valid JSON (truncated?): {e}") from e
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{marker} is not a {FORMAT} manifest (format {meta.get('format')!r})")
        if int(meta.get("version", 0)) > VERSION:
            raise CheckpointError(f"{self.path} was written by a newer jaxpar (format version "
                                  f"{meta['version']} > {VERSION})")
        try:
            self.entries = [ParamEntry.from_json(p) for p in meta["params"]]
            self.groups: list[dict[str, Any]] = list(meta["groups"])
            self.stored_dtype: str = meta["dtype"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{marker} is malformed: {e!r}") from e
        self.meta = meta
        for g in self.groups:
            gdir = self.path / g["dir"]
            if not (gdir / "_CHECKPOINT_METADATA").is_file():
                raise CheckpointError(f"{gdir} is missing or incomplete (truncated checkpoint)")
        self.by_path = {e.path: e for e in self.entries}
        self._by_group: dict[int, list[ParamEntry]] = {}
        for e in self.entries:
            self._by_group.setdefault(e.group, []).append(e)
        try:
            self.hf_shapes: dict[str, tuple[int, ...]] = {
                n: tuple(t["shape"]) for n, t in meta["hf_tensors"].items()}
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{marker} is malformed: {e!r}") from e
        self.contributors: dict[str, list[ParamEntry]] = {n: [] for n in self.hf_shapes}
        for e in self.entries:
            for n in e.hf_names:
                if n not in self.contributors:
                    raise CheckpointError(f"{marker}: parameter {e.path} names HF tensor {n}, which "
                                          "hf_tensors does not list")
                self.contributors[n].append(e)
        self.cfg = self._config()
        self._layouts: dict[str, Any] | None = None
        self._cached: tuple[str, np.ndarray] | None = None

    def _config(self) -> ModelConfig:
        """The stored ModelConfig; if this jaxpar's ModelConfig has other fields than the one
        that wrote it, the config is derived afresh from the HF config.json kept beside it."""
        stored = self.meta.get("model_config")
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        if isinstance(stored, dict) and set(stored) == fields:
            try:
                return ModelConfig.from_dict(stored)
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{self.path / MARKER}: malformed model_config: {e!r}") from e
        if not (self.path / HF_CONFIG).is_file():
            raise CheckpointError(f"{self.path}: its model_config does not match this jaxpar's ModelConfig "
                                  f"and {HF_CONFIG} is missing")
        try:
            cfg = config_from_hf_dict(self.hf_config())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.path / HF_CONFIG} is not valid JSON: {e}") from e
        return dataclasses.replace(cfg, checkpoint_dtype=self.stored_dtype)

    def hf_config(self) -> dict[str, Any]:
        return json.loads((self.path / HF_CONFIG).read_text())

    @property
    def tokenizer_files(self) -> list[str]:
        return list(self.meta.get("tokenizer_files", []))

    def group_dir(self, g: int) -> Path:
        return self.path / self.groups[g]["dir"]

    def group_entries(self, g: int) -> list[ParamEntry]:
        return self._by_group.get(g, [])

    # --- what Orbax says is stored

    def group_metadata(self, g: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """path -> (shape, dtype) as recorded by Orbax for group g."""
        ocp = _ocp()
        try:
            meta = ocp.StandardCheckpointHandler().metadata(self.group_dir(g))
        except Exception as e:
            raise CheckpointError(f"cannot read the Orbax metadata of {self.group_dir(g)}: {e}") from e
        tree = getattr(meta, "tree", meta)
        return {k: (tuple(int(s) for s in v.shape), np.dtype(v.dtype).name)
                for k, v in _flatten(dict(tree)).items()}

    def verify_group(self, g: int) -> None:
        """The manifest and Orbax agree on group g's tensors, shapes and dtypes."""
        stored = self.group_metadata(g)
        listed = {e.path: e for e in self.group_entries(g)}
        if set(stored) != set(listed):
            missing, extra = sorted(set(listed) - set(stored)), sorted(set(stored) - set(listed))
            raise CheckpointError(f"{self.group_dir(g)} does not hold what {MARKER} lists "
                                  f"(missing {missing[:4]}, unexpected {extra[:4]})")
        for key, e in listed.items():
            shape, dt = stored[key]
            if shape != e.shape or dt != e.dtype:
                raise CheckpointError(f"parameter {key}: Orbax holds {dt}{list(shape)}, the manifest "
                                      f"says {e.dtype}{list(e.shape)}")

    # --- restoring onto shardings

    def _check_model(self, flat: dict[str, tuple[tuple, Any]]) -> None:
        missing = sorted(set(flat) - set(self.by_path))
        unexpected = sorted(set(self.by_path) - set(flat))
        if missing:
            raise CheckpointError(f"{self.path} lacks {len(missing)} parameter(s) the model needs: {missing[:6]}")
        if unexpected:
            raise CheckpointError(f"{self.path} has {len(unexpected)} parameter(s) the model does not use: "
                                  f"{unexpected[:6]}")
        for key, (_, var) in flat.items():
            shape = tuple(var.get_value().shape)
            if shape != self.by_path[key].shape:
                raise CheckpointError(f"parameter {key} is stored with shape {list(self.by_path[key].shape)}; "
                                      f"the model expects {list(shape)}")

    def restore_state(self, state: nnx.State, sharding, dtype,
                      progress: Callable[[Iterable], Iterable] | None = None) -> nnx.State:
        """Fills an abstract state (from `nnx.eval_shape`) with arrays restored by Orbax
        directly into each parameter's NamedSharding under `sharding` (cast to `dtype`)."""
        ocp = _ocp()
        flat = {path_key(p): (tuple(p), var) for p, var in nnx.to_flat_state(state)}
        self._check_model(flat)
        groups = range(len(self.groups))
        for g in (progress(groups) if progress else groups):
            targets = {}
            for e in self.group_entries(g):
                path, var = flat[e.path]
                named = sharding.rules_for_param(path).sharding(var.logical_axes)
                targets[e.path] = jax.ShapeDtypeStruct(e.shape, dtype, sharding=named)
            ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
            try:
                restored = ckptr.restore(self.group_dir(g), args=ocp.args.StandardRestore(_nested(targets)))
            except Exception as e:
                raise CheckpointError(f"cannot restore {self.group_dir(g)}: {e}") from e
            finally:
                ckptr.close()
            for key, array in _flatten(restored).items():
                _set_state(state, flat[key][0], array)
        return state

    # --- host (numpy) reads, in our layout or HF's

    def restore_numpy(self, g: int, entries: Sequence[ParamEntry] | None = None) -> dict[str, np.ndarray]:
        """Tensors of group g (all, or `entries`) as host arrays in our layout."""
        ocp = _ocp()
        entries = self.group_entries(g) if entries is None else list(entries)
        item = _nested({e.path: 0 for e in entries})
        args = _nested({e.path: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.dtype(e.dtype))
                        for e in entries})
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        try:
            restored = ckptr.restore(self.group_dir(g), args=ocp.args.PyTreeRestore(
                item=item, restore_args=args, partial_restore=True))
        except Exception as e:
            raise CheckpointError(f"cannot read {self.group_dir(g)}: {e}") from e
        finally:
            ckptr.close()
        out = _flatten(restored)
        for e in entries:
            if e.path not in out or tuple(out[e.path].shape) != e.shape:
                got = None if e.path not in out else list(out[e.path].shape)
                raise CheckpointError(f"parameter {e.path} in {self.group_dir(g)} has shape {got}; "
                                      f"the manifest says {list(e.shape)}")
        return out

    # --- HF names and layouts

    def layouts(self) -> dict[str, Any]:
        """path -> the layout this jaxpar version declares for each parameter (the model is
        built abstractly from the config); checked against the manifest's HF names."""
        if self._layouts is None:
            from jaxpar.sharding.model_sharding import ModelSharding
            from jaxpar.sharding.inspect import abstract_model

            try:
                sharding = ModelSharding.plain_tp(self.cfg, jax.devices()[:1])
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


def open_orbax(path: str | Path) -> OrbaxCheckpoint:
    return OrbaxCheckpoint(path)


def orbax_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of an Orbax checkpoint folder (reads only the manifest)."""
    return OrbaxCheckpoint(path).cfg
