"""The torch-free tokenizer (jaxpar/tokenizer.py) against Hugging Face's:

- SmolLM2's GGUF: ours is built from the file's metadata with `tokenizers`; HF's GGUF
  reader (which needs torch, hence skipped without it) is the reference: the same ids,
  decoded text and chat-template output.
- stories260K's tokenizer.json folder against transformers' AutoTokenizer (no torch needed).
- chat templates rendered by our jinja2 environment against transformers' renderer.
- the README demo in a subprocess where `import torch` fails.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxpar.tokenizer import (Tokenizer, TokenizerError, load_tokenizer, tokenizer_from_folder,
                              tokenizer_from_gguf)

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "What is the capital of France?",
    "Hello world",
    " leading space, trailing space ",
    "  two  spaces\n\nnew lines\ttab\r\n",
    "Numbers 12345 and 3.14159, the year 2024; 1,000,000!",
    "unicode: café naïve Zürich 日本語 😀👍🏽 Ελληνικά русский عربى",
    "don't you're I'll we'VE",
    "<|im_start|>user\nhi<|im_end|>\n",       # special tokens inside text stay whole
    "a<|endoftext|>b<|im_end|>",
    "x" * 40 + " " + "ab" * 20,
    "\x00\x01 control \x7f ÿ",
    "def f(x):\n    return x**2  # comment\n",
    "   ",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3?"}],
]


def _smol_gguf() -> Path:
    from jaxpar.api import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2-135M-Instruct is not installed: {e}")


@pytest.fixture(scope="module")
def smol_tok() -> Tokenizer:
    return load_tokenizer(_smol_gguf())


@pytest.fixture(scope="module")
def hf_smol_tok():
    """transformers' own GGUF tokenizer reader (it imports torch)."""
    path = _smol_gguf()
    if importlib.util.find_spec("torch") is None:
        pytest.skip("the HF GGUF tokenizer reference needs torch (not installed in this pass)")
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)


def test_gguf_tokenizer_matches_hf(smol_tok, hf_smol_tok):
    assert smol_tok.eos_token_id == hf_smol_tok.eos_token_id == 2     # <|im_end|>
    assert smol_tok.bos_token_id == hf_smol_tok.bos_token_id == 1
    for text in TEXTS:
        ids = smol_tok.encode(text)
        assert ids == hf_smol_tok(text).input_ids, text
        for skip in (True, False):
            assert smol_tok.decode(ids, skip_special_tokens=skip) == \
                hf_smol_tok.decode(ids, skip_special_tokens=skip), (text, skip)
    # The digits are split one by one (SmolLM's pre-tokenizer, `tokenizer.ggml.pre` = smollm).
    assert len(smol_tok.encode("2024")) == 4


def test_gguf_chat_template_matches_hf(smol_tok, hf_smol_tok):
    assert smol_tok.chat_template == hf_smol_tok.chat_template
    for conversation in CONVERSATIONS:
        for generation_prompt in (True, False):
            ours = smol_tok.apply_chat_template(conversation, add_generation_prompt=generation_prompt,
                                                tokenize=False)
            ref = hf_smol_tok.apply_chat_template(conversation, add_generation_prompt=generation_prompt,
                                                  tokenize=False)
            assert ours == ref
            ids = hf_smol_tok.apply_chat_template(conversation, add_generation_prompt=generation_prompt)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids
            assert smol_tok.apply_chat_template(conversation, add_generation_prompt=generation_prompt) == list(ids)


def test_saved_gguf_tokenizer_loads_in_transformers_and_back(smol_tok, tmp_path):
    """save_pretrained (used when converting a GGUF to Orbax) writes files that
    transformers' AutoTokenizer and our folder reader both read to the same tokenizer."""
    from transformers import AutoTokenizer

    smol_tok.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = tokenizer_from_folder(tmp_path)
    assert ours.eos_token_id == hf.eos_token_id == smol_tok.eos_token_id
    assert ours.chat_template == hf.chat_template == smol_tok.chat_template
    for text in TEXTS:
        assert ours.encode(text) == hf(text).input_ids == smol_tok.encode(text), text
    conversation = CONVERSATIONS[1]
    assert ours.apply_chat_template(conversation, tokenize=False) == \
        hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def test_folder_tokenizer_matches_transformers(stories_dir):
    from transformers import AutoTokenizer

    ours = tokenizer_from_folder(stories_dir)
    hf = AutoTokenizer.from_pretrained(str(stories_dir))
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    for text in ["Once upon a time", "Tom and Sue went to the big park.", " x  y\n"] + TEXTS[:7]:
        ids = ours.encode(text)
        assert ids == hf(text).input_ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text


