"""Reading jaxpar's Orbax checkpoints: the manifest and restoring into shardings.

Layout of a checkpoint folder (written by `jaxpar.checkpoint.hf_to_orbax`)::

    jaxpar_checkpoint.json   marker + manifest: format, dtype, ModelConfig, parameter table
    config.json              the source's HF config.json, verbatim (for exact export to HF)
    tokenizer.json ...       tokenizer files (copied, or saved from a GGUF's tokenizer)
    params/00000/ ...        Orbax PyTree checkpoints; each holds a disjoint subtree of the
                             nnx parameter state (nested dicts, keys = state path parts, e.g.
                             {"layers": {"0": {"self_attn": {"q_proj": {"weight": ...}}}}})

The parameter tree is saved in groups of whole tensors; the union of the groups' trees is
the model's state. Restoring passes ShapeDtypeStructs carrying the target `NamedSharding`s,
so Orbax reads each device's block directly in its final layout, for any device count and
policy. This module only reads; writing and the export back to HF live in
`jaxpar.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import ml_dtypes  # noqa: F401  (bfloat16 for numpy)
import numpy as np
from flax import nnx

from jaxpar.config import ModelConfig, config_from_hf_dict
from jaxpar.loading.loader import ParamShardings, set_param
from jaxpar.loading.sources import CheckpointError

MARKER = "jaxpar_checkpoint.json"
FORMAT = "jaxpar-orbax"
VERSION = 1
PARAMS_DIR = "params"
HF_CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def orbax_module():
    """orbax.checkpoint, imported on first use (it takes a second)."""
    import orbax.checkpoint

    return orbax.checkpoint


def is_orbax_checkpoint(path: str | Path) -> bool:
    """True for a folder written by `hf_to_orbax` (it holds the marker file)."""
    path = Path(path)
    return path.is_dir() and (path / MARKER).is_file()


def _other_stage(key: str, layers: Sequence[int] | None) -> bool:
    """Whether parameter `key` ("layers/3/...", "embed_tokens/weight", ...) belongs to
    another pipeline stage when this one holds `layers` (None: the whole model)."""
    if layers is None:
        return False
    parts = key.split("/")
    if parts[0] == "layers":
        return int(parts[1]) not in layers
    return parts[0] in ("embed_tokens", "norm", "lm_head")


def path_key(path: Sequence[Any]) -> str:
    """nnx state path -> "layers/0/self_attn/q_proj/weight"."""
    return "/".join(str(p) for p in path)


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a/b": x} -> {"a": {"b": x}} (Orbax trees are nested dicts)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """The inverse of `nested`."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: tree}


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


class OrbaxReader:
    """A checkpoint written by `jaxpar.checkpoint.hf_to_orbax`: its manifest (checked on
    opening), its ModelConfig, and `restore_state`, which fills an abstract model state
    onto its shardings (any mesh, any policy). `jaxpar.checkpoint.OrbaxCheckpoint` adds
    reading it back in HF names and layouts.
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
        ocp = orbax_module()
        try:
            meta = ocp.StandardCheckpointHandler().metadata(self.group_dir(g))
        except Exception as e:
            raise CheckpointError(f"cannot read the Orbax metadata of {self.group_dir(g)}: {e}") from e
        tree = getattr(meta, "tree", meta)
        return {k: (tuple(int(s) for s in v.shape), np.dtype(v.dtype).name)
                for k, v in flatten(dict(tree)).items()}

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

    def _check_model(self, flat: dict[str, tuple[tuple, Any]], layers: Sequence[int] | None = None) -> None:
        missing = sorted(set(flat) - set(self.by_path))
        unexpected = sorted(k for k in set(self.by_path) - set(flat)
                            if not _other_stage(k, layers))
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

    def restore_state(self, state: nnx.State, sharding: ParamShardings, dtype,
                      progress: Callable[[Iterable], Iterable] | None = None, *,
                      layers: Sequence[int] | None = None) -> nnx.State:
        """Fills an abstract state (from `nnx.eval_shape`) with arrays restored by Orbax
        directly into each parameter's NamedSharding under `sharding` (cast to `dtype`).
        Parameters are matched by state path (checked against the manifest first).

        `layers`: the layers a pipeline stage's state holds (None: the whole model); the
        stage then restores only its own parameters (a partial restore of each group that
        holds any), never another stage's."""
        ocp = orbax_module()
        flat = {path_key(p): (tuple(p), var) for p, var in nnx.to_flat_state(state)}
        self._check_model(flat, layers)
        groups = [g for g in range(len(self.groups)) if any(e.path in flat for e in self.group_entries(g))]
        for g in (progress(groups) if progress else groups):
            entries = [e for e in self.group_entries(g) if e.path in flat]
            partial = len(entries) < len(self.group_entries(g))
            targets = {}
            for e in entries:
                path, var = flat[e.path]
                named = sharding.rules_for_param(path).sharding(var.logical_axes)
                targets[e.path] = jax.ShapeDtypeStruct(e.shape, dtype, sharding=named)
            if partial:
                ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
                args = ocp.args.PyTreeRestore(
                    item=nested({k: 0 for k in targets}), partial_restore=True,
                    restore_args=nested({k: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape,
                                                                 dtype=t.dtype) for k, t in targets.items()}))
            else:
                ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
                args = ocp.args.StandardRestore(nested(targets))
            try:
                restored = ckptr.restore(self.group_dir(g), args=args)
            except Exception as e:
                raise CheckpointError(f"cannot restore {self.group_dir(g)}: {e}") from e
            finally:
                ckptr.close()
            for key, array in flatten(restored).items():
                set_param(state, flat[key][0], array)
        return state

    # --- host (numpy) reads, in our layout or HF's

    def restore_numpy(self, g: int, entries: Sequence[ParamEntry] | None = None) -> dict[str, np.ndarray]:
        """Tensors of group g (all, or `entries`) as host arrays in our layout."""
        ocp = orbax_module()
        entries = self.group_entries(g) if entries is None else list(entries)
        item = nested({e.path: 0 for e in entries})
        args = nested({e.path: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.dtype(e.dtype))
                       for e in entries})
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        try:
            restored = ckptr.restore(self.group_dir(g), args=ocp.args.PyTreeRestore(
                item=item, restore_args=args, partial_restore=True))
        except Exception as e:
            raise CheckpointError(f"cannot read {self.group_dir(g)}: {e}") from e
        finally:
            ckptr.close()
        out = flatten(restored)
        for e in entries:
            if e.path not in out or tuple(out[e.path].shape) != e.shape:
                got = None if e.path not in out else list(out[e.path].shape)
                raise CheckpointError(f"parameter {e.path} in {self.group_dir(g)} has shape {got}; "
                                      f"the manifest says {list(e.shape)}")
        return out
