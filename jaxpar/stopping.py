"""One generated sequence on the host: its tokens, its text and why it stopped.

Shared by the static-batch `Generator` and the serving `Engine`, so both follow one
convention (that of HF `generate` and vLLM): a stop id (EOS) ends the sequence and is kept
in `token_ids`, but never appears in the text; a stop string ends it too and is cut from
the text (its tokens stay); reaching `max_new_tokens` ends it with reason "length".
"""

from __future__ import annotations

from typing import Callable, Collection, Sequence

Detokenize = Callable[[list[int]], str]


class SequenceOutput:
    """Tokens appended one at a time; `add` returns the text that became final.

    Text is rebuilt incrementally only when it is needed while generating (stop strings
    or streaming, `track_text`); otherwise it is decoded once by `final_text`.
    """

    def __init__(self, *, max_new_tokens: int, stop_ids: Collection[int] = (),
                 stop_strings: Sequence[str] = (), detokenize: Detokenize | None = None,
                 track_text: bool = False):
        if stop_strings and detokenize is None:
            raise ValueError("stop strings need a tokenizer")
        if track_text and detokenize is None:
            raise ValueError("streaming text needs a tokenizer")
        self.max_new_tokens = max_new_tokens
        self.stop_ids = frozenset(stop_ids)
        self.stop_strings = tuple(stop_strings)
        self.detokenize = detokenize
        self.track_text = track_text or bool(stop_strings)
        self.token_ids: list[int] = []
        self.text = ""
        self._streamed = ""  # the text already handed out as deltas
        self.finish_reason: str | None = None  # "stop" (stop id or string) or "length"
        self._stopped_on_id = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _text_tokens(self) -> list[int]:
        return self.token_ids[:-1] if self._stopped_on_id else self.token_ids

    def add(self, token: int) -> str:
        """Appends one generated token; returns the new text delta ("" when none)."""
        if self.done:
            raise RuntimeError("the sequence has already finished")
        self.token_ids.append(int(token))
        delta = ""
        if token in self.stop_ids:
            self._stopped_on_id = True
            self.finish_reason = "stop"
        elif self.track_text:
            text = self.detokenize(self.token_ids)
            for s in self.stop_strings:
                cut = text.find(s)
                if cut >= 0:
                    text = text[:cut]
                    self.finish_reason = "stop"
            self.text = text
            # A multi-byte character may decode as a replacement char until complete:
            # only text that extends what was already handed out is handed out.
            if len(text) > len(self._streamed) and text.startswith(self._streamed):
                delta = text[len(self._streamed):]
                self._streamed = text
        if not self.done and len(self.token_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
        return delta

    def final_text(self) -> str:
        """The whole text (decoded once here when it was not tracked while generating)."""
        if self.detokenize is None:
            return ""
        if not self.track_text:
            self.text = self.detokenize(self._text_tokens())
        return self.text