def test_chat_template_features_match_transformers():
    """tojson (non-ASCII kept, indent), loop controls, raise_exception, strftime_now,
    namespace and the {% generation %} block, against transformers' renderer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    template = (
        "{% set ns = namespace(n=0) %}{{ bos_token }}"
        "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}<{{ m.role }}>{{ m.content | tojson }}"
        "{% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endif %}\n"
        "{% endfor %}{{ tools | tojson(indent=2) }}{{ ns.n }}{{ strftime_now('%Y') | length }}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    messages = [{"role": "user", "content": "Grüße «x»"}, {"role": "skip", "content": "-"},
                {"role": "assistant", "content": "ok"}]
    tools = [{"name": "f", "description": "é"}]
    backend = Backend(WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok = Tokenizer(backend, special_tokens={"bos_token": "<s>", "eos_token": "</s>"}, chat_template=template)
    ours = tok.apply_chat_template(messages, tokenize=False, tools=tools)
    ref = render_jinja_template([messages], tools=tools, chat_template=template, add_generation_prompt=True,
                                bos_token="<s>", eos_token="</s>")
    ref = ref[0][0] if isinstance(ref, tuple) else ref
    assert ours == ref and "Grüße" in ours and "[ok]" in ours
    failing = Tokenizer(backend, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(Exception, match="roles must alternate"):
        failing.apply_chat_template(messages)


def _metadata(**overrides):
    tokens = ["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġab", "1", "2"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3, 3, 1, 1, 1, 1, 1, 1, 1],
            "tokenizer.ggml.merges": ["a b", "Ġ ab"], "tokenizer.ggml.bos_token_id": 0,
            "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.add_bos_token": True}
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def test_gguf_metadata_options():
    tok = tokenizer_from_gguf(_metadata())
    assert tok.encode("ab ab") == [0, 4, 6]              # BOS added, as the file says
    assert tok.encode("ab ab", add_special_tokens=False) == [4, 6]
    assert tok.encode("ab</s>") == [0, 4, 1]             # a control token stays whole
    assert tok.decode([0, 4, 6, 1]) == "ab ab"
    assert tokenizer_from_gguf(_metadata(**{"tokenizer.ggml.add_bos_token": False})).encode("ab") == [4]
    assert tok.chat_template is None


def test_gguf_metadata_errors():
    with pytest.raises(TokenizerError, match=r"GGUF tokenizer model 'llama' is not supported"):
        tokenizer_from_gguf(_metadata(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(TokenizerError, match=r"GGUF pre-tokenizer 'mystery' is not supported"):
        tokenizer_from_gguf(_metadata(**{"tokenizer.ggml.pre": "mystery"}))
    with pytest.raises(TokenizerError, match="has no tokenizer.ggml.merges"):
        tokenizer_from_gguf(_metadata(**{"tokenizer.ggml.merges": None}))
    with pytest.raises(TokenizerError, match="eos_token_id 99 is outside the vocabulary of 9 tokens"):
        tokenizer_from_gguf(_metadata(**{"tokenizer.ggml.eos_token_id": 99}))


def test_folder_tokenizer_errors(tmp_path):
    assert tokenizer_from_folder(tmp_path) is None              # no tokenizer files at all
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(TokenizerError, match="has tokenizer.model but no tokenizer.json"):
        tokenizer_from_folder(tmp_path)


# --------------------------------------------------------------------------- the README demo

_BLOCK_TORCH = '''\
import sys


class _Blocked:
    """`import torch` (and transformers) fails, as in a fresh environment without them."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
'''


def test_readme_demo_runs_without_torch(tmp_path):
    """`jaxpar generate --chat --prompt "What is the capital of France?"` on the default
    model, in a process where importing torch or transformers fails."""
    _smol_gguf()
    (tmp_path / "sitecustomize.py").write_text(_BLOCK_TORCH)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), JAX_PLATFORMS="cpu")
    for module in ("torch", "transformers"):
        check = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True,
                               text=True)
        assert check.returncode != 0 and "blocked by the test" in check.stderr
    run = subprocess.run([sys.executable, "-m", "jaxpar.cli", "generate", "--chat", "--prompt",
                          "What is the capital of France?"], env=env, capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Paris" in run.stdout
    assert "compile" in run.stderr and "tokens/s" in run.stderr
