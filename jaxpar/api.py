"""The Python entry points: `jaxpar.load(...)` and `jaxpar.generate(...)`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

# Opening models, dtypes, aliases and policies live one layer down (shared with
# `jaxpar convert` and `jaxpar plan`); the names stay importable from here.
from jaxpar.assembly import (ALIASES, DEFAULT_MODEL, DTYPES, SMOLLM2_GGUF, SMOLLM2_WHEEL,
                             Policy, abstract_model, make_sharding, open_checkpoint, open_config,
                             resolve_dtype, resolve_path, smollm2_gguf_path)
from jaxpar.config import ModelConfig
from jaxpar.engine import Engine as _Engine
from jaxpar.generate import GenerationResult, Generator
from jaxpar.loading.sources import CheckpointError
from jaxpar.models.cache import CacheDtypes, CacheDtypeError
from jaxpar.models.decoder import CausalLM
from jaxpar.models.options import KernelImpl, RuntimeOptions
from jaxpar.pipeline import PipelineGenerator, PipelineModel
from jaxpar.sampling import SamplingParams
from jaxpar.sharding.model_sharding import ModelSharding, PipelineSharding
from jaxpar.speculative import SPECULATIVE_METHODS, MTPSpeculator, SpeculativeError
from jaxpar.tokenizer import Prompt, Tokenizer, encode, load_tokenizer


def open_tokenizer(path_or_alias: str | Path) -> Tokenizer | None:
    """The tokenizer of a model folder, GGUF file or alias, without touching weights (None
    for a folder without tokenizer files)."""
    path = resolve_path(path_or_alias)
    if not path.exists():
        raise FileNotFoundError(
            f"{path_or_alias} is neither a model folder, a .gguf file, nor an alias "
            f"({', '.join(sorted(ALIASES))})")
    return load_tokenizer(path)


def _stop_ids(cfg: ModelConfig, tokenizer: Tokenizer | None, model_dir: Path) -> set[int]:
    """End-of-sequence ids, only from the config, generation_config.json and a real tokenizer."""
    ids = set(cfg.eos_token_ids)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _check_pipeline_cache(cache_dtypes: CacheDtypes, dtype) -> None:
    """Pipeline stages keep one dtype for activations and caches (jaxpar.pipeline)."""
    if cache_dtypes != CacheDtypes.resolve(dtype):
        raise CacheDtypeError(
            f"kv_cache_dtype / state_dtype other than 'auto' are not supported with pipeline "
            f"stages (pp > 1) yet: got {cache_dtypes}; use a policy without pp")


class LoadedModel:
    """A model with its weights placed on a mesh, its tokenizer and compiled programs.
    Over a pipeline (`module` a `PipelineModel`), `generate` and `logits` run through the
    stages and give what the model gives on one device."""

    def __init__(self, module: CausalLM | PipelineModel, tokenizer: Tokenizer | None, dtype,
                 stop_ids: set[int], skipped_weights: Sequence[str] = (),
                 prefill_chunk: int | None = None, cache_dtypes: CacheDtypes | None = None):
        self.module = module
        # Checkpoint tensors deliberately not loaded (e.g. a vision tower, an MTP head).
        self.skipped_weights = list(skipped_weights)
        self.cfg: ModelConfig = module.cfg
        self.sharding: ModelSharding | PipelineSharding = module.sharding
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.stop_ids = stop_ids
        # What generation's cache stores: KV (fp8 with per-slot scales, or a plain dtype),
        # GDN / Mamba conv inputs and recurrent state.
        self.cache_dtypes = cache_dtypes if cache_dtypes is not None else CacheDtypes.resolve(dtype)
        if isinstance(module, PipelineModel):
            _check_pipeline_cache(self.cache_dtypes, dtype)
            self._generator = PipelineGenerator(module, cache_dtype=dtype, prefill_chunk=prefill_chunk)
        else:
            if prefill_chunk is not None:
                raise ValueError("prefill_chunk sets how a prompt flows through pipeline stages; this "
                                 "model has no pipeline (give a policy with pp > 1)")
            self._generator = Generator(module, cache_dtype=self.cache_dtypes)
        self._forward = None
        self._speculators: dict = {}

    @property
    def is_pipeline(self) -> bool:
        return isinstance(self.module, PipelineModel)

    @property
    def mesh(self) -> jax.sharding.Mesh:
        if self.is_pipeline:
            raise ValueError("a pipeline has one mesh per stage: see .sharding.meshes "
                             "(or .sharding.stages[s].mesh)")
        return self.sharding.mesh

    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """Token ids of one prompt (text, chat messages, or ids passed through)."""
        return encode(self.tokenizer, prompt, chat=chat)

    def generate(self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop: str | Sequence[str] | None = None, chat: bool = False,
                 ignore_eos: bool = False,
                 stream: Callable[[int, str], None] | None = None,
                 output_logits: bool = False, speculative: str | None = None,
                 num_speculative_tokens: int = 1) -> GenerationResult:
        """Generates for one prompt or a batch of prompts of any lengths.

        A prompt is a string, a list of chat messages, or a list of token ids. `stream`
        is called as `stream(row, new_text)` as text appears. Greedy when temperature=0.
        `ignore_eos` keeps generating past end-of-sequence tokens (for benchmarks and tests).
        `output_logits` also returns each generated token's float32 logits
        (`GenerationResult.logits`); without it the compiled steps return tokens only.
        `speculative="mtp"` drafts `num_speculative_tokens` tokens per step with the model's
        multi-token-prediction layers and verifies them in one forward (greedy only; same
        tokens as without it); the result then reports `acceptance_rate`.
        """
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if _is_single(prompts):
            prompts = [prompts]
        ids = [self.encode(p, chat=chat) for p in prompts]
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        detok = None
        if self.tokenizer is not None:
            detok = lambda toks: self.tokenizer.decode(toks, skip_special_tokens=True)  # noqa: E731
        if speculative is not None:
            if output_logits:
                raise SpeculativeError("output_logits is not available with speculative decoding")
            return self._speculator(speculative, num_speculative_tokens).generate(
                ids, max_new_tokens, sampling, stop_ids=set() if ignore_eos else self.stop_ids,
                detokenize=detok, stop_strings=stops, stream=stream)
        return self._generator.generate(ids, max_new_tokens, sampling, stop_ids=set() if ignore_eos else self.stop_ids,
                                        detokenize=detok, stop_strings=stops, stream=stream,
                                        output_logits=output_logits)

    def _speculator(self, method: str, num_tokens: int):
        if method not in SPECULATIVE_METHODS:
            raise SpeculativeError(f"speculative={method!r} is not a method (methods: "
                                   f"{', '.join(SPECULATIVE_METHODS)}, or None)")
        key = (method, num_tokens)
        if key not in self._speculators:
            self._speculators[key] = MTPSpeculator(self.module, self.dtype, num_tokens)
        return self._speculators[key]

    def logits(self, token_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Full forward without a cache: float32 logits [B, T, V] (rows of equal length)."""
        if self.is_pipeline:
            return self._generator.forward(np.asarray(token_ids, np.int32))
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


