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
            # The tokenizer class reads the GGUF vocabulary directly; AutoTokenizer would
            # first parse the whole file again (with gguf's slow reader) just for a config.
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(model_dir), gguf_file=gguf_file,
                                                           local_files_only=True)
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from {model_dir}"
                         f"{'/' + gguf_file if gguf_file else ''}: {e}") from e


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
