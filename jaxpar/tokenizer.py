"""Tokenizers (HF `tokenizer.json` folders or GGUF metadata) and chat templates."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

Message = dict[str, str]
Prompt = str | Sequence[Message] | Sequence[int]


def load_tokenizer(model_dir: str | Path, gguf_file: str | None = None):
    """An HF fast tokenizer, read from local files only."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        if gguf_file is not None:
            return _gguf_tokenizer(Path(model_dir) / gguf_file)
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from {model_dir}"
                         f"{'/' + gguf_file if gguf_file else ''}: {e}") from e


def _gguf_tokenizer(path: Path):
    """The fast tokenizer a GGUF file's metadata describes, built by transformers' own GGUF
    converter from the metadata our reader returns: transformers' `from_pretrained(gguf_file=...)`
    reads that metadata with a module that imports torch (transformers 5.x), and jaxpar must
    run without torch. The steps mirror transformers' `get_gguf_tokenizer`."""
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                           convert_gguf_tokenizer)
    except ImportError:  # older transformers read the metadata without torch themselves
        return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name,
                                                       local_files_only=True)
    from jaxpar.loading.gguf_source import GGUFFile

    metadata = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in GGUFFile(path).metadata.items()}
    groups = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                      if f"tokenizer.{key}" in metadata}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, config = groups["tokenizer"], groups["tokenizer_config"]
    kind = tokenizer_dict.get("tokenizer_type")
    if kind == "llama":  # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
        config.setdefault("add_bos_token", True)
    elif kind == "gemma4":  # its chat template writes <bos> itself
        config["add_bos_token"] = False
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def encode(tokenizer, prompt: Prompt, *, chat: bool) -> list[int]:
    """One prompt -> token ids. A list of ints is taken as ids already; a list of
    {role, content} messages, or a string with chat=True, goes through the chat template."""
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return list(prompt)  # token ids (an empty list is rejected by the generator)
    if isinstance(prompt, str) and not prompt:
        raise ValueError("the prompt is empty (to start from nothing, pass token ids, "
                         "e.g. [bos_token_id])")
    if isinstance(prompt, str) and not chat:
        return list(tokenizer(prompt).input_ids)
    messages: Any = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True, but this model's tokenizer has no chat template")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