def load(path_or_alias: str | Path = DEFAULT_MODEL, *, dtype: str | None = "float32",
         policy: Policy = None,
         devices: Sequence[jax.Device] | None = None, mesh: jax.sharding.Mesh | None = None,
         sharding: ModelSharding | PipelineSharding | None = None, kernel_impl: KernelImpl = "auto",
         progress: bool | None = None, tokenizer: bool | Tokenizer = True,
         prefill_chunk: int | None = None, dequantize: bool = False, kv_cache_dtype: str | None = "auto",
         state_dtype: str | None = "auto") -> LoadedModel:
    """Loads an HF folder (safetensors), a Llama GGUF file, or an alias (`smollm2-135m`).

    `policy` is a rule table (preset name such as "tp" / "tpa-dcp" / "dp-attention" / "sp",
    a YAML file, a dict, or a RuleTable); None is plain tensor parallelism over `devices`
    (default one device). A policy uses `devices`, the devices of `mesh`, or all devices.
    Weights stream tensor by tensor into their shardings; `progress` shows a bar (default:
    when stderr is a terminal). `tokenizer=False` loads none (token ids in and out); a
    Tokenizer instance is used as given. A folder without tokenizer files loads without one.
    A table with `pp > 1` splits the layers into pipeline stages; each stage reads only its
    own tensors, and long prompts flow through the stages in chunks of `prefill_chunk`
    tokens (default 256).

    An FP8 block-scaled checkpoint (`quantization_config.quant_method: fp8` with
    `weight_block_size`) keeps its quantised weights in float8_e4m3fn with their block
    scales applied in each matmul, or with `dequantize=True` is dequantised to `dtype`
    while loading; other quantisation methods raise UnsupportedQuantizationError.

    `kv_cache_dtype`: what attention layers cache keys / values in: "auto" (the model's
    dtype), "float32", "bfloat16", "float16" or "float8_e4m3fn" (alias "fp8": scaled
    values, one scale per token and KV head computed when written). `state_dtype`: the GDN
    recurrent state's dtype ("auto" = float32, "bfloat16", "float16").
    """
    ckpt = open_checkpoint(path_or_alias)
    ckpt.dequantize = dequantize
    ckpt.quantization  # noqa: B018  (refuses an unsupported quantisation before any work)
    cfg = ckpt.cfg
    jdtype = resolve_dtype(dtype, cfg)
    cache_dtypes = CacheDtypes.resolve(jdtype, kv_cache_dtype, state_dtype)  # bad names fail before loading
    if sharding is None:
        sharding = make_sharding(cfg, policy, devices=devices, mesh=mesh)
    if isinstance(sharding, PipelineSharding) and cfg.mtp_num_layers:
        ckpt.drop_mtp("pipeline parallelism runs the main model only (speculative='mtp' is unavailable)")
        cfg = ckpt.cfg
        sharding = make_sharding(cfg, policy, devices=devices, mesh=mesh)
    options = RuntimeOptions(kernel_impl=kernel_impl)
    if progress is None:
        progress = sys.stderr.isatty()
    bar = (lambda it: tqdm(it, desc="loading weights", unit="tensor", leave=False)) if progress else None
    if isinstance(sharding, PipelineSharding):
        _check_pipeline_cache(cache_dtypes, jdtype)
        module = PipelineModel.load(ckpt, sharding, jdtype, options, progress=bar)
    else:
        graphdef, state = abstract_model(cfg, sharding, jdtype, options, fp8_from=None if dequantize else ckpt)
        state = ckpt.load_state(state, sharding, jdtype, progress=bar)
        module = nnx.merge(graphdef, state)
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        tok = load_tokenizer(ckpt.tokenizer_dir, ckpt.gguf_file) if tokenizer else None
        if tokenizer and tok is None:
            logging.getLogger("jaxpar").warning(
                "%s has no tokenizer files: loaded without a tokenizer (token ids in and out; "
                "text prompts are refused)", ckpt.tokenizer_dir)
    skipped = ckpt.skipped_tensors()
    if skipped:
        groups = sorted({n.split(".")[0] + "." + n.split(".")[1] if n.startswith("model.") else n.split(".")[0]
                         for n in skipped})
        logging.getLogger("jaxpar").warning("not loaded: %d tensors under %s (LoadedModel.skipped_weights "
                                            "lists them)", len(skipped), ", ".join(groups))
    return LoadedModel(module, tok, jdtype, _stop_ids(cfg, tok, ckpt.tokenizer_dir), skipped,
                       prefill_chunk=prefill_chunk, cache_dtypes=cache_dtypes)


