"""Tokenizers without torch: a `tokenizers.Tokenizer` built from an HF folder's
`tokenizer.json` or from a GGUF file's metadata, and chat templates rendered with jinja2
the way Hugging Face renders them.

A GGUF file carries no `tokenizer.json`: it stores the vocabulary, the BPE merges, each
token's type, the special token ids and the chat template under `tokenizer.*` keys, and
names the pre-tokenizer (the regular expressions that split text before BPE) by a short
key, `tokenizer.ggml.pre`. We turn that into an equivalent `tokenizer.json`; the
pre-tokenizer keys and their expressions follow llama.cpp's table (llama-vocab.cpp).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

Message = dict[str, str]
Prompt = str | Sequence[Message] | Sequence[int]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "added_tokens.json")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerError(ValueError):
    """A tokenizer that cannot be read or used (names the file or the missing piece)."""


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template.

    `encode` adds what the tokenizer's post-processor adds (e.g. a BOS token);
    `apply_chat_template` renders the template and encodes the result without adding
    anything (the template writes its own special tokens), as transformers does.
    """

    def __init__(self, backend, *, special_tokens: Mapping[str, str | None] | None = None,
                 chat_template: str | None = None, clean_up_tokenization_spaces: bool = False):
        self.backend = backend  # a tokenizers.Tokenizer
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template or None
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        for name in ("bos_token", "eos_token"):  # the ones generation relies on
            token = self.special_tokens.get(name)
            if token is not None and backend.token_to_id(token) is None:
                raise TokenizerError(f"the {name} {token!r} is not in the vocabulary")
        self._template = None

    def _id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:  # transformers' optional clean-up, same rules
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                                  (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                                  (" 're", "'re")):
                text = text.replace(before, after)
        return text

    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                            tokenize: bool = True, **variables: Any) -> str | list[int]:
        """Renders the chat template (`variables` reach the template, e.g. `tools`)."""
        if not self.chat_template:
            raise TokenizerError("this model's tokenizer has no chat template")
        if self._template is None:
            self._template = _compile_chat_template(self.chat_template)
        text = self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save_pretrained(self, directory: str | Path) -> list[str]:
        """Writes `tokenizer.json` and `tokenizer_config.json` (special tokens, chat
        template), which transformers' AutoTokenizer reads too; returns the file names."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens,
                                  "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        return ["tokenizer.json", "tokenizer_config.json"]


# --------------------------------------------------------------------------- chat templates


def _compile_chat_template(source: str):
    """The template in a sandbox with the helpers HF chat templates rely on:
    `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text and takes
    `indent`, loop controls, and the `{% generation %}` block (rendered as its body)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks;
        # for inference it is just its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template does not parse: {e}") from e


# --------------------------------------------------------------------------- HF folders


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_of(folder: Path, config: dict) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template


def tokenizer_from_folder(folder: str | Path) -> Tokenizer | None:
    """The tokenizer of an HF model folder, or None when the folder has no tokenizer
    files at all (as `save_pretrained` of a bare model writes)."""
    from tokenizers import Tokenizer as Backend

    folder = Path(folder)
    present = [f for f in TOKENIZER_FILES if (folder / f).is_file()]
    if not present:
        return None
    if "tokenizer.json" not in present:
        raise TokenizerError(
            f"{folder} has {', '.join(present)} but no tokenizer.json, the only tokenizer format "
            "jaxpar reads; write one with transformers (AutoTokenizer.from_pretrained(folder)"
            ".save_pretrained(folder)), or load with tokenizer=False to work with token ids")
    try:
        backend = Backend.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # tokenizers raises its own Exception type
        raise TokenizerError(f"cannot read {folder / 'tokenizer.json'}: {e}") from e
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        if (folder / name).is_file():
            config.update(json.loads((folder / name).read_text()))
    special = {name: _token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
    return Tokenizer(backend, special_tokens=special, chat_template=_chat_template_of(folder, config),
                     clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)))


# --------------------------------------------------------------------------- GGUF metadata

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


# `tokenizer.ggml.pre` -> (pre-tokenizer steps, ignore_merges). Groups as in llama.cpp:
# GPT-2's expression; the same after splitting every digit apart (StarCoder-style
# vocabularies such as SmolLM's); Llama 3's; Qwen2's. ignore_merges: a word that is a
# token as a whole is taken whole (Llama 3).
_PRE_TOKENIZERS: dict[str, tuple[list[dict], bool]] = {}
for _names, _steps, _ignore in (
        (("default", "gpt2", "gpt-2", "mpt", "olmo", "jais"), [_byte_level(True)], False),
        (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
         [{"type": "Digits", "individual_digits": True}, _byte_level(True)], False),
        (("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe", "dbrx"),
         [_split(_LLAMA3_SPLIT), _byte_level(False)], True),
        (("qwen2", "deepseek-r1-qwen", "megrez"), [_split(_QWEN2_SPLIT), _byte_level(False)], False)):
    for _name in _names:
        _PRE_TOKENIZERS[_name] = (_steps, _ignore)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def tokenizer_json_from_gguf(metadata: Mapping[str, Any]) -> dict:
    """The `tokenizer.json` a byte-level BPE GGUF vocabulary describes."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2', "
                             "byte-level BPE); load with tokenizer=False to work with token ids")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: "
                             f"{', '.join(sorted(_PRE_TOKENIZERS))})")
    steps, ignore_merges = _PRE_TOKENIZERS[pre]
    tokens = list(metadata["tokenizer.ggml.tokens"])
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is None:
        raise TokenizerError("the GGUF byte-level vocabulary has no tokenizer.ggml.merges")
    types = metadata.get("tokenizer.ggml.token_type")
    types = [1] * len(tokens) if types is None else [int(t) for t in types]
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind_ == _CONTROL}
             for i, (tok, kind_) in enumerate(zip(tokens, types)) if kind_ in (_CONTROL, _USER_DEFINED)]
    wrap = [("bos", metadata.get("tokenizer.ggml.add_bos_token", False)),
            ("eos", metadata.get("tokenizer.ggml.add_eos_token", False))]
    template = {"single": [{"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {}}
    for which, wanted in wrap:
        token_id = metadata.get(f"tokenizer.ggml.{which}_token_id")
        if not wanted or token_id is None:
            continue
        token = tokens[int(token_id)]
        piece = {"SpecialToken": {"id": token, "type_id": 0}}
        for seq in ("single", "pair"):
            if which == "bos":
                template[seq].insert(0, piece)
            else:
                template[seq].append(piece)
        template["special_tokens"][token] = {"id": token, "ids": [int(token_id)], "tokens": [token]}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
        "post_processor": {"type": "TemplateProcessing", **template},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges,
                  "vocab": {tok: i for i, tok in enumerate(tokens)}, "merges": list(merges)},
    }


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    """A GGUF file's tokenizer, from its `tokenizer.*` metadata (`GGUFSource.tokenizer_metadata()`)."""
    from tokenizers import Tokenizer as Backend

    spec = tokenizer_json_from_gguf(metadata)
    try:
        backend = Backend.from_str(json.dumps(spec))
    except Exception as e:  # tokenizers raises its own Exception type
        raise TokenizerError(f"cannot build the GGUF tokenizer: {e}") from e
    tokens = metadata["tokenizer.ggml.tokens"]
    special = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                      ("pad_token", "padding")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            if not 0 <= int(token_id) < len(tokens):
                raise TokenizerError(f"GGUF tokenizer.ggml.{key}_token_id {token_id} is outside the "
                                     f"vocabulary of {len(tokens)} tokens")
            special[name] = tokens[int(token_id)]
    return Tokenizer(backend, special_tokens=special, chat_template=metadata.get("tokenizer.chat_template"))


def load_tokenizer(model_dir: str | Path, gguf_file: str | None = None) -> Tokenizer | None:
    """The tokenizer of a model folder (HF or Orbax, from its tokenizer files), or of the
    GGUF file `model_dir/gguf_file` (or `model_dir` itself, a .gguf file) from its metadata;
    None for a folder without any tokenizer files."""
    path = Path(model_dir) / gguf_file if gguf_file else Path(model_dir)
    if path.is_file() and path.suffix == ".gguf":
        from jaxpar.loading.gguf_source import GGUFSource

        return tokenizer_from_gguf(GGUFSource(path).tokenizer_metadata())
    return tokenizer_from_folder(path)


# --------------------------------------------------------------------------- prompts


def encode(tokenizer: Tokenizer | None, prompt: Prompt, *, chat: bool) -> list[int]:
    """One prompt -> token ids. A list of ints is taken as ids already; a list of
    {role, content} messages, or a string with chat=True, goes through the chat template."""
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return list(prompt)  # token ids (an empty list is rejected by the generator)
    if tokenizer is None:
        raise TokenizerError("this model was loaded without a tokenizer: pass token ids (its "
                             "folder has no tokenizer files, or tokenizer=False was given)")
    if isinstance(prompt, str) and not prompt:
        raise TokenizerError("the prompt is empty (to start from nothing, pass token ids, "
                             "e.g. [bos_token_id])")
    if isinstance(prompt, str) and not chat:
        return tokenizer.encode(prompt)
    if not tokenizer.chat_template:
        raise TokenizerError("chat=True, but this model's tokenizer has no chat template")
    messages: Any = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