def generate(path_or_alias: str | Path, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 64,
             **kwargs) -> GenerationResult:
    """One-shot: `jaxpar.generate(model, prompts, ...)` (load arguments: dtype, devices, mesh,
    kv_cache_dtype, state_dtype, ...)."""
    load_keys = {"dtype", "policy", "devices", "mesh", "sharding", "kernel_impl", "progress", "tokenizer",
                 "prefill_chunk", "dequantize", "kv_cache_dtype", "state_dtype"}
    model = load(path_or_alias, **{k: v for k, v in kwargs.items() if k in load_keys})
    return model.generate(prompts, max_new_tokens,
                          **{k: v for k, v in kwargs.items() if k not in load_keys})


class Engine(_Engine):
    """`jaxpar.Engine(model_path_or_loaded, ...)`: the serving engine
    (`jaxpar.engine.Engine`), loading a path with `jaxpar.load` (the stage this process
    runs gets its policy and devices; the other stage's copy is placed from it)."""

    def __init__(self, model, **kwargs):
        kwargs.setdefault("load", load)
        super().__init__(model, **kwargs)


__all__ = ["load", "generate", "open_tokenizer", "LoadedModel", "Engine", "CheckpointError", "DEFAULT_MODEL",
           "CacheDtypes", "CacheDtypeError",
           # from jaxpar.assembly, importable from here as before
           "ALIASES", "DTYPES", "SMOLLM2_GGUF", "SMOLLM2_WHEEL", "Policy", "make_sharding",
           "open_config", "resolve_dtype", "smollm2_gguf_path"]
